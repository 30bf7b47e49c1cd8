//! The control plane's state in Consul KV, under `mesh/` only:
//!
//! - `mesh/nodes/<node>/routes`: the node's current config version (JSON
//!   [`Version`]). Its Consul `ModifyIndex` is the node's routes
//!   *revision*: every change names the revision it is based on.
//! - `mesh/versions/<node>/<n>`: config version `n` of the node, written
//!   once and never changed.
//! - `mesh/seq/version`: the last version number handed out; numbers are
//!   one sequence across the mesh.
//! - `mesh/releases/<n>`: version `n` staged on many nodes (JSON
//!   [`Release`]): their records exist, none is current yet.
//! - `mesh/rollouts/<n>`: the rollout of version `n` (JSON
//!   [`Rollout`]); `mesh/rollout-active`: the number of the one under way.
//! - `mesh/artifacts/…`, `mesh/deployments/<id>`,
//!   `mesh/deployment-active/<service>`, `mesh/seq/deployment`: rolling
//!   deployments of artifacts and the artifacts' bytes (see
//!   [`deployments`]).
//! - `mesh/intentions/<source>/<destination>`, `mesh/intentions-default`:
//!   which service may call which, and the default (see [`intentions`]).
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

use crate::{model::Version, rollout::Rollout};

pub mod deployments;
pub mod intentions;

/// The root of every key the control plane writes.
pub const PREFIX: &str = "mesh/";

/// The leader lock's key.
pub const LEADER_KEY: &str = "mesh/leader";

/// The last version number handed out (decimal text).
pub const SEQ_KEY: &str = "mesh/seq/version";

/// The version whose rollout is under way (decimal text; empty: none).
pub const ACTIVE_ROLLOUT_KEY: &str = "mesh/rollout-active";

/// How often a change races for the sequence before giving up.
const SEQUENCE_TRIES: usize = 16;

/// Nodes per staging transaction (two operations each; Consul takes 64).
const STAGE_CHUNK: usize = 30;

/// A version staged on many nodes, ready to roll out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// The version number, the same on every node.
    pub version: u64,
    /// Who staged it.
    pub author: String,
    /// When, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// The nodes, in the order they were named.
    pub nodes: Vec<String>,
}

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
    /// Too many changes raced for the same key; nothing was written.
    #[error("{0} changed too often to be written; try again")]
    Contended(String),
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

    /// The last version number handed out, and the sequence key's
    /// revision (0: the key does not exist yet; then the number is the
    /// highest one stored, so records from before the sequence stay
    /// unique).
    pub async fn sequence(&self) -> Result<(u64, u64), StoreError> {
        let read = self.consul.kv_get(SEQ_KEY, QueryOptions::default()).await?;
        if let Some(pair) = read.value {
            let last = std::str::from_utf8(&pair.value)
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: SEQ_KEY.to_owned(),
                    message: "not a number".into(),
                })?;
            return Ok((pair.modify_index, last));
        }
        let prefix = format!("{PREFIX}versions/");
        let pairs = self
            .consul
            .kv_list(&prefix, QueryOptions::default())
            .await?;
        let last = pairs
            .value
            .iter()
            .filter_map(|p| p.key.rsplit('/').next()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        Ok((0, last))
    }

    /// Takes the next version number: one transaction that moves the
    /// sequence on from `seq` (its revision and value) together with `ops`.
    fn with_sequence(seq: (u64, u64), mut ops: Vec<KvTxnOp>) -> Vec<KvTxnOp> {
        ops.insert(
            0,
            KvTxnOp::Cas {
                key: SEQ_KEY.to_owned(),
                value: (seq.1 + 1).to_string().into_bytes(),
                index: seq.0,
            },
        );
        ops
    }

    /// Stores `make(number)` as `node`'s current version and as its
    /// immutable version record, with the next number of the sequence, if
    /// the routes key is still at `expected` (0: the node has no routes
    /// yet). Returns the version and the new revision. A race for the
    /// sequence with another change is retried; a race for the routes is
    /// [`StoreError::Conflict`].
    pub async fn commit_next(
        &self,
        node: &str,
        expected: u64,
        make: impl Fn(u64) -> Version,
    ) -> Result<(Version, u64), StoreError> {
        let routes_key = Self::routes_key(node);
        for _ in 0..SEQUENCE_TRIES {
            let seq = self.sequence().await?;
            let version = make(seq.1 + 1);
            let version_key = Self::version_key(node, version.number);
            let value = encode(&routes_key, &version)?;
            let ops = Self::with_sequence(
                seq,
                vec![
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
                ],
            );
            match self.consul.kv_txn(&ops).await? {
                KvTxnOutcome::Committed(written) => {
                    let revision = written
                        .iter()
                        .find(|(key, _)| *key == routes_key)
                        .map_or(0, |(_, index)| *index);
                    return Ok((version, revision));
                }
                KvTxnOutcome::RolledBack(errors) => {
                    let now = self.current(node).await?;
                    if now.revision != expected {
                        return Err(StoreError::Conflict(Conflict {
                            key: routes_key,
                            expected,
                            actual: now.revision,
                            current: now.version.map(|v| (v.number, v.author)),
                        }));
                    }
                    if self.sequence().await?.0 != seq.0 {
                        continue; // another change took the number
                    }
                    let reason = errors.first().map_or("", |(_, what)| what.as_str());
                    return Err(StoreError::Corrupt {
                        key: version_key,
                        message: format!(
                            "version {} exists although the sequence is at {} ({reason})",
                            version.number, seq.1
                        ),
                    });
                }
            }
        }
        Err(StoreError::Contended(SEQ_KEY.to_owned()))
    }

    /// Stores version records for many nodes under one new number, none of
    /// them current yet: `make(node, number, its current version)` for each
    /// of `nodes` (node and its current state), then the release record
    /// that names them. A node whose routes moved since `nodes` was read
    /// is a [`StoreError::Conflict`] and no release is stored.
    pub async fn stage(
        &self,
        author: &str,
        nodes: &[(String, Current)],
        make: impl Fn(&str, u64, Option<&Version>) -> Version,
    ) -> Result<Release, StoreError> {
        let number = self.take_number().await?;
        for chunk in nodes.chunks(STAGE_CHUNK) {
            let mut ops = Vec::with_capacity(chunk.len() * 2);
            for (node, current) in chunk {
                let version = make(node, number, current.version.as_ref());
                let key = Self::version_key(node, number);
                ops.push(KvTxnOp::CheckIndex {
                    key: Self::routes_key(node),
                    index: current.revision,
                });
                ops.push(KvTxnOp::Cas {
                    value: encode(&key, &version)?,
                    key,
                    index: 0,
                });
            }
            if let KvTxnOutcome::RolledBack(_) = self.consul.kv_txn(&ops).await? {
                for (node, current) in chunk {
                    let now = self.current(node).await?;
                    if now.revision != current.revision {
                        return Err(StoreError::Conflict(Conflict {
                            key: Self::routes_key(node),
                            expected: current.revision,
                            actual: now.revision,
                            current: now.version.map(|v| (v.number, v.author)),
                        }));
                    }
                }
                return Err(StoreError::Corrupt {
                    key: Self::version_key(&chunk[0].0, number),
                    message: format!("version {number} exists although the sequence just gave it"),
                });
            }
        }
        let release = Release {
            version: number,
            author: author.to_owned(),
            created_at_ms: crate::model::now_ms(),
            nodes: nodes.iter().map(|(n, _)| n.clone()).collect(),
        };
        let key = Self::release_key(number);
        let value = serde_json::to_vec(&release).map_err(|e| StoreError::Corrupt {
            key: key.clone(),
            message: e.to_string(),
        })?;
        if !self.consul.kv_put(&key, &value, Some(0)).await? {
            return Err(StoreError::Corrupt {
                key,
                message: "a release with this number exists".into(),
            });
        }
        Ok(release)
    }

    /// Moves the sequence on by one and returns the number.
    async fn take_number(&self) -> Result<u64, StoreError> {
        for _ in 0..SEQUENCE_TRIES {
            let seq = self.sequence().await?;
            let ops = Self::with_sequence(seq, Vec::new());
            if let KvTxnOutcome::Committed(_) = self.consul.kv_txn(&ops).await? {
                return Ok(seq.1 + 1);
            }
        }
        Err(StoreError::Contended(SEQ_KEY.to_owned()))
    }

    /// The release key of version `number`.
    pub fn release_key(number: u64) -> String {
        format!("{PREFIX}releases/{number}")
    }

    /// Release `number`, if it was staged.
    pub async fn release(&self, number: u64) -> Result<Option<Release>, StoreError> {
        let key = Self::release_key(number);
        let read = self.consul.kv_get(&key, QueryOptions::default()).await?;
        read.value.as_ref().map(decode_json).transpose()
    }

    /// Makes `version` (a stored record of its node) the node's current
    /// version, if the routes key is still at `expected`. Returns whether
    /// it was written.
    pub async fn put_current(&self, version: &Version, expected: u64) -> Result<bool, StoreError> {
        let key = Self::routes_key(&version.node);
        let value = encode(&key, version)?;
        Ok(self.consul.kv_put(&key, &value, Some(expected)).await?)
    }

    /// The rollout key of version `number`.
    pub fn rollout_key(number: u64) -> String {
        format!("{PREFIX}rollouts/{number}")
    }

    /// The rollout of version `number` and its revision, if there is one.
    pub async fn rollout(&self, number: u64) -> Result<Option<(Rollout, u64)>, StoreError> {
        let key = Self::rollout_key(number);
        let read = self.consul.kv_get(&key, QueryOptions::default()).await?;
        match read.value {
            None => Ok(None),
            Some(pair) => Ok(Some((decode_json(&pair)?, pair.modify_index))),
        }
    }

    /// Every rollout, newest first.
    pub async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let prefix = format!("{PREFIX}rollouts/");
        let pairs = self
            .consul
            .kv_list(&prefix, QueryOptions::default())
            .await?;
        let mut out = pairs
            .value
            .iter()
            .map(decode_json::<Rollout>)
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|r| std::cmp::Reverse(r.version));
        Ok(out)
    }

    /// The version whose rollout is under way (0: none) and the active
    /// key's revision (0: it does not exist).
    pub async fn active_rollout(&self) -> Result<(u64, u64), StoreError> {
        let read = self
            .consul
            .kv_get(ACTIVE_ROLLOUT_KEY, QueryOptions::default())
            .await?;
        match read.value {
            None => Ok((0, 0)),
            Some(pair) => {
                let text = String::from_utf8_lossy(&pair.value);
                let number = if text.trim().is_empty() {
                    0
                } else {
                    text.trim().parse().map_err(|_| StoreError::Corrupt {
                        key: ACTIVE_ROLLOUT_KEY.to_owned(),
                        message: format!("{text:?} is not a version number"),
                    })?
                };
                Ok((number, pair.modify_index))
            }
        }
    }

    /// Stores a new rollout and makes it the active one, if none is
    /// (`active` is the active key's revision when it was read as idle).
    /// Returns whether it was stored.
    pub async fn start_rollout(&self, rollout: &Rollout, active: u64) -> Result<bool, StoreError> {
        let key = Self::rollout_key(rollout.version);
        let ops = [
            KvTxnOp::Cas {
                key: ACTIVE_ROLLOUT_KEY.to_owned(),
                value: rollout.version.to_string().into_bytes(),
                index: active,
            },
            KvTxnOp::Cas {
                value: encode(&key, rollout)?,
                key,
                index: 0,
            },
        ];
        Ok(matches!(
            self.consul.kv_txn(&ops).await?,
            KvTxnOutcome::Committed(_)
        ))
    }

    /// Writes `rollout` if its record is still at `revision`; returns the
    /// new revision, or `None` when someone else wrote it first. An ended
    /// rollout also clears the active key.
    pub async fn save_rollout(
        &self,
        rollout: &Rollout,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        let key = Self::rollout_key(rollout.version);
        let mut ops = vec![KvTxnOp::Cas {
            value: encode(&key, rollout)?,
            key: key.clone(),
            index: revision,
        }];
        if rollout.state.is_final() {
            let (active, active_revision) = self.active_rollout().await?;
            if active == rollout.version {
                ops.push(KvTxnOp::Cas {
                    key: ACTIVE_ROLLOUT_KEY.to_owned(),
                    value: Vec::new(),
                    index: active_revision,
                });
            }
        }
        match self.consul.kv_txn(&ops).await? {
            KvTxnOutcome::Committed(written) => Ok(written
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, index)| *index)),
            KvTxnOutcome::RolledBack(_) => Ok(None),
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

    /// What the proxies of `nodes` last reported, by node (a node whose
    /// proxy never reported, or whose report does not decode, is left out).
    pub async fn reports_of(
        &self,
        nodes: &[String],
    ) -> Result<BTreeMap<String, ProxyReport>, StoreError> {
        let reads = nodes.iter().map(|node| async move {
            let key = Self::status_key(node);
            let read = self.consul.kv_get(&key, QueryOptions::default()).await?;
            let report = read
                .value
                .and_then(|pair| serde_json::from_slice::<ProxyReport>(&pair.value).ok());
            Ok::<_, StoreError>(report.map(|r| (node.clone(), r)))
        });
        let all = futures::future::try_join_all(reads).await?;
        Ok(all.into_iter().flatten().collect())
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
    decode_json(pair)
}

fn decode_json<T: serde::de::DeserializeOwned>(pair: &KvPair) -> Result<T, StoreError> {
    serde_json::from_slice(&pair.value).map_err(|e| StoreError::Corrupt {
        key: pair.key.clone(),
        message: e.to_string(),
    })
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
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
        let what = if self.key.starts_with(intentions::INTENTIONS_ROOT) {
            "read it again"
        } else {
            "get the routes again"
        };
        write!(f, "; {what} and retry on the new revision")
    }
}
