//! Shared by the canary's end-to-end tests: the workspace binaries (built once per test
//! process), the tiny checkpoint, certificates, a real `cathedral serve` on 127.0.0.1:0, and
//! `cathedralctl canary watch` processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cathedral_canary::store::{Record, Store};
use cathedral_runtime::certs::{CertAuthority, CertBundle, Identity, ServerName, Validity};
use cathedral_runtime::client::ClientTls;
use chrono::{DateTime, Utc};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("canary/ is inside the repository")
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

/// Newest modification time of the sources the two binaries are built from.
fn newest_source() -> std::time::SystemTime {
    fn walk(path: &Path, newest: &mut std::time::SystemTime) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                walk(&entry.path(), newest);
            }
        } else if let Ok(m) = meta.modified() {
            *newest = (*newest).max(m);
        }
    }
    let root = repo_root();
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for dir in ["runtime", "controller", "canary", "upstream-scanner"] {
        walk(&root.join(dir).join("src"), &mut newest);
        walk(&root.join(dir).join("Cargo.toml"), &mut newest);
    }
    walk(&root.join("Cargo.toml"), &mut newest);
    walk(&root.join("Cargo.lock"), &mut newest);
    newest
}

/// The runtime and controller binaries, built once per test process when missing or older
/// than their sources. `cargo test --workspace` has built them already; building them again
/// with this package's feature set would only recompile shared dependencies.
fn binaries() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        let dir = target_debug();
        let bins = (dir.join("cathedral"), dir.join("cathedralctl"));
        let built_at = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let newest = newest_source();
        let fresh = [&bins.0, &bins.1]
            .iter()
            .all(|b| built_at(b).is_some_and(|t| t >= newest));
        if fresh {
            return bins;
        }
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "cathedral-runtime",
                "--bin",
                "cathedral",
                "-p",
                "cathedral-controller",
                "--bin",
                "cathedralctl",
            ])
            .current_dir(repo_root())
            .status()
            .expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of cathedral and cathedralctl failed"
        );
        assert!(
            bins.0.is_file() && bins.1.is_file(),
            "binaries missing in {}",
            dir.display()
        );
        bins
    })
}

pub fn cathedral_bin() -> &'static Path {
    &binaries().0
}

pub fn cathedralctl_bin() -> &'static Path {
    &binaries().1
}

/// A command for a workspace binary. On Linux the MLX CPU library sits in the repository's
/// `.mlx`, which only the runtime's own binaries carry an rpath to.
pub fn command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    let lib = repo_root().join(".mlx/mlx-wheel/mlx/lib");
    if lib.is_dir() {
        let mut paths = vec![lib];
        if let Some(existing) = std::env::var_os("LD_LIBRARY_PATH") {
            paths.extend(std::env::split_paths(&existing));
        }
        cmd.env(
            "LD_LIBRARY_PATH",
            std::env::join_paths(paths).expect("library path"),
        );
    }
    cmd
}

/// A scratch directory that lives as long as the test binary.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
}

/// The tiny checkpoint from `cathedral tiny-model`, written once per test binary.
pub fn tiny_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = scratch().join("tiny-model");
        let status = command(cathedral_bin())
            .args(["tiny-model", "--out"])
            .arg(&out)
            .status()
            .expect("run cathedral tiny-model");
        assert!(status.success(), "cathedral tiny-model failed");
        out
    })
}

/// A CA, a server certificate for localhost, and the client `canary` (an admin identity of
/// every test server).
pub struct Certs {
    pub ca: CertBundle,
    pub server: CertBundle,
    pub canary: CertBundle,
}

impl Certs {
    pub fn get() -> &'static Certs {
        static CERTS: OnceLock<Certs> = OnceLock::new();
        CERTS.get_or_init(|| {
            let dir = scratch().join("certs");
            let ca = CertAuthority::generate("canary test CA", Validity::days(2)).unwrap();
            let certs = Certs {
                ca: CertBundle::in_dir(&dir, "ca"),
                server: CertBundle::in_dir(&dir, "server"),
                canary: CertBundle::in_dir(&dir, "canary"),
            };
            ca.write(&certs.ca).unwrap();
            ca.issue_server(
                &["localhost".parse::<ServerName>().unwrap()],
                Validity::days(2),
            )
            .unwrap()
            .write(&certs.server)
            .unwrap();
            ca.issue_client(&Identity::new("canary").unwrap(), Validity::days(2))
                .unwrap()
                .write(&certs.canary)
                .unwrap();
            certs
        })
    }

    pub fn tls(&self) -> ClientTls {
        ClientTls {
            ca: self.ca.cert.clone(),
            cert: self.canary.cert.clone(),
            key: self.canary.key.clone(),
        }
    }

    /// `--target`-less flags of `cathedralctl canary watch` / `probe` for the canary identity.
    pub fn flags(&self) -> Vec<String> {
        let p = |p: &Path| p.display().to_string();
        vec![
            "--cert".into(),
            p(&self.canary.cert),
            "--key".into(),
            p(&self.canary.key),
            "--ca".into(),
            p(&self.ca.cert),
        ]
    }
}

/// A running `cathedral serve` on the tiny model; SIGKILLed on drop if still running.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub kill_switch: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the server (`canary` is an admin identity) and waits for its ready line.
    pub fn start(kill_switch: &Path, vision_enabled: bool) -> Server {
        let certs = Certs::get();
        let mut cmd = command(cathedral_bin());
        cmd.arg("serve")
            .arg("--model")
            .arg(tiny_model())
            .args(["--listen", "127.0.0.1:0", "--no-plain"])
            .arg("--tls-cert")
            .arg(&certs.server.cert)
            .arg("--tls-key")
            .arg(&certs.server.key)
            .arg("--client-ca")
            .arg(&certs.ca.cert)
            .args(["--admin-identity", "canary"])
            .arg("--kill-switch")
            .arg(kill_switch)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if vision_enabled {
            cmd.arg("--vision-enabled");
        }
        let mut child = cmd.spawn().expect("spawn cathedral serve");
        let log = drain(child.stderr.take().unwrap());
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let ready = loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.starts_with("cathedral listening") => break line,
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("server exited early ({status}):\n{}", log.lock().unwrap());
                    }
                    assert!(
                        Instant::now() < deadline,
                        "server not ready in time:\n{}",
                        log.lock().unwrap()
                    );
                }
            }
        };
        let addr = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("mtls=https://"))
            .expect("mtls address in the ready line")
            .parse()
            .expect("socket address");
        Server {
            child,
            addr,
            kill_switch: kill_switch.to_owned(),
            log,
        }
    }

    /// The URL a client uses (the certificate names localhost).
    pub fn target(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, then wait (bounded) for the exit.
    pub fn stop(mut self) {
        signal(self.child.id(), "TERM");
        wait_exit(&mut self.child, Duration::from_secs(30), "server");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Collects a child's stream in the background.
fn drain(mut stream: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    log
}

/// Sends a signal by name with kill(1).
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

pub fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} did not exit in time");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `cathedralctl canary watch` process (interval 1 s, window 10 s) with its stderr kept.
pub struct WatchProcess {
    pub child: Child,
    log: Arc<Mutex<String>>,
}

impl WatchProcess {
    pub fn spawn(target: &str, state: &Path, extra: &[&str]) -> WatchProcess {
        let mut child = command(cathedralctl_bin())
            .args(["canary", "watch", "--target", target])
            .args(Certs::get().flags())
            .args(["--interval", "1s", "--window", "10s", "--state"])
            .arg(state)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cathedralctl canary watch");
        let log = drain(child.stderr.take().unwrap());
        WatchProcess { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for it to exit by itself (`--run-for`) and checks it exited cleanly.
    pub fn finish(mut self, limit: Duration) {
        let status = wait_exit(&mut self.child, limit, "watcher");
        assert!(
            status.success(),
            "watcher failed ({status}):\n{}",
            self.log()
        );
    }
}

impl Drop for WatchProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sleeps until `offset` past the next multiple of `window` (wall clock), so a test's windows
/// are whole; returns that window's start.
pub fn align(window: Duration, offset: Duration) -> DateTime<Utc> {
    let ms = window.as_millis() as i64;
    let now = Utc::now().timestamp_millis();
    let next = now - now.rem_euclid(ms) + ms;
    let wake = next + offset.as_millis() as i64;
    std::thread::sleep(Duration::from_millis((wake - now) as u64));
    DateTime::from_timestamp_millis(next).unwrap()
}

/// Sleeps until `at` (wall clock), if it is still ahead.
pub fn sleep_until(at: DateTime<Utc>) {
    if let Ok(d) = (at - Utc::now()).to_std() {
        std::thread::sleep(d);
    }
}

pub fn records(state: &Path) -> Vec<Record> {
    Store::read(state).expect("read the canary store")
}
