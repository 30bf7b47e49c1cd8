//! Between `mesh.v1` registrations and Consul's JSON shapes. A
//! registration is checked here before it may wait in the queue: once
//! queued, nobody is left to tell that it was wrong.
//!
//! An instance whose HTTP check is on its own port gets the check's path
//! as meta [`HEALTH_PATH_META`] (unless it names one itself): mesh-monitor
//! probes that path from other nodes, and Consul 1.8 shows no check's URL
//! in any read API.

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
    let mut meta: std::collections::BTreeMap<String, String> = s.meta.into_iter().collect();
    let path = checks
        .iter()
        .find_map(|c| c.http.as_deref().and_then(|url| health_path(url, port)));
    if let Some(path) = path {
        meta.entry(HEALTH_PATH_META.into()).or_insert(path);
    }
    // One check goes as Consul's `Check` (check ID `service:<id>`), as a
    // service registering itself would send it.
    let single = (checks.len() == 1).then(|| checks.remove(0));
    Ok(AgentServiceRegistration {
        id: non_empty(s.id),
        name: s.name,
        address: non_empty(s.address),
        port: Some(port),
        tags: s.tags,
        meta,
        check: single,
        checks,
    })
}

/// The meta key holding the path of an instance's HTTP check.
pub(crate) const HEALTH_PATH_META: &str = "health-path";

/// The path of a plain-HTTP check URL on `port`, the instance's own port
/// (a check on another port, a management port say, tells nothing about
/// what the instance's port serves).
fn health_path(url: &str, port: u16) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let check_port = authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok());
    let fits = path.len() <= 512 && path.bytes().all(|b| b.is_ascii_graphic());
    (check_port == Some(port) && fits).then(|| path.to_owned())
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
        assert_eq!(reg.meta["health-path"], "/health");
    }

    #[test]
    fn only_an_http_check_on_the_instances_port_names_its_health_path() {
        assert_eq!(
            health_path("http://10.0.0.5:8080/ready?full=1", 8080).as_deref(),
            Some("/ready?full=1")
        );
        assert_eq!(health_path("http://[::1]:8080", 8080).as_deref(), Some("/"));
        assert_eq!(health_path("http://10.0.0.5:8081/health", 8080), None);
        assert_eq!(health_path("https://10.0.0.5:8080/health", 8080), None);
        assert_eq!(health_path("http://host/health", 80), None);
        let mut s = web(8080);
        s.meta.insert("health-path".into(), "/own".into());
        s.checks.push(Check {
            http: "http://127.0.0.1:8080/health".into(),
            interval: "1s".into(),
            ..Default::default()
        });
        assert_eq!(registration(Some(s)).unwrap().meta["health-path"], "/own");
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
