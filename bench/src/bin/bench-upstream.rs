//! bench-upstream: the benchmark's upstream, a minimal keep-alive
//! HTTP/1.1 server answering every request with the same 200, on one
//! thread (pin it with taskset).

use std::{net::SocketAddr, process::ExitCode};

use clap::Parser;

/// The flags.
#[derive(Parser)]
#[command(
    name = "bench-upstream",
    about = "A fixed 200 over HTTP/1.1 keep-alive, on one thread."
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-upstream: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        mesh_bench::upstream::serve(listener).await
    });
    if let Err(e) = served {
        eprintln!("bench-upstream: {}: {e}", args.listen);
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
