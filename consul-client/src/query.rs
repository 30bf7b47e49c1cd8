//! Blocking-query options and the metadata Consul returns with a read.
//!
//! A blocking query (`index` > 0) is held by Consul until the data changes
//! past `index` or `wait` runs out, plus up to `wait / 16` of jitter Consul
//! adds itself. Its HTTP timeout is therefore longer than `wait`; every
//! other call gets [`SHORT_TIMEOUT`].

use std::time::Duration;

use reqwest::header::HeaderMap;

/// Timeout of a call that does not block.
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Consul's own default `wait` when an index is given without one.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// Consul refuses to hold a query longer than this.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// Head room beyond `wait + wait/16` for the answer to travel.
const BLOCKING_SLACK: Duration = Duration::from_secs(5);

/// How to read: blocking or not, and how consistent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueryOptions {
    /// Block until the data's index passes this one (0: answer at once).
    pub index: u64,
    /// The longest Consul may block (capped at 10 minutes).
    pub wait: Option<Duration>,
    /// Let any server answer (`?stale`), not only the leader: reads keep
    /// working during an election, and [`QueryResult::known_leader`] says
    /// whether the answering server knew a leader.
    pub stale: bool,
}

/// A value read from Consul with the metadata of the read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryResult<T> {
    /// The value.
    pub value: T,
    /// `X-Consul-Index`: pass it back as [`QueryOptions::index`] to block
    /// until the data changes (0 when absent).
    pub index: u64,
    /// `X-Consul-KnownLeader`: whether the answering server knew a leader
    /// (true when the header is absent).
    pub known_leader: bool,
    /// `X-Consul-LastContact`: how long since the answering server heard
    /// from the leader, in milliseconds (0 when absent).
    pub last_contact_ms: u64,
}

// === impl QueryOptions ===

impl QueryOptions {
    /// A blocking read past `index`, waiting at most `wait`.
    pub fn blocking(index: u64, wait: Duration) -> Self {
        Self {
            index,
            wait: Some(wait),
            stale: false,
        }
    }

    /// The same options with `?stale`.
    pub fn stale(self) -> Self {
        Self {
            stale: true,
            ..self
        }
    }

    /// Whether Consul may hold the request.
    pub fn is_blocking(&self) -> bool {
        self.index > 0
    }

    /// The `wait` Consul will apply, if the query blocks.
    pub fn effective_wait(&self) -> Option<Duration> {
        self.is_blocking()
            .then(|| self.wait.unwrap_or(DEFAULT_WAIT).min(MAX_WAIT))
    }

    /// The HTTP timeout: `wait + wait/16 +` slack for a blocking query,
    /// [`SHORT_TIMEOUT`] otherwise.
    pub fn timeout(&self) -> Duration {
        match self.effective_wait() {
            Some(wait) => wait + wait / 16 + BLOCKING_SLACK,
            None => SHORT_TIMEOUT,
        }
    }

    /// The query parameters these options add.
    pub(crate) fn params(&self) -> Vec<(&'static str, Option<String>)> {
        let mut params = Vec::with_capacity(3);
        if let Some(wait) = self.effective_wait() {
            params.push(("index", Some(self.index.to_string())));
            params.push(("wait", Some(format!("{}ms", wait.as_millis()))));
        }
        if self.stale {
            params.push(("stale", None));
        }
        params
    }
}

// === impl QueryResult ===

impl<T> QueryResult<T> {
    /// Reads the metadata headers of an answer carrying `value`.
    pub(crate) fn from_headers(value: T, headers: &HeaderMap) -> Self {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Self {
            value,
            index: get("x-consul-index")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            known_leader: get("x-consul-knownleader") != Some("false"),
            last_contact_ms: get("x-consul-lastcontact")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        }
    }

    /// The same metadata around another value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> QueryResult<U> {
        QueryResult {
            value: f(self.value),
            index: self.index,
            known_leader: self.known_leader,
            last_contact_ms: self.last_contact_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn blocking_timeout_covers_wait_and_jitter() {
        let q = QueryOptions::blocking(7, Duration::from_secs(64));
        assert_eq!(q.timeout(), Duration::from_secs(64 + 4 + 5));
        assert_eq!(QueryOptions::default().timeout(), SHORT_TIMEOUT);
        // Index 0 never blocks, whatever the wait.
        let first = QueryOptions::blocking(0, Duration::from_secs(60));
        assert_eq!(first.timeout(), SHORT_TIMEOUT);
        assert!(first.params().is_empty());
    }

    #[test]
    fn wait_is_capped_and_sent_in_ms() {
        let q = QueryOptions::blocking(3, Duration::from_secs(3600)).stale();
        assert_eq!(
            q.params(),
            vec![
                ("index", Some("3".into())),
                ("wait", Some("600000ms".into())),
                ("stale", None)
            ]
        );
    }

    #[test]
    fn reads_consul_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-consul-index", HeaderValue::from_static("42"));
        h.insert("x-consul-knownleader", HeaderValue::from_static("false"));
        h.insert("x-consul-lastcontact", HeaderValue::from_static("17"));
        let r = QueryResult::from_headers((), &h);
        assert_eq!(
            (r.index, r.known_leader, r.last_contact_ms),
            (42, false, 17)
        );
        let r = QueryResult::from_headers((), &HeaderMap::new());
        assert_eq!((r.index, r.known_leader, r.last_contact_ms), (0, true, 0));
    }
}
