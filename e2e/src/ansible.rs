//! Hosts for ansible playbooks: a private network with one namespace per
//! host, each running sshd (a test key, root login by key only) and a
//! Consul agent in dev mode, and a controller namespace that runs
//! `ansible-playbook` over ssh to the hosts' addresses.
//!
//! The namespaces share the machine's filesystem, so each host gets its
//! own install prefix (`meshwork_prefix`), and the playbooks run with
//! `meshwork_service_manager=process` (no systemd in a namespace). Every
//! process the playbooks start runs inside a host's namespace and is
//! killed with the network when [`Hosts`] is dropped.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    bins,
    mesh::consul_leader,
    netns::{Netns, Network, PREFIX, scratch_dir},
    process::Process,
    wait::eventually,
};

/// How long sshd and Consul get to come up.
const STARTUP: Duration = Duration::from_secs(30);

/// The longest one `ansible-playbook` run may take.
const PLAYBOOK_TIMEOUT: Duration = Duration::from_secs(600);

/// Hosts reachable over ssh from a controller namespace.
#[derive(Debug)]
pub struct Hosts {
    /// sshd and Consul of every host (stopped first on drop).
    daemons: Vec<Process>,
    /// The namespaces; dropping it kills what the playbooks started.
    network: Network,
    /// Where `ansible-playbook` runs.
    controller: Netns,
    /// The hosts, in inventory order.
    pub hosts: Vec<Host>,
    /// Keys, sshd configs, inventory, logs, ansible's temp folders.
    dir: Scratch,
}

/// One host of the inventory.
#[derive(Debug)]
pub struct Host {
    /// Its inventory name (`n1`).
    pub name: String,
    /// Its namespace.
    pub ns: Netns,
    /// Its install prefix (`meshwork_prefix`): `<prefix>/usr/local/bin`, ...
    pub prefix: PathBuf,
}

/// What one `ansible-playbook` run did.
#[derive(Debug)]
pub struct Run {
    /// Whether it exited 0.
    pub success: bool,
    /// Its stdout and stderr.
    pub output: String,
}

/// One host's line of the `PLAY RECAP`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recap {
    /// Tasks that were fine.
    pub ok: u32,
    /// Tasks that changed something.
    pub changed: u32,
    /// Tasks that failed.
    pub failed: u32,
    /// Blocks whose failure a rescue handled.
    pub rescued: u32,
}

/// A folder removed on drop.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

// === impl Hosts ===

impl Hosts {
    /// Starts `names.len()` hosts (sshd + Consul dev agent each) and the
    /// controller; `big` is a folder for the install prefixes (binaries
    /// are large: keep them off tmpfs). Fails naming a missing tool.
    pub async fn start(names: &[&str], big: &Path) -> Result<Self> {
        let sshd = PathBuf::from("/usr/sbin/sshd");
        ensure!(
            sshd.is_file(),
            "/usr/sbin/sshd not found: install Debian's openssh-server (and openssh-client)"
        );
        which("ssh-keygen", "openssh-client")?;
        which("ansible-playbook", "ansible-core")?;
        let consul = bins::consul()?;
        // sshd refuses to start without its privilege separation folder.
        std::fs::create_dir_all("/run/sshd").context("create /run/sshd")?;

        let dir = Scratch::new(&scratch_dir(), "ansible")?;
        keygen(&dir.path.join("host_key"))?;
        keygen(&dir.path.join("id"))?;
        std::fs::copy(dir.path.join("id.pub"), dir.path.join("authorized_keys"))?;

        let mut network = Network::create()?;
        let controller = network.add_host("ctl", 250)?;
        let mut hosts = Vec::new();
        let mut daemons = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let octet = u8::try_from(i + 1).context("too many hosts")?;
            let ns = network.add_host(name, octet)?;
            let config = dir.path.join(format!("sshd-{name}.conf"));
            std::fs::write(&config, sshd_config(ns.addr(), &dir.path))?;
            let mut ssh = Process::new(
                format!("{name}/sshd"),
                &ns,
                &sshd,
                [
                    "-D".into(),
                    "-e".into(),
                    "-f".into(),
                    config.display().to_string(),
                ],
                dir.path.join(format!("{name}-sshd.log")),
            );
            ssh.start()?;
            daemons.push(ssh);
            let mut agent = Process::new(
                format!("{name}/consul"),
                &ns,
                &consul,
                consul_args(name, ns.addr()),
                dir.path.join(format!("{name}-consul.log")),
            );
            agent.start()?;
            daemons.push(agent);
            let prefix = big.join(name);
            std::fs::create_dir_all(&prefix)?;
            hosts.push(Host {
                name: (*name).to_owned(),
                ns,
                prefix,
            });
        }
        let this = Self {
            daemons,
            network,
            controller,
            hosts,
            dir,
        };
        for host in &this.hosts {
            let ssh = SocketAddr::from((host.ns.addr(), 22));
            eventually(&format!("sshd of {} answers", host.name), STARTUP, || {
                let controller = this.controller.clone();
                async move {
                    controller.connect(ssh, Duration::from_secs(1)).await?;
                    Ok(())
                }
            })
            .await?;
            eventually(
                &format!("Consul on {} has a leader", host.name),
                STARTUP,
                || {
                    let ns = host.ns.clone();
                    async move {
                        match consul_leader(&ns).await? {
                            Some(_) => Ok(()),
                            None => bail!("no leader yet"),
                        }
                    }
                },
            )
            .await?;
        }
        Ok(this)
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .expect("a host the test started")
    }

    /// Writes an inventory: `groups` maps a group to its hosts; every host
    /// gets its address, prefix and the test key.
    pub fn inventory(&self, groups: &[(&str, &[&str])]) -> Result<PathBuf> {
        let mut text = String::new();
        for (group, members) in groups {
            writeln!(text, "[{group}]")?;
            for name in *members {
                let host = self.host(name);
                writeln!(
                    text,
                    "{name} ansible_host={} meshwork_prefix={}",
                    host.ns.addr(),
                    host.prefix.display()
                )?;
            }
        }
        writeln!(
            text,
            "[all:vars]\nansible_user=root\nansible_ssh_private_key_file={}\n\
             ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n\
             ansible_python_interpreter=/usr/bin/python3",
            self.dir.path.join("id").display()
        )?;
        let path = self.dir.path.join("inventory.ini");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Runs `ansible-playbook <args>` in the controller namespace; its
    /// output is also appended to `ansible.log` in the scratch folder.
    pub async fn playbook(&self, args: &[String]) -> Result<Run> {
        let tmp = self.dir.path.join("ansible-tmp");
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", self.controller.name(), "ansible-playbook"])
            .args(args)
            .env("ANSIBLE_HOST_KEY_CHECKING", "False")
            .env("ANSIBLE_PIPELINING", "True")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
            // No compression: the binaries cross a veth, not a WAN.
            .env(
                "ANSIBLE_SSH_ARGS",
                "-o ControlMaster=auto -o ControlPersist=60s",
            )
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", tmp.join("cp"))
            .env("ANSIBLE_LOCAL_TEMP", tmp.join("local"))
            .env("ANSIBLE_REMOTE_TEMP", tmp.join("remote"))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(PLAYBOOK_TIMEOUT, cmd.output())
            .await
            .with_context(|| format!("ansible-playbook ran over {PLAYBOOK_TIMEOUT:?}"))?
            .context("run ansible-playbook (Debian's ansible-core)")?;
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        let log = self.dir.path.join("ansible.log");
        let mut all = std::fs::read_to_string(&log).unwrap_or_default();
        writeln!(all, "=== ansible-playbook {}\n{output}", args.join(" "))?;
        std::fs::write(&log, all)?;
        Ok(Run {
            success: out.status.success(),
            output,
        })
    }

    /// The last `lines` lines of every sshd's and Consul agent's log.
    pub fn daemon_logs(&self, lines: usize) -> String {
        self.daemons
            .iter()
            .map(|p| format!("--- {}\n{}\n", p.name(), p.log_tail(lines)))
            .collect()
    }

    /// The scratch folder (keys, inventory, logs).
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }

    /// The network's id (for messages).
    pub fn id(&self) -> &str {
        self.network.id()
    }
}

// === impl Run ===

impl Run {
    /// The `PLAY RECAP` line of `host`.
    pub fn recap(&self, host: &str) -> Option<Recap> {
        let line = self
            .output
            .lines()
            .rev()
            .find(|l| l.split_whitespace().next() == Some(host) && l.contains("ok="))?;
        let field = |key: &str| -> u32 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.parse().ok())
                .unwrap_or(0)
        };
        Some(Recap {
            ok: field("ok="),
            changed: field("changed="),
            failed: field("failed="),
            rescued: field("rescued="),
        })
    }

    /// The last `n` lines of the output, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.output.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

// === impl Scratch ===

impl Scratch {
    /// `<parent>/mwe-<pid>-<what>-<n>`, empty; the name lets a later run
    /// remove it when this process died without dropping it.
    pub fn new(parent: &Path, what: &str) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = parent.join(format!(
            "{PREFIX}-{}-{what}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("MESH_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// === helpers ===

fn sshd_config(addr: Ipv4Addr, dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "ListenAddress {addr}\n\
         HostKey {dir}/host_key\n\
         AuthorizedKeysFile {dir}/authorized_keys\n\
         PermitRootLogin prohibit-password\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         UsePAM no\n\
         StrictModes no\n\
         PidFile none\n\
         Subsystem sftp internal-sftp\n"
    )
}

fn consul_args(name: &str, addr: Ipv4Addr) -> Vec<String> {
    [
        "agent",
        "-dev",
        "-node",
        name,
        "-bind",
        &addr.to_string(),
        "-client",
        "127.0.0.1",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn keygen(path: &Path) -> Result<()> {
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .context("run ssh-keygen (Debian's openssh-client)")?;
    ensure!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn which(program: &str, package: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()));
    ensure!(
        found,
        "{program} not found on PATH: install Debian's {package} (apt-get install {package})"
    );
    Ok(())
}
