//! The access log: one JSON line per request the proxy answered (its own
//! errors included), written within a flush interval, whole at shutdown,
//! and to the new file after a rotation (rename, or SIGHUP).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use mesh_proxy::InboundConfig;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    reload::{Binary, write_config},
    support::{FakeBridge, TestProxy, endpoint, eventually, get, service},
};

/// An instance answering the status its path ends with (`/500`), else 200.
struct StatusUpstream {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl StatusUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(
                    http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service_fn(answer)),
                );
            }
        });
        Self { addr, task }
    }
}

impl Drop for StatusUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let status = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = Response::new(Full::new(Bytes::from_static(b"answered")));
    *response.status_mut() = status;
    Ok(response)
}

/// The file's lines, parsed; each must be one JSON object.
fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

fn paths(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["path"].as_str().unwrap().to_owned())
        .collect()
}

/// A bridge with `web` (one instance) and `empty` (none), a proxy logging
/// to `access.log` in `dir`.
async fn start(dir: &Path) -> (StatusUpstream, FakeBridge, TestProxy, PathBuf) {
    let upstream = StatusUpstream::start().await;
    let bridge = FakeBridge::start(vec![
        service("web", vec![endpoint("web-1", upstream.addr)]),
        service("empty", vec![]),
    ])
    .await;
    let log = dir.join("access.log");
    let path = log.clone();
    let proxy = TestProxy::start_with(bridge.addr, &dir.join("data"), move |c| {
        c.access_log = Some(path);
    })
    .await;
    proxy.wait_service("web", 1).await;
    proxy.wait_service("empty", 0).await;
    (upstream, bridge, proxy, log)
}

#[tokio::test]
async fn every_request_is_one_line_with_its_service_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, _bridge, proxy, log) = start(dir.path()).await;
    let mut sent = BTreeMap::<(String, u64), usize>::new();
    // 200s and 500s in turn, so that no streak of failures ejects the
    // only instance.
    for i in 0..6 {
        let (path, status) = if i % 2 == 0 {
            (format!("/web/ok-{i}?token=secret"), 200)
        } else {
            ("/web/500".to_owned(), 500)
        };
        let got = get(proxy.addr, &path, &[]).await.status;
        assert_eq!(u64::from(got.as_u16()), status);
        *sent.entry(("web".into(), status)).or_default() += 1;
    }
    let r = get(proxy.addr, "/empty/x", &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    *sent.entry(("empty".into(), 503)).or_default() += 1;
    let n = 7;

    // Written within the flush interval, without a shutdown.
    let written = eventually("7 lines in the access log", || async {
        let l = lines(&log);
        (l.len() >= n).then_some(l)
    })
    .await;
    assert_eq!(written.len(), n, "{written:#?}");
    proxy.stop().await;
    let written = lines(&log);
    assert_eq!(written.len(), n, "no line twice after the shutdown's flush");

    let mut logged = BTreeMap::<(String, u64), usize>::new();
    for l in &written {
        let key = (
            l["service"].as_str().unwrap().to_owned(),
            l["status"].as_u64().unwrap(),
        );
        *logged.entry(key).or_default() += 1;
        assert_eq!(l["node"], "test-node");
        assert_eq!(l["direction"], "outbound");
        assert_eq!(l["method"], "GET");
        assert!(l["ts"].as_str().unwrap().ends_with('Z'), "{l}");
        assert!(l["duration_ms"].as_f64().unwrap() >= 0.0, "{l}");
        assert_eq!(l["retries"], 0);
    }
    assert_eq!(logged, sent);
    let ok = &written[0];
    assert_eq!(ok["path"], "/web/ok-0", "no query string: {ok}");
    assert_eq!(ok["upstream"], upstream.addr.to_string());
    assert_eq!(ok["bytes_out"], "answered".len());
    assert_eq!(ok["reason"], "");
    let failed = written.iter().find(|l| l["status"] == 500).unwrap();
    assert_eq!(failed["reason"], "", "the instance's 500 is no proxy error");
    let empty = written.iter().find(|l| l["service"] == "empty").unwrap();
    assert_eq!(empty["reason"], "no_healthy_instance");
    assert_eq!(empty["upstream"], "");
}

#[tokio::test]
async fn after_a_rename_lines_go_to_a_new_file_none_lost_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (_upstream, _bridge, proxy, log) = start(dir.path()).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let path = format!("/web/before-{i}");
        assert_eq!(get(proxy.addr, &path, &[]).await.status, StatusCode::OK);
        sent.push(path);
    }
    eventually("5 lines in the access log", || async {
        (lines(&log).len() == 5).then_some(())
    })
    .await;

    // logrotate without `copytruncate`, and no signal.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let mut k = 0;
    eventually("a line in a new access.log", || {
        let path = format!("/web/during-{k}");
        k += 1;
        sent.push(path.clone());
        let (addr, log) = (proxy.addr, log.clone());
        async move {
            assert_eq!(get(addr, &path, &[]).await.status, StatusCode::OK);
            (!lines(&log).is_empty()).then_some(())
        }
    })
    .await;
    let mut after = Vec::new();
    for i in 0..5 {
        let path = format!("/web/after-{i}");
        assert_eq!(get(proxy.addr, &path, &[]).await.status, StatusCode::OK);
        after.push(path);
    }
    proxy.stop().await;

    let new = paths(&lines(&log));
    for path in &after {
        assert!(new.contains(path), "{path} in the new file: {new:?}");
    }
    let old = paths(&lines(&rotated));
    assert!(old.starts_with(&sent[..5]), "{old:?}");
    let mut all: Vec<String> = old.into_iter().chain(new).collect();
    sent.extend(after);
    all.sort();
    sent.sort();
    assert_eq!(all, sent, "every request once, across both files");
}

#[tokio::test]
async fn sighup_reopens_the_access_log() {
    let upstream = StatusUpstream::start().await;
    let bridge =
        FakeBridge::start(vec![service("web", vec![endpoint("web-1", upstream.addr)])]).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = (dir.path().join("proxy.toml"), dir.path().join("data"));
    let log = dir.path().join("access.log");
    let extra = format!("access_log = \"{}\"", log.display());
    write_config(&config, bridge.addr, &data, &extra);
    let proxy = Binary::start(&config);
    let started = proxy.wait_line("mesh-proxy started", 1).await;
    let addr: SocketAddr = started["outbound"].as_str().unwrap().parse().unwrap();
    eventually("the route is live", || async {
        (get(addr, "/web/ready", &[]).await.status == StatusCode::OK).then_some(())
    })
    .await;

    // logrotate: rename, then `postrotate kill -HUP`.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    proxy.signal(Signal::SIGHUP);
    // The writer may also have seen the rename on its own first.
    eventually("the access log reopened on SIGHUP", || async {
        let reopened = proxy.lines("access log reopened");
        reopened
            .iter()
            .any(|l| l["why"] == "reopen asked")
            .then_some(())
    })
    .await;
    assert_eq!(get(addr, "/web/after", &[]).await.status, StatusCode::OK);
    let new = eventually("the request in the new file", || async {
        let new = paths(&lines(&log));
        (!new.is_empty()).then_some(new)
    })
    .await;
    assert_eq!(new, ["/web/after"]);
    let old = paths(&lines(&rotated));
    assert!(old.iter().all(|p| p == "/web/ready"), "{old:?}");
    assert!(!old.is_empty(), "the first requests stay in the old file");
}

#[tokio::test]
async fn requests_from_other_nodes_proxies_are_logged_as_inbound() {
    let upstream = StatusUpstream::start().await;
    let mut web = endpoint("web-1", upstream.addr);
    web.node = "node-b".into();
    let bridge = FakeBridge::start(vec![service("web", vec![web.clone()])]).await;
    let dir = tempfile::tempdir().unwrap();
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let b = {
        let log = log_b.clone();
        TestProxy::start_with(bridge.addr, &dir.path().join("b"), move |c| {
            c.node = "node-b".into();
            c.access_log = Some(log);
            c.inbound = Some(InboundConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                address: Some("127.0.0.1".into()),
            });
        })
        .await
    };
    let inbound = b.app().inbound_addr().unwrap();
    let a = {
        let log = log_a.clone();
        TestProxy::start_with(bridge.addr, &dir.path().join("a"), move |c| {
            c.node = "node-a".into();
            c.access_log = Some(log);
        })
        .await
    };
    let mut peer = endpoint("mesh-proxy-node-b", inbound);
    peer.node = "node-b".into();
    bridge.snapshot(vec![
        service("web", vec![web]),
        service("mesh-proxy", vec![peer]),
    ]);
    a.wait_routes("node-b's proxy as a peer", |r| {
        r["peers"]["node-b"]["port"] == inbound.port()
    })
    .await;
    b.wait_service("web", 1).await;

    assert_eq!(get(a.addr, "/web/x", &[]).await.status, StatusCode::OK);
    // Not from a proxy: refused by the inbound listener itself.
    let refused = get(inbound, "/web/x", &[]).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    a.stop().await;
    b.stop().await;

    let a_lines = lines(&log_a);
    assert_eq!(a_lines.len(), 1, "{a_lines:#?}");
    assert_eq!(a_lines[0]["direction"], "outbound");
    assert_eq!(a_lines[0]["node"], "node-a");
    assert_eq!(a_lines[0]["upstream"], upstream.addr.to_string());
    let b_lines = lines(&log_b);
    assert_eq!(b_lines.len(), 2, "{b_lines:#?}");
    let (forwarded, refused) = (&b_lines[0], &b_lines[1]);
    assert_eq!(forwarded["direction"], "inbound");
    assert_eq!(forwarded["node"], "node-b");
    assert_eq!(forwarded["service"], "web");
    assert_eq!(forwarded["status"], 200);
    assert_eq!(forwarded["upstream"], upstream.addr.to_string());
    assert_eq!(refused["direction"], "inbound");
    assert_eq!(refused["status"], 400);
    assert_eq!(refused["reason"], "missing_endpoint");
    assert_eq!(refused["service"], "");
}
