//! `plutil -lint` where it exists (macOS); our own structural checks run everywhere
//! (see [`crate::agent::LaunchAgent::problems`]).

use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lint {
    Passed,
    /// No `plutil` on PATH (not macOS): only the structural checks ran.
    Unavailable,
}

/// Runs `plutil -lint FILE`; an error carries plutil's own words.
pub fn plutil(path: &Path) -> std::io::Result<Lint> {
    let Some(plutil) = crate::launchd::find_on_path("plutil") else {
        return Ok(Lint::Unavailable);
    };
    let out = Command::new(plutil).arg("-lint").arg(path).output()?;
    if out.status.success() {
        Ok(Lint::Passed)
    } else {
        Err(std::io::Error::other(format!(
            "plutil -lint refused {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
