//! `cathedralctl upstream …`: the upstream scanner's front end.

use std::path::PathBuf;

use anyhow::{bail, Context};
use cathedral_upstream_scanner::{
    report,
    schedule::{self, DailyAt, RunState},
    Config,
};
use chrono::{NaiveDate, Utc};
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct UpstreamArgs {
    /// Scanner configuration (TOML).
    #[arg(long, global = true, env = "CATHEDRAL_UPSTREAM_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: UpstreamCommand,
}

#[derive(Debug, Subcommand)]
pub enum UpstreamCommand {
    /// Scan now (fork sync, pull requests, issues, releases) and write today's report.
    Scan {
        /// Scan only when a scheduled run was missed (for a launchd agent at login).
        #[arg(long)]
        if_due: bool,
        /// Print the JSON report instead of the Markdown one.
        #[arg(long)]
        json: bool,
    },
    /// Print today's report, or the newest with --last, or a given day's.
    Report {
        /// The newest report, whatever its day.
        #[arg(long, conflicts_with = "date")]
        last: bool,
        /// The report of this local day (YYYY-MM-DD).
        #[arg(long)]
        date: Option<NaiveDate>,
        /// Print the JSON report instead of the Markdown one.
        #[arg(long)]
        json: bool,
    },
    /// Run as a daemon: a scan every day at the configured local time (09:07 by
    /// default), DST-correct, with one catch-up run when a day was missed.
    Schedule,
}

pub fn run(args: UpstreamArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // launchd writes stderr to a log file: no colour codes there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let path = args
        .config
        .context("no scanner configuration: pass --config PATH or set CATHEDRAL_UPSTREAM_CONFIG")?;
    let config = Config::load(&path)?;
    let (tz, _) = schedule::local_zone(&config.schedule);

    match args.command {
        UpstreamCommand::Scan { if_due, json } => {
            let now = Utc::now();
            if if_due {
                let at = DailyAt(config.schedule.at);
                let last = RunState::load(&config.state_dir()).last_run;
                if !at.is_due(last, now, tz) {
                    println!(
                        "not due: last scan {}, next {}",
                        last.map(|t| t.with_timezone(&tz).to_rfc3339())
                            .unwrap_or_else(|| "never".into()),
                        at.next_after(now, tz).with_timezone(&tz).to_rfc3339()
                    );
                    return Ok(());
                }
            }
            let outcome =
                runtime()?.block_on(cathedral_upstream_scanner::scan(&config, now, tz))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&outcome.report)?);
            } else {
                print!("{}", report::render_markdown(&outcome.report));
            }
            eprintln!(
                "report written: {} ({} change(s), {} API request(s), {} not modified)",
                outcome.markdown.display(),
                outcome.report.changes.len(),
                outcome.report.api.requests,
                outcome.report.api.not_modified
            );
            if outcome.report.is_partial() {
                eprintln!(
                    "partial report: {} item(s) could not be fetched",
                    outcome.report.gaps.len()
                );
            }
            Ok(())
        }
        UpstreamCommand::Report { last, date, json } => {
            let dir = &config.report_dir;
            let r = if last {
                report::latest(dir).with_context(|| format!("no report in {}", dir.display()))?
            } else {
                let day = date.unwrap_or_else(|| Utc::now().with_timezone(&tz).date_naive());
                if !report::dates(dir).contains(&day) {
                    bail!(
                        "no report for {day} in {}; `cathedralctl upstream report --last` shows the newest",
                        dir.display()
                    );
                }
                report::load(dir, day)?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", report::render_markdown(&r));
            }
            Ok(())
        }
        UpstreamCommand::Schedule => {
            let state_dir = config.state_dir();
            runtime()?.block_on(schedule::run_daemon(&config.schedule, &state_dir, || {
                let config = config.clone();
                async move {
                    let (tz, _) = schedule::local_zone(&config.schedule);
                    cathedral_upstream_scanner::scan(&config, Utc::now(), tz)
                        .await
                        .map(|_| ())
                }
            }));
            Ok(())
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> UpstreamArgs {
        match Cli::try_parse_from(args).unwrap().command {
            Command::Upstream(a) => a,
            #[allow(unreachable_patterns)]
            _ => panic!("not an upstream command"),
        }
    }

    #[test]
    fn parses_the_upstream_commands() {
        let a = parse(&["cathedralctl", "upstream", "scan", "--config", "/c.toml"]);
        assert_eq!(a.config.as_deref(), Some(std::path::Path::new("/c.toml")));
        assert!(matches!(
            a.command,
            UpstreamCommand::Scan {
                if_due: false,
                json: false
            }
        ));
        let a = parse(&[
            "cathedralctl",
            "upstream",
            "--config",
            "/c.toml",
            "report",
            "--last",
        ]);
        assert!(matches!(
            a.command,
            UpstreamCommand::Report {
                last: true,
                date: None,
                ..
            }
        ));
        let a = parse(&["cathedralctl", "upstream", "report", "--date", "2026-11-24"]);
        assert!(matches!(
            a.command,
            UpstreamCommand::Report { date: Some(_), .. }
        ));
        let a = parse(&["cathedralctl", "upstream", "schedule"]);
        assert!(matches!(a.command, UpstreamCommand::Schedule));
        let a = parse(&["cathedralctl", "upstream", "scan", "--if-due"]);
        assert!(matches!(
            a.command,
            UpstreamCommand::Scan { if_due: true, .. }
        ));
        assert!(Cli::try_parse_from(["cathedralctl", "upstream"]).is_err());
        assert!(Cli::try_parse_from([
            "cathedralctl",
            "upstream",
            "report",
            "--last",
            "--date",
            "2026-11-24"
        ])
        .is_err());
    }

    #[test]
    fn report_without_reports_says_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("upstream.toml");
        let reports = dir.path().join("reports");
        std::fs::write(
            &config,
            format!(
                "login = \"octo-dev\"\nreport_dir = \"{}\"\n[schedule]\ntime_zone = \"Europe/Berlin\"\n",
                reports.display()
            ),
        )
        .unwrap();
        let args = |last| UpstreamArgs {
            config: Some(config.clone()),
            command: UpstreamCommand::Report {
                last,
                date: None,
                json: false,
            },
        };
        let err = run(args(true)).unwrap_err().to_string();
        assert!(
            err.contains("no report in") && err.contains("reports"),
            "{err}"
        );
        let err = run(args(false)).unwrap_err().to_string();
        assert!(err.contains("--last"), "{err}");
    }
}
