//! The [`LogWatcher`]: the files of every rule, each followed by its own
//! [`Tailer`], their lines fed to the rules' [`Evaluator`], and the read
//! offsets kept in the state file.
//!
//! A glob should not match the names files are rotated to
//! (`app.log*` matches `app.log.1`): a rotated file would then be followed
//! as a new one, and its lines counted twice.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_runtime::shutdown::Shutdown;
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, time::MissedTickBehavior};

use crate::metrics::MonitorMetrics;

use super::{
    LogEvent,
    config::Logs,
    glob::Glob,
    rules::Evaluator,
    tail::{Position, StartAt, TailOptions, Tailer},
};

/// How often the read offsets are written to the state file, at most.
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// Files followed at once, at most; a glob matching more is cut (and
/// logged), not followed without bound.
pub const MAX_FILES: usize = 1024;

/// Follows the rules' files and evaluates the rules; see the module docs.
///
/// [`LogWatcher::poll`] is one round (for tests and for callers with their
/// own loop); [`LogWatcher::run`] rounds every poll interval until
/// shutdown.
#[derive(Debug)]
pub struct LogWatcher {
    logs: Logs,
    /// Every rule's glob, once.
    globs: Vec<Glob>,
    tailers: BTreeMap<PathBuf, Tailer>,
    evaluator: Evaluator,
    /// Offsets read from the state file, used when a file is first tailed.
    saved: BTreeMap<PathBuf, Position>,
    /// When the globs were expanded last; none before the first round.
    scanned: Option<Instant>,
    /// When the offsets were saved last.
    saved_at: Option<Instant>,
    /// Files whose last read failed, so that a lasting failure is logged
    /// once, not every poll.
    failing: BTreeSet<PathBuf>,
    /// Lines read since the start.
    lines_read: u64,
    /// Where the counts go, if anywhere, and what they were when they
    /// last went there (lines read, then per rule).
    metrics: Option<(MonitorMetrics, u64, Vec<u64>)>,
}

/// The state file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    files: BTreeMap<PathBuf, Position>,
}

/// Why the state file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("writing log offsets to {path}: {source}")]
pub struct SaveError {
    path: PathBuf,
    source: std::io::Error,
}

// === impl LogWatcher ===

impl LogWatcher {
    /// A watcher for `logs`; offsets of an earlier run are read from its
    /// state file (a missing or unreadable one is logged and ignored: the
    /// files are then read as at a first start).
    pub fn new(logs: Logs) -> Self {
        let mut globs: Vec<Glob> = Vec::new();
        for rule in &logs.rules {
            if !globs.contains(rule.files()) {
                globs.push(rule.files().clone());
            }
        }
        let saved = logs
            .state_file
            .as_deref()
            .map(load_state)
            .unwrap_or_default();
        Self {
            evaluator: Evaluator::new(logs.rules.clone(), Instant::now()),
            logs,
            globs,
            tailers: BTreeMap::new(),
            saved,
            scanned: None,
            saved_at: None,
            failing: BTreeSet::new(),
            lines_read: 0,
            metrics: None,
        }
    }

    /// Counts the lines read and the rules' matches into `metrics` after
    /// every round of [`LogWatcher::run`].
    pub fn with_metrics(mut self, metrics: MonitorMetrics) -> Self {
        let rules = self.logs.rules.len();
        self.metrics = Some((metrics, 0, vec![0; rules]));
        self
    }

    /// Lines read since the start, from every file.
    pub fn lines_read(&self) -> u64 {
        self.lines_read
    }

    /// The paths followed now.
    pub fn files(&self) -> Vec<PathBuf> {
        self.tailers.keys().cloned().collect()
    }

    /// The rules' windows (for their counters).
    pub fn evaluator(&self) -> &Evaluator {
        &self.evaluator
    }

    /// One round at `now`: expands the globs when due, reads every file,
    /// counts the lines into the rules, and returns what starts or stops
    /// firing.
    pub fn poll(&mut self, now: Instant) -> Vec<LogEvent> {
        let due = self
            .scanned
            .is_none_or(|at| now.saturating_duration_since(at) >= self.logs.rescan_interval);
        if due {
            self.rescan(now);
        }
        for (path, tailer) in &mut self.tailers {
            match tailer.poll_once() {
                Ok(lines) => {
                    if self.failing.remove(path) {
                        tracing::info!(path = %path.display(), "reading log file again");
                    }
                    self.lines_read += lines.len() as u64;
                    for line in &lines {
                        self.evaluator.observe(path, line, now);
                    }
                }
                Err(e) => {
                    if self.failing.insert(path.clone()) {
                        tracing::warn!(path = %path.display(), error = %e, "reading log file failed");
                    }
                }
            }
        }
        self.evaluator.evaluate(now)
    }

    /// Expands the globs: follows new files (from their beginning, but at
    /// the first round, where `start_at` holds), drops files gone from the
    /// globs once read to the end.
    pub fn rescan(&mut self, now: Instant) {
        let first = self.scanned.replace(now).is_none();
        let matched = self.matched();
        let failing = &mut self.failing;
        self.tailers.retain(|path, tailer| {
            let keep = matched.contains(path) || !tailer.is_finished(now);
            if !keep {
                tracing::debug!(path = %path.display(), "log file gone");
                failing.remove(path);
            }
            keep
        });
        let options = TailOptions {
            start_at: if first {
                self.logs.tail.start_at
            } else {
                StartAt::Beginning
            },
            ..self.logs.tail
        };
        let mut left_out = 0;
        for path in matched {
            if self.tailers.contains_key(&path) {
                continue;
            }
            if self.tailers.len() >= MAX_FILES {
                left_out += 1;
                continue;
            }
            tracing::debug!(path = %path.display(), "following log file");
            let tailer = match self.saved.remove(&path) {
                Some(position) => Tailer::resume(&path, options, position),
                None => Tailer::new(&path, options),
            };
            self.tailers.insert(path, tailer);
        }
        if left_out > 0 {
            tracing::warn!(
                left_out,
                max = MAX_FILES,
                "too many log files, some not followed"
            );
        }
    }

    /// The paths the globs name now: a literal one whether or not it
    /// exists (it is waited for), the files a wildcard one matches.
    fn matched(&self) -> BTreeSet<PathBuf> {
        let mut matched = BTreeSet::new();
        for glob in &self.globs {
            if glob.is_literal() {
                matched.insert(PathBuf::from(glob.as_str()));
            } else {
                matched.extend(glob.expand());
            }
        }
        matched
    }

    /// Writes the read offsets to the state file, atomically; nothing
    /// without one. Only the file each path names is kept: lines a
    /// rotated-away file still gets after a stop are not read by the next
    /// run.
    pub fn save_state(&self) -> Result<(), SaveError> {
        let Some(path) = &self.logs.state_file else {
            return Ok(());
        };
        let state = State {
            files: self
                .tailers
                .iter()
                .filter_map(|(p, t)| Some((p.clone(), t.position()?)))
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| SaveError {
            path: path.clone(),
            source: e.into(),
        })?;
        mesh_runtime::fs::write_atomic(path, &bytes).map_err(|source| SaveError {
            path: path.clone(),
            source,
        })
    }

    /// Rounds every poll interval and sends what starts or stops firing to
    /// `events`, until `shutdown` (or until `events` is closed); saves the
    /// offsets every few seconds and at the end. File reads run on the
    /// blocking pool.
    pub async fn run(mut self, events: mpsc::Sender<LogEvent>, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(self.logs.poll_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.requested() => break,
            }
            let round = tokio::task::spawn_blocking(move || {
                let found = self.poll(Instant::now());
                (self, found)
            });
            let found;
            (self, found) = match round.await {
                Ok(done) => done,
                Err(e) => {
                    // The watcher went down with the round; nothing is left
                    // to save.
                    tracing::error!(error = %e, "log watcher round failed");
                    return;
                }
            };
            for event in found {
                tracing::info!(
                    key = event.key(),
                    firing = event.is_firing(),
                    "log rule changed"
                );
                tokio::select! {
                    sent = events.send(event) => if sent.is_err() { return self.finish() },
                    () = shutdown.requested() => return self.finish(),
                }
            }
            self.report();
            self.save_if_due();
        }
        self.finish();
    }

    /// The counts since the last report into the metrics, if any.
    fn report(&mut self) {
        let Some((metrics, lines, counted)) = &mut self.metrics else {
            return;
        };
        let mut rules = Vec::new();
        for ((rule, now), before) in self.evaluator.counted().zip(counted.iter_mut()) {
            rules.push((rule, now - *before));
            *before = now;
        }
        metrics.log_lines(self.lines_read - *lines, &rules);
        *lines = self.lines_read;
    }

    fn save_if_due(&mut self) {
        let now = Instant::now();
        if self
            .saved_at
            .is_some_and(|at| now.saturating_duration_since(at) < SAVE_EVERY)
        {
            return;
        }
        self.saved_at = Some(now);
        if let Err(e) = self.save_state() {
            tracing::warn!(error = %e, "log offsets not saved");
        }
    }

    fn finish(self) {
        if let Err(e) = self.save_state() {
            tracing::warn!(error = %e, "log offsets not saved");
        }
    }
}

/// The offsets in the state file at `path`.
fn load_state(path: &Path) -> BTreeMap<PathBuf, Position> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "log offsets not read");
            return BTreeMap::new();
        }
    };
    match serde_json::from_slice::<State>(&bytes) {
        Ok(state) => state.files,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "log offsets not read");
            BTreeMap::new()
        }
    }
}
