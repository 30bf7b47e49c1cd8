//! The deployers of a mesh with identities take changes from mesh-control
//! only: two nodes, each with a mesh-deployer authenticating its callers by
//! mutual TLS (the node's certificates, kept by its bridge), and the
//! mesh-control replica on n1 reaching them with its own identity
//! (`deployer_mtls`).
//!
//! - `meshctl deploy` of a jar through mesh-control reaches both deployers
//!   and the service answers by name through a proxy;
//! - a caller on n2 reaching n1's deployer directly gets no answer in
//!   cleartext; PERMISSION_DENIED for Deploy and Upload with a service's
//!   certificate from the mesh CA, naming the method and the identity; the
//!   same for Deploy with n1's own node certificate, whose Status is
//!   answered (reads are the node's too); and is refused at the handshake
//!   with a certificate from another CA.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_e2e::{
    Mesh, MeshOptions, Node,
    control::{CONVERGE, call, meshctl, start_replica_on},
    deployer::{DEPLOYER_GRPC, grpc_channel, start_deployer_mtls},
    eventually,
    forge::{self, ClientCert, Validity, mesh_ca, signed},
    java::{self, Variant},
    mesh::{IDENTITY_TOKEN, TRUST_DOMAIN},
};
use mesh_proto::v1::{
    DeployRequest, ListArtifactsRequest, StatusRequest, UploadChunk, UploadStart,
    deployer_client::DeployerClient,
};
use mesh_runtime::pki::{Ca, LocalKey, SpiffeId, TrustDomain};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, transport::Channel};

/// The service deployed.
const SERVICE: &str = "hello";

/// How long the deployment of two nodes may take.
const DEPLOYMENT: Duration = Duration::from_secs(60);

/// The client preface of HTTP/2 and an empty SETTINGS frame: a server
/// that speaks HTTP/2 answers with its SETTINGS.
const H2_GREETING: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployers_take_changes_from_mesh_control_only() {
    let mut mesh = Mesh::start(MeshOptions::nodes(2).with_mtls(None))
        .await
        .unwrap();
    for k in 0..2 {
        start_deployer_mtls(&mut mesh, k, &[]).await.unwrap();
    }
    // mesh-control again, now reaching the deployers with its identity.
    let control = mesh.nodes[0]
        .instances
        .get_mut("mesh-control")
        .expect("the mesh's CA replica runs on n1");
    control.process.stop().await.unwrap();
    let env = [
        ("MESH_IDENTITY_TOKEN", IDENTITY_TOKEN),
        ("MESH_TRUST_DOMAIN", TRUST_DOMAIN),
        ("MESH_DEPLOYER_MTLS", "true"),
    ];
    start_replica_on(&mut mesh, 0, std::net::Ipv4Addr::UNSPECIFIED, &env)
        .await
        .unwrap();

    deploy_through_control(&mesh).await.unwrap();
    direct_callers_are_refused(&mesh).await.unwrap();
    mesh.finish();
}

/// `meshctl deploy` of a jar to both nodes through mesh-control succeeds,
/// and the service answers by name through n2's proxy.
async fn deploy_through_control(mesh: &Mesh) -> Result<()> {
    let [jar]: [java::Jar; 1] = java::build(&mesh.dir().join("jars"), &[Variant::healthy("v1")])
        .await?
        .try_into()
        .map_err(|_| anyhow::anyhow!("one jar"))?;
    // The mesh denies calls by default.
    let body = serde_json::json!({ "action": "allow", "description": "e2e deployer auth" });
    let path = format!("/v1/intentions/*/{SERVICE}");
    let (status, answer) = call(&mesh.nodes[0], hyper::Method::PUT, &path, Some(body)).await?;
    ensure!(
        (200..300).contains(&status),
        "PUT {path}: {status} {answer}"
    );

    let artifact = jar.path.display().to_string();
    let args = [
        "deploy",
        "--service",
        SERVICE,
        "--artifact",
        &artifact,
        "--version",
        "v1",
        "--nodes",
        "n1,n2",
        "--drain",
        "1s",
        "--soak",
        "1s",
        "--health-timeout",
        "30s",
        "--watch",
    ];
    let (code, out, err) = tokio::time::timeout(DEPLOYMENT, meshctl(&mesh.nodes[0], &args))
        .await
        .context("meshctl deploy took too long")??;
    ensure!(code == 0, "meshctl deploy exited {code}: {out}{err}");
    println!("meshctl deploy: {out}{err}");

    // Each deployer runs the version (asked with the node's own identity,
    // which may read).
    for node in &mesh.nodes {
        let mut client = tls_client(node, node, &ClientCert::of_node(node)?).await?;
        let status = client
            .status(StatusRequest {
                service: SERVICE.into(),
            })
            .await?
            .into_inner();
        ensure!(
            status.instances.len() == 1 && status.instances[0].version == "v1",
            "{}'s deployer runs: {status:?}",
            node.name
        );
    }
    let n2 = &mesh.nodes[1];
    eventually("n2's proxy answers /hello/ from v1", CONVERGE, || async {
        let resp = n2.get(&format!("/{SERVICE}/")).await?;
        ensure!(
            resp.status == 200 && resp.text() == "hello from v1",
            "{} {}",
            resp.status,
            resp.text()
        );
        Ok(())
    })
    .await
}

/// Callers on n2 reaching n1's deployer directly, without mesh-control's
/// identity, change nothing.
async fn direct_callers_are_refused(mesh: &Mesh) -> Result<()> {
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    let n1_id = n1.spiffe_id();
    let control = format!("spiffe://{TRUST_DOMAIN}/svc/mesh-control");

    // Cleartext: the listener speaks TLS only, no HTTP/2 comes back.
    let answer = greeting(n2, n1, None).await;
    // What may come back is a TLS alert record (content type 21), or nothing.
    if let Ok(bytes) = &answer {
        ensure!(
            bytes.first().is_none_or(|b| *b == 21) && !is_h2_settings(bytes),
            "n1's deployer answered in cleartext: {bytes:?}"
        );
    }
    let plain = grpc_channel(&n2.ns, deployer_addr(n1)).await;
    let outcome = match plain {
        Ok(channel) => DeployerClient::new(channel)
            .status(StatusRequest::default())
            .await
            .map(|_| ())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
        Err(e) => Err(format!("{e:#}")),
    };
    match &outcome {
        Ok(()) => bail!("n1's deployer answered Status in cleartext"),
        Err(e) => ensure!(
            !e.starts_with("PermissionDenied") && !e.starts_with("Unauthenticated"),
            "a cleartext call got an answer from the deployer: {e}"
        ),
    }
    println!("cleartext: {answer:?}; gRPC: {outcome:?}");

    // A service's certificate from the mesh CA: a valid identity, but not
    // mesh-control's.
    let ca = mesh_ca(mesh).await?;
    let web = format!("spiffe://{TRUST_DOMAIN}/svc/web");
    let web_cert = signed(&ca, &[&web], Validity::Now)?;
    let mut client = tls_client(n2, n1, &web_cert).await?;
    let refused = client
        .deploy(deploy_request())
        .await
        .err()
        .context("Deploy as svc/web was answered")?;
    denied(&refused, "Deploy", &web, &control)?;
    let refused = client
        .upload(upload_request())
        .await
        .err()
        .context("Upload as svc/web was answered")?;
    denied(&refused, "Upload", &web, &control)?;
    let refused = client
        .status(StatusRequest::default())
        .await
        .err()
        .context("Status as svc/web was answered")?;
    denied(&refused, "Status", &web, &control)?;
    println!("svc/web: {}", refused.message());

    // n1's own node certificate: it may read, not change.
    let own = ClientCert::of_node(n1)?;
    let mut client = tls_client(n2, n1, &own).await?;
    let refused = client
        .deploy(deploy_request())
        .await
        .err()
        .context("Deploy as n1's node was answered")?;
    denied(&refused, "Deploy", &n1_id, &control)?;
    let refused = client
        .upload(upload_request())
        .await
        .err()
        .context("Upload as n1's node was answered")?;
    denied(&refused, "Upload", &n1_id, &control)?;
    println!("n1's node: {}", refused.message());
    let status = client
        .status(StatusRequest {
            service: SERVICE.into(),
        })
        .await
        .context("Status as n1's node")?
        .into_inner();
    ensure!(
        status.instances.len() == 1 && status.instances[0].version == "v1",
        "Status as n1's node: {status:?}"
    );
    // The refused calls changed nothing: n1 keeps v1 only.
    let stored = client
        .list_artifacts(ListArtifactsRequest {
            service: SERVICE.into(),
        })
        .await
        .context("ListArtifacts as n1's node")?
        .into_inner();
    let versions: Vec<&str> = stored
        .artifacts
        .iter()
        .map(|a| a.version.as_str())
        .collect();
    ensure!(versions == ["v1"], "n1 keeps {versions:?}");

    // The control for the next case: n1's node certificate completes the
    // handshake and gets HTTP/2's greeting.
    let bytes = greeting(n2, n1, Some(&own)).await?;
    ensure!(
        is_h2_settings(&bytes),
        "no HTTP/2 SETTINGS with n1's node certificate: {bytes:?}"
    );
    // A certificate for n1's very identity from another CA: refused at the
    // handshake, before any HTTP/2.
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let other = Ca::self_signed(td.clone(), Duration::from_secs(3600))?;
    let key = LocalKey::generate()?;
    let id = SpiffeId::node(&td, &n1.name)?;
    let foreign = ClientCert {
        cert_pem: other.sign(&key.csr_pem(&id)?, &id, Duration::from_secs(3600))?,
        key_pem: key.to_pem(),
    };
    let answer = greeting(n2, n1, Some(&foreign)).await;
    match &answer {
        Ok(bytes) => ensure!(
            bytes.is_empty(),
            "another CA's certificate got an answer: {bytes:?}"
        ),
        Err(e) => println!("another CA: refused ({e:#})"),
    }
    match tls_client(n2, n1, &foreign).await {
        Err(e) => println!("another CA, gRPC: {e:#}"),
        Ok(mut client) => {
            let refused = client
                .status(StatusRequest::default())
                .await
                .err()
                .context("Status with another CA's certificate was answered")?;
            ensure!(
                !matches!(
                    refused.code(),
                    Code::PermissionDenied | Code::Unauthenticated
                ),
                "another CA's certificate got past the handshake: {refused:?}"
            );
            println!("another CA, gRPC: {refused:?}");
        }
    }
    Ok(())
}

/// Checks that `status` is PERMISSION_DENIED naming `method`, the caller
/// `peer` and mesh-control's identity.
fn denied(status: &tonic::Status, method: &str, peer: &str, control: &str) -> Result<()> {
    let message = status.message();
    ensure!(
        status.code() == Code::PermissionDenied
            && message.contains(&format!("{peer} may not call {method}"))
            && message.contains(control),
        "{method} as {peer}: {:?} {message}",
        status.code()
    );
    Ok(())
}

/// A Deploy of a version nobody uploaded (refused before it is looked at).
fn deploy_request() -> DeployRequest {
    DeployRequest {
        service: SERVICE.into(),
        version: "v666".into(),
        command: "java -jar {artifact}".into(),
        ..DeployRequest::default()
    }
}

/// An Upload of a few bytes.
fn upload_request() -> impl tonic::IntoStreamingRequest<Message = UploadChunk> {
    let data = b"not a jar".to_vec();
    let start = UploadStart {
        service: SERVICE.into(),
        version: "v666".into(),
        file_name: "app.jar".into(),
        size: data.len() as u64,
        sha256: java::sha256_hex(&data),
        offset: 0,
    };
    futures::stream::iter([
        UploadChunk {
            start: Some(start),
            data: Vec::new(),
        },
        UploadChunk { start: None, data },
    ])
}

/// Whether `bytes` begin with an HTTP/2 SETTINGS frame (type 4, stream 0).
fn is_h2_settings(bytes: &[u8]) -> bool {
    bytes.len() >= 9 && bytes[3] == 4 && bytes[5..9] == [0, 0, 0, 0]
}

/// `to`'s deployer address.
fn deployer_addr(to: &Node) -> SocketAddr {
    SocketAddr::from((to.ip(), DEPLOYER_GRPC))
}

/// A gRPC client of `to`'s deployer over TLS presenting `cert`, its
/// connections opened in `from`'s namespace.
async fn tls_client(from: &Node, to: &Node, cert: &ClientCert) -> Result<DeployerClient<Channel>> {
    let channel = forge::tls_channel(from, deployer_addr(to), Some(cert)).await?;
    Ok(DeployerClient::new(channel))
}

/// Opens a connection from `from` to `to`'s deployer (TLS presenting
/// `cert`, or cleartext with `None`), sends HTTP/2's greeting and reads
/// what comes back until the first bytes or the close (bounded).
async fn greeting(from: &Node, to: &Node, cert: Option<&ClientCert>) -> Result<Vec<u8>> {
    let tcp = from
        .ns
        .connect(deployer_addr(to), Duration::from_secs(5))
        .await?;
    let mut buf = vec![0; 256];
    let read = match cert {
        None => {
            let mut tcp = tcp;
            tcp.write_all(H2_GREETING).await?;
            tokio::time::timeout(Duration::from_secs(15), tcp.read(&mut buf)).await
        }
        Some(cert) => {
            let mut tls =
                tokio_rustls::TlsConnector::from(forge::client_config(Some(cert), b"h2")?)
                    .connect(ServerName::from(to.ip()), tcp)
                    .await?;
            tls.write_all(H2_GREETING).await?;
            tokio::time::timeout(Duration::from_secs(15), tls.read(&mut buf)).await
        }
    };
    let n = read.context("no answer and no close within 15 s")??;
    buf.truncate(n);
    Ok(buf)
}
