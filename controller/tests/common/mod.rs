//! Shared by the controller's integration tests: the launchctl emulator put first on PATH,
//! the real `cathedral` binary, a sandbox directory per test, and cleanup of every job the
//! test loaded.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("controller/ is inside the repository")
        .to_path_buf()
}

fn target_debug() -> PathBuf {
    // The test executable lives in target/debug/deps.
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo_root().join("target/debug"))
}

/// Newest modification time of the files under `dir`.
fn newest_source(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(m));
            }
        }
    }
    newest
}

/// A workspace binary, built when missing or older than its package's sources. Under
/// `cargo test --workspace` it is already fresh, and building it again with other feature
/// selections would only cost time; once per test process.
fn built(package_dir: &str, bin: &str, cell: &'static OnceLock<PathBuf>) -> PathBuf {
    cell.get_or_init(|| {
        let p = target_debug().join(bin);
        let built_at = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
        let sources = newest_source(&repo_root().join(package_dir));
        if built_at.is_none() || sources > built_at {
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "--bin", bin])
                .current_dir(repo_root())
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build --bin {bin} failed");
        }
        assert!(p.is_file(), "{} missing after build", p.display());
        p
    })
    .clone()
}

pub fn emulator_bin() -> PathBuf {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    built(
        "controller/tests/support/launchctl-emulator",
        "launchctl-emulator",
        &CELL,
    )
}

pub fn cathedral_bin() -> PathBuf {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    built("runtime", "cathedral", &CELL)
}

pub fn cathedralctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cathedralctl"))
}

/// One test's world: a LaunchAgents directory, controller state, and a `launchctl` that
/// is the emulator bound to this sandbox's state.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cathedralctl-test-")
            .tempdir()
            .expect("tempdir");
        let s = Sandbox { dir };
        for d in ["bin", "agents", "state", "launchd", "logs"] {
            std::fs::create_dir_all(s.path(d)).unwrap();
        }
        // A wrapper so that every caller (the library, cathedralctl, the test) reaches the
        // same emulated launchd without touching the test process's environment.
        let wrapper = format!(
            "#!/bin/sh\nCATHEDRAL_LAUNCHCTL_EMULATOR_STATE='{}' CATHEDRAL_LAUNCHCTL_EMULATOR_MAX_LIFETIME_S=600 exec '{}' \"$@\"\n",
            s.path("launchd").display(),
            emulator_bin().display()
        );
        let launchctl = s.launchctl();
        std::fs::write(&launchctl, wrapper).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&launchctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        s
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn launchctl(&self) -> PathBuf {
        self.path("bin/launchctl")
    }

    /// PATH with the emulator first.
    pub fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    pub fn uid() -> u32 {
        rustix::process::getuid().as_raw()
    }

    pub fn domain() -> String {
        format!("gui/{}", Self::uid())
    }

    /// `cathedralctl ARGS` with the emulator on PATH and this sandbox's state.
    pub fn ctl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cathedralctl_bin());
        c.args(args)
            .env("PATH", self.path_env())
            .env("CATHEDRAL_STATE_DIR", self.path("state"))
            .env_remove("CATHEDRAL_PLIST");
        c
    }

    pub fn launchctl_cmd(&self, args: &[&str]) -> Output {
        Command::new(self.launchctl())
            .args(args)
            .output()
            .expect("run launchctl emulator")
    }

    /// Labels loaded in the emulator.
    pub fn loaded(&self) -> Vec<String> {
        std::fs::read_dir(self.path("launchd/jobs"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Boot out everything and wait (bounded) so no server outlives the test.
        for label in self.loaded() {
            let _ = self.launchctl_cmd(&["bootout", &format!("{}/{label}", Self::domain())]);
        }
        let t0 = Instant::now();
        while !self.loaded().is_empty() && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A minimal, valid LaunchAgent running `args`.
pub fn agent_xml(label: &str, args: &[&str], extra: &str) -> String {
    let args: String = args
        .iter()
        .map(|a| {
            format!(
                "\t\t<string>{}</string>\n",
                a.replace('&', "&amp;").replace('<', "&lt;")
            )
        })
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n<plist version=\"1.0\">\n<dict>\n\t<key>Label</key>\n\t<string>{label}</string>\n\t<key>ProgramArguments</key>\n\t<array>\n{args}\t</array>\n{extra}</dict>\n</plist>\n"
    )
}

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn pid_alive(pid: u32) -> bool {
    if !Path::new("/proc/self/stat").exists() {
        return rustix::process::Pid::from_raw(pid as i32)
            .is_some_and(|p| rustix::process::test_kill_process(p).is_ok());
    }
    // A zombie still answers kill(0); /proc tells the truth on Linux.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
