//! Where the programs under test are: Consul (installed by the project),
//! the workspace's binaries (built next to the test executable), promtool.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The programs a mesh runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// Consul (1.8.7 as Debian packages it).
    pub consul: PathBuf,
    /// `mesh-bridge`.
    pub bridge: PathBuf,
    /// `mesh-proxy`.
    pub proxy: PathBuf,
    /// `meshctl` (for `meshctl demo serve`).
    pub meshctl: PathBuf,
}

impl Binaries {
    /// Consul and the three workspace binaries; fails naming what is missing
    /// and how to get it.
    pub fn locate() -> Result<Self> {
        Ok(Self {
            consul: consul()?,
            bridge: workspace_bin("mesh-bridge")?,
            proxy: workspace_bin("mesh-proxy")?,
            meshctl: workspace_bin("meshctl")?,
        })
    }
}

/// Consul: `$MESH_CONSUL_BIN`, else `consul` on `PATH`, else
/// `~/.local/share/meshwork/bin/consul` (where `deploy/scripts/install-consul.sh`
/// puts it), else `/tmp/mw-consul-test/bin/consul`.
pub fn consul() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MESH_CONSUL_BIN") {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Ok(path);
        }
        bail!(
            "MESH_CONSUL_BIN={} is not an executable file",
            path.display()
        );
    }
    let mut candidates: Vec<PathBuf> = on_path("consul").into_iter().collect();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".local/share/meshwork/bin/consul"));
    }
    candidates.push(PathBuf::from("/tmp/mw-consul-test/bin/consul"));
    if let Some(found) = candidates.into_iter().find(|p| is_executable(p)) {
        return Ok(found);
    }
    bail!(
        "Consul not found (MESH_CONSUL_BIN, PATH, ~/.local/share/meshwork/bin/consul): \
         run deploy/scripts/install-consul.sh, then run the tests again"
    )
}

/// promtool (Debian's `prometheus` package).
pub fn promtool() -> Result<PathBuf> {
    match on_path("promtool") {
        Some(path) => Ok(path),
        None => bail!(
            "promtool not found on PATH: install Debian's `prometheus` package \
             (apt-get install prometheus) to check the /metrics format"
        ),
    }
}

/// A binary of this workspace: in `$MESH_BIN_DIR`, else in the target
/// directory the test executable was built in (`target/debug/deps/..` → `target/debug`).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let dir = bin_dir()?;
    let path = dir.join(name);
    if is_executable(&path) {
        return Ok(path);
    }
    bail!(
        "{name} not found in {}: build the binaries first (cargo build --workspace --bins), \
         or point MESH_BIN_DIR at them",
        dir.display()
    )
}

fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MESH_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
