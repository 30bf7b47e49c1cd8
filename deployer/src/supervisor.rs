//! Runs a service's processes on this node and keeps them running.
//!
//! - **Start**: each process runs in a process group of its own (its pid is
//!   the group id), so a stop reaches whatever it forked. It is a new
//!   process group rather than a new session (`setsid`): starting a session
//!   needs code between `fork` and `exec`, which is `unsafe` in Rust and
//!   forbidden in this workspace; a group of its own already keeps the
//!   terminal's signals (Ctrl-C, hangup) away from it. stdin is `/dev/null`;
//!   stdout and stderr are log files the child itself holds open with
//!   `O_APPEND` — never pipes to the deployer, which would kill the process
//!   with SIGPIPE when the deployer restarts ([`LogStream`] names the files).
//! - **Logs**: every few seconds a file over `max_log_bytes` (50 MiB) is
//!   rotated by copytruncate: copied to `.1` (older copies move up to `.2`,
//!   `.3`; three are kept) and truncated in place. The process's `O_APPEND`
//!   descriptor then writes at the start of the emptied file, without a
//!   hole. Lines written between the end of the copy and the truncation are
//!   lost: a window of one file copy (milliseconds for 50 MiB on a local
//!   disk) per rotation. Renaming the file instead would lose nothing, but
//!   the process would have to reopen its stdout, which a JVM cannot.
//! - **Records**: every wanted instance has a record
//!   `<state_dir>/<instance_id>.json` (pid, the process's start time from
//!   `/proc/<pid>/stat`, spec, start), written atomically, removed when the
//!   instance is stopped on request.
//! - **Adoption**: when the deployer restarts, the processes it started keep
//!   running; [`Supervisor::adopt`] reads the records and watches a process
//!   again if its pid still runs with the recorded start time. It is no
//!   longer our child (it was reparented to init or a subreaper), so it
//!   cannot be waited for: it is watched by polling `/proc/<pid>`, and its
//!   exit status is unknown. A dead process is started anew; a pid that now
//!   belongs to another process (other start time) counts as dead, and that
//!   process is never signalled. The processes are re-adopted rather than
//!   handed to systemd because nodes may run without systemd (containers) and
//!   the deployer must behave the same everywhere. Where the deployer itself
//!   runs as a systemd unit, the unit needs `KillMode=process`, or systemd
//!   kills the services with the deployer.
//! - **Restart**: a process that exits without being asked to is started
//!   again after a jittered exponential backoff (by default 1 s doubling to
//!   30 s, back to 1 s once a process ran for 60 s).
//! - **Stop**: SIGTERM to the process group, SIGKILL to the group after the
//!   grace period ([`StopOutcome`]).
//!
//! Dropping the last [`Supervisor`] handle stops watching but leaves every
//! process running with its record, exactly as a deployer crash would.

mod logs;
mod procfs;
mod record;
mod template;
mod watch;

#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    fmt, io,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::{Arc, Mutex as StdMutex, MutexGuard, PoisonError, Weak},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Mutex, mpsc, oneshot},
    task::JoinHandle,
    time::MissedTickBehavior,
};
use tracing::Instrument;

pub use self::{
    logs::{LogStream, tail_lines},
    template::{TemplateError, expand},
};
use self::{
    procfs::Liveness,
    record::{ProcessRecord, unix_ms},
    watch::{Control, Running, Watch},
};

/// Default size over which a log file is rotated: 50 MiB.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 50 * 1024 * 1024;

/// Variables of its own environment the deployer should pass on to the
/// processes in [`SupervisorConfig::base_env`] (nothing else is passed: the
/// deployer's environment may hold its secrets).
pub const INHERITED_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ", "HOME", "JAVA_HOME"];

/// What to run for one instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// The service it belongs to.
    pub service: String,
    /// Unique on this node; names the record and the log files, so it is
    /// letters, digits, `.`, `_` and `-` only.
    pub instance_id: String,
    /// The version (artifact) it runs.
    pub version: String,
    /// Program and arguments, already expanded ([`expand`]).
    pub command: Vec<String>,
    /// Environment on top of [`SupervisorConfig::base_env`].
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The working folder (created if missing).
    pub work_dir: PathBuf,
    /// Where the log files go (created if missing).
    pub log_dir: PathBuf,
}

/// How the supervisor runs processes.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Where the process records live.
    pub state_dir: PathBuf,
    /// A log file larger than this is rotated.
    pub max_log_bytes: u64,
    /// How many rotated copies of a log file are kept (`.1` … `.n`).
    pub log_copies: usize,
    /// How often log sizes are checked.
    pub rotate_every: Duration,
    /// The first restart delay after a crash.
    pub restart_backoff_min: Duration,
    /// The longest restart delay.
    pub restart_backoff_max: Duration,
    /// A process that ran this long resets the restart delay to the minimum.
    pub backoff_reset_after: Duration,
    /// How often an adopted process (not our child) is checked for life.
    pub adopted_poll: Duration,
    /// How long to wait for a process to go after SIGKILL.
    pub kill_wait: Duration,
    /// Environment every process gets (see [`INHERITED_ENV`]).
    pub base_env: BTreeMap<String, String>,
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Its process runs.
    Running,
    /// Its process exited on its own; waiting out the backoff to restart it.
    Restarting,
    /// The last restart failed (the program could not be started); trying
    /// again after the backoff.
    Crashed,
    /// Stopped on request; not restarted.
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitInfo {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
    /// It ended, but it was not our child (adopted), so how is unknown.
    Unknown,
}

/// A snapshot of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceStatus {
    /// The service it belongs to.
    pub service: String,
    /// The instance.
    pub instance_id: String,
    /// The version it runs.
    pub version: String,
    /// Its process, while one runs.
    pub pid: Option<u32>,
    /// Where it is in its life.
    pub state: InstanceState,
    /// How often it was restarted after its process ended on its own.
    pub restarts: u32,
    /// When its current (or last) process was started.
    pub started_at: Option<SystemTime>,
    /// How its last process ended.
    pub last_exit: Option<ExitInfo>,
    /// Whether the process was started by an earlier deployer and adopted.
    pub adopted: bool,
    /// The last thing that went wrong (a failed restart), if any.
    pub last_error: Option<String>,
}

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopOutcome {
    /// It exited within the grace period after SIGTERM.
    Terminated(ExitInfo),
    /// It outlived the grace period and was killed with SIGKILL.
    Killed(ExitInfo),
    /// No process was running (waiting to restart, or already stopped).
    NotRunning,
}

/// What [`Supervisor::adopt`] found in the state folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdoptReport {
    /// Instances whose process still ran and is watched again.
    pub adopted: Vec<String>,
    /// Instances whose process was gone (or whose pid belongs to another
    /// process now), started anew; if that failed, they are
    /// [`InstanceState::Crashed`] and retried.
    pub restarted: Vec<String>,
    /// Instances this supervisor already runs, left alone.
    pub skipped: Vec<String>,
    /// Records that could not be read, with why; left on disk untouched.
    pub invalid: Vec<(PathBuf, String)>,
}

/// What went wrong running a process.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// An instance id that cannot name a file.
    #[error(
        "invalid instance id {0:?}: use letters, digits, '.', '_' and '-', not starting with '.', at most 128"
    )]
    InvalidInstanceId(String),
    /// A spec without a program.
    #[error("instance {0}: the command is empty")]
    EmptyCommand(String),
    /// A config value that cannot work.
    #[error("invalid supervisor config: {0}")]
    InvalidConfig(String),
    /// The instance runs already (here, or adopted).
    #[error("instance {0} is already running")]
    AlreadyRunning(String),
    /// A process of the instance, started before the deployer restarted,
    /// still runs and was not adopted yet.
    #[error("instance {instance_id} still runs as pid {pid} from before a restart; adopt it first")]
    RunningUnadopted {
        /// The instance.
        instance_id: String,
        /// Its running process.
        pid: u32,
    },
    /// No such instance here.
    #[error("instance {0} is not known on this node")]
    UnknownInstance(String),
    /// The program could not be started.
    #[error("cannot start instance {instance_id} ({program}): {source}")]
    Spawn {
        /// The instance.
        instance_id: String,
        /// The program that did not start.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file or folder the supervisor needs failed.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done ("open log file").
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Runs and watches the processes of this node. Cheap to clone; all clones
/// share the same instances.
#[derive(Debug, Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

type Instances = Mutex<BTreeMap<String, Instance>>;

#[derive(Debug)]
struct Inner {
    config: Arc<SupervisorConfig>,
    instances: Arc<Instances>,
    rotator: JoinHandle<()>,
}

/// One instance as the supervisor holds it; its process belongs to the
/// watcher task.
#[derive(Debug)]
struct Instance {
    log_dir: PathBuf,
    status: Arc<StdMutex<InstanceStatus>>,
    control: mpsc::Sender<Control>,
    task: JoinHandle<()>,
}

// === impl ProcessSpec ===

impl ProcessSpec {
    /// Checks the instance id (it names files) and that there is a program.
    pub fn validate(&self) -> Result<(), SupervisorError> {
        let id = &self.instance_id;
        let id_ok = !id.is_empty()
            && id.len() <= 128
            && !id.starts_with('.')
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !id_ok {
            return Err(SupervisorError::InvalidInstanceId(id.clone()));
        }
        if self.command.first().is_none_or(String::is_empty) {
            return Err(SupervisorError::EmptyCommand(id.clone()));
        }
        Ok(())
    }

    /// The log file of `stream`.
    pub fn log_path(&self, stream: LogStream) -> PathBuf {
        stream.path(&self.log_dir, &self.instance_id)
    }
}

// === impl SupervisorConfig ===

impl SupervisorConfig {
    /// The defaults, with records in `state_dir` and an empty base
    /// environment.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            log_copies: 3,
            rotate_every: Duration::from_secs(5),
            restart_backoff_min: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(30),
            backoff_reset_after: Duration::from_secs(60),
            adopted_poll: Duration::from_secs(1),
            kill_wait: Duration::from_secs(5),
            base_env: BTreeMap::new(),
        }
    }

    /// Checks the values that would make a loop spin or a timer panic.
    pub fn validate(&self) -> Result<(), SupervisorError> {
        for (name, value) in [
            ("rotate_every", self.rotate_every),
            ("restart_backoff_min", self.restart_backoff_min),
            ("adopted_poll", self.adopted_poll),
        ] {
            if value.is_zero() {
                return Err(SupervisorError::InvalidConfig(format!(
                    "{name} must be more than 0"
                )));
            }
        }
        if self.max_log_bytes == 0 {
            return Err(SupervisorError::InvalidConfig(
                "max_log_bytes must be more than 0".into(),
            ));
        }
        Ok(())
    }
}

// === impl ExitInfo ===

impl ExitInfo {
    fn from_status(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Code(code),
            (None, Some(signal)) => Self::Signal(signal),
            (None, None) => Self::Unknown,
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exited with code {code}"),
            Self::Signal(n) => match nix::sys::signal::Signal::try_from(*n) {
                Ok(signal) => write!(f, "killed by signal {n} ({})", signal.as_str()),
                Err(_) => write!(f, "killed by signal {n}"),
            },
            Self::Unknown => f.write_str("exited (status unknown: not a child of this deployer)"),
        }
    }
}

// === impl StopOutcome ===

impl StopOutcome {
    /// How the process ended, if one ran.
    pub fn exit(&self) -> Option<ExitInfo> {
        match self {
            Self::Terminated(e) | Self::Killed(e) => Some(*e),
            Self::NotRunning => None,
        }
    }
}

// === impl InstanceStatus ===

impl InstanceStatus {
    fn from_record(record: &ProcessRecord, adopted: bool) -> Self {
        Self {
            service: record.spec.service.clone(),
            instance_id: record.spec.instance_id.clone(),
            version: record.spec.version.clone(),
            pid: Some(record.pid),
            state: InstanceState::Running,
            restarts: record.restarts,
            started_at: Some(record.started_at()),
            last_exit: None,
            adopted,
            last_error: None,
        }
    }
}

// === impl Supervisor ===

impl Supervisor {
    /// A supervisor keeping its records in `config.state_dir` (created).
    /// Starts the log rotation task, so it must be called inside a tokio
    /// runtime. Call [`Supervisor::adopt`] next to take over the processes
    /// of an earlier deployer.
    pub fn new(config: SupervisorConfig) -> Result<Self, SupervisorError> {
        config.validate()?;
        std::fs::create_dir_all(&config.state_dir).map_err(|source| SupervisorError::Io {
            what: "create state folder",
            path: config.state_dir.clone(),
            source,
        })?;
        let config = Arc::new(config);
        let instances = Arc::new(Mutex::new(BTreeMap::new()));
        let rotator = tokio::spawn(
            rotate_logs(Arc::downgrade(&instances), config.clone())
                .instrument(tracing::info_span!("rotate_logs")),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                instances,
                rotator,
            }),
        })
    }

    /// The config it runs with.
    pub fn config(&self) -> &SupervisorConfig {
        &self.inner.config
    }

    /// Starts an instance and watches it. Fails if the instance runs
    /// already — here, or from before a deployer restart and not adopted
    /// yet — or if the program cannot be started.
    pub async fn start(&self, spec: ProcessSpec) -> Result<InstanceStatus, SupervisorError> {
        spec.validate()?;
        let config = &self.inner.config;
        let id = spec.instance_id.clone();
        let mut instances = self.inner.instances.lock().await;
        if instances
            .get(&id)
            .is_some_and(|i| i.state() != InstanceState::Stopped)
        {
            return Err(SupervisorError::AlreadyRunning(id));
        }
        refuse_unadopted(&config.state_dir, &id)?;
        let running = watch::spawn(&spec, config)?;
        let record = ProcessRecord {
            pid: running.pid(),
            starttime: running.starttime(),
            started_at_ms: unix_ms(SystemTime::now()),
            restarts: 0,
            spec: spec.clone(),
        };
        if let Err(source) = record::write(&config.state_dir, &record) {
            // Unrecorded, it could be duplicated after a deployer restart.
            running.kill(config.kill_wait).await;
            return Err(SupervisorError::Io {
                what: "write process record",
                path: record::path(&config.state_dir, &id),
                source,
            });
        }
        tracing::info!(instance = %id, service = %spec.service, version = %spec.version, pid = record.pid, "started process");
        let status = InstanceStatus::from_record(&record, false);
        instances.insert(
            id,
            Instance::launch(spec, config.clone(), Some(running), status.clone()),
        );
        Ok(status)
    }

    /// Takes over the instances recorded in the state folder by an earlier
    /// deployer: a process that still runs is watched again; one that is
    /// gone is started anew. Instances this supervisor runs already are
    /// left alone, so it never starts a second process for one.
    pub async fn adopt(&self) -> Result<AdoptReport, SupervisorError> {
        let config = &self.inner.config;
        let records =
            record::read_all(&config.state_dir).map_err(|source| SupervisorError::Io {
                what: "read state folder",
                path: config.state_dir.clone(),
                source,
            })?;
        let mut report = AdoptReport::default();
        let mut instances = self.inner.instances.lock().await;
        for (path, parsed) in records {
            let record = match parsed
                .and_then(|r| r.spec.validate().map(|()| r).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "ignoring unreadable process record");
                    report.invalid.push((path, reason));
                    continue;
                }
            };
            let id = record.spec.instance_id.clone();
            if instances
                .get(&id)
                .is_some_and(|i| i.state() != InstanceState::Stopped)
            {
                report.skipped.push(id);
                continue;
            }
            let instance = match procfs::liveness(record.pid, record.starttime) {
                Liveness::Alive => {
                    tracing::info!(instance = %id, pid = record.pid, "adopted running process");
                    report.adopted.push(id.clone());
                    let status = InstanceStatus::from_record(&record, true);
                    let running = Running::Adopted {
                        pid: record.pid,
                        starttime: record.starttime,
                    };
                    Instance::launch(record.spec, config.clone(), Some(running), status)
                }
                gone => {
                    if gone == Liveness::Reused {
                        tracing::warn!(instance = %id, pid = record.pid, "recorded pid belongs to another process now; not signalling it");
                    } else {
                        tracing::info!(instance = %id, pid = record.pid, "process ended while unsupervised");
                    }
                    report.restarted.push(id.clone());
                    restart_recorded(record, config)
                }
            };
            instances.insert(id, instance);
        }
        Ok(report)
    }

    /// Stops an instance: SIGTERM to its process group, SIGKILL to the group
    /// if it still runs after `grace`. It is not restarted, and its record is
    /// removed.
    pub async fn stop(
        &self,
        instance_id: &str,
        grace: Duration,
    ) -> Result<StopOutcome, SupervisorError> {
        let control = {
            let instances = self.inner.instances.lock().await;
            let instance = instances
                .get(instance_id)
                .ok_or_else(|| SupervisorError::UnknownInstance(instance_id.to_owned()))?;
            instance.control.clone()
        };
        let (reply, outcome) = oneshot::channel();
        if control.send(Control::Stop { grace, reply }).await.is_err() {
            // The watcher ended: the instance was stopped before.
            return Ok(StopOutcome::NotRunning);
        }
        Ok(outcome.await.unwrap_or(StopOutcome::NotRunning))
    }

    /// A snapshot of one instance.
    pub async fn status(&self, instance_id: &str) -> Option<InstanceStatus> {
        let instances = self.inner.instances.lock().await;
        instances.get(instance_id).map(Instance::status)
    }

    /// Snapshots of every instance, by instance id.
    pub async fn list(&self) -> Vec<InstanceStatus> {
        let instances = self.inner.instances.lock().await;
        instances.values().map(Instance::status).collect()
    }

    /// Forgets a stopped instance (it no longer shows in [`Supervisor::list`]).
    /// Returns whether it was there and stopped.
    pub async fn forget(&self, instance_id: &str) -> bool {
        let mut instances = self.inner.instances.lock().await;
        let stopped = instances
            .get(instance_id)
            .is_some_and(|i| i.state() == InstanceState::Stopped);
        if stopped {
            instances.remove(instance_id);
        }
        stopped
    }

    /// The last `lines` lines of an instance's log `stream`, reading at most
    /// its last `max_bytes` bytes.
    pub async fn log_tail(
        &self,
        instance_id: &str,
        stream: LogStream,
        lines: usize,
        max_bytes: u64,
    ) -> Result<Vec<String>, SupervisorError> {
        let path = {
            let instances = self.inner.instances.lock().await;
            let instance = instances
                .get(instance_id)
                .ok_or_else(|| SupervisorError::UnknownInstance(instance_id.to_owned()))?;
            stream.path(&instance.log_dir, instance_id)
        };
        let read = path.clone();
        tokio::task::spawn_blocking(move || tail_lines(&read, lines, max_bytes))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(|source| SupervisorError::Io {
                what: "read log file",
                path,
                source,
            })
    }
}

// === impl Inner ===

impl Drop for Inner {
    fn drop(&mut self) {
        // Watchers end without touching their processes. Should the lock be
        // busy, they end anyway once the map (and their channels) is gone.
        self.rotator.abort();
        if let Ok(instances) = self.instances.try_lock() {
            for instance in instances.values() {
                instance.task.abort();
            }
        }
    }
}

// === impl Instance ===

impl Instance {
    /// Spawns the watcher of `spec`, owning `running` (or restarting first
    /// when there is none).
    fn launch(
        spec: ProcessSpec,
        config: Arc<SupervisorConfig>,
        running: Option<Running>,
        status: InstanceStatus,
    ) -> Self {
        let (control, control_rx) = mpsc::channel(4);
        let status = Arc::new(StdMutex::new(status));
        let span =
            tracing::info_span!("supervise", service = %spec.service, instance = %spec.instance_id);
        let log_dir = spec.log_dir.clone();
        let watch = Watch::new(spec, config, status.clone(), control_rx);
        let task = tokio::spawn(watch.run(running).instrument(span));
        Self {
            log_dir,
            status,
            control,
            task,
        }
    }

    fn status(&self) -> InstanceStatus {
        lock(&self.status).clone()
    }

    fn state(&self) -> InstanceState {
        lock(&self.status).state
    }
}

/// Locks a status; a panic elsewhere while holding it leaves a snapshot
/// that is still worth reading.
fn lock(status: &StdMutex<InstanceStatus>) -> MutexGuard<'_, InstanceStatus> {
    status.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Fails if a process recorded for `instance_id` by an earlier deployer
/// still runs: starting another would run the instance twice.
fn refuse_unadopted(state_dir: &Path, instance_id: &str) -> Result<(), SupervisorError> {
    match record::read(state_dir, instance_id) {
        Ok(Some(r)) if procfs::liveness(r.pid, r.starttime) == Liveness::Alive => {
            Err(SupervisorError::RunningUnadopted {
                instance_id: instance_id.to_owned(),
                pid: r.pid,
            })
        }
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(instance = %instance_id, error = %e, "replacing unreadable process record");
            Ok(())
        }
    }
}

/// Starts anew an instance whose recorded process is gone. If the start
/// fails, the watcher retries after the backoff.
fn restart_recorded(record: ProcessRecord, config: &Arc<SupervisorConfig>) -> Instance {
    let mut status = InstanceStatus::from_record(&record, false);
    status.pid = None;
    status.last_exit = Some(ExitInfo::Unknown);
    match watch::spawn(&record.spec, config) {
        Ok(running) => {
            let new = ProcessRecord {
                pid: running.pid(),
                starttime: running.starttime(),
                started_at_ms: unix_ms(SystemTime::now()),
                restarts: record.restarts.saturating_add(1),
                spec: record.spec,
            };
            if let Err(e) = record::write(&config.state_dir, &new) {
                tracing::warn!(instance = %new.spec.instance_id, error = %e, "cannot write process record");
                status.last_error = Some(format!("cannot write process record: {e}"));
            }
            tracing::info!(instance = %new.spec.instance_id, pid = new.pid, "restarted process");
            status.pid = Some(new.pid);
            status.restarts = new.restarts;
            status.started_at = Some(new.started_at());
            Instance::launch(new.spec, config.clone(), Some(running), status)
        }
        Err(e) => {
            tracing::error!(instance = %record.spec.instance_id, error = %e, "cannot restart process; retrying");
            status.state = InstanceState::Crashed;
            status.last_error = Some(e.to_string());
            Instance::launch(record.spec, config.clone(), None, status)
        }
    }
}

/// Every `rotate_every`, rotates the log files of the instances that run.
async fn rotate_logs(instances: Weak<Instances>, config: Arc<SupervisorConfig>) {
    let mut tick = tokio::time::interval(config.rotate_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(instances) = instances.upgrade() else {
            return;
        };
        let files: Vec<PathBuf> = instances
            .lock()
            .await
            .iter()
            .filter(|(_, i)| i.state() != InstanceState::Stopped)
            .flat_map(|(id, i)| [LogStream::Out, LogStream::Err].map(|s| s.path(&i.log_dir, id)))
            .collect();
        drop(instances);
        let (max, keep) = (config.max_log_bytes, config.log_copies);
        let pass = tokio::task::spawn_blocking(move || {
            for file in files {
                match logs::rotate_if_larger(&file, max, keep) {
                    Ok(true) => tracing::info!(file = %file.display(), "rotated log file"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(file = %file.display(), error = %e, "cannot rotate log file")
                    }
                }
            }
        });
        if let Err(e) = pass.await {
            tracing::warn!(error = %e, "log rotation pass failed");
        }
    }
}
