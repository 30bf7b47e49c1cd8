//! What can go wrong with a proxied request, and the one place that turns
//! it into a status code and a JSON body.
//!
//! A [`ProxyError`] knows whose fault it is ([`Side`]), whether the request
//! may be tried again on another instance, and the words a caller may see.
//! Its `Display` never names an instance's address: a caller in another
//! service learns the service and the kind of failure, not the topology.
//! The underlying cause (`source`) is for our logs only.
//!
//! A gRPC caller gets the same error as gRPC expects it
//! ([`ProxyError::to_grpc_response`]): HTTP 200, trailers-only, with
//! `grpc-status` and `grpc-message`, as gRPC's HTTP-to-status mapping.

use std::{borrow::Cow, io, sync::Arc, time::Duration};

use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use crate::{body::ProxyBody, limits::Limit};

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
        source: crate::h1::BoxError,
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
    /// A limit of the service or of the listener is reached: refused at
    /// once rather than queued.
    #[error("{}", overload_reason(service.as_deref(), *limit, *max))]
    Overloaded {
        /// The service whose limit it is; `None` for the listener's.
        service: Option<Arc<str>>,
        /// Which limit.
        limit: Limit,
        /// Its value.
        max: usize,
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
            Self::Overloaded { .. } => "overloaded",
            Self::BadRequest(_) => "bad_request",
            Self::NotFound(_) => "not_found",
        }
    }

    /// The status a client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownService { .. } | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::NoRoutes | Self::NoHealthyInstance { .. } | Self::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
            Self::NoRoutes | Self::Overloaded { service: None, .. } => Side::Internal,
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
            Self::Overloaded { service, .. } => service.as_deref(),
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

/// gRPC status codes the proxy answers with (grpc/doc/statuscodes.md).
pub mod grpc_code {
    /// Not known.
    pub const UNKNOWN: u8 = 2;
    /// The deadline ran out.
    pub const DEADLINE_EXCEEDED: u8 = 4;
    /// Not allowed.
    pub const PERMISSION_DENIED: u8 = 7;
    /// Out of capacity (load shed, limits).
    pub const RESOURCE_EXHAUSTED: u8 = 8;
    /// No such method (here: no such service).
    pub const UNIMPLEMENTED: u8 = 12;
    /// Broken (a malformed request).
    pub const INTERNAL: u8 = 13;
    /// Not available now; retrying may help.
    pub const UNAVAILABLE: u8 = 14;
    /// No credentials.
    pub const UNAUTHENTICATED: u8 = 16;
}

impl ProxyError {
    /// The gRPC status a gRPC caller receives: a timeout is
    /// `DEADLINE_EXCEEDED`, the rest follow gRPC's mapping of HTTP statuses
    /// (doc/http-grpc-status-mapping.md), so errors added later map too.
    pub fn grpc_code(&self) -> u8 {
        match self {
            Self::Timeout { .. } => grpc_code::DEADLINE_EXCEEDED,
            Self::Overloaded { .. } => grpc_code::RESOURCE_EXHAUSTED,
            _ => grpc_code_of(self.status()),
        }
    }

    /// The response a gRPC caller receives: HTTP 200, `content-type:
    /// application/grpc`, no body, `grpc-status` and `grpc-message` (a
    /// trailers-only response).
    pub fn to_grpc_response(&self) -> Response<ProxyBody> {
        grpc_error(self.grpc_code(), &self.to_string())
    }
}

/// gRPC's mapping of an HTTP status to a gRPC status.
pub fn grpc_code_of(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => grpc_code::INTERNAL,
        401 => grpc_code::UNAUTHENTICATED,
        403 => grpc_code::PERMISSION_DENIED,
        404 => grpc_code::UNIMPLEMENTED,
        429 => grpc_code::RESOURCE_EXHAUSTED,
        502..=504 => grpc_code::UNAVAILABLE,
        _ => grpc_code::UNKNOWN,
    }
}

/// A trailers-only gRPC error response: status 200 and `grpc-status`
/// `code` with `grpc-message` `message` (percent-encoded, as gRPC wants).
pub fn grpc_error(code: u8, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::empty());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", v);
    }
    response
}

/// gRPC's percent-encoding of `grpc-message`: bytes outside printable
/// ASCII, and `%`, as `%XX`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The words of an overload: which limit, of what, at which value.
fn overload_reason(service: Option<&str>, limit: Limit, max: usize) -> String {
    let what = match limit {
        Limit::Connections => "open connections",
        Limit::Pending => "requests waiting for a connection",
        Limit::Requests | Limit::ListenerRequests => "concurrent requests",
        Limit::ListenerConnections => "client connections",
    };
    match service {
        Some(s) => format!(
            "service {s:?} is at its {} limit ({max} {what}); try again later",
            limit.as_str()
        ),
        None => format!(
            "the proxy is at its {} limit ({max} {what}); try again later",
            limit.as_str()
        ),
    }
}

impl ProxyError {
    /// The HTTP/1.1 bytes of [`ProxyError::to_response`] with `Connection:
    /// close`, for a connection refused before hyper serves it.
    pub fn to_raw_response(&self) -> Vec<u8> {
        let body = ErrorBody {
            error: self.kind(),
            reason: &self.to_string(),
            service: self.service(),
        };
        let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let status = self.status();
        let mut raw = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            json.len()
        )
        .into_bytes();
        raw.extend_from_slice(&json);
        raw
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
    use http_body::Body as _;
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
            (
                ProxyError::Overloaded {
                    service: Some(svc.clone()),
                    limit: Limit::Requests,
                    max: 1024,
                },
                503,
                "overloaded",
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
    fn grpc_callers_get_trailers_only_errors_with_mapped_codes() {
        let svc: Arc<str> = "orders".into();
        let cases = [
            (
                ProxyError::NoHealthyInstance {
                    service: svc.clone(),
                },
                grpc_code::UNAVAILABLE,
            ),
            (
                ProxyError::Timeout {
                    service: svc.clone(),
                    timeout: Duration::from_secs(1),
                },
                grpc_code::DEADLINE_EXCEEDED,
            ),
            (
                ProxyError::UnknownService {
                    service: svc.clone(),
                },
                grpc_code::UNIMPLEMENTED,
            ),
            (ProxyError::BadRequest("bad".into()), grpc_code::INTERNAL),
        ];
        for (e, code) in cases {
            let r = e.to_grpc_response();
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()["content-type"], "application/grpc");
            assert_eq!(r.headers()["grpc-status"], code.to_string().as_str());
            assert!(r.headers().contains_key("grpc-message"));
            assert!(r.body().is_end_stream(), "trailers-only: no body");
        }
        assert_eq!(percent_encode("50% off\n é"), "50%25 off%0A %C3%A9");
    }

    #[tokio::test]
    async fn overload_says_which_limit() {
        let (status, json) = body_of(ProxyError::Overloaded {
            service: None,
            limit: Limit::ListenerRequests,
            max: 10,
        })
        .await;
        assert_eq!(status, 503);
        assert_eq!(json["error"], "overloaded");
        let reason = json["reason"].as_str().unwrap();
        assert!(
            reason.contains("listener_max_requests limit (10"),
            "{reason}"
        );
        assert!(json.get("service").is_none(), "{json}");
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
