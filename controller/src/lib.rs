//! The cathedral controller (`cathedralctl`): launchd plist edits with backups, health-gated
//! deploy and rollback, status, certificates, the kill switch, and the front end of the
//! canary and the upstream scanner.
//!
//! Owns: every change to a service definition on disk and every launchctl call.
//! Must not: edit a plist without a backup, write any file non-atomically, or run a second
//! controller concurrently on the same service.

pub mod agent;
pub mod atomic;
pub mod backup;
pub mod cli;
pub mod deploy;
pub mod edit;
pub mod health;
pub mod install;
pub mod launchd;
pub mod ledger;
pub mod lint;
pub mod lock;
pub mod progress;
pub mod rss;
pub mod template;
