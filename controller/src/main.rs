use clap::Parser;

fn main() -> anyhow::Result<()> {
    cathedral_controller::cli::run(cathedral_controller::cli::Cli::parse())
}
