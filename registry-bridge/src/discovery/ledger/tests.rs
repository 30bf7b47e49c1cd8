use mesh_proto::v1::{Endpoint, RouteUpdate, route_update::Kind};

use super::*;
use crate::discovery::wire::tests::decode;

fn eps(ids: &[&str]) -> ServiceView {
    let endpoints: Vec<Endpoint> = ids
        .iter()
        .map(|id| Endpoint {
            id: id.to_string(),
            address: "127.0.0.1".into(),
            port: 80,
            node: "n1".into(),
            ..Default::default()
        })
        .collect();
    Some(endpoints.into())
}

fn named(names: &[&str]) -> Follow {
    let mut names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    names.sort();
    Follow::Named(names)
}

fn catalog(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// A ledger following `names` by name, each answered with its endpoints.
fn ledger_with(services: &[(&str, &[&str])]) -> Ledger {
    let mut ledger = Ledger::default();
    for (name, ids) in services {
        ledger.follow(name);
        ledger.answer(name, eps(ids));
    }
    ledger
}

/// A stream's view of one message.
#[derive(Debug, PartialEq)]
enum Msg {
    Snapshot(u64, Vec<(String, Vec<String>)>),
    Delta(u64, Vec<(String, Vec<String>)>, Vec<String>),
}

fn read(update: &Update) -> Msg {
    let decoded: RouteUpdate = decode(&update.chunks);
    assert_eq!(decoded.version, update.version);
    assert_eq!(decoded.stale, update.stale);
    let services = |list: Vec<mesh_proto::v1::ServiceEndpoints>| {
        list.into_iter()
            .map(|s| (s.name, s.endpoints.into_iter().map(|e| e.id).collect()))
            .collect()
    };
    match decoded.kind.expect("a kind") {
        Kind::Snapshot(s) => {
            assert!(update.snapshot);
            Msg::Snapshot(decoded.version, services(s.services))
        }
        Kind::Delta(d) => {
            assert!(!update.snapshot);
            Msg::Delta(decoded.version, services(d.upserted), d.removed)
        }
    }
}

fn svc(name: &str, ids: &[&str]) -> (String, Vec<String>) {
    (name.into(), ids.iter().map(|i| i.to_string()).collect())
}

#[test]
fn a_snapshot_lists_every_followed_service_in_name_order_including_empty_ones() {
    let mut ledger = ledger_with(&[("web", &["a", "b"]), ("api", &[])]);
    ledger.follow("late");
    let follow = named(&["web", "api", "late"]);
    let mut cursor = Cursor::default();
    let update = cursor.snapshot(&mut ledger, &follow, true);
    assert_eq!(
        read(&update),
        Msg::Snapshot(1, vec![svc("api", &[]), svc("web", &["a", "b"])]),
        "unanswered services follow later"
    );
    assert_eq!(update.services, 2);
}

#[test]
fn a_delta_carries_changed_services_whole_and_nothing_else() {
    let mut ledger = ledger_with(&[("web", &["a", "b"]), ("api", &["x"])]);
    let follow = named(&["web", "api"]);
    let mut cursor = Cursor::default();
    cursor.snapshot(&mut ledger, &follow, true);

    ledger.answer("web", eps(&["a", "b", "c"]));
    let update = cursor.next(&mut ledger, &follow, true).expect("a delta");
    assert_eq!(
        read(&update),
        Msg::Delta(2, vec![svc("web", &["a", "b", "c"])], vec![])
    );
}

#[test]
fn the_same_answer_again_or_a_change_undone_is_no_delta() {
    let mut ledger = ledger_with(&[("web", &["a"])]);
    let follow = named(&["web"]);
    let mut cursor = Cursor::default();
    cursor.snapshot(&mut ledger, &follow, true);

    let seq = ledger.seq();
    ledger.answer("web", eps(&["a"]));
    assert_eq!(ledger.seq(), seq, "an equal answer is no change");
    ledger.answer("web", eps(&["b"]));
    ledger.answer("web", eps(&["a"]));
    assert!(cursor.next(&mut ledger, &follow, true).is_none());
    ledger.answer("web", eps(&["c"]));
    let update = cursor.next(&mut ledger, &follow, true).expect("a delta");
    assert_eq!(
        read(&update),
        Msg::Delta(2, vec![svc("web", &["c"])], vec![])
    );
}

#[test]
fn an_emptied_service_is_upserted_empty_not_removed() {
    let mut ledger = ledger_with(&[("web", &["a"])]);
    let follow = named(&["web"]);
    let mut cursor = Cursor::default();
    cursor.snapshot(&mut ledger, &follow, true);
    ledger.answer("web", eps(&[]));
    let update = cursor.next(&mut ledger, &follow, true).expect("a delta");
    assert_eq!(read(&update), Msg::Delta(2, vec![svc("web", &[])], vec![]));
}

#[test]
fn a_subscriber_with_a_subset_only_gets_its_services() {
    let mut ledger = ledger_with(&[("web", &["w"]), ("api", &["a"]), ("db", &["d"])]);
    ledger.follow("web");
    let (web_only, everything) = (named(&["web"]), named(&["api", "db", "web"]));
    let (mut small, mut big) = (Cursor::default(), Cursor::default());
    assert_eq!(
        read(&small.snapshot(&mut ledger, &web_only, true)),
        Msg::Snapshot(1, vec![svc("web", &["w"])])
    );
    big.snapshot(&mut ledger, &everything, true);

    ledger.answer("api", eps(&["a2"]));
    ledger.answer("db", eps(&[]));
    assert!(
        small.next(&mut ledger, &web_only, true).is_none(),
        "nothing of web changed"
    );
    assert_eq!(
        read(&big.next(&mut ledger, &everything, true).expect("a delta")),
        Msg::Delta(2, vec![svc("api", &["a2"]), svc("db", &[])], vec![])
    );

    ledger.answer("web", eps(&["w", "w2"]));
    ledger.answer("db", eps(&["d"]));
    assert_eq!(
        read(&small.next(&mut ledger, &web_only, true).expect("a delta")),
        Msg::Delta(2, vec![svc("web", &["w", "w2"])], vec![])
    );
    assert_eq!(
        read(&big.next(&mut ledger, &everything, true).expect("a delta")),
        Msg::Delta(3, vec![svc("db", &["d"]), svc("web", &["w", "w2"])], vec![])
    );
}

#[test]
fn a_subscriber_that_falls_behind_the_log_gets_a_snapshot_with_the_next_version() {
    let mut ledger = ledger_with(&[("web", &["a"]), ("api", &["x"])]);
    let follow = named(&["web", "api"]);
    let (mut slow, mut quick) = (Cursor::default(), Cursor::default());
    slow.snapshot(&mut ledger, &follow, true);
    quick.snapshot(&mut ledger, &follow, true);

    // Just within the log: still a delta.
    for i in 0..LOG_LEN {
        ledger.answer("api", eps(&[&format!("x{i}")]));
    }
    let mut probe = Cursor {
        version: 1,
        seq: slow.seq,
        ..Cursor::default()
    };
    assert!(matches!(
        read(&probe.next(&mut ledger, &follow, true).expect("an update")),
        Msg::Delta(2, ..)
    ));
    // One more: the slow stream's sequence left the log.
    ledger.answer("web", eps(&["b"]));
    quick.seq = ledger.seq() - 1;
    assert_eq!(
        read(&quick.next(&mut ledger, &follow, true).expect("a delta")),
        Msg::Delta(2, vec![svc("web", &["b"])], vec![])
    );
    let last = format!("x{}", LOG_LEN - 1);
    assert_eq!(
        read(&slow.next(&mut ledger, &follow, true).expect("a snapshot")),
        Msg::Snapshot(2, vec![svc("api", &[&last]), svc("web", &["b"])])
    );
    // Caught up: deltas again.
    ledger.answer("web", eps(&["c"]));
    assert_eq!(
        read(&slow.next(&mut ledger, &follow, true).expect("a delta")),
        Msg::Delta(3, vec![svc("web", &["c"])], vec![])
    );
}

#[test]
fn versions_stay_consecutive_through_deltas_stale_and_fresh_snapshots() {
    let mut ledger = ledger_with(&[("web", &["a"])]);
    let follow = named(&["web"]);
    let mut cursor = Cursor::default();
    let mut versions = vec![cursor.snapshot(&mut ledger, &follow, true).version];
    for id in ["b", "c"] {
        ledger.answer("web", eps(&[id]));
        versions.push(
            cursor
                .next(&mut ledger, &follow, true)
                .expect("delta")
                .version,
        );
    }
    // A snapshot while Consul is away is stale; no delta follows it, a
    // fresh snapshot does once Consul is back.
    let stale = cursor.snapshot(&mut ledger, &follow, false);
    assert!(stale.stale && stale.snapshot);
    versions.push(stale.version);
    ledger.answer("web", eps(&["d"]));
    assert!(cursor.next(&mut ledger, &follow, false).is_none());
    let fresh = cursor.next(&mut ledger, &follow, true).expect("fresh");
    assert!(fresh.snapshot && !fresh.stale);
    assert_eq!(read(&fresh), Msg::Snapshot(5, vec![svc("web", &["d"])]));
    versions.push(fresh.version);
    ledger.answer("web", eps(&["e"]));
    versions.push(
        cursor
            .next(&mut ledger, &follow, true)
            .expect("delta")
            .version,
    );
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn following_all_sees_the_catalogs_routes_and_their_removal() {
    let mut ledger = Ledger::default();
    let watching = ledger.route(Some(&catalog(&["consul", "web", "api"])));
    let started: Vec<&str> = watching.started.iter().map(|n| &**n).collect();
    assert_eq!(started, vec!["api", "web"], "consul is never a route");
    assert!(ledger.any_answered(&Follow::All));
    assert!(!ledger.all_answered(&Follow::All), "web and api unanswered");
    ledger.answer("web", eps(&["w"]));
    ledger.answer("api", eps(&["a"]));
    assert!(ledger.all_answered(&Follow::All));

    let mut cursor = Cursor::default();
    assert_eq!(
        read(&cursor.snapshot(&mut ledger, &Follow::All, true)),
        Msg::Snapshot(1, vec![svc("api", &["a"]), svc("web", &["w"])])
    );
    let watching = ledger.route(Some(&catalog(&["consul", "web", "new"])));
    assert_eq!(watching.started, vec![Arc::from("new")]);
    assert_eq!(watching.stopped, vec![Arc::from("api")]);
    assert_eq!(
        read(
            &cursor
                .next(&mut ledger, &Follow::All, true)
                .expect("a delta")
        ),
        Msg::Delta(2, vec![], vec!["api".into()]),
        "new is not answered yet"
    );
    ledger.answer("new", eps(&[]));
    assert_eq!(
        read(
            &cursor
                .next(&mut ledger, &Follow::All, true)
                .expect("a delta")
        ),
        Msg::Delta(3, vec![svc("new", &[])], vec![])
    );
}

#[test]
fn a_service_followed_by_name_outlives_its_catalog_entry() {
    let mut ledger = Ledger::default();
    assert!(ledger.follow("web"), "a new service is watched");
    ledger.route(Some(&catalog(&["web"])));
    ledger.answer("web", eps(&["w"]));
    let web = named(&["web"]);
    let (mut by_name, mut all) = (Cursor::default(), Cursor::default());
    by_name.snapshot(&mut ledger, &web, true);
    all.snapshot(&mut ledger, &Follow::All, true);

    let watching = ledger.route(Some(&catalog(&[])));
    assert!(watching.stopped.is_empty(), "still followed by name");
    assert!(by_name.next(&mut ledger, &web, true).is_none());
    assert_eq!(
        read(&all.next(&mut ledger, &Follow::All, true).expect("a delta")),
        Msg::Delta(2, vec![], vec!["web".into()])
    );
    assert!(ledger.unfollow("web"), "nobody follows it now");
}

#[test]
fn consul_asked_for_by_name_is_followed() {
    let mut ledger = Ledger::default();
    ledger.route(Some(&catalog(&["consul"])));
    ledger.follow("consul");
    ledger.answer("consul", eps(&["server"]));
    let mut cursor = Cursor::default();
    assert_eq!(
        read(&cursor.snapshot(&mut ledger, &named(&["consul"]), true)),
        Msg::Snapshot(1, vec![svc("consul", &["server"])])
    );
    let mut all = Cursor::default();
    assert_eq!(
        read(&all.snapshot(&mut ledger, &Follow::All, true)),
        Msg::Snapshot(1, vec![])
    );
}

#[test]
fn watches_start_with_the_first_follower_and_stop_with_the_last() {
    let mut ledger = Ledger::default();
    assert!(ledger.follow("web"));
    assert!(!ledger.follow("web"));
    assert!(!ledger.unfollow("web"), "one follower left");
    assert!(ledger.unfollow("web"));
    assert!(!ledger.unfollow("web"), "already gone");

    let watching = ledger.route(Some(&catalog(&["web"])));
    assert_eq!(watching.started, vec![Arc::from("web")]);
    assert!(!ledger.follow("web"), "already watched for the catalog");
    assert!(!ledger.unfollow("web"), "still a route");
    let watching = ledger.route(None);
    assert_eq!(watching.stopped, vec![Arc::from("web")]);
    assert!(
        !ledger.any_answered(&Follow::All),
        "nobody follows the catalog"
    );
}

#[test]
fn streams_following_all_share_one_snapshot_buffer() {
    let mut ledger = Ledger::default();
    let names: Vec<String> = (0..500).map(|i| format!("svc-{i:03}")).collect();
    ledger.route(Some(&names.iter().cloned().collect()));
    for name in &names {
        ledger.answer(name, eps(&["a", "b", "c"]));
    }
    let (mut one, mut two) = (Cursor::default(), Cursor::default());
    let (a, b) = (
        one.snapshot(&mut ledger, &Follow::All, true),
        two.snapshot(&mut ledger, &Follow::All, false),
    );
    assert_eq!(a.services, 500);
    assert_eq!(a.chunks[1].as_ptr(), b.chunks[1].as_ptr(), "one buffer");
    assert!(b.stale && !a.stale);
    ledger.answer("svc-000", eps(&["z"]));
    let c = Cursor::default().snapshot(&mut ledger, &Follow::All, true);
    assert_ne!(
        c.chunks[1].as_ptr(),
        a.chunks[1].as_ptr(),
        "a change makes a new one"
    );
}

#[test]
fn the_config_rides_in_every_snapshot_and_once_after_each_change() {
    let mut ledger = ledger_with(&[("web", &["a"])]);
    let follow = named(&["web"]);
    let mut cursor = Cursor::default();
    let config_of = |update: &Update| decode(&update.chunks).config.map(|c| c.version);
    let v1 = crate::watch::NodeConfigEntry::new(1, "a".into());
    cursor.set_config(Some(&v1.piece));
    let first = cursor.snapshot(&mut ledger, &follow, true);
    assert_eq!((first.config, config_of(&first)), (true, Some(1)));

    // Unchanged: nothing to send, and a service change goes without it.
    cursor.set_config(Some(&v1.piece));
    assert!(cursor.next(&mut ledger, &follow, true).is_none());
    ledger.answer("web", eps(&["a", "b"]));
    let delta = cursor.next(&mut ledger, &follow, true).expect("a delta");
    assert_eq!(config_of(&delta), None);

    // A new version alone: a delta without services that carries it.
    let v2 = crate::watch::NodeConfigEntry::new(2, "b".into());
    cursor.set_config(Some(&v2.piece));
    let alone = cursor.next(&mut ledger, &follow, true).expect("the config");
    assert_eq!(read(&alone), Msg::Delta(3, Vec::new(), Vec::new()));
    assert_eq!(config_of(&alone), Some(2));
    assert!(
        cursor.next(&mut ledger, &follow, true).is_none(),
        "sent once"
    );

    // A stale snapshot carries it too, and the fresh one after it again.
    let stale = cursor.snapshot(&mut ledger, &follow, false);
    assert_eq!(config_of(&stale), Some(2));
    let fresh = cursor.next(&mut ledger, &follow, true).expect("fresh");
    assert_eq!((fresh.snapshot, config_of(&fresh)), (true, Some(2)));

    // No config at all: none rides, and nothing is sent for it.
    let mut bare = Cursor::default();
    bare.set_config(None);
    assert_eq!(config_of(&bare.snapshot(&mut ledger, &follow, true)), None);
    assert!(bare.next(&mut ledger, &follow, true).is_none());
}
