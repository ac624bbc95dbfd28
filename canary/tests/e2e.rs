//! The canary against the real runtime on the tiny checkpoint, with time compressed:
//! interval 1 s, window 10 s (minimum 5 vision probes for a verdict).
mod support;

use cathedral_canary::clock::SystemClock;
use cathedral_canary::policy::{KillSwitchEvent, PolicyConfig, SwitchAction};
use cathedral_canary::probe::{error_code, ErrorClass, ProbeKind, ProbeOutcome, ProbeSpec, Prober};
use cathedral_canary::store::{Record, Store};
use cathedral_canary::switch::SwitchTarget;
use cathedral_canary::watch::{run, WatchConfig, Watcher};
use cathedral_canary::window::{percentile, Slo, Verdict, WindowSpec, WindowVerdict};
use chrono::{DateTime, Utc};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::*;

const INTERVAL: Duration = Duration::from_secs(1);
const WINDOW: Duration = Duration::from_secs(10);

fn config(target: &str, run_for: Duration, notify: Option<String>) -> WatchConfig {
    WatchConfig {
        target: target.to_owned(),
        interval: INTERVAL,
        window: WindowSpec::new(WINDOW).unwrap(),
        slo: Slo {
            success_target: 0.99,
            p95_limit: Duration::from_secs(10),
            min_probes: Slo::min_probes_for(WINDOW, INTERVAL, 0.5),
        },
        policy: PolicyConfig::default(),
        text_probe: true,
        gap_after: WatchConfig::default_gap_after(INTERVAL),
        notify,
        run_for: Some(run_for),
    }
}

fn prober(target: &str) -> Prober {
    Prober::mtls(target, &Certs::get().tls(), ProbeSpec::default()).expect("prober")
}

/// The watcher in this process, for `run_for`.
fn watch_here(state: &Path, config: WatchConfig, switch: SwitchTarget) {
    let watcher = Watcher::new(Store::open(state).expect("open store"), config.clone());
    let prober = prober(&config.target);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(run(
            watcher,
            prober,
            switch,
            Arc::new(SystemClock),
            std::future::pending(),
        ))
        .expect("watcher run");
}

fn admin_switch(target: &str) -> SwitchTarget {
    SwitchTarget::Admin {
        client: cathedral_runtime::client::mtls_client(
            &Certs::get().tls(),
            Duration::from_secs(30),
        )
        .unwrap(),
        base: target.to_owned(),
    }
}

fn verdicts(records: &[Record]) -> Vec<&WindowVerdict> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Verdict(v) => Some(v),
            _ => None,
        })
        .collect()
}

fn probes(records: &[Record]) -> Vec<&ProbeOutcome> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Probe(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn events(records: &[Record]) -> Vec<&KillSwitchEvent> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::KillSwitch(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn vision_in(records: &[Record], start: DateTime<Utc>) -> Vec<&ProbeOutcome> {
    let end = start + chrono::Duration::from_std(WINDOW).unwrap();
    probes(records)
        .into_iter()
        .filter(|p| p.kind == ProbeKind::Vision && p.at >= start && p.at < end)
        .collect()
}

fn probe_once(target: &str, kind: ProbeKind) -> ProbeOutcome {
    let prober = prober(target);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(prober.probe(kind))
}

#[test]
fn healthy_runtime_passes_without_kill_switch() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("kill-switch.json"), true);
    let state = dir.path().join("state");
    align(WINDOW, Duration::from_millis(200));
    watch_here(
        &state,
        config(&server.target(), Duration::from_secs(21), None),
        admin_switch(&server.target()),
    );
    let records = records(&state);
    let judged = verdicts(&records);
    assert_eq!(judged.len(), 2, "{judged:#?}");
    for v in &judged {
        assert_eq!(v.verdict, Verdict::Pass, "{v:#?}\n{}", server.log());
        assert!(v.vision.probes >= 5, "{v:#?}");
        assert_eq!(v.vision.successes, v.vision.probes);
        assert!(v.text_verdict.is_pass());
    }
    let p = probes(&records);
    assert!(p.iter().all(|p| p.status == Some(200) && p.usage.is_some()));
    assert!(events(&records).is_empty());
    assert!(!server.kill_switch.exists());
}

#[test]
fn gated_vision_breaches_engages_the_kill_switch_once_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let kill_switch = dir.path().join("kill-switch.json");
    // Without --vision-enabled every image request is refused with 503.
    let server = Server::start(&kill_switch, false);
    let state = dir.path().join("state");
    let notified = dir.path().join("notified");
    let notify = format!(
        "echo \"$CATHEDRAL_CANARY_ACTION $CATHEDRAL_CANARY_OK\" >> '{}'",
        notified.display()
    );
    align(WINDOW, Duration::from_millis(200));
    watch_here(
        &state,
        config(&server.target(), Duration::from_secs(41), Some(notify)),
        admin_switch(&server.target()),
    );
    let records = records(&state);
    let judged = verdicts(&records);
    assert_eq!(judged.len(), 4, "{judged:#?}");
    assert!(judged.iter().all(|v| v.verdict.is_breach()), "{judged:#?}");
    assert!(
        judged.iter().all(|v| v.text_verdict.is_pass()),
        "text is untouched"
    );
    let vision = probes(&records)
        .into_iter()
        .filter(|p| p.kind == ProbeKind::Vision)
        .collect::<Vec<_>>();
    assert!(vision.iter().all(|p| {
        p.error_class == Some(ErrorClass::HttpStatus(503))
            && error_code(p.error.as_deref().unwrap_or("")) == "vision_pipeline_not_yet_wired"
    }));

    let events = events(&records);
    assert_eq!(events.len(), 1, "engaged exactly once: {events:#?}");
    let engage = events[0];
    assert_eq!(engage.action, SwitchAction::Engage);
    assert!(engage.succeeded(), "{engage:?}\n{}", server.log());
    let causes: Vec<_> = judged[..3].iter().map(|v| v.start).collect();
    assert_eq!(engage.windows, causes);
    assert_eq!(
        std::fs::read_to_string(&notified).unwrap(),
        "engage 1\n",
        "notify ran once"
    );
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&kill_switch).unwrap()).unwrap();
    assert_eq!(file["engaged_by"], "canary");

    // The switch holds on a runtime with vision on: image 503 from the kill switch, text 200.
    server.stop();
    let server = Server::start(&kill_switch, true);
    let image = probe_once(&server.target(), ProbeKind::Vision);
    assert_eq!(image.status, Some(503), "{image:?}");
    assert_eq!(
        error_code(image.error.as_deref().unwrap()),
        "vision_disabled_by_kill_switch"
    );
    let text = probe_once(&server.target(), ProbeKind::Text);
    assert_eq!(text.status, Some(200), "{text:?}");
    assert!(text.is_success());

    // The report, through the command line: a PNG that decodes, a table matching the store.
    let out = dir.path().join("report");
    let output = command(cathedralctl_bin())
        .args(["canary", "report", "--since", "1h", "--state"])
        .arg(&state)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let png = image::open(out.join("chart.png")).expect("chart.png decodes");
    assert_eq!((png.width(), png.height()), cathedral_canary::chart::SIZE);
    let svg = std::fs::read_to_string(out.join("chart.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("kill switch engaged"));
    let text = std::fs::read_to_string(out.join("report.txt")).unwrap();
    check_table(&text, &records);
    let line = text.lines().find(|l| l.starts_with("burn-in")).unwrap();
    assert!(
        line.starts_with("burn-in FAILED: 40 s, 0/4 windows passed; 4 breached: "),
        "{line}"
    );
    assert!(line.contains("success 0.0% < 99.0%"), "{line}");
    assert!(line.ends_with("kill switch engaged 1×"), "{line}");
}

/// Every table row agrees with the probes in the store for its window.
fn check_table(text: &str, records: &[Record]) {
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.is_char_boundary(19)
                && chrono::NaiveDateTime::parse_from_str(&l[..19], "%Y-%m-%d %H:%M:%S").is_ok()
        })
        .collect();
    assert_eq!(rows.len(), verdicts(records).len(), "{text}");
    for row in rows {
        let start = chrono::NaiveDateTime::parse_from_str(&row[..19], "%Y-%m-%d %H:%M:%S")
            .unwrap()
            .and_utc();
        let cols: Vec<&str> = [21..27, 29..37, 39..48, 50..59]
            .into_iter()
            .map(|r| row[r].trim())
            .collect();
        let vision = vision_in(records, start);
        assert_eq!(cols[0], vision.len().to_string(), "probes in {row}");
        let ok: Vec<f64> = {
            let mut v: Vec<f64> = vision
                .iter()
                .filter(|p| p.is_success())
                .map(|p| p.latency.as_secs_f64() * 1000.0)
                .collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let pct = format!("{:.1}%", ok.len() as f64 * 100.0 / vision.len() as f64);
        assert_eq!(cols[1], pct, "success in {row}");
        let ms = |q| percentile(&ok, q).map_or("-".to_owned(), |v| format!("{v:.0} ms"));
        assert_eq!(cols[2], ms(0.5), "p50 in {row}");
        assert_eq!(cols[3], ms(0.95), "p95 in {row}");
    }
}

#[test]
fn stopped_runtime_is_recorded_as_connection_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("kill-switch.json"), true);
    let target = server.target();
    server.stop();
    let state = dir.path().join("state");
    watch_here(
        &state,
        config(&target, Duration::from_millis(3500), None),
        admin_switch(&target),
    );
    let records = records(&state);
    let p = probes(&records);
    assert!(p.len() >= 6, "{p:#?}");
    for probe in p {
        assert_eq!(probe.error_class, Some(ErrorClass::Connect), "{probe:?}");
        assert_eq!(probe.status, None);
    }
    assert!(verdicts(&records).iter().all(|v| !v.verdict.is_pass()));
}

#[test]
fn suspended_watcher_records_a_gap_and_insufficient_data() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("kill-switch.json"), true);
    let state = dir.path().join("state");
    let b = align(WINDOW, Duration::from_millis(200));
    let watcher = WatchProcess::spawn(&server.target(), &state, &["--run-for", "33s"]);
    sleep_until(b + chrono::Duration::milliseconds(3000));
    signal(watcher.pid(), "STOP");
    sleep_until(b + chrono::Duration::milliseconds(17000));
    signal(watcher.pid(), "CONT");
    let log_on_failure = watcher.log();
    watcher.finish(Duration::from_secs(60));
    let records = records(&state);
    let gaps: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            Record::Gap(g) => Some(g),
            _ => None,
        })
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:#?}\n{log_on_failure}");
    let silent = (gaps[0].to - gaps[0].from).num_milliseconds();
    assert!((11_000..17_000).contains(&silent), "gap of {silent} ms");
    let judged = verdicts(&records);
    assert!(judged.len() >= 3, "{judged:#?}");
    assert!(!judged.iter().any(|v| v.verdict.is_breach()), "{judged:#?}");
    let suspended = chrono::Duration::from_std(WINDOW).unwrap();
    let during = judged.iter().find(|v| v.start == b + suspended).unwrap();
    assert!(
        matches!(during.verdict, Verdict::InsufficientData { .. }),
        "{during:#?}"
    );
    assert!(judged.iter().any(|v| v.verdict.is_pass()), "{judged:#?}");
}

#[test]
fn killed_watcher_restarts_mid_window_without_losing_probes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("kill-switch.json"), true);
    let state = dir.path().join("state");
    let b = align(WINDOW, Duration::from_millis(200));
    let mut first = WatchProcess::spawn(&server.target(), &state, &[]);
    sleep_until(b + chrono::Duration::milliseconds(14_500));
    signal(first.pid(), "KILL");
    wait_exit(&mut first.child, Duration::from_secs(10), "killed watcher");
    let before = records(&state);
    let second = WatchProcess::spawn(&server.target(), &state, &["--run-for", "12s"]);
    second.finish(Duration::from_secs(60));
    let after = records(&state);
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "records before the kill are intact"
    );

    let restarted = after
        .iter()
        .filter_map(|r| match r {
            Record::Start(s) => Some(s.at),
            _ => None,
        })
        .nth(1)
        .expect("two start records");
    let mid = b + chrono::Duration::from_std(WINDOW).unwrap();
    let in_window = vision_in(&after, mid);
    let halves = (
        in_window.iter().filter(|p| p.at < restarted).count(),
        in_window.iter().filter(|p| p.at >= restarted).count(),
    );
    assert!(halves.0 >= 2 && halves.1 >= 2, "{halves:?}");
    let judged = verdicts(&after);
    let v = judged
        .iter()
        .find(|v| v.start == mid)
        .expect("window judged");
    assert_eq!(
        v.vision.probes,
        in_window.len(),
        "the verdict counts both halves"
    );
    assert_eq!(v.verdict, Verdict::Pass, "{v:#?}");
    assert_eq!(
        judged.iter().filter(|v| v.start == mid).count(),
        1,
        "judged once"
    );
}
