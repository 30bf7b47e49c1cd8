//! The bridges' gRPC in a mesh with identities: each bridge listens on its
//! node's address (so the monitor on another node reaches it), takes
//! plaintext from its own host only and mutual TLS from everyone else, and
//! decides per method from the verified identity.
//!
//! - mesh-monitor on n1, with n1's TLS folder, registers itself, gets the
//!   `svc/mesh-monitor` identity from n1's bridge, and writes its check on
//!   an instance of n2 through n2's bridge over mTLS;
//! - from n1's namespace, straight at n2's bridge: plaintext gets no
//!   answer; a certificate for n2's own identity from another CA is
//!   refused at the handshake; n1's node certificate (what n1's proxy
//!   holds) may neither watch n2's routes, config and intentions nor write
//!   a check, and the monitor's identity may write checks but not watch;
//!   every refusal is PERMISSION_DENIED naming the method and the caller,
//!   and the forged check never reaches Consul;
//! - n2's own node certificate (the control case) watches and gets its
//!   node's updates;
//! - mesh-control (`grpc_tls`) publishes an https URL, and the bridges got
//!   their certificates over TLS; from n2, plaintext gets no answer, TLS
//!   without a certificate or token is unauthenticated, n2's node
//!   certificate renews n2's own identity without the token and is refused
//!   n1's;
//! - the monitor's gRPC port, with the same folder, answers mesh-control
//!   over mTLS (`monitor_addr = https://...`, mesh-control's own identity):
//!   its alerts reach mesh-control's REST API; n2's node certificate gets
//!   PERMISSION_DENIED, plaintext from n2 no answer; mesh-control
//!   (`deployer_mtls`) registers an instance on n2 through n2's bridge
//!   over mTLS.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_e2e::{
    Mesh, MeshOptions, Node,
    control::{CONTROL_GRPC, CONVERGE, call, start_replica_on},
    deployer::grpc_channel,
    eventually,
    forge::{self, ClientCert},
    mesh::{IDENTITY_TOKEN, TRUST_DOMAIN},
    monitor::{
        MONITOR_GRPC, MonitorOptions, metric_sum, monitor_check, monitor_metrics,
        start_monitor_with,
    },
    node::BRIDGE_GRPC_PORT,
};
use mesh_proto::v1::{
    ListAlertsRequest, RouteUpdate, SetCheckRequest, SignRequest, WatchRequest,
    checks_client::ChecksClient, discovery_client::DiscoveryClient,
    identity_client::IdentityClient, monitor_client::MonitorClient,
};
use mesh_runtime::pki::{Ca, LocalKey, SpiffeId, TrustDomain};
use tonic::{Code, Status, transport::Channel};

/// The service the monitor probes, on n2.
const SERVICE: &str = "backend";
/// Its instance.
const INSTANCE: &str = "backend-1";
/// The output a forged check would carry.
const FORGED: &str = "forged by n1's node";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridges_answer_the_monitor_and_their_own_node_only() {
    let opts = MeshOptions {
        reachable_bridges: true,
        ..MeshOptions::nodes(2)
    }
    .with_mtls(None);
    let mut mesh = Mesh::start(opts).await.unwrap();
    the_monitor_writes_checks_over_mtls(&mut mesh)
        .await
        .unwrap();
    other_callers_are_refused(&mesh).await.unwrap();
    mesh_control_speaks_tls_to_other_hosts(&mesh).await.unwrap();
    the_monitor_answers_mesh_control_only(&mut mesh)
        .await
        .unwrap();
    mesh.finish();
}

/// The monitor on n1 gets its identity and writes its check on n2's
/// instance through n2's bridge.
async fn the_monitor_writes_checks_over_mtls(mesh: &mut Mesh) -> Result<()> {
    mesh.nodes[1].serve(SERVICE, INSTANCE).await?;
    let opts = MonitorOptions {
        services: vec![SERVICE.into()],
        consul_checks: true,
        args: vec![
            "--tls-dir".into(),
            mesh.nodes[0].tls_dir().display().to_string(),
            "--trust-domain".into(),
            TRUST_DOMAIN.into(),
        ],
        ..MonitorOptions::default()
    };
    start_monitor_with(mesh, 0, &opts).await?;
    let n1 = &mesh.nodes[0];
    eventually(
        "n1's bridge issued the monitor its identity",
        CONVERGE,
        || async { monitor_cert(n1).map(drop) },
    )
    .await?;
    let status = eventually(
        "the monitor's check on backend-1 is in Consul",
        CONVERGE,
        || async {
            match monitor_check(mesh, SERVICE, INSTANCE).await? {
                Some((status, _)) => Ok(status),
                None => bail!("no mesh-monitor check on {INSTANCE} yet"),
            }
        },
    )
    .await?;
    // Counted once the bridge's answer is back, just after Consul has it.
    let written = eventually("the monitor counts its check write", CONVERGE, || async {
        let metrics = monitor_metrics(n1).await?;
        let written = metric_sum(
            &metrics,
            "mesh_monitor_check_writes_total",
            &[r#"result="ok""#],
        );
        ensure!(written >= 1.0, "the monitor counts {written} check writes");
        Ok(written)
    })
    .await?;
    println!("the monitor's check on {INSTANCE}: {status} ({written} writes)");
    Ok(())
}

/// Callers straight at n2's bridge from n1's namespace.
async fn other_callers_are_refused(mesh: &Mesh) -> Result<()> {
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    let bridge = SocketAddr::from((n2.ip(), BRIDGE_GRPC_PORT));

    // Plaintext from another host: closed before any gRPC answer.
    let outcome = match grpc_channel(&n1.ns, bridge).await {
        Ok(channel) => ChecksClient::new(channel)
            .set_check(forged_check())
            .await
            .map(drop)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
        Err(e) => Err(format!("{e:#}")),
    };
    match &outcome {
        Ok(()) => bail!("n2's bridge took a check in plaintext from n1"),
        Err(e) => ensure!(
            !e.starts_with("PermissionDenied") && !e.starts_with("Unauthenticated"),
            "a plaintext call from another host reached the bridge's services: {e}"
        ),
    }
    println!("plaintext from n1: {outcome:?}");

    // n1's node certificate, as n1's proxy would show it.
    let n1_cert = ClientCert::of_node(n1)?;
    let channel = forge::tls_channel(n1, bridge, Some(&n1_cert)).await?;
    let refused = watch(channel.clone(), &n2.name)
        .await
        .err()
        .context("n1's node watched n2's bridge")?;
    denied(&refused, "Watch", &n1.spiffe_id())?;
    let refused = ChecksClient::new(channel)
        .set_check(forged_check())
        .await
        .err()
        .context("n1's node wrote a check through n2's bridge")?;
    denied(&refused, "SetCheck", &n1.spiffe_id())?;
    println!("n1's node: {}", refused.message());

    // The monitor's identity writes checks, and that is all.
    let monitor = ClientCert {
        cert_pem: std::fs::read_to_string(monitor_cert(n1)?)?,
        key_pem: std::fs::read_to_string(n1.tls_dir().join("svc/mesh-monitor.key"))?,
    };
    let channel = forge::tls_channel(n1, bridge, Some(&monitor)).await?;
    let monitor_id = format!("spiffe://{TRUST_DOMAIN}/svc/mesh-monitor");
    let refused = watch(channel, &n2.name)
        .await
        .err()
        .context("the monitor's identity watched n2's bridge")?;
    denied(&refused, "Watch", &monitor_id)?;

    // n2's identity from another CA: no handshake.
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let other = Ca::self_signed(td.clone(), Duration::from_secs(3600))?;
    let key = LocalKey::generate()?;
    let id = SpiffeId::node(&td, &n2.name)?;
    let foreign = ClientCert {
        cert_pem: other.sign(&key.csr_pem(&id)?, &id, Duration::from_secs(3600))?,
        key_pem: key.to_pem(),
    };
    match forge::tls_channel(n1, bridge, Some(&foreign)).await {
        Err(e) => println!("another CA: {e:#}"),
        Ok(channel) => {
            let refused = watch(channel, &n2.name)
                .await
                .err()
                .context("another CA's certificate watched n2's bridge")?;
            ensure!(
                !matches!(
                    refused.code(),
                    Code::PermissionDenied | Code::Unauthenticated
                ),
                "another CA's certificate got past the handshake: {refused:?}"
            );
            println!("another CA: {refused:?}");
        }
    }

    // The control case: n2's own node certificate watches its bridge.
    let n2_cert = ClientCert::of_node(n2)?;
    let channel = forge::tls_channel(n1, bridge, Some(&n2_cert)).await?;
    let first = watch(channel, &n2.name)
        .await
        .context("n2's node watching")?;
    println!("n2's node: first update {:?}", first.kind);

    // Nothing forged reached Consul.
    let (_, output) = monitor_check(mesh, SERVICE, INSTANCE)
        .await?
        .context("the monitor's check is gone")?;
    ensure!(
        !output.contains(FORGED),
        "a refused caller's check reached Consul: {output}"
    );
    Ok(())
}

/// mesh-control's gRPC port from n2's namespace.
async fn mesh_control_speaks_tls_to_other_hosts(mesh: &Mesh) -> Result<()> {
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    let resp = mesh.consul_get("/v1/catalog/service/mesh-control").await?;
    ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
    let published = resp.json()?[0]["ServiceMeta"]["grpc"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        published.starts_with("https://"),
        "mesh-control publishes {published:?}"
    );
    let control = SocketAddr::from((n1.ip(), CONTROL_GRPC));
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let sign = |node: &str| -> Result<SignRequest> {
        let id = SpiffeId::node(&td, node)?;
        Ok(SignRequest {
            node: node.into(),
            identity: id.to_string(),
            csr_pem: LocalKey::generate()?.csr_pem(&id)?,
        })
    };

    // Plaintext from another host: closed before any answer.
    let outcome = match grpc_channel(&n2.ns, control).await {
        Ok(channel) => IdentityClient::new(channel)
            .sign(sign(&n2.name)?)
            .await
            .map(drop)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
        Err(e) => Err(format!("{e:#}")),
    };
    match &outcome {
        Ok(()) => bail!("mesh-control signed over plaintext from n2"),
        Err(e) => ensure!(
            !e.starts_with("PermissionDenied") && !e.starts_with("Unauthenticated"),
            "a plaintext call from another host reached mesh-control's services: {e}"
        ),
    }
    println!("plaintext from n2 to mesh-control: {outcome:?}");

    // TLS without a certificate and without the token.
    let channel = forge::tls_channel(n2, control, None).await?;
    let refused = IdentityClient::new(channel)
        .sign(sign(&n2.name)?)
        .await
        .err()
        .context("mesh-control signed without a token or certificate")?;
    ensure!(refused.code() == Code::Unauthenticated, "{refused:?}");

    // n2's node certificate: its own node's identity without the token,
    // not n1's.
    let channel = forge::tls_channel(n2, control, Some(&ClientCert::of_node(n2)?)).await?;
    let mut client = IdentityClient::new(channel);
    let issued = client
        .sign(sign(&n2.name)?)
        .await
        .context("n2 renewing with its node certificate")?
        .into_inner();
    ensure!(issued.cert_pem.contains("BEGIN CERTIFICATE"), "{issued:?}");
    let refused = client
        .sign(sign(&n1.name)?)
        .await
        .err()
        .context("n2's node certificate got n1's identity")?;
    ensure!(
        refused.code() == Code::PermissionDenied && refused.message().contains(&n1.name),
        "{refused:?}"
    );
    println!("n2's node asking for n1's: {}", refused.message());
    Ok(())
}

/// mesh-control (n1's replica, restarted with the monitor at an https
/// URL) reads the monitor's alerts over mTLS; other callers are refused.
async fn the_monitor_answers_mesh_control_only(mesh: &mut Mesh) -> Result<()> {
    let monitor = SocketAddr::from((mesh.nodes[0].ip(), MONITOR_GRPC));
    let control = mesh.nodes[0]
        .instances
        .get_mut("mesh-control")
        .context("the mesh's CA replica runs on n1")?;
    control.process.stop().await?;
    let url = format!("https://{monitor}");
    let env = [
        ("MESH_IDENTITY_TOKEN", IDENTITY_TOKEN),
        ("MESH_TRUST_DOMAIN", TRUST_DOMAIN),
        ("MESH_MONITOR_ADDR", url.as_str()),
        ("MESH_DEPLOYER_MTLS", "true"),
    ];
    start_replica_on(mesh, 0, Ipv4Addr::UNSPECIFIED, &env).await?;
    let n1 = &mesh.nodes[0];
    let alerts = eventually(
        "mesh-control reads the monitor's alerts over mTLS",
        CONVERGE,
        || async {
            let (status, body) = call(n1, hyper::Method::GET, "/v1/alerts", None).await?;
            ensure!(status == 200, "{status} {body}");
            ensure!(
                body["configured"] == true && body["error"] == "",
                "/v1/alerts: {body}"
            );
            Ok(body)
        },
    )
    .await?;
    println!("mesh-control's /v1/alerts: {alerts}");

    // mesh-control registers on n2 through n2's bridge, over mTLS with its
    // own identity (the bridge takes no plaintext from n1).
    let body = serde_json::json!({"name": "extra", "id": "extra-1",
        "address": mesh.nodes[1].ip().to_string(), "port": 9300});
    let (status, answer) =
        call(n1, hyper::Method::PUT, "/v1/nodes/n2/register", Some(body)).await?;
    ensure!(
        status == 200,
        "register on n2 through mesh-control: {status} {answer}"
    );
    eventually("extra-1 is in Consul's catalog", CONVERGE, || async {
        let resp = mesh.consul_get("/v1/catalog/service/extra").await?;
        ensure!(resp.text().contains("extra-1"), "{}", resp.text());
        Ok(())
    })
    .await?;

    let n2 = &mesh.nodes[1];
    let channel = forge::tls_channel(n2, monitor, Some(&ClientCert::of_node(n2)?)).await?;
    let refused = MonitorClient::new(channel)
        .list_alerts(ListAlertsRequest {})
        .await
        .err()
        .context("n2's node listed the monitor's alerts")?;
    denied(&refused, "ListAlerts", &n2.spiffe_id())?;
    let outcome = match grpc_channel(&n2.ns, monitor).await {
        Ok(channel) => MonitorClient::new(channel)
            .list_alerts(ListAlertsRequest {})
            .await
            .map(drop)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
        Err(e) => Err(format!("{e:#}")),
    };
    match &outcome {
        Ok(()) => bail!("the monitor listed its alerts in plaintext to n2"),
        Err(e) => ensure!(
            !e.starts_with("PermissionDenied") && !e.starts_with("Unauthenticated"),
            "a plaintext call from another host reached the monitor's service: {e}"
        ),
    }
    println!("plaintext from n2 to the monitor: {outcome:?}");
    Ok(())
}

/// The first update of a Discovery stream for `node`'s routes of
/// [`SERVICE`].
async fn watch(channel: Channel, node: &str) -> Result<RouteUpdate, Status> {
    let request = WatchRequest {
        node: node.into(),
        services: vec![SERVICE.into()],
    };
    let mut stream = DiscoveryClient::new(channel)
        .watch(request)
        .await?
        .into_inner();
    match tokio::time::timeout(CONVERGE, stream.message()).await {
        Ok(Ok(Some(update))) => Ok(update),
        Ok(Ok(None)) => Err(Status::unavailable("the stream ended")),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::deadline_exceeded("no update before the deadline")),
    }
}

/// A check a refused caller tries to set on [`INSTANCE`].
fn forged_check() -> SetCheckRequest {
    SetCheckRequest {
        service_id: INSTANCE.into(),
        status: "critical".into(),
        output: FORGED.into(),
        ..SetCheckRequest::default()
    }
}

/// Checks that `status` is PERMISSION_DENIED naming `method` and `peer`.
fn denied(status: &Status, method: &str, peer: &str) -> Result<()> {
    let message = status.message();
    ensure!(
        status.code() == Code::PermissionDenied
            && message.contains(method)
            && message.contains(peer),
        "{method} as {peer}: expected PERMISSION_DENIED naming both, got {:?}: {message}",
        status.code()
    );
    Ok(())
}

/// The monitor's certificate in `node`'s TLS folder, once its bridge wrote it.
fn monitor_cert(node: &Node) -> Result<std::path::PathBuf> {
    let path = node.tls_dir().join("svc/mesh-monitor.crt");
    ensure!(path.exists(), "{} is not there yet", path.display());
    Ok(path)
}
