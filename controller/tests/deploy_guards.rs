//! The guards of `cathedralctl deploy` and `plist edit` that act before any restart: dry
//! run, corrupt definitions, the controller lock, the rollback streak, and atomic writes
//! under `kill -9`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cathedral_controller::agent::LaunchAgent;
use cathedral_controller::ledger::{self, LedgerEntry, Outcome};
use cathedral_controller::lock::ControllerLock;
use common::*;

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap_or_default(),
                );
            }
        }
    }
    out
}

fn runtime_agent(sb: &Sandbox) -> std::path::PathBuf {
    let cathedral = cathedral_bin();
    let p = sb.path("agents/com.cathedral.runtime.plist");
    let xml = agent_xml(
        "com.cathedral.runtime",
        &[
            cathedral.to_str().unwrap(),
            "serve",
            "--listen",
            "127.0.0.1:9",
            "--no-plain",
        ],
        "\t<key>KeepAlive</key>\n\t<dict>\n\t\t<key>SuccessfulExit</key>\n\t\t<false/>\n\t</dict>\n",
    );
    std::fs::write(&p, xml).unwrap();
    p
}

#[test]
fn dry_run_prints_the_diff_and_changes_no_byte() {
    let sb = Sandbox::new();
    let plist = runtime_agent(&sb);
    let new_binary = sb.path("bin-new/cathedral");
    std::fs::create_dir_all(new_binary.parent().unwrap()).unwrap();
    std::fs::copy(cathedral_bin(), &new_binary).unwrap();
    let before = snapshot(sb.dir.path());
    let out = sb
        .ctl(&[
            "deploy",
            "--plist",
            plist.to_str().unwrap(),
            "--binary",
            new_binary.to_str().unwrap(),
            "--enable-vision",
            "--dry-run",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let diff = stdout(&out);
    assert!(
        diff.contains(&format!("+\t\t<string>{}</string>", new_binary.display())),
        "{diff}"
    );
    assert!(
        diff.contains("+\t\t<string>--vision-enabled</string>"),
        "{diff}"
    );
    assert!(diff.contains("nothing changed"), "{diff}");
    assert_eq!(snapshot(sb.dir.path()), before, "a dry run wrote something");
    assert!(sb.loaded().is_empty(), "a dry run loaded a service");
}

#[test]
fn a_corrupt_plist_is_refused_and_left_untouched() {
    let sb = Sandbox::new();
    let plist = runtime_agent(&sb);
    let full = std::fs::read(&plist).unwrap();
    let torn = &full[..full.len() * 2 / 3];
    std::fs::write(&plist, torn).unwrap();
    let out = sb
        .ctl(&[
            "deploy",
            "--plist",
            plist.to_str().unwrap(),
            "--binary",
            cathedral_bin().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a property list"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&plist).unwrap(), torn);
    let agents: Vec<_> = std::fs::read_dir(sb.path("agents")).unwrap().collect();
    assert_eq!(agents.len(), 1, "no backup or temp file next to it");

    // Valid XML that is not a valid service definition is refused the same way.
    let bad = String::from_utf8(full)
        .unwrap()
        .replace("<string>serve</string>", "<integer>1</integer>");
    std::fs::write(&plist, &bad).unwrap();
    let out = sb
        .ctl(&[
            "plist",
            "edit",
            "--plist",
            plist.to_str().unwrap(),
            "--insert-flag",
            "--x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ProgramArguments[1] is not a string"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_to_string(&plist).unwrap(), bad);
}

#[test]
fn a_second_controller_is_refused() {
    let sb = Sandbox::new();
    let plist = runtime_agent(&sb);
    let before = std::fs::read(&plist).unwrap();
    let held = ControllerLock::acquire(&sb.path("state"), "deploy (held by the test)").unwrap();
    let out = sb
        .ctl(&[
            "deploy",
            "--plist",
            plist.to_str().unwrap(),
            "--binary",
            cathedral_bin().to_str().unwrap(),
            "--enable-vision",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("another cathedralctl is running"), "{err}");
    assert!(err.contains("held by the test"), "{err}");
    assert_eq!(std::fs::read(&plist).unwrap(), before);
    drop(held);
    // Released: an edit goes through.
    let out = sb
        .ctl(&[
            "plist",
            "edit",
            "--plist",
            plist.to_str().unwrap(),
            "--insert-flag",
            "--vision-enabled",
            "--after",
            "--no-plain",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn three_automatic_rollbacks_in_a_row_stop_further_deploys() {
    let sb = Sandbox::new();
    let plist = runtime_agent(&sb);
    let agent = LaunchAgent::from_bytes(&std::fs::read(&plist).unwrap(), "p").unwrap();
    let ledger_path = ledger::path_in(&sb.path("state"));
    for _ in 0..3 {
        ledger::append(
            &ledger_path,
            &LedgerEntry {
                when: chrono::Local::now(),
                who: "test".into(),
                plist: plist.clone(),
                label: agent.label().to_string(),
                from: agent.binary(),
                to: "/broken/cathedral".into(),
                to_version: None,
                flags_before: agent.flags(),
                flags_after: agent.flags(),
                edits: vec![],
                outcome: Outcome::RolledBack,
                reason: Some("health: died".into()),
                backup: None,
                steps: vec![],
                total_seconds: 1.0,
            },
        )
        .unwrap();
    }
    let before = std::fs::read(&plist).unwrap();
    let out = sb
        .ctl(&[
            "deploy",
            "--plist",
            plist.to_str().unwrap(),
            "--binary",
            cathedral_bin().to_str().unwrap(),
            "--enable-vision",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&plist).unwrap(), before);
    let entries = ledger::read(&ledger_path).unwrap();
    assert_eq!(entries.last().unwrap().outcome, Outcome::Refused);
}

#[test]
fn kill_9_during_a_write_leaves_the_old_or_the_new_plist_never_a_mix() {
    let sb = Sandbox::new();
    let plist = sb.path("agents/big.plist");
    // A large definition so that the write takes long enough to be interrupted.
    let padding: String = (0..60_000)
        .map(|i| format!("\t\t<string>padding entry {i:06} keeps the file large</string>\n"))
        .collect();
    let extra = format!("\t<key>Padding</key>\n\t<array>\n{padding}\t</array>\n");
    let cathedral = cathedral_bin();
    let old = agent_xml(
        "test.big",
        &[cathedral.to_str().unwrap(), "serve", "--no-plain"],
        &extra,
    );
    let edit = |c: &mut std::process::Command| {
        c.args([
            "plist",
            "edit",
            "--plist",
            plist.to_str().unwrap(),
            "--insert-flag",
            "--vision-enabled",
            "--after",
            "--no-plain",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    };
    // The result of an uninterrupted edit, and how long one takes.
    std::fs::write(&plist, &old).unwrap();
    let t0 = Instant::now();
    let mut c = sb.ctl(&[]);
    edit(&mut c);
    assert!(c.status().unwrap().success());
    let full = t0.elapsed();
    let new = std::fs::read(&plist).unwrap();
    assert_ne!(new, old.as_bytes());
    let iterations = 16u32;
    let mut interrupted = 0;
    for i in 0..iterations {
        std::fs::write(&plist, &old).unwrap();
        let mut c = sb.ctl(&[]);
        edit(&mut c);
        let mut child = c.spawn().unwrap();
        std::thread::sleep(full * i / iterations);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if !status.success() {
            interrupted += 1;
        }
        let now = std::fs::read(&plist).unwrap();
        assert!(
            now == old.as_bytes() || now == new,
            "iteration {i}: the plist is neither the old nor the new one ({} bytes)",
            now.len()
        );
        LaunchAgent::from_bytes(&now, "after kill").unwrap();
    }
    eprintln!("{interrupted}/{iterations} edits killed before finishing (full edit {full:?})");
    // The next controller sweeps what killed writers left and still works.
    std::fs::write(&plist, &old).unwrap();
    let mut c = sb.ctl(&[]);
    edit(&mut c);
    assert!(c.status().unwrap().success());
    assert_eq!(std::fs::read(&plist).unwrap(), new);
    let temps: Vec<_> = std::fs::read_dir(sb.path("agents"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("cathedralctl-tmp"))
        .collect();
    assert!(temps.is_empty(), "temp files left: {temps:?}");
    let backups = cathedral_controller::backup::list(
        &cathedral_controller::agent::PlistPath::new(&plist).unwrap(),
    )
    .unwrap();
    assert!(
        !backups.is_empty() && backups.len() <= 10,
        "{} backups",
        backups.len()
    );
    let _ = Duration::ZERO;
}
