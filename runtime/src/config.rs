//! One typed config per binary, from three sources: a TOML file
//! (`--config FILE`), flags, and `MESH_*` environment variables. Flags and
//! environment win over the file. Every key exists in all three.
//!
//! A binary declares one struct deriving `clap::Parser`, `Serialize` and
//! `Deserialize` (with `deny_unknown_fields`), whose fields are all
//! `Option`s (or `Vec`s) without clap defaults, so "not given" stays
//! visible; defaults and checks live in the binary's `validate()`. [`load`]
//! parses the command line, reads the file, overlays what the command line
//! gave, and deserializes the result once more, so an unknown key in the
//! file is refused by name. Any error is one line and exit code 64.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Serialize, de::DeserializeOwned};

/// Exit code for a bad command line or config (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// A config struct that can name its `--config` file.
pub trait ConfigFile {
    /// The `--config FILE` given, if any.
    fn config_file(&self) -> Option<&Path>;
}

/// Why a config could not be loaded. Its `Display` is the one line printed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has a bad key or value.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A value passes parsing but not validation.
    #[error("config: {0}")]
    Invalid(String),
}

/// Parses argv (with env) and the config file into `T`; on error prints one
/// line to stderr and exits with [`EXIT_CONFIG`]. `--help` and `--version`
/// print and exit 0.
pub fn load<T>() -> T
where
    T: Parser + Serialize + DeserializeOwned + ConfigFile,
{
    merge(parse_args::<T>()).unwrap_or_else(|e| exit_with(&e.to_string()))
}

/// Parses argv (with env) into `T`; a bad flag or value is one line and
/// exit 64, `--help` and `--version` print and exit 0.
pub fn parse_args<T: Parser>() -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            exit_with(line.trim_start_matches("error: "));
        }
    }
}

/// Prints `message` as the one config error line and exits 64.
pub fn exit_with(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(EXIT_CONFIG)
}

/// Overlays the values given on the command line (or in the environment)
/// onto the config file named by `args`, if any.
pub fn merge<T>(args: T) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + ConfigFile,
{
    let Some(path) = args.config_file().map(Path::to_path_buf) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let file_err = |message: String| ConfigError::File {
        path: path.clone(),
        message,
    };
    let file: toml::Table = toml::from_str(&text).map_err(|e| file_err(one_line(&e)))?;
    let mut merged = serde_json::to_value(file).map_err(|e| file_err(e.to_string()))?;
    let given = serde_json::to_value(&args).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    if let (Some(base), serde_json::Value::Object(over)) = (merged.as_object_mut(), given) {
        for (key, value) in over {
            let unset =
                value.is_null() || value.as_array().is_some_and(Vec::is_empty) || key == "config";
            if !unset {
                base.insert(key, value);
            }
        }
        base.insert(
            "config".into(),
            serde_json::to_value(&path).unwrap_or_default(),
        );
    }
    serde_json::from_value(merged).map_err(|e| file_err(e.to_string()))
}

fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().to_owned();
    match e.span() {
        Some(span) => format!("{msg} (at byte {})", span.start),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Parser, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Args {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        #[arg(long, value_delimiter = ',')]
        #[serde(default)]
        services: Vec<String>,
        #[arg(long)]
        name: Option<String>,
    }

    impl ConfigFile for Args {
        fn config_file(&self) -> Option<&Path> {
            self.config.as_deref()
        }
    }

    fn with_file(contents: &str, argv: &[&str]) -> Result<Args, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, contents).unwrap();
        let mut full = vec!["bin", "--config", path.to_str().unwrap()];
        full.extend_from_slice(argv);
        merge(Args::try_parse_from(full).unwrap())
    }

    #[test]
    fn flags_win_over_file() {
        let a = with_file(
            "listen = \"127.0.0.1:1\"\nname = \"file\"\nservices = [\"a\"]",
            &["--name", "flag"],
        )
        .unwrap();
        assert_eq!(a.listen.unwrap().port(), 1);
        assert_eq!(a.name.as_deref(), Some("flag"));
        assert_eq!(a.services, vec!["a"]);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = with_file("lisen = \"127.0.0.1:1\"", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen"), "{e}");
    }

    #[test]
    fn bad_value_is_named() {
        let e = with_file("listen = \"nowhere\"", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}
