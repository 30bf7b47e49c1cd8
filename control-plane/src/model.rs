//! The desired state of a node: its routes (the services it may call, each
//! with its policy) and the immutable config versions they are stored as.
//!
//! Routes arrive as [`RouteSpec`]s, every key optional and as written (a
//! route file's `[routes.<service>]` tables, a REST body, a gRPC `Route`).
//! [`validate`] checks them all against the rules and Consul's catalog and
//! makes typed [`Route`]s of them, or returns every problem, each naming
//! its field. Nothing is stored unless every route is valid.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::Path,
    str::FromStr,
    time::Duration,
};

use mesh_runtime::duration::HumanDuration;
use serde::{Deserialize, Serialize};

/// The most retries a route may ask for (mesh-proxy's own limit: each
/// retry may cost a connect timeout).
pub const MAX_RETRIES: u32 = 10;

/// The longest timeout a route may set.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The proxy's timeout when a route sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// The most keys a traffic split may have (mesh-proxy's limit).
pub const MAX_WEIGHT_KEYS: usize = 16;

/// What the weights of a traffic split add up to.
pub const WEIGHT_TOTAL: u32 = 100;

/// The most routes one node may have.
pub const MAX_ROUTES: usize = 500;

/// The mesh's service-name rule: a route's name is a service name.
pub use mesh_runtime::pki::spiffe::{MAX_SERVICE_LEN, RESERVED_SERVICES, check_service_name};

/// A route as written: every key optional; numbers are signed so that a
/// negative value is refused by name rather than as a type error.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Deadline of a request up to its response headers, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Deadline of one attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Retries on another instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
    /// Load balancing algorithm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<String>,
    /// Traffic split by version (Meta `version`) or tag, in percent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<String, i64>,
    /// Consistent hash on this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    /// Consistent hash on this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_cookie: Option<String>,
}

/// A route file: `[routes.<service>]` tables of [`RouteSpec`] keys, in
/// TOML (or JSON, `{"routes": {...}}`, for a `.json` file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// Routes by service name.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteSpec>,
}

/// A load-balancing algorithm, as mesh-proxy names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lb {
    /// The cheaper of two random instances by peak-EWMA latency.
    P2cEwma,
    /// Each instance in turn.
    RoundRobin,
    /// The less busy of two random instances.
    LeastRequest,
    /// By a hash of a header or cookie.
    ConsistentHash,
}

/// A validated route: how a node calls one service. Unset keys take the
/// proxy's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Deadline of a request up to its response headers, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// Deadline of one attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<HumanDuration>,
    /// Retries on another instance, at most [`MAX_RETRIES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Load balancing algorithm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<Lb>,
    /// Traffic split by version or tag; adds up to [`WEIGHT_TOTAL`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<String, u32>,
    /// Consistent hash on this request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    /// Consistent hash on this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_cookie: Option<String>,
}

/// A node's routes, by service name.
pub type Routes = BTreeMap<String, Route>;

/// An immutable config version of a node, as stored in Consul KV.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The node.
    pub node: String,
    /// Its number: one sequence across the mesh, so a version staged on
    /// many nodes has one number on all of them.
    pub number: u64,
    /// The node's version this one was based on; `Some(0)`: none. `None`
    /// in records from before versions named it (then it is `number - 1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<u64>,
    /// Who made the change.
    pub author: String,
    /// When, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// The routes.
    pub routes: Routes,
    /// The node's mesh-proxy config rendered from the routes.
    pub rendered: String,
    /// Unified diff of `rendered` against the previous version's.
    pub diff: String,
}

// === impl Version ===

impl Version {
    /// The number of the version this one was based on; 0: none.
    pub fn previous_number(&self) -> u64 {
        self.previous.unwrap_or(self.number.saturating_sub(1))
    }
}

/// What validation checks routes against: Consul's catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    /// Node names.
    pub nodes: BTreeSet<String>,
    /// Service names.
    pub services: BTreeSet<String>,
}

/// One problem with the input, naming its field (`routes.orders.timeout`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// The field, as a dotted path.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Every problem found in one input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid(pub Vec<FieldError>);

// === impl RouteFile ===

impl RouteFile {
    /// Parses a route file; the error is one line naming the file, the
    /// place and what is wrong.
    pub fn parse(path: &Path, text: &str) -> Result<Self, String> {
        let name = path.display();
        if path.extension().is_some_and(|e| e == "json") {
            return serde_json::from_str(text).map_err(|e| {
                format!(
                    "route file {name}: line {} column {}: {}",
                    e.line(),
                    e.column(),
                    strip_position(&e.to_string())
                )
            });
        }
        toml::from_str(text).map_err(|e| {
            let place = e.span().map(|span| line_of(text, span.start));
            let message = e.message().trim().to_owned();
            match place {
                Some((line, snippet)) => {
                    format!("route file {name}: line {line} ({snippet}): {message}")
                }
                None => format!("route file {name}: {message}"),
            }
        })
    }
}

/// serde_json appends " at line L column C", which the caller already says.
fn strip_position(message: &str) -> &str {
    message
        .rfind(" at line ")
        .map_or(message, |cut| &message[..cut])
}

/// The 1-based line holding byte `offset`, and that line's text.
fn line_of(text: &str, offset: usize) -> (usize, String) {
    let offset = offset.min(text.len());
    let line = text[..offset].matches('\n').count() + 1;
    let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
    (line, snippet.to_owned())
}

// === impl Lb ===

impl FromStr for Lb {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "p2c-ewma" => Ok(Self::P2cEwma),
            "round-robin" => Ok(Self::RoundRobin),
            "least-request" => Ok(Self::LeastRequest),
            "consistent-hash" => Ok(Self::ConsistentHash),
            other => Err(format!(
                "unknown load-balancing algorithm {other:?}: expected p2c-ewma, round-robin, \
                 least-request or consistent-hash"
            )),
        }
    }
}

impl fmt::Display for Lb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::P2cEwma => "p2c-ewma",
            Self::RoundRobin => "round-robin",
            Self::LeastRequest => "least-request",
            Self::ConsistentHash => "consistent-hash",
        })
    }
}

// === impl Route ===

impl Route {
    /// The route as written, for showing and editing.
    pub fn to_spec(&self) -> RouteSpec {
        RouteSpec {
            timeout: self.timeout.map(|d| d.to_string()),
            per_try_timeout: self.per_try_timeout.map(|d| d.to_string()),
            retries: self.retries.map(i64::from),
            lb: self.lb.map(|lb| lb.to_string()),
            weights: self
                .weights
                .iter()
                .map(|(k, w)| (k.clone(), i64::from(*w)))
                .collect(),
            hash_header: self.hash_header.clone(),
            hash_cookie: self.hash_cookie.clone(),
        }
    }

    /// The deadline of a whole request: the route's, else the proxy's default.
    pub fn effective_timeout(&self) -> Duration {
        self.timeout.map_or(DEFAULT_TIMEOUT, HumanDuration::get)
    }
}

// === impl Invalid ===

impl Invalid {
    /// One problem.
    pub fn one(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }])
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

// === validation ===

/// Checks every route against the rules and `catalog`; the typed routes,
/// or every problem found, each naming its field.
pub fn validate(specs: &BTreeMap<String, RouteSpec>, catalog: &Catalog) -> Result<Routes, Invalid> {
    let mut errors = Errors::default();
    if specs.len() > MAX_ROUTES {
        errors.push(
            "routes",
            format!(
                "{} routes; a node may have at most {MAX_ROUTES}",
                specs.len()
            ),
        );
    }
    let mut seen = BTreeMap::new();
    let mut routes = Routes::new();
    for (service, spec) in specs {
        let at = format!("routes.{service}");
        if let Err(message) = check_service_name(service) {
            errors.push(&at, message);
            continue;
        }
        if let Some(first) = seen.insert(service.to_ascii_lowercase(), service.clone()) {
            errors.push(
                &at,
                format!("the same service as routes.{first} (service names ignore case)"),
            );
            continue;
        }
        if !catalog.services.contains(service) {
            errors.push(
                &at,
                format!("service {service:?} is not in Consul's catalog"),
            );
        }
        if let Some(route) = validate_route(&at, spec, &mut errors) {
            routes.insert(service.clone(), route);
        }
    }
    errors.finish(routes)
}

/// Checks a node name before it becomes part of a KV key.
pub fn check_node_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("a node name must not be empty".into());
    }
    if name.contains(['/', '\\']) || name == "." || name == ".." {
        return Err(format!("{name:?} is not a node name"));
    }
    Ok(())
}

fn validate_route(at: &str, spec: &RouteSpec, errors: &mut Errors) -> Option<Route> {
    let before = errors.len();
    let field = |key: &str| format!("{at}.{key}");
    let timeout = duration(&field("timeout"), spec.timeout.as_deref(), errors);
    let per_try_timeout = duration(
        &field("per_try_timeout"),
        spec.per_try_timeout.as_deref(),
        errors,
    );
    if let Some(per_try) = per_try_timeout {
        let whole = timeout.map_or(DEFAULT_TIMEOUT, HumanDuration::get);
        if per_try.get() > whole {
            errors.push(
                field("per_try_timeout"),
                format!(
                    "{per_try} is longer than the whole request's timeout ({})",
                    HumanDuration(whole)
                ),
            );
        }
    }
    let retries = match spec.retries {
        None => None,
        Some(n) if n < 0 => {
            errors.push(field("retries"), format!("{n} is negative"));
            None
        }
        Some(n) if n > i64::from(MAX_RETRIES) => {
            errors.push(
                field("retries"),
                format!("{n} is more than the most allowed, {MAX_RETRIES}"),
            );
            None
        }
        Some(n) => u32::try_from(n).ok(),
    };
    let lb = match spec.lb.as_deref() {
        None => None,
        Some(text) => match text.parse::<Lb>() {
            Ok(lb) => Some(lb),
            Err(message) => {
                errors.push(field("lb"), message);
                None
            }
        },
    };
    let weights = weights(&field("weights"), &spec.weights, errors);
    let (hash_header, hash_cookie) = hash(at, lb, spec, errors);
    (errors.len() == before).then_some(Route {
        timeout,
        per_try_timeout,
        retries,
        lb,
        weights,
        hash_header,
        hash_cookie,
    })
}

fn duration(field: &str, text: Option<&str>, errors: &mut Errors) -> Option<HumanDuration> {
    let text = text?.trim();
    if text.starts_with('-') {
        errors.push(
            field,
            format!("{text:?} is negative: it must be more than 0"),
        );
        return None;
    }
    let d = match text.parse::<HumanDuration>() {
        Ok(d) => d.get(),
        Err(e) => {
            errors.push(field, e.to_string());
            return None;
        }
    };
    if d.is_zero() {
        errors.push(field, format!("{text:?} is zero: it must be more than 0"));
    } else if d < Duration::from_millis(1) {
        errors.push(field, format!("{text:?} is under the smallest, 1ms"));
    } else if d > MAX_TIMEOUT {
        errors.push(
            field,
            format!(
                "{text:?} is longer than the most allowed, {}",
                HumanDuration(MAX_TIMEOUT)
            ),
        );
    } else {
        // Whole milliseconds, as the value is shown back.
        return Some(HumanDuration(Duration::from_millis(d.as_millis() as u64)));
    }
    None
}

fn weights(
    field: &str,
    given: &BTreeMap<String, i64>,
    errors: &mut Errors,
) -> BTreeMap<String, u32> {
    let mut weights = BTreeMap::new();
    if given.is_empty() {
        return weights;
    }
    if given.len() > MAX_WEIGHT_KEYS {
        errors.push(
            field,
            format!("{} keys; at most {MAX_WEIGHT_KEYS}", given.len()),
        );
        return weights;
    }
    let mut total: i64 = 0;
    let mut ok = true;
    for (key, w) in given {
        let k = key.trim();
        if k.is_empty() || k.contains(char::is_whitespace) {
            errors.push(field, format!("{key:?} is not a version or tag"));
            ok = false;
        } else if *w < 0 {
            errors.push(format!("{field}.{k}"), format!("{w} is negative"));
            ok = false;
        } else if let Ok(w32) = u32::try_from(*w) {
            total = total.saturating_add(*w);
            weights.insert(k.to_owned(), w32);
        } else {
            errors.push(format!("{field}.{k}"), format!("{w} is too large"));
            ok = false;
        }
    }
    if ok && total != i64::from(WEIGHT_TOTAL) {
        errors.push(
            field,
            format!("the weights add up to {total}, not {WEIGHT_TOTAL}"),
        );
    }
    weights
}

fn hash(
    at: &str,
    lb: Option<Lb>,
    spec: &RouteSpec,
    errors: &mut Errors,
) -> (Option<String>, Option<String>) {
    let header = spec.hash_header.as_deref().map(str::trim);
    let cookie = spec.hash_cookie.as_deref().map(str::trim);
    let hashing = lb == Some(Lb::ConsistentHash);
    match (header, cookie) {
        (Some(_), Some(_)) => {
            errors.push(
                format!("{at}.hash_cookie"),
                "set hash_header or hash_cookie, not both",
            );
        }
        (None, None) if hashing => {
            errors.push(
                format!("{at}.lb"),
                "consistent-hash needs hash_header or hash_cookie",
            );
        }
        (Some(_), None) if !hashing => {
            errors.push(
                format!("{at}.hash_header"),
                "only with lb = \"consistent-hash\"",
            );
        }
        (None, Some(_)) if !hashing => {
            errors.push(
                format!("{at}.hash_cookie"),
                "only with lb = \"consistent-hash\"",
            );
        }
        (Some(h), None) if !is_token(h) => {
            errors.push(
                format!("{at}.hash_header"),
                format!("{h:?} is not a header name"),
            );
        }
        (None, Some(c)) if !is_token(c) => {
            errors.push(
                format!("{at}.hash_cookie"),
                format!("{c:?} is not a cookie name"),
            );
        }
        _ => {}
    }
    (
        header.map(|h| h.to_ascii_lowercase()),
        cookie.map(str::to_owned),
    )
}

/// An HTTP token (RFC 9110): what header and cookie names are made of.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Problems collected while validating.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn finish<T>(self, value: T) -> Result<T, Invalid> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(Invalid(self.0))
        }
    }
}

// === time ===

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `ms` since the Unix epoch as RFC 3339 in UTC (`2024-05-01T12:00:00.250Z`).
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Year, month, day of a day count since 1970-01-01 (the proleptic
/// Gregorian calendar; H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests;
