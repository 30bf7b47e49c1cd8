//! HTTP hygiene between hops (RFC 9110 §7.6.1, RFC 9112): hop-by-hop
//! headers, and those a `Connection` header names, belong to one
//! connection and are removed from requests and responses; the client's
//! address is appended to `X-Forwarded-For`. Removal comes first, then the
//! proxy adds its own headers, so that a client cannot name one of them in
//! `Connection` to have it dropped.
//!
//! The mesh's own headers (`x-mesh-*`, see [`crate::peer::header`]) are
//! hop-scoped too: whatever a client or an instance sends under that prefix
//! is removed at every hop, and a proxy sets its own after the removal. A
//! client thus cannot name an instance for a peer, nor an instance fake a
//! peer's refusal.
//!
//! Message framing is hyper's (RFC 9112 §6): a differing duplicate or
//! malformed `Content-Length`, a `Transfer-Encoding` whose last coding is
//! not `chunked`, or one in HTTP/1.0, are answered 400 before the request
//! is seen; with both `Transfer-Encoding` and `Content-Length` the body is
//! read as chunked, `Content-Length` dropped and the connection closed
//! after the answer. [`check_transfer_encoding`] refuses what hyper lets
//! through: a coding before `chunked`, or `chunked` twice (`chunked,
//! chunked`, or two header lines), which the proxy would forward decoded
//! once.
//!
//! Two hop-by-hop headers are forwarded on purpose: `TE: trailers` (gRPC
//! needs it, and it is the one `TE` HTTP/2 allows), and, on a real HTTP/1.1
//! upgrade request and its `101` answer, `Connection: upgrade` with
//! `Upgrade`, which the proxy passes on so that the instance can accept
//! the tunnel.

use http::{
    HeaderMap, HeaderName, HeaderValue, StatusCode, Version,
    header::{
        CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING,
        UPGRADE,
    },
};

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// What the name of every header the mesh uses between its proxies starts
/// with.
pub const INTERNAL_PREFIX: &str = "x-mesh-";

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that never cross a hop.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHORIZATION,
    PROXY_AUTHENTICATE,
];

/// The `Upgrade` value of an upgrade request the proxy tunnels: HTTP/1.1,
/// `Connection` names `upgrade`, and `Upgrade` is there. `h2c` is not
/// tunnelled: it is about the client's hop to the proxy only.
pub fn upgrade_of(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let upgrade = headers.get(UPGRADE)?;
    let named = headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| has_token(v, "upgrade"));
    (named && !has_token(upgrade, "h2c")).then(|| upgrade.clone())
}

/// [`strip_hop_by_hop`] for a request about to go upstream: keeps
/// `TE: trailers`, and for an upgrade request (`upgrade`, from
/// [`upgrade_of`]) puts back `Connection: upgrade` and `Upgrade`.
pub fn strip_request_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<HeaderValue>) {
    let trailers = headers.get_all(TE).iter().any(|v| has_token(v, "trailers"));
    strip_hop_by_hop(headers);
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if let Some(upgrade) = upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, upgrade);
    }
}

/// [`strip_hop_by_hop`] for a response: a `101 Switching Protocols` keeps
/// its `Connection: upgrade` and `Upgrade`, which the client needs.
pub fn strip_response_hop_by_hop(status: StatusCode, headers: &mut HeaderMap) {
    let upgrade = (status == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| headers.get(UPGRADE).cloned())
        .flatten();
    strip_hop_by_hop(headers);
    if let Some(upgrade) = upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, upgrade);
    }
}

/// Whether a comma-separated header value lists `token` (ASCII case ignored).
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|list| {
        list.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// Removes the hop-by-hop headers and every header `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut connection = headers.get_all(CONNECTION).iter();
    match (connection.next(), connection.next()) {
        (None, _) => {}
        // The common case, one `Connection` header: a cheap clone (shared
        // bytes) frees the map for removals.
        (Some(one), None) => {
            let one = one.clone();
            remove_named(headers, &one);
        }
        (Some(_), Some(_)) => {
            let all: Vec<HeaderValue> = headers.get_all(CONNECTION).iter().cloned().collect();
            for v in &all {
                remove_named(headers, v);
            }
        }
    }
    // Most messages carry none of them: one pass over the names present
    // (cheap comparisons of standard names) spares nine hashed removals.
    let (mut hop, mut internal) = (false, false);
    for name in headers.keys() {
        hop |= HOP_BY_HOP.contains(name);
        internal |= is_internal(name);
    }
    if hop {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
    }
    if internal {
        let names: Vec<HeaderName> = headers.keys().filter(|n| is_internal(n)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
}

/// Whether `name` is one of the mesh's own headers.
fn is_internal(name: &HeaderName) -> bool {
    // Header names are lowercase.
    name.as_str().starts_with(INTERNAL_PREFIX)
}

/// Refuses a request `Transfer-Encoding` other than one `chunked`: a
/// coding before it (the proxy would forward the body still encoded, its
/// coding unsaid), or `chunked` twice, in one header line or two (the
/// proxy would decode it once and forward a body that still reads as
/// chunks). The error says what is wrong, for the 400.
pub fn check_transfer_encoding(headers: &HeaderMap) -> Result<(), &'static str> {
    let mut codings = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(()),
        (Some(_), None) => Err("Transfer-Encoding: only chunked is supported"),
        (Some(_), Some(_)) => Err(
            "Transfer-Encoding must be a single chunked: other codings and chunked twice are refused",
        ),
    }
}

fn remove_named(headers: &mut HeaderMap, connection: &HeaderValue) {
    let Ok(list) = connection.to_str() else {
        return;
    };
    for token in list.split(',') {
        let token = token.trim();
        // `close` and `keep-alive` are options, not header names (the
        // latter is removed anyway); `Host` is every hop's (RFC 9110
        // §7.6.1: never a connection option), and routing read it.
        if token.is_empty()
            || token.eq_ignore_ascii_case("close")
            || token.eq_ignore_ascii_case("keep-alive")
            || token.eq_ignore_ascii_case("host")
        {
            continue;
        }
        headers.remove(token);
    }
}

/// Appends the client's address (`client`, made once per connection) to
/// `X-Forwarded-For`. Only a request that already carries one allocates.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: &HeaderValue) {
    let mut existing = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    if existing.peek().is_none() {
        headers.insert(X_FORWARDED_FOR, client.clone());
        return;
    }
    let mut joined = Vec::with_capacity(64);
    for v in existing {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(client.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret, Host"),
            ("connection", "x-other"),
            ("host", "orders"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept", "host"]);
    }

    #[test]
    fn request_keeps_te_trailers_and_a_real_upgrade() {
        let mut h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers, deflate"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-key", "abc"),
        ]);
        let upgrade = upgrade_of(Version::HTTP_11, &h);
        assert_eq!(upgrade.as_ref().unwrap(), "websocket");
        strip_request_hop_by_hop(&mut h, upgrade);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["sec-websocket-key"], "abc");
        assert!(!h.contains_key("keep-alive"));

        // Upgrade without Connection naming it, h2c, HTTP/2 or HTTP/1.0:
        // not an upgrade; both headers go.
        for (version, pairs) in [
            (Version::HTTP_11, &[("upgrade", "websocket")][..]),
            (
                Version::HTTP_11,
                &[("connection", "upgrade"), ("upgrade", "h2c")][..],
            ),
            (
                Version::HTTP_10,
                &[("connection", "upgrade"), ("upgrade", "websocket")][..],
            ),
            (
                Version::HTTP_2,
                &[("connection", "upgrade"), ("upgrade", "websocket")][..],
            ),
        ] {
            let mut h = map(pairs);
            let upgrade = upgrade_of(version, &h);
            assert!(upgrade.is_none(), "{version:?} {pairs:?}");
            strip_request_hop_by_hop(&mut h, upgrade);
            assert!(h.is_empty(), "{version:?} {pairs:?}: {h:?}");
        }
        let mut h = map(&[("te", "gzip")]);
        strip_request_hop_by_hop(&mut h, None);
        assert!(h.is_empty());
    }

    #[test]
    fn only_a_101_keeps_its_upgrade_headers() {
        let pairs = [
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-accept", "x"),
        ];
        let mut h = map(&pairs);
        strip_response_hop_by_hop(StatusCode::SWITCHING_PROTOCOLS, &mut h);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        let mut h = map(&pairs);
        strip_response_hop_by_hop(StatusCode::OK, &mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["sec-websocket-accept"]);
    }

    #[test]
    fn forwarded_for_is_appended() {
        let client = HeaderValue::from_static("10.0.0.9");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &client);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        append_forwarded_for(&mut h, &client);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
    }

    #[test]
    fn mesh_headers_go_at_every_hop() {
        let mut h = map(&[
            ("x-mesh-endpoint", "orders/orders-1"),
            ("x-mesh-protocol", "h2"),
            ("x-mesh-refused", "overloaded"),
            ("x-mesh-future", "1"),
            ("x-meshy", "kept"),
        ]);
        strip_request_hop_by_hop(&mut h, None);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-meshy"]);
        let mut h = map(&[("x-mesh-refused", "overloaded"), ("x-kept", "1")]);
        strip_response_hop_by_hop(StatusCode::OK, &mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    #[test]
    fn transfer_encoding_is_one_chunked_or_nothing() {
        for ok in [&[][..], &["chunked"], &["Chunked "], &[" chunked,"]] {
            let pairs: Vec<_> = ok.iter().map(|v| ("transfer-encoding", *v)).collect();
            assert_eq!(check_transfer_encoding(&map(&pairs)), Ok(()), "{ok:?}");
        }
        for bad in [
            &["gzip"][..],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["gzip, chunked"],
            &["identity", "chunked"],
        ] {
            let pairs: Vec<_> = bad.iter().map(|v| ("transfer-encoding", *v)).collect();
            let e = check_transfer_encoding(&map(&pairs)).unwrap_err();
            assert!(e.contains("Transfer-Encoding"), "{bad:?}: {e}");
        }
    }
}
