//! An OTLP/gRPC trace receiver inside a node's namespace (the collector a
//! component's `otlp_endpoint` names), built from the official OTLP
//! protobuf definitions (`opentelemetry-proto`): it accepts every export
//! and keeps each span with the resource it came from, for a test to read.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{Context as _, Result};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::netns::Netns;

/// `Span.kind` of a server span (OTLP `SPAN_KIND_SERVER`).
pub const KIND_SERVER: i32 = 2;
/// `Span.kind` of a client span (OTLP `SPAN_KIND_CLIENT`).
pub const KIND_CLIENT: i32 = 3;
/// `Status.code` of a failed span (OTLP `STATUS_CODE_ERROR`).
pub const STATUS_ERROR: i32 = 2;

/// One span as received, IDs in lowercase hex (empty: none).
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// The resource's `node`.
    pub node: String,
    /// The span's name.
    pub name: String,
    /// OTLP span kind ([`KIND_SERVER`], [`KIND_CLIENT`], ...).
    pub kind: i32,
    /// Its trace.
    pub trace_id: String,
    /// Its own ID.
    pub span_id: String,
    /// Its parent's ID; empty for a root span.
    pub parent_span_id: String,
    /// Its attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// OTLP status code (0 unset, 1 ok, 2 error).
    pub status: i32,
}

impl ReceivedSpan {
    /// The attribute `key`, if set.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// A running receiver; dropping it stops it.
#[derive(Debug)]
pub struct OtlpReceiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    task: JoinHandle<()>,
}

impl OtlpReceiver {
    /// Listens for OTLP/gRPC on `listen` inside `ns`.
    pub async fn start(ns: &Netns, listen: SocketAddr) -> Result<Self> {
        let socket = ns.socket(listen.is_ipv4()).await?;
        socket.set_reuseaddr(true)?;
        socket
            .bind(listen)
            .with_context(|| format!("otlp receiver: bind {listen} in {}", ns.name()))?;
        let listener = socket.listen(64)?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let service = TraceServiceServer::new(Keeper {
            spans: spans.clone(),
        });
        let task = tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
            {
                eprintln!("otlp receiver stopped: {e}");
            }
        });
        Ok(Self {
            endpoint: format!("http://{listen}"),
            spans,
            task,
        })
    }

    /// The `otlp_endpoint` to give a component.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The spans of trace `trace_id` received so far.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `TraceService` that keeps what it is sent.
struct Keeper {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Keeper {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            let node = resource.get("node").cloned().unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    node: node.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                    status: span.status.map_or(0, |s| s.code),
                });
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(received);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Attributes as text: strings as they are, other values as written.
fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v: &AnyValue| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}
