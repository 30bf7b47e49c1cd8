//! Consul's agent registration API, served on the outbound listener under
//! any host, so any Consul client library pointed at the proxy registers
//! through it: `PUT /v1/agent/service/register`,
//! `PUT /v1/agent/service/deregister/{id}`, `GET /v1/agent/services`.
//!
//! Registrations are validated here ([`registration`]) and carried to the
//! bridge by the [`Registrar`]; answers follow Consul (200 with an empty
//! body when applied), plus 202 when the registration waits in a durable
//! queue and 400 naming the problem when it is invalid.

mod registration;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Serialize;

pub use self::registration::{
    CheckSpec, MAX_ID_LEN, MAX_NAME_LEN, Registration, check_id, check_name,
};
use crate::{
    body::ProxyBody,
    error::json_error,
    registrar::{BridgeError, Outcome, Registrar, RegistryOp},
};

/// Largest registration body accepted.
pub const MAX_BODY: usize = 1 << 20;

/// Time a client has to send a registration body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

const REGISTER: &str = "/v1/agent/service/register";
const DEREGISTER: &str = "/v1/agent/service/deregister/";
const SERVICES: &str = "/v1/agent/services";

/// The agent API handlers.
#[derive(Clone, Debug)]
pub struct Agent {
    registrar: Arc<Registrar>,
}

/// One entry of `GET /v1/agent/services`, in Consul's shape.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentService {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    tags: Vec<String>,
    meta: BTreeMap<String, String>,
    port: u32,
    address: String,
    weights: Weights,
    enable_tag_override: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Weights {
    passing: u32,
    warning: u32,
}

// === impl Agent ===

impl Agent {
    /// Handlers forwarding through `registrar`.
    pub fn new(registrar: Arc<Registrar>) -> Self {
        Self { registrar }
    }

    /// Answers one agent API request (its path starts with `/v1/agent/`).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let path = req.uri().path();
        if path == REGISTER {
            if req.method() != Method::PUT {
                return method_not_allowed("PUT");
            }
            return self.register(req.into_body()).await;
        }
        if let Some(id) = path.strip_prefix(DEREGISTER) {
            if req.method() != Method::PUT {
                return method_not_allowed("PUT");
            }
            if let Err(reason) = check_id(id) {
                self.registrar.count_invalid();
                return invalid(&reason);
            }
            let op = RegistryOp::Deregister { id: id.to_owned() };
            return respond(self.registrar.submit(op).await);
        }
        if path == SERVICES {
            if req.method() != Method::GET {
                return method_not_allowed("GET");
            }
            return self.services().await;
        }
        json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the proxy serves only /v1/agent/service/register, /v1/agent/service/deregister/{id} and /v1/agent/services",
            None,
        )
    }

    async fn register(&self, body: Incoming) -> Response<ProxyBody> {
        let bytes = match read_body(body).await {
            Ok(b) => b,
            Err(reason) => return invalid(&reason),
        };
        match Registration::parse(&bytes) {
            Ok(r) => respond(self.registrar.submit(RegistryOp::Register(r)).await),
            Err(reason) => {
                self.registrar.count_invalid();
                invalid(&reason)
            }
        }
    }

    async fn services(&self) -> Response<ProxyBody> {
        let instances = match self.registrar.list_local().await {
            Ok(i) => i,
            Err(e @ BridgeError::Unreachable(_)) => {
                return json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "registry_unavailable",
                    &e.to_string(),
                    None,
                );
            }
            Err(e) => {
                return json_error(
                    StatusCode::BAD_GATEWAY,
                    "registry_failed",
                    &e.to_string(),
                    None,
                );
            }
        };
        let services: BTreeMap<String, AgentService> = instances
            .into_iter()
            .map(|i| {
                let entry = AgentService {
                    id: i.id.clone(),
                    service: i.name,
                    tags: i.tags,
                    meta: i.meta.into_iter().collect(),
                    port: i.port,
                    address: i.address,
                    weights: Weights {
                        passing: 1,
                        warning: 1,
                    },
                    enable_tag_override: false,
                };
                (i.id, entry)
            })
            .collect();
        let json = serde_json::to_vec(&services).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = Response::new(ProxyBody::full(json));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, String> {
    let collect = Limited::new(body, MAX_BODY).collect();
    match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Err(_) => Err("the request body did not arrive in time".into()),
        Ok(Err(e)) => Err(format!("cannot read the request body: {e}")),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn respond(outcome: Outcome) -> Response<ProxyBody> {
    match outcome {
        // Consul answers 200 with an empty body.
        Outcome::Applied => Response::new(ProxyBody::empty()),
        Outcome::Queued => {
            let mut r = Response::new(ProxyBody::full(
                r#"{"queued":true,"reason":"the registry is unreachable; applied when it is back"}"#,
            ));
            *r.status_mut() = StatusCode::ACCEPTED;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Outcome::Invalid(reason) => invalid(&reason),
        Outcome::NotFound(reason) => json_error(StatusCode::NOT_FOUND, "not_found", &reason, None),
        Outcome::Denied(reason) => {
            json_error(StatusCode::FORBIDDEN, "registration_denied", &reason, None)
        }
        Outcome::Failed(reason) => {
            json_error(StatusCode::BAD_GATEWAY, "registry_failed", &reason, None)
        }
    }
}

fn invalid(reason: &str) -> Response<ProxyBody> {
    json_error(
        StatusCode::BAD_REQUEST,
        "invalid_registration",
        reason,
        None,
    )
}

fn method_not_allowed(allowed: &'static str) -> Response<ProxyBody> {
    let mut r = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("use {allowed}"),
        None,
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    r
}
