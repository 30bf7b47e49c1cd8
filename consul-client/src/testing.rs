//! A real Consul dev agent for integration tests (feature `test-support`).
//!
//! The binary is found through `MESH_CONSUL_BIN`, then `PATH`, then
//! `~/.local/share/meshwork/bin/consul` (where the project's install script
//! puts it). A missing binary fails the test with a message saying so: a
//! test that claims Consul works must never pass without Consul.
//!
//! Every port is free and picked at start; the agent is killed when the
//! [`DevAgent`] is dropped, also when the test panics.

use std::{
    env,
    fs::File,
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Client, ClientConfig};

/// How long an agent may take to elect itself leader.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// How many times [`DevAgent::start`] tries fresh ports.
const START_ATTEMPTS: usize = 3;

/// The ports of a dev agent; keep them to restart it in the same place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    /// HTTP API.
    pub http: u16,
    /// Serf LAN gossip.
    pub serf_lan: u16,
    /// Serf WAN gossip.
    pub serf_wan: u16,
    /// Server RPC.
    pub server: u16,
}

/// A running `consul agent -dev`, killed on drop.
#[derive(Debug)]
pub struct DevAgent {
    child: Option<Child>,
    ports: Ports,
    extra_hcl: Vec<String>,
    log: PathBuf,
}

// === impl Ports ===

impl Ports {
    /// Four distinct ports free right now, for TCP and UDP alike (Serf
    /// gossips over both).
    pub fn free() -> Self {
        let [http, serf_lan, serf_wan, server] = free_ports();
        Self {
            http,
            serf_lan,
            serf_wan,
            server,
        }
    }
}

// === impl DevAgent ===

impl DevAgent {
    /// Starts a dev agent on free ports and waits until it is leader.
    ///
    /// A port is free when picked but may be taken by another test before
    /// the agent binds it; an agent that exits for that reason is started
    /// again on fresh ports, a bounded number of times.
    pub async fn start() -> Self {
        let mut attempt = 1;
        loop {
            match Self::try_start(Ports::free(), Vec::new()).await {
                Ok(agent) => return agent,
                Err(Failure::PortTaken(log)) if attempt < START_ATTEMPTS => {
                    eprintln!("consul lost a port to another process, retrying:\n{log}");
                    attempt += 1;
                }
                Err(failure) => panic!("{failure}"),
            }
        }
    }

    /// Starts a dev agent on `ports` with extra `-hcl` snippets (TLS
    /// settings, say) and waits until it answers.
    pub async fn start_with(ports: Ports, extra_hcl: Vec<String>) -> Self {
        Self::try_start(ports, extra_hcl)
            .await
            .unwrap_or_else(|failure| panic!("{failure}"))
    }

    async fn try_start(ports: Ports, extra_hcl: Vec<String>) -> Result<Self, Failure> {
        let log = env::temp_dir().join(format!("meshwork-consul-{}.log", ports.http));
        let mut agent = Self {
            child: None,
            ports,
            extra_hcl,
            log,
        };
        agent.spawn();
        agent.wait_ready().await?;
        Ok(agent)
    }

    /// The HTTP address, `http://127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.http)
    }

    /// The agent's ports.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// Kills the agent (all its state is lost: dev agents keep none).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh dev agent on the same ports.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn();
        if let Err(failure) = self.wait_ready().await {
            panic!("{failure}");
        }
    }

    /// Waits until the agent has a leader and its own node is in the
    /// catalog (sessions need it); fails with the agent's log when it
    /// exits or does not within the deadline.
    async fn wait_ready(&mut self) -> Result<(), Failure> {
        let client = Client::new(&ClientConfig::new([self.addr()])).expect("a valid test address");
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let log = self.log_tail();
                return Err(if port_taken(&log) {
                    Failure::PortTaken(log)
                } else {
                    Failure::Exited(status.to_string(), log)
                });
            }
            if is_ready(&client).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Failure::NoLeader(self.log_tail()))
    }

    fn spawn(&mut self) {
        let bin = consul_bin().unwrap_or_else(|| {
            panic!(
                "consul not found: set MESH_CONSUL_BIN, put consul on PATH, or install it to \
                 ~/.local/share/meshwork/bin/consul (the project's install script does)"
            )
        });
        let log = File::create(&self.log).expect("the temp dir is writable");
        let err = log.try_clone().expect("a log file handle can be cloned");
        let p = self.ports;
        let mut cmd = Command::new(&bin);
        cmd.args([
            "agent",
            "-dev",
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
        ])
        .args(["-dns-port", "-1", "-grpc-port", "-1"])
        .args(["-http-port", &p.http.to_string()])
        .args(["-serf-lan-port", &p.serf_lan.to_string()])
        .args(["-serf-wan-port", &p.serf_wan.to_string()])
        .args(["-server-port", &p.server.to_string()])
        .args(["-hcl", "disable_update_check = true"]);
        for hcl in &self.extra_hcl {
            cmd.args(["-hcl", hcl]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        self.child = Some(child);
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for DevAgent {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Why an agent did not come up.
#[derive(Debug)]
enum Failure {
    /// It could not bind a port (another process took it after the pick).
    PortTaken(String),
    /// It exited for another reason.
    Exited(String, String),
    /// It ran but elected no leader in time.
    NoLeader(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PortTaken(log) => write!(f, "consul could not bind its ports:\n{log}"),
            Self::Exited(status, log) => write!(f, "consul exited early ({status}):\n{log}"),
            Self::NoLeader(log) => {
                write!(
                    f,
                    "consul elected no leader within {START_DEADLINE:?}:\n{log}"
                )
            }
        }
    }
}

/// Whether an agent's log says it lost a port.
fn port_taken(log: &str) -> bool {
    log.contains("address already in use") || log.contains("already configured")
}

/// Leader elected and the agent's node registered (the `consul` service
/// appears with it).
async fn is_ready(client: &Client) -> bool {
    if !client.status_leader().await.is_ok_and(|l| !l.is_empty()) {
        return false;
    }
    client
        .catalog_services(crate::QueryOptions::default())
        .await
        .is_ok_and(|r| r.value.contains_key("consul"))
}

/// The consul binary: `MESH_CONSUL_BIN`, `PATH`, or the project's install
/// location.
pub fn consul_bin() -> Option<PathBuf> {
    if let Some(bin) = env::var_os("MESH_CONSUL_BIN") {
        return Some(PathBuf::from(bin)).filter(|p| p.is_file());
    }
    let on_path = env::var_os("PATH")
        .into_iter()
        .flat_map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("consul"))
        .find(|p| p.is_file());
    on_path.or_else(|| {
        let home = env::var_os("HOME")?;
        let p = Path::new(&home).join(".local/share/meshwork/bin/consul");
        p.is_file().then_some(p)
    })
}

/// `N` distinct ports that are free right now for both TCP and UDP on
/// loopback. Every port is held until all are picked, so the kernel
/// cannot hand out one of them twice.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let mut held = Vec::with_capacity(N);
    while held.len() < N {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 works");
        let port = tcp
            .local_addr()
            .expect("a bound socket has an address")
            .port();
        if let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)) {
            held.push((port, tcp, udp));
        }
    }
    std::array::from_fn(|i| held[i].0)
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 works")
}
