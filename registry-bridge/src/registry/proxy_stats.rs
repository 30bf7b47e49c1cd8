//! `ProxyStats` and `Checks.ProxyMetrics`: the node's proxy's `/stats` and
//! `/metrics`, read from its admin listener over HTTP/1.1 on a fresh
//! connection for each call (callers ask every few seconds at most, and a
//! fresh connection never finds a restarted proxy's stale socket), and
//! turned into a [`ProxyStatsResponse`] or a [`ProxyMetricsResponse`].

use std::{io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use mesh_proto::v1::{ProxyMetricsResponse, ProxyStatsResponse};
use serde::Deserialize;
use tokio::net::TcpStream;

/// How long the whole exchange with the proxy may take: mesh-control
/// gates a rollout on the answer and would rather hear "unavailable" soon.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The largest `/stats` answer read; a real one is well under 1 KiB.
const MAX_BODY: usize = 64 * 1024;

/// The largest `/metrics` answer read: a proxy with a few hundred services
/// writes well under 1 MiB.
const MAX_METRICS_BODY: usize = 4 * 1024 * 1024;

/// The node's proxy's admin listener.
#[derive(Clone, Copy, Debug)]
pub struct ProxyAdmin {
    addr: SocketAddr,
    timeout: Duration,
}

/// Why the proxy's stats or metrics could not be read: the address and the reason.
#[derive(Debug, thiserror::Error)]
#[error("proxy admin {addr}: {reason}")]
pub struct ProxyStatsError {
    /// The proxy's admin address.
    pub addr: SocketAddr,
    /// What went wrong.
    pub reason: ProxyStatsReason,
}

/// What went wrong reading `/stats` or `/metrics`.
#[derive(Debug, thiserror::Error)]
pub enum ProxyStatsReason {
    /// Nothing listens there (the proxy is down or elsewhere).
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    /// The proxy did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    /// The proxy answered with another status than 200.
    #[error("{0} answered {1}")]
    Status(&'static str, StatusCode),
    /// The body could not be read, or was too large.
    #[error("{0} body: {1}")]
    Body(&'static str, String),
    /// The body is not the stats JSON.
    #[error("/stats answer is not the stats JSON: {0}")]
    Decode(#[source] serde_json::Error),
    /// The body is JSON of the right shape with values that do not fit.
    #[error("/stats answer: {0}")]
    Invalid(&'static str),
}

/// `/stats` as the proxy writes it.
#[derive(Debug, Deserialize)]
struct Stats {
    node: String,
    ready: bool,
    config_version: u64,
    requests: u64,
    errors: u64,
    latency: Latency,
}

#[derive(Debug, Deserialize)]
struct Latency {
    bounds_seconds: Vec<f64>,
    counts: Vec<u64>,
    count: u64,
    sum_seconds: f64,
}

// === impl ProxyAdmin ===

impl ProxyAdmin {
    /// The proxy admin listener at `addr`, asked with [`TIMEOUT`].
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            timeout: TIMEOUT,
        }
    }

    /// The proxy's admin address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reads `/stats` now.
    pub async fn stats(&self) -> Result<ProxyStatsResponse, ProxyStatsError> {
        self.fetch("/stats", "application/json", MAX_BODY)
            .await
            .and_then(|body| decode(&body))
            .map_err(|reason| self.error(reason))
    }

    /// Reads `/metrics` now.
    pub async fn metrics(&self) -> Result<ProxyMetricsResponse, ProxyStatsError> {
        let body = self
            .fetch("/metrics", "text/plain", MAX_METRICS_BODY)
            .await
            .map_err(|reason| self.error(reason))?;
        let text = String::from_utf8(body.to_vec()).map_err(|_| {
            self.error(ProxyStatsReason::Invalid(
                "/metrics answer is not UTF-8 text",
            ))
        })?;
        Ok(ProxyMetricsResponse { text })
    }

    fn error(&self, reason: ProxyStatsReason) -> ProxyStatsError {
        ProxyStatsError {
            addr: self.addr,
            reason,
        }
    }

    /// `GET path` within the timeout: the body of a 200, at most `max`
    /// bytes.
    async fn fetch(
        &self,
        path: &'static str,
        accept: &'static str,
        max: usize,
    ) -> Result<Bytes, ProxyStatsReason> {
        match tokio::time::timeout(self.timeout, self.get(path, accept, max)).await {
            Ok(answer) => answer,
            Err(_) => Err(ProxyStatsReason::Timeout(self.timeout)),
        }
    }

    /// `GET path`: the body of a 200.
    async fn get(
        &self,
        path: &'static str,
        accept: &'static str,
        max: usize,
    ) -> Result<Bytes, ProxyStatsReason> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(ProxyStatsReason::Connect)?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ProxyStatsReason::Http)?;
        let request = Request::get(path)
            .header(header::HOST, self.addr.to_string())
            .header(header::ACCEPT, accept)
            .body(Empty::<Bytes>::new())
            .map_err(|_| ProxyStatsReason::Invalid("cannot build the request"))?;
        // The connection is driven here, beside the exchange; dropping the
        // sender when the exchange ends lets it finish.
        let exchange = async move {
            let response = sender
                .send_request(request)
                .await
                .map_err(ProxyStatsReason::Http)?;
            if response.status() != StatusCode::OK {
                return Err(ProxyStatsReason::Status(path, response.status()));
            }
            let body = Limited::new(response.into_body(), max)
                .collect()
                .await
                .map_err(|e| ProxyStatsReason::Body(path, e.to_string()))?;
            Ok(body.to_bytes())
        };
        let (answer, _) = tokio::join!(exchange, connection);
        answer
    }
}

/// The response for a `/stats` body.
fn decode(body: &[u8]) -> Result<ProxyStatsResponse, ProxyStatsReason> {
    let stats: Stats = serde_json::from_slice(body).map_err(ProxyStatsReason::Decode)?;
    let latency = stats.latency;
    if latency.counts.len() != latency.bounds_seconds.len() {
        return Err(ProxyStatsReason::Invalid(
            "latency counts and bounds differ in length",
        ));
    }
    if latency.counts.iter().sum::<u64>() > latency.count {
        return Err(ProxyStatsReason::Invalid(
            "latency buckets hold more than the count",
        ));
    }
    Ok(ProxyStatsResponse {
        node: stats.node,
        ready: stats.ready,
        config_version: stats.config_version,
        requests: stats.requests,
        errors: stats.errors,
        latency_bounds_seconds: latency.bounds_seconds,
        latency_counts: latency.counts,
        latency_count: latency.count,
        latency_sum_seconds: latency.sum_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stats_body_becomes_the_response() {
        let body = br#"{"node":"n1","ready":true,"config_version":3,"requests":10,"errors":2,
            "latency":{"bounds_seconds":[0.1,1.0],"counts":[7,2],"count":10,"sum_seconds":4.5}}"#;
        let r = decode(body).unwrap();
        assert_eq!(
            (r.node.as_str(), r.ready, r.config_version),
            ("n1", true, 3)
        );
        assert_eq!((r.requests, r.errors), (10, 2));
        assert_eq!(r.latency_bounds_seconds, vec![0.1, 1.0]);
        assert_eq!(r.latency_counts, vec![7, 2]);
        assert_eq!((r.latency_count, r.latency_sum_seconds), (10, 4.5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxy_that_does_not_answer_times_out() {
        // Accepts and never answers; paused time runs the deadline out at
        // once.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hang = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let e = ProxyAdmin::new(addr).stats().await.unwrap_err();
        hang.abort();
        assert!(
            matches!(e.reason, ProxyStatsReason::Timeout(TIMEOUT)),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!("proxy admin {addr}: no answer within 2s")
        );
    }

    #[tokio::test]
    async fn metrics_are_the_proxy_text_and_a_missing_proxy_is_named() {
        use axum::{Router, routing::get};
        let text = "# TYPE mesh_proxy_requests_total counter\n\
                    mesh_proxy_requests_total{service=\"web\",code_class=\"2xx\"} 7\n";
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/metrics", get(move || async move { text }));
        let serve = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let got = ProxyAdmin::new(addr).metrics().await.unwrap();
        assert_eq!(got.text, text);
        serve.abort();
        let _ = serve.await;
        let e = ProxyAdmin::new(addr).metrics().await.unwrap_err();
        assert!(matches!(e.reason, ProxyStatsReason::Connect(_)), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }

    #[test]
    fn a_bad_body_says_what_is_wrong() {
        let e = decode(b"not json").unwrap_err();
        assert!(matches!(e, ProxyStatsReason::Decode(_)), "{e}");
        let uneven = br#"{"node":"n1","ready":true,"config_version":0,"requests":0,"errors":0,
            "latency":{"bounds_seconds":[0.1],"counts":[],"count":0,"sum_seconds":0}}"#;
        let e = decode(uneven).unwrap_err();
        assert!(e.to_string().contains("differ in length"), "{e}");
    }
}
