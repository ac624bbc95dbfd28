//! Rendering launchd plist templates (`deploy/*.plist.template`): `{{NAME}}` placeholders
//! filled with XML-escaped values; an unfilled or unknown placeholder is an error, and the
//! result must be a valid service definition.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::agent::{AgentError, Label, LaunchAgent};

/// The runtime agent's template, as shipped in `deploy/`.
pub const RUNTIME_TEMPLATE: &str = include_str!("../../deploy/runtime.plist.template");

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template placeholder {{{{{0}}}}} has no value")]
    Unfilled(String),
    #[error("value given for {0}, which the template does not use")]
    Unused(String),
    #[error("unterminated placeholder at byte {0}")]
    Unterminated(usize),
    #[error("{name} must be an absolute path, got {value:?}")]
    RelativePath { name: &'static str, value: PathBuf },
    #[error(transparent)]
    Invalid(#[from] AgentError),
}

/// Fills every `{{NAME}}` of `template`; every value must be used.
pub fn render(template: &str, values: &BTreeMap<String, String>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len() + 256);
    let mut used = std::collections::BTreeSet::new();
    let mut rest = template;
    let mut offset = 0;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or(TemplateError::Unterminated(offset + start))?;
        let name = after[..end].trim();
        let value = values
            .get(name)
            .ok_or_else(|| TemplateError::Unfilled(name.to_string()))?;
        out.push_str(&xml_escape(value));
        used.insert(name.to_string());
        let consumed = start + 2 + end + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    out.push_str(rest);
    if let Some(extra) = values.keys().find(|k| !used.contains(*k)) {
        return Err(TemplateError::Unused(extra.clone()));
    }
    Ok(out)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// The values of the runtime agent: everything that differs between machines.
#[derive(Debug, Clone)]
pub struct RuntimeAgentValues {
    pub label: Label,
    pub binary: PathBuf,
    pub model_dir: PathBuf,
    pub listen: String,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: PathBuf,
    pub admin_identity: String,
    pub kill_switch: PathBuf,
    pub working_dir: PathBuf,
    pub log_dir: PathBuf,
    pub rust_log: String,
}

impl RuntimeAgentValues {
    fn map(&self) -> Result<BTreeMap<String, String>, TemplateError> {
        let mut m = BTreeMap::new();
        let paths: [(&'static str, &PathBuf); 8] = [
            ("BINARY", &self.binary),
            ("MODEL_DIR", &self.model_dir),
            ("TLS_CERT", &self.tls_cert),
            ("TLS_KEY", &self.tls_key),
            ("CLIENT_CA", &self.client_ca),
            ("KILL_SWITCH", &self.kill_switch),
            ("WORKING_DIR", &self.working_dir),
            ("LOG_DIR", &self.log_dir),
        ];
        for (name, p) in paths {
            if !p.is_absolute() {
                return Err(TemplateError::RelativePath {
                    name,
                    value: p.clone(),
                });
            }
            m.insert(name.to_string(), p.to_string_lossy().into_owned());
        }
        m.insert("LABEL".into(), self.label.to_string());
        m.insert("LISTEN".into(), self.listen.clone());
        m.insert("ADMIN_IDENTITY".into(), self.admin_identity.clone());
        m.insert("RUST_LOG".into(), self.rust_log.clone());
        Ok(m)
    }

    /// Renders [`RUNTIME_TEMPLATE`] and checks the result as launchd would.
    pub fn render(&self) -> Result<(String, LaunchAgent), TemplateError> {
        self.render_with(RUNTIME_TEMPLATE)
    }

    pub fn render_with(&self, template: &str) -> Result<(String, LaunchAgent), TemplateError> {
        let text = render(template, &self.map()?)?;
        let agent = LaunchAgent::from_bytes(text.as_bytes(), "the rendered runtime template")?;
        Ok((text, agent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{KeepAlive, ProcessType};

    fn values() -> RuntimeAgentValues {
        RuntimeAgentValues {
            label: Label::new("com.cathedral.runtime").unwrap(),
            binary: "/opt/cathedral/bin/cathedral".into(),
            model_dir: "/Users/me/models/Qwen & Co".into(),
            listen: "0.0.0.0:1337".into(),
            tls_cert: "/c/server.pem".into(),
            tls_key: "/c/server-key.pem".into(),
            client_ca: "/c/ca.pem".into(),
            admin_identity: "operator".into(),
            kill_switch: "/s/kill-switch".into(),
            working_dir: "/s".into(),
            log_dir: "/l".into(),
            rust_log: "info".into(),
        }
    }

    #[test]
    fn runtime_template_renders_a_launchd_ready_definition() {
        let (_, agent) = values().render().unwrap();
        let s = agent.spec();
        assert_eq!(
            s.keep_alive,
            Some(KeepAlive::Conditions {
                successful_exit: Some(false)
            })
        );
        assert_eq!(s.process_type, Some(ProcessType::Interactive));
        assert!(s.throttle_interval.is_some());
        assert!(s.exit_timeout.unwrap() >= 30, "room for a graceful stop");
        assert_eq!(s.standard_error_path, Some("/l/runtime.err.log".into()));
        assert!(agent.has_flag("--no-plain"));
        assert_eq!(
            agent.flag_value("--client-ca").as_deref(),
            Some("/c/ca.pem")
        );
        // The escaped ampersand comes back as written.
        assert_eq!(
            agent.flag_value("--model").as_deref(),
            Some("/Users/me/models/Qwen & Co")
        );
    }

    #[test]
    fn placeholders_must_match_values() {
        let mut m = BTreeMap::new();
        m.insert("A".to_string(), "1".to_string());
        assert_eq!(render("x{{A}}y", &m).unwrap(), "x1y");
        assert!(matches!(
            render("{{B}}", &m),
            Err(TemplateError::Unfilled(_))
        ));
        assert!(matches!(render("none", &m), Err(TemplateError::Unused(_))));
        assert!(matches!(
            render("{{A", &m),
            Err(TemplateError::Unterminated(0))
        ));
        let mut v = values();
        v.binary = "cathedral".into();
        assert!(matches!(
            v.render(),
            Err(TemplateError::RelativePath { .. })
        ));
    }
}
