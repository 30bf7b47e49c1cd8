//! The control plane's state in Consul KV, under `mesh/` only:
//!
//! - `mesh/nodes/<node>/routes`: the node's current config version (JSON
//!   [`Version`]). Its Consul `ModifyIndex` is the node's routes
//!   *revision*: every change names the revision it is based on.
//! - `mesh/versions/<node>/<n>`: config version `n` of the node, written
//!   once and never changed.
//! - `mesh/leader`: the leader lock (see [`crate::leader`]).
//! - `mesh/status/<node>`: what the node's proxy last reported (JSON
//!   [`ProxyReport`]), written by the node's bridge, read here.
//!
//! A new version is one Consul transaction: the routes key, check-and-set
//! on the expected revision, and the version key, created only if it does
//! not exist. Both are written or neither, so two replicas writing at once
//! never overwrite each other and a version is never lost or half-stored:
//! the one based on a stale revision gets [`StoreError::Conflict`].

use std::collections::BTreeMap;

use consul_client::{Client, KvPair, KvTxnOp, KvTxnOutcome, QueryOptions};
use serde::{Deserialize, Serialize};

use crate::model::Version;

/// The root of every key the control plane writes.
pub const PREFIX: &str = "mesh/";

/// The leader lock's key.
pub const LEADER_KEY: &str = "mesh/leader";

/// Consul KV, as the control plane lays it out.
#[derive(Clone, Debug)]
pub struct Store {
    consul: Client,
}

/// A node's current version and the revision it is at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Current {
    /// The routes key's `ModifyIndex`; 0 when the node has no routes yet.
    pub revision: u64,
    /// The current version; `None` when the node has no routes yet.
    pub version: Option<Version>,
}

/// What a node's proxy last reported, through its bridge.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyReport {
    /// The config version in effect; 0: none.
    pub version_in_effect: u64,
    /// The newest version it refused; 0: none.
    #[serde(default)]
    pub refused_version: u64,
    /// Why it refused it.
    #[serde(default)]
    pub reason: String,
    /// When the bridge recorded the report, in milliseconds since the
    /// Unix epoch.
    pub at_ms: u64,
}

/// A lost race: the key is no longer at the revision a change was based on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The key.
    pub key: String,
    /// The revision the change was based on.
    pub expected: u64,
    /// The revision the key is at now.
    pub actual: u64,
    /// The version the key holds now, and its author.
    pub current: Option<(u64, String)>,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key moved on since the revision the change was based on; nothing
    /// was written.
    #[error("{0}")]
    Conflict(Conflict),
    /// A stored value does not decode: the key was written by something else.
    #[error("{key} holds a value mesh-control cannot read: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// Consul did not answer, or refused.
    #[error(transparent)]
    Consul(#[from] consul_client::Error),
}

// === impl Store ===

impl Store {
    /// A store on `consul`.
    pub fn new(consul: Client) -> Self {
        Self { consul }
    }

    /// The routes key of `node`.
    pub fn routes_key(node: &str) -> String {
        format!("{PREFIX}nodes/{node}/routes")
    }

    /// The key of `node`'s version `number`.
    pub fn version_key(node: &str, number: u64) -> String {
        format!("{PREFIX}versions/{node}/{number}")
    }

    /// `node`'s current version and revision.
    pub async fn current(&self, node: &str) -> Result<Current, StoreError> {
        let key = Self::routes_key(node);
        let read = self.consul.kv_get(&key, QueryOptions::default()).await?;
        match read.value {
            None => Ok(Current::default()),
            Some(pair) => Ok(Current {
                revision: pair.modify_index,
                version: Some(decode(&pair)?),
            }),
        }
    }

    /// Stores `version` as `node`'s current version and as its immutable
    /// version record, if the routes key is still at `expected` (0: the
    /// node has no routes yet). Returns the new revision.
    pub async fn commit(&self, version: &Version, expected: u64) -> Result<u64, StoreError> {
        let node = &version.node;
        let routes_key = Self::routes_key(node);
        let version_key = Self::version_key(node, version.number);
        let value = serde_json::to_vec(version).map_err(|e| StoreError::Corrupt {
            key: routes_key.clone(),
            message: e.to_string(),
        })?;
        let ops = [
            KvTxnOp::Cas {
                key: routes_key.clone(),
                value: value.clone(),
                index: expected,
            },
            KvTxnOp::Cas {
                key: version_key.clone(),
                value,
                index: 0,
            },
        ];
        match self.consul.kv_txn(&ops).await? {
            KvTxnOutcome::Committed(written) => Ok(written
                .iter()
                .find(|(key, _)| *key == routes_key)
                .map_or(0, |(_, index)| *index)),
            KvTxnOutcome::RolledBack(errors) => {
                let now = self.current(node).await?;
                if now.revision == expected {
                    // The routes key did not move: the version key is in the way.
                    let reason = errors.first().map_or("", |(_, what)| what.as_str());
                    return Err(StoreError::Corrupt {
                        key: version_key,
                        message: format!(
                            "version {} exists although {routes_key} is at version {} ({reason})",
                            version.number,
                            version.number.saturating_sub(1)
                        ),
                    });
                }
                Err(StoreError::Conflict(Conflict {
                    key: routes_key,
                    expected,
                    actual: now.revision,
                    current: now.version.map(|v| (v.number, v.author)),
                }))
            }
        }
    }

    /// Every version of `node`, oldest first.
    pub async fn versions(&self, node: &str) -> Result<Vec<Version>, StoreError> {
        let prefix = format!("{PREFIX}versions/{node}/");
        let pairs = self
            .consul
            .kv_list(&prefix, QueryOptions::default())
            .await?;
        let mut versions = pairs
            .value
            .iter()
            .map(decode)
            .collect::<Result<Vec<Version>, StoreError>>()?;
        versions.sort_by_key(|v| v.number);
        Ok(versions)
    }

    /// Version `number` of `node`, if it exists.
    pub async fn version(&self, node: &str, number: u64) -> Result<Option<Version>, StoreError> {
        let key = Self::version_key(node, number);
        let read = self.consul.kv_get(&key, QueryOptions::default()).await?;
        read.value.as_ref().map(decode).transpose()
    }

    /// The current version number of every node that has routes.
    pub async fn node_versions(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let prefix = format!("{PREFIX}nodes/");
        let pairs = self
            .consul
            .kv_list(&prefix, QueryOptions::default())
            .await?;
        let mut out = BTreeMap::new();
        for pair in &pairs.value {
            let Some(node) = pair
                .key
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix("/routes"))
            else {
                continue;
            };
            out.insert(node.to_owned(), decode(pair)?.number);
        }
        Ok(out)
    }

    /// The status key of `node`.
    pub fn status_key(node: &str) -> String {
        format!("{PREFIX}status/{node}")
    }

    /// What every node's proxy last reported, by node. A report that does
    /// not decode is left out (and logged): it says nothing trustworthy.
    pub async fn reports(&self) -> Result<BTreeMap<String, ProxyReport>, StoreError> {
        let prefix = format!("{PREFIX}status/");
        let pairs = self
            .consul
            .kv_list(&prefix, QueryOptions::default())
            .await?;
        let mut out = BTreeMap::new();
        for pair in &pairs.value {
            let Some(node) = pair.key.strip_prefix(&prefix) else {
                continue;
            };
            match serde_json::from_slice::<ProxyReport>(&pair.value) {
                Ok(report) => {
                    out.insert(node.to_owned(), report);
                }
                Err(e) => {
                    tracing::warn!(key = %pair.key, error = %e, "proxy status unreadable; shown as unknown")
                }
            }
        }
        Ok(out)
    }
}

fn decode(pair: &KvPair) -> Result<Version, StoreError> {
    serde_json::from_slice(&pair.value).map_err(|e| StoreError::Corrupt {
        key: pair.key.clone(),
        message: e.to_string(),
    })
}

// === impl Conflict ===

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "conflict on {}: the change was based on revision {}, but it is at revision {}",
            self.key, self.expected, self.actual
        )?;
        if let Some((number, author)) = &self.current {
            write!(f, " (version {number} by {author})")?;
        }
        f.write_str("; get the routes again and retry on the new revision")
    }
}
