//! The dashboard: the mesh as an operator sees it, served by every
//! mesh-control replica on its HTTP port.
//!
//! | path | what |
//! |---|---|
//! | `GET /` | redirects to `/ui/` |
//! | `GET /ui/` | the page (`#/nodes`, `#/nodes/{node}`, `#/nodes/{node}/versions/{n}`, `#/services`, `#/rollouts`, `#/deployments`, `#/alerts`, `#/intentions`) |
//! | `GET /ui/app.js`, `GET /ui/app.css` | its script and style |
//! | `GET /v1/events` | Server-Sent Events: `state` events, each the whole [`Snapshot`] as JSON |
//!
//! The page is hand-written HTML, CSS and JavaScript compiled into the
//! binary: nothing is built or fetched at run time. It renders each `state`
//! event it receives, and fetches a version's diff from the REST API
//! (`/v1/nodes/{node}/versions/{n}`) when it shows one. Every answer of
//! the dashboard carries a strict Content-Security-Policy (scripts, styles
//! and connections from this origin only, no inline code), and the script
//! builds the page with DOM calls and text nodes only: names, tags, check
//! outputs and diffs are shown as text, never parsed as HTML. mesh-monitor's
//! alerts come in the same snapshot (the monitor is asked by mesh-control,
//! never by the page), with a count in the navigation on every page.
//!
//! - [`state`]: the [`Snapshot`] pushed to the page, and how it is put together.
//! - [`publish`]: the one task per replica that keeps it fresh while a page is open.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{
        IntoResponse, Redirect, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use futures::Stream;
use mesh_runtime::shutdown::Shutdown;
use tokio::sync::watch;

pub mod publish;
pub mod state;

pub use self::{
    publish::{ConsulSource, Publisher, Source, Subscriptions},
    state::Snapshot,
};

/// The page.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");

/// The page's script.
pub const APP_JS: &str = include_str!("../assets/app.js");

/// The page's style.
pub const APP_CSS: &str = include_str!("../assets/app.css");

/// Where every dashboard answer may load from: this origin only, no inline
/// script or style, no frames, no forms, no plugins.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// How often an idle event stream sends a comment, so that nothing on the
/// way closes it as idle.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How long a browser waits before it reconnects a lost event stream.
pub const RECONNECT: Duration = Duration::from_secs(1);

/// What the dashboard's handlers share.
#[derive(Clone, Debug)]
pub struct Dashboard {
    subscriptions: Subscriptions,
    shutdown: Shutdown,
}

// === impl Dashboard ===

impl Dashboard {
    /// Serves pages and events from `subscriptions`; event streams end on
    /// `shutdown`, so that the HTTP server can drain.
    pub fn new(subscriptions: Subscriptions, shutdown: Shutdown) -> Self {
        Self {
            subscriptions,
            shutdown,
        }
    }

    /// The dashboard's routes.
    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(|| async { Redirect::to("/ui/") }))
            .route("/ui", get(|| async { Redirect::to("/ui/") }))
            .route(
                "/ui/",
                get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
            )
            .route(
                "/ui/app.js",
                get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
            )
            .route(
                "/ui/app.css",
                get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
            )
            .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
            .route("/v1/events", get(events))
            .with_state(self)
    }
}

/// A compiled-in file with its type and the dashboard's headers.
pub fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The assets change with the binary; a stale script must not outlive
    // an upgrade.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(headers);
    response
}

/// The headers every dashboard answer carries.
fn secure(headers: &mut axum::http::HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

/// `GET /v1/events`: the state now (once known), then on every change.
async fn events(State(dashboard): State<Dashboard>) -> Response {
    let stream = state_events(dashboard.subscriptions.subscribe(), dashboard.shutdown);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secure(headers);
    response
}

/// A `state` event per snapshot `rx` sees, until the publisher stops or
/// `shutdown`.
pub fn state_events(
    rx: watch::Receiver<Option<Arc<Snapshot>>>,
    shutdown: Shutdown,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    futures::stream::unfold((rx, shutdown), |(mut rx, mut shutdown)| async move {
        loop {
            tokio::select! {
                _ = shutdown.requested() => return None,
                changed = rx.changed() => changed.ok()?,
            }
            let snapshot = rx.borrow_and_update().clone();
            if let Some(snapshot) = snapshot {
                return Some((Ok(state_event(&snapshot)), (rx, shutdown)));
            }
        }
    })
}

/// One snapshot as an SSE event.
pub fn state_event(snapshot: &Snapshot) -> Event {
    Event::default()
        .event("state")
        .retry(RECONNECT)
        .data(snapshot.to_json())
}

#[cfg(test)]
mod tests;
