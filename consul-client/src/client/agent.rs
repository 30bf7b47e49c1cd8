//! The agent's service API: what is registered on this agent.

use std::collections::HashMap;

use reqwest::Method;

use super::{Client, Request};
use crate::{
    error::Error,
    model::{AgentService, AgentServiceRegistration},
};

impl Client {
    /// Registers (or replaces) a service instance on the agent.
    pub async fn agent_service_register(
        &self,
        reg: &AgentServiceRegistration,
    ) -> Result<(), Error> {
        let req = Request::new(Method::PUT, &["agent", "service", "register"]).json(reg)?;
        self.send_ok(req).await.map(drop)
    }

    /// Deregisters the instance `id` from the agent (Consul 1.8 answers 200
    /// for an unknown ID too).
    pub async fn agent_service_deregister(&self, id: &str) -> Result<(), Error> {
        let req = Request::new(Method::PUT, &["agent", "service", "deregister", id]);
        self.send_ok(req).await.map(drop)
    }

    /// Every instance registered on the agent, by ID, in any health.
    pub async fn agent_services(&self) -> Result<HashMap<String, AgentService>, Error> {
        let req = Request::new(Method::GET, &["agent", "services"]);
        Ok(self.json(req).await?.value)
    }
}
