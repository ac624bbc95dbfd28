//! `cathedralctl install` / `uninstall`: the runtime, the canary watcher and (when given a
//! scanner config) the upstream scanner as launchd agents, rendered from `deploy/`.
//!
//! Idempotent by construction: a definition whose rendered bytes equal the file on disk is
//! left alone (no write, no backup, no restart), and a loaded job is not bootstrapped again.
//! A definition that differs is backed up before it is replaced; uninstall backs up every
//! plist it removes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cathedral_runtime::certs::{CertDir, CertError, Identity, ServerName, Validity, LEAF_DAYS};

use crate::agent::{AgentError, Label, LaunchAgent, PlistPath};
use crate::atomic;
use crate::backup::{self, BackupTag};
use crate::edit::{Edit, EditError};
use crate::launchd::{ServiceError, ServiceManager};
use crate::template::{self, RuntimeAgentValues, TemplateError};

pub const CANARY_TEMPLATE: &str = include_str!("../../deploy/canary.plist.template");
pub const SCANNER_TEMPLATE: &str = include_str!("../../deploy/upstream-scanner.plist.template");

pub const RUNTIME_LABEL: &str = "com.cathedral.runtime";
pub const CANARY_LABEL: &str = "com.cathedral.canary";
pub const SCANNER_LABEL: &str = "com.cathedral.upstream";

/// The identities `install` issues certificates for: the operator (admin routes) and the
/// canary watcher (probes).
pub const OPERATOR: &str = "operator";
pub const CANARY: &str = "canary";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{what} must be an absolute path, got {path}")]
    Relative { what: &'static str, path: PathBuf },
    #[error("the model directory {0} has no config.json")]
    NoModel(PathBuf),
    #[error("the runtime binary {0} does not exist (build it, or pass --binary)")]
    NoBinary(PathBuf),
    #[error("the upstream scanner config {0} does not exist")]
    NoScannerConfig(PathBuf),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Edit(#[from] EditError),
    #[error(transparent)]
    Certs(#[from] CertError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Where an installation keeps its files: `<prefix>/{certs,logs,canary,state}`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub prefix: PathBuf,
    pub agents_dir: PathBuf,
}

impl Layout {
    pub fn certs(&self) -> CertDir {
        CertDir::new(self.prefix.join("certs"))
    }
    pub fn logs(&self) -> PathBuf {
        self.prefix.join("logs")
    }
    pub fn canary_state(&self) -> PathBuf {
        self.prefix.join("canary")
    }
    pub fn kill_switch(&self) -> PathBuf {
        self.prefix.join("kill-switch.json")
    }
    pub fn plist(&self, label: &str) -> PathBuf {
        self.agents_dir.join(format!("{label}.plist"))
    }
    fn dirs(&self) -> [PathBuf; 4] {
        [
            self.prefix.clone(),
            self.logs(),
            self.canary_state(),
            self.agents_dir.clone(),
        ]
    }
}

/// Everything that differs between machines.
#[derive(Debug, Clone)]
pub struct InstallSpec {
    pub layout: Layout,
    pub model_dir: PathBuf,
    pub runtime_binary: PathBuf,
    pub ctl_binary: PathBuf,
    /// The runtime's mTLS listener; the canary probes its port through `localhost`.
    pub listen: std::net::SocketAddr,
    pub server_names: Vec<ServerName>,
    pub upstream_config: Option<PathBuf>,
    pub canary_interval: String,
    pub canary_window: String,
}

/// A rendered agent and where it goes.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub label: Label,
    pub path: PlistPath,
    pub xml: Vec<u8>,
}

/// What install did (or, with `--dry-run`, would do) to one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated {
        backup: PathBuf,
    },
    Unchanged,
    /// The definition on disk differs from the template (a deploy changed it) and was kept.
    Kept,
}

/// What install does (or did) to the launchd job of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceAction {
    Bootstrap,
    Restart,
    /// Loaded with the definition on disk: left running.
    None,
}

impl ServiceAction {
    /// The job must pick up a new definition: restart it if loaded, else bootstrap it.
    fn reload(loaded: bool) -> Self {
        if loaded {
            Self::Restart
        } else {
            Self::Bootstrap
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentReport {
    pub label: Label,
    pub path: PathBuf,
    pub outcome: Outcome,
    pub service: ServiceAction,
    pub diff: Option<String>,
}

fn absolute(what: &'static str, p: &Path) -> Result<(), InstallError> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(InstallError::Relative {
            what,
            path: p.to_path_buf(),
        })
    }
}

impl InstallSpec {
    fn check(&self) -> Result<(), InstallError> {
        absolute("--prefix", &self.layout.prefix)?;
        absolute("--agents-dir", &self.layout.agents_dir)?;
        absolute("--model", &self.model_dir)?;
        absolute("--binary", &self.runtime_binary)?;
        if !self.model_dir.join("config.json").is_file() {
            return Err(InstallError::NoModel(self.model_dir.clone()));
        }
        if !self.runtime_binary.is_file() {
            return Err(InstallError::NoBinary(self.runtime_binary.clone()));
        }
        if let Some(c) = &self.upstream_config {
            absolute("--upstream-config", c)?;
            if !c.is_file() {
                return Err(InstallError::NoScannerConfig(c.clone()));
            }
        }
        Ok(())
    }

    /// Renders every agent of this installation, validated as launchd would read it.
    pub fn render(&self) -> Result<Vec<Rendered>, InstallError> {
        let l = &self.layout;
        let certs = l.certs();
        let canary = Identity::new(CANARY)?;
        let rust_log = "info".to_string();
        let mut out = Vec::new();

        let runtime = RuntimeAgentValues {
            label: label(RUNTIME_LABEL),
            binary: self.runtime_binary.clone(),
            model_dir: self.model_dir.clone(),
            listen: self.listen.to_string(),
            tls_cert: certs.server().cert,
            tls_key: certs.server().key,
            client_ca: certs.ca().cert,
            admin_identity: OPERATOR.into(),
            kill_switch: l.kill_switch(),
            working_dir: l.prefix.clone(),
            log_dir: l.logs(),
            rust_log: rust_log.clone(),
        };
        let (xml, _) = runtime.render()?;
        out.push(self.place(RUNTIME_LABEL, xml.into_bytes()));

        let canary_client = certs.client(&canary);
        let values = BTreeMap::from([
            ("LABEL".to_string(), CANARY_LABEL.to_string()),
            ("CATHEDRALCTL".into(), path_str(&self.ctl_binary)),
            (
                "TARGET".into(),
                format!("https://localhost:{}", self.listen.port()),
            ),
            ("CLIENT_CERT".into(), path_str(&canary_client.cert)),
            ("CLIENT_KEY".into(), path_str(&canary_client.key)),
            ("CA".into(), path_str(&certs.ca().cert)),
            ("INTERVAL".into(), self.canary_interval.clone()),
            ("WINDOW".into(), self.canary_window.clone()),
            ("SLO_SUCCESS".into(), "0.99".into()),
            ("SLO_P95".into(), "10s".into()),
            ("BREACHES".into(), "3".into()),
            ("STATE_DIR".into(), path_str(&l.canary_state())),
            ("LOG_DIR".into(), path_str(&l.logs())),
            ("WORKING_DIR".into(), path_str(&l.prefix)),
            ("RUST_LOG".into(), rust_log.clone()),
        ]);
        let xml = template::render(CANARY_TEMPLATE, &values)?;
        // The watcher shares the runtime's host here, so it engages the kill switch through
        // the file the runtime reads (the canary certificate is not an admin identity).
        let mut agent = LaunchAgent::from_bytes(xml.as_bytes(), "the rendered canary template")?;
        agent.apply(&Edit::InsertFlag {
            flag: format!("--kill-switch-file={}", l.kill_switch().display()),
            after: None,
        })?;
        out.push(self.place(CANARY_LABEL, agent.to_xml()?));

        if let Some(config) = &self.upstream_config {
            let values = BTreeMap::from([
                ("LABEL".to_string(), SCANNER_LABEL.to_string()),
                ("CATHEDRALCTL".into(), path_str(&self.ctl_binary)),
                ("CONFIG".into(), path_str(config)),
                ("LOG_DIR".into(), path_str(&l.logs())),
                ("WORKING_DIR".into(), path_str(&l.prefix)),
                ("RUST_LOG".into(), rust_log),
            ]);
            let xml = template::render(SCANNER_TEMPLATE, &values)?;
            LaunchAgent::from_bytes(xml.as_bytes(), "the rendered scanner template")?;
            out.push(self.place(SCANNER_LABEL, xml.into_bytes()));
        }
        Ok(out)
    }

    fn place(&self, name: &str, xml: Vec<u8>) -> Rendered {
        Rendered {
            label: label(name),
            path: PlistPath::new(self.layout.plist(name)).expect("agents dir is absolute"),
            xml,
        }
    }

    /// Certificates for the server names and both identities, unless a CA exists already.
    /// `true` when they are (or, in a dry run, would be) created.
    fn ensure_certs(&self, dry_run: bool) -> Result<bool, InstallError> {
        let certs = self.layout.certs();
        if certs.ca().cert.exists() {
            return Ok(false);
        }
        if !dry_run {
            certs.init(
                &self.server_names,
                &[Identity::new(OPERATOR)?, Identity::new(CANARY)?],
                Validity::days(LEAF_DAYS),
            )?;
        }
        Ok(true)
    }
}

fn label(s: &str) -> Label {
    Label::new(s).expect("built-in labels are valid")
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The whole install: directories, certificates, definitions, services. Prints nothing;
/// the caller shows the report.
pub struct InstallReport {
    pub dirs_created: Vec<PathBuf>,
    pub certs_created: bool,
    pub agents: Vec<AgentReport>,
}

/// `overwrite`: replace definitions that differ from the templates (after a backup);
/// without it they are kept, so a second install never undoes a deploy.
pub fn install(
    spec: &InstallSpec,
    services: &dyn ServiceManager,
    dry_run: bool,
    overwrite: bool,
) -> Result<InstallReport, InstallError> {
    spec.check()?;
    let mut dirs_created = Vec::new();
    for d in spec.layout.dirs() {
        if !d.is_dir() {
            if !dry_run {
                std::fs::create_dir_all(&d).map_err(io("creating", &d))?;
            }
            dirs_created.push(d);
        }
    }
    let certs_created = spec.ensure_certs(dry_run)?;
    let mut agents = Vec::new();
    for r in spec.render()? {
        agents.push(place_agent(&r, services, dry_run, overwrite)?);
    }
    Ok(InstallReport {
        dirs_created,
        certs_created,
        agents,
    })
}

fn place_agent(
    r: &Rendered,
    services: &dyn ServiceManager,
    dry_run: bool,
    overwrite: bool,
) -> Result<AgentReport, InstallError> {
    let path = r.path.as_path();
    let current = match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("reading", path)(e)),
    };
    let diff = match &current {
        Some(old) if *old != r.xml => {
            let old = LaunchAgent::from_bytes(old, &r.path.to_string()).ok();
            let new = LaunchAgent::from_bytes(&r.xml, "the rendered definition")?;
            old.and_then(|o| crate::edit::diff(&o, &new, &r.path.to_string()).ok())
        }
        _ => None,
    };
    let loaded = services.status(&r.label)?.is_some();
    let (outcome, service) = match &current {
        Some(old) if *old == r.xml || !overwrite => (
            if *old == r.xml {
                Outcome::Unchanged
            } else {
                Outcome::Kept
            },
            if loaded {
                ServiceAction::None
            } else {
                ServiceAction::Bootstrap
            },
        ),
        Some(old) => {
            let backup = if dry_run {
                PathBuf::from("(dry run: no backup taken)")
            } else {
                backup::take(&r.path, &BackupTag::new("install").expect("valid tag"), old)
                    .map_err(io("backing up", path))?
                    .path
            };
            (Outcome::Updated { backup }, ServiceAction::reload(loaded))
        }
        None => (Outcome::Created, ServiceAction::reload(loaded)),
    };
    if !dry_run {
        if matches!(outcome, Outcome::Created | Outcome::Updated { .. }) {
            atomic::write_atomic(path, &r.xml, Some(0o644), |_| Ok(()))
                .map_err(io("writing", path))?;
        }
        match service {
            ServiceAction::Restart => {
                services.restart(&r.label, &r.path)?;
            }
            ServiceAction::Bootstrap => {
                services.start(&r.label, &r.path)?;
            }
            ServiceAction::None => {}
        }
    }
    Ok(AgentReport {
        label: r.label.clone(),
        path: path.to_path_buf(),
        outcome,
        service,
        diff,
    })
}

/// What uninstall did to one agent.
#[derive(Debug, Clone)]
pub struct RemovedAgent {
    pub label: Label,
    pub path: PathBuf,
    pub stopped: bool,
    /// The backup of the removed definition; `None` when there was no definition.
    pub backup: Option<PathBuf>,
}

/// Stops every agent of ours and removes its definition after backing it up. Certificates,
/// logs, canary state and the kill switch stay: they are the operator's records.
pub fn uninstall(
    layout: &Layout,
    services: &dyn ServiceManager,
    dry_run: bool,
) -> Result<Vec<RemovedAgent>, InstallError> {
    let mut out = Vec::new();
    for name in [CANARY_LABEL, SCANNER_LABEL, RUNTIME_LABEL] {
        let label = label(name);
        let path =
            PlistPath::new(layout.plist(name)).map_err(io("resolving", &layout.agents_dir))?;
        let loaded = services.status(&label)?.is_some();
        let bytes = match std::fs::read(path.as_path()) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("reading", path.as_path())(e)),
        };
        if !loaded && bytes.is_none() {
            continue;
        }
        let mut backup = None;
        if !dry_run {
            if loaded {
                services.stop(&label)?;
            }
            if let Some(b) = &bytes {
                let taken =
                    backup::take(&path, &BackupTag::new("uninstall").expect("valid tag"), b)
                        .map_err(io("backing up", path.as_path()))?;
                std::fs::remove_file(path.as_path()).map_err(io("removing", path.as_path()))?;
                atomic::sync_dir(path.dir()).map_err(io("syncing", path.dir()))?;
                backup = Some(taken.path);
            }
        } else if bytes.is_some() {
            backup = Some(PathBuf::from("(dry run: no backup taken)"));
        }
        out.push(RemovedAgent {
            label,
            path: path.as_path().to_path_buf(),
            stopped: loaded,
            backup,
        });
    }
    Ok(out)
}
