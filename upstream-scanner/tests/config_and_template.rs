//! Configuration parsing, the token's source and secrecy, and the launchd agent template.

use std::os::unix::fs::PermissionsExt;

use cathedral_upstream_scanner::config::{Config, ConfigError, TokenSource};

fn write_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("upstream.toml");
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn minimal_config_takes_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        r#"
login = "octo-dev"
report_dir = "/var/reports"
"#,
    );
    let c = Config::load(&path).unwrap();
    assert_eq!(c.upstream.to_string(), "oxiglade/mlx-rs");
    assert_eq!(c.releases_repo.to_string(), "ml-explore/mlx");
    let labels: Vec<&str> = c.labels.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(labels, ["help wanted", "performance"]);
    assert_eq!(c.schedule.at.format("%H:%M").to_string(), "09:07");
    assert!(c.fork.is_none() && c.token.is_none() && c.github.api_base.is_none());
}

#[test]
fn full_config_parses() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        r#"
upstream = "oxiglade/mlx-rs"
login = "octo-dev"
labels = ["help wanted", "performance", "good first issue"]
releases_repo = "ml-explore/mlx"
report_dir = "/var/reports"
token = { file = "/etc/cathedral/github-token" }

[fork]
repo = "octo-dev/mlx-rs"
clone = "/src/mlx-rs"
push = true

[github]
api_base = "https://ghe.example.invalid/api/v3"
max_attempts = 4

[schedule]
at = "07:30"
time_zone = "Europe/Berlin"
"#,
    );
    let c = Config::load(&path).unwrap();
    let fork = c.fork.unwrap();
    assert_eq!(fork.repo.owner(), "octo-dev");
    assert_eq!(fork.remote, "origin");
    assert_eq!(fork.branch, "main");
    assert!(fork.push);
    assert_eq!(
        c.token,
        Some(TokenSource::File("/etc/cathedral/github-token".into()))
    );
    assert_eq!(c.github.max_attempts, 4);
    assert_eq!(c.schedule.at.format("%H:%M").to_string(), "07:30");
}

#[test]
fn bad_configs_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    for (body, needle) in [
        (
            "login = \"x\"\nreport_dir = \"/r\"\nupstream = \"not-a-repo\"\n",
            "owner/name",
        ),
        (
            "login = \"x\"\nreport_dir = \"/r\"\n[schedule]\ntime_zone = \"Mars/Olympus\"\n",
            "Mars/Olympus",
        ),
        (
            "login = \"x\"\nreport_dir = \"/r\"\n[schedule]\nat = \"25:00\"\n",
            "at",
        ),
        (
            "login = \"x\"\nreport_dir = \"/r\"\ntokn = { env = \"T\" }\n",
            "tokn",
        ),
    ] {
        let path = write_config(dir.path(), body);
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains(needle), "{body:?} → {err}");
    }
}

#[test]
fn token_file_must_be_private_and_never_shows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "ghp_do_not_print_me\n").unwrap();

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = TokenSource::File(path.clone()).resolve().unwrap_err();
    assert!(
        matches!(err, ConfigError::TokenFileMode { mode: 0o644, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"));

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(TokenSource::File(path.clone()).resolve().is_err());

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let token = TokenSource::File(path.clone()).resolve().unwrap();
    assert_eq!(token.expose(), "ghp_do_not_print_me");
    let shown = format!("{token:?}");
    assert!(!shown.contains("ghp_"), "{shown}");
}

#[test]
fn token_from_environment() {
    let var = "CATHEDRAL_TEST_UPSTREAM_TOKEN_ENV";
    // The variable's name is unique to this test.
    std::env::set_var(var, "  ghp_from_env  ");
    let token = TokenSource::Env(var.into()).resolve().unwrap();
    assert_eq!(token.expose(), "ghp_from_env");
    let err = TokenSource::Env("CATHEDRAL_TEST_UNSET_VARIABLE".into())
        .resolve()
        .unwrap_err();
    assert!(err.to_string().contains("CATHEDRAL_TEST_UNSET_VARIABLE"));
}

#[test]
fn launchd_template_runs_the_scan_daily_at_0907() {
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/upstream-scanner.plist.template"
    ))
    .unwrap();
    let filled = template
        .replace("{{LABEL}}", "org.cathedral.upstream-scanner")
        .replace("{{CATHEDRALCTL}}", "/usr/local/bin/cathedralctl")
        .replace("{{CONFIG}}", "/Users/op/.config/cathedral/upstream.toml")
        .replace("{{LOG_DIR}}", "/Users/op/Library/Logs/cathedral")
        .replace("{{WORKING_DIR}}", "/Users/op")
        .replace("{{RUST_LOG}}", "info");
    assert!(
        !filled.contains("{{"),
        "every placeholder is documented and filled"
    );
    let value = plist::Value::from_reader_xml(filled.as_bytes()).unwrap();
    let dict = value.as_dictionary().unwrap();
    let interval = dict
        .get("StartCalendarInterval")
        .and_then(|v| v.as_dictionary())
        .unwrap();
    assert_eq!(
        interval.get("Hour").and_then(|v| v.as_signed_integer()),
        Some(9)
    );
    assert_eq!(
        interval.get("Minute").and_then(|v| v.as_signed_integer()),
        Some(7)
    );
    let args: Vec<&str> = dict
        .get("ProgramArguments")
        .and_then(|v| v.as_array())
        .unwrap()
        .iter()
        .map(|v| v.as_string().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "/usr/local/bin/cathedralctl",
            "upstream",
            "scan",
            "--if-due",
            "--config",
            "/Users/op/.config/cathedral/upstream.toml"
        ]
    );
    assert!(args[0].starts_with('/'), "launchd needs absolute paths");
}

#[test]
fn the_example_config_is_valid() {
    let path = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/upstream.example.toml"
    ));
    let c = Config::load(path).unwrap();
    assert_eq!(c.login.0, "your-github-login");
    assert!(c.fork.is_some());
    assert_eq!(c.github.max_attempts, 3);
}
