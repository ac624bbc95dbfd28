//! Backups of a service definition, taken before every change:
//! `<plist>.pre-<tag>-YYYYMMDD-HHMMSS` next to the plist (launchd loads only `*.plist`, so
//! backups never become jobs). Rollback is one copy away.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use chrono::{Local, NaiveDateTime};

use crate::agent::PlistPath;
use crate::atomic;

pub const DEFAULT_KEEP: usize = 10;
const STAMP: &str = "%Y%m%d-%H%M%S";

/// Why a backup was taken: `deploy`, `multimodal`, `rollback`, `edit`...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupTag(String);

impl BackupTag {
    pub fn new(s: &str) -> Result<Self, String> {
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            Ok(BackupTag(s.to_string()))
        } else {
            Err(format!(
                "backup tag {s:?} must be letters, digits, '-' or '_'"
            ))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One backup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub path: PathBuf,
    pub tag: String,
    pub taken_at: NaiveDateTime,
    /// Tie-breaker for two backups with the same tag in the same second (`-2`, `-3`...).
    pub seq: u32,
    /// Orders backups with different tags taken in the same second.
    pub modified: Option<std::time::SystemTime>,
}

impl fmt::Display for Backup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}  {:<12} {}",
            self.taken_at.format("%Y-%m-%d %H:%M:%S"),
            self.tag,
            self.path.display()
        )
    }
}

impl Backup {
    /// Parses `<plist file name>.pre-<tag>-YYYYMMDD-HHMMSS[-N]`.
    fn parse(plist_name: &str, path: PathBuf) -> Option<Backup> {
        let name = path.file_name()?.to_str()?;
        let rest = name.strip_prefix(plist_name)?.strip_prefix(".pre-")?;
        let (rest, seq) = match rest.rsplit_once('-') {
            Some((head, n))
                if n.len() < 6 && n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() =>
            {
                (head, n.parse().ok()?)
            }
            _ => (rest, 1),
        };
        // The stamp is the last 15 characters: YYYYMMDD-HHMMSS.
        if rest.len() < 17 {
            return None;
        }
        let (tag, stamp) = rest.split_at(rest.len() - 15);
        let tag = tag.strip_suffix('-')?;
        let taken_at = NaiveDateTime::parse_from_str(stamp, STAMP).ok()?;
        Some(Backup {
            path: path.clone(),
            tag: tag.to_string(),
            taken_at,
            seq,
            modified: std::fs::metadata(&path).and_then(|m| m.modified()).ok(),
        })
    }
}

/// Copies `bytes` (the definition as it is now) to a new backup file, atomically.
pub fn take(plist: &PlistPath, tag: &BackupTag, bytes: &[u8]) -> std::io::Result<Backup> {
    let now = Local::now().naive_local();
    let base = format!(
        "{}.pre-{}-{}",
        plist.file_name(),
        tag.as_str(),
        now.format(STAMP)
    );
    let mut seq = 1;
    let mut path = plist.dir().join(&base);
    while path.exists() {
        seq += 1;
        path = plist.dir().join(format!("{base}-{seq}"));
    }
    atomic::write_atomic(&path, bytes, None, |_| Ok(()))?;
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    Ok(Backup {
        path,
        tag: tag.as_str().to_string(),
        taken_at: now.with_nanosecond_zeroed(),
        seq,
        modified,
    })
}

trait ZeroNanos {
    fn with_nanosecond_zeroed(self) -> Self;
}
impl ZeroNanos for NaiveDateTime {
    fn with_nanosecond_zeroed(self) -> Self {
        use chrono::Timelike;
        self.with_nanosecond(0).unwrap_or(self)
    }
}

/// The backups of `plist`, newest first.
pub fn list(plist: &PlistPath) -> std::io::Result<Vec<Backup>> {
    let name = plist.file_name();
    let mut out: Vec<Backup> = match fs::read_dir(plist.dir()) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| Backup::parse(&name, e.path()))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    out.sort_by_key(|b| std::cmp::Reverse((b.taken_at, b.modified, b.seq)));
    Ok(out)
}

/// Deletes all but the newest `keep` backups; returns what it deleted.
pub fn prune(plist: &PlistPath, keep: usize) -> std::io::Result<Vec<Backup>> {
    let all = list(plist)?;
    let old: Vec<Backup> = all.into_iter().skip(keep.max(1)).collect();
    for b in &old {
        fs::remove_file(&b.path)?;
    }
    if !old.is_empty() {
        atomic::sync_dir(plist.dir())?;
    }
    Ok(old)
}

/// Resolves `--to`: a path, or a backup's file name next to the plist.
pub fn resolve(plist: &PlistPath, to: &Path) -> std::io::Result<PathBuf> {
    let candidate = if to.components().count() == 1 {
        plist.dir().join(to)
    } else {
        to.to_path_buf()
    };
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no backup at {}", candidate.display()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_field_report_name() {
        let b = Backup::parse(
            "com.sanctum.mlx.plist",
            PathBuf::from("/x/com.sanctum.mlx.plist.pre-multimodal-20260503-135006"),
        )
        .unwrap();
        assert_eq!(b.tag, "multimodal");
        assert_eq!(b.taken_at.format(STAMP).to_string(), "20260503-135006");
        assert!(Backup::parse("a.plist", PathBuf::from("/x/a.plist.pre-x-2026")).is_none());
        assert!(
            Backup::parse("a.plist", PathBuf::from("/x/b.plist.pre-x-20260503-135006")).is_none()
        );
        let dashed = Backup::parse(
            "a.plist",
            PathBuf::from("/x/a.plist.pre-pre-deploy-20260503-135006-3"),
        )
        .unwrap();
        assert_eq!((dashed.tag.as_str(), dashed.seq), ("pre-deploy", 3));
    }

    #[test]
    fn take_list_and_prune_keep_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let plist = PlistPath::new(dir.path().join("a.plist")).unwrap();
        fs::write(plist.as_path(), b"v0").unwrap();
        let tag = BackupTag::new("deploy").unwrap();
        let mut taken = Vec::new();
        for i in 0..5 {
            taken.push(take(&plist, &tag, format!("v{i}").as_bytes()).unwrap());
        }
        let listed = list(&plist).unwrap();
        assert_eq!(listed.len(), 5);
        assert_eq!(fs::read(&listed[0].path).unwrap(), b"v4", "newest first");
        let removed = prune(&plist, 3).unwrap();
        assert_eq!(removed.len(), 2);
        let left: Vec<_> = list(&plist)
            .unwrap()
            .into_iter()
            .map(|b| fs::read(b.path).unwrap())
            .collect();
        assert_eq!(left, vec![b"v4".to_vec(), b"v3".to_vec(), b"v2".to_vec()]);
        assert_eq!(
            fs::read(plist.as_path()).unwrap(),
            b"v0",
            "the plist itself is untouched"
        );
    }
}
