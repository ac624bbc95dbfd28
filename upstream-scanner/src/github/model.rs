//! The parts of GitHub's REST responses the scan reads. Only the fields used are declared,
//! so additions to GitHub's schema (or fields GitHub Enterprise lacks) never fail a scan.

use chrono::{DateTime, Utc};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct User {
    pub login: String,
}

#[derive(Debug, Deserialize)]
pub struct LabelRef {
    pub name: String,
}

/// `GET /search/issues`
#[derive(Debug, Deserialize)]
pub struct SearchResults {
    pub total_count: u64,
    #[serde(default)]
    pub incomplete_results: bool,
    pub items: Vec<IssueItem>,
}

/// An issue or pull request as the issues and search endpoints list it.
#[derive(Debug, Deserialize)]
pub struct IssueItem {
    pub number: u64,
    pub title: String,
    pub html_url: String,
    pub state: String,
    #[serde(default)]
    pub draft: Option<bool>,
    #[serde(default)]
    pub labels: Vec<LabelRef>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Present exactly when the item is a pull request.
    #[serde(default)]
    pub pull_request: Option<PullRequestLink>,
}

#[derive(Debug, Deserialize)]
pub struct PullRequestLink {
    #[serde(default)]
    pub merged_at: Option<DateTime<Utc>>,
}

/// `GET /repos/{o}/{r}/pulls/{n}`
#[derive(Debug, Deserialize)]
pub struct PullRequest {
    pub number: u64,
    pub title: String,
    pub html_url: String,
    pub state: String,
    #[serde(default)]
    pub draft: bool,
    #[serde(default)]
    pub merged: bool,
    #[serde(default)]
    pub mergeable: Option<bool>,
    #[serde(default)]
    pub mergeable_state: Option<String>,
    pub updated_at: DateTime<Utc>,
    pub head: Head,
}

#[derive(Debug, Deserialize)]
pub struct Head {
    pub sha: String,
}

/// One entry of `GET /repos/{o}/{r}/pulls/{n}/reviews`
#[derive(Debug, Deserialize)]
pub struct Review {
    pub user: Option<User>,
    pub state: String,
    #[serde(default)]
    pub submitted_at: Option<DateTime<Utc>>,
}

/// `GET /repos/{o}/{r}/commits/{ref}/check-runs`
#[derive(Debug, Deserialize)]
pub struct CheckRuns {
    pub total_count: u64,
    pub check_runs: Vec<CheckRun>,
}

#[derive(Debug, Deserialize)]
pub struct CheckRun {
    pub name: String,
    pub status: String,
    #[serde(default)]
    pub conclusion: Option<String>,
}

/// `GET /repos/{o}/{r}/commits/{ref}/status`
#[derive(Debug, Deserialize)]
pub struct CombinedStatus {
    pub state: String,
    pub total_count: u64,
    #[serde(default)]
    pub statuses: Vec<CommitStatus>,
}

#[derive(Debug, Deserialize)]
pub struct CommitStatus {
    pub context: String,
    pub state: String,
}

/// One entry of `GET /repos/{o}/{r}/releases`
#[derive(Debug, Deserialize)]
pub struct Release {
    pub tag_name: String,
    #[serde(default)]
    pub name: Option<String>,
    pub html_url: String,
    #[serde(default)]
    pub draft: bool,
    #[serde(default)]
    pub prerelease: bool,
    #[serde(default)]
    pub published_at: Option<DateTime<Utc>>,
}
