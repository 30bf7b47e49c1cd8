//! HTTP hygiene between hops (RFC 9110 §7.6.1, RFC 9112): hop-by-hop
//! headers, and those a `Connection` header names, belong to one
//! connection and are removed from requests and responses; the client's
//! address is appended to `X-Forwarded-For`.
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
    if headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
    }
}

fn remove_named(headers: &mut HeaderMap, connection: &HeaderValue) {
    let Ok(list) = connection.to_str() else {
        return;
    };
    for token in list.split(',') {
        let token = token.trim();
        // `close` and `keep-alive` are options, not header names (the
        // latter is removed anyway).
        if token.is_empty()
            || token.eq_ignore_ascii_case("close")
            || token.eq_ignore_ascii_case("keep-alive")
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
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
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
        assert_eq!(names, vec!["x-kept"]);
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
}
