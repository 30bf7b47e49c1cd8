//! Tailing one file path: complete lines, in order, each once, across
//! rotation by rename and by truncation.
//!
//! A [`Tailer`] is polled ([`Tailer::poll_once`]); it remembers the file it
//! reads by (device, inode) and its offset in it.
//!
//! - **Rename** (`app.log` → `app.log.1`, a new `app.log`): the path now
//!   names another inode. The old file stays open and is read to its end
//!   first; it is then kept and read on every poll until it has given
//!   nothing for `rotate_wait`, because a logger keeps writing to its old
//!   descriptor until it reopens. The new file is read from its beginning.
//! - **Truncation** (copytruncate: same inode, size below our offset): read
//!   again from 0. Lines the writer adds between the rotator's copy and its
//!   truncate are in neither file once truncated; that window belongs to
//!   copytruncate itself, and no reader can close it. What we had read
//!   before the truncate is not read again. A file that grows past our
//!   offset again between two polls cannot be told from one that only
//!   grew: its new start is then missed too (poll often, rotate rarely).
//! - **Missing** path: waited for; a file that appears later is read from
//!   its beginning.
//!
//! A partial last line waits for its newline. A line longer than
//! `max_line` bytes is given once, cut at `max_line`, and the rest of it up
//! to its newline is skipped.

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// Bytes read from one file per poll, at most: a large backlog is read over
/// several polls instead of holding the whole of it in memory.
const READ_BUDGET: usize = 4 << 20;

/// Where a file that exists when tailing starts is read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    /// Its first byte: everything it holds is read.
    Beginning,
    /// Its current end: only lines written from now on.
    #[default]
    End,
}

/// How a [`Tailer`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TailOptions {
    /// Where a file that exists at the first poll is read from; a file
    /// that appears later is always read from its beginning.
    pub start_at: StartAt,
    /// The longest line given whole; a longer one is cut.
    pub max_line: usize,
    /// How long a rotated-away file is still read after it last grew.
    pub rotate_wait: Duration,
}

/// A place in a file: which file, and how far its complete lines were read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The file's device.
    pub dev: u64,
    /// The file's inode.
    pub ino: u64,
    /// Bytes of complete lines read.
    pub offset: u64,
}

/// Follows one path; see the module docs.
#[derive(Debug)]
pub struct Tailer {
    path: PathBuf,
    options: TailOptions,
    /// The file the path named when last looked at.
    current: Option<Reader>,
    /// Files rotated away, still read until quiet.
    draining: Vec<Reader>,
    /// Whether the path has been polled before (a file found at the first
    /// poll existed at start).
    started: bool,
    /// Where a previous run stopped, used once if the file is the same.
    resume: Option<Position>,
}

/// One open file.
#[derive(Debug)]
struct Reader {
    file: File,
    dev: u64,
    ino: u64,
    /// Bytes read from the file.
    offset: u64,
    /// An unfinished line.
    partial: Vec<u8>,
    /// Inside a too-long line whose cut head was given already.
    skipping: bool,
    /// When the file last gave bytes.
    last_data: Instant,
}

// === impl TailOptions ===

impl Default for TailOptions {
    fn default() -> Self {
        Self {
            start_at: StartAt::End,
            max_line: 64 * 1024,
            rotate_wait: Duration::from_secs(5),
        }
    }
}

// === impl Tailer ===

impl Tailer {
    /// Tails `path`, which need not exist yet.
    pub fn new(path: impl Into<PathBuf>, options: TailOptions) -> Self {
        Self {
            path: path.into(),
            options,
            current: None,
            draining: Vec::new(),
            started: false,
            resume: None,
        }
    }

    /// Tails `path` from `position` if the path still names that file and
    /// it has not shrunk below it; else from the beginning of the file
    /// (it was rotated or truncated since the position was taken).
    pub fn resume(path: impl Into<PathBuf>, options: TailOptions, position: Position) -> Self {
        Self {
            resume: Some(position),
            ..Self::new(path, options)
        }
    }

    /// The path tailed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the current file's complete lines were read to; none before
    /// the file was found.
    pub fn position(&self) -> Option<Position> {
        self.current.as_ref().map(Reader::position)
    }

    /// Whether nothing is left to read: no file open, or the path is gone
    /// and its last file has been quiet for `rotate_wait`.
    pub fn is_finished(&self, now: Instant) -> bool {
        let quiet = |r: &Reader| now.duration_since(r.last_data) >= self.options.rotate_wait;
        self.draining.is_empty() && !self.path.exists() && self.current.as_ref().is_none_or(quiet)
    }

    /// Reads what was written since the last poll: the complete lines, in
    /// the order they were written (a rotated-away file's before its
    /// successor's).
    pub fn poll_once(&mut self) -> io::Result<Vec<String>> {
        let now = Instant::now();
        let mut lines = Vec::new();
        let first = !std::mem::replace(&mut self.started, true);
        if self.current.is_none() {
            self.current = self.open(first)?;
        }
        self.drain_rotated(now, &mut lines)?;
        let Some(current) = self.current.as_mut() else {
            return Ok(lines);
        };
        current.check_truncated(&mut lines)?;
        if !current.read_available(&mut lines, &self.options, now)? {
            // More to read than one poll's budget: rotation is looked at
            // once this file is read to its end.
            return Ok(lines);
        }
        if self.rotated()? {
            // Opened before the old file is read again, so that nothing the
            // old one gets after this point is attributed to the new one.
            let next = self.open(false)?;
            if let Some(mut old) = std::mem::replace(&mut self.current, next) {
                // Quiet before the rotation says nothing about after it.
                old.last_data = now;
                tracing::debug!(path = %self.path.display(), "file rotated, draining the old one");
                self.draining.push(old);
            }
            self.drain_rotated(now, &mut lines)?;
            if let Some(current) = self.current.as_mut() {
                current.read_available(&mut lines, &self.options, now)?;
            }
        }
        Ok(lines)
    }

    /// Opens the file at the path; none when it does not exist.
    fn open(&mut self, existed_at_start: bool) -> io::Result<Option<Reader>> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        // A saved position of another file, or beyond this one's end: the
        // file was rotated or truncated while we were not reading, so all
        // of it is new.
        let offset = match (self.resume.take(), existed_at_start, self.options.start_at) {
            (Some(p), _, _)
                if p.dev == meta.dev() && p.ino == meta.ino() && p.offset <= meta.len() =>
            {
                p.offset
            }
            (Some(_), _, _) => 0,
            (None, true, StartAt::End) => meta.len(),
            (None, _, _) => 0,
        };
        let mut reader = Reader {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            offset,
            partial: Vec::new(),
            skipping: false,
            last_data: Instant::now(),
        };
        reader.file.seek(SeekFrom::Start(offset))?;
        Ok(Some(reader))
    }

    /// Whether the path now names another file than the current one. A
    /// missing path is not a rotation yet: the current file is kept (and
    /// read) until a new one appears.
    fn rotated(&self) -> io::Result<bool> {
        let Some(current) = &self.current else {
            return Ok(false);
        };
        match std::fs::metadata(&self.path) {
            Ok(meta) => Ok(meta.dev() != current.dev || meta.ino() != current.ino),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads the rotated-away files and drops those quiet for
    /// `rotate_wait`, giving their unfinished line as it is.
    fn drain_rotated(&mut self, now: Instant, lines: &mut Vec<String>) -> io::Result<()> {
        let options = self.options;
        for old in &mut self.draining {
            old.read_available(lines, &options, now)?;
        }
        self.draining.retain_mut(|old| {
            let keep = now.duration_since(old.last_data) < options.rotate_wait;
            if !keep {
                old.flush_unfinished(lines);
            }
            keep
        });
        Ok(())
    }
}

// === impl Reader ===

impl Reader {
    fn position(&self) -> Position {
        let pending = if self.skipping {
            0
        } else {
            self.partial.len() as u64
        };
        Position {
            dev: self.dev,
            ino: self.ino,
            offset: self.offset - pending,
        }
    }

    /// Starts again at 0 if the file shrank below what was read.
    fn check_truncated(&mut self, lines: &mut Vec<String>) -> io::Result<()> {
        let len = self.file.metadata()?.len();
        if len < self.offset {
            tracing::debug!(
                len,
                offset = self.offset,
                "file truncated, reading from its start"
            );
            self.flush_unfinished(lines);
            self.offset = 0;
            self.file.seek(SeekFrom::Start(0))?;
        }
        Ok(())
    }

    /// Reads up to the end of the file or the poll's budget; true when the
    /// end was reached.
    fn read_available(
        &mut self,
        lines: &mut Vec<String>,
        options: &TailOptions,
        now: Instant,
    ) -> io::Result<bool> {
        let mut buf = vec![0; 64 * 1024];
        let mut budget = READ_BUDGET;
        while budget > 0 {
            let n = match self.file.read(&mut buf) {
                Ok(0) => return Ok(true),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.offset += n as u64;
            self.last_data = now;
            budget = budget.saturating_sub(n);
            self.split(&buf[..n], lines, options);
        }
        Ok(false)
    }

    /// Cuts `bytes` into lines, keeping an unfinished one.
    fn split(&mut self, mut bytes: &[u8], lines: &mut Vec<String>, options: &TailOptions) {
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|&b| b == b'\n');
            let (head, rest) = match newline {
                Some(i) => (&bytes[..i], &bytes[i + 1..]),
                None => (bytes, &[][..]),
            };
            if !self.skipping {
                let room = options.max_line.saturating_sub(self.partial.len());
                self.partial
                    .extend_from_slice(&head[..head.len().min(room)]);
                if head.len() > room
                    || (newline.is_none() && self.partial.len() >= options.max_line)
                {
                    // Too long: give its head now, once, and skip the rest.
                    self.take_line(lines);
                    self.skipping = true;
                }
            }
            if newline.is_some() {
                if self.skipping {
                    self.skipping = false;
                } else {
                    self.take_line(lines);
                }
            }
            bytes = rest;
        }
    }

    /// Gives the line gathered so far.
    fn take_line(&mut self, lines: &mut Vec<String>) {
        let mut line = std::mem::take(&mut self.partial);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        lines.push(String::from_utf8_lossy(&line).into_owned());
    }

    /// Gives an unfinished line as it is (its file was truncated or is
    /// dropped, so the rest of it will not come).
    fn flush_unfinished(&mut self, lines: &mut Vec<String>) {
        if std::mem::take(&mut self.skipping) || self.partial.is_empty() {
            return;
        }
        self.take_line(lines);
    }
}
