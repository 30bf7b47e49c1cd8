//! `meshctl`: the operator's command line.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::{Args, Parser, Subcommand};
use mesh_control_plane::{
    control::{Check, Registration},
    ctl::{
        self, AlertsCtl, Ctl, CtlError, DEFAULT_CONTROL_ADDR, DEFAULT_CONTROL_HTTP,
        DEFAULT_MONITOR_ADDR, DeployArgs, IntentionsCtl, Output, RenderArgs, SetRoutesArgs,
        StageArgs, StartArgs, intentions::PutArgs,
    },
    demo, dev,
    render::Format,
};
use mesh_runtime::{
    config::{ConfigFile, exit_with, merge, parse_args},
    duration::HumanDuration,
    intentions::Action,
    logging,
};
use serde::{Deserialize, Serialize};

/// Meshwork's command line.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "MESH_LOG_FORMAT", default_value = "text", global = true)]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A mesh on this machine for development.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// The demo service.
    Demo {
        #[command(subcommand)]
        command: DemoCommand,
    },
    /// Which mesh-control replica answers and which one leads.
    Status(ClientArgs),
    /// Consul's nodes, with their routes version and proxy status.
    Nodes(ClientArgs),
    /// Consul's services, with their instances and health.
    Services(ClientArgs),
    /// A node's routes: the services it may call, and how.
    Routes {
        #[command(subcommand)]
        command: RoutesCommand,
    },
    /// A node's config versions, or one version in full.
    Versions(VersionsCli),
    /// A node's config rendered for mesh-proxy or nginx.
    Render(RenderCli),
    /// Staged rollouts of a config version: canary first, then batches,
    /// each step gated on the proxies' acknowledgement, health and a soak.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Rolling deployments of an artifact (a jar) to the nodes'
    /// mesh-deployers, one node at a time: `meshctl deploy --service S
    /// --artifact PATH --version V`, or a subcommand.
    Deploy(DeployCli),
    /// Register an instance on a node, through the node's bridge.
    Register(RegisterCli),
    /// Deregister an instance from a node, through the node's bridge.
    Deregister(DeregisterCli),
    /// mesh-monitor's open alerts (asked of mesh-monitor itself): what its
    /// probes find down, hung, unhealthy or slow.
    Alerts(AlertsCli),
    /// Intentions: which service may call which (allow or deny by source
    /// and destination service, `*` for any), over mesh-control's REST API.
    Intentions {
        #[command(subcommand)]
        command: IntentionsCommand,
    },
}

/// How to reach mesh-control's REST API and how to print.
#[derive(Args)]
struct HttpClientArgs {
    /// mesh-control's HTTP address (host:port or an http:// URL).
    #[arg(long, env = "MESH_CONTROL_HTTP", default_value = DEFAULT_CONTROL_HTTP)]
    http_addr: String,
    /// mesh-control's api_token, sent as `Authorization: Bearer <token>`.
    #[arg(long, env = "MESH_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// table or json.
    #[arg(long, env = "MESH_OUTPUT", value_enum, default_value_t = Output::Table)]
    output: Output,
}

impl std::fmt::Debug for ClientArgs {
    // The token stays out of any debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientArgs")
            .field("control_addr", &self.control_addr)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("output", &self.output)
            .finish()
    }
}

impl std::fmt::Debug for HttpClientArgs {
    // The token stays out of any debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClientArgs")
            .field("http_addr", &self.http_addr)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("output", &self.output)
            .finish()
    }
}

#[derive(Debug, Subcommand)]
enum IntentionsCommand {
    /// Every intention, and the default for calls none matches.
    List(HttpClientArgs),
    /// Allow calls from SOURCE to DESTINATION (replaces the intention
    /// between them, rules included); the flags narrow it to one rule of
    /// paths and methods, and it denies every other call between them.
    Allow {
        #[command(flatten)]
        client: HttpClientArgs,
        #[command(flatten)]
        intention: IntentionCli,
        /// Only paths that start with this.
        #[arg(long, conflicts_with = "path_exact")]
        path_prefix: Option<String>,
        /// Only this path.
        #[arg(long)]
        path_exact: Option<String>,
        /// Only these methods, comma-separated (uppercase: GET,HEAD).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
    },
    /// Deny every call from SOURCE to DESTINATION (replaces the intention
    /// between them).
    Deny {
        #[command(flatten)]
        client: HttpClientArgs,
        #[command(flatten)]
        intention: IntentionCli,
    },
    /// Delete the intention from SOURCE to DESTINATION.
    Delete {
        #[command(flatten)]
        client: HttpClientArgs,
        /// The calling service, or `*`.
        source: String,
        /// The called service, or `*`.
        destination: String,
        /// Only if it is at this revision.
        #[arg(long)]
        expect_revision: Option<u64>,
    },
    /// Set the action for calls no intention matches (deny is recommended).
    Default {
        #[command(flatten)]
        client: HttpClientArgs,
        /// allow or deny.
        action: Action,
        /// Only if the default is at this revision (0: not set yet).
        #[arg(long)]
        expect_revision: Option<u64>,
    },
    /// What the intentions decide for a call from SOURCE to DESTINATION,
    /// and which one decides it.
    Check {
        #[command(flatten)]
        client: HttpClientArgs,
        /// The calling service ("": a caller without a service identity).
        source: String,
        /// The called service.
        destination: String,
        /// The method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// The path.
        #[arg(long, default_value = "/")]
        path: String,
    },
}

/// The intention `allow` and `deny` write.
#[derive(Debug, Args)]
struct IntentionCli {
    /// The calling service, or `*` for any.
    source: String,
    /// The called service, or `*` for any.
    destination: String,
    /// Why it exists.
    #[arg(long, default_value = "")]
    description: String,
    /// Only if the intention is at this revision (0: only if it is new)
    /// [default: the one it is at].
    #[arg(long)]
    expect_revision: Option<u64>,
}

/// How to reach mesh-control and how to print.
#[derive(Args)]
struct ClientArgs {
    /// mesh-control's gRPC address.
    #[arg(long, env = "MESH_CONTROL_ADDR", default_value = DEFAULT_CONTROL_ADDR)]
    control_addr: String,
    /// mesh-control's api_token, sent as `authorization: Bearer <token>`.
    #[arg(long, env = "MESH_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// table or json.
    #[arg(long, env = "MESH_OUTPUT", value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum RoutesCommand {
    /// Show a node's routes and their revision.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        /// The node.
        node: String,
    },
    /// Replace a node's routes with those of a route file (TOML
    /// `[routes.<service>]` tables, or JSON for a .json file).
    Set {
        #[command(flatten)]
        client: ClientArgs,
        /// The node.
        node: String,
        /// The route file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Change only if the routes are still at this revision (as
        /// `routes get` shows it) [default: the current one].
        #[arg(long)]
        expect_revision: Option<u64>,
        /// Who makes the change [default: $USER].
        #[arg(long, env = "MESH_AUTHOR")]
        author: Option<String>,
    },
    /// Store a route file as one new config version of several nodes,
    /// in effect on none of them until `meshctl rollout start`.
    Stage {
        #[command(flatten)]
        client: ClientArgs,
        /// A node, in rollout order (repeat, or separate with commas).
        #[arg(long = "node", required = true, value_delimiter = ',')]
        nodes: Vec<String>,
        /// The route file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Who stages it [default: $USER].
        #[arg(long, env = "MESH_AUTHOR")]
        author: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Start rolling out a version staged with `meshctl routes stage`.
    Start {
        #[command(flatten)]
        client: ClientArgs,
        /// The staged version.
        #[arg(long)]
        version: u64,
        /// Nodes in the first step (0: no canary step).
        #[arg(long)]
        canary: Option<u32>,
        /// Nodes per later step.
        #[arg(long)]
        batch: Option<u32>,
        /// How long each step's nodes must stay healthy (e.g. 30s, 2m).
        #[arg(long)]
        soak: Option<HumanDuration>,
        /// How long a proxy may take to acknowledge the version.
        #[arg(long)]
        ack_timeout: Option<HumanDuration>,
        /// Who starts it [default: $USER].
        #[arg(long, env = "MESH_AUTHOR")]
        author: Option<String>,
    },
    /// A rollout's state, nodes and history [default: the one under way,
    /// or else the newest].
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// The version.
        #[arg(long, default_value_t = 0)]
        version: u64,
        /// Follow it until it ends; exit 2 when it aborts.
        #[arg(long)]
        watch: bool,
    },
    /// Every rollout, newest first.
    List(ClientArgs),
    /// Start no new step (a step under way finishes its gates).
    Pause(RolloutChangeCli),
    /// Go on after a pause.
    Resume(RolloutChangeCli),
    /// Put every node the rollout moved back on its previous version.
    Abort(RolloutChangeCli),
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct DeployCli {
    #[command(flatten)]
    client: ClientArgs,
    /// The service to deploy.
    #[arg(long)]
    service: Option<String>,
    /// The artifact (jar) to deploy.
    #[arg(long)]
    artifact: Option<PathBuf>,
    /// Its version (letters, digits, '.', '_', '-').
    #[arg(long)]
    version: Option<String>,
    /// The nodes, in order, comma-separated [default: every node that
    /// runs the service].
    #[arg(long)]
    nodes: Vec<String>,
    /// The command each deployer runs [default: `java -jar {artifact}
    /// --server.port={port}`].
    #[arg(long)]
    command: Option<String>,
    /// An environment variable as KEY=VALUE (repeat for more).
    #[arg(long)]
    env: Vec<String>,
    /// A tag of the registration (repeat for more).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// The path that answers 2xx once an instance serves [default: /health].
    #[arg(long)]
    health_path: Option<String>,
    /// How long a new instance has to become healthy [default: 60s].
    #[arg(long)]
    health_timeout: Option<String>,
    /// How long an old instance keeps serving once deregistered [default: 5s].
    #[arg(long)]
    drain: Option<String>,
    /// How long each node must stay healthy before the next [default: 10s].
    #[arg(long)]
    soak: Option<String>,
    /// Follow the deployment; exit 1 when it halts or is aborted.
    #[arg(long)]
    watch: bool,
    /// Who deploys [default: $USER].
    #[arg(long, env = "MESH_AUTHOR")]
    author: Option<String>,
    #[command(subcommand)]
    command_: Option<DeployCommand>,
}

#[derive(Debug, Subcommand)]
enum DeployCommand {
    /// A deployment's state, nodes and history [default: the newest].
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// The deployment [default: the newest, of --service when given].
        id: Option<u64>,
        /// The newest deployment of this service.
        #[arg(long, default_value = "")]
        service: String,
        /// Follow it until it ends; exit 1 when it halts or is aborted.
        #[arg(long)]
        watch: bool,
    },
    /// Every deployment, newest first.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Only this service's.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Abort a deployment: no further node is touched.
    Abort {
        #[command(flatten)]
        client: ClientArgs,
        /// The deployment.
        id: u64,
        /// Who asks [default: $USER].
        #[arg(long, env = "MESH_AUTHOR")]
        author: Option<String>,
    },
    /// What each node's deployer runs, and the versions it keeps.
    Nodes {
        #[command(flatten)]
        client: ClientArgs,
        /// Only this service.
        #[arg(long, default_value = "")]
        service: String,
    },
}

#[derive(Debug, Args)]
struct RolloutChangeCli {
    #[command(flatten)]
    client: ClientArgs,
    /// The version [default: the rollout under way].
    #[arg(long, default_value_t = 0)]
    version: u64,
    /// Who asks [default: $USER].
    #[arg(long, env = "MESH_AUTHOR")]
    author: Option<String>,
}

#[derive(Debug, Args)]
struct VersionsCli {
    #[command(flatten)]
    client: ClientArgs,
    /// The node.
    node: String,
    /// One version in full (its config and diff).
    number: Option<u64>,
}

#[derive(Debug, Args)]
struct RenderCli {
    #[command(flatten)]
    client: ClientArgs,
    /// The node.
    #[arg(long)]
    node: String,
    /// proxy (mesh-proxy's TOML) or nginx (nginx.conf).
    #[arg(long, default_value = "proxy")]
    format: Format,
    /// The version [default: the newest].
    #[arg(long, default_value_t = 0)]
    version: u64,
    /// For nginx: upsync or static [default: mesh-control's setting].
    #[arg(long, default_value = "")]
    upstreams: String,
    /// Print the diff against the previous version instead.
    #[arg(long)]
    diff: bool,
}

#[derive(Debug, Args)]
struct RegisterCli {
    #[command(flatten)]
    client: ClientArgs,
    /// The node to register on.
    node: String,
    /// Service name.
    #[arg(long)]
    name: String,
    /// Instance ID [default: the name].
    #[arg(long, default_value = "")]
    id: String,
    /// Address [default: the node's].
    #[arg(long, default_value = "")]
    address: String,
    /// Port.
    #[arg(long)]
    port: u32,
    /// A tag (repeat for more).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Metadata as key=value (repeat for more).
    #[arg(long = "meta", value_parser = key_value)]
    meta: Vec<(String, String)>,
    /// HTTP health check URL.
    #[arg(long)]
    check_http: Option<String>,
    /// TCP health check host:port.
    #[arg(long)]
    check_tcp: Option<String>,
    /// How often Consul runs the check.
    #[arg(long, default_value = "")]
    check_interval: String,
    /// How long one check may take.
    #[arg(long, default_value = "")]
    check_timeout: String,
    /// Deregister after the check was critical this long.
    #[arg(long, default_value = "")]
    deregister_after: String,
}

#[derive(Debug, Args)]
struct AlertsCli {
    /// mesh-monitor's gRPC address (host:port or an http:// URL).
    #[arg(long, env = "MESH_MONITOR_ADDR", default_value = DEFAULT_MONITOR_ADDR)]
    monitor_addr: String,
    /// table or json (with --watch: one JSON object a line).
    #[arg(long, env = "MESH_OUTPUT", value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Then print each alert as it opens or resolves, until interrupted.
    #[arg(long)]
    watch: bool,
}

#[derive(Debug, Args)]
struct DeregisterCli {
    #[command(flatten)]
    client: ClientArgs,
    /// The node.
    node: String,
    /// The instance ID.
    id: String,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Start Consul, mesh-bridge, mesh-proxy, mesh-deployer, mesh-control and mesh-monitor (and demo services); Ctrl-C stops them.
    Up(DevUp),
}

#[derive(Debug, Subcommand)]
enum DemoCommand {
    /// Serve a demo service that registers itself through the local proxy.
    Serve(DemoServe),
}

/// `meshctl dev up` options; each also a key of the `--config` TOML file.
#[derive(Debug, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevUp {
    /// TOML file with any of these options (flags and environment win).
    #[arg(long, env = "MESH_CONFIG")]
    config: Option<PathBuf>,
    /// Also start two demo services that register through the proxy.
    #[arg(long, env = "MESH_DEMO", num_args = 0..=1, default_missing_value = "true")]
    demo: Option<bool>,
    /// Join this Consul agent instead of starting one in dev mode.
    #[arg(long, env = "MESH_CONSUL_ADDR")]
    consul_addr: Option<String>,
    /// Logs, dump files and queues [default: .meshwork/dev].
    #[arg(long, env = "MESH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where mesh-bridge, mesh-proxy, mesh-deployer, mesh-control and mesh-monitor are [default: meshctl's folder].
    #[arg(long, env = "MESH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
}

/// `meshctl demo serve` options; each also a key of the `--config` TOML file.
#[derive(Debug, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DemoServe {
    /// TOML file with any of these options (flags and environment win).
    #[arg(long, env = "MESH_CONFIG")]
    config: Option<PathBuf>,
    /// Service name.
    #[arg(long, env = "MESH_NAME")]
    name: Option<String>,
    /// Instance ID [default: <name>-<port>].
    #[arg(long, env = "MESH_ID")]
    id: Option<String>,
    /// Address to listen on [default: 127.0.0.1:0].
    #[arg(long, env = "MESH_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address to register [default: the listen IP].
    #[arg(long, env = "MESH_ADVERTISE")]
    advertise: Option<String>,
    /// The local proxy [default: http://127.0.0.1:8888].
    #[arg(long, env = "MESH_PROXY")]
    proxy: Option<String>,
    /// Interval of the HTTP health check Consul runs [default: 1s].
    #[arg(long, env = "MESH_CHECK_INTERVAL")]
    check_interval: Option<HumanDuration>,
    /// Serve without registering.
    #[arg(long, env = "MESH_NO_REGISTER", num_args = 0..=1, default_missing_value = "true")]
    no_register: Option<bool>,
}

impl ConfigFile for DevUp {
    fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }
}

impl ConfigFile for DemoServe {
    fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }
}

impl DevUp {
    fn validate(self) -> dev::DevConfig {
        dev::DevConfig {
            demo: self.demo.unwrap_or(false),
            consul_addr: self.consul_addr,
            data_dir: self.data_dir.unwrap_or_else(|| ".meshwork/dev".into()),
            bin_dir: self.bin_dir,
        }
    }
}

impl DemoServe {
    fn validate(self) -> demo::DemoConfig {
        let Some(name) = self.name.filter(|n| !n.is_empty()) else {
            exit_with(
                "name: a service name is required (--name, MESH_NAME or `name` in the config file)",
            );
        };
        demo::DemoConfig {
            name,
            id: self.id,
            listen: self.listen.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()),
            advertise: self.advertise,
            proxy: self.proxy.unwrap_or_else(|| "http://127.0.0.1:8888".into()),
            check_interval: self
                .check_interval
                .unwrap_or(HumanDuration(std::time::Duration::from_secs(1))),
            no_register: self.no_register.unwrap_or(false),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mesh_runtime::install_crypto_provider();
    let cli: Cli = parse_args();
    logging::init(cli.log_format);
    match cli.command {
        Command::Dev {
            command: DevCommand::Up(args),
        } => dev::up(load(args).validate()).await,
        Command::Demo {
            command: DemoCommand::Serve(args),
        } => demo::serve(load(args).validate()).await,
        command => {
            let result = control(command).await;
            match result {
                Ok(text) => {
                    print!("{text}");
                    Ok(())
                }
                Err(e) => {
                    eprintln!("error: {}", e.message);
                    std::process::exit(e.exit_code)
                }
            }
        }
    }
}

/// The commands that talk to mesh-control; the text to print.
async fn control(command: Command) -> Result<String, CtlError> {
    async fn connect(client: &ClientArgs) -> Result<Ctl, CtlError> {
        Ctl::connect(&client.control_addr, client.output)
            .await?
            .with_api_token(client.api_token.as_deref())
    }
    match command {
        Command::Status(c) => connect(&c).await?.status().await,
        Command::Nodes(c) => connect(&c).await?.nodes().await,
        Command::Services(c) => connect(&c).await?.services().await,
        Command::Routes {
            command: RoutesCommand::Get { client, node },
        } => connect(&client).await?.routes_get(&node).await,
        Command::Routes {
            command:
                RoutesCommand::Set {
                    client,
                    node,
                    file,
                    expect_revision,
                    author,
                },
        } => {
            // The file is read first: a bad one needs no mesh-control.
            ctl::read_route_file(&file)?;
            let author = author_or_user(author);
            let args = SetRoutesArgs {
                node,
                file,
                expect_revision,
                author,
            };
            connect(&client).await?.routes_set(args).await
        }
        Command::Routes {
            command:
                RoutesCommand::Stage {
                    client,
                    nodes,
                    file,
                    author,
                },
        } => {
            ctl::read_route_file(&file)?;
            let args = StageArgs {
                nodes,
                file,
                author: author_or_user(author),
            };
            connect(&client).await?.routes_stage(args).await
        }
        Command::Rollout { command } => match command {
            RolloutCommand::Start {
                client,
                version,
                canary,
                batch,
                soak,
                ack_timeout,
                author,
            } => {
                let args = StartArgs {
                    version,
                    author: author_or_user(author),
                    canary,
                    batch,
                    soak: soak.map(HumanDuration::get),
                    ack_timeout: ack_timeout.map(HumanDuration::get),
                };
                connect(&client).await?.rollout_start(args).await
            }
            RolloutCommand::Status {
                client,
                version,
                watch,
            } => {
                let mut ctl = connect(&client).await?;
                if watch {
                    ctl.rollout_watch(version, |line| {
                        use std::io::Write as _;
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(line.as_bytes());
                        let _ = out.flush();
                    })
                    .await
                } else {
                    ctl.rollout_status(version).await
                }
            }
            RolloutCommand::List(client) => connect(&client).await?.rollout_list().await,
            RolloutCommand::Pause(c) => change(c, "pause").await,
            RolloutCommand::Resume(c) => change(c, "resume").await,
            RolloutCommand::Abort(c) => change(c, "abort").await,
        },
        Command::Deploy(d) => deploy(d).await,
        Command::Versions(v) => connect(&v.client).await?.versions(&v.node, v.number).await,
        Command::Render(r) => {
            let args = RenderArgs {
                node: r.node,
                format: r.format,
                version: r.version,
                upstreams: r.upstreams,
                diff: r.diff,
            };
            connect(&r.client).await?.render(args).await
        }
        Command::Register(r) => {
            let check = match (r.check_http, r.check_tcp) {
                (None, None) => None,
                (http, tcp) => Some(Check {
                    http: http.unwrap_or_default(),
                    tcp: tcp.unwrap_or_default(),
                    interval: r.check_interval,
                    timeout: r.check_timeout,
                    deregister_critical_service_after: r.deregister_after,
                    ..Check::default()
                }),
            };
            let registration = Registration {
                id: r.id,
                name: r.name,
                address: r.address,
                port: r.port,
                tags: r.tags,
                meta: r.meta.into_iter().collect(),
                checks: check.into_iter().collect(),
            };
            connect(&r.client)
                .await?
                .register(&r.node, registration)
                .await
        }
        Command::Deregister(d) => connect(&d.client).await?.deregister(&d.node, &d.id).await,
        Command::Alerts(a) => {
            let mut monitor = AlertsCtl::connect(&a.monitor_addr, a.output).await?;
            if a.watch {
                monitor.watch(print_now).await
            } else {
                monitor.list().await
            }
        }
        Command::Intentions { command } => intentions(command).await,
        Command::Dev { .. } | Command::Demo { .. } => unreachable!("handled by main"),
    }
}

/// Prints watch lines as they come.
fn print_now(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// `meshctl deploy …`.
async fn deploy(d: DeployCli) -> Result<String, CtlError> {
    async fn connect(client: &ClientArgs) -> Result<Ctl, CtlError> {
        Ctl::connect(&client.control_addr, client.output)
            .await?
            .with_api_token(client.api_token.as_deref())
    }
    match d.command_ {
        Some(DeployCommand::Status {
            client,
            id,
            service,
            watch,
        }) => {
            let mut ctl = connect(&client).await?;
            let id = id.unwrap_or(0);
            if watch {
                ctl.deploy_watch(id, &service, print_now).await
            } else {
                ctl.deploy_status(id, &service).await
            }
        }
        Some(DeployCommand::List { client, service }) => {
            connect(&client).await?.deploy_list(&service).await
        }
        Some(DeployCommand::Abort { client, id, author }) => {
            connect(&client)
                .await?
                .deploy_abort(id, author_or_user(author))
                .await
        }
        Some(DeployCommand::Nodes { client, service }) => {
            connect(&client).await?.deploy_nodes(&service).await
        }
        None => {
            // The flags and the file are checked first: bad ones need no
            // mesh-control.
            let args = DeployArgs {
                service: d.service,
                artifact: d.artifact,
                version: d.version,
                nodes: d.nodes,
                command: d.command,
                env: d.env,
                tags: d.tags,
                health_path: d.health_path,
                health_timeout: d.health_timeout,
                drain: d.drain,
                soak: d.soak,
                author: author_or_user(d.author),
            };
            let plan = args.check().await?;
            connect(&d.client)
                .await?
                .deploy(plan, d.watch, print_now)
                .await
        }
    }
}

/// `meshctl intentions …`.
async fn intentions(command: IntentionsCommand) -> Result<String, CtlError> {
    fn client(c: &HttpClientArgs) -> Result<IntentionsCtl, CtlError> {
        IntentionsCtl::new(&c.http_addr, c.output)?.with_api_token(c.api_token.as_deref())
    }
    let put = |intention: IntentionCli, action: Action| PutArgs {
        source: intention.source,
        destination: intention.destination,
        action,
        path_prefix: None,
        path_exact: None,
        methods: Vec::new(),
        description: intention.description,
        expect_revision: intention.expect_revision,
    };
    match command {
        IntentionsCommand::List(c) => client(&c)?.list().await,
        IntentionsCommand::Allow {
            client: c,
            intention,
            path_prefix,
            path_exact,
            methods,
        } => {
            // The input is checked first: bad input needs no mesh-control.
            let checked = PutArgs {
                path_prefix,
                path_exact,
                methods,
                ..put(intention, Action::Allow)
            }
            .check()?;
            client(&c)?.put(checked).await
        }
        IntentionsCommand::Deny {
            client: c,
            intention,
        } => {
            let checked = put(intention, Action::Deny).check()?;
            client(&c)?.put(checked).await
        }
        IntentionsCommand::Delete {
            client: c,
            source,
            destination,
            expect_revision,
        } => {
            client(&c)?
                .delete(&source, &destination, expect_revision)
                .await
        }
        IntentionsCommand::Default {
            client: c,
            action,
            expect_revision,
        } => client(&c)?.set_default(action, expect_revision).await,
        IntentionsCommand::Check {
            client: c,
            source,
            destination,
            method,
            path,
        } => {
            client(&c)?
                .check(&source, &destination, &method, &path)
                .await
        }
    }
}

/// `meshctl rollout pause|resume|abort`.
async fn change(c: RolloutChangeCli, action: &str) -> Result<String, CtlError> {
    let author = author_or_user(c.author);
    Ctl::connect(&c.client.control_addr, c.client.output)
        .await?
        .with_api_token(c.client.api_token.as_deref())?
        .rollout_change(c.version, action, author)
        .await
}

/// The author given, or else the user's name, or else `meshctl`.
fn author_or_user(author: Option<String>) -> String {
    author
        .or_else(|| std::env::var("USER").ok())
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(|| "meshctl".into())
}

/// Overlays the flags given on the `--config` file; exits 64 on a bad one.
fn load<T: Serialize + serde::de::DeserializeOwned + ConfigFile>(args: T) -> T {
    merge(args).unwrap_or_else(|e| exit_with(&e.to_string()))
}
