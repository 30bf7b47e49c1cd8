//! Between `mesh.v1` registrations and Consul's JSON shapes. A
//! registration is checked here before it may wait in the queue: once
//! queued, nobody is left to tell that it was wrong.

use consul_client::{AgentService, AgentServiceCheck, AgentServiceRegistration, ServiceEntry};
use mesh_proto::v1::{Check, ServiceRegistration};

/// Checks `service` and turns it into Consul's registration; the error
/// names the field.
pub(crate) fn registration(
    service: Option<ServiceRegistration>,
) -> Result<AgentServiceRegistration, String> {
    let s = service.ok_or("service is required")?;
    if s.name.trim().is_empty() {
        return Err("service.name is required".into());
    }
    let port = u16::try_from(s.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("service.port {} is out of range (1..=65535)", s.port))?;
    let mut checks = s
        .checks
        .into_iter()
        .map(check)
        .collect::<Result<Vec<_>, _>>()?;
    // One check goes as Consul's `Check` (check ID `service:<id>`), as a
    // service registering itself would send it.
    let single = (checks.len() == 1).then(|| checks.remove(0));
    Ok(AgentServiceRegistration {
        id: non_empty(s.id),
        name: s.name,
        address: non_empty(s.address),
        port: Some(port),
        tags: s.tags,
        meta: s.meta.into_iter().collect(),
        check: single,
        checks,
    })
}

fn check(c: Check) -> Result<AgentServiceCheck, String> {
    let kinds = [&c.http, &c.tcp, &c.ttl]
        .iter()
        .filter(|k| !k.is_empty())
        .count();
    if kinds != 1 {
        return Err("a check needs exactly one of http, tcp or ttl".into());
    }
    if c.ttl.is_empty() && c.interval.is_empty() {
        return Err("an http or tcp check needs an interval".into());
    }
    Ok(AgentServiceCheck {
        http: non_empty(c.http),
        tcp: non_empty(c.tcp),
        ttl: non_empty(c.ttl),
        interval: non_empty(c.interval),
        timeout: non_empty(c.timeout),
        deregister_critical_service_after: non_empty(c.deregister_critical_service_after),
        ..Default::default()
    })
}

/// An instance registered on the agent (its checks are not reported).
pub(crate) fn from_agent(s: AgentService) -> ServiceRegistration {
    ServiceRegistration {
        id: s.id,
        name: s.service,
        address: s.address,
        port: s.port,
        tags: s.tags,
        meta: s.meta.into_iter().collect(),
        checks: Vec::new(),
    }
}

/// A passing instance anywhere, with the address to reach it.
pub(crate) fn from_entry(e: ServiceEntry) -> ServiceRegistration {
    let address = e.address().to_owned();
    ServiceRegistration {
        address,
        ..from_agent(e.service)
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(port: u32) -> ServiceRegistration {
        ServiceRegistration {
            id: "web-1".into(),
            name: "web".into(),
            port,
            ..Default::default()
        }
    }

    #[test]
    fn a_registration_with_one_check_becomes_consuls_check() {
        let mut s = web(8080);
        s.checks.push(Check {
            http: "http://127.0.0.1:8080/health".into(),
            interval: "1s".into(),
            deregister_critical_service_after: "1m".into(),
            ..Default::default()
        });
        let reg = registration(Some(s)).unwrap();
        assert_eq!(
            (reg.id.as_deref(), reg.port, reg.address),
            (Some("web-1"), Some(8080), None)
        );
        let check = reg.check.unwrap();
        assert_eq!(check.http.as_deref(), Some("http://127.0.0.1:8080/health"));
        assert_eq!(
            check.deregister_critical_service_after.as_deref(),
            Some("1m")
        );
        assert!(reg.checks.is_empty());
    }

    #[test]
    fn bad_registrations_name_the_field() {
        assert!(registration(None).unwrap_err().contains("service"));
        assert!(
            registration(Some(web(0)))
                .unwrap_err()
                .contains("service.port 0")
        );
        assert!(
            registration(Some(web(70000)))
                .unwrap_err()
                .contains("70000")
        );
        let mut nameless = web(80);
        nameless.name = " ".into();
        assert!(
            registration(Some(nameless))
                .unwrap_err()
                .contains("service.name")
        );
        let mut two_kinds = web(80);
        two_kinds.checks.push(Check {
            http: "http://x".into(),
            tcp: "x:1".into(),
            interval: "1s".into(),
            ..Default::default()
        });
        assert!(
            registration(Some(two_kinds))
                .unwrap_err()
                .contains("exactly one")
        );
    }
}
