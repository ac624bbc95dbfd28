//! The service manager: a trait, and its launchd implementation driving `launchctl`.
//!
//! launchd's documented traps drive the shape of [`Launchd::restart`]: `bootout` returns
//! before the job is gone, a `bootstrap` during teardown fails with EIO (5), a disabled
//! service also fails with EIO, and `kickstart -k` only re-runs launchd's cached definition
//! (so an edited plist needs bootout + bootstrap). `print` is not an API: it is parsed
//! defensively for the three facts we need.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::agent::{Label, PlistPath};

/// A launchd domain: `gui/<uid>` for a logged-in user, `user/<uid>` without a GUI session (SSH).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    Gui(u32),
    User(u32),
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Gui(u) => write!(f, "gui/{u}"),
            Domain::User(u) => write!(f, "user/{u}"),
        }
    }
}

impl FromStr for Domain {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, uid) = s
            .split_once('/')
            .ok_or_else(|| format!("domain {s:?} is not gui/<uid> or user/<uid>"))?;
        let uid: u32 = uid.parse().map_err(|_| format!("domain {s:?}: bad uid"))?;
        match kind {
            "gui" => Ok(Domain::Gui(uid)),
            "user" => Ok(Domain::User(uid)),
            _ => Err(format!("domain {s:?} is not gui/<uid> or user/<uid>")),
        }
    }
}

/// What launchd says the job is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Running,
    NotRunning,
    /// Waiting out ThrottleInterval before a respawn.
    SpawnScheduled,
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LastExit {
    Never,
    Code(i32),
    Signal(String),
    Unknown,
}

impl fmt::Display for LastExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LastExit::Never => f.write_str("never exited"),
            LastExit::Code(c) => write!(f, "exit code {c}"),
            LastExit::Signal(s) => write!(f, "signal {s}"),
            LastExit::Unknown => f.write_str("unknown"),
        }
    }
}

/// The facts of a loaded job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    pub state: RunState,
    pub pid: Option<u32>,
    pub last_exit: LastExit,
    pub runs: Option<u32>,
    pub program: Option<PathBuf>,
}

impl ServiceStatus {
    pub fn running_pid(&self) -> Option<u32> {
        (self.state == RunState::Running)
            .then_some(self.pid)
            .flatten()
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunState::Running => f.write_str("running"),
            RunState::NotRunning => f.write_str("not running"),
            RunState::SpawnScheduled => f.write_str("spawn scheduled"),
            RunState::Other(s) => f.write_str(s),
        }
    }
}

/// Parses `launchctl print <service>`: only the service's own top-level `key = value`
/// lines count (nested blocks such as `environment = { ... }` are skipped); unknown keys and
/// odd values are tolerated.
pub fn parse_print(text: &str) -> ServiceStatus {
    let mut st = ServiceStatus {
        state: RunState::Other("unknown".into()),
        pid: None,
        last_exit: LastExit::Unknown,
        runs: None,
        program: None,
    };
    let mut depth = 0i32;
    for line in text.lines() {
        let t = line.trim();
        if t.ends_with('{') {
            depth += 1;
            continue;
        }
        if t == "}" {
            depth -= 1;
            continue;
        }
        if depth != 1 {
            continue;
        }
        let Some((k, v)) = t.split_once(" = ") else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "state" => {
                st.state = match v {
                    "running" => RunState::Running,
                    "not running" => RunState::NotRunning,
                    "spawn scheduled" => RunState::SpawnScheduled,
                    o => RunState::Other(o.to_string()),
                }
            }
            "pid" => st.pid = v.parse().ok(),
            "runs" => st.runs = v.parse().ok(),
            "program" => st.program = Some(PathBuf::from(v)),
            "last exit code" => {
                st.last_exit = if v.starts_with("(never") {
                    LastExit::Never
                } else {
                    // "1", "1: Operation not permitted", "-9"...
                    let end = v
                        .char_indices()
                        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
                        .map_or(v.len(), |(i, _)| i);
                    v[..end].parse().map_or(LastExit::Unknown, LastExit::Code)
                }
            }
            "last terminating signal" => st.last_exit = LastExit::Signal(v.to_string()),
            _ => {}
        }
    }
    st
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("launchctl is not on PATH")]
    NoLaunchctl,
    #[error("cannot run {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` failed with exit {code}: {stderr}")]
    Failed {
        cmd: String,
        code: i32,
        stderr: String,
    },
    #[error("{what} did not happen within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("the service exited right after start ({last_exit}); see its log")]
    ExitedAtStart { last_exit: LastExit },
}

/// Time limits of a restart.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// bootout → gone (launchd sends SIGTERM, then SIGKILL after ExitTimeOut).
    pub gone: Duration,
    /// Retrying bootstrap while it answers EIO.
    pub bootstrap: Duration,
    /// bootstrap → a running pid.
    pub pid: Duration,
    pub poll: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            gone: Duration::from_secs(30),
            bootstrap: Duration::from_secs(30),
            pid: Duration::from_secs(30),
            poll: Duration::from_millis(100),
        }
    }
}

/// What a restart did, for the ledger and the progress display.
#[derive(Debug, Clone, Default)]
pub struct RestartReport {
    pub stop: Duration,
    pub bootstrap: Duration,
    pub bootstrap_attempts: u32,
    pub pid_wait: Duration,
    pub pid: u32,
    pub kickstarted: bool,
}

/// Loads, unloads and inspects a service.
pub trait ServiceManager {
    /// `None` when the service is not loaded.
    fn status(&self, label: &Label) -> Result<Option<ServiceStatus>, ServiceError>;
    /// Unloads (stopping the process) and waits until the service is gone.
    fn stop(&self, label: &Label) -> Result<Duration, ServiceError>;
    /// Loads the definition at `plist` and waits for a running pid.
    fn start(&self, label: &Label, plist: &PlistPath) -> Result<RestartReport, ServiceError>;
    /// Stop (if loaded), then start from the definition on disk.
    fn restart(&self, label: &Label, plist: &PlistPath) -> Result<RestartReport, ServiceError> {
        let stop = if self.status(label)?.is_some() {
            self.stop(label)?
        } else {
            Duration::ZERO
        };
        let mut r = self.start(label, plist)?;
        r.stop = stop;
        Ok(r)
    }
    /// A short description for messages (`launchd gui/501`).
    fn describe(&self) -> String;
}

/// First executable called `name` on PATH.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

const EIO: i32 = 5;
const EINPROGRESS: i32 = 37;
const NO_SUCH_SERVICE: i32 = 113;

/// launchd through `launchctl` (looked up on PATH).
#[derive(Debug, Clone)]
pub struct Launchd {
    launchctl: PathBuf,
    domain: Domain,
    pub timeouts: Timeouts,
}

impl Launchd {
    pub fn new(domain: Domain) -> Result<Self, ServiceError> {
        Ok(Self::with_launchctl(
            find_on_path("launchctl").ok_or(ServiceError::NoLaunchctl)?,
            domain,
        ))
    }

    /// A specific `launchctl` executable.
    pub fn with_launchctl(launchctl: PathBuf, domain: Domain) -> Self {
        Launchd {
            launchctl,
            domain,
            timeouts: Timeouts::default(),
        }
    }

    /// `gui/<uid>` when the user has a GUI session, else `user/<uid>`.
    pub fn for_current_user() -> Result<Self, ServiceError> {
        let uid = rustix::process::getuid().as_raw();
        let mut l = Launchd::new(Domain::Gui(uid))?;
        let gui = l.launchctl_run(["print".to_string(), format!("gui/{uid}")])?;
        if !gui.status.success() {
            l.domain = Domain::User(uid);
        }
        Ok(l)
    }

    pub fn domain(&self) -> Domain {
        self.domain
    }

    fn target(&self, label: &Label) -> String {
        format!("{}/{}", self.domain, label)
    }

    fn launchctl_run<I, S>(&self, args: I) -> Result<Output, ServiceError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        Command::new(&self.launchctl)
            .args(&args)
            .output()
            .map_err(|source| ServiceError::Spawn {
                cmd: self.cmdline(&args),
                source,
            })
    }

    fn cmdline(&self, args: &[std::ffi::OsString]) -> String {
        let mut s = String::from("launchctl");
        for a in args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    fn checked(&self, args: &[&str]) -> Result<Output, ServiceError> {
        let out = self.launchctl_run(args)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(ServiceError::Failed {
                cmd: format!("launchctl {}", args.join(" ")),
                code: out.status.code().unwrap_or(-1),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    pub fn enable(&self, label: &Label) -> Result<(), ServiceError> {
        self.checked(&["enable", &self.target(label)]).map(|_| ())
    }

    /// Restarts a loaded job from launchd's cached definition.
    pub fn kickstart(&self, label: &Label) -> Result<(), ServiceError> {
        self.checked(&["kickstart", "-k", &self.target(label)])
            .map(|_| ())
    }

    /// `bootstrap`, retried while launchd answers EIO (still tearing down, or busy).
    fn bootstrap(&self, plist: &PlistPath) -> Result<u32, ServiceError> {
        let domain = self.domain.to_string();
        let plist = plist.to_string();
        let args = ["bootstrap", domain.as_str(), plist.as_str()];
        let t0 = Instant::now();
        let mut backoff = Duration::from_millis(100);
        for attempt in 1.. {
            let out = self.launchctl_run(args)?;
            let code = out.status.code().unwrap_or(-1);
            if out.status.success() {
                return Ok(attempt);
            }
            let retryable = code == EIO || code == EINPROGRESS;
            if !retryable || t0.elapsed() + backoff > self.timeouts.bootstrap {
                return Err(ServiceError::Failed {
                    cmd: format!("launchctl {} (attempt {attempt})", args.join(" ")),
                    code,
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            tracing::debug!(attempt, code, "bootstrap refused; retrying");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        unreachable!("the retry loop returns")
    }

    /// Waits for a running pid; a loaded job that is not running gets one `kickstart -k`.
    fn wait_for_pid(&self, label: &Label) -> Result<(u32, bool), ServiceError> {
        let t0 = Instant::now();
        let mut kickstarted = false;
        loop {
            if let Some(st) = self.status(label)? {
                if let Some(pid) = st.running_pid() {
                    return Ok((pid, kickstarted));
                }
                match st.last_exit {
                    LastExit::Code(c) if c != 0 => {
                        return Err(ServiceError::ExitedAtStart {
                            last_exit: st.last_exit,
                        })
                    }
                    LastExit::Signal(_) => {
                        return Err(ServiceError::ExitedAtStart {
                            last_exit: st.last_exit,
                        })
                    }
                    _ => {}
                }
                // Loaded but idle (RunAtLoad off, or exited 0 without KeepAlive).
                if st.state == RunState::NotRunning
                    && !kickstarted
                    && t0.elapsed() > Duration::from_secs(1)
                {
                    self.kickstart(label)?;
                    kickstarted = true;
                }
            }
            if t0.elapsed() > self.timeouts.pid {
                return Err(ServiceError::Timeout {
                    what: format!("a running pid for {}", self.target(label)),
                    after: self.timeouts.pid,
                });
            }
            std::thread::sleep(self.timeouts.poll);
        }
    }
}

impl ServiceManager for Launchd {
    fn status(&self, label: &Label) -> Result<Option<ServiceStatus>, ServiceError> {
        let target = self.target(label);
        let out = self.launchctl_run(["print", target.as_str()])?;
        match out.status.code() {
            Some(0) => Ok(Some(parse_print(&String::from_utf8_lossy(&out.stdout)))),
            Some(NO_SUCH_SERVICE) => Ok(None),
            code => Err(ServiceError::Failed {
                cmd: format!("launchctl print {target}"),
                code: code.unwrap_or(-1),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            }),
        }
    }

    fn stop(&self, label: &Label) -> Result<Duration, ServiceError> {
        let t0 = Instant::now();
        let target = self.target(label);
        // Its exit status is not trusted: it may say "in progress" or "no such process"
        // while the job is still tearing down. Only `print` answering 113 means gone.
        let out = self.launchctl_run(["bootout", target.as_str()])?;
        if !out.status.success() {
            tracing::debug!(
                code = out.status.code(),
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "bootout reported failure; polling print"
            );
        }
        loop {
            if self.status(label)?.is_none() {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > self.timeouts.gone {
                return Err(ServiceError::Timeout {
                    what: format!("{target} to unload after bootout"),
                    after: self.timeouts.gone,
                });
            }
            std::thread::sleep(self.timeouts.poll);
        }
    }

    fn start(&self, label: &Label, plist: &PlistPath) -> Result<RestartReport, ServiceError> {
        // A disabled service is refused by bootstrap with the same EIO as a teardown.
        self.enable(label)?;
        let t0 = Instant::now();
        let attempts = self.bootstrap(plist)?;
        let bootstrap = t0.elapsed();
        let t1 = Instant::now();
        let (pid, kickstarted) = self.wait_for_pid(label)?;
        Ok(RestartReport {
            stop: Duration::ZERO,
            bootstrap,
            bootstrap_attempts: attempts,
            pid_wait: t1.elapsed(),
            pid,
            kickstarted,
        })
    }

    fn describe(&self) -> String {
        format!("launchd {}", self.domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRINT: &str = "gui/501/com.example.runtime = {
	active count = 1
	path = /Users/me/Library/LaunchAgents/com.example.runtime.plist
	type = LaunchAgent
	state = running

	program = /opt/new/cathedral
	arguments = {
		/opt/new/cathedral
		serve
	}

	environment = {
		state = bogus
		pid = 1
	}

	domain = gui/501 [100005]
	runs = 2
	pid = 4242
	immediate reason = speculative
	last exit code = 1: Operation not permitted
	spawn type = interactive (4)
}
";

    #[test]
    fn print_is_parsed_from_top_level_keys_only() {
        let st = parse_print(PRINT);
        assert_eq!(st.state, RunState::Running);
        assert_eq!(st.pid, Some(4242));
        assert_eq!(st.runs, Some(2));
        assert_eq!(st.last_exit, LastExit::Code(1));
        assert_eq!(st.program, Some(PathBuf::from("/opt/new/cathedral")));
        assert_eq!(st.running_pid(), Some(4242));
    }

    #[test]
    fn print_of_a_never_exited_or_signalled_job() {
        let st =
            parse_print("x = {\n\tstate = not running\n\tlast exit code = (never exited)\n}\n");
        assert_eq!(
            (st.state.clone(), st.last_exit.clone(), st.pid),
            (RunState::NotRunning, LastExit::Never, None)
        );
        let st = parse_print(
            "x = {\n\tstate = spawn scheduled\n\tlast terminating signal = Killed: 9\n}\n",
        );
        assert_eq!(st.state, RunState::SpawnScheduled);
        assert_eq!(st.last_exit, LastExit::Signal("Killed: 9".into()));
        assert_eq!(
            parse_print("garbage").state,
            RunState::Other("unknown".into())
        );
    }

    #[test]
    fn domains_round_trip() {
        assert_eq!("gui/501".parse::<Domain>().unwrap().to_string(), "gui/501");
        assert_eq!("user/0".parse::<Domain>().unwrap(), Domain::User(0));
        assert!("system".parse::<Domain>().is_err());
    }
}
