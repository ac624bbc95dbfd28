//! Shared by the server tests: the tiny checkpoint (written once per test binary),
//! certificates made with `certs.rs`, and a real `cathedral serve` process on 127.0.0.1:0.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cathedral_runtime::certs::{CertAuthority, CertBundle, Identity, ServerName, Validity};
use cathedral_runtime::client::{mtls_client, ClientTls};

pub const BIN: &str = env!("CARGO_BIN_EXE_cathedral");

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("runtime/ has a parent")
        .to_path_buf()
}

pub fn python() -> PathBuf {
    repo_root().join(".venv/bin/python")
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
        let status = Command::new(BIN)
            .args(["tiny-model", "--out"])
            .arg(&out)
            .status()
            .expect("run cathedral tiny-model");
        assert!(status.success(), "cathedral tiny-model failed");
        out
    })
}

/// A CA, a server certificate for localhost/127.0.0.1, and client certificates:
/// `admin` (named in --admin-identity), `user`, an expired `late`, and `stranger` from another CA.
pub struct Certs {
    pub dir: PathBuf,
    pub ca: CertBundle,
    pub server: CertBundle,
}

impl Certs {
    pub fn get() -> &'static Certs {
        static CERTS: OnceLock<Certs> = OnceLock::new();
        CERTS.get_or_init(|| {
            let dir = scratch().join("certs");
            let ca = CertAuthority::generate("test CA", Validity::days(2)).unwrap();
            let ca_bundle = CertBundle::in_dir(&dir, "ca");
            ca.write(&ca_bundle).unwrap();
            let server = CertBundle::in_dir(&dir, "server");
            ca.issue_server(
                &[
                    "localhost".parse::<ServerName>().unwrap(),
                    "127.0.0.1".parse().unwrap(),
                ],
                Validity::days(2),
            )
            .unwrap()
            .write(&server)
            .unwrap();
            for name in ["admin", "user"] {
                ca.issue_client(&Identity::new(name).unwrap(), Validity::days(2))
                    .unwrap()
                    .write(&CertBundle::in_dir(&dir, name))
                    .unwrap();
            }
            ca.issue_client(&Identity::new("late").unwrap(), Validity::expired())
                .unwrap()
                .write(&CertBundle::in_dir(&dir, "late"))
                .unwrap();
            let other = CertAuthority::generate("other CA", Validity::days(2)).unwrap();
            other
                .issue_client(&Identity::new("stranger").unwrap(), Validity::days(2))
                .unwrap()
                .write(&CertBundle::in_dir(&dir, "stranger"))
                .unwrap();
            Certs {
                dir: dir.clone(),
                ca: ca_bundle,
                server,
            }
        })
    }

    pub fn client(&self, name: &str) -> CertBundle {
        CertBundle::in_dir(&self.dir, name)
    }

    pub fn tls(&self, name: &str) -> ClientTls {
        let b = self.client(name);
        ClientTls {
            ca: self.ca.cert.clone(),
            cert: b.cert,
            key: b.key,
        }
    }

    pub fn http(&self, name: &str) -> reqwest::Client {
        mtls_client(&self.tls(name), Duration::from_secs(120)).expect("mTLS client")
    }
}

/// A running `cathedral serve`; SIGKILLed on drop if still running.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub plain: Option<SocketAddr>,
    pub kill_switch: PathBuf,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the server on the tiny model with `extra` flags and waits for its ready line.
    pub fn start(name: &str, model: &Path, extra: &[&str]) -> Server {
        let certs = Certs::get();
        Self::start_with_cert(name, model, extra, &certs.server)
    }

    /// Like [`Server::start`], serving the given certificate files.
    pub fn start_with_cert(
        name: &str,
        model: &Path,
        extra: &[&str],
        server_cert: &CertBundle,
    ) -> Server {
        let certs = Certs::get();
        let kill_switch = scratch().join(format!("{name}-kill-switch.json"));
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(&server_cert.cert)
            .arg("--tls-key")
            .arg(&server_cert.key)
            .arg("--client-ca")
            .arg(&certs.ca.cert)
            .args(["--admin-identity", "admin"])
            .arg("--kill-switch")
            .arg(&kill_switch)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn cathedral serve");
        let log = Arc::new(Mutex::new(String::new()));
        {
            let log = log.clone();
            let mut stderr = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
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
        let field = |key: &str| -> Option<SocketAddr> {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(|a| a.parse().expect("address in ready line"))
        };
        Server {
            child,
            addr: field("mtls=https://").expect("mtls address"),
            plain: field("plain=http://"),
            kill_switch,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    pub fn base(&self) -> String {
        self.url("/v1")
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }

    /// Waits for exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit in time:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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

/// A PNG of `w`×`h` with a simple gradient, as a data URL.
pub fn png_data_url(w: u32, h: u32) -> String {
    use base64::Engine as _;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 128])
    });
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}
