use clap::Parser;

fn main() -> anyhow::Result<()> {
    cathedral_runtime::cli::run(cathedral_runtime::cli::Cli::parse())
}
