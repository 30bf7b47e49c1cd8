//! mesh-bench: the benchmarks behind `bash bench/run.sh`. Every figure is
//! printed as a ratio against a baseline measured in the same run, because
//! the machine is shared and noisy: mesh-proxy against nginx (a fair
//! keep-alive reverse proxy on the same core) and against calling the
//! upstream directly; its memory idle and with 10,000 endpoints against
//! nginx holding the same upstreams; propagation from a Consul change to
//! the first routed request against Consul's own visibility; and the
//! bridge's fan-out to 500 proxies against 500 Consul long-polls.
//!
//! - [`settings`]: what a run measures and for how long (the `mesh-bench` flags).
//! - [`bench`]: a run: the tools and binaries it uses, its CPUs, its phases, the report.
//! - [`dataplane`]: requests/s, latency and CPU per request through each target with wrk.
//! - [`memory`]: mesh-proxy's RSS idle and with 10,000 endpoints, against nginx.
//! - [`propagation`]: Consul registration → first 200 through the proxy.
//! - [`fanout`]: one Consul change → all 500 subscribed proxies have it.
//! - [`report`]: figures, their ratios and bars, printed and written as JSON.
//! - [`upstream`]: the tiny keep-alive HTTP/1.1 server every request ends at.
//! - [`fake_bridge`]: a `mesh.v1.Discovery` server feeding mesh-proxy a fixed snapshot.
//! - [`nginx`]: nginx's configuration and process.
//! - [`wrk`]: one wrk run and its numbers.
//! - [`consul`]: a Consul dev agent and the few API calls the phases make.
//! - [`http`]: a keep-alive HTTP/1.1 client connection with timeouts.
//! - [`process`]: child processes pinned to a CPU, logged, killed on drop.
//! - [`procfs`]: CPU time, RSS, PSS and CPU busy time from `/proc`.
//! - [`stats`]: medians and percentiles.

pub mod bench;
pub mod consul;
pub mod dataplane;
pub mod fake_bridge;
pub mod fanout;
pub mod http;
pub mod memory;
pub mod nginx;
pub mod process;
pub mod procfs;
pub mod propagation;
pub mod report;
pub mod settings;
pub mod stats;
pub mod upstream;
pub mod wrk;

pub use crate::{bench::Bench, report::Report, settings::Settings};
