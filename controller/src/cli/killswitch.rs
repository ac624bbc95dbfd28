//! `cathedralctl killswitch engage|release|status`: the runtime's kill switch, through its
//! file (local) or its admin route (remote, with an admin client certificate).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use cathedral_runtime::client::{mtls_client, ClientTls};
use cathedral_runtime::killswitch::KillSwitch;

use crate::agent::{LaunchAgent, PlistPath};

#[derive(Debug, Args)]
pub struct KillSwitchArgs {
    #[command(subcommand)]
    pub action: KillSwitchAction,
    /// The kill switch file (default: the plist's --kill-switch).
    #[arg(long, global = true, conflicts_with = "target")]
    pub file: Option<PathBuf>,
    /// Service definition to read --kill-switch from.
    #[arg(long, global = true, env = "CATHEDRAL_PLIST", default_value_os_t = super::service::default_plist())]
    pub plist: PathBuf,
    /// Remote runtime (https://HOST:PORT): use its admin route instead of the file.
    #[arg(long, global = true, requires_all = ["ca", "cert", "key"])]
    pub target: Option<String>,
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// An admin client certificate (its identity must be in the runtime's --admin-identity).
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum KillSwitchAction {
    /// Turn vision off (the text path is untouched); takes effect on the next request.
    Engage {
        #[arg(long)]
        reason: String,
        /// Who engages it (default: user@host).
        #[arg(long)]
        by: Option<String>,
    },
    /// Turn vision back on.
    Release,
    /// Show whether it is engaged, by whom, when, why.
    Status,
}

pub fn run(a: KillSwitchArgs) -> anyhow::Result<()> {
    if let Some(target) = &a.target {
        return remote(&a, target);
    }
    let path = match &a.file {
        Some(f) => f.clone(),
        None => {
            let (agent, _) = LaunchAgent::load(&PlistPath::new(&a.plist)?)?;
            agent
                .flag_value("--kill-switch")
                .map(PathBuf::from)
                .with_context(|| {
                    format!("{} has no --kill-switch; pass --file", a.plist.display())
                })?
        }
    };
    let ks = KillSwitch::new(&path);
    match &a.action {
        KillSwitchAction::Engage { reason, by } => {
            let by = by.clone().unwrap_or_else(crate::ledger::who);
            let s = ks.engage(&by, reason)?;
            println!(
                "engaged by {} at {}: {} ({})",
                s.engaged_by,
                s.engaged_at,
                s.reason,
                path.display()
            );
        }
        KillSwitchAction::Release => match ks.release()? {
            Some(s) => println!(
                "released (was engaged by {} at {}: {})",
                s.engaged_by, s.engaged_at, s.reason
            ),
            None => println!("already released"),
        },
        KillSwitchAction::Status => match ks.read()? {
            Some(s) => println!(
                "ENGAGED by {} at {}: {}",
                s.engaged_by, s.engaged_at, s.reason
            ),
            None => println!("released"),
        },
    }
    Ok(())
}

fn remote(a: &KillSwitchArgs, target: &str) -> anyhow::Result<()> {
    let tls = ClientTls {
        ca: a.ca.clone().context("--ca")?,
        cert: a.cert.clone().context("--cert")?,
        key: a.key.clone().context("--key")?,
    };
    let client = mtls_client(&tls, Duration::from_secs(30))?;
    let base = target.trim_end_matches('/');
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = rt.block_on(async {
        let req = match &a.action {
            KillSwitchAction::Engage { reason, .. } => client
                .post(format!("{base}/admin/kill-switch"))
                .json(&serde_json::json!({ "reason": reason })),
            KillSwitchAction::Release => client.delete(format!("{base}/admin/kill-switch")),
            KillSwitchAction::Status => client.get(format!("{base}/admin/status")),
        };
        let resp = req.send().await?;
        let status = resp.status();
        let body = resp.text().await?;
        Ok::<_, anyhow::Error>((status, body))
    })?;
    if !status.is_success() {
        bail!("{target} answered {status}: {body}");
    }
    println!("{body}");
    Ok(())
}
