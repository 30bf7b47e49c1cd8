//! SIGHUP reloads the route policies of the real binary: a good file
//! applies at once, a bad one is refused with one log line and the last
//! good policies stay; SIGTERM then drains and exits 0.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
};

use http::StatusCode;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    support::{FakeBridge, endpoint, eventually, get, service},
    upstreams::StreamEcho,
};

/// The `mesh-proxy` binary, killed when dropped; its stderr (JSON log
/// lines) collected.
pub struct Binary {
    child: Child,
    log: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Binary {
    pub fn start(config: &Path) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"));
        cmd.arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MESH_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "message": line }));
                lines.lock().unwrap().push(value);
            }
        });
        Self { child, log }
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Log lines whose message contains `text`.
    pub fn lines(&self, text: &str) -> Vec<serde_json::Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(text)))
            .cloned()
            .collect()
    }

    pub async fn wait_line(&self, text: &str, count: usize) -> serde_json::Value {
        eventually(&format!("{count} log lines with {text:?}"), || async {
            let lines = self.lines(text);
            (lines.len() >= count).then(|| lines[count - 1].clone())
        })
        .await
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_config(path: &Path, bridge: SocketAddr, data: &Path, routes: &str) {
    let text = format!(
        "node = \"reload-node\"\nlog_format = \"json\"\nworkers = 1\nlisten = \"127.0.0.1:0\"\n\
         admin_listen = \"127.0.0.1:0\"\nbridge_addr = \"http://{bridge}\"\n\
         data_dir = \"{}\"\n{routes}\n",
        data.display()
    );
    // Atomically, as an operator's tooling would.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn sighup_applies_a_good_file_and_keeps_the_last_good_on_a_bad_one() {
    let echo = StreamEcho::start().await;
    let bridge =
        FakeBridge::start(vec![service("slow", vec![endpoint("slow-1", echo.addr)])]).await;
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = (dir.path().join("proxy.toml"), dir.path().join("data"));
    let patient = "[routes.slow]\ntimeout = \"5s\"";
    let hasty = "[routes.slow]\ntimeout = \"100ms\"\nretries = 0";
    write_config(&config, bridge.addr, &data, patient);
    let proxy = Binary::start(&config);
    let started = proxy.wait_line("mesh-proxy started", 1).await;
    // One thread runs it all (the current-thread scheduler): signals,
    // reloads and the drain work there as with several.
    assert_eq!(started["workers"], 1, "{started}");
    let addr: SocketAddr = started["outbound"].as_str().unwrap().parse().unwrap();
    let admin: SocketAddr = started["admin"].as_str().unwrap().parse().unwrap();
    eventually("the route is live", || async {
        (get(addr, "/slow/", &[]).await.status == StatusCode::OK).then_some(())
    })
    .await;
    // `/slow` takes 400 ms: within 5 s, not within 100 ms.
    assert_eq!(get(addr, "/slow/slow", &[]).await.status, StatusCode::OK);

    write_config(&config, bridge.addr, &data, hasty);
    proxy.signal(Signal::SIGHUP);
    proxy.wait_line("route policies reloaded", 1).await;
    assert_eq!(
        get(addr, "/slow/slow", &[]).await.status,
        StatusCode::GATEWAY_TIMEOUT
    );

    // A bad file: refused in one line, the last good policy stays.
    for bad in [
        "[routes.slow]\ntimeot = \"5s\"",
        "[routes.slow]\ntimeout = \"0s\"",
        "[routes.slow\n",
    ] {
        write_config(&config, bridge.addr, &data, bad);
        let before = proxy.lines("config reload refused").len();
        proxy.signal(Signal::SIGHUP);
        let line = proxy.wait_line("config reload refused", before + 1).await;
        let error = line["error"].as_str().unwrap();
        assert!(!error.contains('\n'), "one line: {error}");
        assert_eq!(
            get(addr, "/slow/slow", &[]).await.status,
            StatusCode::GATEWAY_TIMEOUT,
            "after {bad:?}"
        );
    }
    assert!(
        proxy.lines("config reload refused")[0]["error"]
            .as_str()
            .unwrap()
            .contains("timeot"),
        "the refusal names the bad key"
    );
    let metrics = String::from_utf8(get(admin, "/metrics", &[]).await.body.to_vec()).unwrap();
    assert!(
        metrics.contains(r#"mesh_proxy_config_reloads_total{outcome="refused"} 3"#),
        "{metrics}"
    );

    write_config(&config, bridge.addr, &data, patient);
    proxy.signal(Signal::SIGHUP);
    proxy.wait_line("route policies reloaded", 2).await;
    assert_eq!(get(addr, "/slow/slow", &[]).await.status, StatusCode::OK);
    let metrics = String::from_utf8(get(admin, "/metrics", &[]).await.body.to_vec()).unwrap();
    assert!(
        metrics.contains(r#"mesh_proxy_config_reloads_total{outcome="applied"} 2"#),
        "{metrics}"
    );

    // SIGTERM: drained and gone, exit 0.
    let mut proxy = proxy;
    proxy.signal(Signal::SIGTERM);
    let status = eventually("the proxy exits", || {
        let status = proxy.child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(status.success(), "{status:?}");
}
