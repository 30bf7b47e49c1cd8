//! What can go wrong with a proxied request, and the one place that turns
//! it into a status code and a JSON body.
//!
//! A [`ProxyError`] knows whose fault it is ([`Side`]), whether the request
//! may be tried again on another instance, and the words a caller may see.
//! Its `Display` never names an instance's address: a caller in another
//! service learns the service and the kind of failure, not the topology.
//! The underlying cause (`source`) is for our logs only.

use std::{borrow::Cow, io, sync::Arc, time::Duration};

use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use crate::body::ProxyBody;

/// Why a request could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No service by that name is known to the mesh.
    #[error("no service named {service:?} is known to the mesh")]
    UnknownService {
        /// The name asked for.
        service: Arc<str>,
    },
    /// The proxy has no routing table yet (no dump, bridge not answered).
    #[error("the proxy has not loaded its routing table yet")]
    NoRoutes,
    /// The service exists but has no passing instance.
    #[error("service {service:?} has no healthy instance")]
    NoHealthyInstance {
        /// The service.
        service: Arc<str>,
    },
    /// No instance accepted a connection (the request was never sent).
    #[error("could not connect to an instance of {service:?}")]
    Connect {
        /// The service.
        service: Arc<str>,
        /// Why the last connect failed.
        #[source]
        source: io::Error,
    },
    /// The instance failed (reset, closed, bad answer) before its response
    /// headers arrived.
    #[error("an instance of {service:?} failed before answering")]
    Upstream {
        /// The service.
        service: Arc<str>,
        /// The failure.
        #[source]
        source: hyper::Error,
        /// Whether the request had been sent, so may have been acted upon.
        sent: bool,
    },
    /// No response headers within the request timeout.
    #[error("service {service:?} did not answer within {timeout:?}")]
    Timeout {
        /// The service.
        service: Arc<str>,
        /// The budget that ran out.
        timeout: Duration,
    },
    /// The request itself is wrong.
    #[error("{0}")]
    BadRequest(Cow<'static, str>),
    /// A path reserved by the proxy that serves nothing.
    #[error("{0}")]
    NotFound(Cow<'static, str>),
}

/// Whose fault an error is, as pingora and linkerd tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The client sent something wrong.
    Downstream,
    /// An instance (or the lack of one) failed.
    Upstream,
    /// The proxy itself.
    Internal,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<&'a str>,
}

// === impl ProxyError ===

impl ProxyError {
    /// A stable machine-readable name, the body's `error` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownService { .. } => "unknown_service",
            Self::NoRoutes => "no_routes",
            Self::NoHealthyInstance { .. } => "no_healthy_instance",
            Self::Connect { .. } => "connect_failed",
            Self::Upstream { .. } => "upstream_failed",
            Self::Timeout { .. } => "timeout",
            Self::BadRequest(_) => "bad_request",
            Self::NotFound(_) => "not_found",
        }
    }

    /// The status a client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownService { .. } | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::NoRoutes | Self::NoHealthyInstance { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect { .. } | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// Whose fault it is.
    pub fn side(&self) -> Side {
        match self {
            Self::BadRequest(_) | Self::NotFound(_) | Self::UnknownService { .. } => {
                Side::Downstream
            }
            Self::NoRoutes => Side::Internal,
            _ => Side::Upstream,
        }
    }

    /// Whether trying another instance is safe whatever the method: the
    /// request never left the proxy. (A bodyless idempotent request may be
    /// retried after [`ProxyError::Upstream`] too; the caller knows.)
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Upstream { sent, .. } => !sent,
            _ => false,
        }
    }

    /// The service concerned, if the request got that far.
    pub fn service(&self) -> Option<&str> {
        match self {
            Self::UnknownService { service }
            | Self::NoHealthyInstance { service }
            | Self::Connect { service, .. }
            | Self::Upstream { service, .. }
            | Self::Timeout { service, .. } => Some(service),
            _ => None,
        }
    }

    /// The response a client receives: the status and
    /// `{"error": kind, "reason": text, "service": name}`.
    pub fn to_response(&self) -> Response<ProxyBody> {
        let reason = self.to_string();
        json_error(self.status(), self.kind(), &reason, self.service())
    }
}

/// A JSON error response: `{"error", "reason", "service"?}` with `status`.
pub fn json_error(
    status: StatusCode,
    kind: &str,
    reason: &str,
    service: Option<&str>,
) -> Response<ProxyBody> {
    let body = ErrorBody {
        error: kind,
        reason,
        service,
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(ProxyBody::full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn body_of(e: ProxyError) -> (StatusCode, serde_json::Value) {
        let r = e.to_response();
        let status = r.status();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn each_kind_has_its_status_and_json_body() {
        let svc: Arc<str> = "orders".into();
        let refused = || io::Error::new(io::ErrorKind::ConnectionRefused, "10.0.0.7:8080 refused");
        let cases = [
            (
                ProxyError::UnknownService {
                    service: svc.clone(),
                },
                404,
                "unknown_service",
            ),
            (
                ProxyError::NoHealthyInstance {
                    service: svc.clone(),
                },
                503,
                "no_healthy_instance",
            ),
            (
                ProxyError::Connect {
                    service: svc.clone(),
                    source: refused(),
                },
                502,
                "connect_failed",
            ),
            (
                ProxyError::Timeout {
                    service: svc.clone(),
                    timeout: Duration::from_secs(1),
                },
                504,
                "timeout",
            ),
            (
                ProxyError::BadRequest("two Host headers".into()),
                400,
                "bad_request",
            ),
        ];
        for (e, status, kind) in cases {
            let has_service = e.service().is_some();
            let (s, json) = body_of(e).await;
            assert_eq!(s.as_u16(), status);
            assert_eq!(json["error"], kind);
            assert!(json["reason"].as_str().is_some_and(|r| !r.is_empty()));
            if has_service {
                assert_eq!(json["service"], "orders");
            }
            // The instance's address is for our logs, never for the caller.
            assert!(!json.to_string().contains("10.0.0.7"), "{json}");
        }
    }

    #[test]
    fn only_unsent_requests_are_retryable() {
        let svc: Arc<str> = "orders".into();
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(
            ProxyError::Connect {
                service: svc.clone(),
                source: refused
            }
            .is_retryable()
        );
        assert!(
            !ProxyError::Timeout {
                service: svc,
                timeout: Duration::from_secs(1)
            }
            .is_retryable()
        );
    }
}
