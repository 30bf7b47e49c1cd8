//! Child processes owned by `meshctl dev up`: each in its own process
//! group (so a Ctrl-C reaches meshctl alone and it can stop them in order),
//! output to a log file, SIGTERM then SIGKILL after a grace period, and
//! killed on drop whatever happens.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::{Child, Command};

/// A running child process with a name and a log file.
#[derive(Debug)]
pub struct Proc {
    /// Short name shown to the user ("consul", "mesh-proxy").
    pub name: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    child: Child,
}

/// Processes stopped in the reverse order of their start.
#[derive(Debug, Default)]
pub struct Group {
    procs: Vec<Proc>,
}

impl Group {
    /// Starts `program args…` as `name`, logging to `log_dir/<name>.log`.
    pub fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
    ) -> anyhow::Result<&Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create log file {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        self.procs.push(Proc {
            name: name.to_owned(),
            log,
            child,
        });
        Ok(self.procs.last().expect("a process was just pushed"))
    }

    /// The first process that has exited, with its status, if any.
    pub fn exited(&mut self) -> Option<(String, std::process::ExitStatus)> {
        self.procs.iter_mut().find_map(|p| {
            p.child
                .try_wait()
                .ok()
                .flatten()
                .map(|status| (p.name.clone(), status))
        })
    }

    /// Stops every process, newest first: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop_all(&mut self, grace: Duration) {
        while let Some(mut p) = self.procs.pop() {
            if let Some(pid) = p.child.id() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
            if tokio::time::timeout(grace, p.child.wait()).await.is_err() {
                tracing::warn!(name = %p.name, "did not stop in time; killing");
                let _ = p.child.kill().await;
            }
        }
    }
}
