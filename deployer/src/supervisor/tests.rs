//! Real processes (`sh -c` scripts) in temp folders. Every process a test
//! starts carries the test's mark in its environment, and a guard kills
//! every marked process when the test ends, also when it fails.

use std::{
    collections::BTreeMap, fs, os::unix::process::CommandExt, path::PathBuf, time::Duration,
};

use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use tokio::time::Instant;

use super::*;

const MARK_VAR: &str = "MW_TEST_MARK";
const GRACE: Duration = Duration::from_secs(5);

/// A temp folder, and the guard of the processes started in it.
struct Fixture {
    // Declared first, so it runs before the folder is removed.
    _cleanup: Cleanup,
    mark: String,
    dir: tempfile::TempDir,
}

/// Kills every live process carrying `mark` (and its process group).
struct Cleanup {
    mark: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in marked(&self.mark) {
            let pid = Pid::from_raw(pid as i32);
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

/// The live (not zombie) processes whose environment carries `mark`: a
/// `pgrep` over `/proc`.
fn marked(mark: &str) -> Vec<u32> {
    let needle = format!("{MARK_VAR}={mark}");
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
                && procfs::stat(*pid).is_ok_and(|s| !matches!(s.state, 'Z' | 'X'))
        })
        .collect();
    pids.sort_unstable();
    pids
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().display().to_string();
        Self {
            _cleanup: Cleanup { mark: mark.clone() },
            mark,
            dir,
        }
    }

    /// Fast timers: restarts after 25–200 ms, rotation checks every 50 ms.
    fn config(&self) -> SupervisorConfig {
        let mut c = SupervisorConfig::new(self.dir.path().join("state"));
        c.restart_backoff_min = Duration::from_millis(50);
        c.restart_backoff_max = Duration::from_millis(200);
        c.rotate_every = Duration::from_millis(50);
        c.adopted_poll = Duration::from_millis(20);
        c.kill_wait = Duration::from_secs(2);
        c
    }

    fn spec(&self, id: &str, script: &str) -> ProcessSpec {
        ProcessSpec {
            service: "orders".into(),
            instance_id: id.into(),
            version: "1.4.2".into(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            env: BTreeMap::from([
                ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
                (MARK_VAR.into(), self.mark.clone()),
            ]),
            work_dir: self.dir.path().join("work"),
            log_dir: self.dir.path().join("logs"),
        }
    }

    fn work_file(&self, name: &str) -> PathBuf {
        self.dir.path().join("work").join(name)
    }

    fn record(&self, id: &str) -> Option<ProcessRecord> {
        record::read(&self.dir.path().join("state"), id).unwrap()
    }

    fn live(&self) -> Vec<u32> {
        marked(&self.mark)
    }
}

/// Polls `check` until it gives a value, for at most 5 s.
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `pid` is the one live process of the test. (Polled: a
/// process in the middle of `exec` briefly shows an empty environment.)
async fn only_process(f: &Fixture, pid: u32) {
    eventually(&format!("{pid} as the only process"), async || {
        (f.live() == [pid]).then_some(())
    })
    .await;
}

fn lines(path: &std::path::Path) -> usize {
    fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

async fn wait_for_line(sup: &Supervisor, id: &str, stream: LogStream, line: &str) {
    eventually(
        &format!("{line:?} in the {stream:?} log of {id}"),
        async || {
            let tail = sup.log_tail(id, stream, 20, 64 * 1024).await.unwrap();
            tail.iter().any(|l| l == line).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn sigterm_stops_a_started_process_and_removes_its_record() {
    let f = Fixture::new();
    let sup = Supervisor::new(f.config()).unwrap();
    let script = "trap 'echo bye; exit 0' TERM; echo hello; while :; do sleep 0.05; done";
    let started = sup.start(f.spec("web-1", script)).await.unwrap();
    assert_eq!(started.state, InstanceState::Running);
    let pid = started.pid.unwrap();
    let rec = f.record("web-1").expect("a running instance is recorded");
    assert_eq!(rec.pid, pid);
    assert_eq!(rec.starttime, procfs::stat(pid).unwrap().starttime);
    wait_for_line(&sup, "web-1", LogStream::Out, "hello").await;

    let outcome = sup.stop("web-1", GRACE).await.unwrap();

    assert_eq!(outcome, StopOutcome::Terminated(ExitInfo::Code(0)));
    let status = sup.status("web-1").await.unwrap();
    assert_eq!(status.state, InstanceState::Stopped);
    assert_eq!(status.pid, None);
    assert_eq!(status.last_exit, Some(ExitInfo::Code(0)));
    assert_eq!(status.restarts, 0);
    assert!(f.record("web-1").is_none(), "record left after stop");
    let tail = sup
        .log_tail("web-1", LogStream::Out, 10, 4096)
        .await
        .unwrap();
    assert_eq!(tail, ["hello", "bye"]);
    eventually("no process left", async || {
        f.live().is_empty().then_some(())
    })
    .await;
    assert_eq!(
        sup.stop("web-1", GRACE).await.unwrap(),
        StopOutcome::NotRunning
    );
    // A stopped instance may be started again.
    let again = sup.start(f.spec("web-1", "exec sleep 30")).await.unwrap();
    assert_ne!(again.pid, Some(pid));
    sup.stop("web-1", GRACE).await.unwrap();
}

#[tokio::test]
async fn process_ignoring_sigterm_is_killed_after_grace() {
    let f = Fixture::new();
    let sup = Supervisor::new(f.config()).unwrap();
    let script = "trap '' TERM; echo ready; while :; do sleep 0.05; done";
    sup.start(f.spec("stubborn-1", script)).await.unwrap();
    wait_for_line(&sup, "stubborn-1", LogStream::Out, "ready").await;

    let grace = Duration::from_millis(300);
    let began = Instant::now();
    let outcome = sup.stop("stubborn-1", grace).await.unwrap();

    assert_eq!(outcome, StopOutcome::Killed(ExitInfo::Signal(9)));
    assert!(
        began.elapsed() >= grace,
        "killed before the grace period ended"
    );
    let status = sup.status("stubborn-1").await.unwrap();
    assert_eq!(status.state, InstanceState::Stopped);
    assert_eq!(status.last_exit, Some(ExitInfo::Signal(9)));
    // SIGKILL went to the group: the script's `sleep` is gone too.
    eventually("no process left", async || {
        f.live().is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn crashing_process_is_restarted_with_growing_backoff() {
    let f = Fixture::new();
    let sup = Supervisor::new(f.config()).unwrap();
    let began = Instant::now();
    sup.start(f.spec("flaky-1", "echo run >> runs; echo failing >&2; exit 3"))
        .await
        .unwrap();

    let runs = f.work_file("runs");
    eventually("four runs", async || (lines(&runs) >= 4).then_some(())).await;

    // Three restarts waited at least 25 + 50 + 100 ms (jittered halves of
    // 50, 100, 200).
    assert!(
        began.elapsed() >= Duration::from_millis(175),
        "{:?}",
        began.elapsed()
    );
    let status = sup.status("flaky-1").await.unwrap();
    assert!(status.restarts >= 3, "{status:?}");
    assert_eq!(status.last_exit, Some(ExitInfo::Code(3)));
    assert!(
        matches!(
            status.state,
            InstanceState::Running | InstanceState::Restarting
        ),
        "{status:?}"
    );
    assert!(
        f.record("flaky-1").is_some(),
        "a crashed instance stays wanted"
    );
    let err = sup
        .log_tail("flaky-1", LogStream::Err, 2, 4096)
        .await
        .unwrap();
    assert_eq!(err, ["failing", "failing"]);

    sup.stop("flaky-1", GRACE).await.unwrap();
    let status = sup.status("flaky-1").await.unwrap();
    assert_eq!(status.state, InstanceState::Stopped);
    assert!(f.record("flaky-1").is_none());
}

#[tokio::test]
async fn logs_are_appended_and_rotated_keeping_three_copies() {
    let f = Fixture::new();
    let mut config = f.config();
    config.max_log_bytes = 1000;
    let sup = Supervisor::new(config).unwrap();
    // 100 lines of 100 bytes, a little at a time, so rotation happens while
    // the process writes.
    let script = "echo oops >&2; i=0; while [ $i -lt 100 ]; do printf '%099d\\n' $i; \
                  i=$((i+1)); sleep 0.005; done; echo done; exec sleep 30";
    let spec = f.spec("chatty-1", script);
    let out = spec.log_path(LogStream::Out);
    let copy = |n: usize| PathBuf::from(format!("{}.{n}", out.display()));
    sup.start(spec.clone()).await.unwrap();

    // Once everything is written and the file is under the limit, nothing
    // changes any more. ("done" may have been rotated into `.1`.)
    let has_done =
        |p: &PathBuf| fs::read_to_string(p).is_ok_and(|s| s.lines().any(|l| l == "done"));
    eventually("everything written and rotated", async || {
        let small = fs::metadata(&out).is_ok_and(|m| m.len() <= 1000);
        (small && copy(2).exists() && (has_done(&out) || has_done(&copy(1)))).then_some(())
    })
    .await;

    assert!(!copy(4).exists(), "more than three copies kept");
    // Lines are whole and in order across the copies (a few may be lost in
    // the copytruncate window, and a copy may end in a line cut by it), and
    // no file has a hole of NULs.
    let mut seen = Vec::new();
    for path in [copy(3), copy(2), copy(1), out.clone()] {
        let text = fs::read(&path).unwrap_or_default();
        assert!(!text.contains(&0), "NUL bytes in {}", path.display());
        let text = String::from_utf8(text).unwrap();
        let count = text.lines().count();
        for (i, line) in text.lines().enumerate() {
            if line == "done" || (line.len() != 99 && path != out && i + 1 == count) {
                continue;
            }
            assert_eq!(line.len(), 99, "torn line {line:?} in {}", path.display());
            seen.push(line.parse::<u32>().unwrap());
        }
    }
    assert!(seen.len() >= 20, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "out of order: {seen:?}"
    );
    let err = sup
        .log_tail("chatty-1", LogStream::Err, 5, 1024)
        .await
        .unwrap();
    assert_eq!(err, ["oops"]);
    sup.stop("chatty-1", GRACE).await.unwrap();
}

#[tokio::test]
async fn new_supervisor_adopts_running_process_without_starting_another() {
    let f = Fixture::new();
    let spec = f.spec("api-1", "echo up; exec sleep 30");
    let first = Supervisor::new(f.config()).unwrap();
    let pid = first.start(spec.clone()).await.unwrap().pid.unwrap();
    wait_for_line(&first, "api-1", LogStream::Out, "up").await;
    let rec = f.record("api-1").unwrap();
    // The deployer dies: its watchers end, its processes do not.
    drop(first);
    assert_eq!(procfs::liveness(pid, rec.starttime), Liveness::Alive);

    let second = Supervisor::new(f.config()).unwrap();
    assert!(
        matches!(
            second.start(spec.clone()).await,
            Err(SupervisorError::RunningUnadopted { pid: p, .. }) if p == pid
        ),
        "started a duplicate before adopting"
    );
    let report = second.adopt().await.unwrap();

    assert_eq!(report.adopted, ["api-1"]);
    assert!(
        report.restarted.is_empty() && report.invalid.is_empty(),
        "{report:?}"
    );
    let status = second.status("api-1").await.unwrap();
    assert_eq!(status.pid, Some(pid));
    assert_eq!(status.state, InstanceState::Running);
    assert!(status.adopted);
    assert!(matches!(
        second.start(spec).await,
        Err(SupervisorError::AlreadyRunning(_))
    ));
    assert_eq!(second.adopt().await.unwrap().skipped, ["api-1"]);
    only_process(&f, pid).await;

    let outcome = second.stop("api-1", GRACE).await.unwrap();

    assert_eq!(outcome, StopOutcome::Terminated(ExitInfo::Unknown));
    assert!(f.record("api-1").is_none());
    assert_eq!(
        second.status("api-1").await.unwrap().state,
        InstanceState::Stopped
    );
    eventually("no process left", async || {
        f.live().is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn adopted_process_that_exits_is_restarted() {
    let f = Fixture::new();
    let first = Supervisor::new(f.config()).unwrap();
    first
        .start(f.spec("worker-1", "echo run >> runs; exec sleep 30"))
        .await
        .unwrap();
    drop(first);
    let second = Supervisor::new(f.config()).unwrap();
    assert_eq!(second.adopt().await.unwrap().adopted, ["worker-1"]);
    let pid = second.status("worker-1").await.unwrap().pid.unwrap();
    only_process(&f, pid).await;
    let runs = f.work_file("runs");
    eventually("the first run", async || (lines(&runs) == 1).then_some(())).await;

    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);

    eventually("a second run", async || (lines(&runs) == 2).then_some(())).await;
    let status = eventually("running again", async || {
        second
            .status("worker-1")
            .await
            .filter(|s| s.state == InstanceState::Running && s.pid != Some(pid))
    })
    .await;
    assert_ne!(status.pid, Some(pid));
    assert_eq!(status.restarts, 1);
    assert_eq!(status.last_exit, Some(ExitInfo::Unknown));
    assert!(!status.adopted);
    assert_eq!(f.record("worker-1").unwrap().pid, status.pid.unwrap());
    second.stop("worker-1", GRACE).await.unwrap();
}

#[tokio::test]
async fn record_of_dead_process_is_started_anew_on_adopt() {
    let f = Fixture::new();
    let first = Supervisor::new(f.config()).unwrap();
    let spec = f.spec("db-1", "echo run >> runs; exec sleep 30");
    let pid = first.start(spec).await.unwrap().pid.unwrap();
    let rec = f.record("db-1").unwrap();
    let runs = f.work_file("runs");
    eventually("the first run", async || (lines(&runs) == 1).then_some(())).await;
    drop(first);
    // It dies while no deployer runs.
    killpg(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    eventually("the process gone", async || {
        (procfs::liveness(pid, rec.starttime) == Liveness::Gone).then_some(())
    })
    .await;

    let second = Supervisor::new(f.config()).unwrap();
    let report = second.adopt().await.unwrap();

    assert_eq!(report.restarted, ["db-1"]);
    assert!(report.adopted.is_empty(), "{report:?}");
    let status = second.status("db-1").await.unwrap();
    let new_pid = status.pid.unwrap();
    assert_ne!(new_pid, pid);
    assert_eq!(status.state, InstanceState::Running);
    assert_eq!(status.restarts, 1);
    assert_eq!(f.record("db-1").unwrap().pid, new_pid);
    eventually("the second run", async || {
        (lines(&f.work_file("runs")) == 2).then_some(())
    })
    .await;
    only_process(&f, new_pid).await;
    assert_eq!(
        second.stop("db-1", GRACE).await.unwrap(),
        StopOutcome::Terminated(ExitInfo::Signal(15))
    );
}

#[tokio::test]
async fn record_whose_pid_was_reused_never_signals_that_process() {
    let f = Fixture::new();
    // A stranger now holds the recorded pid: same pid, another start time.
    let mut stranger = std::process::Command::new("sleep")
        .arg("30")
        .env(MARK_VAR, &f.mark)
        .process_group(0)
        .spawn()
        .unwrap();
    let stranger_pid = stranger.id();
    let stranger_start = procfs::stat(stranger_pid).unwrap().starttime;
    let spec = f.spec("old-1", "exec sleep 30");
    let state_dir = f.dir.path().join("state");
    fs::create_dir_all(&state_dir).unwrap();
    record::write(
        &state_dir,
        &ProcessRecord {
            pid: stranger_pid,
            starttime: stranger_start.saturating_sub(1),
            started_at_ms: 0,
            restarts: 0,
            spec,
        },
    )
    .unwrap();

    let sup = Supervisor::new(f.config()).unwrap();
    let report = sup.adopt().await.unwrap();

    assert_eq!(report.restarted, ["old-1"]);
    let status = sup.status("old-1").await.unwrap();
    assert_ne!(status.pid, Some(stranger_pid));
    sup.stop("old-1", GRACE).await.unwrap();
    assert_eq!(
        procfs::liveness(stranger_pid, stranger_start),
        Liveness::Alive,
        "the stranger was signalled"
    );
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}

#[tokio::test]
async fn unreadable_records_are_reported_and_left_alone() {
    let f = Fixture::new();
    let state_dir = f.dir.path().join("state");
    fs::create_dir_all(&state_dir).unwrap();
    fs::write(state_dir.join("broken.json"), b"{not json").unwrap();
    let sup = Supervisor::new(f.config()).unwrap();

    let report = sup.adopt().await.unwrap();

    assert_eq!(report.invalid.len(), 1, "{report:?}");
    assert!(report.invalid[0].0.ends_with("broken.json"));
    assert!(state_dir.join("broken.json").exists());
    assert!(sup.list().await.is_empty());
}

#[tokio::test]
async fn bad_specs_and_configs_are_refused() {
    let f = Fixture::new();
    let sup = Supervisor::new(f.config()).unwrap();
    for id in ["", "../etc", ".hidden", "a b"] {
        let err = sup.start(f.spec(id, "true")).await.unwrap_err();
        assert!(
            matches!(err, SupervisorError::InvalidInstanceId(_)),
            "{id:?}: {err}"
        );
    }
    let mut spec = f.spec("x-1", "true");
    spec.command.clear();
    assert!(matches!(
        sup.start(spec).await,
        Err(SupervisorError::EmptyCommand(_))
    ));
    let mut spec = f.spec("x-2", "true");
    spec.command = vec!["/nonexistent/java".into()];
    let err = sup.start(spec).await.unwrap_err();
    assert!(matches!(err, SupervisorError::Spawn { .. }), "{err}");
    assert!(f.record("x-2").is_none());
    assert!(matches!(
        sup.stop("nobody", GRACE).await,
        Err(SupervisorError::UnknownInstance(_))
    ));
    let mut config = f.config();
    config.rotate_every = Duration::ZERO;
    assert!(matches!(
        Supervisor::new(config),
        Err(SupervisorError::InvalidConfig(_))
    ));
}
