//! What discovery subscribes to. All services (an empty list) carry the
//! peers already. A list of services gets `mesh-proxy` added, so that the
//! proxy knows its peers; and with an inbound listener also every service
//! registered on this node's agent, since the inbound listener forwards
//! only to instances its routing table shows on this node. That set is
//! read from the bridge now and then, and a change resubscribes (the
//! bridge answers a new subscription with a full snapshot).

use std::{collections::BTreeSet, future::Future, sync::Arc, time::Duration};

use mesh_runtime::shutdown::Shutdown;

use super::SERVICE;
use crate::registrar::Registrar;

/// How often the services registered on this node are read again.
pub const LOCAL_POLL: Duration = Duration::from_secs(2);

/// The services to watch for `configured` (empty: all) and the services
/// registered on this node (`local`): a list keeps its order, and
/// `mesh-proxy`, then `local` (sorted), join it, each once. Empty stays
/// empty.
pub fn watch_list(configured: &[String], local: &[String]) -> Vec<String> {
    if configured.is_empty() {
        return Vec::new();
    }
    let local: BTreeSet<&String> = local.iter().filter(|s| !s.is_empty()).collect();
    let mut all: Vec<String> = Vec::with_capacity(configured.len() + 1 + local.len());
    let peers = SERVICE.to_owned();
    for name in configured.iter().chain([&peers]).chain(local) {
        if !all.contains(name) {
            all.push(name.clone());
        }
    }
    all
}

/// Runs `subscribe(list)` (one discovery subscription, until shutdown) for
/// [`watch_list`] of `configured`; with `local` (a list of services and an
/// inbound listener), reads this node's services through it every
/// [`LOCAL_POLL`] and subscribes again when the list changes.
pub async fn run<F, Fut>(
    configured: Vec<String>,
    local: Option<Arc<Registrar>>,
    subscribe: F,
    mut stop: Shutdown,
) where
    F: Fn(Vec<String>) -> Fut,
    Fut: Future<Output = ()>,
{
    let local = match local {
        Some(registrar) if !configured.is_empty() => registrar,
        _ => return subscribe(watch_list(&configured, &[])).await,
    };
    let mut list = match tokio::select! {
        names = local_services(&local) => names,
        _ = stop.requested() => return,
    } {
        Some(names) => watch_list(&configured, &names),
        None => watch_list(&configured, &[]),
    };
    loop {
        tracing::debug!(services = ?list, "subscribing");
        // The subscription is polled all along: reading the local services
        // must not hold back the updates it streams.
        let changed = async {
            loop {
                tokio::time::sleep(LOCAL_POLL).await;
                if let Some(names) = local_services(&local).await {
                    let next = watch_list(&configured, &names);
                    if next != list {
                        return next;
                    }
                }
            }
        };
        // The old subscription is dropped once the list changed, closing
        // its stream.
        let next = tokio::select! {
            () = subscribe(list.clone()) => return,
            next = changed => next,
        };
        tracing::info!(services = ?next, "the services on this node changed; subscribing again");
        list = next;
    }
}

/// The names of the services registered on this node's agent, or `None`
/// when the bridge does not answer.
async fn local_services(registrar: &Registrar) -> Option<Vec<String>> {
    match registrar.list_local().await {
        Ok(instances) => Some(instances.into_iter().map(|i| i.name).collect()),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read this node's services");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn all_stays_all_and_a_list_gets_the_peers_and_local_services() {
        assert!(watch_list(&[], &strings(&["orders"])).is_empty());
        assert_eq!(
            watch_list(&strings(&["orders", "billing"]), &[]),
            strings(&["orders", "billing", "mesh-proxy"])
        );
        assert_eq!(
            watch_list(
                &strings(&["orders"]),
                &strings(&["users", "orders", "mesh-proxy", "", "accounts"])
            ),
            strings(&["orders", "mesh-proxy", "accounts", "users"])
        );
    }
}
