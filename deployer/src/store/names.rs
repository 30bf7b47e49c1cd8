//! The names that become paths in the store, checked before any path is
//! built from them: a service, a version, a file name and a SHA-256.

use super::StoreError;

pub use mesh_runtime::pki::spiffe::{MAX_SERVICE_LEN, RESERVED_SERVICES};
/// The longest version.
pub const MAX_VERSION_LEN: usize = 64;
/// The longest artifact file name.
pub const MAX_FILE_NAME_LEN: usize = 128;

/// Checks a service name with the mesh's rule (as mesh-control and
/// mesh-proxy check route names).
pub fn check_service(name: &str) -> Result<(), StoreError> {
    mesh_runtime::pki::spiffe::check_service_name(name)
        .map_err(|message| invalid("service", message))
}

/// Checks a version: letters, digits, `.`, `_` and `-`, at most
/// [`MAX_VERSION_LEN`], not `.` or `..`.
pub fn check_version(version: &str) -> Result<(), StoreError> {
    let err = |message: String| Err(invalid("version", message));
    if version.is_empty() {
        return err("a version must not be empty".into());
    }
    if version.len() > MAX_VERSION_LEN {
        return err(format!(
            "{version:?} is longer than {MAX_VERSION_LEN} characters"
        ));
    }
    if version == "." || version == ".." {
        return err(format!("{version:?} is not a version"));
    }
    match version
        .chars()
        .find(|c| !c.is_ascii_alphanumeric() && !matches!(c, '.' | '_' | '-'))
    {
        Some(bad) => err(format!(
            "{version:?} has {bad:?}: use letters, digits, '.', '_' and '-'"
        )),
        None => Ok(()),
    }
}

/// Checks an artifact's file name: a plain name (no folder), not hidden,
/// at most [`MAX_FILE_NAME_LEN`] bytes.
pub fn check_file_name(name: &str) -> Result<(), StoreError> {
    let err = |message: String| Err(invalid("file_name", message));
    if name.is_empty() {
        return err("a file name must not be empty".into());
    }
    if name.len() > MAX_FILE_NAME_LEN {
        return err(format!("{name:?} is longer than {MAX_FILE_NAME_LEN} bytes"));
    }
    if name.contains(['/', '\\', '\0']) || name.chars().any(char::is_control) {
        return err(format!("{name:?} must be a plain file name"));
    }
    if name.starts_with('.') {
        return err(format!("{name:?} must not start with '.'"));
    }
    if name == super::META_FILE {
        return err(format!("{name:?} is the store's own metadata file"));
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
