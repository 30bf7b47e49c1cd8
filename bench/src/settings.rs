//! What a run measures and for how long: the `mesh-bench` flags. The
//! defaults are what `bench/run.sh` runs (about five minutes of
//! measuring); every size can be made smaller for a quick look.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use clap::Parser;

/// The flags of `mesh-bench`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "mesh-bench",
    about = "Benchmarks mesh-proxy and mesh-bridge against baselines measured in the same run."
)]
pub struct Settings {
    /// Phases to run, comma separated: dataplane, memory, propagation, fanout.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "dataplane,memory,propagation,fanout"
    )]
    pub phases: Vec<Phase>,
    /// CPU layouts of the data plane, comma separated: `split` (the proxy
    /// alone on its CPU; wrk and the upstream on the other) and `shared`
    /// (the proxy and the upstream on one CPU; wrk alone on the other).
    #[arg(long, value_delimiter = ',', default_value = "split,shared")]
    pub layouts: Vec<Layout>,
    /// Seconds of load per wrk run.
    #[arg(long, default_value_t = 3)]
    pub duration_secs: u64,
    /// Rounds of the data-plane runs; each round measures every target back
    /// to back, and the figures are medians over rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Scratch folder for configs, logs and data dirs (removed by run.sh).
    #[arg(long)]
    pub work: PathBuf,
    /// Where the JSON summary goes.
    #[arg(long)]
    pub out: PathBuf,
    /// Folder of mesh-proxy, mesh-bridge and bench-upstream (default: this
    /// binary's folder).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The consul binary (default: found on PATH or where the install script puts it).
    #[arg(long)]
    pub consul: Option<PathBuf>,
    /// Registrations measured in the propagation phase.
    #[arg(long, default_value_t = 50)]
    pub propagation_n: usize,
    /// Services in the memory and fan-out phases.
    #[arg(long, default_value_t = 1000)]
    pub services: usize,
    /// Instances per service in the memory and fan-out phases.
    #[arg(long, default_value_t = 10)]
    pub instances: usize,
    /// Simulated proxies subscribed to the bridge in the fan-out phase.
    #[arg(long, default_value_t = 500)]
    pub subscribers: usize,
    /// Changes measured in the fan-out phase.
    #[arg(long, default_value_t = 10)]
    pub changes: usize,
}

/// One part of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// wrk through nothing, nginx and mesh-proxy.
    Dataplane,
    /// mesh-proxy's RSS idle and with many endpoints.
    Memory,
    /// Consul registration to first routed request.
    Propagation,
    /// The bridge streaming one change to many subscribers.
    Fanout,
}

/// Where the data plane's processes run. The proxy under test (nginx or
/// mesh-proxy) always has the proxy CPU; wrk always has the load CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Layout {
    /// The upstream shares the load CPU with wrk: the proxy's CPU is its
    /// own, but wrk + upstream may saturate theirs first.
    Split,
    /// The upstream shares the proxy CPU (how the nginx reference figures were taken):
    /// every target is bound by that CPU, and a direct call crosses CPUs
    /// as often as a proxied one, so the added latency is the proxy's.
    Shared,
}

// === impl Settings ===

impl Settings {
    /// The load time of one wrk run.
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_secs.max(1))
    }

    /// Whether `phase` is to run.
    pub fn runs(&self, phase: Phase) -> bool {
        self.phases.contains(&phase)
    }
}

// === impl Phase ===

impl FromStr for Phase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "dataplane" => Ok(Self::Dataplane),
            "memory" => Ok(Self::Memory),
            "propagation" => Ok(Self::Propagation),
            "fanout" => Ok(Self::Fanout),
            other => Err(format!(
                "unknown phase {other:?}: expected dataplane, memory, propagation or fanout"
            )),
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dataplane => "dataplane",
            Self::Memory => "memory",
            Self::Propagation => "propagation",
            Self::Fanout => "fanout",
        })
    }
}

// === impl Layout ===

impl FromStr for Layout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "split" => Ok(Self::Split),
            "shared" => Ok(Self::Shared),
            other => Err(format!(
                "unknown layout {other:?}: expected split or shared"
            )),
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Split => "split",
            Self::Shared => "shared",
        })
    }
}
