//! The field report's deploy, end to end: the real `cathedral` runtime with the tiny model
//! under the launchctl emulator, rendered from `deploy/runtime.plist.template`, deployed,
//! probed over mTLS, rolled back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use cathedral_controller::agent::{Label, LaunchAgent, PlistPath};
use cathedral_controller::health::{HealthGate, ProbeGate, ProbeTarget};
use cathedral_controller::launchd::{Domain, Launchd, ServiceManager};
use cathedral_controller::ledger::{self, Outcome};
use cathedral_controller::template::RuntimeAgentValues;
use common::*;

const LABEL: &str = "com.cathedral.runtime";

struct Runtime {
    sb: Sandbox,
    plist: PathBuf,
    port: u16,
    original: Vec<u8>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_ok(mut c: std::process::Command, what: &str) -> Output {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    out
}

/// A release directory holding the real runtime under a new path.
fn release(sb: &Sandbox, name: &str) -> PathBuf {
    let dir = sb.path(&format!("releases/{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("cathedral");
    std::os::unix::fs::symlink(cathedral_bin(), &bin).unwrap();
    bin
}

/// Tiny model, certificates, the rendered runtime agent, loaded and healthy (text only).
fn start_runtime(linger_ms: u64) -> Runtime {
    let sb = Sandbox::new();
    if linger_ms > 0 {
        let w = std::fs::read_to_string(sb.launchctl()).unwrap().replace(
            " exec ",
            &format!(" CATHEDRAL_LAUNCHCTL_EMULATOR_TEARDOWN_LINGER_MS={linger_ms} exec "),
        );
        std::fs::write(sb.launchctl(), w).unwrap();
    }
    let mut c = std::process::Command::new(cathedral_bin());
    c.args(["tiny-model", "--out"]).arg(sb.path("model"));
    run_ok(c, "cathedral tiny-model");
    let mut c = sb.ctl(&["certs", "init", "--out"]);
    c.arg(sb.path("certs")).args([
        "--server-name",
        "localhost",
        "--server-name",
        "127.0.0.1",
        "--client",
        "operator",
    ]);
    run_ok(c, "cathedralctl certs init");
    let port = free_port();
    let values = RuntimeAgentValues {
        label: Label::new(LABEL).unwrap(),
        binary: release(&sb, "old"),
        model_dir: sb.path("model"),
        listen: format!("127.0.0.1:{port}"),
        tls_cert: sb.path("certs/server.pem"),
        tls_key: sb.path("certs/server.key"),
        client_ca: sb.path("certs/ca.pem"),
        admin_identity: "operator".into(),
        kill_switch: sb.path("state/kill-switch"),
        working_dir: sb.dir.path().to_path_buf(),
        log_dir: sb.path("logs"),
        rust_log: "info".into(),
    };
    let (text, _) = values.render().unwrap();
    let plist = sb.path(&format!("agents/{LABEL}.plist"));
    std::fs::write(&plist, &text).unwrap();
    let l = Launchd::with_launchctl(sb.launchctl(), Domain::Gui(Sandbox::uid()));
    let label = Label::new(LABEL).unwrap();
    let pp = PlistPath::new(&plist).unwrap();
    let r = l.restart(&label, &pp).unwrap();
    let agent = LaunchAgent::load(&pp).unwrap().0;
    let mut gate = ProbeGate::new(ProbeTarget {
        server_name: "localhost".into(),
        ..ProbeTarget::default()
    });
    gate.ready_timeout = Duration::from_secs(120);
    gate.check(&l, &label, &agent, r.pid)
        .unwrap_or_else(|e| panic!("initial runtime unhealthy: {e}\n{}", log_tail(&sb)));
    Runtime {
        original: text.into_bytes(),
        sb,
        plist,
        port,
    }
}

fn log_tail(sb: &Sandbox) -> String {
    let s = std::fs::read_to_string(sb.path("logs/runtime.err.log")).unwrap_or_default();
    s.lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

impl Runtime {
    /// `cathedralctl probe` over mTLS; returns its output.
    fn probe(&self, kind: &str) -> Output {
        let mut c = self.sb.ctl(&["probe", kind, "--target"]);
        c.arg(format!("https://127.0.0.1:{}", self.port))
            .arg("--cert")
            .arg(self.sb.path("certs/clients/operator.pem"))
            .arg("--key")
            .arg(self.sb.path("certs/clients/operator.key"))
            .arg("--ca")
            .arg(self.sb.path("certs/ca.pem"))
            .args(["--timeout", "60s"]);
        c.output().unwrap()
    }

    fn deploy(&self, binary: &Path, extra: &[&str]) -> std::process::Command {
        let mut c = self.sb.ctl(&["deploy", "--plist"]);
        c.arg(&self.plist)
            .arg("--binary")
            .arg(binary)
            .args(["--health-timeout", "120s"])
            .args(extra);
        c
    }

    fn status(&self) -> cathedral_controller::launchd::ServiceStatus {
        Launchd::with_launchctl(self.sb.launchctl(), Domain::Gui(Sandbox::uid()))
            .status(&Label::new(LABEL).unwrap())
            .unwrap()
            .expect("service loaded")
    }

    fn ledger(&self) -> Vec<ledger::LedgerEntry> {
        ledger::read(&ledger::path_in(&self.sb.path("state"))).unwrap()
    }
}

/// The `load_seconds` the runtime logged for its newest start.
fn last_load_seconds(sb: &Sandbox) -> Option<f64> {
    let log = std::fs::read_to_string(sb.path("logs/runtime.err.log")).ok()?;
    log.lines().rev().find_map(|l| {
        let i = l.find("load_seconds")?;
        l[i..]
            .split(|c: char| c == '"' || c == '=' || c.is_whitespace() || c == '\u{1b}')
            .find_map(|t| {
                t.trim_end_matches('m')
                    .parse::<f64>()
                    .ok()
                    .filter(|v| *v >= 0.0)
            })
    })
}

#[test]
fn field_report_deploy_swaps_the_binary_enables_vision_and_serves() {
    let rt = start_runtime(1000);
    let old_pid = rt.status().pid.unwrap();
    let vision_before = rt.probe("--builtin-image");
    assert!(
        !vision_before.status.success(),
        "vision is gated before the deploy"
    );
    let said = format!("{}{}", stdout(&vision_before), stderr(&vision_before));
    assert!(said.contains("503"), "{said}");

    let new_binary = release(&rt.sb, "d9ddc93");
    let started = Instant::now();
    let mut first = rt.deploy(&new_binary, &["--enable-vision", "--max-rss", "8G"]);
    first.stderr(std::process::Stdio::piped());
    let first = first.spawn().unwrap();
    // A second controller while the first one works is refused.
    let lock = rt.sb.path("state/controller.lock");
    wait_until(
        "the first deploy to hold the lock",
        Duration::from_secs(30),
        || std::fs::read_to_string(&lock).is_ok_and(|s| s.contains(&first.id().to_string())),
    );
    let second = rt
        .deploy(&new_binary, &["--enable-vision"])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains("another cathedralctl is running"),
        "{}",
        stderr(&second)
    );
    let out = first.wait_with_output().unwrap();
    let wall = started.elapsed();
    let err = stderr(&out);
    assert!(
        out.status.success(),
        "deploy failed:\n{err}\n{}",
        log_tail(&rt.sb)
    );

    // The definition: new binary, --vision-enabled right after --no-plain.
    let agent = LaunchAgent::load(&PlistPath::new(&rt.plist).unwrap())
        .unwrap()
        .0;
    assert_eq!(agent.binary(), new_binary);
    let args = agent.program_arguments();
    let np = args.iter().position(|a| a == "--no-plain").unwrap();
    assert_eq!(
        args.get(np + 1).map(String::as_str),
        Some("--vision-enabled")
    );
    assert_eq!(args.iter().filter(|a| *a == "--vision-enabled").count(), 1);
    // Every other key survived the edit.
    let before = LaunchAgent::from_bytes(&rt.original, "original")
        .unwrap()
        .spec();
    let after = agent.spec();
    assert_eq!(
        (after.keep_alive, after.exit_timeout, after.process_type),
        (before.keep_alive, before.exit_timeout, before.process_type)
    );

    // A timestamped backup of the original, byte for byte.
    let backups = cathedral_controller::backup::list(&PlistPath::new(&rt.plist).unwrap()).unwrap();
    assert_eq!(backups.len(), 1);
    let name = backups[0]
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with(&format!("{LABEL}.plist.pre-deploy-"))
            && name.len() == format!("{LABEL}.plist.pre-deploy-").len() + 15,
        "{name}"
    );
    assert_eq!(std::fs::read(&backups[0].path).unwrap(), rt.original);

    // The service came back as a new process, and both probes answer 200.
    let st = rt.status();
    assert_ne!(st.pid, Some(old_pid));
    assert_eq!(st.program.as_deref(), Some(new_binary.as_path()));
    for kind in ["--text", "--builtin-image"] {
        let p = rt.probe(kind);
        assert!(
            p.status.success() && stdout(&p).contains("200"),
            "{kind}: {}{}",
            stdout(&p),
            stderr(&p)
        );
    }

    // The teardown EIO was met and retried inside the deploy.
    let restart_line = err
        .lines()
        .find(|l| l.contains("restart") && l.contains("bootstrap"))
        .unwrap_or_default();
    assert!(
        !restart_line.contains("×1)") && restart_line.contains('×'),
        "{restart_line}"
    );

    // The ledger says so, with step timings.
    let entry = rt.ledger().pop().unwrap();
    assert_eq!(entry.outcome, Outcome::Deployed);
    assert_eq!(entry.to, new_binary);
    assert!(
        entry
            .edits
            .iter()
            .any(|e| e.contains("--vision-enabled after --no-plain")),
        "{:?}",
        entry.edits
    );
    let step = |n: &str| {
        entry
            .steps
            .iter()
            .find(|s| s.step == n)
            .map(|s| s.seconds)
            .unwrap_or_else(|| panic!("no step {n}"))
    };
    let ready = step("health.ready");
    let load = last_load_seconds(&rt.sb).unwrap_or(ready);
    eprintln!(
        "deploy overhead: total {:.2} s (wall {:.2} s), restart {:.2} s [stop {:.2} s, bootstrap {:.2} s, pid {:.2} s], \
         health {:.2} s (first answer {:.2} s after start), model load {:.2} s → overhead {:.2} s",
        entry.total_seconds,
        wall.as_secs_f64(),
        step("restart"),
        step("restart.stop"),
        step("restart.bootstrap"),
        step("restart.pid"),
        step("health"),
        ready,
        load,
        entry.total_seconds - load
    );

    // status tells the story.
    let s = run_ok(
        rt.sb
            .ctl(&["status", "--plist", rt.plist.to_str().unwrap()]),
        "status",
    );
    let s = stdout(&s);
    for want in [
        "state       running",
        "vision      enabled",
        "kill switch released",
        "Deployed",
        "HTTP 200",
    ] {
        assert!(s.contains(want), "status lacks {want:?}:\n{s}");
    }

    // An operator's rollback brings the original back (and it serves text, vision gated).
    let r = run_ok(
        rt.sb.ctl(&[
            "rollback",
            "--plist",
            rt.plist.to_str().unwrap(),
            "--health-timeout",
            "120s",
        ]),
        "rollback",
    );
    assert!(stdout(&r).contains("rolled back"), "{}", stdout(&r));
    assert_eq!(std::fs::read(&rt.plist).unwrap(), rt.original);
    assert!(rt.probe("--text").status.success());
    assert_eq!(rt.ledger().pop().unwrap().outcome, Outcome::ManualRollback);
}

#[test]
fn a_broken_binary_is_rolled_back_and_the_old_one_serves() {
    let rt = start_runtime(0);
    let old_pid = rt.status().pid.unwrap();
    // Answers --version like the real one, then dies at start.
    let broken = rt.sb.path("releases/broken/cathedral");
    std::fs::create_dir_all(broken.parent().unwrap()).unwrap();
    std::fs::write(
        &broken,
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'cathedral 0.1.0'; exit 0; fi\necho 'cannot start: missing mlx.metallib' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();

    let out = rt.deploy(&broken, &["--enable-vision"]).output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("rolled back"), "{err}");
    assert!(
        err.contains("exit code 1"),
        "the reason names the exit: {err}"
    );
    assert_eq!(
        std::fs::read(&rt.plist).unwrap(),
        rt.original,
        "the original definition is live again"
    );
    let st = rt.status();
    assert_ne!(st.pid, Some(old_pid), "restarted");
    assert_eq!(
        st.program.as_deref(),
        Some(rt.sb.path("releases/old/cathedral").as_path())
    );
    let p = rt.probe("--text");
    assert!(
        p.status.success() && stdout(&p).contains("200"),
        "{}",
        stdout(&p)
    );
    let entry = rt.ledger().pop().unwrap();
    assert_eq!(entry.outcome, Outcome::RolledBack);
    assert!(
        entry
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("exit code 1"),
        "{:?}",
        entry.reason
    );
    for s in ["restore", "restart-old", "verify-old"] {
        assert!(
            entry.steps.iter().any(|t| t.step == s),
            "ledger lacks step {s}: {:?}",
            entry.steps
        );
    }
    // The backup of the original is kept for the operator.
    assert_eq!(
        cathedral_controller::backup::list(&PlistPath::new(&rt.plist).unwrap())
            .unwrap()
            .len(),
        1
    );
}
