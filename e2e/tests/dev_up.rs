//! The README's first command: `meshctl dev up --demo` brings up Consul,
//! mesh-bridge, mesh-proxy, mesh-control and two demo services on one
//! host, the demo services answer by name through 127.0.0.1:8888,
//! mesh-control answers and leads, and Ctrl-C stops all it started. Run in a namespace of its own, so its fixed ports (8500,
//! 8888, …) are that host's and clash with nothing.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh_e2e::{
    HttpClient, bins, eventually,
    netns::{self, Network},
    process::Process,
};
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_up_demo_answers_by_name_and_ctrl_c_stops_everything() {
    let mut net = Network::create().unwrap();
    let host = net.add_host("dev", 2).unwrap();
    let dir = Scratch(netns::scratch_dir().join(format!("{}-devup", net.id())));
    let dir = &dir.0;
    std::fs::create_dir_all(dir).unwrap();
    let meshctl = bins::workspace_bin("meshctl").unwrap();
    let data = dir.join("data");
    let mut up = Process::new(
        "meshctl",
        &host,
        &meshctl,
        [
            "dev".as_ref(),
            "up".as_ref(),
            "--demo".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
        ],
        dir.join("meshctl.log"),
    );
    up.start().unwrap();
    let started = Instant::now();

    let proxy = "127.0.0.1:8888".parse().unwrap();
    let result = eventually(
        "both demo services answer through the proxy",
        Duration::from_secs(120),
        || {
            let host = host.clone();
            async move {
                let mut client = HttpClient::new(&host, proxy);
                let hello = client.get("/hello/some/path").await?;
                let echo = client
                    .request(
                        hyper::Method::GET,
                        "/any",
                        &[("host", "echo")],
                        Default::default(),
                    )
                    .await?;
                if hello.status != 200 || echo.status != 200 {
                    bail!("hello {} echo {}", hello.status, echo.status);
                }
                Ok((hello.json()?, echo.json()?))
            }
        },
    )
    .await;
    let (hello, echo) = match result {
        Ok(answers) => answers,
        Err(e) => panic!("{e:#}\n--- meshctl log ---\n{}", up.log_tail(40)),
    };
    println!(
        "meshctl dev up --demo: demo services answer after {:?}",
        started.elapsed()
    );
    assert_eq!(hello["service"], "hello", "{hello}");
    assert_eq!(hello["path"], "/some/path", "{hello}");
    assert_eq!(echo["service"], "echo", "{echo}");
    let printed = eventually("meshctl prints its table", Duration::from_secs(30), || {
        let printed = up.log();
        async move {
            if !printed.contains("Press Ctrl-C") {
                bail!("not yet:\n{printed}");
            }
            Ok(printed)
        }
    })
    .await
    .unwrap();
    for address in [
        "127.0.0.1:8500",
        "127.0.0.1:8888",
        "127.0.0.1:8889",
        "127.0.0.1:8890",
        "127.0.0.1:8891",
        "127.0.0.1:8892",
        "127.0.0.1:8893",
        "127.0.0.1:8894",
        "127.0.0.1:8895",
        "127.0.0.1:8896",
        "127.0.0.1:8897",
    ] {
        assert!(
            printed.contains(address),
            "meshctl did not print {address}:\n{printed}"
        );
    }

    // mesh-control answers over REST and, through meshctl, over gRPC.
    let control = "127.0.0.1:8893".parse().unwrap();
    let status = HttpClient::new(&host, control)
        .get("/v1/status")
        .await
        .unwrap();
    assert_eq!(status.status, 200, "{}", status.text());
    let status = status.json().unwrap();
    assert_eq!(status["replica"], "dev", "{status}");
    assert_eq!(
        status["is_leader"], true,
        "the only replica leads: {status}"
    );
    // mesh-deployer is up and ready.
    let deployer = "127.0.0.1:8895".parse().unwrap();
    let ready = HttpClient::new(&host, deployer)
        .get("/ready")
        .await
        .unwrap();
    assert_eq!(ready.status, 200, "mesh-deployer /ready: {}", ready.text());
    // mesh-monitor is up, and probes the mesh's components.
    let monitor = "127.0.0.1:8897".parse().unwrap();
    let ready = HttpClient::new(&host, monitor).get("/ready").await.unwrap();
    assert_eq!(ready.status, 200, "mesh-monitor /ready: {}", ready.text());
    // The dashboard it printed answers.
    assert!(
        printed.contains("dashboard") && printed.contains("http://127.0.0.1:8893/"),
        "meshctl did not print the dashboard:\n{printed}"
    );
    let page = HttpClient::new(&host, control).get("/ui/").await.unwrap();
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.text().contains("<html"), "{}", page.text());
    let services = tokio::process::Command::new("ip")
        .args(["netns", "exec", host.name()])
        .arg(&meshctl)
        .args(["services", "--output", "json"])
        .env_remove("MESH_CONTROL_ADDR")
        .env_remove("MESH_OUTPUT")
        .output()
        .await
        .unwrap();
    assert!(
        services.status.success(),
        "meshctl services: {}",
        String::from_utf8_lossy(&services.stderr)
    );
    let services: serde_json::Value = serde_json::from_slice(&services.stdout).unwrap();
    let names: Vec<&str> = services
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(
        names.contains(&"hello") && names.contains(&"echo"),
        "{names:?}"
    );

    // Ctrl-C: meshctl stops everything it started, then exits cleanly.
    up.signal(Signal::SIGINT).unwrap();
    let status = up.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert!(
        status.success(),
        "meshctl exited with {status}:\n{}",
        up.log_tail(20)
    );
    eventually(
        "no process left in the host",
        Duration::from_secs(10),
        || {
            let host = host.clone();
            async move {
                let left = host.pids();
                if !left.is_empty() {
                    bail!("still running: {left:?}");
                }
                Ok(())
            }
        },
    )
    .await
    .context("after Ctrl-C")
    .unwrap();
}

/// The test's files, removed when it ends, also when it fails.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
