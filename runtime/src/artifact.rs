//! The names of a deployed artifact, one rule wherever they are checked:
//! by mesh-control when a deployment is asked for, and by each node's
//! deployer before it builds a path from them.

use crate::pki::spiffe;

/// The longest version.
pub const MAX_VERSION_LEN: usize = 64;
/// The longest artifact file name, in bytes.
pub const MAX_FILE_NAME_LEN: usize = 128;

/// Checks a version: ASCII letters, digits, `.`, `_` and `-`, starting
/// with a letter or digit (a version names a folder: never `.`, `..` or a
/// hidden one), at most [`MAX_VERSION_LEN`].
pub fn check_version(version: &str) -> Result<(), String> {
    if version.is_empty() {
        return Err("a version is required (e.g. 2.4.1)".into());
    }
    spiffe::check_chars(version, MAX_VERSION_LEN, &['.', '_', '-'])
}

/// Checks an artifact's file name: a plain name (no folder, no control
/// character), not hidden, at most [`MAX_FILE_NAME_LEN`] bytes.
pub fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a file name is required (e.g. orders.jar)".into());
    }
    if name.len() > MAX_FILE_NAME_LEN {
        return Err(format!("{name:?} is longer than {MAX_FILE_NAME_LEN} bytes"));
    }
    if name.contains(['/', '\\']) || name.chars().any(char::is_control) {
        return Err(format!("{name:?} must be a plain file name, without '/'"));
    }
    if name.starts_with('.') {
        return Err(format!("{name:?} must not start with '.'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for ok in ["2.4.1", "1.0-RC_1", "v2", &"9".repeat(MAX_VERSION_LEN)] {
            assert_eq!(check_version(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "required"),
            (".", "must start with a letter or digit"),
            ("..", "must start with a letter or digit"),
            (".hidden", "must start with a letter or digit"),
            ("-rc", "must start with a letter or digit"),
            ("1/2", "bad character '/'"),
            ("1 2", "bad character ' '"),
            (&"9".repeat(MAX_VERSION_LEN + 1), "longer than 64"),
        ] {
            let e = check_version(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn file_names() {
        for ok in [
            "orders.jar",
            "orders-2.4.1.jar",
            &"a".repeat(MAX_FILE_NAME_LEN),
        ] {
            assert_eq!(check_file_name(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "required"),
            ("lib/orders.jar", "plain file name"),
            ("..\\orders.jar", "plain file name"),
            ("orders\0.jar", "plain file name"),
            ("orders\n.jar", "plain file name"),
            (".orders.jar", "must not start with '.'"),
            (&"a".repeat(MAX_FILE_NAME_LEN + 1), "longer than 128 bytes"),
        ] {
            let e = check_file_name(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
