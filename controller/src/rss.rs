//! Resident memory of the service process, and byte sizes as operators write them (`51G`).

use std::fmt;
use std::str::FromStr;

/// A byte count parsed from `51G`, `512M`, `1.5GiB`, `1048576` (binary multiples).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 51G, 512M or 1048576"))?;
        let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KB" | "KIB" => 1 << 10,
            "M" | "MB" | "MIB" => 1 << 20,
            "G" | "GB" | "GIB" => 1 << 30,
            "T" | "TB" | "TIB" => 1 << 40,
            u => {
                return Err(format!(
                    "unknown size unit {u:?} in {s:?} (use K, M, G or T)"
                ))
            }
        };
        Ok(ByteSize((n * mult as f64).round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if b >= (1u64 << 30) as f64 {
            write!(f, "{:.2} GiB", b / (1u64 << 30) as f64)
        } else {
            write!(f, "{:.1} MiB", b / (1u64 << 20) as f64)
        }
    }
}

/// Resident set size of `pid`: procfs where it exists, else `ps -o rss=` (KiB, macOS).
pub fn resident(pid: u32) -> std::io::Result<ByteSize> {
    let status = format!("/proc/{pid}/status");
    if let Ok(s) = std::fs::read_to_string(&status) {
        for line in s.lines() {
            if let Some(v) = line.strip_prefix("VmRSS:") {
                let kib: u64 = v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .map_err(std::io::Error::other)?;
                return Ok(ByteSize(kib * 1024));
            }
        }
        return Err(std::io::Error::other(format!("no VmRSS in {status}")));
    }
    let out = std::process::Command::new("ps")
        .args(["-o", "rss=", "-p", &pid.to_string()])
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "process {pid} not found by ps"
        )));
    }
    let kib: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(std::io::Error::other)?;
    Ok(ByteSize(kib * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operator_sizes() {
        assert_eq!("51G".parse::<ByteSize>().unwrap(), ByteSize(51 << 30));
        assert_eq!("512MiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 20));
        assert_eq!("1.5G".parse::<ByteSize>().unwrap(), ByteSize(3 << 29));
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert!("lots".parse::<ByteSize>().is_err());
        assert!("5X".parse::<ByteSize>().is_err());
    }

    #[test]
    fn own_resident_memory_is_plausible() {
        let r = resident(std::process::id()).unwrap();
        assert!(r.0 > 1 << 20 && r.0 < 64 << 30, "{r}");
    }
}
