//! The client against a real Consul dev agent: what the bridge relies on.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use consul_client::{
    AgentCheckRegistration, AgentServiceCheck, AgentServiceRegistration, Client, ClientConfig,
    KvTxnOp, KvTxnOutcome, QueryOptions, SessionRequest, TlsFiles,
    testing::{DevAgent, Ports, free_port},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

const DEADLINE: Duration = Duration::from_secs(15);

fn client(agent: &DevAgent) -> Client {
    Client::new(&ClientConfig::new([agent.addr()])).expect("a dev agent address is valid")
}

/// Blocks on the passing instances of `name` until `pred` holds.
async fn wait_passing(c: &Client, name: &str, pred: impl Fn(&[String]) -> bool) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    let mut index = 0;
    while Instant::now() < deadline {
        let opts = QueryOptions::blocking(index, Duration::from_secs(2));
        let r = c.health_service(name, true, opts).await?;
        let ids: Vec<String> = r.value.iter().map(|e| e.service.id.clone()).collect();
        if pred(&ids) {
            return Ok(());
        }
        index = r.index;
    }
    bail!("{name}: condition not met within {DEADLINE:?}")
}

#[tokio::test]
async fn register_becomes_passing_then_deregister_removes_it() -> Result<()> {
    let agent = DevAgent::start().await;
    let c = client(&agent);
    // A TCP check against a port we hold open: passing once Consul runs it.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = target.local_addr()?.port();
    let reg = AgentServiceRegistration {
        id: Some("web-1".into()),
        name: "web".into(),
        address: Some("127.0.0.1".into()),
        port: Some(port),
        tags: vec!["v1".into()],
        meta: [("version".to_owned(), "1".to_owned())].into(),
        check: Some(AgentServiceCheck {
            tcp: Some(format!("127.0.0.1:{port}")),
            interval: Some("1s".into()),
            timeout: Some("1s".into()),
            deregister_critical_service_after: Some("1m".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    c.agent_service_register(&reg).await?;
    wait_passing(&c, "web", |ids| ids == ["web-1"]).await?;

    let local = c.agent_services().await?;
    let svc = local.get("web-1").context("web-1 on the agent")?;
    assert_eq!((svc.service.as_str(), svc.port), ("web", u32::from(port)));
    assert_eq!(svc.meta.get("version").map(String::as_str), Some("1"));
    let catalog = c.catalog_services(QueryOptions::default()).await?;
    assert_eq!(catalog.value.get("web"), Some(&vec!["v1".to_owned()]));
    assert!(catalog.index > 0 && catalog.known_leader);

    c.agent_service_deregister("web-1").await?;
    wait_passing(&c, "web", <[String]>::is_empty).await?;
    Ok(())
}

#[tokio::test]
async fn consul_refuses_a_bad_check_with_a_callers_fault() -> Result<()> {
    let agent = DevAgent::start().await;
    let reg = AgentServiceRegistration {
        name: "web".into(),
        check: Some(AgentServiceCheck {
            interval: Some("1s".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = client(&agent)
        .agent_service_register(&reg)
        .await
        .unwrap_err();
    assert!(e.is_caller_fault(), "{e}");
    assert!(e.message().contains("TTL"), "{e}");
    Ok(())
}

#[tokio::test]
async fn kv_check_and_set_and_session_lock() -> Result<()> {
    let agent = DevAgent::start().await;
    let c = client(&agent);
    let key = "mesh/test/config";
    assert!(c.kv_put(key, b"v1", Some(0)).await?);
    assert!(
        !c.kv_put(key, b"again", Some(0)).await?,
        "cas=0 on an existing key"
    );
    let got = c
        .kv_get(key, QueryOptions::default())
        .await?
        .value
        .context("key")?;
    assert_eq!(got.value, b"v1");
    assert!(
        !c.kv_put(key, b"stale", Some(got.modify_index + 100))
            .await?
    );
    assert!(c.kv_put(key, b"v2", Some(got.modify_index)).await?);

    let session = c
        .session_create(&SessionRequest {
            name: Some("test".into()),
            ttl: Some("15s".into()),
            ..Default::default()
        })
        .await?;
    assert!(c.kv_acquire("mesh/test/lock", b"me", &session).await?);
    let lock = c.kv_get("mesh/test/lock", QueryOptions::default()).await?;
    assert_eq!(
        lock.value.context("lock")?.session.as_deref(),
        Some(&*session)
    );
    assert!(c.session_renew(&session).await?);
    assert!(c.kv_release("mesh/test/lock", &session).await?);
    c.session_destroy(&session).await?;
    assert!(
        !c.session_renew(&session).await?,
        "destroyed session renews"
    );
    assert!(c.kv_delete(key, None).await?);
    assert!(
        c.kv_get(key, QueryOptions::default())
            .await?
            .value
            .is_none()
    );
    Ok(())
}

/// Blocks on `key` until no session holds it; returns the lock's index.
async fn wait_lock_free(c: &Client, key: &str) -> Result<u64> {
    let deadline = Instant::now() + DEADLINE;
    let mut index = 0;
    while Instant::now() < deadline {
        let r = c
            .kv_get(key, QueryOptions::blocking(index, Duration::from_secs(2)))
            .await?;
        match r.value {
            Some(pair) if pair.session.is_some() => index = r.index,
            _ => return Ok(r.index),
        }
    }
    bail!("{key}: still locked after {DEADLINE:?}")
}

#[tokio::test]
async fn a_session_bound_to_a_ttl_check_holds_while_passed_and_releases_when_not() -> Result<()> {
    let agent = DevAgent::start().await;
    let c = client(&agent);
    let check = AgentCheckRegistration {
        id: Some("alive-1".into()),
        name: "alive".into(),
        notes: Some("passed by the test".into()),
        ttl: Some("1s".into()),
        status: Some("passing".into()),
        ..Default::default()
    };
    c.agent_check_register(&check).await?;
    let checks = c.agent_checks().await?;
    let registered = checks.get("alive-1").context("alive-1 on the agent")?;
    assert_eq!(registered.status, "passing");
    assert!(registered.service_id.is_empty(), "a node check");

    // Consul refuses a session bound to a check it does not know.
    let e = c
        .session_create(&SessionRequest {
            checks: vec!["serfHealth".into(), "ghost".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("ghost"), "{e}");
    // Passing a check the agent does not know is an error too.
    assert!(c.agent_check_pass("ghost").await.is_err());

    let key = "mesh/test/alive";
    let session = c
        .session_create(&SessionRequest {
            name: Some("alive".into()),
            behavior: Some("release".into()),
            lock_delay: Some("1s".into()),
            checks: vec!["serfHealth".into(), "alive-1".into()],
            ..Default::default()
        })
        .await?;
    assert!(c.kv_acquire(key, b"me", &session).await?);

    // Passed well within its TTL, the check keeps the session (and the
    // lock) across several TTLs.
    for _ in 0..12 {
        c.agent_check_pass("alive-1").await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let held = c.kv_get(key, QueryOptions::default()).await?.value;
    assert_eq!(
        held.context("lock")?.session.as_deref(),
        Some(&*session),
        "a passed check lost its session"
    );

    // No longer passed: the check goes critical, the session is
    // invalidated and the lock released.
    wait_lock_free(&c, key).await?;
    let checks = c.agent_checks().await?;
    assert_eq!(checks["alive-1"].status, "critical");
    assert!(!c.session_renew(&session).await?, "the session is gone");

    // A critical check cannot back a new session until it passes again.
    let bound = SessionRequest {
        checks: vec!["serfHealth".into(), "alive-1".into()],
        ..Default::default()
    };
    let e = c.session_create(&bound).await.unwrap_err();
    assert!(e.message().contains("critical"), "{e}");
    c.agent_check_pass("alive-1").await?;
    let again = c.session_create(&bound).await?;

    // Deregistering the check invalidates the session bound to it.
    c.agent_check_deregister("alive-1").await?;
    assert!(!c.agent_checks().await?.contains_key("alive-1"));
    assert!(
        !c.session_renew(&again).await?,
        "the session outlived its check"
    );
    Ok(())
}

#[tokio::test]
async fn kv_list_returns_a_prefix_in_key_order_and_catalog_nodes_the_agent() -> Result<()> {
    let agent = DevAgent::start().await;
    let c = client(&agent);
    let empty = c
        .kv_list("mesh/versions/n1/", QueryOptions::default())
        .await?;
    assert!(empty.value.is_empty(), "{:?}", empty.value);
    for (key, value) in [
        ("mesh/versions/n1/2", "b"),
        ("mesh/versions/n1/1", "a"),
        ("mesh/versions/n10/1", "other node"),
    ] {
        assert!(c.kv_put(key, value.as_bytes(), Some(0)).await?);
    }
    let listed = c
        .kv_list("mesh/versions/n1/", QueryOptions::default())
        .await?;
    let got: Vec<(&str, &[u8])> = listed
        .value
        .iter()
        .map(|p| (p.key.as_str(), p.value.as_slice()))
        .collect();
    assert_eq!(
        got,
        [
            ("mesh/versions/n1/1", &b"a"[..]),
            ("mesh/versions/n1/2", &b"b"[..])
        ]
    );
    assert!(listed.value.iter().all(|p| p.modify_index > 0));

    let nodes = c.catalog_nodes(QueryOptions::default()).await?;
    assert_eq!(nodes.value.len(), 1, "{:?}", nodes.value);
    assert_eq!(nodes.value[0].address, "127.0.0.1");
    assert!(!nodes.value[0].node.is_empty());
    Ok(())
}

#[tokio::test]
async fn kv_txn_applies_every_operation_or_none() -> Result<()> {
    let agent = DevAgent::start().await;
    let c = client(&agent);
    let cas = |key: &str, value: &str, index: u64| KvTxnOp::Cas {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        index,
    };
    let outcome = c
        .kv_txn(&[cas("mesh/t/head", "1", 0), cas("mesh/t/v/1", "one", 0)])
        .await?;
    let KvTxnOutcome::Committed(written) = outcome else {
        bail!("not committed: {outcome:?}");
    };
    assert_eq!(written.len(), 2);
    assert_eq!(written[0].0, "mesh/t/head");
    let head = c.kv_get("mesh/t/head", QueryOptions::default()).await?;
    let head_index = head.value.context("head")?.modify_index;
    assert_eq!(written[0].1, head_index);

    // A stale index on the first operation: the second is not applied.
    let outcome = c
        .kv_txn(&[
            cas("mesh/t/head", "2", head_index + 1000),
            cas("mesh/t/v/2", "two", 0),
        ])
        .await?;
    let KvTxnOutcome::RolledBack(errors) = outcome else {
        bail!("not rolled back: {outcome:?}");
    };
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, 0, "{errors:?}");
    assert!(
        c.kv_get("mesh/t/v/2", QueryOptions::default())
            .await?
            .value
            .is_none(),
        "a rolled-back transaction wrote"
    );
    // An existing key refuses a create (index 0); check-index guards a read.
    let outcome = c
        .kv_txn(&[
            KvTxnOp::CheckIndex {
                key: "mesh/t/head".into(),
                index: head_index,
            },
            cas("mesh/t/v/1", "again", 0),
        ])
        .await?;
    assert!(
        matches!(&outcome, KvTxnOutcome::RolledBack(e) if e[0].0 == 1),
        "{outcome:?}"
    );
    Ok(())
}

#[tokio::test]
async fn client_certificate_tls_to_an_agent_that_verifies_clients() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let files = write_pki(dir.path())?;
    let https = free_port();
    let hcl = format!(
        "ports {{ https = {https} }} ca_file = \"{ca}\" cert_file = \"{cert}\" \
         key_file = \"{key}\" verify_incoming_https = true",
        ca = files.ca.display(),
        cert = dir.path().join("server.pem").display(),
        key = dir.path().join("server-key.pem").display(),
    );
    let _agent = DevAgent::start_with(Ports::free(), vec![hcl]).await;
    let addr = format!("https://127.0.0.1:{https}");

    let mut config = ClientConfig::new([addr.clone()]);
    config.tls = Some(files.clone());
    config.token = Some("anything".into());
    let leader = Client::new(&config)?.status_leader().await?;
    assert!(!leader.is_empty());

    let mut no_cert = ClientConfig::new([addr]);
    no_cert.tls = Some(TlsFiles {
        cert: None,
        key: None,
        ..files
    });
    let refused = Client::new(&no_cert)?.status_leader().await;
    assert!(
        refused.is_err(),
        "an agent verifying clients answered without a client cert"
    );
    Ok(())
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate.
fn write_pki(dir: &Path) -> Result<TlsFiles> {
    let mut ca_params = CertificateParams::new(Vec::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    let leaf = |name: &str, sans: Vec<String>, eku: Vec<ExtendedKeyUsagePurpose>| -> Result<()> {
        let mut params = CertificateParams::new(sans)?;
        params.extended_key_usages = eku;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem())?;
        Ok(())
    };
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let server_sans = vec![
        "127.0.0.1".into(),
        "localhost".into(),
        "server.dc1.consul".into(),
    ];
    leaf("server", server_sans, vec![ServerAuth, ClientAuth])?;
    leaf("client", vec!["client.dc1.consul".into()], vec![ClientAuth])?;
    Ok(TlsFiles {
        ca: dir.join("ca.pem"),
        cert: Some(dir.join("client.pem")),
        key: Some(dir.join("client-key.pem")),
    })
}
