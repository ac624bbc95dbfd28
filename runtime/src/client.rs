//! The one mTLS HTTP client builder: controller health checks, canary probes and tests use it.
//!
//! Trusts only the given CA (no system roots), presents the given client certificate, and
//! speaks TLS 1.3 only.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::certs::{load_certs_pem, load_key_pem, CertError};

/// Paths of the PEM files a client needs: the CA that signed the server, and its own identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("TLS configuration rejected: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the CA file {path} holds no usable certificate: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    Build(#[from] reqwest::Error),
}

/// The rustls client configuration behind [`mtls_client`] (for callers that speak TLS directly).
pub fn mtls_client_config(tls: &ClientTls) -> Result<rustls::ClientConfig, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs_pem(&tls.ca)? {
        roots.add(cert).map_err(|e| ClientError::BadCa {
            path: tls.ca.clone(),
            reason: e.to_string(),
        })?;
    }
    let chain = load_certs_pem(&tls.cert)?;
    let key = load_key_pem(&tls.key)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    Ok(config)
}

/// An HTTPS-only reqwest client presenting the client certificate, trusting only `tls.ca`.
/// `timeout` bounds each whole request (connect, TLS, headers and body).
pub fn mtls_client(tls: &ClientTls, timeout: Duration) -> Result<reqwest::Client, ClientError> {
    let config = mtls_client_config(tls)?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .https_only(true)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .build()?;
    Ok(client)
}
