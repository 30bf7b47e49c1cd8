//! `meshctl`'s commands that talk to mesh-control over gRPC: `status`,
//! `nodes`, `services`, `routes get|set`, `versions`, `render`,
//! `register`, `deregister`, and `rollout …` and `deploy …` (in their
//! own modules); `intentions …`, over mesh-control's REST API; and
//! `alerts`, which asks mesh-monitor itself. Each prints a table (or JSON with
//! `--output json`); a failure is one line and an exit code that says what
//! to do about it ([`CtlError::exit_code`]).

use std::{fmt::Write as _, path::Path, time::Duration};

pub mod alerts;
pub mod deploy;
pub mod intentions;
pub mod rollout;

pub use self::{
    alerts::{AlertsCtl, DEFAULT_MONITOR_ADDR},
    deploy::DeployArgs,
    intentions::{DEFAULT_CONTROL_HTTP, IntentionsCtl},
    rollout::{StageArgs, StartArgs},
};

use mesh_proto::v1::{self as pb, control_client::ControlClient};
use serde::Serialize;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use crate::{
    control::{
        self, CheckInfo, InstanceInfo, NodeInfo, NodeRoutes, ProxyStatus, Registration, Rendered,
        ServiceInfo, SetRoutesResult, Status, VersionSummary, VersionView, error_chain,
    },
    grpc::{routes_from_pb, routes_pb},
    model::{RouteFile, RouteSpec},
    render::Format,
};

/// Default mesh-control gRPC address.
pub const DEFAULT_CONTROL_ADDR: &str = "http://127.0.0.1:8892";

/// How long connecting to mesh-control may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for programs.
    Json,
}

/// A failed command: the line to print and the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CtlError {
    /// What went wrong, in one line.
    pub message: String,
    /// 65 bad input or unknown name, 69 mesh-control (or what it needs)
    /// unreachable, 75 a conflict (read again and retry), 1 anything else.
    pub exit_code: i32,
}

/// A client of `mesh.v1.Control` sending mesh-control's `api_token`.
pub type Client = ControlClient<InterceptedService<Channel, ApiToken>>;

/// A connected client and how to print.
#[derive(Debug)]
pub struct Ctl {
    client: Client,
    channel: Channel,
    token: ApiToken,
    output: Output,
    addr: String,
}

/// Adds `authorization: Bearer <api_token>` to every call, when set; its
/// `Debug` shows no token.
#[derive(Clone, Default)]
pub struct ApiToken(Option<tonic::metadata::AsciiMetadataValue>);

/// `meshctl routes set` input.
#[derive(Clone, Debug)]
pub struct SetRoutesArgs {
    /// The node.
    pub node: String,
    /// The route file.
    pub file: std::path::PathBuf,
    /// The revision to base the change on; `None`: the current one.
    pub expect_revision: Option<u64>,
    /// Who makes the change.
    pub author: String,
}

/// `meshctl render` input.
#[derive(Clone, Debug)]
pub struct RenderArgs {
    /// The node.
    pub node: String,
    /// proxy or nginx.
    pub format: Format,
    /// The version; 0: the newest.
    pub version: u64,
    /// For nginx: upsync or static; empty: mesh-control's setting.
    pub upstreams: String,
    /// Print the diff against the previous version instead of the config.
    pub diff: bool,
}

// === impl CtlError ===

impl CtlError {
    pub(crate) fn new(message: impl Into<String>, exit_code: i32) -> Self {
        Self {
            message: message.into(),
            exit_code,
        }
    }

    pub(crate) fn from_status(status: &tonic::Status) -> Self {
        let code = match status.code() {
            tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::FailedPrecondition => 65,
            tonic::Code::Unavailable => 69,
            tonic::Code::Aborted => 75,
            _ => 1,
        };
        Self::new(status.message(), code)
    }
}

// === impl Ctl ===

impl Ctl {
    /// Connects to mesh-control at `addr`; unreachable is one line naming it.
    pub async fn connect(addr: &str, output: Output) -> Result<Self, CtlError> {
        let endpoint = Endpoint::from_shared(addr.to_owned())
            .map_err(|e| CtlError::new(format!("control_addr: {addr:?} is not a URL: {e}"), 64))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        let channel = endpoint.connect().await.map_err(|e| {
            CtlError::new(
                format!(
                    "cannot reach mesh-control at {addr}: {} (is it running? set --control-addr or MESH_CONTROL_ADDR)",
                    error_chain(&e)
                ),
                69,
            )
        })?;
        Ok(Self {
            client: ControlClient::with_interceptor(channel.clone(), ApiToken::default()),
            channel,
            token: ApiToken::default(),
            output,
            addr: addr.to_owned(),
        })
    }

    /// Sends `token` (mesh-control's `api_token`) with every call; none or
    /// blank: no header.
    pub fn with_api_token(mut self, token: Option<&str>) -> Result<Self, CtlError> {
        self.token = ApiToken::new(token)?;
        self.client = ControlClient::with_interceptor(self.channel.clone(), self.token.clone());
        Ok(self)
    }

    /// The token sent, for a client on another channel.
    pub(crate) fn api_token(&self) -> ApiToken {
        self.token.clone()
    }

    pub(crate) fn print<T: Serialize>(
        &self,
        value: &T,
        table: impl FnOnce(&T) -> String,
    ) -> String {
        match self.output {
            Output::Json => {
                let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
                text.push('\n');
                text
            }
            Output::Table => table(value),
        }
    }

    /// `meshctl status`.
    pub async fn status(&mut self) -> Result<String, CtlError> {
        let s = self
            .call(|mut c| async move { c.get_status(pb::GetStatusRequest {}).await })
            .await?;
        let status = Status {
            replica: s.replica,
            is_leader: s.is_leader,
            leader: s.leader,
            leader_grpc: s.leader_grpc,
            leader_http: s.leader_http,
            leader_since: s.leader_since,
        };
        Ok(self.print(&status, status_table))
    }

    /// `meshctl nodes`.
    pub async fn nodes(&mut self) -> Result<String, CtlError> {
        let r = self
            .call(|mut c| async move { c.list_nodes(pb::ListNodesRequest {}).await })
            .await?;
        let nodes: Vec<NodeInfo> = r.nodes.into_iter().map(node_from_pb).collect();
        Ok(self.print(&nodes, |n| nodes_table(n)))
    }

    /// `meshctl services`.
    pub async fn services(&mut self) -> Result<String, CtlError> {
        let r = self
            .call(|mut c| async move { c.list_services(pb::ListServicesRequest {}).await })
            .await?;
        let services: Vec<ServiceInfo> = r.services.into_iter().map(service_from_pb).collect();
        Ok(self.print(&services, |s| services_table(s)))
    }

    /// `meshctl routes get NODE`.
    pub async fn routes_get(&mut self, node: &str) -> Result<String, CtlError> {
        let routes = self.routes(node).await?;
        Ok(self.print(&routes, routes_table))
    }

    async fn routes(&mut self, node: &str) -> Result<NodeRoutes, CtlError> {
        let node = node.to_owned();
        let r = self
            .call(|mut c| async move { c.get_routes(pb::GetRoutesRequest { node }).await })
            .await?;
        Ok(NodeRoutes {
            node: r.node,
            revision: r.revision,
            version: r.version,
            routes: routes_from_pb(r.routes).map_err(|e| CtlError::new(e.to_string(), 1))?,
        })
    }

    /// `meshctl routes set NODE -f FILE [--expect-revision N]`.
    pub async fn routes_set(&mut self, args: SetRoutesArgs) -> Result<String, CtlError> {
        let routes = read_route_file(&args.file)?;
        let expected_revision = match args.expect_revision {
            Some(n) => n,
            None => self.routes(&args.node).await?.revision,
        };
        let request = pb::SetRoutesRequest {
            node: args.node,
            routes: routes_pb(routes),
            expected_revision,
            author: args.author,
        };
        let r = self
            .call(|mut c| async move { c.set_routes(request).await })
            .await?;
        let result = SetRoutesResult {
            version: version_from_pb(r.version.unwrap_or_default()),
            revision: r.revision,
        };
        Ok(self.print(&result, |r| {
            let v = &r.version;
            let mut text = format!(
                "node {}: stored config version {} by {} (revision {})\n",
                v.node, v.number, v.author, r.revision
            );
            text.push_str(&v.diff);
            text
        }))
    }

    /// `meshctl versions NODE [NUMBER]`.
    pub async fn versions(&mut self, node: &str, number: Option<u64>) -> Result<String, CtlError> {
        let node = node.to_owned();
        if let Some(number) = number {
            let v =
                self.call(|mut c| async move {
                    c.get_version(pb::GetVersionRequest { node, number }).await
                })
                .await?;
            let view = version_from_pb(v);
            return Ok(self.print(&view, version_text));
        }
        let r = self
            .call(|mut c| async move { c.list_versions(pb::ListVersionsRequest { node }).await })
            .await?;
        let versions: Vec<VersionSummary> = r
            .versions
            .into_iter()
            .map(|v| VersionSummary {
                number: v.number,
                author: v.author,
                created_at: v.created_at,
                routes: v.routes,
                current: v.current,
            })
            .collect();
        Ok(self.print(&versions, |v| versions_table(v)))
    }

    /// `meshctl render --node N --format proxy|nginx [--diff]`.
    pub async fn render(&mut self, args: RenderArgs) -> Result<String, CtlError> {
        let request = pb::RenderRequest {
            node: args.node,
            format: args.format.to_string(),
            version: args.version,
            upstreams: args.upstreams,
        };
        let r = self
            .call(|mut c| async move { c.render(request).await })
            .await?;
        let rendered = Rendered {
            node: r.node,
            version: r.version,
            format: args.format,
            text: r.text,
            diff: r.diff,
        };
        Ok(self.print(&rendered, |r| {
            if args.diff {
                r.diff.clone()
            } else {
                r.text.clone()
            }
        }))
    }

    /// `meshctl register NODE …`.
    pub async fn register(
        &mut self,
        node: &str,
        registration: Registration,
    ) -> Result<String, CtlError> {
        let id = if registration.id.is_empty() {
            registration.name.clone()
        } else {
            registration.id.clone()
        };
        let request = pb::ControlRegisterRequest {
            node: node.to_owned(),
            service: Some(control::to_proto(registration)),
        };
        let r = self
            .call(|mut c| async move { c.register(request).await })
            .await?;
        let result = control::RegisterResult { queued: r.queued };
        Ok(self.print(&result, |r| {
            if r.queued {
                format!("{node}: {id} queued (the node's Consul agent is away; its bridge applies it later)\n")
            } else {
                format!("{node}: registered {id}\n")
            }
        }))
    }

    /// `meshctl deregister NODE ID`.
    pub async fn deregister(&mut self, node: &str, id: &str) -> Result<String, CtlError> {
        let request = pb::ControlDeregisterRequest {
            node: node.to_owned(),
            id: id.to_owned(),
        };
        let r = self
            .call(|mut c| async move { c.deregister(request).await })
            .await?;
        let result = control::RegisterResult { queued: r.queued };
        Ok(self.print(&result, |r| {
            if r.queued {
                format!("{node}: deregistration of {id} queued\n")
            } else {
                format!("{node}: deregistered {id}\n")
            }
        }))
    }

    pub(crate) async fn call<T, F, Fut>(&mut self, call: F) -> Result<T, CtlError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        call(self.client.clone())
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| CtlError::from_status(&s))
    }
}

// === impl ApiToken ===

impl ApiToken {
    /// `Bearer <token>` as a metadata value marked sensitive.
    pub fn new(token: Option<&str>) -> Result<Self, CtlError> {
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(Self(None));
        };
        let mut value: tonic::metadata::AsciiMetadataValue = format!("Bearer {token}")
            .parse()
            .map_err(|_| CtlError::new("api_token: only printable ASCII may be used", 64))?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl tonic::service::Interceptor for ApiToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ApiToken(<redacted>)"
        } else {
            "ApiToken(None)"
        })
    }
}

/// Reads and parses a route file; a bad one is one line (exit 65).
pub fn read_route_file(
    path: &Path,
) -> Result<std::collections::BTreeMap<String, RouteSpec>, CtlError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CtlError::new(format!("route file {}: {e}", path.display()), 65))?;
    RouteFile::parse(path, &text)
        .map(|f| f.routes)
        .map_err(|e| CtlError::new(e, 65))
}

// === conversions from messages ===

fn node_from_pb(n: pb::NodeInfo) -> NodeInfo {
    let proxy = n.proxy.map_or_else(ProxyStatus::unknown, |p| ProxyStatus {
        state: p.state,
        version_in_effect: p.version_in_effect,
        last_seen: p.last_seen,
        refused_version: p.refused_version,
        reason: p.reason,
    });
    NodeInfo {
        name: n.name,
        address: n.address,
        datacenter: n.datacenter,
        routes_version: n.routes_version,
        proxy,
    }
}

fn service_from_pb(s: pb::ServiceInfo) -> ServiceInfo {
    ServiceInfo {
        name: s.name,
        tags: s.tags,
        instances: s
            .instances
            .into_iter()
            .map(|i| InstanceInfo {
                id: i.id,
                node: i.node,
                address: i.address,
                port: i.port,
                tags: i.tags,
                meta: i.meta.into_iter().collect(),
                health: i.health,
                checks: i
                    .checks
                    .into_iter()
                    .map(|c| CheckInfo {
                        id: c.id,
                        status: c.status,
                        output: c.output,
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn version_from_pb(v: pb::ConfigVersion) -> VersionView {
    VersionView {
        node: v.node,
        number: v.number,
        author: v.author,
        created_at: v.created_at,
        routes: routes_from_pb(v.routes).unwrap_or_default(),
        rendered: v.rendered,
        diff: v.diff,
    }
}

// === tables ===

/// Rows as aligned columns, two spaces apart; empty cells show `-`.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    let cell = |c: &String| {
        if c.is_empty() {
            "-".to_owned()
        } else {
            c.clone()
        }
    };
    for row in rows {
        for (k, c) in row.iter().enumerate() {
            widths[k] = widths[k].max(cell(c).chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        for (k, c) in cells.into_iter().enumerate() {
            if k == last {
                out.push_str(&c);
            } else {
                let _ = write!(out, "{c:<w$}  ", w = widths[k]);
            }
        }
        out.push('\n');
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.iter().map(cell).collect());
    }
    out
}

fn status_table(s: &Status) -> String {
    let leader = if s.leader.is_empty() {
        "none".to_owned()
    } else {
        format!(
            "{} (gRPC {}, HTTP {}, since {})",
            s.leader, s.leader_grpc, s.leader_http, s.leader_since
        )
    };
    format!(
        "replica  {}{}\nleader   {leader}\n",
        s.replica,
        if s.is_leader { " (leader)" } else { "" }
    )
}

fn nodes_table(nodes: &[NodeInfo]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.address.clone(),
                n.datacenter.clone(),
                version_cell(n.routes_version),
                n.proxy.state.clone(),
                version_cell(n.proxy.version_in_effect),
                n.proxy.last_seen.clone(),
                refused_cell(&n.proxy),
            ]
        })
        .collect();
    table(
        &[
            "NODE",
            "ADDRESS",
            "DATACENTER",
            "ROUTES VERSION",
            "PROXY",
            "IN EFFECT",
            "LAST SEEN",
            "REFUSED",
        ],
        &rows,
    )
}

/// The newest version the proxy refused and why (`v4: <reason>`); empty
/// when it refused none.
fn refused_cell(proxy: &ProxyStatus) -> String {
    match proxy.refused_version {
        0 => String::new(),
        v => format!("v{v}: {}", proxy.reason),
    }
}

fn services_table(services: &[ServiceInfo]) -> String {
    let mut rows = Vec::new();
    for s in services {
        if s.instances.is_empty() {
            rows.push(vec![
                s.name.clone(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        for i in &s.instances {
            rows.push(vec![
                s.name.clone(),
                i.id.clone(),
                i.node.clone(),
                format!("{}:{}", i.address, i.port),
                i.health.clone(),
                i.tags.join(","),
            ]);
        }
    }
    table(
        &["SERVICE", "INSTANCE", "NODE", "ADDRESS", "HEALTH", "TAGS"],
        &rows,
    )
}

fn routes_table(r: &NodeRoutes) -> String {
    let mut text = if r.version == 0 {
        format!("node {}: no routes yet (revision 0)\n", r.node)
    } else {
        format!(
            "node {}: config version {}, revision {}\n",
            r.node, r.version, r.revision
        )
    };
    if r.routes.is_empty() {
        return text;
    }
    let rows: Vec<Vec<String>> = r
        .routes
        .iter()
        .map(|(service, spec)| {
            let hash = match (&spec.hash_header, &spec.hash_cookie) {
                (Some(h), _) => format!("header {h}"),
                (None, Some(c)) => format!("cookie {c}"),
                (None, None) => String::new(),
            };
            vec![
                service.clone(),
                spec.timeout.clone().unwrap_or_default(),
                spec.per_try_timeout.clone().unwrap_or_default(),
                spec.retries.map(|n| n.to_string()).unwrap_or_default(),
                spec.lb.clone().unwrap_or_default(),
                spec.weights
                    .iter()
                    .map(|(k, w)| format!("{k}={w}"))
                    .collect::<Vec<_>>()
                    .join(","),
                hash,
            ]
        })
        .collect();
    text.push_str(&table(
        &[
            "SERVICE", "TIMEOUT", "PER-TRY", "RETRIES", "LB", "WEIGHTS", "HASH",
        ],
        &rows,
    ));
    text
}

/// Versions, with the current one marked and the newer ones named staged.
fn versions_table(versions: &[VersionSummary]) -> String {
    let current = versions.iter().find(|v| v.current).map_or(0, |v| v.number);
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|v| {
            let state = if v.current {
                "current"
            } else if v.number > current {
                "staged"
            } else {
                ""
            };
            vec![
                v.number.to_string(),
                state.to_owned(),
                v.author.clone(),
                v.created_at.clone(),
                v.routes.to_string(),
            ]
        })
        .collect();
    table(&["VERSION", "STATE", "AUTHOR", "CREATED", "ROUTES"], &rows)
}

fn version_text(v: &VersionView) -> String {
    format!(
        "node {} config version {} by {} at {}\n\n{}\n{}",
        v.node, v.number, v.author, v.created_at, v.rendered, v.diff
    )
}

fn version_cell(n: u64) -> String {
    if n == 0 { String::new() } else { n.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_mark_empty_cells() {
        let text = table(
            &["NODE", "VERSION"],
            &[
                vec!["n1".into(), "3".into()],
                vec!["node-two".into(), String::new()],
            ],
        );
        assert_eq!(text, "NODE      VERSION\nn1        3\nnode-two  -\n");
    }

    #[test]
    fn the_nodes_table_shows_each_proxy_s_state_and_what_it_refused() {
        let node = |name: &str, proxy: ProxyStatus| NodeInfo {
            name: name.into(),
            address: "10.0.0.1".into(),
            datacenter: "dc1".into(),
            routes_version: 4,
            proxy,
        };
        let refused = ProxyStatus {
            state: "refused".into(),
            version_in_effect: 3,
            last_seen: "2026-01-01T00:00:00.000Z".into(),
            refused_version: 4,
            reason: "routes.web.retries: 11 is more than 10".into(),
        };
        let text = nodes_table(&[node("n1", refused), node("n2", ProxyStatus::unknown())]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].ends_with("LAST SEEN                 REFUSED"),
            "{text}"
        );
        assert!(
            lines[1].contains("refused  3          2026-01-01T00:00:00.000Z  v4: routes.web.retries: 11 is more than 10"),
            "{text}"
        );
        assert!(lines[2].contains("unknown  -          -"), "{text}");
    }

    #[test]
    fn statuses_map_to_exit_codes_that_say_what_to_do() {
        for (code, exit) in [
            (tonic::Code::InvalidArgument, 65),
            (tonic::Code::NotFound, 65),
            (tonic::Code::Aborted, 75),
            (tonic::Code::Unavailable, 69),
            (tonic::Code::Internal, 1),
        ] {
            let e = CtlError::from_status(&tonic::Status::new(code, "why"));
            assert_eq!((e.exit_code, e.message.as_str()), (exit, "why"), "{code:?}");
        }
    }

    #[test]
    fn a_malformed_route_file_is_one_line_naming_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, "[routes.orders]\ntimeout = \"2s\"\nretries = [1]\n").unwrap();
        let e = read_route_file(&path).unwrap_err();
        assert_eq!(e.exit_code, 65);
        assert!(
            e.message.contains("line 3") && e.message.contains("retries"),
            "{}",
            e.message
        );
        assert!(!e.message.contains('\n'), "{}", e.message);
        let missing = read_route_file(&dir.path().join("nope.toml")).unwrap_err();
        assert!(missing.message.contains("nope.toml"), "{}", missing.message);
    }

    #[tokio::test]
    async fn an_unreachable_control_plane_is_one_line_naming_the_address() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("http://127.0.0.1:{port}");
        let e = Ctl::connect(&addr, Output::Table).await.unwrap_err();
        assert_eq!(e.exit_code, 69);
        assert!(e.message.contains(&addr), "{}", e.message);
        assert!(e.message.contains("refused"), "{}", e.message);
    }

    #[test]
    fn the_api_token_is_sent_but_never_shown() {
        use tonic::service::Interceptor as _;
        let mut token = ApiToken::new(Some(" api-0123456789-s3cr3t ")).unwrap();
        assert_eq!(format!("{token:?}"), "ApiToken(<redacted>)");
        let request = token.call(tonic::Request::new(())).unwrap();
        let sent = request.metadata().get("authorization").unwrap();
        assert_eq!(sent.to_str().unwrap(), "Bearer api-0123456789-s3cr3t");
        assert!(!format!("{:?}", request.metadata()).contains("s3cr3t"));
        let mut none = ApiToken::new(Some("  ")).unwrap();
        let request = none.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
        let e = ApiToken::new(Some("line\nbreak-0123456789")).unwrap_err();
        assert!(e.message.starts_with("api_token:"), "{}", e.message);
    }
}
