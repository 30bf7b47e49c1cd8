//! Route policies: how the requests to one service are balanced, timed
//! out, retried, limited, and how its failing instances are ejected.
//!
//! A policy is written as a [`RouteSpec`] (every key optional): the
//! mesh-wide `[default_route]` table and one `[routes.<service>]` table per
//! service in the proxy's TOML file, and later the same struct sent by the
//! control plane. [`Policies::from_config`] merges each route over the
//! default, applies the built-in defaults and checks every value into a
//! typed [`RoutePolicy`]; the request path looks its service's policy up in
//! [`Policies`], which is swapped whole when the file is reloaded.
//!
//! What outlives both policies and routing tables is per-service runtime
//! state ([`ServiceState`]: the retry budget and the limit counters), kept
//! by service name as tables are rebuilt.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use http::HeaderName;
use mesh_runtime::duration::HumanDuration;
use serde::{Deserialize, Serialize};

use crate::{
    balance::HashOn,
    config::{Config, LoadBalancing, MAX_RETRIES},
    limits::{Counters, LimitPolicy},
    outlier::OutlierPolicy,
    protocol::Protocol,
    retry::{Budget, BudgetPolicy},
};

/// Most keys a `weights` table may have.
pub const MAX_WEIGHT_KEYS: usize = 16;

/// Largest weight of one key.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// A traffic split: version or tag, and its weight.
pub type Weights = Box<[(Box<str>, u32)]>;

/// One route's policy as written (TOML `[default_route]`,
/// `[routes.<service>]`): every key optional, unset keys come from the
/// default route, then from the built-in defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// `p2c-ewma` (default), `round-robin`, `least-request` or
    /// `consistent-hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<LoadBalancing>,
    /// Traffic split by instance version (Meta `version`) or tag:
    /// `{ v2 = 10, v1 = 90 }` sends about 10 % to the `v2` instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<BTreeMap<String, u32>>,
    /// Consistent hash on this request header (with `lb = "consistent-hash"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    /// Consistent hash on this cookie (with `lb = "consistent-hash"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_cookie: Option<String>,
    /// Overall deadline of a request up to its response headers, retries
    /// included (default: `request_timeout`, 15s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// Deadline of one attempt (default: none, only `timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<HumanDuration>,
    /// Retries on another instance (default: `retries`, 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Also retry POST and PATCH once they were sent (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_non_idempotent: Option<bool>,
    /// Retries allowed as a percentage of requests (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget_percent: Option<f64>,
    /// Retries allowed per second on top of the percentage (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget_min_per_second: Option<u32>,
    /// Window over which the budget counts requests and retries (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget_ttl: Option<HumanDuration>,
    /// Open connections to the service's instances; 0 = no limit (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection; 0 = no limit (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    /// Concurrent requests to the service; 0 = no limit (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Consecutive failures that eject an instance; 0 = never (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_consecutive_failures: Option<u32>,
    /// First ejection's length, doubled at each re-ejection (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_base_ejection: Option<HumanDuration>,
    /// Longest ejection (default 300s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_max_ejection: Option<HumanDuration>,
    /// Most instances of a service ejected at once, in percent (default 50;
    /// at least one of two or more, never the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_max_ejected_percent: Option<u32>,
    /// Protocol to the instances: `http1`, `h2` or `grpc` (HTTP/2);
    /// default: what each instance declares (tag `h2`/`grpc`,
    /// `Meta.protocol`). gRPC requests and upgrades choose for themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// A route's validated policy.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutePolicy {
    /// How an instance is picked.
    pub lb: LoadBalancing,
    /// What a consistent hash reads (set with `lb = consistent-hash`).
    pub hash: Option<HashOn>,
    /// Traffic split by version or tag: keys and weights (empty: none).
    pub weights: Weights,
    /// Overall deadline up to the response headers, retries included.
    pub timeout: Duration,
    /// Deadline of one attempt.
    pub per_try_timeout: Option<Duration>,
    /// Retries on another instance.
    pub retries: u32,
    /// Whether sent non-idempotent requests are retried too.
    pub retry_non_idempotent: bool,
    /// The retry budget.
    pub budget: BudgetPolicy,
    /// Connection, pending and request limits.
    pub limits: LimitPolicy,
    /// Passive outlier detection.
    pub outlier: OutlierPolicy,
    /// Protocol to the instances, when the route sets one.
    pub protocol: Option<Protocol>,
}

/// Every route's policy: the default and the per-service ones.
#[derive(Clone, Debug)]
pub struct Policies {
    default: Arc<RoutePolicy>,
    routes: HashMap<Box<str>, Arc<RoutePolicy>>,
}

/// A service's runtime state that outlives routing tables and policies.
#[derive(Debug, Default)]
pub struct ServiceState {
    /// Retries allowed.
    pub budget: Budget,
    /// Requests, pending requests.
    pub counters: Arc<Counters>,
}

// === impl RouteSpec ===

impl RouteSpec {
    /// `self` with every unset key taken from `base`.
    pub fn over(&self, base: &RouteSpec) -> RouteSpec {
        macro_rules! pick {
            ($($field:ident),* $(,)?) => {
                RouteSpec { $($field: self.$field.clone().or_else(|| base.$field.clone()),)* }
            };
        }
        pick!(
            lb,
            weights,
            hash_header,
            hash_cookie,
            timeout,
            per_try_timeout,
            retries,
            retry_non_idempotent,
            retry_budget_percent,
            retry_budget_min_per_second,
            retry_budget_ttl,
            max_connections,
            max_pending,
            max_requests,
            outlier_consecutive_failures,
            outlier_base_ejection,
            outlier_max_ejection,
            outlier_max_ejected_percent,
            protocol,
        )
    }

    /// The typed policy, built-in defaults applied; the error names the
    /// key as `<at>.<key>`.
    pub fn resolve(&self, at: &str) -> Result<RoutePolicy, String> {
        let err = |key: &str, msg: String| format!("{at}.{key}: {msg}");
        let lb = self.lb.unwrap_or_default();
        let hash = self.hash_on(lb).map_err(|(key, msg)| err(key, msg))?;
        let weights = self.weight_list().map_err(|msg| err("weights", msg))?;
        let timeout =
            positive(self.timeout, Duration::from_secs(15)).map_err(|msg| err("timeout", msg))?;
        let per_try_timeout = match self.per_try_timeout {
            None => None,
            Some(d) if d.get().is_zero() => {
                return Err(err("per_try_timeout", "must be more than 0".into()));
            }
            Some(d) => Some(d.get()),
        };
        let retries = self.retries.unwrap_or(2);
        if retries > MAX_RETRIES {
            return Err(err(
                "retries",
                format!("{retries} is more than {MAX_RETRIES}"),
            ));
        }
        let budget = BudgetPolicy {
            percent: self.retry_budget_percent.unwrap_or(20.0),
            min_per_second: self.retry_budget_min_per_second.unwrap_or(10),
            ttl: self
                .retry_budget_ttl
                .map_or(Duration::from_secs(10), HumanDuration::get),
        };
        budget
            .check()
            .map_err(|(key, msg)| err(key, msg.to_owned()))?;
        let limit = |v: Option<u32>| match v.unwrap_or(1024) {
            0 => None,
            n => Some(n as usize),
        };
        let limits = LimitPolicy {
            max_connections: limit(self.max_connections),
            max_pending: limit(self.max_pending),
            max_requests: limit(self.max_requests),
        };
        let outlier = OutlierPolicy {
            consecutive_failures: self.outlier_consecutive_failures.unwrap_or(5),
            base_ejection: self
                .outlier_base_ejection
                .map_or(Duration::from_secs(30), HumanDuration::get),
            max_ejection: self
                .outlier_max_ejection
                .map_or(Duration::from_secs(300), HumanDuration::get),
            max_ejected_percent: self.outlier_max_ejected_percent.unwrap_or(50),
        };
        outlier
            .check()
            .map_err(|(key, msg)| err(key, msg.to_owned()))?;
        Ok(RoutePolicy {
            lb,
            hash,
            weights,
            timeout,
            per_try_timeout,
            retries,
            retry_non_idempotent: self.retry_non_idempotent.unwrap_or(false),
            budget,
            limits,
            outlier,
            protocol: self.protocol,
        })
    }

    fn hash_on(&self, lb: LoadBalancing) -> Result<Option<HashOn>, (&'static str, String)> {
        let hashing = lb == LoadBalancing::ConsistentHash;
        match (&self.hash_header, &self.hash_cookie) {
            (Some(_), Some(_)) => Err((
                "hash_cookie",
                "set hash_header or hash_cookie, not both".into(),
            )),
            (None, None) if hashing => Err((
                "lb",
                "consistent-hash needs hash_header or hash_cookie".into(),
            )),
            (None, None) => Ok(None),
            (Some(_), None) if !hashing => {
                Err(("hash_header", "only with lb = \"consistent-hash\"".into()))
            }
            (None, Some(_)) if !hashing => {
                Err(("hash_cookie", "only with lb = \"consistent-hash\"".into()))
            }
            (Some(h), None) => HeaderName::try_from(h.trim())
                .map(|name| Some(HashOn::Header(name)))
                .map_err(|_| ("hash_header", format!("{h:?} is not a header name"))),
            (None, Some(c)) => {
                let c = c.trim();
                let token = !c.is_empty()
                    && c.bytes()
                        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
                if token {
                    Ok(Some(HashOn::Cookie(c.into())))
                } else {
                    Err(("hash_cookie", format!("{c:?} is not a cookie name")))
                }
            }
        }
    }

    fn weight_list(&self) -> Result<Weights, String> {
        let Some(weights) = &self.weights else {
            return Ok(Box::new([]));
        };
        if weights.len() > MAX_WEIGHT_KEYS {
            return Err(format!("at most {MAX_WEIGHT_KEYS} keys"));
        }
        if !weights.is_empty() && weights.values().all(|w| *w == 0) {
            return Err("at least one weight must be more than 0".into());
        }
        weights
            .iter()
            .map(|(key, w)| {
                if key.trim().is_empty() {
                    Err("a key is empty".to_owned())
                } else if *w > MAX_WEIGHT {
                    Err(format!("{key} = {w} is more than {MAX_WEIGHT}"))
                } else {
                    Ok((key.trim().into(), *w))
                }
            })
            .collect()
    }
}

fn positive(d: Option<HumanDuration>, default: Duration) -> Result<Duration, String> {
    match d {
        None => Ok(default),
        Some(d) if d.get().is_zero() => Err("must be more than 0".into()),
        Some(d) => Ok(d.get()),
    }
}

// === impl Policies ===

impl Policies {
    /// The policies `config` describes: `[default_route]` over the
    /// mesh-wide flags (`lb`, `retries`, `request_timeout`), each
    /// `[routes.<service>]` over that. The error is one line naming the key.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let flags = RouteSpec {
            lb: Some(config.lb),
            retries: Some(config.retries),
            timeout: Some(config.request_timeout.into()),
            ..RouteSpec::default()
        };
        let default_spec = flags.over(&config.default_route);
        let default = Arc::new(default_spec.resolve("default_route")?);
        let mut routes = HashMap::with_capacity(config.routes.len());
        for (name, spec) in &config.routes {
            let policy = spec
                .over(&default_spec)
                .resolve(&format!("routes.{name}"))?;
            routes.insert(name.to_ascii_lowercase().into(), Arc::new(policy));
        }
        Ok(Self { default, routes })
    }

    /// Only the built-in defaults.
    pub fn builtin() -> Self {
        let default = RouteSpec::default()
            .resolve("default_route")
            .expect("the built-in defaults are valid");
        Self {
            default: Arc::new(default),
            routes: HashMap::new(),
        }
    }

    /// The policy of `service` (a table's lowercase name).
    pub fn get(&self, service: &str) -> &Arc<RoutePolicy> {
        if self.routes.is_empty() {
            return &self.default;
        }
        self.routes.get(service).unwrap_or(&self.default)
    }

    /// The default route's policy.
    pub fn default_route(&self) -> &Arc<RoutePolicy> {
        &self.default
    }

    /// Number of per-service routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether only the default route is set.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl Default for Policies {
    fn default() -> Self {
        Self::builtin()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> RouteSpec {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn built_in_defaults_follow_envoy_and_linkerd() {
        let p = RouteSpec::default().resolve("default_route").unwrap();
        assert_eq!(p.lb, LoadBalancing::P2cEwma);
        assert_eq!(p.timeout, Duration::from_secs(15));
        assert_eq!(p.per_try_timeout, None);
        assert_eq!(p.retries, 2);
        assert!(!p.retry_non_idempotent);
        assert_eq!(p.budget.percent, 20.0);
        assert_eq!(p.budget.min_per_second, 10);
        assert_eq!(p.budget.ttl, Duration::from_secs(10));
        assert_eq!(p.limits.max_requests, Some(1024));
        assert_eq!(p.outlier.consecutive_failures, 5);
        assert_eq!(p.outlier.base_ejection, Duration::from_secs(30));
        assert_eq!(p.outlier.max_ejection, Duration::from_secs(300));
        assert_eq!(p.outlier.max_ejected_percent, 50);
    }

    #[test]
    fn a_route_overrides_the_default_key_by_key() {
        let default = spec("per_try_timeout = \"2s\"\nretries = 3\nmax_requests = 0");
        let route = spec(
            "lb = \"consistent-hash\"\nhash_header = \"X-User\"\nretries = 1\n\
             weights = { v2 = 10, v1 = 90 }",
        );
        let p = route.over(&default).resolve("routes.orders").unwrap();
        assert_eq!(p.lb, LoadBalancing::ConsistentHash);
        assert_eq!(
            p.hash,
            Some(HashOn::Header(HeaderName::from_static("x-user")))
        );
        assert_eq!(p.retries, 1);
        assert_eq!(p.per_try_timeout, Some(Duration::from_secs(2)));
        assert_eq!(p.limits.max_requests, None);
        assert_eq!(&*p.weights, &[("v1".into(), 90), ("v2".into(), 10)]);
    }

    #[test]
    fn bad_values_name_the_route_and_key() {
        for (text, key) in [
            ("lb = \"consistent-hash\"", "routes.x.lb"),
            ("hash_header = \"x-user\"", "routes.x.hash_header"),
            (
                "lb = \"consistent-hash\"\nhash_header = \"bad header\"",
                "routes.x.hash_header",
            ),
            (
                "lb = \"consistent-hash\"\nhash_cookie = \"a;b\"",
                "routes.x.hash_cookie",
            ),
            ("retries = 11", "routes.x.retries"),
            ("timeout = \"0s\"", "routes.x.timeout"),
            ("per_try_timeout = \"0s\"", "routes.x.per_try_timeout"),
            ("weights = { v1 = 0 }", "routes.x.weights"),
            (
                "retry_budget_percent = -1.0",
                "routes.x.retry_budget_percent",
            ),
            ("retry_budget_ttl = \"0s\"", "routes.x.retry_budget_ttl"),
            (
                "outlier_max_ejected_percent = 101",
                "routes.x.outlier_max_ejected_percent",
            ),
            (
                "outlier_base_ejection = \"10s\"\noutlier_max_ejection = \"1s\"",
                "routes.x.outlier_max_ejection",
            ),
        ] {
            let e = spec(text).resolve("routes.x").unwrap_err();
            assert!(e.starts_with(key), "{text}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<RouteSpec>("lbb = \"round-robin\"").unwrap_err();
        assert!(e.to_string().contains("lbb"), "{e}");
    }
}
