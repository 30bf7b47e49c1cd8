//! The gRPC echo test service (`proto/echo.proto`, package
//! `meshwork.e2e.echo`), served by the `grpc-echo` binary on a node, and a
//! client that calls it through a node's proxy as a service would: h2c to
//! `127.0.0.1:8888` inside the node, the service named in `:authority`.

use std::{io, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::netns::Netns;

/// The generated messages, client and server.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("meshwork.e2e.echo");
}

/// A gRPC channel that reaches `service` through the proxy at `proxy`
/// inside `ns` (one h2c connection, opened inside the namespace).
pub async fn channel(ns: &Netns, proxy: SocketAddr, service: &str) -> Result<Channel> {
    let name = ns.name().to_owned();
    let ns = ns.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let ns = ns.clone();
        async move {
            ns.connect(proxy, Duration::from_secs(5))
                .await
                .map(TokioIo::new)
                .map_err(|e| io::Error::other(format!("{e:#}")))
        }
    });
    // The URI names the service: it becomes every call's `:authority`,
    // which the proxy routes by; the connector goes to the proxy.
    Endpoint::from_shared(format!("http://{service}"))?
        .timeout(Duration::from_secs(30))
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("gRPC channel to {service} through {proxy} in {name}"))
}
