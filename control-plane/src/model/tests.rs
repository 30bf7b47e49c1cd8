use super::*;

fn catalog() -> Catalog {
    Catalog {
        nodes: ["n1".to_owned(), "n2".to_owned()].into(),
        services: [
            "orders".to_owned(),
            "users".to_owned(),
            "Billing".to_owned(),
        ]
        .into(),
    }
}

fn file(text: &str) -> BTreeMap<String, RouteSpec> {
    RouteFile::parse(Path::new("routes.toml"), text)
        .unwrap_or_else(|e| panic!("{e}"))
        .routes
}

/// The fields named by validating `text`, or nothing when it is valid.
fn problems(text: &str) -> Vec<String> {
    match validate(&file(text), &catalog()) {
        Ok(_) => Vec::new(),
        Err(Invalid(errors)) => errors.into_iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn a_good_route_file_becomes_typed_routes() {
    let routes = validate(
        &file(
            r#"
            [routes.orders]
            timeout = "2s"
            per_try_timeout = "500ms"
            retries = 3
            lb = "round-robin"
            weights = { v1 = 90, v2 = 10 }

            [routes.users]
            lb = "consistent-hash"
            hash_header = "X-User"

            [routes.Billing]
            "#,
        ),
        &catalog(),
    )
    .unwrap();
    let orders = &routes["orders"];
    assert_eq!(orders.timeout, Some(HumanDuration(Duration::from_secs(2))));
    assert_eq!(
        orders.per_try_timeout,
        Some(HumanDuration(Duration::from_millis(500)))
    );
    assert_eq!(orders.retries, Some(3));
    assert_eq!(orders.lb, Some(Lb::RoundRobin));
    assert_eq!(orders.weights["v2"], 10);
    assert_eq!(routes["users"].hash_header.as_deref(), Some("x-user"));
    assert_eq!(routes["Billing"], Route::default());
    // What is stored reads back as it was written.
    assert_eq!(orders.to_spec().timeout.as_deref(), Some("2s"));
    let json = serde_json::to_string(&routes).unwrap();
    assert_eq!(serde_json::from_str::<Routes>(&json).unwrap(), routes);
}

#[test]
fn every_problem_is_named_by_its_field() {
    for (text, field, words) in [
        ("[routes.ghost]", "routes.ghost", "not in Consul's catalog"),
        ("[routes.v1]", "routes.v1", "reserved"),
        ("[routes.\"bad name\"]", "routes.bad name", "use letters"),
        (
            "[routes.orders]\ntimeout = \"-1s\"",
            "routes.orders.timeout",
            "negative",
        ),
        (
            "[routes.orders]\ntimeout = \"0s\"",
            "routes.orders.timeout",
            "zero",
        ),
        (
            "[routes.orders]\ntimeout = \"soon\"",
            "routes.orders.timeout",
            "invalid duration",
        ),
        (
            "[routes.orders]\ntimeout = \"2h\"",
            "routes.orders.timeout",
            "longer than",
        ),
        (
            "[routes.orders]\nper_try_timeout = \"0ms\"",
            "routes.orders.per_try_timeout",
            "zero",
        ),
        (
            "[routes.orders]\ntimeout = \"1s\"\nper_try_timeout = \"2s\"",
            "routes.orders.per_try_timeout",
            "longer than the whole request's timeout (1s)",
        ),
        (
            "[routes.orders]\nretries = 11",
            "routes.orders.retries",
            "more than the most allowed, 10",
        ),
        (
            "[routes.orders]\nretries = -1",
            "routes.orders.retries",
            "negative",
        ),
        (
            "[routes.orders]\nlb = \"random\"",
            "routes.orders.lb",
            "unknown load-balancing algorithm \"random\"",
        ),
        (
            "[routes.orders]\nweights = { v1 = 90, v2 = 20 }",
            "routes.orders.weights",
            "add up to 110, not 100",
        ),
        (
            "[routes.orders]\nweights = { v1 = -10, v2 = 110 }",
            "routes.orders.weights.v1",
            "negative",
        ),
        (
            "[routes.orders]\nweights = { \" \" = 100 }",
            "routes.orders.weights",
            "not a version or tag",
        ),
        (
            "[routes.orders]\nlb = \"consistent-hash\"",
            "routes.orders.lb",
            "needs hash_header or hash_cookie",
        ),
        (
            "[routes.orders]\nhash_header = \"x-user\"",
            "routes.orders.hash_header",
            "only with",
        ),
        (
            "[routes.orders]\nlb = \"consistent-hash\"\nhash_cookie = \"a;b\"",
            "routes.orders.hash_cookie",
            "not a cookie name",
        ),
        (
            "[routes.orders]\nlb = \"consistent-hash\"\nhash_header = \"a\"\nhash_cookie = \"b\"",
            "routes.orders.hash_cookie",
            "not both",
        ),
    ] {
        let found = problems(text);
        assert_eq!(found.len(), 1, "{text}: {found:?}");
        assert!(
            found[0].starts_with(&format!("{field}: ")) && found[0].contains(words),
            "{text}: {found:?}"
        );
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let found = problems(
        "[routes.orders]\ntimeout = \"0s\"\nretries = 99\n[routes.ghost]\n[routes.users]\nlb = \"x\"\n",
    );
    assert_eq!(found.len(), 4, "{found:?}");
    let text = Invalid(
        validate(
            &file("[routes.ghost]\n[routes.orders]\nretries = 99"),
            &catalog(),
        )
        .unwrap_err()
        .0,
    )
    .to_string();
    assert!(!text.contains('\n') && text.contains("; "), "{text}");
}

#[test]
fn names_that_differ_only_in_case_are_one_service() {
    let mut catalog = catalog();
    catalog.services.insert("ORDERS".into());
    let found = match validate(&file("[routes.orders]\n[routes.ORDERS]\n"), &catalog) {
        Err(Invalid(e)) => e,
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].message.contains("ignore case"), "{found:?}");
}

#[test]
fn a_malformed_route_file_names_the_line() {
    for (text, words) in [
        ("[routes.orders]\ntimeout = 2s\n", "line 2 (timeout = 2s)"),
        ("[routes.orders]\nlbb = \"round-robin\"\n", "lbb"),
        ("[route.orders]\n", "route"),
        ("[routes.orders]\nretries = \"three\"\n", "line 2"),
    ] {
        let e = RouteFile::parse(Path::new("r.toml"), text).unwrap_err();
        assert!(
            e.starts_with("route file r.toml: ") && e.contains(words),
            "{text}: {e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
    let e = RouteFile::parse(
        Path::new("r.json"),
        "{\"routes\": {\"orders\": {\"retries\": }}}",
    )
    .unwrap_err();
    assert!(e.starts_with("route file r.json: line 1 column"), "{e}");
    let json = RouteFile::parse(
        Path::new("r.json"),
        r#"{"routes": {"orders": {"timeout": "2s"}}}"#,
    )
    .unwrap();
    assert_eq!(json.routes["orders"].timeout.as_deref(), Some("2s"));
}

#[test]
fn node_names_that_cannot_be_a_key_are_refused() {
    assert!(check_node_name("n1").is_ok());
    assert!(check_node_name("web-01.dc1").is_ok());
    for bad in ["", " ", "a/b", "..", "a\\b"] {
        assert!(check_node_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn times_print_as_rfc3339_utc() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339(951_782_400_250), "2000-02-29T00:00:00.250Z");
    assert_eq!(rfc3339(1_719_835_199_999), "2024-07-01T11:59:59.999Z");
}
