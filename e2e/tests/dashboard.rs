//! The dashboard (issue 4, point 6) in Debian's headless Chromium against a
//! live mesh: a 3-server Consul cluster, two nodes with services, and
//! mesh-control on n1. Chromium runs in n1's namespace and is driven over
//! the DevTools protocol. The test reads each page as a person sees it (the
//! rendered text, table by table), changes the mesh while a page is open
//! and sees the change without a reload, and checks that markup in the
//! mesh's data shows as text. A screenshot of every page is kept under
//! `target/<profile>/artifacts/dashboard/` (the paths are printed).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use mesh_e2e::{
    Mesh, MeshOptions, Node, bins, eventually, mesh::CONSUL_HTTP, node::Instance, process::Process,
};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{WebSocketStream, client_async, tungstenite::Message};

/// mesh-control's ports (inside n1's namespace).
const CONTROL_GRPC: u16 = 8892;
const CONTROL_HTTP: u16 = 8893;

/// How long a change may take to show where nothing is measured.
const CONVERGE: Duration = Duration::from_secs(20);

/// How long one DevTools call may take.
const CDP_CALL: Duration = Duration::from_secs(30);

/// A tag a service registers with: it must show as these characters, not
/// become an element.
const MARKUP: &str = "<img src=x onerror=alert(1)><b>bold</b>";

/// Two nodes and a Consul cluster, mesh-control (`c1`) on n1.
async fn dashboard_mesh() -> Result<Mesh> {
    let mut mesh = Mesh::start(MeshOptions::consul_only(2)).await?;
    let control = bins::workspace_bin("mesh-control")?;
    let log = mesh.dir().join("n1-mesh-control.log");
    let node = &mut mesh.nodes[0];
    let mut process = Process::new(
        format!("{}/mesh-control", node.name),
        &node.ns,
        &control,
        [
            "--replica",
            "c1",
            "--consul-addr",
            "http://127.0.0.1:8500",
            "--grpc-listen",
            &format!("127.0.0.1:{CONTROL_GRPC}"),
            "--http-listen",
            &format!("127.0.0.1:{CONTROL_HTTP}"),
        ],
        log,
    );
    process.start()?;
    // Kept with the node's processes: its log is printed when the test
    // fails, and it is stopped with the mesh.
    node.instances.insert(
        "mesh-control".into(),
        Instance {
            service: "mesh-control".into(),
            id: "c1".into(),
            addr: SocketAddr::from((node.ip(), CONTROL_GRPC)),
            process,
        },
    );
    let n1 = &mesh.nodes[0];
    eventually("mesh-control is ready", CONVERGE, || async {
        let resp = n1.local_client(CONTROL_HTTP).get("/ready").await?;
        ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
        Ok(())
    })
    .await?;
    Ok(mesh)
}

/// Registers a service instance with `node`'s Consul agent, its TTL check
/// passing.
async fn register(node: &Node, name: &str, id: &str, port: u16, tags: &[&str]) -> Result<()> {
    let body = json!({
        "Name": name, "ID": id, "Address": node.ip().to_string(), "Port": port,
        "Tags": tags, "Meta": {"version": "v1"},
        "Check": {"TTL": "10m", "Status": "passing"},
    });
    let resp = node
        .local_client(CONSUL_HTTP)
        .put("/v1/agent/service/register", body.to_string())
        .await?;
    ensure!(
        resp.status == 200,
        "register {id}: {} {}",
        resp.status,
        resp.text()
    );
    Ok(())
}

/// Sets `node`'s routes through mesh-control's REST API; returns the new
/// revision.
async fn set_routes(
    n1: &Node,
    node: &str,
    routes: Value,
    revision: u64,
    author: &str,
) -> Result<u64> {
    let body = json!({"routes": routes, "expected_revision": revision, "author": author});
    let resp = n1
        .local_client(CONTROL_HTTP)
        .request(
            hyper::Method::PUT,
            &format!("/v1/nodes/{node}/routes"),
            &[("content-type", "application/json")],
            body.to_string().into(),
        )
        .await?;
    let answer = resp.json().with_context(|| resp.text())?;
    ensure!(resp.status == 200, "set routes: {} {answer}", resp.status);
    answer["revision"]
        .as_u64()
        .ok_or_else(|| anyhow!("no revision in {answer}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_nodes_services_routes_versions_and_rollouts_live() {
    let mesh = dashboard_mesh().await.unwrap();
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    register(n1, "web", "web-1", 9100, &["v1", MARKUP])
        .await
        .unwrap();
    register(n2, "api", "api-1", 9200, &["v2"]).await.unwrap();
    let revision = eventually("web and api are routable", CONVERGE, || async {
        set_routes(n1, "n1", json!({"web": {"timeout": "2s"}}), 0, "alice").await
    })
    .await
    .unwrap();
    let catalog_nodes = mesh
        .consul_get("/v1/catalog/nodes")
        .await
        .unwrap()
        .json()
        .unwrap();
    let node_count = catalog_nodes.as_array().map_or(0, Vec::len);

    // Served with its types and a strict policy.
    let page = n1.local_client(CONTROL_HTTP).get("/ui/").await.unwrap();
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );

    let artifacts = artifacts_dir().unwrap();
    let mut browser = Browser::start(n1, mesh.dir()).await.unwrap();
    let base = format!("http://127.0.0.1:{CONTROL_HTTP}");

    // Nodes: every node of the catalog, with its agent, proxy and version.
    browser.open(&format!("{base}/")).await.unwrap();
    browser
        .see(
            "the nodes page",
            &[&format!("Nodes ({node_count})"), "live"],
        )
        .await
        .unwrap();
    let nodes = browser.table(0).await.unwrap();
    let row = |name: &str| {
        nodes
            .iter()
            .find(|r| r.get("Node").map(String::as_str) == Some(name))
            .cloned()
            .unwrap_or_else(|| panic!("no row for {name} in {nodes:?}"))
    };
    let (r1, r2) = (row("n1"), row("n2"));
    assert_eq!(r1["Address"], n1.ip().to_string());
    assert_eq!(r1["Agent"], "passing", "{r1:?}");
    assert_eq!(r1["Proxy"], "unknown", "{r1:?}");
    assert_eq!(r1["Config version"], "1", "{r1:?}");
    assert_eq!(r1["Last seen"], "never", "{r1:?}");
    // web-1, and mesh-control itself: each replica registers with its
    // agent for the leader lock's check.
    assert_eq!(r1["Instances"], "2", "{r1:?}");
    assert_eq!(r2["Config version"], "none", "{r2:?}");
    assert_eq!(r2["Agent"], "passing", "{r2:?}");
    browser
        .screenshot(&artifacts.join("nodes.png"))
        .await
        .unwrap();

    // Services: instances, tags as text, checks and health.
    browser
        .open(&format!("{base}/ui/#/services"))
        .await
        .unwrap();
    let text = browser
        .see(
            "the services page",
            &[
                "web",
                "api",
                "1 instance, 1 passing",
                "web-1",
                "api-1",
                MARKUP,
            ],
        )
        .await
        .unwrap();
    assert!(text.contains("service:web-1: passing"), "{text}");
    assert!(text.contains("serfHealth: passing"), "{text}");
    let injected = browser
        .eval("document.querySelectorAll('main img, main b, main script').length")
        .await
        .unwrap();
    assert_eq!(injected, json!(0), "markup from a tag became elements");
    browser
        .screenshot(&artifacts.join("services.png"))
        .await
        .unwrap();

    // A health check fails while the page is open: it shows without a reload.
    browser.mark_document().await.unwrap();
    let fail = n2
        .local_client(CONSUL_HTTP)
        .put("/v1/agent/check/fail/service:api-1?note=down", "")
        .await
        .unwrap();
    assert_eq!(fail.status, 200, "{}", fail.text());
    browser
        .see(
            "api-1 critical",
            &["service:api-1: critical", "1 instance, 0 passing"],
        )
        .await
        .unwrap();
    browser.assert_not_reloaded().await.unwrap();
    browser
        .screenshot(&artifacts.join("services-live.png"))
        .await
        .unwrap();

    // A node: its routes, versions, and the newest version's diff.
    browser
        .open(&format!("{base}/ui/#/nodes/n1"))
        .await
        .unwrap();
    browser
        .see(
            "n1's page",
            &[
                "Node n1",
                "version 1, revision",
                "Diff of version 1",
                "+++ n1 version 1 (proxy)",
                "+[routes.web]",
                "+timeout = \"2s\"",
            ],
        )
        .await
        .unwrap();
    let routes = browser.table(0).await.unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["Service"], "web");
    assert_eq!(routes[0]["Timeout"], "2s");
    let versions = browser.table(1).await.unwrap();
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(versions[0]["Version"], "version 1");
    assert_eq!(versions[0]["Author"], "alice");
    browser
        .screenshot(&artifacts.join("node-n1.png"))
        .await
        .unwrap();

    // New routes while the page is open: the new version, its routes and
    // its diff show without a reload.
    browser.mark_document().await.unwrap();
    set_routes(
        n1,
        "n1",
        json!({"web": {"timeout": "2s"}, "api": {"timeout": "3s", "retries": 2}}),
        revision,
        "bob",
    )
    .await
    .unwrap();
    browser
        .see(
            "version 2 on n1's page",
            &[
                "version 2, revision",
                "Diff of version 2 against version 1",
                "+++ n1 version 2 (proxy)",
                "+[routes.api]",
                "+retries = 2",
            ],
        )
        .await
        .unwrap();
    browser.assert_not_reloaded().await.unwrap();
    let routes = browser.table(0).await.unwrap();
    let services: Vec<&str> = routes.iter().map(|r| r["Service"].as_str()).collect();
    assert_eq!(services, ["api", "web"], "{routes:?}");
    assert_eq!(routes[0]["Retries"], "2");
    let versions = browser.table(1).await.unwrap();
    let listed: Vec<(&str, &str)> = versions
        .iter()
        .map(|v| (v["Version"].as_str(), v["Author"].as_str()))
        .collect();
    assert_eq!(listed, [("version 2", "bob"), ("version 1", "alice")]);
    browser
        .screenshot(&artifacts.join("node-n1-live.png"))
        .await
        .unwrap();

    // An older version's diff, by its link.
    browser
        .open(&format!("{base}/ui/#/nodes/n1/versions/1"))
        .await
        .unwrap();
    let text = browser
        .see(
            "version 1's diff",
            &["Diff of version 1", "--- /dev/null", "+timeout = \"2s\""],
        )
        .await
        .unwrap();
    assert!(!text.contains("+[routes.api]"), "{text}");
    browser
        .screenshot(&artifacts.join("node-n1-version-1.png"))
        .await
        .unwrap();

    // The nodes page now says version 2 for n1.
    browser.open(&format!("{base}/ui/#/nodes")).await.unwrap();
    browser
        .see_cell(
            "n1 at config version 2",
            0,
            "Node",
            "n1",
            "Config version",
            "2",
        )
        .await
        .unwrap();

    // Rollouts: none yet.
    browser
        .open(&format!("{base}/ui/#/rollouts"))
        .await
        .unwrap();
    browser
        .see("the rollouts page", &["Rollouts", "No rollouts yet."])
        .await
        .unwrap();
    browser
        .screenshot(&artifacts.join("rollouts.png"))
        .await
        .unwrap();

    let footer = browser
        .eval("document.getElementById('footer').innerText")
        .await
        .unwrap();
    assert!(
        footer.as_str().unwrap_or_default().contains("Replica c1"),
        "{footer}"
    );
    browser.close().await.unwrap();
    mesh.finish();
}

/// Where screenshots are kept: `artifacts/dashboard/` in the target
/// profile directory the test was built in.
fn artifacts_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let dir = dir.join("artifacts").join("dashboard");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// Debian's Chromium, from PATH.
fn chromium() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser"] {
        if let Some(found) = std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
        {
            return Ok(found);
        }
    }
    bail!(
        "Chromium not found on PATH: run deploy/scripts/install-test-deps.sh \
         (Debian: apt-get install chromium)"
    )
}

/// Headless Chromium in a node's namespace, one page, driven over the
/// DevTools protocol (one WebSocket, the page's session flattened on it).
struct Browser {
    process: Process,
    ws: WebSocketStream<TcpStream>,
    session: String,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium in `node`'s namespace (profile and log in `dir`) and
    /// opens a page.
    async fn start(node: &Node, dir: &Path) -> Result<Self> {
        let profile = dir.join("chromium");
        std::fs::create_dir_all(&profile)?;
        let mut process = Process::new(
            format!("{}/chromium", node.name),
            &node.ns,
            chromium()?,
            [
                "--headless".to_owned(),
                "--no-sandbox".into(),
                "--disable-gpu".into(),
                "--disable-dev-shm-usage".into(),
                "--disable-crash-reporter".into(),
                "--disable-breakpad".into(),
                "--disable-extensions".into(),
                "--disable-background-networking".into(),
                "--disable-sync".into(),
                "--no-first-run".into(),
                "--no-default-browser-check".into(),
                "--hide-scrollbars".into(),
                "--window-size=1280,900".into(),
                format!("--user-data-dir={}", profile.display()),
                "--remote-debugging-port=0".into(),
                "about:blank".into(),
            ],
            dir.join("n1-chromium.log"),
        );
        process.start()?;
        // Chromium writes the port it chose and the browser's path.
        let port_file = profile.join("DevToolsActivePort");
        let (port, path) = eventually("Chromium's DevTools port", CONVERGE, || async {
            let text = std::fs::read_to_string(&port_file)?;
            let mut lines = text.lines();
            let port: u16 = lines.next().unwrap_or_default().trim().parse()?;
            let path = lines.next().unwrap_or_default().trim().to_owned();
            ensure!(path.starts_with("/devtools/"), "{text:?}");
            Ok((port, path))
        })
        .await
        .with_context(|| format!("Chromium did not start:\n{}", process.log_tail(30)))?;
        let stream = node
            .ns
            .connect(SocketAddr::from(([127, 0, 0, 1], port)), CONVERGE)
            .await?;
        let url = format!("ws://127.0.0.1:{port}{path}");
        let (ws, _) = tokio::time::timeout(CDP_CALL, client_async(url.as_str(), stream))
            .await
            .context("DevTools handshake in time")?
            .with_context(|| format!("DevTools handshake at {url}"))?;
        let mut browser = Self {
            process,
            ws,
            session: String::new(),
            next_id: 0,
        };
        let target = browser
            .send(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await?;
        let target = target["targetId"]
            .as_str()
            .context("a target id")?
            .to_owned();
        let attached = browser
            .send(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await?;
        browser.session = attached["sessionId"]
            .as_str()
            .context("a session id")?
            .to_owned();
        browser
            .call(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
            )
            .await?;
        Ok(browser)
    }

    /// One DevTools call, on the page's session or (`None`) the browser's;
    /// its result.
    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.ws.send(Message::text(message.to_string())).await?;
        let answer = async {
            loop {
                let frame = self
                    .ws
                    .next()
                    .await
                    .context("DevTools closed the connection")??;
                let Message::Text(text) = frame else {
                    continue;
                };
                let value: Value = serde_json::from_str(text.as_str())?;
                if value["id"] != json!(id) {
                    continue; // an event, or another call's answer
                }
                if let Some(error) = value.get("error") {
                    bail!("{method}: {error}");
                }
                return Ok(value["result"].clone());
            }
        };
        tokio::time::timeout(CDP_CALL, answer)
            .await
            .with_context(|| format!("{method} took over {CDP_CALL:?}"))?
    }

    /// A call on the page.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let session = self.session.clone();
        self.send(Some(&session), method, params).await
    }

    /// Loads `url` in the page (a change of the hash only does not reload).
    async fn open(&mut self, url: &str) -> Result<()> {
        let answer = self.call("Page.navigate", json!({"url": url})).await?;
        if let Some(error) = answer.get("errorText") {
            bail!("open {url}: {error}");
        }
        Ok(())
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Result<Value> {
        let answer = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await?;
        if let Some(e) = answer.get("exceptionDetails") {
            bail!("{expression}: {e}");
        }
        Ok(answer["result"]["value"].clone())
    }

    /// The page's visible text.
    async fn text(&mut self) -> Result<String> {
        let text = self
            .eval("document.body ? document.body.innerText : ''")
            .await?;
        Ok(text.as_str().unwrap_or_default().to_owned())
    }

    /// Waits until the page shows every one of `texts`; returns its text.
    async fn see(&mut self, what: &str, texts: &[&str]) -> Result<String> {
        let deadline = tokio::time::Instant::now() + CONVERGE;
        loop {
            // While a page loads its document may not answer yet.
            let text = match self.text().await {
                Ok(text) => text,
                Err(e) => format!("(the page does not answer: {e:#})"),
            };
            let missing: Vec<&&str> = texts.iter().filter(|t| !text.contains(**t)).collect();
            if missing.is_empty() {
                return Ok(text);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{what}: after {CONVERGE:?} the page does not show {missing:?}; it shows:\n{text}"
                );
            }
            tokio::time::sleep(mesh_e2e::wait::POLL).await;
        }
    }

    /// The rows of the page's `index`th table, each cell by its column's
    /// heading, as shown.
    async fn table(&mut self, index: usize) -> Result<Vec<BTreeMap<String, String>>> {
        let rows = self
            .eval(&format!(
                "(() => {{
                    const t = document.querySelectorAll('main table')[{index}];
                    if (!t) return null;
                    const heads = [...t.tHead.rows[0].cells].map((c) => c.innerText.trim());
                    return [...t.tBodies[0].rows].map((r) =>
                        Object.fromEntries([...r.cells].map((c, i) => [heads[i], c.innerText.trim()])));
                }})()"
            ))
            .await?;
        ensure!(!rows.is_null(), "the page has no table {index}");
        Ok(serde_json::from_value(rows)?)
    }

    /// Waits until the row of table `index` whose `key` column is `value`
    /// shows `want` in column `column`.
    async fn see_cell(
        &mut self,
        what: &str,
        index: usize,
        key: &str,
        value: &str,
        column: &str,
        want: &str,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + CONVERGE;
        loop {
            let rows = self.table(index).await.unwrap_or_default();
            let row = rows
                .iter()
                .find(|r| r.get(key).map(String::as_str) == Some(value));
            if row.and_then(|r| r.get(column)).map(String::as_str) == Some(want) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{what}: after {CONVERGE:?} the row shows {row:?}");
            }
            tokio::time::sleep(mesh_e2e::wait::POLL).await;
        }
    }

    /// Marks the loaded document, to tell later that it was not reloaded.
    async fn mark_document(&mut self) -> Result<()> {
        self.eval("window.meshTestMark = 'loaded once'").await?;
        Ok(())
    }

    /// The document marked by [`Browser::mark_document`] is still the one shown.
    async fn assert_not_reloaded(&mut self) -> Result<()> {
        let mark = self.eval("window.meshTestMark || 'reloaded'").await?;
        ensure!(mark == json!("loaded once"), "the page was reloaded");
        Ok(())
    }

    /// A PNG of the whole page at `path`; prints the path.
    async fn screenshot(&mut self, path: &Path) -> Result<()> {
        let metrics = self.call("Page.getLayoutMetrics", json!({})).await?;
        let size = &metrics["cssContentSize"];
        let width = size["width"].as_f64().unwrap_or(1280.0).max(1280.0);
        let height = size["height"]
            .as_f64()
            .unwrap_or(900.0)
            .clamp(900.0, 4000.0);
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
                }),
            )
            .await?;
        let data = shot["data"].as_str().context("screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        ensure!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        std::fs::write(path, png).with_context(|| format!("write {}", path.display()))?;
        println!("dashboard screenshot: {}", path.display());
        Ok(())
    }

    /// Closes the browser and waits for it to exit.
    async fn close(mut self) -> Result<()> {
        let _ = self.send(None, "Browser.close", json!({})).await;
        if self.process.wait_exit(CONVERGE).await.is_err() {
            self.process.kill().await?;
        }
        Ok(())
    }
}
