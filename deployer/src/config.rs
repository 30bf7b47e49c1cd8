//! mesh-deployer's configuration: [`Args`] as given (flags, `MESH_*`
//! environment, TOML file; every key in all three), and [`Config`], the
//! checked values with defaults applied by [`Args::validate`].
//!
//! The gRPC listener stays on a loopback address unless `--allow-remote`
//! is given with a way to authenticate callers: `tls_dir` (mTLS with the
//! node's mesh identity; only mesh-control may change anything) or a token
//! every call must carry, or both.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    num::NonZeroUsize,
    path::{Component, Path, PathBuf},
};

use clap::Parser;
use mesh_runtime::{config::ConfigFile, logging::LogFormat, pki::TrustDomain};
use serde::{Deserialize, Serialize};

use crate::supervisor::INHERITED_ENV;

/// The deployer's flags; each also `MESH_<NAME>` (the token:
/// `MESH_DEPLOYER_TOKEN`) and a TOML key `<name>`.
#[derive(Parser, Serialize, Deserialize, Default)]
#[command(
    name = "mesh-deployer",
    version,
    about = "Stores a node's service artifacts (jars) in versions and runs them, replacing a running version blue-green."
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
    /// gRPC listener (Deployer, health); a loopback address unless
    /// --allow-remote [default: 127.0.0.1:8894].
    #[arg(long, env = "MESH_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Admin listener (/live, /ready, /metrics) [default: 127.0.0.1:8895].
    #[arg(long, env = "MESH_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// State folder: the artifact store, uploads in progress, process
    /// records (`processes/`), logs (`logs/`), deploy records (`deploys/`)
    /// and working folders (`work/<service>`)
    /// [default: /var/lib/meshwork/deployer].
    #[arg(long, env = "MESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The largest artifact accepted, in bytes [default: 536870912 (512 MiB)].
    #[arg(long, env = "MESH_MAX_ARTIFACT_SIZE")]
    pub max_artifact_size: Option<u64>,
    /// Versions kept per service, newest first; older ones not in use are
    /// removed when a new one is stored; at least 1 [default: 5].
    #[arg(long, env = "MESH_KEEP_VERSIONS")]
    pub keep_versions: Option<usize>,
    /// Allow a gRPC listener beyond this host; needs --tls-dir or --token
    /// [default: false].
    #[arg(long, env = "MESH_ALLOW_REMOTE", num_args = 0..=1, default_missing_value = "true")]
    pub allow_remote: Option<bool>,
    /// Token every gRPC call must carry as `authorization: Bearer <token>`;
    /// at least 16 characters. With --tls-dir, a second factor.
    #[arg(long, env = "MESH_DEPLOYER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The node's mesh credentials, as mesh-bridge keeps them: the gRPC
    /// listener then speaks TLS only, presents `node.key`/`node.crt`,
    /// requires a client certificate from the CA in `ca.crt`, and lets
    /// only mesh-control deploy, stop, upload or apply config.
    #[arg(long, env = "MESH_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The mesh's trust domain, as mesh-control's [default: meshwork.local].
    #[arg(long, env = "MESH_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// The local mesh-proxy, whose Consul agent API registers the instances
    /// deployed [default: 127.0.0.1:8888].
    #[arg(long, env = "MESH_PROXY_ADDR")]
    pub proxy_addr: Option<SocketAddr>,
    /// The local mesh-proxy's admin listener, whose `/routes` tells when a
    /// new instance is routable and an old one no longer is
    /// [default: 127.0.0.1:8889].
    #[arg(long, env = "MESH_PROXY_ADMIN")]
    pub proxy_admin: Option<SocketAddr>,
    /// A folder ApplyConfig may write config files under; repeated or a
    /// comma list; absolute [default: /etc/nginx].
    #[arg(long, env = "MESH_CONFIG_ROOT", value_delimiter = ',')]
    pub config_root: Option<Vec<PathBuf>>,
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
    /// gRPC listener.
    pub grpc_listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// State folder.
    pub data_dir: PathBuf,
    /// The largest artifact accepted, in bytes.
    pub max_artifact_size: u64,
    /// Versions kept per service.
    pub keep_versions: NonZeroUsize,
    /// Whether the gRPC listener may be beyond this host.
    pub allow_remote: bool,
    /// The token every gRPC call must carry, if any.
    pub token: Option<Token>,
    /// mTLS on the gRPC listener, with the node's credentials.
    pub tls: Option<TlsSettings>,
    /// The local mesh-proxy's agent API.
    pub proxy_addr: SocketAddr,
    /// The local mesh-proxy's admin listener (`/routes`).
    pub proxy_admin: SocketAddr,
    /// The folders ApplyConfig may write config files under.
    pub config_roots: Vec<PathBuf>,
    /// The deployer's own environment passed on to the processes it runs
    /// (only the variables in [`INHERITED_ENV`]).
    pub inherited_env: BTreeMap<String, String>,
}

/// mTLS on the gRPC listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// The folder with `ca.crt`, `node.key` and `node.crt`.
    pub dir: PathBuf,
    /// The trust domain every peer's identity must be in.
    pub trust_domain: TrustDomain,
}

/// A bearer token; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

/// Default gRPC listener (the port table).
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:8894";
/// Default admin listener (the port table).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8895";
/// Default local proxy (its outbound listener, which serves the agent API).
pub const DEFAULT_PROXY_ADDR: &str = "127.0.0.1:8888";
/// Default local proxy admin listener (the port table).
pub const DEFAULT_PROXY_ADMIN: &str = "127.0.0.1:8889";
/// Default state folder.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/meshwork/deployer";
/// Default largest artifact: 512 MiB.
pub const DEFAULT_MAX_ARTIFACT_SIZE: u64 = 512 * 1024 * 1024;
/// Default versions kept per service.
pub const DEFAULT_KEEP_VERSIONS: usize = 5;
/// Default trust domain, as mesh-control's.
pub const DEFAULT_TRUST_DOMAIN: &str = "meshwork.local";
/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

// === impl Args ===

impl ConfigFile for Args {
    fn config_file(&self) -> Option<&Path> {
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
        let token = self.token.map(Token::new).transpose()?;
        let allow_remote = self.allow_remote.unwrap_or(false);
        let tls = tls_settings(self.tls_dir, self.trust_domain.as_deref())?;
        check_remote(grpc_listen, allow_remote, token.is_some() || tls.is_some())?;
        let max_artifact_size = self.max_artifact_size.unwrap_or(DEFAULT_MAX_ARTIFACT_SIZE);
        if max_artifact_size == 0 {
            return Err("max_artifact_size: must be more than 0 bytes".into());
        }
        let keep = self.keep_versions.unwrap_or(DEFAULT_KEEP_VERSIONS);
        let keep_versions = NonZeroUsize::new(keep)
            .ok_or_else(|| "keep_versions: must be at least 1 (got 0)".to_owned())?;
        let proxy_addr = self
            .proxy_addr
            .unwrap_or_else(|| parse_default(DEFAULT_PROXY_ADDR));
        if proxy_addr.port() == 0 {
            return Err(format!("proxy_addr: {proxy_addr} has no port"));
        }
        let proxy_admin = self
            .proxy_admin
            .unwrap_or_else(|| parse_default(DEFAULT_PROXY_ADMIN));
        if proxy_admin.port() == 0 {
            return Err(format!("proxy_admin: {proxy_admin} has no port"));
        }
        let config_roots = config_roots(self.config_root)?;
        Ok(Config {
            log_format: self.log_format.unwrap_or_default(),
            otlp_endpoint: self.otlp_endpoint.filter(|e| !e.trim().is_empty()),
            node: node_name(self.node)?,
            grpc_listen,
            admin_listen,
            data_dir: self.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            max_artifact_size,
            keep_versions,
            allow_remote,
            token,
            tls,
            proxy_addr,
            proxy_admin,
            config_roots,
            inherited_env: inherited_env(),
        })
    }
}

/// The gRPC listener stays on this host unless remote calls are both
/// allowed and authenticated (a token, mTLS or both): uploads start
/// processes on the node.
fn check_remote(listen: SocketAddr, allow_remote: bool, authn: bool) -> Result<(), String> {
    if listen.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    let why = match (allow_remote, authn) {
        (true, true) => return Ok(()),
        (false, _) => {
            "is not a loopback address; listening beyond this host needs --allow-remote and \
             --tls-dir or --token"
        }
        (true, false) => {
            "is not a loopback address and --allow-remote needs --tls-dir or --token \
             (every call must be authenticated)"
        }
    };
    Err(format!("grpc_listen: {listen} {why}"))
}

/// mTLS when `tls_dir` is given; the trust domain alone is no use.
fn tls_settings(
    dir: Option<PathBuf>,
    trust_domain: Option<&str>,
) -> Result<Option<TlsSettings>, String> {
    let trust_domain = TrustDomain::new(trust_domain.unwrap_or(DEFAULT_TRUST_DOMAIN).trim())
        .map_err(|e| format!("trust_domain: {e}"))?;
    let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(None);
    };
    Ok(Some(TlsSettings { dir, trust_domain }))
}

fn config_roots(given: Option<Vec<PathBuf>>) -> Result<Vec<PathBuf>, String> {
    let roots = given
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| vec![PathBuf::from(crate::apply::DEFAULT_CONFIG_ROOT)]);
    for root in &roots {
        let plain = root
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !root.is_absolute() || !plain || root.parent().is_none() {
            return Err(format!(
                "config_root: {} must be an absolute folder without `.` or `..` parts (and not /)",
                root.display()
            ));
        }
    }
    Ok(roots)
}

fn inherited_env() -> BTreeMap<String, String> {
    INHERITED_ENV
        .iter()
        .filter_map(|&name| Some((name.to_owned(), std::env::var(name).ok()?)))
        .collect()
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

// === impl Token ===

impl Token {
    /// Checks a token: at least [`MIN_TOKEN_LEN`] characters, all of them
    /// printable ASCII (it travels in an HTTP header).
    pub fn new(token: String) -> Result<Self, String> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "token: must be at least {MIN_TOKEN_LEN} characters (got {})",
                token.chars().count()
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("token: only printable ASCII without spaces may be used".into());
        }
        Ok(Self(token))
    }

    /// The token itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-s3cr3t";

    fn parse(argv: &[&str]) -> Result<Config, String> {
        let mut full = vec!["mesh-deployer"];
        full.extend_from_slice(argv);
        Args::try_parse_from(full).unwrap().validate()
    }

    #[test]
    fn defaults_follow_the_port_table() {
        let c = parse(&["--node", "n1"]).unwrap();
        assert_eq!(c.grpc_listen.to_string(), "127.0.0.1:8894");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:8895");
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.max_artifact_size, 512 * 1024 * 1024);
        assert_eq!(c.keep_versions.get(), 5);
        assert!(!c.allow_remote);
        assert_eq!(c.token, None);
        assert_eq!(c.node, "n1");
        assert_eq!(c.proxy_addr.to_string(), "127.0.0.1:8888");
        assert_eq!(c.proxy_admin.to_string(), "127.0.0.1:8889");
        assert!(!parse(&[]).unwrap().node.is_empty(), "hostname default");
    }

    #[test]
    fn values_are_flags_and_file_keys() {
        let c = parse(&[
            "--max-artifact-size",
            "1048576",
            "--keep-versions",
            "1",
            "--data-dir",
            "/srv/deployer",
            "--proxy-admin",
            "127.0.0.1:9889",
        ])
        .unwrap();
        assert_eq!(c.max_artifact_size, 1 << 20);
        assert_eq!(c.keep_versions.get(), 1);
        assert_eq!(c.data_dir, PathBuf::from("/srv/deployer"));
        assert_eq!(c.proxy_admin.to_string(), "127.0.0.1:9889");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("deployer.toml");
        let text = format!(
            "node = \"n1\"\ngrpc_listen = \"0.0.0.0:8894\"\nallow_remote = true\n\
             token = \"{TOKEN}\"\nkeep_versions = 3\nproxy_admin = \"127.0.0.1:7889\"\n"
        );
        std::fs::write(&file, text).unwrap();
        let args = Args {
            config: Some(file),
            ..Args::default()
        };
        let c = mesh_runtime::config::merge(args)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.grpc_listen.to_string(), "0.0.0.0:8894");
        assert!(c.allow_remote);
        assert_eq!(c.token.as_ref().map(Token::expose), Some(TOKEN));
        assert_eq!(c.keep_versions.get(), 3);
        assert_eq!(c.proxy_admin.to_string(), "127.0.0.1:7889");
    }

    #[test]
    fn a_remote_listener_needs_allow_remote_and_a_token() {
        for argv in [
            &["--grpc-listen", "0.0.0.0:8894"][..],
            &["--grpc-listen", "10.0.0.5:8894", "--token", TOKEN],
            &["--grpc-listen", "[::]:8894", "--allow-remote"],
        ] {
            let e = parse(argv).unwrap_err();
            assert!(e.starts_with("grpc_listen: "), "{e}");
            assert!(e.contains("not a loopback address"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = parse(&[
            "--grpc-listen",
            "0.0.0.0:1",
            "--allow-remote",
            "--token",
            "short",
        ])
        .unwrap_err();
        assert!(e.starts_with("token: must be at least 16"), "{e}");

        let remote = [
            "--grpc-listen",
            "0.0.0.0:8894",
            "--allow-remote",
            "--token",
            TOKEN,
        ];
        assert!(parse(&remote).unwrap().allow_remote);
        for loopback in [
            "127.0.0.1:0",
            "127.8.9.1:8894",
            "[::1]:8894",
            "[::ffff:127.0.0.1]:1",
        ] {
            let c = parse(&["--grpc-listen", loopback]).unwrap();
            assert_eq!(c.grpc_listen.to_string(), loopback);
        }
    }

    #[test]
    fn tls_dir_alone_authenticates_a_remote_listener() {
        let c = parse(&[
            "--grpc-listen",
            "0.0.0.0:8894",
            "--allow-remote",
            "--tls-dir",
            "/var/lib/meshwork/tls",
        ])
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.dir, PathBuf::from("/var/lib/meshwork/tls"));
        assert_eq!(tls.trust_domain.to_string(), DEFAULT_TRUST_DOMAIN);
        assert_eq!(parse(&["--node", "n1"]).unwrap().tls, None);
        let e = parse(&["--tls-dir", "/t", "--trust-domain", "Not A Domain"]).unwrap_err();
        assert!(e.starts_with("trust_domain:"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = parse(&["--keep-versions", "0"]).unwrap_err();
        assert!(e.starts_with("keep_versions:"), "{e}");
        let e = parse(&["--max-artifact-size", "0"]).unwrap_err();
        assert!(e.starts_with("max_artifact_size:"), "{e}");
        let e = parse(&["--token", "has spaces in the token"]).unwrap_err();
        assert!(e.starts_with("token:"), "{e}");
        let e = parse(&[
            "--grpc-listen",
            "127.0.0.1:9",
            "--admin-listen",
            "127.0.0.1:9",
        ])
        .unwrap_err();
        assert!(e.contains("grpc_listen"), "{e}");
        assert!(Args::try_parse_from(["mesh-deployer", "--max-artifact-size", "1x"]).is_err());
        let e = parse(&["--proxy-addr", "127.0.0.1:0"]).unwrap_err();
        assert!(e.starts_with("proxy_addr:"), "{e}");
        let e = parse(&["--proxy-admin", "127.0.0.1:0"]).unwrap_err();
        assert!(e.starts_with("proxy_admin:"), "{e}");
    }

    #[test]
    fn the_token_never_shows_in_debug() {
        let c = parse(&["--token", TOKEN]).unwrap();
        assert_eq!(c.token.as_ref().map(Token::expose), Some(TOKEN));
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let args = Args::try_parse_from(["mesh-deployer", "--token", TOKEN]).unwrap();
        assert!(!format!("{args:?}").contains("s3cr3t"));
    }
}
