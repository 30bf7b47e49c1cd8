//! HTTP hygiene between hops (RFC 9110 §7.6.1, RFC 9112): hop-by-hop
//! headers, and those a `Connection` header names, belong to one
//! connection and are removed from requests and responses; the client's
//! address is appended to `X-Forwarded-For`.

use http::{
    HeaderMap, HeaderName, HeaderValue,
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
    for name in &HOP_BY_HOP {
        headers.remove(name);
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
