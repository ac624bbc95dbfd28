//! The upstream scanner: fork sync (git2), our upstream PRs, watched issues and MLX
//! releases (octocrab), a daily Markdown + JSON report, and its DST-correct schedule.
//!
//! Owns: reading upstream state and writing reports.
//! Must not: force-push or rewrite history, log or report the token, or exceed the
//! GitHub rate limit blindly.
