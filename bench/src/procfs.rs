//! What `/proc` says about a process and a CPU: CPU time (utime + stime),
//! VmRSS, PSS, child processes, and a CPU's busy time.

use std::{fs, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};

/// `/proc`'s clock tick: USER_HZ is 100 on every Linux ABI the bench runs
/// on (it is fixed for user space, whatever the kernel's HZ).
pub const TICKS_PER_SEC: u64 = 100;

/// CPU time a process (all its threads) has used, in user space and in
/// the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTime {
    /// utime.
    pub user: Duration,
    /// stime: system calls, and the softirq work (loopback TCP delivery,
    /// say) done while the process ran.
    pub system: Duration,
}

impl CpuTime {
    /// User + system.
    pub fn total(self) -> Duration {
        self.user + self.system
    }
}

impl std::ops::Sub for CpuTime {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

impl std::iter::Sum for CpuTime {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, b| Self {
            user: a.user + b.user,
            system: a.system + b.system,
        })
    }
}

/// CPU time a process (all its threads) has used.
pub fn cpu_time(pid: u32) -> Result<CpuTime> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    let fields = stat_fields(&stat)?;
    // After the command name: state is field 3, utime 14 and stime 15.
    let ticks = |i: usize| -> Result<Duration> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|t| Duration::from_millis(t * 1000 / TICKS_PER_SEC))
            .ok_or_else(|| anyhow!("/proc/{pid}/stat: no field {i}"))
    };
    Ok(CpuTime {
        user: ticks(14)?,
        system: ticks(15)?,
    })
}

/// CPU time of this process's children that have ended and been waited
/// for, user + system (`cutime` + `cstime`): the difference around one
/// child's run is that child's CPU time.
pub fn reaped_children_cpu_time() -> Result<Duration> {
    let stat = fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?;
    let fields = stat_fields(&stat)?;
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow!("/proc/self/stat: no field {i}"))
    };
    let total = ticks(16)? + ticks(17)?;
    Ok(Duration::from_millis(total * 1000 / TICKS_PER_SEC))
}

/// Context switches of every thread of a process, voluntary (it waited:
/// `epoll_wait` with nothing ready, say) plus involuntary (preempted).
pub fn context_switches(pid: u32) -> Result<u64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("process {pid} is gone"))?;
    let mut total = 0;
    for task in tasks {
        let status = format!(
            "/proc/{pid}/task/{}/status",
            task?.file_name().to_string_lossy()
        );
        // A thread may end between the listing and the read.
        let Ok(text) = fs::read_to_string(&status) else {
            continue;
        };
        total += text
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches:")
                    || l.starts_with("nonvoluntary_ctxt_switches:")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}

/// Resident memory (VmRSS), in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    kb_field(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// Proportional set size (shared pages split among their users), in bytes.
pub fn pss_bytes(pid: u32) -> Result<u64> {
    kb_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}

/// `pid` and every process below it, parents first.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(children(parent));
        i += 1;
    }
    all
}

/// The direct children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| parent(p) == Some(pid))
        .collect()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat).ok()?.get(1)?.parse().ok()
}

/// The fields after `pid (comm)`: the command name may hold spaces and
/// parentheses, so split after its last `)`.
fn stat_fields(stat: &str) -> Result<Vec<&str>> {
    let (_, rest) = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow!("unexpected /proc stat line"))?;
    Ok(rest.split_whitespace().collect())
}

fn kb_field(path: &str, key: &str) -> Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("read {path}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .ok_or_else(|| anyhow!("{path}: no {key}"))?;
    let kb: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("{path}: {line}"))?;
    Ok(kb * 1024)
}

/// The kernel's count of connections dropped because a listener's accept
/// queue was full (`TcpExt: ListenOverflows`, all listeners).
pub fn listen_overflows() -> Result<u64> {
    let text = fs::read_to_string("/proc/net/netstat").context("read /proc/net/netstat")?;
    let mut tcp_ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (tcp_ext.next(), tcp_ext.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("/proc/net/netstat has no TcpExt lines");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| anyhow!("/proc/net/netstat: no ListenOverflows"))
}

/// One CPU's time counters from `/proc/stat`, in ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    /// Ticks spent on anything but idle and iowait.
    pub busy: u64,
    /// All ticks.
    pub total: u64,
}

impl CpuTimes {
    /// The counters of CPU `cpu` now.
    pub fn read(cpu: usize) -> Result<Self> {
        let text = fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        let label = format!("cpu{cpu}");
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(label.as_str()))
            .ok_or_else(|| anyhow!("/proc/stat has no {label}"))?;
        let values: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is
        // already counted in user).
        let total: u64 = values.iter().take(8).sum();
        let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
        Ok(Self {
            busy: total - idle,
            total,
        })
    }

    /// The share of time the CPU was busy since `earlier`, 0 to 1.
    pub fn busy_since(&self, earlier: &Self) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.busy.saturating_sub(earlier.busy) as f64 / total as f64
    }

    /// Busy time since `earlier`.
    pub fn busy_time_since(&self, earlier: &Self) -> Duration {
        let ticks = self.busy.saturating_sub(earlier.busy);
        Duration::from_millis(ticks * 1000 / TICKS_PER_SEC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(cpu_time(me).is_ok());
        assert!(reaped_children_cpu_time().is_ok());
        assert!(listen_overflows().is_ok());
        assert!(tree(me).contains(&me));
        let cpu = CpuTimes::read(0).unwrap();
        assert!(cpu.total >= cpu.busy);
    }

    #[test]
    fn command_names_with_parentheses_are_skipped() {
        let f = stat_fields("12 (a) b) S 1 12 12").unwrap();
        assert_eq!(f, vec!["S", "1", "12", "12"]);
    }
}
