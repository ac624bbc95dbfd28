//! The launchd service manager against the launchctl emulator: the documented traps
//! (bootout returns early, EIO during teardown, KeepAlive, disabled services) handled.

mod common;

use std::time::{Duration, Instant};

use cathedral_controller::agent::{Label, PlistPath};
use cathedral_controller::launchd::{Domain, LastExit, Launchd, RunState, ServiceManager};
use common::*;

const SLEEPER: &str = "trap 'exit 0' TERM; while :; do sleep 0.05; done";

fn launchd(sb: &Sandbox) -> Launchd {
    Launchd::with_launchctl(sb.launchctl(), Domain::Gui(Sandbox::uid()))
}

fn write_agent(sb: &Sandbox, label: &str, script: &str, extra: &str) -> PlistPath {
    let p = sb.path(&format!("agents/{label}.plist"));
    std::fs::write(&p, agent_xml(label, &["/bin/sh", "-c", script], extra)).unwrap();
    PlistPath::new(p).unwrap()
}

#[test]
fn restart_replaces_the_process_and_bootout_returns_before_it_is_gone() {
    let sb = Sandbox::new();
    let label = Label::new("test.restart").unwrap();
    // The job ignores SIGTERM for a moment, as a server finishing a request would.
    let slow_exit = "trap 'sleep 2; exit 0' TERM; while :; do sleep 0.05; done";
    let plist = write_agent(
        &sb,
        label.as_str(),
        slow_exit,
        "\t<key>RunAtLoad</key>\n\t<true/>\n",
    );
    let l = launchd(&sb);
    assert_eq!(l.status(&label).unwrap(), None);
    let first = l.restart(&label, &plist).unwrap();
    assert!(pid_alive(first.pid));

    // Raw launchctl: bootout answers at once while the old process is still there.
    let t0 = Instant::now();
    let out = sb.launchctl_cmd(&["bootout", &format!("{}/{label}", Sandbox::domain())]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(t0.elapsed() < Duration::from_millis(1500));
    assert!(
        l.status(&label).unwrap().is_some(),
        "still tearing down right after bootout"
    );
    let again = sb.launchctl_cmd(&[
        "bootstrap",
        &Sandbox::domain(),
        plist.as_path().to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(5));
    assert!(stderr(&again).contains("Bootstrap failed: 5: Input/output error"));
    wait_until("the job to unload", Duration::from_secs(10), || {
        l.status(&label).unwrap().is_none()
    });
    assert!(!pid_alive(first.pid));

    // The service manager does the whole dance.
    let second = l.restart(&label, &plist).unwrap();
    let third = l.restart(&label, &plist).unwrap();
    assert_ne!(second.pid, third.pid);
    assert!(!pid_alive(second.pid), "old process stopped");
    assert!(
        third.stop >= Duration::from_millis(1500),
        "waited for the slow exit: {:?}",
        third.stop
    );
    let st = l.status(&label).unwrap().unwrap();
    assert_eq!((st.state, st.pid), (RunState::Running, Some(third.pid)));
}

#[test]
fn bootstrap_eio_during_teardown_is_retried() {
    let sb = Sandbox::new();
    // Make the emulated domain keep refusing bootstrap for 1.5 s after the job is gone.
    let wrapper = std::fs::read_to_string(sb.launchctl()).unwrap().replace(
        " exec ",
        " CATHEDRAL_LAUNCHCTL_EMULATOR_TEARDOWN_LINGER_MS=1500 exec ",
    );
    std::fs::write(sb.launchctl(), wrapper).unwrap();
    let label = Label::new("test.eio").unwrap();
    let plist = write_agent(
        &sb,
        label.as_str(),
        SLEEPER,
        "\t<key>RunAtLoad</key>\n\t<true/>\n",
    );
    let l = launchd(&sb);
    l.restart(&label, &plist).unwrap();
    let r = l.restart(&label, &plist).unwrap();
    assert!(r.bootstrap_attempts > 1, "EIO answered and retried: {r:?}");
    assert!(r.bootstrap >= Duration::from_millis(1000), "{r:?}");
    assert!(pid_alive(r.pid));
}

#[test]
fn keep_alive_restarts_a_crash_after_the_throttle_interval() {
    let sb = Sandbox::new();
    let label = Label::new("test.keepalive").unwrap();
    let extra = "\t<key>KeepAlive</key>\n\t<dict>\n\t\t<key>SuccessfulExit</key>\n\t\t<false/>\n\t</dict>\n\t<key>ThrottleInterval</key>\n\t<integer>1</integer>\n";
    let plist = write_agent(&sb, label.as_str(), SLEEPER, extra);
    let l = launchd(&sb);
    let r = l.restart(&label, &plist).unwrap();
    let killed_at = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(r.pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    wait_until("a respawn", Duration::from_secs(10), || {
        l.status(&label)
            .unwrap()
            .and_then(|s| s.running_pid())
            .is_some_and(|p| p != r.pid)
    });
    // Respawned no sooner than ThrottleInterval after the previous start.
    assert!(
        killed_at.elapsed() >= Duration::from_millis(500),
        "{:?}",
        killed_at.elapsed()
    );
    let st = l.status(&label).unwrap().unwrap();
    assert_eq!(st.last_exit, LastExit::Signal("Killed: 9".into()));
    assert_eq!(st.runs, Some(2));

    // A clean exit is not restarted under SuccessfulExit=false.
    let pid = st.pid.unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    wait_until("the clean exit", Duration::from_secs(5), || {
        l.status(&label).unwrap().unwrap().state == RunState::NotRunning
    });
    std::thread::sleep(Duration::from_millis(1300));
    let st = l.status(&label).unwrap().unwrap();
    assert_eq!(
        (st.state, st.last_exit),
        (RunState::NotRunning, LastExit::Code(0))
    );
}

#[test]
fn a_disabled_service_is_enabled_and_an_idle_one_kickstarted() {
    let sb = Sandbox::new();
    let label = Label::new("test.idle").unwrap();
    // No RunAtLoad, no KeepAlive: loaded but not running until kickstarted.
    let plist = write_agent(&sb, label.as_str(), SLEEPER, "");
    let out = sb.launchctl_cmd(&["disable", &format!("{}/{label}", Sandbox::domain())]);
    assert!(out.status.success());
    let refused = sb.launchctl_cmd(&[
        "bootstrap",
        &Sandbox::domain(),
        plist.as_path().to_str().unwrap(),
    ]);
    assert_eq!(
        refused.status.code(),
        Some(5),
        "disabled services answer EIO"
    );
    let l = launchd(&sb);
    let r = l.restart(&label, &plist).unwrap();
    assert!(r.kickstarted);
    assert!(pid_alive(r.pid));
}

#[test]
fn a_program_that_cannot_start_or_exits_at_start_is_reported() {
    let sb = Sandbox::new();
    let l = launchd(&sb);
    let extra = "\t<key>KeepAlive</key>\n\t<dict>\n\t\t<key>SuccessfulExit</key>\n\t\t<false/>\n\t</dict>\n";
    // Never runs: launchd records EX_CONFIG (78) and no pid ever appears.
    let label = Label::new("test.missing").unwrap();
    let p = sb.path("agents/test.missing.plist");
    std::fs::write(
        &p,
        agent_xml(label.as_str(), &["/nonexistent/cathedral", "serve"], extra),
    )
    .unwrap();
    match l.restart(&label, &PlistPath::new(p).unwrap()) {
        Err(cathedral_controller::launchd::ServiceError::ExitedAtStart { last_exit }) => {
            assert_eq!(last_exit, LastExit::Code(78))
        }
        other => panic!("expected ExitedAtStart, got {other:?}"),
    }
    // Runs for an instant: either no pid is ever seen, or the one seen is gone at once
    // with its exit code recorded (the health gate's business).
    let label = Label::new("test.crash").unwrap();
    let plist = write_agent(&sb, label.as_str(), "exit 3", extra);
    match l.restart(&label, &plist) {
        Err(cathedral_controller::launchd::ServiceError::ExitedAtStart { last_exit }) => {
            assert_eq!(last_exit, LastExit::Code(3))
        }
        Ok(r) => {
            wait_until("the exit to be recorded", Duration::from_secs(5), || {
                let st = l.status(&label).unwrap().unwrap();
                st.running_pid().is_none() && st.last_exit == LastExit::Code(3)
            });
            assert!(!pid_alive(r.pid));
        }
        Err(e) => panic!("unexpected {e}"),
    }
}

#[test]
fn print_of_an_unknown_service_exits_113() {
    let sb = Sandbox::new();
    let out = sb.launchctl_cmd(&["print", &format!("{}/nope", Sandbox::domain())]);
    assert_eq!(out.status.code(), Some(113));
    assert!(stderr(&out).contains("Could not find service"));
}
