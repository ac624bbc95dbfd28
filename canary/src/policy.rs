//! When to engage (and, if asked, release) the kill switch, from the sequence of window
//! verdicts. Pure: the watcher feeds it verdicts and recorded events, and it answers what to do.
use crate::window::{Verdict, WindowVerdict};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The kill-switch policy's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Consecutive breached windows that engage the kill switch.
    pub breaches_to_engage: usize,
    /// Release automatically after this many consecutive windows in which the runtime is
    /// otherwise healthy (text probes pass) while the switch this watcher engaged holds.
    /// `None` (the default): release is manual.
    pub auto_release_after: Option<usize>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            breaches_to_engage: 3,
            auto_release_after: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchAction {
    Engage,
    Release,
}

/// A kill-switch event as recorded in the store: attempted, and whether it took effect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KillSwitchEvent {
    pub at: DateTime<Utc>,
    pub action: SwitchAction,
    /// `admin <url>` or `file <path>`.
    pub via: String,
    /// Starts of the windows that caused it.
    pub windows: Vec<DateTime<Utc>>,
    pub reason: String,
    /// `None` when it took effect; otherwise why not (it is tried again next window).
    pub error: Option<String>,
}

impl KillSwitchEvent {
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }
}

/// What the policy asks for, with the windows behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: SwitchAction,
    pub windows: Vec<DateTime<Utc>>,
    pub reason: String,
}

/// The policy's state: rebuilt on restart by replaying the store's verdicts and events.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    config: PolicyConfig,
    /// The current run of consecutive breached windows (insufficient-data windows neither
    /// extend nor reset it), with the verdict summaries.
    streak: Vec<(DateTime<Utc>, String)>,
    /// This streak already engaged the switch: never engage twice for one streak.
    engaged_this_streak: bool,
    /// This watcher's engage holds (no release seen since).
    holding: bool,
    /// Consecutive healthy windows while holding (for auto-release).
    healthy_while_holding: Vec<DateTime<Utc>>,
}

impl Policy {
    pub fn new(config: PolicyConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    pub fn streak_len(&self) -> usize {
        self.streak.len()
    }

    pub fn holding(&self) -> bool {
        self.holding
    }

    /// Takes in the next judged window (in time order).
    pub fn observe(&mut self, w: &WindowVerdict) {
        match &w.verdict {
            Verdict::Breach { .. } => self.streak.push((w.start, w.verdict.to_string())),
            Verdict::Pass => {
                // Vision answered within the SLO: the streak is over, and so is any engage.
                self.streak.clear();
                self.engaged_this_streak = false;
            }
            Verdict::InsufficientData { .. } => {}
        }
        if self.holding {
            match &w.text_verdict {
                Verdict::Pass => self.healthy_while_holding.push(w.start),
                Verdict::Breach { .. } => self.healthy_while_holding.clear(),
                Verdict::InsufficientData { .. } => {}
            }
        }
    }

    /// Takes in a recorded kill-switch event (in time order with the verdicts).
    pub fn observe_event(&mut self, e: &KillSwitchEvent) {
        if !e.succeeded() {
            return;
        }
        match e.action {
            SwitchAction::Engage => {
                self.engaged_this_streak = true;
                self.holding = true;
                self.healthy_while_holding.clear();
            }
            SwitchAction::Release => {
                // A fresh start: breaches after a release form a new streak.
                self.holding = false;
                self.healthy_while_holding.clear();
                self.streak.clear();
                self.engaged_this_streak = false;
            }
        }
    }

    /// What to do now, if anything. Asking twice without recording the outcome gives the same
    /// answer; a recorded successful event makes it go away.
    pub fn decide(&self) -> Option<Decision> {
        let n = self.config.breaches_to_engage.max(1);
        if !self.engaged_this_streak && self.streak.len() >= n {
            let cause = &self.streak[self.streak.len() - n..];
            let reason = format!(
                "{n} consecutive breached vision windows: {}",
                cause
                    .iter()
                    .map(|(start, why)| format!("{} {why}", start.format("%Y-%m-%d %H:%M:%S")))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            return Some(Decision {
                action: SwitchAction::Engage,
                windows: cause.iter().map(|(s, _)| *s).collect(),
                reason,
            });
        }
        if let Some(m) = self.config.auto_release_after {
            if self.holding && self.healthy_while_holding.len() >= m.max(1) {
                let cause =
                    &self.healthy_while_holding[self.healthy_while_holding.len() - m.max(1)..];
                return Some(Decision {
                    action: SwitchAction::Release,
                    windows: cause.to_vec(),
                    reason: format!(
                        "{} consecutive windows with the runtime otherwise healthy",
                        cause.len()
                    ),
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{BreachReason, KindStats};

    fn window(i: i64, vision: &str, text: &str) -> WindowVerdict {
        let start = DateTime::from_timestamp(1_800_000_000 + i * 3600, 0).unwrap();
        let v = |s: &str| match s {
            "pass" => Verdict::Pass,
            "breach" => Verdict::Breach {
                reasons: vec![BreachReason::SuccessBelow {
                    ratio: 0.0,
                    target: 0.99,
                }],
            },
            _ => Verdict::InsufficientData {
                probes: 0,
                needed: 30,
            },
        };
        WindowVerdict {
            start,
            end: start + chrono::Duration::hours(1),
            vision: KindStats::default(),
            text: KindStats::default(),
            verdict: v(vision),
            text_verdict: v(text),
            judged_at: start + chrono::Duration::hours(1),
        }
    }

    fn event(d: &Decision) -> KillSwitchEvent {
        KillSwitchEvent {
            at: *d.windows.last().unwrap(),
            action: d.action,
            via: "file /tmp/ks".into(),
            windows: d.windows.clone(),
            reason: d.reason.clone(),
            error: None,
        }
    }

    /// Feeds verdicts, acting on every decision as the watcher would; returns the events.
    fn run(policy: &mut Policy, verdicts: &[(&str, &str)]) -> Vec<KillSwitchEvent> {
        let mut events = Vec::new();
        for (i, (v, t)) in verdicts.iter().enumerate() {
            policy.observe(&window(i as i64, v, t));
            if let Some(d) = policy.decide() {
                let e = event(&d);
                policy.observe_event(&e);
                events.push(e);
            }
        }
        events
    }

    #[test]
    fn three_breaches_engage_once_per_streak() {
        let mut p = Policy::new(PolicyConfig::default());
        let b = ("breach", "pass");
        let events = run(&mut p, &[b, b, b, b, b, b, b]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].action, SwitchAction::Engage);
        assert_eq!(events[0].windows.len(), 3);
        assert_eq!(events[0].windows[0], window(0, "", "").start);
        assert!(p.holding());
    }

    #[test]
    fn insufficient_data_neither_resets_nor_extends() {
        let mut p = Policy::new(PolicyConfig::default());
        let (b, i, ok) = (("breach", "pass"), ("none", "none"), ("pass", "pass"));
        assert!(run(&mut p, &[b, b, i, i]).is_empty());
        assert_eq!(p.streak_len(), 2);
        let events = run(&mut p, &[b]);
        assert_eq!(events.len(), 1, "the third breach across gaps engages");

        let mut p = Policy::new(PolicyConfig::default());
        assert!(
            run(&mut p, &[b, b, ok, b, b, i]).is_empty(),
            "a pass resets"
        );
    }

    #[test]
    fn a_new_streak_after_a_pass_may_engage_again() {
        let mut p = Policy::new(PolicyConfig::default());
        let (b, ok) = (("breach", "pass"), ("pass", "pass"));
        let events = run(&mut p, &[b, b, b, b, ok, b, b, b]);
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn failed_engage_is_retried_next_window() {
        let mut p = Policy::new(PolicyConfig::default());
        let b = window(0, "breach", "pass");
        for i in 0..3 {
            p.observe(&window(i, "breach", "pass"));
        }
        let d = p.decide().unwrap();
        let mut failed = event(&d);
        failed.error = Some("connection refused".into());
        p.observe_event(&failed);
        assert!(p.decide().is_some(), "not engaged: still wanted");
        p.observe(&b);
        let d = p.decide().unwrap();
        p.observe_event(&event(&d));
        assert!(p.decide().is_none());
    }

    #[test]
    fn release_is_manual_unless_asked() {
        let (b, dis) = (("breach", "pass"), ("breach", "pass"));
        let mut p = Policy::new(PolicyConfig::default());
        let events = run(&mut p, &[b, b, b, dis, dis, dis, dis, dis]);
        assert_eq!(events.len(), 1);

        let mut p = Policy::new(PolicyConfig {
            breaches_to_engage: 3,
            auto_release_after: Some(2),
        });
        let sick = ("breach", "breach");
        let events = run(&mut p, &[b, b, b, dis, sick, dis, dis, b, b]);
        let actions: Vec<_> = events.iter().map(|e| e.action).collect();
        assert_eq!(actions, [SwitchAction::Engage, SwitchAction::Release]);
        assert!(!p.holding());
        // After the release, a fresh streak of three is needed to engage again.
        let events = run(&mut p, &[b]);
        assert_eq!(events.len(), 1);
    }
}
