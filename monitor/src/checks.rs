//! The verdict into Consul: a check on the instance, `passing` (up, or
//! slow by default), `warning` (slow, when `slow_status` says so) or
//! `critical` (down, hung, unhealthy), so that routing drops a hung
//! instance without anyone acting: the bridges route to passing instances
//! only (`?passing`), and a warning is not passing.
//!
//! How the check gets there: Consul keeps an instance's checks on the agent
//! that owns it. A check written to the catalog (`/v1/catalog/register`) is
//! removed by that agent at its next anti-entropy sync (seen with Consul
//! 1.8.7: "Deregistered check" about two minutes later), and the agent API
//! of another node is not reachable (agents listen on loopback). So the
//! monitor calls the instance's node's mesh-bridge (`mesh.v1.Checks`, at the
//! node's catalog address and the bridge port), which keeps a TTL check
//! `mesh-monitor:<service id>` on its agent. The TTL is long (30 days) and
//! the monitor refreshes the check every [`REFRESH`]: a monitor that stops
//! leaves verdicts as they are instead of turning the mesh critical.
//!
//! The monitor writes when Consul shows another status than its verdict
//! (a changed verdict, a write that failed, an instance deregistered and
//! registered anew, which drops its checks) or the last write is older than
//! [`REFRESH`].

use std::{sync::Arc, time::Duration};

use mesh_proto::v1::{SetCheckRequest, checks_client::ChecksClient};

use crate::{bridges::Bridges, metrics::MonitorMetrics, probe::CheckStatus, targets::Target};

/// How often a check is written even when Consul shows the verdict.
pub const REFRESH: Duration = Duration::from_secs(3600);
/// How long a call to a bridge may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes checks through the nodes' bridges.
#[derive(Debug)]
pub struct CheckWriter {
    bridges: Arc<Bridges>,
    metrics: MonitorMetrics,
}

// === impl CheckWriter ===

impl CheckWriter {
    /// Writes through each node's bridge.
    pub fn new(bridges: Arc<Bridges>, metrics: MonitorMetrics) -> Self {
        Self { bridges, metrics }
    }

    /// Sets the monitor's check on `target` to `status` with `output`.
    pub async fn set(
        &self,
        target: &Target,
        status: CheckStatus,
        output: &str,
    ) -> Result<(), String> {
        let channel = self
            .bridges
            .channel(&target.target.node, &target.node_address)?;
        let request = SetCheckRequest {
            service_id: target.target.instance_id.clone(),
            status: status.as_str().into(),
            output: output.to_owned(),
            ..Default::default()
        };
        let mut client = ChecksClient::new(channel);
        let result = tokio::time::timeout(CALL_TIMEOUT, client.set_check(request))
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {CALL_TIMEOUT:?}"
                )))
            })
            .map(drop)
            .map_err(|s| {
                format!(
                    "node {}'s bridge ({}:{}) answered {:?}: {}",
                    target.target.node,
                    target.node_address,
                    self.bridges.port(),
                    s.code(),
                    s.message()
                )
            });
        self.metrics.check_write(result.is_ok());
        result
    }
}
