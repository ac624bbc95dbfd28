//! The `cathedralctl` command line. In the library so that runbook tests can parse
//! documented commands against the real parser.
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cathedralctl", version, about = "Deploy, roll back, watch and report on a cathedral runtime under launchd")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {}
}
