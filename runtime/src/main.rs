use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    match cathedral_runtime::cli::run(cathedral_runtime::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line an operator can act on; no backtrace noise.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
