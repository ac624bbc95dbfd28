//! Whole-file replacement that a crash cannot tear: a temp file in the same directory,
//! fsync, rename over the target, fsync the directory. A reader (or launchd) sees the old
//! file or the new one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const TMP_MARK: &str = ".cathedralctl-tmp-";

/// The temp name for `target` written by this process.
fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}{TMP_MARK}{}", std::process::id()))
}

/// Replaces `target` with `bytes`. `mode` defaults to the current file's permissions
/// (0644 for a new file). `check` runs on the complete temp file before it goes live, so a
/// definition that fails `plutil -lint` never replaces the old one.
pub fn write_atomic(
    target: &Path,
    bytes: &[u8],
    mode: Option<u32>,
    check: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let mode = match mode {
        Some(m) => m,
        None => fs::metadata(target)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644),
    };
    let tmp = temp_path(target);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode on create.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        check(&tmp)?;
        fs::rename(&tmp, target)?;
        sync_dir(target.parent().unwrap_or(Path::new(".")))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes a rename or a new directory entry durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// Appends one line and fsyncs: for append-only logs (the ledger) where a torn last line
/// is detectable and skipped by readers.
pub fn append_line(path: &Path, line: &str) -> io::Result<()> {
    let existed = path.exists();
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    f.write_all(&buf)?;
    f.sync_all()?;
    if !existed {
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

/// Removes temp files that a killed writer left next to `target` (their process is gone).
pub fn sweep_stale_temps(target: &Path) -> io::Result<Vec<PathBuf>> {
    let Some(dir) = target.parent() else {
        return Ok(Vec::new());
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Temps of the definition itself and of its backups (`.<name>.pre-…`).
    let prefix = format!(".{name}");
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let fname = entry.file_name().to_string_lossy().into_owned();
        let Some((_, pid)) = fname
            .strip_prefix(&prefix)
            .and_then(|rest| rest.rsplit_once(TMP_MARK))
        else {
            continue;
        };
        let alive = pid
            .parse::<i32>()
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .is_some_and(|p| rustix::process::test_kill_process(p).is_ok());
        if !alive {
            fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.plist");
        fs::write(&p, b"old").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        write_atomic(&p, b"new", None, |_| Ok(())).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp left behind"
        );
    }

    #[test]
    fn failed_check_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.plist");
        fs::write(&p, b"old").unwrap();
        let e = write_atomic(&p, b"bad", None, |_| Err(io::Error::other("lint failed")));
        assert!(e.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temps_of_dead_writers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.plist");
        // pid 0x7ffffffe is never a live process here.
        let stale = dir
            .path()
            .join(format!(".a.plist{TMP_MARK}{}", 0x7fff_fffe));
        let live = temp_path(&p);
        fs::write(&stale, b"x").unwrap();
        fs::write(&live, b"x").unwrap();
        let removed = sweep_stale_temps(&p).unwrap();
        assert_eq!(removed, vec![stale]);
        assert!(live.exists());
    }
}
