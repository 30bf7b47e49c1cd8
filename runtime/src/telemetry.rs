//! Traces, exported over OTLP/gRPC when an endpoint is configured
//! (`otlp_endpoint`), and nothing at all otherwise.
//!
//! [`Telemetry::init`] builds the exporter and a tracer provider whose
//! resource names the binary (`service.name`) and its node (`node`), and
//! installs the W3C trace-context propagator. Spans are queued and sent in
//! batches by the SDK's own thread: a request never waits for an export,
//! and when the collector is unreachable or slow the queue's overflow is
//! dropped (spans, never requests).
//!
//! Two kinds of spans exist:
//!
//! - [`HttpSpan`]: spans made by hand on a data path (the proxy's server
//!   and client spans), from the SDK directly. With tracing off
//!   [`HttpSpan::server`] is one atomic load returning `None`: no span, no
//!   header read.
//! - `tracing` spans, which [`crate::logging::init_traced`] exports through
//!   `tracing-opentelemetry`; [`grpc_server_span`] makes one per gRPC call
//!   a server answers, continuing the caller's `traceparent`.

use std::{sync::OnceLock, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _},
};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{SdkTracer, SdkTracerProvider},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The resource attribute naming the node a process runs on.
pub const NODE_ATTRIBUTE: &str = "node";

/// How long one export may take before its batch is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long shutting down waits for the last batch.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The tracer of [`HttpSpan`]s; set only when export is on.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Why tracing could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The endpoint is no URL the exporter takes.
    #[error("otlp_endpoint {endpoint:?} is not usable (expected http://host:port): {reason}")]
    Endpoint {
        /// The endpoint configured.
        endpoint: String,
        /// What the exporter said.
        reason: String,
    },
    /// Tracing was started twice in one process.
    #[error("tracing is already started in this process")]
    AlreadyStarted,
}

/// The running exporter; [`Telemetry::shutdown`] sends what is queued.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Starts OTLP/gRPC export to `endpoint` (`http://collector:4317`)
    /// for the binary `service` on `node`; `None` when no endpoint is
    /// configured, and then nothing is traced. Call it within the Tokio
    /// runtime, before [`crate::logging::init_traced`].
    pub fn init(
        service: &'static str,
        node: &str,
        endpoint: Option<&str>,
    ) -> Result<Option<Self>, TelemetryError> {
        let Some(endpoint) = endpoint.map(str::trim).filter(|e| !e.is_empty()) else {
            return Ok(None);
        };
        let bad = |reason: String| TelemetryError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(bad("the URL must start with http:// or https://".into()));
        }
        if TRACER.get().is_some() {
            return Err(TelemetryError::AlreadyStarted);
        }
        let exporter = SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let resource = Resource::builder()
            .with_service_name(service)
            .with_attribute(KeyValue::new(NODE_ATTRIBUTE, node.to_owned()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        TRACER
            .set(provider.tracer(service))
            .map_err(|_| TelemetryError::AlreadyStarted)?;
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(provider.clone());
        Ok(Some(Self { provider }))
    }

    /// The tracer `tracing` spans are exported with.
    pub(crate) fn tracer(&self) -> SdkTracer {
        self.provider.tracer("tracing")
    }

    /// Sends the spans still queued (within a few seconds) and stops the
    /// exporter. Call it on the way out, or the last batch is lost.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
                .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the last spans may not have been exported"),
            Err(e) => tracing::warn!(error = %e, "the trace exporter did not shut down"),
        }
    }
}

/// Whether spans are exported (an endpoint was configured).
#[inline]
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// A span of one HTTP request or attempt made on a data path; ended when
/// dropped (or by [`HttpSpan::end`]).
#[derive(Debug)]
pub struct HttpSpan {
    cx: Context,
}

impl HttpSpan {
    /// The server span of a request received with `headers`, continuing
    /// the trace of a valid `traceparent` (W3C trace context), else a new
    /// trace; `None` when tracing is off (then nothing is read).
    #[inline]
    pub fn server(name: &'static str, method: &Method, headers: &HeaderMap) -> Option<Self> {
        let tracer = TRACER.get()?;
        Some(Self::start_server(tracer, name, method, headers))
    }

    fn start_server(
        tracer: &SdkTracer,
        name: &'static str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Self {
        let parent = extract(headers);
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes([KeyValue::new("http.request.method", method.to_string())])
            .start_with_context(tracer, &parent);
        Self {
            cx: parent.with_span(span),
        }
    }

    /// A client span, child of this one, for one attempt to send the
    /// request on; [`HttpSpan::inject`] it into the request sent.
    pub fn client(&self, name: &'static str, attempt: u32) -> Self {
        let Some(tracer) = TRACER.get() else {
            return Self { cx: Context::new() };
        };
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new("mesh.attempt", i64::from(attempt))])
            .start_with_context(tracer, &self.cx);
        Self {
            cx: self.cx.with_span(span),
        }
    }

    /// Writes this span's context into `headers` as `traceparent` (and
    /// the trace's `tracestate`, when it has one), replacing what the
    /// caller sent: the next hop's spans are this span's children.
    pub fn inject(&self, headers: &mut HeaderMap) {
        TraceContextPropagator::new().inject_context(&self.cx, &mut HeaderInjector(headers));
    }

    /// The span's trace ID, lowercase hex.
    pub fn trace_id(&self) -> String {
        self.cx.span().span_context().trace_id().to_string()
    }

    /// Sets a string attribute.
    pub fn set_str(&self, key: &'static str, value: &str) {
        self.cx
            .span()
            .set_attribute(KeyValue::new(key, value.to_owned()));
    }

    /// Sets an integer attribute.
    pub fn set_i64(&self, key: &'static str, value: i64) {
        self.cx.span().set_attribute(KeyValue::new(key, value));
    }

    /// Records the response status; a 5xx marks the span failed.
    pub fn set_status_code(&self, status: u16) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 {
            span.set_status(Status::error(status.to_string()));
        }
    }

    /// Marks the span failed with `error` (no response was received).
    pub fn set_error(&self, error: &dyn std::fmt::Display) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("error.type", error.to_string()));
        span.set_status(Status::error(error.to_string()));
    }

    /// Ends the span now.
    pub fn end(self) {
        self.cx.span().end();
    }
}

/// The parent context `headers` carry: a valid `traceparent`'s, else an
/// empty one (a new trace). An invalid header is ignored, as the W3C spec
/// asks; the client span's `traceparent` then replaces it.
fn extract(headers: &HeaderMap) -> Context {
    if !headers.contains_key(TRACEPARENT) {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // One traceparent only: a repeated one is invalid.
        let mut values = self.0.get_all(key).iter();
        let first = values.next()?;
        if key == TRACEPARENT.as_str() && values.next().is_some() {
            return None;
        }
        first.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            "traceparent" => TRACEPARENT,
            "tracestate" => TRACESTATE,
            _ => return,
        };
        // An empty tracestate is not sent (W3C): the old one goes too.
        match HeaderValue::try_from(value) {
            Ok(value) if !value.is_empty() => {
                self.0.insert(name, value);
            }
            _ => {
                self.0.remove(name);
            }
        }
    }
}

/// A gRPC client transport (a tonic `Channel`, say) that, when tracing is
/// on, makes a `grpc.client` span per call, child of the current `tracing`
/// span (a new trace when there is none), and sends its `traceparent`, so
/// the server's `grpc.server` span is its child. With tracing off a call
/// passes as it is (one atomic load).
#[derive(Clone, Debug)]
pub struct Traced<S>(S);

/// A tonic channel whose calls are traced.
pub type TracedChannel = Traced<tonic::transport::Channel>;

/// `inner` with its calls traced.
pub fn traced<S>(inner: S) -> Traced<S> {
    Traced(inner)
}

impl<S, B, R> tonic::codegen::Service<http::Request<B>> for Traced<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tonic::codegen::BoxFuture<S::Response, S::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let Some(tracer) = TRACER.get() else {
            return Box::pin(self.0.call(request));
        };
        let parent = tracing::Span::current().context();
        let path = request.uri().path().to_owned();
        let span = tracer
            .span_builder(path.clone())
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.method", path),
            ])
            .start_with_context(tracer, &parent);
        let cx = parent.with_span(span);
        TraceContextPropagator::new()
            .inject_context(&cx, &mut HeaderInjector(request.headers_mut()));
        let call = self.0.call(request);
        Box::pin(async move {
            let result = call.await;
            let span = cx.span();
            match &result {
                // A trailers-only answer carries its status in the headers;
                // a streamed one's comes later, in trailers.
                Ok(response) => {
                    let code = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i64>().ok());
                    if let Some(code) = code {
                        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
                        if code != 0 {
                            span.set_status(Status::error(format!("grpc-status {code}")));
                        }
                    }
                }
                Err(_) => span.set_status(Status::error("transport error")),
            }
            span.end();
            result
        })
    }
}

/// The span of one gRPC call a server answers, for tonic's
/// `Server::builder().trace_fn(mesh_runtime::telemetry::grpc_server_span)`:
/// `grpc.server`, named by the call's method path and child of the
/// caller's `traceparent`, exported when tracing is on; while it is off,
/// no span at all.
pub fn grpc_server_span(req: &http::Request<()>) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let path = req.uri().path();
    let span = tracing::info_span!(
        target: "mesh_runtime::grpc",
        "grpc.server",
        otel.name = path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = path,
    );
    let parent = extract(req.headers());
    if parent.span().span_context().is_valid() {
        // Fails only when the OpenTelemetry layer is not installed.
        let _ = span.set_parent(parent);
    }
    span
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::SpanContext;

    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    /// The `traceparent` fields: version, trace ID, parent ID, flags.
    fn fields(headers: &HeaderMap) -> Vec<String> {
        headers["traceparent"]
            .to_str()
            .unwrap()
            .split('-')
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_valid_traceparent_is_the_parent_and_a_bad_one_is_ignored() {
        let valid = format!("00-{TRACE}-{PARENT}-01");
        let cx = extract(&headers(&[("traceparent", &valid)]));
        let parent = cx.span().span_context().clone();
        assert!(parent.is_valid() && parent.is_remote());
        assert_eq!(parent.trace_id().to_string(), TRACE);
        assert_eq!(parent.span_id().to_string(), PARENT);

        for bad in [
            "garbage".to_owned(),
            format!("00-{}-{PARENT}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("ff-{TRACE}-{PARENT}-01"),
        ] {
            let cx = extract(&headers(&[("traceparent", &bad)]));
            assert!(!cx.span().span_context().is_valid(), "{bad} is ignored");
        }
        // Two traceparent headers are no parent either.
        let twice = headers(&[("traceparent", &valid), ("traceparent", &valid)]);
        assert!(!extract(&twice).span().span_context().is_valid());
        assert!(!extract(&HeaderMap::new()).span().span_context().is_valid());
    }

    #[test]
    fn an_empty_tracestate_is_not_sent() {
        let mut sent = headers(&[("tracestate", "old=1")]);
        let mut injector = HeaderInjector(&mut sent);
        injector.set("tracestate", String::new());
        injector.set("other", "x".into());
        assert!(sent.is_empty(), "{sent:?}");
    }

    /// The one test that starts tracing (the tracer is per process): off,
    /// nothing is made; on, spans continue the caller's trace and send
    /// their own context on.
    #[tokio::test]
    async fn spans_exist_only_with_an_endpoint_and_carry_the_trace_on() {
        let valid = format!("00-{TRACE}-{PARENT}-01");
        let received = headers(&[("traceparent", &valid), ("tracestate", "vendor=x")]);
        assert!(Telemetry::init("test", "n1", None).unwrap().is_none());
        assert!(Telemetry::init("test", "n1", Some(" ")).unwrap().is_none());
        assert!(!enabled());
        assert!(HttpSpan::server("test.server", &Method::GET, &received).is_none());
        let mut call = http::Request::new(());
        *call.uri_mut() = "/mesh.Registry/Watch".parse().unwrap();
        assert!(grpc_server_span(&call).is_none());
        // What each gRPC server adds to its builder.
        let _ = tonic::transport::Server::builder().trace_fn(grpc_server_span);
        let bad = Telemetry::init("test", "n1", Some("collector:4317")).unwrap_err();
        assert!(bad.to_string().contains("collector:4317"), "{bad}");

        // Nothing listens there: spans are dropped, never waited for.
        let telemetry = Telemetry::init("test", "n1", Some("http://127.0.0.1:9"))
            .unwrap()
            .unwrap();
        assert!(enabled());
        assert!(matches!(
            Telemetry::init("test", "n1", Some("http://127.0.0.1:9")),
            Err(TelemetryError::AlreadyStarted)
        ));
        let server = HttpSpan::server("test.server", &Method::GET, &received).unwrap();
        assert_eq!(server.trace_id(), TRACE, "the caller's trace continues");
        let client = server.client("test.client", 1);
        let mut sent = received.clone();
        client.inject(&mut sent);
        let [version, trace, parent, flags] = fields(&sent).try_into().unwrap();
        assert_eq!((version.as_str(), trace.as_str()), ("00", TRACE));
        assert_ne!(parent, PARENT, "the next hop's parent is the client span");
        assert_eq!(
            parent,
            client.cx.span().span_context().span_id().to_string()
        );
        assert_eq!(flags, "01");
        assert_eq!(
            sent["tracestate"], "vendor=x",
            "the caller's tracestate is kept"
        );
        client.set_status_code(502);
        client.end();
        server.set_status_code(200);
        server.end();

        // An invalid traceparent: a new trace, whose context replaces it.
        let forged = headers(&[("traceparent", "00-zz-yy-01"), ("tracestate", "a=b")]);
        let server = HttpSpan::server("test.server", &Method::GET, &forged).unwrap();
        let client = server.client("test.client", 1);
        let mut sent = forged.clone();
        client.inject(&mut sent);
        let [_, trace, _, _] = fields(&sent).try_into().unwrap();
        assert_eq!(trace, server.trace_id());
        assert_ne!(trace, TRACE);
        assert!(sent.get("tracestate").is_none(), "{sent:?}");
        drop((client, server));

        // A gRPC call's span continues its caller's trace.
        let mut call = http::Request::new(());
        *call.uri_mut() = "/mesh.Registry/Watch".parse().unwrap();
        call.headers_mut()
            .insert("traceparent", valid.parse().unwrap());
        let subscriber = {
            use tracing_subscriber::layer::SubscriberExt;
            tracing_subscriber::registry()
                .with(tracing_opentelemetry::layer().with_tracer(telemetry.tracer()))
        };
        let traced = tracing::subscriber::with_default(subscriber, || {
            let span = grpc_server_span(&call);
            let cx = span.context();
            let traced: SpanContext = cx.span().span_context().clone();
            traced
        });
        assert_eq!(traced.trace_id().to_string(), TRACE);
        assert_ne!(traced.span_id().to_string(), PARENT);
        telemetry.shutdown().await;
    }
}
