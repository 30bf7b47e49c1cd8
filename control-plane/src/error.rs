//! What a control-plane call can fail with, sorted by what the caller
//! should do, and the one place that maps it to a gRPC status and to an
//! HTTP status with a JSON body.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::{
    model::Invalid,
    render::RenderError,
    store::{Conflict, StoreError},
};

/// A failed control-plane call.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Bad input; every problem names its field. Nothing was stored.
    #[error("{0}")]
    Invalid(Invalid),
    /// A node, service or version that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A lost race: the change was based on a revision that is no longer
    /// current. Nothing was stored; read again and retry.
    #[error("{0}")]
    Conflict(Conflict),
    /// The call does not fit the state things are in (a rollout is
    /// already under way, say); nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// The stored routes cannot be expressed in the format asked for.
    #[error("{0}")]
    Unrenderable(String),
    /// Consul or a node's bridge is out of reach; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// Something that should not happen (a stored value that does not decode).
    #[error("{0}")]
    Internal(String),
}

// === impl ControlError ===

impl ControlError {
    /// Bad input in one field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid(Invalid::one(field, message))
    }

    /// A short name of the kind, for metrics and JSON bodies.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Refused(_) => "refused",
            Self::Unrenderable(_) => "unrenderable",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// The HTTP status of the REST mirror.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::Invalid(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) | Self::Refused(_) => StatusCode::CONFLICT,
            Self::Unrenderable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::Invalid(_) => tonic::Code::InvalidArgument,
            Self::NotFound(_) => tonic::Code::NotFound,
            Self::Conflict(_) => tonic::Code::Aborted,
            Self::Unrenderable(_) | Self::Refused(_) => tonic::Code::FailedPrecondition,
            Self::Unavailable(_) => tonic::Code::Unavailable,
            Self::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(c) => Self::Conflict(c),
            StoreError::Corrupt { .. } => Self::Internal(e.to_string()),
            StoreError::Contended(_) => Self::Unavailable(e.to_string()),
            StoreError::Consul(c) => consul(c),
        }
    }
}

impl From<consul_client::Error> for ControlError {
    fn from(e: consul_client::Error) -> Self {
        consul(e)
    }
}

impl From<RenderError> for ControlError {
    fn from(e: RenderError) -> Self {
        Self::Unrenderable(format!("cannot render: {e}"))
    }
}

fn consul(e: consul_client::Error) -> ControlError {
    if e.is_retryable() {
        ControlError::Unavailable(e.to_string())
    } else {
        ControlError::Internal(e.to_string())
    }
}

impl From<ControlError> for tonic::Status {
    fn from(e: ControlError) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.to_string(), "kind": self.kind()});
        match &self {
            Self::Invalid(invalid) => body["fields"] = json!(invalid.0),
            Self::Conflict(c) => {
                body["key"] = json!(c.key);
                body["expected_revision"] = json!(c.expected);
                body["revision"] = json!(c.actual);
            }
            _ => {}
        }
        (self.http_status(), Json(body)).into_response()
    }
}
