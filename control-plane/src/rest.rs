//! The JSON REST mirror of `mesh.v1.Control`, on the HTTP listener:
//!
//! | method and path | call |
//! |---|---|
//! | `GET /v1/status` | GetStatus |
//! | `GET /v1/nodes` | ListNodes |
//! | `GET /v1/services` | ListServices |
//! | `GET /v1/nodes/{node}/routes` | GetRoutes |
//! | `PUT /v1/nodes/{node}/routes` | SetRoutes (body: `routes`, `expected_revision`, `author`) |
//! | `GET /v1/nodes/{node}/versions` | ListVersions |
//! | `GET /v1/nodes/{node}/versions/{number}` | GetVersion |
//! | `GET /v1/nodes/{node}/render?format=proxy\|nginx[&version=N][&upstreams=upsync\|static]` | Render |
//! | `PUT /v1/nodes/{node}/register` | Register (body: the instance) |
//! | `PUT /v1/nodes/{node}/deregister/{id}` | Deregister |
//! | `POST /v1/versions` | StageVersion (body: `nodes`, `routes`, `author`) |
//! | `GET /v1/rollouts` | ListRollouts |
//! | `POST /v1/rollouts` | StartRollout (body: `version`, `author`, `canary`, `batch`, `soak_ms`, `ack_timeout_ms`) |
//! | `GET /v1/rollouts/{version}` | GetRollout (0: the one under way, or else the newest) |
//! | `PUT /v1/rollouts/{version}/{pause\|resume\|abort}` | ChangeRollout (body: `author`) |
//! | `GET /v1/deployments[?service=S]` | ListDeployments |
//! | `GET /v1/deployments/{id}[?service=S]` | GetDeployment (0: the newest, of `service` when given) |
//! | `PUT /v1/deployments/{id}/abort` | AbortDeployment (body, optional: `author`) |
//! | `GET /v1/deployers[?service=S]` | ListNodeDeployments |
//! | `GET /v1/alerts` | mesh-monitor's open alerts: `configured`, `error`, `alerts` (REST only) |
//! | `GET /v1/intentions` | every intention with its `revision`, the `default` (`action`, `from`, `revision`), the KV `index` (REST only, as every intentions call) |
//! | `GET /v1/intentions/{source}/{destination}` | one intention |
//! | `PUT /v1/intentions/{source}/{destination}` | create or replace it (body: `action`, `http`, `description`, optional `expected_revision`) |
//! | `DELETE /v1/intentions/{source}/{destination}[?expected_revision=N]` | delete it |
//! | `PUT /v1/intentions-default` | the default (body: `default`, optional `expected_revision`) |
//! | `GET /v1/intentions/check?source=&destination=&method=&path=` | what the intentions decide for that call |
//!
//! Deploying (uploading an artifact) is gRPC only. `/v1/alerts` relays
//! mesh-monitor's `ListAlerts`; it answers 200 whether or not a monitor is
//! configured or answers, and says which in `configured` and `error`.
//!
//! Errors are JSON `{"error", "kind", …}` with the status of
//! [`ControlError::http_status`]: 400 naming the field, 404, 409 naming the
//! key and revision, 422, 503.
//!
//! [`ApiAuth`] guards every `/v1/...` path (the dashboard's event stream
//! included) when `api_token` is set: a call carries
//! `Authorization: Bearer <token>`, or the dashboard's cookie, which
//! `POST /ui/login` (the token as the body) sets (`HttpOnly`,
//! `SameSite=Strict`, a digest of the token rather than the token);
//! `GET /ui/session` says whether the caller is signed in. Anything else
//! gets 401 naming the header. The dashboard's page itself and `/live`,
//! `/ready`, `/metrics` stay open. Without a token, configuration keeps the
//! listener on a loopback address.

use std::{fmt, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        Path, Query, Request, State,
        rejection::{PathRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

use crate::{
    config::Secret,
    control::{
        CheckQuery, Control, PutIntention, Registration, RenderQuery, RolloutAction, SetDefault,
        SetRoutes, StageVersion, StartRollout,
    },
    error::ControlError,
};

/// The dashboard's cookie: a digest of the API token.
pub const SESSION_COOKIE: &str = "mesh_api_session";

/// The access check of the REST API and the dashboard's data. Cheap to
/// clone; its `Debug` shows no token.
#[derive(Clone, Default)]
pub struct ApiAuth {
    expected: Option<Arc<Expected>>,
}

/// Digests of what a caller must present: comparing digests takes the same
/// time whatever the value given.
struct Expected {
    /// SHA-256 of the whole `Authorization` value, `Bearer <token>`.
    bearer: [u8; 32],
    /// The cookie's value (hex of a digest of the token), and its SHA-256.
    session: String,
    session_digest: [u8; 32],
}

/// The REST routes over `control`.
pub fn router(control: Control) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes))
        .route("/v1/services", get(services))
        .route("/v1/nodes/{node}/routes", get(get_routes).put(set_routes))
        .route("/v1/nodes/{node}/versions", get(versions))
        .route("/v1/nodes/{node}/versions/{number}", get(version))
        .route("/v1/nodes/{node}/render", get(render))
        .route("/v1/nodes/{node}/register", put(register))
        .route("/v1/nodes/{node}/deregister/{id}", put(deregister))
        .route("/v1/versions", post(stage_version))
        .route("/v1/rollouts", get(rollouts).post(start_rollout))
        .route("/v1/rollouts/{version}", get(rollout))
        .route("/v1/rollouts/{version}/{action}", put(change_rollout))
        .route("/v1/deployments", get(deployments))
        .route("/v1/deployments/{id}", get(deployment))
        .route("/v1/deployments/{id}/abort", put(abort_deployment))
        .route("/v1/deployers", get(node_deployments))
        .route("/v1/alerts", get(alerts))
        .route("/v1/intentions", get(intentions))
        .route("/v1/intentions/check", get(check_intention))
        .route(
            "/v1/intentions/{source}/{destination}",
            get(intention).put(put_intention).delete(delete_intention),
        )
        .route("/v1/intentions-default", put(set_intentions_default))
        .with_state(control)
}

/// A counted result as a JSON answer.
fn answer<T: Serialize>(
    control: &Control,
    method: &'static str,
    result: Result<T, ControlError>,
) -> Response {
    match control.counted(method, result) {
        Ok(value) => Json(value).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A JSON body, whatever its content type says (`curl -d` sends a form
/// type); a bad one names the place and the problem.
fn body<T: DeserializeOwned>(field: &str, bytes: &Bytes) -> Result<T, ControlError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ControlError::invalid(field, format!("invalid JSON: {e}")))
}

async fn status(State(control): State<Control>) -> Response {
    let status = control.status();
    answer(&control, "GetStatus", Ok(status))
}

async fn nodes(State(control): State<Control>) -> Response {
    let result = control.nodes().await;
    answer(&control, "ListNodes", result)
}

async fn services(State(control): State<Control>) -> Response {
    let result = control.services().await;
    answer(&control, "ListServices", result)
}

async fn get_routes(State(control): State<Control>, Path(node): Path<String>) -> Response {
    let result = control.routes(&node).await;
    answer(&control, "GetRoutes", result)
}

async fn set_routes(
    State(control): State<Control>,
    Path(node): Path<String>,
    change: Bytes,
) -> Response {
    let result = match body::<SetRoutes>("body", &change) {
        Ok(change) => control.set_routes(&node, change).await,
        Err(e) => Err(e),
    };
    answer(&control, "SetRoutes", result)
}

async fn versions(State(control): State<Control>, Path(node): Path<String>) -> Response {
    let result = control.versions(&node).await;
    answer(&control, "ListVersions", result)
}

async fn version(
    State(control): State<Control>,
    path: Result<Path<(String, u64)>, PathRejection>,
) -> Response {
    let result = match path {
        Ok(Path((node, number))) => control.version(&node, number).await,
        Err(e) => Err(ControlError::invalid("number", e.body_text())),
    };
    answer(&control, "GetVersion", result)
}

async fn render(
    State(control): State<Control>,
    Path(node): Path<String>,
    query: Result<Query<RenderQuery>, QueryRejection>,
) -> Response {
    let result = match query {
        Ok(Query(query)) => control.render(&node, query).await,
        Err(e) => Err(ControlError::invalid("query", e.body_text())),
    };
    answer(&control, "Render", result)
}

async fn register(
    State(control): State<Control>,
    Path(node): Path<String>,
    registration: Bytes,
) -> Response {
    let result = match body::<Registration>("service", &registration) {
        Ok(registration) => control.register(&node, registration).await,
        Err(e) => Err(e),
    };
    answer(&control, "Register", result)
}

async fn deregister(
    State(control): State<Control>,
    Path((node, id)): Path<(String, String)>,
) -> Response {
    let result = control.deregister(&node, &id).await;
    answer(&control, "Deregister", result)
}

async fn stage_version(State(control): State<Control>, stage: Bytes) -> Response {
    let result = match body::<StageVersion>("body", &stage) {
        Ok(stage) => control.stage_version(stage).await,
        Err(e) => Err(e),
    };
    answer(&control, "StageVersion", result)
}

async fn rollouts(State(control): State<Control>) -> Response {
    let result = control.rollouts().await;
    answer(&control, "ListRollouts", result)
}

async fn start_rollout(State(control): State<Control>, start: Bytes) -> Response {
    let result = match body::<StartRollout>("body", &start) {
        Ok(start) => control.start_rollout(start).await,
        Err(e) => Err(e),
    };
    answer(&control, "StartRollout", result)
}

async fn rollout(
    State(control): State<Control>,
    path: Result<Path<u64>, PathRejection>,
) -> Response {
    let result = match path {
        Ok(Path(version)) => control.rollout(version).await,
        Err(e) => Err(ControlError::invalid("version", e.body_text())),
    };
    answer(&control, "GetRollout", result)
}

/// Who asks for a pause, resume or abort.
#[derive(Debug, serde::Deserialize)]
struct Author {
    author: String,
}

async fn change_rollout(
    State(control): State<Control>,
    path: Result<Path<(u64, String)>, PathRejection>,
    who: Bytes,
) -> Response {
    let result = async {
        let Path((version, action)) =
            path.map_err(|e| ControlError::invalid("version", e.body_text()))?;
        let action = match action.as_str() {
            "pause" => RolloutAction::Pause,
            "resume" => RolloutAction::Resume,
            "abort" => RolloutAction::Abort,
            other => {
                return Err(ControlError::invalid(
                    "action",
                    format!("{other:?} is not pause, resume or abort"),
                ));
            }
        };
        let who = body::<Author>("body", &who)?;
        control.rollout_action(version, action, &who.author).await
    }
    .await;
    answer(&control, "ChangeRollout", result)
}

/// An optional `?service=` filter.
#[derive(Debug, Default, serde::Deserialize)]
struct ServiceFilter {
    #[serde(default)]
    service: String,
}

async fn deployments(
    State(control): State<Control>,
    query: Result<Query<ServiceFilter>, QueryRejection>,
) -> Response {
    let result = match query {
        Ok(Query(q)) => control.deployments(&q.service).await,
        Err(e) => Err(ControlError::invalid("query", e.body_text())),
    };
    answer(&control, "ListDeployments", result)
}

async fn deployment(
    State(control): State<Control>,
    path: Result<Path<u64>, PathRejection>,
    query: Result<Query<ServiceFilter>, QueryRejection>,
) -> Response {
    let result = async {
        let Path(id) = path.map_err(|e| ControlError::invalid("id", e.body_text()))?;
        let Query(q) = query.map_err(|e| ControlError::invalid("query", e.body_text()))?;
        control.deployment(id, &q.service).await
    }
    .await;
    answer(&control, "GetDeployment", result)
}

/// Who asks for an abort; the body may be empty.
#[derive(Debug, Default, serde::Deserialize)]
struct OptionalAuthor {
    #[serde(default)]
    author: String,
}

async fn abort_deployment(
    State(control): State<Control>,
    path: Result<Path<u64>, PathRejection>,
    who: Bytes,
) -> Response {
    let result = async {
        let Path(id) = path.map_err(|e| ControlError::invalid("id", e.body_text()))?;
        let who = if who.iter().all(u8::is_ascii_whitespace) {
            OptionalAuthor::default()
        } else {
            body::<OptionalAuthor>("body", &who)?
        };
        control.abort_deployment(id, &who.author).await
    }
    .await;
    answer(&control, "AbortDeployment", result)
}

async fn node_deployments(
    State(control): State<Control>,
    query: Result<Query<ServiceFilter>, QueryRejection>,
) -> Response {
    let result = match query {
        Ok(Query(q)) => control.node_deployments(&q.service).await,
        Err(e) => Err(ControlError::invalid("query", e.body_text())),
    };
    answer(&control, "ListNodeDeployments", result)
}

async fn alerts(State(control): State<Control>) -> Response {
    let alerts = control.alerts().await;
    answer(&control, "ListAlerts", Ok(alerts))
}

async fn intentions(State(control): State<Control>) -> Response {
    let result = control.intentions().await;
    answer(&control, "ListIntentions", result)
}

async fn intention(
    State(control): State<Control>,
    Path((source, destination)): Path<(String, String)>,
) -> Response {
    let result = control.intention(&source, &destination).await;
    answer(&control, "GetIntention", result)
}

async fn put_intention(
    State(control): State<Control>,
    Path((source, destination)): Path<(String, String)>,
    put: Bytes,
) -> Response {
    let result = match body::<PutIntention>("body", &put) {
        Ok(put) => control.put_intention(&source, &destination, put).await,
        Err(e) => Err(e),
    };
    answer(&control, "PutIntention", result)
}

/// An optional `?expected_revision=` of a delete.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedRevision {
    expected_revision: Option<u64>,
}

async fn delete_intention(
    State(control): State<Control>,
    Path((source, destination)): Path<(String, String)>,
    query: Result<Query<ExpectedRevision>, QueryRejection>,
) -> Response {
    let result = match query {
        Ok(Query(q)) => {
            control
                .delete_intention(&source, &destination, q.expected_revision)
                .await
        }
        Err(e) => Err(ControlError::invalid("expected_revision", e.body_text())),
    };
    answer(&control, "DeleteIntention", result)
}

async fn set_intentions_default(State(control): State<Control>, set: Bytes) -> Response {
    let result = match body::<SetDefault>("body", &set) {
        Ok(set) => control.set_intentions_default(set).await,
        Err(e) => Err(e),
    };
    answer(&control, "SetIntentionsDefault", result)
}

async fn check_intention(
    State(control): State<Control>,
    query: Result<Query<CheckQuery>, QueryRejection>,
) -> Response {
    let result = match query {
        Ok(Query(q)) => control.check_intention(q).await,
        Err(e) => Err(ControlError::invalid("query", e.body_text())),
    };
    answer(&control, "CheckIntention", result)
}

// === impl ApiAuth ===

impl ApiAuth {
    /// Checks for `token` when there is one; lets every call through
    /// otherwise.
    pub fn new(token: Option<&Secret>) -> Self {
        let expected = token.map(|t| {
            let session = hex::encode(digest(format!("mesh-dashboard:{}", t.0).as_bytes()));
            Arc::new(Expected {
                bearer: digest(format!("Bearer {}", t.0).as_bytes()),
                session_digest: digest(session.as_bytes()),
                session,
            })
        });
        Self { expected }
    }

    /// Whether a token is required.
    pub fn enabled(&self) -> bool {
        self.expected.is_some()
    }

    /// `router` (the REST API and the dashboard) with `POST /ui/login` and
    /// the check in front of every `/v1/...` path.
    pub fn protect(self, router: Router) -> Router {
        router
            .route("/ui/login", post(login).with_state(self.clone()))
            .route("/ui/session", get(session).with_state(self.clone()))
            .layer(middleware::from_fn_with_state(self, check))
    }

    /// Whether `headers` carry the token or the dashboard's cookie.
    fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let bearer = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .any(|v| constant_time_eq(&digest(v.as_bytes()), &expected.bearer));
        bearer
            || cookies(headers, SESSION_COOKIE)
                .any(|v| constant_time_eq(&digest(v.as_bytes()), &expected.session_digest))
    }

    /// Whether `given` is the token itself (the login form's body).
    fn is_token(&self, given: &[u8]) -> bool {
        let Some(expected) = &self.expected else {
            return false;
        };
        let mut bearer = b"Bearer ".to_vec();
        bearer.extend_from_slice(given.trim_ascii());
        constant_time_eq(&digest(&bearer), &expected.bearer)
    }
}

/// The same check on mesh.v1.Control's gRPC calls (metadata
/// `authorization: Bearer <token>`).
impl tonic::service::Interceptor for ApiAuth {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        match request.metadata().get("authorization") {
            Some(v) if constant_time_eq(&digest(v.as_bytes()), &expected.bearer) => Ok(request),
            Some(_) => Err(tonic::Status::unauthenticated(
                "wrong api_token in authorization",
            )),
            None => Err(tonic::Status::unauthenticated(
                "mesh.v1.Control needs authorization: Bearer <api_token>",
            )),
        }
    }
}

impl fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiAuth")
            .field("token", &self.expected.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The middleware: `/v1/...` needs the token, when there is one.
async fn check(State(auth): State<ApiAuth>, request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with("/v1/") || auth.allows(request.headers()) {
        return next.run(request).await;
    }
    unauthorized("this API needs Authorization: Bearer <api_token>")
}

/// `POST /ui/login`: the token as the body; right, it sets the dashboard's
/// cookie.
async fn login(State(auth): State<ApiAuth>, body: Bytes) -> Response {
    let Some(expected) = auth.expected.as_ref().filter(|_| auth.is_token(&body)) else {
        if !auth.enabled() {
            return StatusCode::NO_CONTENT.into_response();
        }
        return unauthorized("wrong api_token");
    };
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        expected.session
    );
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `GET /ui/session`: 204 when the caller may use the API, 401 when it
/// must sign in first; asks nothing of Consul, so the page knows at once.
async fn session(State(auth): State<ApiAuth>, headers: HeaderMap) -> Response {
    if auth.allows(&headers) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        unauthorized("this API needs Authorization: Bearer <api_token>")
    }
}

/// 401 with a JSON body as every REST error, naming what is missing.
fn unauthorized(message: &str) -> Response {
    let body = serde_json::json!({ "error": message, "kind": "unauthenticated" });
    let mut response = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"meshwork\""),
    );
    response
}

/// The values of the cookies named `name`.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Compares every byte, whatever the first difference.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-s3cr3t";

    /// `/v1/echo`, a page and `/live` behind `auth`, served on a free port.
    async fn serve(auth: ApiAuth) -> String {
        mesh_runtime::install_crypto_provider();
        let inner = Router::new()
            .route("/v1/echo", get(|| async { "echo" }))
            .route("/ui/", get(|| async { "page" }));
        let router = Router::new()
            .route("/live", get(|| async { "live" }))
            .merge(auth.protect(inner));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        base
    }

    async fn get_with(base: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut request = reqwest::Client::new().get(format!("{base}{path}"));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let answer = request.send().await.unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    }

    #[tokio::test]
    async fn with_a_token_every_api_call_needs_it() {
        let base = serve(ApiAuth::new(Some(&Secret(TOKEN.into())))).await;
        for headers in [
            &[][..],
            &[("authorization", "Bearer wrong-token-0123456789")],
            &[("authorization", TOKEN)],
            &[("cookie", "mesh_api_session=0123")],
        ] {
            let (status, body) = get_with(&base, "/v1/echo", headers).await;
            assert_eq!(status, 401, "{headers:?}");
            assert!(body.contains("Authorization: Bearer <api_token>"), "{body}");
            assert!(!body.contains("s3cr3t"), "{body}");
        }
        let bearer = format!("Bearer {TOKEN}");
        let ok = get_with(&base, "/v1/echo", &[("authorization", &bearer)]).await;
        assert_eq!(ok, (200, "echo".into()));
        // The page and the admin endpoints stay open.
        assert_eq!(get_with(&base, "/ui/", &[]).await, (200, "page".into()));
        assert_eq!(get_with(&base, "/live", &[]).await, (200, "live".into()));
    }

    #[tokio::test]
    async fn the_dashboard_signs_in_with_an_http_only_cookie() {
        let base = serve(ApiAuth::new(Some(&Secret(TOKEN.into())))).await;
        let client = reqwest::Client::new();
        let login = |body: &'static str| client.post(format!("{base}/ui/login")).body(body).send();
        let refused = login("not-the-token-0123456789").await.unwrap();
        assert_eq!(refused.status().as_u16(), 401);
        assert!(refused.headers().get("set-cookie").is_none());

        let signed_in = login(TOKEN).await.unwrap();
        assert_eq!(signed_in.status().as_u16(), 204);
        let cookie = signed_in.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        assert!(
            !cookie.contains(TOKEN),
            "the cookie carries a digest: {cookie}"
        );
        let pair = cookie.split(';').next().unwrap();
        assert_eq!(get_with(&base, "/ui/session", &[]).await.0, 401);
        assert_eq!(
            get_with(&base, "/ui/session", &[("cookie", pair)]).await.0,
            204
        );
        let other = format!("theme=dark; {pair}");
        let ok = get_with(&base, "/v1/echo", &[("cookie", &other)]).await;
        assert_eq!(ok, (200, "echo".into()));
    }

    #[tokio::test]
    async fn without_a_token_the_api_is_open() {
        let auth = ApiAuth::new(None);
        assert!(!format!("{auth:?}").contains("s3cr3t"));
        let base = serve(auth).await;
        assert_eq!(get_with(&base, "/v1/echo", &[]).await, (200, "echo".into()));
        let debug = format!("{:?}", ApiAuth::new(Some(&Secret(TOKEN.into()))));
        assert!(
            !debug.contains("s3cr3t") && debug.contains("redacted"),
            "{debug}"
        );
    }
}
