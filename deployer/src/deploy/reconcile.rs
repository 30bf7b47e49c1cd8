//! Start-up reconciliation: a deployer that died (SIGKILL, power loss) in
//! the middle of a deploy leaves two instances of the service running —
//! the old one, still registered and serving, and the new one, registered
//! or not — and the next deployer adopts both. [`Deployments::reconcile`]
//! runs after adoption and before the deployer serves, and leaves one:
//!
//! - A service with an in-flight mark ([`super::inflight`]) whose deploy
//!   record names the mark's new instance, written after the mark: the
//!   new instance was routable and the swap decided, so the deploy is
//!   finished — the instances it replaced (and any other of the service)
//!   are deregistered, drained and stopped.
//! - A mark without such a record: the swap was not decided, so the deploy
//!   is undone — the new instance is deregistered (a proxy that does not
//!   know it is fine) and stopped; the old ones keep serving.
//! - Any service then still running more than one instance keeps the one
//!   its deploy record names and retires the others (a deploy cut short in
//!   the instant between starting its process and recording it, or by a
//!   deployer without marks). When the record names none of them, they are
//!   left running and a warning says so: there is no telling which one
//!   serves.
//!
//! The local proxy may be down while the node starts: each instance gets
//! one short deregistration attempt, and once one fails the others are not
//! tried; [`Deployments::deregister_later`] tries them again in the
//! background. Stopping never waits for the proxy: a stopped instance that
//! is still registered fails its Consul check and leaves the mesh anyway.
//! The drain after a deregistration is the deploy's, at most
//! [`STARTUP_DRAIN_MAX`].

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use mesh_runtime::{backoff::Backoff, shutdown::Shutdown};

use super::{
    DEFAULT_DRAIN, DEFAULT_STOP_GRACE, DeployRecord, Deployments, blocking,
    inflight::{self, InFlight},
    millis, record,
};
use crate::supervisor::InstanceState;

/// How long one deregistration may take at start-up (the proxy may be
/// starting too), and in a background retry (it holds the service).
const STARTUP_PROXY_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest drain at start-up.
const STARTUP_DRAIN_MAX: Duration = Duration::from_secs(5);
/// Rounds of background retries of the deregistrations start-up could not
/// do.
const RETRY_ROUNDS: u32 = 5;
/// The first and the longest wait between two rounds.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What [`Deployments::reconcile`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Services whose interrupted deploy was finished (the new instance
    /// kept, the old ones retired).
    pub finished: Vec<String>,
    /// Services whose interrupted deploy was undone (the new instance
    /// retired, the old ones kept).
    pub rolled_back: Vec<String>,
    /// The instances stopped.
    pub stopped: Vec<String>,
    /// The instances the local proxy could not be told to deregister, as
    /// `(service, instance id)`: for [`Deployments::deregister_later`].
    pub pending: Vec<(String, String)>,
}

/// How an interrupted deploy is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// The swap was decided: keep the new instance.
    Finish,
    /// It was not: keep the old ones.
    RollBack,
}

/// What start-up does with one service.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// How its interrupted deploy is settled, if it had one.
    settle: Option<Settle>,
    /// Instances to deregister (running or not).
    deregister: BTreeSet<String>,
    /// Running instances to stop.
    stop: BTreeSet<String>,
}

// === impl Deployments ===

impl Deployments {
    /// Settles the deploys an earlier deployer died in and retires
    /// duplicate instances (see the module docs). Call it after
    /// [`crate::supervisor::Supervisor::adopt`] and before serving.
    pub async fn reconcile(&self) -> Reconciled {
        let markers = self.read_markers().await;
        let mut live: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for s in self.inner.supervisor.list().await {
            if s.state != InstanceState::Stopped {
                live.entry(s.service).or_default().insert(s.instance_id);
            }
        }
        let services: BTreeSet<String> = markers.keys().chain(live.keys()).cloned().collect();
        let mut report = Reconciled::default();
        let mut work = Vec::new();
        for service in services {
            let service = &service;
            let marker = markers.get(service);
            let instances = live.get(service).cloned().unwrap_or_default();
            let record = self.read_record(service).await;
            let plan = plan(marker, record.as_ref(), &instances);
            log_plan(service, &plan, &instances);
            match plan.settle {
                Some(Settle::Finish) => report.finished.push(service.clone()),
                Some(Settle::RollBack) => report.rolled_back.push(service.clone()),
                None => {}
            }
            let (drain, grace) = match (marker, &record) {
                (Some(m), _) => (m.drain_ms, m.stop_grace_ms),
                (None, Some(r)) => (r.spec.drain_ms, r.spec.stop_grace_ms),
                (None, None) => (millis(DEFAULT_DRAIN), millis(DEFAULT_STOP_GRACE)),
            };
            let (drain, grace) = (Duration::from_millis(drain), Duration::from_millis(grace));
            work.push((service.clone(), plan, drain, grace));
        }
        let mut drain = Duration::ZERO;
        for (service, plan, plan_drain, _) in &work {
            for id in &plan.deregister {
                if !report.pending.is_empty() {
                    // The proxy did not answer: do not wait for it again.
                    report.pending.push((service.clone(), id.clone()));
                    continue;
                }
                match self.deregister_within(id, STARTUP_PROXY_TIMEOUT).await {
                    Ok(()) => {
                        tracing::info!(instance = %id, "deregistered");
                        if plan.stop.contains(id) {
                            drain = drain.max(*plan_drain);
                        }
                    }
                    Err(reason) => {
                        tracing::warn!(instance = %id, %reason, "cannot deregister; retrying in the background");
                        report.pending.push((service.clone(), id.clone()));
                    }
                }
            }
        }
        if !drain.is_zero() {
            tokio::time::sleep(drain.min(STARTUP_DRAIN_MAX)).await;
        }
        for (_, plan, _, grace) in &work {
            for id in &plan.stop {
                self.discard(id, *grace).await;
                report.stopped.push(id.clone());
            }
        }
        for service in markers.keys() {
            self.remove_marker(service).await;
        }
        self.refresh_in_use().await;
        report
    }

    /// Tries again the deregistrations [`Deployments::reconcile`] could
    /// not do (`(service, instance id)`), a few rounds apart (jittered
    /// backoff), until they are done, [`RETRY_ROUNDS`] rounds failed, or
    /// `shutdown`. Each holds its service like a deploy (one under way
    /// puts it off to the next round), and an instance that runs again by
    /// then (a new deploy of the same version got the same port) is left
    /// registered.
    pub async fn deregister_later(self, mut ids: Vec<(String, String)>, mut shutdown: Shutdown) {
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        for _ in 0..RETRY_ROUNDS {
            if ids.is_empty() {
                return;
            }
            let round = async {
                backoff.wait().await;
                let mut left = Vec::new();
                for (service, id) in ids.drain(..) {
                    if !self.deregister_retired(&service, &id).await {
                        left.push((service, id));
                    }
                }
                left
            };
            tokio::select! {
                left = round => ids = left,
                () = shutdown.requested() => return,
            }
        }
        if !ids.is_empty() {
            tracing::warn!(
                instances = ?ids,
                "gave up deregistering; their failing Consul checks take them out of the mesh"
            );
        }
    }

    /// One background try of [`Deployments::deregister_later`]; whether
    /// it is settled.
    async fn deregister_retired(&self, service: &str, id: &str) -> bool {
        let Ok(_claim) = self.claim(service, None) else {
            return false;
        };
        let runs = self
            .inner
            .supervisor
            .status(id)
            .await
            .is_some_and(|s| s.state != InstanceState::Stopped);
        if runs {
            tracing::info!(instance = %id, "runs again; left registered");
            return true;
        }
        match self.deregister_within(id, STARTUP_PROXY_TIMEOUT).await {
            Ok(()) => {
                tracing::info!(instance = %id, "deregistered");
                true
            }
            Err(reason) => {
                tracing::debug!(instance = %id, %reason, "cannot deregister yet");
                false
            }
        }
    }

    /// The in-flight marks by service; unreadable ones are logged and left.
    async fn read_markers(&self) -> BTreeMap<String, InFlight> {
        let dir = self.inner.in_flight_dir.clone();
        let read = match blocking(move || inflight::read_all(&dir)).await {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the in-flight marks");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the in-flight marks");
                Vec::new()
            }
        };
        let mut markers = BTreeMap::new();
        for (path, parsed) in read {
            match parsed {
                Ok(m) => {
                    markers.insert(m.service.clone(), m);
                }
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "ignoring unreadable in-flight mark")
                }
            }
        }
        markers
    }

    async fn read_record(&self, service: &str) -> Option<DeployRecord> {
        let (dir, name) = (self.inner.records_dir.clone(), service.to_owned());
        match blocking(move || record::read(&dir, &name)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(%service, error = %e, "cannot read the deploy record");
                None
            }
            Err(e) => {
                tracing::warn!(%service, error = %e, "cannot read the deploy record");
                None
            }
        }
    }

    async fn remove_marker(&self, service: &str) {
        let (dir, name) = (self.inner.in_flight_dir.clone(), service.to_owned());
        match blocking(move || inflight::remove(&dir, &name)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(%service, error = %e, "cannot remove the in-flight mark"),
            Err(e) => tracing::warn!(%service, error = %e, "cannot remove the in-flight mark"),
        }
    }
}

/// What to do with a service that had `marker` in flight (or none), whose
/// last deploy is `record`, and that runs `live`.
fn plan(marker: Option<&InFlight>, record: Option<&DeployRecord>, live: &BTreeSet<String>) -> Plan {
    let mut plan = Plan::default();
    let mut kept = live.clone();
    if let Some(m) = marker {
        let decided = record
            .is_some_and(|r| r.instance_id == m.instance_id && r.deployed_at_ms >= m.started_at_ms)
            && live.contains(&m.instance_id);
        if decided {
            plan.settle = Some(Settle::Finish);
            let others = live.iter().filter(|id| **id != m.instance_id);
            plan.deregister = m.replaces.iter().chain(others).cloned().collect();
            plan.deregister.remove(&m.instance_id);
        } else {
            plan.settle = Some(Settle::RollBack);
            plan.deregister.insert(m.instance_id.clone());
        }
        plan.stop = plan.deregister.intersection(live).cloned().collect();
        kept.retain(|id| !plan.stop.contains(id));
    }
    let named = record
        .map(|r| &r.instance_id)
        .filter(|id| kept.contains(*id));
    if let (true, Some(keep)) = (kept.len() > 1, named) {
        for id in kept.iter().filter(|id| *id != keep) {
            plan.deregister.insert(id.clone());
            plan.stop.insert(id.clone());
        }
    }
    plan
}

fn log_plan(service: &str, plan: &Plan, live: &BTreeSet<String>) {
    let kept: Vec<&String> = live.iter().filter(|id| !plan.stop.contains(*id)).collect();
    match plan.settle {
        Some(Settle::Finish) => tracing::warn!(
            %service, ?kept, retired = ?plan.deregister,
            "a deploy was interrupted after its swap was decided; finishing it"
        ),
        Some(Settle::RollBack) => tracing::warn!(
            %service, ?kept, retired = ?plan.deregister,
            "a deploy was interrupted before its swap was decided; undoing it"
        ),
        None if !plan.stop.is_empty() => tracing::warn!(
            %service, ?kept, retired = ?plan.stop,
            "more than one instance runs; keeping the one of the last deploy"
        ),
        None => {}
    }
    if kept.len() > 1 {
        tracing::warn!(
            %service, instances = ?kept,
            "more than one instance runs and the deploy record names none of them; leaving them"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::DeploySpec;

    fn ids(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn marker(new: &str, replaces: &[&str]) -> InFlight {
        InFlight {
            service: "orders".into(),
            instance_id: new.into(),
            replaces: replaces.iter().map(|s| (*s).to_owned()).collect(),
            started_at_ms: 100,
            drain_ms: 0,
            stop_grace_ms: 0,
        }
    }

    fn record(instance: &str, at: u64) -> DeployRecord {
        DeployRecord {
            spec: DeploySpec::new("orders", "1", "run"),
            instance_id: instance.into(),
            deployed_at_ms: at,
        }
    }

    #[test]
    fn a_decided_swap_is_finished() {
        let m = marker("o-2-2", &["o-1-1", "o-0-0"]);
        let p = plan(
            Some(&m),
            Some(&record("o-2-2", 150)),
            &ids(&["o-1-1", "o-2-2"]),
        );
        assert_eq!(p.settle, Some(Settle::Finish));
        // o-0-0 was stopped already; its registration may be left.
        assert_eq!(p.deregister, ids(&["o-0-0", "o-1-1"]));
        assert_eq!(p.stop, ids(&["o-1-1"]));
    }

    #[test]
    fn an_undecided_swap_is_undone() {
        let m = marker("o-2-2", &["o-1-1"]);
        let live = ids(&["o-1-1", "o-2-2"]);
        for r in [None, Some(record("o-1-1", 50)), Some(record("o-2-2", 50))] {
            let p = plan(Some(&m), r.as_ref(), &live);
            assert_eq!(p.settle, Some(Settle::RollBack), "{r:?}");
            assert_eq!(p.deregister, ids(&["o-2-2"]));
            assert_eq!(p.stop, ids(&["o-2-2"]));
        }
        // A new instance whose process was never recorded: deregistered.
        let p = plan(Some(&m), None, &ids(&["o-1-1"]));
        assert_eq!((p.deregister, p.stop), (ids(&["o-2-2"]), ids(&[])));
    }

    #[test]
    fn duplicates_without_a_mark_keep_the_recorded_instance() {
        let live = ids(&["o-1-1", "o-2-2", "o-3-3"]);
        let p = plan(None, Some(&record("o-2-2", 1)), &live);
        assert_eq!(p.settle, None);
        assert_eq!(p.stop, ids(&["o-1-1", "o-3-3"]));
        assert_eq!(p.deregister, p.stop);
        // No record naming one of them: nothing is guessed.
        assert_eq!(
            plan(None, Some(&record("o-9-9", 1)), &live),
            Plan::default()
        );
        assert_eq!(plan(None, None, &live), Plan::default());
        // One instance: nothing to do.
        let one = ids(&["o-1-1"]);
        assert_eq!(plan(None, Some(&record("o-2-2", 1)), &one), Plan::default());
    }
}
