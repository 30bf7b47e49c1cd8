//! Intentions: which service may call which, decided the same way by every
//! component (mesh-control's `check`, and the destination's inbound proxy
//! on the identity of the peer's certificate).
//!
//! An [`Intention`] allows or denies calls from a source service to a
//! destination service; either side is a service name or `*`, any
//! service. [`Intentions`] is the whole set with the default action for a
//! call no intention matches, and [`Intentions::decide`] is the decision.
//!
//! # Precedence
//!
//! 1. The most specific matching intention decides: one that names both
//!    services (`api → web`) beats one that names one of them (`api → *`,
//!    `* → web`), which beats `* → *`.
//! 2. Two matching intentions equally specific (`api → *` and `* → web`
//!    for a call from api to web): if either denies the call, it is
//!    denied.
//! 3. An intention with `http` rules is an allow narrowed to what its
//!    rules name: the matching rule with the longest path decides (an
//!    exact path beats a prefix of the same length; a rule without a path
//!    has length 0), and equally long matches that disagree deny. When no
//!    rule matches, that intention denies: a narrowed allow never allows
//!    more than it names, and never falls through to a less specific
//!    intention or the default.
//! 4. No intention matches: the default ([`Intentions::default_action`]);
//!    deny is the recommended default.
//!
//! A peer without a service identity (a node agent's certificate, say)
//! has no source name: only intentions whose source is `*` match it.
//! Service names compare ignoring ASCII case, as everywhere in the mesh;
//! they are stored lowercase. Paths compare as given: the caller passes
//! the path already normalized the way the proxy routes it. Methods are
//! case-sensitive, as in HTTP. A prefix is a plain string prefix (as
//! Consul's): `/api` also matches `/apix`; end it with `/` to mean a
//! folder.
//!
//! Whoever enforces intentions must never fail open: when the current set
//! cannot be read, keep deciding on the last one known, and without one,
//! deny.
//!
//! # JSON
//!
//! An intention, as stored and as the REST API shows it (`http` and
//! `description` may be left out; each rule names at most one of
//! `path_exact` and `path_prefix`, and `methods` empty or left out means
//! any method):
//!
//! ```json
//! {
//!   "source": "api",
//!   "destination": "web",
//!   "action": "allow",
//!   "http": [
//!     {"path_prefix": "/v1/", "methods": ["GET", "HEAD"], "action": "allow"},
//!     {"path_exact": "/v1/admin", "action": "deny"}
//!   ],
//!   "description": "api reads web's public API"
//! }
//! ```
//!
//! The whole set: `{"default": "deny", "list": [<intention>, …]}`. A
//! [`Decision`]: `{"action": "deny", "by": "default"}`, or with the
//! intention that decided, `{"action": "allow", "by": "rule", "source":
//! "api", "destination": "web", "rule": 0}` (`by` is `default`,
//! `intention` (one without rules), `rule` (its rule number `rule`
//! decided) or `unmatched` (it has rules and none matched)).

use std::{cmp::Ordering, fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::pki::spiffe::check_service_name;

/// The longest path a rule may name.
pub const MAX_PATH_LEN: usize = 1024;
/// The most http rules one intention may have.
pub const MAX_RULES: usize = 64;
/// The most methods one rule may name.
pub const MAX_METHODS: usize = 16;
/// The longest method name.
pub const MAX_METHOD_LEN: usize = 32;
/// The longest description.
pub const MAX_DESCRIPTION_LEN: usize = 512;

/// One side of an intention: a service, or `*`, any service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Selector {
    /// `*`: any service (and, as a source, a peer without a service
    /// identity).
    Any,
    /// One service, by its lowercase name.
    Service(String),
}

/// What an intention or a rule does with a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the call through.
    Allow,
    /// Refuse it.
    Deny,
}

/// An HTTP method as a rule names it: an uppercase token (`GET`,
/// `PROPFIND`). Checked by [`Intention::validate`], so that a bad one is
/// named by its place.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Method(pub String);

/// A rule that narrows an intention to some paths and methods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRule {
    /// Matches this path only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_exact: Option<String>,
    /// Matches every path that starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The methods it matches; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<Method>,
    /// What it does with a call it matches.
    pub action: Action,
}

/// Allow or deny calls from `source` to `destination`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intention {
    /// Who calls.
    pub source: Selector,
    /// Who is called.
    pub destination: Selector,
    /// What it does with a call; with `http` rules this must be `allow`
    /// (the rules narrow it).
    pub action: Action,
    /// Rules that narrow the intention to some paths and methods; empty:
    /// every call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
    /// Why it exists, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// Every intention of the mesh and the default, checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawIntentions")]
pub struct Intentions {
    default: Action,
    list: Vec<Intention>,
}

/// The outcome of [`Intentions::decide`]: what to do with the call, and
/// why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Allow or deny.
    pub action: Action,
    /// What decided it.
    #[serde(flatten)]
    pub by: By,
}

/// What decided a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum By {
    /// No intention matched: the default.
    Default,
    /// An intention without http rules.
    Intention {
        /// Its source.
        source: Selector,
        /// Its destination.
        destination: Selector,
    },
    /// A rule of an intention: the one at index `rule` of its `http`.
    Rule {
        /// The intention's source.
        source: Selector,
        /// The intention's destination.
        destination: Selector,
        /// The rule's index in `http`.
        rule: usize,
    },
    /// An intention with http rules, none of which matched: it denies.
    Unmatched {
        /// Its source.
        source: Selector,
        /// Its destination.
        destination: Selector,
    },
}

/// A bad intention: which field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct IntentionError {
    /// The field, as a path into the JSON form (`http[0].methods[1]`,
    /// `list[3].source`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// The set as written, before it is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntentions {
    default: Action,
    #[serde(default)]
    list: Vec<Intention>,
}

// === impl Selector ===

impl Selector {
    /// Reads `*` or a service name (by the mesh's service-name rule),
    /// stored lowercase.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Self::Any);
        }
        if text.contains('*') {
            return Err(format!(
                "{text:?} is not a service name: a wildcard is `*` alone, any service"
            ));
        }
        check_service_name(text)?;
        Ok(Self::Service(text.to_ascii_lowercase()))
    }

    /// Whether it names one service (not `*`).
    pub fn is_exact(&self) -> bool {
        matches!(self, Self::Service(_))
    }

    /// The selector as written: the service name, or `*`.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Any => "*",
            Self::Service(name) => name,
        }
    }

    /// Whether it selects `name`; `None`, a peer without a service
    /// identity, is selected by `*` only.
    pub fn matches(&self, name: Option<&str>) -> bool {
        match (self, name) {
            (Self::Any, _) => true,
            (Self::Service(s), Some(name)) => s.eq_ignore_ascii_case(name),
            (Self::Service(_), None) => false,
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Selector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Selector {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> Self {
        match s {
            Selector::Any => "*".to_owned(),
            Selector::Service(name) => name,
        }
    }
}

// === impl Action ===

impl Action {
    /// `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            other => Err(format!("{other:?} is not allow or deny")),
        }
    }
}

// === impl Method ===

impl Method {
    /// A method, checked: an uppercase HTTP token.
    pub fn parse(text: &str) -> Result<Self, String> {
        check_method(text)?;
        Ok(Self(text.to_owned()))
    }

    /// The method's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a method name: an HTTP token (RFC 9110) without lowercase
/// letters, at most [`MAX_METHOD_LEN`] characters.
pub fn check_method(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("a method must not be empty".into());
    }
    if text.len() > MAX_METHOD_LEN {
        return Err(format!(
            "{text:?} is longer than {MAX_METHOD_LEN} characters"
        ));
    }
    if text.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(format!(
            "{text:?} is not uppercase: methods are case-sensitive, write {:?}",
            text.to_ascii_uppercase()
        ));
    }
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    match text.bytes().find(|b| !token(*b)) {
        Some(bad) => Err(format!(
            "{text:?} has {:?}, which no HTTP method has",
            char::from(bad)
        )),
        None => Ok(()),
    }
}

/// Checks a path a rule names: it starts with `/`, has no query,
/// fragment, whitespace or control character, and is at most
/// [`MAX_PATH_LEN`] long.
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} does not start with '/'"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!("the path is longer than {MAX_PATH_LEN} characters"));
    }
    if let Some(bad) = path
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '?' || *c == '#')
    {
        return Err(format!(
            "{path:?} has {bad:?}: a path has no query, fragment, space or control character"
        ));
    }
    Ok(())
}

// === impl HttpRule ===

impl HttpRule {
    /// How well the rule matches a call: `None` when it does not; else the
    /// length of the path it names (0 without one) and whether it is
    /// exact, so that the greater match is the more specific.
    fn matches(&self, method: &str, path: &str) -> Option<(usize, bool)> {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m.0 == method) {
            return None;
        }
        match (&self.path_exact, &self.path_prefix) {
            (Some(exact), _) => (path == exact).then_some((exact.len(), true)),
            (None, Some(prefix)) => path
                .starts_with(prefix.as_str())
                .then_some((prefix.len(), false)),
            (None, None) => Some((0, false)),
        }
    }

    fn validate(&self, at: &str) -> Result<(), IntentionError> {
        let field = |name: &str| format!("{at}.{name}");
        if self.path_exact.is_some() && self.path_prefix.is_some() {
            return Err(IntentionError::new(
                at,
                "give path_exact or path_prefix, not both",
            ));
        }
        if let Some(path) = &self.path_exact {
            check_path(path).map_err(|m| IntentionError::new(field("path_exact"), m))?;
        }
        if let Some(path) = &self.path_prefix {
            check_path(path).map_err(|m| IntentionError::new(field("path_prefix"), m))?;
        }
        if self.methods.len() > MAX_METHODS {
            return Err(IntentionError::new(
                field("methods"),
                format!("more than {MAX_METHODS} methods"),
            ));
        }
        for (k, method) in self.methods.iter().enumerate() {
            check_method(&method.0)
                .map_err(|m| IntentionError::new(format!("{at}.methods[{k}]"), m))?;
        }
        Ok(())
    }
}

// === impl Intention ===

impl Intention {
    /// Checks everything but the service names (which [`Selector`] checks
    /// when it is made): the rules' paths and methods, the action with
    /// rules, the description.
    pub fn validate(&self) -> Result<(), IntentionError> {
        if !self.http.is_empty() && self.action == Action::Deny {
            return Err(IntentionError::new(
                "action",
                "an intention with http rules is an allow narrowed by them (a call no rule \
                 matches is denied): use action allow with deny rules, or no http rules",
            ));
        }
        if self.http.len() > MAX_RULES {
            return Err(IntentionError::new(
                "http",
                format!("more than {MAX_RULES} rules"),
            ));
        }
        for (k, rule) in self.http.iter().enumerate() {
            rule.validate(&format!("http[{k}]"))?;
        }
        if self.description.chars().count() > MAX_DESCRIPTION_LEN {
            return Err(IntentionError::new(
                "description",
                format!("longer than {MAX_DESCRIPTION_LEN} characters"),
            ));
        }
        if self.description.chars().any(char::is_control) {
            return Err(IntentionError::new(
                "description",
                "one line without control characters",
            ));
        }
        Ok(())
    }

    /// How many of its two sides name a service: 2, 1 or 0.
    pub fn specificity(&self) -> u8 {
        u8::from(self.source.is_exact()) + u8::from(self.destination.is_exact())
    }

    /// Whether it applies to calls from `source` to `destination`.
    pub fn matches(&self, source: Option<&str>, destination: &str) -> bool {
        self.source.matches(source) && self.destination.matches(Some(destination))
    }

    /// What it does with a call it applies to, and why.
    pub fn decide(&self, method: &str, path: &str) -> Decision {
        let (source, destination) = (self.source.clone(), self.destination.clone());
        if self.http.is_empty() {
            return Decision {
                action: self.action,
                by: By::Intention {
                    source,
                    destination,
                },
            };
        }
        let mut best: Option<((usize, bool), usize)> = None;
        for (k, rule) in self.http.iter().enumerate() {
            let Some(rank) = rule.matches(method, path) else {
                continue;
            };
            best = match best {
                None => Some((rank, k)),
                Some((top, held)) => match rank.cmp(&top) {
                    Ordering::Greater => Some((rank, k)),
                    Ordering::Equal
                        if self.http[held].action == Action::Allow
                            && rule.action == Action::Deny =>
                    {
                        Some((rank, k))
                    }
                    _ => Some((top, held)),
                },
            };
        }
        match best {
            Some((_, rule)) => Decision {
                action: self.http[rule].action,
                by: By::Rule {
                    source,
                    destination,
                    rule,
                },
            },
            None => Decision {
                action: Action::Deny,
                by: By::Unmatched {
                    source,
                    destination,
                },
            },
        }
    }
}

// === impl Intentions ===

impl Intentions {
    /// The set `list` with `default` for calls none matches; refuses a bad
    /// intention (naming it by its place, `list[3].http[0].path_prefix`)
    /// and two with the same source and destination.
    pub fn new(default: Action, mut list: Vec<Intention>) -> Result<Self, IntentionError> {
        for (k, intention) in list.iter().enumerate() {
            intention
                .validate()
                .map_err(|e| IntentionError::new(format!("list[{k}].{}", e.field), e.message))?;
            if let Some(first) = list[..k].iter().position(|i| {
                i.source == intention.source && i.destination == intention.destination
            }) {
                return Err(IntentionError::new(
                    format!("list[{k}]"),
                    format!(
                        "{} -> {} is given twice (also list[{first}])",
                        intention.source, intention.destination
                    ),
                ));
            }
        }
        list.sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
        Ok(Self { default, list })
    }

    /// No intention: everything is `default`.
    pub fn empty(default: Action) -> Self {
        Self {
            default,
            list: Vec::new(),
        }
    }

    /// The action for calls no intention matches.
    pub fn default_action(&self) -> Action {
        self.default
    }

    /// The intentions, by source and then destination.
    pub fn list(&self) -> &[Intention] {
        &self.list
    }

    /// What to do with a call from `source` (`None`: a peer without a
    /// service identity) to `destination`, for `method` and `path` (as
    /// the proxy normalized it), by the precedence of the module's doc.
    pub fn decide(
        &self,
        source: Option<&str>,
        destination: &str,
        method: &str,
        path: &str,
    ) -> Decision {
        let Some(top) = self
            .list
            .iter()
            .filter(|i| i.matches(source, destination))
            .map(Intention::specificity)
            .max()
        else {
            return Decision {
                action: self.default,
                by: By::Default,
            };
        };
        let mut decisions = self
            .list
            .iter()
            .filter(|i| i.specificity() == top && i.matches(source, destination))
            .map(|i| i.decide(method, path));
        let first = decisions
            .next()
            .expect("an intention of the top specificity matched");
        if first.action == Action::Deny {
            return first;
        }
        decisions
            .find(|d| d.action == Action::Deny)
            .unwrap_or(first)
    }
}

impl Default for Intentions {
    /// No intention, and deny: the recommended default.
    fn default() -> Self {
        Self::empty(Action::Deny)
    }
}

impl TryFrom<RawIntentions> for Intentions {
    type Error = IntentionError;

    fn try_from(raw: RawIntentions) -> Result<Self, Self::Error> {
        Self::new(raw.default, raw.list)
    }
}

// === impl Decision ===

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.action)?;
        match &self.by {
            By::Default => f.write_str(" by default: no intention matches"),
            By::Intention {
                source,
                destination,
            } => write!(f, " by intention {source} -> {destination}"),
            By::Rule {
                source,
                destination,
                rule,
            } => write!(f, " by intention {source} -> {destination}, http[{rule}]"),
            By::Unmatched {
                source,
                destination,
            } => write!(
                f,
                " by intention {source} -> {destination}: none of its http rules matches"
            ),
        }
    }
}

// === impl IntentionError ===

impl IntentionError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests;
