//! A stand-in for mesh-bridge: a `mesh.v1.Discovery` server that answers
//! every Watch with one fixed snapshot and then keeps the stream open, so
//! that mesh-proxy routes without Consul. The data-plane and memory phases
//! use it; `bench-fake-bridge` runs it alone (to profile the proxy by hand).

use std::{net::SocketAddr, pin::Pin, sync::Arc};

use anyhow::{Context as _, Result};
use futures::{Stream, StreamExt as _, stream};
use mesh_proto::v1::{
    Endpoint, RouteUpdate, ServiceEndpoints, Snapshot, WatchRequest,
    discovery_server::{Discovery, DiscoveryServer},
    route_update::Kind,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::{Request, Response, Status, transport::Server};

/// A running fake bridge; stops when dropped.
#[derive(Debug)]
pub struct FakeBridge {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

#[derive(Clone, Debug)]
struct Api {
    snapshot: Arc<Vec<ServiceEndpoints>>,
}

// === impl FakeBridge ===

impl FakeBridge {
    /// Serves `snapshot` on a free loopback port.
    pub async fn start(snapshot: Vec<ServiceEndpoints>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the fake bridge")?;
        Self::serve(listener, snapshot)
    }

    /// Serves `snapshot` on `listener`.
    pub fn serve(listener: TcpListener, snapshot: Vec<ServiceEndpoints>) -> Result<Self> {
        let addr = listener.local_addr()?;
        let api = Api {
            snapshot: Arc::new(snapshot),
        };
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let task = tokio::spawn(async move {
            let served = Server::builder()
                .add_service(DiscoveryServer::new(api))
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = served {
                eprintln!("fake bridge stopped: {e}");
            }
        });
        Ok(Self { addr, task })
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL mesh-proxy's `--bridge-addr` takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === impl Api ===

type WatchStream = Pin<Box<dyn Stream<Item = Result<RouteUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for Api {
    type WatchStream = WatchStream;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let update = RouteUpdate {
            version: 1,
            kind: Some(Kind::Snapshot(Snapshot {
                services: self.snapshot.as_ref().clone(),
            })),
            stale: false,
            config: None,
            intentions: None,
        };
        // The stream stays open: a closed one would make the proxy resubscribe.
        let updates = stream::once(async move { Ok(update) }).chain(stream::pending());
        Ok(Response::new(updates.boxed()))
    }
}

/// A service with one endpoint per address.
pub fn service(name: &str, addrs: &[SocketAddr]) -> ServiceEndpoints {
    ServiceEndpoints {
        name: name.to_owned(),
        endpoints: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| endpoint(&format!("{name}-{i}"), &a.ip().to_string(), a.port()))
            .collect(),
    }
}

/// `service` with every endpoint tagged `h2`: the proxy speaks HTTP/2
/// (h2c) to them, many requests multiplexed on one connection.
pub fn h2(mut service: ServiceEndpoints) -> ServiceEndpoints {
    for endpoint in &mut service.endpoints {
        endpoint.tags.push("h2".into());
    }
    service
}

/// `services` services (`svc-0000`, …) of `per_service` endpoints each, at
/// distinct loopback addresses nobody listens on, with a tag and a meta
/// entry each, as Consul registrations usually carry.
pub fn synthetic(services: usize, per_service: usize) -> Vec<ServiceEndpoints> {
    (0..services)
        .map(|s| {
            let name = synthetic_name(s);
            ServiceEndpoints {
                endpoints: (0..per_service)
                    .map(|i| {
                        let (address, port) = synthetic_addr(s, i);
                        endpoint(&format!("{name}-{i}"), &address, port)
                    })
                    .collect(),
                name,
            }
        })
        .collect()
}

/// The name of synthetic service `s`.
pub fn synthetic_name(s: usize) -> String {
    format!("svc-{s:04}")
}

/// The address of instance `i` of synthetic service `s`: one loopback
/// address per service, one port per instance.
pub fn synthetic_addr(s: usize, i: usize) -> (String, u16) {
    let address = format!("127.{}.{}.{}", 1 + s / 65_536 % 254, s / 256 % 256, s % 256);
    let port = 20_000 + u16::try_from(i % 40_000).unwrap_or(0);
    (address, port)
}

fn endpoint(id: &str, address: &str, port: u16) -> Endpoint {
    Endpoint {
        id: id.to_owned(),
        address: address.to_owned(),
        port: u32::from(port),
        node: "bench-node".into(),
        tags: vec!["v1".into()],
        meta: [("version".to_owned(), "1".to_owned())].into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_endpoints_are_distinct() {
        let services = synthetic(300, 10);
        let mut all: Vec<(String, u32)> = services
            .iter()
            .flat_map(|s| s.endpoints.iter().map(|e| (e.address.clone(), e.port)))
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 3000);
    }
}
