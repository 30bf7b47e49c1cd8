//! The mesh's intentions as mesh-control stores them
//! (`mesh/intentions/<source>/<destination>`, one JSON each, and
//! `mesh/intentions-default`), for the Watch streams of the bridge's node:
//! one blocking query on the prefix `mesh/intentions`, which covers the
//! list and the default, held while some stream of the node is open.
//!
//! While `mesh/intentions-default` is not set, the default is the bridge's
//! own `default_intention` (deny unless configured), which should agree
//! with mesh-control's setting of the same name.
//!
//! Enforcement must never fail open, so a read with a malformed entry
//! changes nothing: dropping one entry could turn a deny into an allow.
//! The last good set stays in force, and the bad key is logged (once per
//! distinct problem) until someone fixes or deletes it.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use consul_client::{Client, Error, KvPair, QueryOptions, QueryResult};
use mesh_proto::v1::{self as pb, RouteUpdate};
use mesh_runtime::intentions::{Action, Intention, Intentions};
use prost::Message;

use super::{Hub, blocking::Source, lock, topics::Topics, trust::Decision};

/// What every intentions key starts with, the default's included.
pub(crate) const INTENTIONS_ROOT: &str = "mesh/intentions";
/// The prefix of the keys of single intentions.
const INTENTIONS_PREFIX: &str = "mesh/intentions/";
/// The default action's key.
pub(crate) const INTENTIONS_DEFAULT_KEY: &str = "mesh/intentions-default";

/// What is known of the intentions.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum IntentionsView {
    /// No good answer from Consul yet.
    #[default]
    Unanswered,
    /// The current set.
    Present(Arc<IntentionsEntry>),
}

/// The intentions, and the piece of a `RouteUpdate` carrying them.
#[derive(Clone, Debug, PartialEq)]
pub struct IntentionsEntry {
    /// The set, checked.
    pub intentions: Intentions,
    /// Consul's index of the read the set comes from.
    pub revision: u64,
    /// `RouteUpdate.intentions` (field 6), encoded once for every stream.
    pub piece: Bytes,
}

/// The intentions' loop: one per bridge (they are the mesh's, not a
/// node's).
#[derive(Debug)]
pub(crate) struct IntentionsSource {
    /// The default while `mesh/intentions-default` is not set.
    default: Action,
    /// The last problem logged, so that a bad key is reported once.
    reported: Mutex<Option<String>>,
}

/// Consul's answer with its index: the revision of a new set.
pub(crate) type Listing = (u64, Vec<KvPair>);

// === impl IntentionsView ===

impl IntentionsView {
    /// Whether a good set was read.
    pub fn answered(&self) -> bool {
        !matches!(self, Self::Unanswered)
    }

    /// The set, once read.
    pub fn entry(&self) -> Option<&Arc<IntentionsEntry>> {
        match self {
            Self::Present(entry) => Some(entry),
            Self::Unanswered => None,
        }
    }
}

// === impl IntentionsEntry ===

impl IntentionsEntry {
    /// The set `intentions` read at Consul index `revision`.
    pub fn new(intentions: Intentions, revision: u64) -> Self {
        let json = serde_json::to_string(&intentions)
            .expect("a checked set of intentions always serializes");
        let piece = RouteUpdate {
            intentions: Some(pb::Intentions { revision, json }),
            ..RouteUpdate::default()
        }
        .encode_to_vec()
        .into();
        Self {
            intentions,
            revision,
            piece,
        }
    }
}

// === impl IntentionsSource ===

impl IntentionsSource {
    pub(crate) fn new(default: Action) -> Self {
        Self {
            default,
            reported: Mutex::new(None),
        }
    }

    /// Logs `problem` unless it was the last one logged.
    fn report(&self, problem: String) {
        let mut reported = lock(&self.reported);
        if reported.as_deref() != Some(problem.as_str()) {
            tracing::error!(%problem, "intentions in Consul KV do not read; the last good set stays in force");
            *reported = Some(problem);
        }
    }
}

impl Source for IntentionsSource {
    type Value = Listing;
    type View = IntentionsView;
    const KIND: &'static str = "intentions";
    const COUNTED: bool = false;

    fn key(&self) -> &str {
        INTENTIONS_ROOT
    }

    fn topics(hub: &Hub) -> &Topics<IntentionsView> {
        &hub.intentions
    }

    async fn fetch(
        &self,
        client: &Client,
        opts: QueryOptions,
    ) -> Result<QueryResult<Listing>, Error> {
        let read = client.kv_list(INTENTIONS_ROOT, opts).await?;
        Ok(QueryResult {
            value: (read.index, read.value),
            index: read.index,
            known_leader: read.known_leader,
            last_contact_ms: read.last_contact_ms,
        })
    }

    fn judge(
        &self,
        current: &IntentionsView,
        (index, pairs): Listing,
        known_leader: bool,
    ) -> (Decision, IntentionsView) {
        let intentions = match parse(&pairs, self.default) {
            Ok(intentions) => intentions,
            Err(problem) => {
                self.report(problem);
                return (Decision::Unchanged, IntentionsView::Unanswered);
            }
        };
        if lock(&self.reported).take().is_some() {
            tracing::info!("intentions in Consul KV read again");
        }
        let decision = match current.entry() {
            None => Decision::Apply,
            Some(old) if old.intentions == intentions => Decision::Unchanged,
            // A server without a leader may be behind: it may not take the
            // set back to an older one.
            Some(old) if !known_leader && index < old.revision => Decision::Untrusted,
            Some(_) => Decision::Apply,
        };
        let view = IntentionsView::Present(Arc::new(IntentionsEntry::new(intentions, index)));
        (decision, view)
    }
}

/// The set the keys under `mesh/intentions` hold; the first problem (with
/// its key) when one does not read.
pub(crate) fn parse(pairs: &[KvPair], default: Action) -> Result<Intentions, String> {
    let mut list = Vec::new();
    let mut stored_default = None;
    for pair in pairs {
        if pair.key == INTENTIONS_DEFAULT_KEY {
            let action = String::from_utf8_lossy(&pair.value)
                .parse::<Action>()
                .map_err(|e| format!("{}: {e}", pair.key))?;
            stored_default = Some(action);
        } else if let Some(rest) = pair.key.strip_prefix(INTENTIONS_PREFIX) {
            if pair.value.is_empty() && rest.ends_with('/') {
                continue; // a folder made by hand in Consul's UI
            }
            let intention: Intention = serde_json::from_slice(&pair.value)
                .map_err(|e| format!("{}: not an intention: {e}", pair.key))?;
            let expected = format!(
                "{INTENTIONS_PREFIX}{}/{}",
                intention.source, intention.destination
            );
            if expected != pair.key {
                return Err(format!(
                    "{}: it holds the intention {} -> {}, which belongs under {expected}",
                    pair.key, intention.source, intention.destination
                ));
            }
            list.push(intention);
        }
    }
    list.sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
    Intentions::new(stored_default.unwrap_or(default), list).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(key: &str, value: &str) -> KvPair {
        KvPair {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            ..KvPair::default()
        }
    }

    fn allow(source: &str, destination: &str) -> KvPair {
        pair(
            &format!("mesh/intentions/{source}/{destination}"),
            &serde_json::json!({"source": source, "destination": destination, "action": "allow"})
                .to_string(),
        )
    }

    #[test]
    fn the_list_and_the_stored_default_make_the_set() {
        let pairs = vec![
            allow("web", "orders"),
            allow("*", "web"),
            pair("mesh/intentions-default", "allow"),
        ];
        let set = parse(&pairs, Action::Deny).unwrap();
        assert_eq!(set.default_action(), Action::Allow);
        let names: Vec<_> = set
            .list()
            .iter()
            .map(|i| format!("{}->{}", i.source, i.destination))
            .collect();
        assert_eq!(names, ["*->web", "web->orders"]);
        assert_eq!(
            set.decide(Some("web"), "orders", "GET", "/").action,
            Action::Allow
        );
    }

    #[test]
    fn without_a_stored_default_the_configured_one_applies() {
        let set = parse(&[allow("web", "orders")], Action::Deny).unwrap();
        assert_eq!(set.default_action(), Action::Deny);
        assert_eq!(
            parse(&[], Action::Allow).unwrap().default_action(),
            Action::Allow
        );
    }

    #[test]
    fn a_bad_entry_is_named_by_its_key() {
        let bad = pair("mesh/intentions/web/orders", "{\"source\": \"web\"");
        let e = parse(&[allow("a", "b"), bad], Action::Deny).unwrap_err();
        assert!(
            e.starts_with("mesh/intentions/web/orders: not an intention"),
            "{e}"
        );
        let misplaced = pair(
            "mesh/intentions/web/orders",
            r#"{"source": "api", "destination": "orders", "action": "deny"}"#,
        );
        let e = parse(&[misplaced], Action::Deny).unwrap_err();
        assert!(
            e.contains("belongs under mesh/intentions/api/orders"),
            "{e}"
        );
        let e = parse(&[pair("mesh/intentions-default", "open")], Action::Deny).unwrap_err();
        assert!(e.starts_with("mesh/intentions-default: "), "{e}");
    }

    #[test]
    fn a_bad_entry_keeps_the_last_good_set() {
        let source = IntentionsSource::new(Action::Deny);
        let (decision, good) = source.judge(
            &IntentionsView::Unanswered,
            (5, vec![allow("web", "orders")]),
            true,
        );
        assert_eq!(decision, Decision::Apply);
        let entry = good.entry().expect("present");
        assert_eq!(entry.revision, 5);
        let carried = RouteUpdate::decode(entry.piece.as_ref()).unwrap();
        let carried = carried.intentions.expect("field 6");
        assert_eq!(carried.revision, 5);
        let back: Intentions = serde_json::from_str(&carried.json).unwrap();
        assert_eq!(back, entry.intentions);

        let bad = vec![allow("web", "orders"), pair("mesh/intentions/x/y", "nope")];
        assert_eq!(source.judge(&good, (6, bad), true).0, Decision::Unchanged);
        let same = source.judge(&good, (7, vec![allow("web", "orders")]), true);
        assert_eq!(same.0, Decision::Unchanged, "the same set at a later index");
        let (decision, changed) = source.judge(&good, (8, vec![]), true);
        assert_eq!(decision, Decision::Apply);
        assert_eq!(changed.entry().unwrap().revision, 8);
        assert!(changed.entry().unwrap().intentions.list().is_empty());
    }

    #[test]
    fn without_a_leader_the_set_never_goes_back() {
        let source = IntentionsSource::new(Action::Deny);
        let (_, at9) = source.judge(&IntentionsView::Unanswered, (9, vec![]), true);
        let older = (4, vec![allow("web", "orders")]);
        assert_eq!(source.judge(&at9, older, false).0, Decision::Untrusted);
        let newer = (10, vec![allow("web", "orders")]);
        assert_eq!(source.judge(&at9, newer, false).0, Decision::Apply);
    }
}
