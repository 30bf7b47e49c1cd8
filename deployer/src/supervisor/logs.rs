//! A process's log files: `<log_dir>/<instance_id>.out.log` and
//! `.err.log`, written by the process itself through descriptors opened
//! with `O_APPEND` (never a pipe to the deployer: a pipe would break with
//! SIGPIPE when the deployer restarts, and the process must survive that).
//!
//! Rotation is copytruncate: the file is copied to `.1` (older copies move
//! up to `.2`, `.3`…) and then truncated in place. Since every write of an
//! `O_APPEND` descriptor goes to the current end, the process keeps writing
//! at the start of the emptied file, without holes. The price: lines written
//! between the end of the copy and the truncation are lost — a window of
//! about one file copy (milliseconds for the default 50 MiB on a local
//! disk), once per rotation.

use std::{
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

/// One of a process's two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output: `<instance_id>.out.log`.
    Out,
    /// Standard error: `<instance_id>.err.log`.
    Err,
}

// === impl LogStream ===

impl LogStream {
    /// The log file of `instance_id` for this stream in `log_dir`.
    pub fn path(self, log_dir: &Path, instance_id: &str) -> PathBuf {
        let suffix = match self {
            Self::Out => "out",
            Self::Err => "err",
        };
        log_dir.join(format!("{instance_id}.{suffix}.log"))
    }
}

/// Opens (creating) `path` for appending, to hand to a child as its output.
pub(crate) fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// `path` with `.n` appended: the n-th older copy.
fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Rotates `path` if it is larger than `max_bytes`: copies kept as `.1`
/// (newest) to `.keep`, the file itself truncated. Returns whether it
/// rotated. A missing file is not an error (the process wrote nothing yet).
pub(crate) fn rotate_if_larger(path: &Path, max_bytes: u64, keep: usize) -> io::Result<bool> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max_bytes {
        return Ok(false);
    }
    if keep > 0 {
        for n in (1..keep).rev() {
            match fs::rename(numbered(path, n), numbered(path, n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        fs::copy(path, numbered(path, 1))?;
    }
    // Lines written from here until the truncation are the ones lost.
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// The last `lines` lines of `path`, reading at most the last `max_bytes`
/// bytes of it (a line cut by that bound is left out). Invalid UTF-8 is
/// replaced; a missing file has no lines.
pub fn tail_lines(path: &Path, lines: usize, max_bytes: u64) -> io::Result<Vec<String>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    // One byte more in front tells whether the first line read is whole.
    let from = start.saturating_sub(1);
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    file.take(len - from).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let body: &str = if start == 0 {
        &text
    } else {
        text.split_once('\n').map_or("", |(_, rest)| rest)
    };
    let all: Vec<&str> = body.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn tail_reads_last_lines_within_byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.out.log");
        let mut f = File::create(&p).unwrap();
        for i in 0..100 {
            writeln!(f, "line {i}").unwrap();
        }
        assert_eq!(tail_lines(&p, 2, 1 << 20).unwrap(), ["line 98", "line 99"]);
        // 16 bytes hold two whole lines; 12 reach into "line 98" partway,
        // which is left out.
        assert_eq!(tail_lines(&p, 10, 16).unwrap(), ["line 98", "line 99"]);
        assert_eq!(tail_lines(&p, 10, 12).unwrap(), ["line 99"]);
        assert!(
            tail_lines(&dir.path().join("none"), 5, 100)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn rotation_shifts_copies_and_keeps_at_most_keep() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.out.log");
        let mut w = open_append(&p).unwrap();
        for round in 0..5 {
            w.write_all(format!("round {round} ").repeat(20).as_bytes())
                .unwrap();
            assert!(rotate_if_larger(&p, 50, 3).unwrap());
            assert!(!rotate_if_larger(&p, 50, 3).unwrap(), "already small");
        }
        // The descriptor still appends at the (new) start: no hole of NULs.
        w.write_all(b"after").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"after");
        let newest = fs::read_to_string(numbered(&p, 1)).unwrap();
        assert!(newest.starts_with("round 4"), "{newest}");
        let oldest = fs::read_to_string(numbered(&p, 3)).unwrap();
        assert!(oldest.starts_with("round 2"), "{oldest}");
        assert!(!numbered(&p, 4).exists());
    }
}
