//! A process under test, run inside a network namespace with
//! `ip netns exec` (which execs the binary, so the child's pid is the
//! binary's), its stdout and stderr appended to one log file. It can be
//! stopped, killed, paused and started again with the same arguments.

use std::{
    ffi::OsString,
    fs::OpenOptions,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::netns::Netns;

/// How long `stop` waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// One process of the test (a Consul agent, a bridge, a proxy, a service).
#[derive(Debug)]
pub struct Process {
    name: String,
    ns: Netns,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    env: Vec<(OsString, OsString)>,
    child: Option<Child>,
    starts: u32,
}

impl Process {
    /// Describes a process; nothing runs until [`Process::start`].
    pub fn new(
        name: impl Into<String>,
        ns: &Netns,
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
        log: impl Into<PathBuf>,
    ) -> Self {
        Self {
            name: name.into(),
            ns: ns.clone(),
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            log: log.into(),
            env: Vec::new(),
            child: None,
            starts: 0,
        }
    }

    /// A second process like this one (namespace, program, arguments)
    /// under another name and log file, not started: e.g. a new proxy
    /// taking over from a running one.
    pub fn sibling(&self, name: impl Into<String>, log: impl Into<PathBuf>) -> Self {
        Self::new(name, &self.ns, self.program.clone(), self.args.clone(), log)
    }

    /// Sets `key` in the environment of every later start.
    pub fn set_env(&mut self, key: impl Into<OsString>, value: impl Into<OsString>) {
        self.env.push((key.into(), value.into()));
    }

    /// The process's name in reports (e.g. `n1/proxy`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace it runs in.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Its log file (stdout and stderr of every start, appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Starts the process (again) with its arguments. Fails if it runs.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("{} is already running", self.name);
        }
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open log {}", self.log.display()))?;
        writeln!(
            log,
            "=== e2e: start #{} of {}: {} {}",
            self.starts,
            self.name,
            self.program.display(),
            self.args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        )?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns.name()])
            .arg(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // The test's own MESH_* settings (MESH_BIN_DIR...) are not the
        // process's configuration.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MESH_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether it runs (a zombie is reaped and counts as not running).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// The pid while it runs.
    pub fn pid(&mut self) -> Option<Pid> {
        if !self.is_running() {
            return None;
        }
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    /// Sends a signal; fails if it does not run.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        let Some(pid) = self.pid() else {
            bail!("{} does not run (signal {signal})", self.name);
        };
        kill(pid, signal).with_context(|| format!("send {signal} to {}", self.name))
    }

    /// SIGKILL, and waits until it is gone.
    pub async fn kill(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)?;
        self.wait_exit(Duration::from_secs(10)).await.map(drop)
    }

    /// SIGTERM, waits up to [`STOP_GRACE`], then SIGKILL. A no-op if it does
    /// not run. Returns the exit status of a process that stopped by itself.
    pub async fn stop(&mut self) -> Result<Option<ExitStatus>> {
        if !self.is_running() {
            return Ok(None);
        }
        self.signal(Signal::SIGTERM)?;
        match self.wait_exit(STOP_GRACE).await {
            Ok(status) => Ok(Some(status)),
            Err(_) => {
                eprintln!(
                    "e2e: {} ignored SIGTERM for {STOP_GRACE:?}; SIGKILL",
                    self.name
                );
                self.kill().await?;
                Ok(None)
            }
        }
    }

    /// Stops it (if it runs) and starts it again with the same arguments.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.start()
    }

    /// SIGSTOP: the process hangs, its sockets stay open.
    pub fn pause(&mut self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT after [`Process::pause`].
    pub fn resume(&mut self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Waits until the process exits, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(child) = self.child.as_mut() else {
                bail!("{} does not run", self.name);
            };
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} still runs after {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends SIGTERM without waiting (teardown of many processes at once).
    pub(crate) fn terminate_nowait(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, Signal::SIGCONT);
            let _ = kill(pid, Signal::SIGTERM);
        }
    }

    /// SIGKILLs and reaps without an async runtime (teardown in `Drop`).
    pub(crate) fn kill_blocking(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_blocking();
    }
}
