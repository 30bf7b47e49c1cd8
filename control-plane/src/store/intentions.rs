//! Intentions in Consul KV:
//!
//! - `mesh/intentions/<source>/<destination>`: one intention (JSON
//!   [`Intention`]), its selectors as written (`*` for any service:
//!   Consul takes it in a key as it is), lowercase.
//! - `mesh/intentions-default`: `allow` or `deny`, the action for calls no
//!   intention matches; absent: mesh-control's `default_intention`.
//!
//! Both share the prefix `mesh/intentions`, so one read (and one blocking
//! query) covers the whole set and its default, and its index moves on
//! with any change to either. Every write is check-and-set on the
//! revision (`ModifyIndex`) it was based on; 0 creates only.

use consul_client::{KvPair, KvTxnOp, KvTxnOutcome, QueryOptions};
use mesh_runtime::intentions::{Action, Intention, Selector};

use super::{PREFIX, Store, StoreError, decode_json, encode};

/// The prefix of every intention key.
pub const INTENTIONS_PREFIX: &str = "mesh/intentions/";

/// What every intentions key starts with, the default's included: one
/// read or blocking query of it covers the whole set.
pub const INTENTIONS_ROOT: &str = "mesh/intentions";

/// The default action's key.
pub const INTENTIONS_DEFAULT_KEY: &str = "mesh/intentions-default";

/// The intentions as stored, with their revisions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredIntentions {
    /// Consul's index of the read: it moves on with any change to an
    /// intention or the default.
    pub index: u64,
    /// The stored default and its revision; `None` when it is not set.
    pub default: Option<(Action, u64)>,
    /// Every intention and its revision, by source and then destination.
    pub list: Vec<(Intention, u64)>,
}

// === impl Store ===

impl Store {
    /// The key of the intention from `source` to `destination`.
    pub fn intention_key(source: &Selector, destination: &Selector) -> String {
        format!("{PREFIX}intentions/{source}/{destination}")
    }

    /// Every intention and the default, in one read.
    pub async fn intentions(&self) -> Result<StoredIntentions, StoreError> {
        let read = self
            .consul
            .kv_list(INTENTIONS_ROOT, QueryOptions::default())
            .await?;
        let mut stored = StoredIntentions {
            index: read.index,
            ..StoredIntentions::default()
        };
        for pair in &read.value {
            if pair.key == INTENTIONS_DEFAULT_KEY {
                stored.default = Some((decode_default(pair)?, pair.modify_index));
            } else if pair.key.starts_with(INTENTIONS_PREFIX) {
                stored
                    .list
                    .push((decode_intention(pair)?, pair.modify_index));
            }
        }
        stored.list.sort_by(|(a, _), (b, _)| {
            (&a.source, &a.destination).cmp(&(&b.source, &b.destination))
        });
        Ok(stored)
    }

    /// The intention from `source` to `destination` and its revision.
    pub async fn intention(
        &self,
        source: &Selector,
        destination: &Selector,
    ) -> Result<Option<(Intention, u64)>, StoreError> {
        let key = Self::intention_key(source, destination);
        let read = self.consul.kv_get(&key, QueryOptions::default()).await?;
        match read.value {
            None => Ok(None),
            Some(pair) => Ok(Some((decode_intention(&pair)?, pair.modify_index))),
        }
    }

    /// Writes `intention` if its key is still at `revision` (0: only if it
    /// does not exist); returns the new revision, or `None` when the key
    /// moved on and nothing was written.
    pub async fn put_intention(
        &self,
        intention: &Intention,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        let key = Self::intention_key(&intention.source, &intention.destination);
        let value = encode(&key, intention)?;
        self.cas(key, value, revision).await
    }

    /// Deletes the intention from `source` to `destination` if its key is
    /// still at `revision`; returns whether it was deleted.
    pub async fn delete_intention(
        &self,
        source: &Selector,
        destination: &Selector,
        revision: u64,
    ) -> Result<bool, StoreError> {
        let key = Self::intention_key(source, destination);
        Ok(self.consul.kv_delete(&key, Some(revision)).await?)
    }

    /// Writes the default action if its key is still at `revision` (0:
    /// only if it is not set); returns the new revision, or `None` when it
    /// moved on and nothing was written.
    pub async fn put_intentions_default(
        &self,
        action: Action,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        let value = action.as_str().as_bytes().to_vec();
        self.cas(INTENTIONS_DEFAULT_KEY.to_owned(), value, revision)
            .await
    }

    /// Writes `key` if it is still at `revision`, as a transaction, whose
    /// answer carries the new revision; `None` when it moved on.
    async fn cas(
        &self,
        key: String,
        value: Vec<u8>,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        let ops = [KvTxnOp::Cas {
            key: key.clone(),
            value,
            index: revision,
        }];
        match self.consul.kv_txn(&ops).await? {
            KvTxnOutcome::Committed(written) => Ok(Some(
                written
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map_or(0, |(_, index)| *index),
            )),
            KvTxnOutcome::RolledBack(_) => Ok(None),
        }
    }

    /// The stored default and its revision; `None` when it is not set.
    pub async fn intentions_default(&self) -> Result<Option<(Action, u64)>, StoreError> {
        let read = self
            .consul
            .kv_get(INTENTIONS_DEFAULT_KEY, QueryOptions::default())
            .await?;
        read.value
            .map(|pair| Ok((decode_default(&pair)?, pair.modify_index)))
            .transpose()
    }
}

/// An intention, checked, and stored under its own key.
fn decode_intention(pair: &KvPair) -> Result<Intention, StoreError> {
    let intention: Intention = decode_json(pair)?;
    let corrupt = |message: String| StoreError::Corrupt {
        key: pair.key.clone(),
        message,
    };
    intention.validate().map_err(|e| corrupt(e.to_string()))?;
    let key = Store::intention_key(&intention.source, &intention.destination);
    if key != pair.key {
        return Err(corrupt(format!(
            "it holds the intention {} -> {}, which belongs under {key}",
            intention.source, intention.destination
        )));
    }
    Ok(intention)
}

fn decode_default(pair: &KvPair) -> Result<Action, StoreError> {
    String::from_utf8_lossy(&pair.value)
        .parse()
        .map_err(|message| StoreError::Corrupt {
            key: pair.key.clone(),
            message,
        })
}
