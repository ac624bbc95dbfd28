//! One scan: fork sync, GitHub queries, comparison with the last report, report written.

use std::collections::BTreeSet;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::config::{Config, ConfigError};
use crate::fork;
use crate::github::{self, DiskCache, GitHub};
use crate::report::{self, Gap, IssuesSection, ReleasesSection, Report, ReportError};
use crate::schedule::RunState;

/// Releases listed on the first report, when there is nothing to compare with.
const FIRST_REPORT_RELEASES: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Client(#[from] github::client::ClientError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("recording the run in {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct ScanOutcome {
    pub report: Report,
    pub json: PathBuf,
    pub markdown: PathBuf,
}

/// Scans now and writes the day's report. Network trouble never fails the scan: it
/// becomes a gap in a partial report. Only local problems (config, token file, report
/// directory) are errors.
pub async fn scan(config: &Config, now: DateTime<Utc>, tz: Tz) -> Result<ScanOutcome, ScanError> {
    let token = config.token.as_ref().map(|t| t.resolve()).transpose()?;
    let previous = report::latest(&config.report_dir);
    let mut gaps: Vec<Gap> = Vec::new();

    let fork = match &config.fork {
        None => None,
        Some(fork_config) => {
            let (fc, upstream, branch, tok) = (
                fork_config.clone(),
                config.upstream.clone(),
                config.upstream_branch.clone(),
                token.clone(),
            );
            // libgit2 blocks: keep it off the async workers.
            let synced = tokio::task::spawn_blocking(move || {
                fork::sync(&fc, &upstream, &branch, tok.as_ref())
            })
            .await;
            match synced {
                Ok(Ok(status)) => {
                    if let Some(e) = &status.fork_remote_error {
                        gaps.push(Gap {
                            what: format!("fork {} on GitHub", fork_config.repo),
                            why: e.clone(),
                        });
                    }
                    Some(status)
                }
                Ok(Err(e)) => {
                    gaps.push(Gap {
                        what: format!("fork sync of {}", fork_config.clone.display()),
                        why: e.to_string(),
                    });
                    None
                }
                Err(e) => {
                    gaps.push(Gap {
                        what: "fork sync".into(),
                        why: format!("task failed: {e}"),
                    });
                    None
                }
            }
        }
    };

    let state_dir = config.state_dir();
    let cache = DiskCache::open(&state_dir.join("etags.json"));
    let gh = GitHub::new(&config.github, token.as_ref(), cache.clone())?;
    let pull_requests =
        github::pull_requests(&gh, &config.upstream, &config.login, &mut gaps).await;
    let (mut issues, complete_labels) =
        github::watched_issues(&gh, &config.upstream, &config.labels, &mut gaps).await;
    let releases = github::releases(&gh, &config.releases_repo, &mut gaps).await;

    if let Some(prev) = &previous {
        let prev_complete: BTreeSet<_> = prev.issues.complete_labels.iter().collect();
        for issue in &mut issues {
            let was_listed = prev.issues.items.iter().any(|i| i.number == issue.number);
            let was_checked = issue.labels.iter().any(|l| prev_complete.contains(l));
            issue.new = !was_listed && was_checked;
        }
    }

    let releases = releases.map(|list| {
        let seen_before = previous
            .as_ref()
            .and_then(|p| p.releases.as_ref())
            .map(|r| &r.seen_tags);
        let new = match seen_before {
            Some(seen) => github::unseen(&list, seen).into_iter().cloned().collect(),
            None => list.iter().take(FIRST_REPORT_RELEASES).cloned().collect(),
        };
        ReleasesSection {
            new,
            latest: list.first().cloned(),
            seen_tags: list.iter().map(|r| r.tag.clone()).collect(),
        }
    });

    let local_date = now.with_timezone(&tz).date_naive();
    let mut report = Report {
        schema: report::SCHEMA,
        generated_at: now,
        local_date,
        time_zone: tz.name().to_owned(),
        upstream: config.upstream.clone(),
        login: config.login.clone(),
        releases_repo: config.releases_repo.clone(),
        previous: previous.as_ref().map(|p| p.generated_at),
        changes: Vec::new(),
        gaps,
        fork,
        pull_requests,
        issues: IssuesSection {
            watched: config.labels.clone(),
            items: issues,
            complete_labels,
        },
        releases,
        api: gh.stats(),
    };
    report.changes = report::compute_changes(previous.as_ref(), &report);

    let paths = report::write(&config.report_dir, &report)?;
    if let Err(e) = cache.save(report.gaps.is_empty()) {
        // Only costs rate limit next time.
        tracing::warn!(error = %e, "ETag cache not saved");
    }
    RunState {
        last_run: Some(now),
    }
    .save(&state_dir)
    .map_err(|source| ScanError::State {
        path: state_dir.clone(),
        source,
    })?;
    tracing::info!(
        report = %paths.markdown.display(),
        requests = report.api.requests,
        not_modified = report.api.not_modified,
        gaps = report.gaps.len(),
        changes = report.changes.len(),
        "upstream scan done"
    );
    Ok(ScanOutcome {
        report,
        json: paths.json,
        markdown: paths.markdown,
    })
}
