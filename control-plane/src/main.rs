//! `meshctl`: the operator's command line.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use mesh_control_plane::{demo, dev};
use mesh_runtime::{duration::HumanDuration, logging};

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
    Up {
        /// Also start two demo services that register through the proxy.
        #[arg(long, env = "MESH_DEMO")]
        demo: bool,
        /// Join this Consul agent instead of starting one in dev mode.
        #[arg(long, env = "MESH_CONSUL_ADDR")]
        consul_addr: Option<String>,
        /// Logs, dump files and queues.
        #[arg(long, env = "MESH_DATA_DIR", default_value = ".meshwork/dev")]
        data_dir: PathBuf,
        /// Where mesh-bridge and mesh-proxy are (default: meshctl's folder).
        #[arg(long, env = "MESH_BIN_DIR")]
        bin_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum DemoCommand {
    /// Serve a demo service that registers itself through the local proxy.
    Serve {
        /// Service name.
        #[arg(long)]
        name: String,
        /// Instance ID (default: <name>-<port>).
        #[arg(long)]
        id: Option<String>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Address to register (default: the listen IP).
        #[arg(long)]
        advertise: Option<String>,
        /// The local proxy.
        #[arg(long, env = "MESH_PROXY", default_value = "http://127.0.0.1:8888")]
        proxy: String,
        /// Interval of the HTTP health check Consul runs.
        #[arg(long, default_value = "1s")]
        check_interval: HumanDuration,
        /// Serve without registering.
        #[arg(long)]
        no_register: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mesh_runtime::install_crypto_provider();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.command {
        Command::Dev {
            command:
                DevCommand::Up {
                    demo,
                    consul_addr,
                    data_dir,
                    bin_dir,
                },
        } => {
            dev::up(dev::DevConfig {
                demo,
                consul_addr,
                data_dir,
                bin_dir,
            })
            .await
        }
        Command::Demo {
            command:
                DemoCommand::Serve {
                    name,
                    id,
                    listen,
                    advertise,
                    proxy,
                    check_interval,
                    no_register,
                },
        } => {
            demo::serve(demo::DemoConfig {
                name,
                id,
                listen,
                advertise,
                proxy,
                check_interval,
                no_register,
            })
            .await
        }
    }
}
