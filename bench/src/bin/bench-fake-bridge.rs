//! bench-fake-bridge: a `mesh.v1.Discovery` server that feeds mesh-proxy
//! one fixed snapshot, to run or profile the proxy by hand without Consul:
//!
//! ```sh
//! bench-fake-bridge --listen 127.0.0.1:8890 --route bench=127.0.0.1:8080 &
//! mesh-proxy --data-dir /tmp/p --bridge-addr http://127.0.0.1:8890
//! ```
//!
//! With `--h2` the proxy speaks h2c to the routes' instances (the bench
//! upstream answers both).

use std::{net::SocketAddr, process::ExitCode};

use clap::Parser;
use mesh_bench::fake_bridge::{self, FakeBridge};

/// The flags.
#[derive(Parser)]
#[command(
    name = "bench-fake-bridge",
    about = "Feeds mesh-proxy a fixed routing snapshot."
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8890")]
    listen: SocketAddr,
    /// A service and its endpoints: NAME=IP:PORT[,IP:PORT...] (repeatable).
    #[arg(long)]
    route: Vec<String>,
    /// Synthetic services on top, never called: SERVICESxINSTANCES (e.g. 1000x10).
    #[arg(long)]
    synthetic: Option<String>,
    /// Tag every `--route` endpoint `h2`: the proxy speaks h2c to them.
    #[arg(long)]
    h2: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-fake-bridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut snapshot = Vec::new();
    for route in &args.route {
        let (name, addrs) = route.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--route {route:?}: expected NAME=IP:PORT[,IP:PORT...]")
        })?;
        let addrs = addrs
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<SocketAddr>, _>>()
            .map_err(|e| anyhow::anyhow!("--route {route:?}: {e}"))?;
        let service = fake_bridge::service(name, &addrs);
        snapshot.push(if args.h2 {
            fake_bridge::h2(service)
        } else {
            service
        });
    }
    if let Some(size) = &args.synthetic {
        let (services, instances) = size
            .split_once('x')
            .and_then(|(s, i)| Some((s.parse().ok()?, i.parse().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("--synthetic {size:?}: expected SERVICESxINSTANCES"))?;
        snapshot.extend(fake_bridge::synthetic(services, instances));
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let bridge = FakeBridge::serve(listener, snapshot)?;
    println!("fake bridge on {}", bridge.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
