//! What the local proxy routes to, as its admin `/routes` shows it: a
//! deploy waits there until its new instance is listed (Consul's check of
//! it passed, so the mesh sends it requests) and until the old ones are
//! gone.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use serde::Deserialize;
use tokio::time::Instant;

use super::http;

/// How often `/routes` is read while waiting.
pub(super) const POLL: Duration = Duration::from_millis(100);
/// How long one read of `/routes` may take.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest `/routes` answer read: it lists every endpoint of the mesh.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// How a wait on `/routes` ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Waited {
    /// The table came to show what was waited for.
    Done,
    /// It did not by the deadline; the error of the last read, if it
    /// failed.
    TimedOut(Option<String>),
}

/// The part of `/routes` a deploy reads (the proxy's `RoutesView`).
#[derive(Deserialize)]
struct RoutesView {
    services: BTreeMap<String, Vec<EndpointView>>,
}

/// One endpoint in `/routes` (the proxy's `EndpointView`).
#[derive(Deserialize)]
struct EndpointView {
    id: String,
}

/// Reads `/routes` from `admin` every [`POLL`] until `done` holds for the
/// instance ids listed under `service`, or `deadline` passes. A read that
/// fails counts as not done (the proxy may be restarting). The last read
/// is at the deadline, and may take [`POLL`] beyond it.
pub(super) async fn wait(
    admin: SocketAddr,
    service: &str,
    deadline: Instant,
    mut done: impl FnMut(&BTreeSet<String>) -> bool,
) -> Waited {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = left.clamp(POLL, READ_TIMEOUT);
        let last_error = match listed(admin, service, timeout).await {
            Ok(ids) if done(&ids) => return Waited::Done,
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(%admin, error = %e, "cannot read the local proxy's routes");
                Some(e)
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Waited::TimedOut(last_error);
        }
        tokio::time::sleep(left.min(POLL)).await;
    }
}

/// The instance ids the proxy at `admin` lists under `service`.
async fn listed(
    admin: SocketAddr,
    service: &str,
    timeout: Duration,
) -> Result<BTreeSet<String>, String> {
    let (code, body) = http::get(admin, "/routes", timeout, MAX_BODY)
        .await
        .map_err(|e| format!("GET /routes: {e}"))?;
    if !code.is_success() {
        return Err(format!("GET /routes on {admin} answered {}", code.as_u16()));
    }
    ids_of(&body, service).map_err(|e| format!("GET /routes on {admin}: {e}"))
}

/// The ids listed under `service` in a `/routes` answer.
fn ids_of(body: &[u8], service: &str) -> Result<BTreeSet<String>, serde_json::Error> {
    let mut view: RoutesView = serde_json::from_slice(body)?;
    Ok(view
        .services
        .remove(service)
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.id)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ids_of_a_service_are_read_from_the_proxys_routes() {
        let body = br#"{
            "pid": 7, "source": "live", "version": 3, "age_seconds": 0.5,
            "updated_at_unix_ms": 1, "peers": {}, "config": {},
            "services": {
                "orders": [
                    {"id": "orders-1-4000", "address": "10.0.0.1", "port": 4000,
                     "node": "n1", "tags": [], "in_flight": 2, "ejected_until": null,
                     "consecutive_failures": 0, "latency_ewma_ms": 1.5},
                    {"id": "orders-2-4001", "address": "10.0.0.1", "port": 4001,
                     "node": "n1", "tags": [], "in_flight": 0, "ejected_until": null,
                     "consecutive_failures": 0, "latency_ewma_ms": 0.0}
                ],
                "billing": [{"id": "billing-1-5000", "address": "10.0.0.2", "port": 5000}]
            }
        }"#;
        let ids = ids_of(body, "orders").unwrap();
        assert_eq!(
            ids.into_iter().collect::<Vec<_>>(),
            ["orders-1-4000", "orders-2-4001"]
        );
        assert!(ids_of(body, "users").unwrap().is_empty());
        assert!(ids_of(b"<html>", "orders").is_err());
    }

    #[tokio::test]
    async fn a_wait_on_a_proxy_that_does_not_answer_says_why() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = listener.local_addr().unwrap();
        drop(listener);
        let deadline = Instant::now() + Duration::from_millis(250);
        match wait(admin, "orders", deadline, |_| true).await {
            Waited::TimedOut(Some(e)) => assert!(e.starts_with("GET /routes: "), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}
