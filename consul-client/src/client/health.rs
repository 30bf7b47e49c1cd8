//! Reads of the cluster's state: health, catalog, leader.

use std::collections::HashMap;

use reqwest::Method;

use super::{Client, Request};
use crate::{
    error::Error,
    model::{AgentService, Node, ServiceEntry},
    query::{QueryOptions, QueryResult},
};

impl Client {
    /// The instances of `name` with their nodes and checks; with `passing`,
    /// only those whose every check passes (`?passing`).
    pub async fn health_service(
        &self,
        name: &str,
        passing: bool,
        opts: QueryOptions,
    ) -> Result<QueryResult<Vec<ServiceEntry>>, Error> {
        let mut req = Request::new(Method::GET, &["health", "service", name]).query(&opts);
        if passing {
            req = req.flag("passing");
        }
        let result: QueryResult<Option<Vec<ServiceEntry>>> = self.json(req).await?;
        Ok(result.map(Option::unwrap_or_default))
    }

    /// Every service name in the catalog with its tags.
    pub async fn catalog_services(
        &self,
        opts: QueryOptions,
    ) -> Result<QueryResult<HashMap<String, Vec<String>>>, Error> {
        let req = Request::new(Method::GET, &["catalog", "services"]).query(&opts);
        let result: QueryResult<HashMap<String, Option<Vec<String>>>> = self.json(req).await?;
        Ok(result.map(|services| {
            services
                .into_iter()
                .map(|(name, tags)| (name, tags.unwrap_or_default()))
                .collect()
        }))
    }

    /// Every node in the catalog.
    pub async fn catalog_nodes(&self, opts: QueryOptions) -> Result<QueryResult<Vec<Node>>, Error> {
        let req = Request::new(Method::GET, &["catalog", "nodes"]).query(&opts);
        let result: QueryResult<Option<Vec<Node>>> = self.json(req).await?;
        Ok(result.map(Option::unwrap_or_default))
    }

    /// The instances registered on `node` (`/v1/catalog/node/<node>`),
    /// sorted by instance ID; empty when the node has none or is not in the
    /// catalog.
    pub async fn catalog_node_services(
        &self,
        node: &str,
        opts: QueryOptions,
    ) -> Result<QueryResult<Vec<AgentService>>, Error> {
        #[derive(serde::Deserialize)]
        struct NodeServices {
            #[serde(rename = "Services", default)]
            services: Option<HashMap<String, AgentService>>,
        }
        let req = Request::new(Method::GET, &["catalog", "node", node]).query(&opts);
        let result: QueryResult<Option<NodeServices>> = self.json(req).await?;
        Ok(result.map(|found| {
            let mut services: Vec<AgentService> = found
                .and_then(|n| n.services)
                .map(|s| s.into_values().collect())
                .unwrap_or_default();
            services.sort_by(|a, b| a.id.cmp(&b.id));
            services
        }))
    }

    /// The leader's RPC address, empty while there is none.
    pub async fn status_leader(&self) -> Result<String, Error> {
        let req = Request::new(Method::GET, &["status", "leader"]);
        Ok(self.json(req).await?.value)
    }
}
