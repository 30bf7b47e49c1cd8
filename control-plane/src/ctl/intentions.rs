//! `meshctl intentions list|allow|deny|delete|default|check`: which
//! service may call which, through mesh-control's REST API (its gRPC API
//! has no call for them).

use std::time::Duration;

use mesh_runtime::intentions::{Action, HttpRule, Method, Selector, check_method, check_path};
use serde::{Serialize, de::DeserializeOwned};

use super::{CtlError, Output, table};
use crate::control::{
    CheckResult, DefaultAction, DefaultFrom, IntentionView, IntentionsView, PutIntention,
    PutIntentionResult, SetDefault, error_chain,
};

/// Default mesh-control HTTP address (its REST API).
pub const DEFAULT_CONTROL_HTTP: &str = "http://127.0.0.1:8893";

/// How long connecting to mesh-control may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of mesh-control's REST API and how to print.
#[derive(Debug)]
pub struct IntentionsCtl {
    http: reqwest::Client,
    base: String,
    output: Output,
}

/// `meshctl intentions allow|deny` input.
#[derive(Clone, Debug)]
pub struct PutArgs {
    /// The calling service, or `*`.
    pub source: String,
    /// The called service, or `*`.
    pub destination: String,
    /// Allow or deny.
    pub action: Action,
    /// Narrow an allow to paths that start with this.
    pub path_prefix: Option<String>,
    /// Narrow an allow to this path.
    pub path_exact: Option<String>,
    /// Narrow an allow to these methods.
    pub methods: Vec<String>,
    /// Why it exists.
    pub description: String,
    /// Change only if the intention is at this revision (0: only if new).
    pub expect_revision: Option<u64>,
}

/// A checked `source destination` pair and the input of the rule the
/// flags make, if they make one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedPut {
    source: Selector,
    destination: Selector,
    body: PutIntention,
}

// === impl PutArgs ===

impl PutArgs {
    /// Checks the input as mesh-control will, naming the argument or flag,
    /// so that bad input needs no mesh-control (exit 65).
    pub fn check(self) -> Result<CheckedPut, CtlError> {
        let (source, destination) = selectors(&self.source, &self.destination)?;
        let narrowed =
            self.path_prefix.is_some() || self.path_exact.is_some() || !self.methods.is_empty();
        if narrowed && self.action == Action::Deny {
            return Err(CtlError::new(
                "a deny takes no --path-prefix, --path-exact or --methods: it denies every \
                 call; narrow an allow instead",
                65,
            ));
        }
        for (flag, path) in [
            ("--path-prefix", &self.path_prefix),
            ("--path-exact", &self.path_exact),
        ] {
            if let Some(path) = path {
                check_path(path).map_err(|m| CtlError::new(format!("{flag}: {m}"), 65))?;
            }
        }
        for method in &self.methods {
            check_method(method).map_err(|m| CtlError::new(format!("--methods: {m}"), 65))?;
        }
        let http = if narrowed {
            vec![HttpRule {
                path_exact: self.path_exact,
                path_prefix: self.path_prefix,
                methods: self.methods.into_iter().map(Method).collect(),
                action: Action::Allow,
            }]
        } else {
            Vec::new()
        };
        Ok(CheckedPut {
            source,
            destination,
            body: PutIntention {
                action: self.action.to_string(),
                http,
                description: self.description,
                expected_revision: self.expect_revision,
            },
        })
    }
}

// === impl IntentionsCtl ===

impl IntentionsCtl {
    /// A client of mesh-control's REST API at `addr` (`host:port` or an
    /// `http://` URL). Nothing is asked yet.
    pub fn new(addr: &str, output: Output) -> Result<Self, CtlError> {
        let addr = addr.trim().trim_end_matches('/');
        let base = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        if reqwest::Url::parse(&base).is_err() || !base.starts_with("http") {
            return Err(CtlError::new(
                format!("http_addr: {addr:?} is not host:port or an http:// URL"),
                64,
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| CtlError::new(format!("an HTTP client: {e}"), 1))?;
        Ok(Self { http, base, output })
    }

    /// Sends `token` as `Authorization: Bearer <token>` with every call
    /// (mesh-control's `api_token`); none or blank: no header.
    pub fn with_api_token(mut self, token: Option<&str>) -> Result<Self, CtlError> {
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(self);
        };
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| CtlError::new("api_token: only printable ASCII may be used", 64))?;
        value.set_sensitive(true);
        let headers =
            reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, value)]);
        self.http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .default_headers(headers)
            .build()
            .map_err(|e| CtlError::new(format!("an HTTP client: {e}"), 1))?;
        Ok(self)
    }

    /// `meshctl intentions list`.
    pub async fn list(&self) -> Result<String, CtlError> {
        let view: IntentionsView = self.send(self.http.get(self.url("/v1/intentions"))).await?;
        Ok(self.print(&view, intentions_text))
    }

    /// `meshctl intentions allow|deny SOURCE DESTINATION`.
    pub async fn put(&self, put: CheckedPut) -> Result<String, CtlError> {
        let url = self.intention_url(&put.source, &put.destination);
        let stored: PutIntentionResult = self.send(self.http.put(url).json(&put.body)).await?;
        Ok(self.print(&stored, |r| {
            let i = &r.stored.intention;
            format!(
                "{} {} -> {}: {} (revision {})\n",
                i.action,
                i.source,
                i.destination,
                if r.created { "created" } else { "replaced" },
                r.stored.revision
            )
        }))
    }

    /// `meshctl intentions delete SOURCE DESTINATION`.
    pub async fn delete(
        &self,
        source: &str,
        destination: &str,
        expect_revision: Option<u64>,
    ) -> Result<String, CtlError> {
        let (source, destination) = selectors(source, destination)?;
        let mut request = self.http.delete(self.intention_url(&source, &destination));
        if let Some(revision) = expect_revision {
            request = request.query(&[("expected_revision", revision)]);
        }
        let deleted: IntentionView = self.send(request).await?;
        Ok(self.print(&deleted, |d| {
            format!(
                "deleted {} -> {} (it was {}, at revision {})\n",
                d.intention.source, d.intention.destination, d.intention.action, d.revision
            )
        }))
    }

    /// `meshctl intentions default allow|deny`.
    pub async fn set_default(
        &self,
        action: Action,
        expect_revision: Option<u64>,
    ) -> Result<String, CtlError> {
        let body = SetDefault {
            default: action.to_string(),
            expected_revision: expect_revision,
        };
        let url = self.url("/v1/intentions-default");
        let stored: DefaultAction = self.send(self.http.put(url).json(&body)).await?;
        Ok(self.print(&stored, |d| {
            format!(
                "default: {} for calls no intention matches (revision {})\n",
                d.action, d.revision
            )
        }))
    }

    /// `meshctl intentions check SOURCE DESTINATION [--method M] [--path P]`.
    pub async fn check(
        &self,
        source: &str,
        destination: &str,
        method: &str,
        path: &str,
    ) -> Result<String, CtlError> {
        let query = [
            ("source", source),
            ("destination", destination),
            ("method", method),
            ("path", path),
        ];
        let request = self
            .http
            .get(self.url("/v1/intentions/check"))
            .query(&query);
        let result: CheckResult = self.send(request).await?;
        Ok(self.print(&result, |r| format!("{}\n", r.explanation)))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The URL of one intention; the selectors are checked, so they are
    /// one path segment each.
    fn intention_url(&self, source: &Selector, destination: &Selector) -> String {
        self.url(&format!("/v1/intentions/{source}/{destination}"))
    }

    /// Sends `request`; an error answer is its message and the exit code
    /// its kind calls for, an unreachable mesh-control one line naming it.
    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, CtlError> {
        let answer = request.send().await.map_err(|e| {
            CtlError::new(
                format!(
                    "cannot reach mesh-control at {}: {} (is it running? set --http-addr or MESH_CONTROL_HTTP)",
                    self.base,
                    error_chain(&e)
                ),
                69,
            )
        })?;
        let status = answer.status();
        let bytes = answer.bytes().await.map_err(|e| {
            CtlError::new(
                format!("mesh-control at {}: {}", self.base, error_chain(&e)),
                69,
            )
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                CtlError::new(
                    format!(
                        "mesh-control at {} answered what meshctl cannot read: {e}",
                        self.base
                    ),
                    1,
                )
            });
        }
        Err(error_answer(status, &bytes))
    }

    fn print<T: Serialize>(&self, value: &T, text: impl FnOnce(&T) -> String) -> String {
        match self.output {
            Output::Json => {
                let mut json = serde_json::to_string_pretty(value).unwrap_or_default();
                json.push('\n');
                json
            }
            Output::Table => text(value),
        }
    }
}

/// mesh-control's error answer as one line and the exit code its kind
/// calls for.
pub fn error_answer(status: reqwest::StatusCode, body: &[u8]) -> CtlError {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let message = json["error"]
        .as_str()
        .map_or_else(|| format!("mesh-control answered {status}"), str::to_owned);
    let code = match json["kind"].as_str() {
        Some("invalid" | "not_found" | "refused" | "unrenderable") => 65,
        Some("conflict") => 75,
        Some("unavailable") => 69,
        _ => 1,
    };
    CtlError::new(message, code)
}

/// The two sides, checked; a bad one is named.
fn selectors(source: &str, destination: &str) -> Result<(Selector, Selector), CtlError> {
    let side = |what: &str, text: &str| {
        Selector::parse(text).map_err(|m| CtlError::new(format!("{what}: {m}"), 65))
    };
    Ok((side("source", source)?, side("destination", destination)?))
}

/// The default on a line, then the intentions as a table.
pub fn intentions_text(view: &IntentionsView) -> String {
    let d = &view.default;
    let mut text = match d.from {
        DefaultFrom::Kv => format!("default: {} (revision {})\n", d.action, d.revision),
        DefaultFrom::Config => format!(
            "default: {} (mesh-control's default_intention; not set in Consul KV)\n",
            d.action
        ),
    };
    if view.intentions.is_empty() {
        text.push_str("no intentions\n");
        return text;
    }
    let rows: Vec<Vec<String>> = view
        .intentions
        .iter()
        .map(|v| {
            let i = &v.intention;
            vec![
                i.source.to_string(),
                i.destination.to_string(),
                i.action.to_string(),
                i.http.iter().map(rule_text).collect::<Vec<_>>().join("; "),
                v.revision.to_string(),
                i.description.clone(),
            ]
        })
        .collect();
    text.push_str(&table(
        &[
            "SOURCE",
            "DESTINATION",
            "ACTION",
            "HTTP",
            "REVISION",
            "DESCRIPTION",
        ],
        &rows,
    ));
    text
}

/// A rule in words: `allow GET,HEAD prefix /v1/`, `deny exact /admin`.
fn rule_text(rule: &HttpRule) -> String {
    let path = match (&rule.path_exact, &rule.path_prefix) {
        (Some(p), _) => format!("exact {p}"),
        (None, Some(p)) => format!("prefix {p}"),
        (None, None) => "any path".to_owned(),
    };
    let methods = rule
        .methods
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(",");
    if methods.is_empty() {
        format!("{} {path}", rule.action)
    } else {
        format!("{} {methods} {path}", rule.action)
    }
}

#[cfg(test)]
mod tests {
    use mesh_runtime::intentions::Intention;

    use super::*;

    fn put(action: Action) -> PutArgs {
        PutArgs {
            source: "api".into(),
            destination: "*".into(),
            action,
            path_prefix: None,
            path_exact: None,
            methods: Vec::new(),
            description: String::new(),
            expect_revision: None,
        }
    }

    #[test]
    fn flags_make_one_rule_that_narrows_an_allow() {
        let checked = PutArgs {
            path_prefix: Some("/v1/".into()),
            methods: vec!["GET".into(), "HEAD".into()],
            ..put(Action::Allow)
        }
        .check()
        .expect("valid input");
        assert_eq!(checked.destination, Selector::Any);
        assert_eq!(checked.body.action, "allow");
        assert_eq!(
            checked.body.http,
            [HttpRule {
                path_exact: None,
                path_prefix: Some("/v1/".into()),
                methods: vec![Method("GET".into()), Method("HEAD".into())],
                action: Action::Allow,
            }]
        );
        let plain = put(Action::Deny).check().expect("valid input");
        assert!(plain.body.http.is_empty());
    }

    #[test]
    fn bad_input_is_one_line_naming_the_argument_and_exit_65() {
        for (args, words) in [
            (
                PutArgs {
                    source: "api*".into(),
                    ..put(Action::Allow)
                },
                "source: ",
            ),
            (
                PutArgs {
                    path_prefix: Some("v1".into()),
                    ..put(Action::Allow)
                },
                "--path-prefix: \"v1\" does not start with '/'",
            ),
            (
                PutArgs {
                    methods: vec!["get".into()],
                    ..put(Action::Allow)
                },
                "--methods: \"get\" is not uppercase",
            ),
            (
                PutArgs {
                    path_exact: Some("/admin".into()),
                    ..put(Action::Deny)
                },
                "a deny takes no --path-prefix",
            ),
        ] {
            let e = args.check().unwrap_err();
            assert_eq!(e.exit_code, 65, "{}", e.message);
            assert!(e.message.starts_with(words), "{}", e.message);
        }
    }

    #[test]
    fn the_list_shows_the_default_and_each_rule_in_words() {
        let view = IntentionsView {
            default: DefaultAction::default(),
            index: 9,
            intentions: vec![
                IntentionView {
                    intention: Intention {
                        source: Selector::Any,
                        destination: Selector::parse("web").expect("a name"),
                        action: Action::Deny,
                        http: Vec::new(),
                        description: String::new(),
                    },
                    revision: 5,
                },
                IntentionView {
                    intention: Intention {
                        source: Selector::parse("api").expect("a name"),
                        destination: Selector::parse("web").expect("a name"),
                        action: Action::Allow,
                        http: vec![
                            HttpRule {
                                path_exact: None,
                                path_prefix: Some("/v1/".into()),
                                methods: vec![Method("GET".into())],
                                action: Action::Allow,
                            },
                            HttpRule {
                                path_exact: Some("/v1/admin".into()),
                                path_prefix: None,
                                methods: Vec::new(),
                                action: Action::Deny,
                            },
                        ],
                        description: "reads".into(),
                    },
                    revision: 7,
                },
            ],
        };
        assert_eq!(
            intentions_text(&view),
            "default: deny (mesh-control's default_intention; not set in Consul KV)\n\
             SOURCE  DESTINATION  ACTION  HTTP                                         REVISION  DESCRIPTION\n\
             *       web          deny    -                                            5         -\n\
             api     web          allow   allow GET prefix /v1/; deny exact /v1/admin  7         reads\n"
        );
        let none = IntentionsView::default();
        assert!(intentions_text(&none).ends_with("no intentions\n"));
    }

    #[test]
    fn error_answers_keep_their_message_and_map_to_exit_codes() {
        for (kind, code) in [
            ("invalid", 65),
            ("not_found", 65),
            ("conflict", 75),
            ("unavailable", 69),
            ("internal", 1),
        ] {
            let body = serde_json::json!({"error": "why", "kind": kind}).to_string();
            let e = error_answer(reqwest::StatusCode::BAD_REQUEST, body.as_bytes());
            assert_eq!((e.exit_code, e.message.as_str()), (code, "why"), "{kind}");
        }
        let e = error_answer(reqwest::StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(e.message, "mesh-control answered 502 Bad Gateway");
    }

    #[tokio::test]
    async fn an_unreachable_control_plane_is_one_line_naming_the_address() {
        mesh_runtime::install_crypto_provider();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("its address")
            .port();
        let ctl = IntentionsCtl::new(&format!("127.0.0.1:{port}"), Output::Table)
            .expect("a valid address");
        let e = ctl.list().await.unwrap_err();
        assert_eq!(e.exit_code, 69);
        assert!(
            e.message.starts_with(&format!(
                "cannot reach mesh-control at http://127.0.0.1:{port}"
            )),
            "{}",
            e.message
        );
        assert!(!e.message.contains('\n'), "{}", e.message);
        let e = IntentionsCtl::new("ftp://x", Output::Table).unwrap_err();
        assert_eq!(e.exit_code, 64);
    }
}
