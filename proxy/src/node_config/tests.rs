use std::time::Duration;

use mesh_runtime::metrics::Registry;
use sha2::{Digest, Sha256};

use super::*;

/// Layers over a local config with `local_toml`'s tables, in `dir`; the
/// policies they set land in the returned cell.
fn layers(dir: &Path, local_toml: &str) -> (Layers, Arc<Mutex<Option<Policies>>>) {
    let local = local_config(dir, local_toml);
    let cell = Arc::new(Mutex::new(None));
    let sink = cell.clone();
    let metrics = Arc::new(ProxyMetrics::new(&Registry::new()));
    let layers = Layers::new(
        Box::new(move |p| *sink.lock().unwrap() = Some(p)),
        &local,
        metrics,
    );
    (layers, cell)
}

fn local_config(dir: &Path, toml_text: &str) -> Config {
    let table: toml::Table = toml::from_str(toml_text).unwrap();
    let mut args: Args = serde_json::from_value(serde_json::to_value(table).unwrap()).unwrap();
    args.node = Some("n1".into());
    args.data_dir = Some(dir.to_owned());
    args.validate().unwrap()
}

fn config(version: u64, text: &str) -> pb::NodeConfig {
    pb::NodeConfig {
        version,
        text: text.into(),
        sha256: hex::encode(Sha256::digest(text.as_bytes())),
    }
}

fn policies(cell: &Mutex<Option<Policies>>) -> Policies {
    cell.lock().unwrap().clone().expect("policies were set")
}

const V1: &str = "# mesh-proxy config for node n1, config version 1.\n\n\
                  services = [\"web\"]\n\n[default_route]\nretries = 4\n\n\
                  [routes.web]\ntimeout = \"2s\"\n";

#[test]
fn a_good_config_takes_effect_over_the_local_file_and_is_saved() {
    let dir = tempfile::tempdir().unwrap();
    let (layers, cell) = layers(
        dir.path(),
        "[routes.web]\nretries = 1\n[routes.api]\ntimeout = \"3s\"\n",
    );
    layers.offer(config(1, V1));
    let p = policies(&cell);
    // web: mesh-control's table whole, over its default route.
    assert_eq!(p.get("web").timeout, Duration::from_secs(2));
    assert_eq!(p.get("web").retries, 4);
    // api: the file's table, over mesh-control's default route.
    assert_eq!(p.get("api").timeout, Duration::from_secs(3));
    assert_eq!(p.get("api").retries, 4);
    let status = layers.status().borrow().clone();
    assert_eq!((status.version, status.source), (1, "bridge"));
    assert_eq!(status.refused, None);
    assert_eq!(
        status.routes,
        [("api".to_owned(), "file"), ("web".to_owned(), "control")].into()
    );
    let saved = read_saved(&dir.path().join(FILE_NAME)).unwrap().unwrap();
    assert_eq!(saved.version, 1);
    assert_eq!(saved.text, V1);
}

#[test]
fn a_bad_config_is_refused_by_name_and_the_last_good_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (layers, cell) = layers(dir.path(), "");
    layers.offer(config(1, V1));
    for (text, words) in [
        (
            "[routes.web]\nretries = 11\n",
            "routes.web.retries: 11 is more than 10",
        ),
        ("[routes.web]\ntimeout = 2s\n", "line 2:"),
        (
            "listen = \"0.0.0.0:1\"\n",
            "listen: cannot be applied while the proxy runs",
        ),
        ("[routes.web]\nlbb = \"x\"\n", "lbb"),
        ("[routes.\"v1\"]\nretries = 1\n", "routes.v1"),
    ] {
        layers.offer(config(2, text));
        let status = layers.status().borrow().clone();
        assert_eq!(status.version, 1, "{text}");
        let refused = status.refused.expect("refused");
        assert_eq!(refused.version, 2);
        assert!(refused.reason.contains(words), "{text}: {}", refused.reason);
        assert!(!refused.reason.contains('\n'), "{}", refused.reason);
        assert_eq!(policies(&cell).get("web").timeout, Duration::from_secs(2));
    }
    let mut tampered = config(3, V1);
    tampered.text.push_str("[routes.api]\n");
    layers.offer(tampered);
    let refused = layers.status().borrow().refused.clone().unwrap();
    assert!(refused.reason.starts_with("sha256:"), "{}", refused.reason);
    assert_eq!(
        read_saved(&dir.path().join(FILE_NAME))
            .unwrap()
            .unwrap()
            .version,
        1,
        "the saved config is the last good one"
    );

    // A good version after a refusal takes effect and clears it.
    layers.offer(config(4, "[routes.web]\ntimeout = \"1s\"\n"));
    let status = layers.status().borrow().clone();
    assert_eq!((status.version, status.refused), (4, None));
    assert_eq!(policies(&cell).get("web").timeout, Duration::from_secs(1));
}

#[test]
fn a_restart_applies_the_saved_config_before_the_bridge_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = layers(dir.path(), "");
    first.offer(config(1, V1));
    let (again, cell) = layers(dir.path(), "");
    again.load_saved();
    assert_eq!(policies(&cell).get("web").timeout, Duration::from_secs(2));
    let mut status = again.status();
    assert_eq!(
        (status.borrow().version, status.borrow().source),
        (1, "saved")
    );
    status.borrow_and_update();
    again.offer(config(1, V1));
    assert_eq!(status.borrow().source, "bridge");

    // A damaged file is refused: the proxy starts on its local file alone.
    std::fs::write(dir.path().join(FILE_NAME), b"{\"version\": 1").unwrap();
    let (third, cell) = layers(dir.path(), "");
    third.load_saved();
    assert!(cell.lock().unwrap().is_none());
    assert_eq!(third.status().borrow().source, "none");
}

#[test]
fn a_reload_of_the_local_file_keeps_the_node_config_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let (layers, cell) = layers(dir.path(), "");
    layers.offer(config(1, V1));
    let reloaded = local_config(
        dir.path(),
        "[routes.web]\nretries = 0\n[routes.api]\nretries = 0\n",
    );
    layers.set_local(reloaded).unwrap();
    let p = policies(&cell);
    assert_eq!(p.get("web").timeout, Duration::from_secs(2), "control wins");
    assert_eq!(p.get("api").retries, 0, "the file's own table");
    assert_eq!(layers.status().borrow().version, 1);
}

#[tokio::test]
async fn a_report_carries_the_version_in_effect_and_the_refusal() {
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    let reporter = Reporter::new(channel, "n1".into(), Duration::from_secs(1));
    let status = Status {
        version: 3,
        refused: Some(Refusal {
            version: 4,
            sha256: String::new(),
            reason: "routes.web.retries: 11 is more than 10".into(),
            at_unix_ms: 1,
        }),
        ..Status::default()
    };
    let request = reporter.request(&status);
    assert_eq!(
        (
            request.node.as_str(),
            request.version_in_effect,
            request.refused_version
        ),
        ("n1", 3, 4)
    );
    assert_eq!(request.reason, "routes.web.retries: 11 is more than 10");
}
