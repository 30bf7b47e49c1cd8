//! `mesh.v1.Deployer` over the [`Store`]: Upload (a client stream, its
//! bytes written on the blocking pool as they come), UploadOffset and
//! ListArtifacts; over [`Deployments`]: Deploy, Rollback, Status, Stop and
//! LogTail; [`BearerAuth`], the token check in front of it (then
//! [`Authorize`], who may call which method under mTLS); and the upload
//! metrics. Store errors become status codes in one place ([`status`]),
//! deploy errors in another ([`deploy_status`]).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use mesh_proto::v1::{
    self as pb,
    deployer_server::{Deployer, DeployerServer},
};
use mesh_runtime::{
    metrics::{Counter, Registry},
    pki::grpc::Authorize,
};
use sha2::{Digest, Sha256};
use tonic::{
    Request, Response, Status, Streaming,
    service::{Interceptor, interceptor::InterceptedService},
};

use crate::{
    apply::{
        ApplyError, ApplySpec, ConfigApplier, DEFAULT_RELOAD, DEFAULT_VALIDATE,
        DEFAULT_VERIFY_TIMEOUT,
    },
    config::Token,
    deploy::{
        DEFAULT_DRAIN, DEFAULT_HEALTH_PATH, DEFAULT_HEALTH_TIMEOUT, DEFAULT_STOP_GRACE,
        DeployError, DeployOutcome, DeploySpec, Deployments, InstanceInfo,
    },
    store::{ArtifactMeta, Begin, Store, StoreError, Upload, UploadStart},
    supervisor::{InstanceState, LogStream, SupervisorError},
    tls::Authorization,
};

/// Lines LogTail gives when asked for 0.
const DEFAULT_TAIL_LINES: usize = 100;
/// The most lines LogTail gives.
const MAX_TAIL_LINES: usize = 10_000;

/// How long an upload may send nothing before it ends (its bytes kept):
/// a stalled uploader must not hold its version forever.
const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The versions of a service in use (run by the supervisor), which
/// pruning keeps whatever their age.
pub type InUse = Arc<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// The Deployer service, with the token check in front, then the per-method
/// authorization of mTLS callers.
pub type DeployerService = InterceptedService<Authorize<DeployerServer<DeployerApi>>, BearerAuth>;

/// The Deployer service. Cheap to clone.
#[derive(Clone)]
pub struct DeployerApi {
    store: Store,
    metrics: DeployerMetrics,
    in_use: InUse,
    deployments: Option<Deployments>,
    applier: Option<ConfigApplier>,
}

/// Handles of the deployer's metrics.
#[derive(Clone)]
pub struct DeployerMetrics {
    /// Uploads by outcome ([`OUTCOMES`]).
    uploads: Vec<(&'static str, Counter)>,
    /// Artifact bytes received, stored or not.
    bytes: Counter,
    /// Versions removed to keep the newest ones.
    pruned: Counter,
}

/// Checks `authorization: Bearer <token>` on every call when a token is
/// configured, comparing in constant time.
#[derive(Clone)]
pub struct BearerAuth {
    /// SHA-256 of the whole expected header value: comparing digests
    /// takes the same time whatever the value's length.
    expected: Option<[u8; 32]>,
}

/// What becomes of an upload, the `outcome` label of
/// `mesh_deployer_uploads_total`.
pub const OUTCOMES: [&str; 11] = [
    "stored",
    "unchanged",
    "invalid",
    "too_large",
    "incomplete",
    "offset",
    "checksum",
    "conflict",
    "busy",
    "disk_full",
    "failed",
];

/// An upload that did not store anything: its status and its outcome.
struct Failure {
    outcome: &'static str,
    status: Status,
}

// === impl DeployerApi ===

impl DeployerApi {
    /// Serves `store`; no version counts as in use until
    /// [`DeployerApi::with_in_use`].
    pub fn new(store: Store, metrics: DeployerMetrics) -> Self {
        Self {
            store,
            metrics,
            in_use: Arc::new(|_| Vec::new()),
            deployments: None,
            applier: None,
        }
    }

    /// Serves ApplyConfig with `applier`; without, it fails with
    /// UNIMPLEMENTED.
    pub fn with_applier(mut self, applier: ConfigApplier) -> Self {
        self.applier = Some(applier);
        self
    }

    /// Serves Deploy, Rollback, Status, Stop and LogTail with
    /// `deployments`; without, they fail with UNIMPLEMENTED.
    pub fn with_deployments(mut self, deployments: Deployments) -> Self {
        self.deployments = Some(deployments);
        self
    }

    fn deployments(&self) -> Result<&Deployments, Status> {
        self.deployments
            .as_ref()
            .ok_or_else(|| Status::unimplemented("this deployer runs no processes"))
    }

    /// Keeps the versions `in_use` names for a service when pruning.
    pub fn with_in_use(mut self, in_use: InUse) -> Self {
        self.in_use = in_use;
        self
    }

    /// The service, with `auth` checking every call's token, then `authz`
    /// its caller's identity.
    pub fn into_service(self, auth: BearerAuth, authz: &Authorization) -> DeployerService {
        InterceptedService::new(authz.wrap(DeployerServer::new(self)), auth)
    }

    /// Receives one upload; the first message carries `start`.
    async fn receive(
        &self,
        mut stream: Streaming<pb::UploadChunk>,
    ) -> Result<pb::UploadResult, Failure> {
        let first = next_chunk(&mut stream)
            .await
            .map_err(|s| Failure::new("incomplete", s))?
            .ok_or_else(|| Failure::invalid("start: the stream is empty"))?;
        let start = first
            .start
            .ok_or_else(|| Failure::invalid("start: the first message must carry start"))?;
        let store = self.store.clone();
        let upload = match blocking(move || store.begin(upload_start(start))).await? {
            Begin::Stored(meta) => return Ok(upload_result(&meta, false, Vec::new())),
            Begin::Upload(upload) => *upload,
        };
        let (upload, cut) = self.receive_bytes(upload, first.data, &mut stream).await?;
        // A stream cut short keeps its bytes: `finish` says how many.
        let meta = blocking(move || upload.finish()).await.map_err(|mut f| {
            if let Some(cut) = cut {
                let message = format!(
                    "{} (the stream failed: {})",
                    f.status.message(),
                    cut.message()
                );
                f.status = Status::new(f.status.code(), message);
            }
            f
        })?;
        let pruned = self.prune(&meta.service).await;
        Ok(upload_result(&meta, true, pruned))
    }

    /// Writes `data` and the data of the messages that follow, until the
    /// stream ends; or fails (the error, for the caller to report after
    /// `finish` said how many bytes are kept).
    async fn receive_bytes(
        &self,
        mut upload: Upload,
        mut data: Vec<u8>,
        stream: &mut Streaming<pb::UploadChunk>,
    ) -> Result<(Upload, Option<Status>), Failure> {
        loop {
            if !data.is_empty() {
                self.metrics.bytes.increment(data.len() as u64);
                upload = blocking(move || upload.write(&data)).await?;
            }
            match next_chunk(stream).await {
                Ok(Some(chunk)) if chunk.start.is_some() => {
                    // Dropping the upload keeps its bytes.
                    return Err(Failure::invalid(
                        "start: only the first message may carry start",
                    ));
                }
                Ok(Some(chunk)) => data = chunk.data,
                Ok(None) => return Ok((upload, None)),
                Err(status) => return Ok((upload, Some(status))),
            }
        }
    }

    /// Removes the service's oldest versions not in use; a failure is
    /// logged, the upload stays stored.
    async fn prune(&self, service: &str) -> Vec<String> {
        let protect = (self.in_use)(service);
        let (store, name) = (self.store.clone(), service.to_owned());
        match blocking(move || store.prune(&name, &protect)).await {
            Ok(removed) => {
                if !removed.is_empty() {
                    tracing::info!(%service, ?removed, "pruned old versions");
                    self.metrics.pruned.increment(removed.len() as u64);
                }
                removed
            }
            Err(f) => {
                tracing::warn!(%service, error = %f.status.message(), "cannot prune old versions");
                Vec::new()
            }
        }
    }
}

impl fmt::Debug for DeployerApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeployerApi")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl Deployer for DeployerApi {
    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadResult>, Status> {
        let result = self.receive(request.into_inner()).await;
        match result {
            Ok(result) => {
                let outcome = if result.stored { "stored" } else { "unchanged" };
                self.metrics.upload(outcome);
                if let Some(a) = &result.artifact {
                    tracing::info!(
                        service = %a.service, version = %a.version, size = a.size,
                        sha256 = %a.sha256, stored = result.stored, "upload"
                    );
                }
                Ok(Response::new(result))
            }
            Err(Failure { outcome, status }) => {
                self.metrics.upload(outcome);
                tracing::info!(outcome, error = %status.message(), "upload refused");
                Err(status)
            }
        }
    }

    async fn upload_offset(
        &self,
        request: Request<pb::UploadOffsetRequest>,
    ) -> Result<Response<pb::UploadOffsetResponse>, Status> {
        let r = request.into_inner();
        let store = self.store.clone();
        let offset = blocking(move || store.offset(&r.service, &r.version, &r.sha256))
            .await
            .map_err(|f| f.status)?;
        Ok(Response::new(pb::UploadOffsetResponse { offset }))
    }

    async fn list_artifacts(
        &self,
        request: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let service = request.into_inner().service;
        let store = self.store.clone();
        let found = blocking(move || store.list(Some(service.as_str()).filter(|s| !s.is_empty())))
            .await
            .map_err(|f| f.status)?;
        Ok(Response::new(pb::ListArtifactsResponse {
            artifacts: found.iter().map(artifact).collect(),
        }))
    }

    async fn deploy(
        &self,
        request: Request<pb::DeployRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let spec = deploy_spec(request.into_inner())?;
        let outcome = self.deployments()?.deploy(spec).await;
        deploy_response(outcome)
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let service = request.into_inner().service;
        let outcome = self.deployments()?.rollback(&service).await;
        deploy_response(outcome)
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let service = request.into_inner().service;
        let found = self
            .deployments()?
            .status(Some(service.as_str()).filter(|s| !s.is_empty()))
            .await;
        Ok(Response::new(pb::StatusResponse {
            instances: found.iter().map(instance).collect(),
        }))
    }

    async fn stop(
        &self,
        request: Request<pb::StopRequest>,
    ) -> Result<Response<pb::StopResponse>, Status> {
        let r = request.into_inner();
        let grace = or_default(r.stop_grace_ms, DEFAULT_STOP_GRACE);
        let stopped = self
            .deployments()?
            .stop(&r.service, Duration::from_millis(grace))
            .await
            .map_err(deploy_status)?;
        Ok(Response::new(pb::StopResponse { stopped }))
    }

    async fn log_tail(
        &self,
        request: Request<pb::LogTailRequest>,
    ) -> Result<Response<pb::LogTailResponse>, Status> {
        let r = request.into_inner();
        let stream = match r.stream() {
            pb::LogStream::Stderr => LogStream::Err,
            pb::LogStream::Stdout => LogStream::Out,
        };
        let lines = match usize::try_from(r.lines).unwrap_or(MAX_TAIL_LINES) {
            0 => DEFAULT_TAIL_LINES,
            n => n.min(MAX_TAIL_LINES),
        };
        let lines = self
            .deployments()?
            .log_tail(&r.instance_id, stream, lines)
            .await
            .map_err(deploy_status)?;
        Ok(Response::new(pb::LogTailResponse { lines }))
    }

    async fn apply_config(
        &self,
        request: Request<pb::ApplyConfigRequest>,
    ) -> Result<Response<pb::ApplyConfigResponse>, Status> {
        let applier = self
            .applier
            .as_ref()
            .ok_or_else(|| Status::unimplemented("this deployer applies no config files"))?;
        let applied = applier
            .apply(apply_spec(request.into_inner()))
            .await
            .map_err(apply_status)?;
        Ok(Response::new(pb::ApplyConfigResponse {
            sha256: applied.sha256,
            changed: applied.changed,
        }))
    }
}

fn apply_spec(r: pb::ApplyConfigRequest) -> ApplySpec {
    let argv = |given: Option<pb::Argv>, default: &[&str]| match given {
        Some(a) => a.args,
        None => default.iter().map(|&a| a.to_owned()).collect(),
    };
    ApplySpec {
        path: r.path,
        content: r.content,
        validate: argv(r.validate, &DEFAULT_VALIDATE),
        reload: argv(r.reload, &DEFAULT_RELOAD),
        verify_url: Some(r.verify_url).filter(|u| !u.is_empty()),
        verify_timeout: Duration::from_millis(or_default(
            r.verify_timeout_ms,
            DEFAULT_VERIFY_TIMEOUT,
        )),
    }
}

/// The status of a failed ApplyConfig.
pub fn apply_status(e: ApplyError) -> Status {
    let message = e.to_string();
    match e {
        ApplyError::Invalid { .. } => Status::invalid_argument(message),
        ApplyError::Failed { .. } => Status::failed_precondition(message),
        ApplyError::Io { .. } => Status::internal(message),
    }
}

/// A DeployRequest with its defaults applied (checked by the deploy).
fn deploy_spec(r: pb::DeployRequest) -> Result<DeploySpec, Status> {
    let address = if r.address.is_empty() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        r.address.parse().map_err(|_| {
            Status::invalid_argument(format!("address: {:?} is not an IP address", r.address))
        })?
    };
    let health_path = if r.health_path.is_empty() {
        DEFAULT_HEALTH_PATH.to_owned()
    } else {
        r.health_path
    };
    Ok(DeploySpec {
        service: r.service,
        version: r.version,
        command: r.command,
        env: r.env.into_iter().collect(),
        work_dir: Some(PathBuf::from(r.work_dir)).filter(|p| !p.as_os_str().is_empty()),
        health_path,
        health_timeout_ms: or_default(r.health_timeout_ms, DEFAULT_HEALTH_TIMEOUT),
        drain_ms: or_default(r.drain_ms, DEFAULT_DRAIN),
        stop_grace_ms: or_default(r.stop_grace_ms, DEFAULT_STOP_GRACE),
        tags: r.tags,
        address,
    })
}

/// `ms`, or `default` in ms when 0.
fn or_default(ms: u64, default: Duration) -> u64 {
    if ms == 0 {
        u64::try_from(default.as_millis()).unwrap_or(u64::MAX)
    } else {
        ms
    }
}

fn deploy_response(
    outcome: Result<DeployOutcome, DeployError>,
) -> Result<Response<pb::DeployResponse>, Status> {
    match outcome {
        Ok(o) => Ok(Response::new(pb::DeployResponse {
            instance: Some(instance(&o.instance)),
            replaced: o.replaced,
        })),
        Err(e) => {
            tracing::info!(error = %e, "deploy refused or failed");
            Err(deploy_status(e))
        }
    }
}

fn instance(i: &InstanceInfo) -> pb::Instance {
    let state = match i.state {
        InstanceState::Running => "running",
        InstanceState::Restarting => "restarting",
        InstanceState::Crashed => "crashed",
        InstanceState::Stopped => "stopped",
    };
    pb::Instance {
        service: i.service.clone(),
        version: i.version.clone(),
        instance_id: i.instance_id.clone(),
        port: u32::from(i.port),
        pid: i.pid.unwrap_or(0),
        state: state.to_owned(),
        restarts: i.restarts,
    }
}

/// The one place a deploy error becomes a status.
pub fn deploy_status(e: DeployError) -> Status {
    let message = e.to_string();
    match e {
        DeployError::Busy(_) => Status::aborted(message),
        DeployError::Invalid { .. } => Status::invalid_argument(message),
        DeployError::NotStored { .. } => Status::not_found(message),
        DeployError::Unhealthy { .. }
        | DeployError::NotRoutable { .. }
        | DeployError::NoRollback { .. } => Status::failed_precondition(message),
        DeployError::Register { .. } => Status::unavailable(message),
        DeployError::Store(e) => status(e),
        DeployError::Supervisor(e) => match e {
            SupervisorError::InvalidInstanceId(_)
            | SupervisorError::EmptyCommand(_)
            | SupervisorError::Spawn { .. } => Status::invalid_argument(message),
            SupervisorError::UnknownInstance(_) => Status::not_found(message),
            SupervisorError::AlreadyRunning(_) | SupervisorError::RunningUnadopted { .. } => {
                Status::aborted(message)
            }
            SupervisorError::InvalidConfig(_) | SupervisorError::Io { .. } => {
                Status::internal(message)
            }
        },
        DeployError::Internal(_) => Status::internal(message),
    }
}

// === impl DeployerMetrics ===

impl DeployerMetrics {
    /// Describes and registers every metric on `r`.
    pub fn new(r: &Registry) -> Self {
        r.describe_counter(
            "mesh_deployer_uploads_total",
            "Uploads by outcome: stored, unchanged (stored already), or why nothing was.",
        );
        r.describe_counter(
            "mesh_deployer_upload_bytes_total",
            "Artifact bytes received, stored or not.",
        );
        r.describe_counter(
            "mesh_deployer_pruned_versions_total",
            "Versions removed to keep the newest per service.",
        );
        Self {
            uploads: OUTCOMES
                .iter()
                .map(|&o| {
                    (
                        o,
                        r.counter("mesh_deployer_uploads_total", &[("outcome", o)]),
                    )
                })
                .collect(),
            bytes: r.counter("mesh_deployer_upload_bytes_total", &[]),
            pruned: r.counter("mesh_deployer_pruned_versions_total", &[]),
        }
    }

    fn upload(&self, outcome: &str) {
        if let Some((_, counter)) = self.uploads.iter().find(|(o, _)| *o == outcome) {
            counter.increment(1);
        }
    }
}

impl fmt::Debug for DeployerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeployerMetrics").finish_non_exhaustive()
    }
}

// === impl BearerAuth ===

impl BearerAuth {
    /// Checks for `token` when there is one; lets every call through
    /// otherwise.
    pub fn new(token: Option<&Token>) -> Self {
        Self {
            expected: token.map(|t| digest(format!("Bearer {}", t.expose()).as_bytes())),
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let Some(given) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "this deployer needs authorization: Bearer <token>",
            ));
        };
        if constant_time_eq(&digest(given.as_bytes()), expected) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("wrong token in authorization"))
        }
    }
}

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerAuth")
            .field("token", &self.expected.map(|_| "<redacted>"))
            .finish()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Compares every byte, whatever the first difference.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

// === impl Failure ===

impl Failure {
    fn new(outcome: &'static str, status: Status) -> Self {
        Self { outcome, status }
    }

    fn invalid(message: &str) -> Self {
        Self::new("invalid", Status::invalid_argument(message))
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let outcome = match &e {
            StoreError::Invalid { .. } => "invalid",
            StoreError::TooLarge { .. } | StoreError::TooManyBytes { .. } => "too_large",
            StoreError::Incomplete { .. } => "incomplete",
            StoreError::Offset { .. } | StoreError::StartMismatch { .. } => "offset",
            StoreError::Checksum { .. } => "checksum",
            StoreError::Immutable { .. } => "conflict",
            StoreError::Busy { .. } => "busy",
            StoreError::DiskFull { .. } => "disk_full",
            StoreError::Io { .. } | StoreError::Metadata { .. } => "failed",
        };
        Self::new(outcome, status(e))
    }
}

/// The one place a store error becomes a status: the caller's mistakes
/// by kind, the node's I/O as INTERNAL naming the path.
pub fn status(e: StoreError) -> Status {
    let message = e.to_string();
    match e {
        StoreError::Invalid { .. } => Status::invalid_argument(message),
        StoreError::TooLarge { .. }
        | StoreError::TooManyBytes { .. }
        | StoreError::DiskFull { .. } => Status::resource_exhausted(message),
        StoreError::Offset { .. }
        | StoreError::StartMismatch { .. }
        | StoreError::Incomplete { .. }
        | StoreError::Checksum { .. }
        | StoreError::Immutable { .. } => Status::failed_precondition(message),
        StoreError::Busy { .. } => Status::aborted(message),
        StoreError::Io { .. } | StoreError::Metadata { .. } => Status::internal(message),
    }
}

/// The next message of an upload, or an error after
/// [`UPLOAD_IDLE_TIMEOUT`] without one.
async fn next_chunk(
    stream: &mut Streaming<pb::UploadChunk>,
) -> Result<Option<pb::UploadChunk>, Status> {
    match tokio::time::timeout(UPLOAD_IDLE_TIMEOUT, stream.message()).await {
        Ok(next) => next,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no data for {}s",
            UPLOAD_IDLE_TIMEOUT.as_secs()
        ))),
    }
}

/// Runs store I/O on the blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, Failure>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(Failure::from),
        Err(e) => Err(Failure::new(
            "failed",
            Status::internal(format!("the store's task failed: {e}")),
        )),
    }
}

fn upload_start(s: pb::UploadStart) -> UploadStart {
    UploadStart {
        service: s.service,
        version: s.version,
        file_name: s.file_name,
        size: s.size,
        sha256: s.sha256,
        offset: s.offset,
    }
}

fn upload_result(meta: &ArtifactMeta, stored: bool, pruned: Vec<String>) -> pb::UploadResult {
    pb::UploadResult {
        artifact: Some(artifact(meta)),
        stored,
        pruned,
    }
}

fn artifact(meta: &ArtifactMeta) -> pb::Artifact {
    pb::Artifact {
        service: meta.service.clone(),
        version: meta.version.clone(),
        file_name: meta.file_name.clone(),
        size: meta.size,
        sha256: meta.sha256.clone(),
        stored_at: rfc3339(meta.stored_at_ms),
    }
}

/// `ms` since the Unix epoch as RFC 3339 in UTC (`2024-05-01T12:00:00.250Z`).
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days.try_into().unwrap_or(i64::MAX / 2));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Year, month, day of a day count since 1970-01-01 (the proleptic
/// Gregorian calendar; H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use tonic::{
        Code,
        metadata::{Ascii, MetadataValue},
    };

    use super::*;

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_250), "2000-02-29T00:00:00.250Z");
        assert_eq!(rfc3339(1_719_835_199_999), "2024-07-01T11:59:59.999Z");
    }

    fn call(auth: &mut BearerAuth, header: Option<&str>) -> Result<(), Code> {
        let mut request = Request::new(());
        if let Some(value) = header {
            let value: MetadataValue<Ascii> = value.parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        auth.call(request).map(drop).map_err(|s| s.code())
    }

    #[test]
    fn the_token_is_required_when_configured() {
        let token = Token::new("0123456789abcdef".into()).unwrap();
        let mut auth = BearerAuth::new(Some(&token));
        assert_eq!(call(&mut auth, Some("Bearer 0123456789abcdef")), Ok(()));
        for wrong in [
            None,
            Some("Bearer 0123456789abcdeF"),
            Some("0123456789abcdef"),
        ] {
            assert_eq!(call(&mut auth, wrong), Err(Code::Unauthenticated));
        }
        assert!(!format!("{auth:?}").contains("0123"));
        assert_eq!(call(&mut BearerAuth::new(None), None), Ok(()));
    }

    #[test]
    fn store_errors_map_to_codes() {
        let cases = [
            (
                StoreError::Invalid {
                    field: "version",
                    message: "bad".into(),
                },
                Code::InvalidArgument,
            ),
            (
                StoreError::TooLarge { size: 2, max: 1 },
                Code::ResourceExhausted,
            ),
            (
                StoreError::Checksum {
                    expected: "a".into(),
                    actual: "b".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                StoreError::Offset { given: 1, kept: 2 },
                Code::FailedPrecondition,
            ),
            (
                StoreError::Io {
                    path: "/data/x".into(),
                    source: std::io::Error::other("boom"),
                },
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            let s = status(e);
            assert_eq!(s.code(), code, "{s:?}");
        }
        let s = status(StoreError::Io {
            path: "/data/x".into(),
            source: std::io::Error::other("boom"),
        });
        assert_eq!(s.message(), "/data/x: boom");
    }
}
