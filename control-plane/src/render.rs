//! A node's config rendered from its routes, in the two forms nodes run:
//!
//! - [`proxy`]: mesh-proxy's TOML (`services` and `[routes.<service>]`),
//!   which the proxy's own config validation accepts;
//! - [`nginx`]: nginx.conf for nodes still on OpenResty, from an
//!   operator-editable [`crate::template`]: an upstream and a
//!   `location /<service>/` per route, the upstream's servers pulled from
//!   Consul by nginx-upsync-module or written statically from the passing
//!   instances.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

pub mod nginx;
pub mod proxy;

pub use self::{
    nginx::{Instance, NginxApply, NginxSettings, Upstreams},
    proxy::proxy_config,
};

/// What a node's config is rendered for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// mesh-proxy's TOML config.
    Proxy,
    /// nginx.conf for OpenResty nodes.
    Nginx,
}

/// Why a config cannot be rendered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The operator's template does not render (a name it uses is missing).
    #[error("the nginx template: {0}")]
    Template(#[from] crate::template::TemplateError),
    /// A route cannot be expressed in this format.
    #[error("{field}: {message}")]
    Unsupported {
        /// The route's field.
        field: String,
        /// Why it cannot be rendered.
        message: String,
    },
}

// === impl Format ===

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "proxy" => Ok(Self::Proxy),
            "nginx" => Ok(Self::Nginx),
            other => Err(format!("unknown format {other:?}: expected proxy or nginx")),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Proxy => "proxy",
            Self::Nginx => "nginx",
        })
    }
}
