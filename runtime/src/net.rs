//! Listening sockets as every binary opens them.

use std::{io, net::SocketAddr};

use tokio::net::{TcpListener, TcpSocket};

/// A listener on `addr` with `SO_REUSEADDR` (a restart binds again at once)
/// and room for `backlog` pending connections.
pub fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
