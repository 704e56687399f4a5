//! `elasticmoe bench scale`: add or remove devices under a steady decode load, with each strategy,
//! and measure it as a user of the service would feel it.
//!
//! ```text
//! elasticmoe bench scale --model /tmp/dsv2 --devices cuda:0,1 --steps 1-2,2-1 \
//!     --strategies elastic,cold-restart,colocated --out /tmp/scale
//! elasticmoe bench scale --model models/tiny-qwen3 --devices host:4 --steps 1-2,2-1
//! ```
//!
//! For every step and strategy it starts a fresh engine on the step's `from` devices (or goes
//! on with the engine the previous step left there), keeps `--concurrency` greedy requests in
//! flight (resubmitting as they finish; the first ones spread over a quarter of `--before-s`,
//! so that requests do not start and finish in waves), lets throughput settle for
//! `--before-s`, runs the
//! transition on this thread while the load goes on, keeps serving for `--after-s`, then
//! drains.
//!
//! What it measures (`docs/benchmarks/scaling.md` explains every field in one line):
//! - **Latency** is from the request until the next configuration served, with nothing staged
//!   for that step beforehand. Joining devices come from a warm pool; its start-up time is
//!   recorded beside (`warm_pool_startup_ms`). The baselines pay their own instance start inside
//!   their latency. Where the backend can lay a step out ahead of its request (CUDA elastic),
//!   the bench then goes back to `from` and runs the step again staged: `staged_latency_ms`
//!   beside its `staging_ms`.
//! - **The transition window** (request → the first iteration after the switch) comes from the
//!   engine's own per-iteration timestamps (`Engine::set_iteration_observer`): throughput
//!   against before, the longest iteration gap against the p99 gap before, the serving time
//!   lost against the median gap, downtime as the gaps longer than `--stall-factor` × the
//!   median gap, and the intake pause as the longest wait from arrival to admission of the
//!   requests that arrived in the window (`window::measure`). The *after* window is separate.
//! - **Outputs**: every request of every run is compared with the reference, a never-scaled
//!   one-device deployment (`--compare N` limits it to the first N requests of each run).
//!   Those in flight at a switch (submitted before it, finished after) are counted apart. The
//!   control is the reference computed again at the same concurrency: where outputs depend on
//!   the batch (CUDA bf16 without `--batch-invariant`), it shows how many of the same in-flight
//!   requests differ with no scaling at all. Where they must not (the host backend, and CUDA
//!   with `--batch-invariant`), any differing request fails the bench after the report is
//!   written.
//! - **The bound**: the most bytes any device received over the raw peer bandwidth measured in
//!   this run (CUDA: `cuMemcpyPeerAsync` of 1 GiB; host: `memcpy` of 256 MiB), with the
//!   project's transport bandwidth and efficiency next to it where it has one (CUDA).
//!
//! Writes `OUT/scaling.json` (a list with one entry per machine and model) and
//! `OUT/scaling.svg` (throughput and active devices over time, one panel per step and strategy).
//!
//! `host:N` runs the host backend through `scaler_exec`'s `HostExecutor` (the colocated
//! baseline is not implemented there and is skipped with a note). `cuda:0,1,...` (binary built
//! with the `cuda` feature) runs `moe_cuda::CudaScaler` (elastic scaling and its baselines).

#[cfg(feature = "cuda")]
mod gpu;
mod host;
mod window;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use moe_engine::{
    EngineMetrics, Event, FinishReason, IterationObserver, IterationRecord, Request, RequestError,
    RequestHandle, SchedulerConfig, TokenId,
};
use moe_model::checkpoint::Checkpoint;
use moe_model::config::ModelConfig;
use scaler_exec::DeviceKind;
use serde::Serialize;

use super::demo::StrategyArg;
use window::{percentile, Arrival, Iteration, Window};

/// Arguments of `bench scale`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model directory (config.json and safetensors; `elasticmoe gen-model` writes one).
    #[arg(long)]
    pub model: PathBuf,
    /// `host:N` or `cuda:0,1,...`.
    #[arg(long)]
    pub devices: String,
    /// Steps as `FROM-TO` device counts, comma-separated (`1-2,2-1`).
    #[arg(long, default_value = "1-2,2-1")]
    pub steps: String,
    /// Strategies, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "elastic,cold-restart,colocated,extravagant"
    )]
    pub strategies: Vec<StrategyArg>,
    /// Use only the first N layers of the checkpoint.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Where scaling.json and scaling.svg go.
    #[arg(long, default_value = "target/bench-scale")]
    pub out: PathBuf,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Seconds of steady load before the transition.
    #[arg(long, default_value_t = 4.0)]
    pub before_s: f64,
    /// Seconds of load after the switch.
    #[arg(long, default_value_t = 4.0)]
    pub after_s: f64,
    /// KV blocks per rank (CUDA; the colocated baseline halves it).
    #[arg(long, default_value_t = 2048)]
    pub kv_blocks: usize,
    /// The card's name in the report (default: what the driver says, or `host`).
    #[arg(long)]
    pub card: Option<String>,
    /// Compare only the first N requests of every run with the reference (default: every
    /// request).
    #[arg(long)]
    pub compare: Option<u64>,
    /// Most tokens one iteration computes on one rank (prefill chunking).
    #[arg(long, default_value_t = 256)]
    pub max_batch_tokens: usize,
    /// Requests the control run keeps in flight: the reference is computed a second time on the
    /// same fixed deployment (default: at `--concurrency`, the reference's own), and the
    /// requests whose outputs differ between the two are counted; 0 skips it.
    #[arg(long)]
    pub reference_repeat_concurrency: Option<usize>,
    /// An iteration gap longer than this many times the median gap before the request counts
    /// as downtime.
    #[arg(long, default_value_t = 5.0)]
    pub stall_factor: f64,
    /// Also append this run's entry to the list in this JSON file (created if missing).
    #[arg(long)]
    pub append: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
    /// CUDA: batch-invariant compute (`CudaConfig::batch_invariant`), so a request's greedy
    /// tokens do not depend on what it is batched with or which GPU serves it.
    #[arg(long)]
    pub batch_invariant: bool,
}

/// What one transition measured, as a backend reports it.
#[derive(Debug, Clone, Default)]
struct Measured {
    latency_ms: f64,
    phases_ms: Vec<(String, f64)>,
    /// The strategy's own account of how long it held the serving loop.
    declared_downtime_ms: f64,
    /// The strategy's own account of how long it paused intake.
    declared_intake_paused_ms: f64,
    bytes_moved: u64,
    bytes_zero_copy: u64,
    max_bytes_into_device: u64,
    peak_bytes_per_device: Vec<u64>,
    kv_migrated: u64,
    requeued: u64,
    devices_after: usize,
    prewarmed_chunks: u64,
    kept_snapshot: bool,
    staged_ahead: bool,
}

/// A step run again with its layout staged ahead of the request.
#[derive(Debug, Clone)]
struct StagedRun {
    /// Staging's own time, before the request (off the latency).
    staging_ms: f64,
    measured: Measured,
}

type Submit = Arc<dyn Fn(Request) -> Result<RequestHandle, RequestError> + Send + Sync>;
type Metrics = Arc<dyn Fn() -> EngineMetrics + Send + Sync>;

/// A serving engine with a way to scale it.
trait Session: Send {
    fn submitter(&self) -> Submit;
    fn metrics(&self) -> Metrics;
    /// Sets (or removes) the engine's iteration observer.
    fn observe(&self, observer: Option<IterationObserver>);
    /// Readies the warm pool for a step to `to` devices (joining ranks started ahead, as the
    /// design's standby instances are); nothing specific to the step's layout. Returns the
    /// pool's start-up time for the devices this step uses (None where it was not measured).
    fn ready(&mut self, to: usize) -> Result<Option<f64>>;
    /// Runs the transition to `to` devices while the engine serves; returns when it is done.
    fn scale(&mut self, to: usize) -> Result<Measured>;
    /// Whether [`Session::scale_staged`] can stage this strategy's steps here.
    fn stages(&self) -> bool;
    /// Stages the step to `to` ahead (timed), then runs it; `None` where nothing could be
    /// staged (the session is then still where it was).
    fn scale_staged(&mut self, to: usize) -> Result<Option<StagedRun>>;
    /// The runner's per-phase time since the last call (empty where not measured).
    fn runner_phases(&mut self) -> Vec<(String, f64)>;
    fn stop(self: Box<Self>);
}

/// Peer bandwidth measured in this run, in 10⁹ bytes/s.
#[derive(Debug, Clone, Copy, Default)]
struct PeerBandwidth {
    /// The hardware's: CUDA `cuMemcpyPeerAsync` on large buffers, host `memcpy`.
    raw_gbps: f64,
    /// The project's transport between the same two devices (None where it has none apart).
    transport_gbps: Option<f64>,
}

/// A kind of device.
trait ScaleBackend {
    fn name(&self) -> &'static str;
    fn card(&self) -> String;
    fn gpus(&self) -> usize;
    /// Whether a request's tokens are bitwise independent of its batch, its rank and the
    /// device count here, so that any difference from the reference is a bug.
    fn exact(&self) -> bool;
    /// Peer bandwidth, measured now (CUDA: measured when the first engine started).
    fn peer(&mut self) -> Result<PeerBandwidth>;
    /// Why `strategy` cannot run `from`→`to` here, if it cannot.
    fn skip(&self, strategy: StrategyArg, from: usize, to: usize) -> Option<String>;
    fn start(&mut self, from: usize, strategy: StrategyArg) -> Result<Box<dyn Session>>;
    /// Greedy tokens of `prompts` on a fixed deployment of one device, with at most
    /// `max_running` of them in flight at a time.
    fn reference(
        &mut self,
        prompts: &[Vec<TokenId>],
        max_tokens: usize,
        max_running: usize,
    ) -> Result<Vec<Vec<TokenId>>>;
}

/// One entry of `steps` in scaling.json.
#[derive(Debug, Clone, Serialize)]
struct StepReport {
    from: usize,
    to: usize,
    strategy: String,
    /// Request → the next configuration served, nothing staged for this step beforehand.
    latency_ms: f64,
    /// The same step run again with its layout staged ahead (None where there is no staging).
    staged_latency_ms: Option<f64>,
    /// The staged run's staging time, before its request.
    staging_ms: Option<f64>,
    /// The warm pool's start-up time for the ranks this step takes from it.
    warm_pool_startup_ms: Option<f64>,
    bound_ms: f64,
    /// The transition window, from engine-side timestamps.
    #[serde(flatten)]
    window: Window,
    /// The strategy's own account of how long it held the serving loop.
    declared_downtime_ms: f64,
    /// The strategy's own account of how long it paused intake.
    declared_intake_paused_ms: f64,
    bytes_moved: u64,
    bytes_zero_copy: u64,
    max_bytes_into_device: u64,
    throughput_after: f64,
    /// Tokens per second from the request to one second after the switch (the old *during*
    /// window, kept for comparison with earlier runs; it mostly measures the new configuration).
    throughput_switch_plus_1s: f64,
    tpot_p99_during_ms: f64,
    peak_bytes_per_device: Vec<u64>,
    failed_requests: u64,
    /// The engine's iterations in the second half of the *before* window.
    serving_before: ServingStats,
    /// The engine's iterations in the second half of the *after* window.
    serving_after: ServingStats,
    /// The engine's iterations from the request to one second after the switch.
    serving_during: ServingStats,
    /// Expert chunks created ahead of the request (warm pool) and used by the step.
    prewarmed_chunks: u64,
    /// Whether the step used the snapshot kept from the last switch (no boundary wait).
    kept_snapshot: bool,
    completed_requests: u64,
    outputs_match: bool,
    outputs_compared: u64,
    outputs_mismatched: u64,
    /// Requests in flight at a switch of this run (submitted before it, finished after).
    in_flight_at_switch: u64,
    /// Of those, how many completed with the reference's tokens.
    in_flight_identical: u64,
    /// The control: of the same in-flight requests, how many differ between the reference and
    /// its repeat at the same concurrency, with no scaling (None without a control).
    in_flight_control_mismatched: Option<u64>,
    kv_sequences_migrated: u64,
    sequences_requeued: u64,
    phases_ms: BTreeMap<String, f64>,
}

/// Where an engine's iterations spent their time over a window (from its metrics).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct ServingStats {
    iterations: u64,
    /// Tokens computed per iteration (prefill plus decode).
    tokens_per_iteration: f64,
    /// Wall time per iteration (the window over the iterations run in it).
    wall_ms_per_iteration: f64,
    /// Time inside the runner per iteration.
    runner_ms_per_iteration: f64,
    /// The engine's own host time per iteration (scheduling, sampling, streaming, actions).
    engine_ms_per_iteration: f64,
    /// Time outside iterations per iteration (the loop idle or waiting for its lock). The
    /// metrics count an iteration when it ends, so one straddling the window's start counts in
    /// whole: with a loop that never idles, wall minus iteration time can come out a fraction
    /// of an iteration below zero, which is clipped to 0.
    outside_ms_per_iteration: f64,
}

impl ServingStats {
    fn between(a: &EngineMetrics, b: &EngineMetrics, wall_s: f64) -> Self {
        let n = b.iterations.saturating_sub(a.iterations);
        if n == 0 {
            return Self::default();
        }
        let per = |x: f64| x * 1e3 / n as f64;
        let run = b.runner_s - a.runner_s;
        let it = b.iteration_s - a.iteration_s;
        Self {
            iterations: n,
            tokens_per_iteration: b.computed_tokens.saturating_sub(a.computed_tokens) as f64
                / n as f64,
            wall_ms_per_iteration: per(wall_s),
            runner_ms_per_iteration: per(run),
            engine_ms_per_iteration: per(it - run),
            outside_ms_per_iteration: per((wall_s - it).max(0.0)),
        }
    }
}

/// The control for output identity: the reference computed twice on the same fixed deployment
/// of one device, no scaling involved.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct ReferenceRepeat {
    /// Requests in flight in the reference run.
    reference_concurrency: usize,
    /// Requests in flight in the repeat.
    repeat_concurrency: usize,
    compared: u64,
    /// Requests whose tokens differ between the two runs.
    mismatched: u64,
}

/// A strategy that did not run, and why.
#[derive(Debug, Clone, Serialize)]
struct Skipped {
    from: usize,
    to: usize,
    strategy: String,
    note: String,
}

/// One entry of scaling.json.
#[derive(Debug, Clone, Serialize)]
struct MachineReport {
    card: String,
    gpus: usize,
    backend: String,
    model: String,
    layers: usize,
    /// Where outputs must equal the reference bitwise (host; CUDA `--batch-invariant`).
    outputs_exact: bool,
    /// Raw peer bandwidth measured in this run (10⁹ bytes/s); the bound uses it.
    raw_peer_gbps: f64,
    /// The project's transport between the same devices (None on host: it copies with
    /// `memcpy` itself).
    transport_gbps: Option<f64>,
    /// `transport_gbps / raw_peer_gbps`.
    transport_efficiency: Option<f64>,
    concurrency: usize,
    prompt_len: usize,
    max_tokens: usize,
    stall_factor: f64,
    command: String,
    steps: Vec<StepReport>,
    skipped: Vec<Skipped>,
    /// The output-identity control (absent when no outputs were compared or it was skipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    reference_repeat: Option<ReferenceRepeat>,
}

/// The time series of one run, for the picture.
#[derive(Debug, Clone)]
struct Series {
    label: String,
    /// `(t_s, tokens/s, devices)`.
    samples: Vec<(f64, f64, usize)>,
    window: (f64, f64),
}

fn parse_steps(s: &str) -> Result<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part
            .split_once('-')
            .with_context(|| format!("--steps: {part:?} is not FROM-TO"))?;
        let a: usize = a
            .trim()
            .parse()
            .with_context(|| format!("--steps: {part:?}"))?;
        let b: usize = b
            .trim()
            .parse()
            .with_context(|| format!("--steps: {part:?}"))?;
        if a == 0 || b == 0 || a == b {
            bail!("--steps: {part:?} must go between two different positive device counts");
        }
        out.push((a, b));
    }
    if out.is_empty() {
        bail!("--steps: no step given");
    }
    Ok(out)
}

/// `host:N` → `(host, N, [])`; `cuda:0,1` → `(cuda, 2, [0, 1])`; `cuda:0,0` → `(cuda, 2, [0, 0])`
/// (two logical ranks on GPU 0).
fn parse_devices(s: &str) -> Result<(&'static str, usize, Vec<u32>)> {
    let spec = super::parse_device_spec(s)?;
    match spec.kind() {
        DeviceKind::Host => Ok((DeviceKind::Host.as_str(), spec.ranks(), Vec::new())),
        DeviceKind::Cuda => Ok((
            DeviceKind::Cuda.as_str(),
            spec.ranks(),
            super::cuda_machine(&spec)?,
        )),
    }
}

/// The prompt of request `index` (splitmix64 over the index: the same in every run).
fn prompt(vocab: usize, len: usize, index: u64) -> Vec<TokenId> {
    let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5ca1e;
    (0..len.max(1))
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z % vocab.max(1) as u64) as TokenId
        })
        .collect()
}

/// A request of the load, with engine-side timestamps in seconds since the run's start.
#[derive(Debug, Clone)]
struct Done {
    index: u64,
    tokens: Vec<TokenId>,
    ok: bool,
    /// When the load generator asked to submit it.
    arrived: f64,
    /// When the engine accepted it (`RequestHandle::submitted_at`).
    submitted: f64,
    /// When the engine first scheduled it on a rank.
    admitted: Option<f64>,
    /// When it finished (for one cut off at the drain limit: when it was given up).
    finished: f64,
    /// When each token was generated.
    token_times: Vec<f64>,
}

impl Done {
    /// Whether it lived across the instant `t` (a switch).
    fn spans(&self, t: f64) -> bool {
        self.submitted < t && self.finished > t
    }
}

/// What the load generator saw.
#[derive(Default)]
struct LoadLog {
    done: Vec<Done>,
    submit_failures: u64,
}

/// The load's shape.
#[derive(Debug, Clone, Copy)]
struct LoadSpec {
    vocab: usize,
    concurrency: usize,
    prompt_len: usize,
    max_tokens: usize,
    /// The first requests are spread over this long, so that they do not all start, and
    /// then finish, in the same iteration: a steady load, not waves.
    ramp: Duration,
}

/// Keeps `spec.concurrency` requests in flight until `stop` (reaching it over `spec.ramp`),
/// then drains (at most `drain`).
fn load(
    submit: &Submit,
    spec: LoadSpec,
    start: Instant,
    stop: &AtomicBool,
    drain: Duration,
    log: &Mutex<LoadLog>,
) {
    struct Live {
        index: u64,
        handle: RequestHandle,
        arrived: f64,
        tokens: Vec<TokenId>,
        token_times: Vec<f64>,
    }
    let since = |t: Instant| t.saturating_duration_since(start).as_secs_f64();
    let mut live: Vec<Live> = Vec::new();
    let mut next = 0u64;
    let mut stopped_at: Option<Instant> = None;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if stopping && stopped_at.is_none() {
            stopped_at = Some(Instant::now());
        }
        if !stopping {
            let ramp = spec.ramp.as_secs_f64();
            let target = if ramp > 0.0 && start.elapsed().as_secs_f64() < ramp {
                ((spec.concurrency as f64 * start.elapsed().as_secs_f64() / ramp).ceil() as usize)
                    .clamp(1, spec.concurrency)
            } else {
                spec.concurrency
            };
            while live.len() < target {
                let r = Request::greedy(prompt(spec.vocab, spec.prompt_len, next), spec.max_tokens);
                let arrived = since(Instant::now());
                match submit(r) {
                    Ok(handle) => live.push(Live {
                        index: next,
                        handle,
                        arrived,
                        tokens: Vec::new(),
                        token_times: Vec::new(),
                    }),
                    Err(_) => {
                        lock(log).submit_failures += 1;
                        std::thread::sleep(Duration::from_millis(5));
                        break;
                    }
                }
                next += 1;
            }
        }
        let mut i = 0;
        let mut finished = Vec::new();
        while i < live.len() {
            let mut end = None;
            let base = live[i].handle.submitted_at();
            while let Some(ev) = live[i].handle.try_recv() {
                match ev {
                    Event::Token(t) => {
                        live[i].tokens.push(t.token);
                        live[i].token_times.push(since(base + t.at));
                    }
                    Event::Finished { reason, timings } => {
                        let ok = matches!(reason, FinishReason::Length | FinishReason::Stop(_));
                        end = Some((ok, timings));
                        break;
                    }
                }
            }
            match end {
                Some((ok, timings)) => {
                    let l = live.swap_remove(i);
                    finished.push(Done {
                        index: l.index,
                        tokens: l.tokens,
                        ok,
                        arrived: l.arrived,
                        submitted: since(base),
                        admitted: timings.admitted.map(|a| since(base + a)),
                        finished: since(base + timings.total),
                        token_times: l.token_times,
                    });
                }
                None => i += 1,
            }
        }
        lock(log).done.extend(finished);
        if stopping && (live.is_empty() || stopped_at.is_some_and(|t| t.elapsed() > drain)) {
            // Requests still running after the drain limit count as failed.
            let now = since(Instant::now());
            let mut g = lock(log);
            for l in live.drain(..) {
                g.done.push(Done {
                    index: l.index,
                    tokens: l.tokens,
                    ok: false,
                    arrived: l.arrived,
                    submitted: since(l.handle.submitted_at()),
                    admitted: None,
                    finished: now,
                    token_times: l.token_times,
                });
            }
            return;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// A progress line with the time since the process started (`ELASTICMOE_TRACE=1`).
fn trace(what: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    if std::env::var_os("ELASTICMOE_TRACE").is_some() {
        eprintln!("[{t:8.3} s] {what}");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A finished run of one step with one strategy.
struct RunOutput {
    report: StepReport,
    series: Series,
    done: Vec<Done>,
    /// The switches of this run, in seconds since its start (the measured one, then the staged
    /// variant's two).
    switches: Vec<f64>,
}

/// Runs one step with one strategy.
#[allow(clippy::too_many_lines)]
fn run_one(
    session: &mut dyn Session,
    args: &Args,
    vocab: usize,
    (from, to): (usize, usize),
    strategy: StrategyArg,
) -> Result<RunOutput> {
    let submit = session.submitter();
    let metrics = session.metrics();
    let warm_pool_startup_ms = session
        .ready(to)
        .with_context(|| format!("readying {from}->{to} with {strategy:?}"))?;
    let start = Instant::now();
    let iterations: Arc<Mutex<Vec<Iteration>>> = Arc::default();
    {
        let sink = Arc::clone(&iterations);
        session.observe(Some(Arc::new(move |r: &IterationRecord| {
            if r.tokens > 0 {
                lock(&sink).push(Iteration {
                    ended: r.ended.saturating_duration_since(start).as_secs_f64(),
                    generated: r.generated,
                });
            }
        })));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(LoadLog::default()));
    let loader = {
        let (submit, stop, log) = (Arc::clone(&submit), Arc::clone(&stop), Arc::clone(&log));
        let spec = LoadSpec {
            vocab,
            concurrency: args.concurrency,
            prompt_len: args.prompt_len,
            max_tokens: args.max_tokens,
            ramp: Duration::from_secs_f64(args.before_s / 4.0),
        };
        std::thread::spawn(move || {
            load(&submit, spec, start, &stop, Duration::from_secs(60), &log);
        })
    };
    // Samples for the picture: (t, generated tokens, devices).
    let devices_now = Arc::new(std::sync::atomic::AtomicUsize::new(from));
    let sampler_stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (metrics, stop, devs) = (
            Arc::clone(&metrics),
            Arc::clone(&sampler_stop),
            Arc::clone(&devices_now),
        );
        std::thread::spawn(move || {
            let mut out = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let m = metrics();
                out.push((
                    start.elapsed().as_secs_f64(),
                    m.generated_tokens,
                    devs.load(Ordering::Acquire),
                ));
                std::thread::sleep(Duration::from_millis(20));
            }
            out
        })
    };
    trace("load running");
    std::thread::sleep(Duration::from_secs_f64(args.before_s / 2.0));
    let _ = session.runner_phases();
    let (m0, w0) = (metrics(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(args.before_s / 2.0));
    let (m1, w1) = (metrics(), w0.elapsed().as_secs_f64());
    let serving_before = ServingStats::between(&m0, &m1, w1);
    trace(&format!(
        "serving before: {serving_before:?}; queue {}, running {}, KV blocks per rank {:?}",
        m1.queue_depth,
        m1.running,
        m1.kv
            .iter()
            .map(|k| (k.rank.0, k.used_blocks))
            .collect::<Vec<_>>()
    ));
    let phases = session.runner_phases();
    if !phases.is_empty() {
        trace(&format!("runner phases (s) before: {phases:?}"));
    }
    let (m_req, w_req) = (metrics(), Instant::now());
    let t_req = start.elapsed().as_secs_f64();
    trace(&format!(
        "scaling {from}->{to}; {} tokens so far",
        m_req.generated_tokens
    ));
    let measured = session.scale(to);
    let t_end = start.elapsed().as_secs_f64();
    trace(&format!(
        "scaled: {:?}",
        measured.as_ref().map(|m| m.latency_ms)
    ));
    if let Ok(m) = &measured {
        devices_now.store(m.devices_after, Ordering::Release);
    }
    let t_switch = measured
        .as_ref()
        .map_or(t_end, |m| (t_req + m.latency_ms / 1e3).min(t_end));
    // The serving split from the request to one second after the switch (or the first half of
    // the after window, if shorter).
    let first = (args.after_s / 2.0).min(1.0);
    std::thread::sleep(Duration::from_secs_f64(first));
    let m_during = metrics();
    let serving_during = ServingStats::between(&m_req, &m_during, w_req.elapsed().as_secs_f64());
    trace(&format!(
        "serving during: {serving_during:?}; queue {}, running {}",
        m_during.queue_depth, m_during.running,
    ));
    // The after window's serving split, over its second half (the new configuration settled).
    std::thread::sleep(Duration::from_secs_f64(args.after_s / 2.0 - first));
    let _ = session.runner_phases();
    let (m2, w2) = (metrics(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(args.after_s / 2.0));
    let serving_after = ServingStats::between(&m2, &metrics(), w2.elapsed().as_secs_f64());
    trace(&format!("serving after: {serving_after:?}"));
    let phases = session.runner_phases();
    if !phases.is_empty() {
        trace(&format!("runner phases (s) after: {phases:?}"));
    }
    let t_after = start.elapsed().as_secs_f64();
    // The staged variant, still under load: back to `from` (not measured), stage `to` ahead,
    // run the step again.
    let mut switches = vec![t_switch];
    let mut staged = None;
    if measured.is_ok() && session.stages() {
        let t_back = start.elapsed().as_secs_f64();
        match session.scale(from) {
            Ok(back) => {
                switches.push(t_back + back.latency_ms / 1e3);
                devices_now.store(back.devices_after, Ordering::Release);
                let t_staged = start.elapsed().as_secs_f64();
                staged = session
                    .scale_staged(to)
                    .with_context(|| format!("{from}->{to} with {strategy:?}, staged ahead"))?;
                if let Some(s) = &staged {
                    switches.push(t_staged + (s.staging_ms + s.measured.latency_ms) / 1e3);
                    devices_now.store(s.measured.devices_after, Ordering::Release);
                } else {
                    // Nothing staged: back to `to` unstaged, where the next step starts.
                    let t_again = start.elapsed().as_secs_f64();
                    let again = session.scale(to).with_context(|| {
                        format!("returning to {to} after going back for a staged run")
                    })?;
                    switches.push(t_again + again.latency_ms / 1e3);
                    devices_now.store(again.devices_after, Ordering::Release);
                }
            }
            Err(e) => {
                stop.store(true, Ordering::Release);
                let _ = loader.join();
                return Err(e).with_context(|| {
                    format!("going back {to}->{from} for the staged variant of {from}->{to}")
                });
            }
        }
    }
    stop.store(true, Ordering::Release);
    trace(&format!(
        "draining; {} tokens so far",
        metrics().generated_tokens
    ));
    let _ = loader.join();
    trace("drained");
    session.observe(None);
    sampler_stop.store(true, Ordering::Release);
    let samples = sampler.join().unwrap_or_default();
    let measured = measured.with_context(|| format!("{from}->{to} with {strategy:?}"))?;
    if measured.staged_ahead {
        bail!("{from}->{to} with {strategy:?}: the headline run was staged ahead; it must not be");
    }

    let log = std::mem::take(&mut *lock(&log));
    let its = std::mem::take(&mut *lock(&iterations));
    let arrivals: Vec<Arrival> = log
        .done
        .iter()
        .map(|d| Arrival {
            arrived: d.arrived,
            admitted: d.admitted,
        })
        .collect();
    let window = window::measure(
        &its,
        &arrivals,
        t_req,
        t_switch,
        args.before_s / 2.0,
        args.stall_factor,
    );
    let rate = |a: f64, b: f64| -> f64 {
        let n: usize = its
            .iter()
            .filter(|i| i.ended >= a && i.ended < b)
            .map(|i| i.generated)
            .sum();
        if b > a {
            n as f64 / (b - a)
        } else {
            0.0
        }
    };
    // TPOT p99 over the inter-token gaps that end in the transition window.
    let window_end = t_req + window.transition_window_ms / 1e3;
    let mut gaps: Vec<f64> = log
        .done
        .iter()
        .flat_map(|d| {
            d.token_times
                .windows(2)
                .map(|w| (w[1], (w[1] - w[0]) * 1e3))
        })
        .filter(|(t, _)| *t > t_req && *t <= window_end)
        .map(|(_, g)| g)
        .collect();
    let failed = log.done.iter().filter(|d| !d.ok).count() as u64 + log.submit_failures;
    let completed = log.done.iter().filter(|d| d.ok).count() as u64;
    let mut series = Vec::new();
    for w in samples.windows(2) {
        let (t0, g0, _) = w[0];
        let (t1, g1, d1) = w[1];
        if t1 > t0 {
            series.push((t1, g1.saturating_sub(g0) as f64 / (t1 - t0), d1));
        }
    }
    // Smooth over 5 samples (100 ms) so single iterations do not alias.
    let smooth: Vec<(f64, f64, usize)> = (0..series.len())
        .map(|i| {
            let lo = i.saturating_sub(4);
            let v = &series[lo..=i];
            (
                series[i].0,
                v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64,
                series[i].2,
            )
        })
        .collect();
    let report = StepReport {
        from,
        to,
        strategy: strategy_name(strategy).into(),
        latency_ms: measured.latency_ms,
        staged_latency_ms: staged.as_ref().map(|s| s.measured.latency_ms),
        staging_ms: staged.as_ref().map(|s| s.staging_ms),
        warm_pool_startup_ms,
        bound_ms: 0.0,
        window,
        declared_downtime_ms: measured.declared_downtime_ms,
        declared_intake_paused_ms: measured.declared_intake_paused_ms,
        bytes_moved: measured.bytes_moved,
        bytes_zero_copy: measured.bytes_zero_copy,
        max_bytes_into_device: measured.max_bytes_into_device,
        throughput_after: rate(t_end, t_after),
        throughput_switch_plus_1s: rate(t_req, (t_switch + 1.0).min(t_after)),
        serving_before,
        serving_after,
        serving_during,
        prewarmed_chunks: measured.prewarmed_chunks,
        kept_snapshot: measured.kept_snapshot,
        tpot_p99_during_ms: percentile(&mut gaps, 0.99),
        peak_bytes_per_device: measured.peak_bytes_per_device.clone(),
        failed_requests: failed,
        completed_requests: completed,
        outputs_match: false,
        outputs_compared: 0,
        outputs_mismatched: 0,
        in_flight_at_switch: 0,
        in_flight_identical: 0,
        in_flight_control_mismatched: None,
        kv_sequences_migrated: measured.kv_migrated,
        sequences_requeued: measured.requeued,
        phases_ms: measured.phases_ms.iter().cloned().collect(),
    };
    Ok(RunOutput {
        report,
        series: Series {
            label: format!("{from}→{to} {}", strategy_name(strategy)),
            samples: smooth,
            window: (t_req, t_switch),
        },
        done: log.done,
        switches,
    })
}

fn strategy_name(s: StrategyArg) -> &'static str {
    match s {
        StrategyArg::Elastic => "elastic",
        StrategyArg::ColdRestart => "cold-restart",
        StrategyArg::Extravagant => "extravagant",
        StrategyArg::Colocated => "colocated",
    }
}

/// The picture: one panel per run, throughput (line) and active devices (steps, right axis),
/// the transition shaded.
fn svg(series: &[Series], title: &str) -> String {
    const W: f64 = 900.0;
    const H: f64 = 110.0;
    const GAP: f64 = 34.0;
    const L: f64 = 70.0;
    const R: f64 = 60.0;
    let height = 40.0 + series.len() as f64 * (H + GAP);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{L}" y="20" font-size="13">{}</text>"#,
        xml(title)
    );
    for (i, s) in series.iter().enumerate() {
        let top = 40.0 + i as f64 * (H + GAP);
        let t_max = s.samples.last().map_or(1.0, |x| x.0).max(1e-3);
        let y_max = s.samples.iter().map(|x| x.1).fold(1.0f64, f64::max) * 1.1;
        let d_max = s.samples.iter().map(|x| x.2).max().unwrap_or(1).max(1) as f64 + 1.0;
        let x = |t: f64| L + (t / t_max) * (W - L - R);
        let y = |v: f64| top + H - (v / y_max) * H;
        let yd = |d: f64| top + H - (d / d_max) * H;
        let _ = writeln!(
            o,
            r##"<rect x="{:.1}" y="{top:.1}" width="{:.1}" height="{H}" fill="#f4d03f" opacity="0.35"/>"##,
            x(s.window.0),
            (x(s.window.1) - x(s.window.0)).max(1.0)
        );
        let _ = writeln!(
            o,
            r##"<rect x="{L}" y="{top:.1}" width="{:.1}" height="{H}" fill="none" stroke="#999"/>"##,
            W - L - R
        );
        let _ = writeln!(
            o,
            r#"<text x="{L}" y="{:.1}">{} (tok/s, max {:.0}; devices on the right)</text>"#,
            top - 5.0,
            xml(&s.label),
            y_max / 1.1
        );
        let pts: Vec<String> = s
            .samples
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
            .collect();
        let _ = writeln!(
            o,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##,
            pts.join(" ")
        );
        let dev: Vec<String> = s
            .samples
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.0), yd(p.2 as f64)))
            .collect();
        let _ = writeln!(
            o,
            r##"<polyline fill="none" stroke="#d62728" stroke-width="1" points="{}"/>"##,
            dev.join(" ")
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}">{t_max:.1} s</text>"#,
            W - R - 30.0,
            top + H + 13.0
        );
    }
    o.push_str("</svg>\n");
    o
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
/// Runs the benchmark.
#[allow(clippy::too_many_lines)]
pub fn run(args: &Args) -> Result<()> {
    let steps = parse_steps(&args.steps)?;
    let (kind, n, machine) = parse_devices(&args.devices)?;
    if args.concurrency == 0 || args.max_tokens == 0 || args.max_batch_tokens == 0 {
        bail!("--concurrency, --max-tokens and --max-batch-tokens must be at least 1");
    }
    if !(args.before_s >= 0.0 && args.after_s >= 0.0) {
        bail!("--before-s and --after-s must be non-negative");
    }
    if !(args.stall_factor > 1.0 && args.stall_factor.is_finite()) {
        bail!("--stall-factor must be a number above 1 (a gap that many times the median)");
    }
    if let Some(&(a, b)) = steps.iter().find(|&&(a, b)| a.max(b) > n) {
        bail!(
            "--steps: {a}-{b} needs {} devices; --devices gives {n}",
            a.max(b)
        );
    }
    let mut cfg = ModelConfig::from_dir(&args.model)
        .with_context(|| format!("reading the model config in {}", args.model.display()))?;
    if let Some(l) = args.layers {
        if l == 0 || l > cfg.num_layers {
            bail!("--layers {l}: the checkpoint has {} layers", cfg.num_layers);
        }
        cfg.num_layers = l;
    }
    let ckpt = Arc::new(
        Checkpoint::open(&args.model)
            .with_context(|| format!("opening the checkpoint in {}", args.model.display()))?,
    );
    let mut backend: Box<dyn ScaleBackend> = match kind {
        "host" => Box::new(host::HostBench::new(&cfg, ckpt, n, args)),
        _ => cuda_backend(&cfg, ckpt, &machine, args)?,
    };
    let model_name = args
        .model
        .file_name()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let mut report = MachineReport {
        card: String::new(),
        gpus: backend.gpus(),
        backend: backend.name().into(),
        model: model_name.clone(),
        layers: cfg.num_layers,
        outputs_exact: backend.exact(),
        raw_peer_gbps: 0.0,
        transport_gbps: None,
        transport_efficiency: None,
        concurrency: args.concurrency,
        prompt_len: args.prompt_len,
        max_tokens: args.max_tokens,
        stall_factor: args.stall_factor,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        steps: Vec::new(),
        skipped: Vec::new(),
        reference_repeat: None,
    };
    let mut series = Vec::new();
    // Per step report: its requests and its switches.
    let mut outputs: Vec<(usize, Vec<Done>, Vec<f64>)> = Vec::new();
    // Each strategy runs the steps in order on one engine while a step starts where the last
    // ended (1-2 then 2-1), and on a fresh engine otherwise.
    for &s in &args.strategies {
        let mut session: Option<(Box<dyn Session>, usize)> = None;
        for &(from, to) in &steps {
            if let Some(note) = backend.skip(s, from, to) {
                if !args.quiet {
                    eprintln!("{from}->{to} {}: skipped: {note}", strategy_name(s));
                }
                report.skipped.push(Skipped {
                    from,
                    to,
                    strategy: strategy_name(s).into(),
                    note,
                });
                continue;
            }
            if !args.quiet {
                eprintln!("{from}->{to} {}: running", strategy_name(s));
            }
            let mut live = match session.take() {
                Some((sess, n)) if n == from => sess,
                other => {
                    if let Some((old, _)) = other {
                        old.stop();
                    }
                    match backend.start(from, s) {
                        Ok(sess) => sess,
                        Err(e) => {
                            record_failure(&mut report, args, (from, to), s, &e);
                            continue;
                        }
                    }
                }
            };
            match run_one(live.as_mut(), args, cfg.vocab_size, (from, to), s) {
                Ok(out) => {
                    let r = &out.report;
                    if !args.quiet {
                        eprintln!(
                            "{from}->{to} {}: latency {:.1} ms (staged {}), downtime {:.1} ms \
                             (gaps > {:.1} ms), lost {:.1} ms, max gap {:.1} ms (p99 before \
                             {:.1}), throughput {:.0}/{:.0}/{:.0} tok/s ({:.0}% during), {} \
                             failed",
                            r.strategy,
                            r.latency_ms,
                            r.staged_latency_ms
                                .map_or_else(|| "-".into(), |v| format!("{v:.1} ms")),
                            r.window.downtime_ms,
                            r.window.downtime_threshold_ms,
                            r.window.lost_serving_ms,
                            r.window.max_gap_during_ms,
                            r.window.gap_p99_before_ms,
                            r.window.throughput_before,
                            r.window.throughput_during,
                            r.throughput_after,
                            r.window.throughput_during_ratio * 100.0,
                            r.failed_requests
                        );
                    }
                    outputs.push((report.steps.len(), out.done, out.switches));
                    report.steps.push(out.report);
                    series.push(out.series);
                    session = Some((live, to));
                }
                Err(e) => {
                    record_failure(&mut report, args, (from, to), s, &e);
                    live.stop();
                }
            }
        }
        if let Some((sess, _)) = session {
            sess.stop();
        }
    }
    if report.steps.is_empty() && !report.skipped.is_empty() {
        let failed = report.skipped.iter().any(|k| k.note.starts_with("failed:"));
        if failed {
            bail!(
                "every run failed: {}",
                report
                    .skipped
                    .iter()
                    .map(|k| format!("{}->{} {}: {}", k.from, k.to, k.strategy, k.note))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
    }
    // The transfer bound, with the raw peer bandwidth measured in this run.
    let peer = backend.peer()?;
    report.raw_peer_gbps = peer.raw_gbps;
    report.transport_gbps = peer.transport_gbps;
    report.transport_efficiency = peer
        .transport_gbps
        .filter(|_| peer.raw_gbps > 0.0)
        .map(|t| t / peer.raw_gbps);
    report.card = args.card.clone().unwrap_or_else(|| backend.card());
    for r in &mut report.steps {
        if peer.raw_gbps > 0.0 {
            r.bound_ms = r.max_bytes_into_device as f64 / (peer.raw_gbps * 1e9) * 1e3;
        }
    }
    let verdict = compare_outputs(&mut report, &mut *backend, args, cfg.vocab_size, &outputs)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    write(
        &args.out.join("scaling.json"),
        &serde_json::to_string_pretty(&[&report])?,
    )?;
    write(
        &args.out.join("scaling.svg"),
        &svg(
            &series,
            &format!(
                "{} on {} × {} ({} layers): throughput and active devices; transition shaded",
                model_name, report.gpus, report.card, report.layers
            ),
        ),
    )?;
    if let Some(path) = &args.append {
        let mut list: Vec<serde_json::Value> = match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not a JSON list", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        list.push(serde_json::to_value(&report)?);
        write(path, &serde_json::to_string_pretty(&list)?)?;
    }
    if !args.quiet {
        eprintln!("wrote {}", args.out.join("scaling.json").display());
    }
    verdict
}

/// Compares every compared request of every run with the reference and fills the output
/// fields. Returns an error (after the fields are filled, so the report is still written) where
/// outputs must be exact and one differs.
fn compare_outputs(
    report: &mut MachineReport,
    backend: &mut dyn ScaleBackend,
    args: &Args,
    vocab: usize,
    outputs: &[(usize, Vec<Done>, Vec<f64>)],
) -> Result<Result<()>> {
    let compared = |d: &Done| args.compare.is_none_or(|n| d.index < n);
    let Some(max_index) = outputs
        .iter()
        .flat_map(|(_, d, _)| d.iter().filter(|x| compared(x)).map(|x| x.index))
        .max()
    else {
        return Ok(Ok(()));
    };
    if !args.quiet {
        eprintln!(
            "computing the reference outputs of {} prompts",
            max_index + 1
        );
    }
    let prompts: Vec<Vec<TokenId>> = (0..=max_index)
        .map(|i| prompt(vocab, args.prompt_len, i))
        .collect();
    let reference = backend.reference(&prompts, args.max_tokens, args.concurrency)?;
    let repeat_concurrency = args
        .reference_repeat_concurrency
        .unwrap_or(args.concurrency);
    let repeat = if repeat_concurrency > 0 {
        let repeat = backend.reference(&prompts, args.max_tokens, repeat_concurrency)?;
        let mismatched = reference
            .iter()
            .zip(&repeat)
            .filter(|(a, b)| a != b)
            .count() as u64;
        if !args.quiet {
            eprintln!(
                "reference repeated with {repeat_concurrency} in flight (reference: {}): \
                 {mismatched} of {} requests differ",
                args.concurrency,
                reference.len()
            );
        }
        report.reference_repeat = Some(ReferenceRepeat {
            reference_concurrency: args.concurrency,
            repeat_concurrency,
            compared: reference.len() as u64,
            mismatched,
        });
        Some(repeat)
    } else {
        None
    };
    let mut wrong = Vec::new();
    for (i, done, switches) in outputs {
        let r = &mut report.steps[*i];
        let mut control = 0u64;
        for d in done.iter().filter(|d| compared(d)) {
            let want = reference.get(d.index as usize);
            let identical = d.ok && want == Some(&d.tokens);
            if d.ok {
                r.outputs_compared += 1;
                r.outputs_mismatched += u64::from(!identical);
            }
            if switches.iter().any(|&t| d.spans(t)) {
                r.in_flight_at_switch += 1;
                r.in_flight_identical += u64::from(identical);
                if let Some(rep) = &repeat {
                    control += u64::from(rep.get(d.index as usize) != want);
                }
            }
        }
        r.in_flight_control_mismatched = repeat.as_ref().map(|_| control);
        r.outputs_match =
            r.outputs_compared > 0 && r.outputs_mismatched == 0 && r.failed_requests == 0;
        if r.outputs_mismatched > 0 {
            wrong.push(format!(
                "{}->{} {}: {} of {} requests differ ({} of {} in flight at a switch are \
                 identical)",
                r.from,
                r.to,
                r.strategy,
                r.outputs_mismatched,
                r.outputs_compared,
                r.in_flight_identical,
                r.in_flight_at_switch
            ));
        }
    }
    if report.outputs_exact && !wrong.is_empty() {
        return Ok(Err(anyhow::anyhow!(
            "outputs differ from the never-scaled reference on a backend where they must be \
             bitwise identical: {}",
            wrong.join("; ")
        )));
    }
    Ok(Ok(()))
}

/// A run that failed: reported under `skipped` with the error, so the other runs still count.
fn record_failure(
    report: &mut MachineReport,
    args: &Args,
    (from, to): (usize, usize),
    s: StrategyArg,
    e: &anyhow::Error,
) {
    if !args.quiet {
        eprintln!("{from}->{to} {}: FAILED: {e:#}", strategy_name(s));
    }
    report.skipped.push(Skipped {
        from,
        to,
        strategy: strategy_name(s).into(),
        note: format!("failed: {e:#}"),
    });
}

fn write(p: &Path, s: &str) -> Result<()> {
    std::fs::write(p, s).with_context(|| format!("writing {}", p.display()))
}

#[cfg(feature = "cuda")]
fn cuda_backend(
    cfg: &ModelConfig,
    ckpt: Arc<Checkpoint>,
    machine: &[u32],
    args: &Args,
) -> Result<Box<dyn ScaleBackend>> {
    Ok(Box::new(gpu::CudaBench::new(cfg, ckpt, machine, args)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(
    _cfg: &ModelConfig,
    _ckpt: Arc<Checkpoint>,
    _machine: &[u32],
    _args: &Args,
) -> Result<Box<dyn ScaleBackend>> {
    bail!("this binary was not built with CUDA (build with --features cuda); use host:N")
}

fn scheduler(args: &Args) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens: args.max_batch_tokens,
        max_running_per_rank: args.concurrency,
    }
}
