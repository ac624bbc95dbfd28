//! `cathedralctl certs init`: a CA, a server certificate, client certificates (keys 0600).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use cathedral_runtime::certs::{CertDir, Identity, ServerName, Validity, LEAF_DAYS};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA, a server certificate for the given names and one client certificate
    /// per identity, laid out as `ca.pem`, `server.pem`, `clients/<NAME>.pem` (+ `.key`, 0600).
    Init(CertsInitArgs),
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
    }
}
