//! The demo pipeline behind `elasticmoe demo`: a trace with a step, a ramp and a burst drives
//! [`SloPolicy`] on a live host engine, and the [`HostExecutor`] carries out its decisions
//! while requests keep arriving.
//!
//! [`run`] returns a [`DemoRun`]: the stable [`Report`] (`report.json`), the timeline samples
//! and the scale events (for the picture), and every request's tokens. The loop itself is
//! [`drive`], over a [`DemoBackend`] (submit, metrics, one transition, stop): [`run`] gives it the
//! host engine and [`HostExecutor`]; `elasticmoe demo --devices cuda:...` gives it an
//! `Engine<CudaRunner>` and the CUDA scaler, so both backends share the trace, the policy
//! loop and the report. The report's
//! `outputs_identical_to_reference` is computed by [`reference_tokens`]: the same requests on a
//! fixed deployment, compared token by token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, TryRecvError};
use moe_engine::{
    EngineConfig, EngineMetrics, Event as TokenStreamEvent, FinishReason, Request, RequestHandle,
    SchedulerConfig, TokenId,
};
use moe_host::deployment::{DeploymentConfig, PlacementKind};
use moe_host::worker::{DeploymentRunner, HostEngineConfig, RunnerConfig};
use moe_model::config::ModelConfig;
use serde::Serialize;

use crate::executor::{Checkpoint, ExecError, HostExecutor, HostExecutorConfig, ScaleEvent};
use scaler::TransitionSpec;
use scaler::{millis, Time};
use scaler::{
    ClusterView, Decision, LoadObservation, Observation, Policy, RequestObservation, SloPolicy,
    SloPolicyConfig,
};
use scaler::{DeviceId, DeviceSet};
use scaler::{Strategy, TransitionKind};

/// One request of a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRequest {
    /// When it arrives, from the start.
    pub at: Duration,
    /// Its prompt.
    pub prompt: Vec<TokenId>,
    /// Tokens to generate.
    pub max_tokens: usize,
}

/// Requests in arrival order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    /// The requests.
    pub requests: Vec<TraceRequest>,
}

/// The request rates of [`Trace::step_ramp_burst`]'s phases, in requests per second.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TraceRates {
    /// The base load at the start.
    pub base: f64,
    /// The step up (the ramp goes from here back down to `base`).
    pub step: f64,
    /// The burst.
    pub burst: f64,
    /// The quiet tail.
    pub tail: f64,
}

impl TraceRates {
    /// Fixed rates (3, 80, 150 and 1 requests/s): whether a policy scales on them depends on
    /// how fast the machine is. [`TraceRates::for_capacity`] does not.
    pub const FIXED: TraceRates = TraceRates {
        base: 3.0,
        step: 80.0,
        burst: 150.0,
        tail: 1.0,
    };

    /// Rates fitted to this machine: `one` and `all` are the requests per second that one
    /// device and all `max_devices` devices complete with every slot busy
    /// ([`measure_capacity`]). The base fits one device at a quarter of its capacity; the step
    /// needs at least two (it keeps one device's slots full: 1.6 × its capacity, but at most
    /// 0.8 × what all devices carry, and never below one device's capacity); the burst needs
    /// every device (all devices' capacity, and at least 1.1 × the step); the tail needs one (a
    /// sixth of one device's capacity). Where all devices carry little more than one (fewer
    /// cores than devices), the step and the burst still fill one device's slots, so the policy
    /// scales up, and the backlog they leave is small enough to drain early in the tail, so it
    /// scales back down.
    pub fn for_capacity(one: f64, all: f64, max_devices: u32) -> TraceRates {
        let c = one.max(0.1);
        let all = all.max(0.1);
        let step = (1.6 * c).min(0.8 * all).max(c);
        let burst = if max_devices > 1 {
            all.max(1.1 * step)
        } else {
            step
        };
        TraceRates {
            base: 0.25 * c,
            step,
            burst,
            tail: c / 6.0,
        }
    }
}

impl Trace {
    /// A low base load, a step up, a ramp down, a burst, then a quiet tail, stretched to
    /// `seconds` in all, at `rates`. Deterministic in `seed`.
    pub fn step_ramp_burst(
        vocab: usize,
        seconds: f64,
        max_tokens: usize,
        seed: u64,
        rates: TraceRates,
    ) -> Trace {
        let v = vocab.clamp(2, 256) as u64;
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        // (phase start fraction, end fraction, requests/s at start, at end).
        let r = rates;
        // The tail is the longest phase: the backlog of the burst drains and the policy has
        // time to scale back down, step by step.
        let phases: [(f64, f64, f64, f64); 5] = [
            (0.00, 0.12, r.base, r.base),   // base
            (0.12, 0.34, r.step, r.step),   // step
            (0.34, 0.48, r.step, r.base),   // ramp down
            (0.48, 0.54, r.burst, r.burst), // burst
            (0.54, 1.00, r.tail, r.tail),   // quiet tail
        ];
        let mut requests = Vec::new();
        for (a, b, r0, r1) in phases {
            let (start, end) = (a * seconds, b * seconds);
            let mut t = start;
            while t < end {
                let frac = if end > start {
                    (t - start) / (end - start)
                } else {
                    0.0
                };
                let rate = (r0 + (r1 - r0) * frac).max(0.05);
                let len = 2 + (next() % 12) as usize;
                let prompt = (0..len)
                    .map(|_| (1 + next() % (v - 1)) as TokenId)
                    .collect();
                requests.push(TraceRequest {
                    at: Duration::from_secs_f64(t),
                    prompt,
                    max_tokens,
                });
                t += 1.0 / rate;
            }
        }
        Trace { requests }
    }
}

/// How a demo runs.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// The strategy for every transition.
    pub strategy: Strategy,
    /// Host devices.
    pub devices_max: u32,
    /// Devices serving at the start.
    pub initial: u32,
    /// KV pools.
    pub deployment: DeploymentConfig,
    /// Batching.
    pub scheduler: SchedulerConfig,
    /// The autoscaler.
    pub policy: SloPolicyConfig,
    /// How often load is sampled and the policy asked.
    pub tick: Duration,
    /// The model's name in the report.
    pub model: String,
    /// Host devices: an artificial delay per step ([`RunnerConfig::step_delay`]), to try the
    /// demo on slower devices.
    pub step_delay: Duration,
}

impl DemoConfig {
    /// The demo's defaults for `strategy` on `devices_max` host devices.
    pub fn new(strategy: Strategy, devices_max: u32, model: &str) -> DemoConfig {
        let mut policy = SloPolicyConfig::new(
            Duration::from_millis(1500),
            Duration::from_millis(200),
            devices_max as usize,
        );
        policy.window = Duration::from_millis(1500);
        policy.min_requests = 5;
        policy.sustain_up = Duration::from_millis(400);
        policy.sustain_down = Duration::from_millis(1200);
        policy.cooldown = Duration::from_millis(1000);
        policy.queue_per_device_high = 2.0;
        policy.sequences_per_device = 4;
        policy.utilisation_low = 0.35;
        if strategy == Strategy::Extravagant {
            // The new instance needs its own devices beside the old one.
            policy.max_devices = (devices_max / 2).max(1) as usize;
        }
        DemoConfig {
            strategy,
            devices_max,
            initial: 1,
            deployment: DeploymentConfig {
                block_tokens: 4,
                blocks_per_chunk: 8,
                kv_chunks: 2,
                kv_max_chunks: 16,
                ..DeploymentConfig::default()
            },
            scheduler: SchedulerConfig {
                max_batch_tokens: 32,
                max_running_per_rank: 4,
            },
            policy,
            tick: Duration::from_millis(50),
            model: model.to_string(),
            step_delay: Duration::ZERO,
        }
    }
}

impl DemoConfig {
    /// Loosens the SLO targets where one device of this machine is too slow for the defaults
    /// even at a light load (TPOT target at least 3 × its TPOT with every slot busy, TTFT
    /// target at least 20 ×), so that the policy reacts to load rather than to the machine.
    pub fn fit_targets(&mut self, one_device: &Capacity) {
        let tpot = Duration::from_secs_f64(one_device.tpot_ms.max(0.0) / 1e3);
        self.policy.tpot_target = self.policy.tpot_target.max(tpot * 3);
        self.policy.ttft_target = self.policy.ttft_target.max(tpot * 20);
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The engine could not be built.
    #[error("building the host engine failed: {0}")]
    Engine(#[from] moe_host::deployment::DeploymentError),
    /// The policy configuration is invalid.
    #[error(transparent)]
    Policy(#[from] scaler::PolicyConfigError),
    /// A transition could not be carried out.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// A request was refused.
    #[error("a trace request was refused: {0}")]
    Request(#[from] moe_engine::RequestError),
    /// The trace is empty.
    #[error("the trace has no requests")]
    EmptyTrace,
    /// A backend's transition failed (the host executor's failures are [`DemoError::Exec`]).
    #[error("a transition failed: {0}")]
    Transition(String),
    /// The serving engine stopped with an error.
    #[error("the engine failed: {0}")]
    Serving(String),
}

/// `requests` in the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    /// Submitted.
    pub submitted: u64,
    /// Finished by length or stop token.
    pub completed: u64,
    /// Finished otherwise.
    pub failed: u64,
    /// Preempted (or re-queued) and recomputed.
    pub preempted: u64,
}

/// `phases_ms` in the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct EventPhasesMs {
    /// Plan.
    pub plan: f64,
    /// Prepare.
    pub prepare: f64,
    /// Switch.
    pub switch: f64,
    /// Retire.
    pub retire: f64,
}

/// One `scale_events` entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScaleEventReport {
    /// `up`, `down`, `rebalance` or `failure`.
    pub kind: String,
    /// Devices before.
    pub from_devices: u64,
    /// Devices after.
    pub to_devices: u64,
    /// The strategy.
    pub strategy: String,
    /// From the decision to the switch.
    pub latency_ms: f64,
    /// How long the serving loop was stopped.
    pub downtime_ms: f64,
    /// How long intake was paused.
    pub intake_paused_ms: f64,
    /// Bytes copied between devices.
    pub bytes_moved: u64,
    /// Bytes reused in place.
    pub bytes_zero_copy: u64,
    /// Peak bytes per involved device, ascending device id.
    pub peak_bytes_per_device: Vec<u64>,
    /// Phase durations.
    pub phases_ms: EventPhasesMs,
    /// (Beyond issue 8's schema.) How long the switch's boundary action held the serving loop
    /// between two iterations: the pointer swap plus the KV copied there. Not counted as
    /// downtime (the loop did not stop; one iteration started this much later).
    pub switch_boundary_ms: f64,
    /// (Beyond the schema.) Scale-down: KV bytes pre-copied to staying ranks during Prepare
    /// while the sequences kept decoding.
    pub kv_bytes_precopied: u64,
    /// (Beyond the schema.) KV bytes copied inside the switch: only the tails after a
    /// pre-copy; every running sequence's whole KV for the colocated and extravagant baselines.
    pub kv_bytes_at_switch: u64,
    /// (Beyond the schema.) Sequences this event re-queued for recompute (to fit the colocated
    /// baseline's halved KV budget, or at a switch): never lost, recomputed bitwise the same.
    pub sequences_preempted: u64,
    /// (Beyond the schema.) Colocated: the running instance's KV budget during the transition,
    /// in chunks, per shared device (ascending id), against `kv_max_chunks` per device
    /// outside it. Empty for the other strategies.
    pub kv_budget_chunks: Vec<u64>,
}

impl ScaleEventReport {
    /// The report entry of a finished transition.
    pub fn from_event(e: &ScaleEvent) -> ScaleEventReport {
        let r = &e.report;
        ScaleEventReport {
            kind: r.kind.as_str().to_string(),
            from_devices: r.from.len() as u64,
            to_devices: r.to.len() as u64,
            strategy: r.strategy.as_str().to_string(),
            latency_ms: r.latency_ms.unwrap_or(0.0),
            downtime_ms: e.downtime_ms,
            intake_paused_ms: r.intake_paused_ms,
            bytes_moved: r.bytes_moved,
            bytes_zero_copy: r.bytes_zero_copy,
            peak_bytes_per_device: e.peak_bytes_per_device.values().copied().collect(),
            phases_ms: EventPhasesMs {
                plan: r.phases_ms.plan,
                prepare: r.phases_ms.prepare,
                switch: r.phases_ms.switch,
                retire: r.phases_ms.retire,
            },
            switch_boundary_ms: e.switch_boundary_ms,
            kv_bytes_precopied: e.kv_bytes_precopied,
            kv_bytes_at_switch: e.kv_bytes_at_switch,
            sequences_preempted: e.sequences_preempted,
            kv_budget_chunks: e.kv_budget.iter().map(|c| c.budget_chunks as u64).collect(),
        }
    }
}

/// `throughput_tokens_per_s`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Throughput {
    /// Before the first transition.
    pub before: f64,
    /// While transitions ran.
    pub during: f64,
    /// After the last transition.
    pub after: f64,
}

/// `latency_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// TTFT median.
    pub ttft_p50: f64,
    /// TTFT 99th percentile.
    pub ttft_p99: f64,
    /// TPOT median.
    pub tpot_p50: f64,
    /// TPOT 99th percentile.
    pub tpot_p99: f64,
}

/// `report.json`: the stable schema of issue 8.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// `host`.
    pub backend: String,
    /// The model.
    pub model: String,
    /// Devices of the backend.
    pub devices_max: u64,
    /// The strategy.
    pub strategy: String,
    /// Request counts.
    pub requests: RequestCounts,
    /// Whether every completed request's tokens equal the fixed deployment's.
    pub outputs_identical_to_reference: bool,
    /// Transitions that completed, in order.
    pub scale_events: Vec<ScaleEventReport>,
    /// Generated tokens per second.
    pub throughput_tokens_per_s: Throughput,
    /// Latency percentiles over completed requests, from the engine's token timestamps,
    /// counted from each request's arrival on the trace.
    pub latency_ms: Latency,
    /// (Beyond issue 8's schema.) One device's capacity measured before the trace and the
    /// rates the trace was scaled to from it; absent for a trace at fixed rates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
}

/// One device's capacity on this machine, measured by [`measure_capacity`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Capacity {
    /// Requests completed per second with every slot of the device busy.
    pub requests_per_s: f64,
    /// Median time per output token of those requests, in ms.
    pub tpot_ms: f64,
}

/// How a trace was fitted to the machine.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Calibration {
    /// One device's measured capacity.
    pub one_device: Capacity,
    /// All the demo's devices' measured capacity (on a machine with fewer cores than devices,
    /// less than their number times one device's).
    pub all_devices: Capacity,
    /// The trace's rates, from [`TraceRates::for_capacity`].
    pub rates: TraceRates,
}

/// Measures a deployment's capacity: three rounds of `slots` requests of `max_tokens` tokens
/// (7-token prompts, the trace's mean), all submitted at once through `submit` to an engine
/// whose ranks run `slots` sequences in all, timed from the first submission to the last
/// finish (after one short warm-up request).
pub fn measure_capacity(
    submit: &dyn Fn(Request) -> Result<RequestHandle, String>,
    slots: usize,
    max_tokens: usize,
    vocab: usize,
) -> Result<Capacity, DemoError> {
    let v = vocab.clamp(2, 256) as u32;
    let request = |i: usize, n: usize| {
        let prompt = (0..7).map(|j| 1 + (i as u32 * 7 + j) % (v - 1)).collect();
        Request::greedy(prompt, n)
    };
    let failed = |why: String| DemoError::Serving(format!("measuring one device: {why}"));
    let warm = submit(request(0, 4)).map_err(failed)?.wait();
    if !matches!(warm.finish, FinishReason::Length | FinishReason::Stop(_)) {
        return Err(failed(format!(
            "the warm-up request ended {:?}",
            warm.finish
        )));
    }
    let n = 3 * slots.max(1);
    let t = Instant::now();
    let handles = (0..n)
        .map(|i| submit(request(i + 1, max_tokens)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(failed)?;
    let mut tpots = Vec::new();
    for h in handles {
        let c = h.wait();
        if !matches!(c.finish, FinishReason::Length | FinishReason::Stop(_)) {
            return Err(failed(format!("a request ended {:?}", c.finish)));
        }
        tpots.extend(c.timings.tpot().map(millis));
    }
    Ok(Capacity {
        requests_per_s: n as f64 / t.elapsed().as_secs_f64().max(1e-6),
        tpot_ms: percentile(&mut tpots, 0.5),
    })
}

/// [`measure_capacity`] on `devices` host devices set up as `config` sets up the demo's.
pub fn host_capacity(
    cfg: &ModelConfig,
    checkpoint: &Checkpoint,
    config: &DemoConfig,
    devices: u32,
    max_tokens: usize,
) -> Result<Capacity, DemoError> {
    let (engine, _store) =
        DeploymentRunner::host_engine(cfg, checkpoint.as_ref(), &host_config(config, devices))?;
    let serving = engine.start();
    let submit = |r: Request| engine.submit(r).map_err(|e| e.to_string());
    let out = measure_capacity(
        &submit,
        config.scheduler.max_running_per_rank * devices as usize,
        max_tokens,
        cfg.vocab_size,
    );
    serving.stop();
    out
}

/// One timeline sample.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds from the start.
    pub t_s: f64,
    /// Generated tokens per second over the last tick.
    pub tokens_per_s: f64,
    /// Devices serving.
    pub devices: usize,
    /// TTFT p99 of requests finished in the last policy window, ms.
    pub ttft_p99_ms: f64,
    /// TPOT p99 of requests finished in the last policy window, ms.
    pub tpot_p99_ms: f64,
    /// Requests waiting.
    pub queue: usize,
}

/// A transition on the timeline.
#[derive(Clone, Debug)]
pub struct TimedEvent<E = ScaleEvent> {
    /// Seconds from the start when it was decided.
    pub start_s: f64,
    /// Seconds from the start when it ended.
    pub end_s: f64,
    /// What happened.
    pub event: E,
}

/// Everything a demo run produced.
#[derive(Clone, Debug)]
pub struct DemoRun<E = ScaleEvent> {
    /// The report.
    pub report: Report,
    /// Samples, one per tick.
    pub timeline: Vec<Sample>,
    /// Transitions, completed or rolled back.
    pub events: Vec<TimedEvent<E>>,
    /// Per trace request: its tokens if it completed.
    pub tokens: Vec<Option<Vec<TokenId>>>,
}

/// What the caller sees while it runs.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Seconds from the start.
    pub t_s: f64,
    /// Requests finished so far.
    pub finished: usize,
    /// Requests in the trace.
    pub total: usize,
    /// Devices serving.
    pub devices: usize,
    /// Tokens per second now.
    pub tokens_per_s: f64,
    /// Transitions so far.
    pub transitions: usize,
}

fn host_config(config: &DemoConfig, devices: u32) -> HostEngineConfig {
    HostEngineConfig {
        devices: devices as usize,
        max_devices: config.devices_max as usize,
        placement: PlacementKind::Balanced,
        deployment: config.deployment,
        engine: EngineConfig {
            scheduler: config.scheduler,
            idle_wait: Duration::from_millis(5),
            ..EngineConfig::default()
        },
        runner: RunnerConfig {
            step_delay: config.step_delay,
            ..RunnerConfig::default()
        },
    }
}

fn to_request(r: &TraceRequest) -> Request {
    Request::greedy(r.prompt.clone(), r.max_tokens)
}

/// The tokens of every trace request on a fixed deployment of `devices` devices (no scaling).
pub fn reference_tokens(
    cfg: &ModelConfig,
    checkpoint: &Checkpoint,
    config: &DemoConfig,
    devices: u32,
    trace: &Trace,
) -> Result<Vec<Vec<TokenId>>, DemoError> {
    // Outputs do not depend on the batch, so the reference batches generously to finish fast.
    let mut host = host_config(config, devices);
    host.engine.scheduler = SchedulerConfig::default();
    host.runner.step_delay = Duration::ZERO;
    let (engine, _store) = DeploymentRunner::host_engine(cfg, checkpoint.as_ref(), &host)?;
    let handles = trace
        .requests
        .iter()
        .map(|r| engine.submit(to_request(r)))
        .collect::<Result<Vec<_>, _>>()?;
    let run = engine.start();
    let out = handles.into_iter().map(|h| h.wait().tokens).collect();
    run.stop();
    Ok(out)
}

/// The next device set for `n` devices, from `current`, under `strategy`: elastic and cold
/// restarts add the lowest free devices or drop the highest; the extravagant baseline takes
/// the lowest devices not in use. `None` if there are not enough devices.
pub fn target_devices(
    strategy: Strategy,
    current: &DeviceSet,
    n: usize,
    devices_max: u32,
) -> Option<DeviceSet> {
    let all = DeviceSet::first(devices_max);
    if strategy == Strategy::Extravagant {
        let free: Vec<DeviceId> = all.difference(current).iter().take(n).collect();
        return (free.len() == n).then(|| free.into_iter().collect());
    }
    if n >= current.len() {
        let add: Vec<DeviceId> = all
            .difference(current)
            .iter()
            .take(n - current.len())
            .collect();
        (add.len() == n - current.len()).then(|| current.union(&add.into_iter().collect()))
    } else {
        Some(current.iter().take(n).collect())
    }
}

struct Live {
    index: usize,
    handle: RequestHandle,
    /// When it arrived on the trace (latencies count from here, so a paused intake shows).
    submitted: Instant,
    first: Option<Duration>,
    last: Option<Duration>,
    tokens: Vec<TokenId>,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// A transition as [`drive`] sees it, whatever carried it out.
pub trait DemoEvent: Send + 'static {
    /// The devices serving once it ended.
    fn devices_after(&self) -> DeviceSet;
    /// Whether it completed (one rolled back stays on the timeline but not in the report).
    fn completed(&self) -> bool;
    /// Its `scale_events` entry.
    fn report(&self) -> ScaleEventReport;
}

impl DemoEvent for ScaleEvent {
    fn devices_after(&self) -> DeviceSet {
        self.devices_after.clone()
    }

    fn completed(&self) -> bool {
        ScaleEvent::completed(self)
    }

    fn report(&self) -> ScaleEventReport {
        ScaleEventReport::from_event(self)
    }
}

/// A serving engine as [`drive`] uses it, behind closures, so that the same loop serves a trace
/// on any backend (the host engine here, the CUDA runner in the `elasticmoe` binary).
pub struct DemoBackend<E> {
    /// `backend` in the report (`host`, `cuda`).
    pub name: &'static str,
    /// Submits one request (through the intake gate, where there is one).
    pub submit: Box<dyn Fn(Request) -> Result<RequestHandle, String> + Send>,
    /// The engine's metrics now.
    pub metrics: Box<dyn Fn() -> EngineMetrics>,
    /// Carries out one transition, on the demo's scaler thread (one at a time).
    pub transition: Box<dyn FnMut(TransitionSpec) -> Result<E, DemoError> + Send>,
    /// Stops serving; called once, when the loop ends or fails.
    pub stop: Box<dyn FnOnce()>,
}

impl<E> std::fmt::Debug for DemoBackend<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoBackend")
            .field("name", &self.name)
            .finish()
    }
}

/// Runs `trace` under the policy with `config.strategy`, then compares with `reference`.
pub fn run(
    cfg: &ModelConfig,
    checkpoint: &Checkpoint,
    config: &DemoConfig,
    trace: &Trace,
    reference: &[Vec<TokenId>],
    progress: impl FnMut(&Progress),
) -> Result<DemoRun, DemoError> {
    if trace.requests.is_empty() {
        return Err(DemoError::EmptyTrace);
    }
    let (engine, _store) = DeploymentRunner::host_engine(
        cfg,
        checkpoint.as_ref(),
        &host_config(config, config.initial),
    )?;
    let exec_config = HostExecutorConfig {
        deployment: config.deployment,
        ..HostExecutorConfig::default()
    };
    let mut executor = HostExecutor::new(engine.clone(), Arc::clone(checkpoint), exec_config);
    let all = DeviceSet::first(config.devices_max);
    executor.prewarm(&all.difference(&executor.devices()));
    let gate = Arc::clone(executor.gate());
    let serving = engine.start();
    let metrics_engine = engine.clone();
    let backend = DemoBackend {
        name: "host",
        submit: Box::new(move |r| gate.submit(&engine, r).map_err(|e| e.to_string())),
        metrics: Box::new(move || metrics_engine.metrics()),
        transition: Box::new(move |spec| executor.run(spec).map_err(DemoError::from)),
        stop: Box::new(move || serving.stop()),
    };
    drive(backend, config, trace, reference, progress)
}

/// The demo's loop on `backend` (already serving, on `config.initial` devices): requests arrive
/// on the trace's clock, every tick feeds the policy the engine's load and the finished
/// requests' latencies, its decisions go to a scaler thread one at a time, and the run ends
/// when every request has finished and no transition is running. Then the report, with the
/// tokens compared with `reference`.
pub fn drive<E: DemoEvent>(
    backend: DemoBackend<E>,
    config: &DemoConfig,
    trace: &Trace,
    reference: &[Vec<TokenId>],
    mut progress: impl FnMut(&Progress),
) -> Result<DemoRun<E>, DemoError> {
    let DemoBackend {
        name,
        submit,
        metrics,
        mut transition,
        stop,
    } = backend;
    if trace.requests.is_empty() {
        stop();
        return Err(DemoError::EmptyTrace);
    }
    let mut policy = match SloPolicy::new(config.policy) {
        Ok(p) => p,
        Err(e) => {
            stop();
            return Err(e.into());
        }
    };
    let start = Instant::now();

    // The submitter: requests arrive on the trace's clock.
    let (sub_tx, sub_rx) = unbounded::<(usize, Instant, Result<RequestHandle, String>)>();
    let submitter = {
        let requests = trace.requests.clone();
        std::thread::spawn(move || {
            for (i, r) in requests.iter().enumerate() {
                let due = start + r.at;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if sub_tx.send((i, due, submit(to_request(r)))).is_err() {
                    return;
                }
            }
        })
    };

    // The scaler: one transition at a time, on its own thread.
    let (cmd_tx, cmd_rx) = unbounded::<TransitionSpec>();
    let (ev_tx, ev_rx) = unbounded::<(f64, Result<E, DemoError>)>();
    let scaler = std::thread::spawn(move || {
        while let Ok(spec) = cmd_rx.recv() {
            let out = transition(spec);
            if ev_tx.send((start.elapsed().as_secs_f64(), out)).is_err() {
                return;
            }
        }
    });
    let finish = move |cmd_tx: crossbeam_channel::Sender<TransitionSpec>| {
        drop(cmd_tx);
        stop();
        let _ = scaler.join();
        let _ = submitter.join();
    };

    let total = trace.requests.len();
    let mut live: Vec<Live> = Vec::new();
    let mut tokens: Vec<Option<Vec<TokenId>>> = vec![None; total];
    let mut counts = RequestCounts::default();
    let mut ttfts: Vec<(f64, f64)> = Vec::new();
    let mut tpots: Vec<(f64, f64)> = Vec::new();
    let mut timeline = Vec::new();
    let mut events: Vec<TimedEvent<E>> = Vec::new();
    let mut devices = DeviceSet::first(config.initial);
    let mut pending: Option<f64> = None;
    let mut finished = 0usize;
    let mut submitted_all = false;
    let mut recent_tokens: std::collections::VecDeque<(Instant, u64)> =
        std::collections::VecDeque::new();
    let mut failure = None;
    loop {
        std::thread::sleep(config.tick);
        let t_s = start.elapsed().as_secs_f64();
        loop {
            match sub_rx.try_recv() {
                Ok((index, at, Ok(handle))) => {
                    counts.submitted += 1;
                    live.push(Live {
                        index,
                        handle,
                        submitted: at,
                        first: None,
                        last: None,
                        tokens: Vec::new(),
                    });
                }
                Ok((_, _, Err(_))) => {
                    counts.submitted += 1;
                    counts.failed += 1;
                    finished += 1;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    submitted_all = true;
                    break;
                }
            }
        }
        let mut i = 0;
        while i < live.len() {
            let mut done = None;
            while let Some(ev) = live[i].handle.try_recv() {
                match ev {
                    TokenStreamEvent::Token(tok) => {
                        let l = &mut live[i];
                        // The engine's timestamp of the token, from the trace's arrival.
                        let at = (l.handle.submitted_at() + tok.at)
                            .saturating_duration_since(l.submitted);
                        l.first.get_or_insert(at);
                        l.last = Some(at);
                        l.tokens.push(tok.token);
                    }
                    TokenStreamEvent::Finished { reason, timings } => {
                        done = Some((reason, timings.preemptions));
                        break;
                    }
                }
            }
            match done {
                Some((reason, preemptions)) => {
                    let l = live.swap_remove(i);
                    finished += 1;
                    counts.preempted += u64::from(preemptions > 0);
                    let ok = matches!(reason, FinishReason::Length | FinishReason::Stop(_));
                    if ok {
                        counts.completed += 1;
                        let ttft = l.first.unwrap_or_default();
                        let n = l.tokens.len().max(1);
                        let tpot = if n > 1 {
                            (l.last.unwrap_or_default().saturating_sub(ttft)) / (n as u32 - 1)
                        } else {
                            Duration::ZERO
                        };
                        ttfts.push((t_s, millis(ttft)));
                        tpots.push((t_s, millis(tpot)));
                        policy.observe(Observation::RequestFinished(RequestObservation {
                            at: Time::from_duration(start.elapsed()),
                            ttft,
                            tpot,
                        }));
                        tokens[l.index] = Some(l.tokens);
                    } else {
                        counts.failed += 1;
                    }
                }
                None => i += 1,
            }
        }
        while let Ok((end_s, out)) = ev_rx.try_recv() {
            let start_s = pending.take().unwrap_or(end_s);
            match out {
                Ok(event) => {
                    devices = event.devices_after();
                    events.push(TimedEvent {
                        start_s,
                        end_s,
                        event,
                    });
                }
                Err(e) => failure = Some(e),
            }
        }
        let m = metrics();
        if failure.is_none() {
            failure = m.last_error.clone().map(DemoError::Serving);
        }
        if let Some(e) = failure.take() {
            finish(cmd_tx);
            return Err(e);
        }
        // Throughput over the last half second, so single ticks do not alias with iterations.
        recent_tokens.push_back((Instant::now(), m.generated_tokens));
        while recent_tokens.len() > 2 && recent_tokens[0].0.elapsed() > Duration::from_millis(500) {
            recent_tokens.pop_front();
        }
        let (t0, g0) = recent_tokens[0];
        let tps =
            (m.generated_tokens.saturating_sub(g0)) as f64 / t0.elapsed().as_secs_f64().max(1e-3);
        let now = Time::from_duration(start.elapsed());
        policy.observe(Observation::Load(LoadObservation {
            at: now,
            queue_depth: m.queue_depth,
            running: m.running,
            kv_usage: m.kv_utilisation(),
            tokens_per_s: tps,
        }));
        let window = config.policy.window.as_secs_f64();
        let recent = |v: &[(f64, f64)]| -> f64 {
            let mut r: Vec<f64> = v
                .iter()
                .filter(|(t, _)| *t >= t_s - window)
                .map(|x| x.1)
                .collect();
            percentile(&mut r, 0.99)
        };
        timeline.push(Sample {
            t_s,
            tokens_per_s: tps,
            devices: devices.len(),
            ttft_p99_ms: recent(&ttfts),
            tpot_p99_ms: recent(&tpots),
            queue: m.queue_depth,
        });
        let view = ClusterView {
            devices: devices.len(),
            transition_running: pending.is_some(),
        };
        if let Decision::ScaleTo { devices: n, .. } = policy.decide(now, view) {
            if let Some(to) = target_devices(config.strategy, &devices, n, config.devices_max) {
                let kind = if n > devices.len() {
                    TransitionKind::ScaleUp
                } else {
                    TransitionKind::ScaleDown
                };
                if to != devices
                    && cmd_tx
                        .send(TransitionSpec {
                            kind,
                            strategy: config.strategy,
                            from: devices.clone(),
                            to,
                        })
                        .is_ok()
                {
                    pending = Some(t_s);
                }
            }
        }
        progress(&Progress {
            t_s,
            finished,
            total,
            devices: devices.len(),
            tokens_per_s: tps,
            transitions: events.len(),
        });
        if submitted_all && live.is_empty() && finished >= total && pending.is_none() {
            break;
        }
    }
    finish(cmd_tx);

    // A request that failed (or never ran) has no tokens: it is not identical.
    let identical = tokens
        .iter()
        .zip(reference)
        .all(|(got, want)| got.as_ref() == Some(want))
        && reference.len() == tokens.len();
    let done: Vec<&TimedEvent<E>> = events.iter().filter(|e| e.event.completed()).collect();
    let first = done.first().map(|e| e.start_s);
    let last = done.last().map(|e| e.end_s);
    let mean = |f: &dyn Fn(f64) -> bool| -> f64 {
        let v: Vec<f64> = timeline
            .iter()
            .filter(|s| f(s.t_s))
            .map(|s| s.tokens_per_s)
            .collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let during = |t: f64| done.iter().any(|e| t >= e.start_s && t <= e.end_s + 1e-9);
    let throughput = Throughput {
        before: mean(&|t| first.is_none_or(|f| t < f)),
        during: mean(&during),
        after: mean(&|t| last.is_some_and(|l| t > l)),
    };
    let mut tt: Vec<f64> = ttfts.iter().map(|x| x.1).collect();
    let mut tp: Vec<f64> = tpots.iter().map(|x| x.1).collect();
    let latency = Latency {
        ttft_p50: percentile(&mut tt, 0.5),
        ttft_p99: percentile(&mut tt, 0.99),
        tpot_p50: percentile(&mut tp, 0.5),
        tpot_p99: percentile(&mut tp, 0.99),
    };
    let report = Report {
        backend: name.into(),
        model: config.model.clone(),
        devices_max: u64::from(config.devices_max),
        strategy: config.strategy.as_str().into(),
        requests: counts,
        outputs_identical_to_reference: identical,
        scale_events: done.iter().map(|e| e.event.report()).collect(),
        throughput_tokens_per_s: throughput,
        latency_ms: latency,
        calibration: None,
    };
    Ok(DemoRun {
        report,
        timeline,
        events,
        tokens,
    })
}
