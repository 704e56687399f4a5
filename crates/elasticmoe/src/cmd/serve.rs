//! `elasticmoe serve`: an OpenAI-compatible HTTP server over the engine.
//!
//! ```text
//! elasticmoe serve --model models/tiny-qwen3 --devices host:4 --initial 2 \
//!     --admin-token-file token.txt --port 8000
//! curl -s localhost:8000/v1/completions -H 'content-type: application/json' \
//!     -d '{"prompt": "Hello", "max_tokens": 8}'
//! ```
//!
//! Endpoints: `/v1/completions`, `/v1/chat/completions` (both with `stream: true` as SSE ending in
//! `data: [DONE]`), `/v1/models`, `/health`, `/ready`, `/metrics` (Prometheus text), and, when
//! `--admin-token-file` is given, `/admin/scale` and `/admin/status` behind a bearer token.
//!
//! The engine runs on its own thread ([`moe_engine::Engine::start`]); each request's
//! token events are pumped from the engine's blocking handle into the async response by a
//! blocking task, which cancels the request (freeing its KV) as soon as the client goes away.
//! Scaling goes through the [`scale::ScaleControl`] seam, carried out by the scaler's host
//! executor on its own thread ([`executor_scale::ExecutorScale`]); `--autoscale` feeds the
//! scaler's SLO policy from a periodic task ([`autoscale::Autoscaler`]).
//!
//! The network side is [`connections`]: it accepts sockets under connection caps kept below the
//! descriptor limit ([`descriptors`]), reads HTTP/1.1 ([`http1`]) under header, body, keep-alive
//! and write timeouts, and answers every refusal with an OpenAI error body. Tokenisation and
//! chat templating run on blocking threads, never on the async workers. Admin commands,
//! transitions, failed authentications (with a per-client lockout) and connection refusals go
//! to the audit log ([`audit`]).
//!
//! On SIGTERM or Ctrl-C the server drains: `/ready` turns 503, new generations get 503, running
//! ones finish until `--shutdown-timeout`, the rest are cancelled, and it exits 0; a second
//! signal exits at once. The HTTP layer holds no serving logic of its own: validation of token
//! ids and KV capacity is the engine's, scaling the executor's.

pub mod audit;
pub mod autoscale;
pub mod connections;
pub mod descriptors;
pub mod executor_scale;
pub mod http1;
pub mod metrics;
pub mod openai;
pub mod scale;
pub mod text;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use moe_engine::{
    Engine, EngineConfig, Event, FinishReason, Request, RequestError, RequestId, RequestLimits,
    RequestTimings, RunLoop, TokenId,
};
use moe_host::worker::{DeploymentRunner, HostEngineConfig};
use moe_model::checkpoint::Checkpoint;
use moe_model::config::ModelConfig;
use scaler::{ScaleCommand, SloPolicyConfig};
use scaler_exec::executor::{HostExecutor, HostExecutorConfig};
use scaler_exec::DeviceKind;

use self::audit::{AuthThrottle, ThrottleConfig, AUDIT};
use self::autoscale::{AutoscaleConfig, Autoscaler};
use self::connections::{ClientAddr, ConnectionCaps, ConnectionStats, HttpConfig, HttpServer};
use self::descriptors::DescriptorBudget;
use self::executor_scale::ExecutorScale;
use self::http1::FramingLimits;
use self::metrics::ServerMetrics;
use self::openai::{ApiError, ChatRequest, CompletionRequest, Generation};
use self::scale::{NoScaling, ScaleControl, ScaleError};
use self::text::{Detokenizer, TextCodec};
use crate::cmd::generate::PlacementArg;

/// Arguments of `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Model directory (config.json, safetensors, tokenizer.json), as `gen-model` writes.
    #[arg(long)]
    pub model: PathBuf,
    /// Devices this server may use: `host:N` (`cuda:0,1,...` is not available yet).
    #[arg(long, default_value = "host:1")]
    pub devices: String,
    /// Devices to serve on at the start (default: all of `--devices`).
    #[arg(long)]
    pub initial: Option<usize>,
    /// Let the SLO autoscaler change the device count (between 1 and `--devices`).
    #[arg(long)]
    pub autoscale: bool,
    /// Autoscaler: milliseconds between decisions.
    #[arg(long, default_value_t = 500)]
    pub autoscale_interval_ms: u64,
    /// Autoscaler: time-to-first-token target in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub slo_ttft_ms: u64,
    /// Autoscaler: time-per-output-token target in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub slo_tpot_ms: u64,
    /// Autoscaler: fewest devices.
    #[arg(long, default_value_t = 1)]
    pub autoscale_min_devices: usize,
    /// Autoscaler: how long a reason to scale up must hold, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub autoscale_sustain_up_ms: u64,
    /// Autoscaler: how long a reason to scale down must hold, in milliseconds.
    #[arg(long, default_value_t = 10000)]
    pub autoscale_sustain_down_ms: u64,
    /// Autoscaler: quiet time after each decision, in milliseconds.
    #[arg(long, default_value_t = 15000)]
    pub autoscale_cooldown_ms: u64,
    /// Autoscaler: sequences one device runs at full utilisation.
    #[arg(long, default_value_t = 16)]
    pub autoscale_sequences_per_device: usize,
    /// File holding the bearer token of the admin endpoints; without it they are disabled (404).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Requests that may wait for their first token; one more gets 429 (at least 1).
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Expert placement.
    #[arg(long, value_enum, default_value_t = PlacementArg::Balanced)]
    pub placement: PlacementArg,
    /// Seconds running requests get to finish after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Model name reported by `/v1/models` (default: the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Milliseconds a request head may take to arrive (from the connection's start, or from the
    /// first byte on a kept-alive connection); then 408 and the connection closes.
    #[arg(long, default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// Milliseconds a request body may take to arrive after its head; then 408.
    #[arg(long, default_value_t = 30_000)]
    pub body_timeout_ms: u64,
    /// Milliseconds a kept-alive connection may wait for its next request.
    #[arg(long, default_value_t = 15_000)]
    pub keep_alive_timeout_ms: u64,
    /// Milliseconds a response write may make no progress (a client that stops reading); the
    /// connection then closes and its generation is cancelled.
    #[arg(long, default_value_t = 30_000)]
    pub write_timeout_ms: u64,
    /// Bytes of request line and headers (4096 to 65536); more gets 431.
    #[arg(long, default_value_t = 32 * 1024)]
    pub max_header_bytes: usize,
    /// Bytes of a request body; more gets 413.
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Connections served at once (default: what the descriptor limit leaves, at most 1024).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Connections from one client address.
    #[arg(long, default_value_t = 256)]
    pub max_connections_per_client: usize,
    /// Control connections beyond the caps, for /health, /ready, /metrics and /admin only.
    #[arg(long, default_value_t = 32)]
    pub reserved_connections: usize,
}

/// Parses `--devices`: `host:N` gives N; CUDA is refused with a clear message.
pub fn parse_devices(s: &str) -> Result<usize> {
    let spec = super::parse_device_spec(s)?;
    match spec.kind() {
        DeviceKind::Host => Ok(spec.ranks()),
        DeviceKind::Cuda => {
            if cfg!(feature = "cuda") {
                bail!(
                    "--devices {s:?}: CUDA serving is not available yet (the engine's device \
                     workers run on host devices only); use host:N"
                )
            } else {
                bail!(
                    "--devices {s:?}: this binary was not built with CUDA (build with \
                     --features cuda); use host:N"
                )
            }
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    engine: Engine<DeploymentRunner>,
    codec: TextCodec,
    model_id: String,
    limits: RequestLimits,
    eos: Vec<TokenId>,
    max_queue: usize,
    /// Generations accepted that have not produced their first event yet (at most `max_queue`).
    waiting: AtomicUsize,
    admin_token: Option<String>,
    auth: AuthThrottle,
    scale: Arc<dyn ScaleControl>,
    autoscaler: Option<Autoscaler>,
    metrics: ServerMetrics,
    connections: Arc<ConnectionStats>,
    /// Tokenisation and templating jobs running at once (one per core but one).
    text_jobs: tokio::sync::Semaphore,
    draining: AtomicBool,
    inflight: Mutex<BTreeSet<RequestId>>,
    next_id: AtomicU64,
    created: u64,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("model_id", &self.model_id)
            .finish_non_exhaustive()
    }
}

/// A loaded model and engine, ready to serve.
#[derive(Debug)]
pub struct Setup {
    /// Shared state.
    pub state: Arc<AppState>,
}

/// What [`Setup::load`] needs besides the model directory.
#[derive(Debug, Clone)]
pub struct SetupConfig {
    /// Devices the server may use.
    pub max_devices: usize,
    /// Devices at the start.
    pub initial: usize,
    /// Expert placement.
    pub placement: PlacementArg,
    /// Generations that may wait for their first token (at least 1).
    pub max_queue: usize,
    /// Admin bearer token.
    pub admin_token: Option<String>,
    /// Model name.
    pub model_id: String,
    /// Engine batching.
    pub engine: EngineConfig,
    /// The SLO autoscaler, if on.
    pub autoscale: Option<AutoscaleConfig>,
    /// Scale commands that may wait behind the running one (more get 429).
    pub scale_queue: usize,
    /// The lockout after failed admin authentications.
    pub auth_throttle: ThrottleConfig,
}

impl Setup {
    /// Loads the model, tokenizer and engine.
    pub fn load(model: &std::path::Path, config: &SetupConfig) -> Result<Setup> {
        if !model.is_dir() {
            bail!(
                "model directory {} does not exist (write one with `elasticmoe gen-model`)",
                model.display()
            );
        }
        if config.initial == 0 || config.initial > config.max_devices {
            bail!(
                "--initial {} must be between 1 and the {} devices of --devices",
                config.initial,
                config.max_devices
            );
        }
        if config.max_queue == 0 {
            bail!("--max-queue 0 would refuse every request with 429; give at least 1");
        }
        let cfg = ModelConfig::from_dir(model)
            .with_context(|| format!("reading the config of {}", model.display()))?;
        let codec = TextCodec::from_dir(model)?;
        let checkpoint: scaler_exec::executor::Checkpoint = Arc::new(
            Checkpoint::open(model)
                .with_context(|| format!("opening the checkpoint in {}", model.display()))?,
        );
        let host = HostEngineConfig {
            devices: config.initial,
            max_devices: config.max_devices,
            placement: config.placement.into(),
            engine: config.engine,
            ..HostEngineConfig::default()
        };
        let (engine, _store) = DeploymentRunner::host_engine(&cfg, checkpoint.as_ref(), &host)
            .with_context(|| {
                format!(
                    "loading {} onto host:{} of {}",
                    model.display(),
                    config.initial,
                    config.max_devices
                )
            })?;
        let limits = RequestLimits {
            vocab_size: cfg.vocab_size,
            max_context: cfg.max_position_embeddings,
        };
        let scale: Arc<dyn ScaleControl> = if config.max_devices > 1 {
            let executor = HostExecutor::new(
                engine.clone(),
                checkpoint,
                HostExecutorConfig {
                    deployment: host.deployment,
                    ..HostExecutorConfig::default()
                },
            );
            Arc::new(
                ExecutorScale::start(executor, config.scale_queue)
                    .context("starting the scale executor thread")?,
            )
        } else {
            Arc::new(NoScaling {
                devices: config.initial,
                max_devices: config.max_devices,
                reason: "this server has a single device (--devices host:1); give it more to \
                         scale"
                    .into(),
            })
        };
        let autoscaler = config
            .autoscale
            .map(|a| Autoscaler::new(a, config.max_devices))
            .transpose()
            .context("the autoscale settings")?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // One core stays free of tokenisation for the engine and the async workers.
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let text_jobs = cores.saturating_sub(1).max(1);
        Ok(Setup {
            state: Arc::new(AppState {
                engine,
                codec,
                model_id: config.model_id.clone(),
                limits,
                eos: cfg.eos_token_ids.clone(),
                max_queue: config.max_queue,
                waiting: AtomicUsize::new(0),
                admin_token: config.admin_token.clone(),
                auth: AuthThrottle::new(config.auth_throttle),
                scale,
                autoscaler,
                metrics: ServerMetrics::default(),
                connections: Arc::new(ConnectionStats::default()),
                text_jobs: tokio::sync::Semaphore::new(text_jobs),
                draining: AtomicBool::new(false),
                inflight: Mutex::new(BTreeSet::new()),
                next_id: AtomicU64::new(0),
                created,
            }),
        })
    }
}

impl AppState {
    /// The engine.
    #[cfg(test)]
    pub fn engine(&self) -> &Engine<DeploymentRunner> {
        &self.engine
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, BTreeSet<RequestId>> {
        self.inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops intake: new generations get 503, `/ready` turns 503.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.engine.close();
    }

    /// Cancels every generation still running.
    pub fn cancel_all(&self) -> usize {
        let ids: Vec<RequestId> = self.inflight().iter().copied().collect();
        for &id in &ids {
            self.engine.cancel(id);
        }
        ids.len()
    }

    /// Generations in flight.
    pub fn inflight_count(&self) -> usize {
        self.inflight().len()
    }

    /// Generations waiting for their first token.
    pub fn waiting_count(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// A place among the `--max-queue` generations that may wait for their first token; it is
/// given back on drop.
struct QueueSlot(Arc<AppState>);

impl QueueSlot {
    fn take(state: &Arc<AppState>) -> Option<QueueSlot> {
        state
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < state.max_queue).then_some(n + 1)
            })
            .ok()
            .map(|_| QueueSlot(Arc::clone(state)))
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let mut r = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text));
    if state.admin_token.is_some() {
        r = r
            .route("/admin/scale", post(admin_scale))
            .route("/admin/status", get(admin_status));
    }
    r.fallback(not_found)
        .layer(axum::middleware::map_response(json_errors))
        // The connection layer bounds bodies (`--max-body-bytes`).
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Gives every error the router itself makes (405 with its `Allow` header, ...) an OpenAI body.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if status.as_u16() < 400 || resp.headers().contains_key(header::CONTENT_TYPE) {
        return resp;
    }
    let code = status.as_u16();
    let (kind, message) = match code {
        405 => (
            "invalid_request_error",
            "this method is not allowed on this endpoint; the Allow header lists the allowed ones"
                .to_string(),
        ),
        500..=599 => (
            "server_error",
            status.canonical_reason().unwrap_or("error").to_string(),
        ),
        _ => (
            "invalid_request_error",
            status.canonical_reason().unwrap_or("error").to_string(),
        ),
    };
    let e = ApiError::with_status(code, kind, message);
    let (mut parts, _) = resp.into_parts();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(e.body().to_string()))
}

fn error_response(state: &AppState, endpoint: &'static str, e: &ApiError) -> Response {
    state.metrics.request(endpoint, e.status);
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, axum::Json(e.body())).into_response();
    if matches!(e.status, 429 | 503) {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if e.status == 401 {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

async fn not_found() -> Response {
    let e = ApiError::with_status(404, "not_found", "no such endpoint");
    (StatusCode::NOT_FOUND, axum::Json(e.body())).into_response()
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        let e = ApiError::with_status(503, "unavailable", "the server is draining");
        let mut body = e.body();
        body["status"] = json!("draining");
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    } else {
        axum::Json(json!({"status": "ready"})).into_response()
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.request("models", 200);
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "elasticmoe",
            "max_model_len": state.limits.max_context,
        }]
    }))
    .into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let body = state.metrics.render(
        &state.engine.metrics(),
        &state.scale.status(),
        &state.connections.snapshot(),
        state.waiting_count(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Completion => "completions",
            Kind::Chat => "chat_completions",
        }
    }
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    generate(state, Kind::Completion, body).await
}

async fn chat(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    generate(state, Kind::Chat, body).await
}

/// Parses, templates and tokenises a request body (on a blocking thread: it can take
/// milliseconds for a big prompt).
fn prepare(state: &AppState, kind: Kind, body: &[u8]) -> Result<Generation, ApiError> {
    let too_long = |bytes: usize, param: &'static str| {
        let at_least = state.codec.min_tokens(bytes);
        if at_least >= state.limits.max_context {
            Err(ApiError::bad(
                Some(param),
                format!(
                    "the prompt is {bytes} bytes, at least {at_least} tokens, but the model's \
                     context holds {}; shorten it",
                    state.limits.max_context
                ),
            ))
        } else {
            Ok(())
        }
    };
    match kind {
        Kind::Completion => {
            let req = openai::parse_body::<CompletionRequest>(body)?;
            too_long(req.text_bytes(), "prompt")?;
            let ids = req.prompt_ids(&state.codec)?;
            req.common
                .generation(ids, openai::DEFAULT_COMPLETION_TOKENS, &state.limits)
        }
        Kind::Chat => {
            let req = openai::parse_body::<ChatRequest>(body)?;
            openai::check_messages(&req.messages)?;
            let bytes = req
                .messages
                .iter()
                .map(|m| m.role.len() + m.content.len())
                .sum();
            too_long(bytes, "messages")?;
            let ids = state
                .codec
                .encode_chat(&req.messages)
                .map_err(|e| ApiError::bad(Some("messages"), e))?;
            req.common
                .generation(ids, openai::DEFAULT_CHAT_TOKENS, &state.limits)
        }
    }
}

/// Runs `prepare` off the async workers, on at most all cores but one at a time.
async fn prepare_off_worker(
    state: &Arc<AppState>,
    kind: Kind,
    body: Bytes,
) -> Result<Generation, ApiError> {
    let _permit =
        state.text_jobs.acquire().await.map_err(|_| {
            ApiError::with_status(503, "unavailable", "the server is shutting down")
        })?;
    let st = Arc::clone(state);
    tokio::task::spawn_blocking(move || prepare(&st, kind, &body))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "preparing a request failed");
            Err(ApiError::with_status(
                500,
                "server_error",
                "the server failed while reading this request",
            ))
        })
}

fn engine_error(e: &RequestError) -> ApiError {
    match e {
        RequestError::EngineStopped => {
            ApiError::with_status(503, "unavailable", "the server is shutting down")
        }
        other => ApiError::bad(None, other.to_string()),
    }
}

/// What the pump sends the response: text, decoded on the pump's blocking thread.
enum Piece {
    /// One generated token and the text it completed (empty while a character is unfinished).
    Token(String),
    /// The end, with the text held back until then.
    Finished {
        reason: FinishReason,
        timings: RequestTimings,
        rest: String,
    },
}

/// A submitted generation: its pieces, arriving from the pump.
struct Live {
    state: Arc<AppState>,
    kind: Kind,
    id: String,
    rx: mpsc::Receiver<Piece>,
    prompt_tokens: usize,
    include_usage: bool,
    /// The sampling seed, for sampled generations.
    seed: Option<u64>,
}

async fn generate(state: Arc<AppState>, kind: Kind, body: Bytes) -> Response {
    let endpoint = kind.endpoint();
    if state.draining.load(Ordering::SeqCst) {
        let e = ApiError::with_status(503, "unavailable", "the server is shutting down");
        return error_response(&state, endpoint, &e);
    }
    let Some(slot) = QueueSlot::take(&state) else {
        let e = ApiError::with_status(
            429,
            "rate_limit_exceeded",
            format!(
                "{} requests are waiting for their first token (--max-queue); retry shortly",
                state.max_queue
            ),
        );
        return error_response(&state, endpoint, &e);
    };
    let g = match prepare_off_worker(&state, kind, body).await {
        Ok(g) => g,
        Err(e) => return error_response(&state, endpoint, &e),
    };
    let stop = if g.stop_at_eos {
        state.eos.clone()
    } else {
        Vec::new()
    };
    let prompt_tokens = g.prompt.len();
    let seed = g.seed();
    let request = Request::greedy(g.prompt, g.max_tokens)
        .with_stop_tokens(stop)
        .with_sampling(g.sampling);
    let handle = match state.engine.submit(request) {
        Ok(h) => h,
        Err(e) => return error_response(&state, endpoint, &engine_error(&e)),
    };
    let rid = handle.id();
    state.inflight().insert(rid);
    let (tx, rx) = mpsc::channel(64);
    let pump_state = Arc::clone(&state);
    tokio::task::spawn_blocking(move || pump(&pump_state, handle, &tx, slot));
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Completion => format!("cmpl-{n}"),
        Kind::Chat => format!("chatcmpl-{n}"),
    };
    let live = Live {
        state: Arc::clone(&state),
        kind,
        id,
        rx,
        prompt_tokens,
        include_usage: g.include_usage,
        seed,
    };
    if g.stream {
        state.metrics.request(endpoint, 200);
        stream_response(live)
    } else {
        whole_response(live).await
    }
}

/// Moves a request's events from the engine to the response, detokenising on the way; gives
/// its queue slot back at the first event; cancels it when the response is gone (the client
/// disconnected).
fn pump(
    state: &AppState,
    mut handle: moe_engine::RequestHandle,
    tx: &mpsc::Sender<Piece>,
    slot: QueueSlot,
) {
    let id = handle.id();
    let mut slot = Some(slot);
    let mut detok = Detokenizer::default();
    loop {
        if tx.is_closed() {
            handle.cancel();
            state.metrics.disconnect();
            break;
        }
        let Some(ev) = handle.recv_timeout(Duration::from_millis(20)) else {
            if handle.is_finished() {
                break;
            }
            continue;
        };
        slot = None;
        let (piece, last) = match ev {
            Event::Token(t) => (Piece::Token(detok.push(&state.codec, t.token)), false),
            Event::Finished { reason, timings } => (
                Piece::Finished {
                    reason,
                    timings,
                    rest: detok.finish(&state.codec),
                },
                true,
            ),
        };
        if tx.blocking_send(piece).is_err() {
            if !last {
                handle.cancel();
                state.metrics.disconnect();
            }
            break;
        }
        if last {
            break;
        }
    }
    drop(slot);
    state.inflight().remove(&id);
}

impl Live {
    fn record(&self, reason: &FinishReason, tokens: usize, t: &RequestTimings) {
        self.state.metrics.finished(
            openai::finish_reason(reason),
            self.prompt_tokens,
            tokens,
            t.ttft,
            t.tpot(),
        );
        if let Some(a) = &self.state.autoscaler {
            a.finished(t.ttft, t.tpot());
        }
    }

    fn usage(&self, completion: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    /// Adds the sampling seed, if any, to a response object.
    fn with_seed(&self, mut v: Value) -> Value {
        if let Some(seed) = self.seed {
            v["seed"] = json!(seed);
        }
        v
    }

    fn chunk(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        let model = &self.state.model_id;
        let created = self.state.created;
        let v = match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                             "finish_reason": finish}],
            }),
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                 "finish_reason": finish}],
                })
            }
        };
        self.with_seed(v)
    }
}

async fn whole_response(mut live: Live) -> Response {
    let endpoint = live.kind.endpoint();
    let mut tokens = 0usize;
    let mut text = String::new();
    let mut finish = None;
    while let Some(piece) = live.rx.recv().await {
        match piece {
            Piece::Token(delta) => {
                tokens += 1;
                text.push_str(&delta);
            }
            Piece::Finished {
                reason,
                timings,
                rest,
            } => {
                live.record(&reason, tokens, &timings);
                text.push_str(&rest);
                finish = Some(reason);
                break;
            }
        }
    }
    let reason = finish.unwrap_or(FinishReason::Error("the engine stopped".into()));
    if let FinishReason::Error(msg) = &reason {
        let e = ApiError::with_status(500, "server_error", format!("generation failed: {msg}"));
        return error_response(&live.state, endpoint, &e);
    }
    if reason == FinishReason::KvExhausted {
        let e = ApiError::with_status(
            503,
            "unavailable",
            "the KV cache ran out for this request; retry shortly",
        );
        return error_response(&live.state, endpoint, &e);
    }
    let fr = openai::finish_reason(&reason);
    let s = &live.state;
    let body = match live.kind {
        Kind::Completion => json!({
            "id": live.id, "object": "text_completion", "created": s.created, "model": s.model_id,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": fr}],
            "usage": live.usage(tokens),
        }),
        Kind::Chat => json!({
            "id": live.id, "object": "chat.completion", "created": s.created, "model": s.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": null, "finish_reason": fr}],
            "usage": live.usage(tokens),
        }),
    };
    s.metrics.request(endpoint, 200);
    axum::Json(live.with_seed(body)).into_response()
}

struct StreamState {
    live: Live,
    tokens: usize,
    first: bool,
    pending: std::collections::VecDeque<String>,
    done: bool,
}

fn stream_response(live: Live) -> Response {
    let st = StreamState {
        live,
        tokens: 0,
        first: true,
        pending: std::collections::VecDeque::new(),
        done: false,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            match st.live.rx.recv().await {
                Some(Piece::Token(delta)) => {
                    st.tokens += 1;
                    if !delta.is_empty() || st.first {
                        let c = st.live.chunk(Some(&delta), st.first, None);
                        st.first = false;
                        st.pending.push_back(c.to_string());
                    }
                }
                other => {
                    let (reason, rest) = match other {
                        Some(Piece::Finished {
                            reason,
                            timings,
                            rest,
                        }) => {
                            st.live.record(&reason, st.tokens, &timings);
                            (reason, rest)
                        }
                        _ => (
                            FinishReason::Error("the engine stopped".into()),
                            String::new(),
                        ),
                    };
                    let failure = match &reason {
                        FinishReason::Error(msg) => Some(format!("generation failed: {msg}")),
                        FinishReason::KvExhausted => {
                            Some("the KV cache ran out for this request; retry shortly".into())
                        }
                        _ => None,
                    };
                    if let Some(msg) = failure {
                        let e = ApiError::with_status(500, "server_error", msg);
                        st.pending.push_back(e.body().to_string());
                    }
                    let text = (!rest.is_empty()).then_some(rest.as_str());
                    let c = st
                        .live
                        .chunk(text, st.first, Some(openai::finish_reason(&reason)));
                    st.pending.push_back(c.to_string());
                    if st.live.include_usage {
                        let mut u = st.live.chunk(None, false, None);
                        u["choices"] = json!([]);
                        u["usage"] = st.live.usage(st.tokens);
                        st.pending.push_back(u.to_string());
                    }
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
            }
        }
    });
    Sse::new(stream).into_response()
}

/// Constant-time comparison of two tokens.
fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive).
fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let v = value.to_str().ok()?.trim();
    let (scheme, token) = v.split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The address a request came from (unspecified when the router runs without the connection
/// layer).
fn client_of(addr: Option<Extension<ClientAddr>>) -> IpAddr {
    addr.map_or(
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        |Extension(ClientAddr(ip))| ip,
    )
}

/// Checks the admin token of a request from `client`, counting failures per client and
/// refusing locked-out clients with 429 (the error and its `Retry-After` seconds).
fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    client: IpAddr,
    path: &str,
) -> Result<(), (ApiError, u64)> {
    let Some(expected) = &state.admin_token else {
        return Err((
            ApiError::with_status(404, "not_found", "no such endpoint"),
            0,
        ));
    };
    let now = std::time::Instant::now();
    if let Err(wait) = state.auth.check(client, now) {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        tracing::warn!(target: AUDIT, event = "auth_locked_out", %client, path,
            retry_after_ms = wait.as_millis() as u64,
            "admin request refused: too many failed authentications from this client");
        return Err((
            ApiError::with_status(
                429,
                "rate_limit_exceeded",
                format!(
                    "too many failed admin authentications from your address; retry in {secs} s"
                ),
            ),
            secs,
        ));
    }
    let values: Vec<&HeaderValue> = headers.get_all(header::AUTHORIZATION).iter().collect();
    let failure = match values.as_slice() {
        [] => Some((
            401,
            "missing Authorization header",
            "the admin endpoints need `Authorization: Bearer <token>`",
        )),
        [one] => match bearer_token(one) {
            None => Some((
                401,
                "not a bearer token",
                "the Authorization header must be `Bearer <token>`",
            )),
            Some(t) if same_token(t, expected) => None,
            Some(_) => Some((403, "wrong token", "the admin token is wrong")),
        },
        _ => Some((
            400,
            "several Authorization headers",
            "send exactly one Authorization header",
        )),
    };
    let Some((status, reason, message)) = failure else {
        state.auth.succeeded(client);
        return Ok(());
    };
    let (failures, lockout) = state.auth.failed(client, now);
    tracing::warn!(target: AUDIT, event = "auth_failed", %client, path, reason, failures,
        locked_for_ms = lockout.map_or(0, |d| d.as_millis() as u64),
        "admin authentication failed");
    let kind = match status {
        401 => "authentication_error",
        403 => "permission_error",
        _ => "invalid_request_error",
    };
    Err((ApiError::with_status(status, kind, message), 0))
}

fn auth_error_response(
    state: &AppState,
    endpoint: &'static str,
    e: &ApiError,
    secs: u64,
) -> Response {
    let mut resp = error_response(state, endpoint, e);
    if e.status == 429 {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// Parses `{"devices": N}`, `{"add": k}` or `{"remove": k}`.
pub fn parse_scale(body: &[u8]) -> Result<ScaleCommand, ApiError> {
    let v: Value = openai::parse_body(body)?;
    let Some(obj) = v.as_object() else {
        return Err(ApiError::bad(None, "send a JSON object"));
    };
    if obj.len() != 1 {
        return Err(ApiError::bad(
            None,
            "send exactly one of {\"devices\": N}, {\"add\": k} or {\"remove\": k}",
        ));
    }
    let (key, value) = obj.iter().next().expect("one entry");
    let n = value
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            ApiError::bad(
                None,
                format!("{key} must be a non-negative integer, not {value}"),
            )
        })?;
    match key.as_str() {
        "devices" => Ok(ScaleCommand::Devices(n)),
        "add" => Ok(ScaleCommand::Add(n)),
        "remove" => Ok(ScaleCommand::Remove(n)),
        other => Err(ApiError::bad(
            None,
            format!("unknown field {other:?}; use devices, add or remove"),
        )),
    }
}

async fn admin_scale(
    State(state): State<Arc<AppState>>,
    addr: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    const EP: &str = "admin_scale";
    let client = client_of(addr);
    if let Err((e, secs)) = authorize(&state, &headers, client, "/admin/scale") {
        return auth_error_response(&state, EP, &e, secs);
    }
    let cmd = match parse_scale(&body) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(target: AUDIT, event = "admin_command", %client,
                command = %String::from_utf8_lossy(&body[..body.len().min(200)]),
                outcome = "refused", error = %e.message, "admin scale command refused");
            return error_response(&state, EP, &e);
        }
    };
    let status = state.scale.status();
    let result = scale::precheck(cmd, &status).and_then(|()| state.scale.scale(cmd));
    match result {
        Ok(accepted) => {
            tracing::info!(target: AUDIT, event = "admin_command", %client, command = ?cmd,
                outcome = "accepted", state = accepted.state,
                target_devices = accepted.target_devices, "admin scale command accepted");
            state.metrics.request(EP, 202);
            (StatusCode::ACCEPTED, axum::Json(json!(accepted))).into_response()
        }
        Err(e) => {
            tracing::info!(target: AUDIT, event = "admin_command", %client, command = ?cmd,
                outcome = "refused", error = %e, "admin scale command refused");
            let api = match &e {
                ScaleError::Unavailable(_) => {
                    ApiError::with_status(503, "unavailable", e.to_string())
                }
                ScaleError::Busy(_) => {
                    ApiError::with_status(429, "rate_limit_exceeded", e.to_string())
                }
                _ => ApiError::bad(None, e.to_string()),
            };
            error_response(&state, EP, &api)
        }
    }
}

async fn admin_status(
    State(state): State<Arc<AppState>>,
    addr: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
) -> Response {
    const EP: &str = "admin_status";
    let client = client_of(addr);
    if let Err((e, secs)) = authorize(&state, &headers, client, "/admin/status") {
        return auth_error_response(&state, EP, &e, secs);
    }
    tracing::debug!(target: AUDIT, event = "admin_status", %client, "admin status read");
    state.metrics.request(EP, 200);
    let m = state.engine.metrics();
    axum::Json(json!({
        "scale": state.scale.status(),
        "engine": {
            "queue_depth": m.queue_depth,
            "running": m.running,
            "kv_usage": m.kv_utilisation(),
            "tokens_per_s": m.tokens_per_s,
            "last_error": m.last_error,
        },
        "autoscale": state
            .autoscaler
            .as_ref()
            .map_or_else(|| json!({"enabled": false}), Autoscaler::status),
        "inflight": state.inflight_count(),
        "waiting": state.waiting_count(),
        "connections": state.connections.snapshot().open,
        "draining": state.draining.load(Ordering::SeqCst),
    }))
    .into_response()
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Shared state.
    #[cfg_attr(not(test), allow(dead_code))]
    pub state: Arc<AppState>,
    http: Option<HttpServer>,
    drain: Duration,
    autoscale_task: Option<tokio::task::JoinHandle<()>>,
    run_loop: Option<RunLoop>,
}

/// How long, after the drain deadline, cancelled streams get to deliver their last chunk before
/// every connection is closed.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

impl Server {
    /// Binds `addr` and serves `setup` with the connection settings `http`; the engine runs on
    /// its own thread if `run_engine`; `drain` is the shutdown timeout.
    pub async fn start(
        setup: Setup,
        addr: SocketAddr,
        run_engine: bool,
        drain: Duration,
        http: HttpConfig,
    ) -> Result<Server> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let state = setup.state;
        let run_loop = run_engine.then(|| state.engine.start());
        let app = router(Arc::clone(&state));
        let http = HttpServer::spawn(listener, app, http, Arc::clone(&state.connections));
        let autoscale_task = state
            .autoscaler
            .is_some()
            .then(|| tokio::spawn(autoscale_loop(Arc::clone(&state))));
        Ok(Server {
            addr,
            state,
            http: Some(http),
            drain,
            autoscale_task,
            run_loop,
        })
    }

    /// Starts the engine's run loop (for servers started without it).
    #[cfg(test)]
    pub fn start_engine(&mut self) {
        if self.run_loop.is_none() {
            self.run_loop = Some(self.state.engine.start());
        }
    }

    /// Drains and stops: `/ready` and new generations get 503 at once, running generations get
    /// the shutdown timeout to finish and are cancelled after it, their streams get
    /// [`CLOSE_GRACE`] to deliver their last chunk, then every connection closes and the engine
    /// stops.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(t) = self.autoscale_task.take() {
            t.abort();
        }
        let state = Arc::clone(&self.state);
        state.begin_drain();
        if let Some(h) = &self.http {
            h.drain();
        }
        tracing::info!(target: AUDIT, event = "shutdown", phase = "drain",
            inflight = state.inflight_count(), timeout_ms = self.drain.as_millis() as u64,
            "draining: new generations get 503, running ones may finish");
        let deadline = tokio::time::Instant::now() + self.drain;
        while state.inflight_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cancelled = state.cancel_all();
        if cancelled > 0 {
            tracing::info!(target: AUDIT, event = "shutdown", phase = "cancel", cancelled,
                "the shutdown timeout passed: cancelling the generations still running");
        }
        let grace = tokio::time::Instant::now() + CLOSE_GRACE;
        while state.inflight_count() > 0 && tokio::time::Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(h) = self.http.take() {
            h.stop(grace.saturating_duration_since(tokio::time::Instant::now()))
                .await;
        }
        if let Some(r) = self.run_loop.take() {
            tokio::task::spawn_blocking(move || r.stop()).await?;
        }
        tracing::info!(target: AUDIT, event = "shutdown", phase = "stopped", "stopped");
        Ok(())
    }

    /// Waits for SIGTERM or Ctrl-C, then shuts down; a second signal exits the process at once.
    pub async fn serve_until_signal(self) -> Result<()> {
        let mut signals = Signals::install()?;
        signals.next().await;
        eprintln!("serve: shutting down (stopping intake, draining running requests)");
        tokio::spawn(async move {
            signals.next().await;
            tracing::warn!(target: AUDIT, event = "shutdown", phase = "forced",
                "second signal: exiting now");
            eprintln!("serve: second signal, exiting now");
            std::process::exit(1);
        });
        self.shutdown().await
    }
}

/// SIGTERM and SIGINT, installed once.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// The autoscaler's ticks, until the server drains.
async fn autoscale_loop(state: Arc<AppState>) {
    let Some(interval) = state.autoscaler.as_ref().map(Autoscaler::interval) else {
        return;
    };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !state.draining.load(Ordering::SeqCst) {
        ticks.tick().await;
        if let Some(a) = &state.autoscaler {
            a.tick(&state.engine.metrics(), state.scale.as_ref());
        }
    }
}

fn read_token(path: &std::path::Path) -> Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("reading the admin token file {}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("the admin token file {} is empty", path.display());
    }
    Ok(t)
}

/// The autoscaler settings of `args`.
fn autoscale_config(args: &Args, max_devices: usize) -> AutoscaleConfig {
    let ms = Duration::from_millis;
    let mut policy = SloPolicyConfig::new(ms(args.slo_ttft_ms), ms(args.slo_tpot_ms), max_devices);
    policy.min_devices = args.autoscale_min_devices;
    policy.sustain_up = ms(args.autoscale_sustain_up_ms);
    policy.sustain_down = ms(args.autoscale_sustain_down_ms);
    policy.cooldown = ms(args.autoscale_cooldown_ms);
    policy.sequences_per_device = args.autoscale_sequences_per_device;
    AutoscaleConfig {
        interval: ms(args.autoscale_interval_ms),
        policy,
    }
}

/// The connection settings of `args`, checked; `max_connections` comes from the descriptor
/// budget.
fn http_config(args: &Args, max_connections: usize) -> Result<HttpConfig> {
    if !(4096..=65536).contains(&args.max_header_bytes) {
        bail!(
            "--max-header-bytes {} must be between 4096 and 65536",
            args.max_header_bytes
        );
    }
    if args.max_body_bytes == 0 {
        bail!("--max-body-bytes must be at least 1");
    }
    if args.max_connections_per_client == 0 {
        bail!("--max-connections-per-client must be at least 1");
    }
    for (flag, v) in [
        ("--header-timeout-ms", args.header_timeout_ms),
        ("--body-timeout-ms", args.body_timeout_ms),
        ("--keep-alive-timeout-ms", args.keep_alive_timeout_ms),
        ("--write-timeout-ms", args.write_timeout_ms),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    let ms = Duration::from_millis;
    Ok(HttpConfig {
        header_timeout: ms(args.header_timeout_ms),
        body_timeout: ms(args.body_timeout_ms),
        keep_alive_timeout: ms(args.keep_alive_timeout_ms),
        write_timeout: ms(args.write_timeout_ms),
        framing: FramingLimits {
            max_head_bytes: args.max_header_bytes,
            max_uri_bytes: (args.max_header_bytes / 4).max(2048),
            max_body_bytes: args.max_body_bytes,
            ..FramingLimits::default()
        },
        caps: ConnectionCaps {
            max_connections,
            max_connections_per_client: args.max_connections_per_client,
            reserved_connections: args.reserved_connections,
        },
    })
}

/// Runs `serve`.
pub fn run(args: &Args) -> Result<()> {
    audit::init_logging();
    let max_devices = parse_devices(&args.devices)?;
    let initial = args.initial.unwrap_or(max_devices);
    if args.max_queue == 0 {
        bail!("--max-queue 0 would refuse every request with 429; give at least 1");
    }
    let admin_token = args
        .admin_token_file
        .as_deref()
        .map(read_token)
        .transpose()?;
    let model_id = args.served_model_name.clone().unwrap_or_else(|| {
        args.model
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
    });
    let config = SetupConfig {
        max_devices,
        initial,
        placement: args.placement,
        max_queue: args.max_queue,
        admin_token,
        model_id,
        engine: EngineConfig::default(),
        autoscale: args.autoscale.then(|| autoscale_config(args, max_devices)),
        scale_queue: 4,
        auth_throttle: ThrottleConfig::default(),
    };
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (args.host.as_str(), args.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|()| anyhow::anyhow!("--host {:?} is not an address", args.host))?;
    // Check what does not need the model first.
    http_config(args, 1)?;
    let fd_limit = descriptors::raise_limit();
    let before = descriptors::open_now().unwrap_or(0);
    let setup = Setup::load(&args.model, &config)?;
    let after = descriptors::open_now().unwrap_or(0);
    let budget = DescriptorBudget::new(
        fd_limit.unwrap_or(u64::MAX),
        after,
        after.saturating_sub(before),
        initial,
        max_devices,
        args.reserved_connections as u64,
    );
    let max_connections = budget.max_connections(args.max_connections)?;
    let http = http_config(args, max_connections)?;
    tracing::info!(
        fd_limit = budget.limit,
        fds_in_use = budget.in_use,
        scaling_reserve = budget.scaling_reserve,
        max_connections,
        per_client = args.max_connections_per_client,
        reserved = args.reserved_connections,
        "connection caps"
    );
    if let Some(note) = &setup.state.codec.template_note {
        eprintln!("serve: {note}");
    }
    if args.autoscale && max_devices == 1 {
        eprintln!("serve: --autoscale with a single device (--devices host:1) never scales");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = rt.block_on(async {
        let server = Server::start(
            setup,
            addr,
            true,
            Duration::from_secs(args.shutdown_timeout),
            http,
        )
        .await?;
        println!("listening on http://{}", server.addr);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        server.serve_until_signal().await
    });
    // Blocking work still running (a big prompt being tokenised) must not hold the exit.
    rt.shutdown_timeout(Duration::from_millis(500));
    served?;
    eprintln!("serve: stopped");
    Ok(())
}
