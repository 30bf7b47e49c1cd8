use super::*;

fn set(json: serde_json::Value) -> pb::Intentions {
    pb::Intentions {
        revision: 0,
        json: json.to_string(),
    }
}

fn at(revision: u64, json: serde_json::Value) -> pb::Intentions {
    pb::Intentions {
        revision,
        ..set(json)
    }
}

fn web_to_orders() -> serde_json::Value {
    serde_json::json!({"default": "deny", "list": [
        {"source": "web", "destination": "orders", "action": "allow",
         "http": [{"path_prefix": "/", "action": "allow"},
                  {"path_prefix": "/admin/", "action": "deny"}]},
        {"source": "*", "destination": "orders", "action": "deny"}
    ]})
}

#[test]
fn without_intentions_everything_is_denied() {
    let registry = Registry::new();
    let enforcer = Enforcer::new(&registry);
    let denied = enforcer
        .authorize(Some("web"), "orders", "GET", "/")
        .unwrap_err();
    assert!(matches!(denied, Denied::NoIntentions { .. }));
    assert_eq!(
        denied.to_string(),
        "intentions: web -> orders refused: no intentions received from the bridge yet, and none saved (deny until they are)"
    );
    assert!(enforcer.view().revision.is_none());
    let text = registry.render();
    assert!(
        text.contains(
            r#"mesh_proxy_intention_decisions_total{decision="deny",source="web",destination="orders"} 1"#
        ),
        "{text}"
    );
}

#[test]
fn decisions_follow_the_set_and_are_counted() {
    let registry = Registry::new();
    let enforcer = Enforcer::new(&registry);
    enforcer.offer(at(12, web_to_orders()));
    assert_eq!(
        enforcer.authorize(Some("web"), "orders", "GET", "/x"),
        Ok(())
    );
    let rule = enforcer
        .authorize(Some("web"), "orders", "GET", "/admin/users")
        .unwrap_err();
    assert_eq!(
        rule.to_string(),
        "intentions: web -> orders refused: deny by intention web -> orders, http[1]"
    );
    let service = enforcer
        .authorize(Some("api"), "orders", "GET", "/x")
        .unwrap_err();
    assert_eq!(
        service.to_string(),
        "intentions: api -> orders refused: deny by intention * -> orders"
    );
    let node = enforcer.authorize(None, "orders", "GET", "/").unwrap_err();
    assert!(
        node.to_string()
            .starts_with("intentions: (no service identity) -> orders refused"),
        "{node}"
    );
    assert_eq!(enforcer.view().revision, Some(12));
    let text = registry.render();
    for line in [
        r#"mesh_proxy_intention_decisions_total{decision="allow",source="web",destination="orders"} 1"#,
        r#"mesh_proxy_intention_decisions_total{decision="deny",source="web",destination="orders"} 1"#,
        r#"mesh_proxy_intention_decisions_total{decision="deny",source="api",destination="orders"} 1"#,
        r#"mesh_proxy_intention_decisions_total{decision="deny",source="-",destination="orders"} 1"#,
        "mesh_proxy_intentions_revision 12",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
}

#[test]
fn a_set_that_does_not_read_keeps_the_last_one() {
    let enforcer = Enforcer::new(&Registry::new());
    enforcer.offer(at(3, serde_json::json!({"default": "allow"})));
    enforcer.offer(at(4, serde_json::json!({"default": "maybe"})));
    let bad_rule = serde_json::json!({"default": "allow", "list": [
        {"source": "web", "destination": "orders", "action": "deny",
         "http": [{"path_prefix": "/", "action": "allow"}]}]});
    enforcer.offer(at(5, bad_rule));
    assert_eq!(enforcer.view().revision, Some(3));
    assert_eq!(
        enforcer.authorize(Some("web"), "orders", "GET", "/"),
        Ok(())
    );
}

#[test]
fn the_file_round_trips_and_a_bad_one_is_refused_whole() {
    let loaded = Loaded {
        revision: 9,
        received_at_unix_ms: 1_700_000_000_000,
        intentions: serde_json::from_value(web_to_orders()).unwrap(),
    };
    let bytes = loaded.encode();
    assert!(bytes.starts_with(b"meshwork-intentions v1 sha256="));
    assert_eq!(Loaded::decode(&bytes).unwrap(), loaded);
    let e = Loaded::decode(&bytes[..bytes.len() - 4]).unwrap_err();
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    let e = Loaded::decode(b"meshwork-dump v1 sha256=00\n{}").unwrap_err();
    assert!(
        e.to_string().contains("not a meshwork-intentions v1 file"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    assert!(Loaded::load(&dir.path().join(FILE_NAME)).unwrap().is_none());
}

#[tokio::test]
async fn a_saved_set_is_enforced_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let (trigger, shutdown) = mesh_runtime::shutdown::channel();
    let enforcer = Arc::new(Enforcer::new(&Registry::new()));
    let writer = tokio::spawn(enforcer.run_writer(path.clone(), shutdown));
    enforcer.offer(at(21, web_to_orders()));
    trigger.trigger();
    writer.await.unwrap();

    let restarted = Enforcer::new(&Registry::new());
    restarted.load(&path);
    assert_eq!(restarted.view().revision, Some(21));
    assert_eq!(
        restarted.authorize(Some("web"), "orders", "GET", "/"),
        Ok(())
    );
    assert!(
        restarted
            .authorize(Some("api"), "orders", "GET", "/")
            .is_err()
    );

    std::fs::write(&path, b"garbage").unwrap();
    let refused = Enforcer::new(&Registry::new());
    refused.load(&path);
    assert!(
        refused
            .authorize(Some("web"), "orders", "GET", "/")
            .is_err()
    );
}
