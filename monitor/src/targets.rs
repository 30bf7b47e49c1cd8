//! What to probe: every instance of the watched services in Consul's
//! catalog (with its node, for the check), and the components named in the
//! config.
//!
//! An instance is probed at its address (its own, else its node's) and
//! port, with the probe its meta asks for (`mesh-probe`: http, tcp, grpc)
//! else the configured one, and for HTTP the path its meta names
//! (`health-path`) else the configured one. Consul 1.8 does not show a
//! check's HTTP URL in any read API, so an instance's own check path can
//! reach the monitor only through its meta.

use std::collections::BTreeMap;

use consul_client::{Client, QueryOptions, ServiceEntry};
use futures::{StreamExt, stream};

use crate::{
    alert::TargetRef,
    config::Component,
    probe::{CheckStatus, ProbeKind, ProbeSpec},
};

/// The meta key naming an instance's probe.
pub const META_PROBE: &str = "mesh-probe";
/// The meta key naming an instance's HTTP health path.
pub const META_HEALTH_PATH: &str = "health-path";
/// The prefix of the monitor's check ID on an instance (the bridge's
/// default): `mesh-monitor:<service id>`.
pub const CHECK_PREFIX: &str = "mesh-monitor:";

/// One thing to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// How alerts name it.
    pub target: TargetRef,
    /// The node's address (where its bridge listens); empty for a component.
    pub node_address: String,
    /// The probe.
    pub spec: ProbeSpec,
    /// The status of the monitor's check on it in Consul, if it has one.
    pub consul_check: Option<CheckStatus>,
}

/// Lists the targets of a round.
#[derive(Clone, Debug)]
pub struct Discovery {
    consul: Client,
    services: Vec<String>,
    default_kind: ProbeKind,
    http_path: String,
    components: Vec<Component>,
    concurrency: usize,
}

/// A round's targets.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// The targets, by ID.
    pub targets: BTreeMap<String, Target>,
    /// Whether every service could be read: targets missing from an
    /// incomplete listing may still exist.
    pub complete: bool,
}

// === impl Target ===

impl Target {
    /// Whether it is an instance in Consul (that can carry a check).
    pub fn is_instance(&self) -> bool {
        !self.target.instance_id.is_empty()
    }

    fn instance(entry: ServiceEntry, kind: ProbeKind, http_path: &str) -> Option<Self> {
        let port = u16::try_from(entry.service.port).ok().filter(|p| *p > 0)?;
        let host = entry.address();
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let meta = &entry.service.meta;
        let kind = meta
            .get(META_PROBE)
            .and_then(|k| k.parse().ok())
            .unwrap_or(kind);
        let path = meta
            .get(META_HEALTH_PATH)
            .filter(|p| p.starts_with('/') && p.bytes().all(|b| b.is_ascii_graphic()))
            .map_or(http_path, String::as_str);
        let id = entry.service.id.clone();
        let check_id = format!("{CHECK_PREFIX}{id}");
        let consul_check = entry
            .checks
            .iter()
            .find(|c| c.check_id == check_id && c.service_id == id)
            .and_then(|c| c.status.parse().ok());
        let spec = ProbeSpec {
            kind,
            addr,
            path: path.to_owned(),
        };
        Some(Self {
            target: TargetRef {
                id: format!("{}/{id}", entry.node.node),
                service: entry.service.service.clone(),
                instance_id: id,
                node: entry.node.node.clone(),
                probe: spec.url(),
            },
            node_address: entry.node.address.clone(),
            spec,
            consul_check,
        })
    }

    fn component(c: &Component) -> Self {
        let spec = ProbeSpec {
            kind: c.kind,
            addr: c.addr.clone(),
            path: c.path.clone(),
        };
        Self {
            target: TargetRef {
                id: format!("component/{}", c.name),
                service: c.name.clone(),
                instance_id: String::new(),
                node: String::new(),
                probe: spec.url(),
            },
            node_address: String::new(),
            spec,
            consul_check: None,
        }
    }
}

// === impl Discovery ===

impl Discovery {
    /// Lists from `consul`, by the config's choices.
    pub fn new(consul: Client, config: &crate::Config) -> Self {
        Self {
            consul,
            services: config.services.clone(),
            default_kind: config.probe,
            http_path: config.http_path.clone(),
            components: config.components.clone(),
            concurrency: config.probing.concurrency,
        }
    }

    /// This round's targets: the components, and the instances of every
    /// service that could be read.
    pub async fn list(&self) -> Listing {
        let mut listing = Listing {
            targets: self
                .components
                .iter()
                .map(Target::component)
                .map(|t| (t.target.id.clone(), t))
                .collect(),
            complete: true,
        };
        let services = match self.service_names().await {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list Consul's services; probing the last known instances");
                listing.complete = false;
                return listing;
            }
        };
        let reads = stream::iter(services)
            .map(|name| async move {
                let read = self
                    .consul
                    .health_service(&name, false, QueryOptions::default())
                    .await;
                (name, read)
            })
            .buffer_unordered(self.concurrency.min(8));
        let reads: Vec<_> = reads.collect().await;
        for (name, read) in reads {
            match read {
                Ok(entries) => {
                    for entry in entries.value {
                        if let Some(t) = Target::instance(entry, self.default_kind, &self.http_path)
                        {
                            listing.targets.insert(t.target.id.clone(), t);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "cannot read the service's instances");
                    listing.complete = false;
                }
            }
        }
        listing
    }

    async fn service_names(&self) -> Result<Vec<String>, consul_client::Error> {
        if !self.services.is_empty() {
            return Ok(self.services.clone());
        }
        let all = self
            .consul
            .catalog_services(QueryOptions::default())
            .await?;
        let mut names: Vec<String> = all.value.into_keys().filter(|n| n != "consul").collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(meta: &[(&str, &str)], checks: &str) -> ServiceEntry {
        let meta: serde_json::Map<String, serde_json::Value> = meta
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).into()))
            .collect();
        serde_json::from_value(serde_json::json!({
            "Node": {"Node": "n1", "Address": "10.0.0.1"},
            "Service": {"ID": "web-1", "Service": "web", "Address": "", "Port": 8080, "Meta": meta},
            "Checks": [{"CheckID": checks, "ServiceID": "web-1", "Status": "critical"}],
        }))
        .unwrap()
    }

    #[test]
    fn an_instance_is_probed_at_its_node_with_its_meta() {
        let t =
            Target::instance(entry(&[], "mesh-monitor:web-1"), ProbeKind::Http, "/health").unwrap();
        assert_eq!(t.target.id, "n1/web-1");
        assert_eq!(t.spec.url(), "http://10.0.0.1:8080/health");
        assert_eq!(t.node_address, "10.0.0.1");
        assert_eq!(t.consul_check, Some(CheckStatus::Critical));
        assert!(t.is_instance());

        let meta = [("mesh-probe", "grpc"), ("health-path", "/ready")];
        let t =
            Target::instance(entry(&meta, "service:web-1"), ProbeKind::Http, "/health").unwrap();
        assert_eq!(t.spec.url(), "grpc://10.0.0.1:8080");
        assert_eq!(t.consul_check, None, "only the monitor's own check counts");
        let meta = [("health-path", "/ready")];
        let t = Target::instance(entry(&meta, "x"), ProbeKind::Http, "/health").unwrap();
        assert_eq!(t.spec.url(), "http://10.0.0.1:8080/ready");
    }
}
