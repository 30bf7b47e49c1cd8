//! What a subscriber is sent: the whole state as a snapshot, then the
//! difference between what it was sent and what is known now.

use std::{collections::BTreeMap, sync::Arc};

use mesh_proto::v1::{Delta, ServiceEndpoints, Snapshot};

use crate::watch::Endpoints;

/// Answered services and their endpoints, by name.
pub(crate) type State = BTreeMap<String, Endpoints>;

/// Every service of `state`, in name order.
pub(crate) fn snapshot(state: &State) -> Snapshot {
    Snapshot {
        services: state.iter().map(service).collect(),
    }
}

/// The services whose endpoints differ between `sent` and `now` (whole),
/// and those gone from `now`; `None` when nothing changed.
pub(crate) fn delta(sent: &State, now: &State) -> Option<Delta> {
    let upserted: Vec<_> = now
        .iter()
        .filter(|(name, eps)| sent.get(*name).is_none_or(|old| !same(old, eps)))
        .map(service)
        .collect();
    let removed: Vec<String> = sent
        .keys()
        .filter(|name| !now.contains_key(*name))
        .cloned()
        .collect();
    (!upserted.is_empty() || !removed.is_empty()).then_some(Delta { upserted, removed })
}

fn same(a: &Endpoints, b: &Endpoints) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

fn service((name, endpoints): (&String, &Endpoints)) -> ServiceEndpoints {
    ServiceEndpoints {
        name: name.clone(),
        endpoints: endpoints.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::v1::Endpoint;

    use super::*;

    fn ep(id: &str) -> Endpoint {
        Endpoint {
            id: id.into(),
            address: "127.0.0.1".into(),
            port: 80,
            node: "n1".into(),
            ..Default::default()
        }
    }

    fn state(services: &[(&str, &[&str])]) -> State {
        services
            .iter()
            .map(|(name, ids)| (name.to_string(), ids.iter().map(|i| ep(i)).collect()))
            .collect()
    }

    #[test]
    fn a_snapshot_lists_every_service_including_empty_ones() {
        let s = snapshot(&state(&[("web", &["a", "b"]), ("api", &[])]));
        let names: Vec<_> = s
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.endpoints.len()))
            .collect();
        assert_eq!(names, vec![("api", 0), ("web", 2)]);
    }

    #[test]
    fn a_delta_carries_changed_services_whole_and_removed_names() {
        let sent = state(&[("web", &["a", "b"]), ("api", &["x"]), ("old", &["o"])]);
        let now = state(&[("web", &["a", "b", "c"]), ("api", &["x"]), ("new", &[])]);
        let d = delta(&sent, &now).unwrap();
        let up: Vec<_> = d
            .upserted
            .iter()
            .map(|s| (s.name.as_str(), s.endpoints.len()))
            .collect();
        assert_eq!(up, vec![("new", 0), ("web", 3)]);
        assert_eq!(d.removed, vec!["old"]);
    }

    #[test]
    fn no_change_is_no_delta() {
        let s = state(&[("web", &["a"])]);
        assert_eq!(delta(&s, &s.clone()), None);
        assert_eq!(delta(&State::new(), &State::new()), None);
    }

    #[test]
    fn an_emptied_service_is_upserted_empty_not_removed() {
        let d = delta(&state(&[("web", &["a"])]), &state(&[("web", &[])])).unwrap();
        assert_eq!(d.upserted.len(), 1);
        assert!(d.upserted[0].endpoints.is_empty() && d.removed.is_empty());
    }
}
