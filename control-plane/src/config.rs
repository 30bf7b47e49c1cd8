//! mesh-control's configuration: [`Args`] as given (flags, `MESH_*`
//! environment, TOML file; every key in all three), and [`Config`], the
//! checked values with defaults applied by [`Args::validate`].

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use consul_client::ClientConfig;
use mesh_runtime::{
    config::ConfigFile, duration::HumanDuration, intentions::Action, logging::LogFormat,
};
use serde::{Deserialize, Serialize};

use crate::{
    identity::IdentitySettings,
    render::{NginxApply, NginxSettings, Upstreams, nginx::verify_url_for},
    template::Template,
};

/// Default Consul agent address.
pub const DEFAULT_CONSUL_ADDR: &str = consul_client::config::DEFAULT_ADDR;
/// Default gRPC listener (the port table).
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:8892";
/// Default HTTP listener: REST mirror, `/live`, `/ready`, `/metrics`.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8893";
/// The port every node's bridge serves `mesh.v1.Registry` on.
pub const DEFAULT_BRIDGE_PORT: u16 = 8890;
/// The port every node's mesh-deployer serves `mesh.v1.Deployer` on.
pub const DEFAULT_DEPLOYER_PORT: u16 = 8894;
/// Default leader session TTL (Consul's minimum).
pub const DEFAULT_LEADER_TTL: Duration = Duration::from_secs(10);

const MIN_LEADER_TTL: Duration = Duration::from_secs(10);
const MAX_LEADER_TTL: Duration = Duration::from_secs(300);

/// mesh-control's flags; each also `MESH_<NAME>` and a TOML key `<name>`.
#[derive(Parser, Serialize, Deserialize, Default)]
#[command(
    name = "mesh-control",
    version,
    about = "Meshwork's control plane: per-node routes and config versions in Consul KV, over gRPC and REST."
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
    /// This replica's name, shown as the leader [default: <hostname>-<pid>].
    #[arg(long, env = "MESH_REPLICA")]
    pub replica: Option<String>,
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
    /// gRPC listener: mesh.v1.Control, mesh.v1.Identity, grpc.health.v1
    /// [default: 127.0.0.1:8892].
    #[arg(long, env = "MESH_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// HTTP listener: the REST mirror (/v1/...), /live, /ready, /metrics
    /// [default: 127.0.0.1:8893].
    #[arg(long, env = "MESH_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Port of every node's mesh-bridge (mesh.v1.Registry), reached at the
    /// node's address in Consul's catalog [default: 8890].
    #[arg(long, env = "MESH_BRIDGE_PORT")]
    pub bridge_port: Option<u16>,
    /// Port of every node's mesh-deployer (mesh.v1.Deployer), reached at
    /// the node's address in Consul's catalog [default: 8894].
    #[arg(long, env = "MESH_DEPLOYER_PORT")]
    pub deployer_port: Option<u16>,
    /// Bearer token sent to the nodes' deployers (those that listen beyond
    /// loopback without tls_dir require one).
    #[arg(long, env = "MESH_DEPLOYER_TOKEN", hide_env_values = true)]
    pub deployer_token: Option<String>,
    /// Call the nodes' deployers and bridges over mTLS (nodes whose bridge
    /// keeps a tls_dir): mesh-control presents its own identity,
    /// svc/mesh-control, issued with the mesh CA, and accepts only the
    /// node's identity; needs identity_token [default: false].
    #[arg(long, env = "MESH_DEPLOYER_MTLS", num_args = 0..=1, default_missing_value = "true")]
    pub deployer_mtls: Option<bool>,
    /// Serve the gRPC listener over TLS to other hosts: mesh-control
    /// presents its own identity (svc/mesh-control), so bridges check whom
    /// they give the identity token to, and a bridge showing its node's
    /// certificate renews that node's certificates without the token;
    /// plaintext only from this host (meshctl on it). Bridges dial the
    /// https:// URL mesh-control publishes in Consul; needs identity_token
    /// [default: false].
    #[arg(long, env = "MESH_GRPC_TLS", num_args = 0..=1, default_missing_value = "true")]
    pub grpc_tls: Option<bool>,
    /// Bearer token every REST call (`/v1/...`), the dashboard's data and
    /// every mesh.v1.Control gRPC call must carry; at least 16 printable
    /// characters. Unset: the HTTP listener must be on a loopback address.
    #[arg(long, env = "MESH_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// mesh-monitor's gRPC address (mesh.v1.Monitor), e.g.
    /// http://127.0.0.1:8896: rollout gates ask it for each node's verdict
    /// and the dashboard shows its alerts; https://host:8896 for mutual TLS
    /// (mesh-control's own identity, needs identity_token; the monitor must
    /// show svc/mesh-monitor); unset: no monitor.
    #[arg(long, env = "MESH_MONITOR_ADDR")]
    pub monitor_addr: Option<String>,
    /// Leader lock session TTL, 10s to 5m [default: 10s].
    #[arg(long, env = "MESH_LEADER_TTL")]
    pub leader_ttl: Option<HumanDuration>,
    /// nginx.conf template for OpenResty nodes [default: the built-in one].
    #[arg(long, env = "MESH_NGINX_TEMPLATE")]
    pub nginx_template: Option<PathBuf>,
    /// nginx upstreams: upsync (nginx-upsync-module reads Consul) or
    /// static (the passing instances at render time) [default: upsync].
    #[arg(long, env = "MESH_NGINX_UPSTREAMS")]
    pub nginx_upstreams: Option<Upstreams>,
    /// Where nginx listens for a node's services [default: 127.0.0.1:8888].
    #[arg(long, env = "MESH_NGINX_LISTEN")]
    pub nginx_listen: Option<String>,
    /// The Consul agent upsync reads on each node [default: 127.0.0.1:8500].
    #[arg(long, env = "MESH_NGINX_CONSUL")]
    pub nginx_consul: Option<String>,
    /// Where upsync keeps its server lists
    /// [default: /usr/local/openresty/nginx/conf/servers].
    #[arg(long, env = "MESH_NGINX_DUMP_DIR")]
    pub nginx_dump_dir: Option<String>,
    /// Where a rollout has an nginx node's mesh-deployer write the
    /// rendered nginx.conf; absolute [default: /etc/nginx/nginx.conf].
    #[arg(long, env = "MESH_NGINX_CONF_PATH")]
    pub nginx_conf_path: Option<String>,
    /// The command that checks the written file, split on whitespace;
    /// `{path}` is the file; empty: no check
    /// [default: nginx -t -c {path}].
    #[arg(long, env = "MESH_NGINX_VALIDATE")]
    pub nginx_validate: Option<String>,
    /// The command that makes nginx load the file, split on whitespace;
    /// `{path}` is the file; empty: no reload
    /// [default: nginx -s reload -c {path}].
    #[arg(long, env = "MESH_NGINX_RELOAD")]
    pub nginx_reload: Option<String>,
    /// The trust domain of every certificate the mesh CA issues
    /// (`spiffe://<trust_domain>/...`) [default: meshwork.local].
    #[arg(long, env = "MESH_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// An operator's CA certificate (PEM) to issue with, instead of the CA
    /// mesh-control keeps in Consul KV; with ca_key_file.
    #[arg(long, env = "MESH_CA_CERT_FILE")]
    pub ca_cert_file: Option<PathBuf>,
    /// The operator CA's private key (PKCS#8 PEM); with ca_cert_file.
    #[arg(long, env = "MESH_CA_KEY_FILE")]
    pub ca_key_file: Option<PathBuf>,
    /// How long an issued certificate is valid, 1m to 720h; nodes renew
    /// at two thirds of it [default: 24h].
    #[arg(long, env = "MESH_CERT_TTL")]
    pub cert_ttl: Option<HumanDuration>,
    /// Bearer token the nodes' bridges present to have certificates
    /// issued (mesh.v1.Identity); unset: no certificates are issued.
    #[arg(long, env = "MESH_IDENTITY_TOKEN", hide_env_values = true)]
    pub identity_token: Option<String>,
    /// A loopback URL through nginx the deployer asks after the reload
    /// until it answers 2xx; `{version}` is the version applied; empty: no
    /// verify [default: http://<nginx_listen>/_mesh/config/{version}, the
    /// listen address made loopback].
    #[arg(long, env = "MESH_NGINX_VERIFY_URL")]
    pub nginx_verify_url: Option<String>,
    /// What intentions decide for a call none of them matches while
    /// `mesh/intentions-default` is not set: allow or deny [default: deny,
    /// the recommended one].
    #[arg(long, env = "MESH_DEFAULT_INTENTION")]
    pub default_intention: Option<Action>,
}

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Log format.
    pub log_format: LogFormat,
    /// The OTLP collector traces are exported to; `None`: tracing off.
    pub otlp_endpoint: Option<String>,
    /// This replica's name.
    pub replica: String,
    /// How to reach Consul (the token is redacted from `Debug`).
    pub consul: ClientConfig,
    /// gRPC listener.
    pub grpc_listen: SocketAddr,
    /// HTTP listener.
    pub http_listen: SocketAddr,
    /// Port of every node's bridge.
    pub bridge_port: u16,
    /// Port of every node's deployer.
    pub deployer_port: u16,
    /// Token for the nodes' deployers.
    pub deployer_token: Option<Secret>,
    /// Whether deployers are called over mTLS.
    pub deployer_mtls: bool,
    /// Whether the gRPC listener speaks TLS to other hosts.
    pub grpc_tls: bool,
    /// Token the REST API, the dashboard's data and Control gRPC calls need.
    pub api_token: Option<Secret>,
    /// mesh-monitor's gRPC URL, if there is one.
    pub monitor_addr: Option<String>,
    /// Leader lock session TTL.
    pub leader_ttl: Duration,
    /// How nginx.conf is rendered.
    pub nginx: NginxSettings,
    /// The intentions' default while Consul KV sets none.
    pub default_intention: Action,
    /// How certificates are issued.
    pub identity: IdentitySettings,
}

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
    pub fn validate(mut self) -> Result<Config, String> {
        let consul = self.consul()?;
        let nginx = self.nginx()?;
        let identity = IdentitySettings::from_settings(
            self.trust_domain.as_deref(),
            self.ca_cert_file.as_deref(),
            self.ca_key_file.as_deref(),
            self.cert_ttl.map(HumanDuration::get),
            self.identity_token.as_deref(),
        )?;
        let grpc_listen = self
            .grpc_listen
            .unwrap_or_else(|| parse_default(DEFAULT_GRPC_LISTEN));
        let http_listen = self
            .http_listen
            .unwrap_or_else(|| parse_default(DEFAULT_HTTP_LISTEN));
        if grpc_listen == http_listen && grpc_listen.port() != 0 {
            return Err(format!(
                "grpc_listen and http_listen are both {grpc_listen}"
            ));
        }
        let bridge_port = self.bridge_port.unwrap_or(DEFAULT_BRIDGE_PORT);
        if bridge_port == 0 {
            return Err("bridge_port: 0 is not a port".into());
        }
        let deployer_port = self.deployer_port.unwrap_or(DEFAULT_DEPLOYER_PORT);
        if deployer_port == 0 {
            return Err("deployer_port: 0 is not a port".into());
        }
        let deployer_token = secret("deployer_token", self.deployer_token.as_deref())?;
        let api_token = secret("api_token", self.api_token.as_deref())?;
        let deployer_mtls = self.deployer_mtls.unwrap_or(false);
        if deployer_mtls && identity.token.is_none() {
            return Err(
                "deployer_mtls: needs identity_token (mesh-control's own certificate \
                        comes from the mesh CA, which issues only with identity_token set)"
                    .into(),
            );
        }
        let grpc_tls = self.grpc_tls.unwrap_or(false);
        if grpc_tls && identity.token.is_none() {
            return Err(
                "grpc_tls: needs identity_token (mesh-control's own certificate comes from \
                 the mesh CA, which issues only with identity_token set)"
                    .into(),
            );
        }
        if api_token.is_none() && !http_listen.ip().to_canonical().is_loopback() {
            return Err(format!(
                "http_listen: {http_listen} is not a loopback address; the REST API and the \
                 dashboard beyond this host need api_token (MESH_API_TOKEN)"
            ));
        }
        let monitor_addr = match self.monitor_addr.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(a) => {
                let url = if a.contains("://") {
                    a.to_owned()
                } else {
                    format!("http://{a}")
                };
                let https = url.starts_with("https://");
                if !(url.starts_with("http://") || https)
                    || url.parse::<tonic::transport::Uri>().is_err()
                {
                    return Err(format!(
                        "monitor_addr: {a:?} is not host:port or an http:// or https:// URL"
                    ));
                }
                if https && identity.token.is_none() {
                    return Err(format!(
                        "monitor_addr: {a:?} is https (mutual TLS with mesh-control's own \
                         certificate), which needs identity_token"
                    ));
                }
                Some(url)
            }
        };
        let leader_ttl = self
            .leader_ttl
            .map_or(DEFAULT_LEADER_TTL, HumanDuration::get);
        if !(MIN_LEADER_TTL..=MAX_LEADER_TTL).contains(&leader_ttl)
            || leader_ttl.subsec_nanos() != 0
        {
            return Err(format!(
                "leader_ttl: {} is not whole seconds from 10s to 5m (Consul's session limits)",
                HumanDuration(leader_ttl)
            ));
        }
        Ok(Config {
            log_format: self.log_format.unwrap_or_default(),
            otlp_endpoint: self.otlp_endpoint.filter(|e| !e.trim().is_empty()),
            replica: replica_name(self.replica)?,
            consul,
            grpc_listen,
            http_listen,
            bridge_port,
            deployer_port,
            deployer_token,
            deployer_mtls,
            grpc_tls,
            api_token,
            monitor_addr,
            leader_ttl,
            nginx,
            default_intention: self.default_intention.unwrap_or(Action::Deny),
            identity,
        })
    }

    /// The nginx settings: how nginx.conf is rendered and applied.
    fn nginx(&mut self) -> Result<NginxSettings, String> {
        let mut settings = nginx(
            self.nginx_template.take(),
            self.nginx_upstreams.take(),
            self.nginx_listen.take(),
            self.nginx_consul.take(),
            self.nginx_dump_dir.take(),
        )?;
        settings.apply = nginx_apply(
            &settings.listen,
            self.nginx_conf_path.take(),
            self.nginx_validate.take(),
            self.nginx_reload.take(),
            self.nginx_verify_url.take(),
        )?;
        Ok(settings)
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

/// The nginx settings, the template read and checked now.
fn nginx(
    template: Option<PathBuf>,
    upstreams: Option<Upstreams>,
    listen: Option<String>,
    consul: Option<String>,
    dump_dir: Option<String>,
) -> Result<NginxSettings, String> {
    let mut settings = NginxSettings::standard();
    if let Some(path) = template {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("nginx_template: {}: {e}", path.display()))?;
        settings.template = Template::parse(&text)
            .map_err(|e| format!("nginx_template: {}: {e}", path.display()))?;
    }
    settings.upstreams = upstreams.unwrap_or(Upstreams::Upsync);
    let plain = |key: &str, value: Option<String>, default: String| match value {
        None => Ok(default),
        Some(v) if v.trim().is_empty() || v.contains([';', '{', '}', '\n', '"', '\'']) => {
            Err(format!("{key}: {v:?} cannot go into nginx.conf"))
        }
        Some(v) => Ok(v.trim().to_owned()),
    };
    settings.listen = plain("nginx_listen", listen, settings.listen)?;
    settings.consul = plain("nginx_consul", consul, settings.consul)?;
    settings.dump_dir = plain("nginx_dump_dir", dump_dir, settings.dump_dir)?;
    settings
        .check()
        .map_err(|e| format!("nginx_template: {e}"))?;
    Ok(settings)
}

/// How rendered nginx.conf files are applied: the standard ones with the
/// given values over them.
fn nginx_apply(
    listen: &str,
    conf_path: Option<String>,
    validate: Option<String>,
    reload: Option<String>,
    verify_url: Option<String>,
) -> Result<NginxApply, String> {
    let mut apply = NginxApply::standard();
    if let Some(path) = conf_path {
        let path = path.trim();
        let plain = std::path::Path::new(path)
            .components()
            .skip(1)
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !path.starts_with('/') || !plain || path.ends_with('/') {
            return Err(format!(
                "nginx_conf_path: {path:?} is not an absolute file path without `.` or `..` parts"
            ));
        }
        apply.conf_path = path.to_owned();
    }
    let argv = |v: String| v.split_whitespace().map(str::to_owned).collect();
    if let Some(v) = validate {
        apply.validate = argv(v);
    }
    if let Some(v) = reload {
        apply.reload = argv(v);
    }
    apply.verify_url = match verify_url.as_deref().map(str::trim) {
        Some("") => None,
        Some(url) if url.starts_with("http://") && !url.contains(char::is_whitespace) => {
            Some(url.to_owned())
        }
        Some(url) => {
            return Err(format!(
                "nginx_verify_url: {url:?} is not an http:// URL on a loopback address"
            ));
        }
        None => Some(verify_url_for(listen).ok_or_else(|| {
            format!(
                "nginx_verify_url: nginx_listen {listen:?} is no loopback address the nodes' \
                 deployers may ask; set nginx_verify_url to a loopback URL nginx answers, \
                 or to \"\" for no verify"
            )
        })?),
    };
    Ok(apply)
}

/// A value kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A token setting: unset or blank is none; else at least 16 printable
/// ASCII characters without spaces (it travels in a header).
fn secret(key: &str, value: Option<&str>) -> Result<Option<Secret>, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) => Err(format!(
            "{key}: must be at least 16 printable characters without spaces"
        )),
        Some(t) => Ok(Some(Secret(t.to_owned()))),
    }
}

fn parse_default(addr: &str) -> SocketAddr {
    addr.parse()
        .expect("the default listen addresses are valid")
}

/// The given replica name, else `<hostname>-<pid>`.
fn replica_name(given: Option<String>) -> Result<String, String> {
    let name = match given {
        Some(name) => name.trim().to_owned(),
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into());
            format!("{host}-{}", std::process::id())
        }
    };
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(format!(
            "replica: {name:?} must be 1 to 128 printable characters"
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Config, String> {
        let mut full = vec!["mesh-control"];
        full.extend_from_slice(argv);
        Args::try_parse_from(full)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn defaults_follow_the_port_table() {
        let c = parse(&["--replica", "c1"]).unwrap();
        assert_eq!(c.consul.addrs, vec![DEFAULT_CONSUL_ADDR]);
        assert_eq!(c.grpc_listen.to_string(), "127.0.0.1:8892");
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:8893");
        assert_eq!(c.bridge_port, 8890);
        assert_eq!(c.leader_ttl, Duration::from_secs(10));
        assert_eq!(c.nginx.upstreams, Upstreams::Upsync);
        assert_eq!(c.nginx.listen, "127.0.0.1:8888");
        assert_eq!(c.replica, "c1");
        assert_eq!(c.default_intention, Action::Deny);
        let default = parse(&[]).unwrap().replica;
        assert!(
            default.ends_with(&format!("-{}", std::process::id())),
            "{default}"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (argv, key) in [
            (&["--leader-ttl", "5s"][..], "leader_ttl"),
            (&["--leader-ttl", "10m"][..], "leader_ttl"),
            (&["--consul-addr", "consul:8500"][..], "consul_addr"),
            (&["--bridge-port", "0"][..], "bridge_port"),
            (
                &[
                    "--grpc-listen",
                    "127.0.0.1:9",
                    "--http-listen",
                    "127.0.0.1:9",
                ][..],
                "grpc_listen",
            ),
            (
                &["--nginx-template", "/nonexistent/nginx.tmpl"][..],
                "nginx_template",
            ),
            (&["--nginx-listen", "1.2.3.4:80; evil"][..], "nginx_listen"),
        ] {
            let e = parse(argv).unwrap_err();
            assert!(e.contains(key), "{argv:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = parse(&["--nginx-upstreams", "dynamic"]).unwrap_err();
        assert!(e.contains("upsync or static"), "{e}");
        let e = parse(&["--default-intention", "maybe"]).unwrap_err();
        assert!(e.contains("not allow or deny"), "{e}");
    }

    #[test]
    fn the_default_intention_is_a_flag_and_a_toml_key() {
        let c = parse(&["--default-intention", "allow"]).unwrap();
        assert_eq!(c.default_intention, Action::Allow);
        let args: Args = toml::from_str("default_intention = \"allow\"\n").unwrap();
        assert_eq!(args.validate().unwrap().default_intention, Action::Allow);
        let e = toml::from_str::<Args>("default_intention = \"open\"\n").unwrap_err();
        assert!(e.to_string().contains("default_intention"), "{e}");
    }

    #[test]
    fn an_operator_template_is_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.tmpl");
        std::fs::write(&good, "{% for s in services %}{{ s.name }}\n{% endfor %}").unwrap();
        let c = parse(&["--nginx-template", good.to_str().unwrap()]).unwrap();
        let routes = [("a".to_owned(), crate::model::Route::default())].into();
        let text = c
            .nginx
            .render(Upstreams::Upsync, "n1", 1, &routes, &Default::default())
            .unwrap();
        assert_eq!(text, "a\n");
        let bad = dir.path().join("bad.tmpl");
        std::fs::write(
            &bad,
            "x\n{% for s in services %}\n{{ s.nope }}\n{% endfor %}\n",
        )
        .unwrap();
        let e = parse(&["--nginx-template", bad.to_str().unwrap()]).unwrap_err();
        assert!(
            e.starts_with("nginx_template:") && e.contains("line 3"),
            "{e}"
        );
    }

    #[test]
    fn nginx_apply_settings_default_and_take_values() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.nginx.apply.conf_path, "/etc/nginx/nginx.conf");
        assert_eq!(c.nginx.apply.validate, ["nginx", "-t", "-c", "{path}"]);
        assert_eq!(
            c.nginx.apply.reload,
            ["nginx", "-s", "reload", "-c", "{path}"]
        );
        assert_eq!(
            c.nginx.apply.verify_url_of(7).as_deref(),
            Some("http://127.0.0.1:8888/_mesh/config/7")
        );
        let c = parse(&[
            "--nginx-listen",
            "0.0.0.0:8080",
            "--nginx-conf-path",
            "/srv/nginx/nginx.conf",
            "--nginx-validate",
            "/usr/sbin/nginx -t -p /srv/nginx/ -c {path}",
            "--nginx-reload",
            "",
        ])
        .unwrap();
        assert_eq!(c.nginx.apply.conf_path, "/srv/nginx/nginx.conf");
        assert_eq!(
            c.nginx.apply.validate,
            ["/usr/sbin/nginx", "-t", "-p", "/srv/nginx/", "-c", "{path}"]
        );
        assert!(c.nginx.apply.reload.is_empty(), "empty: no reload");
        assert_eq!(
            c.nginx.apply.verify_url.as_deref(),
            Some("http://127.0.0.1:8080/_mesh/config/{version}"),
            "0.0.0.0 is asked on loopback"
        );
        let c = parse(&["--nginx-listen", "10.0.0.5:80", "--nginx-verify-url", ""]).unwrap();
        assert_eq!(c.nginx.apply.verify_url, None);
    }

    #[test]
    fn bad_nginx_apply_settings_name_their_key() {
        for (argv, key) in [
            (&["--nginx-conf-path", "nginx.conf"][..], "nginx_conf_path"),
            (
                &["--nginx-conf-path", "/etc/../nginx.conf"][..],
                "nginx_conf_path",
            ),
            (
                &["--nginx-verify-url", "https://x/"][..],
                "nginx_verify_url",
            ),
            // The deployer asks on loopback only: a node address needs a
            // verify URL given.
            (&["--nginx-listen", "10.0.0.5:80"][..], "nginx_verify_url"),
        ] {
            let e = parse(argv).unwrap_err();
            assert!(e.starts_with(key), "{argv:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn no_token_shows_in_debug() {
        let argv = [
            "--consul-token",
            "consul-s3cr3t",
            "--deployer-token",
            "deployer-0123456789-s3cr3t",
            "--api-token",
            "api-0123456789-s3cr3t",
            "--identity-token",
            "identity-0123456789-s3cr3t",
        ];
        let c = parse(&argv).unwrap();
        assert_eq!(c.consul.token.as_deref(), Some("consul-s3cr3t"));
        assert_eq!(
            c.api_token.as_ref().map(|t| t.0.as_str()),
            Some("api-0123456789-s3cr3t")
        );
        assert!(c.deployer_token.is_some());
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        let mut full = vec!["mesh-control"];
        full.extend_from_slice(&argv);
        let args = Args::try_parse_from(full).unwrap();
        assert!(!format!("{args:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_remote_http_listener_needs_an_api_token() {
        let e = parse(&["--http-listen", "0.0.0.0:8893"]).unwrap_err();
        assert!(
            e.starts_with("http_listen: 0.0.0.0:8893 is not a loopback"),
            "{e}"
        );
        assert!(e.contains("api_token"), "{e}");
        let c = parse(&[
            "--http-listen",
            "0.0.0.0:8893",
            "--api-token",
            "0123456789abcdef",
        ])
        .unwrap();
        assert_eq!(c.http_listen.to_string(), "0.0.0.0:8893");
        assert!(
            parse(&["--http-listen", "[::1]:8893"])
                .unwrap()
                .api_token
                .is_none()
        );
        let e = parse(&["--api-token", "short"]).unwrap_err();
        assert!(e.starts_with("api_token: must be at least 16"), "{e}");
        assert!(parse(&["--api-token", " "]).unwrap().api_token.is_none());
    }

    #[test]
    fn an_https_monitor_needs_mesh_control_s_own_identity() {
        let e = parse(&["--monitor-addr", "https://10.0.0.5:8896"]).unwrap_err();
        assert!(
            e.starts_with("monitor_addr:") && e.contains("identity_token"),
            "{e}"
        );
        let c = parse(&[
            "--monitor-addr",
            "https://10.0.0.5:8896",
            "--identity-token",
            "0123456789abcdef",
        ])
        .unwrap();
        assert_eq!(c.monitor_addr.as_deref(), Some("https://10.0.0.5:8896"));
        let e = parse(&["--monitor-addr", "ftp://10.0.0.5:8896"]).unwrap_err();
        assert!(e.starts_with("monitor_addr:"), "{e}");
    }
}
