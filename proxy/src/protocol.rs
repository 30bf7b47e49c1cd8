//! Which HTTP version a request travels upstream in.
//!
//! Clients speak HTTP/1.1 or HTTP/2 (h2c, prior knowledge) to the proxy;
//! each attempt picks the upstream protocol on its own, since the instances
//! of one service may differ:
//!
//! 1. an HTTP/1.1 Upgrade (WebSocket) goes over HTTP/1.1, the only version
//!    it exists in;
//! 2. gRPC (`content-type: application/grpc…`) goes over HTTP/2: it needs
//!    trailers and full-duplex streams, so it is never turned into HTTP/1.1;
//! 3. else the route's `protocol`, when the route policy sets one;
//! 4. else what the instance says: Consul tag `h2` or `grpc`, or
//!    `Meta.protocol = "h2" | "grpc"`;
//! 5. else HTTP/1.1.

use std::{collections::BTreeMap, fmt, str::FromStr};

use http::{
    HeaderMap,
    header::{CONTENT_TYPE, UPGRADE},
};
use serde::{Deserialize, Serialize};

/// The protocol between the proxy and an instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// HTTP/1.1 over a pool of keep-alive connections.
    #[default]
    #[serde(rename = "http1", alias = "h1", alias = "http/1.1")]
    Http1,
    /// HTTP/2 cleartext (prior knowledge) over one multiplexed connection
    /// per instance; `grpc` in config means this too.
    #[serde(rename = "h2", alias = "http2", alias = "grpc", alias = "h2c")]
    Http2,
}

// === impl Protocol ===

impl Protocol {
    /// What an instance declares: tag `h2` or `grpc`, or `Meta.protocol`
    /// `h2` / `grpc` (ASCII case ignored); HTTP/1.1 otherwise.
    pub fn of_instance(tags: &[String], meta: &BTreeMap<String, String>) -> Self {
        let h2 = |s: &str| s.eq_ignore_ascii_case("h2") || s.eq_ignore_ascii_case("grpc");
        if tags.iter().any(|t| h2(t)) || meta.get("protocol").is_some_and(|p| h2(p)) {
            Self::Http2
        } else {
            Self::Http1
        }
    }

    /// The protocol one attempt uses: see the module's rules. `headers`
    /// are the prepared request's (an `Upgrade` header survives preparation
    /// only on a real upgrade request), `route` is the route policy's
    /// protocol, `instance` the instance's own.
    pub fn choose(headers: &HeaderMap, route: Option<Self>, instance: Self) -> Self {
        if headers.contains_key(UPGRADE) {
            Self::Http1
        } else if is_grpc(headers) {
            Self::Http2
        } else {
            route.unwrap_or(instance)
        }
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "http1" | "h1" | "http/1.1" => Ok(Self::Http1),
            "h2" | "http2" | "h2c" | "grpc" => Ok(Self::Http2),
            other => Err(format!(
                "unknown protocol {other:?}: expected http1, h2 or grpc"
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Http1 => "http1",
            Self::Http2 => "h2",
        })
    }
}

/// Whether a request (or response) is gRPC: `content-type` is
/// `application/grpc` or `application/grpc+<codec>` (or with parameters).
/// gRPC-Web (`application/grpc-web…`) is not: it works over HTTP/1.1.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    let ct = ct.as_bytes();
    const GRPC: &[u8] = b"application/grpc";
    ct.len() >= GRPC.len()
        && ct[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(ct.get(GRPC.len()), None | Some(b'+' | b';'))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn grpc_content_types_are_recognised_and_grpc_web_is_not() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC;charset=utf-8",
        ] {
            assert!(is_grpc(&headers(&[("content-type", ct)])), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/json",
            "application/grp",
        ] {
            assert!(!is_grpc(&headers(&[("content-type", ct)])), "{ct}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn instances_declare_h2_by_tag_or_meta() {
        let meta = |v: &str| BTreeMap::from([("protocol".to_owned(), v.to_owned())]);
        let none = BTreeMap::new();
        assert_eq!(
            Protocol::of_instance(&["v2".into(), "grpc".into()], &none),
            Protocol::Http2
        );
        assert_eq!(
            Protocol::of_instance(&["H2".into()], &none),
            Protocol::Http2
        );
        assert_eq!(Protocol::of_instance(&[], &meta("grpc")), Protocol::Http2);
        assert_eq!(Protocol::of_instance(&[], &meta("h2")), Protocol::Http2);
        assert_eq!(Protocol::of_instance(&[], &meta("http1")), Protocol::Http1);
        assert_eq!(
            Protocol::of_instance(&["demo".into()], &none),
            Protocol::Http1
        );
    }

    #[test]
    fn upgrade_beats_grpc_beats_route_beats_instance() {
        use Protocol::*;
        let plain = HeaderMap::new();
        let grpc = headers(&[("content-type", "application/grpc")]);
        let ws = headers(&[("upgrade", "websocket"), ("connection", "upgrade")]);
        assert_eq!(Protocol::choose(&plain, None, Http1), Http1);
        assert_eq!(Protocol::choose(&plain, None, Http2), Http2);
        assert_eq!(Protocol::choose(&plain, Some(Http1), Http2), Http1);
        assert_eq!(Protocol::choose(&plain, Some(Http2), Http1), Http2);
        assert_eq!(Protocol::choose(&grpc, Some(Http1), Http1), Http2);
        assert_eq!(Protocol::choose(&ws, Some(Http2), Http2), Http1);
    }

    #[test]
    fn protocol_parses_from_config_words() {
        for (s, p) in [
            ("http1", Protocol::Http1),
            ("h2", Protocol::Http2),
            ("grpc", Protocol::Http2),
            ("HTTP2", Protocol::Http2),
        ] {
            assert_eq!(s.parse::<Protocol>().unwrap(), p, "{s}");
        }
        assert!("spdy".parse::<Protocol>().is_err());
        let p: Protocol = serde_json::from_str("\"grpc\"").unwrap();
        assert_eq!(p, Protocol::Http2);
    }
}
