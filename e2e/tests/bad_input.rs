//! Bad input at the proxy is refused with the right status and never
//! reaches Consul (issue 2, scenario i); the proxy's and the bridge's
//! `/metrics` pass `promtool check metrics` (issue 2, point 8).

use std::{io::Write as _, process::Stdio, time::Duration};

use anyhow::bail;
use mesh_e2e::{Mesh, MeshOptions, bins, eventually};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_are_refused_with_400_naming_the_problem_and_never_reach_consul() {
    let mesh = Mesh::start(MeshOptions::nodes(1)).await.unwrap();
    let before = mesh.catalog_services().await.unwrap();
    let node = &mesh.nodes[0];
    let ok = |name: &str| json!({"Name": name, "ID": format!("{name}-1"), "Address": "10.0.0.1", "Port": 8080});
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "invalid JSON",
            r#"{"Name": "broken", "Port": 80"#.into(),
            &["json"],
        ),
        (
            "missing Name",
            json!({"ID": "x-1", "Address": "10.0.0.1", "Port": 8080}).to_string(),
            &["name"],
        ),
        ("bad characters", ok("bad name!").to_string(), &["name"]),
        ("slash in name", ok("bad/name").to_string(), &["name"]),
        ("reserved v1", ok("v1").to_string(), &["reserved"]),
        ("reserved _mesh", ok("_mesh").to_string(), &["reserved"]),
        (
            "port 0",
            json!({"Name": "port-zero", "Address": "10.0.0.1", "Port": 0}).to_string(),
            &["port"],
        ),
        (
            "port 70000",
            json!({"Name": "port-big", "Address": "10.0.0.1", "Port": 70000}).to_string(),
            &["port"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, body, words) in &cases {
        let resp = node
            .put("/v1/agent/service/register", body.clone())
            .await
            .unwrap();
        let text = resp.text();
        let named = words
            .iter()
            .any(|w| text.to_ascii_lowercase().contains(&w.to_ascii_lowercase()));
        println!("{what}: {} {}", resp.status, text.trim());
        if resp.status != 400 || !named {
            failures.push(format!(
                "{what}: {} {text:?} (expected 400 naming one of {words:?})",
                resp.status
            ));
        }
    }
    // A good registration after the bad ones: once it is in the catalog,
    // anything the bad ones had sent would be too.
    let resp = node.register(&ok("good")).await.unwrap();
    assert_eq!(resp.status, 200, "good registration: {}", resp.text());
    let after = eventually(
        "`good` is in the catalog",
        Duration::from_secs(20),
        || async {
            let services = mesh.catalog_services().await?;
            if !services.iter().any(|s| s == "good") {
                bail!("catalog: {services:?}");
            }
            Ok(services)
        },
    )
    .await
    .unwrap();
    let added: Vec<&String> = after
        .iter()
        .filter(|s| !before.contains(s) && *s != "good")
        .collect();
    assert!(
        added.is_empty(),
        "bad registrations reached Consul: {added:?}"
    );
    assert!(
        failures.is_empty(),
        "bad registrations not refused properly:\n{}",
        failures.join("\n")
    );
    mesh.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_404_for_unknown_service_400_for_two_hosts_431_for_huge_header() {
    let mut mesh = Mesh::start(MeshOptions::nodes(1)).await.unwrap();
    mesh.nodes[0].serve("known", "known-1").await.unwrap();
    let node = &mesh.nodes[0];
    node.wait_answers("known", &["known-1"], Duration::from_secs(20))
        .await
        .unwrap();

    let resp = node.get("/no-such-service/x").await.unwrap();
    println!("unknown service: {} {}", resp.status, resp.text().trim());
    assert_eq!(resp.status, 404, "{}", resp.text());

    let two_hosts = b"GET /known/ HTTP/1.1\r\nHost: known\r\nHost: other\r\n\r\n";
    let resp = node.raw(two_hosts).await.unwrap();
    println!(
        "two Host headers: {}",
        resp.text.lines().next().unwrap_or("")
    );
    assert_eq!(resp.status, 400, "{}", resp.text);

    let mut huge = b"GET /known/ HTTP/1.1\r\nHost: 127.0.0.1:8888\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 100 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let resp = node.raw(&huge).await.unwrap();
    println!("100 KiB header: {}", resp.text.lines().next().unwrap_or(""));
    assert_eq!(resp.status, 431, "{}", resp.text);

    // The proxy still serves after all that.
    assert_eq!(node.get("/known/").await.unwrap().status, 200);
    mesh.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_and_bridge_metrics_pass_promtool_check() {
    let promtool = bins::promtool().unwrap();
    let mut mesh = Mesh::start(MeshOptions::nodes(1)).await.unwrap();
    mesh.nodes[0].serve("metered", "metered-1").await.unwrap();
    let node = &mesh.nodes[0];
    node.wait_answers("metered", &["metered-1"], Duration::from_secs(20))
        .await
        .unwrap();
    // Traffic of every kind, so that labelled series exist.
    for path in ["/metered/", "/metered/a", "/nope/"] {
        node.get(path).await.unwrap();
    }
    let mut failures = Vec::new();
    for (who, resp) in [
        ("mesh-proxy", node.proxy_admin("/metrics").await.unwrap()),
        ("mesh-bridge", node.bridge_admin("/metrics").await.unwrap()),
    ] {
        assert_eq!(resp.status, 200, "{who} /metrics: {}", resp.text());
        let text = resp.text();
        let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let mut child = std::process::Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "{who} /metrics: {families} metric families, promtool: {} {}",
            out.status,
            said.trim()
        );
        if families == 0 || !out.status.success() {
            failures.push(format!(
                "{who}: {families} families, promtool {}: {said}\n{text}",
                out.status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    mesh.finish();
}
