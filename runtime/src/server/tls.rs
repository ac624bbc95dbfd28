//! The rustls server side: our certificate, client certificates verified against `--client-ca`
//! (no certificate, another CA or an expired one is refused at the handshake), TLS 1.3 unless
//! 1.2 is allowed by flag. The configuration sits behind a lock so that SIGHUP can swap in
//! re-read certificates; connections already open keep the TLS state they negotiated.
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

use crate::certs::{identity_from_cert_der, load_certs_pem, load_key_pem, CertError, Identity};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("client CA {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub allow_tls12: bool,
}

impl TlsFiles {
    /// Reads the files and builds a server configuration.
    pub fn build(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in load_certs_pem(&self.client_ca)? {
            roots.add(ca).map_err(|e| TlsError::ClientCa {
                path: self.client_ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: self.client_ca.clone(),
                    reason: e.to_string(),
                })?;
        let versions: &[&rustls::SupportedProtocolVersion] = if self.allow_tls12 {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(load_certs_pem(&self.cert)?, load_key_pem(&self.key)?)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The live server configuration, replaceable at run time.
pub struct ReloadableTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl ReloadableTls {
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let current = RwLock::new(files.build()?);
        Ok(Self { files, current })
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Re-reads the files; on error the previous configuration stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = self.files.build()?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub enum Peer {
    /// Authenticated by a client certificate; `identity` is its CN when it is a valid name.
    Tls { identity: Option<Identity> },
    /// The loopback plain-HTTP listener: local tools, never admin.
    Plain,
}

impl Peer {
    pub fn from_tls(conn: &rustls::ServerConnection) -> Self {
        let identity = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| identity_from_cert_der(leaf).ok());
        Peer::Tls { identity }
    }

    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Peer::Tls { identity } => identity.as_ref(),
            Peer::Plain => None,
        }
    }
}
