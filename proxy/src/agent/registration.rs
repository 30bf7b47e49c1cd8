//! A registration as Consul's agent API takes it (`Name`, `ID`, `Address`,
//! `Port`, `Tags`, `Meta`, `Check`, `Checks`), validated into a
//! [`Registration`]. Keys match ignoring case and underscores, as Consul's
//! own decoder does (`DeregisterCriticalServiceAfter` or
//! `deregister_critical_service_after`); keys the mesh has no use for
//! (`EnableTagOverride`, `Weights`, ...) are ignored.
//!
//! Every refusal is one sentence naming the field and the problem.

use std::{collections::BTreeMap, net::IpAddr};

use mesh_proto::v1 as pb;
use mesh_runtime::pki::spiffe;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{peer, route::RESERVED};

/// Longest service name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;
/// Longest instance ID (IDs often carry a name and a random suffix).
pub const MAX_ID_LEN: usize = 128;

/// A validated registration, as queued and as forwarded to the bridge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// Instance ID (defaults to the name).
    pub id: String,
    /// Service name.
    pub name: String,
    /// Address; empty means the node's.
    pub address: String,
    /// Port, 1..=65535.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Meta.
    pub meta: BTreeMap<String, String>,
    /// Health checks.
    pub checks: Vec<CheckSpec>,
}

/// One health check: exactly one of `http`, `tcp`, `ttl` is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    /// URL Consul GETs.
    pub http: String,
    /// host:port Consul connects to.
    pub tcp: String,
    /// TTL the service refreshes itself.
    pub ttl: String,
    /// How often Consul runs it.
    pub interval: String,
    /// How long one run may take.
    pub timeout: String,
    /// Deregister after critical this long.
    pub deregister_critical_service_after: String,
}

/// Check kinds Consul knows that the mesh does not run.
const UNSUPPORTED_KINDS: [&str; 8] = [
    "Args",
    "Script",
    "ScriptArgs",
    "GRPC",
    "DockerContainerID",
    "H2PING",
    "AliasService",
    "Shell",
];

// === impl Registration ===

impl Registration {
    /// Parses and validates a Consul registration body.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
        let Value::Object(map) = value else {
            return Err("invalid JSON: expected an object".into());
        };
        let f = Fields(&map);
        let name = match f.get("Name") {
            None | Some(Value::Null) => return Err("missing Name".into()),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err("Name must be a string".into()),
        };
        check_name(&name)?;
        // The components that register themselves (mesh-control's rule too).
        spiffe::check_workload_name(&name).map_err(|e| format!("Name {e}"))?;
        let id = match f.string("ID")? {
            Some(id) if !id.is_empty() => {
                check_id(&id)?;
                id
            }
            _ => name.clone(),
        };
        let address = f.string("Address")?.unwrap_or_default();
        if !address.is_empty() && !valid_address(&address) {
            return Err(format!(
                "invalid Address {address:?}: expected an IP address or a host name"
            ));
        }
        let port = port(&f)?;
        let checks = checks(&f)?;
        Ok(Self {
            id,
            name,
            address,
            port,
            tags: f.string_list("Tags")?,
            meta: f.string_map("Meta")?,
            checks,
        })
    }

    /// The bridge's form.
    pub fn to_proto(&self) -> pb::ServiceRegistration {
        pb::ServiceRegistration {
            id: self.id.clone(),
            name: self.name.clone(),
            address: self.address.clone(),
            port: u32::from(self.port),
            tags: self.tags.clone(),
            meta: self
                .meta
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            checks: self.checks.iter().map(CheckSpec::to_proto).collect(),
        }
    }
}

fn port(f: &Fields<'_>) -> Result<u16, String> {
    match f.get("Port") {
        None | Some(Value::Null) => Err("missing Port (1..65535)".into()),
        Some(v) => v
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("Port {v} is outside 1..65535")),
    }
}

/// `Check` and `Checks`, as Consul takes both.
fn checks(f: &Fields<'_>) -> Result<Vec<CheckSpec>, String> {
    let mut checks = Vec::new();
    match f.get("Check") {
        None | Some(Value::Null) => {}
        Some(Value::Object(c)) => checks.push(CheckSpec::parse(c)?),
        Some(_) => return Err("Check must be an object".into()),
    }
    match f.get("Checks") {
        None | Some(Value::Null) => {}
        Some(Value::Array(all)) => {
            for c in all {
                let Value::Object(c) = c else {
                    return Err("Checks must be a list of objects".into());
                };
                checks.push(CheckSpec::parse(c)?);
            }
        }
        Some(_) => return Err("Checks must be a list of objects".into()),
    }
    Ok(checks)
}

// === impl CheckSpec ===

impl CheckSpec {
    fn parse(map: &Map<String, Value>) -> Result<Self, String> {
        let f = Fields(map);
        for kind in UNSUPPORTED_KINDS {
            if f.get(kind).is_some_and(|v| !v.is_null()) {
                return Err(format!(
                    "unknown check kind {kind}: the mesh runs HTTP, TCP and TTL checks"
                ));
            }
        }
        let check = Self {
            http: f.string("HTTP")?.unwrap_or_default(),
            tcp: f.string("TCP")?.unwrap_or_default(),
            ttl: f.string("TTL")?.unwrap_or_default(),
            interval: f.string("Interval")?.unwrap_or_default(),
            timeout: f.string("Timeout")?.unwrap_or_default(),
            deregister_critical_service_after: f
                .string("DeregisterCriticalServiceAfter")?
                .unwrap_or_default(),
        };
        let kinds = [&check.http, &check.tcp, &check.ttl]
            .iter()
            .filter(|k| !k.is_empty())
            .count();
        match kinds {
            0 => return Err("unknown check kind: a check needs one of HTTP, TCP or TTL".into()),
            1 => {}
            _ => return Err("a check may set only one of HTTP, TCP or TTL".into()),
        }
        if !check.http.is_empty() && !valid_http_url(&check.http) {
            return Err(format!(
                "check HTTP {:?} is not an http:// or https:// URL",
                check.http
            ));
        }
        if !check.tcp.is_empty() && !valid_host_port(&check.tcp) {
            return Err(format!("check TCP {:?} is not host:port", check.tcp));
        }
        if check.ttl.is_empty() && check.interval.is_empty() {
            return Err("check without Interval: HTTP and TCP checks need one".into());
        }
        for (field, value) in [
            ("TTL", &check.ttl),
            ("Interval", &check.interval),
            ("Timeout", &check.timeout),
            (
                "DeregisterCriticalServiceAfter",
                &check.deregister_critical_service_after,
            ),
        ] {
            if !value.is_empty() && !valid_go_duration(value) {
                return Err(format!(
                    "check {field} {value:?} is not a duration such as 10s, 500ms or 1m"
                ));
            }
        }
        Ok(check)
    }

    fn to_proto(&self) -> pb::Check {
        pb::Check {
            http: self.http.clone(),
            tcp: self.tcp.clone(),
            ttl: self.ttl.clone(),
            interval: self.interval.clone(),
            timeout: self.timeout.clone(),
            deregister_critical_service_after: self.deregister_critical_service_after.clone(),
        }
    }
}

/// Checks a service name: ASCII letters, digits, `-` and `_`, at most 63,
/// starting with a letter or digit, not reserved (nor `mesh-proxy`, the
/// proxies' own).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("missing Name".into());
    }
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err(format!("Name {name:?} is reserved by the proxy"));
    }
    if peer::is_peer_service(name) {
        return Err(format!(
            "Name {name:?} is reserved for the mesh's own proxies"
        ));
    }
    check_chars("Name", name, MAX_NAME_LEN, &['-', '_'])
}

/// Checks an instance ID: as a name, plus `.` and `:`, at most 128; not
/// one of the proxies' own (`mesh-proxy-<node>`), which a service must
/// neither replace nor remove.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("missing ID".into());
    }
    let n = peer::SERVICE.len();
    if id.get(..n).is_some_and(peer::is_peer_service) && id[n..].starts_with('-') {
        return Err(format!(
            "ID {id:?} is reserved for the mesh's own proxies (mesh-proxy-<node>)"
        ));
    }
    check_chars("ID", id, MAX_ID_LEN, &['-', '_', '.', ':'])
}

/// The mesh's rule for names (see [`spiffe::check_chars`]), its message
/// led by the JSON field it is about.
fn check_chars(field: &str, value: &str, max: usize, extra: &[char]) -> Result<(), String> {
    spiffe::check_chars(value, max, extra).map_err(|e| format!("{field} {e}"))
}

fn valid_address(a: &str) -> bool {
    a.parse::<IpAddr>().is_ok() || valid_hostname(a)
}

fn valid_hostname(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn valid_host_port(hp: &str) -> bool {
    let Some((host, port)) = hp.rsplit_once(':') else {
        return false;
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    port.parse::<u16>().is_ok_and(|p| p != 0) && valid_address(host)
}

fn valid_http_url(url: &str) -> bool {
    url.parse::<http::Uri>()
        .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
}

/// A Go duration as Consul takes it: `10s`, `1m30s`, `500ms`, `1.5h`.
fn valid_go_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 || rest[..digits].parse::<f64>().is_err() {
            return false;
        }
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        if !matches!(&rest[..unit], "ns" | "us" | "µs" | "ms" | "s" | "m" | "h") {
            return false;
        }
        rest = &rest[unit..];
    }
    true
}

/// Case- and underscore-insensitive access to a JSON object's fields.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        if let Some(v) = self.0.get(key) {
            return Some(v);
        }
        self.0
            .iter()
            .find(|(k, _)| same_key(k, key))
            .map(|(_, v)| v)
    }

    fn string(&self, key: &str) -> Result<Option<String>, String> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{key} must be a string")),
        }
    }

    fn string_list(&self, key: &str) -> Result<Vec<String>, String> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| format!("{key} must be a list of strings")),
            Some(_) => Err(format!("{key} must be a list of strings")),
        }
    }

    fn string_map(&self, key: &str) -> Result<BTreeMap<String, String>, String> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect::<Option<_>>()
                .ok_or_else(|| format!("{key} must map strings to strings")),
            Some(_) => Err(format!("{key} must map strings to strings")),
        }
    }
}

fn same_key(a: &str, b: &str) -> bool {
    let norm = |s: &'_ str| {
        s.bytes()
            .filter(|b| *b != b'_')
            .map(|b| b.to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Registration::parse(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn a_consul_registration_parses() {
        let r = Registration::parse(
            br#"{"ID":"orders-1","Name":"orders","Address":"10.0.0.5","Port":8080,
                "Tags":["v1"],"Meta":{"version":"1.2"},"EnableTagOverride":false,
                "Check":{"HTTP":"http://10.0.0.5:8080/health","Interval":"1s",
                         "DeregisterCriticalServiceAfter":"1m"}}"#,
        )
        .unwrap();
        assert_eq!(r.id, "orders-1");
        assert_eq!(r.port, 8080);
        assert_eq!(r.tags, vec!["v1"]);
        assert_eq!(r.meta["version"], "1.2");
        assert_eq!(r.checks[0].interval, "1s");
        assert_eq!(r.checks[0].deregister_critical_service_after, "1m");
        let p = r.to_proto();
        assert_eq!(p.checks[0].http, "http://10.0.0.5:8080/health");
    }

    #[test]
    fn keys_ignore_case_and_id_defaults_to_name() {
        let r = Registration::parse(
            br#"{"name":"orders","port":1,"checks":[{"ttl":"10s"},{"tcp":"127.0.0.1:1","interval":"1m30s"}]}"#,
        )
        .unwrap();
        assert_eq!(r.id, "orders");
        assert_eq!(r.checks.len(), 2);
    }

    #[test]
    fn each_problem_is_named() {
        let cases = [
            (r#"{"Name": "#, "invalid JSON"),
            (r#"[1]"#, "invalid JSON"),
            (r#"{"Port": 80}"#, "missing Name"),
            (r#"{"Name": "", "Port": 80}"#, "missing Name"),
            (r#"{"Name": "a b", "Port": 80}"#, "bad character"),
            (r#"{"Name": "-x", "Port": 80}"#, "must start"),
            (
                &format!(r#"{{"Name": "{}", "Port": 80}}"#, "a".repeat(64)),
                "longer than 63",
            ),
            (r#"{"Name": "v1", "Port": 80}"#, "reserved"),
            (r#"{"Name": "_mesh", "Port": 80}"#, "reserved"),
            (
                r#"{"Name": "Mesh-Proxy", "Port": 80}"#,
                "reserved for the mesh's own",
            ),
            (
                r#"{"Name": "x", "ID": "mesh-proxy-n2", "Port": 80}"#,
                "reserved for the mesh's own",
            ),
            (
                r#"{"Name": "mesh-monitor", "Port": 80}"#,
                "reserved for the mesh's own component",
            ),
            (
                r#"{"Name": "Mesh-Control", "Port": 80}"#,
                "reserved for the mesh's own component",
            ),
            (r#"{"Name": "x", "Port": 0}"#, "Port 0"),
            (r#"{"Name": "x", "Port": 70000}"#, "Port 70000"),
            (r#"{"Name": "x"}"#, "missing Port"),
            (r#"{"Name": "x", "Port": "80"}"#, "Port"),
            (r#"{"Name": "x", "ID": "a/b", "Port": 80}"#, "ID"),
            (
                r#"{"Name": "x", "Port": 80, "Address": "not an address!"}"#,
                "Address",
            ),
            (
                r#"{"Name": "x", "Port": 80, "Check": {"HTTP": "http://a/h"}}"#,
                "without Interval",
            ),
            (
                r#"{"Name": "x", "Port": 80, "Check": {"GRPC": "a:1", "Interval": "1s"}}"#,
                "unknown check kind",
            ),
            (
                r#"{"Name": "x", "Port": 80, "Check": {"Interval": "1s"}}"#,
                "unknown check kind",
            ),
            (
                r#"{"Name": "x", "Port": 80, "Check": {"HTTP": "http://a/h", "Interval": "soon"}}"#,
                "Interval",
            ),
            (r#"{"Name": "x", "Port": 80, "Tags": "a"}"#, "Tags"),
        ];
        for (json, want) in cases {
            let e = err(json);
            assert!(e.contains(want), "{json}: {e:?} lacks {want:?}");
        }
    }

    #[test]
    fn ids_take_dots_and_colons_names_do_not() {
        assert!(check_id("orders-10.0.0.5:8080").is_ok());
        assert!(check_name("orders.v2").is_err());
        assert!(check_name("Orders_2").is_ok());
    }

    #[test]
    fn go_durations() {
        for ok in ["1s", "500ms", "1m30s", "1.5h", "10us"] {
            assert!(valid_go_duration(ok), "{ok}");
        }
        for bad in ["", "s", "10", "1 s", "10x", "-1s"] {
            assert!(!valid_go_duration(bad), "{bad}");
        }
    }
}
