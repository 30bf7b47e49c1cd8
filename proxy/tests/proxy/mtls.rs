//! mtls mode, in one process: proxy A (node-a) calls an instance of
//! node-b through proxy B's inbound listener over mutual TLS, each proxy
//! with the credentials its node's bridge would keep in its `tls_dir`
//! (made here by the mesh CA of `mesh_runtime::pki`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proto::v1 as pb;
use mesh_proxy::{InboundConfig, MeshMode, TlsConfig};
use mesh_runtime::pki::{
    self, Ca, CertDetails, CertResolver, Credentials, LocalKey, SpiffeId, TrustDomain,
};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    client::ResolvesClientCert,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::{client_async, tungstenite::Message};

use crate::support::{
    Behaviour, DEADLINE, FakeBridge, TestProxy, TestUpstream, endpoint, eventually, get, service,
};
use crate::upstreams::{UpgradeReply, UpgradeUpstream};

const DAY: Duration = Duration::from_secs(24 * 3600);
const HOUR: Duration = Duration::from_secs(3600);

pub fn td() -> TrustDomain {
    TrustDomain::new("mesh.test").unwrap()
}

fn svc(name: &str) -> SpiffeId {
    SpiffeId::service(&td(), name).unwrap()
}

fn node(name: &str) -> SpiffeId {
    SpiffeId::node(&td(), name).unwrap()
}

pub fn on(node: &str, mut e: pb::Endpoint) -> pb::Endpoint {
    e.node = node.into();
    e
}

pub fn metric(proxy: &TestProxy, line_start: &str) -> f64 {
    proxy
        .registry
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A key and the CA's certificate for `id` (PEM), as the bridge writes them.
fn issue(ca: &Ca, id: &SpiffeId) -> (String, String) {
    let key = LocalKey::generate().unwrap();
    let cert = ca.sign(&key.csr_pem(id).unwrap(), id, HOUR).unwrap();
    (key.to_pem(), cert)
}

fn serial_of(cert_pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    CertDetails::from_der(&der).unwrap().serial
}

/// Replaces `path` atomically, as the bridge does (a temp file renamed).
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A node's `tls_dir`: the trust bundle, the node's pair, one per service.
pub struct TlsDir {
    dir: tempfile::TempDir,
}

impl TlsDir {
    pub fn new(ca: &Ca, node_name: &str, services: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("svc")).unwrap();
        let this = Self { dir };
        replace(&this.path().join("ca.crt"), ca.cert_pem());
        this.write_node(&issue(ca, &node(node_name)));
        for s in services {
            this.write_service(s, &issue(ca, &svc(s)));
        }
        this
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Key before certificate, as the bridge writes them.
    fn write_node(&self, (key, cert): &(String, String)) {
        replace(&self.path().join("node.key"), key);
        replace(&self.path().join("node.crt"), cert);
    }

    fn write_service(&self, name: &str, (key, cert): &(String, String)) {
        replace(&self.path().join(format!("svc/{name}.key")), key);
        replace(&self.path().join(format!("svc/{name}.crt")), cert);
    }
}

pub async fn mtls_proxy(
    node_name: &'static str,
    bridge: SocketAddr,
    data: &Path,
    tls: &TlsDir,
    access_log: Option<PathBuf>,
) -> TestProxy {
    let dir = tls.path().to_owned();
    TestProxy::start_with(bridge, data, move |c| {
        c.node = node_name.into();
        c.mode = MeshMode::Mtls;
        c.tls = Some(TlsConfig {
            dir,
            trust_domain: None,
        });
        c.inbound = Some(InboundConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            address: Some("127.0.0.1".into()),
        });
        c.access_log = access_log;
    })
    .await
}

/// Callers sending `GET /orders/x` to a proxy in a loop, at most
/// [`SteadyLoad::MAX_REQUESTS`] in all, until stopped.
struct SteadyLoad {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SteadyLoad {
    const MAX_REQUESTS: usize = 20_000;

    /// `callers` callers on `outbound`; returns once it runs.
    async fn start(outbound: SocketAddr, callers: usize) -> Self {
        let (stop, sent, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(Mutex::new(Vec::<String>::new())),
        );
        let tasks = (0..callers)
            .map(|_| {
                let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst)
                        && sent.fetch_add(1, Ordering::SeqCst) < Self::MAX_REQUESTS
                    {
                        let r = get(outbound, "/orders/x", &[]).await;
                        if r.status != StatusCode::OK {
                            failed.lock().unwrap().push(format!(
                                "{}: {}",
                                r.status,
                                String::from_utf8_lossy(&r.body)
                            ));
                        }
                    }
                })
            })
            .collect();
        let load = Self {
            stop,
            sent,
            failed,
            tasks,
        };
        eventually("the load running", || async {
            (load.sent() > 50).then_some(())
        })
        .await;
        load
    }

    /// Requests sent so far.
    fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Stops the callers and asserts that no request failed; how many
    /// were sent.
    async fn stop(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        let sent = self.sent.load(Ordering::SeqCst);
        assert!(
            failed.is_empty(),
            "{} of {sent} requests failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        sent
    }
}

/// Proxies A (node-a, serving `a_services`) and B (node-b) in mtls mode
/// with certificates from one CA, B with an access log, each the other's
/// peer.
pub struct Nodes {
    pub a: TestProxy,
    pub b: TestProxy,
    pub tls_a: TlsDir,
    pub tls_b: TlsDir,
    pub b_log: PathBuf,
    pub dirs: [tempfile::TempDir; 2],
}

impl Nodes {
    /// Starts both on `bridge`, which then sends `routes` and both
    /// proxies' inbound listeners; returns once A knows B as its peer and
    /// B routes to orders' instance.
    pub async fn start(
        ca: &Ca,
        bridge: &FakeBridge,
        a_services: &[&str],
        mut routes: Vec<pb::ServiceEndpoints>,
    ) -> Self {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let (tls_a, tls_b) = (
            TlsDir::new(ca, "node-a", a_services),
            TlsDir::new(ca, "node-b", &["orders"]),
        );
        let b_log = dirs[1].path().join("access.log");
        let b = mtls_proxy(
            "node-b",
            bridge.addr,
            dirs[1].path(),
            &tls_b,
            Some(b_log.clone()),
        )
        .await;
        let a = mtls_proxy("node-a", bridge.addr, dirs[0].path(), &tls_a, None).await;
        let (a_in, b_in) = (
            a.app().inbound_addr().unwrap(),
            b.app().inbound_addr().unwrap(),
        );
        routes.push(service(
            "mesh-proxy",
            vec![
                on("node-a", endpoint("mesh-proxy-node-a", a_in)),
                on("node-b", endpoint("mesh-proxy-node-b", b_in)),
            ],
        ));
        bridge.snapshot(routes);
        a.wait_routes("node-b's proxy as a peer", |r| {
            r["peers"]["node-b"]["port"] == b_in.port()
        })
        .await;
        b.wait_service("orders", 1).await;
        Self {
            a,
            b,
            tls_a,
            tls_b,
            b_log,
            dirs,
        }
    }
}

/// Proxies A (services web and, optionally, billing) and B (orders, with
/// its instance on node-b) in mtls mode, one mesh CA.
struct Mesh {
    ca: Ca,
    bridge: FakeBridge,
    a: TestProxy,
    b: TestProxy,
    tls_a: TlsDir,
    tls_b: TlsDir,
    b_log: PathBuf,
    up: TestUpstream,
    _dirs: [tempfile::TempDir; 2],
}

impl Mesh {
    async fn start(a_services: &[&str], extra: Vec<pb::ServiceEndpoints>) -> Self {
        let ca = Ca::self_signed(td(), DAY).unwrap();
        let up = TestUpstream::start("orders-1", Behaviour::Echo).await;
        let orders = service("orders", vec![on("node-b", endpoint("orders-1", up.addr))]);
        let bridge = FakeBridge::start(vec![orders.clone()]).await;
        // These tests are about the hop, not about who may call whom.
        bridge.set_intentions(1, serde_json::json!({"default": "allow"}));
        let mut routes = vec![orders];
        routes.extend(extra);
        let Nodes {
            a,
            b,
            tls_a,
            tls_b,
            b_log,
            dirs,
        } = Nodes::start(&ca, &bridge, a_services, routes).await;
        Self {
            ca,
            bridge,
            a,
            b,
            tls_a,
            tls_b,
            b_log,
            up,
            _dirs: dirs,
        }
    }

    /// The `peer` of B's inbound access log lines, in order.
    fn b_peers(&self) -> Vec<String> {
        std::fs::read_to_string(&self.b_log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["direction"] == "inbound")
            .map(|l| l["peer"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    async fn wait_b_peers(&self, n: usize) -> Vec<String> {
        eventually(&format!("{n} inbound lines in B's access log"), || async {
            let peers = self.b_peers();
            (peers.len() >= n).then_some(peers)
        })
        .await
    }

    async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
        self.bridge.stop().await;
    }
}

#[tokio::test]
async fn a_request_to_another_node_crosses_its_proxy_over_mtls_as_the_calling_service() {
    let mesh = Mesh::start(&["web"], vec![]).await;
    let r = get(mesh.a.addr, "/orders/x", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.instance(), "orders-1");
    let json = r.json();
    assert_eq!(json["path"], "/x");
    // The only service with credentials on node-a speaks.
    assert_eq!(mesh.wait_b_peers(1).await, vec![svc("web").to_string()]);
    // The hop was TLS: B counted an HTTP/2 connection and no failure.
    assert_eq!(
        metric(
            &mesh.b,
            r#"mesh_proxy_inbound_requests_total{protocol="h2",code_class="2xx"}"#
        ),
        1.0
    );
    assert!(
        !mesh
            .b
            .registry
            .render()
            .lines()
            .any(|l| l.starts_with("mesh_proxy_inbound_tls_failures_total") && !l.ends_with(" 0")),
        "no TLS failure"
    );
    mesh.stop().await;
}

#[tokio::test]
async fn the_source_is_the_service_named_in_x_mesh_source_else_the_node() {
    let mesh = Mesh::start(&["web", "billing"], vec![]).await;
    for (i, (source, want)) in [
        (None, node("node-a")),
        (Some("billing"), svc("billing")),
        (Some("Web"), svc("web")),
        // A service without credentials here cannot be spoken for.
        (Some("orders"), node("node-a")),
    ]
    .into_iter()
    .enumerate()
    {
        let headers: Vec<(&str, &str)> = source.map(|s| ("x-mesh-source", s)).into_iter().collect();
        let r = get(mesh.a.addr, "/orders/x", &headers).await;
        assert_eq!(r.status, StatusCode::OK, "{source:?}: {:?}", r.body);
        // The header stops at the calling proxy.
        assert!(
            r.json()["headers"].get("x-mesh-source").is_none(),
            "{}",
            r.json()
        );
        // One line per request, in order.
        let peers = mesh.wait_b_peers(i + 1).await;
        assert_eq!(peers[i], want.to_string(), "{source:?}");
    }
    // One connection per identity spoken for: node, billing, web.
    mesh.a
        .wait_routes("three connections to node-b", |r| {
            r["peers"]["node-b"]["connections"] == 3
        })
        .await;
    mesh.stop().await;
}

#[tokio::test]
async fn an_instance_on_a_node_without_a_proxy_is_never_called_directly() {
    let stray = TestUpstream::start("stray-1", Behaviour::Echo).await;
    let mesh = Mesh::start(
        &["web"],
        vec![service(
            "stray",
            vec![on("node-c", endpoint("stray-1", stray.addr))],
        )],
    )
    .await;
    mesh.a.wait_service("stray", 1).await;
    let r = get(mesh.a.addr, "/stray/x", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.body);
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert!(body.contains("connect_failed"), "{body}");
    assert_eq!(stray.requests(), 0, "the instance was called directly");
    assert_eq!(stray.connections.load(Ordering::SeqCst), 0);
    mesh.stop().await;
}

#[tokio::test]
async fn a_websocket_crosses_the_mtls_hop_on_a_connection_of_its_own() {
    let ws = UpgradeUpstream::start(UpgradeReply::WebSocket).await;
    let mesh = Mesh::start(
        &["web"],
        vec![service(
            "chat",
            vec![on("node-b", endpoint("chat-1", ws.addr))],
        )],
    )
    .await;
    mesh.a.wait_service("chat", 1).await;
    let stream = TcpStream::connect(mesh.a.addr).await.unwrap();
    let (mut socket, response) =
        tokio::time::timeout(DEADLINE, client_async("ws://chat/ws", stream))
            .await
            .expect("handshake in time")
            .unwrap();
    assert_eq!(response.status(), 101);
    for i in 0..3 {
        socket.send(Message::text(format!("hi {i}"))).await.unwrap();
        let reply = tokio::time::timeout(DEADLINE, socket.next())
            .await
            .expect("echo in time")
            .unwrap()
            .unwrap();
        assert_eq!(reply, Message::text(format!("echo: hi {i}")));
    }
    socket.close(None).await.unwrap();
    assert_eq!(
        metric(
            &mesh.b,
            r#"mesh_proxy_inbound_requests_total{protocol="http1",code_class="1xx"}"#
        ),
        1.0
    );
    assert_eq!(mesh.wait_b_peers(1).await, vec![svc("web").to_string()]);
    mesh.stop().await;
}

// ------------------------------------------------------------ refusals

/// Presents one fixed certificate, whatever it is.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Presents no certificate.
#[derive(Debug)]
struct NoCert;

impl ResolvesClientCert for NoCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// A test client of B's inbound listener presenting `certs`, checking
/// that the server is node-b of `ca`.
fn connector(ca: &Ca, certs: Arc<dyn ResolvesClientCert>) -> TlsConnector {
    let resolver = Arc::new(CertResolver::new(credentials(ca, &svc("web"))));
    let mut config =
        pki::client_config(&ca.trust_bundle().unwrap(), resolver, node("node-b")).unwrap();
    config.client_auth_cert_resolver = certs;
    config.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(config))
}

fn credentials(ca: &Ca, id: &SpiffeId) -> Credentials {
    let key = LocalKey::generate().unwrap();
    let cert = ca.sign(&key.csr_pem(id).unwrap(), id, HOUR).unwrap();
    Credentials::new(&key, &cert, id).unwrap()
}

/// A certificate signed with `ca`'s own key from raw parameters (which
/// `Ca::sign` would never issue): `uris` as URI SANs, valid in `validity`.
fn raw_cert(ca: &Ca, uris: &[&str], validity: (SystemTime, SystemTime)) -> Arc<CertifiedKey> {
    let ca_key = KeyPair::from_pem(&ca.to_stored().key_pem).unwrap();
    let issuer = Issuer::from_ca_cert_pem(ca.cert_pem(), ca_key).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).to_owned().try_into().unwrap()))
        .collect();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = validity.0.into();
    params.not_after = validity.1.into();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Arc::new(
        CertifiedKey::from_der(
            vec![cert.der().clone()],
            key,
            &rustls::crypto::ring::default_provider(),
        )
        .unwrap(),
    )
}

/// An HTTP/2 request for B's instance over TLS with `connector`: its
/// status, or what failed.
async fn call_inbound(addr: SocketAddr, connector: &TlsConnector) -> Result<StatusCode, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("mesh-proxy").unwrap();
    let tls = tokio::time::timeout(DEADLINE, connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get("/x")
        .header("host", "orders")
        .header("x-mesh-endpoint", "orders/orders-1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .map_err(|_| "no answer in time".to_owned())?
        .map_err(|e| format!("request: {e}"))?;
    Ok(response.status())
}

#[tokio::test]
async fn the_inbound_listener_refuses_plaintext_strangers_and_bad_certificates() {
    let mesh = Mesh::start(&["web"], vec![]).await;
    let inbound = mesh.b.app().inbound_addr().unwrap();
    let failures = |reason: &str| {
        metric(
            &mesh.b,
            &format!(r#"mesh_proxy_inbound_tls_failures_total{{reason="{reason}"}}"#),
        )
    };
    // The client may see the refusal before the listener has counted it.
    let counted = |reason: &'static str| {
        eventually(reason, move || async move {
            (failures(reason) == 1.0).then_some(())
        })
    };

    // Cleartext HTTP: closed (or reset, its bytes unread) without an answer.
    let mut tcp = TcpStream::connect(inbound).await.unwrap();
    tcp.write_all(b"GET /x HTTP/1.1\r\nHost: orders\r\nx-mesh-endpoint: orders/orders-1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer))
        .await
        .expect("closed in time");
    assert!(
        answer.is_empty(),
        "a plaintext request got an answer: {:?} ({read:?})",
        String::from_utf8_lossy(&answer)
    );
    counted("plaintext").await;

    // The test client is right: with a certificate of the mesh CA, the
    // instance answers.
    let good = Arc::new(CertResolver::new(credentials(&mesh.ca, &svc("web"))));
    assert_eq!(
        call_inbound(inbound, &connector(&mesh.ca, good)).await,
        Ok(StatusCode::OK)
    );

    // Another CA (same trust domain, same identity).
    let stranger = Ca::self_signed(td(), DAY).unwrap();
    let theirs = Arc::new(CertResolver::new(credentials(&stranger, &svc("web"))));
    let e = call_inbound(inbound, &connector(&mesh.ca, theirs)).await;
    assert!(e.is_err(), "{e:?}");
    counted("untrusted").await;

    // Our CA's key, two URI SANs.
    let now = SystemTime::now();
    let two = raw_cert(
        &mesh.ca,
        &["spiffe://mesh.test/svc/web", "spiffe://mesh.test/svc/admin"],
        (now - HOUR, now + HOUR),
    );
    let e = call_inbound(inbound, &connector(&mesh.ca, Arc::new(Fixed(two)))).await;
    assert!(e.is_err(), "{e:?}");
    counted("identity").await;

    // Our CA's key, expired an hour ago.
    let expired = raw_cert(
        &mesh.ca,
        &["spiffe://mesh.test/svc/web"],
        (now - 2 * HOUR, now - HOUR),
    );
    let e = call_inbound(inbound, &connector(&mesh.ca, Arc::new(Fixed(expired)))).await;
    assert!(e.is_err(), "{e:?}");
    counted("expired").await;

    // No certificate at all.
    let e = call_inbound(inbound, &connector(&mesh.ca, Arc::new(NoCert))).await;
    assert!(e.is_err(), "{e:?}");
    counted("no_certificate").await;

    // Each refusal counted once, under its own reason.
    for reason in [
        "plaintext",
        "untrusted",
        "identity",
        "expired",
        "no_certificate",
    ] {
        assert_eq!(failures(reason), 1.0, "{reason}");
    }
    assert_eq!(failures("handshake"), 0.0);
    // Only the good client's request reached the inbound side's HTTP.
    assert_eq!(
        metric(
            &mesh.b,
            r#"mesh_proxy_inbound_requests_total{protocol="h2",code_class="2xx"}"#
        ),
        1.0
    );
    assert_eq!(mesh.wait_b_peers(1).await, vec![svc("web").to_string()]);
    mesh.stop().await;
}

// ------------------------------------------------------------ rotation

/// A stand-in for node-c's proxy: completes mTLS handshakes as node-c,
/// records the serial of each client certificate, and closes.
struct SerialRecorder {
    addr: SocketAddr,
    serials: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SerialRecorder {
    async fn start(ca: &Ca) -> Self {
        let resolver = Arc::new(CertResolver::new(credentials(ca, &node("node-c"))));
        let mut config = pki::server_config(&ca.trust_bundle().unwrap(), resolver).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serials = Arc::new(Mutex::new(Vec::new()));
        let seen = serials.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if let Ok(tls) = acceptor.accept(tcp).await
                    && let Some(chain) = tls.get_ref().1.peer_certificates()
                {
                    let serial = CertDetails::from_der(&chain[0]).unwrap().serial;
                    seen.lock().unwrap().push(serial);
                }
            }
        });
        Self {
            addr,
            serials,
            task,
        }
    }

    fn last(&self) -> Option<String> {
        self.serials.lock().unwrap().last().cloned()
    }
}

impl Drop for SerialRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The serial of the certificate B's inbound listener presents to a new
/// handshake.
async fn served_serial(addr: SocketAddr, ca: &Ca) -> String {
    let good = Arc::new(CertResolver::new(credentials(ca, &svc("web"))));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("mesh-proxy").unwrap();
    let tls = connector(ca, good).connect(name, tcp).await.unwrap();
    let chain = tls.get_ref().1.peer_certificates().unwrap();
    CertDetails::from_der(&chain[0]).unwrap().serial
}

#[tokio::test]
async fn rotating_certificates_under_steady_load_fails_no_request() {
    let mesh = Mesh::start(&["web"], vec![]).await;
    // node-c's stand-in, as a peer with one instance of `probe`.
    let recorder = SerialRecorder::start(&mesh.ca).await;
    let probe_up = TestUpstream::start("probe-1", Behaviour::Echo).await;
    let (a_in, b_in) = (
        mesh.a.app().inbound_addr().unwrap(),
        mesh.b.app().inbound_addr().unwrap(),
    );
    let orders = service(
        "orders",
        vec![on("node-b", endpoint("orders-1", mesh.up.addr))],
    );
    mesh.bridge.snapshot(vec![
        orders,
        service(
            "probe",
            vec![on("node-c", endpoint("probe-1", probe_up.addr))],
        ),
        service(
            "mesh-proxy",
            vec![
                on("node-a", endpoint("mesh-proxy-node-a", a_in)),
                on("node-b", endpoint("mesh-proxy-node-b", b_in)),
                on("node-c", endpoint("mesh-proxy-node-c", recorder.addr)),
            ],
        ),
    ]);
    mesh.a
        .wait_routes("node-c as a peer", |r| {
            r["peers"]["node-c"]["port"] == recorder.addr.port()
        })
        .await;
    let probe = || async {
        // Fails (node-c's stand-in speaks no HTTP): only its handshake counts.
        let _ = get(mesh.a.addr, "/probe/x", &[]).await;
        recorder.last()
    };
    let web_before = mesh.tls_a.path().join("svc/web.crt");
    let web_before = serial_of(&std::fs::read_to_string(web_before).unwrap());
    assert_eq!(probe().await, Some(web_before.clone()));

    let load = SteadyLoad::start(mesh.a.addr, 4).await;

    // node-a's web: half written (a new key beside the old certificate)
    // first, which must not be used...
    let new_web = issue(&mesh.ca, &svc("web"));
    replace(&mesh.tls_a.path().join("svc/web.key"), &new_web.0);
    let refused = r#"mesh_proxy_tls_reloads_total{outcome="refused"}"#;
    eventually("the half-written pair refused", || async {
        (metric(&mesh.a, refused) >= 1.0).then_some(())
    })
    .await;
    assert_eq!(
        probe().await,
        Some(web_before.clone()),
        "the old certificate stays"
    );
    // ...then whole; and node-b's node certificate too.
    replace(&mesh.tls_a.path().join("svc/web.crt"), &new_web.1);
    let new_b = issue(&mesh.ca, &node("node-b"));
    mesh.tls_b.write_node(&new_b);

    // New handshakes present the new certificates.
    let web_after = serial_of(&new_web.1);
    eventually("node-a presenting web's new certificate", || async {
        (probe().await == Some(web_after.clone())).then_some(())
    })
    .await;
    let b_after = serial_of(&new_b.1);
    eventually("node-b presenting its new certificate", || async {
        (served_serial(b_in, &mesh.ca).await == b_after).then_some(())
    })
    .await;
    // `/routes` shows what node-a presents now.
    let routes = mesh.a.routes().await;
    let web = &routes["tls"]["identities"][1];
    assert_eq!(web["id"], svc("web").to_string(), "{routes}");
    assert_eq!(web["serial"], web_after, "{routes}");
    assert_eq!(
        routes["tls"]["identities"][0]["id"],
        node("node-a").to_string()
    );
    // The load keeps going a moment over the new certificates.
    let at_rotation = load.sent();
    eventually("more requests after the rotation", || async {
        (load.sent() > at_rotation + 50).then_some(())
    })
    .await;
    let sent = load.stop().await;
    assert!(sent > 100);
    mesh.stop().await;
}

#[tokio::test]
async fn a_connection_ends_when_its_peers_certificate_expires_and_no_request_fails() {
    let mesh = Mesh::start(&["web"], vec![]).await;
    // node-a's web gets a certificate that expires in a few seconds before
    // it calls node-b at all: its connection to node-b is made with it.
    let web = svc("web");
    let short_key = LocalKey::generate().unwrap();
    let short = mesh
        .ca
        .sign(
            &short_key.csr_pem(&web).unwrap(),
            &web,
            Duration::from_secs(4),
        )
        .unwrap();
    mesh.tls_a
        .write_service("web", &(short_key.to_pem(), short.clone()));
    let presents = |serial: String| {
        let a = &mesh.a;
        async move {
            let routes = a.routes().await;
            (routes["tls"]["identities"][1]["serial"] == serial.as_str()).then_some(())
        }
    };
    eventually("node-a presenting the short-lived certificate", || {
        presents(serial_of(&short))
    })
    .await;
    let connections = r#"mesh_proxy_inbound_connections_total{protocol="h2"}"#;
    let before = metric(&mesh.b, connections);

    let load = SteadyLoad::start(mesh.a.addr, 2).await;
    assert_eq!(metric(&mesh.b, connections), before + 1.0, "one connection");
    // Renewed before it expires, as the bridge does at two thirds.
    let renewed = issue(&mesh.ca, &web);
    mesh.tls_a.write_service("web", &renewed);
    eventually("node-a presenting the renewed certificate", || {
        presents(serial_of(&renewed.1))
    })
    .await;
    // At the old certificate's end, node-b ends the connection made with
    // it; node-a carries on over a new one, with the renewed certificate.
    eventually("a second connection from node-a", || async {
        (metric(&mesh.b, connections) >= before + 2.0).then_some(())
    })
    .await;
    let at_reconnect = load.sent();
    eventually("more requests over the new connection", || async {
        (load.sent() > at_reconnect + 50).then_some(())
    })
    .await;
    load.stop().await;
    mesh.stop().await;
}
