//! Network namespaces: a private L2 network per test (a "hub" namespace
//! holding a Linux bridge, one namespace per host joined to it by a veth
//! pair), sockets opened inside a namespace, and removal of namespaces left
//! behind by a crashed run.
//!
//! The root namespace's network is never modified: both ends of every veth
//! pair are created directly in their target namespaces.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::net::{TcpSocket, TcpStream};

/// Prefix of every namespace (and temp dir) this harness creates.
pub const PREFIX: &str = "mwe";

/// Serialises `ip netns add/del`: the first `ip netns add` of a machine sets up
/// the shared mount of /run/netns, and two racing first calls can mount it twice.
static IP_LOCK: Mutex<()> = Mutex::new(());

/// Makes every network of this process unique (names and subnets).
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One network namespace, shared cheaply (clones refer to the same one).
#[derive(Clone, Debug)]
pub struct Netns {
    inner: Arc<NetnsInner>,
}

#[derive(Debug)]
struct NetnsInner {
    name: String,
    ip: Option<Ipv4Addr>,
}

/// A private network: a hub namespace with a bridge, and hosts attached to it,
/// each with one address in the network's /24. Dropping it kills whatever
/// still runs in its namespaces and deletes them.
#[derive(Debug)]
pub struct Network {
    id: String,
    slot: u8,
    hub: Netns,
    hosts: Vec<Netns>,
}

// === impl Netns ===

impl Netns {
    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The host's address on the test network (`None` for the hub).
    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.inner.ip
    }

    /// The host's address; panics for the hub, which has none (a harness bug).
    pub fn addr(&self) -> Ipv4Addr {
        self.inner
            .ip
            .expect("only hosts have an address; the hub has none")
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.inner.name)
    }

    /// Connects a TCP stream from inside this namespace.
    ///
    /// The socket is created on a short-lived thread that entered the
    /// namespace (a socket keeps the namespace it was created in); the connect
    /// itself runs on the caller's runtime, bounded by `timeout`.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        let socket = self.socket(addr.is_ipv4()).await?;
        let stream = tokio::time::timeout(timeout, socket.connect(addr))
            .await
            .map_err(|_| {
                anyhow!(
                    "connect to {addr} in {} timed out after {timeout:?}",
                    self.name()
                )
            })?
            .with_context(|| format!("connect to {addr} in {}", self.name()))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Creates an unconnected TCP socket inside this namespace.
    pub async fn socket(&self, v4: bool) -> Result<TcpSocket> {
        let file = File::open(self.path())
            .with_context(|| format!("open namespace {}", self.path().display()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A dedicated thread, never a pooled one: it stays in the namespace
        // after setns, so it must die right after creating the socket.
        std::thread::Builder::new()
            .name("netns-socket".into())
            .spawn(move || {
                let result = setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(anyhow::Error::from)
                    .and_then(|()| {
                        if v4 {
                            TcpSocket::new_v4()
                        } else {
                            TcpSocket::new_v6()
                        }
                        .map_err(anyhow::Error::from)
                    });
                let _ = tx.send(result);
            })
            .context("spawn netns thread")?;
        rx.await.context("netns thread died")?
    }

    /// Pids of every process in this namespace.
    pub fn pids(&self) -> Vec<Pid> {
        netns_pids(self.name())
    }
}

// === impl Network ===

impl Network {
    /// Creates the hub namespace and its bridge. Removes namespaces left by
    /// dead harness processes first (once per process).
    pub fn create() -> Result<Self> {
        remove_stale();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // Distinct for up to 250 networks alive at once in this process.
        let slot = ((pid.wrapping_mul(7).wrapping_add(n)) % 250 + 1) as u8;
        let id = format!("{PREFIX}-{pid}-{n}");
        let hub = Netns {
            inner: Arc::new(NetnsInner {
                name: format!("{id}-hub"),
                ip: None,
            }),
        };
        let mut net = Self {
            id,
            slot,
            hub: hub.clone(),
            hosts: Vec::new(),
        };
        add_netns(hub.name())?;
        ip(&["-n", hub.name(), "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", hub.name(), "link", "set", "dev", "br0", "up"])?;
        ip(&["-n", hub.name(), "link", "set", "dev", "lo", "up"])?;
        net.hosts.reserve(8);
        Ok(net)
    }

    /// This network's unique id (`mwe-<pid>-<n>`), also the namespaces' prefix.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Adds a host namespace named `<id>-<name>` with address `10.231.<slot>.<octet>/24`.
    pub fn add_host(&mut self, name: &str, octet: u8) -> Result<Netns> {
        if name.len() > 12 || name.is_empty() {
            bail!("host name {name:?} must be 1..=12 characters (an interface name)");
        }
        let addr = Ipv4Addr::new(10, 231, self.slot, octet);
        let host = Netns {
            inner: Arc::new(NetnsInner {
                name: format!("{}-{name}", self.id),
                ip: Some(addr),
            }),
        };
        add_netns(host.name())?;
        // Registered before configuring, so a failure below still deletes it.
        self.hosts.push(host.clone());
        let peer = format!("v-{name}");
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            host.name(),
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            self.hub.name(),
        ])?;
        ip(&[
            "-n",
            self.hub.name(),
            "link",
            "set",
            "dev",
            &peer,
            "master",
            "br0",
            "up",
        ])?;
        ip(&["-n", host.name(), "link", "set", "dev", "lo", "up"])?;
        ip(&[
            "-n",
            host.name(),
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", host.name(), "link", "set", "dev", "eth0", "up"])?;
        Ok(host)
    }

    /// Every host namespace of this network.
    pub fn hosts(&self) -> &[Netns] {
        &self.hosts
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let all: Vec<String> = self
            .hosts
            .iter()
            .chain(std::iter::once(&self.hub))
            .map(|ns| ns.name().to_owned())
            .collect();
        for name in &all {
            kill_all_in(name);
        }
        for name in &all {
            if let Err(e) = del_netns(name) {
                eprintln!("e2e: could not delete namespace {name}: {e:#}");
            }
        }
    }
}

// === namespaces by name ===

/// Removes namespaces and temp dirs of harness processes that no longer run
/// (a crashed or killed earlier run). Runs once per process.
pub fn remove_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for name in list_netns() {
            if let Some(pid) = owner_pid(&name)
                && !alive(pid)
            {
                eprintln!("e2e: removing stale namespace {name} (pid {pid} is gone)");
                kill_all_in(&name);
                if let Err(e) = del_netns(&name) {
                    eprintln!("e2e: could not delete stale namespace {name}: {e:#}");
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(scratch_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = owner_pid(&name)
                    && !alive(pid)
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    });
}

/// Where tests keep their files: `/dev/shm` (tmpfs) when there is one, else
/// the temp dir. On tmpfs an fsync costs nothing, so Consul's Raft commits
/// (and the mesh's own fsyncs) do not stall behind other disk traffic of the
/// machine, which would show as seconds of delay the mesh is not to blame for.
pub fn scratch_dir() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

/// The pid in a name `mwe-<pid>-...`, if it is one of ours.
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    rest.split('-').next()?.parse().ok()
}

/// Whether `pid` runs (a zombie does not: its namespaces are ours to remove).
fn alive(pid: i32) -> bool {
    if pid == std::process::id() as i32 {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => false,
    }
}

fn list_netns() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .collect()
}

fn netns_pids(name: &str) -> Vec<Pid> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .map(Pid::from_raw)
        .collect()
}

/// SIGKILLs every process in a namespace and waits (bounded) until none is left.
fn kill_all_in(name: &str) {
    for _ in 0..50 {
        let pids = netns_pids(name);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = kill(pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn add_netns(name: &str) -> Result<()> {
    let _guard = IP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ip(&["netns", "add", name])
}

fn del_netns(name: &str) -> Result<()> {
    let _guard = IP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    ip(&["netns", "del", name])
}

/// Runs `ip <args>`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run `ip` (iproute2 must be installed; e2e needs root)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {} (e2e needs root and iproute2)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_reads_only_our_names() {
        assert_eq!(owner_pid("mwe-1234-0-hub"), Some(1234));
        assert_eq!(owner_pid("mwe-1234"), Some(1234));
        assert_eq!(owner_pid("mwex-1234-0"), None);
        assert_eq!(owner_pid("other-1234"), None);
        assert_eq!(owner_pid("mwe-abc-0"), None);
    }
}
