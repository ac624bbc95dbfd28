//! What the scan asks GitHub: our pull requests upstream, open issues with the watched
//! labels, and new releases. Requests go one after another: GitHub's secondary rate
//! limits punish bursts, and the order keeps the call count reproducible.

pub mod cache;
pub mod client;
pub mod model;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use cache::DiskCache;
pub use client::{ApiStats, FetchError, GitHub, Paged};

use crate::config::{Label, Login, RepoName};
use crate::report::Gap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrState {
    Open,
    Closed,
    Merged,
}

impl std::fmt::Display for PrState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PrState::Open => "open",
            PrState::Closed => "closed",
            PrState::Merged => "merged",
        })
    }
}

/// The reviewers' verdict, from each reviewer's latest deciding review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewDecision {
    Approved,
    ChangesRequested,
    /// Reviews exist but none approves or blocks.
    Commented,
    NoReviews,
}

impl std::fmt::Display for ReviewDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReviewDecision::Approved => "approved",
            ReviewDecision::ChangesRequested => "changes requested",
            ReviewDecision::Commented => "commented",
            ReviewDecision::NoReviews => "no reviews",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChecksState {
    Passing,
    Failing,
    Pending,
    NoChecks,
}

impl std::fmt::Display for ChecksState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChecksState::Passing => "passing",
            ChecksState::Failing => "failing",
            ChecksState::Pending => "pending",
            ChecksState::NoChecks => "no checks",
        })
    }
}

/// Check runs and commit statuses of a pull request's head, together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksSummary {
    pub state: ChecksState,
    pub passed: u32,
    pub failed: u32,
    pub pending: u32,
    /// Names of failing check runs and status contexts.
    pub failing: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestStatus {
    pub number: u64,
    pub title: String,
    pub url: String,
    pub state: PrState,
    pub draft: bool,
    pub updated_at: DateTime<Utc>,
    /// `None` when it could not be fetched (see the report's gaps) or the PR is closed.
    pub review: Option<ReviewDecision>,
    pub checks: Option<ChecksSummary>,
    /// GitHub's `mergeable_state`: clean, blocked, behind, dirty, unstable, unknown, ...
    pub mergeable_state: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchedIssue {
    pub number: u64,
    pub title: String,
    pub url: String,
    /// The watched labels it carries.
    pub labels: Vec<Label>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Not in the last report.
    pub new: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseEntry {
    pub tag: String,
    pub name: Option<String>,
    pub url: String,
    pub published_at: Option<DateTime<Utc>>,
    pub prerelease: bool,
}

/// Our pull requests on `repo`: found by search (the pulls list cannot filter by
/// author); open ones get details, reviews, check runs and the combined status.
/// `None` when the search itself failed.
pub async fn pull_requests(
    gh: &GitHub,
    repo: &RepoName,
    login: &Login,
    gaps: &mut Vec<Gap>,
) -> Option<Vec<PullRequestStatus>> {
    let query = format!("repo:{repo} is:pr author:{login}");
    let first = format!(
        "/search/issues?q={}&sort=updated&order=desc&per_page=100",
        encode(&query)
    );
    let mut incomplete = false;
    let items = match gh
        .get_all(&first, |page: model::SearchResults| {
            incomplete |= page.incomplete_results;
            page.items
        })
        .await
    {
        Ok(paged) => {
            if let Some(why) = paged.shortfall() {
                gaps.push(Gap {
                    what: format!("some pull requests by {login}"),
                    why,
                });
            }
            paged.items
        }
        Err(e) => {
            gaps.push(Gap::new(format!("pull requests by {login} (search)"), &e));
            return None;
        }
    };
    if incomplete {
        gaps.push(Gap {
            what: format!("some pull requests by {login}"),
            why: "GitHub's search timed out and returned incomplete results".into(),
        });
    }
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let state = match (&item.state[..], &item.pull_request) {
            ("open", _) => PrState::Open,
            (_, Some(link)) if link.merged_at.is_some() => PrState::Merged,
            _ => PrState::Closed,
        };
        let mut pr = PullRequestStatus {
            number: item.number,
            title: item.title,
            url: item.html_url,
            state,
            draft: item.draft.unwrap_or(false),
            updated_at: item.updated_at,
            review: None,
            checks: None,
            mergeable_state: None,
        };
        if state == PrState::Open {
            pull_request_details(gh, repo, &mut pr, login, gaps).await;
        }
        out.push(pr);
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.number));
    Some(out)
}

async fn pull_request_details(
    gh: &GitHub,
    repo: &RepoName,
    pr: &mut PullRequestStatus,
    author: &Login,
    gaps: &mut Vec<Gap>,
) {
    let n = pr.number;
    let details = match gh
        .get_json::<model::PullRequest>(&format!("/repos/{repo}/pulls/{n}"))
        .await
    {
        Ok((d, _)) => d,
        Err(e) => {
            gaps.push(Gap::new(format!("pull request #{n} details"), &e));
            return;
        }
    };
    pr.state = match (&details.state[..], details.merged) {
        (_, true) => PrState::Merged,
        ("open", _) => PrState::Open,
        _ => PrState::Closed,
    };
    pr.draft = details.draft;
    pr.title = details.title;
    pr.url = details.html_url;
    pr.updated_at = details.updated_at;
    pr.mergeable_state = details.mergeable_state;

    match gh
        .get_all(
            &format!("/repos/{repo}/pulls/{n}/reviews?per_page=100"),
            |page: Vec<model::Review>| page,
        )
        .await
    {
        Ok(paged) => {
            if let Some(why) = paged.shortfall() {
                gaps.push(Gap {
                    what: format!("some reviews of pull request #{n}"),
                    why,
                });
            }
            pr.review = Some(review_decision(&paged.items, author));
        }
        Err(e) => gaps.push(Gap::new(format!("pull request #{n} reviews"), &e)),
    }

    let sha = &details.head.sha;
    let runs = gh
        .get_json::<model::CheckRuns>(&format!(
            "/repos/{repo}/commits/{sha}/check-runs?per_page=100"
        ))
        .await;
    let status = gh
        .get_json::<model::CombinedStatus>(&format!("/repos/{repo}/commits/{sha}/status"))
        .await;
    match (runs, status) {
        (Ok((runs, _)), Ok((status, _))) => pr.checks = Some(summarize_checks(&runs, &status)),
        (runs, status) => {
            if let Err(e) = runs {
                gaps.push(Gap::new(format!("pull request #{n} check runs"), &e));
            }
            if let Err(e) = status {
                gaps.push(Gap::new(format!("pull request #{n} commit status"), &e));
            }
        }
    }
}

/// Each reviewer's latest approving, blocking or dismissed review decides; comments
/// alone never override a verdict. The author's own reviews do not count.
pub fn review_decision(reviews: &[model::Review], author: &Login) -> ReviewDecision {
    if reviews.is_empty() {
        return ReviewDecision::NoReviews;
    }
    let mut ordered: Vec<&model::Review> = reviews.iter().collect();
    // Stable: reviews without a time keep GitHub's (chronological) order.
    ordered.sort_by_key(|r| r.submitted_at);
    let mut verdicts: BTreeMap<&str, &str> = BTreeMap::new();
    for r in ordered {
        let Some(user) = &r.user else { continue };
        if user.login.eq_ignore_ascii_case(&author.0) {
            continue;
        }
        match r.state.as_str() {
            "APPROVED" | "CHANGES_REQUESTED" | "DISMISSED" => {
                verdicts.insert(&user.login, &r.state);
            }
            _ => {}
        }
    }
    if verdicts.values().any(|s| *s == "CHANGES_REQUESTED") {
        ReviewDecision::ChangesRequested
    } else if verdicts.values().any(|s| *s == "APPROVED") {
        ReviewDecision::Approved
    } else {
        ReviewDecision::Commented
    }
}

pub fn summarize_checks(runs: &model::CheckRuns, status: &model::CombinedStatus) -> ChecksSummary {
    let mut s = ChecksSummary {
        state: ChecksState::NoChecks,
        passed: 0,
        failed: 0,
        pending: 0,
        failing: Vec::new(),
    };
    for run in &runs.check_runs {
        if run.status != "completed" {
            s.pending += 1;
            continue;
        }
        match run.conclusion.as_deref() {
            Some("success") | Some("neutral") | Some("skipped") => s.passed += 1,
            _ => {
                s.failed += 1;
                s.failing.push(run.name.clone());
            }
        }
    }
    // A combined status with no contexts reads "pending": it means "none", not "waiting".
    if status.total_count > 0 {
        for st in &status.statuses {
            match st.state.as_str() {
                "success" => s.passed += 1,
                "pending" => s.pending += 1,
                _ => {
                    s.failed += 1;
                    s.failing.push(st.context.clone());
                }
            }
        }
    }
    s.state = if s.failed > 0 {
        ChecksState::Failing
    } else if s.pending > 0 {
        ChecksState::Pending
    } else if s.passed > 0 {
        ChecksState::Passing
    } else {
        ChecksState::NoChecks
    };
    s
}

/// Open issues (not pull requests) carrying any watched label. Returns the issues and
/// the labels whose listing came back whole.
pub async fn watched_issues(
    gh: &GitHub,
    repo: &RepoName,
    labels: &[Label],
    gaps: &mut Vec<Gap>,
) -> (Vec<WatchedIssue>, Vec<Label>) {
    let mut by_number: BTreeMap<u64, WatchedIssue> = BTreeMap::new();
    let mut complete = Vec::new();
    for label in labels {
        let first = format!(
            "/repos/{repo}/issues?state=open&labels={}&sort=created&direction=desc&per_page=100",
            encode(&label.0)
        );
        match gh.get_all(&first, |page: Vec<model::IssueItem>| page).await {
            Ok(paged) => {
                match paged.shortfall() {
                    // Not complete: issues beyond the last page must not count as gone.
                    Some(why) => gaps.push(Gap {
                        what: format!("some open issues labelled `{label}`"),
                        why,
                    }),
                    None => complete.push(label.clone()),
                }
                for item in paged.items.into_iter().filter(|i| i.pull_request.is_none()) {
                    let entry = by_number
                        .entry(item.number)
                        .or_insert_with(|| WatchedIssue {
                            number: item.number,
                            title: item.title.clone(),
                            url: item.html_url.clone(),
                            labels: Vec::new(),
                            created_at: item.created_at,
                            updated_at: item.updated_at,
                            new: false,
                        });
                    if !entry.labels.contains(label) {
                        entry.labels.push(label.clone());
                    }
                }
            }
            Err(e) => gaps.push(Gap::new(format!("open issues labelled `{label}`"), &e)),
        }
    }
    let mut issues: Vec<WatchedIssue> = by_number.into_values().collect();
    issues.sort_by_key(|i| std::cmp::Reverse(i.number));
    (issues, complete)
}

/// The newest published releases (drafts left out), newest first.
pub async fn releases(
    gh: &GitHub,
    repo: &RepoName,
    gaps: &mut Vec<Gap>,
) -> Option<Vec<ReleaseEntry>> {
    match gh
        .get_json::<Vec<model::Release>>(&format!("/repos/{repo}/releases?per_page=30"))
        .await
    {
        Ok((list, _)) => {
            let mut out: Vec<ReleaseEntry> = list
                .into_iter()
                .filter(|r| !r.draft)
                .map(|r| ReleaseEntry {
                    tag: r.tag_name,
                    name: r.name.filter(|n| !n.is_empty()),
                    url: r.html_url,
                    published_at: r.published_at,
                    prerelease: r.prerelease,
                })
                .collect();
            out.sort_by_key(|r| std::cmp::Reverse(r.published_at));
            Some(out)
        }
        Err(e) => {
            gaps.push(Gap::new(format!("releases of {repo}"), &e));
            None
        }
    }
}

/// Tags among `releases` that `seen` lacks.
pub fn unseen<'a>(releases: &'a [ReleaseEntry], seen: &BTreeSet<String>) -> Vec<&'a ReleaseEntry> {
    releases.iter().filter(|r| !seen.contains(&r.tag)).collect()
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
