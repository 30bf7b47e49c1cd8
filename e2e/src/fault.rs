//! A userspace TCP fault proxy (`tc netem` is not available here): it
//! listens inside a node's namespace, forwards every connection to a
//! target, and injects the fault it is switched to, on new and open
//! connections alike:
//!
//! - [`Fault::None`]: forwards both ways.
//! - [`Fault::Latency`]: holds each chunk the client sends for that long
//!   before forwarding it (one request, one delay on a keep-alive
//!   connection; answers go back at once).
//! - [`Fault::Hang`]: accepts, reads, and never forwards again: the
//!   connection stays open and silent, as a process that is alive but stuck.
//! - [`Fault::Reset`]: resets connections (RST) at the next chunk, and new
//!   ones on accept.
//!
//! Register its address as an instance (instead of the instance's own) to
//! put the fault between the mesh and that instance. Dropping it stops it
//! and closes every connection it holds.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, tcp::OwnedWriteHalf},
    task::{JoinHandle, JoinSet},
};

use crate::netns::Netns;

/// What the proxy does to the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: plain forwarding.
    None,
    /// Each chunk from the client is held this long.
    Latency(Duration),
    /// Accept and read, never forward.
    Hang,
    /// Reset the connections.
    Reset,
}

/// A running fault proxy.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct State {
    /// 0 none, 1 latency, 2 hang, 3 reset.
    mode: AtomicU8,
    latency_us: AtomicU64,
    accepted: AtomicUsize,
}

// === impl FaultProxy ===

impl FaultProxy {
    /// Listens on `listen` inside `ns` and forwards to `target` (connected
    /// from inside `ns` too), without a fault until [`FaultProxy::set`].
    pub async fn start(ns: &Netns, listen: SocketAddr, target: SocketAddr) -> Result<Self> {
        let socket = ns.socket(listen.is_ipv4()).await?;
        socket.set_reuseaddr(true)?;
        socket
            .bind(listen)
            .with_context(|| format!("fault proxy: bind {listen} in {}", ns.name()))?;
        let listener = socket.listen(1024)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let (ns, accept_state) = (ns.clone(), state.clone());
        let task = tokio::spawn(async move {
            // Owned here: aborting this task drops them, closing every
            // connection.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { return };
                        accept_state.accepted.fetch_add(1, Ordering::Relaxed);
                        conns.spawn(serve(client, ns.clone(), target, accept_state.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Self { addr, state, task })
    }

    /// Where it listens: the address to register.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches to `fault`, for open connections too.
    pub fn set(&self, fault: Fault) {
        self.state.set(fault);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === impl State ===

impl State {
    fn set(&self, fault: Fault) {
        let (mode, latency) = match fault {
            Fault::None => (0, Duration::ZERO),
            Fault::Latency(d) => (1, d),
            Fault::Hang => (2, Duration::ZERO),
            Fault::Reset => (3, Duration::ZERO),
        };
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.store(micros, Ordering::Relaxed);
        self.mode.store(mode, Ordering::Relaxed);
    }

    fn fault(&self) -> Fault {
        match self.mode.load(Ordering::Relaxed) {
            1 => Fault::Latency(Duration::from_micros(
                self.latency_us.load(Ordering::Relaxed),
            )),
            2 => Fault::Hang,
            3 => Fault::Reset,
            _ => Fault::None,
        }
    }
}

/// One client connection, until either side closes or the fault ends it.
async fn serve(client: TcpStream, ns: Netns, target: SocketAddr, state: Arc<State>) {
    let _ = client.set_nodelay(true);
    match state.fault() {
        Fault::Reset => return reset(client),
        Fault::Hang => return swallow(client).await,
        Fault::None | Fault::Latency(_) => {}
    }
    let Ok(upstream) = ns.connect(target, Duration::from_secs(2)).await else {
        return reset(client);
    };
    let (mut client_rx, client_tx) = client.into_split();
    let (mut up_rx, mut up_tx) = upstream.into_split();
    // Answers flow back untouched, until the client side is done with.
    let down = tokio::spawn(async move {
        let mut client_tx = client_tx;
        let _ = tokio::io::copy(&mut up_rx, &mut client_tx).await;
        client_tx
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match state.fault() {
            Fault::None => {}
            Fault::Latency(d) => tokio::time::sleep(d).await,
            Fault::Hang => {
                // Stuck for good: the connection stays open, nothing moves.
                down.abort();
                while let Ok(n) = client_rx.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                return;
            }
            Fault::Reset => {
                down.abort();
                if let Ok(client_tx) = down.await {
                    reset_half(client_rx, client_tx);
                }
                return;
            }
        }
        if up_tx.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = up_tx.shutdown().await;
    let _ = down.await;
}

/// Reads whatever comes and never answers, until the client gives up.
async fn swallow(mut client: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = client.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Closes with a RST rather than a FIN.
fn reset(client: TcpStream) {
    let _ = client.set_zero_linger();
    drop(client);
}

fn reset_half(rx: tokio::net::tcp::OwnedReadHalf, tx: OwnedWriteHalf) {
    if let Ok(stream) = rx.reunite(tx) {
        reset(stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fault_switches_and_reads_back() {
        let state = State::default();
        assert_eq!(state.fault(), Fault::None);
        for fault in [
            Fault::Latency(Duration::from_millis(500)),
            Fault::Hang,
            Fault::Reset,
            Fault::None,
        ] {
            state.set(fault);
            assert_eq!(state.fault(), fault);
        }
    }
}
