//! The agent's service and check API: what is registered on this agent,
//! and the TTL checks a process keeps passing to say it is alive.

use std::collections::HashMap;

use reqwest::Method;

use super::{Client, Request};
use crate::{
    error::Error,
    model::{AgentCheckRegistration, AgentService, AgentServiceRegistration, HealthCheck},
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

    /// Registers (or replaces, with its new status) a check on the agent.
    pub async fn agent_check_register(&self, reg: &AgentCheckRegistration) -> Result<(), Error> {
        let req = Request::new(Method::PUT, &["agent", "check", "register"]).json(reg)?;
        self.send_ok(req).await.map(drop)
    }

    /// Marks the TTL check `id` passing and restarts its TTL. An error when
    /// the agent does not know the check (or it has no TTL).
    pub async fn agent_check_pass(&self, id: &str) -> Result<(), Error> {
        let req = Request::new(Method::PUT, &["agent", "check", "pass", id]);
        self.send_ok(req).await.map(drop)
    }

    /// Sets the TTL check `id` to `status` (`passing`, `warning`,
    /// `critical`) with `output`, and restarts its TTL: the only way to
    /// change an existing TTL check's status (registering it again keeps
    /// the old one). An error when the agent does not know the check.
    pub async fn agent_check_update(
        &self,
        id: &str,
        status: &str,
        output: &str,
    ) -> Result<(), Error> {
        let body = serde_json::json!({ "Status": status, "Output": output });
        let req = Request::new(Method::PUT, &["agent", "check", "update", id]).json(&body)?;
        self.send_ok(req).await.map(drop)
    }

    /// Deregisters the check `id` from the agent; sessions bound to it are
    /// invalidated.
    pub async fn agent_check_deregister(&self, id: &str) -> Result<(), Error> {
        let req = Request::new(Method::PUT, &["agent", "check", "deregister", id]);
        self.send_ok(req).await.map(drop)
    }

    /// Every check registered on the agent, by ID, with its status.
    pub async fn agent_checks(&self) -> Result<HashMap<String, HealthCheck>, Error> {
        let req = Request::new(Method::GET, &["agent", "checks"]);
        Ok(self.json(req).await?.value)
    }
}
