//! Intentions: which service may call which, stored in Consul KV
//! ([`crate::store::intentions`]) and decided by
//! [`mesh_runtime::intentions`], the same code the proxies run.
//!
//! Any replica reads and writes them: every write is check-and-set on the
//! revision it was based on, so two writers never overwrite each other.

use mesh_runtime::intentions::{
    Action, Decision, HttpRule, Intention, Intentions, Selector, check_method, check_path,
};
use serde::{Deserialize, Serialize};

use super::Control;
use crate::{
    error::ControlError,
    store::{Conflict, Store, intentions::INTENTIONS_DEFAULT_KEY},
};

/// Where the default action came from: set in Consul KV, or mesh-control's
/// `default_intention` while it is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultFrom {
    /// `mesh/intentions-default`.
    Kv,
    /// mesh-control's `default_intention` (the key is not set).
    Config,
}

/// An intention and its revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentionView {
    /// The intention.
    #[serde(flatten)]
    pub intention: Intention,
    /// Its key's revision: pass it as `expected_revision` to change it.
    pub revision: u64,
}

/// `GET /v1/intentions`: every intention and the default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentionsView {
    /// The action for calls no intention matches.
    pub default: DefaultAction,
    /// Consul's index of the read; it moves on with any change to an
    /// intention or to the default.
    pub index: u64,
    /// Every intention, by source and then destination.
    pub intentions: Vec<IntentionView>,
}

/// The default action, where it came from and its revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultAction {
    /// allow or deny.
    pub action: Action,
    /// Set in Consul KV, or mesh-control's config while it is not.
    pub from: DefaultFrom,
    /// The key's revision (0: not set): pass it as `expected_revision` to
    /// change it.
    pub revision: u64,
}

/// `PUT /v1/intentions/{source}/{destination}`: the intention's body.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutIntention {
    /// `allow` or `deny`.
    pub action: String,
    /// Rules that narrow an allow to some paths and methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
    /// Why it exists.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Change only if the intention is at this revision (0: only if it
    /// does not exist); absent: whatever revision it is at now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_revision: Option<u64>,
}

/// What a put stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutIntentionResult {
    /// The intention and its new revision.
    #[serde(flatten)]
    pub stored: IntentionView,
    /// Whether it is new (else it replaced one).
    pub created: bool,
}

/// `PUT /v1/intentions-default`: the body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetDefault {
    /// `allow` or `deny`.
    pub default: String,
    /// Change only if the key is at this revision (0: only if it is not
    /// set); absent: whatever revision it is at now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_revision: Option<u64>,
}

/// `GET /v1/intentions/check`: the call to decide.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckQuery {
    /// The calling service; empty: a peer without a service identity.
    #[serde(default)]
    pub source: String,
    /// The called service.
    #[serde(default)]
    pub destination: String,
    /// The method [default: GET].
    #[serde(default)]
    pub method: String,
    /// The path, as the proxy normalizes it [default: /].
    #[serde(default)]
    pub path: String,
}

/// What the intentions decide for a call, and on which read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The decision and what made it.
    #[serde(flatten)]
    pub decision: Decision,
    /// The decision in words.
    pub explanation: String,
    /// Consul's index of the intentions it was decided on.
    pub index: u64,
}

// === impl Control ===

impl Control {
    /// Sets the default action used while `mesh/intentions-default` is not
    /// set (mesh-control's `default_intention`).
    #[must_use]
    pub fn with_default_intention(mut self, action: Action) -> Self {
        self.default_intention = action;
        self
    }

    /// Every intention and the default.
    pub async fn intentions(&self) -> Result<IntentionsView, ControlError> {
        let stored = self.store.intentions().await?;
        Ok(IntentionsView {
            default: self.default_of(stored.default),
            index: stored.index,
            intentions: stored
                .list
                .into_iter()
                .map(|(intention, revision)| IntentionView {
                    intention,
                    revision,
                })
                .collect(),
        })
    }

    /// The intention from `source` to `destination`.
    pub async fn intention(
        &self,
        source: &str,
        destination: &str,
    ) -> Result<IntentionView, ControlError> {
        let (source, destination) = selectors(source, destination)?;
        match self.store.intention(&source, &destination).await? {
            Some((intention, revision)) => Ok(IntentionView {
                intention,
                revision,
            }),
            None => Err(no_intention(&source, &destination)),
        }
    }

    /// Validates `put` and stores it as the intention from `source` to
    /// `destination`, if that is still at the revision the put expects.
    pub async fn put_intention(
        &self,
        source: &str,
        destination: &str,
        put: PutIntention,
    ) -> Result<PutIntentionResult, ControlError> {
        let (source, destination) = selectors(source, destination)?;
        let action = action("action", &put.action)?;
        let intention = Intention {
            source,
            destination,
            action,
            http: put.http,
            description: put.description,
        };
        intention
            .validate()
            .map_err(|e| ControlError::invalid(e.field, e.message))?;
        let (source, destination) = (&intention.source, &intention.destination);
        let actual = self
            .store
            .intention(source, destination)
            .await?
            .map_or(0, |(_, revision)| revision);
        let expected = put.expected_revision.unwrap_or(actual);
        if expected != actual {
            return Err(conflict(
                Store::intention_key(source, destination),
                expected,
                actual,
            ));
        }
        let Some(revision) = self.store.put_intention(&intention, expected).await? else {
            let now = self.store.intention(source, destination).await?;
            return Err(conflict(
                Store::intention_key(source, destination),
                expected,
                now.map_or(0, |(_, r)| r),
            ));
        };
        tracing::info!(
            source = %source, destination = %destination, action = %intention.action,
            rules = intention.http.len(), revision, "stored an intention"
        );
        Ok(PutIntentionResult {
            stored: IntentionView {
                intention,
                revision,
            },
            created: expected == 0,
        })
    }

    /// Deletes the intention from `source` to `destination`, if it is at
    /// `expected` (`None`: whatever revision it is at); returns it as it
    /// was.
    pub async fn delete_intention(
        &self,
        source: &str,
        destination: &str,
        expected: Option<u64>,
    ) -> Result<IntentionView, ControlError> {
        let (source, destination) = selectors(source, destination)?;
        let Some((intention, actual)) = self.store.intention(&source, &destination).await? else {
            return Err(no_intention(&source, &destination));
        };
        let key = Store::intention_key(&source, &destination);
        let expected = expected.unwrap_or(actual);
        if expected != actual {
            return Err(conflict(key, expected, actual));
        }
        if !self
            .store
            .delete_intention(&source, &destination, expected)
            .await?
        {
            let now = self.store.intention(&source, &destination).await?;
            return Err(conflict(key, expected, now.map_or(0, |(_, r)| r)));
        }
        tracing::info!(source = %source, destination = %destination, "deleted an intention");
        Ok(IntentionView {
            intention,
            revision: actual,
        })
    }

    /// Stores the default action for calls no intention matches.
    pub async fn set_intentions_default(
        &self,
        set: SetDefault,
    ) -> Result<DefaultAction, ControlError> {
        let action = action("default", &set.default)?;
        let actual = self
            .store
            .intentions_default()
            .await?
            .map_or(0, |(_, revision)| revision);
        let key = INTENTIONS_DEFAULT_KEY.to_owned();
        let expected = set.expected_revision.unwrap_or(actual);
        if expected != actual {
            return Err(conflict(key, expected, actual));
        }
        let Some(revision) = self.store.put_intentions_default(action, expected).await? else {
            let now = self.store.intentions_default().await?;
            return Err(conflict(key, expected, now.map_or(0, |(_, r)| r)));
        };
        tracing::info!(default = %action, revision, "stored the intentions' default");
        Ok(DefaultAction {
            action,
            from: DefaultFrom::Kv,
            revision,
        })
    }

    /// What the stored intentions decide for the call `query` describes.
    pub async fn check_intention(&self, query: CheckQuery) -> Result<CheckResult, ControlError> {
        let source = match query.source.as_str() {
            "" => None,
            s => Some(service("source", s)?),
        };
        let destination = service("destination", &query.destination)?;
        let method = match query.method.as_str() {
            "" => "GET",
            m => m,
        };
        check_method(method).map_err(|m| ControlError::invalid("method", m))?;
        let path = match query.path.as_str() {
            "" => "/",
            p => p,
        };
        check_path(path).map_err(|m| ControlError::invalid("path", m))?;
        let stored = self.store.intentions().await?;
        let default = self.default_of(stored.default).action;
        let list = stored.list.into_iter().map(|(i, _)| i).collect();
        let set = Intentions::new(default, list)
            .map_err(|e| ControlError::Internal(format!("the stored intentions: {e}")))?;
        let decision = set.decide(source.as_deref(), &destination, method, path);
        Ok(CheckResult {
            explanation: decision.to_string(),
            decision,
            index: stored.index,
        })
    }

    /// The default as stored, or else the configured one.
    fn default_of(&self, stored: Option<(Action, u64)>) -> DefaultAction {
        match stored {
            Some((action, revision)) => DefaultAction {
                action,
                from: DefaultFrom::Kv,
                revision,
            },
            None => DefaultAction {
                action: self.default_intention,
                from: DefaultFrom::Config,
                revision: 0,
            },
        }
    }
}

// === impl DefaultAction ===

impl Default for DefaultAction {
    /// Deny, from the config: the recommended default.
    fn default() -> Self {
        Self {
            action: Action::Deny,
            from: DefaultFrom::Config,
            revision: 0,
        }
    }
}

/// The two sides of an intention, named `source` and `destination`.
fn selectors(source: &str, destination: &str) -> Result<(Selector, Selector), ControlError> {
    let source = Selector::parse(source).map_err(|m| ControlError::invalid("source", m))?;
    let destination =
        Selector::parse(destination).map_err(|m| ControlError::invalid("destination", m))?;
    Ok((source, destination))
}

/// A service name (no wildcard: a call comes from and goes to one
/// service), lowercase.
fn service(field: &str, name: &str) -> Result<String, ControlError> {
    match Selector::parse(name) {
        Ok(Selector::Service(name)) => Ok(name),
        Ok(Selector::Any) => Err(ControlError::invalid(
            field,
            "a call is between two services: name one, not `*`",
        )),
        Err(m) => Err(ControlError::invalid(field, m)),
    }
}

fn action(field: &str, text: &str) -> Result<Action, ControlError> {
    text.parse().map_err(|m| ControlError::invalid(field, m))
}

fn no_intention(source: &Selector, destination: &Selector) -> ControlError {
    ControlError::NotFound(format!("there is no intention {source} -> {destination}"))
}

fn conflict(key: String, expected: u64, actual: u64) -> ControlError {
    ControlError::Conflict(Conflict {
        key,
        expected,
        actual,
        current: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_put_body_reads_the_documented_json_and_refuses_unknown_keys() {
        let put: PutIntention = serde_json::from_value(serde_json::json!({
            "action": "allow",
            "http": [{"path_prefix": "/v1/", "methods": ["GET"], "action": "allow"}],
            "description": "reads",
            "expected_revision": 0
        }))
        .expect("the documented body");
        assert_eq!(put.expected_revision, Some(0));
        assert_eq!(put.http[0].path_prefix.as_deref(), Some("/v1/"));
        let e = serde_json::from_value::<PutIntention>(
            serde_json::json!({"action": "allow", "path": "/"}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `path`"), "{e}");
    }

    #[test]
    fn a_view_is_the_intention_with_its_revision_beside_it() {
        let view = IntentionView {
            intention: Intention {
                source: Selector::Any,
                destination: Selector::parse("web").expect("a name"),
                action: Action::Deny,
                http: Vec::new(),
                description: String::new(),
            },
            revision: 7,
        };
        let json = serde_json::to_value(&view).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"source": "*", "destination": "web", "action": "deny", "revision": 7})
        );
        assert_eq!(
            serde_json::from_value::<IntentionView>(json).ok(),
            Some(view)
        );
    }

    #[test]
    fn a_call_names_two_services() {
        assert!(service("source", "api").is_ok());
        let e = service("destination", "*").unwrap_err();
        assert!(e.to_string().starts_with("destination: "), "{e}");
        let e = service("source", "v1").unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
    }
}
