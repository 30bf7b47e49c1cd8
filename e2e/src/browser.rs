//! Headless Chromium (Debian's, from `PATH`) in a node's namespace, one
//! page driven over the DevTools protocol: open a URL, read the page as a
//! person sees it (its text, its tables), evaluate JavaScript, and keep
//! screenshots in a folder per test ([`artifacts_dir`]).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{WebSocketStream, client_async, tungstenite::Message};

use crate::{Node, eventually, process::Process, wait::POLL};

/// How long Chromium may take to start and to close.
pub const START: Duration = Duration::from_secs(20);

/// How long one DevTools call may take.
pub const CDP_CALL: Duration = Duration::from_secs(30);

/// How long [`Browser::see`] and [`Browser::see_cell`] wait for the page to
/// show what they look for.
pub const SEE: Duration = Duration::from_secs(20);

/// One table of a page: its rows, each cell by its column's heading, as
/// shown.
pub type Table = Vec<BTreeMap<String, String>>;

/// Headless Chromium in a node's namespace, one page, driven over the
/// DevTools protocol (one WebSocket, the page's session flattened on it).
///
/// The process is owned by the browser: dropping it (also when a test
/// panics) kills Chromium; [`Browser::close`] closes it in order.
pub struct Browser {
    process: Process,
    ws: WebSocketStream<TcpStream>,
    session: String,
    next_id: u64,
}

/// Where a test keeps its screenshots: `artifacts/<test>/` in the target
/// profile directory the test was built in (`target/debug/artifacts/dashboard/`
/// for `artifacts_dir("dashboard")`); made if missing.
pub fn artifacts_dir(test: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let dir = dir.join("artifacts").join(test);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// Debian's Chromium (`chromium`, else `chromium-browser`) from `PATH`.
pub fn chromium() -> Result<PathBuf> {
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

// === impl Browser ===

impl Browser {
    /// Starts Chromium in `node`'s namespace and opens a blank page. Its
    /// profile (`<node>-chromium/`) and log (`<node>-chromium.log`) are kept
    /// in `dir`, the mesh's folder.
    pub async fn start(node: &Node, dir: &Path) -> Result<Self> {
        let profile = dir.join(format!("{}-chromium", node.name));
        std::fs::create_dir_all(&profile)
            .with_context(|| format!("create {}", profile.display()))?;
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
            dir.join(format!("{}-chromium.log", node.name)),
        );
        process.start()?;
        // Chromium writes the port it chose and the browser's path.
        let port_file = profile.join("DevToolsActivePort");
        let (port, path) = eventually("Chromium's DevTools port", START, || async {
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
            .connect(SocketAddr::from(([127, 0, 0, 1], port)), START)
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
        browser.attach_page().await?;
        Ok(browser)
    }

    /// Opens the page this browser drives and attaches to it at the
    /// window's size.
    async fn attach_page(&mut self) -> Result<()> {
        let target = self
            .send(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await?;
        let target = target["targetId"]
            .as_str()
            .context("a target id")?
            .to_owned();
        let attached = self
            .send(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await?;
        self.session = attached["sessionId"]
            .as_str()
            .context("a session id")?
            .to_owned();
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await?;
        Ok(())
    }

    /// One DevTools call, on the page's session or (`None`) the browser's;
    /// its result.
    pub async fn send(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value> {
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

    /// A DevTools call on the page; its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let session = self.session.clone();
        self.send(Some(&session), method, params).await
    }

    /// Loads `url` in the page (a change of the hash only does not reload).
    pub async fn open(&mut self, url: &str) -> Result<()> {
        let answer = self.call("Page.navigate", json!({"url": url})).await?;
        if let Some(error) = answer.get("errorText") {
            bail!("open {url}: {error}");
        }
        Ok(())
    }

    /// The value of a JavaScript expression in the page.
    pub async fn eval(&mut self, expression: &str) -> Result<Value> {
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
    pub async fn text(&mut self) -> Result<String> {
        let text = self
            .eval("document.body ? document.body.innerText : ''")
            .await?;
        Ok(text.as_str().unwrap_or_default().to_owned())
    }

    /// Waits (up to [`SEE`]) until the page shows every one of `texts`;
    /// returns its text.
    pub async fn see(&mut self, what: &str, texts: &[&str]) -> Result<String> {
        self.see_within(what, texts, SEE).await
    }

    /// [`Browser::see`] with a chosen deadline, for changes that take long
    /// (a rollout's soak).
    pub async fn see_within(
        &mut self,
        what: &str,
        texts: &[&str],
        within: Duration,
    ) -> Result<String> {
        let deadline = tokio::time::Instant::now() + within;
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
                    "{what}: after {within:?} the page does not show {missing:?}; it shows:\n{text}"
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The rows of the page's `index`th table (in `main`), each cell by its
    /// column's heading, as shown.
    pub async fn table(&mut self, index: usize) -> Result<Table> {
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

    /// Waits (up to [`SEE`]) until the row of table `index` whose `key`
    /// column is `value` shows `want` in column `column`.
    pub async fn see_cell(
        &mut self,
        what: &str,
        index: usize,
        key: &str,
        value: &str,
        column: &str,
        want: &str,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + SEE;
        loop {
            let rows = self.table(index).await.unwrap_or_default();
            let row = rows
                .iter()
                .find(|r| r.get(key).map(String::as_str) == Some(value));
            if row.and_then(|r| r.get(column)).map(String::as_str) == Some(want) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{what}: after {SEE:?} the row shows {row:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Marks the loaded document, to tell later that it was not reloaded.
    pub async fn mark_document(&mut self) -> Result<()> {
        self.eval("window.meshTestMark = 'loaded once'").await?;
        Ok(())
    }

    /// The document marked by [`Browser::mark_document`] is still the one shown.
    pub async fn assert_not_reloaded(&mut self) -> Result<()> {
        let mark = self.eval("window.meshTestMark || 'reloaded'").await?;
        ensure!(mark == json!("loaded once"), "the page was reloaded");
        Ok(())
    }

    /// A PNG of the whole page (at least the 1280×900 window, at most 4000
    /// pixels high) at `path`; prints the path.
    pub async fn screenshot(&mut self, path: &Path) -> Result<()> {
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
        println!("screenshot: {}", path.display());
        Ok(())
    }

    /// Closes the browser and waits for it to exit (kills it if it does not
    /// within [`START`]).
    pub async fn close(mut self) -> Result<()> {
        // Chromium may exit before it answers; its exit is what counts.
        let _ = self.send(None, "Browser.close", json!({})).await;
        if self.process.wait_exit(START).await.is_err() {
            self.process.kill().await?;
        }
        Ok(())
    }
}
