//! `mesh.v1.Discovery` on the wire, served by hand rather than through
//! the generated server: its encoder would copy every message into a
//! per-stream buffer that keeps the size of the largest one (a whole
//! snapshot) for the life of the stream. Here a stream's messages go out
//! as the shared buffers they were put together from, and nothing of
//! them stays with the stream once sent. The request is decoded with
//! tonic's own decoder; the bytes on the wire are those of the generated
//! server.

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use futures::{StreamExt, future::BoxFuture, stream::BoxStream};
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use mesh_proto::v1::{RouteUpdate, WatchRequest, discovery_server::SERVICE_NAME};
use tonic::{
    Status, Streaming, body::Body, codec::Codec, metadata::GRPC_CONTENT_TYPE, server::NamedService,
};
use tonic_prost::ProstCodec;

use super::DiscoveryApi;

/// The one method of the service.
const WATCH_PATH: &str = "/mesh.v1.Discovery/Watch";

/// The messages of one stream, each as chunks.
pub(crate) type Messages = BoxStream<'static, Vec<Bytes>>;

/// A Watch response body: each message's chunks, then `grpc-status: 0`
/// when the stream ends (shutdown).
struct WatchBody {
    messages: Messages,
    queued: VecDeque<Bytes>,
    ended: bool,
}

// === impl DiscoveryApi ===

impl NamedService for DiscoveryApi {
    const NAME: &'static str = SERVICE_NAME;
}

impl tower::Service<http::Request<Body>> for DiscoveryApi {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != WATCH_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let api = self.clone();
        Box::pin(async move {
            let response = match decode(req).await {
                Ok(request) => api.watch(request).map(respond),
                Err(status) => Err(status),
            };
            Ok(response.unwrap_or_else(Status::into_http))
        })
    }
}

/// The request message, with the caller's metadata and address.
async fn decode(req: http::Request<Body>) -> Result<tonic::Request<WatchRequest>, Status> {
    let (metadata, extensions, body) = tonic::Request::from_http(req).into_parts();
    let mut codec = ProstCodec::<RouteUpdate, WatchRequest>::default();
    let mut stream = Streaming::new_request(codec.decoder(), body, None, None);
    let message = stream
        .message()
        .await?
        .ok_or_else(|| Status::internal("Missing request message."))?;
    Ok(tonic::Request::from_parts(metadata, extensions, message))
}

fn respond(messages: Messages) -> http::Response<Body> {
    let body = WatchBody {
        messages,
        queued: VecDeque::new(),
        ended: false,
    };
    let mut response = http::Response::new(Body::new(body));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
    response
}

// === impl WatchBody ===

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        loop {
            if let Some(chunk) = self.queued.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            match ready!(self.messages.poll_next_unpin(cx)) {
                Some(chunks) => self.queued.extend(chunks),
                None => {
                    self.ended = true;
                    let mut trailers = HeaderMap::new();
                    trailers.insert(Status::GRPC_STATUS, HeaderValue::from_static("0"));
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
        }
    }
}
