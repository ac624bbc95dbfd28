//! The runbooks are part of the program: every `cathedral` / `cathedralctl` invocation in a
//! fenced ```sh block of `runbooks/*.md` must parse against the real command lines, and the
//! deploy, rollback, kill-switch and burn-in runbooks run end to end under the launchctl
//! emulator with the tiny model.
//!
//! Runbook conventions the tests rely on (see `runbooks/README.md`):
//! - one command per line (`\` continuations are joined); `&&`, `||`, `;` and `|` split it
//!   into invocations;
//! - a line `export NAME="${NAME:-default}"` defines a variable; later steps see it, and the
//!   sandbox's value (set in the environment) wins over the default;
//! - a comment line `# expect: fails` before a step means it must exit non-zero,
//!   `# expect: any` that its exit status is not checked;
//! - time is compressed by [`TIME_COMPRESSION`] when a runbook runs here.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::error::ErrorKind;
use clap::Parser;
use common::*;

/// Real-world durations in the runbooks and what they become in the sandbox: a probe every
/// second, four-second SLO windows, and "wait an hour" as ten seconds (two or more closed
/// windows).
const TIME_COMPRESSION: &[(&str, &str)] = &[
    ("--canary-interval 60s", "--canary-interval 1s"),
    ("--canary-window 1h", "--canary-window 4s"),
    ("--interval 60s", "--interval 1s"),
    ("--window 1h", "--window 4s"),
    ("sleep 3600", "sleep 10"),
];

/// One step's longest run (model loads included) before the test gives up on it.
const STEP_LIMIT: Duration = Duration::from_secs(120);

/// The runbooks the issue asks for; each must exist.
const REQUIRED: &[&str] = &[
    "deploy.md",
    "rollback.md",
    "vision-burn-in.md",
    "kill-switch.md",
    "upstream-scanner.md",
    "certificates.md",
    "crash-loop.md",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Success,
    Failure,
    Any,
}

#[derive(Debug, Clone)]
struct Step {
    file: String,
    /// 1-based line of the step's first physical line.
    line: usize,
    text: String,
    expect: Expect,
}

impl Step {
    fn at(&self) -> String {
        format!("runbooks/{}:{}", self.file, self.line)
    }

    /// `export NAME=...` or `NAME=...` alone on the line.
    fn is_assignment(&self) -> bool {
        let t = self.text.strip_prefix("export ").unwrap_or(&self.text);
        t.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
        })
    }
}

fn runbooks_dir() -> PathBuf {
    repo_root().join("runbooks")
}

fn runbook_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(runbooks_dir())
        .expect("runbooks/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    files.sort();
    files
}

/// The steps of every ```sh block, in order.
fn sh_steps(file: &str, markdown: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut in_sh = false;
    let mut pending: Option<(usize, String)> = None;
    let mut expect = Expect::Success;
    for (i, raw) in markdown.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = raw.trim();
        if trimmed.starts_with("```") {
            in_sh = !in_sh && trimmed == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let (start, mut text) = match pending.take() {
            Some((start, acc)) => (start, acc + " " + trimmed),
            None => (line_no, trimmed.to_owned()),
        };
        if let Some(head) = text.strip_suffix('\\') {
            pending = Some((start, head.trim_end().to_owned()));
            continue;
        }
        if text.is_empty() {
            continue;
        }
        if let Some(comment) = text.strip_prefix('#') {
            match comment.trim() {
                "expect: fails" => expect = Expect::Failure,
                "expect: any" => expect = Expect::Any,
                _ => {}
            }
            continue;
        }
        text = strip_comment(&text);
        steps.push(Step {
            file: file.to_owned(),
            line: start,
            text,
            expect,
        });
        expect = Expect::Success;
    }
    steps
}

/// The line without a trailing `# comment` (a `#` that starts a word outside quotes).
fn strip_comment(line: &str) -> String {
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q && prev != '\\' => quote = None,
            (None, '\'' | '"') if prev != '\\' => quote = Some(c),
            (None, '#') if prev.is_whitespace() => return line[..i].trim_end().to_owned(),
            _ => {}
        }
        prev = c;
    }
    line.to_owned()
}

/// A plausible value for a variable, for parsing only.
fn sample(name: &str) -> String {
    match name {
        "PORT" => "1337".into(),
        "TARGET" => "https://localhost:1337".into(),
        "HOME" => "/Users/sample".into(),
        _ => format!("/sample/{}", name.to_ascii_lowercase()),
    }
}

/// Replaces `$(...)`, `${NAME...}` and `$NAME` with sample values.
fn substitute(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' || i + 1 == chars.len() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        match chars[i + 1] {
            '(' => {
                let mut depth = 0;
                let mut j = i + 1;
                while j < chars.len() {
                    match chars[j] {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                out.push_str("sample");
                i = j + 1;
            }
            '{' => {
                let end = chars[i..].iter().position(|&c| c == '}').map(|p| i + p);
                let end = end.unwrap_or(chars.len() - 1);
                let inner: String = chars[i + 2..end].iter().collect();
                let name: String = inner
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.push_str(&sample(&name));
                i = end + 1;
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let name: String = chars[i + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                    .collect();
                i += 1 + name.len();
                out.push_str(&sample(&name));
            }
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    out
}

/// The commands inside `$(...)`, outermost first.
fn command_substitutions(line: &str) -> Vec<String> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 1 < chars.len() {
        if chars[i] == '$' && chars[i + 1] == '(' {
            let mut depth = 0;
            let mut j = i + 1;
            while j < chars.len() {
                match chars[j] {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            let inner: String = chars[i + 2..j.min(chars.len())].iter().collect();
            let nested = command_substitutions(&inner);
            out.push(inner);
            out.extend(nested);
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out
}

/// Splits a command line on `&&`, `||`, `;` and `|` outside quotes.
fn split_compound(line: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut it = line.chars().peekable();
    while let Some(c) = it.next() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                cur.push(c);
            }
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                cur.push(c);
            }
            (None, '\\') => {
                cur.push(c);
                if let Some(n) = it.next() {
                    cur.push(n);
                }
            }
            (None, ';') => parts.push(std::mem::take(&mut cur)),
            (None, '|') => {
                if it.peek() == Some(&'|') {
                    it.next();
                }
                parts.push(std::mem::take(&mut cur));
            }
            (None, '&') if it.peek() == Some(&'&') => {
                it.next();
                parts.push(std::mem::take(&mut cur));
            }
            _ => cur.push(c),
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Shell words that start a compound command or precede the program.
const PREFIX_WORDS: &[&str] = &["do", "then", "else", "!", "time", "exec", "command"];

fn is_redirection(w: &str) -> bool {
    let w = w.trim_start_matches(|c: char| c.is_ascii_digit());
    w.starts_with('>') || w.starts_with('<') || w.starts_with("&>")
}

/// Which of our programs a word runs.
fn program(word: &str) -> Option<&'static str> {
    match Path::new(word).file_name()?.to_str()? {
        "cathedral" => Some("cathedral"),
        "cathedralctl" => Some("cathedralctl"),
        _ => None,
    }
}

/// An invocation of ours: the program and its arguments (redirections dropped).
fn invocation(segment: &str) -> Result<Option<(&'static str, Vec<String>)>, String> {
    let words = shell_words::split(segment).map_err(|e| format!("cannot split: {e}"))?;
    let mut words = words.into_iter().skip_while(|w| {
        PREFIX_WORDS.contains(&w.as_str())
            || w.split_once('=').is_some_and(|(n, _)| {
                !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
    });
    let Some(first) = words.next() else {
        return Ok(None);
    };
    let Some(prog) = program(&first) else {
        return Ok(None);
    };
    let mut args = vec![prog.to_owned()];
    let mut skip_next = false;
    for w in words {
        if skip_next {
            skip_next = false;
        } else if is_redirection(&w) {
            // `> file` takes the next word; `>file` and `2>&1` do not.
            let op = w.trim_start_matches(|c: char| c.is_ascii_digit());
            skip_next = matches!(op, ">" | ">>" | "<" | "&>");
        } else {
            args.push(w);
        }
    }
    Ok(Some((prog, args)))
}

fn parse_with_clap(prog: &str, args: &[String]) -> Result<(), clap::Error> {
    let r = match prog {
        "cathedral" => cathedral_runtime::cli::Cli::try_parse_from(args).map(drop),
        _ => cathedral_controller::cli::Cli::try_parse_from(args).map(drop),
    };
    match r {
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => Ok(()),
        r => r,
    }
}

/// Every invocation of ours in one runbook, parsed; the count and the failures.
fn check_runbook(file: &str, markdown: &str) -> (usize, Vec<String>) {
    let mut count = 0;
    let mut failures = Vec::new();
    for step in sh_steps(file, markdown) {
        let mut lines = vec![step.text.clone()];
        lines.extend(command_substitutions(&step.text));
        for segment in lines.iter().flat_map(|l| split_compound(&substitute(l))) {
            match invocation(&segment) {
                Ok(None) => {}
                Ok(Some((prog, args))) => {
                    count += 1;
                    if let Err(e) = parse_with_clap(prog, &args) {
                        failures.push(format!("{}: `{segment}`\n{}", step.at(), e.render()));
                    }
                }
                Err(e) => failures.push(format!("{}: `{segment}`: {e}", step.at())),
            }
        }
    }
    (count, failures)
}

#[test]
fn every_runbook_command_parses_against_the_real_cli() {
    let files = runbook_files();
    for want in REQUIRED {
        assert!(
            files.iter().any(|f| f.ends_with(want)),
            "runbooks/{want} is missing"
        );
    }
    let mut failures = Vec::new();
    let mut total = 0;
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let (count, mut f) = check_runbook(&name, &text);
        if count == 0 && name != "README.md" {
            f.push(format!(
                "runbooks/{name}: no `cathedral` or `cathedralctl` invocation in its ```sh blocks"
            ));
        }
        total += count;
        failures.append(&mut f);
    }
    assert!(
        failures.is_empty(),
        "{} runbook command(s) do not parse:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    eprintln!(
        "{total} invocations in {} runbooks parse against the CLI",
        files.len()
    );
}

#[test]
fn a_drifted_flag_or_subcommand_is_caught_with_its_line() {
    let md = "# t\n\n```sh\nexport X=\"${X:-/a}\"\ncathedralctl status --identity operator\n\
              cathedralctl deploy --binary \"$X/cathedral\" \\\n  --enable-visoin\n\
              echo ok && \"$X/cathedralctl\" canary wach --state \"$X\" | tail\n\
              for i in $(seq 3); do cathedral serve --modle \"$X\" >/dev/null 2>&1 && break; done\n\
              cathedral --version\n\
              export B=\"$(cathedralctl status --bogus | awk '/^binary/ {print $2}')\"\n```\n\n```text\ncathedralctl not-a-command\n```\n";
    let (count, failures) = check_runbook("t.md", md);
    assert_eq!(count, 6, "{failures:?}");
    assert_eq!(failures.len(), 4, "{failures:#?}");
    assert!(
        failures[0].starts_with("runbooks/t.md:6:"),
        "{}",
        failures[0]
    );
    assert!(failures[0].contains("--enable-visoin"), "{}", failures[0]);
    assert!(
        failures[1].starts_with("runbooks/t.md:8:"),
        "{}",
        failures[1]
    );
    assert!(failures[1].contains("wach"), "{}", failures[1]);
    assert!(
        failures[2].starts_with("runbooks/t.md:9:"),
        "{}",
        failures[2]
    );
    assert!(failures[2].contains("--modle"), "{}", failures[2]);
    assert!(
        failures[3].starts_with("runbooks/t.md:11:"),
        "{}",
        failures[3]
    );
    assert!(failures[3].contains("--bogus"), "{}", failures[3]);

    let steps = sh_steps("t.md", "```sh\n# expect: fails\nfalse # why\ntrue\n```\n");
    assert_eq!(
        steps
            .iter()
            .map(|s| (s.text.as_str(), s.expect))
            .collect::<Vec<_>>(),
        [("false", Expect::Failure), ("true", Expect::Success)]
    );
}

// ---------------------------------------------------------------------------------------
// End to end under the emulator.

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Mac in a directory: HOME, CATHEDRAL_HOME, the tiny model, a free port, the emulator's
/// `launchctl` first on PATH and the freshly built binaries after it.
struct Operator {
    sb: Sandbox,
    env: Vec<(String, String)>,
    port: u16,
}

impl Operator {
    fn new() -> Self {
        let sb = Sandbox::new();
        let home = sb.path("home");
        std::fs::create_dir_all(&home).unwrap();
        let model = sb.path("model");
        let out = Command::new(cathedral_bin())
            .args(["tiny-model", "--out"])
            .arg(&model)
            .output()
            .unwrap();
        assert!(out.status.success(), "tiny-model: {}", stderr(&out));
        let built = cathedral_bin().parent().unwrap().to_path_buf();
        let ctl_dir = cathedralctl_bin().parent().unwrap().to_path_buf();
        let port = free_port();
        let path = format!(
            "{}:{}:{}",
            sb.path("bin").display(),
            built.display(),
            ctl_dir.display()
        );
        let path = format!("{path}:{}", std::env::var("PATH").unwrap_or_default());
        let env = vec![
            ("PATH".into(), path),
            ("HOME".into(), home.display().to_string()),
            (
                "CATHEDRAL_HOME".into(),
                home.join(".cathedral").display().to_string(),
            ),
            ("MODEL".into(), model.display().to_string()),
            ("PORT".into(), port.to_string()),
            ("BUILT".into(), built.display().to_string()),
            ("RUST_LOG".into(), "info".into()),
        ];
        Operator { sb, env, port }
    }

    fn home(&self, rel: &str) -> PathBuf {
        self.sb.path("home").join(rel)
    }

    /// Runs every step of a runbook in order, each with `sh -c` after the variables defined
    /// so far, and checks its exit status.
    fn follow(&self, runbook: &str) {
        let text = std::fs::read_to_string(runbooks_dir().join(runbook)).unwrap();
        let steps = sh_steps(runbook, &text);
        assert!(!steps.is_empty(), "{runbook} has no steps");
        let mut prelude = String::new();
        let t0 = Instant::now();
        for step in steps {
            let mut cmd = step.text.clone();
            for (from, to) in TIME_COMPRESSION {
                cmd = cmd.replace(from, to);
            }
            let (code, out) = self.sh(&format!("{prelude}{cmd}"), &step);
            // The transcript: shown by the test harness when a test fails (or with --nocapture).
            eprint!("$ {cmd}   [{} → exit {code:?}]\n{out}\n", step.at());
            let ok = match step.expect {
                Expect::Success => code == Some(0),
                Expect::Failure => code.is_some_and(|c| c != 0),
                Expect::Any => true,
            };
            assert!(
                ok,
                "{}: `{cmd}` exited {code:?}, expected {:?}\n--- output ---\n{out}\n--- runtime log ---\n{}",
                step.at(),
                step.expect,
                self.runtime_log_tail()
            );
            if step.is_assignment() {
                prelude.push_str(&step.text);
                prelude.push('\n');
            }
        }
        eprintln!("{runbook}: {:.1} s", t0.elapsed().as_secs_f64());
    }

    /// One step; its exit code (None: killed after [`STEP_LIMIT`]) and its output.
    fn sh(&self, script: &str, step: &Step) -> (Option<i32>, String) {
        // Output to a file, not a pipe: a job the step starts under the emulator may keep
        // inherited descriptors open long after the step is done.
        let out_path = self.sb.path("step.out");
        let out = File::create(&out_path).unwrap();
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(script)
            .current_dir(self.sb.path("home"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for k in [
            "CATHEDRAL_PLIST",
            "CATHEDRAL_STATE_DIR",
            "CATHEDRAL_UPSTREAM_CONFIG",
            "XDG_STATE_HOME",
        ] {
            c.env_remove(k);
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = c.spawn().unwrap();
        let t0 = Instant::now();
        let code = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s.code();
            }
            if t0.elapsed() > STEP_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("{}: killed after {STEP_LIMIT:?}", step.at());
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (code, std::fs::read_to_string(&out_path).unwrap_or_default())
    }

    fn runtime_log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.home(".cathedral/logs/runtime.err.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn certs(&self) -> PathBuf {
        self.home(".cathedral/certs")
    }

    /// `cathedralctl probe` from the test itself.
    fn probe(&self, kind: &str) -> std::process::Output {
        let c = self.certs();
        Command::new(cathedralctl_bin())
            .args(["probe", kind, "--timeout", "60s", "--target"])
            .arg(format!("https://localhost:{}", self.port))
            .arg("--ca")
            .arg(c.join("ca.pem"))
            .arg("--cert")
            .arg(c.join("clients/operator.pem"))
            .arg("--key")
            .arg(c.join("clients/operator.key"))
            .output()
            .unwrap()
    }

    fn runtime_args(&self) -> Vec<String> {
        let plist = self.home("Library/LaunchAgents/com.cathedral.runtime.plist");
        let v = plist::Value::from_file(&plist).unwrap();
        v.as_dictionary()
            .and_then(|d| d.get("ProgramArguments"))
            .and_then(|a| a.as_array())
            .unwrap()
            .iter()
            .filter_map(|s| s.as_string().map(str::to_owned))
            .collect()
    }
}

fn served(p: &std::process::Output) -> bool {
    p.status.success() && stdout(p).contains("200")
}

#[test]
fn deploy_kill_switch_and_rollback_runbooks_run_end_to_end() {
    let t0 = Instant::now();
    let op = Operator::new();
    op.follow("deploy.md");
    // The new release serves text and images, with --vision-enabled after --no-plain.
    let args = op.runtime_args();
    assert_eq!(
        Path::new(&args[0]),
        op.home(".cathedral/releases/d9ddc93/cathedral"),
    );
    let np = args.iter().position(|a| a == "--no-plain").unwrap();
    assert_eq!(args[np + 1], "--vision-enabled");
    let p = op.probe("--builtin-image");
    assert!(served(&p), "{}{}", stdout(&p), stderr(&p));

    op.follow("kill-switch.md");
    let p = op.probe("--builtin-image");
    assert!(served(&p), "released again: {}{}", stdout(&p), stderr(&p));

    op.follow("rollback.md");
    // The initial release is back, text serves, vision is gated again.
    let args = op.runtime_args();
    assert_eq!(
        Path::new(&args[0]),
        op.home(".cathedral/releases/initial/cathedral")
    );
    assert!(!args.iter().any(|a| a == "--vision-enabled"));
    let p = op.probe("--text");
    assert!(served(&p), "{}{}", stdout(&p), stderr(&p));
    eprintln!(
        "deploy + kill switch + rollback runbooks: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn vision_burn_in_runbook_runs_end_to_end_with_compressed_time() {
    let t0 = Instant::now();
    let op = Operator::new();
    op.follow("deploy.md");
    op.follow("vision-burn-in.md");
    // The watcher agent runs at the compressed cadence (the runbook still says 60 s / 1 h).
    let canary = op.home("Library/LaunchAgents/com.cathedral.canary.plist");
    let canary = std::fs::read_to_string(canary).unwrap();
    for want in ["<string>1s</string>", "<string>4s</string>"] {
        assert!(canary.contains(want), "time was not compressed:\n{canary}");
    }
    // The watcher agent is running and its verdict is written.
    let loaded = op.sb.loaded();
    assert!(
        loaded.iter().any(|l| l == "com.cathedral.canary"),
        "{loaded:?}"
    );
    let report = op.home(".cathedral/canary/report");
    let txt = std::fs::read_to_string(report.join("report.txt")).unwrap();
    assert!(txt.contains("burn-in PASSED"), "{txt}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    assert!(json.is_object(), "{json}");
    for f in ["chart.png", "chart.svg"] {
        assert!(report.join(f).is_file(), "{f} missing");
    }
    // The old record was set aside, the runtime still serves images, the switch is released.
    let aside = std::fs::read_dir(op.home(".cathedral"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("canary.pre-burn-in-")
        });
    assert!(aside, "the pre-burn-in record was kept");
    let p = op.probe("--builtin-image");
    assert!(served(&p), "{}{}", stdout(&p), stderr(&p));
    let ks = Command::new(cathedralctl_bin())
        .args(["killswitch", "status", "--file"])
        .arg(op.home(".cathedral/kill-switch.json"))
        .output()
        .unwrap();
    assert!(
        stdout(&ks).starts_with("released"),
        "{}{}",
        stdout(&ks),
        stderr(&ks)
    );
    eprintln!(
        "deploy + burn-in runbooks: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
