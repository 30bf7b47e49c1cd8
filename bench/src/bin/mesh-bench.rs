//! mesh-bench: runs the benchmarks and writes the JSON summary
//! (`bash bench/run.sh` installs what it needs, builds, and calls it).

use std::process::ExitCode;

use clap::Parser as _;
use mesh_bench::{Bench, Settings};

#[tokio::main]
async fn main() -> ExitCode {
    let bench = match Bench::new(Settings::parse()) {
        Ok(bench) => bench,
        Err(e) => {
            eprintln!("mesh-bench: {e:#}");
            return ExitCode::from(64);
        }
    };
    match bench.run().await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
