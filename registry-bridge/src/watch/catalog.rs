//! The catalog's service names, for subscribers that watch every service.

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    sync::Arc,
};

use consul_client::{Client, Error, QueryOptions, QueryResult};

use super::{
    CatalogView, Hub,
    blocking::Source,
    topics::Topics,
    trust::{Decision, judge},
};

/// `/v1/catalog/services`.
#[derive(Debug)]
pub(crate) struct CatalogSource;

impl Source for CatalogSource {
    type Value = HashMap<String, Vec<String>>;
    type View = CatalogView;
    const KIND: &'static str = "catalog";
    const COUNTED: bool = false;

    fn key(&self) -> &str {
        ""
    }

    fn topics(hub: &Hub) -> &Topics<CatalogView> {
        &hub.catalog
    }

    fn fetch<'a>(
        &'a self,
        client: &'a Client,
        opts: QueryOptions,
    ) -> impl Future<Output = Result<QueryResult<Self::Value>, Error>> + Send + 'a {
        client.catalog_services(opts)
    }

    fn judge(
        &self,
        current: &CatalogView,
        value: Self::Value,
        known_leader: bool,
    ) -> (Decision, CatalogView) {
        let names: BTreeSet<String> = value.into_keys().collect();
        let decision = judge(current.as_deref(), &names, known_leader, |old, new| {
            !old.is_subset(new)
        });
        (decision, Some(Arc::new(names)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_vanishing_without_a_leader_is_kept() {
        let known: CatalogView = Some(Arc::new(["a".to_owned(), "b".to_owned()].into()));
        let only_a: HashMap<String, Vec<String>> = [("a".to_owned(), Vec::new())].into();
        assert_eq!(
            CatalogSource.judge(&known, only_a.clone(), false).0,
            Decision::Untrusted
        );
        let (decision, view) = CatalogSource.judge(&known, only_a, true);
        assert_eq!(decision, Decision::Apply);
        assert_eq!(view.unwrap().len(), 1);
    }
}
