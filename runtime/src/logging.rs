//! The `tracing` subscriber, installed by binaries alone: human text by
//! default, one JSON object a line with `--log-format json`. `RUST_LOG`
//! filters (default `info`) the log lines only: with tracing on
//! ([`init_traced`]), the spans exported have their own filter, so that a
//! quiet log does not starve the traces.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::telemetry::Telemetry;

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected text or json"
            )),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// Installs the global subscriber. Call once, from `main`.
pub fn init(format: LogFormat) {
    init_traced(format, None);
}

/// Installs the global subscriber, exporting `tracing` spans (INFO and
/// above, this workspace's and not the libraries' plumbing) through
/// `telemetry` when tracing is on. Call once, from `main`, after
/// [`Telemetry::init`].
pub fn init_traced(format: LogFormat, telemetry: Option<&Telemetry>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let lines = match format {
        LogFormat::Text => lines.with_filter(filter).boxed(),
        LogFormat::Json => lines.json().flatten_event(true).with_filter(filter).boxed(),
    };
    let spans = telemetry.map(|telemetry| {
        let exported = Targets::new()
            .with_default(LevelFilter::INFO)
            .with_target("h2", LevelFilter::OFF)
            .with_target("hyper", LevelFilter::OFF)
            .with_target("hyper_util", LevelFilter::OFF)
            .with_target("tonic", LevelFilter::OFF)
            .with_target("tower", LevelFilter::OFF)
            .with_target("opentelemetry", LevelFilter::OFF)
            .with_target("opentelemetry_sdk", LevelFilter::OFF)
            .with_target("opentelemetry_otlp", LevelFilter::OFF);
        tracing_opentelemetry::layer()
            .with_tracer(telemetry.tracer())
            .with_filter(exported)
    });
    tracing_subscriber::registry()
        .with(lines)
        .with(spans)
        .init();
}
