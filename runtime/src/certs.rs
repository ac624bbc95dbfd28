//! Certificate authority, server and client certificates (rcgen), shared by `cathedralctl certs`
//! and the tests. A client's identity is its certificate's subject common name (CN); the server
//! reads it back with [`identity_from_cert_der`] to decide who may reach the admin routes.
//!
//! Files are PEM; private keys are written with mode 0600, atomically.
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::atomic_file::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(
        "invalid identity {0:?}: use 1-64 characters from letters, digits, '.', '_', '-', '@'"
    )]
    InvalidIdentity(String),
    #[error("invalid server name {0:?}: give a DNS name (like localhost) or an IP address")]
    InvalidServerName(String),
    #[error(
        "invalid validity: not_after ({not_after}) must be later than not_before ({not_before})"
    )]
    InvalidValidity {
        not_before: DateTime<Utc>,
        not_after: DateTime<Utc>,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable PEM {what}: {reason}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("certificate has no subject common name (CN) to use as identity")]
    NoCommonName,
    #[error("certificate could not be parsed: {0}")]
    Parse(String),
}

/// Who a client certificate speaks for: its subject CN. Checked against `--admin-identity`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Identity(String);

impl Identity {
    pub fn new(name: impl Into<String>) -> Result<Self, CertError> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
        if ok {
            Ok(Self(name))
        } else {
            Err(CertError::InvalidIdentity(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Identity {
    type Err = CertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for Identity {
    type Error = CertError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<Identity> for String {
    fn from(id: Identity) -> String {
        id.0
    }
}

/// A name the server certificate is valid for: a DNS name or an IP address (both go in the SAN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerName {
    Dns(String),
    Ip(IpAddr),
}

impl std::str::FromStr for ServerName {
    type Err = CertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        let valid = !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if valid {
            Ok(Self::Dns(s.to_ascii_lowercase()))
        } else {
            Err(CertError::InvalidServerName(s.to_string()))
        }
    }
}

/// The validity window of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

impl Validity {
    /// Valid from an hour ago (tolerates clock skew between machines) for `days` days.
    pub fn days(days: u32) -> Self {
        let now = Utc::now();
        Self {
            not_before: now - ChronoDuration::hours(1),
            not_after: now + ChronoDuration::days(i64::from(days)),
        }
    }

    /// A window that ended a day ago: for testing that expired certificates are refused.
    pub fn expired() -> Self {
        let now = Utc::now();
        Self {
            not_before: now - ChronoDuration::days(30),
            not_after: now - ChronoDuration::days(1),
        }
    }

    fn apply(&self, params: &mut CertificateParams) -> Result<(), CertError> {
        if self.not_after <= self.not_before {
            return Err(CertError::InvalidValidity {
                not_before: self.not_before,
                not_after: self.not_after,
            });
        }
        params.not_before = to_offset(self.not_before);
        params.not_after = to_offset(self.not_after);
        Ok(())
    }
}

/// Default lifetimes: the CA outlives the leaves it signs.
pub const CA_DAYS: u32 = 3650;
pub const LEAF_DAYS: u32 = 825;

fn to_offset(t: DateTime<Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.timestamp())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Where a certificate and its private key live (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertBundle {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertBundle {
    /// `<dir>/<stem>.pem` and `<dir>/<stem>.key`.
    pub fn in_dir(dir: &Path, stem: &str) -> Self {
        Self {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// A certificate with its key, in PEM, ready to write.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl IssuedCert {
    /// Writes the certificate (0644) and the key (0600), each atomically.
    pub fn write(&self, bundle: &CertBundle) -> Result<(), CertError> {
        for (path, data, mode) in [
            (&bundle.cert, &self.cert_pem, 0o644),
            (&bundle.key, &self.key_pem, 0o600),
        ] {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|source| CertError::Write {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            write_atomic(path, data.as_bytes(), Some(mode)).map_err(|source| CertError::Write {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// A certificate authority able to sign server and client certificates.
pub struct CertAuthority {
    cert: Certificate,
    key: KeyPair,
}

impl CertAuthority {
    /// A new self-signed CA whose subject CN is `common_name`.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        validity.apply(&mut params)?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// Loads a CA written earlier by [`CertAuthority::write`] (to issue more client certificates).
    pub fn load(bundle: &CertBundle) -> Result<Self, CertError> {
        let cert_pem = read_to_string(&bundle.cert)?;
        let key_pem = read_to_string(&bundle.key)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::Pem {
            path: bundle.key.clone(),
            what: "private key",
            reason: e.to_string(),
        })?;
        let params =
            CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|e| CertError::Pem {
                path: bundle.cert.clone(),
                what: "CA certificate",
                reason: e.to_string(),
            })?;
        // Re-signing the parsed parameters gives the same subject and key identifier, which is
        // all that issuing needs; the file on disk stays the trust anchor.
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate and key (0600).
    pub fn write(&self, bundle: &CertBundle) -> Result<(), CertError> {
        IssuedCert {
            cert_pem: self.cert.pem(),
            key_pem: self.key.serialize_pem(),
        }
        .write(bundle)
    }

    /// A server certificate valid for `names` (the first DNS name, else the first IP, is the CN).
    pub fn issue_server(
        &self,
        names: &[ServerName],
        validity: Validity,
    ) -> Result<IssuedCert, CertError> {
        let mut params = CertificateParams::default();
        let cn = names
            .iter()
            .map(|n| match n {
                ServerName::Dns(d) => d.clone(),
                ServerName::Ip(ip) => ip.to_string(),
            })
            .next()
            .unwrap_or_else(|| "cathedral".to_string());
        params.distinguished_name = dn(&cn);
        params.subject_alt_names = names
            .iter()
            .map(|n| match n {
                ServerName::Dns(d) => d
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|_| CertError::InvalidServerName(d.clone())),
                ServerName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, validity)
    }

    /// A client certificate whose identity (subject CN) is `identity`.
    pub fn issue_client(
        &self,
        identity: &Identity,
        validity: Validity,
    ) -> Result<IssuedCert, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(identity.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, validity)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        validity: Validity,
    ) -> Result<IssuedCert, CertError> {
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        validity.apply(&mut params)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    SerialNumber::from_slice(&bytes)
}

fn read_to_string(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The conventional layout of a certificate directory, as `cathedralctl certs init` writes it:
/// `ca.pem`/`ca.key`, `server.pem`/`server.key`, `clients/<identity>.pem`/`.key`.
#[derive(Debug, Clone)]
pub struct CertDir {
    pub root: PathBuf,
}

impl CertDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn ca(&self) -> CertBundle {
        CertBundle::in_dir(&self.root, "ca")
    }
    pub fn server(&self) -> CertBundle {
        CertBundle::in_dir(&self.root, "server")
    }
    pub fn client(&self, identity: &Identity) -> CertBundle {
        CertBundle::in_dir(&self.root.join("clients"), identity.as_str())
    }

    /// Creates a CA, a server certificate for `server_names` and one client certificate per
    /// identity. Refuses to overwrite an existing CA (that would orphan every issued certificate).
    pub fn init(
        &self,
        server_names: &[ServerName],
        clients: &[Identity],
        validity: Validity,
    ) -> Result<CertAuthority, CertError> {
        let ca_bundle = self.ca();
        if ca_bundle.cert.exists() {
            return Err(CertError::Write {
                path: ca_bundle.cert,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a CA already exists here; issue new certificates from it instead",
                ),
            });
        }
        let ca = CertAuthority::generate("cathedral CA", Validity::days(CA_DAYS))?;
        ca.write(&ca_bundle)?;
        ca.issue_server(server_names, validity)?
            .write(&self.server())?;
        for id in clients {
            ca.issue_client(id, validity)?.write(&self.client(id))?;
        }
        Ok(ca)
    }

    /// Issues more certificates from the CA already here: a server certificate for
    /// `server_names` (when any are given) and one client certificate per identity, so that
    /// adding a machine or a person needs no rotation. An existing certificate is replaced
    /// only with `replace`, after its files are copied to `<file>.replaced-<UTC time>`.
    /// Returns where each new certificate was written.
    pub fn issue(
        &self,
        server_names: &[ServerName],
        clients: &[Identity],
        validity: Validity,
        replace: bool,
    ) -> Result<Vec<CertBundle>, CertError> {
        let ca = CertAuthority::load(&self.ca())?;
        let mut targets = Vec::new();
        if !server_names.is_empty() {
            targets.push((self.server(), ca.issue_server(server_names, validity)?));
        }
        for id in clients {
            targets.push((self.client(id), ca.issue_client(id, validity)?));
        }
        // Every refusal before any write: one clash leaves the directory as it was.
        if !replace {
            if let Some((taken, _)) = targets.iter().find(|(b, _)| b.cert.exists()) {
                return Err(CertError::Write {
                    path: taken.cert.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "a certificate is already issued here; pass --replace to re-issue it",
                    ),
                });
            }
        }
        let stamp = Utc::now().format("%Y%m%dT%H%M%SZ");
        for (bundle, issued) in &targets {
            for path in [&bundle.cert, &bundle.key] {
                if path.exists() {
                    let mut backup = path.clone().into_os_string();
                    backup.push(format!(".replaced-{stamp}"));
                    std::fs::copy(path, &backup).map_err(|source| CertError::Write {
                        path: PathBuf::from(backup),
                        source,
                    })?;
                }
            }
            issued.write(bundle)?;
        }
        Ok(targets.into_iter().map(|(b, _)| b).collect())
    }
}

/// Reads the identity (subject CN) from a DER certificate, as presented by a TLS client.
pub fn identity_from_cert_der(der: &[u8]) -> Result<Identity, CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or(CertError::NoCommonName)?
        .as_str()
        .map_err(|e| CertError::Parse(e.to_string()))?;
    Identity::new(cn)
}

/// Reads all certificates from a PEM file (DER form, for rustls).
pub fn load_certs_pem(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, CertError> {
    let data = std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn load_key_pem(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, CertError> {
    let data = std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| CertError::Pem {
            path: path.to_path_buf(),
            what: "private key",
            reason: e.to_string(),
        })?
        .ok_or_else(|| CertError::Pem {
            path: path.to_path_buf(),
            what: "private key",
            reason: "no PRIVATE KEY block found".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_rules() {
        assert!(Identity::new("canary").is_ok());
        assert!(Identity::new("ops@mini.local").is_ok());
        assert!(Identity::new("").is_err());
        assert!(Identity::new("a b").is_err());
        assert!(Identity::new("x".repeat(65)).is_err());
    }

    #[test]
    fn server_names_parse() {
        assert_eq!(
            "127.0.0.1".parse::<ServerName>().unwrap(),
            ServerName::Ip("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            "LocalHost".parse::<ServerName>().unwrap(),
            ServerName::Dns("localhost".into())
        );
        assert!("bad name".parse::<ServerName>().is_err());
    }

    #[test]
    fn init_writes_layout_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertDir::new(dir.path());
        let admin = Identity::new("admin").unwrap();
        let ca = certs
            .init(
                &["localhost".parse().unwrap(), "127.0.0.1".parse().unwrap()],
                std::slice::from_ref(&admin),
                Validity::days(1),
            )
            .unwrap();
        for bundle in [certs.ca(), certs.server(), certs.client(&admin)] {
            assert!(!load_certs_pem(&bundle.cert).unwrap().is_empty());
            load_key_pem(&bundle.key).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&bundle.key).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", bundle.key.display());
            }
        }
        let der = load_certs_pem(&certs.client(&admin).cert).unwrap();
        assert_eq!(identity_from_cert_der(&der[0]).unwrap(), admin);
        // A second init must not replace the CA.
        assert!(certs.init(&[], &[], Validity::days(1)).is_err());
        // The CA reloads from disk and issues certificates that chain to the same subject.
        let reloaded = CertAuthority::load(&certs.ca()).unwrap();
        let other = Identity::new("other").unwrap();
        let issued = reloaded.issue_client(&other, Validity::days(1)).unwrap();
        let (_, leaf) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
        let leaf = leaf.parse_x509().unwrap();
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
        let ca_cert = ca_pem.parse_x509().unwrap();
        assert_eq!(leaf.issuer(), ca_cert.subject());
    }

    /// Whether `leaf` (PEM) is a client certificate that `ca` (PEM file) vouches for, as the
    /// server's mTLS verifier decides it.
    fn client_chains_to(ca: &Path, leaf: &Path) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs_pem(ca).unwrap() {
            roots.add(c).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .unwrap();
        let chain = load_certs_pem(leaf).unwrap();
        verifier
            .verify_client_cert(&chain[0], &[], rustls::pki_types::UnixTime::now())
            .is_ok()
    }

    #[test]
    fn issue_adds_clients_from_the_existing_ca_and_replaces_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertDir::new(dir.path());
        let operator = Identity::new("operator").unwrap();
        certs
            .init(
                &["localhost".parse().unwrap()],
                std::slice::from_ref(&operator),
                Validity::days(1),
            )
            .unwrap();
        let ca_before = std::fs::read(certs.ca().cert).unwrap();
        let laptop = Identity::new("laptop").unwrap();
        let written = certs
            .issue(&[], std::slice::from_ref(&laptop), Validity::days(1), false)
            .unwrap();
        assert_eq!(written, vec![certs.client(&laptop)]);
        assert_eq!(
            std::fs::read(certs.ca().cert).unwrap(),
            ca_before,
            "CA untouched"
        );
        assert!(client_chains_to(
            &certs.ca().cert,
            &certs.client(&laptop).cert
        ));
        assert!(client_chains_to(
            &certs.ca().cert,
            &certs.client(&operator).cert
        ));
        // A certificate from another CA is refused by the same check.
        let stranger = tempfile::tempdir().unwrap();
        let other = CertDir::new(stranger.path());
        other
            .init(&[], std::slice::from_ref(&laptop), Validity::days(1))
            .unwrap();
        assert!(!client_chains_to(
            &certs.ca().cert,
            &other.client(&laptop).cert
        ));

        // Re-issuing needs --replace; a clash writes nothing, even for the new names.
        let fresh = Identity::new("fresh").unwrap();
        let before = std::fs::read(certs.client(&operator).cert).unwrap();
        assert!(certs
            .issue(
                &[],
                &[fresh.clone(), operator.clone()],
                Validity::days(1),
                false
            )
            .is_err());
        assert!(!certs.client(&fresh).cert.exists());
        certs
            .issue(
                &[],
                std::slice::from_ref(&operator),
                Validity::days(1),
                true,
            )
            .unwrap();
        let after = std::fs::read(certs.client(&operator).cert).unwrap();
        assert_ne!(after, before);
        let backups: Vec<_> = std::fs::read_dir(dir.path().join("clients"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("operator.pem.replaced-"))
            .collect();
        assert_eq!(backups.len(), 1, "{backups:?}");
        assert_eq!(
            std::fs::read(dir.path().join("clients").join(&backups[0])).unwrap(),
            before
        );
        assert!(client_chains_to(
            &certs.ca().cert,
            &certs.client(&operator).cert
        ));

        // Without a CA there is nothing to issue from.
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            CertDir::new(empty.path()).issue(&[], &[fresh], Validity::days(1), false),
            Err(CertError::Read { .. })
        ));
    }

    #[test]
    fn expired_validity_is_in_the_past() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::generate("t", Validity::days(1)).unwrap();
        let id = Identity::new("old").unwrap();
        let issued = ca.issue_client(&id, Validity::expired()).unwrap();
        let bundle = CertBundle::in_dir(dir.path(), "old");
        issued.write(&bundle).unwrap();
        let der = load_certs_pem(&bundle.cert).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
        assert!(!cert.validity().is_valid());
    }
}
