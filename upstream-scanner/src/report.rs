//! The daily report: JSON (for the next day's comparison and for tools) and Markdown (for
//! the operator), one pair per local day, "changed since last report" first.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::config::{Label, Login, RepoName};
use crate::fork::{Divergence, ForkStatus, LocalAction, PushOutcome};
use crate::fsio::write_atomic;
use crate::github::{
    ApiStats, ChecksState, FetchError, PrState, PullRequestStatus, ReleaseEntry, ReviewDecision,
    WatchedIssue,
};

pub const SCHEMA: u32 = 1;
const PREFIX: &str = "upstream-";

/// Something the scan could not get, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub what: String,
    pub why: String,
}

impl Gap {
    pub fn new(what: String, why: &FetchError) -> Self {
        Self {
            what,
            why: why.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasesSection {
    /// Published since the last report (or, on the first report, the newest few).
    pub new: Vec<ReleaseEntry>,
    pub latest: Option<ReleaseEntry>,
    /// Every tag the listing held, so the next report knows what it has seen.
    pub seen_tags: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuesSection {
    /// The labels watched.
    #[serde(default)]
    pub watched: Vec<Label>,
    pub items: Vec<WatchedIssue>,
    /// Labels whose listing came back whole; an issue missing from an incomplete label's
    /// listing is not counted as gone.
    pub complete_labels: Vec<Label>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    pub generated_at: DateTime<Utc>,
    pub local_date: NaiveDate,
    pub time_zone: String,
    pub upstream: RepoName,
    pub login: Login,
    pub releases_repo: RepoName,
    /// When the report compared against was generated; `None` on the first report.
    pub previous: Option<DateTime<Utc>>,
    pub changes: Vec<Change>,
    pub gaps: Vec<Gap>,
    pub fork: Option<ForkStatus>,
    pub pull_requests: Option<Vec<PullRequestStatus>>,
    pub issues: IssuesSection,
    pub releases: Option<ReleasesSection>,
    pub api: ApiStats,
}

impl Report {
    pub fn is_partial(&self) -> bool {
        !self.gaps.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    ForkFastForwarded {
        commits: usize,
        to: String,
    },
    ForkPushed {
        commits: usize,
    },
    ForkDiverged {
        ahead: usize,
        behind: usize,
    },
    ForkRemoteMoved {
        from: Divergence,
        to: Divergence,
    },
    PrNew {
        number: u64,
        title: String,
        state: PrState,
    },
    PrState {
        number: u64,
        from: PrState,
        to: PrState,
    },
    PrDraft {
        number: u64,
        draft: bool,
    },
    PrReview {
        number: u64,
        from: ReviewDecision,
        to: ReviewDecision,
    },
    PrChecks {
        number: u64,
        from: ChecksState,
        to: ChecksState,
    },
    PrMergeable {
        number: u64,
        from: String,
        to: String,
    },
    PrUpdated {
        number: u64,
        at: DateTime<Utc>,
    },
    IssueNew {
        number: u64,
        title: String,
        labels: Vec<Label>,
    },
    IssueGone {
        number: u64,
        title: String,
    },
    ReleaseNew {
        tag: String,
        prerelease: bool,
    },
}

impl Change {
    pub fn describe(&self) -> String {
        match self {
            Change::ForkFastForwarded { commits, to } => {
                format!("fork: local branch fast-forwarded by {commits} commit(s) to {}", short(to))
            }
            Change::ForkPushed { commits } => format!("fork: pushed {commits} commit(s)"),
            Change::ForkDiverged { ahead, behind } => format!(
                "fork: local branch has diverged ({ahead} ahead, {behind} behind): not forced, needs a rebase or merge"
            ),
            Change::ForkRemoteMoved { from, to } => format!(
                "fork on GitHub: {} ahead / {} behind → {} ahead / {} behind",
                from.ahead, from.behind, to.ahead, to.behind
            ),
            Change::PrNew { number, title, state } => {
                format!("PR #{number} ({state}) new: {}", md(title))
            }
            Change::PrState { number, from, to } => format!("PR #{number}: {from} → {to}"),
            Change::PrDraft { number, draft } => format!(
                "PR #{number}: {}",
                if *draft { "back to draft" } else { "ready for review" }
            ),
            Change::PrReview { number, from, to } => format!("PR #{number} review: {from} → {to}"),
            Change::PrChecks { number, from, to } => format!("PR #{number} checks: {from} → {to}"),
            Change::PrMergeable { number, from, to } => {
                format!("PR #{number} mergeable state: {from} → {to}")
            }
            Change::PrUpdated { number, at } => {
                format!("PR #{number}: new activity ({})", at.format("%Y-%m-%d %H:%M UTC"))
            }
            Change::IssueNew { number, title, labels } => format!(
                "issue #{number} new [{}]: {}",
                labels.iter().map(|l| l.0.as_str()).collect::<Vec<_>>().join(", "),
                md(title)
            ),
            Change::IssueGone { number, title } => {
                format!("issue #{number} closed or unlabelled: {}", md(title))
            }
            Change::ReleaseNew { tag, prerelease } => format!(
                "release {tag}{}",
                if *prerelease { " (pre-release)" } else { "" }
            ),
        }
    }
}

/// What differs from the previous report. Fields unknown on either side (a gap) are not
/// compared, so a failed request never shows up as a change.
pub fn compute_changes(prev: Option<&Report>, cur: &Report) -> Vec<Change> {
    let mut out = Vec::new();
    if let Some(fork) = &cur.fork {
        if let LocalAction::FastForwarded { commits, to, .. } = &fork.action {
            out.push(Change::ForkFastForwarded {
                commits: *commits,
                to: to.clone(),
            });
        }
        if let Some(PushOutcome::Pushed { commits }) = &fork.push {
            out.push(Change::ForkPushed { commits: *commits });
        }
        let was_diverged = prev
            .and_then(|p| p.fork.as_ref())
            .is_some_and(|f| f.action == LocalAction::Diverged);
        if fork.action == LocalAction::Diverged && !was_diverged {
            out.push(Change::ForkDiverged {
                ahead: fork.local_after.ahead,
                behind: fork.local_after.behind,
            });
        }
        let prev_remote = prev
            .and_then(|p| p.fork.as_ref())
            .and_then(|f| f.fork_remote);
        if let (Some(from), Some(to)) = (prev_remote, fork.fork_remote) {
            if from != to {
                out.push(Change::ForkRemoteMoved { from, to });
            }
        }
    }

    let Some(prev) = prev else {
        return out;
    };

    if let (Some(before), Some(now)) = (&prev.pull_requests, &cur.pull_requests) {
        for pr in now {
            let n = pr.number;
            let Some(old) = before.iter().find(|p| p.number == n) else {
                out.push(Change::PrNew {
                    number: n,
                    title: pr.title.clone(),
                    state: pr.state,
                });
                continue;
            };
            if old.state != pr.state {
                out.push(Change::PrState {
                    number: n,
                    from: old.state,
                    to: pr.state,
                });
            }
            if old.draft != pr.draft {
                out.push(Change::PrDraft {
                    number: n,
                    draft: pr.draft,
                });
            }
            if let (Some(a), Some(b)) = (old.review, pr.review) {
                if a != b {
                    out.push(Change::PrReview {
                        number: n,
                        from: a,
                        to: b,
                    });
                }
            }
            if let (Some(a), Some(b)) = (&old.checks, &pr.checks) {
                if a.state != b.state {
                    out.push(Change::PrChecks {
                        number: n,
                        from: a.state,
                        to: b.state,
                    });
                }
            }
            if let (Some(a), Some(b)) = (&old.mergeable_state, &pr.mergeable_state) {
                if a != b {
                    out.push(Change::PrMergeable {
                        number: n,
                        from: a.clone(),
                        to: b.clone(),
                    });
                }
            }
            if old.updated_at != pr.updated_at {
                out.push(Change::PrUpdated {
                    number: n,
                    at: pr.updated_at,
                });
            }
        }
    }

    for issue in cur.issues.items.iter().filter(|i| i.new) {
        out.push(Change::IssueNew {
            number: issue.number,
            title: issue.title.clone(),
            labels: issue.labels.clone(),
        });
    }
    let complete_now: BTreeSet<&Label> = cur.issues.complete_labels.iter().collect();
    for old in &prev.issues.items {
        let still_listed = cur.issues.items.iter().any(|i| i.number == old.number);
        let all_checked = old.labels.iter().all(|l| complete_now.contains(l));
        if !still_listed && all_checked {
            out.push(Change::IssueGone {
                number: old.number,
                title: old.title.clone(),
            });
        }
    }

    if prev.releases.is_some() {
        if let Some(releases) = &cur.releases {
            for r in &releases.new {
                out.push(Change::ReleaseNew {
                    tag: r.tag.clone(),
                    prerelease: r.prerelease,
                });
            }
        }
    }
    out
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(10)]
}

/// Text from GitHub (titles) made inert in Markdown and table cells.
fn md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '|' | '<' | '>' | '[' | ']' | '`' | '*' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn local(t: DateTime<Utc>, tz: Option<Tz>) -> String {
    match tz {
        Some(tz) => t.with_timezone(&tz).format("%Y-%m-%d %H:%M %Z").to_string(),
        None => t.format("%Y-%m-%d %H:%M UTC").to_string(),
    }
}

pub fn render_markdown(r: &Report) -> String {
    let tz: Option<Tz> = r.time_zone.parse().ok();
    let mut s = String::new();
    let _ = writeln!(s, "# Upstream report {}\n", r.local_date);
    let _ = writeln!(
        s,
        "Generated {} for `{}` (upstream `{}`, releases of `{}`).{}\n",
        local(r.generated_at, tz),
        r.login,
        r.upstream,
        r.releases_repo,
        if r.is_partial() {
            " **Partial report: see \"Could not get\".**"
        } else {
            ""
        }
    );

    match r.previous {
        Some(p) => {
            let _ = writeln!(s, "## Changed since last report ({})\n", local(p, tz));
            if r.changes.is_empty() {
                s.push_str("Nothing changed.\n\n");
            }
        }
        None => {
            s.push_str("## Changed since last report\n\nFirst report: nothing to compare with.\n\n")
        }
    }
    for c in &r.changes {
        let _ = writeln!(s, "- {}", c.describe());
    }
    if !r.changes.is_empty() {
        s.push('\n');
    }

    if !r.gaps.is_empty() {
        s.push_str("## Could not get\n\n");
        for g in &r.gaps {
            let _ = writeln!(s, "- {}: {}", g.what, g.why);
        }
        s.push('\n');
    }

    s.push_str("## Fork\n\n");
    match &r.fork {
        None => s.push_str("Not synchronised (no fork configured, or see \"Could not get\").\n\n"),
        Some(f) => {
            let _ = writeln!(
                s,
                "- `{}` branch `{}`; upstream head `{}`",
                f.fork,
                f.branch,
                short(&f.upstream_head)
            );
            let _ = writeln!(
                s,
                "- local clone: {} ahead / {} behind before, {} ahead / {} behind now: {}",
                f.local_before.ahead,
                f.local_before.behind,
                f.local_after.ahead,
                f.local_after.behind,
                match &f.action {
                    LocalAction::UpToDate => "up to date".to_string(),
                    LocalAction::AheadOnly => "ahead only (nothing to take)".to_string(),
                    LocalAction::FastForwarded { commits, .. } =>
                        format!("fast-forwarded {commits} commit(s)"),
                    LocalAction::Diverged =>
                        "**diverged**: left as it is; rebase or merge by hand".to_string(),
                    LocalAction::Blocked { reason } => format!("fast-forward blocked: {reason}"),
                }
            );
            match (&f.fork_remote, &f.fork_remote_error) {
                (Some(d), _) => {
                    let _ = writeln!(
                        s,
                        "- fork on GitHub: {} ahead / {} behind upstream",
                        d.ahead, d.behind
                    );
                }
                (None, Some(e)) => {
                    let _ = writeln!(s, "- fork on GitHub: unknown ({e})");
                }
                (None, None) => {}
            }
            if let Some(p) = &f.push {
                let _ = writeln!(
                    s,
                    "- push: {}",
                    match p {
                        PushOutcome::Pushed { commits } => format!("pushed {commits} commit(s)"),
                        PushOutcome::UpToDate => "fork already up to date".into(),
                        PushOutcome::Skipped { reason } => format!("skipped: {reason}"),
                        PushOutcome::Rejected { reason } => format!("rejected: {reason}"),
                        PushOutcome::Failed { reason } => format!("failed: {reason}"),
                    }
                );
            }
            s.push('\n');
        }
    }

    s.push_str("## Our pull requests\n\n");
    match &r.pull_requests {
        None => s.push_str("Unknown: see \"Could not get\".\n\n"),
        Some(prs) if prs.is_empty() => s.push_str("None.\n\n"),
        Some(prs) => {
            s.push_str("| PR | State | Review | Checks | Mergeable | Updated | Title |\n");
            s.push_str("|---|---|---|---|---|---|---|\n");
            let unknown = || "?".to_string();
            for p in prs {
                let state = if p.draft && p.state == PrState::Open {
                    "open (draft)".to_string()
                } else {
                    p.state.to_string()
                };
                let checks = p
                    .checks
                    .as_ref()
                    .map(|c| {
                        let mut t =
                            format!("{} ({}/{}/{})", c.state, c.passed, c.failed, c.pending);
                        if !c.failing.is_empty() {
                            let _ = write!(t, ": {}", md(&c.failing.join(", ")));
                        }
                        t
                    })
                    .unwrap_or_else(|| {
                        if p.state == PrState::Open {
                            unknown()
                        } else {
                            "".into()
                        }
                    });
                let _ = writeln!(
                    s,
                    "| [#{}]({}) | {} | {} | {} | {} | {} | {} |",
                    p.number,
                    p.url,
                    state,
                    p.review.map(|d| d.to_string()).unwrap_or_else(
                        || if p.state == PrState::Open {
                            unknown()
                        } else {
                            "".into()
                        }
                    ),
                    checks,
                    p.mergeable_state.clone().unwrap_or_default(),
                    p.updated_at.format("%Y-%m-%d"),
                    md(&p.title)
                );
            }
            s.push_str("\nChecks: passed/failed/pending.\n\n");
        }
    }

    s.push_str("## Watched issues\n\n");
    let unread: Vec<String> = r
        .issues
        .watched
        .iter()
        .filter(|l| !r.issues.complete_labels.contains(l))
        .map(|l| format!("`{}`", md(&l.0)))
        .collect();
    if !unread.is_empty() {
        let _ = writeln!(
            s,
            "Incomplete: the listing for {} could not be read whole (see \"Could not get\").\n",
            unread.join(", ")
        );
    }
    if r.issues.items.is_empty() {
        if unread.len() < r.issues.watched.len() || r.issues.watched.is_empty() {
            s.push_str("None open.\n\n");
        }
    } else {
        s.push_str("| Issue | Labels | Opened | Title |\n|---|---|---|---|\n");
        for i in &r.issues.items {
            let _ = writeln!(
                s,
                "| [#{}]({}){} | {} | {} | {} |",
                i.number,
                i.url,
                if i.new { " **new**" } else { "" },
                i.labels
                    .iter()
                    .map(|l| md(&l.0))
                    .collect::<Vec<_>>()
                    .join(", "),
                i.created_at.format("%Y-%m-%d"),
                md(&i.title)
            );
        }
        s.push('\n');
    }

    let _ = writeln!(s, "## Releases of {}\n", r.releases_repo);
    match &r.releases {
        None => s.push_str("Unknown: see \"Could not get\".\n\n"),
        Some(rel) => {
            if rel.new.is_empty() {
                s.push_str("No new release.");
                if let Some(l) = &rel.latest {
                    let _ = write!(s, " Latest: [{}]({})", l.tag, l.url);
                    if let Some(t) = l.published_at {
                        let _ = write!(s, " ({})", t.format("%Y-%m-%d"));
                    }
                    s.push('.');
                }
                s.push_str("\n\n");
            } else {
                for l in &rel.new {
                    let _ = writeln!(
                        s,
                        "- [{}]({}){}{}{}",
                        l.tag,
                        l.url,
                        l.name
                            .as_deref()
                            .filter(|n| *n != l.tag)
                            .map(|n| format!(" {}", md(n)))
                            .unwrap_or_default(),
                        if l.prerelease { " (pre-release)" } else { "" },
                        l.published_at
                            .map(|t| format!(", {}", t.format("%Y-%m-%d")))
                            .unwrap_or_default()
                    );
                }
                s.push('\n');
            }
        }
    }

    let a = &r.api;
    let _ = writeln!(
        s,
        "## API\n\n{} request(s): {} conditional, {} not modified (free), {} charged, {} retried{}.",
        a.requests,
        a.conditional,
        a.not_modified,
        a.charged(),
        a.retries,
        a.rate_limit_remaining
            .map(|n| format!("; rate limit remaining {n}"))
            .unwrap_or_default()
    );
    s
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("report {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("report {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no report in {0}")]
    None(PathBuf),
}

pub struct ReportPaths {
    pub json: PathBuf,
    pub markdown: PathBuf,
}

pub fn paths_for(dir: &Path, date: NaiveDate) -> ReportPaths {
    let stem = format!("{PREFIX}{}", date.format("%Y-%m-%d"));
    ReportPaths {
        json: dir.join(format!("{stem}.json")),
        markdown: dir.join(format!("{stem}.md")),
    }
}

/// Writes the day's report (replacing an earlier one of the same day), JSON first: the
/// JSON is what the next scan compares against.
pub fn write(dir: &Path, r: &Report) -> Result<ReportPaths, ReportError> {
    let paths = paths_for(dir, r.local_date);
    let json = serde_json::to_vec_pretty(r).map_err(|source| ReportError::Json {
        path: paths.json.clone(),
        source,
    })?;
    write_atomic(&paths.json, &json).map_err(|source| ReportError::Io {
        path: paths.json.clone(),
        source,
    })?;
    write_atomic(&paths.markdown, render_markdown(r).as_bytes()).map_err(|source| {
        ReportError::Io {
            path: paths.markdown.clone(),
            source,
        }
    })?;
    Ok(paths)
}

/// Report dates present in `dir`, oldest first.
pub fn dates(dir: &Path) -> Vec<NaiveDate> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<NaiveDate> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let date = name.strip_prefix(PREFIX)?.strip_suffix(".json")?;
            NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()
        })
        .collect();
    out.sort();
    out
}

pub fn load(dir: &Path, date: NaiveDate) -> Result<Report, ReportError> {
    let path = paths_for(dir, date).json;
    let bytes = std::fs::read(&path).map_err(|source| ReportError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ReportError::Json { path, source })
}

/// The newest readable report; unreadable ones are skipped with a warning.
pub fn latest(dir: &Path) -> Option<Report> {
    for date in dates(dir).into_iter().rev() {
        match load(dir, date) {
            Ok(r) => return Some(r),
            Err(e) => tracing::warn!(error = %e, "skipping unreadable report"),
        }
    }
    None
}
