//! Step-by-step progress: a spinner with the elapsed time while a step runs (on a terminal),
//! and one line per finished step with its time (always), kept for the ledger.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::ledger::StepTiming;

#[derive(Debug, Default)]
pub struct Steps {
    pub timings: Vec<StepTiming>,
    started: Option<Instant>,
    quiet: bool,
}

impl Steps {
    pub fn new(quiet: bool) -> Self {
        Steps {
            timings: Vec::new(),
            started: Some(Instant::now()),
            quiet,
        }
    }

    pub fn total(&self) -> Duration {
        self.started.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Runs one step; `detail` turns its result into the text after the time.
    pub fn run<T, E: std::fmt::Display>(
        &mut self,
        name: &str,
        detail: impl FnOnce(&T) -> String,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let bar = if self.quiet {
            ProgressBar::hidden()
        } else {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("  {spinner} {msg:<16} {elapsed_precise}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_message(name.to_string());
            b.enable_steady_tick(Duration::from_millis(100));
            b
        };
        let t0 = Instant::now();
        let r = f();
        let secs = t0.elapsed().as_secs_f64();
        bar.finish_and_clear();
        self.timings.push(StepTiming {
            step: name.to_string(),
            seconds: secs,
        });
        if !self.quiet {
            match &r {
                Ok(v) => {
                    let d = detail(v);
                    eprintln!("  ✓ {name:<16} {secs:>7.2}s  {d}");
                }
                Err(e) => eprintln!("  ✗ {name:<16} {secs:>7.2}s  {e}"),
            }
        }
        r
    }

    /// Records a step measured elsewhere (e.g. part of a restart).
    pub fn record(&mut self, name: &str, d: Duration) {
        self.timings.push(StepTiming {
            step: name.to_string(),
            seconds: d.as_secs_f64(),
        });
    }

    pub fn note(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }
}
