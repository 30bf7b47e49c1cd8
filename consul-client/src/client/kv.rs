//! KV with check-and-set, and sessions for locks: the primitives the
//! control plane builds its leader lock and versioned state on.

use base64::{Engine, engine::general_purpose::STANDARD};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::{Client, Request};
use crate::{
    error::Error,
    model::{KvPair, KvTxnOp, KvTxnOutcome, SessionRequest, null_default},
    query::{QueryOptions, QueryResult},
};

/// A KV entry as Consul sends it (value in base64).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawKvPair {
    key: String,
    #[serde(default, deserialize_with = "null_default")]
    value: String,
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    modify_index: u64,
    #[serde(default)]
    lock_index: u64,
}

/// A transaction operation as Consul reads it.
#[derive(Serialize)]
struct RawTxnOp<'a> {
    #[serde(rename = "KV")]
    kv: RawTxnKv<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RawTxnKv<'a> {
    verb: &'static str,
    key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    index: u64,
}

/// A transaction's answer: results when applied, errors when rolled back.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawTxnAnswer {
    #[serde(default, deserialize_with = "null_default")]
    results: Vec<RawTxnResult>,
    #[serde(default, deserialize_with = "null_default")]
    errors: Vec<RawTxnError>,
}

#[derive(Deserialize)]
struct RawTxnResult {
    #[serde(rename = "KV")]
    kv: Option<RawTxnResultKv>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawTxnResultKv {
    key: String,
    #[serde(default)]
    modify_index: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawTxnError {
    #[serde(default)]
    op_index: usize,
    #[serde(default)]
    what: String,
}

#[derive(Deserialize)]
struct SessionId {
    #[serde(rename = "ID")]
    id: String,
}

impl Client {
    /// Reads `key`; `None` when it does not exist (the index still lets a
    /// blocking read wait for its creation).
    pub async fn kv_get(
        &self,
        key: &str,
        opts: QueryOptions,
    ) -> Result<QueryResult<Option<KvPair>>, Error> {
        let req = Request::new(Method::GET, &kv_path(key)).query(&opts);
        let answer = self.send(&req).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(QueryResult::from_headers(None, &answer.headers));
        }
        let pairs: QueryResult<Vec<RawKvPair>> = answer.success()?.decode()?;
        let index = pairs.index;
        let first = pairs.value.into_iter().next().map(decode_pair).transpose();
        let pair = first.map_err(|e| Error::Decode(format!("KV {key} at index {index}: {e}")))?;
        Ok(QueryResult {
            value: pair,
            index,
            known_leader: pairs.known_leader,
            last_contact_ms: pairs.last_contact_ms,
        })
    }

    /// Every entry whose key starts with `prefix` (`?recurse`), sorted by
    /// key; empty when there is none.
    pub async fn kv_list(
        &self,
        prefix: &str,
        opts: QueryOptions,
    ) -> Result<QueryResult<Vec<KvPair>>, Error> {
        let req = Request::new(Method::GET, &kv_path(prefix))
            .query(&opts)
            .flag("recurse");
        let answer = self.send(&req).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(QueryResult::from_headers(Vec::new(), &answer.headers));
        }
        let pairs: QueryResult<Vec<RawKvPair>> = answer.success()?.decode()?;
        let index = pairs.index;
        let decoded: Result<Vec<KvPair>, _> = pairs.value.into_iter().map(decode_pair).collect();
        let value =
            decoded.map_err(|e| Error::Decode(format!("KV {prefix}* at index {index}: {e}")))?;
        Ok(QueryResult {
            value,
            index,
            known_leader: pairs.known_leader,
            last_contact_ms: pairs.last_contact_ms,
        })
    }

    /// The keys that start with `prefix` (`?keys`), without their values,
    /// sorted; with `separator`, keys are cut after the first separator
    /// past the prefix (`?separator=/`: one level, like a folder listing).
    /// Empty when there is none.
    pub async fn kv_keys(
        &self,
        prefix: &str,
        separator: Option<&str>,
    ) -> Result<Vec<String>, Error> {
        let mut req = Request::new(Method::GET, &kv_path(prefix)).flag("keys");
        if let Some(separator) = separator {
            req = req.param("separator", separator);
        }
        let answer = self.send(&req).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        let keys: QueryResult<Vec<String>> = answer.success()?.decode()?;
        let mut keys = keys.value;
        keys.sort();
        Ok(keys)
    }

    /// Writes `key`; with `cas`, only if its modify index is still `cas`
    /// (0: only if it does not exist). Returns whether it was written.
    pub async fn kv_put(&self, key: &str, value: &[u8], cas: Option<u64>) -> Result<bool, Error> {
        let mut req = Request::new(Method::PUT, &kv_path(key)).bytes(value.to_vec());
        if let Some(cas) = cas {
            req = req.param("cas", cas);
        }
        self.bool(req).await
    }

    /// Deletes `key`; with `cas`, only if its modify index is still `cas`.
    pub async fn kv_delete(&self, key: &str, cas: Option<u64>) -> Result<bool, Error> {
        let mut req = Request::new(Method::DELETE, &kv_path(key));
        if let Some(cas) = cas {
            req = req.param("cas", cas);
        }
        self.bool(req).await
    }

    /// Applies `ops` atomically: all of them or, when one fails (a stale
    /// index, say), none. A rolled-back transaction is an outcome, not an
    /// error; errors are Consul's refusals and transport failures.
    pub async fn kv_txn(&self, ops: &[KvTxnOp]) -> Result<KvTxnOutcome, Error> {
        let raw: Vec<RawTxnOp<'_>> = ops.iter().map(raw_txn_op).collect();
        let req = Request::new(Method::PUT, &["txn"]).json(&raw)?;
        let answer = self.send(&req).await?;
        // 409: rolled back, with the reasons in the body.
        let answer = if answer.status == StatusCode::CONFLICT {
            answer
        } else {
            answer.success()?
        };
        let decoded: QueryResult<RawTxnAnswer> = answer.decode()?;
        let body = decoded.value;
        if answer.status == StatusCode::CONFLICT || !body.errors.is_empty() {
            return Ok(KvTxnOutcome::RolledBack(
                body.errors
                    .into_iter()
                    .map(|e| (e.op_index, e.what))
                    .collect(),
            ));
        }
        Ok(KvTxnOutcome::Committed(
            body.results
                .into_iter()
                .filter_map(|r| r.kv)
                .map(|kv| (kv.key, kv.modify_index))
                .collect(),
        ))
    }

    /// Takes the lock on `key` for `session` and writes `value`. Returns
    /// whether the lock was taken.
    pub async fn kv_acquire(&self, key: &str, value: &[u8], session: &str) -> Result<bool, Error> {
        let req = Request::new(Method::PUT, &kv_path(key))
            .param("acquire", session)
            .bytes(value.to_vec());
        self.bool(req).await
    }

    /// Releases `session`'s lock on `key`.
    pub async fn kv_release(&self, key: &str, session: &str) -> Result<bool, Error> {
        let req = Request::new(Method::PUT, &kv_path(key)).param("release", session);
        self.bool(req).await
    }

    /// Creates a session; returns its ID.
    pub async fn session_create(&self, session: &SessionRequest) -> Result<String, Error> {
        let req = Request::new(Method::PUT, &["session", "create"]).json(session)?;
        let created: QueryResult<SessionId> = self.json(req).await?;
        Ok(created.value.id)
    }

    /// Renews a session's TTL; `false` when the session no longer exists.
    pub async fn session_renew(&self, id: &str) -> Result<bool, Error> {
        let req = Request::new(Method::PUT, &["session", "renew", id]);
        let answer = self.send(&req).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        answer.success().map(|_| true)
    }

    /// Destroys a session, releasing its locks.
    pub async fn session_destroy(&self, id: &str) -> Result<(), Error> {
        let req = Request::new(Method::PUT, &["session", "destroy", id]);
        self.send_ok(req).await.map(drop)
    }

    /// Calls whose answer is a JSON `true`/`false`.
    async fn bool(&self, req: Request) -> Result<bool, Error> {
        Ok(self.json::<bool>(req).await?.value)
    }
}

/// `kv/<key>` with each `/`-separated part as its own path segment, so that
/// a key's slashes stay slashes and anything else is escaped.
fn kv_path(key: &str) -> Vec<&str> {
    std::iter::once("kv").chain(key.split('/')).collect()
}

fn raw_txn_op(op: &KvTxnOp) -> RawTxnOp<'_> {
    let kv = match op {
        KvTxnOp::Cas { key, value, index } => RawTxnKv {
            verb: "cas",
            key,
            value: Some(STANDARD.encode(value)),
            index: *index,
        },
        KvTxnOp::CheckIndex { key, index } => RawTxnKv {
            verb: "check-index",
            key,
            value: None,
            index: *index,
        },
    };
    RawTxnOp { kv }
}

fn decode_pair(raw: RawKvPair) -> Result<KvPair, base64::DecodeError> {
    Ok(KvPair {
        value: STANDARD.decode(raw.value)?,
        key: raw.key,
        flags: raw.flags,
        session: raw.session.filter(|s| !s.is_empty()),
        modify_index: raw.modify_index,
        lock_index: raw.lock_index,
    })
}
