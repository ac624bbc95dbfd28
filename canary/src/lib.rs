//! The canary: minute-by-minute probes of a cathedral runtime over mTLS, wall-clock SLO
//! windows, the kill-switch policy, the durable probe store and the burn-in report.
//!
//! Owns: probing, judging windows, deciding when to engage the kill switch.
//! Must not: engage the kill switch more than once per breach streak, count a gap (sleep,
//! watcher down) as failures, or lose a recorded probe.

pub mod chart;
pub mod clock;
pub mod glyph;
pub mod policy;
pub mod probe;
pub mod report;
pub mod store;
pub mod switch;
pub mod watch;
pub mod window;
