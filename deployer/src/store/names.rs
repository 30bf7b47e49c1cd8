//! The names that become paths in the store, checked before any path is
//! built from them: a service, a version, a file name and a SHA-256.

use super::StoreError;

pub use mesh_runtime::artifact::{MAX_FILE_NAME_LEN, MAX_VERSION_LEN};
pub use mesh_runtime::pki::spiffe::{MAX_SERVICE_LEN, RESERVED_SERVICES};

/// Checks a service name with the mesh's rule (as mesh-control and
/// mesh-proxy check route names).
pub fn check_service(name: &str) -> Result<(), StoreError> {
    mesh_runtime::pki::spiffe::check_service_name(name)
        .map_err(|message| invalid("service", message))
}

/// Checks a version with the mesh's rule ([`mesh_runtime::artifact`]).
pub fn check_version(version: &str) -> Result<(), StoreError> {
    mesh_runtime::artifact::check_version(version).map_err(|message| invalid("version", message))
}

/// Checks an artifact's file name with the mesh's rule, and that it is
/// not the store's own metadata file.
pub fn check_file_name(name: &str) -> Result<(), StoreError> {
    mesh_runtime::artifact::check_file_name(name)
        .map_err(|message| invalid("file_name", message))?;
    if name == super::META_FILE {
        return Err(invalid(
            "file_name",
            format!("{name:?} is the store's own metadata file"),
        ));
    }
    Ok(())
}

/// Checks a SHA-256 in hex and returns it in lowercase.
pub fn check_sha256(sha256: &str) -> Result<String, StoreError> {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(
            "sha256",
            format!("{sha256:?} is not a SHA-256 (64 hex digits)"),
        ));
    }
    Ok(sha256.to_ascii_lowercase())
}

fn invalid(field: &'static str, message: String) -> StoreError {
    StoreError::Invalid { field, message }
}
