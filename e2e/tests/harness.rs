//! The harness itself, on the Consul cluster alone: a cluster comes up in
//! namespaces, survives its leader's death, and leaves nothing behind.

use std::{process::Command, time::Duration, time::Instant};

use anyhow::bail;
use mesh_e2e::{Mesh, MeshOptions, eventually};

fn our_namespaces(id: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("`ip netns list` runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("{id}-")))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn consul_cluster_in_namespaces_survives_leader_kill_and_is_removed_after() {
    let mut mesh = Mesh::start(MeshOptions::consul_only(2)).await.unwrap();
    let id = mesh.id().to_owned();
    assert_eq!(our_namespaces(&id).len(), 6, "hub + 3 servers + 2 nodes");

    // A registration on n1's agent is read through n2's agent.
    let body = r#"{"Name":"probe","ID":"probe-1","Address":"10.0.0.1","Port":1}"#;
    let resp = mesh.nodes[0]
        .local_client(8500)
        .put("/v1/agent/service/register", body)
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    let n2 = mesh.nodes[1].ns.clone();
    eventually("n2 sees probe-1", Duration::from_secs(10), || {
        let n2 = n2.clone();
        async move {
            let resp = mesh_e2e::HttpClient::new(&n2, "127.0.0.1:8500".parse()?)
                .get("/v1/catalog/service/probe")
                .await?;
            if !resp.text().contains("probe-1") {
                bail!("catalog: {}", resp.text());
            }
            Ok(())
        }
    })
    .await
    .unwrap();

    let old = mesh.kill_leader().await.unwrap();
    let killed = Instant::now();
    let new = mesh.wait_leader(Duration::from_secs(60)).await.unwrap();
    let election = killed.elapsed();
    assert_ne!(old, new);
    println!(
        "consul leader s{} SIGKILLed: new leader s{} after {election:?}",
        old + 1,
        new + 1
    );

    // The killed server comes back with its data dir and rejoins.
    mesh.servers[old].agent.start().unwrap();
    eventually(
        "the restarted server knows the leader",
        Duration::from_secs(30),
        || {
            let ns = mesh.servers[old].ns.clone();
            async move {
                match mesh_e2e::mesh::consul_leader(&ns).await? {
                    Some(_) => Ok(()),
                    None => bail!("no leader"),
                }
            }
        },
    )
    .await
    .unwrap();
    assert!(
        mesh.catalog_instances("probe")
            .await
            .unwrap()
            .contains(&"probe-1".to_owned())
    );

    let dir = mesh.dir().to_path_buf();
    mesh.finish();
    assert!(
        our_namespaces(&id).is_empty(),
        "namespaces left: {:?}",
        our_namespaces(&id)
    );
    assert!(!dir.exists(), "temp dir left: {}", dir.display());
}
