//! The one place that follows the watches for every stream: it holds one
//! receiver per followed service (and the catalog's while some stream
//! follows all), records each applied answer in the [`Ledger`] once, and
//! wakes the streams.
//!
//! Streams register what they follow and read the ledger under its lock;
//! the lock is held for bookkeeping and copying shared buffers, never
//! across an await.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use mesh_runtime::shutdown::Shutdown;
use tokio::sync::watch;

use super::ledger::{Follow, Ledger, Watching};
use crate::watch::{CatalogView, ServiceView, Watches};

/// The shared ledger and the receivers that feed it. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Hub {
    inner: Arc<Inner>,
}

/// What one stream follows, until it is dropped.
#[derive(Debug)]
pub(crate) struct Registration {
    hub: Hub,
    follow: Follow,
}

#[derive(Debug)]
struct Inner {
    watches: Watches,
    state: Mutex<State>,
    /// Bumped after every change of the ledger.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    ledger: Ledger,
    services: HashMap<Arc<str>, watch::Receiver<ServiceView>>,
    /// Held while some stream follows all.
    catalog: Option<watch::Receiver<CatalogView>>,
    /// Streams following all.
    following_all: usize,
}

// === impl Hub ===

impl Hub {
    /// A hub on `watches`; [`Hub::run`] keeps it in step with them.
    pub(crate) fn new(watches: Watches) -> Self {
        let inner = Inner {
            watches,
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Records every applied answer until shutdown.
    pub(crate) async fn run(&self, mut shutdown: Shutdown) {
        let mut changes = self.inner.watches.changes();
        loop {
            self.sync();
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = shutdown.requested() => return,
            }
        }
    }

    /// Follows what `follow` names until the registration is dropped.
    pub(crate) fn register(&self, follow: Follow) -> Registration {
        self.update(|state, watches| match &follow {
            Follow::Named(names) => {
                for name in names {
                    if state.ledger.follow(name) {
                        state.watch(watches, Arc::from(name.as_str()));
                    }
                }
            }
            Follow::All => {
                state.following_all += 1;
                if state.catalog.is_none() {
                    let mut rx = watches.catalog();
                    let names = rx.borrow_and_update().clone();
                    state.catalog = Some(rx);
                    let watching = state.ledger.route(names.as_deref());
                    state.apply(watches, watching);
                }
            }
        });
        Registration {
            hub: self.clone(),
            follow,
        }
    }

    /// Wakes each time the ledger changed.
    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Runs `f` on the ledger.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        f(&mut self.lock().ledger)
    }

    /// Takes in every answer applied since the last call.
    fn sync(&self) {
        self.update(|state, watches| {
            if let Some(rx) = &mut state.catalog
                && rx.has_changed().unwrap_or(false)
            {
                let names = rx.borrow_and_update().clone();
                // Before its first answer the catalog is `None`, which
                // `route` reads as "nobody follows all": keep waiting.
                if let Some(names) = names {
                    let watching = state.ledger.route(Some(&names));
                    state.apply(watches, watching);
                }
            }
            for (name, rx) in &mut state.services {
                if rx.has_changed().unwrap_or(false) {
                    let view = rx.borrow_and_update().clone();
                    state.ledger.answer(name, view);
                }
            }
        });
    }

    fn unregister(&self, follow: &Follow) {
        self.update(|state, watches| match follow {
            Follow::Named(names) => {
                for name in names {
                    if state.ledger.unfollow(name) {
                        state.services.remove(name.as_str());
                    }
                }
            }
            Follow::All => {
                state.following_all = state.following_all.saturating_sub(1);
                if state.following_all == 0 {
                    state.catalog = None;
                    let watching = state.ledger.route(None);
                    state.apply(watches, watching);
                }
            }
        });
    }

    /// Changes the state under the lock, then wakes the streams if the
    /// ledger changed.
    fn update(&self, f: impl FnOnce(&mut State, &Watches)) {
        let (before, after) = {
            let mut state = self.lock();
            let before = state.ledger.mark();
            f(&mut state, &self.inner.watches);
            (before, state.ledger.mark())
        };
        if before != after {
            self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change of the state is completed before the guard drops;
        // a panic cannot leave it half-done.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl State ===

impl State {
    /// Starts and stops watches as the ledger asks.
    fn apply(&mut self, watches: &Watches, watching: Watching) {
        for name in watching.stopped {
            // Dropping the receiver lets the loop stop when nobody else
            // watches the service.
            self.services.remove(&name);
        }
        for name in watching.started {
            self.watch(watches, name);
        }
    }

    /// Watches `name` and records what is already known of it.
    fn watch(&mut self, watches: &Watches, name: Arc<str>) {
        let mut rx = watches.service(&name);
        let view = rx.borrow_and_update().clone();
        self.ledger.answer(&name, view);
        self.services.insert(name, rx);
    }
}

// === impl Registration ===

impl Registration {
    /// What the stream follows.
    pub(crate) fn follow(&self) -> &Follow {
        &self.follow
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(&self.follow);
    }
}
