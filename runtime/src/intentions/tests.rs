use serde_json::json;

use super::*;

fn sel(text: &str) -> Selector {
    Selector::parse(text).expect("a valid selector")
}

fn intention(source: &str, destination: &str, action: Action) -> Intention {
    Intention {
        source: sel(source),
        destination: sel(destination),
        action,
        http: Vec::new(),
        description: String::new(),
    }
}

fn rule(
    path_exact: Option<&str>,
    path_prefix: Option<&str>,
    methods: &[&str],
    action: Action,
) -> HttpRule {
    HttpRule {
        path_exact: path_exact.map(str::to_owned),
        path_prefix: path_prefix.map(str::to_owned),
        methods: methods.iter().map(|m| Method((*m).to_owned())).collect(),
        action,
    }
}

fn narrowed(source: &str, destination: &str, http: Vec<HttpRule>) -> Intention {
    Intention {
        http,
        ..intention(source, destination, Action::Allow)
    }
}

fn set(default: Action, list: Vec<Intention>) -> Intentions {
    Intentions::new(default, list).expect("a valid set")
}

fn action(set: &Intentions, source: Option<&str>, destination: &str) -> Action {
    set.decide(source, destination, "GET", "/").action
}

#[test]
fn no_intention_leaves_the_default_and_says_so() {
    for default in [Action::Allow, Action::Deny] {
        let d = Intentions::empty(default).decide(Some("api"), "web", "GET", "/");
        assert_eq!(
            d,
            Decision {
                action: default,
                by: By::Default
            }
        );
    }
    assert_eq!(Intentions::default().default_action(), Action::Deny);
    let only_other = set(Action::Deny, vec![intention("api", "db", Action::Allow)]);
    assert_eq!(action(&only_other, Some("api"), "web"), Action::Deny);
    assert_eq!(action(&only_other, Some("api"), "db"), Action::Allow);
}

#[test]
fn two_exact_names_beat_one_and_one_beats_none() {
    let s = set(
        Action::Allow,
        vec![
            intention("*", "*", Action::Deny),
            intention("*", "web", Action::Allow),
            intention("api", "web", Action::Deny),
        ],
    );
    assert_eq!(
        action(&s, Some("api"), "web"),
        Action::Deny,
        "api -> web decides"
    );
    assert_eq!(
        action(&s, Some("cron"), "web"),
        Action::Allow,
        "* -> web decides"
    );
    assert_eq!(
        action(&s, Some("cron"), "db"),
        Action::Deny,
        "* -> * decides"
    );
    let d = s.decide(Some("cron"), "web", "GET", "/");
    assert_eq!(
        d.by,
        By::Intention {
            source: Selector::Any,
            destination: sel("web")
        }
    );
    // An exact allow over a wildcard deny.
    let s = set(
        Action::Deny,
        vec![
            intention("api", "*", Action::Deny),
            intention("api", "web", Action::Allow),
        ],
    );
    assert_eq!(action(&s, Some("api"), "web"), Action::Allow);
    assert_eq!(action(&s, Some("api"), "db"), Action::Deny);
}

#[test]
fn equally_specific_intentions_that_disagree_deny() {
    for (first, second) in [(Action::Allow, Action::Deny), (Action::Deny, Action::Allow)] {
        let s = set(
            Action::Allow,
            vec![intention("api", "*", first), intention("*", "web", second)],
        );
        let d = s.decide(Some("api"), "web", "GET", "/");
        assert_eq!(d.action, Action::Deny, "{first} and {second}");
        let deny_side = if first == Action::Deny {
            (sel("api"), Selector::Any)
        } else {
            (Selector::Any, sel("web"))
        };
        assert_eq!(
            d.by,
            By::Intention {
                source: deny_side.0,
                destination: deny_side.1
            },
            "the deny is named"
        );
    }
    let both_allow = set(
        Action::Deny,
        vec![
            intention("api", "*", Action::Allow),
            intention("*", "web", Action::Allow),
        ],
    );
    assert_eq!(action(&both_allow, Some("api"), "web"), Action::Allow);
}

#[test]
fn a_narrowed_allow_that_no_rule_matches_wins_a_tie_as_a_deny() {
    // api -> * names only /health; * -> web allows everything: for api's
    // call to web's /admin, the two are equally specific and disagree.
    let s = set(
        Action::Allow,
        vec![
            narrowed(
                "api",
                "*",
                vec![rule(Some("/health"), None, &[], Action::Allow)],
            ),
            intention("*", "web", Action::Allow),
        ],
    );
    let d = s.decide(Some("api"), "web", "GET", "/admin");
    assert_eq!(d.action, Action::Deny);
    assert!(matches!(d.by, By::Unmatched { .. }), "{d:?}");
    assert_eq!(
        s.decide(Some("api"), "web", "GET", "/health").action,
        Action::Allow
    );
}

#[test]
fn a_peer_without_a_service_identity_matches_only_wildcard_sources() {
    let s = set(
        Action::Deny,
        vec![
            intention("api", "web", Action::Allow),
            intention("*", "metrics", Action::Allow),
        ],
    );
    assert_eq!(action(&s, None, "web"), Action::Deny);
    assert_eq!(action(&s, None, "metrics"), Action::Allow);
    let d = s.decide(None, "web", "GET", "/");
    assert_eq!(d.by, By::Default);
}

#[test]
fn names_compare_ignoring_case_and_are_stored_lowercase() {
    assert_eq!(sel("Web"), Selector::Service("web".into()));
    let s = set(Action::Deny, vec![intention("API", "web", Action::Allow)]);
    assert_eq!(action(&s, Some("api"), "WEB"), Action::Allow);
    assert_eq!(s.list()[0].source.as_str(), "api");
}

#[test]
fn the_longest_matching_path_decides_and_exact_beats_a_prefix_of_its_length() {
    let i = narrowed(
        "api",
        "web",
        vec![
            rule(None, Some("/v1/"), &[], Action::Allow),
            rule(None, Some("/v1/admin"), &[], Action::Deny),
            rule(Some("/v1/admin/health"), None, &[], Action::Allow),
            rule(None, Some("/v1/admin/health"), &[], Action::Deny),
        ],
    );
    let s = set(Action::Deny, vec![i]);
    let at = |path: &str| s.decide(Some("api"), "web", "GET", path);
    assert_eq!(at("/v1/users").action, Action::Allow);
    assert_eq!(
        at("/v1/users").by,
        By::Rule {
            source: sel("api"),
            destination: sel("web"),
            rule: 0
        }
    );
    assert_eq!(at("/v1/admin/users").action, Action::Deny);
    assert_eq!(
        at("/v1/admin/health").action,
        Action::Allow,
        "exact beats prefix"
    );
    let exact = at("/v1/admin/health");
    assert!(matches!(exact.by, By::Rule { rule: 2, .. }), "{exact:?}");
    assert_eq!(at("/v1/admin/healthz").action, Action::Deny);
}

#[test]
fn equally_long_rules_that_disagree_deny() {
    for order in [[Action::Allow, Action::Deny], [Action::Deny, Action::Allow]] {
        let i = Intention {
            http: vec![
                rule(None, Some("/api"), &["GET"], order[0]),
                rule(None, Some("/api"), &[], order[1]),
            ],
            ..intention("api", "web", Action::Allow)
        };
        let s = set(Action::Allow, vec![i]);
        assert_eq!(
            s.decide(Some("api"), "web", "GET", "/api/x").action,
            Action::Deny,
            "{order:?}"
        );
    }
}

#[test]
fn a_rule_without_a_path_matches_every_path_with_length_zero() {
    let s = set(
        Action::Deny,
        vec![narrowed(
            "api",
            "web",
            vec![
                rule(None, None, &["GET", "HEAD"], Action::Allow),
                rule(None, Some("/"), &["DELETE"], Action::Deny),
            ],
        )],
    );
    assert_eq!(
        s.decide(Some("api"), "web", "HEAD", "/any/thing").action,
        Action::Allow
    );
    assert_eq!(
        s.decide(Some("api"), "web", "DELETE", "/x").action,
        Action::Deny
    );
    // A prefix of "/" is longer than no path: it beats a path-less rule.
    let s = set(
        Action::Deny,
        vec![narrowed(
            "api",
            "web",
            vec![
                rule(None, None, &[], Action::Deny),
                rule(None, Some("/"), &[], Action::Allow),
            ],
        )],
    );
    assert_eq!(
        s.decide(Some("api"), "web", "PUT", "/x").action,
        Action::Allow
    );
}

#[test]
fn methods_narrow_a_rule_and_compare_case_sensitively() {
    let s = set(
        Action::Allow,
        vec![narrowed(
            "api",
            "web",
            vec![rule(None, Some("/v1/"), &["GET", "HEAD"], Action::Allow)],
        )],
    );
    assert_eq!(
        s.decide(Some("api"), "web", "GET", "/v1/x").action,
        Action::Allow
    );
    assert_eq!(
        s.decide(Some("api"), "web", "HEAD", "/v1/x").action,
        Action::Allow
    );
    assert_eq!(
        s.decide(Some("api"), "web", "POST", "/v1/x").action,
        Action::Deny
    );
    assert_eq!(
        s.decide(Some("api"), "web", "get", "/v1/x").action,
        Action::Deny
    );
}

#[test]
fn a_narrowed_allow_that_no_rule_matches_denies_and_never_falls_through() {
    // The default allows, and a less specific intention allows too: the
    // narrowed allow still denies what it does not name.
    let s = set(
        Action::Allow,
        vec![
            intention("*", "web", Action::Allow),
            narrowed(
                "api",
                "web",
                vec![rule(Some("/health"), None, &[], Action::Allow)],
            ),
        ],
    );
    assert_eq!(
        s.decide(Some("api"), "web", "GET", "/health").action,
        Action::Allow
    );
    let d = s.decide(Some("api"), "web", "GET", "/admin");
    assert_eq!(
        d,
        Decision {
            action: Action::Deny,
            by: By::Unmatched {
                source: sel("api"),
                destination: sel("web")
            }
        }
    );
    assert_eq!(
        d.to_string(),
        "deny by intention api -> web: none of its http rules matches"
    );
    assert_eq!(
        s.decide(Some("cron"), "web", "GET", "/admin").action,
        Action::Allow
    );
}

#[test]
fn the_same_source_and_destination_twice_is_refused() {
    let e = Intentions::new(
        Action::Deny,
        vec![
            intention("api", "web", Action::Allow),
            intention("*", "web", Action::Allow),
            intention("API", "web", Action::Deny),
        ],
    )
    .unwrap_err();
    assert_eq!(e.field, "list[2]");
    assert_eq!(
        e.to_string(),
        "list[2]: api -> web is given twice (also list[0])"
    );
}

#[test]
fn service_names_follow_the_mesh_rule_and_a_wildcard_is_a_star_alone() {
    assert_eq!(Selector::parse("*"), Ok(Selector::Any));
    for (bad, words) in [
        ("", "must not be empty"),
        ("api*", "a wildcard is `*` alone"),
        ("**", "a wildcard is `*` alone"),
        ("a/b", "'/'"),
        ("-api", "must start with a letter or digit"),
        ("v1", "reserved"),
        ("_mesh", "reserved"),
    ] {
        let e = Selector::parse(bad).unwrap_err();
        assert!(e.contains(words), "{bad:?}: {e}");
    }
    let long = "a".repeat(64);
    assert!(
        Selector::parse(&long)
            .unwrap_err()
            .contains("longer than 63")
    );
}

#[test]
fn bad_rules_are_refused_naming_the_field() {
    let with = |http: Vec<HttpRule>| narrowed("api", "web", http);
    for (i, field, words) in [
        (
            with(vec![rule(Some("/a"), Some("/b"), &[], Action::Allow)]),
            "http[0]",
            "not both",
        ),
        (
            with(vec![
                rule(None, None, &[], Action::Allow),
                rule(None, Some("v1/"), &[], Action::Allow),
            ]),
            "http[1].path_prefix",
            "does not start with '/'",
        ),
        (
            with(vec![rule(Some("/a?b=1"), None, &[], Action::Allow)]),
            "http[0].path_exact",
            "no query",
        ),
        (
            with(vec![rule(None, None, &["GET", "get"], Action::Allow)]),
            "http[0].methods[1]",
            "write \"GET\"",
        ),
        (
            with(vec![rule(None, None, &["GE T"], Action::Allow)]),
            "http[0].methods[0]",
            "which no HTTP method has",
        ),
        (
            with(vec![rule(None, None, &[""], Action::Allow)]),
            "http[0].methods[0]",
            "must not be empty",
        ),
        (
            Intention {
                action: Action::Deny,
                ..with(vec![rule(None, None, &[], Action::Allow)])
            },
            "action",
            "narrowed",
        ),
        (
            with(vec![rule(None, None, &[], Action::Allow); MAX_RULES + 1]),
            "http",
            "more than 64 rules",
        ),
        (
            Intention {
                description: "two\nlines".into(),
                ..intention("api", "web", Action::Allow)
            },
            "description",
            "control characters",
        ),
    ] {
        let e = i.validate().unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(words), "{e}");
        // In a set, the place of the intention comes first.
        let e =
            Intentions::new(Action::Deny, vec![intention("a", "b", Action::Allow), i]).unwrap_err();
        assert!(e.field.starts_with("list[1]."), "{e}");
    }
    assert_eq!(
        Method::parse("PROPFIND").map(|m| m.0),
        Ok("PROPFIND".to_owned())
    );
}

#[test]
fn the_json_form_is_the_documented_one() {
    let text = json!({
        "default": "deny",
        "list": [{
            "source": "api",
            "destination": "web",
            "action": "allow",
            "http": [
                {"path_prefix": "/v1/", "methods": ["GET", "HEAD"], "action": "allow"},
                {"path_exact": "/v1/admin", "action": "deny"}
            ],
            "description": "api reads web's public API"
        }, {
            "source": "*",
            "destination": "web",
            "action": "deny"
        }]
    });
    let s: Intentions = serde_json::from_value(text.clone()).expect("the documented form");
    assert_eq!(s.default_action(), Action::Deny);
    assert_eq!(s.list().len(), 2);
    assert_eq!(s.list()[0].source, Selector::Any, "sorted by source");
    let api = &s.list()[1];
    assert_eq!(
        api.http[0].methods,
        [Method("GET".into()), Method("HEAD".into())]
    );
    assert_eq!(api.http[1].path_exact.as_deref(), Some("/v1/admin"));
    // It writes what it reads.
    let back = serde_json::to_value(&s).expect("serializes");
    let again: Intentions = serde_json::from_value(back).expect("reads back");
    assert_eq!(again, s);

    let d = s.decide(Some("api"), "web", "GET", "/v1/admin");
    assert_eq!(
        serde_json::to_value(&d).expect("serializes"),
        json!({"action": "deny", "by": "rule", "source": "api", "destination": "web", "rule": 1})
    );
    assert_eq!(
        serde_json::to_value(s.decide(Some("db"), "cache", "GET", "/")).expect("serializes"),
        json!({"action": "deny", "by": "default"})
    );
    let read: Decision = serde_json::from_value(
        json!({"action": "allow", "by": "intention", "source": "*", "destination": "web"}),
    )
    .expect("a decision reads back");
    assert_eq!(read.to_string(), "allow by intention * -> web");
}

#[test]
fn bad_json_is_refused_with_the_reason() {
    for (text, words) in [
        (
            json!({"default": "maybe", "list": []}),
            "unknown variant `maybe`",
        ),
        (
            json!({"default": "deny", "list": [{"source": "api*", "destination": "web", "action": "allow"}]}),
            "a wildcard is `*` alone",
        ),
        (
            json!({"default": "deny", "list": [{"source": "api", "destination": "web", "action": "allow",
                   "http": [{"path_prefx": "/v1", "action": "allow"}]}]}),
            "unknown field `path_prefx`",
        ),
        (
            json!({"default": "deny", "list": [
                {"source": "api", "destination": "web", "action": "allow"},
                {"source": "api", "destination": "web", "action": "deny"}]}),
            "list[1]: api -> web is given twice",
        ),
    ] {
        let e = serde_json::from_value::<Intentions>(text.clone()).unwrap_err();
        assert!(e.to_string().contains(words), "{text}: {e}");
    }
}

#[test]
fn actions_read_and_write_as_lowercase_words() {
    assert_eq!("allow".parse::<Action>(), Ok(Action::Allow));
    assert_eq!(" deny ".parse::<Action>(), Ok(Action::Deny));
    assert_eq!(
        "Allow".parse::<Action>().unwrap_err(),
        "\"Allow\" is not allow or deny"
    );
    assert_eq!(Action::Deny.to_string(), "deny");
}
