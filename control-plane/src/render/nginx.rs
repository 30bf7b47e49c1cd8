//! nginx.conf for nodes still on OpenResty, from the same routes as the
//! proxy's config and an operator-editable [`Template`] (the default one is
//! `templates/nginx.conf.tmpl`).
//!
//! The route's policy maps onto nginx as closely as nginx allows:
//! `p2c-ewma` → `random two least_conn`, `least-request` → `least_conn`,
//! `round-robin` → nginx's default, `consistent-hash` → `hash $http_<h>` or
//! `$cookie_<c>` `consistent`; `timeout` bounds all tries
//! (`proxy_next_upstream_timeout`), `per_try_timeout` one try
//! (`proxy_read_timeout`), `retries` + 1 is `proxy_next_upstream_tries`.
//! Weights by version or tag become each static server's `weight` (the
//! group's share split over its instances); nginx-upsync-module reads
//! servers from Consul's catalog and cannot split by version, so an upsync
//! upstream shows the split as a comment only.

use std::{collections::BTreeMap, str::FromStr, time::Duration};

use mesh_runtime::duration::HumanDuration;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::RenderError;
use crate::{
    model::{Lb, Route, Routes},
    template::Template,
};

/// The template shipped with mesh-control.
pub const DEFAULT_TEMPLATE: &str = include_str!("../../templates/nginx.conf.tmpl");

/// nginx's connect timeout when the route's try timeout is longer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Retries the proxy makes when a route sets none.
const DEFAULT_RETRIES: u32 = 2;

/// Where a rendered upstream's servers come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Upstreams {
    /// nginx-upsync-module pulls them from the node's Consul agent.
    Upsync,
    /// Written into the file from the passing instances at render time.
    Static,
}

/// The path of the answer that names a node's config version, which
/// the shipped template serves (also at `<path>/<version>`).
pub const CONFIG_PATH: &str = "/_mesh/config";

/// How nginx.conf is rendered on this mesh.
#[derive(Clone, Debug)]
pub struct NginxSettings {
    /// The template.
    pub template: Template,
    /// Upsync or static upstreams, unless a render asks otherwise.
    pub upstreams: Upstreams,
    /// Where nginx listens for the node's services (`127.0.0.1:8888`).
    pub listen: String,
    /// The Consul agent upsync reads (`127.0.0.1:8500`).
    pub consul: String,
    /// Where upsync keeps its server lists.
    pub dump_dir: String,
    /// How a node's deployer puts a rendered file in place.
    pub apply: NginxApply,
}

/// How a rollout has a node's mesh-deployer apply the nginx.conf rendered
/// for it (`ApplyConfig`). `{path}` in a command is the file's path, put in
/// by the deployer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NginxApply {
    /// Where the file goes (`/etc/nginx/nginx.conf`).
    pub conf_path: String,
    /// Checks the written file (`nginx -t -c {path}`); empty: no check.
    pub validate: Vec<String>,
    /// Makes nginx load it (`nginx -s reload -c {path}`); empty: no reload.
    pub reload: Vec<String>,
    /// Asked through nginx after the reload until it answers 2xx, on a
    /// loopback address of the node; `{version}` is the version applied
    /// (`http://127.0.0.1:8888/_mesh/config/{version}`). `None`: no verify.
    pub verify_url: Option<String>,
}

/// A passing instance, for static upstreams.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Instance {
    /// Instance ID.
    pub id: String,
    /// Address (its node's when it registered none).
    pub address: String,
    /// Port.
    pub port: u32,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata (`version` names its version).
    pub meta: BTreeMap<String, String>,
}

// === impl Upstreams ===

impl FromStr for Upstreams {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "upsync" => Ok(Self::Upsync),
            "static" => Ok(Self::Static),
            other => Err(format!(
                "unknown upstreams {other:?}: expected upsync or static"
            )),
        }
    }
}

impl std::fmt::Display for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Upsync => "upsync",
            Self::Static => "static",
        })
    }
}

// === impl NginxSettings ===

impl NginxSettings {
    /// The default template with the standard addresses.
    pub fn standard() -> Self {
        Self {
            template: Template::parse(DEFAULT_TEMPLATE)
                .expect("the shipped template parses (a unit test renders it)"),
            upstreams: Upstreams::Upsync,
            listen: "127.0.0.1:8888".into(),
            consul: "127.0.0.1:8500".into(),
            dump_dir: "/usr/local/openresty/nginx/conf/servers".into(),
            apply: NginxApply::standard(),
        }
    }

    /// nginx.conf for `node` at config version `number`; `instances` holds
    /// each routed service's passing instances (read for static upstreams).
    pub fn render(
        &self,
        upstreams: Upstreams,
        node: &str,
        number: u64,
        routes: &Routes,
        instances: &BTreeMap<String, Vec<Instance>>,
    ) -> Result<String, RenderError> {
        let services = routes
            .iter()
            .map(|(name, route)| {
                let found = instances.get(name).map_or(&[][..], Vec::as_slice);
                service(name, route, upstreams, found)
            })
            .collect::<Result<Vec<Value>, RenderError>>()?;
        let context = json!({
            "node": node,
            "node_label": label(node),
            "version": number,
            "listen": self.listen,
            "upsync": upstreams == Upstreams::Upsync,
            "consul": self.consul,
            "dump_dir": self.dump_dir.trim_end_matches('/'),
            "services": services,
        });
        Ok(self.template.render(&context)?)
    }

    /// Checks that the template renders with every name it may use.
    pub fn check(&self) -> Result<(), RenderError> {
        let route = Route {
            lb: Some(Lb::LeastRequest),
            weights: [("v1".to_owned(), 100)].into(),
            ..Route::default()
        };
        let routes: Routes = [("example".to_owned(), route)].into();
        let instance = Instance {
            id: "example-1".into(),
            address: "10.0.0.1".into(),
            port: 8080,
            meta: [("version".to_owned(), "v1".to_owned())].into(),
            ..Instance::default()
        };
        let instances = [("example".to_owned(), vec![instance])].into();
        for upstreams in [Upstreams::Upsync, Upstreams::Static] {
            self.render(upstreams, "node", 1, &routes, &instances)?;
        }
        Ok(())
    }
}

// === impl NginxApply ===

impl NginxApply {
    /// Debian's and OpenResty's usual layout: `/etc/nginx/nginx.conf`,
    /// `nginx` on the deployer's `PATH`, nginx listening on the standard
    /// address.
    pub fn standard() -> Self {
        let argv = |a: &[&str]| a.iter().map(|&s| s.to_owned()).collect();
        Self {
            conf_path: "/etc/nginx/nginx.conf".into(),
            validate: argv(&["nginx", "-t", "-c", "{path}"]),
            reload: argv(&["nginx", "-s", "reload", "-c", "{path}"]),
            verify_url: Some(format!("http://127.0.0.1:8888{CONFIG_PATH}/{{version}}")),
        }
    }

    /// The verify URL for `version`, if any.
    pub fn verify_url_of(&self, version: u64) -> Option<String> {
        self.verify_url
            .as_ref()
            .map(|u| u.replace("{version}", &version.to_string()))
    }
}

/// The URL through nginx listening at `listen` (an nginx `listen` value)
/// that answers 2xx once version `{version}` is in effect, on a loopback
/// address the node's deployer may ask; `None` when `listen` names an
/// address of the node that is not a loopback one.
pub fn verify_url_for(listen: &str) -> Option<String> {
    let addr = listen.split_whitespace().next().unwrap_or_default();
    let host_port = if addr.bytes().all(|b| b.is_ascii_digit()) {
        format!("127.0.0.1:{addr}")
    } else if let Some(port) = addr
        .strip_prefix("*:")
        .or_else(|| addr.strip_prefix("localhost:"))
    {
        format!("127.0.0.1:{port}")
    } else {
        let parsed: std::net::SocketAddr = addr.parse().ok()?;
        let ip = match parsed.ip() {
            std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            ip if ip.is_loopback() => ip,
            _ => return None,
        };
        std::net::SocketAddr::new(ip, parsed.port()).to_string()
    };
    Some(format!("http://{host_port}{CONFIG_PATH}/{{version}}"))
}

/// The node's name as it can go into an nginx string: characters nginx
/// would read specially (quotes, `$`, `;`, braces, spaces) become `_`.
fn label(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The template's names for one route.
fn service(
    name: &str,
    route: &Route,
    upstreams: Upstreams,
    instances: &[Instance],
) -> Result<Value, RenderError> {
    let timeout = route.effective_timeout();
    let try_timeout = route.per_try_timeout.map_or(timeout, HumanDuration::get);
    let retries = route.retries.unwrap_or(DEFAULT_RETRIES);
    let (servers, skipped) = match upstreams {
        Upstreams::Static => servers(route, instances),
        Upstreams::Upsync => (Vec::new(), Vec::new()),
    };
    let weights: Vec<String> = route
        .weights
        .iter()
        .map(|(k, w)| format!("{k}={w}%"))
        .collect();
    Ok(json!({
        "name": name,
        "balance": balance(name, route)?,
        "weights": weights.join(" "),
        "connect_timeout": HumanDuration(try_timeout.min(CONNECT_TIMEOUT)).to_string(),
        "try_timeout": HumanDuration(try_timeout).to_string(),
        "timeout": HumanDuration(timeout).to_string(),
        "retry": retries > 0,
        "tries": retries + 1,
        "servers": servers,
        "skipped": skipped,
    }))
}

/// nginx's balancing directive for the route's algorithm.
fn balance(name: &str, route: &Route) -> Result<String, RenderError> {
    Ok(match route.lb.unwrap_or(Lb::P2cEwma) {
        Lb::P2cEwma => "random two least_conn".into(),
        Lb::RoundRobin => String::new(),
        Lb::LeastRequest => "least_conn".into(),
        Lb::ConsistentHash => {
            let (field, var) = match (&route.hash_header, &route.hash_cookie) {
                (Some(h), _) => (
                    "hash_header",
                    format!("http_{}", h.to_ascii_lowercase().replace('-', "_")),
                ),
                (None, Some(c)) => ("hash_cookie", format!("cookie_{c}")),
                (None, None) => ("lb", String::new()),
            };
            let usable =
                var.contains('_') && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !usable {
                return Err(RenderError::Unsupported {
                    field: format!("routes.{name}.{field}"),
                    message: format!("${var} cannot be an nginx variable"),
                });
            }
            format!("hash ${var} consistent")
        }
    })
}

/// Static servers with their weights, and the instances left out.
fn servers(route: &Route, instances: &[Instance]) -> (Vec<Value>, Vec<Value>) {
    let mut skipped = Vec::new();
    let mut usable = Vec::new();
    for i in instances {
        match host_port(&i.address, i.port) {
            Some(addr) => usable.push((i, addr)),
            None => skipped.push(json!({"id": i.id, "reason": "not an address nginx can use"})),
        }
    }
    if route.weights.is_empty() {
        let servers = usable
            .into_iter()
            .map(|(i, addr)| json!({"id": i.id, "address": addr, "weight": Value::Null}))
            .collect();
        return (servers, skipped);
    }
    let group = |i: &Instance| -> Option<String> {
        if let Some(v) = i
            .meta
            .get("version")
            .filter(|v| route.weights.contains_key(*v))
        {
            return Some(v.clone());
        }
        i.tags
            .iter()
            .find(|t| route.weights.contains_key(*t))
            .cloned()
    };
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (i, _) in &usable {
        if let Some(g) = group(i) {
            *counts.entry(g).or_default() += 1;
        }
    }
    // As the proxy does: ungrouped instances only serve when no group can.
    let grouped = counts.keys().any(|g| route.weights[g] > 0);
    let mut servers = Vec::new();
    for (i, addr) in usable {
        match group(i) {
            Some(g) if route.weights[&g] > 0 => {
                // The group's percent split evenly over its instances.
                let weight = (u64::from(route.weights[&g]) * 100 / counts[&g]).max(1);
                servers.push(json!({"id": i.id, "address": addr, "weight": weight}));
            }
            Some(g) => skipped.push(json!({"id": i.id, "reason": format!("{g} has weight 0")})),
            None if grouped => {
                skipped.push(json!({"id": i.id, "reason": "in no weighted version or tag"}))
            }
            None => servers.push(json!({"id": i.id, "address": addr, "weight": Value::Null})),
        }
    }
    (servers, skipped)
}

/// `host:port` as nginx reads it (`[v6]:port`), if the address is plain.
fn host_port(address: &str, port: u32) -> Option<String> {
    if port == 0 || port > 65535 || address.is_empty() {
        return None;
    }
    if address.parse::<std::net::Ipv6Addr>().is_ok() {
        return Some(format!("[{address}]:{port}"));
    }
    let plain = address
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    plain.then(|| format!("{address}:{port}"))
}

#[cfg(test)]
mod tests;
