//! `cathedralctl certs init|issue`, `killswitch`, `backups`, `plist show|lint` and `status`
//! without a GUI session, through the real binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn certs_init_writes_a_ca_server_and_clients_with_private_keys_0600() {
    let sb = Sandbox::new();
    let out = sb
        .ctl(&["certs", "init", "--out"])
        .arg(sb.path("certs"))
        .args(["--server-name", "mini.local", "--server-name", "127.0.0.1"])
        .args(["--client", "operator", "--client", "canary"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for key in [
        "ca.key",
        "server.key",
        "clients/operator.key",
        "clients/canary.key",
    ] {
        assert_eq!(mode(&sb.path(&format!("certs/{key}"))), 0o600, "{key}");
    }
    for cert in [
        "ca.pem",
        "server.pem",
        "clients/operator.pem",
        "clients/canary.pem",
    ] {
        let pem = std::fs::read_to_string(sb.path(&format!("certs/{cert}"))).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
    }
    // A second init never replaces the CA that signed everything.
    let again = sb
        .ctl(&["certs", "init", "--out"])
        .arg(sb.path("certs"))
        .args(["--server-name", "localhost", "--client", "x"])
        .output()
        .unwrap();
    assert!(!again.status.success());

    // More clients from the same CA, without a rotation; re-issuing needs --replace.
    let issue = |extra: &[&str]| {
        sb.ctl(&["certs", "issue", "--dir"])
            .arg(sb.path("certs"))
            .args(extra)
            .output()
            .unwrap()
    };
    let ca = std::fs::read(sb.path("certs/ca.pem")).unwrap();
    let added = issue(&["--client", "laptop"]);
    assert!(added.status.success(), "{}", stderr(&added));
    assert!(stdout(&added).contains("clients/laptop.pem"));
    assert_eq!(mode(&sb.path("certs/clients/laptop.key")), 0o600);
    assert_eq!(std::fs::read(sb.path("certs/ca.pem")).unwrap(), ca);
    let clash = issue(&["--client", "operator"]);
    assert!(!clash.status.success());
    assert!(stderr(&clash).contains("--replace"), "{}", stderr(&clash));
    let replaced = issue(&["--client", "operator", "--replace"]);
    assert!(replaced.status.success(), "{}", stderr(&replaced));
    let kept = std::fs::read_dir(sb.path("certs/clients"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("operator.key.replaced-")
        })
        .count();
    assert_eq!(kept, 1, "the replaced key is kept");
    let nothing = issue(&[]);
    assert!(
        !nothing.status.success(),
        "issue needs --client or --server-name"
    );
}

#[test]
fn killswitch_engage_status_release_through_the_file_named_in_the_plist() {
    let sb = Sandbox::new();
    let ks = sb.path("state/kill-switch");
    let plist = sb.path("agents/rt.plist");
    std::fs::write(
        &plist,
        agent_xml(
            "test.rt",
            &[
                "/opt/cathedral",
                "serve",
                "--kill-switch",
                ks.to_str().unwrap(),
                "--vision-enabled",
            ],
            "",
        ),
    )
    .unwrap();
    let ctl = |args: &[&str]| {
        let out = sb.ctl(args).arg("--plist").arg(&plist).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    assert!(ctl(&["killswitch", "status"]).contains("released"));
    let engaged = ctl(&[
        "killswitch",
        "engage",
        "--reason",
        "3 breached windows",
        "--by",
        "operator",
    ]);
    assert!(engaged.contains("engaged by operator"), "{engaged}");
    assert!(ks.is_file());
    let st = ctl(&["killswitch", "status"]);
    assert!(
        st.contains("ENGAGED by operator") && st.contains("3 breached windows"),
        "{st}"
    );
    // status shows vision switched off by it, and that nothing is loaded (exit 3, as
    // `systemctl status` for a stopped unit).
    let out = sb.ctl(&["status", "--plist"]).arg(&plist).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("not running"), "{}", stderr(&out));
    let status = stdout(&out);
    assert!(
        status.contains("enabled, but disabled by the kill switch"),
        "{status}"
    );
    assert!(status.contains("state       not loaded"), "{status}");
    assert!(ctl(&["killswitch", "release"]).contains("released (was engaged by operator"));
    assert!(!ks.exists());
}

#[test]
fn status_without_a_gui_session_uses_the_user_domain() {
    let sb = Sandbox::new();
    let w = std::fs::read_to_string(sb.launchctl())
        .unwrap()
        .replace(" exec ", " CATHEDRAL_LAUNCHCTL_EMULATOR_NO_GUI=1 exec ");
    std::fs::write(sb.launchctl(), w).unwrap();
    let plist = sb.path("agents/rt.plist");
    std::fs::write(
        &plist,
        agent_xml("test.rt", &["/opt/cathedral", "serve"], ""),
    )
    .unwrap();
    let out = sb.ctl(&["status", "--plist"]).arg(&plist).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "not loaded: {}", stderr(&out));
    let s = stdout(&out);
    assert!(
        s.contains(&format!("(launchd user/{})", Sandbox::uid())),
        "{s}"
    );
}

#[test]
fn backups_are_listed_newest_first_and_pruned_and_plist_tools_agree() {
    let sb = Sandbox::new();
    let plist = sb.path("agents/rt.plist");
    std::fs::write(
        &plist,
        agent_xml("test.rt", &["/opt/cathedral", "serve", "--no-plain"], ""),
    )
    .unwrap();
    let p = plist.to_str().unwrap();
    for (i, flag) in ["--a", "--b", "--c"].iter().enumerate() {
        let out = sb
            .ctl(&[
                "plist",
                "edit",
                "--plist",
                p,
                "--insert-flag",
                flag,
                "--tag",
                &format!("step{i}"),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let list = stdout(&sb.ctl(&["backups", "--plist", p]).output().unwrap());
    let tags: Vec<&str> = list
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    assert_eq!(tags, ["step2", "step1", "step0"], "{list}");
    let pruned = stdout(
        &sb.ctl(&["backups", "--plist", p, "--prune", "1"])
            .output()
            .unwrap(),
    );
    assert_eq!(
        pruned.lines().filter(|l| l.starts_with("deleted")).count(),
        2,
        "{pruned}"
    );
    // The oldest backup left is the definition before the last edit.
    let left = cathedral_controller::backup::list(
        &cathedral_controller::agent::PlistPath::new(&plist).unwrap(),
    )
    .unwrap();
    let agent = cathedral_controller::agent::LaunchAgent::from_bytes(
        &std::fs::read(&left[0].path).unwrap(),
        "b",
    )
    .unwrap();
    assert_eq!(agent.flags(), ["serve", "--no-plain", "--a", "--b"]);
    let lint = sb.ctl(&["plist", "lint", "--plist", p]).output().unwrap();
    assert!(
        lint.status.success() && stdout(&lint).contains("OK"),
        "{}",
        stderr(&lint)
    );
    let show = stdout(&sb.ctl(&["plist", "show", "--plist", p]).output().unwrap());
    assert!(show.contains("\"--c\""), "{show}");
}

#[test]
fn status_exits_1_when_the_service_runs_but_fails_its_probe() {
    let sb = Sandbox::new();
    let plist = sb.path("agents/rt.plist");
    // A process that runs but serves nothing on the address its definition names.
    std::fs::write(
        &plist,
        agent_xml(
            "test.silent",
            &[
                "/bin/sh",
                "-c",
                "sleep 600",
                "serve",
                "--listen",
                "127.0.0.1:9",
            ],
            "\t<key>RunAtLoad</key>\n\t<true/>\n",
        ),
    )
    .unwrap();
    let boot = sb.launchctl_cmd(&["bootstrap", &Sandbox::domain(), plist.to_str().unwrap()]);
    assert!(boot.status.success(), "{}", stderr(&boot));
    let status = || sb.ctl(&["status", "--plist"]).arg(&plist).output().unwrap();
    wait_until("the job to run", Duration::from_secs(20), || {
        stdout(&status()).contains("state       running")
    });
    let out = status();
    let report = stdout(&out);
    assert!(report.contains("UNHEALTHY"), "{report}");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let stop = sb.launchctl_cmd(&["bootout", &format!("{}/test.silent", Sandbox::domain())]);
    assert!(stop.status.success(), "{}", stderr(&stop));
}
