use std::time::UNIX_EPOCH;

use http::header::CONTENT_TYPE;
use http_body_util::BodyExt;

use super::*;
use crate::error::ProxyError;

fn entry(service: &str, path: &str, status: StatusCode) -> Entry {
    Entry::new(
        Direction::Outbound,
        service.into(),
        Method::GET,
        path.parse().unwrap(),
        status,
    )
}

fn line(entry: &Entry) -> serde_json::Value {
    let mut out = Vec::new();
    entry.write_line("node-1", &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
    assert!(text.ends_with('\n'), "{text:?}");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_line_has_every_field_in_order() {
    let mut e = entry("orders", "/orders/items/7?token=secret", StatusCode::OK);
    e.upstream = Some(Arc::new(Upstream::new("10.0.0.7", 8080)));
    e.retries = 1;
    e.bytes_out = 512;
    e.duration = Duration::from_micros(1234);
    e.at = UNIX_EPOCH + Duration::from_millis(1_767_323_045_678);
    let mut out = Vec::new();
    e.write_line("node-1", &mut out).unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        concat!(
            r#"{"ts":"2026-01-02T03:04:05.678Z","direction":"outbound","node":"node-1","#,
            r#""service":"orders","method":"GET","path":"/orders/items/7","status":200,"#,
            r#""duration_ms":1.234,"upstream":"10.0.0.7:8080","retries":1,"bytes_out":512,"#,
            r#""reason":""}"#,
            "\n"
        ),
        "the query string is left out"
    );
}

#[test]
fn odd_names_and_paths_are_escaped_into_one_line() {
    // What a client may put in a path or a Host-routed name: quotes,
    // backslashes, percent-escapes of control characters, non-ASCII.
    let e = Entry::new(
        Direction::Inbound,
        "we\"ird\\svc\n{}".into(),
        Method::from_bytes(b"PURGE").unwrap(),
        Uri::from_static("/a\"b/%0A/caf%C3%A9/{}"),
        StatusCode::OK,
    );
    let v = line(&e);
    assert_eq!(v["service"], "we\"ird\\svc\n{}");
    assert_eq!(v["path"], "/a\"b/%0A/caf%C3%A9/{}");
    assert_eq!(v["method"], "PURGE");
    assert_eq!(v["direction"], "inbound");
    assert_eq!(v["upstream"], "");
}

#[test]
fn an_ipv6_upstream_is_bracketed() {
    let mut e = entry("orders", "/", StatusCode::OK);
    e.upstream = Some(Arc::new(Upstream::new("::1", 9000)));
    assert_eq!(line(&e)["upstream"], "[::1]:9000");
}

#[test]
fn proxy_made_errors_carry_their_status_and_kind() {
    let service: Arc<str> = "orders".into();
    for (error, status, reason) in [
        (
            ProxyError::NoHealthyInstance {
                service: service.clone(),
            },
            503,
            "no_healthy_instance",
        ),
        (
            ProxyError::Timeout {
                service: service.clone(),
                timeout: Duration::from_secs(1),
            },
            504,
            "timeout",
        ),
        (
            ProxyError::Overloaded {
                service: Some(service.clone()),
                limit: crate::limits::Limit::Requests,
                max: 1,
            },
            503,
            "overloaded",
        ),
        (
            ProxyError::UnknownService {
                service: service.clone(),
            },
            404,
            "unknown_service",
        ),
    ] {
        // As `Proxy::serve` fills it in.
        let mut e = entry("orders", "/", error.to_response().status());
        e.reason = error.kind();
        let v = line(&e);
        assert_eq!(v["status"], status, "{error}");
        assert_eq!(v["reason"], reason, "{error}");
    }
}

#[test]
fn timestamps_are_rfc3339_utc_with_milliseconds() {
    for (ms, text) in [
        (0, "1970-01-01T00:00:00.000Z"),
        (951_782_400_001, "2000-02-29T00:00:00.001Z"),
        (1_767_225_599_999, "2025-12-31T23:59:59.999Z"),
        (4_107_542_400_000, "2100-03-01T00:00:00.000Z"),
    ] {
        assert_eq!(rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)), text);
    }
}

/// A logger whose queue the test reads, holding `capacity` lines.
fn queue(capacity: usize) -> (Arc<Logger>, mpsc::Receiver<Msg>, Registry) {
    let registry = Registry::new();
    let (queue, lines) = mpsc::sync_channel(capacity);
    let logger = Arc::new(Logger {
        queue,
        dropped: registry.counter(DROPPED, &[]),
        unrouted: "_unrouted".into(),
        listener: "_listener".into(),
    });
    (logger, lines, registry)
}

fn received(lines: &mpsc::Receiver<Msg>) -> Vec<Entry> {
    lines
        .try_iter()
        .filter_map(|m| match m {
            Msg::Line(e) => Some(e),
            Msg::Stop => None,
        })
        .collect()
}

#[tokio::test]
async fn a_body_logs_its_request_once_when_read_whole() {
    let (logger, lines, _) = queue(8);
    let start = tokio::time::Instant::now();
    let response = http::Response::builder()
        .header(CONTENT_TYPE, "text/plain")
        .body(ProxyBody::full("hello"))
        .unwrap();
    let response = logger.wrap(response, entry("orders", "/", StatusCode::OK), start);
    assert!(received(&lines).is_empty(), "nothing before the body ends");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
    let logged = received(&lines);
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].bytes_out, 5);
    assert!(logged[0].at > UNIX_EPOCH);
}

#[test]
fn a_body_dropped_unread_logs_its_request_once() {
    let (logger, lines, _) = queue(8);
    let start = tokio::time::Instant::now();
    let response = http::Response::new(ProxyBody::full("hello"));
    drop(logger.wrap(response, entry("orders", "/", StatusCode::OK), start));
    let logged = received(&lines);
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].bytes_out, 0);
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let (logger, lines, registry) = queue(2);
    for _ in 0..5 {
        logger.send(entry("orders", "/", StatusCode::OK));
    }
    assert_eq!(received(&lines).len(), 2);
    let metrics = registry.render();
    assert!(
        metrics.contains("mesh_proxy_access_log_dropped_total 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn close_writes_and_flushes_everything_queued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = AccessLog::open(&path, "node-1", &Registry::new()).unwrap();
    let logger = log.logger();
    for i in 0..100 {
        logger.send(entry("orders", &format!("/{i}"), StatusCode::OK));
    }
    log.close().await;
    let text = std::fs::read_to_string(&path).unwrap();
    let paths: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["path"].to_string())
        .collect();
    let expected: Vec<String> = (0..100).map(|i| format!("\"/{i}\"")).collect();
    assert_eq!(paths, expected);
    let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
    assert_eq!(mode & !0o640, 0, "at most 0640: {mode:o}");
}

#[test]
fn a_path_that_cannot_be_opened_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("access.log");
    let e = AccessLog::open(&path, "node-1", &Registry::new()).unwrap_err();
    assert!(e.to_string().starts_with("access_log "), "{e}");
}
