//! The webhook sink: every alert is POSTed as JSON when it opens and when
//! it is resolved, `{"event": "open" | "resolved", "alert": {...}}`, with a
//! bounded number of tries (jittered backoff between them). A receiver
//! deduplicates by `alert.key` and `event`: after a crash between a call
//! and its record, the same event may come twice.
//!
//! `https://` URLs are verified against the system's roots, with rustls'
//! ring provider (installed for the process if it was not).

use std::time::Duration;

use mesh_runtime::backoff::Backoff;
use reqwest::{StatusCode, Url};
use serde::Serialize;

use crate::alert::Alert;

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// An open or resolve event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// The alert opened.
    Open,
    /// The alert was resolved.
    Resolved,
}

/// Where alerts are POSTed.
#[derive(Clone, Debug)]
pub struct Webhook {
    http: reqwest::Client,
    url: Url,
    attempts: u32,
}

#[derive(Serialize)]
struct Body<'a> {
    event: Event,
    alert: &'a Alert,
}

// === impl Webhook ===

impl Webhook {
    /// A webhook at `url`, tried up to `attempts` times per event.
    pub fn new(url: Url, attempts: u32) -> Result<Self, String> {
        // reqwest's client panics when built without a provider.
        mesh_runtime::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| format!("webhook client: {e}"))?;
        Ok(Self {
            http,
            url,
            attempts: attempts.max(1),
        })
    }

    /// Sends `event` for `alert`; the error says why the last try failed.
    /// A 4xx other than 408 and 429 is not tried again: the receiver
    /// refuses it.
    pub async fn send(&self, event: Event, alert: &Alert) -> Result<(), String> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            let sent = self
                .http
                .post(self.url.clone())
                .json(&Body { event, alert })
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => {
                    let status = resp.status();
                    last = format!("{} answered {status}", self.url);
                    let retry = status.is_server_error()
                        || status == StatusCode::REQUEST_TIMEOUT
                        || status == StatusCode::TOO_MANY_REQUESTS;
                    if !retry {
                        break;
                    }
                }
                Err(e) => last = format!("{}: {e}", self.url),
            }
            tracing::debug!(attempt, error = %last, key = %alert.key, "webhook call failed");
            if attempt < self.attempts {
                backoff.wait().await;
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use axum::{Json, Router, extract::State, http::StatusCode as Code, routing::post};
    use tokio::net::TcpListener;

    use super::*;
    use crate::{alert::TargetRef, probe::Outcome};

    /// A receiver answering `statuses` in turn (the last one from then on),
    /// counting the calls.
    async fn receiver(statuses: &'static [u16]) -> (Url, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        let app = Router::new()
            .route(
                "/hook",
                post(
                    move |State(calls): State<Arc<AtomicU32>>,
                          Json(body): Json<serde_json::Value>| async move {
                        assert_eq!(body["event"], "open");
                        assert_eq!(body["alert"]["key"], "hung/n1/w1");
                        let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
                        let code = statuses[n.min(statuses.len() - 1)];
                        Code::from_u16(code).unwrap()
                    },
                ),
            )
            .with_state(calls.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url.parse().unwrap(), calls)
    }

    fn alert() -> Alert {
        let target = TargetRef {
            id: "n1/w1".into(),
            service: "web".into(),
            instance_id: "w1".into(),
            node: "n1".into(),
            probe: "http://127.0.0.1:1/health".into(),
        };
        Alert::open(Outcome::Hung, &target, "no response", 1)
    }

    #[tokio::test]
    async fn a_failing_receiver_is_tried_again_up_to_the_limit() {
        let (url, calls) = receiver(&[503, 500, 200]).await;
        Webhook::new(url, 3)
            .unwrap()
            .send(Event::Open, &alert())
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let (url, calls) = receiver(&[503]).await;
        let e = Webhook::new(url, 2)
            .unwrap()
            .send(Event::Open, &alert())
            .await
            .unwrap_err();
        assert!(e.contains("503"), "{e}");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "bounded");
    }

    #[tokio::test]
    async fn a_refusal_is_not_tried_again() {
        let (url, calls) = receiver(&[400, 200]).await;
        let e = Webhook::new(url, 3)
            .unwrap()
            .send(Event::Open, &alert())
            .await
            .unwrap_err();
        assert!(e.contains("400"), "{e}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
