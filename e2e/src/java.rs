//! Real jars for the deployment tests: a tiny Java HTTP service
//! (`com.sun.net.httpserver`), compiled with the machine's `javac` and
//! packaged with `jar`, once per variant (version, health, start-up delay).
//!
//! The service takes `--server.port=N` (required) and `--server.address=A`
//! (default `0.0.0.0`: the node's loopback and its mesh address alike,
//! whichever the deployer registers). It answers `GET /health` with 200
//! `ok` (a bad variant: 500 naming why; any variant: 503 during its
//! start-up delay), `GET /version` (or any path ending in `/version`) with
//! its version, and every other path with `hello from <version>`, each
//! with an `x-instance: <version>@<address>:<port>` header naming the
//! address the call came in on. SIGTERM stops it cleanly.
//!
//! A missing JDK fails the tests saying how to install one; they are never
//! skipped.

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

/// The service's source; the variant's settings come from
/// `service.properties` in the jar, so one compile serves every variant.
const SOURCE: &str = r#"import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;

public final class Main {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        try (InputStream in = Main.class.getResourceAsStream("/service.properties")) {
            props.load(in);
        }
        final String version = props.getProperty("version");
        final int health = Integer.parseInt(props.getProperty("health", "200"));
        final long delayMs = Long.parseLong(props.getProperty("startup_delay_ms", "0"));
        int port = -1;
        String address = "0.0.0.0";
        for (String arg : args) {
            if (arg.startsWith("--server.port=")) {
                port = Integer.parseInt(arg.substring("--server.port=".length()));
            } else if (arg.startsWith("--server.address=")) {
                address = arg.substring("--server.address=".length());
            } else {
                System.err.println("unknown argument: " + arg);
                System.exit(64);
            }
        }
        if (port <= 0 || port > 65535) {
            System.err.println("--server.port=N (1-65535) is required");
            System.exit(64);
        }
        final int listening = port;
        final String instance = version + "-" + port;
        final long healthyAt = System.nanoTime() + delayMs * 1_000_000L;
        HttpServer server = HttpServer.create(new InetSocketAddress(address, port), 128);
        ExecutorService pool = Executors.newFixedThreadPool(8);
        server.setExecutor(pool);
        server.createContext("/", exchange -> {
            String path = exchange.getRequestURI().getPath();
            int status = 200;
            String body;
            if (path.equals("/health")) {
                if (System.nanoTime() < healthyAt) {
                    status = 503;
                    body = "starting";
                } else if (health == 200) {
                    body = "ok";
                } else {
                    status = health;
                    body = "unhealthy: database unreachable";
                }
            } else if (path.endsWith("/version")) {
                body = version;
            } else {
                body = "hello from " + version;
            }
            // Which address the call came in on: a caller on another node
            // reaches the node's address, never its loopback.
            String local = exchange.getLocalAddress().getAddress().getHostAddress();
            respond(exchange, status, body, version + "@" + local + ":" + listening);
        });
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            server.stop(0);
            pool.shutdown();
            System.err.println("stopped " + instance);
        }));
        server.start();
        if (health != 200) {
            System.err.println("database unreachable");
        }
        System.err.println("serving " + version + " on " + address + ":" + port);
    }

    private static void respond(HttpExchange exchange, int status, String body, String instance)
            throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("content-type", "text/plain");
        exchange.getResponseHeaders().set("x-instance", instance);
        exchange.sendResponseHeaders(status, bytes.length);
        try (OutputStream out = exchange.getResponseBody()) {
            out.write(bytes);
        }
    }
}
"#;

/// How long one `javac` or `jar` run may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// What one jar does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    /// Its version (`/version`, `hello from <version>`).
    pub version: String,
    /// What `/health` answers once started: 200, or e.g. 500 for a bad build.
    pub health: u16,
    /// How long after start `/health` answers 503 before that.
    pub startup_delay: Duration,
}

/// A built jar.
#[derive(Clone, Debug)]
pub struct Jar {
    /// The variant it was built from.
    pub variant: Variant,
    /// Where it is.
    pub path: PathBuf,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
}

// === impl Variant ===

impl Variant {
    /// A healthy version that starts at once.
    pub fn healthy(version: &str) -> Self {
        Self {
            version: version.to_owned(),
            health: 200,
            startup_delay: Duration::ZERO,
        }
    }

    /// A version whose `/health` answers 500.
    pub fn unhealthy(version: &str) -> Self {
        Self {
            health: 500,
            ..Self::healthy(version)
        }
    }

    /// A healthy version whose `/health` answers 503 for `delay` after start.
    pub fn slow(version: &str, delay: Duration) -> Self {
        Self {
            startup_delay: delay,
            ..Self::healthy(version)
        }
    }

    fn properties(&self) -> String {
        format!(
            "version={}\nhealth={}\nstartup_delay_ms={}\n",
            self.version,
            self.health,
            self.startup_delay.as_millis()
        )
    }
}

// === impl Jar ===

impl Jar {
    /// The jar's size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// Compiles the service once in `dir` and packages one jar per variant
/// (`dir/<version>/app.jar`). Fails, saying how to get a JDK, when
/// `javac` or `jar` is missing.
pub async fn build(dir: &Path, variants: &[Variant]) -> Result<Vec<Jar>> {
    let javac = tool("javac")?;
    let jar = tool("jar")?;
    let src = dir.join("src");
    let classes = dir.join("classes");
    std::fs::create_dir_all(&src)?;
    std::fs::create_dir_all(&classes)?;
    let source = src.join("Main.java");
    std::fs::write(&source, SOURCE).with_context(|| format!("write {}", source.display()))?;
    run(
        tokio::process::Command::new(&javac)
            .arg("-d")
            .arg(&classes)
            .arg(&source),
        "javac",
    )
    .await?;
    let mut jars = Vec::new();
    for variant in variants {
        let out = dir.join(&variant.version);
        let resources = out.join("resources");
        std::fs::create_dir_all(&resources)?;
        std::fs::write(resources.join("service.properties"), variant.properties())?;
        let path = out.join("app.jar");
        run(
            tokio::process::Command::new(&jar)
                .arg("--create")
                .arg("--file")
                .arg(&path)
                .args(["--main-class", "Main", "-C"])
                .arg(&classes)
                .args([".", "-C"])
                .arg(&resources)
                .arg("."),
            "jar",
        )
        .await?;
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let sha256 = sha256_hex(&bytes);
        jars.push(Jar {
            variant: variant.clone(),
            path,
            bytes,
            sha256,
        });
    }
    Ok(jars)
}

/// SHA-256 of `bytes`, lowercase hex (as the deployers show it).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `name` on `PATH` (or in `$JAVA_HOME/bin`), else an error saying how to
/// install a JDK.
fn tool(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("JAVA_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(found) = dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file()) {
        return Ok(found);
    }
    bail!(
        "{name} not found on PATH or in $JAVA_HOME/bin: the deployment tests build real jars; \
         install a JDK (Debian: apt-get install default-jdk-headless), then run the tests again"
    )
}

/// Runs a JDK tool; fails with its output when it fails.
async fn run(cmd: &mut tokio::process::Command, what: &str) -> Result<Output> {
    let out = tokio::time::timeout(TOOL_TIMEOUT, cmd.kill_on_drop(true).output())
        .await
        .with_context(|| format!("{what} took over {TOOL_TIMEOUT:?}"))?
        .with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{Ipv4Addr, TcpListener, TcpStream},
        process::{Child, Command},
        time::Instant,
    };

    use super::*;

    /// `GET path` on `127.0.0.1:port` (HTTP/1.0): status and body.
    fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let status = answer
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_default();
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// Polls `path` until it answers `status`, at most 20 s.
    fn wait_for(child: &mut Child, port: u16, path: &str, status: u16) -> (u16, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(child.try_wait().unwrap().is_none(), "the service exited");
            match get(port, path) {
                Ok(answer) if answer.0 == status => return answer,
                other if Instant::now() > deadline => panic!("{path}: {other:?}"),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Kills the service when the test ends, also when it fails.
    struct Guard(Child);

    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap()
    }

    #[tokio::test]
    async fn jars_serve_their_version_and_health_and_stop_on_sigterm() {
        let dir = std::env::temp_dir().join(format!("mesh-e2e-java-{}", std::process::id()));
        let jars = build(
            &dir,
            &[
                Variant::healthy("v1"),
                Variant::unhealthy("v3-bad"),
                Variant::slow("v4-slow", Duration::from_secs(1)),
            ],
        )
        .await
        .unwrap();
        assert_eq!(jars.len(), 3);
        assert_ne!(jars[0].sha256, jars[1].sha256);
        for (jar, health) in jars.iter().zip([200, 500, 200]) {
            let port = free_port();
            let mut guard = Guard(
                Command::new("java")
                    .arg("-jar")
                    .arg(&jar.path)
                    .arg(format!("--server.port={port}"))
                    .arg("--server.address=127.0.0.1")
                    .spawn()
                    .unwrap(),
            );
            let child = &mut guard.0;
            if jar.variant.startup_delay > Duration::ZERO {
                wait_for(child, port, "/health", 503);
            }
            let version = &jar.variant.version;
            let (_, body) = wait_for(child, port, "/health", health);
            assert_eq!(body == "ok", health == 200, "{body}");
            assert_eq!(get(port, "/version").unwrap(), (200, version.clone()));
            assert_eq!(get(port, "/hello/version").unwrap(), (200, version.clone()));
            assert_eq!(
                get(port, "/hello/").unwrap(),
                (200, format!("hello from {version}"))
            );
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "{version} ignored SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
