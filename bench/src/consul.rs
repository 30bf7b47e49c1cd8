//! A Consul dev agent on free loopback ports (in memory, leader of itself)
//! and the few API calls the propagation and fan-out phases make. The
//! agent allows 4,096 connections per client address: the bridge holds one
//! blocking query per service (1,001 with the fan-out's catalog), over the
//! default of 200.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use consul_client::testing::free_ports;
use http::Method;
use serde_json::json;

use crate::{http::Client, process::Proc};

/// A running dev agent; killed when dropped.
#[derive(Debug)]
pub struct Consul {
    proc: Proc,
    http: SocketAddr,
}

// === impl Consul ===

impl Consul {
    /// Starts `consul agent -dev` logging in `dir`, and waits until it is
    /// leader with its own node in the catalog.
    pub async fn start(bin: &Path, dir: &Path) -> Result<Self> {
        let [http, serf_lan, serf_wan, server] = free_ports();
        let http = SocketAddr::from(([127, 0, 0, 1], http));
        let port = |p: u16| p.to_string();
        let args: Vec<String> = vec![
            "agent".into(),
            "-dev".into(),
            "-bind".into(),
            "127.0.0.1".into(),
            "-client".into(),
            "127.0.0.1".into(),
            "-log-level".into(),
            "warn".into(),
            "-dns-port".into(),
            "-1".into(),
            "-grpc-port".into(),
            "-1".into(),
            "-http-port".into(),
            port(http.port()),
            "-serf-lan-port".into(),
            port(serf_lan),
            "-serf-wan-port".into(),
            port(serf_wan),
            "-server-port".into(),
            port(server),
            "-hcl".into(),
            "disable_update_check = true".into(),
            "-hcl".into(),
            "limits { http_max_conns_per_client = 4096 }".into(),
        ];
        let mut proc = Proc::spawn("consul", bin, &args, None, dir, &[])?;
        let mut client = Client::new(http);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            proc.check()?;
            if ready(&mut client).await {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("consul elected no leader in 30s:\n{}", proc.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { proc, http })
    }

    /// Its HTTP address.
    pub fn addr(&self) -> SocketAddr {
        self.http
    }

    /// Its HTTP URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The process.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Its log file.
    pub fn log(&self) -> PathBuf {
        self.proc.log().to_owned()
    }
}

async fn ready(client: &mut Client) -> bool {
    let leader = client.get("consul", "/v1/status/leader").await;
    if !leader.is_ok_and(|r| r.status.is_success() && r.body.len() > 2) {
        return false;
    }
    client
        .get("consul", "/v1/catalog/services")
        .await
        .ok()
        .and_then(|r| r.json().ok())
        .is_some_and(|v| v.get("consul").is_some())
}

/// Registers an instance with the agent (no check: it is passing).
pub async fn agent_register(
    client: &mut Client,
    name: &str,
    id: &str,
    addr: SocketAddr,
) -> Result<()> {
    let body =
        json!({"Name": name, "ID": id, "Address": addr.ip().to_string(), "Port": addr.port()});
    expect_ok(
        client.put_json("/v1/agent/service/register", &body).await?,
        "register",
    )
}

/// Deregisters an instance from the agent.
pub async fn agent_deregister(client: &mut Client, id: &str) -> Result<()> {
    let path = format!("/v1/agent/service/deregister/{id}");
    expect_ok(
        client.put_json(&path, &serde_json::Value::Null).await?,
        "deregister",
    )
}

/// An instance of a service on an external node, written to the catalog
/// directly: the agent's anti-entropy leaves other nodes alone, and 10,000
/// of them register far faster than through the agent's local state.
#[derive(Clone, Debug)]
pub struct CatalogEntry<'a> {
    /// Node name.
    pub node: &'a str,
    /// Node address.
    pub node_addr: &'a str,
    /// Service name.
    pub service: &'a str,
    /// Instance ID.
    pub id: &'a str,
    /// Instance address.
    pub address: &'a str,
    /// Instance port.
    pub port: u16,
}

/// Writes `entry` to the catalog.
pub async fn catalog_register(client: &mut Client, entry: &CatalogEntry<'_>) -> Result<()> {
    let body = json!({
        "Node": entry.node,
        "Address": entry.node_addr,
        "Service": {
            "ID": entry.id,
            "Service": entry.service,
            "Address": entry.address,
            "Port": entry.port,
            "Tags": ["v1"],
            "Meta": {"version": "1"},
        },
        "SkipNodeUpdate": true,
    });
    expect_ok(
        client.put_json("/v1/catalog/register", &body).await?,
        "catalog register",
    )
}

/// A blocking read of `path` from `index`, held up to `wait`; returns the
/// new index.
pub async fn blocking(client: &mut Client, path: &str, index: u64, wait: Duration) -> Result<u64> {
    let sep = if path.contains('?') { '&' } else { '?' };
    let full = format!("{path}{sep}index={index}&wait={}ms", wait.as_millis());
    let reply = client
        .request(
            Method::GET,
            "consul",
            &full,
            Bytes::new(),
            wait + wait / 8 + Duration::from_secs(5),
        )
        .await?;
    if !reply.status.is_success() {
        bail!("GET {full}: {}", reply.status);
    }
    reply
        .header("x-consul-index")
        .and_then(|i| i.parse().ok())
        .with_context(|| format!("GET {full}: no X-Consul-Index"))
}

fn expect_ok(reply: crate::http::Reply, what: &str) -> Result<()> {
    if !reply.status.is_success() {
        bail!(
            "consul {what}: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
    }
    Ok(())
}
