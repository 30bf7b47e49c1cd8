//! Circuit breaking and load shedding: bounds on what the proxy takes on,
//! so that overload is answered at once with a 503 that says which limit,
//! rather than queued until everything is slow.
//!
//! Per upstream service (Envoy's circuit breakers, uncoordinated across
//! proxies): concurrent requests (from admission to the end of the
//! response body), pending requests (waiting for a connection), and open
//! connections to its instances (checked when a new one would be opened).
//! On the outbound listener: concurrent requests of all services, and open
//! client connections (a connection past the limit gets a 503 written at
//! once and is closed): the listener sheds before the process falls over.
//! Nothing here queues: a request over a limit fails fast.
//!
//! A [`Permit`] holds a request's counts and gives them back when dropped;
//! it travels with the response body so a streamed answer counts until its
//! end.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use crate::error::ProxyError;

/// A route's limits; `None` is no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitPolicy {
    /// Open connections to the service's instances.
    pub max_connections: Option<usize>,
    /// Requests waiting for a connection.
    pub max_pending: Option<usize>,
    /// Concurrent requests.
    pub max_requests: Option<usize>,
}

/// Which limit a request hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The service's open connections.
    Connections,
    /// The service's requests waiting for a connection.
    Pending,
    /// The service's concurrent requests.
    Requests,
    /// The outbound listener's concurrent requests.
    ListenerRequests,
    /// The outbound listener's open client connections.
    ListenerConnections,
}

/// Counts of one service, or of the listener.
#[derive(Debug, Default)]
pub struct Counters {
    requests: AtomicUsize,
    pending: AtomicUsize,
}

/// A request's share of its counters, given back when dropped.
#[derive(Debug, Default)]
pub struct Permit {
    service: Option<Arc<Counters>>,
    listener: Option<Arc<Counters>>,
}

/// A request waiting for a connection, until dropped.
#[derive(Debug)]
pub struct Pending<'a>(&'a Counters);

// === impl Limit ===

impl Limit {
    /// The metric label and the word in the error.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "max_connections",
            Self::Pending => "max_pending",
            Self::Requests => "max_requests",
            Self::ListenerRequests => "listener_max_requests",
            Self::ListenerConnections => "listener_max_connections",
        }
    }
}

// === impl Counters ===

impl Counters {
    /// Requests counted now.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests waiting for a connection now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Counts a request unless `max` are in already.
    fn try_add_request(&self, max: Option<usize>) -> bool {
        let before = self.requests.fetch_add(1, Ordering::Relaxed);
        if max.is_some_and(|max| before >= max) {
            self.requests.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Counts a request waiting for a connection unless `max` wait already.
    pub fn try_pending(&self, max: Option<usize>) -> Option<Pending<'_>> {
        let before = self.pending.fetch_add(1, Ordering::Relaxed);
        if max.is_some_and(|max| before >= max) {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Pending(self))
    }
}

// === impl Permit ===

impl Permit {
    /// Admits a request to the listener unless `max` are in.
    pub fn listener(counters: &Arc<Counters>, max: Option<usize>) -> Result<Self, ProxyError> {
        if !counters.try_add_request(max) {
            return Err(ProxyError::Overloaded {
                service: None,
                limit: Limit::ListenerRequests,
                max: max.unwrap_or(0),
            });
        }
        Ok(Self {
            service: None,
            listener: Some(counters.clone()),
        })
    }

    /// Also admits the request to `service`'s counters, unless `max` are in.
    pub fn admit(
        &mut self,
        counters: &Arc<Counters>,
        name: &Arc<str>,
        max: Option<usize>,
    ) -> Result<(), ProxyError> {
        if !counters.try_add_request(max) {
            return Err(ProxyError::Overloaded {
                service: Some(name.clone()),
                limit: Limit::Requests,
                max: max.unwrap_or(0),
            });
        }
        self.service = Some(counters.clone());
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(s) = self.service.take() {
            s.requests.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(l) = self.listener.take() {
            l.requests.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_over_the_limit_are_refused_and_permits_give_back() {
        let listener = Arc::new(Counters::default());
        let service = Arc::new(Counters::default());
        let name: Arc<str> = "orders".into();
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut p = Permit::listener(&listener, Some(3)).unwrap();
            p.admit(&service, &name, Some(2)).unwrap();
            held.push(p);
        }
        let mut third = Permit::listener(&listener, Some(3)).unwrap();
        let e = third.admit(&service, &name, Some(2)).unwrap_err();
        assert!(matches!(
            e,
            ProxyError::Overloaded {
                limit: Limit::Requests,
                max: 2,
                ..
            }
        ));
        let e = Permit::listener(&listener, Some(3)).unwrap_err();
        assert!(matches!(
            e,
            ProxyError::Overloaded {
                limit: Limit::ListenerRequests,
                ..
            }
        ));
        drop(third);
        assert_eq!((listener.requests(), service.requests()), (2, 2));
        held.clear();
        assert_eq!((listener.requests(), service.requests()), (0, 0));
        // No limit, no refusal.
        let _p = Permit::listener(&listener, None).unwrap();
    }

    #[test]
    fn pending_is_bounded_while_held() {
        let c = Counters::default();
        let a = c.try_pending(Some(1)).unwrap();
        assert!(c.try_pending(Some(1)).is_none());
        drop(a);
        assert!(c.try_pending(Some(1)).is_some());
        assert_eq!(c.pending(), 0);
    }
}
