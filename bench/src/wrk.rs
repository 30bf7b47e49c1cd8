//! One wrk run: one thread pinned to the load generator's CPU, `conns`
//! keep-alive connections, `GET /` with a `Host` header, latency recorded
//! (`--latency`). A Lua `done` hook prints the numbers as one JSON line
//! (exact microseconds, no parsing of wrk's rounded text); it adds nothing
//! to the request path, since wrk keeps its static request without a
//! `request` hook.

use std::{net::SocketAddr, path::Path, process::Stdio, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// The Lua script wrk runs.
pub const SCRIPT: &str = r#"-- Written by mesh-bench: the run's numbers as one JSON line.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"non_2xx":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"#;

/// What one run measured.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct WrkRun {
    /// Requests completed.
    pub requests: u64,
    /// Length of the run, µs.
    pub duration_us: u64,
    /// Socket errors by kind.
    pub connect_errors: u64,
    /// Read errors.
    pub read_errors: u64,
    /// Write errors.
    pub write_errors: u64,
    /// Timeouts.
    pub timeouts: u64,
    /// Answers that were not 2xx or 3xx.
    pub non_2xx: u64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Mean latency, µs.
    pub mean_us: f64,
    /// Slowest request, µs.
    pub max_us: u64,
}

/// A wrk load against one address.
#[derive(Clone, Debug)]
pub struct Load<'a> {
    /// The wrk binary.
    pub wrk: &'a Path,
    /// The Lua script file (holding [`SCRIPT`]).
    pub script: &'a Path,
    /// CPU wrk is pinned to.
    pub cpu: Option<usize>,
    /// Where to send.
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: &'a str,
    /// Keep-alive connections.
    pub conns: usize,
    /// Load time.
    pub duration: Duration,
}

// === impl WrkRun ===

impl WrkRun {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / (self.duration_us.max(1) as f64 / 1e6)
    }

    /// Requests that failed (socket errors, timeouts, non-2xx answers).
    pub fn failures(&self) -> u64 {
        self.connect_errors + self.read_errors + self.write_errors + self.timeouts + self.non_2xx
    }
}

// === impl Load ===

impl Load<'_> {
    /// Runs wrk and reads its numbers; a run with failed requests is an
    /// error (a benchmark of error answers measures nothing).
    pub async fn run(&self) -> Result<WrkRun> {
        let mut cmd = match self.cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(self.wrk);
                c
            }
            None => Command::new(self.wrk),
        };
        let secs = self.duration.as_secs().max(1);
        cmd.args(["-t1", "--latency", "--timeout", "2s"])
            .arg(format!("-c{}", self.conns))
            .arg(format!("-d{secs}s"))
            .arg("-H")
            .arg(format!("Host: {}", self.host))
            .arg("-s")
            .arg(self.script)
            .arg(format!("http://{}/", self.addr))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let bound = self.duration + Duration::from_secs(15);
        let output = tokio::time::timeout(bound, cmd.output())
            .await
            .map_err(|_| anyhow!("wrk did not finish within {bound:?}"))?
            .context("run wrk")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "wrk failed ({}): {stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let run = parse(&stdout)?;
        if run.failures() > 0 {
            bail!(
                "{} of {} requests to {} (Host: {}) failed:\n{stdout}",
                run.failures(),
                run.requests,
                self.addr,
                self.host
            );
        }
        Ok(run)
    }
}

/// The numbers in wrk's output.
pub fn parse(stdout: &str) -> Result<WrkRun> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("WRKJSON "))
        .ok_or_else(|| anyhow!("no numbers in wrk's output:\n{stdout}"))?;
    serde_json::from_str(line).with_context(|| format!("wrk's numbers: {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_from_the_json_line() {
        let out = "Running 1s test\nWRKJSON {\"requests\":1000,\"duration_us\":500000,\
                   \"connect_errors\":0,\"read_errors\":0,\"write_errors\":0,\"timeouts\":0,\
                   \"non_2xx\":2,\"p50_us\":40,\"p90_us\":60,\"p99_us\":90,\"mean_us\":41.5,\
                   \"max_us\":300}\n";
        let run = parse(out).unwrap();
        assert_eq!(run.rps(), 2000.0);
        assert_eq!(run.p99_us, 90);
        assert_eq!(run.failures(), 2);
    }
}
