//! mesh-proxy's config from a node's routes: `services` (what the proxy
//! watches, so what the node may call) and one `[routes.<service>]` table
//! per route, in the keys of mesh-proxy's `RouteSpec`. A node without
//! routes gets neither: its proxy then watches every service with the
//! default policy, as a proxy without a config file does.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{Route, Routes};

/// The part of mesh-proxy's config file the control plane owns.
#[derive(Serialize)]
struct ProxyFile<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    services: Vec<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    routes: BTreeMap<&'a str, &'a Route>,
}

/// The TOML mesh-proxy reads, for `node` at config version `number`.
pub fn proxy_config(node: &str, number: u64, routes: &Routes) -> String {
    let file = ProxyFile {
        services: routes.keys().map(String::as_str).collect(),
        routes: routes.iter().map(|(k, v)| (k.as_str(), v)).collect(),
    };
    let body = toml::to_string(&file)
        .expect("a route set is plain strings, numbers and tables, which TOML holds");
    let mut out = format!(
        "# mesh-proxy config for node {node}, config version {number}.\n\
         # Rendered by mesh-control from the node's routes: change the routes, not this file.\n"
    );
    if !body.is_empty() {
        out.push('\n');
        out.push_str(&body);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mesh_runtime::duration::HumanDuration;

    use super::*;
    use crate::model::Lb;

    fn routes() -> Routes {
        let mut routes = Routes::new();
        routes.insert(
            "orders".into(),
            Route {
                timeout: Some(HumanDuration(Duration::from_secs(2))),
                per_try_timeout: Some(HumanDuration(Duration::from_millis(500))),
                retries: Some(3),
                lb: Some(Lb::LeastRequest),
                weights: [("v1".to_owned(), 90), ("v2".to_owned(), 10)].into(),
                ..Route::default()
            },
        );
        routes.insert(
            "users".into(),
            Route {
                lb: Some(Lb::ConsistentHash),
                hash_header: Some("x-user".into()),
                ..Route::default()
            },
        );
        routes.insert("billing".into(), Route::default());
        routes
    }

    /// Parses `text` as mesh-proxy's own config file and validates it the
    /// way mesh-proxy does at start-up.
    fn proxy_accepts(text: &str) -> Result<mesh_proxy::config::Config, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let args = <mesh_proxy::config::Args as clap::Parser>::try_parse_from([
            "mesh-proxy",
            "--config",
            path.to_str().ok_or("a temp path is UTF-8")?,
            "--node",
            "n1",
        ])
        .map_err(|e| e.to_string())?;
        mesh_runtime::config::merge(args)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn the_rendered_config_is_what_mesh_proxy_accepts() {
        let text = proxy_config("n1", 3, &routes());
        let config = proxy_accepts(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.services, ["billing", "orders", "users"]);
        assert_eq!(config.routes.len(), 3);
        let policies = mesh_proxy::policy::Policies::from_config(&config).unwrap();
        let orders = policies.get("orders");
        assert_eq!(orders.timeout, Duration::from_secs(2));
        assert_eq!(orders.per_try_timeout, Some(Duration::from_millis(500)));
        assert_eq!(orders.retries, 3);
        assert_eq!(orders.lb, mesh_proxy::config::LoadBalancing::LeastRequest);
        assert_eq!(&*orders.weights, &[("v1".into(), 90), ("v2".into(), 10)]);
        let users = policies.get("users");
        assert_eq!(users.lb, mesh_proxy::config::LoadBalancing::ConsistentHash);
        assert!(users.hash.is_some());
        assert_eq!(policies.get("billing").retries, 2, "the proxy's default");
    }

    #[test]
    fn every_load_balancing_algorithm_renders_as_the_proxy_names_it() {
        for lb in [Lb::P2cEwma, Lb::RoundRobin, Lb::LeastRequest] {
            let mut routes = Routes::new();
            routes.insert(
                "orders".into(),
                Route {
                    lb: Some(lb),
                    ..Route::default()
                },
            );
            let text = proxy_config("n1", 1, &routes);
            let config = proxy_accepts(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            let policies = mesh_proxy::policy::Policies::from_config(&config).unwrap();
            assert_eq!(policies.get("orders").lb.to_string(), lb.to_string());
        }
    }

    #[test]
    fn no_routes_render_a_config_without_services() {
        let text = proxy_config("n1", 0, &Routes::new());
        assert!(!text.contains("services"), "{text}");
        let config = proxy_accepts(&text).unwrap();
        assert!(config.services.is_empty() && config.routes.is_empty());
    }

    #[test]
    fn the_text_is_stable_and_names_the_version() {
        let text = proxy_config("n1", 7, &routes());
        assert_eq!(text, proxy_config("n1", 7, &routes()));
        assert!(text.starts_with("# mesh-proxy config for node n1, config version 7."));
        assert!(text.contains("[routes.orders]\ntimeout = \"2s\"\nper_try_timeout = \"500ms\"\nretries = 3\nlb = \"least-request\"\n"), "{text}");
    }
}
