//! The upstream every benchmarked request ends at: HTTP/1.1 with
//! keep-alive, or HTTP/2 with prior knowledge (h2c) on the same port,
//! answering any request with the same 200 and a small body, as fast as
//! hyper goes. It runs in its own process (`bench-upstream`) on
//! a single-threaded runtime, pinned to the load generator's CPU.

use std::{convert::Infallible, io};

use bytes::Bytes;
use http::{Response, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

/// The body of every answer.
pub const BODY: &[u8] = b"hello from the bench upstream\n";

/// Serves until the process ends.
pub async fn serve(listener: TcpListener) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let service = service_fn(|_req| async {
                let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
                Ok::<_, Infallible>(response)
            });
            // A client that goes away mid-request is no news in a benchmark.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
