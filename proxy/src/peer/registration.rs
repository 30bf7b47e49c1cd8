//! This proxy's own registration as a peer: service `mesh-proxy`, ID
//! `mesh-proxy-<node>`, the inbound listener's port and address, and a TCP
//! check that the node's Consul agent runs against the listener, so that
//! the registration stops passing, and other proxies stop sending through
//! it, when the proxy is gone. It takes the path of any service's
//! registration: the registrar, to the bridge or into the durable queue.
//!
//! It is never deregistered on shutdown: a new process taking over the same
//! ports registers the same ID, which the old one's deregistration would
//! remove. A proxy that stopped fails its check instead.

use std::{
    collections::BTreeMap,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use mesh_runtime::{backoff::Backoff, shutdown::Shutdown};

use super::{SERVICE, registration_id};
use crate::{
    agent::{CheckSpec, Registration},
    config::InboundConfig,
    registrar::{Outcome, Registrar, RegistryOp},
};

/// How often the node's agent checks the inbound listener: a dead proxy
/// stops passing within about this long.
pub const CHECK_INTERVAL: &str = "1s";

/// The registration of the proxy on `node` whose inbound listener, set up
/// as `config`, is bound at `bound` (the real port when `config` said 0).
pub fn own(node: &str, config: &InboundConfig, bound: SocketAddr) -> Registration {
    let ip = bound.ip();
    // An unspecified listen address says nothing about where other nodes
    // reach this one: left empty, Consul fills in the node's own address.
    let address = match &config.address {
        Some(address) => address.clone(),
        None if ip.is_unspecified() => String::new(),
        None => ip.to_string(),
    };
    // The agent runs the check on this node: the listen IP reaches the
    // listener, or loopback when it listens on every address.
    let check_ip = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Registration {
        id: registration_id(node),
        name: SERVICE.to_owned(),
        address,
        port: bound.port(),
        tags: vec!["h2".to_owned()],
        meta: BTreeMap::from([
            ("node".to_owned(), node.to_owned()),
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ]),
        checks: vec![CheckSpec {
            tcp: SocketAddr::new(check_ip, bound.port()).to_string(),
            interval: CHECK_INTERVAL.to_owned(),
            timeout: "1s".to_owned(),
            ..CheckSpec::default()
        }],
    }
}

/// Submits `registration` once `ready` resolves (the routing table is
/// loaded, so that the inbound listener knows this node's instances before
/// other proxies send to it), trying again with backoff until it is applied
/// or queued, or until shutdown.
pub async fn register(
    registrar: Arc<Registrar>,
    registration: Registration,
    ready: impl Future<Output = ()>,
    mut stop: Shutdown,
) {
    tokio::select! {
        () = ready => {}
        _ = stop.requested() => return,
    }
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let (id, port) = (registration.id.clone(), registration.port);
    loop {
        let op = RegistryOp::Register(registration.clone());
        let outcome = tokio::select! {
            outcome = registrar.submit(op) => outcome,
            _ = stop.requested() => return,
        };
        match outcome {
            Outcome::Applied => {
                tracing::info!(%id, port, "registered as a peer: other nodes' proxies send through the inbound listener");
                return;
            }
            Outcome::Queued => {
                tracing::info!(%id, port, "peer registration queued; applied when the registry is back");
                return;
            }
            Outcome::Invalid(reason) | Outcome::NotFound(reason) => {
                tracing::error!(%id, %reason, "peer registration refused; other proxies will call this node's instances directly");
                return;
            }
            // A token that may not register it yet may be granted later.
            Outcome::Denied(reason) | Outcome::Failed(reason) => {
                tracing::warn!(%id, %reason, "peer registration failed; trying again");
            }
        }
        tokio::select! {
            () = backoff.wait() => {}
            _ = stop.requested() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: &str, address: Option<&str>) -> InboundConfig {
        InboundConfig {
            listen: listen.parse().unwrap(),
            address: address.map(str::to_owned),
        }
    }

    #[test]
    fn every_address_leaves_the_address_to_consul_and_checks_loopback() {
        let c = config("0.0.0.0:0", None);
        let r = own("n1", &c, "0.0.0.0:8892".parse().unwrap());
        assert_eq!(
            (r.id.as_str(), r.name.as_str()),
            ("mesh-proxy-n1", "mesh-proxy")
        );
        assert_eq!(r.address, "");
        assert_eq!(r.port, 8892);
        assert_eq!(r.checks[0].tcp, "127.0.0.1:8892");
        assert_eq!(r.checks[0].interval, CHECK_INTERVAL);
        let r = own("n1", &config("[::]:0", None), "[::]:8892".parse().unwrap());
        assert_eq!(
            (r.address.as_str(), r.checks[0].tcp.as_str()),
            ("", "[::1]:8892")
        );
    }

    #[test]
    fn a_listen_ip_is_the_address_unless_one_is_given() {
        let bound = "10.1.2.3:8892".parse().unwrap();
        let r = own("n2", &config("10.1.2.3:8892", None), bound);
        assert_eq!(
            (r.address.as_str(), r.checks[0].tcp.as_str()),
            ("10.1.2.3", "10.1.2.3:8892")
        );
        let r = own("n2", &config("10.1.2.3:8892", Some("node2.example")), bound);
        assert_eq!(r.address, "node2.example");
        assert_eq!(r.checks[0].tcp, "10.1.2.3:8892");
    }
}
