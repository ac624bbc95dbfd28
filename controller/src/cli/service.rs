//! `cathedralctl deploy | rollback | status | backups | plist`: the service definition and
//! the service under launchd.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::agent::{LaunchAgent, PlistPath};
use crate::backup::{self, BackupTag};
use crate::deploy::{Controller, DeployRequest, Vision};
use crate::edit::{self, Edit};
use crate::health::{describe, HealthGate, ProbeGate, ProbeTarget};
use crate::launchd::{Domain, Launchd, ServiceManager};
use crate::ledger::{self, LedgerEntry, Outcome};
use crate::lock::ControllerLock;
use crate::progress::Steps;
use crate::rss::ByteSize;

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

/// `~/Library/LaunchAgents/com.cathedral.runtime.plist`.
pub fn default_plist() -> PathBuf {
    home().join("Library/LaunchAgents/com.cathedral.runtime.plist")
}

/// Ledger and lock: `~/Library/Application Support/Cathedral` on macOS, the XDG state
/// directory elsewhere.
pub fn default_state_dir() -> PathBuf {
    if cfg!(target_os = "macos") {
        home().join("Library/Application Support/Cathedral")
    } else {
        std::env::var_os("XDG_STATE_HOME")
            .map_or_else(|| home().join(".local/state"), PathBuf::from)
            .join("cathedral")
    }
}

/// `300`, `300s`, `5m`, `250ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = t.split_at(
        t.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 300s or 5m"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: use ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Which service: its definition, the controller's state, the launchd domain.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// The service definition (a LaunchAgent plist).
    #[arg(long, env = "CATHEDRAL_PLIST", default_value_os_t = default_plist())]
    pub plist: PathBuf,
    /// Where the deploy ledger and the controller lock live.
    #[arg(long, env = "CATHEDRAL_STATE_DIR", default_value_os_t = default_state_dir())]
    pub state_dir: PathBuf,
    /// launchd domain, `gui/<uid>` or `user/<uid>` (default: gui when logged in, else user).
    #[arg(long)]
    pub domain: Option<Domain>,
}

impl ServiceArgs {
    pub fn plist(&self) -> anyhow::Result<PlistPath> {
        Ok(PlistPath::new(&self.plist)?)
    }
    pub fn launchd(&self) -> anyhow::Result<Launchd> {
        Ok(match self.domain {
            Some(d) => Launchd::new(d)?,
            None => Launchd::for_current_user()?,
        })
    }
}

/// How the health gate reaches the runtime. By default the address comes from the plist's
/// `--listen` and the CA from its `--client-ca`.
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// Base URL of the runtime (default: from the plist's --listen).
    #[arg(long)]
    pub target: Option<String>,
    /// Host name to use when --listen is a wildcard address; must be in the server certificate.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// CA that signed the server certificate (default: the plist's --client-ca).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for the probes.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Client identity under `<CA dir>/clients/` (as `cathedralctl certs init` lays it out).
    #[arg(long)]
    pub identity: Option<String>,
    /// How long the new runtime may take to answer (model load included).
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub health_timeout: Duration,
}

impl ProbeArgs {
    pub fn gate(&self, max_rss: Option<ByteSize>) -> ProbeGate {
        let mut g = ProbeGate::new(ProbeTarget {
            url: self.target.clone(),
            server_name: self.server_name.clone(),
            ca: self.ca.clone(),
            cert: self.client_cert.clone(),
            key: self.client_key.clone(),
            identity: self.identity.clone(),
        });
        g.ready_timeout = self.health_timeout;
        g.max_rss = max_rss;
        g
    }
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// The new runtime executable (absolute after resolution; checked with --version).
    #[arg(long)]
    pub binary: PathBuf,
    /// Insert --vision-enabled (right after --no-plain when present).
    #[arg(long, conflicts_with = "disable_vision")]
    pub enable_vision: bool,
    /// Remove --vision-enabled.
    #[arg(long)]
    pub disable_vision: bool,
    /// An extra argument to insert (repeatable); pairs with --after in order.
    #[arg(long = "flag", allow_hyphen_values = true)]
    pub flags: Vec<String>,
    /// The argument the matching --flag goes right after (absent: appended).
    #[arg(long = "after", allow_hyphen_values = true)]
    pub after: Vec<String>,
    /// Resident memory limit of the new runtime, e.g. 51G.
    #[arg(long)]
    pub max_rss: Option<ByteSize>,
    /// Print the diff and the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Deploy even after 3 automatic rollbacks in a row.
    #[arg(long)]
    pub force: bool,
    /// Backup tag: `<plist>.pre-<tag>-YYYYMMDD-HHMMSS`.
    #[arg(long, default_value = "deploy")]
    pub tag: String,
    /// Backups to keep.
    #[arg(long, default_value_t = backup::DEFAULT_KEEP)]
    pub keep_backups: usize,
    /// mlx.metallib to place next to the new binary on macOS (default: the old binary's).
    #[arg(long)]
    pub metallib: Option<PathBuf>,
}

pub fn deploy(a: DeployArgs) -> anyhow::Result<()> {
    if a.after.len() > a.flags.len() {
        bail!("--after without a --flag: give them in pairs (--flag F --after A)");
    }
    let plist = a.service.plist()?;
    let req = DeployRequest {
        plist: plist.clone(),
        binary: a.binary.clone(),
        vision: match (a.enable_vision, a.disable_vision) {
            (true, _) => Vision::Enable,
            (_, true) => Vision::Disable,
            _ => Vision::Keep,
        },
        flags: a
            .flags
            .iter()
            .enumerate()
            .map(|(i, f)| (f.clone(), a.after.get(i).cloned()))
            .collect(),
        tag: BackupTag::new(&a.tag).map_err(anyhow::Error::msg)?,
        keep_backups: a.keep_backups,
        dry_run: a.dry_run,
        force: a.force,
        metallib: a.metallib.clone(),
    };
    let services = a.service.launchd()?;
    let gate = a.probe.gate(a.max_rss);
    let ctl = Controller {
        services: &services,
        gate: &gate,
        state_dir: a.service.state_dir.clone(),
        quiet: false,
    };
    eprintln!("deploy {} via {}", plist, services.describe());
    let r = ctl.deploy(&req)?;
    if a.dry_run {
        if r.diff.is_empty() {
            println!("no change: {plist} already matches");
        } else {
            print!("{}", r.diff);
        }
        println!(
            "dry run: would back up, write, restart {} and check health; nothing changed",
            services.describe()
        );
    } else if r.outcome == Outcome::Unchanged {
        println!("no change: {plist} already matches; nothing restarted");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// A backup (path, or file name next to the plist); default: the newest that differs
    /// from the live definition.
    #[arg(long)]
    pub to: Option<PathBuf>,
    #[arg(long, default_value_t = backup::DEFAULT_KEEP)]
    pub keep_backups: usize,
}

pub fn rollback(a: RollbackArgs) -> anyhow::Result<()> {
    let plist = a.service.plist()?;
    let services = a.service.launchd()?;
    let gate = a.probe.gate(None);
    let mut steps = Steps::new(false);
    let _lock = steps.run(
        "lock",
        |_: &ControllerLock| String::new(),
        || ControllerLock::acquire(&a.service.state_dir, "rollback"),
    )?;
    let live = std::fs::read(plist.as_path()).with_context(|| format!("reading {plist}"))?;
    let from_agent = LaunchAgent::from_bytes(&live, &plist.to_string()).ok();
    let source = match &a.to {
        Some(to) => backup::resolve(&plist, to)?,
        None => backup::list(&plist)?
            .into_iter()
            .find(|b| std::fs::read(&b.path).is_ok_and(|bytes| bytes != live))
            .map(|b| b.path)
            .with_context(|| format!("no backup of {plist} differs from it"))?,
    };
    let bytes = std::fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
    let agent = LaunchAgent::from_bytes(&bytes, &source.display().to_string())?;
    eprintln!("rollback {plist} to {}", source.display());
    let taken = steps.run(
        "backup",
        |b: &backup::Backup| b.path.display().to_string(),
        || {
            let b = backup::take(
                &plist,
                &BackupTag::new("rollback").expect("valid tag"),
                &live,
            )?;
            backup::prune(&plist, a.keep_backups)?;
            Ok::<_, std::io::Error>(b)
        },
    )?;
    let ctl = Controller {
        services: &services,
        gate: &gate,
        state_dir: a.service.state_dir.clone(),
        quiet: false,
    };
    let result = ctl.restore(&mut steps, &plist, &agent, &bytes);
    let entry = LedgerEntry {
        when: chrono::Local::now(),
        who: ledger::who(),
        plist: plist.as_path().to_path_buf(),
        label: agent.label().to_string(),
        from: from_agent
            .as_ref()
            .map(LaunchAgent::binary)
            .unwrap_or_default(),
        to: agent.binary(),
        to_version: None,
        flags_before: from_agent
            .as_ref()
            .map(LaunchAgent::flags)
            .unwrap_or_default(),
        flags_after: agent.flags(),
        edits: vec![format!("restore {}", source.display())],
        outcome: if result.is_ok() {
            Outcome::ManualRollback
        } else {
            Outcome::RollbackFailed
        },
        reason: result.as_ref().err().cloned(),
        backup: Some(taken.path.clone()),
        steps: steps.timings.clone(),
        total_seconds: steps.total().as_secs_f64(),
    };
    ledger::append(&ledger::path_in(&a.service.state_dir), &entry)?;
    match result {
        Ok(()) => {
            println!(
                "rolled back to {} ({} serves)",
                source.display(),
                agent.binary().display()
            );
            Ok(())
        }
        Err(e) => bail!(
            "rollback to {} failed: {e}; the definition before it is saved at {}",
            source.display(),
            taken.path.display()
        ),
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

/// What `status` found, when it is not "running and healthy": reported through the exit
/// status as `systemctl status` does (3: not running, 1: running but failing its probe), so
/// scripts can use `cathedralctl status` as a check. The printed report comes first.
#[derive(Debug, thiserror::Error)]
pub enum StatusExit {
    #[error("the service is not running")]
    NotRunning,
    #[error("the service is running but failed its health probe")]
    Unhealthy,
}

impl StatusExit {
    pub fn code(&self) -> u8 {
        match self {
            StatusExit::NotRunning => 3,
            StatusExit::Unhealthy => 1,
        }
    }
}

pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let plist = a.service.plist()?;
    let (agent, _) = LaunchAgent::load(&plist)?;
    let label = agent.label();
    let services = a.service.launchd()?;
    println!("service     {label} ({})", services.describe());
    println!("definition  {plist}");
    let st = services.status(&label)?;
    match &st {
        None => println!("state       not loaded"),
        Some(s) => {
            println!("state       {}", s.state);
            println!(
                "pid         {}",
                s.pid.map_or("-".to_string(), |p| p.to_string())
            );
            println!("last exit   {}", s.last_exit);
        }
    }
    println!("binary      {}", agent.binary().display());
    println!("flags       {}", agent.flags().join(" "));
    let vision_flag = agent.has_flag(crate::deploy::VISION_FLAG);
    let kill = agent.flag_value("--kill-switch").map(|p| {
        match cathedral_runtime::killswitch::KillSwitch::new(&p).read() {
            Ok(None) => "released".to_string(),
            Ok(Some(k)) => format!(
                "ENGAGED by {} at {}: {}",
                k.engaged_by, k.engaged_at, k.reason
            ),
            Err(e) => format!("unreadable (vision treated as off): {e}"),
        }
    });
    println!(
        "vision      {}",
        match (vision_flag, kill.as_deref()) {
            (false, _) => "off (no --vision-enabled)",
            (true, Some(k)) if k.starts_with("ENGAGED") || k.starts_with("unreadable") =>
                "enabled, but disabled by the kill switch",
            (true, _) => "enabled",
        }
    );
    println!(
        "kill switch {}",
        kill.as_deref()
            .unwrap_or("no --kill-switch in the definition")
    );
    let mut outcome = Ok(());
    let health = match st.as_ref().and_then(|s| s.running_pid()) {
        None => {
            outcome = Err(StatusExit::NotRunning);
            "not running".to_string()
        }
        Some(pid) => {
            let mut gate = a.probe.gate(None);
            gate.ready_timeout = Duration::ZERO;
            gate.probe_timeout = Duration::from_secs(30);
            // Text only: status must not cost a vision forward on a loaded machine.
            let mut text_only = agent.clone();
            let _ = text_only.apply(&Edit::RemoveFlag(crate::deploy::VISION_FLAG.into()));
            match gate.check(&services, &label, &text_only, pid) {
                Ok(h) => format!(
                    "text probe {}{}",
                    describe(&h.text),
                    h.rss.map(|r| format!(", rss {r}")).unwrap_or_default()
                ),
                Err(e) => {
                    outcome = Err(StatusExit::Unhealthy);
                    format!("UNHEALTHY: {e}")
                }
            }
        }
    };
    println!("health      {health}");
    let entries = ledger::read(&ledger::path_in(&a.service.state_dir))?;
    match entries.iter().rev().find(|e| e.label == label.as_str()) {
        None => println!("last deploy none recorded"),
        Some(e) => println!(
            "last deploy {} {:?} by {}: {} → {}{}",
            e.when.format("%Y-%m-%d %H:%M:%S"),
            e.outcome,
            e.who,
            e.from.display(),
            e.to.display(),
            e.reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
    }
    Ok(outcome?)
}

#[derive(Debug, Args)]
pub struct BackupsArgs {
    /// The service definition whose backups to list.
    #[arg(long, env = "CATHEDRAL_PLIST", default_value_os_t = default_plist())]
    pub plist: PathBuf,
    /// Delete all but the newest N.
    #[arg(long)]
    pub prune: Option<usize>,
}

pub fn backups(a: BackupsArgs) -> anyhow::Result<()> {
    let plist = PlistPath::new(&a.plist)?;
    if let Some(keep) = a.prune {
        for b in backup::prune(&plist, keep)? {
            println!("deleted {}", b.path.display());
        }
    }
    let all = backup::list(&plist)?;
    if all.is_empty() {
        println!("no backups of {plist}");
    }
    for b in all {
        println!("{b}");
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum PlistCommand {
    /// Print the typed view of a service definition.
    Show {
        #[arg(long, env = "CATHEDRAL_PLIST", default_value_os_t = default_plist())]
        plist: PathBuf,
    },
    /// Check a definition: structure, and `plutil -lint` where it exists.
    Lint {
        #[arg(long, env = "CATHEDRAL_PLIST", default_value_os_t = default_plist())]
        plist: PathBuf,
    },
    /// Edit a definition (backup first, atomic write); the service is not restarted.
    Edit(Box<PlistEditArgs>),
}

#[derive(Debug, Args)]
pub struct PlistEditArgs {
    #[arg(long, env = "CATHEDRAL_PLIST", default_value_os_t = default_plist())]
    pub plist: PathBuf,
    #[arg(long, env = "CATHEDRAL_STATE_DIR", default_value_os_t = default_state_dir())]
    pub state_dir: PathBuf,
    /// New executable (ProgramArguments[0]).
    #[arg(long)]
    pub set_binary: Option<PathBuf>,
    /// Argument to insert (repeatable; pairs with --after in order).
    #[arg(long = "insert-flag", allow_hyphen_values = true)]
    pub insert: Vec<String>,
    #[arg(long = "after", allow_hyphen_values = true)]
    pub after: Vec<String>,
    /// Argument to remove (with any `=value` form).
    #[arg(long = "remove-flag", allow_hyphen_values = true)]
    pub remove: Vec<String>,
    /// NAME=VALUE in EnvironmentVariables.
    #[arg(long = "set-env")]
    pub set_env: Vec<String>,
    #[arg(long = "unset-env")]
    pub unset_env: Vec<String>,
    #[arg(long, default_value = "edit")]
    pub tag: String,
    #[arg(long, default_value_t = backup::DEFAULT_KEEP)]
    pub keep_backups: usize,
    #[arg(long)]
    pub dry_run: bool,
}

pub fn plist(cmd: PlistCommand) -> anyhow::Result<()> {
    match cmd {
        PlistCommand::Show { plist } => {
            let (agent, _) = LaunchAgent::load(&PlistPath::new(plist)?)?;
            println!("{:#?}", agent.spec());
            Ok(())
        }
        PlistCommand::Lint { plist } => {
            let p = PlistPath::new(plist)?;
            LaunchAgent::load(&p)?;
            let how = match crate::lint::plutil(p.as_path())? {
                crate::lint::Lint::Passed => "structure and plutil -lint",
                crate::lint::Lint::Unavailable => "structure (no plutil here)",
            };
            println!("{p}: OK ({how})");
            Ok(())
        }
        PlistCommand::Edit(a) => plist_edit(*a),
    }
}

fn plist_edit(a: PlistEditArgs) -> anyhow::Result<()> {
    if a.after.len() > a.insert.len() {
        bail!("--after without an --insert-flag: give them in pairs");
    }
    let plist = PlistPath::new(&a.plist)?;
    let mut edits = Vec::new();
    if let Some(b) = &a.set_binary {
        edits.push(Edit::SetBinary(std::path::absolute(b)?));
    }
    for (i, f) in a.insert.iter().enumerate() {
        edits.push(Edit::InsertFlag {
            flag: f.clone(),
            after: a.after.get(i).cloned(),
        });
    }
    edits.extend(a.remove.iter().cloned().map(Edit::RemoveFlag));
    for kv in &a.set_env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set-env {kv:?} is not NAME=VALUE"))?;
        edits.push(Edit::SetEnv {
            name: k.into(),
            value: v.into(),
        });
    }
    edits.extend(a.unset_env.iter().cloned().map(Edit::UnsetEnv));
    let _lock = if a.dry_run {
        None
    } else {
        Some(ControllerLock::acquire(&a.state_dir, "plist edit")?)
    };
    let (old, old_bytes) = LaunchAgent::load(&plist)?;
    let mut new = old.clone();
    let changed = new.apply_all(&edits)?;
    let diff = edit::diff(&old, &new, &plist.file_name())?;
    if a.dry_run || changed.is_empty() {
        print!("{diff}");
        println!(
            "{}",
            if changed.is_empty() {
                "no change"
            } else {
                "dry run: nothing changed"
            }
        );
        return Ok(());
    }
    let b = backup::take(
        &plist,
        &BackupTag::new(&a.tag).map_err(anyhow::Error::msg)?,
        &old_bytes,
    )?;
    backup::prune(&plist, a.keep_backups)?;
    Controller::write_definition(&plist, &new.to_xml()?)?;
    print!("{diff}");
    println!(
        "written {plist} (backup {}); restart to apply",
        b.path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_command_tree_is_consistent_and_the_field_report_deploy_parses() {
        crate::cli::Cli::command().debug_assert();
        let cli = crate::cli::Cli::try_parse_from([
            "cathedralctl",
            "deploy",
            "--plist",
            "/p.plist",
            "--binary",
            "/new/cathedral",
            "--enable-vision",
            "--flag",
            "--max-images=4",
            "--after",
            "--no-plain",
            "--max-rss",
            "51G",
            "--dry-run",
        ])
        .unwrap();
        let crate::cli::Command::Deploy(d) = cli.command else {
            panic!("not a deploy")
        };
        assert_eq!(d.flags, ["--max-images=4"]);
        assert_eq!(d.after, ["--no-plain"]);
        assert_eq!(d.max_rss, Some(ByteSize(51 << 30)));
        assert!(d.enable_vision && d.dry_run);
        assert!(crate::cli::Cli::try_parse_from([
            "cathedralctl",
            "deploy",
            "--binary",
            "/b",
            "--enable-vision",
            "--disable-vision"
        ])
        .is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("300s").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
    }
}
