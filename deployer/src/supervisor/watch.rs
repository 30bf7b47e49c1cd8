//! One instance's watcher: the task that owns its process, restarts it
//! when it exits on its own, and stops it on request.

use std::{
    fs::{self, File},
    io,
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex as StdMutex, MutexGuard},
    time::{Duration, SystemTime},
};

use mesh_runtime::backoff::Backoff;
use nix::{
    errno::Errno,
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use tokio::{
    process::{Child, Command},
    sync::{mpsc, oneshot},
    time::{Instant, timeout},
};

use super::{
    ExitInfo, InstanceState, InstanceStatus, LogStream, ProcessSpec, StopOutcome, SupervisorConfig,
    SupervisorError,
    logs::open_append,
    procfs::{self, Liveness},
    record::{self, ProcessRecord, unix_ms},
};

/// A request to a watcher.
#[derive(Debug)]
pub(super) enum Control {
    /// Stop the process (SIGTERM, SIGKILL after `grace`) and do not restart.
    Stop {
        grace: Duration,
        reply: oneshot::Sender<StopOutcome>,
    },
}

/// A running process of an instance.
#[derive(Debug)]
pub(super) enum Running {
    /// Started by this supervisor: waited for (and reaped) as our child.
    Child {
        child: Child,
        pid: u32,
        starttime: u64,
    },
    /// Started by an earlier deployer: not our child, so watched by polling
    /// `/proc/<pid>`.
    Adopted { pid: u32, starttime: u64 },
}

/// The task owning one instance's process.
pub(super) struct Watch {
    spec: ProcessSpec,
    config: Arc<SupervisorConfig>,
    status: Arc<StdMutex<InstanceStatus>>,
    control: mpsc::Receiver<Control>,
}

/// What the watcher does next.
enum Step {
    Watch(Box<Running>),
    Restart,
    Done,
}

/// Starts `spec`'s program in a process group of its own, its output
/// appended to its log files.
pub(super) fn spawn(
    spec: &ProcessSpec,
    config: &SupervisorConfig,
) -> Result<Running, SupervisorError> {
    let (out, err) = prepare(spec)?;
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| SupervisorError::EmptyCommand(spec.instance_id.clone()))?;
    let spawn_error = |source| SupervisorError::Spawn {
        instance_id: spec.instance_id.clone(),
        program: program.clone(),
        source,
    };
    // The log descriptors move into the child; ours close once it runs.
    let child = Command::new(program)
        .args(args)
        .current_dir(&spec.work_dir)
        .env_clear()
        .envs(&config.base_env)
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(spawn_error)?;
    let pid = child.id().ok_or_else(|| {
        spawn_error(io::Error::other(
            "process was reaped before its pid was read",
        ))
    })?;
    // Not reaped yet, so `/proc/<pid>` is this process even if it exited.
    match procfs::stat(pid) {
        Ok(stat) => Ok(Running::Child {
            child,
            pid,
            starttime: stat.starttime,
        }),
        Err(source) => {
            // Without a start time it could not be recorded, nor adopted.
            signal_group(pid, Signal::SIGKILL);
            Err(SupervisorError::Io {
                what: "read the start time in",
                path: format!("/proc/{pid}/stat").into(),
                source,
            })
        }
    }
}

/// Creates the working and log folders, and opens the log files for the
/// child: stdout and stderr.
fn prepare(spec: &ProcessSpec) -> Result<(File, File), SupervisorError> {
    let io_error = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| SupervisorError::Io { what, path, source }
    };
    for dir in [spec.log_dir.as_path(), spec.work_dir.as_path()] {
        fs::create_dir_all(dir).map_err(io_error("create folder", dir))?;
    }
    let out_path = spec.log_path(LogStream::Out);
    let err_path = spec.log_path(LogStream::Err);
    let out = open_append(&out_path).map_err(io_error("open log file", &out_path))?;
    let err = open_append(&err_path).map_err(io_error("open log file", &err_path))?;
    Ok((out, err))
}

/// Sends `signal` to the process group `pid` (falling back to the process
/// alone if it left the group). Only call this while `pid` is known to be
/// ours: our unreaped child, or checked alive with the recorded start time.
fn signal_group(pid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let result = match killpg(Pid::from_raw(raw), signal) {
        Err(Errno::ESRCH) => kill(Pid::from_raw(raw), signal),
        other => other,
    };
    match result {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pid, %signal, error = %e, "cannot signal process"),
    }
}

/// Polls until the process is gone or `limit` passed; returns whether it
/// is gone.
async fn gone_within(pid: u32, starttime: u64, limit: Duration, poll: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if procfs::liveness(pid, starttime) != Liveness::Alive {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(poll.min(deadline - Instant::now())).await;
    }
}

// === impl Running ===

impl Running {
    /// The process (and process group) id.
    pub(super) fn pid(&self) -> u32 {
        match self {
            Self::Child { pid, .. } | Self::Adopted { pid, .. } => *pid,
        }
    }

    /// Its start time from `/proc/<pid>/stat`.
    pub(super) fn starttime(&self) -> u64 {
        match self {
            Self::Child { starttime, .. } | Self::Adopted { starttime, .. } => *starttime,
        }
    }

    /// Waits until the process ends. Cancel-safe.
    async fn exited(&mut self, poll: Duration) -> ExitInfo {
        match self {
            Self::Child { child, .. } => child
                .wait()
                .await
                .map_or(ExitInfo::Unknown, ExitInfo::from_status),
            Self::Adopted { pid, starttime } => {
                while procfs::liveness(*pid, *starttime) == Liveness::Alive {
                    tokio::time::sleep(poll).await;
                }
                ExitInfo::Unknown
            }
        }
    }

    /// SIGTERM to the group; SIGKILL to the group if the process still runs
    /// after `grace`.
    async fn stop(self, grace: Duration, config: &SupervisorConfig) -> StopOutcome {
        match self {
            Self::Child { mut child, pid, .. } => {
                signal_group(pid, Signal::SIGTERM);
                if let Ok(status) = timeout(grace, child.wait()).await {
                    // Whatever it forked and left behind would run on
                    // unsupervised, holding its log files.
                    signal_group(pid, Signal::SIGKILL);
                    return StopOutcome::Terminated(
                        status.map_or(ExitInfo::Unknown, ExitInfo::from_status),
                    );
                }
                signal_group(pid, Signal::SIGKILL);
                let status = timeout(config.kill_wait, child.wait()).await;
                StopOutcome::Killed(match status {
                    Ok(Ok(status)) => ExitInfo::from_status(status),
                    _ => ExitInfo::Unknown,
                })
            }
            Self::Adopted { pid, starttime } => {
                let poll = config.adopted_poll;
                if procfs::liveness(pid, starttime) != Liveness::Alive {
                    return StopOutcome::NotRunning;
                }
                signal_group(pid, Signal::SIGTERM);
                if gone_within(pid, starttime, grace, poll).await {
                    return StopOutcome::Terminated(ExitInfo::Unknown);
                }
                // Checked again: the pid must still be ours to be signalled.
                if procfs::liveness(pid, starttime) == Liveness::Alive {
                    signal_group(pid, Signal::SIGKILL);
                    gone_within(pid, starttime, config.kill_wait, poll).await;
                }
                StopOutcome::Killed(ExitInfo::Unknown)
            }
        }
    }

    /// Kills a process just started (whose start could not be completed).
    pub(super) async fn kill(self, kill_wait: Duration) {
        if let Self::Child { mut child, pid, .. } = self {
            signal_group(pid, Signal::SIGKILL);
            let _ = timeout(kill_wait, child.wait()).await;
        }
    }
}

// === impl Watch ===

impl Watch {
    pub(super) fn new(
        spec: ProcessSpec,
        config: Arc<SupervisorConfig>,
        status: Arc<StdMutex<InstanceStatus>>,
        control: mpsc::Receiver<Control>,
    ) -> Self {
        Self {
            spec,
            config,
            status,
            control,
        }
    }

    /// Watches `running` (or first restarts, if there is none) until the
    /// instance is stopped or the supervisor is dropped. Dropping the
    /// supervisor ends this task but leaves the process running.
    pub(super) async fn run(mut self, running: Option<Running>) {
        let mut backoff = Backoff::new(
            self.config.restart_backoff_min,
            self.config.restart_backoff_max,
        );
        let mut step = running.map_or(Step::Restart, |r| Step::Watch(Box::new(r)));
        loop {
            step = match step {
                Step::Watch(running) => self.watch(*running, &mut backoff).await,
                Step::Restart => self.restart(&mut backoff).await,
                Step::Done => return,
            };
        }
    }

    fn status(&self) -> MutexGuard<'_, InstanceStatus> {
        super::lock(&self.status)
    }

    async fn watch(&mut self, mut running: Running, backoff: &mut Backoff) -> Step {
        let event = tokio::select! {
            exit = running.exited(self.config.adopted_poll) => Ok(exit),
            control = self.control.recv() => Err(control),
        };
        match event {
            Ok(exit) => {
                let uptime = {
                    let mut status = self.status();
                    status.state = InstanceState::Restarting;
                    status.pid = None;
                    status.last_exit = Some(exit);
                    status
                        .started_at
                        .and_then(|t| t.elapsed().ok())
                        .unwrap_or_default()
                };
                if uptime >= self.config.backoff_reset_after {
                    backoff.reset();
                }
                tracing::warn!(%exit, ?uptime, "process ended on its own; restarting it");
                Step::Restart
            }
            Err(Some(Control::Stop { grace, reply })) => {
                let outcome = running.stop(grace, &self.config).await;
                tracing::info!(?outcome, "stopped process");
                self.stopped(outcome.exit());
                let _ = reply.send(outcome);
                Step::Done
            }
            // The supervisor is gone (the deployer stops or crashes): the
            // process runs on, to be adopted by the next deployer.
            Err(None) => Step::Done,
        }
    }

    async fn restart(&mut self, backoff: &mut Backoff) -> Step {
        let delay = backoff.next_delay();
        let control = tokio::select! {
            () = tokio::time::sleep(delay) => None,
            control = self.control.recv() => Some(control),
        };
        match control {
            Some(Some(Control::Stop { reply, .. })) => {
                self.stopped(None);
                let _ = reply.send(StopOutcome::NotRunning);
                return Step::Done;
            }
            Some(None) => return Step::Done,
            None => {}
        }
        match spawn(&self.spec, &self.config) {
            Ok(running) => {
                self.started(&running);
                Step::Watch(Box::new(running))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot restart process; trying again");
                let mut status = self.status();
                status.state = InstanceState::Crashed;
                status.last_error = Some(e.to_string());
                Step::Restart
            }
        }
    }

    /// Notes a restarted process in the status and the record.
    fn started(&self, running: &Running) {
        let now = SystemTime::now();
        let restarts = {
            let mut status = self.status();
            status.state = InstanceState::Running;
            status.pid = Some(running.pid());
            status.restarts = status.restarts.saturating_add(1);
            status.started_at = Some(now);
            status.adopted = false;
            status.last_error = None;
            status.restarts
        };
        let record = ProcessRecord {
            pid: running.pid(),
            starttime: running.starttime(),
            started_at_ms: unix_ms(now),
            restarts,
            spec: self.spec.clone(),
        };
        if let Err(e) = record::write(&self.config.state_dir, &record) {
            tracing::warn!(error = %e, "cannot write process record");
            self.status().last_error = Some(format!("cannot write process record: {e}"));
        }
        tracing::info!(pid = record.pid, restarts, "restarted process");
    }

    /// Removes the record, then marks the instance stopped.
    fn stopped(&self, exit: Option<ExitInfo>) {
        if let Err(e) = record::remove(&self.config.state_dir, &self.spec.instance_id) {
            tracing::warn!(error = %e, "cannot remove process record");
        }
        let mut status = self.status();
        status.state = InstanceState::Stopped;
        status.pid = None;
        if exit.is_some() {
            status.last_exit = exit;
        }
    }
}
