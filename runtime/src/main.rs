use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    keep_large_buffers_mapped();
    match cathedral_runtime::cli::run(cathedral_runtime::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line an operator can act on; no backtrace noise.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// MLX's CPU backend allocates and frees buffers of hundreds of MB every decode step (the
/// bf16 head widened for the matmul, for one). glibc serves those with fresh `mmap`s and
/// returns them on free, so every step faults in ~300 MB of new pages: on the benchmark
/// checkpoint that halves decode speed, in about half the processes (whether a buffer happens
/// to be reused from the heap varies from run to run). Serving them from the heap and not
/// trimming it keeps the pages: the peak resident size stays the same.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_large_buffers_mapped() {
    // SAFETY: mallopt only sets allocator parameters; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_large_buffers_mapped() {}
