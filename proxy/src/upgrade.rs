//! HTTP/1.1 upgrades (WebSocket and the like), tunnelled only once the
//! instance agreed.
//!
//! The proxy forwards an upgrade request with its `Connection: upgrade` and
//! `Upgrade` headers over HTTP/1.1 and waits for the answer. On `101
//! Switching Protocols` it relays the 101 to the client and, once both
//! sides have switched (`hyper::upgrade::on` on the client's request; the
//! instance's socket comes with its response, [`crate::h1::Upgraded`]),
//! copies bytes both ways until one side
//! closes. Any other answer ends the upgrade: it is relayed as a normal
//! response and the client's connection stays plain HTTP.
//!
//! Tunnels are owned by [`Tunnels`]: the listener waits for them when it
//! drains, and they are closed when the grace period ends.

use std::{mem, sync::Mutex, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::{
    body::ProxyBody,
    error::json_error,
    h1::{Io, Upgraded},
};

/// Time the client's side gets to complete its switch after the 101.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The open tunnels, each a task copying bytes.
#[derive(Debug, Default)]
pub struct Tunnels {
    tasks: Mutex<JoinSet<()>>,
}

// === impl Tunnels ===

impl Tunnels {
    /// Finishes a request whose answer is a 101: with `client`, the
    /// client's side of its upgrade, a tunnel opens and the 101 is
    /// relayed. A 101 to a request that asked for no upgrade breaks the
    /// protocol and becomes a 502.
    pub fn open(
        &self,
        service: &str,
        client: Option<OnUpgrade>,
        mut response: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let Some(client) = client else {
            tracing::warn!(
                service,
                "instance answered 101 to a request that asked for no upgrade"
            );
            return json_error(
                StatusCode::BAD_GATEWAY,
                "upstream_failed",
                &format!("an instance of {service:?} switched protocols unasked"),
                Some(service),
            );
        };
        let Some((upstream, early)) = response
            .extensions_mut()
            .remove::<Upgraded>()
            .and_then(|u| u.take())
        else {
            return json_error(
                StatusCode::BAD_GATEWAY,
                "upstream_failed",
                &format!(
                    "an instance of {service:?} switched protocols over a connection that cannot be tunnelled"
                ),
                Some(service),
            );
        };
        let span = tracing::debug_span!("tunnel", service);
        let tunnel = async move {
            match tokio::time::timeout(SWITCH_TIMEOUT, client).await {
                Ok(Ok(client)) => copy(client, upstream, early).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "upgrade failed"),
                Err(_) => tracing::debug!("upgrade did not complete in time"),
            }
        };
        let mut tasks = self.lock();
        // Reap the tunnels that ended, so the set holds open ones only.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(tunnel.instrument(span));
        response
    }

    /// Number of open tunnels.
    pub fn len(&self) -> usize {
        let mut tasks = self.lock();
        while tasks.try_join_next().is_some() {}
        tasks.len()
    }

    /// Whether no tunnel is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until every tunnel has closed, including ones opened while
    /// waiting. Dropping the future (at the end of the grace period)
    /// closes the tunnels it waits for.
    pub async fn drain(&self) {
        loop {
            let mut open = mem::take(&mut *self.lock());
            if open.is_empty() {
                return;
            }
            while open.join_next().await.is_some() {}
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JoinSet<()>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Copies bytes both ways; `early`, what the instance sent right after
/// its 101, goes to the client first.
async fn copy(client: hyper::upgrade::Upgraded, mut upstream: Io, early: Bytes) {
    let mut client = TokioIo::new(client);
    if !early.is_empty()
        && let Err(e) = client.write_all(&early).await
    {
        tracing::debug!(error = %e, "tunnel ended with an error");
        return;
    }
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => tracing::debug!(up, down, "tunnel closed"),
        Err(e) => tracing::debug!(error = %e, "tunnel ended with an error"),
    }
}
