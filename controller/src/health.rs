//! The health gate a deploy must pass: the service keeps one pid, a text probe answers 200
//! over mTLS, a multimodal probe too when vision is on, and resident memory stays under the
//! limit. Probes are the canary's (one client builder, one judgement for everything).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cathedral_canary::probe::{ProbeKind, ProbeOutcome, ProbeSpec, Prober};
use cathedral_runtime::client::{mtls_client, ClientTls};

use crate::agent::{Label, LaunchAgent};
use crate::launchd::{LastExit, ServiceManager};
use crate::rss::{self, ByteSize};

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("the service died while starting (pid {pid}; now {state}, last {last_exit})")]
    Died {
        pid: u32,
        state: String,
        last_exit: LastExit,
    },
    #[error("no healthy answer within {after:?}; last text probe: {last}")]
    NotReady { after: Duration, last: String },
    #[error("{kind} probe failed: {detail}")]
    Probe { kind: ProbeKind, detail: String },
    #[error("resident memory {rss} is over the limit {limit}")]
    Rss { rss: ByteSize, limit: ByteSize },
    #[error("cannot read resident memory of pid {pid}: {source}")]
    RssUnreadable { pid: u32, source: std::io::Error },
    #[error("cannot probe: {0}")]
    Setup(String),
    #[error(transparent)]
    Service(#[from] crate::launchd::ServiceError),
}

/// What the gate saw.
#[derive(Debug, Clone)]
pub struct HealthReport {
    /// From the start of the gate to the first 200 (model load included).
    pub ready_after: Duration,
    pub text: ProbeOutcome,
    pub vision: Option<ProbeOutcome>,
    pub rss: Option<ByteSize>,
}

/// Judges whether the service defined by `agent`, running as `pid`, is healthy.
pub trait HealthGate {
    fn check(
        &self,
        services: &dyn ServiceManager,
        label: &Label,
        agent: &LaunchAgent,
        pid: u32,
    ) -> Result<HealthReport, HealthError>;
}

/// How to reach the runtime: where, and with which client identity.
#[derive(Debug, Clone, Default)]
pub struct ProbeTarget {
    /// Overrides the URL derived from the plist's `--listen`.
    pub url: Option<String>,
    /// The host name used when `--listen` is a wildcard address (must be in the server
    /// certificate's names).
    pub server_name: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A client identity under `<ca dir>/clients/`.
    pub identity: Option<String>,
}

impl ProbeTarget {
    /// `https://HOST:PORT` for a `--listen` address (a wildcard becomes `server_name`).
    pub fn url_for(&self, agent: &LaunchAgent) -> Result<String, HealthError> {
        if let Some(u) = &self.url {
            return Ok(u.trim_end_matches('/').to_string());
        }
        let listen = agent
            .flag_value("--listen")
            .unwrap_or_else(|| "0.0.0.0:1337".to_string());
        let addr: SocketAddr = listen
            .parse()
            .map_err(|_| HealthError::Setup(format!("--listen {listen:?} is not HOST:PORT")))?;
        let host = if addr.ip().is_unspecified() {
            self.server_name.clone()
        } else if addr.is_ipv6() {
            format!("[{}]", addr.ip())
        } else {
            addr.ip().to_string()
        };
        Ok(format!("https://{host}:{}", addr.port()))
    }

    /// The CA from the plist's `--client-ca` (one CA signs both sides), the client identity
    /// from flags, `--identity`, or the only one under `<ca dir>/clients/`.
    pub fn tls_for(&self, agent: &LaunchAgent) -> Result<ClientTls, HealthError> {
        let ca = self
            .ca
            .clone()
            .or_else(|| agent.flag_value("--client-ca").map(PathBuf::from))
            .ok_or_else(|| {
                HealthError::Setup("no CA: pass --ca (the plist has no --client-ca)".into())
            })?;
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            return Ok(ClientTls {
                ca,
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        let clients = ca.parent().unwrap_or(Path::new(".")).join("clients");
        let stem = match &self.identity {
            Some(id) => id.clone(),
            None => {
                let found: Vec<String> = std::fs::read_dir(&clients)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .filter_map(|e| {
                                e.file_name()
                                    .to_str()?
                                    .strip_suffix(".pem")
                                    .map(str::to_string)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                match found.as_slice() {
                    [one] => one.clone(),
                    _ => {
                        return Err(HealthError::Setup(format!(
                            "pass --client-cert/--client-key or --identity (found {} client certificates in {})",
                            found.len(),
                            clients.display()
                        )))
                    }
                }
            }
        };
        Ok(ClientTls {
            ca,
            cert: clients.join(format!("{stem}.pem")),
            key: clients.join(format!("{stem}.key")),
        })
    }
}

/// The gate of a real deploy: canary probes over mTLS.
#[derive(Debug, Clone)]
pub struct ProbeGate {
    pub target: ProbeTarget,
    /// Model load included: a large checkpoint takes a while.
    pub ready_timeout: Duration,
    pub probe_timeout: Duration,
    pub max_rss: Option<ByteSize>,
    pub poll: Duration,
}

impl ProbeGate {
    pub fn new(target: ProbeTarget) -> Self {
        ProbeGate {
            target,
            ready_timeout: Duration::from_secs(300),
            probe_timeout: Duration::from_secs(60),
            max_rss: None,
            poll: Duration::from_millis(200),
        }
    }

    pub fn prober(&self, agent: &LaunchAgent) -> Result<Prober, HealthError> {
        let tls = self.target.tls_for(agent)?;
        let client =
            mtls_client(&tls, self.probe_timeout).map_err(|e| HealthError::Setup(e.to_string()))?;
        let spec = ProbeSpec {
            timeout: self.probe_timeout,
            ..ProbeSpec::default()
        };
        Prober::new(client, &self.target.url_for(agent)?, spec)
            .map_err(|e| HealthError::Setup(e.to_string()))
    }
}

/// One line for a probe outcome.
pub fn describe(o: &ProbeOutcome) -> String {
    match (&o.error_class, o.status) {
        (None, Some(s)) => format!("HTTP {s} in {:.0} ms", o.latency.as_secs_f64() * 1e3),
        (Some(c), _) => format!("{c}: {}", o.error.clone().unwrap_or_default()),
        (None, None) => "no answer".into(),
    }
}

impl HealthGate for ProbeGate {
    fn check(
        &self,
        services: &dyn ServiceManager,
        label: &Label,
        agent: &LaunchAgent,
        pid: u32,
    ) -> Result<HealthReport, HealthError> {
        let prober = self.prober(agent)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| HealthError::Setup(e.to_string()))?;
        let t0 = Instant::now();
        // Wait for the first good text answer, watching that the process we started lives.
        let text = loop {
            let st = services.status(label)?;
            if st.as_ref().and_then(|s| s.running_pid()) != Some(pid) {
                return Err(HealthError::Died {
                    pid,
                    state: st
                        .as_ref()
                        .map_or("not loaded".to_string(), |s| s.state.to_string()),
                    last_exit: st.map_or(LastExit::Unknown, |s| s.last_exit),
                });
            }
            let o = rt.block_on(prober.probe(ProbeKind::Text));
            if o.is_success() {
                break o;
            }
            // Refused connections are the model loading; anything that answered is final.
            if o.status.is_some() {
                return Err(HealthError::Probe {
                    kind: ProbeKind::Text,
                    detail: describe(&o),
                });
            }
            if t0.elapsed() > self.ready_timeout {
                return Err(HealthError::NotReady {
                    after: self.ready_timeout,
                    last: describe(&o),
                });
            }
            std::thread::sleep(self.poll);
        };
        let ready_after = t0.elapsed();
        let vision = if agent.has_flag("--vision-enabled") {
            let o = rt.block_on(prober.probe(ProbeKind::Vision));
            if !o.is_success() {
                return Err(HealthError::Probe {
                    kind: ProbeKind::Vision,
                    detail: describe(&o),
                });
            }
            Some(o)
        } else {
            None
        };
        let rss = match self.max_rss {
            Some(limit) => {
                let r = rss::resident(pid)
                    .map_err(|source| HealthError::RssUnreadable { pid, source })?;
                if r > limit {
                    return Err(HealthError::Rss { rss: r, limit });
                }
                Some(r)
            }
            None => rss::resident(pid).ok(),
        };
        Ok(HealthReport {
            ready_after,
            text,
            vision,
            rss,
        })
    }
}
