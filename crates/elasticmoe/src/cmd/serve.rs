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
use self::metrics::{Finished, ServerMetrics};
use self::openai::{ApiError, Endpoint, Generation};
use self::scale::{NoScaling, ScaleControl, ScaleError};
use self::text::{Detokenizer, StopMatcher, StopStep, TextCodec};
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
    /// Model name reported by `/v1/models` and in responses (default: the model directory's
    /// name); requests naming another model get 404.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Chat template file (Jinja) to use instead of `tokenizer_config.json`'s `chat_template`.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// API key that `/v1/*` requests must send as `Authorization: Bearer <key>` (separate from
    /// the admin token; `/health`, `/ready` and `/metrics` stay open).
    #[arg(long)]
    pub api_key: Option<String>,
    /// File holding the API key (alternative to `--api-key`, which shows in `ps`).
    #[arg(long, value_name = "FILE", conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,
    /// Tokens one rank computes per iteration (prefill chunks and decodes), 1 to 1048576.
    #[arg(long, default_value_t = 256)]
    pub max_num_batched_tokens: usize,
    /// Sequences one rank runs at once, 1 to 4096.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// KV cache per rank, in tokens (rounded up to whole KV chunks of 256 tokens); the pool may
    /// grow to 4 times this (default: 2048 tokens, growing to 8192).
    #[arg(long)]
    pub kv_cache_tokens: Option<usize>,
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
    api_key: Option<String>,
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
    /// API key of `/v1/*`.
    pub api_key: Option<String>,
    /// `--chat-template`.
    pub chat_template: Option<PathBuf>,
    /// KV pools (sizes from `--kv-cache-tokens`).
    pub deployment: moe_host::deployment::DeploymentConfig,
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
        let codec = TextCodec::from_dir(model, config.chat_template.as_deref())?;
        let checkpoint: scaler_exec::executor::Checkpoint = Arc::new(
            Checkpoint::open(model)
                .with_context(|| format!("opening the checkpoint in {}", model.display()))?,
        );
        let host = HostEngineConfig {
            devices: config.initial,
            max_devices: config.max_devices,
            placement: config.placement.into(),
            engine: config.engine,
            deployment: config.deployment,
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
                api_key: config.api_key.clone(),
                auth: AuthThrottle::new(config.auth_throttle),
                scale,
                autoscaler,
                metrics: ServerMetrics::new(&config.model_id),
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
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            require_api_key,
        ));
    let mut r = v1
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

/// Checks `--api-key` on `/v1/*`: `Authorization: Bearer <key>`, compared in constant time.
async fn require_api_key(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(req).await;
    };
    let values: Vec<&HeaderValue> = req
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .collect();
    let ok = match values.as_slice() {
        [one] => bearer_token(one).is_some_and(|t| same_token(t, key)),
        _ => false,
    };
    if ok {
        return next.run(req).await;
    }
    let endpoint = match req.uri().path() {
        "/v1/completions" => "completions",
        "/v1/chat/completions" => "chat_completions",
        _ => "models",
    };
    let message = if values.is_empty() {
        "this server needs an API key: send `Authorization: Bearer <key>`"
    } else {
        "the API key is wrong (send exactly one `Authorization: Bearer <key>`)"
    };
    let e = ApiError::with_status(401, "authentication_error", message);
    error_response(&state, endpoint, &e)
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
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
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

/// A parsed, templated and tokenised request.
struct Prepared {
    g: Generation,
    /// The prompt's text, for `echo`.
    prompt_text: Option<String>,
}

/// Parses, templates and tokenises a request body (on a blocking thread: it can take
/// milliseconds for a big prompt).
fn prepare(state: &AppState, kind: Kind, body: &[u8]) -> Result<Prepared, ApiError> {
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
    let obj = openai::parse_object(body)?;
    let endpoint = match kind {
        Kind::Completion => Endpoint::Completions,
        Kind::Chat => Endpoint::Chat,
    };
    openai::check_fields(&obj, endpoint)?;
    if let Some(Value::String(m)) = obj.get("model") {
        if *m != state.model_id {
            return Err(ApiError {
                status: 404,
                kind: "not_found_error",
                param: Some("model".into()),
                message: format!(
                    "the model {m:?} does not exist here; this server serves {:?} (GET /v1/models)",
                    state.model_id
                ),
            });
        }
    }
    let ids = match kind {
        Kind::Completion => {
            too_long(openai::prompt_text_bytes(&obj), "prompt")?;
            openai::prompt_ids(&obj, &state.codec)?
        }
        Kind::Chat => {
            let messages = openai::parse_messages(obj.get("messages"))?;
            let opts = openai::render_options(&obj)?;
            let bytes = messages
                .iter()
                .map(|m| m.role.len() + m.content.len())
                .sum();
            too_long(bytes, "messages")?;
            state.codec.encode_chat(&messages, &opts)?
        }
    };
    let g = openai::generation(&obj, endpoint, ids, &state.limits)?;
    let prompt_text = g.echo.then(|| state.codec.decode(&g.prompt));
    Ok(Prepared { g, prompt_text })
}

/// Runs `prepare` off the async workers, on at most all cores but one at a time.
async fn prepare_off_worker(
    state: &Arc<AppState>,
    kind: Kind,
    body: Bytes,
) -> Result<Prepared, ApiError> {
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

/// One generated token as the response reports it.
#[derive(Debug, Clone)]
struct TokenOut {
    /// The text it completed (empty while a character is unfinished or a stop string may
    /// begin).
    text: String,
    /// With logprobs: the token, its logprob and the alternatives.
    logprob: Option<TokenLogprob>,
}

#[derive(Debug, Clone)]
struct TokenLogprob {
    token: String,
    logprob: f32,
    top: Vec<(String, f32)>,
}

/// What a pump sends the response: text, decoded on the pump's blocking thread.
enum Piece {
    /// One generated token of choice `index`.
    Token { index: usize, out: TokenOut },
    /// The end of choice `index`, with the text held back until then.
    Finished {
        index: usize,
        reason: FinishReason,
        timings: RequestTimings,
        tokens: usize,
        rest: String,
    },
}

/// A submitted generation: its pieces, arriving from the pumps (one per choice).
struct Live {
    state: Arc<AppState>,
    kind: Kind,
    id: String,
    created: u64,
    rx: mpsc::Receiver<Piece>,
    prompt_tokens: usize,
    n: usize,
    include_usage: bool,
    logprobs: bool,
    /// The prompt's text, sent first (`echo`).
    echo: Option<String>,
    /// The sampling seed, for sampled generations.
    seed: Option<u64>,
    user: Option<String>,
    received: std::time::Instant,
}

/// The engine request of choice `i` of `g`.
fn engine_request(state: &AppState, g: &Generation, i: usize) -> Request {
    let mut stop = if g.stop_at_eos {
        state.eos.clone()
    } else {
        Vec::new()
    };
    stop.extend(&g.stop_token_ids);
    Request::greedy(g.prompt.clone(), g.max_tokens)
        .with_stop_tokens(stop)
        .with_sampling(g.sampling_of(i))
        .with_logprobs(g.logprobs.is_some())
        .with_top_logprobs(g.logprobs.unwrap_or(0))
}

async fn generate(state: Arc<AppState>, kind: Kind, body: Bytes) -> Response {
    let endpoint = kind.endpoint();
    let received = std::time::Instant::now();
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
    let Prepared { g, prompt_text } = match prepare_off_worker(&state, kind, body).await {
        Ok(p) => p,
        Err(e) => return error_response(&state, endpoint, &e),
    };
    let mut handles = Vec::with_capacity(g.n);
    for i in 0..g.n {
        match state.engine.submit(engine_request(&state, &g, i)) {
            Ok(h) => handles.push(h),
            Err(e) => {
                for h in &handles {
                    h.cancel();
                }
                return error_response(&state, endpoint, &engine_error(&e));
            }
        }
    }
    let (tx, rx) = mpsc::channel(64);
    let slot = Arc::new(slot);
    for (index, handle) in handles.into_iter().enumerate() {
        state.inflight().insert(handle.id());
        let pump_state = Arc::clone(&state);
        let tx = tx.clone();
        let slot = Arc::clone(&slot);
        let stops = StopMatcher::new(g.stop.clone(), g.include_stop);
        tokio::task::spawn_blocking(move || {
            pump(&pump_state, handle, index, stops, &tx, slot);
        });
    }
    drop(tx);
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Completion => format!("cmpl-{n}"),
        Kind::Chat => format!("chatcmpl-{n}"),
    };
    let live = Live {
        state: Arc::clone(&state),
        kind,
        id,
        created: unix_now(),
        rx,
        prompt_tokens: g.prompt.len(),
        n: g.n,
        include_usage: g.include_usage,
        logprobs: g.logprobs.is_some(),
        echo: prompt_text,
        seed: g.seed(),
        user: g.user.clone(),
        received,
    };
    if g.stream {
        state.metrics.request(endpoint, 200);
        stream_response(live)
    } else {
        whole_response(live).await
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Moves one choice's events from the engine to the response, detokenising incrementally and
/// matching stop strings on the way; gives the request's queue slot back once every choice had
/// its first event; cancels the choice when the response is gone (the client disconnected) or
/// a stop string matched.
fn pump(
    state: &AppState,
    mut handle: moe_engine::RequestHandle,
    index: usize,
    mut stops: StopMatcher,
    tx: &mpsc::Sender<Piece>,
    slot: Arc<QueueSlot>,
) {
    let id = handle.id();
    let mut slot = Some(slot);
    let mut detok = Detokenizer::default();
    let mut tokens = 0usize;
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
            Event::Token(t) => {
                tokens += 1;
                let delta = detok.push(&state.codec, t.token);
                let logprob = t.logprob.map(|lp| TokenLogprob {
                    token: state.codec.token_text(t.token),
                    logprob: lp,
                    top: t
                        .top_logprobs
                        .iter()
                        .map(|&(id, lp)| (state.codec.token_text(id), lp))
                        .collect(),
                });
                match stops.push(&delta) {
                    StopStep::Emit(text) => (
                        Piece::Token {
                            index,
                            out: TokenOut { text, logprob },
                        },
                        false,
                    ),
                    StopStep::Stopped(text) => {
                        // The stop string ends this choice: its text goes out, the engine
                        // stops, and the finish says `stop`.
                        handle.cancel();
                        let out = TokenOut { text, logprob };
                        if tx.blocking_send(Piece::Token { index, out }).is_err() {
                            break;
                        }
                        let timings = loop {
                            match handle.recv() {
                                Some(Event::Finished { timings, .. }) => break timings,
                                Some(Event::Token(_)) => {}
                                None => break RequestTimings::default(),
                            }
                        };
                        (
                            Piece::Finished {
                                index,
                                reason: FinishReason::Stop(t.token),
                                timings,
                                tokens,
                                rest: String::new(),
                            },
                            true,
                        )
                    }
                }
            }
            Event::Finished { reason, timings } => {
                let mut rest = String::new();
                if let StopStep::Emit(s) = stops.push(&detok.finish(&state.codec)) {
                    rest.push_str(&s);
                }
                rest.push_str(&stops.finish());
                (
                    Piece::Finished {
                        index,
                        reason,
                        timings,
                        tokens,
                        rest,
                    },
                    true,
                )
            }
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
        self.state.metrics.finished(&Finished {
            reason: openai::finish_reason(reason),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: tokens,
            timings: t,
        });
        if let Some(a) = &self.state.autoscaler {
            a.finished(t.ttft, t.tpot());
        }
    }

    /// The request log line, once every choice finished.
    fn log(
        &self,
        status: u16,
        reasons: &[Option<&'static str>],
        tokens: usize,
        ttft: Option<Duration>,
    ) {
        tracing::info!(
            target: "request",
            id = %self.id,
            endpoint = self.kind.endpoint(),
            status,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = tokens,
            n = self.n,
            ttft_ms = ttft.map(|d| d.as_secs_f64() * 1e3),
            latency_ms = self.received.elapsed().as_secs_f64() * 1e3,
            finish = ?reasons,
            user = self.user.as_deref(),
            "request finished"
        );
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

    /// The `logprobs` object of some tokens, in the endpoint's shape (`None`: not asked).
    fn logprobs_of(&self, toks: &[TokenOut], offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let lps: Vec<&TokenLogprob> = toks.iter().filter_map(|t| t.logprob.as_ref()).collect();
        match self.kind {
            Kind::Chat => json!({
                "content": lps.iter().map(|l| json!({
                    "token": l.token,
                    "logprob": l.logprob,
                    "bytes": l.token.as_bytes(),
                    "top_logprobs": l.top.iter().map(|(t, lp)| json!({
                        "token": t, "logprob": lp, "bytes": t.as_bytes(),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
            Kind::Completion => {
                let mut text_offset = Vec::with_capacity(toks.len());
                let mut at = offset;
                for t in toks {
                    text_offset.push(at);
                    at += t.text.len();
                }
                json!({
                    "tokens": lps.iter().map(|l| &l.token).collect::<Vec<_>>(),
                    "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                    "top_logprobs": lps.iter().map(|l| l.top.iter().map(|(t, lp)| (t.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                    "text_offset": text_offset,
                })
            }
        }
    }

    fn chunk(
        &self,
        index: usize,
        text: Option<&str>,
        first: bool,
        finish: Option<&str>,
        logprobs: Value,
    ) -> Value {
        let model = &self.state.model_id;
        let created = self.created;
        let v = match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text.unwrap_or(""), "logprobs": logprobs,
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
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish}],
                })
            }
        };
        self.with_seed(v)
    }
}

/// What one choice of a non-streamed response collected.
#[derive(Default)]
struct Choice {
    text: String,
    tokens: Vec<TokenOut>,
    count: usize,
    finish: Option<FinishReason>,
}

async fn whole_response(mut live: Live) -> Response {
    let endpoint = live.kind.endpoint();
    let mut choices: Vec<Choice> = (0..live.n).map(|_| Choice::default()).collect();
    let mut ttft: Option<Duration> = None;
    while let Some(piece) = live.rx.recv().await {
        match piece {
            Piece::Token { index, out } => {
                choices[index].text.push_str(&out.text);
                choices[index].tokens.push(out);
            }
            Piece::Finished {
                index,
                reason,
                timings,
                tokens,
                rest,
            } => {
                live.record(&reason, tokens, &timings);
                ttft = match (ttft, timings.ttft) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let c = &mut choices[index];
                c.text.push_str(&rest);
                c.count = tokens;
                c.finish = Some(reason);
            }
        }
    }
    let total: usize = choices.iter().map(|c| c.count).sum();
    let reasons: Vec<Option<&'static str>> = choices
        .iter()
        .map(|c| c.finish.as_ref().map(openai::finish_reason))
        .collect();
    let failure = choices.iter().find_map(|c| match &c.finish {
        None => Some(ApiError::with_status(
            500,
            "server_error",
            "generation failed: the engine stopped",
        )),
        Some(FinishReason::Error(msg)) => Some(ApiError::with_status(
            500,
            "server_error",
            format!("generation failed: {msg}"),
        )),
        Some(FinishReason::KvExhausted) => Some(ApiError::with_status(
            503,
            "unavailable",
            "the KV cache ran out for this request; retry shortly",
        )),
        _ => None,
    });
    if let Some(e) = failure {
        live.log(e.status, &reasons, total, ttft);
        return error_response(&live.state, endpoint, &e);
    }
    let echo = live.echo.clone().unwrap_or_default();
    let items: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let fr = c.finish.as_ref().map(openai::finish_reason);
            let lp = live.logprobs_of(&c.tokens, echo.len());
            match live.kind {
                Kind::Completion => json!({"index": i, "text": format!("{echo}{}", c.text),
                    "logprobs": lp, "finish_reason": fr}),
                Kind::Chat => json!({"index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": lp, "finish_reason": fr}),
            }
        })
        .collect();
    let s = &live.state;
    let object = match live.kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    let body = json!({
        "id": live.id, "object": object, "created": live.created, "model": s.model_id,
        "choices": items, "usage": live.usage(total),
    });
    s.metrics.request(endpoint, 200);
    live.log(200, &reasons, total, ttft);
    axum::Json(live.with_seed(body)).into_response()
}

struct StreamState {
    live: Live,
    tokens: usize,
    /// Choices that sent their first chunk.
    started: Vec<bool>,
    finished: Vec<Option<&'static str>>,
    ttft: Option<Duration>,
    pending: std::collections::VecDeque<String>,
    done: bool,
}

fn stream_response(live: Live) -> Response {
    let n = live.n;
    let mut st = StreamState {
        live,
        tokens: 0,
        started: vec![false; n],
        finished: vec![None; n],
        ttft: None,
        pending: std::collections::VecDeque::new(),
        done: false,
    };
    if let Some(echo) = st.live.echo.clone() {
        for i in 0..n {
            let c = st.live.chunk(i, Some(&echo), false, None, Value::Null);
            st.pending.push_back(c.to_string());
        }
    }
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            match st.live.rx.recv().await {
                Some(Piece::Token { index, out }) => {
                    st.tokens += 1;
                    let first = !st.started[index];
                    if !out.text.is_empty() || first || out.logprob.is_some() {
                        let lp = st.live.logprobs_of(std::slice::from_ref(&out), 0);
                        let c = st.live.chunk(index, Some(&out.text), first, None, lp);
                        st.started[index] = true;
                        st.pending.push_back(c.to_string());
                    }
                }
                Some(Piece::Finished {
                    index,
                    reason,
                    timings,
                    tokens,
                    rest,
                }) => {
                    let _ = tokens;
                    st.live.record(&reason, tokens, &timings);
                    st.ttft = match (st.ttft, timings.ttft) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
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
                    let fr = openai::finish_reason(&reason);
                    st.finished[index] = Some(fr);
                    let text = (!rest.is_empty()).then_some(rest.as_str());
                    let first = !st.started[index];
                    st.started[index] = true;
                    let c = st.live.chunk(index, text, first, Some(fr), Value::Null);
                    st.pending.push_back(c.to_string());
                }
                None => {
                    // Every pump is done: choices without a finish failed.
                    for i in 0..st.live.n {
                        if st.finished[i].is_none() {
                            let e = ApiError::with_status(
                                500,
                                "server_error",
                                "generation failed: the engine stopped",
                            );
                            st.pending.push_back(e.body().to_string());
                            st.finished[i] = Some("error");
                            let c =
                                st.live
                                    .chunk(i, None, !st.started[i], Some("error"), Value::Null);
                            st.pending.push_back(c.to_string());
                        }
                    }
                    if st.live.include_usage {
                        let mut u = st.live.chunk(0, None, false, None, Value::Null);
                        u["choices"] = json!([]);
                        u["usage"] = st.live.usage(st.tokens);
                        st.pending.push_back(u.to_string());
                    }
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                    st.live.log(200, &st.finished, st.tokens, st.ttft);
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

/// The engine's batching from `--max-num-batched-tokens` and `--max-num-seqs`, checked.
fn engine_config(args: &Args) -> Result<EngineConfig> {
    if !(1..=1 << 20).contains(&args.max_num_batched_tokens) {
        bail!(
            "--max-num-batched-tokens {} must be between 1 and 1048576",
            args.max_num_batched_tokens
        );
    }
    if !(1..=4096).contains(&args.max_num_seqs) {
        bail!(
            "--max-num-seqs {} must be between 1 and 4096",
            args.max_num_seqs
        );
    }
    let mut c = EngineConfig::default();
    c.scheduler.max_batch_tokens = args.max_num_batched_tokens;
    c.scheduler.max_running_per_rank = args.max_num_seqs;
    Ok(c)
}

/// The KV pools from `--kv-cache-tokens`, checked: whole chunks of one chunk's tokens, at least
/// one chunk, at most 2^24 tokens per rank; the pool may grow to 4 times its start.
pub fn deployment_config(
    kv_cache_tokens: Option<usize>,
) -> Result<moe_host::deployment::DeploymentConfig> {
    let mut d = moe_host::deployment::DeploymentConfig::default();
    let Some(tokens) = kv_cache_tokens else {
        return Ok(d);
    };
    let chunk = d.block_tokens * d.blocks_per_chunk;
    if !(chunk..=1 << 24).contains(&tokens) {
        bail!(
            "--kv-cache-tokens {tokens} must be between {chunk} (one KV chunk) and 16777216 \
             tokens per rank"
        );
    }
    d.kv_chunks = tokens.div_ceil(chunk);
    d.kv_max_chunks = d.kv_chunks * 4;
    Ok(d)
}

/// Runs `serve`.
pub fn run(args: &Args) -> Result<()> {
    audit::init_logging("info");
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
    let api_key = match (&args.api_key, &args.api_key_file) {
        (Some(k), _) if k.trim().is_empty() => bail!("--api-key is empty"),
        (Some(k), _) => Some(k.trim().to_string()),
        (None, Some(f)) => Some(read_token(f)?),
        (None, None) => None,
    };
    let engine = engine_config(args)?;
    let deployment = deployment_config(args.kv_cache_tokens)?;
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
        api_key,
        chat_template: args.chat_template.clone(),
        deployment,
        model_id,
        engine,
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
        tracing::warn!("{note}");
    }
    if args.autoscale && max_devices == 1 {
        tracing::warn!("--autoscale with a single device (--devices host:1) never scales");
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
