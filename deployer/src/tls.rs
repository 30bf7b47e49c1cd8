//! mTLS on the gRPC listener, and who may call what.
//!
//! With `tls_dir` set, the listener speaks TLS only
//! ([`mesh_runtime::pki::grpc`]): it presents the node's identity
//! (`spiffe://<trust domain>/node/<node>`, `node.key` + `node.crt`, kept by
//! mesh-bridge and read again every second) and requires a client
//! certificate from the mesh CA (`ca.crt`).
//!
//! [`DeployerPolicy`] then decides per method, from the verified identity:
//! everything that changes the node (Deploy, Rollback, Stop, Upload,
//! UploadOffset, ApplyConfig) only for mesh-control
//! (`spiffe://<trust domain>/svc/mesh-control`); the reads (Status,
//! ListArtifacts, LogTail) also for this node's own identity, for tools
//! on the node. Any other caller gets PERMISSION_DENIED naming the method
//! and its identity.

use std::sync::Arc;

use mesh_runtime::pki::{
    SpiffeId,
    grpc::{Authorize, CallPolicy, ServerTls},
};

use crate::config::TlsSettings;

pub use mesh_runtime::pki::grpc::TlsError;

/// The service name of mesh-control's identity, the only caller that may
/// change anything on the node.
pub const CONTROL_SERVICE: &str = "mesh-control";

/// Methods that change the node: mesh-control's alone.
const CONTROL_ONLY: [&str; 6] = [
    "Deploy",
    "Rollback",
    "Stop",
    "Upload",
    "UploadOffset",
    "ApplyConfig",
];
/// Methods that read: mesh-control's and the node's own.
const READS: [&str; 3] = ["Status", "ListArtifacts", "LogTail"];

/// The identities that may call.
#[derive(Debug)]
pub struct DeployerPolicy {
    control: SpiffeId,
    node: SpiffeId,
}

/// What wraps the service: the policy of the node's credentials, or none
/// without TLS (the token, if any, is checked in front).
#[derive(Clone, Debug)]
pub struct Authorization {
    policy: Option<Arc<dyn CallPolicy>>,
}

/// Loads the node's credentials for `node` from `settings.dir`; an error
/// names the file and what is wrong.
pub fn load(settings: &TlsSettings, node: &str) -> Result<ServerTls, TlsError> {
    let identity = SpiffeId::node(&settings.trust_domain, node).map_err(|e| TlsError {
        path: settings.dir.clone(),
        reason: format!("node {node:?} is no identity: {e}"),
    })?;
    ServerTls::load_node(settings.dir.clone(), identity)
}

// === impl Authorization ===

impl Authorization {
    /// Checks every call against the policy for `tls`'s node; without TLS,
    /// every call goes through.
    pub fn new(tls: Option<&ServerTls>) -> Result<Self, TlsError> {
        let policy = match tls {
            Some(tls) => {
                let node = tls.identity().clone();
                let control =
                    SpiffeId::service(node.trust_domain(), CONTROL_SERVICE).map_err(|e| {
                        TlsError {
                            path: tls.dir().to_owned(),
                            reason: e.to_string(),
                        }
                    })?;
                Some(Arc::new(DeployerPolicy { control, node }) as Arc<dyn CallPolicy>)
            }
            None => None,
        };
        Ok(Self { policy })
    }

    /// `inner` behind the check.
    pub fn wrap<S>(&self, inner: S) -> Authorize<S> {
        Authorize::new(inner, self.policy.clone())
    }
}

impl CallPolicy for DeployerPolicy {
    fn check(&self, _service: &str, method: &str, peer: &SpiffeId) -> Result<(), String> {
        if *peer == self.control || (READS.contains(&method) && *peer == self.node) {
            return Ok(());
        }
        Err(if CONTROL_ONLY.contains(&method) {
            format!("only {} may", self.control)
        } else {
            format!("only {} and {} may", self.control, self.node)
        })
    }
}
