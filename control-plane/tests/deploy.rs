//! Deployments against a real Consul dev agent: the artifact kept in KV in
//! chunks that read back to its SHA-256, a wrong checksum or a stream cut
//! short leaving no key behind, bad input refused by name, one deployment
//! of a service at a time, a stored version that never changes, abort,
//! and the REST mirror. Where no deployer listens, the node's deployer
//! stays out of reach, which must not fail the deployment; a scripted
//! fake deployer drives a node through a busy deployer, a resumed upload
//! and a failed health gate.

mod support;

use std::{
    collections::VecDeque,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use consul_client::{
    AgentServiceRegistration, Client, ClientConfig, QueryOptions,
    testing::{DevAgent, free_port},
};
use mesh_control_plane::app::ControlPlane;
use mesh_proto::v1::{self as pb, control_client::ControlClient, deployer_server};
use mesh_runtime::metrics::Registry;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tonic::{
    Code, Request, Response, Status,
    transport::{Channel, Server, server::TcpIncoming},
};

const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `attempt` until it succeeds or the deadline passes.
async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > DEADLINE => {
                return Err(e.context(format!("{what}: not true after {DEADLINE:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A replica on free ports whose nodes' deployers do not listen; its
/// tasks stop when it is dropped.
struct Replica {
    plane: Option<ControlPlane>,
    grpc: ControlClient<Channel>,
    http: String,
}

impl Replica {
    async fn start(agent: &DevAgent) -> Self {
        Self::start_with(agent, free_port(), "c1").await
    }

    async fn start_with(agent: &DevAgent, deployer_port: u16, name: &str) -> Self {
        let port = deployer_port.to_string();
        let plane = support::replica(agent, name, &["--deployer-port", &port], Registry::new())
            .await
            .expect("a replica starts on free ports");
        let grpc = ControlClient::connect(format!("http://{}", plane.grpc_addr()))
            .await
            .expect("the replica's gRPC listener is bound");
        Self {
            http: format!("http://{}", plane.http_addr()),
            plane: Some(plane),
            grpc,
        }
    }

    /// Stops it, releasing the leader lock.
    async fn stop(&mut self) {
        if let Some(plane) = self.plane.take() {
            assert!(
                plane.shutdown(Duration::from_secs(10)).await,
                "drained in time"
            );
        }
    }

    /// Streams `start` then `data` in 64 KiB messages.
    async fn deploy(
        &self,
        start: pb::DeployStart,
        data: &[u8],
    ) -> Result<pb::Deployment, tonic::Status> {
        let mut messages = vec![pb::DeployChunk {
            start: Some(start),
            data: Vec::new(),
        }];
        messages.extend(data.chunks(64 << 10).map(|c| pb::DeployChunk {
            start: None,
            data: c.to_vec(),
        }));
        self.grpc
            .clone()
            .deploy(futures::stream::iter(messages))
            .await
            .map(tonic::Response::into_inner)
    }
}

fn consul(agent: &DevAgent) -> Client {
    Client::new(&ClientConfig::new([agent.addr()])).expect("a dev agent address is valid")
}

async fn node_name(c: &Client) -> Result<String> {
    let nodes = c.catalog_nodes(QueryOptions::default()).await?.value;
    Ok(nodes.first().context("the agent's node")?.node.clone())
}

/// Bytes that are not all alike, `len` of them.
fn artifact(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|k| (k as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn start(service: &str, version: &str, node: &str, bytes: &[u8]) -> pb::DeployStart {
    pb::DeployStart {
        service: service.into(),
        version: version.into(),
        file_name: format!("{service}.jar"),
        size: bytes.len() as u64,
        sha256: sha(bytes),
        nodes: vec![node.into()],
        command: "java -jar {artifact} --server.port={port}".into(),
        author: "tester".into(),
        ..pb::DeployStart::default()
    }
}

async fn keys(c: &Client, prefix: &str) -> Result<Vec<String>> {
    Ok(c.kv_keys(prefix, None).await?)
}

async fn marker(c: &Client, service: &str) -> Result<String> {
    let key = format!("mesh/deployment-active/{service}");
    let pair = c.kv_get(&key, QueryOptions::default()).await?.value;
    Ok(pair
        .map(|p| String::from_utf8_lossy(&p.value).into_owned())
        .unwrap_or_default())
}

#[tokio::test]
async fn an_artifact_is_kept_in_chunks_and_one_deployment_of_a_service_runs_at_a_time() -> Result<()>
{
    let agent = DevAgent::start().await;
    let c = consul(&agent);
    let node = node_name(&c).await?;
    let replica = Replica::start(&agent).await;
    let bytes = artifact(600 << 10, 1);

    let d = replica
        .deploy(start("orders", "1.0.0", &node, &bytes), &bytes)
        .await?;
    assert!(d.id > 0);
    assert_eq!(
        (d.service.as_str(), d.version.as_str()),
        ("orders", "1.0.0")
    );
    assert_eq!(d.state, "running");
    assert_eq!(d.sha256, sha(&bytes));
    assert_eq!(d.nodes.len(), 1);
    assert_eq!(d.nodes[0].node, node);
    assert_eq!(marker(&c, "orders").await?, d.id.to_string());

    // Three chunks of at most 256 KiB that read back to the same bytes.
    let meta = c
        .kv_get("mesh/artifacts/orders/1.0.0", QueryOptions::default())
        .await?
        .value
        .context("the artifact's metadata")?;
    let meta: Value = serde_json::from_slice(&meta.value)?;
    assert_eq!(meta["sha256"], sha(&bytes));
    assert_eq!(meta["size"], bytes.len());
    assert_eq!(meta["chunks"], 3);
    assert_eq!(meta["file_name"], "orders.jar");
    let chunk_keys = keys(&c, "mesh/artifacts/orders/1.0.0/chunks/").await?;
    assert_eq!(chunk_keys.len(), 3, "{chunk_keys:?}");
    let mut back = Vec::new();
    for key in &chunk_keys {
        let pair = c.kv_get(key, QueryOptions::default()).await?.value;
        let value = pair.context("a chunk")?.value;
        assert!(value.len() <= 256 << 10);
        back.extend(value);
    }
    assert_eq!(sha(&back), sha(&bytes));

    // A second deployment of the service is refused, naming the first.
    let again = replica
        .deploy(start("orders", "1.0.1", &node, &bytes), &bytes)
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    assert!(
        again.message().contains(&format!("deployment {}", d.id)),
        "{}",
        again.message()
    );
    assert!(keys(&c, "mesh/artifacts/orders/1.0.1").await?.is_empty());

    // The deployer is out of reach: the node waits, it does not fail.
    let id = d.id;
    let waiting = eventually("the node waits for its deployer", || {
        let mut grpc = replica.grpc.clone();
        async move {
            let d = grpc
                .get_deployment(pb::GetDeploymentRequest {
                    id,
                    service: String::new(),
                })
                .await?
                .into_inner();
            if d.nodes[0].state != "uploading" || !d.nodes[0].detail.contains("waiting") {
                bail!("node: {:?}", d.nodes[0]);
            }
            Ok(d)
        }
    })
    .await?;
    assert_eq!(waiting.state, "running");
    assert_eq!(waiting.driver, "c1");

    // Abort: the deployment ends and the service is free again.
    let aborted = replica
        .grpc
        .clone()
        .abort_deployment(pb::AbortDeploymentRequest {
            id,
            author: "tester".into(),
        })
        .await?
        .into_inner();
    assert_eq!(aborted.state, "aborted");
    assert_eq!(aborted.reason, "aborted by tester");
    eventually("the marker is cleared", || async {
        let m = marker(&c, "orders").await?;
        if !m.is_empty() {
            bail!("marker {m:?}");
        }
        Ok(())
    })
    .await?;

    // The same version and bytes need no bytes; other bytes are refused.
    let same = replica
        .deploy(start("orders", "1.0.0", &node, &bytes), &[])
        .await?;
    assert!(same.id > id);
    replica
        .grpc
        .clone()
        .abort_deployment(pb::AbortDeploymentRequest {
            id: same.id,
            author: "tester".into(),
        })
        .await?;
    eventually("the marker is cleared again", || async {
        let m = marker(&c, "orders").await?;
        if !m.is_empty() {
            bail!("marker {m:?}");
        }
        Ok(())
    })
    .await?;
    let other = artifact(1000, 2);
    let changed = replica
        .deploy(start("orders", "1.0.0", &node, &other), &other)
        .await
        .unwrap_err();
    assert_eq!(changed.code(), Code::FailedPrecondition, "{changed:?}");
    assert!(
        changed.message().contains("stored already"),
        "{}",
        changed.message()
    );

    // The REST mirror lists them, newest first.
    let list: Value = reqwest::get(format!("{}/v1/deployments?service=orders", replica.http))
        .await?
        .json()
        .await?;
    let ids: Vec<u64> = list
        .as_array()
        .context("a list")?
        .iter()
        .filter_map(|d| d["id"].as_u64())
        .collect();
    assert_eq!(ids, [same.id, id]);
    let one: Value = reqwest::get(format!("{}/v1/deployments/{id}", replica.http))
        .await?
        .json()
        .await?;
    assert_eq!(one["state"], "aborted");
    let missing = reqwest::get(format!("{}/v1/deployments/9999", replica.http)).await?;
    assert_eq!(missing.status(), 404);
    let nodes: Value = reqwest::get(format!("{}/v1/deployers", replica.http))
        .await?
        .json()
        .await?;
    let first = &nodes.as_array().context("a list")?[0];
    assert_eq!(first["node"], node);
    assert!(
        !first["error"].as_str().unwrap_or_default().is_empty(),
        "{first}"
    );
    Ok(())
}

#[tokio::test]
async fn a_wrong_checksum_or_a_cut_stream_leaves_nothing_and_bad_input_is_named() -> Result<()> {
    let agent = DevAgent::start().await;
    let c = consul(&agent);
    let node = node_name(&c).await?;
    let replica = Replica::start(&agent).await;
    let bytes = artifact(300 << 10, 3);

    let mut wrong = start("users", "2.0", &node, &bytes);
    wrong.sha256 = "0".repeat(64);
    let e = replica.deploy(wrong, &bytes).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("SHA-256"), "{}", e.message());
    assert!(keys(&c, "mesh/artifacts/users").await?.is_empty());
    assert!(marker(&c, "users").await?.is_empty());

    let e = replica
        .deploy(start("users", "2.0", &node, &bytes), &bytes[..200 << 10])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("cut short"), "{}", e.message());
    assert!(keys(&c, "mesh/artifacts/users").await?.is_empty());
    assert!(keys(&c, "mesh/deployments/").await?.is_empty());

    let mut bad = start("users", "2.0", &node, &bytes);
    bad.sha256 = "xyz".into();
    let e = replica.deploy(bad, &bytes).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("sha256"), "{}", e.message());
    let mut bad = start("users", "2/0", &node, &bytes);
    bad.file_name = "x.jar".into();
    let e = replica.deploy(bad, &bytes).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("version"), "{}", e.message());
    let e = replica
        .deploy(start("users", "2.0", "no-such-node", &bytes), &bytes)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("no-such-node"), "{}", e.message());
    let mut nowhere = start("users", "2.0", &node, &bytes);
    nowhere.nodes.clear();
    let e = replica.deploy(nowhere, &bytes).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("no node runs users"),
        "{}",
        e.message()
    );
    assert!(keys(&c, "mesh/artifacts/").await?.is_empty());
    assert!(keys(&c, "mesh/deployments/").await?.is_empty());
    Ok(())
}

/// What the fake deployer holds and was asked.
#[derive(Default)]
struct FakeState {
    /// The answers of the next Deploy calls (`Ok` when empty).
    script: VecDeque<Status>,
    /// What UploadOffset says, and the bytes it pretends to have kept.
    kept: Vec<u8>,
    /// Stored artifacts.
    stored: Vec<pb::Artifact>,
    /// The instances it "runs".
    instances: Vec<pb::Instance>,
    /// The offset of each upload.
    offsets: Vec<u64>,
    /// Deploy calls.
    deploys: u32,
    /// Whether the next Deploy call never answers.
    hang: bool,
}

/// A deployer that stores uploads (checking their SHA-256), and "runs" a
/// version by registering it in Consul without checks.
#[derive(Clone)]
struct FakeDeployer {
    state: Arc<Mutex<FakeState>>,
    consul: Client,
}

impl FakeDeployer {
    fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self
            .state
            .lock()
            .expect("the fake's lock is never poisoned"))
    }
}

#[tonic::async_trait]
impl deployer_server::Deployer for FakeDeployer {
    async fn upload(
        &self,
        request: Request<tonic::Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadResult>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty"))?;
        let start = first
            .start
            .ok_or_else(|| Status::invalid_argument("start"))?;
        let mut bytes = self.with(|s| {
            s.offsets.push(start.offset);
            s.kept[..start.offset as usize].to_vec()
        });
        bytes.extend(first.data);
        while let Some(chunk) = stream.message().await? {
            bytes.extend(chunk.data);
        }
        if sha(&bytes) != start.sha256 || bytes.len() as u64 != start.size {
            return Err(Status::failed_precondition("checksum mismatch"));
        }
        let artifact = pb::Artifact {
            service: start.service,
            version: start.version,
            file_name: start.file_name,
            size: start.size,
            sha256: start.sha256,
            stored_at: String::new(),
        };
        self.with(|s| s.stored.push(artifact.clone()));
        Ok(Response::new(pb::UploadResult {
            artifact: Some(artifact),
            stored: true,
            pruned: Vec::new(),
        }))
    }

    async fn upload_offset(
        &self,
        _: Request<pb::UploadOffsetRequest>,
    ) -> Result<Response<pb::UploadOffsetResponse>, Status> {
        let offset = self.with(|s| s.kept.len() as u64);
        Ok(Response::new(pb::UploadOffsetResponse { offset }))
    }

    async fn list_artifacts(
        &self,
        _: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let artifacts = self.with(|s| s.stored.clone());
        Ok(Response::new(pb::ListArtifactsResponse { artifacts }))
    }

    async fn deploy(
        &self,
        request: Request<pb::DeployRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let r = request.into_inner();
        let (refused, hang) = self.with(|s| {
            s.deploys += 1;
            (s.script.pop_front(), std::mem::take(&mut s.hang))
        });
        if let Some(refused) = refused {
            return Err(refused);
        }
        if hang {
            std::future::pending::<()>().await;
        }
        let port = free_port();
        let instance = pb::Instance {
            service: r.service.clone(),
            version: r.version.clone(),
            instance_id: format!("{}-{}-{port}", r.service, r.version),
            port: u32::from(port),
            pid: 4242,
            state: "running".into(),
            restarts: 0,
        };
        self.consul
            .agent_service_register(&AgentServiceRegistration {
                id: Some(instance.instance_id.clone()),
                name: r.service.clone(),
                address: Some("127.0.0.1".into()),
                port: Some(port),
                ..Default::default()
            })
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let replaced = self.with(|s| {
            let old = s.instances.drain(..).map(|i| i.instance_id).collect();
            s.instances.push(instance.clone());
            old
        });
        Ok(Response::new(pb::DeployResponse {
            instance: Some(instance),
            replaced,
        }))
    }

    async fn rollback(
        &self,
        _: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let instances = self.with(|s| s.instances.clone());
        Ok(Response::new(pb::StatusResponse { instances }))
    }

    async fn stop(
        &self,
        _: Request<pb::StopRequest>,
    ) -> Result<Response<pb::StopResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn log_tail(
        &self,
        _: Request<pb::LogTailRequest>,
    ) -> Result<Response<pb::LogTailResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn apply_config(
        &self,
        _: Request<pb::ApplyConfigRequest>,
    ) -> Result<Response<pb::ApplyConfigResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

/// Polls deployment `id` until it has ended; returns it.
async fn ended(replica: &Replica, id: u64) -> Result<pb::Deployment> {
    eventually("the deployment ends", || {
        let mut grpc = replica.grpc.clone();
        async move {
            let d = grpc
                .get_deployment(pb::GetDeploymentRequest {
                    id,
                    service: String::new(),
                })
                .await?
                .into_inner();
            if d.state == "running" {
                bail!("{:?}", d.nodes);
            }
            Ok(d)
        }
    })
    .await
}

#[tokio::test]
async fn the_leader_drives_a_node_through_a_busy_deployer_a_resumed_upload_and_a_failed_gate()
-> Result<()> {
    let agent = DevAgent::start().await;
    let c = consul(&agent);
    let node = node_name(&c).await?;
    let (fake, port, server) = fake_deployer(&c).await?;
    let replica = Replica::start_with(&agent, port, "c1").await;

    // v1: the deployer is busy once, then deploys; the soak passes.
    let v1 = artifact(700 << 10, 4);
    fake.with(|s| {
        s.script
            .push_back(Status::aborted("a deploy of svc is under way"))
    });
    let mut first = start("svc", "1.0", &node, &v1);
    first.soak_ms = 500;
    let d = replica.deploy(first, &v1).await?;
    let d = ended(&replica, d.id).await?;
    assert_eq!(d.state, "succeeded", "{d:?}");
    assert_eq!(d.nodes[0].state, "done");
    assert_eq!(d.nodes[0].from_version, "");
    assert!(d.nodes[0].instance_id.starts_with("svc-1.0-"), "{d:?}");
    assert_eq!(d.driver, "c1");
    let texts: Vec<&str> = d.events.iter().map(|e| e.text.as_str()).collect();
    assert!(
        texts.iter().any(|t| t.contains("soaking"))
            && texts.last().is_some_and(|t| t.contains("succeeded")),
        "{texts:?}"
    );
    fake.with(|s| {
        assert_eq!(s.deploys, 2, "deployed again once the deployer was free");
        assert_eq!(s.offsets, [0]);
        assert_eq!(s.stored[0].sha256, sha(&v1));
    });
    assert!(marker(&c, "svc").await?.is_empty());

    // v2: the deployer kept 300 KiB of an earlier upload, so the upload
    // resumes there; its health gate fails and v1 still runs.
    let v2 = artifact(600 << 10, 5);
    fake.with(|s| {
        s.kept = v2[..300 << 10].to_vec();
        s.script.push_back(Status::failed_precondition(
            "svc-2.0-1 failed its health gate: exited with code 3; stderr:\nboom",
        ));
    });
    let d = replica.deploy(start("svc", "2.0", &node, &v2), &v2).await?;
    let d = ended(&replica, d.id).await?;
    assert_eq!(d.state, "halted", "{d:?}");
    let n = &d.nodes[0];
    assert_eq!(
        (n.state.as_str(), n.from_version.as_str()),
        ("rolled-back", "1.0")
    );
    assert!(
        n.detail.contains("health gate") && n.detail.contains("boom"),
        "{n:?}"
    );
    assert!(
        d.reason.contains(&node) && d.reason.contains("health gate"),
        "{}",
        d.reason
    );
    fake.with(|s| {
        assert_eq!(s.offsets, [0, 300 << 10]);
        assert_eq!(s.stored[1].sha256, sha(&v2));
        assert_eq!(s.instances[0].version, "1.0");
    });
    assert!(marker(&c, "svc").await?.is_empty());
    server.abort();
    Ok(())
}

/// The fake deployer on a free port, serving until the task is aborted.
async fn fake_deployer(c: &Client) -> Result<(FakeDeployer, u16, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let fake = FakeDeployer {
        state: Arc::default(),
        consul: c.clone(),
    };
    let service = deployer_server::DeployerServer::new(fake.clone());
    let server = tokio::spawn(async move {
        let _ = Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await;
    });
    Ok((fake, port, server))
}

async fn leads(replica: &Replica) -> Result<()> {
    let status = replica
        .grpc
        .clone()
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner();
    if !status.is_leader {
        bail!("{} leads", status.leader);
    }
    Ok(())
}

#[tokio::test]
async fn a_new_leader_carries_on_a_node_whose_deploy_the_old_one_left_mid_call() -> Result<()> {
    let agent = DevAgent::start().await;
    let c = consul(&agent);
    let node = node_name(&c).await?;
    let (fake, port, server) = fake_deployer(&c).await?;
    let mut first = Replica::start_with(&agent, port, "c1").await;
    eventually("c1 leads", || leads(&first)).await?;
    let second = Replica::start_with(&agent, port, "c2").await;

    fake.with(|s| s.hang = true);
    let bytes = artifact(100 << 10, 6);
    let mut spec = start("svc", "1.0", &node, &bytes);
    spec.soak_ms = 500;
    let d = second.deploy(spec, &bytes).await?;
    let id = d.id;
    eventually("c1 waits on the node's deploy", || async {
        let d = second
            .grpc
            .clone()
            .get_deployment(pb::GetDeploymentRequest {
                id,
                service: String::new(),
            })
            .await?
            .into_inner();
        if d.nodes[0].state != "deploying" || fake.with(|s| s.deploys) != 1 {
            bail!("{:?}", d.nodes[0]);
        }
        Ok(())
    })
    .await?;
    first.stop().await;
    eventually("c2 leads", || leads(&second)).await?;
    let d = ended(&second, id).await?;
    assert_eq!(d.state, "succeeded", "{d:?}");
    assert_eq!(d.driver, "c2");
    assert_eq!(d.nodes[0].state, "done");
    fake.with(|s| {
        assert_eq!(s.deploys, 2, "the new leader deployed again");
        assert_eq!(s.offsets, [0], "and did not upload again");
        assert_eq!(s.instances.len(), 1);
    });
    server.abort();
    Ok(())
}
