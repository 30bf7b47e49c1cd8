//! Blue-green deploys on the node: [`Deployments`] runs a stored version of
//! a service next to the one serving, waits until it is healthy, swaps the
//! registrations in the local proxy's agent API, and stops the old one
//! after it drained.
//!
//! The swap drops no request. Consul starts the HTTP check of a newly
//! registered instance as critical, and the mesh routes only to instances
//! whose checks pass, so a new instance is not routable the moment its
//! registration is taken. Routable means listed in the local proxy's
//! routing table (its admin `/routes`), and the deploy waits for that
//! before it deregisters the old instances; an instance that never shows
//! up there is deregistered and stopped, and the old ones keep serving.
//! Once the old instances are deregistered, the deploy waits until the
//! local proxy no longer lists them, then `drain_ms` more: for the other
//! nodes' proxies to drop them too (they see the change from Consul in
//! order, so the new instance before the old one's removal) and for the
//! requests in flight to them to finish. Only then are they stopped.
//!
//! One deploy of a service runs at a time (a second one is refused, not
//! queued: the caller decides whether to try again). A deploy runs in a
//! task of its own, so a caller that hangs up does not leave it half done.
//! The instances of a service are the supervisor's; their ids are
//! `<service>-<version>-<port>`, which is how the port is known again
//! after a restart.
//!
//! A deploy survives the deployer dying in it. Before it starts the new
//! instance it writes an in-flight mark (the new instance, the ones it
//! replaces), and removes it once it ended, either way; the deploy record
//! is written once the new instance is routable, before the old ones are
//! retired. A deployer that starts and finds a mark settles the deploy
//! before it serves: finished (old instances deregistered and stopped)
//! when the record names the new instance, undone (new instance
//! deregistered and stopped, old ones left serving) otherwise; and any
//! service still running two instances keeps the one its record names
//! ([`reconcile`](Deployments::reconcile)).

pub(crate) mod http;
mod inflight;
mod reconcile;
mod record;
mod routes;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use ::http::Method;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use self::inflight::InFlight;
use self::routes::Waited;
pub use self::{
    http::HttpError,
    reconcile::Reconciled,
    record::{DeployRecord, now_ms},
};
use crate::{
    store::{ArtifactMeta, Store, StoreError},
    supervisor::{
        InstanceState, InstanceStatus, LogStream, ProcessSpec, Supervisor, SupervisorError,
        TemplateError, expand,
    },
};

/// Default health path.
pub const DEFAULT_HEALTH_PATH: &str = "/health";
/// Default time a new instance has to become healthy.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time an old instance keeps serving after it is deregistered.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
/// Default time an instance has to exit after SIGTERM.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// How often Consul runs the registered HTTP check.
pub const CHECK_INTERVAL: &str = "2s";
/// How long one run of the registered HTTP check may take.
pub const CHECK_TIMEOUT: &str = "1s";

/// How often the health gate asks.
const GATE_POLL: Duration = Duration::from_millis(200);
/// How long one health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call to the local proxy may take.
const PROXY_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of stderr a failed gate reports.
const GATE_LOG_LINES: usize = 20;
/// Bytes of a log read at most for a tail.
const TAIL_MAX_BYTES: u64 = 1024 * 1024;

/// One deploy: which version and how to run it. Also what a
/// [`DeployRecord`] keeps for a rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploySpec {
    /// The service.
    pub service: String,
    /// The stored version to run.
    pub version: String,
    /// The command template (see [`expand`]); variables `artifact`,
    /// `port`, `service`, `version`, `instance`.
    pub command: String,
    /// Environment on top of the supervisor's base environment.
    pub env: BTreeMap<String, String>,
    /// The working folder; `None`: `<data_dir>/work/<service>`.
    pub work_dir: Option<PathBuf>,
    /// The path that answers 2xx once the instance serves.
    pub health_path: String,
    /// How long the new instance has to become healthy, in ms.
    pub health_timeout_ms: u64,
    /// How long an old instance serves after it is deregistered, in ms.
    pub drain_ms: u64,
    /// How long an instance has to exit after SIGTERM, in ms.
    pub stop_grace_ms: u64,
    /// Tags of the registration.
    pub tags: Vec<String>,
    /// The address the instance listens on and is registered with.
    pub address: IpAddr,
}

/// An instance this deployer runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    /// The service.
    pub service: String,
    /// The version it runs.
    pub version: String,
    /// `<service>-<version>-<port>`.
    pub instance_id: String,
    /// Its port (0 if the id does not end in one).
    pub port: u16,
    /// Its process, while one runs.
    pub pid: Option<u32>,
    /// Where it is in its life.
    pub state: InstanceState,
    /// How often it was restarted after its process ended on its own.
    pub restarts: u32,
}

/// What a deploy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployOutcome {
    /// The instance now running and registered.
    pub instance: InstanceInfo,
    /// The instances it replaced (deregistered and stopped).
    pub replaced: Vec<String>,
}

/// Why a deploy (or a stop, a rollback) did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// A deploy or stop of the service is under way.
    #[error("a deploy of {0} is under way")]
    Busy(String),
    /// A value the caller gave cannot work.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The version is not stored.
    #[error("version {version} of {service} is not stored (upload it first)")]
    NotStored {
        /// The service.
        service: String,
        /// The version.
        version: String,
    },
    /// The new instance did not become healthy; it was stopped and the old
    /// one left serving.
    #[error("{instance} failed its health gate: {reason}{}", stderr_tail(.stderr))]
    Unhealthy {
        /// The instance that failed.
        instance: String,
        /// Why: the health answer, the process's exit, or no answer.
        reason: String,
        /// The last lines of its stderr.
        stderr: Vec<String>,
    },
    /// The local proxy did not take the registration of the new instance;
    /// it was stopped and the old one left serving.
    #[error("the local proxy did not register {instance}: {reason}")]
    Register {
        /// The instance.
        instance: String,
        /// What the proxy said, or why it could not be reached.
        reason: String,
    },
    /// The new instance was registered but the local proxy never listed
    /// it; it was deregistered and stopped and the old one left serving.
    #[error(
        "instance {instance} never became routable in the local proxy within {timeout:?} \
         (its Consul check may be failing){}",
        routes_failure(.routes_error)
    )]
    NotRoutable {
        /// The instance.
        instance: String,
        /// How long the deploy waited.
        timeout: Duration,
        /// Why the last read of `/routes` failed, if it did.
        routes_error: Option<String>,
    },
    /// Rollback has nothing to go back to.
    #[error("cannot roll back {service}: {reason}")]
    NoRollback {
        /// The service.
        service: String,
        /// Why.
        reason: String,
    },
    /// The supervisor could not start or read an instance.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    /// The artifact store failed.
    #[error("artifact store: {0}")]
    Store(#[from] StoreError),
    /// A file of the deployer's own failed, or its task did.
    #[error("{0}")]
    Internal(String),
}

/// Runs blue-green deploys on this node. Cheap to clone.
#[derive(Clone)]
pub struct Deployments {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    supervisor: Supervisor,
    proxy: SocketAddr,
    proxy_admin: SocketAddr,
    records_dir: PathBuf,
    in_flight_dir: PathBuf,
    work_dir: PathBuf,
    log_dir: PathBuf,
    /// Services with a deploy or stop under way, with the version being
    /// deployed (protected from pruning before its process runs).
    busy: Mutex<BTreeMap<String, Option<String>>>,
    /// Versions run per service, as of the last change (the store's prune
    /// hook reads it without waiting).
    running: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

/// A service claimed for one deploy or stop; released when dropped.
struct Claim {
    inner: Arc<Inner>,
    service: String,
}

// === impl DeploySpec ===

impl DeploySpec {
    /// A spec with the defaults for everything but what to run.
    pub fn new(service: &str, version: &str, command: &str) -> Self {
        Self {
            service: service.to_owned(),
            version: version.to_owned(),
            command: command.to_owned(),
            env: BTreeMap::new(),
            work_dir: None,
            health_path: DEFAULT_HEALTH_PATH.to_owned(),
            health_timeout_ms: millis(DEFAULT_HEALTH_TIMEOUT),
            drain_ms: millis(DEFAULT_DRAIN),
            stop_grace_ms: millis(DEFAULT_STOP_GRACE),
            tags: Vec::new(),
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    fn stop_grace(&self) -> Duration {
        Duration::from_millis(self.stop_grace_ms)
    }

    fn validate(&self) -> Result<(), DeployError> {
        crate::store::check_service(&self.service)?;
        crate::store::check_version(&self.version)?;
        if !self.health_path.starts_with('/') || self.health_path.contains(char::is_whitespace) {
            return Err(invalid(
                "health_path",
                format!(
                    "{:?} must start with '/' and hold no spaces",
                    self.health_path
                ),
            ));
        }
        if self.command.trim().is_empty() {
            return Err(invalid("command", "must not be empty".into()));
        }
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn invalid(field: &'static str, message: String) -> DeployError {
    DeployError::Invalid { field, message }
}

fn stderr_tail(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    format!("; the end of its stderr:\n{}", lines.join("\n"))
}

fn routes_failure(error: &Option<String>) -> String {
    match error {
        Some(e) => format!("; the last read of its /routes failed: {e}"),
        None => String::new(),
    }
}

// === impl InstanceInfo ===

impl InstanceInfo {
    fn from_status(s: &InstanceStatus) -> Self {
        Self {
            service: s.service.clone(),
            version: s.version.clone(),
            instance_id: s.instance_id.clone(),
            port: port_of(&s.instance_id),
            pid: s.pid,
            state: s.state,
            restarts: s.restarts,
        }
    }
}

/// The port an instance id ends in (`<service>-<version>-<port>`).
fn port_of(instance_id: &str) -> u16 {
    instance_id
        .rsplit_once('-')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(0)
}

// === impl Deployments ===

impl Deployments {
    /// Deploys from `store` with `supervisor`, registering through the
    /// proxy's agent API at `proxy` and reading what it routes to from its
    /// admin listener `proxy_admin`; records, working folders and logs go
    /// under `data_dir`.
    pub fn new(
        store: Store,
        supervisor: Supervisor,
        proxy: SocketAddr,
        proxy_admin: SocketAddr,
        data_dir: &Path,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                supervisor,
                proxy,
                proxy_admin,
                records_dir: data_dir.join("deploys"),
                in_flight_dir: data_dir.join("deploys").join("in-flight"),
                work_dir: data_dir.join("work"),
                log_dir: data_dir.join("logs"),
                busy: Mutex::default(),
                running: Mutex::default(),
            }),
        }
    }

    /// The versions of `service` in use: run, or being deployed. For the
    /// store's prune hook; never waits.
    pub fn in_use(&self, service: &str) -> Vec<String> {
        let mut versions = lock(&self.inner.running)
            .get(service)
            .cloned()
            .unwrap_or_default();
        if let Some(Some(v)) = lock(&self.inner.busy).get(service) {
            versions.insert(v.clone());
        }
        versions.into_iter().collect()
    }

    /// Reads again which versions run (after adoption, or any change).
    pub async fn refresh_in_use(&self) {
        let mut running: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for s in self.inner.supervisor.list().await {
            if s.state != InstanceState::Stopped {
                running.entry(s.service).or_default().insert(s.version);
            }
        }
        *lock(&self.inner.running) = running;
    }

    /// Deploys `spec` blue-green (see the module docs).
    pub async fn deploy(&self, spec: DeploySpec) -> Result<DeployOutcome, DeployError> {
        spec.validate()?;
        let claim = self.claim(&spec.service, Some(&spec.version))?;
        let this = self.clone();
        let task = tokio::spawn(async move {
            let result = this.run_deploy(&spec).await;
            this.refresh_in_use().await;
            drop(claim);
            result
        });
        task.await
            .map_err(|e| DeployError::Internal(format!("the deploy task failed: {e}")))?
    }

    /// Deploys the version of `service` stored before the one running,
    /// with the settings of its last deploy.
    pub async fn rollback(&self, service: &str) -> Result<DeployOutcome, DeployError> {
        crate::store::check_service(service)?;
        let no = |reason: String| DeployError::NoRollback {
            service: service.to_owned(),
            reason,
        };
        let dir = self.inner.records_dir.clone();
        let name = service.to_owned();
        let last = blocking(move || record::read(&dir, &name))
            .await?
            .map_err(|e| DeployError::Internal(format!("deploy record of {service}: {e}")))?
            .ok_or_else(|| no("it was never deployed here".into()))?;
        let current = self
            .instances_of(service)
            .await
            .into_iter()
            .map(|s| s.version)
            .next()
            .unwrap_or_else(|| last.spec.version.clone());
        let store = self.inner.store.clone();
        let name = service.to_owned();
        let stored = blocking(move || store.list(Some(&name))).await??;
        let position = stored
            .iter()
            .position(|m| m.version == current)
            .ok_or_else(|| no(format!("the running version {current} is no longer stored")))?;
        let previous = stored
            .get(position + 1)
            .ok_or_else(|| no(format!("no version older than {current} is stored")))?;
        tracing::info!(%service, from = %current, to = %previous.version, "rolling back");
        let spec = DeploySpec {
            version: previous.version.clone(),
            ..last.spec
        };
        self.deploy(spec).await
    }

    /// Deregisters and stops every instance of `service`; returns their
    /// ids.
    pub async fn stop(&self, service: &str, grace: Duration) -> Result<Vec<String>, DeployError> {
        crate::store::check_service(service)?;
        let claim = self.claim(service, None)?;
        let this = self.clone();
        let service = service.to_owned();
        let task = tokio::spawn(async move {
            let old = this.instances_of(&service).await;
            let stopped = this.retire(&service, &old, Duration::ZERO, grace).await;
            this.refresh_in_use().await;
            drop(claim);
            stopped
        });
        task.await
            .map_err(|e| DeployError::Internal(format!("the stop task failed: {e}")))
    }

    /// The instances this deployer runs (of `service`, or all).
    pub async fn status(&self, service: Option<&str>) -> Vec<InstanceInfo> {
        self.inner
            .supervisor
            .list()
            .await
            .iter()
            .filter(|s| service.is_none_or(|name| s.service == name))
            .map(InstanceInfo::from_status)
            .collect()
    }

    /// The last `lines` lines of an instance's log `stream`.
    pub async fn log_tail(
        &self,
        instance_id: &str,
        stream: LogStream,
        lines: usize,
    ) -> Result<Vec<String>, DeployError> {
        Ok(self
            .inner
            .supervisor
            .log_tail(instance_id, stream, lines, TAIL_MAX_BYTES)
            .await?)
    }

    fn claim(&self, service: &str, version: Option<&str>) -> Result<Claim, DeployError> {
        let mut busy = lock(&self.inner.busy);
        if busy.contains_key(service) {
            return Err(DeployError::Busy(service.to_owned()));
        }
        busy.insert(service.to_owned(), version.map(str::to_owned));
        Ok(Claim {
            inner: self.inner.clone(),
            service: service.to_owned(),
        })
    }

    /// The deploy itself, under the claim: marks it in flight (so that a
    /// deployer that dies in it can finish or undo it when it starts
    /// again, see [`Deployments::reconcile`]), swaps, and removes the mark
    /// however the swap ended.
    async fn run_deploy(&self, spec: &DeploySpec) -> Result<DeployOutcome, DeployError> {
        let meta = self.artifact(spec).await?;
        let port = free_port(spec.address)?;
        let process = self.process_spec(spec, &meta, port)?;
        // Before the new instance exists: every instance of the service.
        let old = self.instances_of(&spec.service).await;
        let marker = InFlight {
            service: spec.service.clone(),
            instance_id: process.instance_id.clone(),
            replaces: old.iter().map(|s| s.instance_id.clone()).collect(),
            started_at_ms: now_ms(),
            drain_ms: spec.drain_ms,
            stop_grace_ms: spec.stop_grace_ms,
        };
        let dir = self.inner.in_flight_dir.clone();
        blocking(move || inflight::write(&dir, &marker))
            .await?
            .map_err(|e| {
                DeployError::Internal(format!("cannot mark the deploy of {}: {e}", spec.service))
            })?;
        let addr = SocketAddr::new(spec.address, port);
        let result = self.swap(spec, process, addr, &old).await;
        let (dir, service) = (self.inner.in_flight_dir.clone(), spec.service.clone());
        match blocking(move || inflight::remove(&dir, &service)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(service = %spec.service, error = %e, "cannot remove the in-flight mark")
            }
            Err(e) => {
                tracing::warn!(service = %spec.service, error = %e, "cannot remove the in-flight mark")
            }
        }
        result
    }

    /// Start `process` (listening on `addr`), gate, register, wait until
    /// routable, swap with `old`.
    async fn swap(
        &self,
        spec: &DeploySpec,
        process: ProcessSpec,
        addr: SocketAddr,
        old: &[InstanceStatus],
    ) -> Result<DeployOutcome, DeployError> {
        let id = process.instance_id.clone();
        tracing::info!(service = %spec.service, version = %spec.version, instance = %id, "deploying");
        self.inner.supervisor.start(process).await?;
        if let Err(reason) = self.health_gate(spec, &id, addr).await {
            let stderr = self
                .inner
                .supervisor
                .log_tail(&id, LogStream::Err, GATE_LOG_LINES, TAIL_MAX_BYTES)
                .await
                .unwrap_or_default();
            tracing::warn!(instance = %id, %reason, "health gate failed; stopping the new instance");
            self.discard(&id, spec.stop_grace()).await;
            return Err(DeployError::Unhealthy {
                instance: id,
                reason,
                stderr,
            });
        }
        self.bring_in(spec, &id, addr).await?;
        self.write_record(spec, &id).await;
        let drain = Duration::from_millis(spec.drain_ms);
        let replaced = self
            .retire(&spec.service, old, drain, spec.stop_grace())
            .await;
        let status = self.inner.supervisor.status(&id).await.ok_or_else(|| {
            DeployError::Internal(format!("instance {id} vanished after its deploy"))
        })?;
        tracing::info!(instance = %id, ?replaced, "deployed");
        Ok(DeployOutcome {
            instance: InstanceInfo::from_status(&status),
            replaced,
        })
    }

    async fn artifact(&self, spec: &DeploySpec) -> Result<ArtifactMeta, DeployError> {
        let store = self.inner.store.clone();
        let (service, version) = (spec.service.clone(), spec.version.clone());
        blocking(move || store.get(&service, &version))
            .await??
            .ok_or_else(|| DeployError::NotStored {
                service: spec.service.clone(),
                version: spec.version.clone(),
            })
    }

    fn process_spec(
        &self,
        spec: &DeploySpec,
        meta: &ArtifactMeta,
        port: u16,
    ) -> Result<ProcessSpec, DeployError> {
        let instance_id = format!("{}-{}-{port}", spec.service, spec.version);
        let artifact = self.inner.store.artifact_path(meta);
        let vars = BTreeMap::from([
            ("artifact".to_owned(), artifact.display().to_string()),
            ("port".to_owned(), port.to_string()),
            ("service".to_owned(), spec.service.clone()),
            ("version".to_owned(), spec.version.clone()),
            ("instance".to_owned(), instance_id.clone()),
        ]);
        let command = expand(&spec.command, &vars)
            .map_err(|e: TemplateError| invalid("command", e.to_string()))?;
        let process = ProcessSpec {
            service: spec.service.clone(),
            instance_id,
            version: spec.version.clone(),
            command,
            env: spec.env.clone(),
            work_dir: spec
                .work_dir
                .clone()
                .unwrap_or_else(|| self.inner.work_dir.join(&spec.service)),
            log_dir: self.inner.log_dir.clone(),
        };
        process.validate()?;
        Ok(process)
    }

    /// Polls the health path until it answers 2xx; `Err` says why not.
    async fn health_gate(
        &self,
        spec: &DeploySpec,
        instance_id: &str,
        addr: SocketAddr,
    ) -> Result<(), String> {
        let timeout = Duration::from_millis(spec.health_timeout_ms);
        let deadline = Instant::now() + timeout;
        let mut answered = None;
        loop {
            match self.inner.supervisor.status(instance_id).await {
                Some(s) if s.state == InstanceState::Running && s.last_exit.is_none() => {}
                Some(s) => {
                    return Err(match s.last_exit {
                        Some(exit) => format!("process {exit}"),
                        None => format!("process is {:?}", s.state).to_lowercase(),
                    });
                }
                None => return Err("process is gone".into()),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let probe = http::send(
                addr,
                Method::GET,
                &spec.health_path,
                None,
                left.min(PROBE_TIMEOUT),
            );
            match probe.await {
                Ok((code, _)) if code.is_success() => return Ok(()),
                Ok((code, _)) => answered = Some(code),
                Err(e) => tracing::debug!(instance = %instance_id, error = %e, "not answering yet"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(GATE_POLL)).await;
        }
        let path = &spec.health_path;
        Err(match answered {
            Some(code) => format!(
                "{path} answered {} (still not 2xx after {timeout:?})",
                code.as_u16()
            ),
            None => format!("no answer on {addr}{path} within {timeout:?}"),
        })
    }

    /// Registers the new instance and waits until the local proxy routes
    /// to it; if either fails, the instance is deregistered and stopped.
    async fn bring_in(
        &self,
        spec: &DeploySpec,
        id: &str,
        addr: SocketAddr,
    ) -> Result<(), DeployError> {
        if let Err(reason) = self.register(spec, id, addr).await {
            tracing::warn!(instance = %id, %reason, "registration failed; stopping the new instance");
            self.discard(id, spec.stop_grace()).await;
            return Err(DeployError::Register {
                instance: id.to_owned(),
                reason,
            });
        }
        let timeout = Duration::from_millis(spec.health_timeout_ms);
        let deadline = Instant::now() + timeout;
        let listed = |ids: &BTreeSet<String>| ids.contains(id);
        let routes_error =
            match routes::wait(self.inner.proxy_admin, &spec.service, deadline, listed).await {
                Waited::Done => {
                    tracing::info!(instance = %id, "routable in the local proxy");
                    return Ok(());
                }
                Waited::TimedOut(error) => error,
            };
        tracing::warn!(
            instance = %id, ?timeout, ?routes_error,
            "never routable in the local proxy; deregistering and stopping the new instance"
        );
        if let Err(reason) = self.deregister(id).await {
            tracing::warn!(instance = %id, %reason, "cannot deregister");
        }
        self.discard(id, spec.stop_grace()).await;
        Err(DeployError::NotRoutable {
            instance: id.to_owned(),
            timeout,
            routes_error,
        })
    }

    /// Registers the new instance through the local proxy.
    async fn register(&self, spec: &DeploySpec, id: &str, addr: SocketAddr) -> Result<(), String> {
        let body = serde_json::json!({
            "ID": id,
            "Name": spec.service,
            "Address": spec.address.to_string(),
            "Port": addr.port(),
            "Tags": spec.tags,
            "Meta": { "version": spec.version },
            "Check": {
                "HTTP": format!("http://{addr}{}", spec.health_path),
                "Interval": CHECK_INTERVAL,
                "Timeout": CHECK_TIMEOUT,
            },
        });
        let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        self.agent_call("/v1/agent/service/register", body, PROXY_TIMEOUT, false)
            .await
    }

    async fn deregister(&self, id: &str) -> Result<(), String> {
        self.deregister_within(id, PROXY_TIMEOUT).await
    }

    /// Deregisters `id` through the local proxy, asking for at most
    /// `timeout`. An instance the proxy does not know (404) counts as
    /// deregistered.
    async fn deregister_within(&self, id: &str, timeout: Duration) -> Result<(), String> {
        let path = format!("/v1/agent/service/deregister/{id}");
        self.agent_call(&path, Vec::new(), timeout, true).await
    }

    /// `PUT path` to the local proxy's agent API; with `not_found_ok`, a
    /// 404 counts as done.
    async fn agent_call(
        &self,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
        not_found_ok: bool,
    ) -> Result<(), String> {
        let proxy = self.inner.proxy;
        match http::send(proxy, Method::PUT, path, Some(body), timeout).await {
            Ok((code, _)) if code.is_success() => Ok(()),
            Ok((::http::StatusCode::NOT_FOUND, _)) if not_found_ok => Ok(()),
            Ok((code, body)) => Err(format!(
                "PUT {path} answered {}: {}",
                code.as_u16(),
                String::from_utf8_lossy(&body).trim()
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Deregisters `old` (instances of `service`), waits up to `drain`
    /// until the local proxy no longer routes to them, lets them serve for
    /// `drain` more, then stops them; returns the ids stopped. A failed
    /// deregistration is logged: the proxy's check takes the stopped
    /// instance out anyway.
    async fn retire(
        &self,
        service: &str,
        old: &[InstanceStatus],
        drain: Duration,
        grace: Duration,
    ) -> Vec<String> {
        for s in old {
            if let Err(reason) = self.deregister(&s.instance_id).await {
                tracing::warn!(instance = %s.instance_id, %reason, "cannot deregister");
            }
        }
        if !old.is_empty() && !drain.is_zero() {
            self.await_unrouted(service, old, drain).await;
            tokio::time::sleep(drain).await;
        }
        let mut stopped = Vec::new();
        for s in old {
            self.discard(&s.instance_id, grace).await;
            stopped.push(s.instance_id.clone());
        }
        stopped
    }

    /// Waits up to `bound` until the local proxy lists none of `old`; logs
    /// when it still does (they are stopped after the drain regardless).
    async fn await_unrouted(&self, service: &str, old: &[InstanceStatus], bound: Duration) {
        let unrouted = |ids: &BTreeSet<String>| old.iter().all(|s| !ids.contains(&s.instance_id));
        let admin = self.inner.proxy_admin;
        if let Waited::TimedOut(routes_error) =
            routes::wait(admin, service, Instant::now() + bound, unrouted).await
        {
            let ids: Vec<&str> = old.iter().map(|s| s.instance_id.as_str()).collect();
            tracing::warn!(
                instances = ?ids, ?bound, ?routes_error,
                "the local proxy still routes to the deregistered instances"
            );
        }
    }

    /// Stops an instance and forgets it.
    async fn discard(&self, id: &str, grace: Duration) {
        match self.inner.supervisor.stop(id, grace).await {
            Ok(outcome) => tracing::info!(instance = %id, ?outcome, "stopped"),
            Err(e) => tracing::warn!(instance = %id, error = %e, "cannot stop"),
        }
        self.inner.supervisor.forget(id).await;
    }

    /// The instances of `service` not stopped.
    async fn instances_of(&self, service: &str) -> Vec<InstanceStatus> {
        self.inner
            .supervisor
            .list()
            .await
            .into_iter()
            .filter(|s| s.service == service && s.state != InstanceState::Stopped)
            .collect()
    }

    /// Records the deploy for a rollback; a failure is logged (the deploy
    /// itself stands).
    async fn write_record(&self, spec: &DeploySpec, id: &str) {
        let record = DeployRecord {
            spec: spec.clone(),
            instance_id: id.to_owned(),
            deployed_at_ms: now_ms(),
        };
        let dir = self.inner.records_dir.clone();
        match blocking(move || record::write(&dir, &record)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(service = %spec.service, error = %e, "cannot write the deploy record")
            }
            Err(e) => {
                tracing::warn!(service = %spec.service, error = %e, "cannot write the deploy record")
            }
        }
    }
}

impl fmt::Debug for Deployments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deployments")
            .field("proxy", &self.inner.proxy)
            .field("proxy_admin", &self.inner.proxy_admin)
            .finish_non_exhaustive()
    }
}

// === impl Claim ===

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.inner.busy).remove(&self.service);
    }
}

/// A port free on `address` now: bound to port 0 and released. Another
/// process could take it before the instance binds it; the health gate
/// then fails and nothing changes.
fn free_port(address: IpAddr) -> Result<u16, DeployError> {
    TcpListener::bind(SocketAddr::new(address, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| invalid("address", format!("cannot listen on {address}: {e}")))
}

/// Runs file I/O on the blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, DeployError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DeployError::Internal(format!("a blocking task failed: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_the_end_of_the_instance_id() {
        assert_eq!(port_of("orders-1.2-rc-41234"), 41234);
        assert_eq!(port_of("orders"), 0);
        assert_eq!(port_of("orders-1.2-x"), 0);
    }

    #[test]
    fn a_gate_failure_carries_the_end_of_stderr() {
        let e = DeployError::Unhealthy {
            instance: "orders-3-4000".into(),
            reason: "/health answered 503".into(),
            stderr: vec!["boom".into()],
        };
        assert_eq!(
            e.to_string(),
            "orders-3-4000 failed its health gate: /health answered 503; the end of its stderr:\nboom"
        );
    }

    #[test]
    fn a_never_routable_instance_says_so() {
        let mut e = DeployError::NotRoutable {
            instance: "orders-3-4000".into(),
            timeout: Duration::from_millis(1500),
            routes_error: None,
        };
        assert_eq!(
            e.to_string(),
            "instance orders-3-4000 never became routable in the local proxy within 1.5s \
             (its Consul check may be failing)"
        );
        if let DeployError::NotRoutable { routes_error, .. } = &mut e {
            *routes_error = Some("GET /routes answered 500".into());
        }
        assert!(
            e.to_string().ends_with(
                "failing); the last read of its /routes failed: GET /routes answered 500"
            )
        );
    }

    #[test]
    fn specs_are_checked() {
        let mut spec = DeploySpec::new("orders", "1.0", "java -jar {artifact}");
        assert!(spec.validate().is_ok());
        spec.health_path = "health".into();
        assert!(matches!(
            spec.validate(),
            Err(DeployError::Invalid {
                field: "health_path",
                ..
            })
        ));
        let spec = DeploySpec::new("orders", "../x", "java");
        assert!(matches!(spec.validate(), Err(DeployError::Store(_))));
    }
}
