//! Intentions through mesh-control against a real Consul dev agent: the
//! REST API (list, get, put, delete, default, check) with check-and-set
//! writes any replica makes and every replica decides on at once, bad
//! input refused by name with nothing stored, the configured default,
//! `meshctl intentions`, and the dashboard's state.

mod support;

use std::{
    future::Future,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use consul_client::{
    Client, ClientConfig, QueryOptions,
    testing::{DevAgent, free_port},
};
use mesh_control_plane::app::ControlPlane;
use mesh_runtime::metrics::Registry;
use serde_json::{Value, json};

/// How soon a stored change must be what every replica decides on (the
/// intentions issue's promise).
const IN_FORCE: Duration = Duration::from_secs(1);

/// Polls `attempt` until it succeeds or `deadline` passes.
async fn within<T, F, Fut>(what: &str, deadline: Duration, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > deadline => {
                return Err(e.context(format!("{what}: not true after {deadline:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A replica on free ports, serving until the test ends.
struct Replica {
    _plane: ControlPlane,
    http: String,
    registry: Registry,
}

impl Replica {
    async fn start(agent: &DevAgent, name: &str, extra: &[&str]) -> Self {
        let registry = Registry::new();
        let plane = support::replica(agent, name, extra, registry.clone())
            .await
            .expect("a replica starts on free ports");
        Self {
            http: format!("http://{}", plane.http_addr()),
            _plane: plane,
            registry,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.http)
    }
}

fn consul(agent: &DevAgent) -> Client {
    Client::new(&ClientConfig::new([agent.addr()])).expect("a dev agent address is valid")
}

/// The keys under `mesh/intentions`, sorted.
async fn intention_keys(agent: &DevAgent) -> Result<Vec<String>> {
    Ok(consul(agent)
        .kv_list("mesh/intentions", QueryOptions::default())
        .await?
        .value
        .into_iter()
        .map(|p| p.key)
        .collect())
}

/// An answer's status and JSON body.
async fn call(request: reqwest::RequestBuilder) -> Result<(u16, Value)> {
    let answer = request.send().await?;
    let status = answer.status().as_u16();
    let text = answer.text().await?;
    let body = serde_json::from_str(&text).with_context(|| format!("{status}: {text}"))?;
    Ok((status, body))
}

/// What `replica` decides for a call.
async fn check(
    http: &reqwest::Client,
    replica: &Replica,
    source: &str,
    destination: &str,
    method: &str,
    path: &str,
) -> Result<Value> {
    let (status, body) = call(http.get(replica.url("/v1/intentions/check")).query(&[
        ("source", source),
        ("destination", destination),
        ("method", method),
        ("path", path),
    ]))
    .await?;
    anyhow::ensure!(status == 200, "check: {status} {body}");
    Ok(body)
}

#[tokio::test]
async fn intentions_are_written_with_check_and_set_and_every_replica_decides_on_them_at_once()
-> Result<()> {
    let agent = DevAgent::start().await;
    let a = Replica::start(&agent, "c1", &[]).await;
    let b = Replica::start(&agent, "c2", &[]).await;
    let http = reqwest::Client::new();

    // Nothing stored: the configured default, deny.
    let (status, list) = call(http.get(a.url("/v1/intentions"))).await?;
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list["default"],
        json!({"action": "deny", "from": "config", "revision": 0})
    );
    assert_eq!(list["intentions"], json!([]));
    let first_index = list["index"].as_u64().context("index")?;
    let d = check(&http, &b, "api", "web", "GET", "/v1/users").await?;
    assert_eq!(
        (d["action"].as_str(), d["by"].as_str()),
        (Some("deny"), Some("default"))
    );

    // api may read web's /v1/ through replica a ...
    let (status, put) = call(http.put(a.url("/v1/intentions/api/web")).json(&json!({
        "action": "allow",
        "http": [{"path_prefix": "/v1/", "methods": ["GET", "HEAD"], "action": "allow"}],
        "description": "api reads web"
    })))
    .await?;
    assert_eq!(status, 200, "{put}");
    assert_eq!(put["created"], true);
    let revision = put["revision"].as_u64().context("revision")?;
    // ... and replica b decides on it within a second.
    let d = within("b allows api's GET", IN_FORCE, || async {
        let d = check(&http, &b, "api", "web", "GET", "/v1/users").await?;
        anyhow::ensure!(d["action"] == "allow", "{d}");
        Ok(d)
    })
    .await?;
    assert_eq!(
        d,
        json!({"action": "allow", "by": "rule", "source": "api", "destination": "web", "rule": 0,
               "explanation": "allow by intention api -> web, http[0]",
               "index": d["index"]})
    );
    // What the rule does not name is denied, whatever else would allow it.
    let d = check(&http, &b, "api", "web", "POST", "/v1/users").await?;
    assert_eq!(
        (d["action"].as_str(), d["by"].as_str()),
        (Some("deny"), Some("unmatched"))
    );

    // A wildcard source, stored under `*` as it is.
    let (status, put) = call(
        http.put(b.url("/v1/intentions/*/web"))
            .json(&json!({"action": "deny", "expected_revision": 0})),
    )
    .await?;
    assert_eq!(status, 200, "{put}");
    assert_eq!(
        intention_keys(&agent).await?,
        ["mesh/intentions/*/web", "mesh/intentions/api/web"]
    );
    let d = check(&http, &a, "cron", "web", "GET", "/").await?;
    assert_eq!(
        (d["action"].as_str(), d["destination"].as_str()),
        (Some("deny"), Some("web"))
    );
    // A peer without a service identity: only `*` sources match it.
    let d = check(&http, &a, "", "web", "GET", "/").await?;
    assert_eq!(
        (d["action"].as_str(), d["source"].as_str()),
        (Some("deny"), Some("*"))
    );

    // Creating what exists, or changing from a stale revision: 409 naming
    // the key and both revisions; nothing changes.
    for body in [
        json!({"action": "deny", "expected_revision": 0}),
        json!({"action": "deny", "expected_revision": revision - 1}),
    ] {
        let (status, answer) = call(http.put(a.url("/v1/intentions/api/web")).json(&body)).await?;
        assert_eq!(status, 409, "{answer}");
        assert_eq!(answer["key"], "mesh/intentions/api/web");
        assert_eq!(answer["revision"], revision);
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.ends_with("read it again and retry on the new revision"),
            "{error}"
        );
    }
    // Two replicas creating the same intention at once: one wins, the
    // other is told, and the one stored is the winner's.
    let create = |replica: &Replica, action: &str| {
        call(
            http.put(replica.url("/v1/intentions/cron/db"))
                .json(&json!({"action": action, "expected_revision": 0})),
        )
    };
    let (first, second) = tokio::join!(create(&a, "allow"), create(&b, "deny"));
    let ((s1, w1), (s2, w2)) = (first?, second?);
    let mut statuses = [s1, s2];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409], "{w1} {w2}");
    let a_lost = s1 == 409;
    let winner = if a_lost { "deny" } else { "allow" };
    let (_, stored) = call(http.get(a.url("/v1/intentions/cron/db"))).await?;
    assert_eq!(stored["action"], winner, "{stored}");
    let (status, _) = call(http.delete(b.url("/v1/intentions/cron/db"))).await?;
    assert_eq!(status, 200);

    let (status, one) = call(http.get(a.url("/v1/intentions/API/web"))).await?;
    assert_eq!(status, 200, "names ignore case: {one}");
    assert_eq!(
        (one["action"].as_str(), one["revision"].as_u64()),
        (Some("allow"), Some(revision))
    );

    // Replacing on the current revision works and moves the revision on.
    let (status, put) = call(http.put(a.url("/v1/intentions/api/web")).json(&json!({
        "action": "allow", "expected_revision": revision
    })))
    .await?;
    assert_eq!((status, &put["created"]), (200, &json!(false)), "{put}");
    let replaced = put["revision"].as_u64().context("revision")?;
    assert!(replaced > revision);
    let d = check(&http, &b, "api", "web", "POST", "/v1/users").await?;
    assert_eq!(
        (d["action"].as_str(), d["by"].as_str()),
        (Some("allow"), Some("intention"))
    );

    // The default, stored, wins over the configured one.
    let (status, set) = call(
        http.put(a.url("/v1/intentions-default"))
            .json(&json!({"default": "allow"})),
    )
    .await?;
    assert_eq!(status, 200, "{set}");
    assert_eq!(
        (set["action"].as_str(), set["from"].as_str()),
        (Some("allow"), Some("kv"))
    );
    let d = check(&http, &b, "api", "db", "GET", "/").await?;
    assert_eq!(
        (d["action"].as_str(), d["by"].as_str()),
        (Some("allow"), Some("default"))
    );
    let (status, stale) = call(
        http.put(b.url("/v1/intentions-default"))
            .json(&json!({"default": "deny", "expected_revision": 0})),
    )
    .await?;
    assert_eq!(status, 409, "{stale}");

    let (_, list) = call(http.get(b.url("/v1/intentions"))).await?;
    assert!(
        list["index"].as_u64().context("index")? > first_index,
        "{list}"
    );
    assert_eq!(list["default"]["from"], "kv");
    let pairs: Vec<(&str, &str)> = list["intentions"]
        .as_array()
        .context("intentions")?
        .iter()
        .map(|i| {
            (
                i["source"].as_str().unwrap_or_default(),
                i["destination"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(pairs, [("*", "web"), ("api", "web")]);

    // Delete: a stale revision is a conflict, the current one deletes.
    let url = a.url("/v1/intentions/api/web");
    let (status, _) = call(http.delete(&url).query(&[("expected_revision", revision)])).await?;
    assert_eq!(status, 409);
    let (status, deleted) =
        call(http.delete(&url).query(&[("expected_revision", replaced)])).await?;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["source"], "api");
    let (status, gone) = call(http.get(&url)).await?;
    assert_eq!(status, 404, "{gone}");
    assert_eq!(gone["error"], "there is no intention api -> web");
    let (status, _) = call(http.delete(&url)).await?;
    assert_eq!(status, 404);
    let d = check(&http, &b, "api", "web", "POST", "/").await?;
    assert_eq!(
        (d["action"].as_str(), d["source"].as_str()),
        (Some("deny"), Some("*"))
    );

    // Two stale puts, and the race if replica a lost it.
    let conflicts = 2 + u32::from(a_lost);
    let metrics = a.registry.render();
    assert!(
        metrics.contains(&format!(
            r#"mesh_control_calls_total{{method="PutIntention",outcome="conflict"}} {conflicts}"#
        )),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_intentions_are_refused_naming_the_field_and_nothing_is_stored() -> Result<()> {
    let agent = DevAgent::start().await;
    let replica = Replica::start(&agent, "c1", &["--default-intention", "allow"]).await;
    let http = reqwest::Client::new();
    let allow = |http: Value| json!({"action": "allow", "http": http});
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/v1/intentions/api*/web",
            json!({"action": "allow"}),
            "source: \"api*\" is not a service name: a wildcard is `*` alone",
        ),
        (
            "/v1/intentions/api/v1",
            json!({"action": "allow"}),
            "destination: \"v1\" is reserved by the mesh",
        ),
        (
            "/v1/intentions/api/web",
            json!({"action": "maybe"}),
            "action: \"maybe\" is not allow or deny",
        ),
        (
            "/v1/intentions/api/web",
            allow(json!([{"methods": ["GET", "post"], "action": "allow"}])),
            "http[0].methods[1]: \"post\" is not uppercase",
        ),
        (
            "/v1/intentions/api/web",
            allow(json!([{"path_prefix": "v1/", "action": "allow"}])),
            "http[0].path_prefix: \"v1/\" does not start with '/'",
        ),
        (
            "/v1/intentions/api/web",
            allow(json!([{"path_prefix": "/a", "path_exact": "/b", "action": "allow"}])),
            "http[0]: give path_exact or path_prefix, not both",
        ),
        (
            "/v1/intentions/api/web",
            json!({"action": "deny", "http": [{"path_exact": "/admin", "action": "deny"}]}),
            "action: an intention with http rules is an allow narrowed by them",
        ),
        (
            "/v1/intentions/api/web",
            json!({"action": "allow", "paths": ["/"]}),
            "body: invalid JSON: unknown field `paths`",
        ),
    ];
    for (path, body, words) in cases {
        let (status, answer) = call(http.put(replica.url(path)).json(&body)).await?;
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            status == 400 && error.starts_with(words),
            "{path} {body}: {status} {answer} (expected 400 with {words:?})"
        );
        assert_eq!(answer["kind"], "invalid");
    }
    for (query, words) in [
        (
            vec![("source", "api")],
            "destination: a service name must not be empty",
        ),
        (
            vec![("source", "api"), ("destination", "*")],
            "destination: a call is between two services",
        ),
        (
            vec![("destination", "web"), ("method", "get")],
            "method: \"get\" is not uppercase",
        ),
        (
            vec![("destination", "web"), ("path", "x")],
            "path: \"x\" does not start with '/'",
        ),
    ] {
        let (status, answer) =
            call(http.get(replica.url("/v1/intentions/check")).query(&query)).await?;
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            status == 400 && error.starts_with(words),
            "{query:?}: {status} {answer}"
        );
    }
    let (status, answer) = call(
        http.put(replica.url("/v1/intentions-default"))
            .json(&json!({"default": "open"})),
    )
    .await?;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"], "default: \"open\" is not allow or deny");

    // Nothing was stored, and the configured default applies.
    assert_eq!(intention_keys(&agent).await?, Vec::<String>::new());
    let d = check(&http, &replica, "api", "web", "GET", "/").await?;
    assert_eq!(
        (d["action"].as_str(), d["by"].as_str()),
        (Some("allow"), Some("default"))
    );
    let (_, list) = call(http.get(replica.url("/v1/intentions"))).await?;
    assert_eq!(
        list["default"],
        json!({"action": "allow", "from": "config", "revision": 0})
    );
    Ok(())
}

/// Runs meshctl (without blocking the runtime the replica serves on).
async fn meshctl(http: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .env("MESH_CONTROL_HTTP", http)
        .env_remove("MESH_OUTPUT")
        .output()
        .await
        .expect("meshctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn meshctl_manages_intentions_and_says_what_went_wrong() -> Result<()> {
    let agent = DevAgent::start().await;
    let replica = Replica::start(&agent, "c1", &[]).await;
    let addr = &replica.http;

    let (code, out, err) = meshctl(
        addr,
        &[
            "intentions",
            "allow",
            "api",
            "web",
            "--path-prefix",
            "/v1/",
            "--methods",
            "GET,HEAD",
            "--description",
            "api reads web",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("allow api -> web: created (revision "),
        "{out}"
    );
    let (code, out, err) = meshctl(addr, &["intentions", "deny", "*", "web"]).await;
    assert_eq!(code, 0, "{out}{err}");

    let (code, out, _) = meshctl(addr, &["intentions", "list"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "default: deny (mesh-control's default_intention; not set in Consul KV)"
    );
    assert!(
        lines[1].starts_with("SOURCE  DESTINATION  ACTION  HTTP"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("*       web          deny    -"),
        "{out}"
    );
    assert!(
        lines[3].starts_with("api     web          allow   allow GET,HEAD prefix /v1/"),
        "{out}"
    );
    assert!(lines[3].ends_with("api reads web"), "{out}");

    for (args, expected) in [
        (
            vec!["api", "web", "--method", "HEAD", "--path", "/v1/x"],
            "allow by intention api -> web, http[0]\n",
        ),
        (
            vec!["api", "web", "--method", "DELETE", "--path", "/v1/x"],
            "deny by intention api -> web: none of its http rules matches\n",
        ),
        (vec!["cron", "web"], "deny by intention * -> web\n"),
        (
            vec!["cron", "db"],
            "deny by default: no intention matches\n",
        ),
    ] {
        let mut argv = vec!["intentions", "check"];
        argv.extend(args);
        let (code, out, err) = meshctl(addr, &argv).await;
        assert_eq!((code, out.as_str()), (0, expected), "{argv:?}: {err}");
    }

    let (code, out, _) = meshctl(addr, &["intentions", "default", "allow"]).await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("default: allow for calls no intention matches"),
        "{out}"
    );
    let (code, out, _) = meshctl(
        addr,
        &["intentions", "check", "cron", "db", "--output", "json"],
    )
    .await;
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&out)?;
    assert_eq!(
        (json["action"].as_str(), json["by"].as_str()),
        (Some("allow"), Some("default"))
    );

    // A stale revision: exit 75, one line naming the key.
    let (code, _, err) = meshctl(
        addr,
        &["intentions", "deny", "api", "web", "--expect-revision", "1"],
    )
    .await;
    assert_eq!(code, 75, "{err}");
    assert!(
        err.starts_with("error: conflict on mesh/intentions/api/web: ") && err.lines().count() == 1,
        "{err}"
    );
    // Bad input: refused before mesh-control is asked, naming the flag.
    let down = format!("http://127.0.0.1:{}", free_port());
    for (args, words) in [
        (
            vec!["intentions", "allow", "api", "web", "--methods", "get"],
            "error: --methods: \"get\" is not uppercase",
        ),
        (
            vec!["intentions", "allow", "api*", "web"],
            "error: source: \"api*\" is not a service name",
        ),
    ] {
        let (code, _, err) = meshctl(&down, &args).await;
        assert_eq!(code, 65, "{args:?}: {err}");
        assert!(err.starts_with(words), "{args:?}: {err}");
    }
    // An unknown intention, and an invalid check, as mesh-control says.
    let (code, _, err) = meshctl(addr, &["intentions", "delete", "api", "db"]).await;
    assert_eq!(code, 65, "{err}");
    assert_eq!(err, "error: there is no intention api -> db\n");
    let (code, _, err) = meshctl(addr, &["intentions", "check", "api", "web", "--path", "x"]).await;
    assert_eq!(code, 65, "{err}");
    assert!(err.starts_with("error: path: "), "{err}");

    let (code, out, err) = meshctl(addr, &["intentions", "delete", "api", "web"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("deleted api -> web (it was allow, at revision "),
        "{out}"
    );
    assert_eq!(
        intention_keys(&agent).await?.len(),
        2,
        "*/web and the default"
    );

    // mesh-control away: one line naming the address, exit 69.
    let (code, _, err) = meshctl(&down, &["intentions", "list"]).await;
    assert_eq!(code, 69, "{err}");
    assert!(
        err.contains(&format!("cannot reach mesh-control at {down}")) && err.lines().count() == 1,
        "{err}"
    );
    Ok(())
}

/// The next `state` event of an open `GET /v1/events` whose intentions
/// satisfy `want`, within `deadline`.
async fn pushed(
    events: &mut reqwest::Response,
    deadline: Duration,
    want: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let start = Instant::now();
    let mut buf = String::new();
    loop {
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue; // a keep-alive comment
            };
            let state: Value = serde_json::from_str(data)?;
            if want(&state["intentions"]) {
                return Ok(state);
            }
        }
        let left = deadline.saturating_sub(start.elapsed());
        let chunk = tokio::time::timeout(left, events.chunk())
            .await
            .with_context(|| format!("not pushed within {deadline:?}"))??
            .context("the event stream ended")?;
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn the_dashboard_shows_a_stored_intention_as_soon_as_it_is_stored() -> Result<()> {
    let agent = DevAgent::start().await;
    let replica = Replica::start(&agent, "c1", &[]).await;
    let http = reqwest::Client::new();
    let mut events = http.get(replica.url("/v1/events")).send().await?;
    let first = pushed(&mut events, Duration::from_secs(30), |_| true).await?;
    assert_eq!(first["intentions"]["intentions"], json!([]));
    assert_eq!(first["intentions"]["default"]["from"], "config");
    // A first change, shown once the dashboard's watches hold an index (a
    // change made while it first learns them shows with its periodic read).
    let (status, _) = call(
        http.put(replica.url("/v1/intentions-default"))
            .json(&json!({"default": "allow"})),
    )
    .await?;
    assert_eq!(status, 200);
    pushed(&mut events, Duration::from_secs(30), |i| {
        i["default"]["from"] == "kv"
    })
    .await?;

    let (status, _) = call(
        http.put(replica.url("/v1/intentions/api/web"))
            .json(&json!({"action": "allow", "description": "<b>api</b> reads web"})),
    )
    .await?;
    assert_eq!(status, 200);
    // Pushed at once, well before the dashboard's periodic read.
    let state = pushed(&mut events, IN_FORCE, |i| {
        i["intentions"].as_array().is_some_and(|l| !l.is_empty())
    })
    .await?;
    let shown = &state["intentions"]["intentions"][0];
    assert_eq!(
        (shown["source"].as_str(), shown["destination"].as_str()),
        (Some("api"), Some("web"))
    );
    assert_eq!(shown["description"], "<b>api</b> reads web", "as text");
    Ok(())
}
