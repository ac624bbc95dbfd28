//! `cathedralctl install` / `uninstall` under the launchctl emulator with the real runtime and
//! the tiny model: agents rendered and started, the runtime serving over mTLS, the canary
//! watcher probing it; a second install changes nothing; uninstall stops everything and
//! keeps a backup of each plist it removes.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, std::time::SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
                m.modified().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn install_is_idempotent_serves_and_uninstall_keeps_backups() {
    let sb = Sandbox::new();
    let model = sb.path("model");
    let out = std::process::Command::new(cathedral_bin())
        .args(["tiny-model", "--out"])
        .arg(&model)
        .output()
        .unwrap();
    ok(out, "cathedral tiny-model");

    let port = free_port();
    let prefix = sb.path("home");
    let agents = sb.path("agents");
    let listen = format!("127.0.0.1:{port}");
    let install_args = |extra: &[&str]| {
        let mut c = sb.ctl(&["install", "--model"]);
        c.arg(&model)
            .arg("--prefix")
            .arg(&prefix)
            .arg("--agents-dir")
            .arg(&agents)
            .arg("--binary")
            .arg(cathedral_bin())
            .args(["--listen", &listen, "--domain", &Sandbox::domain()])
            .args(["--canary-interval", "1s", "--canary-window", "4s"])
            .args(extra);
        c
    };

    // A dry run on a fresh machine says what it would do and touches nothing.
    let dry = ok(
        install_args(&["--dry-run"]).output().unwrap(),
        "install --dry-run",
    );
    assert!(dry.contains("would create"), "{dry}");
    assert!(!prefix.exists() && std::fs::read_dir(&agents).unwrap().next().is_none());
    assert!(sb.loaded().is_empty());

    let first = ok(install_args(&[]).output().unwrap(), "install");
    assert!(first.contains("com.cathedral.runtime"), "{first}");
    assert!(
        first.contains("certificates in") && first.contains("created"),
        "{first}"
    );
    for f in [
        "certs/ca.pem",
        "certs/server.key",
        "certs/clients/operator.pem",
        "certs/clients/canary.key",
        "logs",
        "canary",
    ] {
        assert!(prefix.join(f).exists(), "{f} missing after install");
    }
    let mut labels = sb.loaded();
    labels.sort();
    assert_eq!(labels, ["com.cathedral.canary", "com.cathedral.runtime"]);

    // The runtime answers over mTLS with the operator's certificate...
    let target = format!("https://127.0.0.1:{port}");
    let certs = prefix.join("certs");
    let probe = || {
        let mut c = sb.ctl(&["probe", "--target", &target, "--text", "--cert"]);
        c.arg(certs.join("clients/operator.pem"))
            .arg("--key")
            .arg(certs.join("clients/operator.key"))
            .arg("--ca")
            .arg(certs.join("ca.pem"));
        c.output().unwrap()
    };
    wait_until(
        "the installed runtime to answer",
        Duration::from_secs(90),
        || probe().status.success(),
    );
    // ...and the canary watcher agent records probes in its state directory.
    wait_until("canary probe records", Duration::from_secs(60), || {
        std::fs::read_dir(prefix.join("canary"))
            .map(|rd| {
                rd.flatten().any(|e| {
                    std::fs::read_to_string(e.path()).is_ok_and(|s| {
                        s.contains("\"status\":200") || s.contains("\"status\": 200")
                    })
                })
            })
            .unwrap_or(false)
    });

    // Second install: nothing changes — same bytes, same mtimes, nothing restarted.
    let before = snapshot(&agents);
    let pids_before = std::fs::read_dir(sb.path("launchd/jobs"))
        .map(|_| {
            sb.launchctl_cmd(&[
                "print",
                &format!("{}/com.cathedral.runtime", Sandbox::domain()),
            ])
        })
        .unwrap();
    let second = ok(install_args(&[]).output().unwrap(), "second install");
    assert!(second.contains("nothing to do"), "{second}");
    assert_eq!(before, snapshot(&agents));
    let pids_after = sb.launchctl_cmd(&[
        "print",
        &format!("{}/com.cathedral.runtime", Sandbox::domain()),
    ]);
    let pid = |o: &std::process::Output| {
        stdout(o)
            .lines()
            .find(|l| l.trim_start().starts_with("pid ="))
            .map(str::to_string)
    };
    assert!(pid(&pids_before).is_some());
    assert_eq!(
        pid(&pids_before),
        pid(&pids_after),
        "second install restarted the runtime"
    );

    // A deploy changes the live definition; installing again keeps it (never undoes a deploy).
    let runtime_plist = agents.join("com.cathedral.runtime.plist");
    let deployed = std::fs::read_to_string(&runtime_plist).unwrap().replace(
        "<string>--no-plain</string>",
        "<string>--no-plain</string>\n\t\t<string>--vision-enabled</string>",
    );
    std::fs::write(&runtime_plist, &deployed).unwrap();
    let third = ok(
        install_args(&[]).output().unwrap(),
        "install after a deploy",
    );
    assert!(third.contains("kept"), "{third}");
    assert_eq!(std::fs::read_to_string(&runtime_plist).unwrap(), deployed);

    // Uninstall: services gone, plists removed, a backup of each kept, records kept.
    let un = ok(
        sb.ctl(&["uninstall", "--prefix"])
            .arg(&prefix)
            .arg("--agents-dir")
            .arg(&agents)
            .args(["--domain", &Sandbox::domain()])
            .output()
            .unwrap(),
        "uninstall",
    );
    assert!(un.contains("backup"), "{un}");
    wait_until("every agent unloaded", Duration::from_secs(30), || {
        sb.loaded().is_empty()
    });
    let left: Vec<String> = std::fs::read_dir(&agents)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for label in ["com.cathedral.runtime", "com.cathedral.canary"] {
        assert!(!left.contains(&format!("{label}.plist")), "{left:?}");
        assert!(
            left.iter()
                .any(|f| f.starts_with(&format!("{label}.plist.pre-uninstall-"))),
            "no backup of {label}: {left:?}"
        );
    }
    assert!(prefix.join("certs/ca.pem").exists());
}
