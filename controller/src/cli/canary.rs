//! `cathedralctl canary watch|report`: the vision canary's front end.
use crate::cli::probe::TargetArgs;
use anyhow::Context;
use cathedral_canary::clock::SystemClock;
use cathedral_canary::policy::PolicyConfig;
use cathedral_canary::report::Report;
use cathedral_canary::store::Store;
use cathedral_canary::switch::SwitchTarget;
use cathedral_canary::watch::{run as watch, WatchConfig, Watcher};
use cathedral_canary::window::{Slo, WindowSpec};
use cathedral_runtime::client::{mtls_client, ClientTls};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum CanaryCommand {
    /// Probe the runtime every interval, judge wall-clock windows, engage the kill switch
    /// after consecutive breaches. Runs until SIGTERM/SIGINT (or --run-for).
    Watch(WatchArgs),
    /// Table per window, chart (PNG + SVG) and the burn-in verdict, from the state store.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Time between ticks (each tick: a multimodal probe, then a text probe).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// SLO window length; windows are aligned to the clock (1h → on the hour).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Minimum share of successful vision probes in a window.
    #[arg(long, default_value_t = 0.99)]
    pub slo_success: f64,
    /// Maximum p95 latency of successful vision probes in a window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub slo_p95: Duration,
    /// Share of the expected probes (window / interval) a window needs to be judged at all.
    #[arg(long, default_value_t = 0.5)]
    pub min_coverage: f64,
    /// Consecutive breached windows that engage the kill switch.
    #[arg(long, default_value_t = 3)]
    pub breaches: usize,
    /// Release the switch after this many consecutive windows with healthy text probes
    /// (off by default: release is manual, `cathedralctl killswitch release`).
    #[arg(long)]
    pub auto_release: Option<usize>,
    /// State directory (probe store).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Engage by writing this kill-switch file (watcher on the runtime's host) instead of
    /// through the admin route.
    #[arg(long, conflicts_with_all = ["admin_cert", "no_kill_switch"])]
    pub kill_switch_file: Option<PathBuf>,
    /// Admin client certificate for POST /admin/kill-switch (default: --cert).
    #[arg(long, requires = "admin_key")]
    pub admin_cert: Option<PathBuf>,
    /// Key of --admin-cert.
    #[arg(long, requires = "admin_cert")]
    pub admin_key: Option<PathBuf>,
    /// Judge and record, but never touch the kill switch.
    #[arg(long)]
    pub no_kill_switch: bool,
    /// Command run (`sh -c`) after each kill-switch action; the event is in
    /// CATHEDRAL_CANARY_* environment variables.
    #[arg(long)]
    pub notify: Option<String>,
    /// Multimodal probe image instead of the built-in one.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Send only the multimodal probe.
    #[arg(long)]
    pub no_text: bool,
    /// Stop after this long (default: run until stopped).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub run_for: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// State directory of the watcher.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Period covered, back from now.
    #[arg(long, default_value = "3d", value_parser = humantime::parse_duration)]
    pub since: Duration,
    /// Where report.txt, report.json, chart.png and chart.svg go (default: <state>/report).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `~/Library/Application Support/cathedral/canary` on macOS, else `$XDG_STATE_HOME/cathedral/canary`
/// (`~/.local/state/...`).
pub fn default_state_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set: pass --state DIR")?;
    let home = PathBuf::from(home);
    Ok(if cfg!(target_os = "macos") {
        home.join("Library/Application Support/cathedral/canary")
    } else {
        std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".local/state"))
            .join("cathedral/canary")
    })
}

pub fn run(command: CanaryCommand) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match command {
        CanaryCommand::Watch(a) => run_watch(a),
        CanaryCommand::Report(a) => run_report(a),
    }
}

fn run_watch(a: WatchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.slo_success),
        "--slo-success must be between 0 and 1, e.g. 0.99"
    );
    anyhow::ensure!(a.breaches >= 1, "--breaches must be at least 1");
    anyhow::ensure!(
        a.interval >= Duration::from_millis(100),
        "--interval must be at least 100ms"
    );
    anyhow::ensure!(
        a.auto_release != Some(0),
        "--auto-release must be at least 1"
    );
    let window = WindowSpec::new(a.window)?;
    anyhow::ensure!(
        a.window >= a.interval,
        "--window ({:?}) must be at least one --interval ({:?})",
        a.window,
        a.interval
    );
    let state = match &a.state {
        Some(s) => s.clone(),
        None => default_state_dir()?,
    };
    let prober = a.target.prober(a.image.as_ref())?;
    let switch = if a.no_kill_switch {
        SwitchTarget::None
    } else if let Some(path) = &a.kill_switch_file {
        SwitchTarget::File(path.clone())
    } else {
        let tls = ClientTls {
            ca: a.target.ca.clone(),
            cert: a
                .admin_cert
                .clone()
                .unwrap_or_else(|| a.target.cert.clone()),
            key: a.admin_key.clone().unwrap_or_else(|| a.target.key.clone()),
        };
        SwitchTarget::Admin {
            client: mtls_client(&tls, Duration::from_secs(30))?,
            base: a.target.target.trim_end_matches('/').to_owned(),
        }
    };
    let config = WatchConfig {
        target: a.target.target.clone(),
        interval: a.interval,
        window,
        slo: Slo {
            success_target: a.slo_success,
            p95_limit: a.slo_p95,
            min_probes: Slo::min_probes_for(a.window, a.interval, a.min_coverage),
        },
        policy: PolicyConfig {
            breaches_to_engage: a.breaches,
            auto_release_after: a.auto_release,
        },
        text_probe: !a.no_text,
        gap_after: WatchConfig::default_gap_after(a.interval),
        notify: a.notify.clone(),
        run_for: a.run_for,
    };
    let store = Store::open(&state)?;
    if store.skipped() > 0 {
        tracing::warn!(
            skipped = store.skipped(),
            "some records in the store could not be read"
        );
    }
    let watcher = Watcher::new(store, config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot listen for SIGTERM")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        watch(watcher, prober, switch, Arc::new(SystemClock), shutdown).await?;
        anyhow::Ok(())
    })
}

fn run_report(a: ReportArgs) -> anyhow::Result<()> {
    let state = match &a.state {
        Some(s) => s.clone(),
        None => default_state_dir()?,
    };
    let records = Store::read(&state)?;
    let until = chrono::Utc::now();
    let since = until - chrono::Duration::from_std(a.since).context("--since is too long")?;
    let report = Report::from_records(&records, since, until);
    let out = a.out.clone().unwrap_or_else(|| state.join("report"));
    let files = report.write(&out)?;
    print!("{}", report.table());
    println!();
    println!("{}", report.verdict_line());
    println!();
    for path in [&files.text, &files.json, &files.png, &files.svg] {
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn watch_parses_documented_flags() {
        let cli = Cli::try_parse_from([
            "cathedralctl",
            "canary",
            "watch",
            "--target",
            "https://mini.local:1337",
            "--cert",
            "c.pem",
            "--key",
            "c.key",
            "--ca",
            "ca.pem",
            "--interval",
            "60s",
            "--window",
            "1h",
            "--slo-success",
            "0.99",
            "--slo-p95",
            "10s",
            "--breaches",
            "3",
            "--state",
            "/tmp/s",
            "--notify",
            "logger canary",
        ])
        .unwrap();
        let Command::Canary(super::CanaryCommand::Watch(w)) = cli.command else {
            panic!("not canary watch");
        };
        assert_eq!(w.window, std::time::Duration::from_secs(3600));
        assert_eq!(w.slo_p95, std::time::Duration::from_secs(10));
        assert_eq!(w.auto_release, None);
        let cli =
            Cli::try_parse_from(["cathedralctl", "canary", "report", "--since", "3d"]).unwrap();
        let Command::Canary(super::CanaryCommand::Report(r)) = cli.command else {
            panic!("not canary report");
        };
        assert_eq!(r.since, std::time::Duration::from_secs(3 * 86_400));
        assert!(Cli::try_parse_from([
            "cathedralctl",
            "canary",
            "watch",
            "--target",
            "https://x:1",
            "--cert",
            "c",
            "--key",
            "k",
            "--ca",
            "a",
            "--kill-switch-file",
            "/ks",
            "--no-kill-switch",
        ])
        .is_err());
    }
}
