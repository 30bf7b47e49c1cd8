//! SPIFFE IDs as the mesh issues them: `spiffe://<trust-domain>/svc/<name>`
//! for a service and `spiffe://<trust-domain>/node/<node>` for a node agent.
//!
//! Parsing is strict: only the canonical form the mesh writes is accepted
//! (lowercase, no port, query, fragment or percent-encoding), so two
//! certificates can never name the same workload in two spellings.

use std::fmt;
use std::str::FromStr;

/// The URI scheme of every SPIFFE ID.
pub const SCHEME: &str = "spiffe://";
/// The longest trust domain name (the SPIFFE spec's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The longest service name (a DNS label, as the mesh's service-name rule).
pub const MAX_SERVICE_LEN: usize = 63;
/// The longest node name.
pub const MAX_NODE_LEN: usize = 128;
/// Names no service may take: the proxy's own path prefixes (`v1` is the
/// Consul agent API, `_mesh` is reserved) and its peers' service.
pub const RESERVED_SERVICES: [&str; 3] = ["v1", "_mesh", "mesh-proxy"];
/// The mesh's own components whose identity (`svc/<name>`, issued for an
/// instance registered on a node) carries rights no service has:
/// mesh-monitor's reports health checks to every node's bridge,
/// mesh-control's drives them. They register in Consul themselves, with
/// their own tokens; no registration made for a workload (through a
/// node's proxy or through mesh-control) may take their names.
pub const SELF_REGISTERED: [&str; 2] = ["mesh-monitor", "mesh-control"];

/// A bad trust domain, workload name or SPIFFE ID; the message says what is
/// wrong with which part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a valid {what}: {reason}")]
pub struct SpiffeIdError {
    /// What was being read (`SPIFFE ID`, `trust domain`, `service name`, ...).
    pub what: &'static str,
    /// The text that was refused.
    pub input: String,
    /// Why.
    pub reason: String,
}

/// A trust domain: the name of one mesh's CA, the authority part of its IDs.
///
/// Lowercase letters, digits, `.`, `-` and `_` (the SPIFFE spec's set), at
/// most [`MAX_TRUST_DOMAIN_LEN`] characters.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

/// What an identity names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// A service (`/svc/<name>`), by its lowercase name.
    Service(String),
    /// A node agent (`/node/<node>`), by its lowercase node name.
    Node(String),
}

/// A workload's identity in the mesh: one URI SAN of its certificate.
///
/// Names are stored lowercase: the mesh compares service and node names
/// ignoring ASCII case, so the identity carries the one canonical spelling.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    workload: Workload,
}

// === impl TrustDomain ===

impl TrustDomain {
    /// Checks a trust domain name.
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        let err = |reason: String| SpiffeIdError {
            what: "trust domain",
            input: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(err("it is empty".into()));
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(err(format!(
                "it is longer than {MAX_TRUST_DOMAIN_LEN} characters"
            )));
        }
        if let Some(bad) = name.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        }) {
            let hint = if bad.is_ascii_uppercase() {
                " (trust domains are lowercase)"
            } else {
                ""
            };
            return Err(err(format!(
                "it has {bad:?}{hint}: use lowercase letters, digits, '.', '-' and '_'"
            )));
        }
        if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
            return Err(err("it has an empty dot-separated label".into()));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The ID of the trust domain itself (`spiffe://<trust-domain>`), which
    /// the mesh CA's own certificate carries.
    pub fn id_uri(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> Self {
        td.0
    }
}

// === impl SpiffeId ===

impl SpiffeId {
    /// The identity of service `name` (checked with the mesh's service-name
    /// rule, then lowercased).
    pub fn service(trust_domain: &TrustDomain, name: &str) -> Result<Self, SpiffeIdError> {
        check_service_name(name).map_err(|reason| SpiffeIdError {
            what: "service name",
            input: name.to_owned(),
            reason,
        })?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            workload: Workload::Service(name.to_ascii_lowercase()),
        })
    }

    /// The identity of the node agent on node `node` (checked, then
    /// lowercased).
    pub fn node(trust_domain: &TrustDomain, node: &str) -> Result<Self, SpiffeIdError> {
        check_node_name(node).map_err(|reason| SpiffeIdError {
            what: "node name",
            input: node.to_owned(),
            reason,
        })?;
        Ok(Self {
            trust_domain: trust_domain.clone(),
            workload: Workload::Node(node.to_ascii_lowercase()),
        })
    }

    /// Parses the canonical URI form; anything else is refused with the
    /// reason.
    pub fn parse(uri: &str) -> Result<Self, SpiffeIdError> {
        let err = |reason: String| SpiffeIdError {
            what: "SPIFFE ID",
            input: uri.to_owned(),
            reason,
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| err(format!("it must start with {SCHEME:?}")))?;
        if let Some(bad) = rest
            .chars()
            .find(|c| matches!(c, '?' | '#' | '%' | '@' | ':'))
        {
            return Err(err(format!(
                "it has {bad:?}: no query, fragment, percent-encoding, user or port"
            )));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let trust_domain = TrustDomain::new(authority)
            .map_err(|e| err(format!("the trust domain {authority:?}: {}", e.reason)))?;
        let (kind, name) = path
            .split_once('/')
            .ok_or_else(|| err("the path must be /svc/<name> or /node/<node>".into()))?;
        let check = |rule: fn(&str) -> Result<(), String>, what: &str| {
            rule(name).map_err(|reason| err(format!("the {what} {name:?}: {reason}")))?;
            if name.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(err(format!(
                    "the {what} {name:?} must be lowercase, as the mesh issues it"
                )));
            }
            Ok(name.to_owned())
        };
        let workload = match kind {
            "svc" => Workload::Service(check(check_service_name, "service name")?),
            "node" => Workload::Node(check(check_node_name, "node name")?),
            other => {
                return Err(err(format!(
                    "the path must be /svc/<name> or /node/<node>, not /{other}/..."
                )));
            }
        };
        Ok(Self {
            trust_domain,
            workload,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// What it names.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// The service name, when it names a service.
    pub fn service_name(&self) -> Option<&str> {
        match &self.workload {
            Workload::Service(name) => Some(name),
            Workload::Node(_) => None,
        }
    }

    /// The node name, when it names a node agent.
    pub fn node_name(&self) -> Option<&str> {
        match &self.workload {
            Workload::Node(name) => Some(name),
            Workload::Service(_) => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, name) = match &self.workload {
            Workload::Service(name) => ("svc", name),
            Workload::Node(name) => ("node", name),
        };
        write!(f, "{SCHEME}{}/{kind}/{name}", self.trust_domain)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.to_string()
    }
}

/// Checks a service name with the mesh's rule, the one rule mesh-control,
/// the deployer and mesh-proxy check it with: ASCII letters, digits, `-` and `_`,
/// starting with a letter or digit, at most [`MAX_SERVICE_LEN`], not one of
/// [`RESERVED_SERVICES`].
pub fn check_service_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a service name must not be empty".into());
    }
    if RESERVED_SERVICES
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
    {
        return Err(format!("{name:?} is reserved by the mesh"));
    }
    check_chars(name, MAX_SERVICE_LEN, &['-', '_'])
}

/// Checks the name of a workload's registration: a service name
/// ([`check_service_name`]) that is not one of [`SELF_REGISTERED`].
pub fn check_workload_name(name: &str) -> Result<(), String> {
    check_service_name(name)?;
    if SELF_REGISTERED.iter().any(|c| c.eq_ignore_ascii_case(name)) {
        return Err(format!(
            "{name:?} is reserved for the mesh's own component, which registers itself in Consul"
        ));
    }
    Ok(())
}

/// Checks a node name for use in an identity: ASCII letters, digits, `.`,
/// `-` and `_`, starting with a letter or digit, at most [`MAX_NODE_LEN`].
pub fn check_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a node name must not be empty".into());
    }
    check_chars(name, MAX_NODE_LEN, &['.', '-', '_'])
}

/// Checks `name` against the rule the mesh's names share: ASCII letters,
/// digits and the characters of `extra`, starting with a letter or digit,
/// at most `max` long. The message quotes `name` first, so a caller can
/// put the field's name before it.
pub fn check_chars(name: &str, max: usize, extra: &[char]) -> Result<(), String> {
    if name.len() > max {
        return Err(format!("{name:?} is longer than {max} characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("{name:?} must start with a letter or digit"));
    }
    match name
        .chars()
        .find(|c| !c.is_ascii_alphanumeric() && !extra.contains(c))
    {
        Some(bad) => {
            // "letters, digits, '.', '-' and '_'"
            let quoted: Vec<String> = extra.iter().map(|c| format!("{c:?}")).collect();
            let allowed = match quoted.split_last() {
                Some((last, rest)) => format!(
                    "letters, digits{} and {last}",
                    rest.iter().map(|c| format!(", {c}")).collect::<String>()
                ),
                None => "letters and digits".to_owned(),
            };
            Err(format!(
                "{name:?} has a bad character {bad:?}: use {allowed}"
            ))
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("mesh.example").unwrap()
    }

    #[test]
    fn service_and_node_ids_round_trip_through_their_uri() {
        let svc = SpiffeId::service(&td(), "orders").unwrap();
        assert_eq!(svc.to_string(), "spiffe://mesh.example/svc/orders");
        assert_eq!(SpiffeId::parse(&svc.to_string()).unwrap(), svc);
        assert_eq!(svc.service_name(), Some("orders"));
        assert_eq!(svc.node_name(), None);

        let node = SpiffeId::node(&td(), "node-1.dc1").unwrap();
        assert_eq!(node.to_string(), "spiffe://mesh.example/node/node-1.dc1");
        assert_eq!(
            "spiffe://mesh.example/node/node-1.dc1".parse::<SpiffeId>(),
            Ok(node.clone())
        );
        assert_eq!(node.node_name(), Some("node-1.dc1"));
        assert_eq!(node.trust_domain().as_str(), "mesh.example");
    }

    #[test]
    fn names_are_lowercased_so_one_service_has_one_identity() {
        let upper = SpiffeId::service(&td(), "Orders_V2").unwrap();
        assert_eq!(upper.to_string(), "spiffe://mesh.example/svc/orders_v2");
        assert_eq!(upper, SpiffeId::service(&td(), "orders_v2").unwrap());
        let err = SpiffeId::parse("spiffe://mesh.example/svc/Orders").unwrap_err();
        assert!(err.to_string().contains("must be lowercase"), "{err}");
    }

    #[test]
    fn ids_serialize_as_their_uri_and_deserialize_strictly() {
        let id = SpiffeId::service(&td(), "orders").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://mesh.example/svc/orders\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        let err = serde_json::from_str::<SpiffeId>("\"spiffe://mesh.example/svc/Orders\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be lowercase"), "{err}");
        assert_eq!(serde_json::to_string(&td()).unwrap(), "\"mesh.example\"");
        assert!(serde_json::from_str::<TrustDomain>("\"Mesh\"").is_err());
    }

    #[test]
    fn trust_domains_follow_the_spiffe_character_set() {
        for good in ["mesh", "prod.mesh.example", "a-b_c.1"] {
            assert!(TrustDomain::new(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("Mesh.example", "lowercase"),
            ("mesh example", "' '"),
            ("mesh.example:8443", "':'"),
            (".mesh", "empty dot-separated label"),
            ("mesh..example", "empty dot-separated label"),
        ] {
            let err = TrustDomain::new(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.contains("trust domain"), "{err}");
        }
        let long = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert!(
            TrustDomain::new(&long)
                .unwrap_err()
                .to_string()
                .contains("longer than 255")
        );
    }

    #[test]
    fn service_names_follow_the_mesh_rule() {
        for (bad, why) in [
            ("", "must not be empty"),
            ("v1", "reserved"),
            ("_mesh", "reserved"),
            ("Mesh-Proxy", "reserved"),
            ("-orders", "must start with a letter or digit"),
            ("orders.v2", "'.'"),
            ("or/ders", "'/'"),
        ] {
            let err = SpiffeId::service(&td(), bad).unwrap_err();
            assert_eq!(err.what, "service name");
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
        let long = "a".repeat(MAX_SERVICE_LEN + 1);
        assert!(
            SpiffeId::service(&td(), &long)
                .unwrap_err()
                .to_string()
                .contains("longer than 63")
        );
        assert!(SpiffeId::service(&td(), &"a".repeat(MAX_SERVICE_LEN)).is_ok());
    }

    #[test]
    fn a_bad_character_is_named_with_what_the_rule_allows() {
        assert_eq!(
            check_service_name("a.b").unwrap_err(),
            r#""a.b" has a bad character '.': use letters, digits, '-' and '_'"#
        );
        assert_eq!(
            check_node_name("a b").unwrap_err(),
            r#""a b" has a bad character ' ': use letters, digits, '.', '-' and '_'"#
        );
    }

    #[test]
    fn node_names_allow_dots_but_nothing_that_escapes_a_path_segment() {
        assert!(SpiffeId::node(&td(), "ip-10-0-0-1.ec2.internal").is_ok());
        for (bad, why) in [
            ("", "must not be empty"),
            ("..", "must start with a letter or digit"),
            ("a/b", "'/'"),
            ("a b", "' '"),
        ] {
            let err = SpiffeId::node(&td(), bad).unwrap_err();
            assert_eq!(err.what, "node name");
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn non_canonical_uris_are_refused_with_the_reason() {
        for (bad, why) in [
            (
                "https://mesh.example/svc/orders",
                "must start with \"spiffe://\"",
            ),
            ("SPIFFE://mesh.example/svc/orders", "must start with"),
            ("spiffe:///svc/orders", "trust domain \"\""),
            ("spiffe://Mesh/svc/orders", "lowercase"),
            (
                "spiffe://mesh.example:443/svc/orders",
                "no query, fragment, percent-encoding, user or port",
            ),
            ("spiffe://u@mesh.example/svc/orders", "'@'"),
            ("spiffe://mesh.example/svc/orders?x=1", "'?'"),
            ("spiffe://mesh.example/svc/orders#x", "'#'"),
            ("spiffe://mesh.example/svc/or%64ers", "'%'"),
            ("spiffe://mesh.example", "/svc/<name> or /node/<node>"),
            ("spiffe://mesh.example/", "/svc/<name> or /node/<node>"),
            ("spiffe://mesh.example/svc", "/svc/<name> or /node/<node>"),
            ("spiffe://mesh.example/svc/", "must not be empty"),
            ("spiffe://mesh.example/svc/orders/", "'/'"),
            ("spiffe://mesh.example/svc/orders/extra", "'/'"),
            ("spiffe://mesh.example/ns/default/sa/orders", "not /ns/..."),
            ("spiffe://mesh.example/svc/v1", "reserved"),
            (
                "spiffe://mesh.example/node/..",
                "must start with a letter or digit",
            ),
        ] {
            let err = SpiffeId::parse(bad).unwrap_err();
            assert_eq!(err.what, "SPIFFE ID");
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_workload_may_not_take_a_self_registered_components_name() {
        assert_eq!(check_workload_name("orders"), Ok(()));
        for name in ["mesh-monitor", "MESH-CONTROL"] {
            let e = check_workload_name(name).unwrap_err();
            assert!(e.contains("reserved for the mesh's own component"), "{e}");
            // Still a service name: the component's own identity.
            assert_eq!(check_service_name(name), Ok(()));
        }
        // The service-name rule comes first.
        let e = check_workload_name("mesh-proxy").unwrap_err();
        assert!(e.contains("reserved by the mesh"), "{e}");
    }
}
