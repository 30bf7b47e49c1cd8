//! mesh-monitor's configuration: [`Args`] as given (flags, `MESH_*`
//! environment, TOML file; every key in all three but the `[logs]` table,
//! which only the file has), and [`Config`], the checked values with
//! defaults applied by [`Args::validate`].

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::Parser;
use consul_client::ClientConfig;
use mesh_runtime::{
    config::ConfigFile, duration::HumanDuration, logging::LogFormat, pki::TrustDomain,
};
use reqwest::Url;
use serde::{Deserialize, Serialize};

use crate::{
    logs::{Logs, LogsConfig},
    probe::{CheckStatus, ProbeKind},
    traffic::{self, Thresholds, TrafficConfig},
};

/// The monitor's flags; each also `MESH_<NAME>` and a TOML key `<name>`.
#[derive(Parser, Serialize, Deserialize, Default)]
#[command(
    name = "mesh-monitor",
    version,
    about = "Probes every instance and component of the mesh, tells down, hung and slow apart, puts its verdict into Consul and raises alerts."
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
    /// This monitor's node name, for logs [default: the hostname].
    #[arg(long, env = "MESH_NODE")]
    pub node: Option<String>,
    /// Consul agent addresses, tried in order [default: http://127.0.0.1:8500].
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
    /// gRPC listener: mesh.v1.Monitor, grpc.health.v1 [default: 127.0.0.1:8896].
    #[arg(long, env = "MESH_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Admin listener (/live, /ready, /metrics) [default: 127.0.0.1:8897].
    #[arg(long, env = "MESH_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// How often every target is probed [default: 5s].
    #[arg(long, env = "MESH_INTERVAL")]
    pub interval: Option<HumanDuration>,
    /// How long a probe may take: a target that accepts the connection but
    /// has not answered by then is hung; shorter than the interval
    /// [default: 2s].
    #[arg(long, env = "MESH_TIMEOUT")]
    pub timeout: Option<HumanDuration>,
    /// An answer later than this is slow; shorter than the timeout
    /// [default: 1s].
    #[arg(long, env = "MESH_SLOW_THRESHOLD")]
    pub slow_threshold: Option<HumanDuration>,
    /// Probes in flight at once, at most [default: 16].
    #[arg(long, env = "MESH_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Consecutive bad probes before the verdict turns critical or warning
    /// [default: 2].
    #[arg(long, env = "MESH_UNHEALTHY_AFTER")]
    pub unhealthy_after: Option<u32>,
    /// Consecutive good probes before the verdict turns passing again
    /// [default: 1].
    #[arg(long, env = "MESH_HEALTHY_AFTER")]
    pub healthy_after: Option<u32>,
    /// How instances are probed unless their `mesh-probe` meta says
    /// otherwise: http, tcp or grpc [default: http].
    #[arg(long, env = "MESH_PROBE")]
    pub probe: Option<ProbeKind>,
    /// The path of HTTP probes unless an instance's `health-path` meta says
    /// otherwise [default: /health].
    #[arg(long, env = "MESH_HTTP_PATH")]
    pub http_path: Option<String>,
    /// The services whose instances are probed; repeated or a comma list
    /// [default: every service in Consul's catalog but `consul`].
    #[arg(long, env = "MESH_SERVICES", value_delimiter = ',')]
    #[serde(default)]
    pub services: Vec<String>,
    /// A mesh component to probe besides the instances, as
    /// `name=http://host:port/path`, `name=tcp://host:port` or
    /// `name=grpc://host:port`; repeated or a comma list.
    #[arg(long, env = "MESH_COMPONENTS", value_delimiter = ',')]
    #[serde(default)]
    pub components: Vec<String>,
    /// Put each instance's verdict into Consul as a check on it, through
    /// its node's mesh-bridge (mesh.v1.Checks) [default: true].
    #[arg(long, env = "MESH_CONSUL_CHECKS", num_args = 0..=1, default_missing_value = "true")]
    pub consul_checks: Option<bool>,
    /// Port of every node's mesh-bridge, reached at the node's address in
    /// Consul's catalog [default: 8890].
    #[arg(long, env = "MESH_BRIDGE_PORT")]
    pub bridge_port: Option<u16>,
    /// The check status a slow instance gets: passing (it stays in
    /// routing, where the proxy's latency-aware balancing already sends it
    /// less; the alert still opens) or warning (the bridge routes to
    /// passing instances only, so a slow instance leaves routing, and a
    /// service whose instances are all slow has none) [default: passing].
    #[arg(long, env = "MESH_SLOW_STATUS")]
    pub slow_status: Option<CheckStatus>,
    /// URL every alert is POSTed to (JSON) when it opens and when it is
    /// resolved.
    #[arg(long, env = "MESH_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// Tries per webhook call, 1 to 10 [default: 3].
    #[arg(long, env = "MESH_WEBHOOK_ATTEMPTS")]
    pub webhook_attempts: Option<u32>,
    /// Read every node's proxy's /metrics through its mesh-bridge
    /// (mesh.v1.Checks.ProxyMetrics) and raise traffic alerts: 5xx rate,
    /// timeout rate, p99 and request-rate drop per node and service
    /// against a learned baseline [default: true].
    #[arg(long, env = "MESH_TRAFFIC", num_args = 0..=1, default_missing_value = "true")]
    pub traffic: Option<bool>,
    /// Time between two reads of the proxies' metrics, 1s or more
    /// [default: 10s].
    #[arg(long, env = "MESH_TRAFFIC_INTERVAL")]
    pub traffic_interval: Option<HumanDuration>,
    /// The smallest share of 5xx (and of timeouts) in a round that fires,
    /// above 0 and at most 1 [default: 0.05].
    #[arg(long, env = "MESH_TRAFFIC_ERROR_RATIO")]
    pub traffic_error_ratio: Option<f64>,
    /// The fewest 5xx (or timeouts) in a round that fire [default: 5].
    #[arg(long, env = "MESH_TRAFFIC_MIN_ERRORS")]
    pub traffic_min_errors: Option<u32>,
    /// How many times its baseline a ratio or the p99 must be to fire,
    /// more than 1 [default: 3].
    #[arg(long, env = "MESH_TRAFFIC_FACTOR")]
    pub traffic_factor: Option<f64>,
    /// The smallest p99 that fires [default: 250ms].
    #[arg(long, env = "MESH_TRAFFIC_P99_FLOOR")]
    pub traffic_p99_floor: Option<HumanDuration>,
    /// The fewest requests in a round to judge a p99 or learn a ratio
    /// [default: 20].
    #[arg(long, env = "MESH_TRAFFIC_MIN_REQUESTS")]
    pub traffic_min_requests: Option<u32>,
    /// A request rate under this share of its baseline has dropped, above
    /// 0 and under 1 [default: 0.2].
    #[arg(long, env = "MESH_TRAFFIC_DROP_RATIO")]
    pub traffic_drop_ratio: Option<f64>,
    /// The smallest baseline rate (requests/s) whose drop fires
    /// [default: 5].
    #[arg(long, env = "MESH_TRAFFIC_DROP_MIN_RATE")]
    pub traffic_drop_min_rate: Option<f64>,
    /// Rounds learned before a baseline is used, 1 or more [default: 6].
    #[arg(long, env = "MESH_TRAFFIC_WARMUP_ROUNDS")]
    pub traffic_warmup_rounds: Option<u32>,
    /// The node's TLS folder, kept by its mesh-bridge: with it the monitor
    /// registers itself in Consul as `mesh-monitor`, so the bridge issues
    /// it that identity (`svc/mesh-monitor.key`/`.crt`), and calls every
    /// bridge over mTLS, accepting only that node's identity.
    #[arg(long, env = "MESH_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The mesh's trust domain, as mesh-control's trust_domain
    /// [default: meshwork.local].
    #[arg(long, env = "MESH_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Log files to watch and rules over their lines (the `[logs]` table
    /// of the config file only; see [`LogsConfig`]); none: no log watcher.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<LogsConfig>,
}

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Log format.
    pub log_format: LogFormat,
    /// The OTLP collector traces are exported to; `None`: tracing off.
    pub otlp_endpoint: Option<String>,
    /// This monitor's node name.
    pub node: String,
    /// How to reach Consul (the token is redacted from `Debug`).
    pub consul: ClientConfig,
    /// gRPC listener.
    pub grpc_listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// The probes' timing and judgement.
    pub probing: Probing,
    /// The default probe of an instance.
    pub probe: ProbeKind,
    /// The default HTTP probe path.
    pub http_path: String,
    /// The services probed; empty: all.
    pub services: Vec<String>,
    /// The components probed besides the instances.
    pub components: Vec<Component>,
    /// Whether verdicts go into Consul.
    pub consul_checks: bool,
    /// Port of every node's bridge.
    pub bridge_port: u16,
    /// Where alerts are POSTed, if anywhere.
    pub webhook_url: Option<Url>,
    /// Tries per webhook call.
    pub webhook_attempts: u32,
    /// The log watcher's files and rules; none: no watcher.
    pub logs: Option<Logs>,
    /// Traffic alerts from the proxies' metrics.
    pub traffic: TrafficConfig,
    /// mTLS to the bridges; none: plaintext.
    pub tls: Option<TlsSettings>,
}

/// Where the monitor's certificate is, and the trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// The node's TLS folder.
    pub dir: PathBuf,
    /// The mesh's trust domain.
    pub trust_domain: TrustDomain,
}

/// How targets are probed and judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probing {
    /// Time between rounds.
    pub interval: Duration,
    /// The longest a probe may take.
    pub timeout: Duration,
    /// Answers later than this are slow.
    pub slow_threshold: Duration,
    /// Probes in flight at once.
    pub concurrency: usize,
    /// Consecutive bad probes before the verdict turns.
    pub unhealthy_after: u32,
    /// Consecutive good probes before it turns back.
    pub healthy_after: u32,
    /// The check status of a slow target.
    pub slow_status: CheckStatus,
}

/// A component probed from the config (a proxy's admin listener, a
/// bridge's gRPC port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Component {
    /// Its name, unique among components.
    pub name: String,
    /// How it is probed.
    pub kind: ProbeKind,
    /// `host:port`.
    pub addr: String,
    /// The HTTP path (HTTP probes only).
    pub path: String,
}

/// Default gRPC listener (the port table).
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:8896";
/// Default admin listener (the port table).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8897";
/// Default bridge port (the port table).
pub const DEFAULT_BRIDGE_PORT: u16 = 8890;
/// Default HTTP probe path.
pub const DEFAULT_HTTP_PATH: &str = "/health";
/// Default time between rounds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Default probe timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default slow threshold.
pub const DEFAULT_SLOW_THRESHOLD: Duration = Duration::from_secs(1);
/// Default probes in flight.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// The trust domain without `trust_domain`.
pub const DEFAULT_TRUST_DOMAIN: &str = "meshwork.local";
/// Default webhook tries.
pub const DEFAULT_WEBHOOK_ATTEMPTS: u32 = 3;

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
        let consul = consul_client::config::from_settings(
            &self.consul_addr,
            self.consul_token.as_deref(),
            self.consul_ca_file.as_deref(),
            self.consul_cert_file.as_deref(),
            self.consul_key_file.as_deref(),
        )?;
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
        let probing = self.probing()?;
        let traffic = self.traffic()?;
        let http_path = self.http_path.unwrap_or_else(|| DEFAULT_HTTP_PATH.into());
        check_path("http_path", &http_path)?;
        let components = components(&self.components)?;
        let bridge_port = self.bridge_port.unwrap_or(DEFAULT_BRIDGE_PORT);
        if bridge_port == 0 {
            return Err("bridge_port: 0 is not a port".into());
        }
        let webhook_url = self.webhook_url.as_deref().map(webhook_url).transpose()?;
        let webhook_attempts = self.webhook_attempts.unwrap_or(DEFAULT_WEBHOOK_ATTEMPTS);
        if !(1..=10).contains(&webhook_attempts) {
            return Err(format!(
                "webhook_attempts: {webhook_attempts} is out of range (1 to 10)"
            ));
        }
        let logs = self
            .logs
            .map(LogsConfig::validate)
            .transpose()
            .map_err(|e| e.to_string())?;
        let services: Vec<String> = self
            .services
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        Ok(Config {
            log_format: self.log_format.unwrap_or_default(),
            otlp_endpoint: self.otlp_endpoint.filter(|e| !e.trim().is_empty()),
            node: node_name(self.node)?,
            consul,
            grpc_listen,
            admin_listen,
            probing,
            probe: self.probe.unwrap_or(ProbeKind::Http),
            http_path,
            services,
            components,
            consul_checks: self.consul_checks.unwrap_or(true),
            bridge_port,
            webhook_url,
            webhook_attempts,
            logs,
            traffic,
            tls: tls_settings(self.tls_dir, self.trust_domain.as_deref())?,
        })
    }

    fn traffic(&self) -> Result<TrafficConfig, String> {
        let d = Thresholds::default();
        let interval = self
            .traffic_interval
            .map_or(traffic::DEFAULT_INTERVAL, HumanDuration::get);
        if interval < Duration::from_secs(1) {
            return Err(format!(
                "traffic_interval: {} is shorter than 1s",
                HumanDuration(interval)
            ));
        }
        let ratio = |key: &str, v: Option<f64>, default: f64, max_inclusive: bool| {
            let v = v.unwrap_or(default);
            let ok = v > 0.0 && (v < 1.0 || (max_inclusive && v == 1.0));
            let upper = if max_inclusive { "at most" } else { "under" };
            ok.then_some(v)
                .ok_or_else(|| format!("{key}: {v} must be above 0 and {upper} 1"))
        };
        let error_ratio = ratio(
            "traffic_error_ratio",
            self.traffic_error_ratio,
            d.error_ratio,
            true,
        )?;
        let drop_ratio = ratio(
            "traffic_drop_ratio",
            self.traffic_drop_ratio,
            d.drop_ratio,
            false,
        )?;
        let factor = self.traffic_factor.unwrap_or(d.factor);
        if !(factor > 1.0 && factor.is_finite()) {
            return Err(format!("traffic_factor: {factor} must be more than 1"));
        }
        let drop_min_rate = self.traffic_drop_min_rate.unwrap_or(d.drop_min_rate);
        if !(drop_min_rate >= 0.0 && drop_min_rate.is_finite()) {
            return Err(format!(
                "traffic_drop_min_rate: {drop_min_rate} must be 0 or more"
            ));
        }
        let warmup_rounds = self.traffic_warmup_rounds.unwrap_or(d.warmup_rounds);
        if warmup_rounds == 0 {
            return Err("traffic_warmup_rounds: must be 1 or more".into());
        }
        Ok(TrafficConfig {
            enabled: self.traffic.unwrap_or(true),
            interval,
            thresholds: Thresholds {
                error_ratio,
                min_errors: self.traffic_min_errors.map_or(d.min_errors, f64::from),
                factor,
                p99_floor: self
                    .traffic_p99_floor
                    .map_or(d.p99_floor, HumanDuration::get),
                min_requests: self.traffic_min_requests.map_or(d.min_requests, f64::from),
                drop_ratio,
                drop_min_rate,
                warmup_rounds,
                ..d
            },
        })
    }

    fn probing(&self) -> Result<Probing, String> {
        let interval = self.interval.map_or(DEFAULT_INTERVAL, HumanDuration::get);
        let timeout = self.timeout.map_or(DEFAULT_TIMEOUT, HumanDuration::get);
        let slow = self
            .slow_threshold
            .map_or(DEFAULT_SLOW_THRESHOLD, HumanDuration::get);
        let show = |d: Duration| HumanDuration(d).to_string();
        if interval < Duration::from_millis(100) {
            return Err(format!(
                "interval: {} is shorter than 100ms",
                show(interval)
            ));
        }
        if timeout.is_zero() || timeout >= interval {
            return Err(format!(
                "timeout: {} must be more than 0 and shorter than the interval ({})",
                show(timeout),
                show(interval)
            ));
        }
        if slow.is_zero() || slow >= timeout {
            return Err(format!(
                "slow_threshold: {} must be more than 0 and shorter than the timeout ({})",
                show(slow),
                show(timeout)
            ));
        }
        let concurrency = self.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
        if !(1..=1024).contains(&concurrency) {
            return Err(format!(
                "concurrency: {concurrency} is out of range (1 to 1024)"
            ));
        }
        let unhealthy_after = self.unhealthy_after.unwrap_or(2);
        if !(1..=10).contains(&unhealthy_after) {
            return Err(format!(
                "unhealthy_after: {unhealthy_after} is out of range (1 to 10)"
            ));
        }
        let healthy_after = self.healthy_after.unwrap_or(1);
        if !(1..=10).contains(&healthy_after) {
            return Err(format!(
                "healthy_after: {healthy_after} is out of range (1 to 10)"
            ));
        }
        let slow_status = self.slow_status.unwrap_or(CheckStatus::Passing);
        if slow_status == CheckStatus::Critical {
            return Err("slow_status: must be warning or passing (a slow target answers)".into());
        }
        Ok(Probing {
            interval,
            timeout,
            slow_threshold: slow,
            concurrency,
            unhealthy_after,
            healthy_after,
            slow_status,
        })
    }
}

// === impl Component ===

impl FromStr for Component {
    type Err = String;

    /// `name=http://host:port/path`, `name=tcp://host:port`,
    /// `name=grpc://host:port`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("components: {s:?} {why}");
        let (name, url) = s
            .split_once('=')
            .ok_or_else(|| bad("is not name=kind://host:port"))?;
        let name = name.trim();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad("needs a name of letters, digits, '-', '_' or '.'"));
        }
        let (scheme, rest) = url
            .trim()
            .split_once("://")
            .ok_or_else(|| bad("needs a URL such as http://host:port/path"))?;
        let kind: ProbeKind = scheme.parse().map_err(|e: String| bad(&e))?;
        let (addr, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let port_ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok {
            return Err(bad("needs host:port"));
        }
        if kind != ProbeKind::Http && !path.is_empty() {
            return Err(bad("has a path, but only http probes take one"));
        }
        let path = if path.is_empty() {
            DEFAULT_HTTP_PATH
        } else {
            path
        };
        Ok(Self {
            name: name.to_owned(),
            kind,
            addr: addr.to_owned(),
            path: path.to_owned(),
        })
    }
}

fn components(given: &[String]) -> Result<Vec<Component>, String> {
    let mut out: Vec<Component> = Vec::new();
    for c in given.iter().filter(|c| !c.trim().is_empty()) {
        let c: Component = c.parse()?;
        if out.iter().any(|o| o.name == c.name) {
            return Err(format!("components: {:?} is named twice", c.name));
        }
        out.push(c);
    }
    Ok(out)
}

/// An HTTP path: starts with `/`, printable ASCII without spaces.
fn check_path(key: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{key}: {path:?} must start with / and hold no spaces or control characters"
        ));
    }
    Ok(())
}

fn webhook_url(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("webhook_url: {url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!(
            "webhook_url: {url:?} is not an http:// or https:// URL"
        ));
    }
    Ok(parsed)
}

fn parse_default(addr: &str) -> SocketAddr {
    addr.parse().expect("the default addresses are valid")
}

/// The given node name, else the hostname.
/// mTLS when `tls_dir` is given; the trust domain alone is no use.
fn tls_settings(
    dir: Option<PathBuf>,
    trust_domain: Option<&str>,
) -> Result<Option<TlsSettings>, String> {
    let Some(dir) = dir else {
        return match trust_domain {
            Some(_) => Err("trust_domain: needs tls_dir".into()),
            None => Ok(None),
        };
    };
    let trust_domain = trust_domain
        .unwrap_or(DEFAULT_TRUST_DOMAIN)
        .parse::<TrustDomain>()
        .map_err(|e| format!("trust_domain: {e}"))?;
    Ok(Some(TlsSettings { dir, trust_domain }))
}

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
        let mut full = vec!["mesh-monitor"];
        full.extend_from_slice(argv);
        Args::try_parse_from(full).unwrap().validate()
    }

    #[test]
    fn defaults_follow_the_port_table() {
        let c = parse(&["--node", "m1"]).unwrap();
        assert_eq!(c.grpc_listen.to_string(), "127.0.0.1:8896");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:8897");
        assert_eq!(c.bridge_port, 8890);
        assert_eq!(c.probing.interval, Duration::from_secs(5));
        assert_eq!(c.probing.timeout, Duration::from_secs(2));
        assert_eq!(c.probing.slow_threshold, Duration::from_secs(1));
        assert_eq!(c.probing.slow_status, CheckStatus::Passing);
        assert_eq!(
            (c.probe, c.http_path.as_str()),
            (ProbeKind::Http, "/health")
        );
        assert!(c.consul_checks && c.webhook_url.is_none());
        assert_eq!(c.traffic, TrafficConfig::default());
        assert!(c.traffic.enabled);
        assert_eq!(c.traffic.interval, Duration::from_secs(10));
    }

    #[test]
    fn traffic_keys_are_flags_and_file_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("monitor.toml");
        std::fs::write(
            &file,
            "traffic_interval = \"30s\"\ntraffic_error_ratio = 0.1\ntraffic_p99_floor = \"1s\"\n",
        )
        .unwrap();
        let args = Args::try_parse_from([
            "mesh-monitor",
            "--config",
            file.to_str().unwrap(),
            "--node",
            "m1",
            "--traffic-min-errors",
            "20",
            "--traffic",
            "false",
        ])
        .unwrap();
        let c = mesh_runtime::config::merge(args)
            .unwrap()
            .validate()
            .unwrap();
        let t = c.traffic;
        assert!(!t.enabled);
        assert_eq!(t.interval, Duration::from_secs(30));
        assert_eq!(t.thresholds.error_ratio, 0.1);
        assert_eq!(t.thresholds.min_errors, 20.0);
        assert_eq!(t.thresholds.p99_floor, Duration::from_secs(1));
        assert_eq!(t.thresholds.warmup_rounds, 6);
    }

    #[test]
    fn values_are_flags_and_file_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("monitor.toml");
        std::fs::write(
            &file,
            "interval = \"1s\"\ntimeout = \"500ms\"\nslow_threshold = \"200ms\"\n\
             components = [\"proxy=http://127.0.0.1:8889/ready\", \"bridge=grpc://127.0.0.1:8890\"]\n\
             webhook_url = \"http://127.0.0.1:9/hook\"\nslow_status = \"warning\"\n",
        )
        .unwrap();
        let args = Args::try_parse_from([
            "mesh-monitor",
            "--config",
            file.to_str().unwrap(),
            "--probe",
            "tcp",
        ])
        .unwrap();
        let c = mesh_runtime::config::merge(args)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.probing.timeout, Duration::from_millis(500));
        assert_eq!(c.probing.slow_status, CheckStatus::Warning);
        assert_eq!(c.probe, ProbeKind::Tcp);
        assert_eq!(c.components.len(), 2);
        assert_eq!(c.components[0].path, "/ready");
        assert_eq!(c.components[1].kind, ProbeKind::Grpc);
        assert_eq!(c.webhook_url.unwrap().path(), "/hook");
    }

    fn from_file(toml: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("monitor.toml");
        std::fs::write(&file, toml).unwrap();
        let args =
            Args::try_parse_from(["mesh-monitor", "--config", file.to_str().unwrap()]).unwrap();
        mesh_runtime::config::merge(args)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn the_logs_table_is_a_file_key() {
        let c = from_file(
            "node = \"m1\"\n[logs]\npoll_interval = \"100ms\"\n\
             [[logs.patterns]]\nname = \"errors\"\nfiles = \"/var/log/app.log\"\n\
             pattern = \"ERROR\"\nthreshold = 3\nwindow = \"2s\"\n",
        )
        .unwrap();
        let logs = c.logs.unwrap();
        assert_eq!(logs.poll_interval, Duration::from_millis(100));
        assert_eq!(logs.rules[0].name(), "errors");
        assert!(parse(&["--node", "m1"]).unwrap().logs.is_none());
        assert!(Args::try_parse_from(["mesh-monitor", "--logs", "x"]).is_err());
    }

    #[test]
    fn a_bad_logs_value_names_its_key() {
        let e = from_file(
            "node = \"m1\"\n[[logs.patterns]]\nname = \"errors\"\nfiles = \"/a.log\"\n\
             pattern = \"ERROR\"\nthreshold = 0\nwindow = \"2s\"\n",
        )
        .unwrap_err();
        assert_eq!(
            e,
            "logs rule \"errors\": threshold: 0 must be from 1 to 1000000"
        );
        let e = from_file("node = \"m1\"\n[logs]\npol_interval = \"1s\"\n").unwrap_err();
        assert!(e.contains("pol_interval"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (argv, key) in [
            (&["--timeout", "5s", "--interval", "5s"][..], "timeout:"),
            (&["--slow-threshold", "3s"], "slow_threshold:"),
            (&["--interval", "10ms"], "interval:"),
            (&["--concurrency", "0"], "concurrency:"),
            (&["--unhealthy-after", "0"], "unhealthy_after:"),
            (&["--http-path", "health"], "http_path:"),
            (&["--components", "proxy"], "components:"),
            (&["--components", "p=ftp://h:1"], "components:"),
            (&["--components", "p=tcp://h:1/x"], "components:"),
            (&["--components", "p=tcp://h:1,p=tcp://h:2"], "components:"),
            (&["--webhook-url", "nowhere"], "webhook_url:"),
            (&["--webhook-attempts", "0"], "webhook_attempts:"),
            (&["--slow-status", "critical"], "slow_status:"),
            (&["--bridge-port", "0"], "bridge_port:"),
            (&["--traffic-interval", "500ms"], "traffic_interval:"),
            (&["--traffic-error-ratio", "1.5"], "traffic_error_ratio:"),
            (&["--traffic-drop-ratio", "1"], "traffic_drop_ratio:"),
            (&["--traffic-factor", "1"], "traffic_factor:"),
            (&["--traffic-warmup-rounds", "0"], "traffic_warmup_rounds:"),
            (&["--trust-domain", "e.test"], "trust_domain:"),
            (
                &["--tls-dir", "/t", "--trust-domain", "Not A Domain"],
                "trust_domain:",
            ),
        ] {
            let e = parse(argv).unwrap_err();
            assert!(e.starts_with(key), "{argv:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(Args::try_parse_from(["mesh-monitor", "--probe", "udp"]).is_err());
    }

    #[test]
    fn tls_dir_turns_on_mtls_in_the_default_trust_domain() {
        assert_eq!(parse(&[]).unwrap().tls, None);
        let tls = parse(&["--tls-dir", "/var/lib/meshwork/tls"])
            .unwrap()
            .tls
            .unwrap();
        assert_eq!(tls.dir, PathBuf::from("/var/lib/meshwork/tls"));
        assert_eq!(tls.trust_domain.to_string(), DEFAULT_TRUST_DOMAIN);
    }
}
