//! `mesh.v1.Identity` over gRPC, behind [`IdentityAuth`], the bearer-token
//! check.

use std::{fmt, sync::Arc};

use mesh_proto::v1::{self as pb, identity_server};
use mesh_runtime::pki::grpc::{Authorize, CallPolicy, Peer};
use sha2::{Digest, Sha256};
use tonic::{
    Request, Response, Status, service::Interceptor, service::interceptor::InterceptedService,
};

use super::{Identity, millis};

/// The Identity service with its token check in front.
pub type IdentityService =
    InterceptedService<Authorize<identity_server::IdentityServer<IdentityApi>>, IdentityAuth>;

/// The gRPC face of [`Identity`].
#[derive(Clone, Debug)]
pub struct IdentityApi {
    identity: Identity,
}

/// The node a caller's verified certificate names: it may renew that
/// node's certificates without the token.
#[derive(Clone, Debug)]
struct CertifiedNode(String);

/// Checks `authorization: Bearer <identity_token>` on every call, unless
/// the caller showed a node's certificate over TLS (then it may ask only
/// for that node's); refuses every call when no token is set (issuance is
/// off).
#[derive(Clone)]
pub struct IdentityAuth {
    expected: Option<[u8; 32]>,
    identity: Identity,
}

// === impl IdentityApi ===

impl IdentityApi {
    /// Serves `identity`.
    pub fn new(identity: Identity) -> Self {
        Self { identity }
    }

    /// The tonic service, token check included, behind `policy` when the
    /// listener speaks TLS.
    pub fn into_service(self, policy: Option<Arc<dyn CallPolicy>>) -> IdentityService {
        let auth = IdentityAuth::new(self.identity.clone());
        InterceptedService::new(
            Authorize::new(identity_server::IdentityServer::new(self), policy),
            auth,
        )
    }
}

#[tonic::async_trait]
impl identity_server::Identity for IdentityApi {
    async fn sign(
        &self,
        request: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let certified = request.extensions().get::<CertifiedNode>().cloned();
        let pb::SignRequest {
            node,
            identity,
            csr_pem,
        } = request.into_inner();
        if let Some(CertifiedNode(certified)) = certified
            && !certified.eq_ignore_ascii_case(&node)
        {
            self.identity.metrics().certificate_refused("denied");
            return Err(Status::permission_denied(format!(
                "node {certified:?}'s certificate may ask for node {certified:?}'s \
                 certificates only, not node {node:?}'s"
            )));
        }
        let issued = self.identity.sign(&node, &identity, &csr_pem).await?;
        Ok(Response::new(pb::SignResponse {
            cert_pem: issued.cert_pem,
            trust_bundle_pem: issued.trust_bundle_pem,
            not_after_ms: millis(issued.not_after),
            renew_at_ms: millis(issued.renew_at),
        }))
    }
}

// === impl IdentityAuth ===

impl IdentityAuth {
    fn new(identity: Identity) -> Self {
        let expected = identity
            .settings()
            .token
            .as_ref()
            .map(|t| digest(format!("Bearer {}", t.0).as_bytes()));
        Self { expected, identity }
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.identity.metrics().certificate_refused(reason);
        status
    }
}

impl Interceptor for IdentityAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Err(self.refuse(
                "disabled",
                Status::failed_precondition(
                    "this mesh-control issues no certificates: identity_token is not set",
                ),
            ));
        };
        // A node's certificate (TLS) stands for the token, for that node.
        let node = request
            .extensions()
            .get::<Peer>()
            .and_then(|p| p.identity.as_ref())
            .and_then(|id| id.node_name().map(str::to_owned));
        if let Some(node) = node {
            request.extensions_mut().insert(CertifiedNode(node));
            return Ok(request);
        }
        let Some(given) = request.metadata().get("authorization") else {
            return Err(self.refuse(
                "unauthenticated",
                Status::unauthenticated("Identity needs authorization: Bearer <identity_token>"),
            ));
        };
        if constant_time_eq(&digest(given.as_bytes()), expected) {
            Ok(request)
        } else {
            Err(self.refuse(
                "unauthenticated",
                Status::unauthenticated("wrong identity token in authorization"),
            ))
        }
    }
}

impl fmt::Debug for IdentityAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityAuth")
            .field("token", &self.expected.map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Compares every byte, whatever the first difference.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
