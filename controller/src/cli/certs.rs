//! `cathedralctl certs init`: a CA, a server certificate, client certificates (keys 0600);
//! `cathedralctl certs issue`: more of them from that CA, without a rotation.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use cathedral_runtime::certs::{CertDir, Identity, ServerName, Validity, LEAF_DAYS};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA, a server certificate for the given names and one client certificate
    /// per identity, laid out as `ca.pem`, `server.pem`, `clients/<NAME>.pem` (+ `.key`, 0600).
    Init(CertsInitArgs),
    /// Issue more certificates from the CA already in a directory: a client certificate per
    /// new identity, or a new server certificate (other names, or renewal). An existing
    /// certificate is re-issued only with --replace, after a copy of its files is kept.
    Issue(CertsIssueArgs),
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("what").required(true).multiple(true).args(["server_names", "clients"]))]
pub struct CertsIssueArgs {
    /// The directory `certs init` wrote (its `ca.pem` and `ca.key` sign the new certificates).
    #[arg(long)]
    pub dir: PathBuf,
    /// Re-issue the server certificate for these names (repeatable).
    #[arg(long = "server-name", num_args = 1..)]
    pub server_names: Vec<ServerName>,
    /// Client identity to issue a certificate for (repeatable).
    #[arg(long = "client", num_args = 1..)]
    pub clients: Vec<Identity>,
    /// Lifetime of the new certificates.
    #[arg(long, default_value_t = LEAF_DAYS)]
    pub days: u32,
    /// Re-issue certificates that exist already (their files are kept as `*.replaced-<time>`).
    #[arg(long)]
    pub replace: bool,
}

#[derive(Debug, Args)]
pub struct CertsInitArgs {
    /// Directory to create them in (an existing CA there is never overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// DNS name or IP address the server certificate is valid for (repeatable).
    #[arg(long = "server-name", required = true, num_args = 1..)]
    pub server_names: Vec<ServerName>,
    /// Client identity (the certificate's CN; repeatable).
    #[arg(long = "client", required = true, num_args = 1..)]
    pub clients: Vec<Identity>,
    /// Lifetime of the server and client certificates.
    #[arg(long, default_value_t = LEAF_DAYS)]
    pub days: u32,
}

pub fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Init(a) => {
            let dir = CertDir::new(&a.out);
            dir.init(&a.server_names, &a.clients, Validity::days(a.days))
                .with_context(|| format!("creating certificates in {}", a.out.display()))?;
            let show = |b: cathedral_runtime::certs::CertBundle| {
                println!("  {}  (key {})", b.cert.display(), b.key.display())
            };
            println!("CA");
            show(dir.ca());
            println!("server ({})", a.server_names.len());
            show(dir.server());
            println!("clients");
            for c in &a.clients {
                show(dir.client(c));
            }
            Ok(())
        }
        CertsCommand::Issue(a) => {
            let dir = CertDir::new(&a.dir);
            let written = dir
                .issue(
                    &a.server_names,
                    &a.clients,
                    Validity::days(a.days),
                    a.replace,
                )
                .with_context(|| {
                    format!("issuing certificates from the CA in {}", a.dir.display())
                })?;
            println!("issued by {}", dir.ca().cert.display());
            for b in written {
                println!("  {}  (key {})", b.cert.display(), b.key.display());
            }
            Ok(())
        }
    }
}
