//! One service's passing instances, as endpoints.

use std::{collections::HashSet, future::Future};

use consul_client::{Client, Error, QueryOptions, QueryResult, ServiceEntry};
use mesh_proto::v1::Endpoint;

use super::{
    Hub, ServiceView,
    blocking::Source,
    topics::Topics,
    trust::{Decision, judge},
};

/// The health of one service: `/v1/health/service/<name>?passing`.
#[derive(Debug)]
pub(crate) struct ServiceSource {
    name: String,
}

impl ServiceSource {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }
}

impl Source for ServiceSource {
    type Value = Vec<ServiceEntry>;
    type View = ServiceView;
    const KIND: &'static str = "service";
    const COUNTED: bool = true;

    fn key(&self) -> &str {
        &self.name
    }

    fn topics(hub: &Hub) -> &Topics<ServiceView> {
        &hub.services
    }

    fn fetch<'a>(
        &'a self,
        client: &'a Client,
        opts: QueryOptions,
    ) -> impl Future<Output = Result<QueryResult<Vec<ServiceEntry>>, Error>> + Send + 'a {
        client.health_service(&self.name, true, opts)
    }

    fn judge(
        &self,
        current: &ServiceView,
        value: Vec<ServiceEntry>,
        known_leader: bool,
    ) -> (Decision, ServiceView) {
        let new = endpoints(value);
        let decision = judge(current.as_deref(), new.as_slice(), known_leader, shrinks);
        (decision, Some(new.into()))
    }
}

/// The endpoints of Consul's entries, sorted by node then ID. An instance
/// without a usable port (Consul 1.8 accepts 0 and 70000) cannot be called
/// and is left out.
pub(crate) fn endpoints(entries: Vec<ServiceEntry>) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = entries
        .into_iter()
        .filter(|e| (1..=u32::from(u16::MAX)).contains(&e.service.port))
        .map(|e| Endpoint {
            address: e.address().to_owned(),
            id: e.service.id,
            port: e.service.port,
            node: e.node.node,
            tags: e.service.tags,
            meta: e.service.meta.into_iter().collect(),
        })
        .collect();
    out.sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));
    out
}

/// Whether `new` lacks an instance (node, ID) that `old` has.
fn shrinks(old: &[Endpoint], new: &[Endpoint]) -> bool {
    let kept: HashSet<(&str, &str)> = new.iter().map(|e| (&*e.node, &*e.id)).collect();
    old.iter().any(|e| !kept.contains(&(&*e.node, &*e.id)))
}

#[cfg(test)]
mod tests {
    use consul_client::{AgentService, Node};

    use super::*;

    fn entry(node: &str, id: &str, address: &str, port: u32) -> ServiceEntry {
        ServiceEntry {
            node: Node {
                node: node.into(),
                address: format!("10.0.0.{}", node.len()),
                ..Default::default()
            },
            service: AgentService {
                id: id.into(),
                service: "web".into(),
                address: address.into(),
                port,
                ..Default::default()
            },
            checks: Vec::new(),
        }
    }

    #[test]
    fn endpoints_are_sorted_use_the_node_address_and_skip_bad_ports() {
        let eps = endpoints(vec![
            entry("n2", "b", "", 80),
            entry("n1", "z", "192.168.1.1", 8080),
            entry("n1", "a", "", 0),
            entry("n1", "c", "", 70000),
        ]);
        let got: Vec<_> = eps
            .iter()
            .map(|e| (e.node.as_str(), e.id.as_str(), e.address.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![("n1", "z", "192.168.1.1"), ("n2", "b", "10.0.0.2")]
        );
    }

    #[test]
    fn the_same_id_on_another_node_is_another_instance() {
        let old = endpoints(vec![entry("n1", "web", "", 80), entry("n2", "web", "", 80)]);
        let new = endpoints(vec![entry("n1", "web", "", 80)]);
        assert!(shrinks(&old, &new));
        assert!(!shrinks(&new, &old));
    }

    #[test]
    fn without_a_leader_an_emptying_answer_keeps_the_set() {
        let src = ServiceSource::new("web");
        let known: ServiceView = Some(endpoints(vec![entry("n1", "a", "", 80)]).into());
        let (decision, _) = src.judge(&known, Vec::new(), false);
        assert_eq!(decision, Decision::Untrusted);
        let (decision, view) = src.judge(&known, Vec::new(), true);
        assert_eq!(decision, Decision::Apply);
        assert_eq!(view.as_deref(), Some(&[][..]));
    }
}
