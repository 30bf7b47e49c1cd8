//! Which service a request is for, read from the request alone.
//!
//! `Host: orders` (also `orders.mesh`, `orders.service.consul`, any port)
//! names the service and the path goes unchanged. When the host is an IP
//! literal or `localhost` (a caller that only knows `127.0.0.1:8888`), the
//! first path segment names the service and is stripped, as nginx's
//! `location /orders/ { proxy_pass http://orders/; }`. `/v1/agent/...` is
//! Consul's agent API, served by the proxy on any host; `/v1` and `/_mesh`
//! are never service names.
//!
//! Routing, the route's policy and the instance all read one path: the
//! proxy normalizes it before routing ([`normalize`]) and forwards the
//! normalized form, so that no hop reads `/orders/../billing` otherwise
//! than the proxy did. Dot-segments are removed (RFC 3986 §5.2.4), also
//! percent-encoded ones (`%2e%2e`); runs of slashes are merged (`//b` is
//! `/b`); a trailing slash is kept. A path holding an encoded slash
//! (`%2F`), backslash (`%5C`) or NUL (`%00`) is refused with 400: servers
//! disagree on whether such a byte separates segments, so it has no one
//! meaning to route on (the agent API, served by the proxy and forwarded
//! nowhere, judges its own). Any other percent-encoding goes as it came.
//! A path without `//`, `/.` or `%2e` (nearly all of them) costs a scan
//! or two and no allocation.

use std::{borrow::Cow, net::Ipv4Addr};

use http::{
    Request, Uri,
    header::HOST,
    uri::{Parts, PathAndQuery},
};

use crate::error::ProxyError;

/// Where Consul's agent API, which the proxy serves, lives.
const AGENT_PREFIX: &str = "/v1/agent/";

/// Names no service may take: they are the proxy's own paths.
pub const RESERVED: [&str; 2] = ["v1", "_mesh"];

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// Consul's agent API, served by the proxy itself.
    Agent,
    /// A service, named by the host: the path is forwarded unchanged.
    Host(&'a str),
    /// A service, named by the first path segment, which `strip` bytes of
    /// the path hold (`/orders`).
    Path {
        /// The service name.
        name: &'a str,
        /// Bytes of the path to remove.
        strip: usize,
    },
}

/// Reads the route from `req`; refuses two `Host` headers and paths that
/// name no service.
pub fn route<B>(req: &Request<B>) -> Result<Route<'_>, ProxyError> {
    let path = req.uri().path();
    if path.starts_with(AGENT_PREFIX) {
        return Ok(Route::Agent);
    }
    let host = host(req)?;
    if let Some(name) = service_host(host) {
        return Ok(Route::Host(name));
    }
    let rest = path.strip_prefix('/').unwrap_or(path);
    let name = rest.split('/').next().unwrap_or("");
    if name.is_empty() {
        return Err(ProxyError::NotFound(
            "name a service: http://127.0.0.1:8888/<service>/... or Host: <service>".into(),
        ));
    }
    if RESERVED.contains(&name) {
        return Err(ProxyError::NotFound(
            format!("/{name} is reserved by the proxy and names no service").into(),
        ));
    }
    Ok(Route::Path {
        name,
        strip: 1 + name.len(),
    })
}

/// The request's host: the URI's authority (absolute-form, HTTP/2) or the
/// one `Host` header; two are refused (RFC 9112 §3.2).
fn host<B>(req: &Request<B>) -> Result<&str, ProxyError> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header".into()));
    }
    if let Some(authority) = req.uri().authority() {
        return Ok(authority.as_str());
    }
    match first {
        None => Ok(""),
        Some(v) => v
            .to_str()
            .map_err(|_| ProxyError::BadRequest("Host header is not ASCII".into())),
    }
}

/// The service a host names, or `None` when it is an address (IP literal,
/// `localhost`, none at all) and the path must name it.
fn service_host(host: &str) -> Option<&str> {
    if host.starts_with('[') {
        return None; // an IPv6 literal
    }
    let name = host.rsplit_once(':').map_or(host, |(h, _port)| h);
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.eq_ignore_ascii_case("localhost") || name.parse::<Ipv4Addr>().is_ok()
    {
        return None;
    }
    for suffix in [".service.consul", ".mesh"] {
        if let Some(split) = name.len().checked_sub(suffix.len())
            && name.is_char_boundary(split)
            && name[split..].eq_ignore_ascii_case(suffix)
        {
            return Some(&name[..split]);
        }
    }
    Some(name)
}

/// The URI with its path normalized as the module says; `None` when the
/// path is normal already (or is no path, as `*`). Refuses an encoded
/// slash, backslash or NUL.
pub fn normalize(uri: &Uri) -> Result<Option<Uri>, ProxyError> {
    let path = uri.path();
    if !path.starts_with('/') {
        return Ok(None);
    }
    let bytes = path.as_bytes();
    let percent = path.find('%');
    let dotted = bytes.windows(2).any(|w| w == b"//" || w == b"/.")
        || percent.is_some_and(|at| {
            bytes[at..]
                .windows(3)
                .any(|w| w.eq_ignore_ascii_case(b"%2e"))
        });
    let normal: Cow<'_, str> = if dotted {
        remove_dot_segments(path).into()
    } else {
        path.into()
    };
    // The agent API goes nowhere: its path is its own to judge.
    if let Some(at) = percent
        && !normal.starts_with(AGENT_PREFIX)
    {
        refuse_encoded_separators(path, at)?;
    }
    if normal == path {
        return Ok(None);
    }
    let pq = match uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal.into_owned(),
    };
    let pq = PathAndQuery::try_from(pq)
        .map_err(|_| ProxyError::BadRequest("request target is not a valid path".into()))?;
    let mut parts = Parts::from(uri.clone());
    parts.path_and_query = Some(pq);
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| ProxyError::BadRequest("request target is not a valid URI".into()))
}

/// Refuses `%2F`, `%5C` and `%00` in `path`, whose first `%` is at `at`.
fn refuse_encoded_separators(path: &str, at: usize) -> Result<(), ProxyError> {
    let bytes = path.as_bytes();
    for i in (at..bytes.len()).filter(|&i| bytes[i] == b'%') {
        let Some(hex) = bytes.get(i + 1..i + 3) else {
            break;
        };
        let what = match hex {
            [b'2', b'f' | b'F'] => "slash (%2F)",
            [b'5', b'c' | b'C'] => "backslash (%5C)",
            [b'0', b'0'] => "NUL (%00)",
            _ => continue,
        };
        return Err(ProxyError::BadRequest(
            format!(
                "the path {path:?} holds an encoded {what}, which servers do not read alike: the proxy routes no such path"
            )
            .into(),
        ));
    }
    Ok(())
}

/// `path` (which starts with `/`) without dot-segments and empty segments,
/// keeping a trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path[1..].split('/') {
        // A segment that is gone leaves its directory: `/a/..` is `/`,
        // `/a/.` and `/a/` are `/a/`.
        trailing_slash = true;
        match dots(segment) {
            2 => {
                kept.pop();
            }
            1 => {}
            _ if segment.is_empty() => {}
            _ => {
                kept.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    out
}

/// 1 for `.`, 2 for `..` (either maybe percent-encoded), else 0.
fn dots(segment: &str) -> u8 {
    let s = segment.as_bytes();
    let is = |want: &[u8]| s.eq_ignore_ascii_case(want);
    if is(b".") || is(b"%2e") {
        1
    } else if is(b"..") || is(b".%2e") || is(b"%2e.") || is(b"%2e%2e") {
        2
    } else {
        0
    }
}

/// The URI to send upstream when it is not the client's own: origin-form
/// (path and query only), without the first `strip` bytes of the path
/// (`/orders/api?q` → `/api?q`, `/orders` → `/`). `None` for an
/// origin-form URI kept as is; without stripping nothing is allocated.
pub fn upstream_uri(uri: &Uri, strip: usize) -> Result<Option<Uri>, ProxyError> {
    if strip == 0 {
        if uri.scheme().is_none() && uri.authority().is_none() {
            return Ok(None);
        }
        let pq = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        return Ok(Some(Uri::from(pq)));
    }
    let rest = uri.path().get(strip..).unwrap_or("");
    let path: Cow<'_, str> = if rest.is_empty() {
        "/".into()
    } else if rest.starts_with('/') {
        rest.into()
    } else {
        // `/orders-v2` was never routed as `orders`; not reachable.
        format!("/{rest}").into()
    };
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    let pq = PathAndQuery::try_from(pq)
        .map_err(|_| ProxyError::BadRequest("request target is not a valid path".into()))?;
    Ok(Some(Uri::from(pq)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn host_names_the_service_in_all_its_forms() {
        for host in [
            "orders",
            "orders:8888",
            "orders.mesh",
            "ORDERS.Mesh:80",
            "orders.service.consul",
            "orders.service.consul.",
        ] {
            let r = req("/api/x", &[host]);
            let got = route(&r).unwrap();
            assert!(
                matches!(got, Route::Host(n) if n.eq_ignore_ascii_case("orders")),
                "{host}: {got:?}"
            );
        }
    }

    #[test]
    fn ip_or_localhost_routes_by_first_segment() {
        for host in ["127.0.0.1:8888", "localhost", "[::1]:8888", "10.1.2.3"] {
            let r = req("/orders/api/x?q=1", &[host]);
            assert_eq!(
                route(&r).unwrap(),
                Route::Path {
                    name: "orders",
                    strip: 7
                },
                "{host}"
            );
        }
        let r = req("/orders", &[]);
        assert_eq!(
            route(&r).unwrap(),
            Route::Path {
                name: "orders",
                strip: 7
            }
        );
    }

    #[test]
    fn reserved_and_empty_paths_name_no_service() {
        for path in ["/v1/kv/x", "/_mesh/x", "/_mesh", "/"] {
            let r = req(path, &["127.0.0.1:8888"]);
            let e = route(&r).unwrap_err();
            assert_eq!(e.status(), 404, "{path}");
        }
        let r = req("/v1/agent/services", &["orders"]);
        assert_eq!(route(&r).unwrap(), Route::Agent);
    }

    #[test]
    fn two_host_headers_are_refused() {
        let r = req("/x", &["orders", "billing"]);
        assert_eq!(route(&r).unwrap_err().status(), 400);
    }

    #[test]
    fn absolute_form_authority_wins() {
        let r = req("http://orders.mesh/x", &["127.0.0.1"]);
        assert_eq!(route(&r).unwrap(), Route::Host("orders"));
        assert_eq!(upstream_uri(r.uri(), 0).unwrap().unwrap(), "/x");
    }

    #[test]
    fn paths_are_normalized_once_for_every_reader() {
        let n = |s: &str| {
            normalize(&s.parse().unwrap())
                .unwrap()
                .map(|u| u.to_string())
        };
        for (from, to) in [
            ("/a/../b", "/b"),
            ("//b", "/b"),
            ("/orders//api///x?q=1", "/orders/api/x?q=1"),
            ("/a/./b/../c/", "/a/c/"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/..", "/"),
            ("/../../orders", "/orders"),
            ("/orders/%2e%2E/billing", "/billing"),
            ("/orders/.%2e/%2E/billing", "/billing"),
            ("http://orders.mesh/a/../b?x", "http://orders.mesh/b?x"),
        ] {
            assert_eq!(n(from).as_deref(), Some(to), "{from}");
        }
        // Normal already: nothing is made.
        for same in [
            "/",
            "/orders/api?q=/../",
            "/.well-known/x",
            "/a%20b/...",
            "*",
        ] {
            assert_eq!(n(same), None, "{same}");
        }
        for bad in [
            "/orders/a%2Fb",
            "/orders/a%2f..%2fadmin",
            "/x%5C..",
            "/x%00",
        ] {
            let e = normalize(&bad.parse().unwrap()).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}");
            assert!(e.to_string().contains("encoded"), "{bad}: {e}");
        }
    }

    #[test]
    fn stripping_keeps_the_rest_and_the_query() {
        let u = |s: &str, n| {
            upstream_uri(&s.parse().unwrap(), n)
                .unwrap()
                .unwrap()
                .to_string()
        };
        assert_eq!(u("/orders/api/x?q=1", 7), "/api/x?q=1");
        assert_eq!(u("/orders", 7), "/");
        assert_eq!(u("/orders/", 7), "/");
        assert_eq!(u("/orders?q=1", 7), "/?q=1");
        // An origin-form URI without stripping is kept as it came.
        assert!(
            upstream_uri(&"/api/x?q=1".parse().unwrap(), 0)
                .unwrap()
                .is_none()
        );
    }
}
