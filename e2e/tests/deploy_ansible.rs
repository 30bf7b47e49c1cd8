//! The ansible playbooks of `deploy/ansible`:
//!
//! - every playbook passes `ansible-playbook --syntax-check`;
//! - the defaults are mtls mode: each component's config, rendered from
//!   its template with `group_vars/all.yml`, has the keys of README
//!   "Running in mtls mode", and `meshwork_mtls=false` renders direct
//!   mode's with none of them;
//! - in mtls mode without `meshwork_identity_token` the playbook fails at
//!   once with a message naming that variable, and touches nothing;
//! - `site.yml` in direct mode, run for real over ssh against two hosts in
//!   network namespaces (sshd and a Consul dev agent each; plain processes
//!   under an install prefix per host instead of systemd), installs every component
//!   (bridge, proxy and deployer on both, control on n1, monitor on n2),
//!   and each answers `/ready`; a second run changes nothing; an upgrade of
//!   the proxy and the deployer goes host by host (all of n1, its health
//!   checks included, before anything on n2), the proxy handed over to a
//!   new process, the bridge left running; an upgrade whose deployer never
//!   gets ready stops on n1, which is put back on the previous deployer,
//!   and leaves n2 untouched on the old versions;
//! - `site.yml` with the defaults (mtls) and an identity token, run for
//!   real against one host running every component, gets the node its
//!   certificates and every component ready.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use mesh_e2e::{
    HttpClient,
    ansible::{Host, Hosts, Run, Scratch},
    bins::workspace_bin,
};

/// Every component with its admin port (README "Ports").
const COMPONENTS: [(&str, u16); 5] = [
    ("mesh-bridge", 8891),
    ("mesh-proxy", 8889),
    ("mesh-deployer", 8895),
    ("mesh-control", 8893),
    ("mesh-monitor", 8897),
];

/// The components each host runs.
const N1: [&str; 4] = ["mesh-bridge", "mesh-proxy", "mesh-deployer", "mesh-control"];
const N2: [&str; 4] = ["mesh-bridge", "mesh-proxy", "mesh-deployer", "mesh-monitor"];

#[test]
fn every_playbook_passes_syntax_check() -> Result<()> {
    let dir = ansible_dir();
    let mut playbooks = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yml") {
            playbooks.push(path);
        }
    }
    ensure!(!playbooks.is_empty(), "no playbooks in {}", dir.display());
    for playbook in playbooks {
        let out = Command::new("ansible-playbook")
            .arg("--syntax-check")
            .arg("-i")
            .arg(dir.join("inventory.example.ini"))
            .arg(&playbook)
            .current_dir(&dir)
            .env("ANSIBLE_NOCOLOR", "1")
            .output()
            .context("ansible-playbook not found: install Debian's ansible-core")?;
        ensure!(
            out.status.success(),
            "ansible-playbook --syntax-check {}: {}\n{}{}",
            playbook.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The lines of each component's config that make it mtls mode.
const MTLS_LINES: [(&str, &[&str]); 5] = [
    (
        "mesh-proxy",
        &[
            "mode = \"mtls\"",
            "tls_dir = \"/var/lib/meshwork/tls\"",
            "trust_domain = \"meshwork.local\"",
            "inbound_listen = \"10.0.0.11:8443\"",
        ],
    ),
    (
        "mesh-bridge",
        &[
            "grpc_listen = \"0.0.0.0:8890\"",
            "tls_dir = \"/var/lib/meshwork/tls\"",
            "trust_domain = \"meshwork.local\"",
        ],
    ),
    (
        "mesh-control",
        &[
            "grpc_listen = \"10.0.0.11:8892\"",
            "grpc_tls = true",
            "deployer_mtls = true",
        ],
    ),
    (
        "mesh-deployer",
        &[
            "grpc_listen = \"10.0.0.11:8894\"",
            "allow_remote = true",
            "tls_dir = \"/var/lib/meshwork/tls\"",
        ],
    ),
    (
        "mesh-monitor",
        &[
            "tls_dir = \"/var/lib/meshwork/tls\"",
            "trust_domain = \"meshwork.local\"",
        ],
    ),
];

#[test]
fn the_defaults_are_mtls_and_direct_is_one_variable_away() -> Result<()> {
    let scratch = Scratch::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "ansible-render")?;
    let mtls = render_configs(scratch.path(), &[])?;
    for (bin, lines) in MTLS_LINES {
        let config = &mtls[bin];
        for line in lines {
            ensure!(
                config.lines().any(|l| l == *line),
                "{bin}'s config with the defaults must be mtls mode ({line}):\n{config}"
            );
        }
    }
    let direct = render_configs(scratch.path(), &["-e", "meshwork_mtls=false"])?;
    ensure!(
        direct["mesh-proxy"]
            .lines()
            .any(|l| l == "mode = \"direct\""),
        "meshwork_mtls=false must put the proxy in direct mode:\n{}",
        direct["mesh-proxy"]
    );
    for (bin, config) in &direct {
        ensure!(
            config
                .lines()
                .filter(|l| l.starts_with("grpc_listen ="))
                .all(|l| l.contains("\"127.0.0.1:")),
            "{bin}'s gRPC listener in direct mode must stay on loopback:\n{config}"
        );
        for key in ["tls_dir", "inbound_listen", "grpc_tls", "deployer_mtls"] {
            ensure!(
                !config.lines().any(|l| l.starts_with(&format!("{key} ="))),
                "{bin}'s config in direct mode must not set {key}:\n{config}"
            );
        }
    }
    Ok(())
}

#[test]
fn mtls_without_an_identity_token_stops_before_touching_a_host() -> Result<()> {
    let scratch = Scratch::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "ansible-token")?;
    let inventory = scratch.path().join("inventory.ini");
    std::fs::write(
        &inventory,
        "[mesh_control]\nc1\n[mesh_nodes]\nc1\n[all:vars]\nansible_connection=local\n\
         ansible_python_interpreter=/usr/bin/python3\n",
    )?;
    let prefix = scratch.path().join("prefix");
    let out = local_ansible(scratch.path(), "ansible-playbook")
        .arg("--check")
        .arg("-i")
        .arg(&inventory)
        .arg(ansible_dir().join("site.yml"))
        .arg("-e")
        .arg("meshwork_service_manager=process meshwork_become=false")
        .arg("-e")
        .arg(format!("meshwork_prefix={}", prefix.display()))
        .output()
        .context("ansible-playbook not found: install Debian's ansible-core")?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !out.status.success(),
        "mtls mode without an identity token must fail:\n{output}"
    );
    ensure!(
        output.contains("meshwork_mtls is on (the default) but meshwork_identity_token is empty"),
        "the failure must name meshwork_identity_token:\n{output}"
    );
    ensure!(
        !output.contains("TASK [meshwork_component") && !prefix.exists(),
        "nothing may be installed before the identity token is checked:\n{output}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_playbook_installs_and_upgrades_one_host_at_a_time() -> Result<()> {
    let big = Scratch::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "ansible-bins")?;
    let releases = Releases::build(big.path())?;
    let hosts = Hosts::start(&["n1", "n2"], big.path()).await?;
    let result = scenario(&hosts, &releases).await;
    if result.is_err() {
        print_failure(&hosts);
    }
    result
}

/// Where to look, and the end of the playbook's output and the daemons' logs.
fn print_failure(hosts: &Hosts) {
    eprintln!(
        "ansible output and process logs are in {} (MESH_E2E_KEEP=1 keeps them)",
        hosts.dir().display()
    );
    if let Ok(log) = std::fs::read_to_string(hosts.dir().join("ansible.log")) {
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("{}", lines[lines.len().saturating_sub(80)..].join("\n"));
    }
    eprintln!("{}", hosts.daemon_logs(10));
}

/// The defaults (mtls mode) with an identity token, installed for real on
/// one host that runs every component: mesh-control comes first, the
/// bridge gets the node's certificates from it over TLS, and every
/// component, mtls mode's config in place, answers `/ready`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_playbook_installs_an_mtls_mesh_by_default() -> Result<()> {
    let big = Scratch::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "ansible-mtls")?;
    let releases = Releases::build(big.path())?;
    let hosts = Hosts::start(&["m1"], big.path()).await?;
    let result = mtls_scenario(&hosts, &releases).await;
    if result.is_err() {
        print_failure(&hosts);
    }
    result
}

async fn mtls_scenario(hosts: &Hosts, releases: &Releases) -> Result<()> {
    let inventory = hosts.inventory(&[
        ("mesh_nodes", &["m1"]),
        ("mesh_control", &["m1"]),
        ("mesh_monitor", &["m1"]),
    ])?;
    let run = hosts
        .playbook(&[
            "-i".to_owned(),
            inventory.display().to_string(),
            ansible_dir().join("site.yml").display().to_string(),
            "-e".into(),
            "meshwork_service_manager=process meshwork_become=false".into(),
            "-e".into(),
            format!("meshwork_bin_src={}", releases.v1.display()),
            "-e".into(),
            "meshwork_identity_token=ansible-test-identity-token-0123456789".into(),
        ])
        .await?;
    ensure!(run.success, "an mtls install failed:\n{}", run.tail(80));
    let m1 = hosts.host("m1");
    let proxy = std::fs::read_to_string(m1.prefix.join("etc/meshwork/mesh-proxy.toml"))?;
    ensure!(
        proxy.lines().any(|l| l == "mode = \"mtls\""),
        "the proxy installed with the defaults must be in mtls mode:\n{proxy}"
    );
    for file in ["ca.crt", "node.crt", "node.key"] {
        let path = m1.prefix.join("var/lib/meshwork/tls").join(file);
        ensure!(
            path.is_file(),
            "the bridge did not keep the node's {file} ({})",
            path.display()
        );
    }
    for (bin, _) in COMPONENTS {
        running(m1, bin, &releases.v1.join(bin))?;
        ready(m1, bin).await?;
    }
    Ok(())
}

async fn scenario(hosts: &Hosts, releases: &Releases) -> Result<()> {
    let inventory = hosts.inventory(&[
        ("mesh_nodes", &["n1", "n2"]),
        ("mesh_control", &["n1"]),
        ("mesh_monitor", &["n2"]),
    ])?;
    let n1 = hosts.host("n1");
    let n2 = hosts.host("n2");
    let site = |bins: &Path, extra: &[&str]| {
        let mut args = vec![
            "-i".to_owned(),
            inventory.display().to_string(),
            ansible_dir().join("site.yml").display().to_string(),
            "-e".into(),
            "meshwork_service_manager=process meshwork_become=false".into(),
            // Direct mode, chosen explicitly: this run is about the
            // rollout; the_defaults_are_mtls_... checks mtls mode's configs.
            "-e".into(),
            "meshwork_mtls=false".into(),
            "-e".into(),
            format!("meshwork_bin_src={}", bins.display()),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };

    // Install.
    let run = hosts.playbook(&site(&releases.v1, &[])).await?;
    ensure_success(&run, "install")?;
    for (host, components) in [(n1, &N1[..]), (n2, &N2[..])] {
        for bin in components {
            running(host, bin, &releases.v1.join(bin))?;
            ready(host, bin).await?;
        }
    }
    let installed = pids(&[n1, n2])?;

    // Again: nothing changes, nothing restarts.
    let run = hosts.playbook(&site(&releases.v1, &[])).await?;
    ensure_success(&run, "second install")?;
    for host in ["n1", "n2"] {
        let recap = run.recap(host).context("no recap")?;
        ensure!(
            recap.changed == 0,
            "a second run with nothing new changed {} things on {host}:\n{}",
            recap.changed,
            run.tail(60)
        );
    }
    ensure!(
        pids(&[n1, n2])? == installed,
        "a second run restarted something"
    );

    // Upgrade the proxy and the deployer: host by host.
    let run = hosts
        .playbook(&site(&releases.v2, &["--tags", "mesh-proxy,mesh-deployer"]))
        .await?;
    ensure_success(&run, "upgrade to v2")?;
    for host in [n1, n2] {
        for bin in ["mesh-proxy", "mesh-deployer"] {
            running(host, bin, &releases.v2.join(bin))?;
            ready(host, bin).await?;
            ensure!(
                pid(host, bin)? != installed[&(host.name.clone(), bin.to_owned())],
                "{bin} on {} was not restarted by the upgrade",
                host.name
            );
        }
        ensure!(
            pid(host, "mesh-bridge")? == installed[&(host.name.clone(), "mesh-bridge".to_owned())],
            "the bridge on {} was restarted by an upgrade of other components",
            host.name
        );
    }
    ensure_serial(&run)?;
    let upgraded = pids(&[n1, n2])?;

    // A deployer that never gets ready: stops on n1, which goes back to v2.
    let run = hosts
        .playbook(&site(
            &releases.v3,
            &[
                "--tags",
                "mesh-proxy,mesh-deployer",
                "-e",
                "meshwork_ready_timeout=10",
            ],
        ))
        .await?;
    ensure!(
        !run.success,
        "an upgrade whose deployer never gets ready must fail:\n{}",
        run.tail(60)
    );
    ensure!(
        run.output
            .contains("mesh-deployer on n1 did not answer http://127.0.0.1:8895/ready"),
        "the failure must say which component on which host did not get ready:\n{}",
        run.tail(60)
    );
    ensure!(
        run.recap("n2").is_none(),
        "the play must stop before n2:\n{}",
        run.tail(60)
    );
    running(n1, "mesh-proxy", &releases.v3.join("mesh-proxy"))?;
    running(n1, "mesh-deployer", &releases.v2.join("mesh-deployer"))?;
    ready(n1, "mesh-deployer").await?;
    for bin in ["mesh-proxy", "mesh-deployer"] {
        running(n2, bin, &releases.v2.join(bin))?;
        ensure!(
            pid(n2, bin)? == upgraded[&("n2".to_owned(), bin.to_owned())],
            "{bin} on n2 was restarted by a rollout that stopped on n1"
        );
    }
    Ok(())
}

// === the releases ===

/// Three folders of binaries, as `meshwork_bin_src`.
struct Releases {
    /// The workspace's binaries.
    v1: PathBuf,
    /// v1 with another mesh-proxy and mesh-deployer (bytes appended: a
    /// different file that runs the same).
    v2: PathBuf,
    /// v2 with another mesh-proxy and a mesh-deployer that exits at once.
    v3: PathBuf,
}

impl Releases {
    fn build(dir: &Path) -> Result<Self> {
        let this = Self {
            v1: dir.join("v1"),
            v2: dir.join("v2"),
            v3: dir.join("v3"),
        };
        for release in [&this.v1, &this.v2, &this.v3] {
            std::fs::create_dir_all(release)?;
        }
        for (bin, _) in COMPONENTS {
            let built = workspace_bin(bin)?;
            link_or_copy(&built, &this.v1.join(bin))?;
            match bin {
                "mesh-proxy" => {
                    marked(&built, &this.v2.join(bin), "v2")?;
                    marked(&built, &this.v3.join(bin), "v3")?;
                }
                "mesh-deployer" => {
                    marked(&built, &this.v2.join(bin), "v2")?;
                    write_exec(
                        &this.v3.join(bin),
                        "#!/bin/sh\necho 'mesh-deployer: a broken build' >&2\nexit 3\n",
                    )?;
                }
                _ => {
                    link_or_copy(&built, &this.v2.join(bin))?;
                    link_or_copy(&built, &this.v3.join(bin))?;
                }
            }
        }
        Ok(this)
    }
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).with_context(|| format!("copy {}", from.display()))?;
    }
    Ok(())
}

/// A copy of `from` with a marker appended: the kernel ignores bytes past
/// an ELF file's segments, so it runs the same, but it is another version.
fn marked(from: &Path, to: &Path, version: &str) -> Result<()> {
    let mut bytes = std::fs::read(from)?;
    bytes.extend_from_slice(format!("\nmeshwork-test-release {version}\n").as_bytes());
    write_exec(to, bytes)
}

fn write_exec(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, bytes)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

// === what runs on a host ===

/// The pid the playbook recorded for `bin` on `host`.
fn pid(host: &Host, bin: &str) -> Result<u32> {
    let file = host.prefix.join(format!("run/meshwork/{bin}.pid"));
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("{bin} on {}: no pid file {}", host.name, file.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: {text:?}", file.display()))
}

type Pids = BTreeMap<(String, String), u32>;

fn pids(hosts: &[&Host]) -> Result<Pids> {
    let mut all = Pids::new();
    for host in hosts {
        let components: &[&str] = if host.name == "n1" { &N1 } else { &N2 };
        for bin in components {
            all.insert((host.name.clone(), (*bin).to_owned()), pid(host, bin)?);
        }
    }
    Ok(all)
}

/// `bin` runs on `host` (its recorded pid is alive, not a zombie), from the
/// installed file, whose bytes are `release`'s.
fn running(host: &Host, bin: &str, release: &Path) -> Result<()> {
    let pid = pid(host, bin)?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("{bin} on {} (pid {pid}) does not run", host.name))?;
    ensure!(
        !stat.contains(") Z "),
        "{bin} on {} (pid {pid}) has exited",
        host.name
    );
    let installed = host.prefix.join("usr/local/bin").join(bin);
    let exe = std::fs::metadata(format!("/proc/{pid}/exe"))?;
    let file = std::fs::metadata(&installed)?;
    ensure!(
        (exe.dev(), exe.ino()) == (file.dev(), file.ino()),
        "{bin} on {} (pid {pid}) does not run the installed {}",
        host.name,
        installed.display()
    );
    ensure!(
        std::fs::read(&installed)? == std::fs::read(release)?,
        "{bin} on {} is not the one of {}",
        host.name,
        release.display()
    );
    Ok(())
}

/// `GET /ready` on the component's admin port in the host's namespace
/// answers 200.
async fn ready(host: &Host, bin: &str) -> Result<()> {
    let port = COMPONENTS
        .iter()
        .find(|(b, _)| *b == bin)
        .map(|(_, p)| *p)
        .context("a component")?;
    let resp = HttpClient::new(&host.ns, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .with_timeout(Duration::from_secs(5))
        .get("/ready")
        .await
        .with_context(|| format!("{bin} on {}: GET /ready", host.name))?;
    ensure!(
        resp.status.is_success(),
        "{bin} on {}: /ready answered {}",
        host.name,
        resp.status
    );
    Ok(())
}

// === the playbook's output ===

fn ensure_success(run: &Run, what: &str) -> Result<()> {
    ensure!(run.success, "{what} failed:\n{}", run.tail(80));
    for host in ["n1", "n2"] {
        let recap = run
            .recap(host)
            .with_context(|| format!("{what}: no recap for {host}:\n{}", run.tail(40)))?;
        ensure!(recap.failed == 0, "{what}: {host} failed: {recap:?}");
    }
    Ok(())
}

/// In the nodes' play, n1's last task (its last health check) comes before
/// n2's first: one host at a time, checked before the next.
fn ensure_serial(run: &Run) -> Result<()> {
    // The play's header comes again for each host (serial: 1).
    let start = run
        .output
        .find("PLAY [Meshwork node components")
        .context("the nodes' play did not run")?;
    let play = run.output[start..]
        .split("PLAY [Meshwork health monitor]")
        .next()
        .unwrap_or_default();
    let last_n1 = play.rfind("[n1]").context("no task ran on n1")?;
    let first_n2 = play.find("[n2]").context("no task ran on n2")?;
    ensure!(
        last_n1 < first_n2,
        "the upgrade must finish n1 before it starts on n2:\n{play}"
    );
    ensure!(
        play[..first_n2].contains("mesh-deployer: GET http://127.0.0.1:8895/ready answers 200"),
        "n1's deployer health check must run before n2 is touched"
    );
    Ok(())
}

// === the playbooks without hosts ===

/// Each component's config (binary → TOML text) as its template renders
/// it for a node at 10.0.0.11 with `group_vars/all.yml` and `extra`
/// arguments, through ansible's own template lookup.
fn render_configs(scratch: &Path, extra: &[&str]) -> Result<BTreeMap<String, String>> {
    let inventory = scratch.join("render.ini");
    std::fs::write(
        &inventory,
        "[mesh_nodes]\nn1 ansible_host=10.0.0.11 ansible_connection=local\n",
    )?;
    let lookups: Vec<String> = MTLS_LINES
        .iter()
        .map(|(bin, _)| {
            format!(
                "'{bin}': lookup('ansible.builtin.template', playbook_dir ~ \
                 '/roles/meshwork_component/templates/{bin}.toml.j2', \
                 template_vars={{'meshwork_bin': '{bin}'}})"
            )
        })
        .collect();
    let out = local_ansible(scratch, "ansible")
        .arg("-i")
        .arg(&inventory)
        .arg("n1")
        .arg("--playbook-dir")
        .arg(ansible_dir())
        .args(["-m", "ansible.builtin.debug", "-a"])
        .arg(format!("msg={{{{ {{{}}} }}}}", lookups.join(", ")))
        .args(extra)
        // ansible-core's own `minimal` callback: `n1 | SUCCESS => {json}`
        // (the `json` one lives in a collection ansible-core lacks).
        .env("ANSIBLE_LOAD_CALLBACK_PLUGINS", "1")
        .env("ANSIBLE_STDOUT_CALLBACK", "minimal")
        .output()
        .context("ansible not found: install Debian's ansible-core")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "rendering the templates failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let result = stdout
        .split_once("SUCCESS => ")
        .map(|(_, json)| json)
        .with_context(|| format!("ansible's answer for n1: {stdout}"))?;
    let json: serde_json::Value =
        serde_json::from_str(result).with_context(|| format!("ansible's JSON: {stdout}"))?;
    let msg = &json["msg"];
    let configs: BTreeMap<String, String> = serde_json::from_value(msg.clone())
        .with_context(|| format!("the rendered configs: {msg}"))?;
    ensure!(
        configs.len() == MTLS_LINES.len(),
        "a config per component expected: {msg}"
    );
    Ok(configs)
}

/// An ansible command of the controller, its temp files in `scratch`.
fn local_ansible(scratch: &Path, program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
        .env("ANSIBLE_LOCAL_TEMP", scratch.join("ansible-local"))
        .env("ANSIBLE_REMOTE_TEMP", scratch.join("ansible-remote"));
    cmd
}

fn ansible_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ansible")
}
