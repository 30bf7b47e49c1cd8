//! The TLS folder the bridge keeps and the proxy reads:
//!
//! ```text
//! <tls_dir>/               0700
//!   ca.crt                 the trust bundle (PEM)
//!   node.key, node.crt     the node agent's identity
//!   svc/                   0700
//!     <service>.key        one pair per service with an instance on the node
//!     <service>.crt
//! ```
//!
//! Every file is 0600 and written atomically (a temp file in the same
//! folder, fsync, rename, fsync the folder): a reader sees the old file or
//! the new one. A key is written before its certificate, so a certificate
//! on disk always has its key there already.

use std::{
    fs::{self, File},
    io,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
};

use mesh_runtime::{
    fs::write_private,
    pki::{SpiffeId, Workload},
};

/// The trust bundle's file name.
pub const CA_FILE: &str = "ca.crt";
/// The service pairs' folder.
pub const SVC_DIR: &str = "svc";

const KEY_EXT: &str = "key";
const CERT_EXT: &str = "crt";

/// The TLS folder.
#[derive(Clone, Debug)]
pub(crate) struct TlsDir {
    root: PathBuf,
}

// === impl TlsDir ===

impl TlsDir {
    /// Creates the folders (0700) if needed.
    pub(crate) fn open(root: PathBuf) -> io::Result<Self> {
        let dir = Self { root };
        for folder in [dir.root.clone(), dir.root.join(SVC_DIR)] {
            fs::create_dir_all(&folder)?;
            fs::set_permissions(&folder, fs::Permissions::from_mode(0o700))?;
        }
        Ok(dir)
    }

    /// The trust bundle's path.
    pub(crate) fn ca(&self) -> PathBuf {
        self.root.join(CA_FILE)
    }

    /// The key and certificate paths of `identity`.
    pub(crate) fn pair(&self, identity: &SpiffeId) -> (PathBuf, PathBuf) {
        let stem = match identity.workload() {
            Workload::Node(_) => self.root.join("node"),
            Workload::Service(name) => self.root.join(SVC_DIR).join(name),
        };
        (stem.with_extension(KEY_EXT), stem.with_extension(CERT_EXT))
    }

    /// Reads `identity`'s key and certificate, if both are there.
    pub(crate) fn read_pair(&self, identity: &SpiffeId) -> Option<(String, String)> {
        let (key, cert) = self.pair(identity);
        Some((
            fs::read_to_string(key).ok()?,
            fs::read_to_string(cert).ok()?,
        ))
    }

    /// Writes `identity`'s key, then its certificate.
    pub(crate) fn write_pair(
        &self,
        identity: &SpiffeId,
        key_pem: &str,
        cert_pem: &str,
    ) -> io::Result<()> {
        let (key, cert) = self.pair(identity);
        write_private(&key, key_pem.as_bytes())?;
        write_private(&cert, cert_pem.as_bytes())
    }

    /// Writes the trust bundle unless it is there already.
    pub(crate) fn write_ca(&self, bundle_pem: &str) -> io::Result<bool> {
        let path = self.ca();
        if fs::read(&path).is_ok_and(|current| current == bundle_pem.as_bytes()) {
            return Ok(false);
        }
        write_private(&path, bundle_pem.as_bytes())?;
        Ok(true)
    }

    /// The services that have a key or certificate in `svc/`.
    pub(crate) fn services(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.root.join(SVC_DIR))? {
            let path = entry?.path();
            let ext = path.extension().and_then(|e| e.to_str());
            let stem = path.file_stem().and_then(|s| s.to_str());
            if let (Some(KEY_EXT | CERT_EXT), Some(stem)) = (ext, stem)
                && !stem.starts_with('.')
                && !names.iter().any(|n| n == stem)
            {
                names.push(stem.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Removes service `name`'s certificate, then its key.
    pub(crate) fn remove_service(&self, name: &str) -> io::Result<()> {
        let stem = self.root.join(SVC_DIR).join(name);
        for path in [stem.with_extension(CERT_EXT), stem.with_extension(KEY_EXT)] {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        File::open(self.root.join(SVC_DIR))?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use mesh_runtime::pki::TrustDomain;

    use super::*;

    #[test]
    fn pairs_land_where_the_proxy_reads_them_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = TlsDir::open(tmp.path().join("tls")).unwrap();
        let td = TrustDomain::new("t.mesh").unwrap();
        let node = SpiffeId::node(&td, "n1").unwrap();
        let orders = SpiffeId::service(&td, "orders").unwrap();
        dir.write_pair(&node, "K", "C").unwrap();
        dir.write_pair(&orders, "K2", "C2").unwrap();
        assert!(dir.write_ca("CA").unwrap());
        assert!(!dir.write_ca("CA").unwrap(), "unchanged: not rewritten");
        let root = tmp.path().join("tls");
        for (file, text) in [
            ("node.key", "K"),
            ("node.crt", "C"),
            ("svc/orders.key", "K2"),
            ("svc/orders.crt", "C2"),
            ("ca.crt", "CA"),
        ] {
            let path = root.join(file);
            assert_eq!(fs::read_to_string(&path).unwrap(), text, "{file}");
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
        for folder in [root.clone(), root.join("svc")] {
            let mode = fs::metadata(&folder).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", folder.display());
        }
        assert_eq!(dir.services().unwrap(), ["orders"]);
        dir.remove_service("orders").unwrap();
        assert!(dir.services().unwrap().is_empty());
        assert!(!root.join("svc/orders.key").exists());
    }
}
