//! The daily 09:07 across DST changes, odd local times, and catch-up after missed days.

use std::time::Duration;

use cathedral_upstream_scanner::config::ScheduleConfig;
use cathedral_upstream_scanner::schedule::{
    self, parse_tz_variable, step, DailyAt, RunState, WAKE_SLICE,
};
use chrono::{DateTime, NaiveDate, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

fn at(h: u32, m: u32) -> DailyAt {
    DailyAt(NaiveTime::from_hms_opt(h, m, 0).unwrap())
}

fn local(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    tz.with_ymd_and_hms(y, mo, d, h, mi, 0)
        .earliest()
        .unwrap()
        .with_timezone(&Utc)
}

/// Walks ten consecutive runs starting a few days before `change` and checks each is at
/// 09:07 local on consecutive days; returns the UTC gaps between runs in hours.
fn walk(tz: Tz, change: NaiveDate) -> Vec<i64> {
    let daily = at(9, 7);
    let start = local(
        tz,
        change.year_ce().1 as i32,
        change.month0() + 1,
        change.day0() + 1,
        12,
        0,
    ) - chrono::Duration::days(4);
    let mut now = start;
    let mut prev: Option<DateTime<Utc>> = None;
    let mut gaps = Vec::new();
    for _ in 0..10 {
        let next = daily.next_after(now, tz);
        let l = next.with_timezone(&tz);
        assert_eq!((l.hour(), l.minute(), l.second()), (9, 7, 0), "{tz}: {l}");
        if let Some(p) = prev {
            let pl = p.with_timezone(&tz).date_naive();
            assert_eq!(
                l.date_naive(),
                pl.succ_opt().unwrap(),
                "{tz}: one run a day"
            );
            gaps.push((next - p).num_minutes());
        }
        prev = Some(next);
        // Just after the run, as the daemon would look again.
        now = next + chrono::Duration::seconds(1);
    }
    gaps
}

use chrono::Datelike;

#[test]
fn los_angeles_spring_and_autumn_land_on_0907() {
    let tz: Tz = "America/Los_Angeles".parse().unwrap();
    let spring = walk(tz, NaiveDate::from_ymd_opt(2026, 3, 8).unwrap());
    assert!(
        spring.contains(&(23 * 60)),
        "the spring-forward day is 23 h: {spring:?}"
    );
    assert!(spring.iter().all(|m| *m == 24 * 60 || *m == 23 * 60));
    let autumn = walk(tz, NaiveDate::from_ymd_opt(2026, 11, 1).unwrap());
    assert!(
        autumn.contains(&(25 * 60)),
        "the fall-back day is 25 h: {autumn:?}"
    );
    assert!(autumn.iter().all(|m| *m == 24 * 60 || *m == 25 * 60));
}

#[test]
fn berlin_spring_and_autumn_land_on_0907() {
    let tz: Tz = "Europe/Berlin".parse().unwrap();
    let spring = walk(tz, NaiveDate::from_ymd_opt(2026, 3, 29).unwrap());
    assert!(spring.contains(&(23 * 60)), "{spring:?}");
    let autumn = walk(tz, NaiveDate::from_ymd_opt(2026, 10, 25).unwrap());
    assert!(autumn.contains(&(25 * 60)), "{autumn:?}");
}

#[test]
fn the_utc_offset_is_not_frozen() {
    // A schedule made in winter still runs at 09:07 local in summer: 08:07 UTC in Berlin
    // winter, 07:07 UTC in summer.
    let tz: Tz = "Europe/Berlin".parse().unwrap();
    let winter = at(9, 7).next_after(Utc.with_ymd_and_hms(2026, 1, 15, 0, 0, 0).unwrap(), tz);
    let summer = at(9, 7).next_after(Utc.with_ymd_and_hms(2026, 7, 15, 0, 0, 0).unwrap(), tz);
    assert_eq!(winter, Utc.with_ymd_and_hms(2026, 1, 15, 8, 7, 0).unwrap());
    assert_eq!(summer, Utc.with_ymd_and_hms(2026, 7, 15, 7, 7, 0).unwrap());
}

#[test]
fn nonexistent_local_time_moves_past_the_gap() {
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    let t = at(2, 30).on(NaiveDate::from_ymd_opt(2026, 3, 29).unwrap(), berlin);
    let l = t.with_timezone(&berlin);
    assert_eq!((l.hour(), l.minute()), (3, 30), "{l}");
    assert_eq!(t, Utc.with_ymd_and_hms(2026, 3, 29, 1, 30, 0).unwrap());

    let la: Tz = "America/Los_Angeles".parse().unwrap();
    let t = at(2, 30).on(NaiveDate::from_ymd_opt(2026, 3, 8).unwrap(), la);
    let l = t.with_timezone(&la);
    assert_eq!((l.hour(), l.minute()), (3, 30), "{l}");
}

#[test]
fn ambiguous_local_time_runs_once_at_its_first_occurrence() {
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    let day = NaiveDate::from_ymd_opt(2026, 10, 25).unwrap();
    let first = at(2, 30).on(day, berlin);
    // 02:30 CEST = 00:30 UTC; 02:30 CET (the repeat) = 01:30 UTC.
    assert_eq!(first, Utc.with_ymd_and_hms(2026, 10, 25, 0, 30, 0).unwrap());
    let after = at(2, 30).next_after(first + chrono::Duration::seconds(1), berlin);
    assert_eq!(
        after.with_timezone(&berlin).date_naive(),
        day.succ_opt().unwrap(),
        "the repeated hour does not run the day twice"
    );
    // Nor is it due again during the repeated hour.
    let in_repeat = Utc.with_ymd_and_hms(2026, 10, 25, 1, 45, 0).unwrap();
    assert!(!at(2, 30).is_due(Some(first), in_repeat, berlin));
}

/// Drives [`step`] the way the daemon does, with a simulated clock, and returns the
/// instants at which it ran.
fn simulate(
    daily: DailyAt,
    tz: Tz,
    mut last_run: Option<DateTime<Utc>>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Vec<DateTime<Utc>> {
    let mut runs = Vec::new();
    let mut now = start;
    let mut looks = 0;
    while now < end {
        looks += 1;
        assert!(looks < 100_000, "bounded");
        let s = step(daily, last_run, now, tz);
        assert!(s.wait <= WAKE_SLICE && s.wait >= Duration::from_secs(1));
        if s.run_now {
            runs.push(now);
            last_run = Some(now);
            // A scan takes a little while.
            now += chrono::Duration::seconds(20);
            continue;
        }
        now += chrono::Duration::from_std(s.wait).unwrap();
    }
    runs
}

#[test]
fn missed_days_trigger_exactly_one_catch_up() {
    let tz: Tz = "Europe/Berlin".parse().unwrap();
    let daily = at(9, 7);
    // Last ran Monday 09:07; the machine was off until Wednesday 12:00.
    let monday = local(tz, 2026, 3, 23, 9, 7);
    let wednesday_noon = local(tz, 2026, 3, 25, 12, 0);
    let friday_10 = local(tz, 2026, 3, 27, 10, 0);
    let runs = simulate(daily, tz, Some(monday), wednesday_noon, friday_10);
    assert_eq!(
        runs,
        vec![
            wednesday_noon,
            local(tz, 2026, 3, 26, 9, 7),
            local(tz, 2026, 3, 27, 9, 7)
        ],
        "one catch-up for Tuesday and Wednesday together, then the regular runs"
    );
}

#[test]
fn start_before_0907_after_a_missed_day_catches_up_and_still_runs_at_0907() {
    let tz: Tz = "America/Los_Angeles".parse().unwrap();
    let daily = at(9, 7);
    let last = local(tz, 2026, 3, 6, 9, 7); // Friday
    let start = local(tz, 2026, 3, 8, 6, 0); // Sunday (spring forward) 06:00, Saturday missed
    let end = local(tz, 2026, 3, 8, 23, 0);
    let runs = simulate(daily, tz, Some(last), start, end);
    assert_eq!(runs, vec![start, local(tz, 2026, 3, 8, 9, 7)]);
}

#[test]
fn nothing_missed_means_no_catch_up() {
    let tz: Tz = "Europe/Berlin".parse().unwrap();
    let daily = at(9, 7);
    let last = local(tz, 2026, 10, 24, 9, 7);
    let start = local(tz, 2026, 10, 24, 18, 0);
    let end = local(tz, 2026, 10, 26, 8, 0);
    let runs = simulate(daily, tz, Some(last), start, end);
    // Only Sunday's run (the autumn change day), at 09:07 local.
    assert_eq!(runs, vec![local(tz, 2026, 10, 25, 9, 7)]);
}

#[test]
fn tz_variable_forms() {
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    assert_eq!(parse_tz_variable("Europe/Berlin"), Some(berlin));
    assert_eq!(parse_tz_variable(":Europe/Berlin"), Some(berlin));
    assert_eq!(
        parse_tz_variable("/usr/share/zoneinfo/Europe/Berlin"),
        Some(berlin)
    );
    assert_eq!(parse_tz_variable("Not/AZone"), None);
}

#[tokio::test]
async fn daemon_runs_one_catch_up_at_start_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let tz: Tz = "Europe/Berlin".parse().unwrap();
    // The daily time is twelve hours away, so within this test only a catch-up can run.
    let now_local = Utc::now().with_timezone(&tz);
    let far = NaiveTime::from_hms_opt((now_local.hour() + 12) % 24, now_local.minute(), 0).unwrap();
    let config = ScheduleConfig {
        at: far,
        time_zone: Some("Europe/Berlin".into()),
    };
    let three_days_ago = Utc::now() - chrono::Duration::days(3);
    RunState {
        last_run: Some(three_days_ago),
    }
    .save(dir.path())
    .unwrap();

    let runs = std::sync::atomic::AtomicU32::new(0);
    let daemon = schedule::run_daemon(&config, dir.path(), || {
        runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok::<(), String>(()) }
    });
    // The daemon never returns; give it time to catch up and settle into waiting.
    let _ = tokio::time::timeout(Duration::from_millis(1500), daemon).await;
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    let recorded = RunState::load(dir.path()).last_run.unwrap();
    assert!(recorded > three_days_ago + chrono::Duration::days(2));
}
