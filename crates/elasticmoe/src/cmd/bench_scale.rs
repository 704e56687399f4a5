//! `elasticmoe bench scale`: add or remove devices under a steady decode load, with each strategy,
//! and measure it (issue 11's schema).
//!
//! ```text
//! elasticmoe bench scale --model /tmp/dsv2 --devices cuda:0,1 --steps 1-2,2-1 \
//!     --strategies elastic,cold-restart,colocated --out /tmp/scale
//! elasticmoe bench scale --model models/tiny-qwen3 --devices host:4 --steps 1-2,2-1
//! ```
//!
//! For every step and strategy it starts a fresh engine on the step's `from` devices, keeps
//! `--concurrency` greedy requests in flight (resubmitting as they finish), lets throughput
//! settle for `--before-s`, runs the transition on its own thread while the load goes on,
//! keeps serving for `--after-s`, then drains. Throughput windows: *before* is the second half
//! of the `--before-s` before the request; *during* runs from the request to one second after
//! the switch (`throughput_request_to_switch` gives the request-to-switch window alone); *after*
//! is the `--after-s` after the switch. TPOT p99 *during* is over the inter-token gaps that end
//! in the during window. `serving_before` splits the engine's iterations of the *before* window
//! into runner time and the engine's own time. Outputs of completed requests are compared with a
//! run of the same prompts on a fixed deployment of one device; as a control, that reference is
//! computed a second time with another concurrency (`reference_repeat`): requests that differ
//! there differ without any scaling, from batch composition alone.
//!
//! Writes `OUT/scaling.json` (a list with one entry per machine and model) and
//! `OUT/scaling.svg` (throughput and active devices over time, one panel per step and strategy).
//!
//! `host:N` runs the host backend through `scaler`'s `HostExecutor` (the colocated baseline is
//! not implemented there and is skipped with a note). `cuda:0,1,...` (binary built with the
//! `cuda` feature) runs `moe_cuda::CudaScaler` (elastic scaling and its baselines).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use moe_engine::{
    EngineMetrics, Event, FinishReason, Request, RequestError, RequestHandle, SchedulerConfig,
    TokenId,
};
use moe_model::checkpoint::Checkpoint;
use moe_model::config::ModelConfig;
use scaler_exec::DeviceKind;
use serde::Serialize;

use super::demo::StrategyArg;

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
    /// Compare the outputs of the first N requests of every run with the reference.
    #[arg(long, default_value_t = 256)]
    pub compare: u64,
    /// Most tokens one iteration computes on one rank (prefill chunking).
    #[arg(long, default_value_t = 256)]
    pub max_batch_tokens: usize,
    /// Requests the control run keeps in flight: the reference is computed a second time on the
    /// same fixed deployment with this concurrency (other batches), and the requests whose
    /// outputs differ between the two are counted (`reference_repeat`); 0 skips it.
    #[arg(long, default_value_t = 7)]
    pub reference_repeat_concurrency: usize,
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
    downtime_ms: f64,
    intake_paused_ms: f64,
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

type Submit = Arc<dyn Fn(Request) -> Result<RequestHandle, RequestError> + Send + Sync>;
type Metrics = Arc<dyn Fn() -> EngineMetrics + Send + Sync>;

/// A serving engine with a way to scale it.
trait Session: Send {
    fn submitter(&self) -> Submit;
    fn metrics(&self) -> Metrics;
    /// Readies a transition to `to` devices ahead of the request (warm ranks, expert chunks);
    /// runs before the load starts, off the measured path.
    fn ready(&mut self, to: usize) -> Result<()>;
    /// Runs the transition to `to` devices while the engine serves; returns when it is done.
    fn scale(&mut self, to: usize) -> Result<Measured>;
    /// The runner's per-phase time since the last call (empty where not measured).
    fn runner_phases(&mut self) -> Vec<(String, f64)>;
    fn stop(self: Box<Self>);
}

/// A kind of device.
trait Backend {
    fn name(&self) -> &'static str;
    fn card(&self) -> String;
    fn gpus(&self) -> usize;
    /// Peer bandwidth in 10⁹ bytes/s, measured now.
    fn peer_gbps(&mut self) -> Result<f64>;
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
    latency_ms: f64,
    bound_ms: f64,
    downtime_ms: f64,
    intake_paused_ms: f64,
    bytes_moved: u64,
    bytes_zero_copy: u64,
    max_bytes_into_device: u64,
    throughput_before: f64,
    throughput_during: f64,
    throughput_after: f64,
    tpot_p99_during_ms: f64,
    peak_bytes_per_device: Vec<u64>,
    failed_requests: u64,
    /// Tokens per second from the request to the switch only (no padding; noisy for short
    /// transitions). `throughput_during` runs from the request to one second after the switch.
    throughput_request_to_switch: f64,
    /// The engine's iterations in the second half of the *before* window.
    serving_before: ServingStats,
    /// The engine's iterations in the second half of the *after* window.
    serving_after: ServingStats,
    /// The engine's iterations from the request to one second after the switch (the *during*
    /// window, as far as the metrics can cut it).
    serving_during: ServingStats,
    /// Expert chunks created ahead of the request (warm pool) and used by the step.
    prewarmed_chunks: u64,
    /// Whether the step used the snapshot kept from the last switch (no boundary wait).
    kept_snapshot: bool,
    /// Whether the step's new layout (ranges, mappings, warm ranks) was staged before the
    /// request; its time is then the `staged_ahead_map` phase, outside the latency.
    staged_ahead: bool,
    completed_requests: u64,
    outputs_match: bool,
    outputs_compared: u64,
    outputs_mismatched: u64,
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
/// of one device with different concurrency (so different batches), no scaling involved.
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
    peer_gbps: f64,
    concurrency: usize,
    prompt_len: usize,
    max_tokens: usize,
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

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// A finished request of the load.
struct Done {
    index: u64,
    tokens: Vec<TokenId>,
    ok: bool,
}

/// What the load generator saw.
#[derive(Default)]
struct LoadLog {
    done: Vec<Done>,
    /// Time of every generated token (seconds from the start) and the gap since the previous
    /// token of the same request (ms; none for a first token).
    tokens: Vec<(f64, Option<f64>)>,
    submit_failures: u64,
}

/// Keeps `concurrency` requests in flight until `stop`, then drains (at most `drain`).
fn load(
    submit: &Submit,
    vocab: usize,
    args: &Args,
    start: Instant,
    stop: &AtomicBool,
    drain: Duration,
    log: &Mutex<LoadLog>,
) {
    struct Live {
        index: u64,
        handle: RequestHandle,
        last: Option<f64>,
        tokens: Vec<TokenId>,
    }
    let mut live: Vec<Live> = Vec::new();
    let mut next = 0u64;
    let mut stopped_at: Option<Instant> = None;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if stopping && stopped_at.is_none() {
            stopped_at = Some(Instant::now());
        }
        if !stopping {
            while live.len() < args.concurrency {
                let r = Request::greedy(prompt(vocab, args.prompt_len, next), args.max_tokens);
                match submit(r) {
                    Ok(handle) => live.push(Live {
                        index: next,
                        handle,
                        last: None,
                        tokens: Vec::new(),
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
        let mut toks = Vec::new();
        while i < live.len() {
            let mut end = None;
            while let Some(ev) = live[i].handle.try_recv() {
                match ev {
                    Event::Token(t) => {
                        let now = start.elapsed().as_secs_f64();
                        let gap = live[i].last.map(|l| (now - l) * 1e3);
                        live[i].last = Some(now);
                        live[i].tokens.push(t.token);
                        toks.push((now, gap));
                    }
                    Event::Finished { reason, .. } => {
                        end = Some(matches!(
                            reason,
                            FinishReason::Length | FinishReason::Stop(_)
                        ));
                        break;
                    }
                }
            }
            match end {
                Some(ok) => {
                    let l = live.swap_remove(i);
                    finished.push(Done {
                        index: l.index,
                        tokens: l.tokens,
                        ok,
                    });
                }
                None => i += 1,
            }
        }
        {
            let mut g = lock(log);
            g.done.extend(finished);
            g.tokens.extend(toks);
        }
        if stopping && (live.is_empty() || stopped_at.is_some_and(|t| t.elapsed() > drain)) {
            // Requests still running after the drain limit count as failed.
            let mut g = lock(log);
            for l in live.drain(..) {
                g.done.push(Done {
                    index: l.index,
                    tokens: l.tokens,
                    ok: false,
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

/// Runs one step with one strategy; returns the report, the series and the completed outputs.
#[allow(clippy::too_many_lines)]
fn run_one(
    session: &mut dyn Session,
    args: &Args,
    vocab: usize,
    (from, to): (usize, usize),
    strategy: StrategyArg,
) -> Result<(StepReport, Series, Vec<Done>)> {
    let submit = session.submitter();
    let metrics = session.metrics();
    session
        .ready(to)
        .with_context(|| format!("readying {from}->{to} with {strategy:?}"))?;
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(LoadLog::default()));
    let loader = {
        let (submit, stop, log) = (Arc::clone(&submit), Arc::clone(&stop), Arc::clone(&log));
        let args = Args {
            model: args.model.clone(),
            devices: String::new(),
            steps: String::new(),
            strategies: Vec::new(),
            out: PathBuf::new(),
            card: None,
            append: None,
            ..*args
        };
        std::thread::spawn(move || {
            load(
                &submit,
                vocab,
                &args,
                start,
                &stop,
                Duration::from_secs(60),
                &log,
            );
        })
    };
    // Samples: (t, generated tokens, devices).
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
    let t_start = start.elapsed().as_secs_f64();
    let (m_req, w_req) = (metrics(), Instant::now());
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
    // The during window's serving split: from the request to one second after the switch (or
    // the first half of the after window, if shorter).
    let first = (args.after_s / 2.0).min(1.0);
    std::thread::sleep(Duration::from_secs_f64(first));
    let m_during = metrics();
    let serving_during = ServingStats::between(&m_req, &m_during, w_req.elapsed().as_secs_f64());
    trace(&format!(
        "serving during: {serving_during:?}; queue {}, running {}, KV blocks per rank {:?}",
        m_during.queue_depth,
        m_during.running,
        m_during
            .kv
            .iter()
            .map(|k| (k.rank.0, k.used_blocks))
            .collect::<Vec<_>>()
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
    stop.store(true, Ordering::Release);
    trace(&format!(
        "draining; {} tokens so far",
        metrics().generated_tokens
    ));
    let _ = loader.join();
    trace("drained");
    sampler_stop.store(true, Ordering::Release);
    let samples = sampler.join().unwrap_or_default();
    let measured = measured.with_context(|| format!("{from}->{to} with {strategy:?}"))?;

    let log = std::mem::take(&mut *lock(&log));
    let rate = |a: f64, b: f64| -> f64 {
        let n = log.tokens.iter().filter(|(t, _)| *t >= a && *t < b).count();
        if b > a {
            n as f64 / (b - a)
        } else {
            0.0
        }
    };
    // During: from the request to one second after the switch.
    let during_to = (t_end + 1.0).min(t_after);
    let mut gaps: Vec<f64> = log
        .tokens
        .iter()
        .filter(|(t, g)| *t >= t_start && *t <= during_to && g.is_some())
        .filter_map(|(_, g)| *g)
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
        bound_ms: 0.0,
        downtime_ms: measured.downtime_ms,
        intake_paused_ms: measured.intake_paused_ms,
        bytes_moved: measured.bytes_moved,
        bytes_zero_copy: measured.bytes_zero_copy,
        max_bytes_into_device: measured.max_bytes_into_device,
        throughput_before: rate((t_start - args.before_s / 2.0).max(0.0), t_start),
        throughput_during: rate(t_start, during_to),
        throughput_after: rate(t_end, t_after),
        throughput_request_to_switch: rate(t_start, t_end),
        serving_before,
        serving_after,
        serving_during,
        prewarmed_chunks: measured.prewarmed_chunks,
        kept_snapshot: measured.kept_snapshot,
        staged_ahead: measured.staged_ahead,
        tpot_p99_during_ms: percentile(&mut gaps, 0.99),
        peak_bytes_per_device: measured.peak_bytes_per_device.clone(),
        failed_requests: failed,
        completed_requests: completed,
        outputs_match: false,
        outputs_compared: 0,
        outputs_mismatched: 0,
        kv_sequences_migrated: measured.kv_migrated,
        sequences_requeued: measured.requeued,
        phases_ms: measured.phases_ms.iter().cloned().collect(),
    };
    Ok((
        report,
        Series {
            label: format!("{from}→{to} {}", strategy_name(strategy)),
            samples: smooth,
            window: (t_start, t_end),
        },
        log.done,
    ))
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
pub fn run(args: &Args) -> Result<()> {
    let steps = parse_steps(&args.steps)?;
    let (kind, n, machine) = parse_devices(&args.devices)?;
    if args.concurrency == 0 || args.max_tokens == 0 || args.max_batch_tokens == 0 {
        bail!("--concurrency, --max-tokens and --max-batch-tokens must be at least 1");
    }
    if !(args.before_s >= 0.0 && args.after_s >= 0.0) {
        bail!("--before-s and --after-s must be non-negative");
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
    let mut backend: Box<dyn Backend> = match kind {
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
        peer_gbps: 0.0,
        concurrency: args.concurrency,
        prompt_len: args.prompt_len,
        max_tokens: args.max_tokens,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        steps: Vec::new(),
        skipped: Vec::new(),
        reference_repeat: None,
    };
    let mut series = Vec::new();
    let mut outputs: Vec<(usize, Vec<Done>)> = Vec::new();
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
                Ok((r, ser, done)) => {
                    if !args.quiet {
                        eprintln!(
                            "{from}->{to} {}: latency {:.1} ms, downtime {:.1} ms, {} bytes \
                             moved (at most {} into one device), throughput {:.0}/{:.0}/{:.0} \
                             tok/s, {} failed",
                            r.strategy,
                            r.latency_ms,
                            r.downtime_ms,
                            r.bytes_moved,
                            r.max_bytes_into_device,
                            r.throughput_before,
                            r.throughput_during,
                            r.throughput_after,
                            r.failed_requests
                        );
                    }
                    outputs.push((report.steps.len(), done));
                    report.steps.push(r);
                    series.push(ser);
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
    // The transfer bound, with the peer bandwidth measured in this run.
    let peer_gbps = backend.peer_gbps()?;
    report.peer_gbps = peer_gbps;
    report.card = args.card.clone().unwrap_or_else(|| backend.card());
    for r in &mut report.steps {
        if peer_gbps > 0.0 {
            r.bound_ms = r.max_bytes_into_device as f64 / (peer_gbps * 1e9) * 1e3;
        }
    }
    // Outputs against a fixed deployment.
    let max_index = outputs
        .iter()
        .flat_map(|(_, d)| d.iter().filter(|x| x.ok).map(|x| x.index))
        .filter(|&i| i < args.compare)
        .max();
    if let Some(max_index) = max_index {
        if !args.quiet {
            eprintln!(
                "computing the reference outputs of {} prompts",
                max_index + 1
            );
        }
        let prompts: Vec<Vec<TokenId>> = (0..=max_index)
            .map(|i| prompt(cfg.vocab_size, args.prompt_len, i))
            .collect();
        let reference = backend.reference(&prompts, args.max_tokens, args.concurrency)?;
        if args.reference_repeat_concurrency > 0 {
            let repeat =
                backend.reference(&prompts, args.max_tokens, args.reference_repeat_concurrency)?;
            let mismatched = reference
                .iter()
                .zip(&repeat)
                .filter(|(a, b)| a != b)
                .count() as u64;
            if !args.quiet {
                eprintln!(
                    "reference repeated with {} in flight (not {}): {mismatched} of {} requests \
                     differ",
                    args.reference_repeat_concurrency,
                    args.concurrency,
                    reference.len()
                );
            }
            report.reference_repeat = Some(ReferenceRepeat {
                reference_concurrency: args.concurrency,
                repeat_concurrency: args.reference_repeat_concurrency,
                compared: reference.len() as u64,
                mismatched,
            });
        }
        for (i, done) in &outputs {
            let r = &mut report.steps[*i];
            for d in done.iter().filter(|d| d.ok && d.index < args.compare) {
                r.outputs_compared += 1;
                if reference.get(d.index as usize) != Some(&d.tokens) {
                    r.outputs_mismatched += 1;
                }
            }
            r.outputs_match = r.outputs_compared > 0 && r.outputs_mismatched == 0;
        }
    }
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
    Ok(())
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
) -> Result<Box<dyn Backend>> {
    Ok(Box::new(gpu::CudaBench::new(cfg, ckpt, machine, args)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(
    _cfg: &ModelConfig,
    _ckpt: Arc<Checkpoint>,
    _machine: &[u32],
    _args: &Args,
) -> Result<Box<dyn Backend>> {
    bail!("this binary was not built with CUDA (build with --features cuda); use host:N")
}

fn scheduler(args: &Args) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens: args.max_batch_tokens,
        max_running_per_rank: args.concurrency,
    }
}

mod host {
    //! The host backend: `scaler`'s `HostExecutor` on host devices.

    use super::*;
    use moe_engine::{Engine, EngineConfig};
    use moe_host::deployment::{DeploymentConfig, PlacementKind};
    use moe_host::worker::{DeploymentRunner, HostEngineConfig};
    use scaler::{DeviceSet, Strategy, TransitionKind, TransitionSpec};
    use scaler_exec::executor::{HostExecutor, HostExecutorConfig};

    pub(super) struct HostBench {
        cfg: ModelConfig,
        ckpt: Arc<Checkpoint>,
        n: usize,
        scheduler: SchedulerConfig,
    }

    impl HostBench {
        pub(super) fn new(cfg: &ModelConfig, ckpt: Arc<Checkpoint>, n: usize, args: &Args) -> Self {
            Self {
                cfg: cfg.clone(),
                ckpt,
                n,
                scheduler: scheduler(args),
            }
        }

        fn engine(
            &self,
            devices: usize,
            scheduler: SchedulerConfig,
        ) -> Result<Engine<DeploymentRunner>> {
            let (engine, _store) = DeploymentRunner::host_engine(
                &self.cfg,
                self.ckpt.as_ref(),
                &HostEngineConfig {
                    devices,
                    max_devices: self.n,
                    placement: PlacementKind::Balanced,
                    deployment: DeploymentConfig::default(),
                    engine: EngineConfig {
                        scheduler,
                        idle_wait: Duration::from_millis(5),
                        ..EngineConfig::default()
                    },
                    ..HostEngineConfig::default()
                },
            )?;
            Ok(engine)
        }
    }

    struct HostSession {
        engine: Engine<DeploymentRunner>,
        exec: HostExecutor,
        strategy: Strategy,
        n: usize,
        serving: Option<moe_engine::RunLoop>,
    }

    impl Session for HostSession {
        fn submitter(&self) -> Submit {
            let (engine, gate) = (self.engine.clone(), Arc::clone(self.exec.gate()));
            Arc::new(move |r| gate.submit(&engine, r))
        }
        fn metrics(&self) -> Metrics {
            let engine = self.engine.clone();
            Arc::new(move || engine.metrics())
        }
        fn scale(&mut self, to: usize) -> Result<Measured> {
            let from = self.exec.devices();
            let from_n = from.len();
            let target = scaler_exec::demo::target_devices(self.strategy, &from, to, self.n as u32)
                .with_context(|| format!("no {to} free devices for {:?}", self.strategy))?;
            let kind = if to > from.len() {
                TransitionKind::ScaleUp
            } else {
                TransitionKind::ScaleDown
            };
            let ev = self.exec.run(TransitionSpec {
                kind,
                strategy: self.strategy,
                from,
                to: target.clone(),
            })?;
            if !ev.completed() {
                bail!("the transition rolled back: {:?}", ev.report.abort_reason);
            }
            let r = &ev.report;
            let p = r.phases_ms;
            // The executor reports bytes moved, not per destination: spread them over the
            // receiving devices (those joining on a scale-up, the target set otherwise).
            let receivers = if self.strategy == Strategy::Elastic && to > from_n {
                to - from_n
            } else {
                to
            } as u64;
            let max_in = (r.bytes_moved + r.bytes_reloaded).div_ceil(receivers.max(1));
            Ok(Measured {
                latency_ms: r.latency_ms.unwrap_or(0.0),
                phases_ms: vec![
                    ("plan".into(), p.plan),
                    ("prepare".into(), p.prepare),
                    ("switch".into(), p.switch),
                    ("retire".into(), p.retire),
                    ("switch_boundary".into(), ev.switch_boundary_ms),
                ],
                downtime_ms: ev.downtime_ms,
                intake_paused_ms: r.intake_paused_ms,
                bytes_moved: r.bytes_moved + r.bytes_reloaded,
                bytes_zero_copy: r.bytes_zero_copy,
                max_bytes_into_device: max_in,
                peak_bytes_per_device: ev.peak_bytes_per_device.values().copied().collect(),
                kv_migrated: r.sequences_migrated,
                requeued: r.sequences_requeued,
                devices_after: ev.devices_after.len(),
                prewarmed_chunks: 0,
                kept_snapshot: false,
                staged_ahead: false,
            })
        }
        fn ready(&mut self, _to: usize) -> Result<()> {
            Ok(())
        }
        fn runner_phases(&mut self) -> Vec<(String, f64)> {
            Vec::new()
        }
        fn stop(mut self: Box<Self>) {
            if let Some(s) = self.serving.take() {
                s.stop();
            }
        }
    }

    impl Backend for HostBench {
        fn name(&self) -> &'static str {
            "host"
        }
        fn card(&self) -> String {
            "host".into()
        }
        fn gpus(&self) -> usize {
            self.n
        }
        fn peer_gbps(&mut self) -> Result<f64> {
            // The host stand-in for a peer link is a memcpy between two buffers.
            let bytes = 64 << 20;
            let a = vec![1u8; bytes];
            let mut b = vec![0u8; bytes];
            b.copy_from_slice(&a);
            let t = Instant::now();
            for _ in 0..4 {
                b.copy_from_slice(std::hint::black_box(&a));
            }
            Ok(4.0 * bytes as f64 / t.elapsed().as_secs_f64() / 1e9)
        }
        fn skip(&self, strategy: StrategyArg, from: usize, to: usize) -> Option<String> {
            match strategy {
                StrategyArg::Colocated => {
                    Some("the host executor does not implement the colocated baseline".into())
                }
                StrategyArg::Extravagant if from + to > self.n => Some(format!(
                    "needs {} devices (a disjoint set of {to} beside {from}); {} present",
                    from + to,
                    self.n
                )),
                _ => None,
            }
        }
        fn start(&mut self, from: usize, strategy: StrategyArg) -> Result<Box<dyn Session>> {
            let engine = self.engine(from, self.scheduler)?;
            let exec = HostExecutor::new(
                engine.clone(),
                Arc::clone(&self.ckpt) as scaler_exec::executor::Checkpoint,
                HostExecutorConfig {
                    deployment: DeploymentConfig::default(),
                    ..HostExecutorConfig::default()
                },
            );
            exec.prewarm(&DeviceSet::first(self.n as u32).difference(&exec.devices()));
            let serving = engine.start();
            Ok(Box::new(HostSession {
                engine,
                exec,
                strategy: strategy.into(),
                n: self.n,
                serving: Some(serving),
            }))
        }
        fn reference(
            &mut self,
            prompts: &[Vec<TokenId>],
            max_tokens: usize,
            max_running: usize,
        ) -> Result<Vec<Vec<TokenId>>> {
            let engine = self.engine(
                1,
                SchedulerConfig {
                    max_running_per_rank: max_running.max(1),
                    ..self.scheduler
                },
            )?;
            let handles = prompts
                .iter()
                .map(|p| engine.submit(Request::greedy(p.clone(), max_tokens)))
                .collect::<Result<Vec<_>, _>>()?;
            let run = engine.start();
            let out = handles.into_iter().map(|h| h.wait().tokens).collect();
            run.stop();
            Ok(out)
        }
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    //! The CUDA backend: `moe_cuda`'s elastic scaling and baselines.

    use super::*;
    use moe_cuda::{self as cuda, CudaConfig, CudaRunner, CudaScaler, Precision, ScaleOutcome};
    use moe_engine::{Engine, EngineConfig, RunLoop};
    use moe_model::weights::TensorSource;

    pub(super) struct CudaBench {
        /// The machine `--devices` named: the GPU of each logical device.
        gpus: cuda::GpuMap,
        cfg: ModelConfig,
        ckpt: Arc<Checkpoint>,
        n: usize,
        args_kv: usize,
        scheduler: SchedulerConfig,
        card: String,
        peer: Option<f64>,
        batch_invariant: bool,
    }

    impl CudaBench {
        pub(super) fn new(
            cfg: &ModelConfig,
            ckpt: Arc<Checkpoint>,
            machine: &[u32],
            args: &Args,
        ) -> Result<Self> {
            let have = cuda::device_count()?;
            if let Some(g) = machine.iter().find(|&&g| g as usize >= have) {
                bail!("--devices names GPU {g}; {have} present");
            }
            let n = machine.len();
            Ok(Self {
                gpus: cuda::GpuMap::new(machine)?,
                cfg: cfg.clone(),
                ckpt,
                n,
                args_kv: args.kv_blocks,
                scheduler: scheduler(args),
                card: String::new(),
                peer: None,
                batch_invariant: args.batch_invariant,
            })
        }

        fn config(&self, devices: usize, kv: usize) -> CudaConfig {
            CudaConfig {
                devices,
                gpus: self.gpus,
                kv_blocks_per_rank: kv,
                max_batch_tokens: self.scheduler.max_batch_tokens,
                max_context: 1024,
                precision: Precision::Bf16,
                batch_invariant: self.batch_invariant,
                ..CudaConfig::default()
            }
        }
    }

    struct CudaSession {
        engine: Engine<CudaRunner>,
        scaler: CudaScaler,
        ckpt: Arc<Checkpoint>,
        strategy: StrategyArg,
        kv: usize,
        serving: Option<RunLoop>,
        /// The runner times its phases (`ELASTICMOE_RUNNER_PHASES`; slows every step).
        phases: bool,
    }

    impl Session for CudaSession {
        fn submitter(&self) -> Submit {
            let engine = self.engine.clone();
            Arc::new(move |r| engine.submit(r))
        }
        fn metrics(&self) -> Metrics {
            let engine = self.engine.clone();
            Arc::new(move || engine.metrics())
        }
        fn scale(&mut self, to: usize) -> Result<Measured> {
            let o: ScaleOutcome = match self.strategy {
                StrategyArg::Elastic => self.scaler.elastic(to)?,
                StrategyArg::ColdRestart => self.scaler.cold_restart(
                    Arc::clone(&self.ckpt) as Arc<dyn TensorSource + Send + Sync>,
                    to,
                )?,
                StrategyArg::Colocated => self.scaler.colocated(self.ckpt.as_ref(), to, self.kv)?,
                StrategyArg::Extravagant => self.scaler.extravagant(to)?,
            };
            trace(&format!("scaled: {o:?}"));
            Ok(Measured {
                latency_ms: o.latency_ms,
                phases_ms: o
                    .phases_ms
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), *v))
                    .collect(),
                downtime_ms: o.downtime_ms,
                // Only the cold restart holds the loop; requests wait in the queue meanwhile.
                intake_paused_ms: o.downtime_ms,
                bytes_moved: o.bytes_moved,
                bytes_zero_copy: o.bytes_zero_copy,
                max_bytes_into_device: o.max_bytes_into_device,
                peak_bytes_per_device: o.peak_bytes_per_device,
                kv_migrated: o.kv_migrated,
                requeued: o.requeued,
                devices_after: o.devices_after,
                prewarmed_chunks: o.prewarmed_chunks,
                kept_snapshot: o.kept_snapshot,
                staged_ahead: o.staged_ahead,
            })
        }
        fn ready(&mut self, to: usize) -> Result<()> {
            if self.strategy != StrategyArg::Elastic {
                return Ok(());
            }
            let from = self.engine.metrics().kv.len();
            if to > from {
                self.scaler.prewarm(from, to)?;
            }
            let (chunks, t) = self.scaler.prewarm_experts(to)?;
            let staged = self.scaler.stage_ahead(to)?;
            trace(&format!(
                "warm pool: {chunks} expert chunks for {to} GPU(s) ({:.1} ms); staged ahead: \
                 {staged:?}",
                t.as_secs_f64() * 1e3
            ));
            Ok(())
        }
        fn runner_phases(&mut self) -> Vec<(String, f64)> {
            if !self.phases {
                return Vec::new();
            }
            let (tx, rx) = crossbeam_channel::bounded(1);
            self.engine.at_boundary(move |r, _| {
                let _ = tx.send(r.take_phase_times());
            });
            rx.recv_timeout(Duration::from_secs(10))
                .map(|v| v.into_iter().map(|(k, x)| (k.to_string(), x)).collect())
                .unwrap_or_default()
        }
        fn stop(mut self: Box<Self>) {
            if let Some(s) = self.serving.take() {
                s.stop();
            }
        }
    }

    impl Backend for CudaBench {
        fn name(&self) -> &'static str {
            "cuda"
        }
        fn card(&self) -> String {
            self.card.clone()
        }
        fn gpus(&self) -> usize {
            self.n
        }
        fn peer_gbps(&mut self) -> Result<f64> {
            // Measured when the first engine started (see `start`).
            Ok(self.peer.unwrap_or(0.0))
        }
        fn skip(&self, strategy: StrategyArg, from: usize, to: usize) -> Option<String> {
            match strategy {
                // The scaler's own device-set check: the engine serves on GPUs `0..from`.
                StrategyArg::Extravagant => {
                    cuda::disjoint_devices(&cuda::first_devices(from), to, self.n)
                        .err()
                        .map(|e| e.to_string())
                }
                _ => None,
            }
        }
        fn start(&mut self, from: usize, strategy: StrategyArg) -> Result<Box<dyn Session>> {
            // Colocated keeps two instances on the staying GPUs: each gets half the KV.
            let kv = if strategy == StrategyArg::Colocated {
                self.args_kv / 2
            } else {
                self.args_kv
            };
            trace(&format!("loading the checkpoint on {from} GPU(s)"));
            let mut runner =
                CudaRunner::load(&self.cfg, self.ckpt.as_ref(), self.config(from, kv))?;
            trace("loaded");
            let phases = std::env::var_os("ELASTICMOE_RUNNER_PHASES").is_some();
            runner.set_phase_timing(phases);
            let bp = runner.blueprint();
            // Valid until the first switch (only a switch changes the runner's buffers).
            let snapshot = runner.snapshot();
            if self.card.is_empty() {
                self.card = runner.device_name()?;
            }
            let engine = Engine::new(
                runner,
                EngineConfig {
                    scheduler: self.scheduler,
                    idle_wait: Duration::from_millis(2),
                    ..EngineConfig::default()
                },
            );
            let mut scaler = CudaScaler::new(engine.clone(), bp)?;
            scaler.adopt_snapshot(snapshot);
            if self.peer.is_none() && self.n >= 2 {
                let d = cuda::first_devices(2);
                self.peer = Some(cuda::peer_bandwidth(
                    scaler.blueprint(),
                    scaler.transport(),
                    d[0],
                    d[1],
                    1 << 30,
                    4,
                )?);
                trace(&format!(
                    "peer bandwidth {:.1} GB/s",
                    self.peer.unwrap_or(0.0)
                ));
            }
            let serving = engine.start();
            Ok(Box::new(CudaSession {
                engine,
                scaler,
                ckpt: Arc::clone(&self.ckpt),
                strategy,
                kv,
                serving: Some(serving),
                phases,
            }))
        }
        fn reference(
            &mut self,
            prompts: &[Vec<TokenId>],
            max_tokens: usize,
            max_running: usize,
        ) -> Result<Vec<Vec<TokenId>>> {
            let runner =
                CudaRunner::load(&self.cfg, self.ckpt.as_ref(), self.config(1, self.args_kv))?;
            let engine = Engine::new(
                runner,
                EngineConfig {
                    scheduler: SchedulerConfig {
                        max_running_per_rank: max_running.max(1),
                        ..self.scheduler
                    },
                    ..EngineConfig::default()
                },
            );
            let handles = prompts
                .iter()
                .map(|p| engine.submit(Request::greedy(p.clone(), max_tokens)))
                .collect::<Result<Vec<_>, _>>()?;
            let run = engine.start();
            let out = handles.into_iter().map(|h| h.wait().tokens).collect();
            run.stop();
            Ok(out)
        }
    }
}
