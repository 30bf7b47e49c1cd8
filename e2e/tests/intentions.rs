//! Intentions enforced in an mtls mesh (issue 7): a call the intentions
//! deny is refused by the destination's proxy (403 naming the decision,
//! counted, the instance never reached); a change is in force within a
//! second; with the registry down the last set still decides, also in a
//! proxy restarted meanwhile, and nothing fails open.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use hyper::Method;
use mesh_e2e::{
    HttpClient, Mesh, MeshOptions, Node, Response, control::call, eventually, fault::FaultProxy,
    mesh::TRUST_DOMAIN, wait::eventually_every,
};
use serde_json::{Value, json};

/// How long a change may take to show where nothing is measured.
const CONVERGE: Duration = Duration::from_secs(20);

/// How soon a change of the intentions must be in force.
const IN_FORCE: Duration = Duration::from_secs(1);

/// How often the timing measurements poll.
const POLL: Duration = Duration::from_millis(25);

/// How long the decisions are watched with the registry down.
const HOLD: Duration = Duration::from_secs(3);

/// The intention `api → orders` the test stores: GET under `/public`
/// allowed, anything under `/private` denied by its second rule.
fn api_may_read_public() -> Value {
    json!({
        "action": "allow",
        "description": "e2e intentions",
        "http": [
            {"path_prefix": "/public", "methods": ["GET"], "action": "allow"},
            {"path_prefix": "/private", "action": "deny"},
        ],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intentions_refuse_denied_calls_change_within_a_second_and_hold_with_the_registry_down() {
    let mut mesh = Mesh::start(MeshOptions::nodes(2).with_mtls(None))
        .await
        .unwrap();
    scenario(&mut mesh).await.unwrap();
    mesh.finish();
}

/// `api` on n2 calls `orders` on n1 through n2's proxy while the
/// intention `api → orders` is absent, stored, deleted, stored again and
/// then the registry goes away.
async fn scenario(mesh: &mut Mesh) -> Result<()> {
    // `orders` is a demo instance behind a counting TCP relay: what
    // reaches the instance passes the relay.
    let app = mesh.nodes[0].serve("orders-app", "orders-1").await?;
    let n1_ip = mesh.nodes[0].ip();
    let relay = FaultProxy::start(&mesh.nodes[0].ns, SocketAddr::from((n1_ip, 0)), app).await?;
    let orders = json!({
        "Name": "orders",
        "ID": "orders-a",
        "Address": n1_ip.to_string(),
        "Port": relay.addr().port(),
    });
    let resp = mesh.nodes[0].register(&orders).await?;
    ensure!(
        resp.status == 200,
        "register orders: {} {}",
        resp.status,
        resp.text()
    );
    mesh.nodes[1].serve("api", "api-1").await?;
    let (n1, n2) = (&mesh.nodes[0], &mesh.nodes[1]);
    let api_id = format!("spiffe://{TRUST_DOMAIN}/svc/api");
    eventually("n2's proxy presents api's identity", CONVERGE, || async {
        let ids = n2.tls_identities().await?;
        ensure!(ids.iter().any(|(id, _)| *id == api_id), "{ids:?}");
        Ok(())
    })
    .await?;
    let mut client = n2.proxy_client().with_timeout(Duration::from_secs(5));

    // No intention for api → orders: the default (deny) decides, at n1.
    let deny = r#"mesh_proxy_intention_decisions_total{decision="deny",source="api",destination="orders"}"#;
    eventually(
        "n2 reaches n1's proxy for orders and is refused",
        CONVERGE,
        || async {
            let resp = call_orders(&mut n2.proxy_client(), Method::GET, "/orders/warmup").await?;
            refusal(&resp).map(drop)
        },
    )
    .await?;
    let before = metric(n1, deny).await?;
    let resp = call_orders(&mut client, Method::GET, "/orders/nope-default").await?;
    let reason = refusal(&resp)?;
    ensure!(
        reason.contains("api -> orders") && reason.contains("deny by default"),
        "reason {reason:?}"
    );
    println!("no intention: 403 {reason:?}");
    eventually("n1 counts the denied call", CONVERGE, || async {
        let now = metric(n1, deny).await?;
        ensure!(now >= before + 1.0, "{deny} went {before} -> {now}");
        Ok(())
    })
    .await?;
    let line = eventually("n1's access log has the refused call", CONVERGE, || async {
        let lines = n1.access_log()?;
        match lines.into_iter().find(|l| {
            l["direction"] == "inbound"
                && l["path"]
                    .as_str()
                    .is_some_and(|p| p.contains("nope-default"))
        }) {
            Some(line) => Ok(line),
            None => bail!("no inbound line for /nope-default"),
        }
    })
    .await?;
    ensure!(
        line["status"] == 403 && line["reason"] == "intention" && line["peer"] == api_id.as_str(),
        "the refused call was logged as {line}"
    );
    ensure!(
        relay.accepted() == 0,
        "refused calls reached the instance: {} connection(s) to it",
        relay.accepted()
    );

    // An allow narrowed by http rules is in force within a second.
    let put = intention(n1, Method::PUT, Some(api_may_read_public())).await?;
    let stored = Instant::now();
    let took = eventually_every(
        "GET /orders/public/x is allowed",
        Duration::from_secs(5),
        POLL,
        || async {
            let resp = call_orders(&mut n2.proxy_client(), Method::GET, "/orders/public/x").await?;
            ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
            Ok(stored.elapsed())
        },
    )
    .await?;
    println!("allow api -> orders (revision {put}): in force after {took:?}");
    ensure!(took <= IN_FORCE, "the allow took {took:?} to be in force");
    expect_decisions(&mut client, "with the allow").await?;
    ensure!(relay.accepted() > 0, "allowed calls did not pass the relay");

    // Deleting it is in force within a second as well.
    intention(n1, Method::DELETE, None).await?;
    let deleted = Instant::now();
    let took = eventually_every(
        "GET /orders/public/x is refused again",
        Duration::from_secs(5),
        POLL,
        || async {
            let resp = call_orders(&mut n2.proxy_client(), Method::GET, "/orders/public/x").await?;
            ensure!(resp.status == 403, "{} {}", resp.status, resp.text());
            let reason = refusal(&resp)?;
            ensure!(reason.contains("deny by default"), "reason {reason:?}");
            Ok(deleted.elapsed())
        },
    )
    .await?;
    println!("intention deleted: in force after {took:?}");
    ensure!(took <= IN_FORCE, "the delete took {took:?} to be in force");

    // Allowed again, and n1's proxy saved that set before the registry goes.
    intention(n1, Method::PUT, Some(api_may_read_public())).await?;
    n2.wait_status("/orders/public/x", &[200], CONVERGE).await?;
    let dump = n1.proxy_data_dir().join("intentions.dump");
    eventually("n1's proxy saved the allow", CONVERGE, || async {
        let text = std::fs::read_to_string(&dump).with_context(|| dump.display().to_string())?;
        ensure!(text.contains("/public"), "{text}");
        Ok(())
    })
    .await?;

    // The registry goes away: all Consul servers and n1's agent.
    for server in &mut mesh.servers {
        server.agent.stop().await?;
    }
    mesh.nodes[0].agent.stop().await?;
    let down = Instant::now();
    let (n1, n2) = match mesh.nodes.as_mut_slice() {
        [n1, n2] => (n1, &*n2),
        _ => bail!("the mesh has two nodes"),
    };
    let mut rounds = 0;
    while down.elapsed() < HOLD {
        expect_decisions(&mut client, "with the registry down").await?;
        rounds += 1;
        tokio::time::sleep(POLL).await;
    }
    println!("registry down: {rounds} rounds of decisions as before over {HOLD:?}");

    // n1's proxy restarted meanwhile enforces its saved set: never open.
    n1.proxy.stop().await?;
    n1.proxy.start()?;
    let restarted = Instant::now();
    let mut probe = n2.proxy_client().with_timeout(Duration::from_secs(2));
    let served = loop {
        for (method, path) in [
            (Method::GET, "/orders/private/y"),
            (Method::POST, "/orders/public/y"),
            (Method::GET, "/orders/other"),
        ] {
            if let Ok(resp) = call_orders(&mut probe, method.clone(), path).await {
                ensure!(
                    resp.status != 200,
                    "{method} {path} answered 200 while n1's proxy restarted: {}",
                    resp.text()
                );
            }
        }
        if let Ok(resp) = call_orders(&mut probe, Method::GET, "/orders/public/y").await
            && resp.status == 200
        {
            break restarted.elapsed();
        }
        ensure!(
            restarted.elapsed() < CONVERGE,
            "n1's restarted proxy does not serve GET /orders/public/y"
        );
        tokio::time::sleep(POLL).await;
    };
    n1.wait_proxy_live(CONVERGE).await?;
    // The first start had no saved set: this line is the restart's.
    eventually(
        "n1's restarted proxy loaded its intentions dump",
        CONVERGE,
        || async {
            let log = n1.proxy.log();
            ensure!(
                log.contains("intentions loaded from the dump"),
                "{}",
                n1.proxy.log_tail(20)
            );
            Ok(())
        },
    )
    .await?;
    let routes = n1.routes().await?;
    println!(
        "n1's proxy restarted with the registry down: first 200 after {served:?}; intentions {}",
        routes["intentions"]
    );
    let mut client = n2.proxy_client().with_timeout(Duration::from_secs(5));
    let again = Instant::now();
    while again.elapsed() < HOLD {
        expect_decisions(&mut client, "after n1's proxy restarted").await?;
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// With `api → orders` as [`api_may_read_public`]: GET under `/public`
/// is answered by the instance, `/private` is refused by its deny rule,
/// a POST under `/public` and a path no rule names are refused because
/// none of its rules matches.
async fn expect_decisions(client: &mut HttpClient, when: &str) -> Result<()> {
    let resp = call_orders(client, Method::GET, "/orders/public/x").await?;
    ensure!(
        resp.status == 200 && resp.header("x-instance") == Some("orders-1"),
        "{when}: GET /orders/public/x: {} {}",
        resp.status,
        resp.text()
    );
    let cases = [
        (
            Method::GET,
            "/orders/private",
            "deny by intention api -> orders, http[1]",
        ),
        (
            Method::POST,
            "/orders/public/x",
            "none of its http rules matches",
        ),
        (
            Method::GET,
            "/orders/other",
            "none of its http rules matches",
        ),
    ];
    for (method, path, decided) in cases {
        let resp = call_orders(client, method.clone(), path).await?;
        let reason = refusal(&resp).with_context(|| format!("{when}: {method} {path}"))?;
        ensure!(
            reason.contains(decided),
            "{when}: {method} {path}: reason {reason:?}, not {decided:?}"
        );
    }
    Ok(())
}

/// A call from `api` (n2's service) through `client`.
async fn call_orders(client: &mut HttpClient, method: Method, path: &str) -> Result<Response> {
    client
        .request(
            method,
            path,
            &[("x-mesh-source", "api")],
            Default::default(),
        )
        .await
}

/// The reason of an intention's refusal: `resp` must be a 403 with
/// `x-mesh-refused: intention` and the JSON body naming `orders`.
fn refusal(resp: &Response) -> Result<String> {
    ensure!(
        resp.status == 403 && resp.header("x-mesh-refused") == Some("intention"),
        "not refused by an intention: {} {:?} {}",
        resp.status,
        resp.header("x-mesh-refused"),
        resp.text()
    );
    let body = resp.json()?;
    ensure!(
        body["error"] == "intention" && body["service"] == "orders",
        "body {body}"
    );
    match body["reason"].as_str() {
        Some(reason) => Ok(reason.to_owned()),
        None => bail!("body without a reason: {body}"),
    }
}

/// PUTs (`body`) or DELETEs the intention `api → orders` through the
/// mesh-control replica on `control`; the revision it answers with.
async fn intention(control: &Node, method: Method, body: Option<Value>) -> Result<Value> {
    let path = "/v1/intentions/api/orders";
    let (status, answer) = call(control, method.clone(), path, body).await?;
    ensure!(
        (200..300).contains(&status),
        "{method} {path}: {status} {answer}"
    );
    Ok(answer["revision"].clone())
}

/// One sample of `node`'s proxy's `/metrics` (0 when the series is absent).
async fn metric(node: &Node, series: &str) -> Result<f64> {
    let resp = node.proxy_admin("/metrics").await?;
    ensure!(resp.status == 200, "/metrics: {}", resp.status);
    Ok(resp
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0))
}
