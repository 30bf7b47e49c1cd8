//! Mesh identities and mutual TLS between the proxies (mtls mode): the
//! bridges keep each node's certificates, issued by mesh-control's CA;
//! a call to another node's instance travels to that node's proxy's
//! inbound listener over TLS, both sides presenting their identity; the
//! inbound listener refuses whoever speaks cleartext or presents a
//! certificate the mesh would not issue; certificates renewed under load
//! cost no request.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_e2e::{
    Load, LoadOptions, Mesh, MeshOptions, Node,
    control::call,
    eventually,
    forge::{self, ClientCert, Validity, mesh_ca, signed},
    mesh::{INBOUND_PORT, TRUST_DOMAIN},
};
use mesh_runtime::pki::{Ca, CertDetails, LocalKey, SpiffeId, TrustDomain};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a routing change may take to show where nothing is measured.
const CONVERGE: Duration = Duration::from_secs(20);

/// The shortest lifetime mesh-control issues: renewed ~40 s after issue.
const SHORT_TTL: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_another_node_crosses_its_inbound_listener_over_mtls() {
    let opts = MeshOptions::nodes(2).with_mtls(None);
    call_crosses_inbound_listener(opts).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_works_with_least_privilege_consul_tokens() {
    let opts = MeshOptions::nodes(2)
        .with_acl(&[("n1", &["backend"])])
        .with_mtls(None);
    call_crosses_inbound_listener(opts).await.unwrap();
}

/// In a mesh built as `opts`: a call from n2 to a service on n1 is
/// answered, and it arrived at n1's inbound listener over TLS from n2's
/// verified identity.
async fn call_crosses_inbound_listener(opts: MeshOptions) -> Result<()> {
    let mut mesh = Mesh::start(opts).await?;
    mesh.nodes[0].serve("backend", "backend-1").await?;
    allow_calls_to(&mesh.nodes[0], "backend").await?;
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    n2.wait_peer(n1, CONVERGE).await?;
    n2.wait_answers("backend", &["backend-1"], CONVERGE).await?;
    let arrived = r#"mesh_proxy_inbound_requests_total{protocol="h2",code_class="2xx"}"#;
    let before = metric(n1, arrived).await?;
    let mut client = n2.proxy_client();
    for i in 0..20 {
        let resp = client.get(&format!("/backend/m?i={i}")).await?;
        ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
        ensure!(resp.header("x-instance") == Some("backend-1"));
    }
    let through = metric(n1, arrived).await? - before;
    ensure!(
        through >= 20.0,
        "{through} of 20 calls arrived at n1's inbound listener"
    );
    // n1's inbound access log names n2's verified identity on each of
    // them: n2 has no service of its own, so it speaks for its node.
    let lines = eventually(
        "n1's access log has the 20 calls from n2",
        CONVERGE,
        || async {
            let lines: Vec<serde_json::Value> = n1
                .access_log()?
                .into_iter()
                .filter(|l| l["direction"] == "inbound" && l["path"] == "/m")
                .collect();
            ensure!(lines.len() >= 20, "{} inbound lines for /m", lines.len());
            Ok(lines)
        },
    )
    .await?;
    for line in &lines {
        ensure!(
            line["status"] == 200 && line["peer"] == n2.spiffe_id().as_str(),
            "{line}"
        );
    }
    // Both proxies present their node's certificate from the mesh CA.
    for node in [n1, n2] {
        let ids = node.tls_identities().await?;
        ensure!(
            ids.first().is_some_and(|(id, _)| *id == node.spiffe_id()),
            "{}: {ids:?}",
            node.name
        );
    }
    println!(
        "n2 -> n1 over mTLS: {through} requests; n1 logged {}",
        lines[0]
    );
    mesh.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_listener_refuses_plaintext_and_certificates_the_mesh_would_not_issue() {
    let mut mesh = Mesh::start(MeshOptions::nodes(2).with_mtls(None))
        .await
        .unwrap();
    mesh.nodes[0].serve("backend", "backend-1").await.unwrap();
    allow_calls_to(&mesh.nodes[0], "backend").await.unwrap();
    let ca = mesh_ca(&mesh).await.unwrap();
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    let n2_id = n2.spiffe_id();
    let td = TrustDomain::new(TRUST_DOMAIN).unwrap();

    // The control: a certificate as the mesh issues them gets an answer,
    // so the refusals below are the listener's doing, not the client's.
    let good = signed(&ca, &[&n2_id], Validity::Now).unwrap();
    eventually(
        "n1's inbound listener serves a certificate the mesh CA issued",
        CONVERGE,
        || async {
            let answer = exchange(n2, n1, Some(&good)).await?;
            ensure!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            Ok(())
        },
    )
    .await
    .unwrap();

    let other_ca = Ca::self_signed(td.clone(), Duration::from_secs(3600)).unwrap();
    let key = LocalKey::generate().unwrap();
    let id = SpiffeId::node(&td, "n2").unwrap();
    let cert = other_ca
        .sign(&key.csr_pem(&id).unwrap(), &id, Duration::from_secs(3600))
        .unwrap();
    let foreign = ClientCert {
        cert_pem: cert,
        key_pem: key.to_pem(),
    };
    let svc = format!("spiffe://{TRUST_DOMAIN}/svc/backend");
    let cases = [
        ("plaintext", None),
        ("untrusted", Some(foreign)),
        (
            "identity",
            Some(signed(&ca, &[&n2_id, &svc], Validity::Now).unwrap()),
        ),
        (
            "expired",
            Some(signed(&ca, &[&n2_id], Validity::Expired).unwrap()),
        ),
    ];
    for (reason, cert) in cases {
        let series = format!(r#"mesh_proxy_inbound_tls_failures_total{{reason="{reason}"}}"#);
        let before = metric(n1, &series).await.unwrap();
        let answer = match &cert {
            None => plaintext_exchange(n2, n1).await,
            Some(cert) => exchange(n2, n1, Some(cert)).await,
        };
        if let Ok(answer) = &answer {
            assert!(
                !answer.contains("HTTP/"),
                "{reason}: n1's inbound listener answered {answer:?}"
            );
        }
        eventually(
            &format!("n1 counts the {reason} connection"),
            CONVERGE,
            || async {
                let now = metric(n1, &series).await?;
                ensure!(now == before + 1.0, "{series} went {before} -> {now}");
                Ok(())
            },
        )
        .await
        .unwrap();
        println!("{reason}: refused ({answer:?}), counted");
    }
    mesh.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renewed_under_steady_load_cost_no_request() {
    let mut mesh = Mesh::start(MeshOptions::nodes(2).with_mtls(Some(SHORT_TTL)))
        .await
        .unwrap();
    mesh.nodes[0].serve("backend", "backend-1").await.unwrap();
    allow_calls_to(&mesh.nodes[0], "backend").await.unwrap();
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    n2.wait_peer(n1, CONVERGE).await.unwrap();
    n2.wait_answers("backend", &["backend-1"], CONVERGE)
        .await
        .unwrap();
    let first = [
        node_serial(n1).await.unwrap(),
        node_serial(n2).await.unwrap(),
    ];
    let load = Load::start(
        &n2.ns,
        SocketAddr::from(([127, 0, 0, 1], 8888)),
        "/backend/",
        LoadOptions {
            workers: 2,
            interval: Duration::from_millis(20),
            max_duration: Duration::from_secs(90),
            request_timeout: Duration::from_secs(5),
            ..LoadOptions::default()
        },
    );
    // Renewal is due ~40 s after issue; both nodes' certificates must
    // have been replaced, and the proxies must present the new ones.
    let renewed = eventually(
        "both proxies present renewed node certificates",
        Duration::from_secs(70),
        || async {
            let now = [node_serial(n1).await?, node_serial(n2).await?];
            ensure!(
                now[0] != first[0] && now[1] != first[1],
                "serials {first:?} -> {now:?}"
            );
            Ok(now)
        },
    )
    .await
    .unwrap();
    load.wait_more(100, CONVERGE).await.unwrap();
    let report = load.stop().await;
    println!("load across the renewal: {}", report.summary());
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, first: {:?}",
        failures.len(),
        report.total(),
        failures.first()
    );
    assert!(report.total() >= 200, "only {} requests", report.total());
    // A new handshake with n1's inbound listener gets its new certificate.
    let presented = presented_serial(n2, n1).await.unwrap();
    assert_eq!(presented, renewed[0], "n1 presents {presented}");
    let h2 = r#"mesh_proxy_inbound_connections_total{protocol="h2"}"#;
    println!(
        "node serials {first:?} -> {renewed:?}; n1's inbound listener saw {} HTTP/2 \
         connection(s) from n2's proxy in all",
        metric(n1, h2).await.unwrap()
    );
    mesh.finish();
}

/// Stores the intention `* → service`, allow (the mesh denies by
/// default), through the mesh-control replica on `control`.
async fn allow_calls_to(control: &Node, service: &str) -> Result<()> {
    let body = serde_json::json!({ "action": "allow", "description": "e2e mtls" });
    let path = format!("/v1/intentions/*/{service}");
    let (status, answer) = call(control, hyper::Method::PUT, &path, Some(body)).await?;
    ensure!(
        (200..300).contains(&status),
        "PUT {path}: {status} {answer}"
    );
    Ok(())
}

/// A TLS connection from `from`'s namespace to `to`'s inbound listener
/// presenting `cert` (none: no client certificate), as anything on that
/// node could open one. The server's certificate is not checked: the
/// client plays the attacker.
async fn tls_connect(
    from: &Node,
    to: &Node,
    cert: Option<&ClientCert>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = forge::client_config(cert, b"http/1.1")?;
    let tcp = from.ns.connect(inbound(to), Duration::from_secs(5)).await?;
    let name = ServerName::try_from("mesh-proxy")?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(tls)
}

/// One HTTP/1.1 request for `to`'s `backend-1` over TLS presenting
/// `cert`: what came back (an error if the connection failed first).
async fn exchange(from: &Node, to: &Node, cert: Option<&ClientCert>) -> Result<String> {
    let mut tls = tls_connect(from, to, cert).await?;
    read_answer(&mut tls).await
}

/// The same request in cleartext.
async fn plaintext_exchange(from: &Node, to: &Node) -> Result<String> {
    let mut tcp = from.ns.connect(inbound(to), Duration::from_secs(5)).await?;
    read_answer(&mut tcp).await
}

/// Sends the request and reads until the peer closes (bounded).
async fn read_answer<S>(stream: &mut S) -> Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = "GET / HTTP/1.1\r\nhost: backend\r\nx-mesh-endpoint: backend/backend-1\r\n\
                   connection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer))
        .await
        .context("no answer and no close within 15 s")??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The serial of the certificate `to`'s inbound listener presents to a
/// new connection.
async fn presented_serial(from: &Node, to: &Node) -> Result<String> {
    let tls = tls_connect(from, to, None).await?;
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .context("no server certificate")?;
    let details = CertDetails::from_der(&certs[0]).map_err(anyhow::Error::msg)?;
    Ok(details.serial)
}

/// The serial of the node certificate `node`'s proxy presents now.
async fn node_serial(node: &Node) -> Result<String> {
    let ids = node.tls_identities().await?;
    match ids.into_iter().find(|(id, _)| *id == node.spiffe_id()) {
        Some((_, serial)) => Ok(serial),
        None => bail!("{} presents no node identity", node.name),
    }
}

fn inbound(node: &Node) -> SocketAddr {
    SocketAddr::from((node.ip(), INBOUND_PORT))
}

/// One sample of `node`'s proxy's `/metrics` (0 when the series is absent).
async fn metric(node: &Node, series: &str) -> Result<f64> {
    let resp = node.proxy_admin("/metrics").await?;
    ensure!(resp.status == 200, "/metrics: {}", resp.status);
    Ok(resp
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0))
}
