//! The burn-in report: a table per window, a chart, and one verdict line over the period.
use crate::chart;
use crate::policy::{KillSwitchEvent, SwitchAction};
use crate::store::{GapRecord, Record};
use crate::window::{fmt_ms, WindowVerdict};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Everything the store says about a period.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// Judged windows ending after `since`, in time order.
    pub windows: Vec<WindowVerdict>,
    pub events: Vec<KillSwitchEvent>,
    pub gaps: Vec<GapRecord>,
    /// Probes recorded in the period (both kinds).
    pub probes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot draw the chart: {0}")]
    Chart(String),
}

/// The files [`Report::write`] produced.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    pub text: PathBuf,
    pub json: PathBuf,
    pub png: PathBuf,
    pub svg: PathBuf,
}

impl Report {
    pub fn from_records(records: &[Record], since: DateTime<Utc>, until: DateTime<Utc>) -> Self {
        let mut report = Report {
            since,
            until,
            windows: Vec::new(),
            events: Vec::new(),
            gaps: Vec::new(),
            probes: 0,
        };
        for r in records {
            match r {
                Record::Verdict(w) if w.end > since && w.start < until => {
                    // A window judged twice (crash between recording and acknowledging) keeps the later verdict.
                    match report.windows.iter_mut().find(|x| x.start == w.start) {
                        Some(existing) => *existing = w.clone(),
                        None => report.windows.push(w.clone()),
                    }
                }
                Record::KillSwitch(e) if e.at >= since && e.at <= until => {
                    report.events.push(e.clone())
                }
                Record::Gap(g) if g.to > since && g.from < until => report.gaps.push(g.clone()),
                Record::Probe(p) if p.at >= since && p.at <= until => report.probes += 1,
                _ => {}
            }
        }
        report.windows.sort_by_key(|w| w.start);
        report
    }

    /// Fixed-width table, one row per window.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<19}  {:>6}  {:>8}  {:>9}  {:>9}  {:>6}  {:>8}  verdict",
            "window (UTC)", "probes", "success", "p50", "p95", "text", "text ok"
        );
        for w in &self.windows {
            let pct = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{:.1}%", r * 100.0));
            let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} ms"));
            let _ = writeln!(
                out,
                "{:<19}  {:>6}  {:>8}  {:>9}  {:>9}  {:>6}  {:>8}  {}",
                w.start.format("%Y-%m-%d %H:%M:%S"),
                w.vision.probes,
                pct(w.vision.success_ratio()),
                ms(w.vision.p50_ms),
                ms(w.vision.p95_ms),
                w.text.probes,
                pct(w.text.success_ratio()),
                w.verdict,
            );
            if !w.vision.errors.is_empty() {
                let errors: Vec<String> = w
                    .vision
                    .errors
                    .iter()
                    .map(|(k, n)| format!("{k} ×{n}"))
                    .collect();
                let _ = writeln!(out, "{:<19}  errors: {}", "", errors.join(", "));
            }
        }
        for e in &self.events {
            let _ = writeln!(out, "{}", describe_event(e));
        }
        for g in &self.gaps {
            let _ = writeln!(
                out,
                "gap {} → {} ({})",
                g.from.format("%Y-%m-%d %H:%M:%S"),
                g.to.format("%Y-%m-%d %H:%M:%S"),
                human((g.to - g.from).to_std().unwrap_or_default())
            );
        }
        out
    }

    /// One line: how long, how many windows passed, and which breached and why.
    pub fn verdict_line(&self) -> String {
        let total = self.windows.len();
        if total == 0 {
            return "burn-in: no judged windows in the period".to_owned();
        }
        let covered: std::time::Duration = self
            .windows
            .iter()
            .map(|w| (w.end - w.start).to_std().unwrap_or_default())
            .sum();
        let passed = self.windows.iter().filter(|w| w.verdict.is_pass()).count();
        let breached: Vec<&WindowVerdict> = self
            .windows
            .iter()
            .filter(|w| w.verdict.is_breach())
            .collect();
        let insufficient = total - passed - breached.len();
        let mut line = format!(
            "burn-in {}: {}, {passed}/{total} windows passed",
            if breached.is_empty() {
                "PASSED"
            } else {
                "FAILED"
            },
            human(covered)
        );
        if !breached.is_empty() {
            let which: Vec<String> = breached
                .iter()
                .map(|w| {
                    let why = match &w.verdict {
                        crate::window::Verdict::Breach { reasons } => reasons
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                        other => other.to_string(),
                    };
                    format!("{} ({why})", w.start.format("%Y-%m-%d %H:%M:%S"))
                })
                .collect();
            let _ = write!(line, "; {} breached: {}", breached.len(), which.join("; "));
        }
        if insufficient > 0 {
            let _ = write!(line, "; {insufficient} with insufficient data");
        }
        let engaged = self
            .events
            .iter()
            .filter(|e| e.action == SwitchAction::Engage && e.succeeded())
            .count();
        if engaged > 0 {
            let _ = write!(line, "; kill switch engaged {engaged}×");
        }
        line
    }

    /// Writes `report.txt`, `report.json`, `chart.png` and `chart.svg` into `dir`, each atomically.
    pub fn write(&self, dir: &Path) -> Result<ReportFiles, ReportError> {
        std::fs::create_dir_all(dir).map_err(|source| ReportError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let files = ReportFiles {
            text: dir.join("report.txt"),
            json: dir.join("report.json"),
            png: dir.join("chart.png"),
            svg: dir.join("chart.svg"),
        };
        let text = format!(
            "cathedral canary report {} → {}\n\n{}\n{}\n",
            self.since.format("%Y-%m-%d %H:%M:%S UTC"),
            self.until.format("%Y-%m-%d %H:%M:%S UTC"),
            self.table(),
            self.verdict_line()
        );
        let json = serde_json::to_vec_pretty(self).expect("report is plain data");
        let png = chart::png(self).map_err(ReportError::Chart)?;
        let svg = chart::svg(self).map_err(ReportError::Chart)?;
        for (path, bytes) in [
            (&files.text, text.as_bytes()),
            (&files.json, &json[..]),
            (&files.png, &png[..]),
            (&files.svg, svg.as_bytes()),
        ] {
            cathedral_runtime::atomic_file::write_atomic(path, bytes, Some(0o644)).map_err(
                |source| ReportError::Write {
                    path: path.clone(),
                    source,
                },
            )?;
        }
        Ok(files)
    }
}

pub fn describe_event(e: &KillSwitchEvent) -> String {
    let action = match e.action {
        SwitchAction::Engage => "engaged",
        SwitchAction::Release => "released",
    };
    match &e.error {
        None => format!(
            "kill switch {action} {} via {}: {}",
            e.at.format("%Y-%m-%d %H:%M:%S"),
            e.via,
            e.reason
        ),
        Some(err) => format!(
            "kill switch could not be {action} {} via {}: {err}",
            e.at.format("%Y-%m-%d %H:%M:%S"),
            e.via
        ),
    }
}

/// `72 h`, `3 h 30 min`, `50 s`.
fn human(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 {
        let (h, m) = (secs / 3600, (secs % 3600) / 60);
        if m == 0 {
            format!("{h} h")
        } else {
            format!("{h} h {m} min")
        }
    } else if secs >= 60 {
        format!("{} min", secs.div_ceil(60))
    } else {
        format!("{secs} s")
    }
}

/// Milliseconds for the chart's axis.
pub(crate) fn axis_ms(ms: f64) -> String {
    fmt_ms(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{BreachReason, KindStats, Verdict};

    fn until() -> DateTime<Utc> {
        DateTime::from_timestamp(1_900_000_000, 0).unwrap()
    }

    fn window(i: i64, verdict: Verdict) -> Record {
        let start = DateTime::from_timestamp(1_800_000_000 + i * 3600, 0).unwrap();
        let probes = if matches!(verdict, Verdict::InsufficientData { .. }) {
            3
        } else {
            60
        };
        let successes = if verdict.is_breach() { 50 } else { probes };
        Record::Verdict(WindowVerdict {
            start,
            end: start + chrono::Duration::hours(1),
            vision: KindStats {
                probes,
                successes,
                p50_ms: Some(800.0),
                p95_ms: Some(1200.0 + i as f64),
                errors: Default::default(),
            },
            text: KindStats {
                probes,
                successes: probes,
                p50_ms: Some(100.0),
                p95_ms: Some(150.0),
                errors: Default::default(),
            },
            verdict,
            text_verdict: Verdict::Pass,
            judged_at: start + chrono::Duration::hours(1),
        })
    }

    #[test]
    fn all_passed() {
        let records: Vec<Record> = (0..72).map(|i| window(i, Verdict::Pass)).collect();
        let r = Report::from_records(&records, DateTime::UNIX_EPOCH, until());
        assert_eq!(
            r.verdict_line(),
            "burn-in PASSED: 72 h, 72/72 windows passed"
        );
        assert_eq!(r.table().lines().count(), 73);
    }

    #[test]
    fn breaches_are_named_with_their_reason() {
        let breach = Verdict::Breach {
            reasons: vec![BreachReason::SuccessBelow {
                ratio: 50.0 / 60.0,
                target: 0.99,
            }],
        };
        let mut records: Vec<Record> = (0..3).map(|i| window(i, Verdict::Pass)).collect();
        records.push(window(3, breach));
        records.push(window(
            4,
            Verdict::InsufficientData {
                probes: 3,
                needed: 30,
            },
        ));
        let r = Report::from_records(&records, DateTime::UNIX_EPOCH, until());
        let line = r.verdict_line();
        assert!(
            line.starts_with("burn-in FAILED: 5 h, 3/5 windows passed; 1 breached: "),
            "{line}"
        );
        assert!(line.contains("success 83.3% < 99.0%"), "{line}");
        assert!(line.ends_with("; 1 with insufficient data"), "{line}");
    }

    #[test]
    fn chart_renders_as_png_and_svg() {
        let mut records: Vec<Record> = (0..5).map(|i| window(i, Verdict::Pass)).collect();
        records.push(window(
            5,
            Verdict::Breach {
                reasons: vec![BreachReason::P95Above {
                    p95_ms: 12_000.0,
                    limit_ms: 10_000.0,
                }],
            },
        ));
        records.push(window(
            6,
            Verdict::InsufficientData {
                probes: 3,
                needed: 30,
            },
        ));
        records.push(Record::KillSwitch(KillSwitchEvent {
            at: DateTime::from_timestamp(1_800_000_000 + 6 * 3600, 0).unwrap(),
            action: SwitchAction::Engage,
            via: "file /tmp/ks".into(),
            windows: vec![],
            reason: "test".into(),
            error: None,
        }));
        let r = Report::from_records(&records, DateTime::UNIX_EPOCH, until());
        let dir = tempfile::tempdir().unwrap();
        let files = r.write(dir.path()).unwrap();
        let png = image::open(&files.png).unwrap();
        assert!(png.width() >= 800);
        let svg = std::fs::read_to_string(&files.svg).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        let empty = Report::from_records(&[], DateTime::UNIX_EPOCH, Utc::now());
        empty.write(dir.path()).unwrap();
    }
}
