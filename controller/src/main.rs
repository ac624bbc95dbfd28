use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    match cathedral_controller::cli::run(cathedral_controller::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(found) = e.downcast_ref::<cathedral_controller::cli::service::StatusExit>()
            {
                // Not an error of the command: the report is printed; the code says what it found.
                eprintln!("{found}");
                return ExitCode::from(found.code());
            }
            // One line an operator can act on; no backtrace noise.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
