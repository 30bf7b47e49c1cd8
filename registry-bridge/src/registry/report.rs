//! What a node's proxy reports about its config, as the bridge records it
//! in Consul KV for mesh-control: `mesh/status/<node>`, JSON, written with
//! a plain put (each node owns its key and only its bridge writes it).

use mesh_proto::v1::ReportStatusRequest;
use serde::{Deserialize, Serialize};

/// The longest node name taken (Consul's own limit is lower).
const MAX_NODE_LEN: usize = 128;

/// The longest reason kept; a longer one is cut at a character boundary.
pub(crate) const MAX_REASON_LEN: usize = 2048;

/// `mesh/status/<node>` as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatusRecord {
    /// The config version in effect; 0: none.
    pub(crate) version_in_effect: u64,
    /// The newest version refused; 0: none.
    pub(crate) refused_version: u64,
    /// Why it was refused.
    pub(crate) reason: String,
    /// When the bridge wrote this, in milliseconds since the Unix epoch.
    pub(crate) at_ms: u64,
}

/// The key and JSON value for `report` at `at_ms`; a bad node name is
/// refused by name.
pub(crate) fn record(report: ReportStatusRequest, at_ms: u64) -> Result<(String, Vec<u8>), String> {
    let node = report.node.trim();
    if node.is_empty() {
        return Err("node is required".into());
    }
    let clean = node.len() <= MAX_NODE_LEN
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !clean {
        return Err(format!(
            "node {node:?}: letters, digits, '-', '_' and '.' only, at most {MAX_NODE_LEN}"
        ));
    }
    let mut reason = report.reason.replace(['\n', '\r'], " ");
    if reason.len() > MAX_REASON_LEN {
        let mut cut = MAX_REASON_LEN;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let record = StatusRecord {
        version_in_effect: report.version_in_effect,
        refused_version: report.refused_version,
        reason,
        at_ms,
    };
    let value = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
    Ok((format!("mesh/status/{node}"), value))
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, reason: &str) -> ReportStatusRequest {
        ReportStatusRequest {
            node: node.into(),
            version_in_effect: 3,
            refused_version: 4,
            reason: reason.into(),
        }
    }

    #[test]
    fn a_report_is_the_node_s_status_key() {
        let (key, value) =
            record(report("n1", "routes.web.retries: 11 is more than 10"), 7).unwrap();
        assert_eq!(key, "mesh/status/n1");
        let stored: StatusRecord = serde_json::from_slice(&value).unwrap();
        assert_eq!(
            stored,
            StatusRecord {
                version_in_effect: 3,
                refused_version: 4,
                reason: "routes.web.retries: 11 is more than 10".into(),
                at_ms: 7,
            }
        );
    }

    #[test]
    fn a_bad_node_is_refused_by_name_and_a_long_reason_is_cut() {
        assert_eq!(record(report(" ", ""), 1).unwrap_err(), "node is required");
        let e = record(report("../leader", ""), 1).unwrap_err();
        assert!(e.starts_with("node \"../leader\""), "{e}");
        let (_, value) = record(report("n1", &"é\n".repeat(MAX_REASON_LEN)), 1).unwrap();
        let stored: StatusRecord = serde_json::from_slice(&value).unwrap();
        assert!(stored.reason.len() <= MAX_REASON_LEN);
        assert!(!stored.reason.contains('\n'));
    }
}
