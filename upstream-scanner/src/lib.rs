//! The upstream scanner: fork sync (git2), our upstream PRs, watched issues and MLX
//! releases (octocrab), a daily Markdown + JSON report, and its DST-correct schedule.
//!
//! Owns: reading upstream state and writing reports.
//! Must not: force-push or rewrite history, log or report the token, or exceed the
//! GitHub rate limit blindly.

pub mod config;
pub mod fork;
pub mod fsio;
pub mod github;
pub mod report;
pub mod scan;
pub mod schedule;

pub use config::{Config, ConfigError, GitHubToken, Label, Login, RepoName, TokenSource};
pub use report::Report;
pub use scan::{scan, ScanError, ScanOutcome};
