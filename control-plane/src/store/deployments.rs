//! Deployments and their artifacts in Consul KV:
//!
//! - `mesh/artifacts/<service>/<version>/chunks/<n>`: the artifact's
//!   bytes, [`CHUNK_SIZE`] per key, `n` from 0, zero-padded to 6 digits.
//! - `mesh/artifacts/<service>/<version>`: its [`ArtifactMeta`], written
//!   last and only if absent, so a version that has it is whole and never
//!   changes.
//! - `mesh/deployments/<id>`: a deployment (JSON [`Deployment`]).
//! - `mesh/deployment-active/<service>`: the id of the service's
//!   deployment under way (empty: none).
//! - `mesh/seq/deployment`: the last deployment id handed out.

use consul_client::{KvTxnOp, KvTxnOutcome, QueryOptions};

use super::{PREFIX, Store, StoreError, decode_json, encode};
use crate::deploy::{ArtifactMeta, CHUNK_SIZE, Deployment};

/// The last deployment id handed out (decimal text).
pub const DEPLOYMENT_SEQ_KEY: &str = "mesh/seq/deployment";

/// How often a new id races for the sequence before giving up.
const SEQUENCE_TRIES: usize = 16;

/// Chunk deletes in flight at once.
const DELETES: usize = 8;

// === impl Store ===

impl Store {
    /// The metadata key of `service`'s artifact `version`.
    pub fn artifact_key(service: &str, version: &str) -> String {
        format!("{PREFIX}artifacts/{service}/{version}")
    }

    /// The key of chunk `n` of `service`'s artifact `version`.
    pub fn chunk_key(service: &str, version: &str, n: u64) -> String {
        format!("{PREFIX}artifacts/{service}/{version}/chunks/{n:06}")
    }

    /// The record key of deployment `id`.
    pub fn deployment_key(id: u64) -> String {
        format!("{PREFIX}deployments/{id}")
    }

    /// The active marker key of `service`.
    pub fn active_deployment_key(service: &str) -> String {
        format!("{PREFIX}deployment-active/{service}")
    }

    /// The metadata of `service`'s artifact `version`, if it is stored.
    pub async fn artifact(
        &self,
        service: &str,
        version: &str,
    ) -> Result<Option<ArtifactMeta>, StoreError> {
        let key = Self::artifact_key(service, version);
        let read = self.consul.kv_get(&key, QueryOptions::default()).await?;
        read.value.as_ref().map(decode_json).transpose()
    }

    /// Stores `meta` as the artifact's metadata, only if there is none
    /// yet; returns whether it was written.
    pub async fn put_artifact(
        &self,
        service: &str,
        version: &str,
        meta: &ArtifactMeta,
    ) -> Result<bool, StoreError> {
        let key = Self::artifact_key(service, version);
        let value = encode(&key, meta)?;
        Ok(self.consul.kv_put(&key, &value, Some(0)).await?)
    }

    /// Writes chunk `n`.
    pub async fn put_chunk(
        &self,
        service: &str,
        version: &str,
        n: u64,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let key = Self::chunk_key(service, version, n);
        if self.consul.kv_put(&key, bytes, None).await? {
            Ok(())
        } else {
            Err(StoreError::Corrupt {
                key,
                message: "Consul did not take the chunk".into(),
            })
        }
    }

    /// Chunk `n`, which must exist.
    pub async fn chunk(&self, service: &str, version: &str, n: u64) -> Result<Vec<u8>, StoreError> {
        let key = Self::chunk_key(service, version, n);
        let read = self.consul.kv_get(&key, QueryOptions::default()).await?;
        match read.value {
            Some(pair) if pair.value.len() <= CHUNK_SIZE => Ok(pair.value),
            Some(pair) => Err(StoreError::Corrupt {
                key,
                message: format!("{} bytes, more than a chunk", pair.value.len()),
            }),
            None => Err(StoreError::Corrupt {
                key,
                message: "the chunk is missing".into(),
            }),
        }
    }

    /// Deletes every chunk key of `service`'s artifact `version` (those
    /// listed, whatever their number).
    pub async fn delete_chunks(&self, service: &str, version: &str) -> Result<(), StoreError> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let prefix = format!("{PREFIX}artifacts/{service}/{version}/chunks/");
        let keys = self.consul.kv_keys(&prefix, None).await?;
        futures::stream::iter(keys)
            .map(|key| async move { self.consul.kv_delete(&key, None).await.map(|_| ()) })
            .buffer_unordered(DELETES)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Deletes `service`'s artifact `version`: its metadata first (so it
    /// is no longer stored), then its chunks.
    pub async fn delete_artifact(&self, service: &str, version: &str) -> Result<(), StoreError> {
        let key = Self::artifact_key(service, version);
        self.consul.kv_delete(&key, None).await?;
        self.delete_chunks(service, version).await
    }

    /// The stored versions of `service` with their metadata.
    pub async fn artifacts(
        &self,
        service: &str,
    ) -> Result<Vec<(String, ArtifactMeta)>, StoreError> {
        let prefix = format!("{PREFIX}artifacts/{service}/");
        let keys = self.consul.kv_keys(&prefix, Some("/")).await?;
        let mut out = Vec::new();
        for key in keys {
            let Some(version) = key.strip_prefix(&prefix) else {
                continue;
            };
            if version.is_empty() || version.contains('/') {
                continue; // a folder of chunks
            }
            if let Some(meta) = self.artifact(service, version).await? {
                out.push((version.to_owned(), meta));
            }
        }
        Ok(out)
    }

    /// Takes the next deployment id.
    pub async fn next_deployment_id(&self) -> Result<u64, StoreError> {
        for _ in 0..SEQUENCE_TRIES {
            let read = self
                .consul
                .kv_get(DEPLOYMENT_SEQ_KEY, QueryOptions::default())
                .await?;
            let (index, last) = match read.value {
                None => (0, 0),
                Some(pair) => {
                    let last = std::str::from_utf8(&pair.value)
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .ok_or_else(|| StoreError::Corrupt {
                            key: DEPLOYMENT_SEQ_KEY.to_owned(),
                            message: "not a number".into(),
                        })?;
                    (pair.modify_index, last)
                }
            };
            let next = last + 1;
            let written = self
                .consul
                .kv_put(DEPLOYMENT_SEQ_KEY, next.to_string().as_bytes(), Some(index))
                .await?;
            if written {
                return Ok(next);
            }
        }
        Err(StoreError::Contended(DEPLOYMENT_SEQ_KEY.to_owned()))
    }

    /// The id of `service`'s deployment under way (0: none) and the
    /// marker's revision (0: it does not exist).
    pub async fn active_deployment(&self, service: &str) -> Result<(u64, u64), StoreError> {
        let key = Self::active_deployment_key(service);
        let read = self.consul.kv_get(&key, QueryOptions::default()).await?;
        match read.value {
            None => Ok((0, 0)),
            Some(pair) => Ok((marker_id(&key, &pair.value)?, pair.modify_index)),
        }
    }

    /// Every service with a deployment under way: (service, id).
    pub async fn active_deployments(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let prefix = format!("{PREFIX}deployment-active/");
        let pairs = self
            .consul
            .kv_list(&prefix, QueryOptions::default())
            .await?;
        let mut out = Vec::new();
        for pair in &pairs.value {
            let Some(service) = pair.key.strip_prefix(&prefix) else {
                continue;
            };
            let id = marker_id(&pair.key, &pair.value)?;
            if id != 0 {
                out.push((service.to_owned(), id));
            }
        }
        Ok(out)
    }

    /// Marks `id` as `service`'s deployment under way, if the marker is
    /// still at `revision` (read as idle). Returns whether it was written.
    pub async fn claim_deployment(
        &self,
        service: &str,
        id: u64,
        revision: u64,
    ) -> Result<bool, StoreError> {
        let key = Self::active_deployment_key(service);
        Ok(self
            .consul
            .kv_put(&key, id.to_string().as_bytes(), Some(revision))
            .await?)
    }

    /// Clears `service`'s marker if it still names `id`.
    pub async fn release_deployment(&self, service: &str, id: u64) -> Result<(), StoreError> {
        let (active, revision) = self.active_deployment(service).await?;
        if active == id && revision != 0 {
            let key = Self::active_deployment_key(service);
            self.consul.kv_put(&key, b"", Some(revision)).await?;
        }
        Ok(())
    }

    /// Stores a new deployment record; returns whether it was written
    /// (false: one with this id exists).
    pub async fn create_deployment(&self, d: &Deployment) -> Result<bool, StoreError> {
        let key = Self::deployment_key(d.id);
        let value = encode(&key, d)?;
        Ok(self.consul.kv_put(&key, &value, Some(0)).await?)
    }

    /// Deployment `id` and its revision, if there is one.
    pub async fn deployment(&self, id: u64) -> Result<Option<(Deployment, u64)>, StoreError> {
        let key = Self::deployment_key(id);
        let read = self.consul.kv_get(&key, QueryOptions::default()).await?;
        match read.value {
            None => Ok(None),
            Some(pair) => Ok(Some((decode_json(&pair)?, pair.modify_index))),
        }
    }

    /// Every deployment, newest first.
    pub async fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        let prefix = format!("{PREFIX}deployments/");
        let pairs = self
            .consul
            .kv_list(&prefix, QueryOptions::default())
            .await?;
        let mut out = pairs
            .value
            .iter()
            .map(decode_json::<Deployment>)
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|d| std::cmp::Reverse(d.id));
        Ok(out)
    }

    /// Writes `d` if its record is still at `revision`; returns the new
    /// revision, or `None` when someone else wrote it first. A settled
    /// deployment (ended, no node under way) also clears its service's
    /// marker, in the same transaction.
    pub async fn save_deployment(
        &self,
        d: &Deployment,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        let key = Self::deployment_key(d.id);
        let mut ops = vec![KvTxnOp::Cas {
            value: encode(&key, d)?,
            key: key.clone(),
            index: revision,
        }];
        if d.is_settled() {
            let (active, active_revision) = self.active_deployment(&d.spec.service).await?;
            if active == d.id {
                ops.push(KvTxnOp::Cas {
                    key: Self::active_deployment_key(&d.spec.service),
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
}

/// The id a marker holds; 0 when empty.
fn marker_id(key: &str, value: &[u8]) -> Result<u64, StoreError> {
    let text = String::from_utf8_lossy(value);
    if text.trim().is_empty() {
        return Ok(0);
    }
    text.trim().parse().map_err(|_| StoreError::Corrupt {
        key: key.to_owned(),
        message: format!("{text:?} is not a deployment id"),
    })
}
