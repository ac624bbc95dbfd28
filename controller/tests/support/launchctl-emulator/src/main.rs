//! Test support only: a `launchctl` stand-in that behaves as launchd is documented to, so
//! the controller's service manager can be tested on machines without launchd. The tests put
//! it first on PATH under the name `launchctl`; nothing shipped uses it.
//!
//! What it reproduces:
//! - `bootstrap DOMAIN PLIST` caches the definition and starts `ProgramArguments` (RunAtLoad
//!   or KeepAlive) with the plist's environment, working directory and log paths;
//!   a bootstrap while the label is loaded, still tearing down, or disabled exits 5 with
//!   `Bootstrap failed: 5: Input/output error`.
//! - `bootout DOMAIN/LABEL` returns at once; the job's supervisor then sends SIGTERM,
//!   SIGKILL after ExitTimeOut, and only then forgets the job.
//! - `print DOMAIN/LABEL` prints launchd's format or exits 113 (`Could not find service`).
//! - KeepAlive restarts an exited process as its conditions say, no sooner than
//!   ThrottleInterval after the previous start.
//! - `kickstart [-k] [-p]`, `enable`, `disable`, `list`.
//!
//! Each loaded job has a detached supervisor process. State lives under the directory in
//! `CATHEDRAL_LAUNCHCTL_EMULATOR_STATE` (refused without it). Knobs, read when the
//! command runs:
//! - `CATHEDRAL_LAUNCHCTL_EMULATOR_TEARDOWN_LINGER_MS`: after a bootout completes, the
//!   label is already gone from `print` but bootstrap still answers EIO this long (what a
//!   real domain does while it finishes tearing down).
//! - `CATHEDRAL_LAUNCHCTL_EMULATOR_MAX_LIFETIME_S`: a supervisor boots itself out after
//!   this long, so a test that dies cannot leave servers running for ever.
//! - `CATHEDRAL_LAUNCHCTL_EMULATOR_NO_GUI`: there is no `gui/<uid>` domain (an SSH login).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fs4::fs_std::FileExt;
use plist::Value;
use rustix::process::{kill_process, test_kill_process, Pid, Signal};

const STATE_ENV: &str = "CATHEDRAL_LAUNCHCTL_EMULATOR_STATE";
const EIO_MESSAGE: &str = "Bootstrap failed: 5: Input/output error";
const POLL: Duration = Duration::from_millis(20);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(state) = std::env::var_os(STATE_ENV).map(PathBuf::from) else {
        eprintln!("launchctl emulator: {STATE_ENV} is not set; refusing to run");
        return ExitCode::from(64);
    };
    let state = State { root: state };
    if let Err(e) = fs::create_dir_all(state.root.join("jobs")) {
        eprintln!("launchctl emulator: {e}");
        return ExitCode::from(1);
    }
    let code = match args.first().map(String::as_str) {
        Some("bootstrap") => bootstrap(&state, &args[1..]),
        Some("bootout") => bootout(&state, &args[1..]),
        Some("print") => print(&state, &args[1..]),
        Some("kickstart") => kickstart(&state, &args[1..]),
        Some("enable") => set_disabled(&state, &args[1..], false),
        Some("disable") => set_disabled(&state, &args[1..], true),
        Some("list") => list(&state),
        Some("__supervise") => supervise(&state, &args[1..]),
        _ => {
            eprintln!("Usage: launchctl <subcommand> ... | help [subcommand]");
            64
        }
    };
    ExitCode::from(code)
}

struct State {
    root: PathBuf,
}

impl State {
    fn job_dir(&self, label: &str) -> PathBuf {
        self.root.join("jobs").join(label)
    }
    fn disabled(&self, label: &str) -> PathBuf {
        self.root.join("disabled").join(label)
    }
    fn linger(&self, label: &str) -> PathBuf {
        self.root.join("lingering").join(label)
    }
    /// Serialises the commands that change which jobs exist.
    fn lock(&self) -> File {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("lock"))
            .expect("emulator lock file");
        f.lock_exclusive().expect("emulator lock");
        f
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

/// `gui/501/com.example` → (`gui/501`, `com.example`).
fn split_target(t: &str) -> Option<(String, String)> {
    let mut parts = t.splitn(3, '/');
    let kind = parts.next()?;
    let uid = parts.next()?;
    let label = parts.next()?;
    if !matches!(kind, "gui" | "user") || uid.parse::<u32>().is_err() || label.is_empty() {
        return None;
    }
    Some((format!("{kind}/{uid}"), label.to_string()))
}

fn valid_domain(d: &str) -> bool {
    match d.split_once('/') {
        Some(("gui", uid)) => {
            std::env::var_os("CATHEDRAL_LAUNCHCTL_EMULATOR_NO_GUI").is_none()
                && uid.parse::<u32>().is_ok()
        }
        Some(("user", uid)) => uid.parse::<u32>().is_ok(),
        _ => false,
    }
}

/// The parts of a definition the emulator acts on.
#[derive(Debug, Clone)]
struct Job {
    label: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    stdout: Option<PathBuf>,
    stderr: Option<PathBuf>,
    keep_alive: KeepAlive,
    run_at_load: bool,
    throttle: Duration,
    exit_timeout: Duration,
}

#[derive(Debug, Clone, Copy)]
enum KeepAlive {
    Never,
    Always,
    /// `SuccessfulExit`: restart while the exit is (true) / is not (false) clean.
    SuccessfulExit(bool),
}

fn read_job(path: &Path) -> Result<Job, String> {
    let v = Value::from_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let d = v
        .as_dictionary()
        .ok_or_else(|| format!("{}: not a dictionary", path.display()))?;
    let s = |k: &str| d.get(k).and_then(Value::as_string).map(str::to_string);
    let label = s("Label").ok_or("no Label")?;
    let args: Vec<String> = d
        .get("ProgramArguments")
        .and_then(Value::as_array)
        .ok_or("no ProgramArguments")?
        .iter()
        .map(|a| {
            a.as_string()
                .map(str::to_string)
                .ok_or("non-string argument")
        })
        .collect::<Result<_, _>>()?;
    if args.is_empty() {
        return Err("empty ProgramArguments".into());
    }
    let env = d
        .get("EnvironmentVariables")
        .and_then(Value::as_dictionary)
        .map(|e| {
            e.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_string()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let keep_alive = match d.get("KeepAlive") {
        Some(Value::Boolean(true)) => KeepAlive::Always,
        Some(Value::Dictionary(k)) => match k.get("SuccessfulExit").and_then(Value::as_boolean) {
            Some(b) => KeepAlive::SuccessfulExit(b),
            None => KeepAlive::Never,
        },
        _ => KeepAlive::Never,
    };
    let secs = |k: &str, default: u64| {
        Duration::from_secs(
            d.get(k)
                .and_then(Value::as_unsigned_integer)
                .unwrap_or(default),
        )
    };
    Ok(Job {
        label,
        args,
        env,
        cwd: s("WorkingDirectory").map(PathBuf::from),
        stdout: s("StandardOutPath").map(PathBuf::from),
        stderr: s("StandardErrorPath").map(PathBuf::from),
        keep_alive,
        run_at_load: d
            .get("RunAtLoad")
            .and_then(Value::as_boolean)
            .unwrap_or(false),
        throttle: secs("ThrottleInterval", 10),
        exit_timeout: secs("ExitTimeOut", 20),
    })
}

fn bootstrap(state: &State, args: &[String]) -> u8 {
    let [domain, plist] = args else {
        eprintln!("Usage: launchctl bootstrap <domain-target> <service-path>");
        return 64;
    };
    if !valid_domain(domain) {
        eprintln!("Bootstrap failed: 125: Domain does not support specified action");
        return 125;
    }
    let job = match read_job(Path::new(plist)) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("{EIO_MESSAGE}\n(emulator: cannot load {plist}: {e})");
            return 5;
        }
    };
    let _lock = state.lock();
    let dir = state.job_dir(&job.label);
    let lingering = fs::read_to_string(state.linger(&job.label))
        .ok()
        .and_then(|s| s.trim().parse::<u128>().ok())
        .is_some_and(|deadline| now_ms() < deadline);
    if dir.exists() || lingering || state.disabled(&job.label).exists() {
        eprintln!("{EIO_MESSAGE}");
        return 5;
    }
    if let Err(e) = fs::create_dir_all(&dir)
        .and_then(|_| fs::copy(plist, dir.join("job.plist")).map(|_| ()))
        .and_then(|_| fs::write(dir.join("path"), plist))
        .and_then(|_| fs::write(dir.join("domain"), domain))
    {
        eprintln!("{EIO_MESSAGE}\n(emulator: {e})");
        let _ = fs::remove_dir_all(&dir);
        return 5;
    }
    let initial = Status {
        state: "not running".into(),
        pid: None,
        runs: 0,
        last_exit: LastExit::Never,
    };
    initial.write(&dir);
    let exe = std::env::current_exe().expect("own path");
    let mut cmd = Command::new(exe);
    cmd.arg("__supervise")
        .arg(&job.label)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(state.root.join("supervisor.log"))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        )
        // Its own process group: signals for the caller's terminal or test never reach it.
        .process_group(0);
    match cmd.spawn() {
        Ok(child) => {
            let _ = fs::write(dir.join("supervisor"), child.id().to_string());
            0
        }
        Err(e) => {
            eprintln!("{EIO_MESSAGE}\n(emulator: cannot start supervisor: {e})");
            let _ = fs::remove_dir_all(&dir);
            5
        }
    }
}

/// `bootout gui/501/label` or `bootout gui/501 /path/to.plist`.
fn bootout(state: &State, args: &[String]) -> u8 {
    let label = match args {
        [target] => split_target(target).map(|(_, l)| l),
        [domain, plist] if valid_domain(domain) => read_job(Path::new(plist)).ok().map(|j| j.label),
        _ => None,
    };
    let Some(label) = label else {
        eprintln!(
            "Usage: launchctl bootout <domain-target> [service-path1 ...] | <service-target>"
        );
        return 64;
    };
    let _lock = state.lock();
    let dir = state.job_dir(&label);
    if !dir.exists() {
        eprintln!("Boot-out failed: 3: No such process");
        return 3;
    }
    let linger = env_u64("CATHEDRAL_LAUNCHCTL_EMULATOR_TEARDOWN_LINGER_MS").unwrap_or(0);
    // The supervisor does the rest; like launchd, return before the job is gone.
    let _ = fs::write(dir.join("stop"), linger.to_string());
    0
}

fn print(state: &State, args: &[String]) -> u8 {
    let [target] = args else {
        eprintln!("Usage: launchctl print <domain-target> | <service-target>");
        return 64;
    };
    let Some((domain, label)) = split_target(target) else {
        if valid_domain(target) {
            println!(
                "{target} = {{\n\ttype = {}\n\thandle = 0\n}}",
                if target.starts_with("gui") {
                    "login"
                } else {
                    "user"
                }
            );
            return 0;
        }
        eprintln!("Could not find domain for {target}");
        return 113;
    };
    let dir = state.job_dir(&label);
    let loaded_domain = fs::read_to_string(dir.join("domain")).ok();
    let (Some(loaded_domain), Some(status)) = (loaded_domain, Status::read(&dir)) else {
        eprintln!("Bad request.\nCould not find service \"{label}\" in domain for {domain}");
        return 113;
    };
    if loaded_domain != domain {
        eprintln!("Bad request.\nCould not find service \"{label}\" in domain for {domain}");
        return 113;
    }
    let path = fs::read_to_string(dir.join("path")).unwrap_or_default();
    let job = read_job(&dir.join("job.plist")).ok();
    let mut out = String::new();
    out.push_str(&format!("{domain}/{label} = {{\n"));
    out.push_str(&format!(
        "\tactive count = {}\n",
        u8::from(status.pid.is_some())
    ));
    out.push_str(&format!("\tpath = {path}\n"));
    out.push_str("\ttype = LaunchAgent\n");
    out.push_str(&format!("\tstate = {}\n\n", status.state));
    if let Some(job) = &job {
        out.push_str(&format!("\tprogram = {}\n\targuments = {{\n", job.args[0]));
        for a in &job.args {
            out.push_str(&format!("\t\t{a}\n"));
        }
        out.push_str("\t}\n\n");
        if let Some(p) = &job.stdout {
            out.push_str(&format!("\tstdout path = {}\n", p.display()));
        }
        if let Some(p) = &job.stderr {
            out.push_str(&format!("\tstderr path = {}\n", p.display()));
        }
        out.push_str("\tenvironment = {\n");
        for (k, v) in &job.env {
            out.push_str(&format!("\t\t{k} => {v}\n"));
        }
        out.push_str(&format!("\t\tXPC_SERVICE_NAME => {label}\n\t}}\n\n"));
    }
    out.push_str(&format!("\tdomain = {domain}\n"));
    out.push_str(&format!("\truns = {}\n", status.runs));
    if let Some(pid) = status.pid {
        out.push_str(&format!("\tpid = {pid}\n"));
    }
    match status.last_exit {
        LastExit::Never => out.push_str("\tlast exit code = (never exited)\n"),
        LastExit::Code(c) => out.push_str(&format!("\tlast exit code = {c}\n")),
        LastExit::Signal(s) => out.push_str(&format!(
            "\tlast terminating signal = {}: {s}\n",
            signal_name(s)
        )),
    }
    out.push_str("}\n");
    print!("{out}");
    0
}

fn signal_name(s: i32) -> &'static str {
    match s {
        9 => "Killed",
        15 => "Terminated",
        6 => "Abort trap",
        11 => "Segmentation fault",
        _ => "Signal",
    }
}

fn kickstart(state: &State, args: &[String]) -> u8 {
    let kill = args.iter().any(|a| a == "-k");
    let show_pid = args.iter().any(|a| a == "-p");
    let Some((_, label)) = args.iter().rev().find_map(|a| split_target(a)) else {
        eprintln!("Usage: launchctl kickstart [-k] [-p] <service-target>");
        return 64;
    };
    let dir = state.job_dir(&label);
    if !dir.exists() {
        eprintln!("Could not find service \"{label}\" in domain");
        return 113;
    }
    let request = dir.join("kick");
    let _ = fs::write(&request, if kill { "k" } else { "" });
    let t0 = Instant::now();
    while request.exists() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(POLL);
    }
    if show_pid {
        if let Some(pid) = Status::read(&dir).and_then(|s| s.pid) {
            println!("service spawned with pid: {pid}");
        }
    }
    0
}

fn set_disabled(state: &State, args: &[String], disabled: bool) -> u8 {
    let Some((_, label)) = args.first().and_then(|t| split_target(t)) else {
        eprintln!(
            "Usage: launchctl {} <service-target>",
            if disabled { "disable" } else { "enable" }
        );
        return 64;
    };
    let marker = state.disabled(&label);
    let r = if disabled {
        fs::create_dir_all(marker.parent().expect("parent")).and_then(|_| fs::write(&marker, ""))
    } else {
        match fs::remove_file(&marker) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("launchctl emulator: {e}");
            1
        }
    }
}

fn list(state: &State) -> u8 {
    println!("PID\tStatus\tLabel");
    if let Ok(rd) = fs::read_dir(state.root.join("jobs")) {
        for e in rd.flatten() {
            let label = e.file_name().to_string_lossy().into_owned();
            if let Some(s) = Status::read(&e.path()) {
                let pid = s.pid.map_or("-".to_string(), |p| p.to_string());
                let code = match s.last_exit {
                    LastExit::Code(c) => c,
                    LastExit::Signal(sig) => -sig,
                    LastExit::Never => 0,
                };
                println!("{pid}\t{code}\t{label}");
            }
        }
    }
    0
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum LastExit {
    Never,
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone, PartialEq)]
struct Status {
    state: String,
    pid: Option<u32>,
    runs: u32,
    last_exit: LastExit,
}

impl Status {
    fn write(&self, dir: &Path) {
        let last = match self.last_exit {
            LastExit::Never => "never".to_string(),
            LastExit::Code(c) => format!("code {c}"),
            LastExit::Signal(s) => format!("signal {s}"),
        };
        let text = format!(
            "state={}\npid={}\nruns={}\nlast={last}\n",
            self.state,
            self.pid.map_or(String::new(), |p| p.to_string()),
            self.runs
        );
        // Readers (print) must never see half a status.
        let tmp = dir.join("status.tmp");
        if fs::write(&tmp, text).is_ok() {
            let _ = fs::rename(&tmp, dir.join("status"));
        }
    }

    fn read(dir: &Path) -> Option<Status> {
        let text = fs::read_to_string(dir.join("status")).ok()?;
        let mut st = Status {
            state: "unknown".into(),
            pid: None,
            runs: 0,
            last_exit: LastExit::Never,
        };
        for line in text.lines() {
            let (k, v) = line.split_once('=')?;
            match k {
                "state" => st.state = v.to_string(),
                "pid" => st.pid = v.parse().ok(),
                "runs" => st.runs = v.parse().unwrap_or(0),
                "last" => {
                    st.last_exit = match v.split_once(' ') {
                        Some(("code", c)) => LastExit::Code(c.parse().ok()?),
                        Some(("signal", s)) => LastExit::Signal(s.parse().ok()?),
                        _ => LastExit::Never,
                    }
                }
                _ => {}
            }
        }
        Some(st)
    }
}

/// The per-job process that plays launchd for one label.
struct Supervisor {
    dir: PathBuf,
    job: Job,
    child: Option<Child>,
    status: Status,
    last_start: Option<Instant>,
    next_spawn: Option<Instant>,
}

fn supervise(state: &State, args: &[String]) -> u8 {
    let [label] = args else { return 64 };
    let dir = state.job_dir(label);
    let job = match read_job(&dir.join("job.plist")) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("supervisor {label}: {e}");
            let _ = fs::remove_dir_all(&dir);
            return 1;
        }
    };
    let max_life = env_u64("CATHEDRAL_LAUNCHCTL_EMULATOR_MAX_LIFETIME_S").map(Duration::from_secs);
    let born = Instant::now();
    let mut sup = Supervisor {
        status: Status::read(&dir).unwrap_or(Status {
            state: "not running".into(),
            pid: None,
            runs: 0,
            last_exit: LastExit::Never,
        }),
        dir,
        job,
        child: None,
        last_start: None,
        next_spawn: None,
    };
    let starts_at_load = sup.job.run_at_load || !matches!(sup.job.keep_alive, KeepAlive::Never);
    if starts_at_load {
        sup.spawn();
    }
    loop {
        if !sup.dir.exists() {
            // The state directory was removed under us (a test cleaning up): stop hard.
            sup.terminate(Duration::ZERO);
            return 0;
        }
        let expired = max_life.is_some_and(|m| born.elapsed() > m);
        if let Some(linger) = fs::read_to_string(sup.dir.join("stop"))
            .ok()
            .map(|s| s.trim().parse::<u64>().unwrap_or(0))
            .or(expired.then_some(0))
        {
            let grace = sup.job.exit_timeout;
            sup.terminate(grace);
            let _lock = state.lock();
            if linger > 0 {
                let _ = fs::create_dir_all(state.root.join("lingering"));
                let _ = fs::write(
                    state.linger(label),
                    (now_ms() + u128::from(linger)).to_string(),
                );
            }
            // Rename first so the job disappears from `print` in one step.
            let trash = state
                .root
                .join(format!("trash-{label}-{}", std::process::id()));
            let _ = fs::rename(&sup.dir, &trash);
            let _ = fs::remove_dir_all(&trash);
            return 0;
        }
        if let Ok(mode) = fs::read_to_string(sup.dir.join("kick")) {
            if sup.child.is_some() && mode == "k" {
                let grace = sup.job.exit_timeout;
                sup.terminate(grace);
            }
            if sup.child.is_none() {
                sup.spawn();
            }
            let _ = fs::remove_file(sup.dir.join("kick"));
        }
        sup.reap();
        if sup.next_spawn.is_some_and(|t| Instant::now() >= t) {
            sup.spawn();
        }
        std::thread::sleep(POLL);
    }
}

impl Supervisor {
    fn log_file(path: &Option<PathBuf>) -> Stdio {
        match path {
            Some(p) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
            None => Stdio::null(),
        }
    }

    fn spawn(&mut self) {
        self.next_spawn = None;
        self.last_start = Some(Instant::now());
        self.status.runs += 1;
        let job = &self.job;
        let mut cmd = Command::new(&job.args[0]);
        cmd.args(&job.args[1..])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Self::log_file(&job.stdout))
            .stderr(Self::log_file(&job.stderr))
            .current_dir(job.cwd.clone().unwrap_or_else(|| PathBuf::from("/")));
        // launchd's agents get a small fixed environment plus the plist's variables.
        cmd.env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin");
        for k in ["HOME", "USER", "LOGNAME", "TMPDIR"] {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        cmd.env("XPC_SERVICE_NAME", &job.label);
        cmd.envs(&job.env);
        match cmd.spawn() {
            Ok(child) => {
                self.status.state = "running".into();
                self.status.pid = Some(child.id());
                self.child = Some(child);
            }
            Err(e) => {
                if let Some(p) = &job.stderr {
                    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(p) {
                        let _ = writeln!(f, "launchd: cannot exec {}: {e}", job.args[0]);
                    }
                }
                // EX_CONFIG, as launchd reports a job it cannot exec.
                self.exited(LastExit::Code(78));
                return;
            }
        }
        self.status.write(&self.dir);
    }

    fn reap(&mut self) {
        let Some(child) = &mut self.child else { return };
        if let Ok(Some(status)) = child.try_wait() {
            let last = match (status.code(), status.signal()) {
                (Some(c), _) => LastExit::Code(c),
                (None, Some(s)) => LastExit::Signal(s),
                _ => LastExit::Code(-1),
            };
            self.child = None;
            self.exited(last);
        }
    }

    fn exited(&mut self, last: LastExit) {
        self.status.last_exit = last;
        self.status.pid = None;
        let clean = last == LastExit::Code(0);
        let restart = match self.job.keep_alive {
            KeepAlive::Never => false,
            KeepAlive::Always => true,
            KeepAlive::SuccessfulExit(want) => want == clean,
        };
        if restart {
            let earliest = self.last_start.unwrap_or_else(Instant::now) + self.job.throttle;
            self.next_spawn = Some(earliest.max(Instant::now()));
            self.status.state = "spawn scheduled".into();
        } else {
            self.status.state = "not running".into();
        }
        self.status.write(&self.dir);
    }

    /// SIGTERM, then SIGKILL after `grace`; records how it ended. No respawn.
    fn terminate(&mut self, grace: Duration) {
        self.next_spawn = None;
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = Pid::from_raw(child.id() as i32) {
            let _ = kill_process(
                pid,
                if grace.is_zero() {
                    Signal::KILL
                } else {
                    Signal::TERM
                },
            );
            let t0 = Instant::now();
            while t0.elapsed() < grace {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(POLL);
            }
            if test_kill_process(pid).is_ok() && matches!(child.try_wait(), Ok(None)) {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
        let last = match child.wait() {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(c), _) => LastExit::Code(c),
                (None, Some(sig)) => LastExit::Signal(sig),
                _ => LastExit::Code(-1),
            },
            Err(_) => LastExit::Code(-1),
        };
        self.status.last_exit = last;
        self.status.pid = None;
        self.status.state = "not running".into();
        self.status.write(&self.dir);
    }
}
