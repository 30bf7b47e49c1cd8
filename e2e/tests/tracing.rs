//! OpenTelemetry traces across the mesh: each proxy makes a server span per
//! request it receives and a client span per attempt, sends the client
//! span's context on as W3C `traceparent`, and exports its spans over OTLP
//! when `otlp_endpoint` is set (and nothing when it is not); a gRPC call
//! (the proxy registering with its bridge) is a client span in the caller
//! and its child server span in the bridge.
//!
//! An OTLP/gRPC receiver listens in n1's namespace, on n1's address, where
//! both nodes' proxies reach it.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, bail, ensure};
use hyper::Method;
use mesh_e2e::{
    Mesh, MeshOptions, Node, eventually,
    otlp::{KIND_CLIENT, KIND_SERVER, OtlpReceiver, ReceivedSpan},
};

/// The inbound listener's port on every node.
const INBOUND: u16 = mesh_e2e::mesh::INBOUND_PORT;

/// The receiver's port.
const OTLP_PORT: u16 = 4317;

/// How long a routing change may take to show.
const CONVERGE: Duration = Duration::from_secs(20);

/// How long spans may take to reach the receiver (batches are sent every
/// 500 ms here, see `OTEL_BSP_SCHEDULE_DELAY`).
const EXPORTED: Duration = Duration::from_secs(20);

/// The caller's own trace, continued by the mesh.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn opts() -> MeshOptions {
    MeshOptions {
        proxy_args: vec!["--inbound-listen".into(), format!("0.0.0.0:{INBOUND}")],
        ..MeshOptions::nodes(2)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_crossing_two_nodes_is_one_trace_with_spans_from_both_proxies() {
    let mut mesh = Mesh::start(opts()).await.unwrap();
    mesh.nodes[1].serve("backend", "backend-1").await.unwrap();
    let listen = SocketAddr::from((mesh.nodes[0].ip(), OTLP_PORT));
    let receiver = OtlpReceiver::start(&mesh.nodes[0].ns, listen)
        .await
        .unwrap();

    // n2 exports, n1 does not (yet): n2's spans arrive, n1's never do.
    restart_proxy_traced(&mut mesh.nodes[1], receiver.endpoint())
        .await
        .unwrap();
    mesh.nodes[0]
        .wait_peer(&mesh.nodes[1], CONVERGE)
        .await
        .unwrap();
    let n1 = &mesh.nodes[0];
    n1.wait_answers("backend", &["backend-1"], CONVERGE)
        .await
        .unwrap();
    untraced_proxy_exports_nothing(n1, &receiver).await.unwrap();

    restart_proxy_traced(&mut mesh.nodes[0], receiver.endpoint())
        .await
        .unwrap();
    let n1 = &mesh.nodes[0];
    n1.wait_peer(&mesh.nodes[1], CONVERGE).await.unwrap();
    n1.wait_answers("backend", &["backend-1"], CONVERGE)
        .await
        .unwrap();

    callers_trace_continues_across_both_proxies(n1, &receiver)
        .await
        .unwrap();
    a_request_without_traceparent_starts_one_trace(n1, &receiver)
        .await
        .unwrap();
    a_registration_is_one_trace_from_the_proxy_to_its_bridge(&mut mesh.nodes[0], &receiver)
        .await
        .unwrap();
    mesh.finish();
}

/// n1's bridge exporting too: a registration through n1's proxy makes the
/// proxy's `grpc.client` span of `Registry/Register` and, as its child in
/// the same trace, the bridge's `grpc.server` span of the call.
async fn a_registration_is_one_trace_from_the_proxy_to_its_bridge(
    n1: &mut Node,
    receiver: &OtlpReceiver,
) -> Result<()> {
    n1.bridge.set_env("MESH_OTLP_ENDPOINT", receiver.endpoint());
    n1.bridge.set_env("OTEL_BSP_SCHEDULE_DELAY", "500");
    n1.bridge.restart().await?;
    n1.wait_bridge_live(CONVERGE).await?;
    const METHOD: &str = "/mesh.v1.Registry/Register";
    let body = serde_json::json!({"Name": "traced", "ID": "traced-1",
        "Address": n1.ip().to_string(), "Port": 9400});
    let resp = n1.register(&body).await?;
    ensure!(
        resp.status == 200,
        "register: {} {}",
        resp.status,
        resp.text()
    );
    // The proxy also registers itself as a peer at start (before the
    // bridge exported): the call of this test is the one with a child.
    let (client, server) = eventually("the Register call's two spans", EXPORTED, || async {
        let spans = receiver.spans();
        let clients: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| {
                s.service == "mesh-proxy"
                    && s.node == "n1"
                    && s.kind == KIND_CLIENT
                    && s.name == METHOD
            })
            .collect();
        let pair = clients.iter().find_map(|client| {
            spans
                .iter()
                .find(|s| {
                    s.service == "mesh-bridge"
                        && s.kind == KIND_SERVER
                        && s.name == METHOD
                        && s.trace_id == client.trace_id
                        && s.parent_span_id == client.span_id
                })
                .map(|server| ((*client).clone(), server.clone()))
        });
        let Some(pair) = pair else {
            let bridge: Vec<_> = spans
                .iter()
                .filter(|s| s.service == "mesh-bridge")
                .map(|s| (&s.name, &s.trace_id, &s.parent_span_id))
                .collect();
            bail!(
                "{} client spans of {METHOD} from n1's proxy, none with the bridge's span as \
                 its child; the bridge's: {bridge:?}",
                clients.len()
            );
        };
        Ok(pair)
    })
    .await?;
    ensure!(server.node == "n1", "{server:#?}");
    println!(
        "gRPC: n1's proxy {} -> n1's bridge {} in trace {}",
        client.name, server.name, client.trace_id
    );
    Ok(())
}

/// Requests through n1 (untraced) to n2 (traced): n2's spans of them
/// arrive over two export rounds, and not one span from n1.
async fn untraced_proxy_exports_nothing(n1: &Node, receiver: &OtlpReceiver) -> Result<()> {
    for round in 1..=2 {
        let before = n2_inbound_spans(receiver);
        let resp = n1.get("/backend/untraced").await?;
        ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
        eventually(
            &format!("n2's spans of untraced request {round} arrive"),
            EXPORTED,
            || async {
                let now = n2_inbound_spans(receiver);
                ensure!(now > before, "n2 inbound spans: {now}");
                Ok(())
            },
        )
        .await?;
    }
    let from_n1: Vec<_> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.node == "n1")
        .collect();
    ensure!(
        from_n1.is_empty(),
        "n1's proxy has no otlp_endpoint, yet the receiver got its spans: {from_n1:#?}"
    );
    println!("no endpoint, no spans: n1 exported nothing while n2 exported two rounds");
    Ok(())
}

fn n2_inbound_spans(receiver: &OtlpReceiver) -> usize {
    receiver
        .spans()
        .iter()
        .filter(|s| s.node == "n2" && s.name == "proxy.inbound")
        .count()
}

/// A request carrying the caller's `traceparent`: every span of both
/// proxies is in the caller's trace, chained caller → n1 server → n1
/// client → n2 server → n2 client.
async fn callers_trace_continues_across_both_proxies(
    n1: &Node,
    receiver: &OtlpReceiver,
) -> Result<()> {
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let resp = n1
        .proxy_client()
        .request(
            Method::GET,
            "/backend/traced",
            &[("traceparent", traceparent.as_str())],
            Default::default(),
        )
        .await?;
    ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
    let spans = wait_trace(receiver, CALLER_TRACE).await?;
    let chain = check_chain(&spans)?;
    ensure!(
        chain.outbound.parent_span_id == CALLER_SPAN,
        "n1's server span continues the caller's span {CALLER_SPAN}: {:#?}",
        chain.outbound
    );
    println!(
        "the caller's trace {CALLER_TRACE} holds {} spans from n1 and n2",
        spans.len()
    );
    Ok(())
}

/// A request without `traceparent`: n1 starts a trace, and n2's spans are
/// in it.
async fn a_request_without_traceparent_starts_one_trace(
    n1: &Node,
    receiver: &OtlpReceiver,
) -> Result<()> {
    let known: Vec<String> = receiver.spans().into_iter().map(|s| s.trace_id).collect();
    let resp = n1.get("/backend/fresh").await?;
    ensure!(resp.status == 200, "{} {}", resp.status, resp.text());
    let trace_id = eventually("n1 exports a new trace", EXPORTED, || async {
        let roots: Vec<_> = receiver
            .spans()
            .into_iter()
            .filter(|s| {
                s.node == "n1"
                    && s.name == "proxy.outbound"
                    && s.parent_span_id.is_empty()
                    && s.attr("mesh.service") == Some("backend")
                    && !known.contains(&s.trace_id)
            })
            .collect();
        match roots.as_slice() {
            [root] => Ok(root.trace_id.clone()),
            [] => bail!("no new root span from n1 yet"),
            more => bail!("more than one new trace: {more:#?}"),
        }
    })
    .await?;
    let spans = wait_trace(receiver, &trace_id).await?;
    check_chain(&spans)?;
    println!(
        "a request without traceparent: one new trace {trace_id} with {} spans from n1 and n2",
        spans.len()
    );
    Ok(())
}

/// The four spans of one request from n1 to n2's instance.
struct Chain {
    outbound: ReceivedSpan,
}

/// Waits until trace `trace_id` has its four spans (n1's server and
/// client, n2's server and client); returns them.
async fn wait_trace(receiver: &OtlpReceiver, trace_id: &str) -> Result<Vec<ReceivedSpan>> {
    eventually(
        &format!("trace {trace_id} has spans from both proxies"),
        EXPORTED,
        || async {
            let spans = receiver.trace(trace_id);
            ensure!(
                spans.len() >= 4,
                "{} spans so far: {:?}",
                spans.len(),
                spans
                    .iter()
                    .map(|s| format!("{}/{}", s.node, s.name))
                    .collect::<Vec<_>>()
            );
            Ok(spans)
        },
    )
    .await
}

/// Checks that `spans` (one trace) chain n1's server span → n1's
/// attempt → n2's server span → n2's forward, each from a `mesh-proxy`
/// resource of its node, with the attributes the README names.
fn check_chain(spans: &[ReceivedSpan]) -> Result<Chain> {
    let one = |node: &str, name: &str, kind: i32| -> Result<ReceivedSpan> {
        let found: Vec<_> = spans
            .iter()
            .filter(|s| s.node == node && s.name == name)
            .collect();
        let [span] = found.as_slice() else {
            bail!("want one {node}/{name} span in the trace, got {found:#?}");
        };
        ensure!(
            span.service == "mesh-proxy",
            "{node}/{name}: service.name {:?}",
            span.service
        );
        ensure!(span.kind == kind, "{node}/{name}: kind {}", span.kind);
        ensure!(
            span.attr("mesh.service") == Some("backend"),
            "{node}/{name}: {:?}",
            span.attributes
        );
        Ok((*span).clone())
    };
    let outbound = one("n1", "proxy.outbound", KIND_SERVER)?;
    let attempt = one("n1", "proxy.attempt", KIND_CLIENT)?;
    let inbound = one("n2", "proxy.inbound", KIND_SERVER)?;
    let forward = one("n2", "proxy.forward", KIND_CLIENT)?;
    ensure!(
        outbound.attr("http.request.method") == Some("GET")
            && outbound.attr("http.response.status_code") == Some("200"),
        "n1's server span: {:?}",
        outbound.attributes
    );
    ensure!(
        attempt.parent_span_id == outbound.span_id,
        "n1's attempt is a child of n1's server span: {attempt:#?} {outbound:#?}"
    );
    ensure!(
        attempt.attr("mesh.attempt") == Some("1")
            && attempt.attr("mesh.peer.node") == Some("n2")
            && attempt.attr("http.response.status_code") == Some("200"),
        "n1's attempt span: {:?}",
        attempt.attributes
    );
    ensure!(
        inbound.parent_span_id == attempt.span_id,
        "n2's server span is a child of n1's client span: {inbound:#?} {attempt:#?}"
    );
    ensure!(
        forward.parent_span_id == inbound.span_id,
        "n2's client span is a child of n2's server span: {forward:#?} {inbound:#?}"
    );
    Ok(Chain { outbound })
}

/// Restarts `node`'s proxy exporting to `endpoint`; waits until it is live.
async fn restart_proxy_traced(node: &mut Node, endpoint: &str) -> Result<()> {
    node.proxy.set_env("MESH_OTLP_ENDPOINT", endpoint);
    node.proxy.set_env("OTEL_BSP_SCHEDULE_DELAY", "500");
    node.proxy.restart().await?;
    node.wait_proxy_live(CONVERGE).await
}
