//! The watcher: ticks, probes, records, judges finished windows and applies the policy.
//!
//! [`Watcher`] is the synchronous core; every method takes "now" from its caller, so tests
//! drive it with a manual clock. [`run`] is the async loop around it.
use crate::clock::Clock;
use crate::policy::{Decision, KillSwitchEvent, Policy, PolicyConfig};
use crate::probe::{ProbeKind, ProbeOutcome, Prober};
use crate::store::{GapRecord, Record, StartRecord, Store, StoreError};
use crate::switch::{notify, SwitchTarget};
use crate::window::{judge_window, Slo, WindowSpec, WindowVerdict};
use chrono::{DateTime, Utc};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::MissedTickBehavior;

/// The watcher's settings.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub target: String,
    pub interval: Duration,
    pub window: WindowSpec,
    pub slo: Slo,
    pub policy: PolicyConfig,
    /// Also send a text probe each tick (the kill switch must leave text alone).
    pub text_probe: bool,
    /// A pause between ticks longer than this is recorded as a gap.
    pub gap_after: Duration,
    pub notify: Option<String>,
    /// Stop after this long (tests, bounded runs); `None` runs until told to stop.
    pub run_for: Option<Duration>,
}

impl WatchConfig {
    /// Gap threshold for an interval: a tick comes at most one interval after the previous
    /// one's work ended, so two intervals of silence mean the watcher did not run.
    pub fn default_gap_after(interval: Duration) -> Duration {
        interval * 2 + Duration::from_millis(500)
    }
}

/// Windows further back than this many lengths are not judged after a long outage.
const MAX_CATCH_UP_WINDOWS: i32 = 1000;

/// The watcher's state over its store.
#[derive(Debug)]
pub struct Watcher {
    store: Store,
    config: WatchConfig,
    policy: Policy,
    /// End of the latest judged window: windows before it are final.
    judged_until: Option<DateTime<Utc>>,
    /// Last moment the watcher is known to have been running.
    last_alive: Option<DateTime<Utc>>,
}

impl Watcher {
    /// Rebuilds the state from the store: judged windows, the policy's streak, kill-switch events.
    pub fn new(store: Store, config: WatchConfig) -> Self {
        let mut policy = Policy::new(config.policy);
        let mut judged_until = None;
        let mut last_alive: Option<DateTime<Utc>> = None;
        for record in store.records() {
            let seen = match record {
                Record::Start(s) => s.at,
                Record::Probe(p) => {
                    p.at + chrono::Duration::from_std(p.latency).unwrap_or_default()
                }
                Record::Gap(g) => g.to,
                Record::Verdict(w) => {
                    policy.observe(w);
                    judged_until = judged_until.max(Some(w.end));
                    w.judged_at
                }
                Record::KillSwitch(e) => {
                    policy.observe_event(e);
                    e.at
                }
            };
            last_alive = last_alive.max(Some(seen));
        }
        Self {
            store,
            config,
            policy,
            judged_until,
            last_alive,
        }
    }

    pub fn config(&self) -> &WatchConfig {
        &self.config
    }

    pub fn records(&self) -> &[Record] {
        self.store.records()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Records the start; a previous run that ended longer ago than the gap threshold left a gap.
    pub fn start(&mut self, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.note_gap(now)?;
        self.store.append(Record::Start(StartRecord {
            at: now,
            target: self.config.target.clone(),
            interval_ms: self.config.interval.as_millis() as u64,
            window_ms: self.config.window.length().as_millis() as u64,
            pid: std::process::id(),
        }))?;
        self.last_alive = Some(now);
        Ok(())
    }

    /// Called as a tick begins: records a gap if the watcher has not run for a while.
    pub fn tick(&mut self, now: DateTime<Utc>) -> Result<Option<GapRecord>, StoreError> {
        let gap = self.note_gap(now)?;
        self.last_alive = Some(now);
        Ok(gap)
    }

    fn note_gap(&mut self, now: DateTime<Utc>) -> Result<Option<GapRecord>, StoreError> {
        let Some(from) = self.last_alive else {
            return Ok(None);
        };
        let silent = (now - from).to_std().unwrap_or_default();
        if silent <= self.config.gap_after {
            return Ok(None);
        }
        let gap = GapRecord { from, to: now };
        tracing::warn!(from = %from, to = %now, "the watcher did not run for {:?}: recorded as a gap", silent);
        self.store.append(Record::Gap(gap.clone()))?;
        Ok(Some(gap))
    }

    /// Records a probe (durably, before anything acts on it).
    pub fn record_probe(&mut self, outcome: ProbeOutcome) -> Result<(), StoreError> {
        let done = outcome.at + chrono::Duration::from_std(outcome.latency).unwrap_or_default();
        self.last_alive = self.last_alive.max(Some(done));
        self.store.append(Record::Probe(outcome))
    }

    /// Records a probe sent by this watcher, unless the watcher itself was suspended while it
    /// was in flight: a probe whose latency exceeds its own timeout by more than the gap
    /// threshold measured the suspension (SIGSTOP, sleep), not the runtime, and is recorded
    /// as a gap. Returns whether it was recorded as a probe.
    pub fn record_tick_probe(
        &mut self,
        outcome: ProbeOutcome,
        probe_timeout: Duration,
    ) -> Result<bool, StoreError> {
        if outcome.latency > probe_timeout + self.config.gap_after {
            let to = outcome.at + chrono::Duration::from_std(outcome.latency).unwrap_or_default();
            tracing::warn!(kind = %outcome.kind, latency = ?outcome.latency, "the watcher was suspended during a probe: recorded as a gap");
            self.store.append(Record::Gap(GapRecord {
                from: outcome.at,
                to,
            }))?;
            self.last_alive = self.last_alive.max(Some(to));
            return Ok(false);
        }
        self.record_probe(outcome)?;
        Ok(true)
    }

    /// Marks the watcher alive (end of a tick's work).
    pub fn alive(&mut self, now: DateTime<Utc>) {
        self.last_alive = self.last_alive.max(Some(now));
    }

    /// Judges, records and feeds to the policy every window that ended by `now` and has not
    /// been judged. The first window judged is the one of the earliest unjudged probe.
    pub fn judge_due(&mut self, now: DateTime<Utc>) -> Result<Vec<WindowVerdict>, StoreError> {
        let spec = self.config.window;
        let earliest_allowed = spec.start_of(now)
            - chrono::Duration::from_std(spec.length()).unwrap_or_default() * MAX_CATCH_UP_WINDOWS;
        let mut next = match self.judged_until {
            // The first boundary at or after the last judged window (a restart may have
            // changed the window length).
            Some(end) if spec.start_of(end) == end => end,
            Some(end) => spec.end_of(spec.start_of(end)),
            None => match self.probes().map(|p| p.at).min() {
                Some(first) => spec.start_of(first),
                None => return Ok(Vec::new()),
            },
        };
        next = next.max(earliest_allowed);
        let mut judged = Vec::new();
        while spec.end_of(next) <= now {
            let end = spec.end_of(next);
            let verdict = judge_window(next, end, &self.config.slo, self.probes(), now);
            self.store.append(Record::Verdict(verdict.clone()))?;
            self.policy.observe(&verdict);
            self.judged_until = Some(end);
            judged.push(verdict);
            next = end;
        }
        Ok(judged)
    }

    fn probes(&self) -> impl Iterator<Item = &ProbeOutcome> {
        self.store.records().iter().filter_map(|r| match r {
            Record::Probe(p) => Some(p),
            _ => None,
        })
    }

    /// What the kill-switch policy asks for now.
    pub fn decide(&self) -> Option<Decision> {
        self.policy.decide()
    }

    /// Records a kill-switch event (attempted or done).
    pub fn record_event(&mut self, event: KillSwitchEvent) -> Result<(), StoreError> {
        self.store.append(Record::KillSwitch(event.clone()))?;
        self.policy.observe_event(&event);
        Ok(())
    }
}

/// Runs the watcher until `shutdown` resolves or `run_for` elapses.
pub async fn run(
    mut watcher: Watcher,
    prober: Prober,
    switch: SwitchTarget,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StoreError> {
    let config = watcher.config().clone();
    watcher.start(clock.now())?;
    tracing::info!(
        target = %config.target,
        interval = ?config.interval,
        window = ?config.window.length(),
        switch = %switch.describe(),
        "canary watching"
    );
    // A verdict recorded just before a crash may still owe its engage.
    act(&mut watcher, &switch, &config).await?;

    let mut ticks = tokio::time::interval(config.interval);
    // After a sleep or a stop, tick once and go on, rather than bursting the missed ticks.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let deadline = config.run_for.map(|d| tokio::time::Instant::now() + d);
    tokio::pin!(shutdown);
    loop {
        let until = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            _ = until => break,
            _ = ticks.tick() => {}
        }
        watcher.tick(clock.now())?;
        let timeout = prober.spec().timeout;
        let vision = prober.probe(ProbeKind::Vision).await;
        log_probe(&vision);
        watcher.record_tick_probe(vision, timeout)?;
        if config.text_probe {
            let text = prober.probe(ProbeKind::Text).await;
            log_probe(&text);
            watcher.record_tick_probe(text, timeout)?;
        }
        let verdicts = watcher.judge_due(clock.now())?;
        for v in &verdicts {
            tracing::info!(
                window = %v.start,
                probes = v.vision.probes,
                successes = v.vision.successes,
                p95_ms = ?v.vision.p95_ms,
                "window {}",
                v.verdict
            );
        }
        if !verdicts.is_empty() {
            act(&mut watcher, &switch, &config).await?;
        }
        watcher.alive(clock.now());
    }
    tracing::info!("canary stopped");
    Ok(())
}

/// Carries out what the policy asks (at most one attempt per call), records it, notifies.
async fn act(
    watcher: &mut Watcher,
    switch: &SwitchTarget,
    config: &WatchConfig,
) -> Result<(), StoreError> {
    let Some(decision) = watcher.decide() else {
        return Ok(());
    };
    let event = switch.apply(&decision).await;
    match &event.error {
        None => {
            tracing::warn!(action = ?event.action, via = %event.via, "kill switch: {}", event.reason)
        }
        Some(e) => {
            tracing::error!(action = ?event.action, via = %event.via, "kill switch action failed (retried next window): {e}")
        }
    }
    watcher.record_event(event.clone())?;
    if let Some(cmd) = &config.notify {
        notify(cmd, &event, Duration::from_secs(30)).await;
    }
    Ok(())
}

fn log_probe(p: &ProbeOutcome) {
    match &p.error_class {
        None => tracing::debug!(kind = %p.kind, latency = ?p.latency, "probe ok"),
        Some(class) => tracing::info!(
            kind = %p.kind,
            latency = ?p.latency,
            %class,
            error = p.error.as_deref().unwrap_or(""),
            "probe failed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::policy::SwitchAction;
    use crate::probe::ErrorClass;
    use crate::window::Verdict;

    fn config() -> WatchConfig {
        let interval = Duration::from_secs(1);
        let window = Duration::from_secs(10);
        WatchConfig {
            target: "https://127.0.0.1:1".into(),
            interval,
            window: WindowSpec::new(window).unwrap(),
            slo: Slo {
                success_target: 0.99,
                p95_limit: Duration::from_secs(10),
                min_probes: Slo::min_probes_for(window, interval, 0.5),
            },
            policy: PolicyConfig::default(),
            text_probe: true,
            gap_after: WatchConfig::default_gap_after(interval),
            notify: None,
            run_for: None,
        }
    }

    fn outcome(kind: ProbeKind, at: DateTime<Utc>, ok: bool) -> ProbeOutcome {
        ProbeOutcome {
            kind,
            at,
            status: Some(if ok { 200 } else { 503 }),
            latency: Duration::from_millis(20),
            error_class: (!ok).then_some(ErrorClass::HttpStatus(503)),
            error: (!ok).then(|| "vision_pipeline_not_yet_wired: off".into()),
            usage: None,
            answer: ok.then(|| "red".into()),
        }
    }

    /// One simulated tick: vision (ok or not) and a healthy text probe, then judging.
    fn tick(w: &mut Watcher, clock: &ManualClock, vision_ok: bool) -> Vec<WindowVerdict> {
        let now = clock.now();
        w.tick(now).unwrap();
        w.record_probe(outcome(ProbeKind::Vision, now, vision_ok))
            .unwrap();
        w.record_probe(outcome(ProbeKind::Text, now, true)).unwrap();
        clock.advance(Duration::from_millis(50));
        let v = w.judge_due(clock.now()).unwrap();
        if let Some(d) = w.decide() {
            w.record_event(KillSwitchEvent {
                at: clock.now(),
                action: d.action,
                via: "test".into(),
                windows: d.windows,
                reason: d.reason,
                error: None,
            })
            .unwrap();
        }
        w.alive(clock.now());
        clock.advance(Duration::from_millis(950));
        v
    }

    fn t0() -> DateTime<Utc> {
        "2026-11-26T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn breaches_engage_once_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(t0());
        let mut w = Watcher::new(Store::open(dir.path()).unwrap(), config());
        w.start(clock.now()).unwrap();
        let mut verdicts = Vec::new();
        for _ in 0..25 {
            verdicts.extend(tick(&mut w, &clock, false));
        }
        assert_eq!(verdicts.len(), 2);
        assert!(verdicts.iter().all(|v| v.verdict.is_breach()));
        drop(w);
        // Restart: the streak of two is rebuilt from the store; the third breach engages.
        let mut w = Watcher::new(Store::open(dir.path()).unwrap(), config());
        assert_eq!(w.policy().streak_len(), 2);
        w.start(clock.now()).unwrap();
        for _ in 0..30 {
            tick(&mut w, &clock, false);
        }
        let events: Vec<_> = w
            .records()
            .iter()
            .filter_map(|r| match r {
                Record::KillSwitch(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(events.len(), 1, "one engage per streak");
        assert_eq!(events[0].action, SwitchAction::Engage);
        assert_eq!(
            events[0].windows,
            vec![
                t0(),
                "2026-11-26T12:00:10Z".parse().unwrap(),
                "2026-11-26T12:00:20Z".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_pause_is_a_gap_and_insufficient_data_not_a_breach() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(t0());
        let mut w = Watcher::new(Store::open(dir.path()).unwrap(), config());
        w.start(clock.now()).unwrap();
        let mut verdicts = Vec::new();
        for _ in 0..12 {
            verdicts.extend(tick(&mut w, &clock, true));
        }
        // Suspended for 25 s: windows 12:00:10 (2 probes), 12:00:20 (none) and 12:00:30
        // (3 probes) lack data.
        clock.advance(Duration::from_secs(25));
        for _ in 0..20 {
            verdicts.extend(tick(&mut w, &clock, true));
        }
        let gaps = w
            .records()
            .iter()
            .filter(|r| matches!(r, Record::Gap(_)))
            .count();
        assert_eq!(gaps, 1);
        let labels: Vec<_> = verdicts.iter().map(|v| v.verdict.label()).collect();
        assert_eq!(
            labels,
            [
                "pass",
                "insufficient data",
                "insufficient data",
                "insufficient data",
                "pass"
            ]
        );
        assert!(!verdicts.iter().any(|v| v.verdict.is_breach()));
        assert!(matches!(
            verdicts[2].verdict,
            Verdict::InsufficientData {
                probes: 0,
                needed: 5
            }
        ));
    }

    #[test]
    fn a_probe_spanning_a_suspension_is_a_gap_not_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(t0());
        let mut w = Watcher::new(Store::open(dir.path()).unwrap(), config());
        w.start(clock.now()).unwrap();
        let mut slow = outcome(ProbeKind::Vision, clock.now(), false);
        slow.error_class = Some(ErrorClass::Timeout);
        slow.latency = Duration::from_secs(30);
        assert!(!w.record_tick_probe(slow, Duration::from_secs(10)).unwrap());
        let mut timed_out = outcome(ProbeKind::Vision, clock.now(), false);
        timed_out.latency = Duration::from_secs(10);
        assert!(w
            .record_tick_probe(timed_out, Duration::from_secs(10))
            .unwrap());
        let kinds: Vec<_> = w
            .records()
            .iter()
            .map(|r| match r {
                Record::Start(_) => "start",
                Record::Gap(_) => "gap",
                Record::Probe(_) => "probe",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["start", "gap", "probe"]);
    }

    #[test]
    fn a_restart_mid_window_counts_both_halves() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(t0());
        {
            let mut w = Watcher::new(Store::open(dir.path()).unwrap(), config());
            w.start(clock.now()).unwrap();
            for _ in 0..14 {
                tick(&mut w, &clock, true);
            }
        }
        let mut w = Watcher::new(Store::open(dir.path()).unwrap(), config());
        w.start(clock.now()).unwrap();
        let mut verdicts = Vec::new();
        for _ in 0..8 {
            verdicts.extend(tick(&mut w, &clock, true));
        }
        assert_eq!(verdicts.len(), 1);
        assert_eq!(
            verdicts[0].start,
            "2026-11-26T12:00:10Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(
            verdicts[0].vision.probes, 10,
            "4 before the restart, 6 after"
        );
        assert!(verdicts[0].verdict.is_pass());
    }
}
