//! `meshctl`: the operator's command line.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::{Args, Parser, Subcommand};
use mesh_control_plane::{demo, dev};
use mesh_runtime::{
    config::{ConfigFile, exit_with, merge, parse_args},
    duration::HumanDuration,
    logging,
};
use serde::{Deserialize, Serialize};

/// Meshwork's command line.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "MESH_LOG_FORMAT", default_value = "text", global = true)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A mesh on this machine for development.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// The demo service.
    Demo {
        #[command(subcommand)]
        command: DemoCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Start Consul, mesh-bridge and mesh-proxy (and demo services); Ctrl-C stops them.
    Up(DevUp),
}

#[derive(Debug, Subcommand)]
enum DemoCommand {
    /// Serve a demo service that registers itself through the local proxy.
    Serve(DemoServe),
}

/// `meshctl dev up` options; each also a key of the `--config` TOML file.
#[derive(Debug, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevUp {
    /// TOML file with any of these options (flags and environment win).
    #[arg(long, env = "MESH_CONFIG")]
    config: Option<PathBuf>,
    /// Also start two demo services that register through the proxy.
    #[arg(long, env = "MESH_DEMO", num_args = 0..=1, default_missing_value = "true")]
    demo: Option<bool>,
    /// Join this Consul agent instead of starting one in dev mode.
    #[arg(long, env = "MESH_CONSUL_ADDR")]
    consul_addr: Option<String>,
    /// Logs, dump files and queues [default: .meshwork/dev].
    #[arg(long, env = "MESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where mesh-bridge and mesh-proxy are [default: meshctl's folder].
    #[arg(long, env = "MESH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
}

/// `meshctl demo serve` options; each also a key of the `--config` TOML file.
#[derive(Debug, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DemoServe {
    /// TOML file with any of these options (flags and environment win).
    #[arg(long, env = "MESH_CONFIG")]
    config: Option<PathBuf>,
    /// Service name.
    #[arg(long, env = "MESH_NAME")]
    name: Option<String>,
    /// Instance ID [default: <name>-<port>].
    #[arg(long, env = "MESH_ID")]
    id: Option<String>,
    /// Address to listen on [default: 127.0.0.1:0].
    #[arg(long, env = "MESH_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address to register [default: the listen IP].
    #[arg(long, env = "MESH_ADVERTISE")]
    advertise: Option<String>,
    /// The local proxy [default: http://127.0.0.1:8888].
    #[arg(long, env = "MESH_PROXY")]
    proxy: Option<String>,
    /// Interval of the HTTP health check Consul runs [default: 1s].
    #[arg(long, env = "MESH_CHECK_INTERVAL")]
    check_interval: Option<HumanDuration>,
    /// Serve without registering.
    #[arg(long, env = "MESH_NO_REGISTER", num_args = 0..=1, default_missing_value = "true")]
    no_register: Option<bool>,
}

impl ConfigFile for DevUp {
    fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }
}

impl ConfigFile for DemoServe {
    fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }
}

impl DevUp {
    fn validate(self) -> dev::DevConfig {
        dev::DevConfig {
            demo: self.demo.unwrap_or(false),
            consul_addr: self.consul_addr,
            data_dir: self.data_dir.unwrap_or_else(|| ".meshwork/dev".into()),
            bin_dir: self.bin_dir,
        }
    }
}

impl DemoServe {
    fn validate(self) -> demo::DemoConfig {
        let Some(name) = self.name.filter(|n| !n.is_empty()) else {
            exit_with(
                "name: a service name is required (--name, MESH_NAME or `name` in the config file)",
            );
        };
        demo::DemoConfig {
            name,
            id: self.id,
            listen: self.listen.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()),
            advertise: self.advertise,
            proxy: self.proxy.unwrap_or_else(|| "http://127.0.0.1:8888".into()),
            check_interval: self
                .check_interval
                .unwrap_or(HumanDuration(std::time::Duration::from_secs(1))),
            no_register: self.no_register.unwrap_or(false),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mesh_runtime::install_crypto_provider();
    let cli: Cli = parse_args();
    logging::init(cli.log_format);
    match cli.command {
        Command::Dev {
            command: DevCommand::Up(args),
        } => dev::up(load(args).validate()).await,
        Command::Demo {
            command: DemoCommand::Serve(args),
        } => demo::serve(load(args).validate()).await,
    }
}

/// Overlays the flags given on the `--config` file; exits 64 on a bad one.
fn load<T: Serialize + serde::de::DeserializeOwned + ConfigFile>(args: T) -> T {
    merge(args).unwrap_or_else(|e| exit_with(&e.to_string()))
}
