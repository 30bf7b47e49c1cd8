//! The proxy's configuration: [`Args`] as given (flags, `MESH_*`
//! environment, TOML file; every field optional) and [`Config`], the typed
//! values [`Args::validate`] makes of them with the defaults of the port
//! table applied. Libraries take a [`Config`]; only `main` reads argv.
//!
//! Route policies live in the file only: `[default_route]` and
//! `[routes.<service>]` tables of [`RouteSpec`] keys (see [`crate::policy`]).
//! `lb`, `retries` and `request_timeout` are the default route's `lb`,
//! `retries` and `timeout` as flags; setting both forms is refused.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::Parser;
use mesh_runtime::{
    config::ConfigFile, duration::HumanDuration, logging::LogFormat, pki::TrustDomain,
};
use serde::{Deserialize, Serialize};

use crate::policy::{Policies, RouteSpec};

/// hyper refuses a smaller read buffer than this, so it is also the floor
/// for `max_header_bytes`.
pub const MIN_HEADER_BYTES: usize = 8192;

/// The most retries a request may get: each one may cost a connect timeout.
pub const MAX_RETRIES: u32 = 10;

/// mesh-proxy's flags; each is also `MESH_<UPPER_SNAKE>` and a TOML key.
#[derive(Clone, Debug, Default, Parser, Serialize, Deserialize)]
#[command(
    name = "mesh-proxy",
    version,
    about = "Meshwork's sidecar proxy: routes calls by service name."
)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML config file; flags and environment win over it.
    #[arg(long, env = "MESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "MESH_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// This node's name (default: the host name).
    #[arg(long, env = "MESH_NODE")]
    pub node: Option<String>,
    /// Outbound listener local services call (default 127.0.0.1:8888).
    #[arg(long, env = "MESH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin listener: /live /ready /routes /stats /metrics (default 127.0.0.1:8889).
    #[arg(long, env = "MESH_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// The node's mesh-bridge gRPC address (default http://127.0.0.1:8890).
    #[arg(long, env = "MESH_BRIDGE_ADDR")]
    pub bridge_addr: Option<String>,
    /// Services this node calls, comma separated; empty means all.
    #[arg(long, env = "MESH_SERVICES", value_delimiter = ',')]
    #[serde(default)]
    pub services: Vec<String>,
    /// Folder for the routing dump and the registration queue
    /// (default /var/lib/meshwork/proxy).
    #[arg(long, env = "MESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Time a request may take up to the response headers (default 15s).
    #[arg(long, env = "MESH_REQUEST_TIMEOUT")]
    pub request_timeout: Option<HumanDuration>,
    /// Time a connection to an instance may take (default 1s).
    #[arg(long, env = "MESH_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<HumanDuration>,
    /// Time a client has to send a request's headers (default 10s).
    #[arg(long, env = "MESH_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Option<HumanDuration>,
    /// Largest request header block; larger ones get 431 (default 65536).
    #[arg(long, env = "MESH_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Time requests, streams and tunnels in flight get to finish after
    /// SIGTERM before the proxy exits (default 10s).
    #[arg(long, env = "MESH_DRAIN_GRACE")]
    pub drain_grace: Option<HumanDuration>,
    /// Load balancing: p2c-ewma, round-robin, least-request or
    /// consistent-hash (default p2c-ewma).
    #[arg(long, env = "MESH_LB")]
    pub lb: Option<LoadBalancing>,
    /// Retries on another instance when it is safe (default 2).
    #[arg(long, env = "MESH_RETRIES")]
    pub retries: Option<u32>,
    /// Concurrent requests the outbound listener takes before it answers
    /// 503 at once (default 10000; 0: no limit).
    #[arg(long, env = "MESH_LISTENER_MAX_REQUESTS")]
    pub listener_max_requests: Option<usize>,
    /// Client connections the outbound listener keeps open; past them a
    /// new one gets a 503 and is closed (default 10000; 0: no limit).
    #[arg(long, env = "MESH_LISTENER_MAX_CONNECTIONS")]
    pub listener_max_connections: Option<usize>,
    /// Threads serving requests (default: the CPUs this process may run
    /// on). With 1, every task runs on the thread that polls the sockets,
    /// without the multi-threaded scheduler.
    #[arg(long, env = "MESH_WORKERS")]
    pub workers: Option<usize>,
    /// Policy of every route, under the per-service ones (file only:
    /// `[default_route]`).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_route: Option<RouteSpec>,
    /// Inbound listener for other nodes' proxies (HTTP/2 between
    /// proxies), e.g. 0.0.0.0:8443; off unless set.
    #[arg(long, env = "MESH_INBOUND_LISTEN")]
    pub inbound_listen: Option<SocketAddr>,
    /// Address other nodes' proxies reach the inbound listener at (default:
    /// its listen IP, or the node's address in Consul when it listens on
    /// 0.0.0.0 or ::).
    #[arg(long, env = "MESH_INBOUND_ADDRESS")]
    pub inbound_address: Option<String>,
    /// Access log file: one JSON line per request (off unless set);
    /// reopened on SIGHUP and when rotated away.
    #[arg(long, env = "MESH_ACCESS_LOG")]
    pub access_log: Option<PathBuf>,
    /// Access log format: json, the only one for now (default json).
    #[arg(long, env = "MESH_ACCESS_LOG_FORMAT")]
    pub access_log_format: Option<AccessLogFormat>,
    /// OTLP/gRPC collector to export traces to, e.g. http://127.0.0.1:4317
    /// (off unless set): a server span per request received, a client
    /// span per attempt, W3C `traceparent` sent on.
    #[arg(long, env = "MESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// How calls reach another node's instances: direct (straight to the
    /// instance's address) or mtls (through that node's proxy's inbound
    /// listener over mutual TLS; services listen on loopback, and the
    /// inbound listener enforces intentions, which direct mode does not)
    /// (default direct).
    #[arg(long, env = "MESH_MODE")]
    pub mode: Option<MeshMode>,
    /// The folder the node's mesh-bridge keeps the credentials in (mtls
    /// mode): `ca.crt`, `node.key` + `node.crt`, `svc/<service>.key` + `.crt`.
    #[arg(long, env = "MESH_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The mesh's trust domain (default: the one ca.crt names in its
    /// `spiffe://<trust domain>` URI SAN).
    #[arg(long, env = "MESH_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Per-service route policies (file only: `[routes.<service>]`).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, RouteSpec>,
}

/// How an instance is picked among a service's healthy ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancing {
    /// The cheaper of two random instances, by peak-EWMA latency times
    /// requests in flight.
    #[default]
    P2cEwma,
    /// Each instance in turn.
    RoundRobin,
    /// The less busy of two random instances (power of two choices on the
    /// number of requests in flight).
    LeastRequest,
    /// By a hash of a header or cookie on a ring of the instances.
    ConsistentHash,
}

/// How calls reach another node's instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum MeshMode {
    /// Straight to the instance's address, in cleartext.
    #[default]
    Direct,
    /// Through the instance's node's proxy, over mutual TLS with mesh
    /// identities (see [`crate::tls`]); never straight to the instance.
    Mtls,
}

/// How access log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum AccessLogFormat {
    /// One JSON object per line (see [`crate::access_log`]).
    #[default]
    Json,
}

/// Most threads `workers` may ask for.
pub const MAX_WORKERS: usize = 1024;

/// The validated configuration the proxy runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Log format.
    pub log_format: LogFormat,
    /// This node's name, sent to the bridge when subscribing.
    pub node: String,
    /// Outbound listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// The bridge's gRPC URL.
    pub bridge_addr: String,
    /// Services to watch; empty means all.
    pub services: Vec<String>,
    /// Folder for `routes.dump` and `queue/`.
    pub data_dir: PathBuf,
    /// Budget for a request up to its response headers.
    pub request_timeout: Duration,
    /// Budget for one connect to an instance (and to the bridge).
    pub connect_timeout: Duration,
    /// Budget for a client to send its request headers.
    pub header_read_timeout: Duration,
    /// Largest request header block.
    pub max_header_bytes: usize,
    /// Time in-flight work gets to finish after SIGTERM.
    pub drain_grace: Duration,
    /// Load balancing of the default route.
    pub lb: LoadBalancing,
    /// Retries on another instance, on the default route.
    pub retries: u32,
    /// The rest of the default route's policy.
    pub default_route: RouteSpec,
    /// Per-service route policies, by lowercase service name.
    pub routes: BTreeMap<String, RouteSpec>,
    /// Concurrent requests on the outbound listener (`None`: no limit).
    pub listener_max_requests: Option<usize>,
    /// Open client connections on the outbound listener (`None`: no limit).
    pub listener_max_connections: Option<usize>,
    /// Threads serving requests (see [`crate::runtime`]).
    pub workers: usize,
    /// Budget for one call to the bridge's Registry.
    pub registration_timeout: Duration,
    /// The inbound listener for other nodes' proxies; `None`: off.
    pub inbound: Option<InboundConfig>,
    /// The access log file; `None`: off.
    pub access_log: Option<PathBuf>,
    /// The access log's format.
    pub access_log_format: AccessLogFormat,
    /// The OTLP collector traces are exported to; `None`: tracing off.
    pub otlp_endpoint: Option<String>,
    /// How calls reach another node's instances.
    pub mode: MeshMode,
    /// The credentials of mtls mode; `Some` exactly in that mode.
    pub tls: Option<TlsConfig>,
}

/// Where mtls mode finds its credentials (see [`crate::tls`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// The folder the node's mesh-bridge keeps up to date.
    pub dir: PathBuf,
    /// The trust domain; `None`: the one `ca.crt` names.
    pub trust_domain: Option<TrustDomain>,
}

/// The inbound listener other nodes' proxies send to (see [`crate::inbound`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The address it is registered with (`mesh-proxy` in Consul); `None`:
    /// the listen IP, or, for an unspecified one (0.0.0.0, ::), the node's
    /// own address as Consul knows it.
    pub address: Option<String>,
}

// === impl Args ===

impl Args {
    /// Applies defaults and checks every value; the error is one line
    /// naming the key and the value.
    pub fn validate(self) -> Result<Config, String> {
        let secs = |d: Option<HumanDuration>, default: u64, key: &str| {
            let d = d.map_or(Duration::from_secs(default), HumanDuration::get);
            if d.is_zero() {
                Err(format!("{key}: must be more than 0"))
            } else {
                Ok(d)
            }
        };
        let node = match self.node {
            Some(n) if n.trim().is_empty() => return Err("node: must not be empty".into()),
            Some(n) => n,
            None => hostname(),
        };
        let bridge_addr = self
            .bridge_addr
            .unwrap_or_else(|| "http://127.0.0.1:8890".into());
        check_url(&bridge_addr).map_err(|e| format!("bridge_addr: {bridge_addr:?}: {e}"))?;
        let mut services = Vec::with_capacity(self.services.len());
        for s in self.services {
            let s = s.trim();
            if s.is_empty() {
                continue;
            }
            crate::agent::check_name(s).map_err(|e| format!("services: {e}"))?;
            // As given: Consul's names are case-sensitive, the bridge
            // looks them up as they are.
            services.push(s.to_owned());
        }
        let max_header_bytes = self.max_header_bytes.unwrap_or(65536);
        if !(MIN_HEADER_BYTES..=16 << 20).contains(&max_header_bytes) {
            return Err(format!(
                "max_header_bytes: {max_header_bytes} is outside {MIN_HEADER_BYTES}..=16777216"
            ));
        }
        let workers = match self.workers {
            Some(n) if !(1..=MAX_WORKERS).contains(&n) => {
                return Err(format!("workers: {n} is outside 1..={MAX_WORKERS}"));
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS)),
        };
        // The flags and the default route's keys are one setting each.
        let mut default_route = self.default_route.unwrap_or_default();
        let both = |key: &str, route_key: &str| {
            format!("{key} and default_route.{route_key} are both set; keep one")
        };
        if self.lb.is_some() && default_route.lb.is_some() {
            return Err(both("lb", "lb"));
        }
        if self.retries.is_some() && default_route.retries.is_some() {
            return Err(both("retries", "retries"));
        }
        if self.request_timeout.is_some() && default_route.timeout.is_some() {
            return Err(both("request_timeout", "timeout"));
        }
        let lb = self.lb.or(default_route.lb.take()).unwrap_or_default();
        let retries = self.retries.or(default_route.retries.take()).unwrap_or(2);
        if retries > MAX_RETRIES {
            return Err(format!("retries: {retries} is more than {MAX_RETRIES}"));
        }
        let request_timeout = self.request_timeout.or(default_route.timeout.take());
        let mut routes = BTreeMap::new();
        for (name, spec) in self.routes {
            crate::agent::check_name(&name).map_err(|e| format!("routes.{name}: {e}"))?;
            if routes.insert(name.to_ascii_lowercase(), spec).is_some() {
                return Err(format!("routes.{name}: given twice (names ignore case)"));
            }
        }
        let listen = self.listen.unwrap_or(([127, 0, 0, 1], 8888).into());
        let admin_listen = self.admin_listen.unwrap_or(([127, 0, 0, 1], 8889).into());
        let inbound = inbound(
            self.inbound_listen,
            self.inbound_address,
            &[("listen", listen), ("admin_listen", admin_listen)],
        )?;
        let access_log = match self.access_log {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) if p.is_dir() || p.as_os_str().to_string_lossy().ends_with('/') => {
                return Err(format!(
                    "access_log: {} is a folder; give a file path",
                    p.display()
                ));
            }
            Some(p)
                if p.parent()
                    .is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir()) =>
            {
                return Err(format!(
                    "access_log: {}: its folder does not exist",
                    p.display()
                ));
            }
            p => p,
        };
        let mode = self.mode.unwrap_or_default();
        let tls = tls(
            mode,
            self.tls_dir,
            self.trust_domain,
            &node,
            inbound.is_some(),
        )?;
        let config = Config {
            log_format: self.log_format.unwrap_or_default(),
            node,
            listen,
            admin_listen,
            bridge_addr,
            services,
            data_dir: self
                .data_dir
                .unwrap_or_else(|| "/var/lib/meshwork/proxy".into()),
            request_timeout: secs(request_timeout, 15, "request_timeout")?,
            connect_timeout: secs(self.connect_timeout, 1, "connect_timeout")?,
            header_read_timeout: secs(self.header_read_timeout, 10, "header_read_timeout")?,
            max_header_bytes,
            drain_grace: secs(self.drain_grace, 10, "drain_grace")?,
            lb,
            retries,
            default_route,
            routes,
            listener_max_requests: match self.listener_max_requests.unwrap_or(10_000) {
                0 => None,
                n => Some(n),
            },
            listener_max_connections: match self.listener_max_connections.unwrap_or(10_000) {
                0 => None,
                n => Some(n),
            },
            workers,
            registration_timeout: Duration::from_secs(2),
            inbound,
            access_log,
            access_log_format: self.access_log_format.unwrap_or_default(),
            otlp_endpoint: self.otlp_endpoint.filter(|e| !e.trim().is_empty()),
            mode,
            tls,
        };
        // Every route's policy, checked now rather than on first use.
        Policies::from_config(&config)?;
        Ok(config)
    }
}

impl ConfigFile for Args {
    fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }
}

/// The inbound listener's settings, checked: its address must be one other
/// nodes can reach, and its port none of the proxy's other listeners.
fn inbound(
    listen: Option<SocketAddr>,
    address: Option<String>,
    others: &[(&str, SocketAddr)],
) -> Result<Option<InboundConfig>, String> {
    let address = address
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty());
    let Some(listen) = listen else {
        return match address {
            Some(a) => Err(format!(
                "inbound_address: {a:?} is set but inbound_listen is not"
            )),
            None => Ok(None),
        };
    };
    if let Some((key, _)) = others
        .iter()
        .find(|(_, other)| listen.port() != 0 && overlaps(listen, *other))
    {
        return Err(format!(
            "inbound_listen: {listen} is also {key}; give the inbound listener a port of its own"
        ));
    }
    match &address {
        Some(a) => check_address(a).map_err(|e| format!("inbound_address: {a:?} {e}"))?,
        None if listen.ip().is_loopback() => {
            return Err(format!(
                "inbound_listen: {listen} is a loopback address other nodes cannot reach; \
                 listen on the node's address or 0.0.0.0, or set inbound_address"
            ));
        }
        None => {}
    }
    Ok(Some(InboundConfig { listen, address }))
}

/// The settings of mtls mode, checked: it needs the credentials' folder,
/// an inbound listener (other nodes' proxies reach this node's services
/// through it), and a node name that can be an identity.
fn tls(
    mode: MeshMode,
    dir: Option<PathBuf>,
    trust_domain: Option<String>,
    node: &str,
    inbound: bool,
) -> Result<Option<TlsConfig>, String> {
    let dir = dir.filter(|d| !d.as_os_str().is_empty());
    let trust_domain = trust_domain
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    if mode == MeshMode::Direct {
        return match (dir, trust_domain) {
            (Some(d), _) => Err(format!(
                "tls_dir: {} is set but mode is direct; set mode = \"mtls\" or remove it",
                d.display()
            )),
            (None, Some(t)) => Err(format!(
                "trust_domain: {t:?} is set but mode is direct; set mode = \"mtls\" or remove it"
            )),
            (None, None) => Ok(None),
        };
    }
    let dir =
        dir.ok_or("mode: mtls needs tls_dir, the folder with ca.crt, node.key and node.crt")?;
    if !dir.is_dir() {
        return Err(format!("tls_dir: {} is not a folder", dir.display()));
    }
    if !inbound {
        return Err(
            "mode: mtls needs inbound_listen: other nodes' proxies reach this node's services through it"
                .into(),
        );
    }
    let trust_domain = trust_domain
        .map(|t| TrustDomain::new(&t).map_err(|e| format!("trust_domain: {e}")))
        .transpose()?;
    mesh_runtime::pki::spiffe::check_node_name(node)
        .map_err(|e| format!("node: {node:?} cannot name the node's identity in mtls mode: {e}"))?;
    Ok(Some(TlsConfig { dir, trust_domain }))
}

/// Whether two listen addresses would share a port.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// An address other hosts can connect to: an IP that is not unspecified,
/// or a host name.
fn check_address(a: &str) -> Result<(), String> {
    if let Ok(ip) = a.parse::<IpAddr>() {
        return if ip.is_unspecified() {
            Err("is unspecified: give the address other nodes reach this one at".into())
        } else {
            Ok(())
        };
    }
    let host = a.strip_suffix('.').unwrap_or(a);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if host.len() <= 253 && host.split('.').all(label_ok) {
        Ok(())
    } else {
        Err("is neither an IP address nor a host name".into())
    }
}

fn check_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => Err("expected http://host:port".into()),
    }
}

/// The kernel's host name, or `localhost` when it cannot be read.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

// === impl AccessLogFormat ===

impl FromStr for AccessLogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown access log format {other:?}: expected json"
            )),
        }
    }
}

impl TryFrom<String> for AccessLogFormat {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        // The file's error names the key, as the flag's does.
        s.parse().map_err(|e| format!("access_log_format: {e}"))
    }
}

// === impl MeshMode ===

impl FromStr for MeshMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "direct" => Ok(Self::Direct),
            "mtls" => Ok(Self::Mtls),
            other => Err(format!("unknown mode {other:?}: expected direct or mtls")),
        }
    }
}

impl TryFrom<String> for MeshMode {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse().map_err(|e| format!("mode: {e}"))
    }
}

impl fmt::Display for MeshMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Mtls => "mtls",
        })
    }
}

// === impl LoadBalancing ===

impl FromStr for LoadBalancing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "p2c-ewma" => Ok(Self::P2cEwma),
            "round-robin" => Ok(Self::RoundRobin),
            "least-request" => Ok(Self::LeastRequest),
            "consistent-hash" => Ok(Self::ConsistentHash),
            other => Err(format!(
                "unknown load balancing {other:?}: expected p2c-ewma, round-robin, \
                 least-request or consistent-hash"
            )),
        }
    }
}

impl fmt::Display for LoadBalancing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::P2cEwma => "p2c-ewma",
            Self::RoundRobin => "round-robin",
            Self::LeastRequest => "least-request",
            Self::ConsistentHash => "consistent-hash",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Config, String> {
        let mut full = vec!["mesh-proxy"];
        full.extend_from_slice(argv);
        Args::try_parse_from(full)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn defaults_follow_the_port_table() {
        let c = parse(&["--node", "n1"]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8888".parse().unwrap());
        assert_eq!(c.admin_listen, "127.0.0.1:8889".parse().unwrap());
        assert_eq!(c.bridge_addr, "http://127.0.0.1:8890");
        assert_eq!(c.request_timeout, Duration::from_secs(15));
        assert_eq!(c.connect_timeout, Duration::from_secs(1));
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.max_header_bytes, 65536);
        assert_eq!(c.drain_grace, Duration::from_secs(10));
        assert_eq!(c.lb, LoadBalancing::P2cEwma);
        assert_eq!(c.retries, 2);
        assert_eq!(c.listener_max_requests, Some(10_000));
        assert_eq!(c.listener_max_connections, Some(10_000));
        assert_eq!(
            c.workers,
            std::thread::available_parallelism().unwrap().get(),
            "one worker per CPU the process may run on"
        );
        assert_eq!(parse(&["--workers", "1"]).unwrap().workers, 1);
        assert!(c.services.is_empty());
        assert_eq!(c.inbound, None, "the inbound listener is off unless set");
        assert_eq!(c.access_log, None, "the access log is off unless set");
        assert_eq!(c.access_log_format, AccessLogFormat::Json);
    }

    #[test]
    fn the_access_log_is_a_file_path_in_json() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("access.log");
        let c = parse(&["--access-log", file.to_str().unwrap()]).unwrap();
        assert_eq!(c.access_log.as_ref(), Some(&file));
        let text = format!(
            "access_log = {:?}\naccess_log_format = \"json\"",
            file.display().to_string()
        );
        let c = from_file(&text, &[]).unwrap();
        assert_eq!(c.access_log, Some(file));
        assert_eq!(
            from_file("access_log = \"\"", &[]).unwrap().access_log,
            None
        );
        let e = parse(&["--access-log", dir.path().to_str().unwrap()]).unwrap_err();
        assert!(e.starts_with("access_log: ") && e.contains("folder"), "{e}");
        let missing = dir.path().join("nowhere").join("access.log");
        let e = parse(&["--access-log", missing.to_str().unwrap()]).unwrap_err();
        assert!(
            e.starts_with("access_log: ") && e.contains("does not exist"),
            "{e}"
        );
        let e = from_file("access_log_format = \"combined\"", &[]).unwrap_err();
        assert!(
            e.contains("access_log_format: ") && e.contains("\"combined\": expected json"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        let e = parse(&["--access-log-format", "combined"]).unwrap_err();
        assert!(
            e.contains("--access-log-format") && e.contains("json"),
            "{e}"
        );
    }

    #[test]
    fn the_inbound_listener_takes_a_reachable_address_and_a_port_of_its_own() {
        let c = parse(&["--inbound-listen", "0.0.0.0:8443"]).unwrap();
        assert_eq!(
            c.inbound,
            Some(InboundConfig {
                listen: "0.0.0.0:8443".parse().unwrap(),
                address: None
            })
        );
        let c = parse(&[
            "--inbound-listen",
            "127.0.0.1:0",
            "--inbound-address",
            "node1.example",
        ])
        .unwrap();
        assert_eq!(c.inbound.unwrap().address.as_deref(), Some("node1.example"));
        for (argv, key, what) in [
            (
                &["--inbound-listen", "127.0.0.1:8443"][..],
                "inbound_listen",
                "loopback",
            ),
            (
                &["--inbound-address", "10.0.0.1"][..],
                "inbound_address",
                "inbound_listen is not",
            ),
            (
                &["--inbound-listen", "0.0.0.0:8888"][..],
                "inbound_listen",
                "also listen",
            ),
            (
                &[
                    "--inbound-listen",
                    "10.0.0.1:8889",
                    "--admin-listen",
                    "0.0.0.0:8889",
                ][..],
                "inbound_listen",
                "also admin_listen",
            ),
            (
                &[
                    "--inbound-listen",
                    "0.0.0.0:8443",
                    "--inbound-address",
                    "0.0.0.0",
                ][..],
                "inbound_address",
                "unspecified",
            ),
            (
                &[
                    "--inbound-listen",
                    "0.0.0.0:8443",
                    "--inbound-address",
                    "not a host!",
                ][..],
                "inbound_address",
                "neither",
            ),
        ] {
            let e = parse(argv).unwrap_err();
            assert!(e.starts_with(key) && e.contains(what), "{argv:?}: {e}");
        }
    }

    #[test]
    fn mtls_mode_needs_its_folder_and_an_inbound_listener() {
        let c = parse(&["--node", "n1"]).unwrap();
        assert_eq!(
            (c.mode, c.tls),
            (MeshMode::Direct, None),
            "direct by default"
        );
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().to_str().unwrap();
        let c = parse(&[
            "--mode",
            "mtls",
            "--tls-dir",
            tls_dir,
            "--inbound-listen",
            "0.0.0.0:8443",
            "--trust-domain",
            "mesh.example",
        ])
        .unwrap();
        assert_eq!(c.mode, MeshMode::Mtls);
        let tls = c.tls.unwrap();
        assert_eq!(tls.dir, dir.path());
        assert_eq!(tls.trust_domain.unwrap().as_str(), "mesh.example");
        let text =
            format!("mode = \"mtls\"\ntls_dir = {tls_dir:?}\ninbound_listen = \"0.0.0.0:8443\"");
        let c = from_file(&text, &[]).unwrap();
        assert_eq!(c.mode, MeshMode::Mtls);
        assert_eq!(c.tls.unwrap().trust_domain, None, "read from ca.crt");

        let missing = dir.path().join("nowhere");
        let missing = missing.to_str().unwrap();
        let inbound = ["--inbound-listen", "0.0.0.0:8443"];
        for (argv, key, what) in [
            (vec!["--mode", "mtls"], "mode", "needs tls_dir"),
            (
                vec!["--mode", "mtls", "--tls-dir", tls_dir],
                "mode",
                "needs inbound_listen",
            ),
            (
                vec!["--mode", "mtls", "--tls-dir", missing],
                "tls_dir",
                "not a folder",
            ),
            (vec!["--tls-dir", tls_dir], "tls_dir", "mode is direct"),
            (
                vec!["--trust-domain", "mesh.example"],
                "trust_domain",
                "mode is direct",
            ),
            (
                vec![
                    "--mode",
                    "mtls",
                    "--tls-dir",
                    tls_dir,
                    "--trust-domain",
                    "Mesh",
                ],
                "trust_domain",
                "lowercase",
            ),
            (
                vec!["--mode", "mtls", "--tls-dir", tls_dir, "--node", "bad node"],
                "node",
                "identity",
            ),
        ] {
            let mut argv = argv;
            if !argv.contains(&"--inbound-listen") && what != "needs inbound_listen" {
                argv.extend(inbound);
            }
            let e = parse(&argv).unwrap_err();
            assert!(e.starts_with(key) && e.contains(what), "{argv:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = from_file("mode = \"tls\"", &[]).unwrap_err();
        assert!(
            e.contains("mode: ") && e.contains("expected direct or mtls"),
            "{e}"
        );
        let e = parse(&["--mode", "tls"]).unwrap_err();
        assert!(e.contains("--mode") && e.contains("mtls"), "{e}");
    }

    #[test]
    fn flags_are_parsed() {
        let c = parse(&[
            "--lb",
            "least-request",
            "--services",
            "orders,Billing",
            "--request-timeout",
            "250ms",
            "--retries",
            "0",
        ])
        .unwrap();
        assert_eq!(c.lb, LoadBalancing::LeastRequest);
        assert_eq!(c.services, vec!["orders", "Billing"]);
        assert_eq!(c.request_timeout, Duration::from_millis(250));
        assert_eq!(c.retries, 0);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (argv, key) in [
            (&["--max-header-bytes", "100"][..], "max_header_bytes"),
            (&["--retries", "99"][..], "retries"),
            (&["--bridge-addr", "nowhere"][..], "bridge_addr"),
            (&["--connect-timeout", "0s"][..], "connect_timeout"),
            (&["--services", "bad name"][..], "services"),
            (&["--services", "orders,mesh-proxy"][..], "services"),
            (&["--workers", "0"][..], "workers"),
            (&["--workers", "1025"][..], "workers"),
        ] {
            let e = parse(argv).unwrap_err();
            assert!(e.contains(key), "{argv:?}: {e}");
        }
        assert!(parse(&["--lb", "random"]).is_err());
    }

    fn from_file(text: &str, argv: &[&str]) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        let mut full = vec!["mesh-proxy", "--config", path.to_str().unwrap()];
        full.extend_from_slice(argv);
        let args = Args::try_parse_from(full).map_err(|e| e.to_string())?;
        mesh_runtime::config::merge(args)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn route_policies_come_from_the_file() {
        let c = from_file(
            r#"
            listener_max_requests = 0
            [default_route]
            lb = "round-robin"
            timeout = "3s"
            per_try_timeout = "1s"
            [routes.Orders]
            lb = "consistent-hash"
            hash_cookie = "session"
            [routes.checkout]
            weights = { v2 = 10, v1 = 90 }
            retries = 3
            retry_non_idempotent = true
            "#,
            &["--retries", "1"],
        )
        .unwrap();
        assert_eq!(c.lb, LoadBalancing::RoundRobin);
        assert_eq!(c.retries, 1);
        assert_eq!(c.request_timeout, Duration::from_secs(3));
        assert_eq!(c.listener_max_requests, None);
        let p = Policies::from_config(&c).unwrap();
        let orders = p.get("orders");
        assert_eq!(orders.lb, LoadBalancing::ConsistentHash);
        assert_eq!(orders.per_try_timeout, Some(Duration::from_secs(1)));
        assert_eq!(orders.retries, 1);
        let checkout = p.get("checkout");
        assert_eq!(checkout.lb, LoadBalancing::RoundRobin);
        assert_eq!(checkout.retries, 3);
        assert!(checkout.retry_non_idempotent);
        assert_eq!(checkout.weights.len(), 2);
        assert_eq!(p.get("other").timeout, Duration::from_secs(3));
    }

    #[test]
    fn a_bad_route_policy_is_one_line_naming_the_key() {
        for (text, argv, key) in [
            (
                "[routes.orders]\nretries = 99",
                &[][..],
                "routes.orders.retries",
            ),
            ("[routes.orders]\nlbb = \"x\"", &[][..], "lbb"),
            (
                "[routes.\"bad name\"]\nretries = 1",
                &[][..],
                "routes.bad name",
            ),
            (
                "[default_route]\nlb = \"round-robin\"",
                &["--lb", "p2c-ewma"][..],
                "default_route.lb",
            ),
            (
                "[default_route]\nper_try_timeout = \"0s\"",
                &[][..],
                "default_route.per_try_timeout",
            ),
        ] {
            let e = from_file(text, argv).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
