//! mesh-bridge's configuration: [`Args`] as given (flags, `MESH_*`
//! environment, TOML file; every key in all three), and [`Config`], the
//! checked values with defaults applied by [`Args::validate`].

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use consul_client::ClientConfig;
use mesh_runtime::{config::ConfigFile, duration::HumanDuration, logging::LogFormat};
use serde::{Deserialize, Serialize};

use crate::identity::IdentityConfig;

/// The bridge's flags; each also `MESH_<NAME>` and a TOML key `<name>`.
#[derive(Parser, Serialize, Deserialize, Default)]
#[command(
    name = "mesh-bridge",
    version,
    about = "Watches Consul and streams healthy endpoints to proxies; carries registrations to Consul."
)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML config file; flags and environment win over it.
    #[arg(long, env = "MESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "MESH_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// OTLP/gRPC collector to export traces to, e.g. http://127.0.0.1:4317
    /// (off unless set): a span per gRPC call served.
    #[arg(long, env = "MESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// This node's name, for logs [default: the hostname].
    #[arg(long, env = "MESH_NODE")]
    pub node: Option<String>,
    /// Consul agent addresses, tried in order; the first is the local agent
    /// that registrations go to [default: http://127.0.0.1:8500].
    #[arg(long, env = "MESH_CONSUL_ADDR", value_delimiter = ',')]
    #[serde(default)]
    pub consul_addr: Vec<String>,
    /// Consul ACL token.
    #[arg(long, env = "MESH_CONSUL_TOKEN", hide_env_values = true)]
    pub consul_token: Option<String>,
    /// CA certificate (PEM) for https:// Consul addresses.
    #[arg(long, env = "MESH_CONSUL_CA_FILE")]
    pub consul_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for Consul.
    #[arg(long, env = "MESH_CONSUL_CERT_FILE")]
    pub consul_cert_file: Option<PathBuf>,
    /// Client certificate key (PEM) for Consul.
    #[arg(long, env = "MESH_CONSUL_KEY_FILE")]
    pub consul_key_file: Option<PathBuf>,
    /// gRPC listener (Registry, Discovery, health) [default: 127.0.0.1:8890].
    #[arg(long, env = "MESH_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Admin listener (/live, /ready, /metrics) [default: 127.0.0.1:8891].
    #[arg(long, env = "MESH_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// State folder; holds the durable registration queue
    /// [default: /var/lib/meshwork/bridge].
    #[arg(long, env = "MESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// How long Consul may hold a blocking query, 1s to 10m [default: 60s].
    #[arg(long, env = "MESH_WAIT")]
    pub wait: Option<HumanDuration>,
    /// Read from any Consul server (`?stale`) instead of the leader:
    /// spreads the watches of a large mesh over the servers, but a change
    /// reaches followers only with the leader's next heartbeat (tens of
    /// milliseconds later) [default: false].
    #[arg(long, env = "MESH_STALE_READS", num_args = 0..=1, default_missing_value = "true")]
    pub stale_reads: Option<bool>,
    /// This node's proxy's admin listener, whose `/stats` the bridge
    /// serves as `Registry.ProxyStats` [default: 127.0.0.1:8889].
    #[arg(long, env = "MESH_PROXY_ADMIN")]
    pub proxy_admin: Option<SocketAddr>,
    /// Folder where the bridge keeps this node's mesh certificates and
    /// keys (`ca.crt`, `node.key`/`node.crt`, `svc/<service>.key`/`.crt`)
    /// for the proxy; unset: no certificates.
    #[arg(long, env = "MESH_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// mesh-control's gRPC URL (mesh.v1.Identity), e.g.
    /// http://10.0.0.2:8892 [default: found in Consul's catalog as the
    /// `mesh-control` service].
    #[arg(long, env = "MESH_CONTROL_ADDR")]
    pub control_addr: Option<String>,
    /// Bearer token for mesh-control's Identity service (its
    /// identity_token); required with tls_dir.
    #[arg(long, env = "MESH_IDENTITY_TOKEN", hide_env_values = true)]
    pub identity_token: Option<String>,
    /// The mesh's trust domain, as mesh-control's trust_domain
    /// [default: meshwork.local].
    #[arg(long, env = "MESH_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// What intentions decide for a call none of them matches while
    /// `mesh/intentions-default` is not set: allow or deny; keep it equal
    /// to mesh-control's default_intention [default: deny, the
    /// recommended one].
    #[arg(long, env = "MESH_DEFAULT_INTENTION")]
    pub default_intention: Option<mesh_runtime::intentions::Action>,
}

/// The checked configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Log format.
    pub log_format: LogFormat,
    /// The OTLP collector traces are exported to; `None`: tracing off.
    pub otlp_endpoint: Option<String>,
    /// This node's name.
    pub node: String,
    /// How to reach Consul (the token is redacted from `Debug`).
    pub consul: ClientConfig,
    /// gRPC listener.
    pub grpc_listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// State folder.
    pub data_dir: PathBuf,
    /// Blocking-query wait.
    pub wait: Duration,
    /// Read from any server rather than the leader.
    pub stale_reads: bool,
    /// The node's proxy's admin listener (`/stats`).
    pub proxy_admin: SocketAddr,
    /// Where and how the node's certificates are kept; `None`: off.
    pub identity: Option<IdentityConfig>,
    /// The intentions' default while `mesh/intentions-default` is unset.
    pub default_intention: mesh_runtime::intentions::Action,
}

/// Default Consul agent address.
pub const DEFAULT_CONSUL_ADDR: &str = consul_client::config::DEFAULT_ADDR;
/// Default gRPC listener (the port table).
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:8890";
/// Default admin listener (the port table).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8891";
/// Default address of the node's proxy's admin listener (the port table).
pub const DEFAULT_PROXY_ADMIN: &str = "127.0.0.1:8889";
/// Default state folder.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/meshwork/bridge";
/// Default blocking-query wait.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

const MIN_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(600);

// === impl Args ===

impl ConfigFile for Args {
    fn config_file(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }
}

impl fmt::Debug for Args {
    // Only through Config, whose Debug hides the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Args").finish_non_exhaustive()
    }
}

impl Args {
    /// Applies defaults and checks every value; an error is one line
    /// naming the key.
    pub fn validate(self) -> Result<Config, String> {
        let consul = self.consul()?;
        let grpc_listen = self
            .grpc_listen
            .unwrap_or_else(|| parse_default(DEFAULT_GRPC_LISTEN));
        let admin_listen = self
            .admin_listen
            .unwrap_or_else(|| parse_default(DEFAULT_ADMIN_LISTEN));
        if grpc_listen == admin_listen && grpc_listen.port() != 0 {
            return Err(format!(
                "grpc_listen and admin_listen are both {grpc_listen}"
            ));
        }
        let wait = self.wait.map_or(DEFAULT_WAIT, HumanDuration::get);
        if !(MIN_WAIT..=MAX_WAIT).contains(&wait) {
            return Err(format!(
                "wait: {} is out of range (1s to 10m)",
                HumanDuration(wait)
            ));
        }
        let node = node_name(self.node)?;
        let identity = IdentityConfig::from_settings(
            &node,
            self.tls_dir,
            self.control_addr.as_deref(),
            self.identity_token.as_deref(),
            self.trust_domain.as_deref(),
        )?;
        Ok(Config {
            log_format: self.log_format.unwrap_or_default(),
            otlp_endpoint: self.otlp_endpoint.filter(|e| !e.trim().is_empty()),
            node,
            consul,
            grpc_listen,
            admin_listen,
            data_dir: self.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            wait,
            stale_reads: self.stale_reads.unwrap_or(false),
            proxy_admin: self
                .proxy_admin
                .unwrap_or_else(|| parse_default(DEFAULT_PROXY_ADMIN)),
            identity,
            default_intention: self
                .default_intention
                .unwrap_or(mesh_runtime::intentions::Action::Deny),
        })
    }

    fn consul(&self) -> Result<ClientConfig, String> {
        consul_client::config::from_settings(
            &self.consul_addr,
            self.consul_token.as_deref(),
            self.consul_ca_file.as_deref(),
            self.consul_cert_file.as_deref(),
            self.consul_key_file.as_deref(),
        )
    }
}

fn parse_default(addr: &str) -> SocketAddr {
    addr.parse().expect("the default addresses are valid")
}

/// The given node name, else the hostname.
fn node_name(given: Option<String>) -> Result<String, String> {
    let name = given
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_else(|| "localhost".into());
    let name = name.trim();
    if name.is_empty() {
        return Err("node: must not be empty".into());
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Config, String> {
        let mut full = vec!["mesh-bridge"];
        full.extend_from_slice(argv);
        Args::try_parse_from(full).unwrap().validate()
    }

    #[test]
    fn defaults_follow_the_port_table() {
        let c = parse(&["--node", "n1"]).unwrap();
        assert_eq!(c.consul.addrs, vec![DEFAULT_CONSUL_ADDR]);
        assert_eq!(c.grpc_listen.to_string(), "127.0.0.1:8890");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:8891");
        assert_eq!(c.proxy_admin.to_string(), "127.0.0.1:8889");
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.wait, Duration::from_secs(60));
        assert_eq!(c.node, "n1");
        assert!(!parse(&[]).unwrap().node.is_empty(), "hostname default");
    }

    #[test]
    fn consul_addresses_are_a_comma_list() {
        let c = parse(&[
            "--consul-addr",
            "http://a:8500, http://b:8500",
            "--wait",
            "5s",
        ])
        .unwrap();
        assert_eq!(c.consul.addrs, vec!["http://a:8500", "http://b:8500"]);
        assert_eq!(c.wait, Duration::from_secs(5));
    }

    #[test]
    fn the_proxy_admin_address_is_a_flag_and_a_file_key() {
        let c = parse(&["--proxy-admin", "127.0.0.1:9889"]).unwrap();
        assert_eq!(c.proxy_admin.to_string(), "127.0.0.1:9889");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bridge.toml");
        std::fs::write(&file, "node = \"n1\"\nproxy_admin = \"[::1]:8889\"\n").unwrap();
        let args = Args {
            config: Some(file),
            ..Args::default()
        };
        let c = mesh_runtime::config::merge(args)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.proxy_admin.to_string(), "[::1]:8889");
        assert!(Args::try_parse_from(["mesh-bridge", "--proxy-admin", "localhost"]).is_err());
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = parse(&["--wait", "1h"]).unwrap_err();
        assert!(e.starts_with("wait:"), "{e}");
        let e = parse(&["--consul-addr", "consul:8500"]).unwrap_err();
        assert!(e.starts_with("consul_addr:"), "{e}");
        let e = parse(&["--consul-addr", "https://consul:8501"]).unwrap_err();
        assert!(e.contains("CA file"), "{e}");
        let e = parse(&["--consul-cert-file", "/c.pem"]).unwrap_err();
        assert!(e.contains("consul_key_file"), "{e}");
        let e = parse(&["--consul-ca-file", "/nonexistent/ca.pem"]).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let e = parse(&[
            "--grpc-listen",
            "127.0.0.1:9",
            "--admin-listen",
            "127.0.0.1:9",
        ])
        .unwrap_err();
        assert!(e.contains("grpc_listen"), "{e}");
    }

    #[test]
    fn the_token_never_shows_in_debug() {
        let c = parse(&["--consul-token", "s3cr3t"]).unwrap();
        assert_eq!(c.consul.token.as_deref(), Some("s3cr3t"));
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }
}
