//! Wall-clock-aligned SLO windows and their verdicts.
use crate::probe::{error_code, ProbeKind, ProbeOutcome};
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Windows of a fixed length aligned to the Unix epoch, so that one-hour windows start on the
/// hour and every watcher (or a restarted one) agrees where a window begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    length_ms: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("window length must be a whole number of milliseconds between 1 s and 7 days, not {0:?}")]
pub struct BadWindow(Duration);

impl WindowSpec {
    pub fn new(length: Duration) -> Result<Self, BadWindow> {
        let ms = length.as_millis();
        let whole_ms = Duration::from_millis(ms as u64) == length;
        if !whole_ms || !(1_000..=7 * 86_400_000).contains(&ms) {
            return Err(BadWindow(length));
        }
        Ok(Self {
            length_ms: ms as i64,
        })
    }

    pub fn length(&self) -> Duration {
        Duration::from_millis(self.length_ms as u64)
    }

    /// Start of the window holding `t`.
    pub fn start_of(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let ms = t.timestamp_millis();
        let start = ms - ms.rem_euclid(self.length_ms);
        Utc.timestamp_millis_opt(start)
            .single()
            .expect("a window start is within chrono's range when its member is")
    }

    pub fn end_of(&self, start: DateTime<Utc>) -> DateTime<Utc> {
        start + chrono::Duration::milliseconds(self.length_ms)
    }
}

/// The service level a window is held to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slo {
    /// Minimum share of successful probes, e.g. 0.99.
    pub success_target: f64,
    /// Maximum 95th-percentile latency of successful probes.
    pub p95_limit: Duration,
    /// Fewer probes than this in a window → insufficient data.
    pub min_probes: usize,
}

impl Slo {
    /// `min_probes` from the share of the expected probes (window / interval) that must exist.
    pub fn min_probes_for(window: Duration, interval: Duration, coverage: f64) -> usize {
        let expected = window.as_secs_f64() / interval.as_secs_f64().max(1e-3);
        ((expected * coverage.clamp(0.0, 1.0)).ceil() as usize).max(1)
    }
}

/// Counts and latency percentiles of one probe kind in one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KindStats {
    pub probes: usize,
    pub successes: usize,
    /// Median latency of the successful probes, in milliseconds.
    pub p50_ms: Option<f64>,
    /// 95th-percentile latency of the successful probes, in milliseconds.
    pub p95_ms: Option<f64>,
    /// Failures by class (and OpenAI error code, when there is one).
    pub errors: BTreeMap<String, usize>,
}

impl KindStats {
    pub fn from_probes<'a>(probes: impl IntoIterator<Item = &'a ProbeOutcome>) -> Self {
        let mut stats = KindStats::default();
        let mut latencies = Vec::new();
        for p in probes {
            stats.probes += 1;
            match &p.error_class {
                None => {
                    stats.successes += 1;
                    latencies.push(p.latency.as_secs_f64() * 1000.0);
                }
                Some(class) => {
                    let key = match (class, p.error.as_deref()) {
                        (crate::probe::ErrorClass::HttpStatus(_), Some(e)) => {
                            format!("{class} {}", error_code(e))
                        }
                        _ => class.to_string(),
                    };
                    *stats.errors.entry(key).or_default() += 1;
                }
            }
        }
        latencies.sort_by(f64::total_cmp);
        stats.p50_ms = percentile(&latencies, 0.50);
        stats.p95_ms = percentile(&latencies, 0.95);
        stats
    }

    pub fn success_ratio(&self) -> Option<f64> {
        (self.probes > 0).then(|| self.successes as f64 / self.probes as f64)
    }

    /// The verdict of these stats under `slo`.
    pub fn verdict(&self, slo: &Slo) -> Verdict {
        if self.probes < slo.min_probes {
            return Verdict::InsufficientData {
                probes: self.probes,
                needed: slo.min_probes,
            };
        }
        let mut reasons = Vec::new();
        let ratio = self.success_ratio().unwrap_or(0.0);
        if ratio < slo.success_target {
            reasons.push(BreachReason::SuccessBelow {
                ratio,
                target: slo.success_target,
            });
        }
        let limit_ms = slo.p95_limit.as_secs_f64() * 1000.0;
        if let Some(p95) = self.p95_ms.filter(|p| *p > limit_ms) {
            reasons.push(BreachReason::P95Above {
                p95_ms: p95,
                limit_ms,
            });
        }
        if reasons.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Breach { reasons }
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Why a window breached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum BreachReason {
    SuccessBelow { ratio: f64, target: f64 },
    P95Above { p95_ms: f64, limit_ms: f64 },
}

impl fmt::Display for BreachReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BreachReason::SuccessBelow { ratio, target } => {
                write!(f, "success {:.1}% < {:.1}%", ratio * 100.0, target * 100.0)
            }
            BreachReason::P95Above { p95_ms, limit_ms } => {
                write!(f, "p95 {} > {}", fmt_ms(*p95_ms), fmt_ms(*limit_ms))
            }
        }
    }
}

/// Milliseconds for people: `850 ms`, `12.3 s`.
pub fn fmt_ms(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

/// A window's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    Pass,
    Breach {
        reasons: Vec<BreachReason>,
    },
    /// Too few probes (machine asleep, watcher down): neither pass nor breach.
    InsufficientData {
        probes: usize,
        needed: usize,
    },
}

impl Verdict {
    pub fn is_pass(&self) -> bool {
        matches!(self, Verdict::Pass)
    }

    pub fn is_breach(&self) -> bool {
        matches!(self, Verdict::Breach { .. })
    }

    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Breach { .. } => "BREACH",
            Verdict::InsufficientData { .. } => "insufficient data",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Pass => f.write_str("pass"),
            Verdict::Breach { reasons } => {
                f.write_str("breach: ")?;
                for (i, r) in reasons.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{r}")?;
                }
                Ok(())
            }
            Verdict::InsufficientData { probes, needed } => {
                write!(f, "insufficient data ({probes} of {needed} probes)")
            }
        }
    }
}

/// One judged window. `verdict` judges the vision probes (what the kill switch acts on);
/// `text_verdict` the text probes, under the same SLO.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowVerdict {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub vision: KindStats,
    pub text: KindStats,
    pub verdict: Verdict,
    pub text_verdict: Verdict,
    pub judged_at: DateTime<Utc>,
}

/// Judges the window `[start, end)` over the probes sent in it.
pub fn judge_window<'a>(
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    slo: &Slo,
    probes: impl IntoIterator<Item = &'a ProbeOutcome>,
    judged_at: DateTime<Utc>,
) -> WindowVerdict {
    let in_window: Vec<&ProbeOutcome> = probes
        .into_iter()
        .filter(|p| p.at >= start && p.at < end)
        .collect();
    let of = |kind: ProbeKind| {
        KindStats::from_probes(in_window.iter().copied().filter(move |p| p.kind == kind))
    };
    let vision = of(ProbeKind::Vision);
    let text = of(ProbeKind::Text);
    WindowVerdict {
        start,
        end,
        verdict: vision.verdict(slo),
        text_verdict: text.verdict(slo),
        vision,
        text,
        judged_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ErrorClass;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn probe(at: &str, kind: ProbeKind, ok: bool, ms: u64) -> ProbeOutcome {
        ProbeOutcome {
            kind,
            at: t(at),
            status: Some(if ok { 200 } else { 503 }),
            latency: Duration::from_millis(ms),
            error_class: (!ok).then_some(ErrorClass::HttpStatus(503)),
            error: (!ok).then(|| "vision_pipeline_not_yet_wired: off".to_owned()),
            usage: None,
            answer: None,
        }
    }

    #[test]
    fn windows_align_to_the_clock() {
        let hour = WindowSpec::new(Duration::from_secs(3600)).unwrap();
        let s = hour.start_of(t("2026-11-26T14:37:12.5Z"));
        assert_eq!(s, t("2026-11-26T14:00:00Z"));
        assert_eq!(hour.end_of(s), t("2026-11-26T15:00:00Z"));
        let ten = WindowSpec::new(Duration::from_secs(10)).unwrap();
        assert_eq!(
            ten.start_of(t("2026-11-26T14:37:19.999Z")),
            t("2026-11-26T14:37:10Z")
        );
        assert!(WindowSpec::new(Duration::from_millis(10)).is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.95), Some(95.0));
        assert_eq!(percentile(&[7.0], 0.95), Some(7.0));
        assert_eq!(percentile(&[], 0.95), None);
    }

    #[test]
    fn verdicts_follow_the_slo() {
        let slo = Slo {
            success_target: 0.9,
            p95_limit: Duration::from_millis(500),
            min_probes: 5,
        };
        let start = t("2026-11-26T14:00:00Z");
        let end = t("2026-11-26T14:00:10Z");
        let mk = |fails: usize, slow: bool| -> Vec<ProbeOutcome> {
            (0..10)
                .map(|i| {
                    let at = format!("2026-11-26T14:00:0{i}Z");
                    probe(
                        &at,
                        ProbeKind::Vision,
                        i >= fails,
                        if slow { 900 } else { 40 },
                    )
                })
                .collect()
        };
        let judged = |p: &[ProbeOutcome]| judge_window(start, end, &slo, p, end).verdict;
        assert_eq!(judged(&mk(0, false)), Verdict::Pass);
        assert_eq!(
            judged(&mk(1, false)),
            Verdict::Pass,
            "90% meets a 0.9 target"
        );
        match judged(&mk(2, false)) {
            Verdict::Breach { reasons } => assert!(matches!(
                reasons[..],
                [BreachReason::SuccessBelow { ratio, .. }] if (ratio - 0.8).abs() < 1e-9
            )),
            v => panic!("{v:?}"),
        }
        match judged(&mk(0, true)) {
            Verdict::Breach { reasons } => {
                assert!(matches!(reasons[..], [BreachReason::P95Above { .. }]))
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(
            judged(&mk(0, false)[..4]),
            Verdict::InsufficientData {
                probes: 4,
                needed: 5
            }
        );
    }

    #[test]
    fn only_the_windows_probes_count_and_kinds_are_separate() {
        let slo = Slo {
            success_target: 0.99,
            p95_limit: Duration::from_secs(10),
            min_probes: 1,
        };
        let probes = vec![
            probe("2026-11-26T13:59:59.999Z", ProbeKind::Vision, false, 10),
            probe("2026-11-26T14:00:00Z", ProbeKind::Vision, true, 10),
            probe("2026-11-26T14:00:01Z", ProbeKind::Text, false, 10),
            probe("2026-11-26T14:00:10Z", ProbeKind::Vision, false, 10),
        ];
        let w = judge_window(
            t("2026-11-26T14:00:00Z"),
            t("2026-11-26T14:00:10Z"),
            &slo,
            &probes,
            t("2026-11-26T14:00:11Z"),
        );
        assert_eq!((w.vision.probes, w.vision.successes), (1, 1));
        assert_eq!((w.text.probes, w.text.successes), (1, 0));
        assert!(w.verdict.is_pass());
        assert!(w.text_verdict.is_breach());
        assert_eq!(
            w.text.errors.get("http_503 vision_pipeline_not_yet_wired"),
            Some(&1)
        );
    }

    #[test]
    fn min_probes_from_coverage() {
        let s = Duration::from_secs;
        assert_eq!(Slo::min_probes_for(s(3600), s(60), 0.5), 30);
        assert_eq!(Slo::min_probes_for(s(10), s(1), 0.5), 5);
        assert_eq!(Slo::min_probes_for(s(10), s(60), 0.5), 1);
    }
}
