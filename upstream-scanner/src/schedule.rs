//! The daily run at a local wall-clock time. The next run is computed afresh from the
//! zone's rules each time, so DST changes and a change of the machine's zone are followed;
//! waiting is done in short slices against the wall clock, because a monotonic sleep does
//! not advance while a Mac sleeps.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Days, LocalResult, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::config::ScheduleConfig;
use crate::fsio::write_atomic;

/// Longest single wait before the wall clock and the zone are read again.
pub const WAKE_SLICE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyAt(pub NaiveTime);

impl DailyAt {
    /// The instant of `date` at the daily time in `tz`. A time inside a spring-forward gap
    /// moves forward by the gap (02:30 → 03:30); a time repeated by the autumn change takes
    /// its first occurrence, so the day still runs once.
    pub fn on(&self, date: NaiveDate, tz: Tz) -> DateTime<Utc> {
        let naive = date.and_time(self.0);
        match tz.from_local_datetime(&naive) {
            LocalResult::Single(t) => t.with_timezone(&Utc),
            LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
            LocalResult::None => {
                // The offset in force just before the gap, applied to the wall time,
                // lands the same distance past the gap's end.
                let before = tz.offset_from_utc_datetime(&(naive - chrono::Duration::hours(24)));
                let utc = naive
                    - chrono::Duration::seconds(i64::from(
                        chrono::Offset::fix(&before).local_minus_utc(),
                    ));
                Utc.from_utc_datetime(&utc)
            }
        }
    }

    /// The first scheduled instant strictly after `now`.
    pub fn next_after(&self, now: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        let today = now.with_timezone(&tz).date_naive();
        let mut date = today;
        loop {
            let t = self.on(date, tz);
            if t > now {
                return t;
            }
            date = date + Days::new(1);
        }
    }

    /// The last scheduled instant at or before `now`.
    pub fn latest_at_or_before(&self, now: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        let today = now.with_timezone(&tz).date_naive();
        let mut date = today;
        loop {
            let t = self.on(date, tz);
            if t <= now {
                return t;
            }
            date = date - Days::new(1);
        }
    }

    /// Due when the last run happened before the latest scheduled instant: the daily run
    /// itself, and after any number of missed days exactly one catch-up run.
    pub fn is_due(&self, last_run: Option<DateTime<Utc>>, now: DateTime<Utc>, tz: Tz) -> bool {
        match last_run {
            None => true,
            Some(last) => last < self.latest_at_or_before(now, tz),
        }
    }
}

/// One look at the clock: run now or not, and how long to wait before looking again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub run_now: bool,
    pub next_run: DateTime<Utc>,
    pub wait: Duration,
}

pub fn step(at: DailyAt, last_run: Option<DateTime<Utc>>, now: DateTime<Utc>, tz: Tz) -> Step {
    let run_now = at.is_due(last_run, now, tz);
    let next_run = at.next_after(now, tz);
    let until = (next_run - now).to_std().unwrap_or_default();
    Step {
        run_now,
        next_run,
        wait: until.clamp(Duration::from_secs(1), WAKE_SLICE),
    }
}

/// Where the zone came from, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneSource {
    Config,
    TzVariable,
    System,
    /// Nothing usable: UTC.
    Fallback,
}

/// The zone for the schedule: the config's, else `TZ`, else the system's, else UTC.
pub fn local_zone(config: &ScheduleConfig) -> (Tz, ZoneSource) {
    if let Some(tz) = config.time_zone.as_deref().and_then(|z| z.parse().ok()) {
        return (tz, ZoneSource::Config);
    }
    if let Some(tz) = std::env::var("TZ")
        .ok()
        .as_deref()
        .and_then(parse_tz_variable)
    {
        return (tz, ZoneSource::TzVariable);
    }
    if let Some(tz) = iana_time_zone::get_timezone()
        .ok()
        .and_then(|z| z.parse().ok())
    {
        return (tz, ZoneSource::System);
    }
    (Tz::UTC, ZoneSource::Fallback)
}

/// `TZ` as an IANA name: `Europe/Berlin`, `:Europe/Berlin` or a zoneinfo path.
pub fn parse_tz_variable(value: &str) -> Option<Tz> {
    let v = value.trim().trim_start_matches(':');
    let name = v.rsplit_once("zoneinfo/").map(|(_, n)| n).unwrap_or(v);
    name.parse().ok()
}

/// When the last scan ran, kept across restarts so a stopped process catches up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    pub last_run: Option<DateTime<Utc>>,
}

pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join("last-run.json")
}

impl RunState {
    pub fn load(state_dir: &Path) -> Self {
        std::fs::read(state_path(state_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("run state serialises");
        write_atomic(&state_path(state_dir), &bytes)
    }
}

/// The daemon: runs `job` whenever [`step`] says so, for ever. The run is recorded
/// whether it succeeded or not: a failing scan waits for the next day instead of
/// retrying in a loop (its error is logged).
pub async fn run_daemon<F, Fut, E>(config: &ScheduleConfig, state_dir: &Path, mut job: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let at = DailyAt(config.at);
    let mut logged_next = None;
    loop {
        let (tz, source) = local_zone(config);
        let now = Utc::now();
        let state = RunState::load(state_dir);
        let s = step(at, state.last_run, now, tz);
        if s.run_now {
            tracing::info!(zone = %tz, ?source, last_run = ?state.last_run, "upstream scan due");
            if let Err(e) = job().await {
                tracing::error!(error = %e, "upstream scan failed");
            }
            let done = RunState {
                last_run: Some(now.max(RunState::load(state_dir).last_run.unwrap_or(now))),
            };
            if let Err(e) = done.save(state_dir) {
                tracing::error!(error = %e, "cannot record the run");
            }
            continue;
        }
        if logged_next != Some(s.next_run) {
            tracing::info!(
                next = %s.next_run.with_timezone(&tz).format("%Y-%m-%d %H:%M %Z"),
                "next upstream scan"
            );
            logged_next = Some(s.next_run);
        }
        tokio::time::sleep(s.wait).await;
    }
}
