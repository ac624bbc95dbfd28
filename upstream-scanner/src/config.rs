//! Scanner configuration (TOML) and the GitHub token's source.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::NaiveTime;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// `owner/name` of a GitHub repository.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoName {
    owner: String,
    name: String,
}

impl RepoName {
    pub fn owner(&self) -> &str {
        &self.owner
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The HTTPS clone URL on github.com.
    pub fn github_url(&self) -> String {
        format!("https://github.com/{}/{}.git", self.owner, self.name)
    }
}

impl FromStr for RepoName {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let valid = |part: &str| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match s.split_once('/') {
            Some((owner, name)) if valid(owner) && valid(name) => Ok(Self {
                owner: owner.to_owned(),
                name: name.to_owned(),
            }),
            _ => Err(ConfigError::Invalid(format!(
                "`{s}` is not a GitHub repository of the form owner/name"
            ))),
        }
    }
}

impl TryFrom<String> for RepoName {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, ConfigError> {
        s.parse()
    }
}

impl From<RepoName> for String {
    fn from(r: RepoName) -> String {
        r.to_string()
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// A GitHub login (user name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Login(pub String);

impl fmt::Display for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An issue label, compared as GitHub does (case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Label(pub String);

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("token: environment variable {0} is not set or empty")]
    TokenEnvMissing(String),
    #[error("token: cannot read {path}: {source}")]
    TokenFileRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "token: {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    TokenFileMode { path: PathBuf, mode: u32 },
    #[error("token: {0} is empty")]
    TokenFileEmpty(PathBuf),
}

/// The whole `upstream.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The repository our work goes to.
    #[serde(default = "default_upstream")]
    pub upstream: RepoName,
    /// Branch of the upstream repository that the fork follows.
    #[serde(default = "default_branch")]
    pub upstream_branch: String,
    /// Our GitHub login: whose pull requests to follow.
    pub login: Login,
    /// Issue labels to watch on the upstream repository.
    #[serde(default = "default_labels")]
    pub labels: Vec<Label>,
    /// Repository whose releases are reported.
    #[serde(default = "default_releases")]
    pub releases_repo: RepoName,
    /// Where the daily reports (and the scanner's state) are written.
    pub report_dir: PathBuf,
    pub fork: Option<ForkConfig>,
    #[serde(default)]
    pub token: Option<TokenSource>,
    #[serde(default)]
    pub github: GitHubConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkConfig {
    /// `owner/name` of our fork on GitHub.
    pub repo: RepoName,
    /// Path of the local clone of the fork.
    pub clone: PathBuf,
    /// Remote in the clone that points at the fork.
    #[serde(default = "default_fork_remote")]
    pub remote: String,
    /// The fork's branch that tracks upstream.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// URL to fetch upstream from; the upstream repository on github.com by default.
    #[serde(default)]
    pub upstream_url: Option<String>,
    /// Push the fast-forwarded branch to the fork (never forced).
    #[serde(default)]
    pub push: bool,
}

/// Where the token comes from; the token itself never sits in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum TokenSource {
    /// Name of an environment variable holding the token.
    Env(String),
    /// A file (mode 0600 or stricter) holding the token.
    File(PathBuf),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubConfig {
    /// API root; `https://api.github.com` unless GitHub Enterprise or a test server.
    #[serde(default)]
    pub api_base: Option<String>,
    /// Attempts per request (first try included) on 5xx, transport errors and short
    /// rate-limit waits.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First backoff after a 5xx; doubled each further attempt.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Longest wait for a rate-limit reset before the scan gives up on a request.
    #[serde(default = "default_rate_wait")]
    pub max_rate_limit_wait_s: u64,
    /// Pages followed per listing (100 items a page).
    #[serde(default = "default_max_pages")]
    pub max_pages: u32,
    /// Per-request timeout.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

impl Default for GitHubConfig {
    fn default() -> Self {
        Self {
            api_base: None,
            max_attempts: default_attempts(),
            backoff_ms: default_backoff_ms(),
            max_rate_limit_wait_s: default_rate_wait(),
            max_pages: default_max_pages(),
            timeout_s: default_timeout(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Local wall-clock time of the daily run, `HH:MM`.
    #[serde(default = "default_at", with = "hh_mm")]
    pub at: NaiveTime,
    /// IANA zone (`Europe/Berlin`); the system zone when absent.
    #[serde(default)]
    pub time_zone: Option<String>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            at: default_at(),
            time_zone: None,
        }
    }
}

mod hh_mm {
    use chrono::NaiveTime;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &NaiveTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.format("%H:%M").to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveTime, D::Error> {
        let s = String::deserialize(d)?;
        NaiveTime::parse_from_str(&s, "%H:%M").map_err(serde::de::Error::custom)
    }
}

fn default_upstream() -> RepoName {
    RepoName {
        owner: "oxiglade".into(),
        name: "mlx-rs".into(),
    }
}
fn default_releases() -> RepoName {
    RepoName {
        owner: "ml-explore".into(),
        name: "mlx".into(),
    }
}
fn default_branch() -> String {
    "main".into()
}
fn default_fork_remote() -> String {
    "origin".into()
}
fn default_labels() -> Vec<Label> {
    vec![Label("help wanted".into()), Label("performance".into())]
}
fn default_attempts() -> u32 {
    3
}
fn default_backoff_ms() -> u64 {
    1_000
}
fn default_rate_wait() -> u64 {
    90
}
fn default_max_pages() -> u32 {
    5
}
fn default_timeout() -> u64 {
    30
}
fn default_at() -> NaiveTime {
    NaiveTime::from_hms_opt(9, 7, 0).expect("09:07 is a valid time")
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.login.0.trim().is_empty() {
            return Err(ConfigError::Invalid("`login` is empty".into()));
        }
        if self.github.max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "`github.max_attempts` must be at least 1".into(),
            ));
        }
        if let Some(tz) = &self.schedule.time_zone {
            tz.parse::<chrono_tz::Tz>().map_err(|_| {
                ConfigError::Invalid(format!("`schedule.time_zone`: unknown zone `{tz}`"))
            })?;
        }
        Ok(())
    }

    /// Scanner state (ETag cache, last run) lives beside the reports.
    pub fn state_dir(&self) -> PathBuf {
        self.report_dir.join(".state")
    }
}

/// A GitHub token. Its `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct GitHubToken(SecretString);

impl GitHubToken {
    pub fn new(token: String) -> Self {
        Self(SecretString::from(token))
    }
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for GitHubToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GitHubToken(<redacted>)")
    }
}

impl TokenSource {
    /// Reads the token. A file must not be readable by group or others.
    pub fn resolve(&self) -> Result<GitHubToken, ConfigError> {
        match self {
            TokenSource::Env(var) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Ok(GitHubToken::new(v.trim().to_owned())),
                _ => Err(ConfigError::TokenEnvMissing(var.clone())),
            },
            TokenSource::File(path) => {
                let read_err = |source| ConfigError::TokenFileRead {
                    path: path.clone(),
                    source,
                };
                let file = std::fs::File::open(path).map_err(read_err)?;
                check_private(path, &file)?;
                let mut text = String::new();
                std::io::Read::read_to_string(&mut &file, &mut text).map_err(read_err)?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(ConfigError::TokenFileEmpty(path.clone()));
                }
                Ok(GitHubToken::new(token.to_owned()))
            }
        }
    }
}

#[cfg(unix)]
fn check_private(path: &Path, file: &std::fs::File) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    // Checked on the opened file, so a swap of the path after the check changes nothing.
    let mode = file
        .metadata()
        .map_err(|source| ConfigError::TokenFileRead {
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::TokenFileMode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_: &Path, _: &std::fs::File) -> Result<(), ConfigError> {
    Ok(())
}
