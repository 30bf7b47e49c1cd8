//! The proxy's configuration: [`Args`] as given (flags, `MESH_*`
//! environment, TOML file; every field optional) and [`Config`], the typed
//! values [`Args::validate`] makes of them with the defaults of the port
//! table applied. Libraries take a [`Config`]; only `main` reads argv.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::Parser;
use mesh_runtime::{config::ConfigFile, duration::HumanDuration, logging::LogFormat};
use serde::{Deserialize, Serialize};

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
    /// Admin listener: /live /ready /routes /metrics (default 127.0.0.1:8889).
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
    /// Load balancing: round-robin or least-request (default round-robin).
    #[arg(long, env = "MESH_LB")]
    pub lb: Option<LoadBalancing>,
    /// Retries on another instance when it is safe (default 2).
    #[arg(long, env = "MESH_RETRIES")]
    pub retries: Option<u32>,
}

/// How an instance is picked among a service's healthy ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancing {
    /// Each instance in turn.
    #[default]
    RoundRobin,
    /// The less busy of two random instances (power of two choices on the
    /// number of requests in flight).
    LeastRequest,
}

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
    /// Load balancing.
    pub lb: LoadBalancing,
    /// Retries on another instance.
    pub retries: u32,
    /// Budget for one call to the bridge's Registry.
    pub registration_timeout: Duration,
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
        let retries = self.retries.unwrap_or(2);
        if retries > MAX_RETRIES {
            return Err(format!("retries: {retries} is more than {MAX_RETRIES}"));
        }
        Ok(Config {
            log_format: self.log_format.unwrap_or_default(),
            node,
            listen: self.listen.unwrap_or(([127, 0, 0, 1], 8888).into()),
            admin_listen: self.admin_listen.unwrap_or(([127, 0, 0, 1], 8889).into()),
            bridge_addr,
            services,
            data_dir: self
                .data_dir
                .unwrap_or_else(|| "/var/lib/meshwork/proxy".into()),
            request_timeout: secs(self.request_timeout, 15, "request_timeout")?,
            connect_timeout: secs(self.connect_timeout, 1, "connect_timeout")?,
            header_read_timeout: secs(self.header_read_timeout, 10, "header_read_timeout")?,
            max_header_bytes,
            lb: self.lb.unwrap_or_default(),
            retries,
            registration_timeout: Duration::from_secs(2),
        })
    }
}

impl ConfigFile for Args {
    fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
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

// === impl LoadBalancing ===

impl FromStr for LoadBalancing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" => Ok(Self::RoundRobin),
            "least-request" => Ok(Self::LeastRequest),
            other => Err(format!(
                "unknown load balancing {other:?}: expected round-robin or least-request"
            )),
        }
    }
}

impl fmt::Display for LoadBalancing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::RoundRobin => "round-robin",
            Self::LeastRequest => "least-request",
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
        assert_eq!(c.lb, LoadBalancing::RoundRobin);
        assert_eq!(c.retries, 2);
        assert!(c.services.is_empty());
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
        ] {
            let e = parse(argv).unwrap_err();
            assert!(e.contains(key), "{argv:?}: {e}");
        }
        assert!(parse(&["--lb", "random"]).is_err());
    }
}
