//! Logs: follows configured files (the proxy's access and error logs,
//! services' logs by glob) through rotation, and raises [`LogEvent`]s from
//! rules over their lines: a pattern seen at least N times within a
//! window, and the 5xx rate per service in the proxy's access log.
//!
//! Every event carries a stable key, `log:<rule>:<file>` for a pattern
//! rule and `log:<rule>:<service>` for an error-rate rule: a
//! [`LogEvent::Firing`] opens the condition of that key, the
//! [`LogEvent::Resolved`] of the same key ends it, and a key fires again
//! only after it was resolved.
//!
//! - [`tail`]: one path followed line by line across rotation by rename
//!   and by truncation.
//! - [`glob`]: file globs, matched and expanded.
//! - [`config`]: the rules and settings as written, and their checks.
//! - [`rules`]: the rules' windows over the lines read.
//! - [`watcher`]: the [`LogWatcher`] task: every rule's files, tailed and
//!   evaluated until shutdown.

pub mod config;
pub mod glob;
pub mod rules;
pub mod tail;
pub mod watcher;

pub use self::{
    config::{ConfigError, Logs, LogsConfig},
    watcher::LogWatcher,
};
use crate::alert::Severity;

/// A log rule's condition started or ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogEvent {
    /// The condition started.
    Firing {
        /// `log:<rule>:<file or service>`.
        key: String,
        /// The rule's name.
        rule: String,
        /// How bad.
        severity: Severity,
        /// What was seen, one line.
        summary: String,
        /// Some lines that made it fire (a pattern rule's latest matches),
        /// or the counts behind a rate.
        evidence: Vec<String>,
    },
    /// The condition ended.
    Resolved {
        /// The key of the [`LogEvent::Firing`] it ends.
        key: String,
        /// The rule's name.
        rule: String,
        /// What is seen now, one line.
        summary: String,
    },
}

// === impl LogEvent ===

impl LogEvent {
    /// The deduplication key.
    pub fn key(&self) -> &str {
        match self {
            Self::Firing { key, .. } | Self::Resolved { key, .. } => key,
        }
    }

    /// Whether it is a [`LogEvent::Firing`].
    pub fn is_firing(&self) -> bool {
        matches!(self, Self::Firing { .. })
    }
}

#[cfg(test)]
mod tests;
