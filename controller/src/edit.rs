//! Edits of a service definition, each idempotent, and the diff an operator reviews.

use std::fmt;
use std::path::PathBuf;

use plist::{Dictionary, Value};

use crate::agent::{AgentError, LaunchAgent};

/// One change to a service definition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Edit {
    /// Point the job at another executable (`ProgramArguments[0]`, and `Program` if present).
    SetBinary(PathBuf),
    /// Insert `flag` right after the argument `after` (or append it when `after` is `None`);
    /// nothing happens when the flag is already there.
    InsertFlag {
        flag: String,
        after: Option<String>,
    },
    /// Remove every occurrence of a flag: `--x=value`, `--x`, and with `--x` the value after
    /// it, if there is one (an argument not starting with `-`: `cathedral serve` takes no
    /// positional arguments, so such an argument can only be this flag's value).
    RemoveFlag(String),
    SetEnv {
        name: String,
        value: String,
    },
    UnsetEnv(String),
}

impl fmt::Display for Edit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Edit::SetBinary(p) => write!(f, "binary → {}", p.display()),
            Edit::InsertFlag {
                flag,
                after: Some(a),
            } => write!(f, "insert {flag} after {a}"),
            Edit::InsertFlag { flag, after: None } => write!(f, "append {flag}"),
            Edit::RemoveFlag(flag) => write!(f, "remove {flag}"),
            Edit::SetEnv { name, value } => write!(f, "env {name}={value}"),
            Edit::UnsetEnv(name) => write!(f, "unset env {name}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error(
        "cannot insert {flag}: the anchor argument {anchor} is not in ProgramArguments {args:?}"
    )]
    AnchorMissing {
        flag: String,
        anchor: String,
        args: Vec<String>,
    },
    #[error("{0:?} is not an absolute path: launchd does not search PATH")]
    RelativeBinary(PathBuf),
    #[error("the edit left an invalid definition: {0}")]
    Invalid(#[from] AgentError),
}

impl LaunchAgent {
    /// Applies one edit; returns whether anything changed.
    pub fn apply(&mut self, edit: &Edit) -> Result<bool, EditError> {
        let before = self.clone();
        match edit {
            Edit::SetBinary(path) => {
                if !path.is_absolute() {
                    return Err(EditError::RelativeBinary(path.clone()));
                }
                let s = path.to_string_lossy().into_owned();
                let d = self.dictionary_mut();
                if d.contains_key("Program") {
                    d.insert("Program".into(), Value::String(s.clone()));
                }
                if let Some(first) = args_mut(d).first_mut() {
                    *first = Value::String(s);
                }
            }
            Edit::InsertFlag { flag, after } => {
                if !self.has_flag(flag) {
                    let args = self.program_arguments();
                    let at = match after {
                        // Index 0 is the executable; anchors are arguments after it.
                        Some(anchor) => match args.iter().skip(1).position(|a| a == anchor) {
                            Some(i) => i + 2,
                            None => {
                                return Err(EditError::AnchorMissing {
                                    flag: flag.clone(),
                                    anchor: anchor.clone(),
                                    args,
                                })
                            }
                        },
                        None => args.len(),
                    };
                    args_mut(self.dictionary_mut()).insert(at, Value::String(flag.clone()));
                }
            }
            Edit::RemoveFlag(flag) => {
                let prefix = format!("{flag}=");
                let a = args_mut(self.dictionary_mut());
                let mut i = 1;
                while i < a.len() {
                    let s = a[i].as_string().unwrap_or_default();
                    if s.starts_with(&prefix) {
                        a.remove(i);
                    } else if s == flag {
                        a.remove(i);
                        let value = a.get(i).and_then(|v| v.as_string());
                        if value.is_some_and(|v| !v.starts_with('-')) {
                            a.remove(i);
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            Edit::SetEnv { name, value } => {
                env_mut(self.dictionary_mut()).insert(name.clone(), Value::String(value.clone()));
            }
            Edit::UnsetEnv(name) => {
                let d = self.dictionary_mut();
                env_mut(d).remove(name);
                if env_mut(d).is_empty() {
                    d.remove("EnvironmentVariables");
                }
            }
        }
        let problems = self.problems();
        if !problems.is_empty() {
            *self = before;
            return Err(EditError::Invalid(AgentError::Invalid {
                what: format!("the definition after `{edit}`"),
                problems,
            }));
        }
        Ok(*self != before)
    }

    /// Applies edits in order; returns the ones that changed something.
    pub fn apply_all(&mut self, edits: &[Edit]) -> Result<Vec<Edit>, EditError> {
        let mut changed = Vec::new();
        for e in edits {
            if self.apply(e)? {
                changed.push(e.clone());
            }
        }
        Ok(changed)
    }
}

fn args_mut(d: &mut Dictionary) -> &mut Vec<Value> {
    d.get_mut("ProgramArguments")
        .and_then(Value::as_array_mut)
        .expect("ProgramArguments validated at load")
}

fn env_mut(d: &mut Dictionary) -> &mut Dictionary {
    if !d.contains_key("EnvironmentVariables") {
        d.insert(
            "EnvironmentVariables".into(),
            Value::Dictionary(Dictionary::new()),
        );
    }
    d.get_mut("EnvironmentVariables")
        .and_then(Value::as_dictionary_mut)
        .expect("EnvironmentVariables validated at load")
}

/// A unified diff of two definitions in the form we write, so formatting of the file on
/// disk does not hide or invent changes.
pub fn diff(old: &LaunchAgent, new: &LaunchAgent, name: &str) -> Result<String, AgentError> {
    let a = String::from_utf8_lossy(&old.to_xml()?).into_owned();
    let b = String::from_utf8_lossy(&new.to_xml()?).into_owned();
    Ok(similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .context_radius(3)
        .header(&format!("{name} (now)"), &format!("{name} (after)"))
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LaunchAgent {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<plist version="1.0"><dict>
<key>Label</key><string>com.example.runtime</string>
<key>ProgramArguments</key><array>
<string>/opt/old/cathedral</string><string>serve</string><string>--no-plain</string><string>--listen</string><string>0.0.0.0:1337</string>
</array></dict></plist>"#;
        LaunchAgent::from_bytes(xml.as_bytes(), "sample").unwrap()
    }

    #[test]
    fn field_report_edit_swaps_binary_and_inserts_vision_after_no_plain() {
        let mut a = sample();
        let changed = a
            .apply_all(&[
                Edit::SetBinary("/opt/new/cathedral".into()),
                Edit::InsertFlag {
                    flag: "--vision-enabled".into(),
                    after: Some("--no-plain".into()),
                },
            ])
            .unwrap();
        assert_eq!(changed.len(), 2);
        assert_eq!(
            a.program_arguments(),
            [
                "/opt/new/cathedral",
                "serve",
                "--no-plain",
                "--vision-enabled",
                "--listen",
                "0.0.0.0:1337"
            ]
        );
    }

    #[test]
    fn insert_is_idempotent_and_remove_undoes_it() {
        let mut a = sample();
        let ins = Edit::InsertFlag {
            flag: "--vision-enabled".into(),
            after: Some("--no-plain".into()),
        };
        assert!(a.apply(&ins).unwrap());
        assert!(!a.apply(&ins).unwrap());
        assert_eq!(
            a.flags()
                .iter()
                .filter(|f| *f == "--vision-enabled")
                .count(),
            1
        );
        assert!(a
            .apply(&Edit::RemoveFlag("--vision-enabled".into()))
            .unwrap());
        assert_eq!(a, sample());
    }

    #[test]
    fn removing_a_flag_takes_its_value_along() {
        let mut a = sample();
        assert!(a.apply(&Edit::RemoveFlag("--listen".into())).unwrap());
        assert_eq!(
            a.program_arguments(),
            ["/opt/old/cathedral", "serve", "--no-plain"]
        );
        let mut b = sample();
        b.apply(&Edit::InsertFlag {
            flag: "--kill-switch=/tmp/k".into(),
            after: None,
        })
        .unwrap();
        b.apply(&Edit::RemoveFlag("--kill-switch".into())).unwrap();
        assert_eq!(b, sample());
        // A flag followed by another flag leaves that one alone.
        let mut c = sample();
        c.apply(&Edit::RemoveFlag("--no-plain".into())).unwrap();
        assert_eq!(
            c.program_arguments(),
            ["/opt/old/cathedral", "serve", "--listen", "0.0.0.0:1337"]
        );
    }

    #[test]
    fn missing_anchor_and_relative_binary_are_refused_without_change() {
        let mut a = sample();
        let e = a.apply(&Edit::InsertFlag {
            flag: "--x".into(),
            after: Some("--absent".into()),
        });
        assert!(matches!(e, Err(EditError::AnchorMissing { .. })));
        assert!(matches!(
            a.apply(&Edit::SetBinary("cathedral".into())),
            Err(EditError::RelativeBinary(_))
        ));
        assert_eq!(a, sample());
    }

    #[test]
    fn env_set_and_unset_round_trip() {
        let mut a = sample();
        assert!(a
            .apply(&Edit::SetEnv {
                name: "RUST_LOG".into(),
                value: "debug".into()
            })
            .unwrap());
        assert_eq!(
            a.environment().get("RUST_LOG").map(String::as_str),
            Some("debug")
        );
        assert!(a.apply(&Edit::UnsetEnv("RUST_LOG".into())).unwrap());
        assert_eq!(a, sample());
    }

    #[test]
    fn diff_shows_only_the_change() {
        let old = sample();
        let mut new = old.clone();
        new.apply(&Edit::SetBinary("/opt/new/cathedral".into()))
            .unwrap();
        let d = diff(&old, &new, "x.plist").unwrap();
        let changed: Vec<_> = d
            .lines()
            .filter(|l| {
                (l.starts_with('-') || l.starts_with('+'))
                    && !l.starts_with("---")
                    && !l.starts_with("+++")
            })
            .collect();
        assert_eq!(changed.len(), 2, "{d}");
        assert!(
            changed[0].contains("/opt/old/cathedral") && changed[1].contains("/opt/new/cathedral")
        );
        assert!(diff(&old, &old, "x").unwrap().is_empty());
    }
}
