//! The JSON shapes Consul sends and accepts, in Consul's own field names.
//!
//! Reads are lenient (Consul 1.8 sends `null` for empty tags and meta, and
//! accepts ports beyond 65535, so answers carry `u32` ports); writes skip
//! what is unset so that Consul applies its own defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// A service instance to register with the agent
/// (`PUT /v1/agent/service/register`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentServiceRegistration {
    /// Instance ID, unique on the agent; Consul defaults it to the name.
    #[serde(rename = "ID", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Service name.
    #[serde(rename = "Name")]
    pub name: String,
    /// Address; Consul defaults it to the node's address.
    #[serde(rename = "Address", default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Port.
    #[serde(rename = "Port", default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Tags.
    #[serde(rename = "Tags", default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Free-form metadata.
    #[serde(rename = "Meta", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    /// One health check.
    #[serde(rename = "Check", default, skip_serializing_if = "Option::is_none")]
    pub check: Option<AgentServiceCheck>,
    /// Several health checks.
    #[serde(rename = "Checks", default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<AgentServiceCheck>,
}

/// A health check registered with a service. Set one of `http`, `tcp`, `ttl`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentServiceCheck {
    /// Check name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Check ID.
    #[serde(rename = "CheckID", default, skip_serializing_if = "Option::is_none")]
    pub check_id: Option<String>,
    /// URL Consul GETs; 2xx is passing.
    #[serde(rename = "HTTP", default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// `host:port` Consul connects to.
    #[serde(rename = "TCP", default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// A TTL the service must refresh (`"10s"`).
    #[serde(rename = "TTL", default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// How often Consul runs the check (`"1s"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// How long one run may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Deregister the service after it was critical this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deregister_critical_service_after: Option<String>,
    /// Initial status (`passing`, `warning`, `critical`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// A check of its own to register with the agent
/// (`PUT /v1/agent/check/register`). Here a TTL check: the registering
/// process passes it (`PUT /v1/agent/check/pass/<id>`) before the TTL runs
/// out, or the agent marks it critical.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCheckRegistration {
    /// Check ID, unique on the agent; Consul defaults it to the name.
    #[serde(rename = "ID", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Check name.
    #[serde(rename = "Name")]
    pub name: String,
    /// Free-form notes for people reading the check.
    #[serde(rename = "Notes", default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// How long the check stays passing without a pass (`"3s"`).
    #[serde(rename = "TTL", default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Initial status (`passing`, `warning`, `critical`); Consul starts a
    /// TTL check critical.
    #[serde(rename = "Status", default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The service instance the check belongs to; none for a node check.
    #[serde(rename = "ServiceID", default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    /// Deregister the check after it was critical this long.
    #[serde(
        rename = "DeregisterCriticalServiceAfter",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub deregister_critical_service_after: Option<String>,
}

/// A service instance as Consul reports it (agent services, health entries).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentService {
    /// Instance ID.
    #[serde(rename = "ID", default)]
    pub id: String,
    /// Service name.
    #[serde(default)]
    pub service: String,
    /// Tags.
    #[serde(default, deserialize_with = "null_default")]
    pub tags: Vec<String>,
    /// Metadata.
    #[serde(default, deserialize_with = "null_default")]
    pub meta: BTreeMap<String, String>,
    /// Address; empty means the node's address.
    #[serde(default)]
    pub address: String,
    /// Port.
    #[serde(default)]
    pub port: u32,
}

/// A catalog node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    /// Node name.
    #[serde(default)]
    pub node: String,
    /// Node address.
    #[serde(default)]
    pub address: String,
    /// Datacenter.
    #[serde(default)]
    pub datacenter: String,
    /// Node metadata, as the node's agent was started with
    /// (`-node-meta key:value`).
    #[serde(default, deserialize_with = "null_default")]
    pub meta: BTreeMap<String, String>,
}

/// One check's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    /// Node the check runs on.
    #[serde(default)]
    pub node: String,
    /// Check ID.
    #[serde(rename = "CheckID", default)]
    pub check_id: String,
    /// `passing`, `warning` or `critical`.
    #[serde(default)]
    pub status: String,
    /// Instance the check belongs to (empty for node checks).
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    /// Last output.
    #[serde(default)]
    pub output: String,
}

/// One instance with its node and checks (`/v1/health/service/<name>`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceEntry {
    /// The node the instance runs on.
    pub node: Node,
    /// The instance.
    pub service: AgentService,
    /// Node and service checks.
    #[serde(default, deserialize_with = "null_default")]
    pub checks: Vec<HealthCheck>,
}

/// A KV entry (`/v1/kv/<key>`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvPair {
    /// The key.
    pub key: String,
    /// The value, decoded from base64.
    pub value: Vec<u8>,
    /// Opaque flags.
    pub flags: u64,
    /// The session holding the key's lock, if any.
    pub session: Option<String>,
    /// Index of the last change: the `cas` for the next write.
    pub modify_index: u64,
    /// How many times the lock was acquired.
    pub lock_index: u64,
}

/// A session to create (`PUT /v1/session/create`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SessionRequest {
    /// Human name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Time to live (`"15s"`); renew before it runs out.
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// `release` (default) or `delete`: what happens to held keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub behavior: Option<String>,
    /// How long the keys of an invalidated session cannot be locked again
    /// (`"1s"`; Consul's default is 15 s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_delay: Option<String>,
    /// The checks (on the session's node) whose going critical invalidates
    /// the session. Empty: Consul's default, the node's `serfHealth`; given,
    /// they replace it, so name `serfHealth` too to keep it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<String>,
}

/// One operation of a KV transaction (`PUT /v1/txn`): every operation of
/// a transaction is applied, or none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvTxnOp {
    /// Sets `key` to `value` only if its modify index is still `index`
    /// (0: only if the key does not exist).
    Cas {
        /// The key.
        key: String,
        /// The new value.
        value: Vec<u8>,
        /// The modify index the key must have.
        index: u64,
    },
    /// Fails the transaction unless `key`'s modify index is `index`.
    CheckIndex {
        /// The key.
        key: String,
        /// The modify index the key must have.
        index: u64,
    },
}

/// What a KV transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvTxnOutcome {
    /// Every operation was applied: per operation, the key and its modify
    /// index after the transaction.
    Committed(Vec<(String, u64)>),
    /// Nothing was applied: per failed operation, its position and Consul's
    /// reason.
    RolledBack(Vec<(usize, String)>),
}

// === impl ServiceEntry ===

impl ServiceEntry {
    /// The address to reach the instance: its own, else its node's.
    pub fn address(&self) -> &str {
        if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        }
    }
}

/// Consul sends `null` for empty lists and maps: read it as empty.
pub(crate) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_uses_consul_names_and_skips_unset() {
        let reg = AgentServiceRegistration {
            id: Some("web-1".into()),
            name: "web".into(),
            port: Some(8080),
            check: Some(AgentServiceCheck {
                http: Some("http://127.0.0.1:8080/health".into()),
                interval: Some("1s".into()),
                deregister_critical_service_after: Some("1m".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = serde_json::to_value(&reg).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "ID": "web-1", "Name": "web", "Port": 8080,
                "Check": {"HTTP": "http://127.0.0.1:8080/health", "Interval": "1s",
                          "DeregisterCriticalServiceAfter": "1m"}
            })
        );
        let back: AgentServiceRegistration = serde_json::from_value(json).unwrap();
        assert_eq!(back, reg);
    }

    #[test]
    fn check_registration_and_session_checks_use_consul_names() {
        let check = AgentCheckRegistration {
            id: Some("mesh-control-c1".into()),
            name: "mesh-control c1".into(),
            ttl: Some("3s".into()),
            status: Some("passing".into()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&check).unwrap(),
            serde_json::json!({"ID": "mesh-control-c1", "Name": "mesh-control c1",
                               "TTL": "3s", "Status": "passing"})
        );
        let session = SessionRequest {
            lock_delay: Some("1s".into()),
            checks: vec!["serfHealth".into(), "mesh-control-c1".into()],
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&session).unwrap(),
            serde_json::json!({"LockDelay": "1s", "Checks": ["serfHealth", "mesh-control-c1"]})
        );
        // No checks named: none sent, so Consul keeps its default.
        let plain = serde_json::to_value(SessionRequest::default()).unwrap();
        assert_eq!(plain, serde_json::json!({}));
    }

    #[test]
    fn health_entry_reads_nulls_and_node_address() {
        let entry: ServiceEntry = serde_json::from_str(
            r#"{"Node":{"Node":"n1","Address":"10.0.0.1","Datacenter":"dc1"},
                "Service":{"ID":"w1","Service":"web","Tags":null,"Meta":null,
                           "Address":"","Port":70000},
                "Checks":[{"CheckID":"serfHealth","Status":"passing"}]}"#,
        )
        .unwrap();
        assert_eq!(entry.address(), "10.0.0.1");
        assert!(entry.service.tags.is_empty() && entry.service.meta.is_empty());
        assert_eq!(entry.service.port, 70000);
        assert_eq!(entry.checks[0].status, "passing");
    }

    #[test]
    fn catalog_nodes_carry_their_meta() {
        let nodes: Vec<Node> = serde_json::from_str(
            r#"[{"Node":"n1","Address":"10.0.0.1","Meta":{"mesh-frontend":"nginx"}},
                {"Node":"n2","Address":"10.0.0.2","Meta":null},
                {"Node":"n3","Address":"10.0.0.3"}]"#,
        )
        .unwrap();
        assert_eq!(nodes[0].meta["mesh-frontend"], "nginx");
        assert!(nodes[1].meta.is_empty() && nodes[2].meta.is_empty());
    }
}
