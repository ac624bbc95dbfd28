//! The `cathedral` command line. Lives in the library so that runbook tests can parse
//! documented commands against the real parser.
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cathedral", version, about = "Qwen3.5/3.6 MoE vision-language inference server (mTLS, OpenAI API)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the small random checkpoint used by tests and the README demo.
    TinyModel(crate::tiny::TinyModelArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::TinyModel(args) => Ok(crate::tiny::write_tiny_model(&args)?),}
}
