//! Listeners a new proxy process can share with the old one, so that a
//! restart or an upgrade of the binary fails no request.
//!
//! Both listeners (outbound and admin) are bound with `SO_REUSEPORT`: a new
//! process binds the same ports while the old one still serves, and the
//! kernel spreads new connections over every process listening. The old
//! one, on SIGTERM, closes its listener first (so new connections go to the
//! new one only) and drains what it has (see [`crate::server`]).
//!
//! A process that finds its port already served (a takeover) binds at once,
//! so a taken port still fails start-up, but listens only once its routing
//! table is loaded (from the dump, or the bridge): until then the old
//! process keeps every new connection, instead of the new one answering
//! "no routes yet". A fresh start listens at once, as before.

use std::{io, net::SocketAddr};

use tokio::net::{TcpListener, TcpSocket};

/// Pending connections the kernel queues per listener.
pub const BACKLOG: u32 = 1024;

/// A bound socket, not yet listening.
#[derive(Debug)]
pub struct Bound {
    socket: TcpSocket,
    addr: SocketAddr,
    taken: bool,
}

// === impl Bound ===

impl Bound {
    /// Binds `addr` with `SO_REUSEPORT` (and `SO_REUSEADDR`); notes whether
    /// another process already listens there.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let taken = is_served(addr);
        let socket = new_socket(addr)?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        let addr = socket.local_addr()?;
        Ok(Self {
            socket,
            addr,
            taken,
        })
    }

    /// The bound address (the real port when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether another process listened on the address when it was bound:
    /// this process is taking over from it.
    pub fn is_takeover(&self) -> bool {
        self.taken
    }

    /// Starts listening: from now on the kernel hands this process its
    /// share of new connections.
    pub fn listen(self) -> io::Result<TcpListener> {
        self.socket.listen(BACKLOG)
    }
}

/// Whether a process listens on `addr` now: a bind without
/// `SO_REUSEPORT` is refused then. Never for port 0, which is always free.
fn is_served(addr: SocketAddr) -> bool {
    if addr.port() == 0 {
        return false;
    }
    let probe = new_socket(addr).and_then(|s| {
        s.set_reuseaddr(true)?;
        s.bind(addr)
    });
    matches!(probe, Err(e) if e.kind() == io::ErrorKind::AddrInUse)
}

fn new_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_process_binds_a_served_port_and_knows_it_takes_over() {
        let first = Bound::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(!first.is_takeover());
        let addr = first.addr();
        let listener = first.listen().unwrap();

        let second = Bound::bind(addr).unwrap();
        assert!(second.is_takeover());
        assert_eq!(second.addr(), addr);
        let second = second.listen().unwrap();

        // Once the first closes, every connection reaches the second.
        drop(listener);
        for _ in 0..5 {
            let client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (server, _) = second.accept().await.unwrap();
            assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());
        }
    }

    #[test]
    fn a_free_port_is_no_takeover() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let bound = Bound::bind(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
        assert!(!bound.is_takeover());
    }
}
