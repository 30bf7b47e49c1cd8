//! What one Watch stream follows: a fixed list of services, or every
//! service in the catalog (watching new ones as they appear and letting go
//! of those that vanish).

use std::{collections::BTreeMap, sync::Arc};

use tokio::sync::watch;

use super::diff::State;
use crate::watch::{CatalogView, ServiceView, Watches};

/// Catalog services that are never routes: Consul registers its servers
/// as `consul`, on their RPC port, which speaks no HTTP. Asked for by name
/// they are still watched.
const NOT_ROUTES: &[&str] = &["consul"];

/// The watches of one subscriber.
#[derive(Debug)]
pub(crate) struct Subscriber {
    watches: Watches,
    changes: watch::Receiver<u64>,
    /// `Some` when following the whole catalog.
    catalog: Option<watch::Receiver<CatalogView>>,
    /// The catalog names `services` was last synced with.
    synced: CatalogView,
    services: BTreeMap<String, watch::Receiver<ServiceView>>,
}

impl Subscriber {
    /// Follows `names`, or the whole catalog when `names` is empty.
    pub(crate) fn new(watches: &Watches, names: &[String]) -> Self {
        // Subscribed first, so that no change made after a view is read
        // can go unnoticed.
        let changes = watches.changes();
        let catalog = names.is_empty().then(|| watches.catalog());
        let services = names
            .iter()
            .map(|n| (n.clone(), watches.service(n)))
            .collect();
        Self {
            watches: watches.clone(),
            changes,
            catalog,
            synced: None,
            services,
        }
    }

    /// In catalog mode, watches the catalog's services and only those.
    pub(crate) fn follow_catalog(&mut self) {
        let Some(names) = self.catalog.as_ref().and_then(|c| c.borrow().clone()) else {
            return;
        };
        if self.synced.as_ref().is_some_and(|s| Arc::ptr_eq(s, &names)) {
            return;
        }
        // Dropping a receiver lets its loop stop when nobody else watches.
        self.services.retain(|name, _| names.contains(name));
        for name in names.iter().filter(|n| !NOT_ROUTES.contains(&n.as_str())) {
            if !self.services.contains_key(name) {
                let rx = self.watches.service(name);
                self.services.insert(name.clone(), rx);
            }
        }
        self.synced = Some(names);
    }

    /// Whether every followed service (and the catalog) has answered.
    pub(crate) fn all_answered(&self) -> bool {
        self.catalog_answered() && self.services.values().all(|rx| rx.borrow().is_some())
    }

    /// Whether enough has answered to send a snapshot that does not lie:
    /// the catalog in catalog mode, some service otherwise.
    pub(crate) fn any_answered(&self) -> bool {
        match &self.catalog {
            Some(_) => self.catalog_answered(),
            None => self.services.values().any(|rx| rx.borrow().is_some()),
        }
    }

    /// The answered services now.
    pub(crate) fn state(&self) -> State {
        self.services
            .iter()
            .filter_map(|(name, rx)| Some((name.clone(), rx.borrow().clone()?)))
            .collect()
    }

    /// Waits for any watch to apply an answer; `false` once the watches are gone.
    pub(crate) async fn changed(&mut self) -> bool {
        self.changes.changed().await.is_ok()
    }

    fn catalog_answered(&self) -> bool {
        self.catalog.as_ref().is_none_or(|c| c.borrow().is_some())
    }
}
