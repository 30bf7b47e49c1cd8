//! A child process of the bench: optionally pinned to one CPU (`taskset`
//! execs the program, so the child's pid is the program's), its stdout and
//! stderr in a log file, and killed with everything below it when dropped,
//! also when the run fails. (`bench/run.sh` kills the whole process group
//! on top of that, should the bench itself be killed.)

use std::{
    ffi::OsStr,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::procfs;

/// A running child process.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

// === impl Proc ===

impl Proc {
    /// Starts `program` with `args` (pinned to `cpu` when given), logging
    /// to `<log_dir>/<name>.log`.
    pub fn spawn<I, S>(
        name: &str,
        program: &Path,
        args: I,
        cpu: Option<usize>,
        log_dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {name} ({})", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Its name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Fails, with the tail of its log, when the process has exited.
    pub fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(20)
            );
        }
        Ok(())
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Context switches of the process and all its children, every thread.
    pub fn context_switches(&self) -> Result<u64> {
        procfs::tree(self.pid())
            .into_iter()
            .map(procfs::context_switches)
            .sum()
    }

    /// CPU time of the process and all its children (nginx's workers).
    pub fn cpu_time(&self) -> Result<procfs::CpuTime> {
        procfs::tree(self.pid())
            .into_iter()
            .map(procfs::cpu_time)
            .sum()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Children first found, then all killed: nginx's worker would
        // outlive a master killed alone.
        for pid in procfs::tree(self.pid()).into_iter().rev() {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}
