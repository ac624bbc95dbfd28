//! `cathedralctl install` / `uninstall`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use cathedral_runtime::certs::ServerName;

use super::service::parse_duration;
use crate::install::{self, InstallSpec, Layout, Outcome, ServiceAction};
use crate::launchd::{Domain, Launchd};

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn default_prefix() -> PathBuf {
    std::env::var_os("CATHEDRAL_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cathedral"))
}

fn default_agents_dir() -> PathBuf {
    home().join("Library/LaunchAgents")
}

fn absolute(p: PathBuf) -> anyhow::Result<PathBuf> {
    std::path::absolute(&p).with_context(|| format!("resolving {}", p.display()))
}

fn launchd(domain: Option<Domain>) -> anyhow::Result<Launchd> {
    Ok(match domain {
        Some(d) => Launchd::new(d)?,
        None => Launchd::for_current_user()?,
    })
}

/// Where the installation lives.
#[derive(Debug, Args)]
pub struct LayoutArgs {
    /// Certificates, logs, canary state and the kill switch go here.
    #[arg(long, env = "CATHEDRAL_HOME", default_value_os_t = default_prefix())]
    pub prefix: PathBuf,
    /// Where the launchd agent definitions go.
    #[arg(long, default_value_os_t = default_agents_dir())]
    pub agents_dir: PathBuf,
    /// launchd domain, `gui/<uid>` or `user/<uid>` (default: gui when logged in, else user).
    #[arg(long)]
    pub domain: Option<Domain>,
    /// Show what would change; write nothing, start nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl LayoutArgs {
    fn layout(&self) -> anyhow::Result<Layout> {
        Ok(Layout {
            prefix: absolute(self.prefix.clone())?,
            agents_dir: absolute(self.agents_dir.clone())?,
        })
    }
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// The checkpoint directory the runtime serves.
    #[arg(long)]
    pub model: PathBuf,
    /// The `cathedral` binary (default: next to this cathedralctl).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// The runtime's mTLS listener.
    #[arg(long, default_value = "0.0.0.0:1337")]
    pub listen: std::net::SocketAddr,
    /// Names the server certificate is valid for, when install creates it (repeatable).
    #[arg(long = "server-name", default_values = ["localhost", "127.0.0.1"])]
    pub server_names: Vec<ServerName>,
    /// Also install the upstream scanner agent, with this config (TOML).
    #[arg(long)]
    pub upstream_config: Option<PathBuf>,
    /// Canary probe interval.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub canary_interval: std::time::Duration,
    /// Replace agent definitions that differ from the templates (each backed up first).
    /// Without it they are kept: a second install never undoes a deploy.
    #[arg(long)]
    pub overwrite: bool,
    /// Canary SLO window.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub canary_window: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
}

pub fn install(a: InstallArgs) -> anyhow::Result<()> {
    let me = std::env::current_exe().context("locating cathedralctl")?;
    let binary = match a.binary {
        Some(b) => absolute(b)?,
        None => me.with_file_name("cathedral"),
    };
    let spec = InstallSpec {
        layout: a.layout.layout()?,
        model_dir: absolute(a.model)?,
        runtime_binary: binary,
        ctl_binary: me,
        listen: a.listen,
        server_names: a.server_names,
        upstream_config: a.upstream_config.map(absolute).transpose()?,
        canary_interval: humantime::format_duration(a.canary_interval).to_string(),
        canary_window: humantime::format_duration(a.canary_window).to_string(),
    };
    let services = launchd(a.layout.domain)?;
    let dry = a.layout.dry_run;
    let report = install::install(&spec, &services, dry, a.overwrite)?;
    let would = if dry { "would " } else { "" };
    for d in &report.dirs_created {
        println!("{would}create {}", d.display());
    }
    println!(
        "certificates in {}: {}",
        spec.layout.certs().root.display(),
        match (report.certs_created, dry) {
            (true, true) => "would be created",
            (true, false) => "created",
            (false, _) => "kept",
        }
    );
    let mut changed = !report.dirs_created.is_empty() || report.certs_created;
    for ag in &report.agents {
        let what = match &ag.outcome {
            Outcome::Created => format!("{would}create"),
            Outcome::Updated { backup } => format!("{would}update (backup {})", backup.display()),
            Outcome::Unchanged => "unchanged".to_string(),
            Outcome::Kept => {
                "kept (differs from the template; --overwrite replaces it)".to_string()
            }
        };
        changed |= !matches!(ag.outcome, Outcome::Unchanged | Outcome::Kept)
            || ag.service != ServiceAction::None;
        let service = match (ag.service, dry) {
            (ServiceAction::Bootstrap, true) => "would be bootstrapped",
            (ServiceAction::Bootstrap, false) => "bootstrapped",
            (ServiceAction::Restart, true) => "would be restarted",
            (ServiceAction::Restart, false) => "restarted",
            (ServiceAction::None, _) => "already running",
        };
        println!(
            "{}  {}  {what}; service {service}",
            ag.label,
            ag.path.display()
        );
        if let Some(d) = &ag.diff {
            print!("{d}");
        }
    }
    if !changed {
        println!("nothing to do: the installation is as rendered");
    }
    Ok(())
}

pub fn uninstall(a: UninstallArgs) -> anyhow::Result<()> {
    let layout = a.layout.layout()?;
    let services = launchd(a.layout.domain)?;
    let dry = a.layout.dry_run;
    let removed = install::uninstall(&layout, &services, dry)?;
    if removed.is_empty() {
        println!("nothing installed in {}", layout.agents_dir.display());
    }
    let would = if dry { "would " } else { "" };
    for r in removed {
        println!(
            "{}  {}{would}remove {}{}",
            r.label,
            if r.stopped {
                format!("{would}stop; ")
            } else {
                String::new()
            },
            r.path.display(),
            r.backup
                .map(|b| format!(" (backup {})", b.display()))
                .unwrap_or_default()
        );
    }
    println!(
        "kept: {} (certificates, logs, canary state, kill switch)",
        layout.prefix.display()
    );
    Ok(())
}
