//! The two body types of the request path, as enums rather than boxes so
//! that forwarding a request allocates nothing for its bodies:
//! [`ProxyBody`] (what a client receives: an instance's streamed answer or
//! a small local one) and [`UpstreamBody`] (what an instance receives: the
//! client's streamed body, or nothing when a bodyless request is replayed).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::{access_log::LoggedBody, h1::BoxError, retry::RetryBody, upstream::PooledBody};

/// A response body sent to a client.
#[derive(Debug)]
pub enum ProxyBody {
    /// An instance's answer, streamed; its connection goes back to the pool
    /// when the body has been read to the end.
    Upstream(PooledBody),
    /// A local answer (an error, the agent API), sent in one frame.
    Full(Option<Bytes>),
    /// Either of the above, logged to the access log when it ends (boxed:
    /// only a proxy with an access log pays for it).
    Logged(Box<LoggedBody>),
}

/// A request body sent to an instance.
#[derive(Debug)]
pub enum UpstreamBody {
    /// The client's body, streamed.
    Incoming(Incoming),
    /// No body: a replayed bodyless request.
    Empty,
    /// A body that may be sent again: the client's, copied as it streams,
    /// or the copy (see [`crate::retry`]).
    Retry(RetryBody),
}

// === impl ProxyBody ===

impl ProxyBody {
    /// A body of `bytes` (none when empty).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self::Full((!bytes.is_empty()).then_some(bytes))
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Upstream(body) => Pin::new(body).poll_frame(cx),
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Logged(body) => Pin::new(body.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(body) => body.is_end_stream(),
            Self::Full(bytes) => bytes.is_none(),
            Self::Logged(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream(body) => body.size_hint(),
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Logged(body) => body.size_hint(),
        }
    }
}

// === impl UpstreamBody ===

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Incoming(body) => Pin::new(body).poll_frame(cx),
            Self::Empty => Poll::Ready(None),
            Self::Retry(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Incoming(body) => body.is_end_stream(),
            Self::Empty => true,
            Self::Retry(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Incoming(body) => body.size_hint(),
            Self::Empty => SizeHint::with_exact(0),
            Self::Retry(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn full_body_is_one_frame_with_exact_size() {
        let body = ProxyBody::full("hello");
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello");
        assert!(ProxyBody::empty().is_end_stream());
        assert!(ProxyBody::full("").is_end_stream());
    }
}
