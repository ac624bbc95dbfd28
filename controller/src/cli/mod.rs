//! The `cathedralctl` command line. In the library so that runbook tests can parse
//! documented commands against the real parser.
use clap::{Parser, Subcommand};

pub mod canary;
pub mod certs;
pub mod install;
pub mod killswitch;
pub mod probe;
pub mod service;
pub mod upstream;

#[derive(Debug, Parser)]
#[command(
    name = "cathedralctl",
    version,
    about = "Deploy, roll back, watch and report on a cathedral runtime under launchd"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upstream scanner: fork sync, our PRs, watched issues, MLX releases.
    Upstream(upstream::UpstreamArgs),
    /// Vision canary: probes every interval, SLO windows, kill switch, burn-in report.
    #[command(subcommand)]
    Canary(canary::CanaryCommand),
    /// Send one probe (multimodal and/or text) over mTLS; print status, latency and answer.
    Probe(probe::ProbeArgs),
    /// Deploy a new runtime binary (and flags) with backup, health gate and automatic rollback.
    Deploy(service::DeployArgs),
    /// Put a backed-up service definition back live and check it serves.
    Rollback(service::RollbackArgs),
    /// State, pid, last exit, binary, flags, health, vision, kill switch, last deploy. Exits 0
    /// when the service runs and answers its text probe, 1 when it runs but fails the probe,
    /// 3 when it is not running (as `systemctl status`).
    Status(service::StatusArgs),
    /// List (or prune) the backups of a service definition.
    Backups(service::BackupsArgs),
    /// Inspect, lint or edit a service definition.
    #[command(subcommand)]
    Plist(service::PlistCommand),
    /// Certificates for mTLS: a CA, the server, the clients.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Install the runtime, the canary watcher (and the scanner) as launchd agents.
    Install(install::InstallArgs),
    /// Stop and remove the agents `install` put in place, keeping a backup of each plist.
    Uninstall(install::UninstallArgs),
    /// The runtime's vision kill switch.
    Killswitch(killswitch::KillSwitchArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Upstream(args) => upstream::run(args),
        Command::Canary(args) => canary::run(args),
        Command::Probe(args) => probe::run(args),
        Command::Deploy(args) => service::deploy(args),
        Command::Rollback(args) => service::rollback(args),
        Command::Status(args) => service::status(args),
        Command::Backups(args) => service::backups(args),
        Command::Plist(cmd) => service::plist(cmd),
        Command::Certs(cmd) => certs::run(cmd),
        Command::Install(a) => install::install(a),
        Command::Uninstall(a) => install::uninstall(a),
        Command::Killswitch(args) => killswitch::run(args),
    }
}
