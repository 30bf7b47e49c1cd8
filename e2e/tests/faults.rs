//! Faults between the mesh and one instance, put there by a TCP fault
//! proxy (`mesh_e2e::fault`) registered in the instance's place (issue 3,
//! point 8): a slow instance loses its traffic to latency-aware balancing,
//! and a hung one is ejected while per-try timeouts and retries hide it
//! from callers.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mesh_e2e::{
    Load, LoadOptions, Mesh, MeshOptions, Node,
    fault::{Fault, FaultProxy},
    load::Sample,
    wait::eventually_every,
};
use serde_json::json;

/// How long a routing change may take to show where nothing is measured.
const CONVERGE: Duration = Duration::from_secs(20);

/// The fault proxy's port on its node (test services start at 9100).
const FAULT_PORT: u16 = 9400;

/// The hung route's per-try timeout.
const PER_TRY: Duration = Duration::from_millis(200);

/// Starts the instance `<service>-3` as its own service (so that it is not
/// routed to directly), puts a fault proxy in front of it on `node`, and
/// registers the proxy's address as the instance `<service>-3-via-fault`.
async fn instance_behind_fault(node: &mut Node, service: &str) -> Result<FaultProxy> {
    let id = format!("{service}-3");
    let origin = node.serve(&format!("{service}-origin"), &id).await?;
    let listen = SocketAddr::from((node.ip(), FAULT_PORT));
    let fault = FaultProxy::start(&node.ns, listen, origin).await?;
    let body = json!({
        "Name": service,
        "ID": format!("{id}-via-fault"),
        "Address": fault.addr().ip().to_string(),
        "Port": fault.addr().port(),
    });
    let resp = node.register(&body).await?;
    if !resp.status.is_success() {
        bail!("register {id}-via-fault: {} {}", resp.status, resp.text());
    }
    Ok(fault)
}

/// Latency quantile `q` of `samples`.
fn quantile(samples: &[&Sample], q: f64) -> Duration {
    let mut l: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    if l.is_empty() {
        return Duration::ZERO;
    }
    l.sort();
    l[((l.len() - 1) as f64 * q).round() as usize]
}

fn share_of(samples: &[&Sample], instance: &str) -> f64 {
    let n = samples
        .iter()
        .filter(|s| s.instance.as_deref() == Some(instance))
        .count();
    n as f64 / samples.len().max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_slowed_by_500ms_gets_under_10_percent_after_10s_and_p99_recovers() -> Result<()> {
    let mut mesh = Mesh::start(MeshOptions::nodes(2)).await?;
    mesh.nodes[0].serve("lat", "lat-1").await?;
    mesh.nodes[0].serve("lat", "lat-2").await?;
    let fault = instance_behind_fault(&mut mesh.nodes[0], "lat").await?;
    mesh.nodes[1]
        .wait_answers("lat", &["lat-1", "lat-2", "lat-3"], CONVERGE)
        .await?;

    // The default balancing (P2C over peak-EWMA latency), steady load.
    let load = Load::start(
        &mesh.nodes[1].ns,
        "127.0.0.1:8888".parse()?,
        "/lat/",
        LoadOptions::default(),
    );
    load.wait_more(1500, Duration::from_secs(20)).await?;
    let slowed = Instant::now();
    fault.set(Fault::Latency(Duration::from_millis(500)));
    tokio::time::sleep_until((slowed + Duration::from_secs(20)).into()).await;
    let report = load.stop().await;

    let before: Vec<&Sample> = report.samples.iter().filter(|s| s.at < slowed).collect();
    let settled = slowed + Duration::from_secs(10);
    let first: Vec<&Sample> = report.after(slowed).filter(|s| s.at <= settled).collect();
    let after: Vec<&Sample> = report.after(settled).collect();
    let (share_before, share_first, share_after) = (
        share_of(&before, "lat-3"),
        share_of(&first, "lat-3"),
        share_of(&after, "lat-3"),
    );
    let (p99_before, p99_first, p99_after) = (
        quantile(&before, 0.99),
        quantile(&first, 0.99),
        quantile(&after, 0.99),
    );
    println!(
        "slow instance (+500 ms): lat-3 share before {:.1} % ({} requests), first 10 s {:.2} % ({}), \
         after 10 s {:.2} % ({}); p50/p99 before {:?}/{:?}, first 10 s {:?}/{:?}, after 10 s {:?}/{:?}",
        share_before * 100.0,
        before.len(),
        share_first * 100.0,
        first.len(),
        share_after * 100.0,
        after.len(),
        quantile(&before, 0.5),
        p99_before,
        quantile(&first, 0.5),
        p99_first,
        quantile(&after, 0.5),
        p99_after,
    );
    assert!(
        report.failures().is_empty(),
        "failed requests: {}",
        report.summary()
    );
    assert!(
        after.len() > 1000,
        "too little load after 10 s: {}",
        after.len()
    );
    assert!(
        share_after <= 0.10,
        "lat-3 still got {:.1} % after 10 s",
        share_after * 100.0
    );
    assert!(
        p99_after <= p99_before + Duration::from_millis(100),
        "p99 after 10 s {p99_after:?} vs {p99_before:?} before the fault"
    );
    mesh.finish();
    Ok(())
}

/// A proxy config file, removed when dropped.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn write(contents: &str) -> Result<Self> {
        let path = mesh_e2e::netns::scratch_dir().join(format!(
            "mwe-faults-{}-{}.toml",
            std::process::id(),
            contents.len()
        ));
        std::fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_instance_is_ejected_within_5_per_try_timeouts_and_no_get_fails() -> Result<()> {
    // Round robin keeps sending the hung instance its share, the worst
    // case for callers and the plain case for the detector. (P2C-EWMA
    // starves it after its first timeouts, before any ejection.)
    let config = ConfigFile::write(&format!(
        "[routes.hung]\nlb = \"round-robin\"\nper_try_timeout = \"{}ms\"\ntimeout = \"5s\"\n",
        PER_TRY.as_millis()
    ))?;
    let opts = MeshOptions {
        proxy_args: vec!["--config".into(), config.0.display().to_string()],
        ..MeshOptions::nodes(2)
    };
    let mut mesh = Mesh::start(opts).await?;
    mesh.nodes[0].serve("hung", "hung-1").await?;
    mesh.nodes[0].serve("hung", "hung-2").await?;
    let fault = instance_behind_fault(&mut mesh.nodes[0], "hung").await?;
    mesh.nodes[1]
        .wait_answers("hung", &["hung-1", "hung-2", "hung-3"], CONVERGE)
        .await?;

    let load = Load::start(
        &mesh.nodes[1].ns,
        "127.0.0.1:8888".parse()?,
        "/hung/",
        LoadOptions::default(),
    );
    load.wait_more(1000, Duration::from_secs(20)).await?;
    let hung = Instant::now();
    fault.set(Fault::Hang);
    let n2 = &mesh.nodes[1];
    let ejected = eventually_every(
        "n2's proxy ejects hung-3-via-fault",
        Duration::from_secs(20),
        Duration::from_millis(5),
        || async {
            let routes = n2.routes().await?;
            let ejected = routes["services"]["hung"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["id"] == "hung-3-via-fault" && e["ejected_until"].is_u64());
            if !ejected {
                bail!("not ejected");
            }
            Ok(Instant::now())
        },
    )
    .await?;
    let detect = ejected - hung;
    // Attempts made before the ejection have connected by now; none after.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reached = fault.accepted();
    tokio::time::sleep_until((hung + Duration::from_secs(4)).into()).await;
    load.wait_more(500, Duration::from_secs(10)).await?;
    let report = load.stop().await;

    let after: Vec<&Sample> = report.after(hung).collect();
    let paid = after.iter().filter(|s| s.latency >= PER_TRY).count();
    let metrics = n2.proxy_admin("/metrics").await?.text();
    let ejections = metrics
        .lines()
        .find(|l| l.starts_with(r#"mesh_proxy_ejections_total{service="hung"}"#))
        .unwrap_or("(none)")
        .to_owned();
    println!(
        "hung instance: ejected {detect:?} after the hang ({:.1} per-try timeouts of {PER_TRY:?}); \
         {paid} of {} requests after it paid a per-try timeout; p99 after {:?}; {ejections}; load: {}",
        detect.as_secs_f64() / PER_TRY.as_secs_f64(),
        after.len(),
        quantile(&after, 0.99),
        report.summary()
    );
    assert!(
        detect <= PER_TRY * 5,
        "ejected {detect:?} after the hang, more than 5 per-try timeouts"
    );
    assert!(
        report.failures().is_empty(),
        "failed GETs: {}",
        report.summary()
    );
    assert_eq!(
        fault.accepted(),
        reached,
        "attempts still went to the hung instance after its ejection"
    );
    mesh.finish();
    Ok(())
}
