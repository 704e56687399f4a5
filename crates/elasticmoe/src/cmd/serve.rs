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
//! scaler's SLO policy from a periodic task ([`autoscale::Autoscaler`]). On SIGTERM or Ctrl-C the server stops
//! taking requests, lets running ones finish until `--shutdown-timeout`, cancels the rest, and
//! exits 0. The HTTP layer holds no serving logic of its own: validation of token ids and KV
//! capacity is the engine's, scaling the executor's.

pub mod autoscale;
pub mod executor_scale;
pub mod metrics;
pub mod openai;
pub mod scale;
pub mod text;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use moe_engine::{
    Engine, EngineConfig, Event, FinishReason, Request, RequestError, RequestId, RequestLimits,
    RunLoop, TokenId,
};
use moe_host::worker::{DeploymentRunner, HostEngineConfig};
use moe_model::checkpoint::Checkpoint;
use moe_model::config::ModelConfig;
use scaler::{ScaleCommand, SloPolicyConfig};
use scaler_exec::executor::{HostExecutor, HostExecutorConfig};
use scaler_exec::DeviceKind;

use self::autoscale::{AutoscaleConfig, Autoscaler};
use self::executor_scale::ExecutorScale;
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
    /// Requests waiting for admission beyond which new ones get 429.
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
    admin_token: Option<String>,
    scale: Arc<dyn ScaleControl>,
    autoscaler: Option<Autoscaler>,
    metrics: ServerMetrics,
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
    /// Queue bound.
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
        Ok(Setup {
            state: Arc::new(AppState {
                engine,
                codec,
                model_id: config.model_id.clone(),
                limits,
                eos: cfg.eos_token_ids.clone(),
                max_queue: config.max_queue,
                admin_token: config.admin_token.clone(),
                scale,
                autoscaler,
                metrics: ServerMetrics::default(),
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
    r.fallback(not_found).with_state(state)
}

fn error_response(state: &AppState, endpoint: &'static str, e: &ApiError) -> Response {
    state.metrics.request(endpoint, e.status);
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, axum::Json(e.body())).into_response();
    if e.status == 429 {
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
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "draining"})),
        )
            .into_response()
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
    let body = state
        .metrics
        .render(&state.engine.metrics(), &state.scale.status());
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
    let parsed = openai::parse_body::<CompletionRequest>(&body).and_then(|req| {
        let ids = req.prompt_ids(&state.codec)?;
        req.common
            .generation(ids, openai::DEFAULT_COMPLETION_TOKENS, &state.limits)
    });
    generate(state, Kind::Completion, parsed).await
}

async fn chat(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let parsed = openai::parse_body::<ChatRequest>(&body).and_then(|req| {
        if req.messages.is_empty() {
            return Err(ApiError::bad(
                Some("messages"),
                "messages is empty: send at least one message",
            ));
        }
        let prompt = state.codec.template.render(&req.messages);
        let ids = state
            .codec
            .encode(&prompt)
            .map_err(|e| ApiError::bad(Some("messages"), e))?;
        req.common
            .generation(ids, openai::DEFAULT_CHAT_TOKENS, &state.limits)
    });
    generate(state, Kind::Chat, parsed).await
}

fn engine_error(e: &RequestError) -> ApiError {
    match e {
        RequestError::EngineStopped => {
            ApiError::with_status(503, "unavailable", "the server is shutting down")
        }
        other => ApiError::bad(None, other.to_string()),
    }
}

/// A submitted generation: its events, arriving from the pump.
struct Live {
    state: Arc<AppState>,
    kind: Kind,
    id: String,
    rx: mpsc::Receiver<Event>,
    prompt_tokens: usize,
    include_usage: bool,
}

async fn generate(
    state: Arc<AppState>,
    kind: Kind,
    parsed: Result<Generation, ApiError>,
) -> Response {
    let endpoint = kind.endpoint();
    let g = match parsed {
        Ok(g) => g,
        Err(e) => return error_response(&state, endpoint, &e),
    };
    if state.draining.load(Ordering::SeqCst) {
        let e = ApiError::with_status(503, "unavailable", "the server is shutting down");
        return error_response(&state, endpoint, &e);
    }
    let queued = state.engine.metrics().queue_depth;
    if queued >= state.max_queue {
        let e = ApiError::with_status(
            429,
            "rate_limit_exceeded",
            format!(
                "{queued} requests are waiting (the limit is {}); retry shortly",
                state.max_queue
            ),
        );
        return error_response(&state, endpoint, &e);
    }
    let stop = if g.stop_at_eos {
        state.eos.clone()
    } else {
        Vec::new()
    };
    let prompt_tokens = g.prompt.len();
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
    tokio::task::spawn_blocking(move || pump(&pump_state, handle, &tx));
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
    };
    if g.stream {
        state.metrics.request(endpoint, 200);
        stream_response(live)
    } else {
        whole_response(live).await
    }
}

/// Moves a request's events from the engine to the response; cancels it when the response is
/// gone (the client disconnected).
fn pump(state: &AppState, mut handle: moe_engine::RequestHandle, tx: &mpsc::Sender<Event>) {
    let id = handle.id();
    loop {
        if tx.is_closed() {
            handle.cancel();
            state.metrics.disconnect();
            break;
        }
        match handle.recv_timeout(Duration::from_millis(20)) {
            Some(ev) => {
                let last = matches!(ev, Event::Finished { .. });
                if tx.blocking_send(ev).is_err() {
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
            None if handle.is_finished() => break,
            None => {}
        }
    }
    state.inflight().remove(&id);
}

impl Live {
    fn record(&self, reason: &FinishReason, tokens: usize, t: &moe_engine::RequestTimings) {
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

    fn chunk(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        let model = &self.state.model_id;
        let created = self.state.created;
        match self.kind {
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
        }
    }
}

async fn whole_response(mut live: Live) -> Response {
    let endpoint = live.kind.endpoint();
    let mut tokens = Vec::new();
    let mut finish = None;
    while let Some(ev) = live.rx.recv().await {
        match ev {
            Event::Token(t) => tokens.push(t.token),
            Event::Finished { reason, timings } => {
                live.record(&reason, tokens.len(), &timings);
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
    let text = live.state.codec.decode(&tokens);
    let fr = openai::finish_reason(&reason);
    let s = &live.state;
    let body = match live.kind {
        Kind::Completion => json!({
            "id": live.id, "object": "text_completion", "created": s.created, "model": s.model_id,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": fr}],
            "usage": live.usage(tokens.len()),
        }),
        Kind::Chat => json!({
            "id": live.id, "object": "chat.completion", "created": s.created, "model": s.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": null, "finish_reason": fr}],
            "usage": live.usage(tokens.len()),
        }),
    };
    s.metrics.request(endpoint, 200);
    axum::Json(body).into_response()
}

struct StreamState {
    live: Live,
    detok: Detokenizer,
    tokens: usize,
    first: bool,
    pending: std::collections::VecDeque<String>,
    done: bool,
}

fn stream_response(live: Live) -> Response {
    let st = StreamState {
        live,
        detok: Detokenizer::default(),
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
                Some(Event::Token(t)) => {
                    st.tokens += 1;
                    let delta = st.detok.push(&st.live.state.codec, t.token);
                    if !delta.is_empty() || st.first {
                        let c = st.live.chunk(Some(&delta), st.first, None);
                        st.first = false;
                        st.pending.push_back(c.to_string());
                    }
                }
                other => {
                    let reason = match other {
                        Some(Event::Finished { reason, timings }) => {
                            st.live.record(&reason, st.tokens, &timings);
                            reason
                        }
                        _ => FinishReason::Error("the engine stopped".into()),
                    };
                    let rest = st.detok.finish(&st.live.state.codec);
                    if let FinishReason::Error(msg) = &reason {
                        let e = ApiError::with_status(
                            500,
                            "server_error",
                            format!("generation failed: {msg}"),
                        );
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

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.admin_token else {
        return Err(ApiError::with_status(404, "not_found", "no such endpoint"));
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::with_status(
            401,
            "authentication_error",
            "the admin endpoints need `Authorization: Bearer <token>`",
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        None => Err(ApiError::with_status(
            401,
            "authentication_error",
            "the Authorization header must be `Bearer <token>`",
        )),
        Some(t) if same_token(t, expected) => Ok(()),
        Some(_) => Err(ApiError::with_status(
            403,
            "permission_error",
            "the admin token is wrong",
        )),
    }
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
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    const EP: &str = "admin_scale";
    if let Err(e) = authorize(&state, &headers) {
        return error_response(&state, EP, &e);
    }
    let cmd = match parse_scale(&body) {
        Ok(c) => c,
        Err(e) => return error_response(&state, EP, &e),
    };
    let status = state.scale.status();
    let result = scale::precheck(cmd, &status).and_then(|()| state.scale.scale(cmd));
    match result {
        Ok(accepted) => {
            state.metrics.request(EP, 202);
            (StatusCode::ACCEPTED, axum::Json(json!(accepted))).into_response()
        }
        Err(e) => {
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

async fn admin_status(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    const EP: &str = "admin_status";
    if let Err(e) = authorize(&state, &headers) {
        return error_response(&state, EP, &e);
    }
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
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    autoscale_task: Option<tokio::task::JoinHandle<()>>,
    run_loop: Option<RunLoop>,
}

impl Server {
    /// Binds `addr` and serves `setup`; the engine runs on its own thread if `run_engine`.
    pub async fn start(
        setup: Setup,
        addr: SocketAddr,
        run_engine: bool,
        drain: Duration,
    ) -> Result<Server> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr()?;
        let state = setup.state;
        let run_loop = run_engine.then(|| state.engine.start());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(Arc::clone(&state));
        let drain_state = Arc::clone(&state);
        let signal = async move {
            let _ = rx.await;
            drain_state.begin_drain();
            let s = Arc::clone(&drain_state);
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + drain;
                while s.inflight_count() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                s.cancel_all();
            });
        };
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
        });
        let autoscale_task = state
            .autoscaler
            .is_some()
            .then(|| tokio::spawn(autoscale_loop(Arc::clone(&state))));
        Ok(Server {
            addr,
            state,
            shutdown: Some(tx),
            task,
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

    /// Stops intake, lets running requests finish (or cancels them after the drain deadline),
    /// waits for every connection to close, then stops the engine.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(t) = self.autoscale_task.take() {
            t.abort();
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let served = (&mut self.task).await;
        if let Some(r) = self.run_loop.take() {
            tokio::task::spawn_blocking(move || r.stop()).await?;
        }
        served?.context("serving HTTP")?;
        Ok(())
    }

    /// Waits for SIGTERM or Ctrl-C, then shuts down.
    pub async fn serve_until_signal(self) -> Result<()> {
        wait_for_signal().await?;
        eprintln!("serve: shutting down (stopping intake, draining running requests)");
        self.shutdown().await
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

async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
    }
    Ok(())
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

/// Runs `serve`.
pub fn run(args: &Args) -> Result<()> {
    let max_devices = parse_devices(&args.devices)?;
    let initial = args.initial.unwrap_or(max_devices);
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
    let setup = Setup::load(&args.model, &config)?;
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
    rt.block_on(async {
        let server = Server::start(
            setup,
            addr,
            true,
            Duration::from_secs(args.shutdown_timeout),
        )
        .await?;
        println!("listening on http://{}", server.addr);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        server.serve_until_signal().await
    })?;
    eprintln!("serve: stopped");
    Ok(())
}
