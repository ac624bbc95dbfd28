//! The `cathedral` command line. Lives in the library so that runbook tests can parse
//! documented commands against the real parser.
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cathedral",
    version,
    about = "Qwen3.5/3.6 MoE vision-language inference server (mTLS, OpenAI API)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the model over mTLS with an OpenAI-compatible API.
    Serve(Box<crate::server::ServeArgs>),
    /// Write the small random checkpoint used by tests and the README demo.
    TinyModel(crate::tiny::TinyModelArgs),
    /// Time the vision tower alone (random weights, real shapes), optionally against mlx-vlm.
    BenchVision(crate::vision::bench::BenchVisionArgs),
    /// Time a checkpoint phase by phase (vision tower, prefill, decode) for scripts/bench.
    Bench(crate::bench::BenchArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => crate::server::serve_command(*args),
        Command::TinyModel(args) => Ok(crate::tiny::write_tiny_model(&args)?),
        Command::BenchVision(args) => crate::vision::bench::run_bench_vision(&args),
        Command::Bench(args) => crate::bench::run_bench(&args),
    }
}
