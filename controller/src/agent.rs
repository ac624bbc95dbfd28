//! A launchd service definition (LaunchAgent plist): a typed view over the plist dictionary.
//!
//! The dictionary stays the source of truth so that keys we do not model, and the order of
//! every key, survive an edit untouched; the typed accessors read from it after
//! [`LaunchAgent::from_bytes`] has checked every key we model.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use plist::{Dictionary, Value};

/// Why a plist is not a service definition we will touch.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} is not a property list: {source}")]
    Parse { what: String, source: plist::Error },
    #[error("{what} is not a valid launchd service definition:\n  - {}", problems.join("\n  - "))]
    Invalid { what: String, problems: Vec<String> },
    #[error("cannot serialise the property list: {0}")]
    Serialise(plist::Error),
}

/// A launchd job label (`com.example.service`): non-empty, no `/` and no whitespace,
/// because it becomes the last component of a service target (`gui/501/<label>`).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Label(String);

impl Label {
    pub fn new(s: impl Into<String>) -> Result<Self, String> {
        let s = s.into();
        if s.is_empty() {
            return Err("Label is empty".into());
        }
        if s.contains('/') || s.chars().any(char::is_whitespace) {
            return Err(format!("Label {s:?} must not contain '/' or whitespace"));
        }
        Ok(Label(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Label {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Label::new(s)
    }
}

impl From<Label> for String {
    fn from(l: Label) -> String {
        l.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The path of a service definition on disk (`~/Library/LaunchAgents/<label>.plist`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlistPath(PathBuf);

impl PlistPath {
    /// Made absolute so that backups, locks and launchctl all name the same file.
    pub fn new(p: impl AsRef<Path>) -> std::io::Result<Self> {
        Ok(PlistPath(std::path::absolute(p.as_ref())?))
    }
    pub fn as_path(&self) -> &Path {
        &self.0
    }
    pub fn dir(&self) -> &Path {
        self.0.parent().unwrap_or(Path::new("/"))
    }
    pub fn file_name(&self) -> String {
        self.0
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl fmt::Display for PlistPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// `KeepAlive`: a plain boolean or a dictionary of conditions.
#[derive(Debug, Clone, PartialEq)]
pub enum KeepAlive {
    Always(bool),
    /// `SuccessfulExit: false` restarts the job only when it exits non-zero or by a signal.
    Conditions {
        successful_exit: Option<bool>,
    },
}

impl KeepAlive {
    /// Whether launchd restarts the job after it exits this way.
    pub fn restarts_after(&self, clean_exit: bool) -> bool {
        match self {
            KeepAlive::Always(b) => *b,
            KeepAlive::Conditions {
                successful_exit: Some(want_success),
            } => *want_success == clean_exit,
            KeepAlive::Conditions {
                successful_exit: None,
            } => false,
        }
    }
}

/// `ProcessType`: how launchd limits the job's resources. `Interactive` is never throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessType {
    Background,
    Standard,
    Adaptive,
    Interactive,
}

impl ProcessType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Background" => ProcessType::Background,
            "Standard" => ProcessType::Standard,
            "Adaptive" => ProcessType::Adaptive,
            "Interactive" => ProcessType::Interactive,
            _ => return None,
        })
    }
}

/// A typed snapshot of the keys we model.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSpec {
    pub label: Label,
    pub program_arguments: Vec<String>,
    pub keep_alive: Option<KeepAlive>,
    pub run_at_load: Option<bool>,
    pub throttle_interval: Option<u64>,
    pub exit_timeout: Option<u64>,
    pub standard_out_path: Option<PathBuf>,
    pub standard_error_path: Option<PathBuf>,
    pub environment: BTreeMap<String, String>,
    pub working_directory: Option<PathBuf>,
    pub process_type: Option<ProcessType>,
    /// Keys we do not model, kept as they are.
    pub other_keys: Vec<String>,
}

const MODELLED: &[&str] = &[
    "Label",
    "Program",
    "ProgramArguments",
    "KeepAlive",
    "RunAtLoad",
    "ThrottleInterval",
    "ExitTimeOut",
    "StandardOutPath",
    "StandardErrorPath",
    "EnvironmentVariables",
    "WorkingDirectory",
    "ProcessType",
];

/// A validated LaunchAgent definition.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchAgent {
    dict: Dictionary,
}

impl LaunchAgent {
    /// Reads and validates a plist file (XML or binary).
    pub fn load(path: &PlistPath) -> Result<(Self, Vec<u8>), AgentError> {
        let bytes = std::fs::read(path.as_path()).map_err(|source| AgentError::Read {
            path: path.as_path().to_path_buf(),
            source,
        })?;
        let agent = Self::from_bytes(&bytes, &path.to_string())?;
        Ok((agent, bytes))
    }

    /// Parses and validates; `what` names the source in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Self, AgentError> {
        let value = Value::from_reader(Cursor::new(bytes)).map_err(|source| AgentError::Parse {
            what: what.to_string(),
            source,
        })?;
        let Some(dict) = value.into_dictionary() else {
            return Err(AgentError::Invalid {
                what: what.to_string(),
                problems: vec!["the top level is not a dictionary".into()],
            });
        };
        let agent = LaunchAgent { dict };
        let problems = agent.problems();
        if problems.is_empty() {
            Ok(agent)
        } else {
            Err(AgentError::Invalid {
                what: what.to_string(),
                problems,
            })
        }
    }

    /// Every structural problem, so the operator sees them all at once.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let d = &self.dict;
        match d.get("Label") {
            Some(Value::String(s)) => {
                if let Err(e) = Label::new(s.clone()) {
                    p.push(e);
                }
            }
            Some(_) => p.push("Label is not a string".into()),
            None => p.push("Label is missing".into()),
        }
        match d.get("ProgramArguments") {
            Some(Value::Array(a)) => {
                if a.is_empty() {
                    p.push("ProgramArguments is empty".into());
                }
                for (i, v) in a.iter().enumerate() {
                    if v.as_string().is_none() {
                        p.push(format!("ProgramArguments[{i}] is not a string"));
                    }
                }
                if d.get("Program").is_none() {
                    if let Some(first) = a.first().and_then(Value::as_string) {
                        if !Path::new(first).is_absolute() {
                            p.push(format!(
                                "ProgramArguments[0] {first:?} is not an absolute path (launchd does not search PATH)"
                            ));
                        }
                    }
                }
            }
            Some(_) => p.push("ProgramArguments is not an array".into()),
            None => p.push("ProgramArguments is missing".into()),
        }
        if let Some(v) = d.get("Program") {
            match v.as_string() {
                Some(s) if Path::new(s).is_absolute() => {}
                _ => p.push("Program is not an absolute path string".into()),
            }
        }
        match d.get("KeepAlive") {
            None | Some(Value::Boolean(_)) => {}
            Some(Value::Dictionary(k)) => {
                if let Some(v) = k.get("SuccessfulExit") {
                    if v.as_boolean().is_none() {
                        p.push("KeepAlive.SuccessfulExit is not a boolean".into());
                    }
                }
            }
            Some(_) => p.push("KeepAlive is neither a boolean nor a dictionary".into()),
        }
        if let Some(v) = d.get("RunAtLoad") {
            if v.as_boolean().is_none() {
                p.push("RunAtLoad is not a boolean".into());
            }
        }
        for key in ["ThrottleInterval", "ExitTimeOut"] {
            if let Some(v) = d.get(key) {
                if v.as_unsigned_integer().is_none() {
                    p.push(format!("{key} is not a non-negative integer"));
                }
            }
        }
        for key in ["StandardOutPath", "StandardErrorPath", "WorkingDirectory"] {
            if let Some(v) = d.get(key) {
                match v.as_string() {
                    Some(s) if Path::new(s).is_absolute() => {}
                    Some(s) => p.push(format!("{key} {s:?} is not an absolute path")),
                    None => p.push(format!("{key} is not a string")),
                }
            }
        }
        match d.get("EnvironmentVariables") {
            None => {}
            Some(Value::Dictionary(env)) => {
                for (k, v) in env {
                    if v.as_string().is_none() {
                        p.push(format!("EnvironmentVariables.{k} is not a string"));
                    }
                }
            }
            Some(_) => p.push("EnvironmentVariables is not a dictionary".into()),
        }
        if let Some(v) = d.get("ProcessType") {
            if v.as_string().and_then(ProcessType::parse).is_none() {
                p.push(
                    "ProcessType is not one of Background, Standard, Adaptive, Interactive".into(),
                );
            }
        }
        p
    }

    /// The XML form we write (launchd and `plutil` read it; diffs are readable).
    pub fn to_xml(&self) -> Result<Vec<u8>, AgentError> {
        let mut out = Vec::new();
        Value::Dictionary(self.dict.clone())
            .to_writer_xml(&mut out)
            .map_err(AgentError::Serialise)?;
        out.push(b'\n');
        Ok(out)
    }

    pub fn dictionary(&self) -> &Dictionary {
        &self.dict
    }

    pub(crate) fn dictionary_mut(&mut self) -> &mut Dictionary {
        &mut self.dict
    }

    pub fn label(&self) -> Label {
        Label::new(self.string("Label").unwrap_or_default()).expect("validated at load")
    }

    pub fn program_arguments(&self) -> Vec<String> {
        self.dict
            .get("ProgramArguments")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_string)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The executable launchd runs: `Program` when present, else `ProgramArguments[0]`.
    pub fn binary(&self) -> PathBuf {
        match self.string("Program") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(
                self.program_arguments()
                    .first()
                    .cloned()
                    .unwrap_or_default(),
            ),
        }
    }

    /// The arguments after the executable.
    pub fn flags(&self) -> Vec<String> {
        self.program_arguments().into_iter().skip(1).collect()
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags().iter().any(|a| a == flag)
    }

    /// The value of `--name VALUE` or `--name=VALUE` in the arguments.
    pub fn flag_value(&self, name: &str) -> Option<String> {
        let args = self.flags();
        let prefix = format!("{name}=");
        for (i, a) in args.iter().enumerate() {
            if a == name {
                return args.get(i + 1).cloned();
            }
            if let Some(v) = a.strip_prefix(&prefix) {
                return Some(v.to_string());
            }
        }
        None
    }

    pub fn spec(&self) -> AgentSpec {
        let d = &self.dict;
        AgentSpec {
            label: self.label(),
            program_arguments: self.program_arguments(),
            keep_alive: match d.get("KeepAlive") {
                Some(Value::Boolean(b)) => Some(KeepAlive::Always(*b)),
                Some(Value::Dictionary(k)) => Some(KeepAlive::Conditions {
                    successful_exit: k.get("SuccessfulExit").and_then(Value::as_boolean),
                }),
                _ => None,
            },
            run_at_load: d.get("RunAtLoad").and_then(Value::as_boolean),
            throttle_interval: d
                .get("ThrottleInterval")
                .and_then(Value::as_unsigned_integer),
            exit_timeout: d.get("ExitTimeOut").and_then(Value::as_unsigned_integer),
            standard_out_path: self.string("StandardOutPath").map(PathBuf::from),
            standard_error_path: self.string("StandardErrorPath").map(PathBuf::from),
            environment: self.environment(),
            working_directory: self.string("WorkingDirectory").map(PathBuf::from),
            process_type: self
                .string("ProcessType")
                .and_then(|s| ProcessType::parse(&s)),
            other_keys: d
                .keys()
                .filter(|k| !MODELLED.contains(&k.as_str()))
                .cloned()
                .collect(),
        }
    }

    pub fn environment(&self) -> BTreeMap<String, String> {
        self.dict
            .get("EnvironmentVariables")
            .and_then(Value::as_dictionary)
            .map(|env| {
                env.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_string()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn string(&self, key: &str) -> Option<String> {
        self.dict
            .get(key)
            .and_then(Value::as_string)
            .map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SAMPLE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>Label</key>
	<string>com.example.runtime</string>
	<key>ProgramArguments</key>
	<array>
		<string>/opt/old/cathedral</string>
		<string>serve</string>
		<string>--listen</string>
		<string>0.0.0.0:1337</string>
		<string>--no-plain</string>
	</array>
	<key>KeepAlive</key>
	<dict>
		<key>SuccessfulExit</key>
		<false/>
	</dict>
	<key>ThrottleInterval</key>
	<integer>10</integer>
	<key>ProcessType</key>
	<string>Interactive</string>
	<key>EnvironmentVariables</key>
	<dict>
		<key>RUST_LOG</key>
		<string>info</string>
	</dict>
	<key>Nice</key>
	<integer>-5</integer>
</dict>
</plist>
"#;

    #[test]
    fn typed_view_reads_every_modelled_key_and_keeps_unknown_ones() {
        let a = LaunchAgent::from_bytes(SAMPLE.as_bytes(), "sample").unwrap();
        let s = a.spec();
        assert_eq!(s.label.as_str(), "com.example.runtime");
        assert_eq!(a.binary(), PathBuf::from("/opt/old/cathedral"));
        assert_eq!(
            s.keep_alive,
            Some(KeepAlive::Conditions {
                successful_exit: Some(false)
            })
        );
        assert_eq!(s.throttle_interval, Some(10));
        assert_eq!(s.process_type, Some(ProcessType::Interactive));
        assert_eq!(
            s.environment.get("RUST_LOG").map(String::as_str),
            Some("info")
        );
        assert_eq!(s.other_keys, vec!["Nice".to_string()]);
        assert_eq!(a.flag_value("--listen").as_deref(), Some("0.0.0.0:1337"));
        // Round trip through our writer keeps every key and its order.
        let again = LaunchAgent::from_bytes(&a.to_xml().unwrap(), "again").unwrap();
        assert_eq!(again, a);
        let keys: Vec<_> = again.dictionary().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "Label",
                "ProgramArguments",
                "KeepAlive",
                "ThrottleInterval",
                "ProcessType",
                "EnvironmentVariables",
                "Nice"
            ]
        );
    }

    #[test]
    fn keep_alive_successful_exit_false_restarts_only_on_failure() {
        let k = KeepAlive::Conditions {
            successful_exit: Some(false),
        };
        assert!(k.restarts_after(false));
        assert!(!k.restarts_after(true));
    }

    #[test]
    fn structural_problems_are_all_reported() {
        let bad = SAMPLE
            .replace(
                "<string>/opt/old/cathedral</string>",
                "<string>cathedral</string>",
            )
            .replace("<integer>10</integer>", "<string>ten</string>")
            .replace("<string>Interactive</string>", "<string>Fast</string>");
        let err = LaunchAgent::from_bytes(bad.as_bytes(), "bad").unwrap_err();
        let AgentError::Invalid { problems, .. } = err else {
            panic!("expected Invalid, got {err}")
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn truncated_xml_is_a_parse_error() {
        let cut = &SAMPLE.as_bytes()[..SAMPLE.len() / 2];
        assert!(matches!(
            LaunchAgent::from_bytes(cut, "cut"),
            Err(AgentError::Parse { .. })
        ));
    }
}
