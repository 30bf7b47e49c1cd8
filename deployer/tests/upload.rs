//! The deployer library through its gRPC and admin listeners on port 0:
//! uploads in 64 KiB chunks, a cut upload resumed, refusals, the token.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mesh_deployer::{Args, Deployer};
use mesh_proto::v1::{
    ListArtifactsRequest, UploadChunk, UploadOffsetRequest, UploadResult, UploadStart,
    deployer_client::DeployerClient,
};
use mesh_runtime::metrics::Registry;
use sha2::{Digest, Sha256};
use tonic::{Code, Request, Status, transport::Channel};

const DEADLINE: Duration = Duration::from_secs(5);
const CHUNK: usize = 64 * 1024;
const MAX_SIZE: u64 = 8 << 20;
const TOKEN: &str = "test-token-0123456789";

/// A deployer on a temporary data folder, and a client.
struct Harness {
    deployer: Option<Deployer>,
    client: DeployerClient<Channel>,
    data: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Result<Self> {
        Self::start_with(Args::default()).await
    }

    async fn start_with(args: Args) -> Result<Self> {
        mesh_runtime::install_crypto_provider();
        let data = tempfile::tempdir()?;
        let config = Args {
            node: Some("test-node".into()),
            grpc_listen: Some("127.0.0.1:0".parse()?),
            admin_listen: Some("127.0.0.1:0".parse()?),
            data_dir: Some(data.path().to_owned()),
            max_artifact_size: Some(MAX_SIZE),
            keep_versions: Some(3),
            ..args
        }
        .validate()
        .map_err(anyhow::Error::msg)?;
        let deployer = Deployer::start(&config, Registry::new()).await?;
        let client = DeployerClient::connect(format!("http://{}", deployer.grpc_addr())).await?;
        Ok(Self {
            deployer: Some(deployer),
            client,
            data,
        })
    }

    fn deployer(&self) -> &Deployer {
        self.deployer.as_ref().expect("running until stop")
    }

    async fn upload(&mut self, messages: Vec<UploadChunk>) -> Result<UploadResult, Status> {
        let response = self.client.upload(tokio_stream::iter(messages)).await?;
        Ok(response.into_inner())
    }

    async fn offset(&mut self, version: &str, sha256: &str) -> Result<u64> {
        let request = UploadOffsetRequest {
            service: "orders".into(),
            version: version.into(),
            sha256: sha256.into(),
        };
        Ok(self
            .client
            .upload_offset(request)
            .await?
            .into_inner()
            .offset)
    }

    async fn list(&mut self, service: &str) -> Result<Vec<(String, String)>> {
        let request = ListArtifactsRequest {
            service: service.into(),
        };
        let found = self.client.list_artifacts(request).await?.into_inner();
        Ok(found
            .artifacts
            .into_iter()
            .map(|a| (a.version, a.sha256))
            .collect())
    }

    async fn admin(&self, path: &str) -> Result<(u16, String)> {
        let url = format!("http://{}{path}", self.deployer().admin_addr());
        let response = reqwest::get(url).await?;
        Ok((response.status().as_u16(), response.text().await?))
    }

    async fn stop(mut self) -> Result<()> {
        let deployer = self.deployer.take().context("stopped twice")?;
        ensure!(deployer.shutdown(DEADLINE).await, "shutdown timed out");
        Ok(())
    }
}

/// Deterministic bytes that differ with `seed` (xorshift).
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn start(version: &str, data: &[u8], offset: u64) -> UploadStart {
    UploadStart {
        service: "orders".into(),
        version: version.into(),
        file_name: "orders.jar".into(),
        size: data.len() as u64,
        sha256: sha(data),
        offset,
    }
}

/// `start` alone, then `data[from..]` in 64 KiB chunks.
fn messages(start: UploadStart, data: &[u8]) -> Vec<UploadChunk> {
    let from = usize::try_from(start.offset).expect("small offsets");
    let mut out = vec![UploadChunk {
        start: Some(start),
        data: Vec::new(),
    }];
    out.extend(data[from..].chunks(CHUNK).map(|c| UploadChunk {
        start: None,
        data: c.to_vec(),
    }));
    out
}

#[tokio::test]
async fn uploads_in_chunks_are_stored_listed_and_counted() -> Result<()> {
    let mut h = Harness::start().await?;
    assert_eq!(h.admin("/ready").await?.0, 200);
    let data = payload(3 << 20, 1);

    let result = h.upload(messages(start("2.4.1", &data, 0), &data)).await?;
    assert!(result.stored);
    let artifact = result.artifact.context("an artifact")?;
    assert_eq!(
        (artifact.service.as_str(), artifact.version.as_str()),
        ("orders", "2.4.1")
    );
    assert_eq!(artifact.size, 3 << 20);
    assert_eq!(artifact.sha256, sha(&data));
    assert!(artifact.stored_at.ends_with('Z'), "{}", artifact.stored_at);
    let path = h.data.path().join("artifacts/orders/2.4.1/orders.jar");
    assert_eq!(std::fs::read(path)?, data);
    assert_eq!(h.list("orders").await?, [("2.4.1".to_owned(), sha(&data))]);
    assert_eq!(h.list("").await?.len(), 1);
    assert!(h.list("payments").await?.is_empty());

    // The same artifact again: nothing changes.
    let again = h.upload(messages(start("2.4.1", &data, 0), &data)).await?;
    assert!(!again.stored);
    assert_eq!(again.artifact.context("an artifact")?, artifact);

    let (status, metrics) = h.admin("/metrics").await?;
    assert_eq!(status, 200);
    for line in [
        "mesh_deployer_uploads_total{outcome=\"stored\"} 1",
        "mesh_deployer_uploads_total{outcome=\"unchanged\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let bytes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mesh_deployer_upload_bytes_total "))
        .context("the bytes counter")?
        .parse()?;
    assert!(bytes >= 3 << 20, "{bytes}");
    h.stop().await
}

#[tokio::test]
async fn a_cut_upload_resumes_from_upload_offset() -> Result<()> {
    let mut h = Harness::start().await?;
    let data = payload(2 << 20, 2);
    let (half, sha256) = (1 << 20, sha(&data));

    // Half the bytes, then the stream stalls and the call is dropped.
    let first: Vec<_> = messages(start("1.0.0", &data, 0), &data[..half]);
    let stalled = futures::StreamExt::chain(
        tokio_stream::iter(first),
        futures::stream::pending::<UploadChunk>(),
    );
    let mut client = h.client.clone();
    let call = tokio::spawn(async move { client.upload(stalled).await });
    let started = Instant::now();
    while h.offset("1.0.0", &sha256).await? < half as u64 {
        ensure!(started.elapsed() < DEADLINE, "the first half never arrived");
        tokio::task::yield_now().await;
    }
    call.abort();

    // Resume from what UploadOffset says, once the deployer has noticed
    // the cut (until then the version is busy).
    let started = Instant::now();
    let result = loop {
        let offset = h.offset("1.0.0", &sha256).await?;
        assert_eq!(offset, half as u64);
        match h
            .upload(messages(start("1.0.0", &data, offset), &data))
            .await
        {
            Err(s) if s.code() == Code::Aborted && started.elapsed() < DEADLINE => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => break other?,
        }
    };
    assert!(result.stored);
    let path = h.data.path().join("artifacts/orders/1.0.0/orders.jar");
    assert_eq!(std::fs::read(path)?, data);
    assert_eq!(h.offset("1.0.0", &sha256).await?, 0);

    // A stream that just ends early keeps its bytes too, and says so.
    let other = payload(300_000, 3);
    let e = h
        .upload(messages(start("2.0.0", &other, 0), &other[..200_000]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("200000 of 300000 bytes"), "{e:?}");
    assert_eq!(h.offset("2.0.0", &sha(&other)).await?, 200_000);
    // A wrong offset names the right one.
    let e = h
        .upload(messages(start("2.0.0", &other, 1000), &other))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("resume from offset 200000"), "{e:?}");
    h.stop().await
}

#[tokio::test]
async fn bad_uploads_store_nothing_and_say_why() -> Result<()> {
    let mut h = Harness::start().await?;
    let data = payload(500_000, 4);

    let mut wrong = start("1.0.0", &data, 0);
    wrong.sha256 = sha(b"other bytes");
    let e = h.upload(messages(wrong, &data)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&sha(&data)), "{e:?}");
    assert!(e.message().contains(&sha(b"other bytes")), "{e:?}");

    let mut too_big = start("1.0.0", &data, 0);
    too_big.size = MAX_SIZE + 1;
    let e = h.upload(messages(too_big, &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = h
        .upload(messages(start("1.0.0", &data[..1000], 0), &data))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    let mut bad = start("1.0.0", &data, 0);
    bad.service = "orders/../x".into();
    let e = h.upload(messages(bad, &data)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("service: "), "{e:?}");
    let no_start = vec![UploadChunk {
        start: None,
        data: vec![1],
    }];
    let e = h.upload(no_start).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(h.list("").await?.is_empty());
    assert!(
        std::fs::read_dir(h.data.path().join("uploads"))?
            .next()
            .is_none()
    );

    // A stored version never changes.
    h.upload(messages(start("1.0.0", &data, 0), &data)).await?;
    let other = payload(500_000, 5);
    let e = h
        .upload(messages(start("1.0.0", &other, 0), &other))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("versions are immutable"), "{e:?}");
    h.stop().await
}

#[tokio::test]
async fn storing_a_version_prunes_the_oldest() -> Result<()> {
    let mut h = Harness::start().await?;
    let mut pruned = Vec::new();
    for (i, version) in ["1", "2", "3", "4"].iter().enumerate() {
        let data = payload(1000, 10 + i as u64);
        let result = h.upload(messages(start(version, &data, 0), &data)).await?;
        pruned.extend(result.pruned);
    }
    assert_eq!(pruned, ["1"]);
    let versions: Vec<_> = h.list("orders").await?.into_iter().map(|v| v.0).collect();
    assert_eq!(versions, ["4", "3", "2"]);
    h.stop().await
}

#[tokio::test]
async fn a_token_guards_every_call() -> Result<()> {
    let remote = Args {
        grpc_listen: Some("0.0.0.0:8894".parse()?),
        ..Args::default()
    };
    let e = remote.validate().unwrap_err();
    assert!(e.starts_with("grpc_listen: 0.0.0.0:8894 "), "{e}");
    let e = Args {
        grpc_listen: Some("0.0.0.0:8894".parse()?),
        allow_remote: Some(true),
        ..Args::default()
    }
    .validate()
    .unwrap_err();
    assert!(e.starts_with("grpc_listen: "), "{e}");

    let mut h = Harness::start_with(Args {
        token: Some(TOKEN.into()),
        ..Args::default()
    })
    .await?;
    let data = payload(1000, 6);
    for header in [None, Some("Bearer wrong-token-0123456789"), Some(TOKEN)] {
        let mut list = Request::new(ListArtifactsRequest::default());
        let mut upload = Request::new(tokio_stream::iter(messages(start("1", &data, 0), &data)));
        if let Some(value) = header {
            list.metadata_mut().insert("authorization", value.parse()?);
            upload
                .metadata_mut()
                .insert("authorization", value.parse()?);
        }
        let e = h.client.list_artifacts(list).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{header:?}: {e:?}");
        let e = h.client.upload(upload).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{header:?}: {e:?}");
    }
    let bearer = format!("Bearer {TOKEN}");
    let mut upload = Request::new(tokio_stream::iter(messages(start("1", &data, 0), &data)));
    upload
        .metadata_mut()
        .insert("authorization", bearer.parse()?);
    assert!(h.client.upload(upload).await?.into_inner().stored);
    let mut list = Request::new(ListArtifactsRequest::default());
    list.metadata_mut().insert("authorization", bearer.parse()?);
    assert_eq!(
        h.client
            .list_artifacts(list)
            .await?
            .into_inner()
            .artifacts
            .len(),
        1
    );
    h.stop().await
}
