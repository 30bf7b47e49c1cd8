use std::time::Duration;

use http::HeaderValue;
use mesh_runtime::pki::{Ca, LocalKey, SpiffeId, TrustDomain};

use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn td() -> TrustDomain {
    TrustDomain::new("mesh.test").unwrap()
}

/// A key and the CA's certificate for `id`, in PEM.
fn issue(ca: &Ca, id: &SpiffeId) -> (String, String) {
    let key = LocalKey::generate().unwrap();
    let cert = ca
        .sign(&key.csr_pem(id).unwrap(), id, Duration::from_secs(3600))
        .unwrap();
    (key.to_pem(), cert)
}

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A `tls_dir` for node `n1` with `services`, and its CA.
fn tls_dir(services: &[&str]) -> (tempfile::TempDir, Ca) {
    let ca = Ca::self_signed(td(), DAY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), CA_FILE, ca.cert_pem());
    let (key, cert) = issue(&ca, &SpiffeId::node(&td(), "n1").unwrap());
    write(dir.path(), NODE_KEY, &key);
    write(dir.path(), NODE_CERT, &cert);
    for s in services {
        let (key, cert) = issue(&ca, &SpiffeId::service(&td(), s).unwrap());
        write(dir.path(), &format!("svc/{s}.key"), &key);
        write(dir.path(), &format!("svc/{s}.crt"), &cert);
    }
    (dir, ca)
}

fn config(dir: &Path) -> TlsConfig {
    TlsConfig {
        dir: dir.to_owned(),
        trust_domain: None,
    }
}

#[test]
fn the_trust_domain_comes_from_the_ca_unless_configured() {
    let (dir, _ca) = tls_dir(&[]);
    let tls = MeshTls::load(&config(dir.path()), "n1").unwrap();
    assert_eq!(tls.trust_domain().as_str(), "mesh.test");
    assert_eq!(tls.node().id().to_string(), "spiffe://mesh.test/node/n1");

    // Configured otherwise: the node's certificate is for another domain.
    let other = TlsConfig {
        trust_domain: Some(TrustDomain::new("other.test").unwrap()),
        ..config(dir.path())
    };
    let e = MeshTls::load(&other, "n1").unwrap_err().to_string();
    assert!(e.starts_with("tls_dir: ") && e.contains("node.crt"), "{e}");
}

#[test]
fn missing_or_foreign_credentials_say_which_file() {
    let (dir, _ca) = tls_dir(&[]);
    // Another node's certificate.
    let e = MeshTls::load(&config(dir.path()), "n2")
        .unwrap_err()
        .to_string();
    assert!(e.contains("node.crt") && e.contains("node/n1"), "{e}");
    std::fs::remove_file(dir.path().join(CA_FILE)).unwrap();
    let e = MeshTls::load(&config(dir.path()), "n1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca.crt") && e.contains("missing"), "{e}");
}

#[test]
fn the_source_is_the_named_service_the_only_one_or_the_node() {
    let (dir, ca) = tls_dir(&["web"]);
    let tls = MeshTls::load(&config(dir.path()), "n1").unwrap();
    let named = |v: &'static str| {
        tls.source(Some(&HeaderValue::from_static(v)))
            .id()
            .to_string()
    };
    assert_eq!(
        tls.source(None).id().to_string(),
        "spiffe://mesh.test/svc/web"
    );
    assert_eq!(named("nope"), "spiffe://mesh.test/svc/web");

    // A second service: unnamed requests speak for the node.
    let (key, cert) = issue(&ca, &SpiffeId::service(&td(), "billing").unwrap());
    write(dir.path(), "svc/billing.key", &key);
    write(dir.path(), "svc/billing.crt", &cert);
    assert_eq!(tls.reload(), (1, 0));
    assert_eq!(
        tls.source(None).id().to_string(),
        "spiffe://mesh.test/node/n1"
    );
    assert_eq!(named("billing"), "spiffe://mesh.test/svc/billing");
    assert_eq!(named("WEB"), "spiffe://mesh.test/svc/web");
    assert_eq!(named("nope"), "spiffe://mesh.test/node/n1");

    // Removed: gone from the sources.
    std::fs::remove_file(dir.path().join("svc/billing.crt")).unwrap();
    assert_eq!(tls.reload(), (1, 0));
    assert!(tls.service("billing").is_none());
    assert_eq!(named("billing"), "spiffe://mesh.test/svc/web");
}

#[test]
fn a_half_written_pair_is_never_used_and_the_whole_one_is() {
    let (dir, ca) = tls_dir(&["web"]);
    let tls = MeshTls::load(&config(dir.path()), "n1").unwrap();
    let web = tls.service("web").unwrap();
    let before = web.serial();
    assert_eq!(tls.reload(), (0, 0), "nothing changed");

    let (key, cert) = issue(&ca, &SpiffeId::service(&td(), "web").unwrap());
    write(dir.path(), "svc/web.key", &key);
    assert_eq!(
        tls.reload(),
        (0, 1),
        "the new key does not match the old certificate"
    );
    assert_eq!(tls.reload(), (0, 0), "refused once, not at every read");
    assert_eq!(web.serial(), before);

    write(dir.path(), "svc/web.crt", &cert);
    assert_eq!(tls.reload(), (1, 0));
    assert_ne!(web.serial(), before);
    assert!(
        Arc::ptr_eq(&web, &tls.service("web").unwrap()),
        "rotated in place"
    );

    // The node's pair too.
    let node_before = tls.node().serial();
    let (key, cert) = issue(&ca, &SpiffeId::node(&td(), "n1").unwrap());
    write(dir.path(), NODE_KEY, &key);
    write(dir.path(), NODE_CERT, &cert);
    assert_eq!(tls.reload(), (1, 0));
    assert_ne!(tls.node().serial(), node_before);

    // A broken bundle keeps the current one.
    write(dir.path(), CA_FILE, "not a certificate");
    assert_eq!(tls.reload(), (0, 1));
    let both = format!(
        "{}{}",
        ca.cert_pem(),
        Ca::self_signed(td(), DAY).unwrap().cert_pem()
    );
    write(dir.path(), CA_FILE, &both);
    assert_eq!(tls.reload(), (1, 0));
}

#[test]
fn a_mesh_component_beside_the_only_service_does_not_take_its_place() {
    let (dir, _ca) = tls_dir(&["mesh-control", "web"]);
    let tls = MeshTls::load(&config(dir.path()), "n1").unwrap();
    assert_eq!(
        tls.source(None).id().to_string(),
        "spiffe://mesh.test/svc/web"
    );
    // Named, a component still speaks.
    assert_eq!(
        tls.source(Some(&HeaderValue::from_static("mesh-control")))
            .id()
            .to_string(),
        "spiffe://mesh.test/svc/mesh-control"
    );
    // A component alone: the node speaks.
    let (dir, _ca) = tls_dir(&["mesh-control"]);
    let tls = MeshTls::load(&config(dir.path()), "n1").unwrap();
    assert_eq!(
        tls.source(None).id().to_string(),
        "spiffe://mesh.test/node/n1"
    );
}

/// At a node's first start the bridge may not have written the
/// credentials yet: the proxy waits for all three files, then loads them.
#[tokio::test(start_paused = true)]
async fn a_proxy_waits_for_credentials_that_are_not_there_yet() {
    let (full, _ca) = tls_dir(&[]);
    let empty = tempfile::tempdir().unwrap();
    let cfg = config(empty.path());
    let loading = tokio::spawn(async move { MeshTls::load_when_present(&cfg, "n1").await });
    // Five looks at the folder (virtual time): still waiting, also with
    // the bundle and the key there but not the certificate.
    tokio::time::sleep(POLL * 5).await;
    assert!(!loading.is_finished(), "loaded from an empty folder");
    for file in [CA_FILE, NODE_KEY] {
        std::fs::copy(full.path().join(file), empty.path().join(file)).unwrap();
    }
    tokio::time::sleep(POLL * 5).await;
    assert!(
        !loading.is_finished(),
        "loaded without the node's certificate"
    );
    std::fs::copy(full.path().join(NODE_CERT), empty.path().join(NODE_CERT)).unwrap();
    let tls = tokio::time::timeout(POLL * 3, loading)
        .await
        .expect("still waiting with every file there")
        .unwrap()
        .unwrap();
    assert_eq!(tls.node().id().to_string(), "spiffe://mesh.test/node/n1");
}

/// Files that are there but do not load are an error at once, not a wait.
#[tokio::test(start_paused = true)]
async fn credentials_that_are_there_but_bad_fail_at_once() {
    let (dir, _ca) = tls_dir(&[]);
    write(dir.path(), NODE_CERT, "not a certificate");
    let e = tokio::time::timeout(POLL, MeshTls::load_when_present(&config(dir.path()), "n1"))
        .await
        .expect("waited for a file that is there")
        .expect_err("loaded a bad certificate")
        .to_string();
    assert!(e.contains("node.crt"), "{e}");
}
