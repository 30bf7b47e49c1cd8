//! A node that still serves its routes with nginx: its Consul agent
//! started with node metadata `mesh-frontend:nginx` (so mesh-control's
//! rollouts apply nginx.conf there instead of waiting for a proxy), and
//! Debian's nginx run from a prefix folder inside the test's folder, in
//! the foreground, configured by mesh-control through the node's
//! mesh-deployer. [`control_env`] is mesh-control's side of it: where the
//! file goes and the commands the deployer runs on it.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    Mesh, Node, bins,
    control::CONVERGE,
    http::{HttpClient, Response},
    node::Instance,
    process::Process,
    wait::eventually,
};

/// Where nginx listens in the node (mesh-control's default `nginx_listen`).
pub const NGINX_PORT: u16 = 8888;

/// The node metadata that makes a node an nginx node.
pub const FRONTEND_META: (&str, &str) = ("mesh-frontend", "nginx");

/// The key of nginx among the node's [`Instance`]s.
pub const KEY: &str = "nginx";

/// nginx.conf template mesh-control ships, for tests that start from it.
pub const SHIPPED_TEMPLATE: &str = include_str!("../../control-plane/templates/nginx.conf.tmpl");

/// Debian's nginx: on `PATH`, else `/usr/sbin/nginx`; fails with how to
/// get it.
pub fn nginx_bin() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("nginx"))
            .find(|p| p.is_file())
    });
    let path = on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"));
    if !path.is_file() {
        bail!(
            "nginx not found (PATH, /usr/sbin/nginx): run deploy/scripts/install-test-deps.sh \
             (Debian's nginx), then run the tests again"
        );
    }
    Ok(path)
}

/// Node `k`'s nginx prefix folder (`<test dir>/<node>/nginx/`, with the
/// `logs/` and `temp/` the shipped template names); made if missing.
pub fn prefix(mesh: &Mesh, k: usize) -> Result<PathBuf> {
    let dir = mesh.dir().join(&mesh.nodes[k].name).join("nginx");
    for sub in ["logs", "temp"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("create {}", dir.join(sub).display()))?;
    }
    Ok(dir)
}

/// mesh-control's environment for nginx nodes whose prefix is `prefix`:
/// the file is `<prefix>/nginx.conf`, checked and reloaded by Debian's
/// nginx with that prefix.
pub fn control_env(prefix: &Path) -> Result<Vec<(String, String)>> {
    let nginx = nginx_bin()?;
    let (nginx, prefix) = (nginx.display(), prefix.display());
    Ok(vec![
        (
            "MESH_NGINX_CONF_PATH".into(),
            format!("{prefix}/nginx.conf"),
        ),
        (
            "MESH_NGINX_VALIDATE".into(),
            format!("{nginx} -t -p {prefix}/ -c {{path}}"),
        ),
        (
            "MESH_NGINX_RELOAD".into(),
            format!("{nginx} -s reload -p {prefix}/ -c {{path}}"),
        ),
    ])
}

/// Restarts node `k`'s Consul agent with the node metadata of an nginx
/// node (same name, address, data and config as the mesh gave it); waits
/// until the catalog shows the metadata and the agents have settled.
pub async fn make_nginx_node(mesh: &mut Mesh, k: usize) -> Result<()> {
    let consul = bins::consul()?;
    let dir = mesh.dir().to_path_buf();
    let joins: Vec<String> = mesh
        .servers
        .iter()
        .flat_map(|s| ["-retry-join".to_owned(), s.ns.addr().to_string()])
        .collect();
    let node = &mut mesh.nodes[k];
    node.agent.stop().await?;
    let mut args: Vec<String> = vec![
        "agent".into(),
        "-node".into(),
        node.name.clone(),
        "-bind".into(),
        node.ip().to_string(),
        "-client".into(),
        "127.0.0.1".into(),
        "-data-dir".into(),
        dir.join(&node.name).join("consul").display().to_string(),
        "-config-file".into(),
        dir.join("consul.hcl").display().to_string(),
        "-node-meta".into(),
        format!("{}:{}", FRONTEND_META.0, FRONTEND_META.1),
    ];
    args.extend(joins);
    let log = node.agent.log_path().to_path_buf();
    node.agent = Process::new(node.agent.name().to_owned(), &node.ns, consul, args, log);
    node.agent.start()?;
    node.wait_agent(CONVERGE).await?;
    let name = node.name.clone();
    eventually(
        &format!("the catalog shows {name} as an nginx node"),
        CONVERGE,
        || async {
            let resp = mesh.consul_get(&format!("/v1/catalog/node/{name}")).await?;
            let json = resp.json()?;
            if json["Node"]["Meta"][FRONTEND_META.0] != FRONTEND_META.1 {
                bail!("{}", json["Node"]);
            }
            Ok(())
        },
    )
    .await?;
    mesh.settle_agents(Duration::from_secs(60)).await
}

/// Writes `conf` as node `k`'s `<prefix>/nginx.conf` and starts nginx on
/// it in the foreground (`daemon off`); waits until it answers.
pub async fn start_nginx(mesh: &mut Mesh, k: usize, conf: &str) -> Result<()> {
    let nginx = nginx_bin()?;
    let prefix = prefix(mesh, k)?;
    let file = prefix.join("nginx.conf");
    std::fs::write(&file, conf).with_context(|| format!("write {}", file.display()))?;
    let log = mesh.dir().join(format!("{}-nginx.log", mesh.nodes[k].name));
    let node = &mut mesh.nodes[k];
    let mut process = Process::new(
        format!("{}/nginx", node.name),
        &node.ns,
        nginx,
        [
            "-p".to_owned(),
            format!("{}/", prefix.display()),
            "-c".into(),
            file.display().to_string(),
            "-g".into(),
            "daemon off;".into(),
        ],
        log,
    );
    process.start()?;
    node.instances.insert(
        KEY.into(),
        Instance {
            service: KEY.into(),
            id: KEY.into(),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, NGINX_PORT)),
            process,
        },
    );
    let node = &mesh.nodes[k];
    let result = eventually(
        &format!("nginx on {} answers", node.name),
        CONVERGE,
        || async {
            let resp = get(node, "/_mesh/config").await?;
            if resp.status != 200 {
                bail!("{} {}", resp.status, resp.text());
            }
            Ok(())
        },
    )
    .await;
    if result.is_err() {
        let error_log = std::fs::read_to_string(prefix.join("logs/error.log")).unwrap_or_default();
        return result.with_context(|| format!("nginx's error.log:\n{error_log}"));
    }
    result
}

/// A client of nginx on `node` (`127.0.0.1:8888` in the node).
pub fn client(node: &Node) -> HttpClient {
    node.local_client(NGINX_PORT)
        .with_timeout(Duration::from_secs(5))
}

/// `GET path` through nginx on `node`.
pub async fn get(node: &Node, path: &str) -> Result<Response> {
    client(node).get(path).await
}
