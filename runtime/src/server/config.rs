//! `cathedral serve` settings: command-line flags, the same keys in an optional TOML file
//! (`--config`), defaults. A flag beats the file; the file beats the default.
//!
//! TOML keys are the flag names without the dashes in front, e.g.
//! ```toml
//! model = "/opt/models/qwen3.6-35b-a3b"
//! listen = "0.0.0.0:1337"
//! tls-cert = "/etc/cathedral/server.pem"
//! admin-identity = ["ops"]
//! no-plain = true
//! max-queue = 8
//! ```
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::certs::Identity;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:1337";
pub const DEFAULT_PLAIN_LISTEN: &str = "127.0.0.1:1338";

#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with the same keys as these flags (flags win).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Checkpoint directory (config.json, *.safetensors, tokenizer).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// mTLS listener address [default: 0.0.0.0:1337].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Server certificate chain (PEM).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to.
    #[arg(long)]
    pub client_ca: Option<PathBuf>,
    /// Client identity (certificate CN) allowed on /admin routes; repeatable.
    #[arg(long = "admin-identity", value_name = "NAME")]
    #[serde(default)]
    pub admin_identity: Vec<Identity>,
    /// Plain-HTTP listener for local tools; loopback addresses only [default: 127.0.0.1:1338].
    #[arg(long)]
    pub plain_listen: Option<SocketAddr>,
    /// Turn the plain-HTTP listener off.
    #[arg(long)]
    #[serde(default)]
    pub no_plain: bool,
    /// Run the vision tower (otherwise image requests get 503 vision_pipeline_not_yet_wired).
    #[arg(long)]
    #[serde(default)]
    pub vision_enabled: bool,
    /// MiB of vision features kept for images sent again (0: off) [default: 256].
    #[arg(long)]
    pub vision_cache_mib: Option<usize>,
    /// Kill switch file [default: $CATHEDRAL_HOME/kill-switch.json, CATHEDRAL_HOME=~/.cathedral].
    #[arg(long)]
    pub kill_switch: Option<PathBuf>,
    /// Generations running at once (the engine runs them one after another) [default: 1].
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Requests allowed to wait beyond --max-concurrency; more get 429 [default: 16].
    #[arg(long)]
    pub max_queue: Option<usize>,
    /// Largest request body in bytes [default: 33554432].
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Most images in one request [default: 4].
    #[arg(long)]
    pub max_images: Option<usize>,
    /// Most decoded pixels (width × height) in one image [default: 40000000].
    #[arg(long)]
    pub max_image_pixels: Option<u64>,
    /// Seconds a request may take from arrival to last token [default: 300].
    #[arg(long)]
    pub request_timeout: Option<u64>,
    /// Accept http(s) image URLs (fetched with the limits below); otherwise data URLs only.
    #[arg(long)]
    #[serde(default)]
    pub allow_remote_images: bool,
    /// Largest remote image in bytes [default: 20971520].
    #[arg(long)]
    pub remote_image_max_bytes: Option<usize>,
    /// Seconds allowed to fetch a remote image [default: 10].
    #[arg(long)]
    pub remote_image_timeout: Option<u64>,
    /// Also accept TLS 1.2 clients (TLS 1.3 only otherwise).
    #[arg(long)]
    #[serde(default)]
    pub allow_tls12: bool,
    /// Seconds to let in-flight requests finish after SIGTERM before cancelling them [default: 15].
    #[arg(long)]
    pub shutdown_grace: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("missing `{0}`: pass --{0} or set `{0}` in the config file")]
    Missing(&'static str),
    #[error("--plain-listen {0} is not a loopback address: the plain listener has no TLS and must stay on 127.0.0.1/::1 (or pass --no-plain)")]
    PlainNotLoopback(SocketAddr),
    #[error("`{name}` must be at least {min} (got {value})")]
    TooSmall {
        name: &'static str,
        min: u64,
        value: u64,
    },
}

/// Settings after merging flags, file and defaults, and validating them.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: PathBuf,
    pub admin_identities: Vec<Identity>,
    pub plain_listen: Option<SocketAddr>,
    pub vision_enabled: bool,
    pub vision_cache_bytes: usize,
    pub kill_switch: PathBuf,
    pub max_concurrency: usize,
    pub max_queue: usize,
    pub max_body_bytes: usize,
    pub max_images: usize,
    pub max_image_pixels: u64,
    pub request_timeout: Duration,
    pub allow_remote_images: bool,
    pub remote_image_max_bytes: usize,
    pub remote_image_timeout: Duration,
    pub allow_tls12: bool,
    pub shutdown_grace: Duration,
}

impl ServeArgs {
    fn load_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Merges with the `--config` file (if any) and applies defaults.
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let file = match &self.config {
            Some(p) => Self::load_file(p)?,
            None => Self::default(),
        };
        let cli = self;
        macro_rules! pick {
            ($f:ident) => {
                cli.$f.clone().or(file.$f.clone())
            };
        }
        let admin_identities = if cli.admin_identity.is_empty() {
            file.admin_identity.clone()
        } else {
            cli.admin_identity.clone()
        };
        let no_plain = cli.no_plain || file.no_plain;
        let plain_listen = if no_plain {
            None
        } else {
            let addr = pick!(plain_listen)
                .unwrap_or_else(|| DEFAULT_PLAIN_LISTEN.parse().expect("valid default"));
            if !addr.ip().is_loopback() {
                return Err(ConfigError::PlainNotLoopback(addr));
            }
            Some(addr)
        };
        let at_least = |name: &'static str, value: u64, min: u64| {
            if value < min {
                Err(ConfigError::TooSmall { name, min, value })
            } else {
                Ok(value)
            }
        };
        let max_concurrency = pick!(max_concurrency).unwrap_or(1);
        at_least("max-concurrency", max_concurrency as u64, 1)?;
        let max_body_bytes = pick!(max_body_bytes).unwrap_or(32 * 1024 * 1024);
        at_least("max-body-bytes", max_body_bytes as u64, 1024)?;
        let max_image_pixels = pick!(max_image_pixels).unwrap_or(40_000_000);
        at_least("max-image-pixels", max_image_pixels, 100)?;
        let request_timeout = pick!(request_timeout).unwrap_or(300);
        at_least("request-timeout", request_timeout, 1)?;
        let remote_timeout = pick!(remote_image_timeout).unwrap_or(10);
        at_least("remote-image-timeout", remote_timeout, 1)?;
        Ok(ServeConfig {
            model: pick!(model).ok_or(ConfigError::Missing("model"))?,
            listen: pick!(listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            tls_cert: pick!(tls_cert).ok_or(ConfigError::Missing("tls-cert"))?,
            tls_key: pick!(tls_key).ok_or(ConfigError::Missing("tls-key"))?,
            client_ca: pick!(client_ca).ok_or(ConfigError::Missing("client-ca"))?,
            admin_identities,
            plain_listen,
            vision_enabled: cli.vision_enabled || file.vision_enabled,
            vision_cache_bytes: pick!(vision_cache_mib)
                .map_or(crate::engine::DEFAULT_VISION_CACHE_BYTES, |m| m << 20),
            kill_switch: pick!(kill_switch).unwrap_or_else(crate::killswitch::default_path),
            max_concurrency,
            max_queue: pick!(max_queue).unwrap_or(16),
            max_body_bytes,
            max_images: pick!(max_images).unwrap_or(4),
            max_image_pixels,
            request_timeout: Duration::from_secs(request_timeout),
            allow_remote_images: cli.allow_remote_images || file.allow_remote_images,
            remote_image_max_bytes: pick!(remote_image_max_bytes).unwrap_or(20 * 1024 * 1024),
            remote_image_timeout: Duration::from_secs(remote_timeout),
            allow_tls12: cli.allow_tls12 || file.allow_tls12,
            shutdown_grace: Duration::from_secs(pick!(shutdown_grace).unwrap_or(15)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ServeArgs,
    }

    #[test]
    fn flags_beat_file_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            "model = \"/m\"\ntls-cert = \"/c\"\ntls-key = \"/k\"\nclient-ca = \"/ca\"\nmax-queue = 3\nadmin-identity = [\"ops\"]\nvision-enabled = true\n",
        )
        .unwrap();
        let t = T::parse_from([
            "x",
            "--config",
            cfg.to_str().unwrap(),
            "--max-queue",
            "5",
            "--plain-listen",
            "127.0.0.1:0",
        ]);
        let c = t.a.resolve().unwrap();
        assert_eq!(c.max_queue, 5);
        assert_eq!(c.model, PathBuf::from("/m"));
        assert_eq!(c.admin_identities, vec![Identity::new("ops").unwrap()]);
        assert!(c.vision_enabled);
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.plain_listen, Some("127.0.0.1:0".parse().unwrap()));
    }

    #[test]
    fn plain_listener_must_be_loopback() {
        let t = T::parse_from([
            "x",
            "--model",
            "/m",
            "--tls-cert",
            "/c",
            "--tls-key",
            "/k",
            "--client-ca",
            "/ca",
            "--plain-listen",
            "0.0.0.0:8080",
        ]);
        assert!(matches!(
            t.a.resolve(),
            Err(ConfigError::PlainNotLoopback(_))
        ));
        let t = T::parse_from(["x", "--tls-cert", "/c"]);
        assert!(matches!(t.a.resolve(), Err(ConfigError::Missing("model"))));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, "modle = \"/m\"\n").unwrap();
        let t = T::parse_from(["x", "--config", cfg.to_str().unwrap()]);
        assert!(matches!(t.a.resolve(), Err(ConfigError::Parse { .. })));
    }
}
