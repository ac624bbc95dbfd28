//! The deploy: check the new binary → back up → edit → lint → atomic write → restart →
//! health gate; on any failure after the write, restore the backup, restart, and verify the
//! old definition serves. Every attempt lands in the ledger.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::{AgentError, LaunchAgent, PlistPath};
use crate::atomic;
use crate::backup::{self, Backup, BackupTag};
use crate::edit::{self, Edit};
use crate::health::{HealthGate, HealthReport};
use crate::launchd::{RestartReport, ServiceManager};
use crate::ledger::{self, LedgerEntry, Outcome};
use crate::lint;
use crate::lock::{ControllerLock, LockError};
use crate::progress::Steps;

/// At most this many automatic rollbacks in a row; then a deploy needs `--force`.
pub const MAX_ROLLBACK_STREAK: usize = 3;

/// The flag that turns the vision pipeline on, and where it goes (the field report's edit).
pub const VISION_FLAG: &str = "--vision-enabled";
pub const VISION_ANCHOR: &str = "--no-plain";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Vision {
    #[default]
    Keep,
    Enable,
    Disable,
}

#[derive(Debug, Clone)]
pub struct DeployRequest {
    pub plist: PlistPath,
    pub binary: PathBuf,
    pub vision: Vision,
    /// Extra flags to insert: (flag, anchor it goes after; `None` appends).
    pub flags: Vec<(String, Option<String>)>,
    pub tag: BackupTag,
    pub keep_backups: usize,
    pub dry_run: bool,
    /// Deploy even after [`MAX_ROLLBACK_STREAK`] automatic rollbacks in a row.
    pub force: bool,
    /// Where `mlx.metallib` comes from on macOS (default: next to the current binary).
    pub metallib: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error("deploy refused, nothing changed: {0}")]
    Refused(String),
    #[error("deploy failed and was rolled back (the previous definition serves again): {reason}")]
    RolledBack { reason: String, backup: PathBuf },
    #[error("deploy failed ({reason}) AND the rollback failed ({rollback}); restore by hand: cp {backup} {plist}", backup = backup.display())]
    RollbackFailed {
        reason: String,
        rollback: String,
        backup: PathBuf,
        plist: String,
    },
}

/// What a finished deploy did.
#[derive(Debug, Clone)]
pub struct DeployResult {
    pub outcome: Outcome,
    pub diff: String,
    pub backup: Option<Backup>,
    pub restart: Option<RestartReport>,
    pub health: Option<HealthReport>,
    pub entry: Option<LedgerEntry>,
}

/// The pieces a deploy acts through.
pub struct Controller<'a> {
    pub services: &'a dyn ServiceManager,
    pub gate: &'a dyn HealthGate,
    pub state_dir: PathBuf,
    pub quiet: bool,
}

/// Runs `binary --version` (bounded) and returns its first line.
pub fn check_binary(binary: &Path) -> Result<String, String> {
    if !binary.is_absolute() {
        return Err(format!("{} is not an absolute path", binary.display()));
    }
    let meta = std::fs::metadata(binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", binary.display()));
    }
    let mut child = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{} does not run: {e}", binary.display()))?;
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if t0.elapsed() > Duration::from_secs(30) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --version did not finish in 30 s",
                    binary.display()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{} --version exited with {}: {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// MLX on macOS loads its Metal kernels from `mlx.metallib` next to the executable.
fn place_metallib(
    old_binary: &Path,
    new_binary: &Path,
    from: Option<&Path>,
) -> Result<String, String> {
    if !cfg!(target_os = "macos") {
        return Ok("not macOS: no Metal library needed".into());
    }
    let dest = new_binary.with_file_name("mlx.metallib");
    if dest.is_file() {
        return Ok(format!("{} present", dest.display()));
    }
    let src = from
        .map(Path::to_path_buf)
        .unwrap_or_else(|| old_binary.with_file_name("mlx.metallib"));
    std::fs::copy(&src, &dest).map_err(|e| {
        format!(
            "cannot copy {} to {}: {e} (pass --metallib)",
            src.display(),
            dest.display()
        )
    })?;
    if !dest.is_file() {
        return Err(format!("{} is missing after the copy", dest.display()));
    }
    Ok(format!("copied to {}", dest.display()))
}

impl Controller<'_> {
    fn ledger_path(&self) -> PathBuf {
        ledger::path_in(&self.state_dir)
    }

    /// Validates and writes `bytes` as the live definition (lint on the temp file first).
    pub fn write_definition(plist: &PlistPath, bytes: &[u8]) -> std::io::Result<()> {
        atomic::sweep_stale_temps(plist.as_path())?;
        atomic::write_atomic(plist.as_path(), bytes, None, |tmp| {
            let written = std::fs::read(tmp)?;
            LaunchAgent::from_bytes(&written, &tmp.display().to_string())
                .map_err(std::io::Error::other)?;
            lint::plutil(tmp).map(|_| ())
        })
    }

    pub fn deploy(&self, req: &DeployRequest) -> Result<DeployResult, DeployError> {
        let mut steps = Steps::new(self.quiet);
        let _lock = if req.dry_run {
            None
        } else {
            Some(steps.run(
                "lock",
                |l: &ControllerLock| l.path().display().to_string(),
                || ControllerLock::acquire(&self.state_dir, "deploy"),
            )?)
        };
        let (old, old_bytes) = steps
            .run(
                "read",
                |(a, _): &(LaunchAgent, Vec<u8>)| a.label().to_string(),
                || LaunchAgent::load(&req.plist),
            )
            .map_err(|e: AgentError| DeployError::Refused(e.to_string()))?;
        let label = old.label();
        let binary = std::path::absolute(&req.binary)
            .map_err(|e| DeployError::Refused(format!("{}: {e}", req.binary.display())))?;
        let mut entry = LedgerEntry {
            when: chrono::Local::now(),
            who: ledger::who(),
            plist: req.plist.as_path().to_path_buf(),
            label: label.to_string(),
            from: old.binary(),
            to: binary.clone(),
            to_version: None,
            flags_before: old.flags(),
            flags_after: old.flags(),
            edits: Vec::new(),
            outcome: Outcome::Refused,
            reason: None,
            backup: None,
            steps: Vec::new(),
            total_seconds: 0.0,
        };
        // Refusals before anything changed are ledgered too (not for a dry run).
        let refuse = |entry: &mut LedgerEntry, steps: &Steps, why: String| -> DeployError {
            if !req.dry_run {
                entry.reason = Some(why.clone());
                self.finish_entry(entry, steps);
            }
            DeployError::Refused(why)
        };

        let history = ledger::read(&self.ledger_path()).unwrap_or_default();
        let streak = ledger::rollback_streak(&history, label.as_str());
        if streak >= MAX_ROLLBACK_STREAK && !req.force && !req.dry_run {
            return Err(refuse(
                &mut entry,
                &steps,
                format!(
                    "the last {streak} deploys of {label} were rolled back automatically; \
                     find out why (cathedralctl status, the runtime's log) and pass --force to try again"
                ),
            ));
        }

        let version = match steps.run(
            "check-binary",
            |v: &String| v.clone(),
            || check_binary(&binary),
        ) {
            Ok(v) => v,
            Err(e) => return Err(refuse(&mut entry, &steps, format!("new binary: {e}"))),
        };
        entry.to_version = Some(version);
        if !req.dry_run {
            if let Err(e) = steps.run(
                "metallib",
                |s: &String| s.clone(),
                || place_metallib(&old.binary(), &binary, req.metallib.as_deref()),
            ) {
                return Err(refuse(&mut entry, &steps, e));
            }
        }

        let mut edits = vec![Edit::SetBinary(binary.clone())];
        match req.vision {
            Vision::Keep => {}
            Vision::Enable => edits.push(Edit::InsertFlag {
                flag: VISION_FLAG.into(),
                after: old
                    .has_flag(VISION_ANCHOR)
                    .then(|| VISION_ANCHOR.to_string()),
            }),
            Vision::Disable => edits.push(Edit::RemoveFlag(VISION_FLAG.into())),
        }
        for (flag, after) in &req.flags {
            edits.push(Edit::InsertFlag {
                flag: flag.clone(),
                after: after.clone(),
            });
        }
        let mut new = old.clone();
        let changed = match steps.run(
            "edit",
            |c: &Vec<Edit>| format!("{} change(s)", c.len()),
            || new.apply_all(&edits),
        ) {
            Ok(c) => c,
            Err(e) => return Err(refuse(&mut entry, &steps, e.to_string())),
        };
        entry.edits = changed.iter().map(ToString::to_string).collect();
        entry.flags_after = new.flags();
        let diff = edit::diff(&old, &new, &req.plist.file_name())
            .map_err(|e| DeployError::Refused(e.to_string()))?;

        if req.dry_run {
            return Ok(DeployResult {
                outcome: Outcome::Refused,
                diff,
                backup: None,
                restart: None,
                health: None,
                entry: None,
            });
        }
        if changed.is_empty() {
            entry.outcome = Outcome::Unchanged;
            entry.reason = Some("the definition already says this; nothing restarted".into());
            self.finish_entry(&mut entry, &steps);
            return Ok(DeployResult {
                outcome: Outcome::Unchanged,
                diff,
                backup: None,
                restart: None,
                health: None,
                entry: Some(entry),
            });
        }

        let new_bytes = new
            .to_xml()
            .map_err(|e| refuse(&mut entry, &steps, e.to_string()))?;
        let backup = match steps.run(
            "backup",
            |b: &Backup| b.path.display().to_string(),
            || {
                let b = backup::take(&req.plist, &req.tag, &old_bytes)?;
                backup::prune(&req.plist, req.keep_backups)?;
                Ok::<_, std::io::Error>(b)
            },
        ) {
            Ok(b) => b,
            Err(e) => return Err(refuse(&mut entry, &steps, format!("backup: {e}"))),
        };
        entry.backup = Some(backup.path.clone());
        if let Err(e) = steps.run(
            "write",
            |_: &()| "lint passed, written atomically".into(),
            || Self::write_definition(&req.plist, &new_bytes),
        ) {
            return Err(refuse(&mut entry, &steps, format!("write: {e}")));
        }

        // From here on the live definition is the new one: failures roll back.
        let attempt = (|| -> Result<(RestartReport, HealthReport), String> {
            let r = steps
                .run(
                    "restart",
                    |r: &RestartReport| restart_detail(r),
                    || self.services.restart(&label, &req.plist),
                )
                .map_err(|e| format!("restart: {e}"))?;
            steps.record("restart.stop", r.stop);
            steps.record("restart.bootstrap", r.bootstrap);
            steps.record("restart.pid", r.pid_wait);
            let h = steps
                .run("health", health_detail, || {
                    self.gate.check(self.services, &label, &new, r.pid)
                })
                .map_err(|e| format!("health: {e}"))?;
            steps.record("health.ready", h.ready_after);
            Ok((r, h))
        })();
        match attempt {
            Ok((r, h)) => {
                entry.outcome = Outcome::Deployed;
                self.finish_entry(&mut entry, &steps);
                steps.note(&format!(
                    "deployed {label}: {} → {} in {:.1} s (healthy {:.1} s after start)",
                    old.binary().display(),
                    binary.display(),
                    entry.total_seconds,
                    h.ready_after.as_secs_f64()
                ));
                Ok(DeployResult {
                    outcome: Outcome::Deployed,
                    diff,
                    backup: Some(backup),
                    restart: Some(r),
                    health: Some(h),
                    entry: Some(entry),
                })
            }
            Err(reason) => {
                steps.note(&format!("rolling back: {reason}"));
                let rb = self.restore(&mut steps, &req.plist, &old, &old_bytes);
                entry.reason = Some(reason.clone());
                match rb {
                    Ok(()) => {
                        entry.outcome = Outcome::RolledBack;
                        self.finish_entry(&mut entry, &steps);
                        Err(DeployError::RolledBack {
                            reason,
                            backup: backup.path,
                        })
                    }
                    Err(rollback) => {
                        entry.outcome = Outcome::RollbackFailed;
                        entry.reason = Some(format!("{reason}; rollback: {rollback}"));
                        self.finish_entry(&mut entry, &steps);
                        Err(DeployError::RollbackFailed {
                            reason,
                            rollback,
                            backup: backup.path,
                            plist: req.plist.to_string(),
                        })
                    }
                }
            }
        }
    }

    /// Puts `bytes` (a definition known to have served) back live and checks it serves.
    pub fn restore(
        &self,
        steps: &mut Steps,
        plist: &PlistPath,
        agent: &LaunchAgent,
        bytes: &[u8],
    ) -> Result<(), String> {
        let label = agent.label();
        steps
            .run(
                "restore",
                |_: &()| "previous definition written".into(),
                || Self::write_definition(plist, bytes),
            )
            .map_err(|e| format!("restore: {e}"))?;
        let r = steps
            .run(
                "restart-old",
                |r: &RestartReport| restart_detail(r),
                || self.services.restart(&label, plist),
            )
            .map_err(|e| format!("restart: {e}"))?;
        steps
            .run("verify-old", health_detail, || {
                self.gate.check(self.services, &label, agent, r.pid)
            })
            .map_err(|e| format!("verify: {e}"))?;
        Ok(())
    }

    fn finish_entry(&self, entry: &mut LedgerEntry, steps: &Steps) {
        entry.steps = steps.timings.clone();
        entry.total_seconds = steps.total().as_secs_f64();
        if let Err(e) = ledger::append(&self.ledger_path(), entry) {
            // The deploy's result stands; say loudly that its record is missing.
            eprintln!(
                "warning: cannot append to the ledger {}: {e}",
                self.ledger_path().display()
            );
        }
    }
}

fn restart_detail(r: &RestartReport) -> String {
    format!(
        "pid {} (stop {:.2}s, bootstrap {:.2}s ×{}, pid {:.2}s{})",
        r.pid,
        r.stop.as_secs_f64(),
        r.bootstrap.as_secs_f64(),
        r.bootstrap_attempts,
        r.pid_wait.as_secs_f64(),
        if r.kickstarted { ", kickstarted" } else { "" }
    )
}

fn health_detail(h: &HealthReport) -> String {
    let mut s = format!("text {}", crate::health::describe(&h.text));
    if let Some(v) = &h.vision {
        s.push_str(&format!(", vision {}", crate::health::describe(v)));
    }
    if let Some(r) = h.rss {
        s.push_str(&format!(", rss {r}"));
    }
    s
}
