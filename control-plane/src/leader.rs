//! The leader lock: one replica holds `mesh/leader` with a Consul session
//! and is the one that will run rollouts; every replica serves the API
//! either way.
//!
//! Each replica runs one [`Elector`] task: it keeps a session, watches the
//! lock key with a blocking query, and takes the lock whenever it is free.
//! A replica that releases the lock on shutdown hands it over at once.
//!
//! One that dies must lose it fast, and one that is alive must not. So
//! each replica registers itself on its local Consul agent as an instance
//! of the `mesh-control` service with a TTL check that a task of its own
//! passes every second, and binds its session to that check and to the
//! node's `serfHealth`. A killed replica stops passing: its check goes
//! critical after [`CHECK_TTL`], Consul invalidates the session, the lock
//! is released, and a waiting replica takes it after [`LOCK_DELAY`]. A
//! busy replica may miss a pass or two without losing anything. (The check
//! belongs to a service rather than to the node on purpose: a critical
//! node check would take every service on the node out of `?passing`
//! answers.) The session's own TTL, renewed by the elector, stays as a
//! backstop.
//!
//! The state is published on a `watch` channel: who leads, whether this
//! replica does, and whether Consul answers (which makes the replica ready).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use consul_client::{
    AgentServiceCheck, AgentServiceRegistration, Client, QueryOptions, SessionRequest,
};
use mesh_runtime::{
    backoff::Backoff,
    shutdown::{self, Shutdown},
};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::MissedTickBehavior};
use tracing::Instrument;

use crate::{metrics::ControlMetrics, model::now_ms, store::LEADER_KEY};

/// How long the lock of an invalidated session (a dead leader's) stays
/// blocked before another replica may take it. It gives a leader that is
/// alive but lost its session (its check flapped) time to see the lock go
/// before a new leader starts: the old one's blocking query on the key
/// wakes within milliseconds of the release. Consul's default, 15 s, would
/// not fit a takeover within 10 s.
pub const LOCK_DELAY: &str = "1s";

/// How long this replica's check stays passing without a pass: how long a
/// dead leader holds the lock, less the lock delay.
pub const CHECK_TTL: Duration = Duration::from_secs(3);

/// How often the check is passed: two passes in a row may be missed (a
/// busy runtime, a slow agent) before it goes critical.
const PASS_EVERY: Duration = Duration::from_secs(1);

/// The service every replica registers on its agent, with its check.
pub const SERVICE_NAME: &str = "mesh-control";

/// The check Consul keeps for every node: down when the node's agent is.
const SERF_HEALTH: &str = "serfHealth";

/// After this long critical, the agent removes the instance of a replica
/// that died (Consul's shortest).
const REAP_CRITICAL_AFTER: &str = "1m";

/// A free lock that Consul refused (the lock delay of a dead holder's
/// session) is tried again after this.
const ACQUIRE_RETRY: Duration = Duration::from_millis(250);

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
    alive: AliveCheck,
    state: watch::Sender<LeaderState>,
    metrics: ControlMetrics,
    session: Option<String>,
    /// When the session was last known to exist; `None`: ask Consul.
    renewed: Option<Instant>,
    index: u64,
}

/// This replica on its local agent: a `mesh-control` instance whose TTL
/// check says the process is alive.
#[derive(Clone, Debug)]
struct AliveCheck {
    consul: Client,
    /// Both the instance's ID and its check's.
    id: String,
    registration: AgentServiceRegistration,
}

// === impl Elector ===

impl Elector {
    /// An elector for replica `me` with session TTL `ttl` (10 s or more:
    /// Consul's minimum), and the receiving end of its state. Its check's
    /// ID is `mesh-control-<replica>`: replicas on one agent need names of
    /// their own.
    pub fn new(
        consul: Client,
        me: LeaderInfo,
        ttl: Duration,
        metrics: ControlMetrics,
    ) -> (Self, watch::Receiver<LeaderState>) {
        let (state, rx) = watch::channel(LeaderState::default());
        let elector = Self {
            alive: AliveCheck::new(consul.clone(), &me),
            consul,
            me,
            ttl,
            state,
            metrics,
            session: None,
            renewed: None,
            index: 0,
        };
        (elector, rx)
    }

    /// Runs until `shutdown`, then releases the lock, destroys the session
    /// and deregisters the replica's check.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        // The check is passed by a task of its own, so that a slow Consul
        // call here never delays a pass; it runs until the lock is released.
        let (stop_passing, passing) = shutdown::channel();
        let span = tracing::info_span!("alive_check", check = %self.alive.id);
        let passer = tokio::spawn(self.alive.clone().keep_passing(passing).instrument(span));
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
                    // The session may be what failed: check it first.
                    self.renewed = None;
                    self.publish(None, false, false);
                    tokio::select! {
                        _ = shutdown.requested() => break,
                        _ = backoff.wait() => {}
                    }
                }
            }
        }
        self.resign().await;
        stop_passing.trigger();
        if let Err(e) = passer.await {
            tracing::warn!(error = %e, "the alive check task failed");
        }
        self.alive.deregister().await;
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
            None if self.state.borrow().is_leader => {
                // Lost without letting go: Consul invalidated the session
                // (its check went critical). Check it before trying again.
                tracing::warn!(replica = %self.me.replica, "the leader lock was released by Consul");
                self.renewed = None;
                self.index = 0;
                self.publish(None, false, true);
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
                    // Free but refused: the lock delay after a dead
                    // holder's session, which no blocking read would wake.
                    tokio::time::sleep(ACQUIRE_RETRY).await;
                }
                // Read the key again at once: whoever holds it now.
                self.index = 0;
            }
        }
        Ok(())
    }

    /// The session, created or renewed as needed.
    async fn session(&mut self) -> Result<String, consul_client::Error> {
        if let Some(id) = self.session.clone() {
            if self.renewed.is_some_and(|at| at.elapsed() < self.ttl / 3) {
                return Ok(id);
            }
            if self.consul.session_renew(&id).await? {
                self.renewed = Some(Instant::now());
                return Ok(id);
            }
            tracing::warn!(
                "leader lock: the session is gone (its check went critical or its TTL ran out); \
                 making a new one"
            );
            self.session = None;
            self.publish(None, false, true);
        }
        // Consul refuses a session bound to a check that is missing or
        // critical: (re-)register it passing first.
        self.alive.register().await?;
        let request = SessionRequest {
            name: Some(format!("mesh-control {}", self.me.replica)),
            ttl: Some(format!("{}s", self.ttl.as_secs())),
            behavior: Some("release".into()),
            lock_delay: Some(LOCK_DELAY.into()),
            checks: vec![SERF_HEALTH.into(), self.alive.id.clone()],
        };
        let id = self.consul.session_create(&request).await?;
        self.renewed = Some(Instant::now());
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
    /// destroys the session (in this order: destroying a session that
    /// still holds the lock would block it for the lock delay).
    async fn resign(&mut self) {
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

// === impl AliveCheck ===

impl AliveCheck {
    fn new(consul: Client, me: &LeaderInfo) -> Self {
        let id = format!("{SERVICE_NAME}-{}", me.replica);
        // The instance points at the replica's HTTP port (REST, /ready).
        let http = me
            .http
            .strip_prefix("http://")
            .and_then(|a| a.parse::<SocketAddr>().ok());
        let registration = AgentServiceRegistration {
            id: Some(id.clone()),
            name: SERVICE_NAME.into(),
            address: http
                .filter(|a| !a.ip().is_unspecified())
                .map(|a| a.ip().to_string()),
            port: http.map(|a| a.port()),
            // `health-path`: where a prober (mesh-monitor) asks whether the
            // replica serves; the instance's port has no `/health`.
            meta: [
                ("replica".to_owned(), me.replica.clone()),
                ("grpc".to_owned(), me.grpc.clone()),
                ("health-path".to_owned(), "/live".to_owned()),
            ]
            .into(),
            check: Some(AgentServiceCheck {
                check_id: Some(id.clone()),
                name: Some(format!("mesh-control {} alive", me.replica)),
                ttl: Some(format!("{}s", CHECK_TTL.as_secs())),
                status: Some("passing".into()),
                deregister_critical_service_after: Some(REAP_CRITICAL_AFTER.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        Self {
            consul,
            id,
            registration,
        }
    }

    /// Registers the instance with its check passing (or re-registers it).
    async fn register(&self) -> Result<(), consul_client::Error> {
        self.consul.agent_service_register(&self.registration).await
    }

    /// Passes the check every [`PASS_EVERY`] until `stop`.
    async fn keep_passing(self, mut stop: Shutdown) {
        let mut every = tokio::time::interval(PASS_EVERY);
        every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.requested() => break,
                _ = every.tick() => {}
            }
            let passed = match tokio::time::timeout(PASS_EVERY, self.pass()).await {
                Ok(passed) => passed.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {PASS_EVERY:?}")),
            };
            match &passed {
                Ok(()) if failing => tracing::info!("the alive check passes again"),
                Ok(()) => {}
                Err(e) if !failing => tracing::warn!(error = %e, "cannot pass the alive check"),
                Err(e) => tracing::debug!(error = %e, "cannot pass the alive check"),
            }
            failing = passed.is_err();
        }
    }

    async fn pass(&self) -> Result<(), consul_client::Error> {
        match self.consul.agent_check_pass(&self.id).await {
            // The agent does not know the check (it restarted, or another
            // agent answers now): register it again.
            Err(e) if !e.is_unreachable() => self.register().await,
            passed => passed,
        }
    }

    /// Removes the instance and its check from the agent.
    async fn deregister(&self) {
        let deregister = self.consul.agent_service_deregister(&self.id);
        match tokio::time::timeout(RELEASE_TIMEOUT, deregister).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not deregister the alive check"),
            Err(_) => tracing::warn!("deregistering the alive check timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use consul_client::ClientConfig;

    use super::*;

    fn alive(http: &str) -> AliveCheck {
        let consul = Client::new(&ClientConfig::new(["http://127.0.0.1:1"])).unwrap();
        let me = LeaderInfo {
            replica: "c1".into(),
            grpc: "http://10.0.0.5:8892".into(),
            http: http.into(),
            since_ms: 0,
        };
        AliveCheck::new(consul, &me)
    }

    #[test]
    fn a_replica_registers_its_http_port_with_a_passing_ttl_check_of_its_own() {
        let a = alive("http://10.0.0.5:8893");
        assert_eq!(a.id, "mesh-control-c1");
        let reg = &a.registration;
        assert_eq!(
            (reg.name.as_str(), reg.address.as_deref(), reg.port),
            (SERVICE_NAME, Some("10.0.0.5"), Some(8893))
        );
        assert_eq!(reg.meta["grpc"], "http://10.0.0.5:8892");
        let check = reg.check.as_ref().unwrap();
        assert_eq!(check.check_id.as_deref(), Some("mesh-control-c1"));
        assert_eq!(check.ttl.as_deref(), Some("3s"));
        assert_eq!(check.status.as_deref(), Some("passing"));
        assert!(check.deregister_critical_service_after.is_some());
        // Passes come often enough that two may be missed.
        assert!(PASS_EVERY * 2 < CHECK_TTL);
    }

    #[test]
    fn a_wildcard_listener_leaves_the_address_to_consul() {
        let reg = alive("http://0.0.0.0:8893").registration;
        assert_eq!((reg.address, reg.port), (None, Some(8893)));
    }
}
