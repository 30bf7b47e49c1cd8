//! The leader lock: one replica holds `mesh/leader` with a Consul session
//! (a TTL, renewed well before it runs out) and is the one that will run
//! rollouts; every replica serves the API either way.
//!
//! Each replica runs one [`Elector`] task: it keeps a session, watches the
//! lock key with a blocking query, and takes the lock whenever it is free.
//! So a replica that releases the lock on shutdown hands it over at once,
//! and one that dies loses it when Consul invalidates its session (after
//! the TTL, which Consul may stretch up to twice). The state is published
//! on a `watch` channel: who leads, whether this replica does, and whether
//! Consul answers (which makes the replica ready).

use std::time::{Duration, Instant};

use consul_client::{Client, QueryOptions, SessionRequest};
use mesh_runtime::{backoff::Backoff, shutdown::Shutdown};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{metrics::ControlMetrics, model::now_ms, store::LEADER_KEY};

/// How long a dead leader's lock stays blocked after Consul invalidates
/// its session (Consul's own default is 15 s).
pub const LOCK_DELAY: &str = "1s";

/// How long releasing the lock may take on shutdown.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// A replica as the lock's value names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The replica.
    pub replica: String,
    /// Its gRPC address.
    pub grpc: String,
    /// Its HTTP address.
    pub http: String,
    /// When it took the lock, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

/// What the elector knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderState {
    /// The replica holding the lock, if any.
    pub leader: Option<LeaderInfo>,
    /// Whether this replica holds it.
    pub is_leader: bool,
    /// Whether Consul answered the last call.
    pub consul_ok: bool,
}

/// Keeps a session and takes the lock when it is free.
#[derive(Debug)]
pub struct Elector {
    consul: Client,
    me: LeaderInfo,
    ttl: Duration,
    state: watch::Sender<LeaderState>,
    metrics: ControlMetrics,
    session: Option<String>,
    renewed: Instant,
    index: u64,
}

// === impl Elector ===

impl Elector {
    /// An elector for replica `me` with session TTL `ttl` (10 s or more:
    /// Consul's minimum), and the receiving end of its state.
    pub fn new(
        consul: Client,
        me: LeaderInfo,
        ttl: Duration,
        metrics: ControlMetrics,
    ) -> (Self, watch::Receiver<LeaderState>) {
        let (state, rx) = watch::channel(LeaderState::default());
        let elector = Self {
            consul,
            me,
            ttl,
            state,
            metrics,
            session: None,
            renewed: Instant::now(),
            index: 0,
        };
        (elector, rx)
    }

    /// Runs until `shutdown`, then releases the lock and destroys the session.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_millis(250), self.ttl / 4);
        while !shutdown.is_requested() {
            let step = tokio::select! {
                _ = shutdown.requested() => break,
                step = self.step() => step,
            };
            match step {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    tracing::warn!(error = %e, "leader lock: Consul call failed");
                    self.index = 0;
                    self.publish(None, false, false);
                    tokio::select! {
                        _ = shutdown.requested() => break,
                        _ = backoff.wait() => {}
                    }
                }
            }
        }
        self.resign().await;
    }

    /// One round: keep the session, read the lock (blocking until it
    /// changes or a third of the TTL passes), take it if free.
    async fn step(&mut self) -> Result<(), consul_client::Error> {
        let session = self.session().await?;
        let wait = self.ttl / 3;
        let read = self
            .consul
            .kv_get(LEADER_KEY, QueryOptions::blocking(self.index, wait))
            .await?;
        // An index that goes backwards (a restored snapshot) starts over.
        self.index = if read.index < self.index {
            0
        } else {
            read.index
        };
        let holder = read.value.as_ref().and_then(|p| p.session.clone());
        match holder {
            Some(holder) => {
                let leader = read
                    .value
                    .as_ref()
                    .and_then(|p| serde_json::from_slice::<LeaderInfo>(&p.value).ok());
                self.publish(leader, holder == session, true);
            }
            None => {
                let me = LeaderInfo {
                    since_ms: now_ms(),
                    ..self.me.clone()
                };
                let value = serde_json::to_vec(&me).unwrap_or_default();
                let taken = self.consul.kv_acquire(LEADER_KEY, &value, &session).await?;
                if taken {
                    tracing::info!(replica = %me.replica, "took the leader lock");
                    self.publish(Some(me), true, true);
                } else {
                    self.publish(None, false, true);
                }
                // Read the key again at once: whoever holds it now.
                self.index = 0;
            }
        }
        Ok(())
    }

    /// The session, created or renewed as needed.
    async fn session(&mut self) -> Result<String, consul_client::Error> {
        if let Some(id) = &self.session {
            if self.renewed.elapsed() < self.ttl / 3 {
                return Ok(id.clone());
            }
            if self.consul.session_renew(id).await? {
                self.renewed = Instant::now();
                return Ok(id.clone());
            }
            tracing::warn!("leader lock: the session expired; making a new one");
            self.session = None;
            self.publish(None, false, true);
        }
        let request = SessionRequest {
            name: Some(format!("mesh-control {}", self.me.replica)),
            ttl: Some(format!("{}s", self.ttl.as_secs())),
            behavior: Some("release".into()),
            lock_delay: Some(LOCK_DELAY.into()),
        };
        let id = self.consul.session_create(&request).await?;
        self.renewed = Instant::now();
        self.session = Some(id.clone());
        Ok(id)
    }

    fn publish(&self, leader: Option<LeaderInfo>, is_leader: bool, consul_ok: bool) {
        let was_leader = self.state.borrow().is_leader;
        // Without a holder read from Consul, keep showing the last one.
        let leader = if consul_ok {
            leader
        } else {
            leader.or_else(|| self.state.borrow().leader.clone())
        };
        let next = LeaderState {
            leader,
            is_leader,
            consul_ok,
        };
        if was_leader != is_leader {
            self.metrics.leading(is_leader);
            if !is_leader {
                tracing::warn!(replica = %self.me.replica, "no longer the leader");
            }
        }
        self.state.send_if_modified(|s| {
            let changed = *s != next;
            *s = next;
            changed
        });
    }

    /// Releases the lock (so another replica takes it at once) and
    /// destroys the session.
    async fn resign(mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let consul = self.consul.clone();
        let leading = self.state.borrow().is_leader;
        let release = async {
            if leading {
                consul.kv_release(LEADER_KEY, &session).await?;
            }
            consul.session_destroy(&session).await
        };
        match tokio::time::timeout(RELEASE_TIMEOUT, release).await {
            Ok(Ok(())) => {
                if leading {
                    tracing::info!(replica = %self.me.replica, "released the leader lock");
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not release the leader lock"),
            Err(_) => tracing::warn!("releasing the leader lock timed out"),
        }
        if leading {
            self.metrics.leading(false);
        }
        self.state.send_replace(LeaderState::default());
    }
}
