//! A node's config version as mesh-control stores it
//! (`mesh/nodes/<node>/routes`), for that node's Watch streams: one
//! blocking query per node, held while some stream of that node is open.

use std::{future::Future, sync::Arc};

use bytes::Bytes;
use consul_client::{Client, Error, KvPair, QueryOptions, QueryResult};
use mesh_proto::v1::{NodeConfig, RouteUpdate};
use prost::Message;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Hub, blocking::Source, topics::Topics, trust::Decision};

/// What is known of a node's config.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum NodeConfigView {
    /// No trusted answer from Consul yet.
    #[default]
    Unanswered,
    /// The node has no config version (mesh-control never set its routes).
    Absent,
    /// The node's current config version.
    Present(Arc<NodeConfigEntry>),
}

/// A node's config version, and the piece of a `RouteUpdate` carrying it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeConfigEntry {
    /// The config as the proxy gets it.
    pub config: NodeConfig,
    /// `RouteUpdate.config` (field 5), encoded once for every stream of
    /// the node.
    pub piece: Bytes,
}

/// `mesh/nodes/<node>/routes` of one node.
#[derive(Debug)]
pub(crate) struct NodeConfigSource {
    node: String,
    routes_key: String,
}

/// The part of mesh-control's stored version the proxy needs.
#[derive(Deserialize)]
struct Stored {
    number: u64,
    rendered: String,
}

// === impl NodeConfigView ===

impl NodeConfigView {
    /// Whether Consul answered.
    pub fn answered(&self) -> bool {
        !matches!(self, Self::Unanswered)
    }

    /// The config, when the node has one.
    pub fn entry(&self) -> Option<&Arc<NodeConfigEntry>> {
        match self {
            Self::Present(entry) => Some(entry),
            _ => None,
        }
    }

    fn version(&self) -> u64 {
        self.entry().map_or(0, |e| e.config.version)
    }
}

// === impl NodeConfigEntry ===

impl NodeConfigEntry {
    /// Config `version` with its rendered `text`.
    pub fn new(version: u64, text: String) -> Self {
        let sha256 = hex::encode(Sha256::digest(text.as_bytes()));
        let config = NodeConfig {
            version,
            text,
            sha256,
        };
        let piece = RouteUpdate {
            config: Some(config.clone()),
            ..RouteUpdate::default()
        }
        .encode_to_vec()
        .into();
        Self { config, piece }
    }
}

// === impl NodeConfigSource ===

impl NodeConfigSource {
    pub(crate) fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            routes_key: format!("mesh/nodes/{node}/routes"),
        }
    }
}

impl Source for NodeConfigSource {
    type Value = Option<KvPair>;
    type View = NodeConfigView;
    const KIND: &'static str = "node-config";
    const COUNTED: bool = false;

    fn key(&self) -> &str {
        &self.node
    }

    fn topics(hub: &Hub) -> &Topics<NodeConfigView> {
        &hub.configs
    }

    fn fetch<'a>(
        &'a self,
        client: &'a Client,
        opts: QueryOptions,
    ) -> impl Future<Output = Result<QueryResult<Option<KvPair>>, Error>> + Send + 'a {
        client.kv_get(&self.routes_key, opts)
    }

    fn judge(
        &self,
        current: &NodeConfigView,
        value: Option<KvPair>,
        known_leader: bool,
    ) -> (Decision, NodeConfigView) {
        let new = match value {
            None => NodeConfigView::Absent,
            Some(pair) => match serde_json::from_slice::<Stored>(&pair.value) {
                Ok(stored) => NodeConfigView::Present(Arc::new(NodeConfigEntry::new(
                    stored.number,
                    stored.rendered,
                ))),
                Err(e) => {
                    // Not mesh-control's JSON: the proxy keeps what it has.
                    tracing::warn!(key = %self.routes_key, error = %e, "the node's config is not a config version; keeping the last one");
                    return (Decision::Unchanged, NodeConfigView::Unanswered);
                }
            },
        };
        (judge(current, &new, known_leader), new)
    }
}

/// A server without a leader may be behind: it may not take the node back
/// to an older version (or to none).
fn judge(current: &NodeConfigView, new: &NodeConfigView, known_leader: bool) -> Decision {
    match current {
        NodeConfigView::Unanswered => Decision::Apply,
        old if old == new => Decision::Unchanged,
        old if !known_leader && new.version() < old.version() => Decision::Untrusted,
        _ => Decision::Apply,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(json: &str) -> Option<KvPair> {
        Some(KvPair {
            key: "mesh/nodes/n1/routes".into(),
            value: json.as_bytes().to_vec(),
            ..KvPair::default()
        })
    }

    fn stored(number: u64, rendered: &str) -> Option<KvPair> {
        pair(
            &serde_json::json!({"node": "n1", "number": number, "author": "a",
                "created_at_ms": 1, "routes": {}, "rendered": rendered, "diff": ""})
            .to_string(),
        )
    }

    #[test]
    fn a_stored_version_becomes_the_config_with_its_digest() {
        let source = NodeConfigSource::new("n1");
        let (decision, view) =
            source.judge(&NodeConfigView::Unanswered, stored(3, "x = 1\n"), true);
        assert_eq!(decision, Decision::Apply);
        let entry = view.entry().expect("present");
        assert_eq!(entry.config.version, 3);
        assert_eq!(entry.config.text, "x = 1\n");
        assert_eq!(
            entry.config.sha256,
            hex::encode(Sha256::digest(b"x = 1\n")),
            "hex of the text's SHA-256"
        );
        let carried = RouteUpdate::decode(entry.piece.as_ref()).unwrap();
        assert_eq!(carried.config.as_ref(), Some(&entry.config));
        assert_eq!(
            (carried.version, carried.kind, carried.stale),
            (0, None, false)
        );
    }

    #[test]
    fn no_key_is_no_config_and_the_same_version_is_unchanged() {
        let source = NodeConfigSource::new("n1");
        let (decision, absent) = source.judge(&NodeConfigView::Unanswered, None, true);
        assert_eq!(
            (decision, &absent),
            (Decision::Apply, &NodeConfigView::Absent)
        );
        assert!(absent.answered());
        let (_, v1) = source.judge(&absent, stored(1, "a"), true);
        assert_eq!(
            source.judge(&v1, stored(1, "a"), true).0,
            Decision::Unchanged
        );
    }

    #[test]
    fn without_a_leader_a_config_never_goes_back() {
        let source = NodeConfigSource::new("n1");
        let (_, v2) = source.judge(&NodeConfigView::Unanswered, stored(2, "b"), true);
        assert_eq!(
            source.judge(&v2, stored(1, "a"), false).0,
            Decision::Untrusted
        );
        assert_eq!(source.judge(&v2, None, false).0, Decision::Untrusted);
        assert_eq!(source.judge(&v2, stored(3, "c"), false).0, Decision::Apply);
        assert_eq!(source.judge(&v2, stored(1, "a"), true).0, Decision::Apply);
    }

    #[test]
    fn a_value_that_is_not_a_version_changes_nothing() {
        let source = NodeConfigSource::new("n1");
        let (_, v2) = source.judge(&NodeConfigView::Unanswered, stored(2, "b"), true);
        assert_eq!(
            source.judge(&v2, pair("not json"), true).0,
            Decision::Unchanged
        );
    }
}
