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

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        Path, Query, State,
        rejection::{PathRejection, QueryRejection},
    },
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    control::{
        CheckQuery, Control, PutIntention, Registration, RenderQuery, RolloutAction, SetDefault,
        SetRoutes, StageVersion, StartRollout,
    },
    error::ControlError,
};

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
