//! `moe-engine`: the serving engine. Requests in, token streams out, one iteration at a time.
//!
//! [`Engine`] ties together the continuous-batching [`scheduler`], per-request [`sampling`] and a
//! [`Runner`], the thing that computes logits for a batch of sequence chunks and owns their KV
//! (in production the host runner, a `Deployment` with its device workers in `moe-host`, or the
//! CUDA runner in `moe-cuda`). The engine tells the runner what it [`Need`]s of each sampled row
//! ([`Runner::run_sampled`]): a greedy request without logprobs needs only its token, which a
//! runner may choose where the logits are (the CUDA runner does, on the GPU) instead of sending
//! the whole vocabulary's logits back; the tokens are the same either way.
//!
//! - [`Engine::submit`] validates a [`Request`] and returns a [`RequestHandle`], a stream of
//!   [`Event`]s (tokens with optional logprobs, then a finish reason with timings). Intake never
//!   pauses: it only touches a short queue, never the iteration in progress.
//! - [`Engine::step`] runs one iteration: apply queued boundary actions (such as swapping the
//!   deployment), take in new requests and cancellations, schedule, run, sample, stream.
//! - [`Engine::start`] runs iterations on a thread until stopped; it sleeps while idle.
//! - [`Engine::cancel`] (or dropping a handle) ends a request and frees its KV blocks at the next
//!   iteration boundary.
//! - [`Engine::at_boundary`] queues an action on the runner and scheduler that runs between two
//!   iterations; the scaler uses it to swap deployments and move sequences.
//!
//! It also holds the two synchronisation primitives that runners share: [`mesh::Mesh`] (the host
//! workers' all-to-all exchange) and [`lockstep::Lockstep`] (the CUDA runner's per-layer
//! barriers). Both go through a crate-private `loom` shim, so their loom models run here, without
//! a model or a device.
//!
//! Architecture invariants:
//! - the engine knows no model, no compute backend and no device: it depends on none of
//!   `moe-model`, `moe-host`, `moe-cuda` or `hbm-vmm`, and sees only token ids, logits and
//!   the [`Runner`] seam;
//! - the engine never touches device memory itself: the [`Runner`] owns KV and weights;
//! - submitting, cancelling and queueing boundary actions never wait for the iteration in
//!   progress (they take only the intake's short lock);
//! - scheduling and sampling are deterministic: a request's tokens depend only on the model, its
//!   prompt and its sampling parameters, never on what else runs or where;
//! - no unsafe code (`#![forbid(unsafe_code)]`).
//!
//! # Example
//!
//! A stand-in runner on one rank whose logits always favour token 7 (a real runner is
//! `moe_host::worker::DeploymentRunner` or `moe_cuda::CudaRunner`):
//!
//! ```
//! use moe_engine::{
//!     Engine, EngineConfig, FinishReason, KvLedger, RankId, RankKv, Request, RequestId,
//!     RequestLimits, RunError, Runner, Work,
//! };
//!
//! struct Unbounded;
//! impl KvLedger for Unbounded {
//!     fn can_admit(&self, _: RankId, _: usize) -> bool { true }
//!     fn grow(&mut self, _: RankId, _: RequestId, _: usize) -> bool { true }
//!     fn release(&mut self, _: RankId, _: RequestId) {}
//! }
//!
//! struct Sevens(Unbounded);
//! impl Runner for Sevens {
//!     fn limits(&self) -> RequestLimits {
//!         RequestLimits { vocab_size: 16, max_context: 64 }
//!     }
//!     fn kv_capacity_tokens(&self) -> usize { 64 }
//!     fn ranks(&self) -> Vec<RankId> { vec![RankId(0)] }
//!     fn ledger(&mut self) -> &mut dyn KvLedger { &mut self.0 }
//!     fn kv_usage(&self) -> Vec<RankKv> { Vec::new() }
//!     fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Vec<f32>>, RunError> {
//!         let mut logits = vec![0.0; 16];
//!         logits[7] = 1.0;
//!         Ok(work.iter().filter(|w| w.chunk.sample).map(|_| logits.clone()).collect())
//!     }
//! }
//!
//! let engine = Engine::new(Sevens(Unbounded), EngineConfig::default());
//! let handle = engine.submit(Request::greedy(vec![1, 2, 3], 4)).unwrap();
//! let run = engine.start(); // iterations on a thread; submit keeps working meanwhile
//! let done = handle.wait();
//! assert_eq!((done.tokens, done.finish), (vec![7; 4], FinishReason::Length));
//! run.stop();
//! ```
#![forbid(unsafe_code)]

mod handoff;
mod intake;
// Used by the CUDA runner's multi-GPU steps; host-side so that its loom models run everywhere.
pub mod lockstep;
pub(crate) mod loom;
pub mod mesh;
pub mod request;
pub mod sampling;
pub mod scheduler;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use self::loom::{AtomicBool, Ordering};
use handoff::Handoff;
use intake::{Intake, Submitted};

pub use mesh::MeshError;
pub use request::{
    Completion, Event, FinishReason, Request, RequestError, RequestId, RequestLimits,
    RequestTimings, TokenEvent, TokenId,
};
pub use sampling::{SamplingError, SamplingParams};
pub use scheduler::{
    Chunk, KvLedger, RankId, Schedule, Scheduler, SchedulerConfig, SchedulerStats,
};

/// One sequence's chunk as the runner computes it.
#[derive(Debug, Clone, Copy)]
pub struct Work<'a> {
    /// Which tokens of which sequence, on which rank.
    pub chunk: Chunk,
    /// The token ids at positions `chunk.start..chunk.start + chunk.len`.
    pub tokens: &'a [TokenId],
}

/// KV usage of one rank, in blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankKv {
    /// The rank.
    pub rank: RankId,
    /// Blocks held by sequences.
    pub used_blocks: usize,
    /// Blocks the rank's pool holds in all.
    pub total_blocks: usize,
}

/// Why a runner could not compute a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RunError(pub String);

/// What the engine runs iterations on: the model on a set of ranks, and the KV cache of their
/// sequences.
pub trait Runner: Send + 'static {
    /// The model's vocabulary and context.
    fn limits(&self) -> RequestLimits;
    /// The most tokens one sequence may hold in KV on its own on the largest rank.
    fn kv_capacity_tokens(&self) -> usize;
    /// The ranks, in order.
    fn ranks(&self) -> Vec<RankId>;
    /// The KV cache as the scheduler sees it.
    fn ledger(&mut self) -> &mut dyn KvLedger;
    /// KV usage per rank.
    fn kv_usage(&self) -> Vec<RankKv>;
    /// Computes the work items (writing their KV) and returns the logits of the last position of
    /// every item whose chunk has `sample` set, in order.
    fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Vec<f32>>, RunError>;

    /// Like [`Runner::run`], but told what the engine needs of each sampled row: `needs` has one
    /// entry per item of `work` whose chunk has `sample` set, in order. A runner may answer a
    /// [`Need::GreedyToken`] row with [`RowOutput::Greedy`] (computed where the logits are, so
    /// they need not travel) and must answer a [`Need::Logits`] row with [`RowOutput::Logits`].
    ///
    /// The default runs [`Runner::run`] and returns every row's logits, which always satisfies
    /// both needs.
    fn run_sampled(
        &mut self,
        work: &[Work<'_>],
        needs: &[Need],
    ) -> Result<Vec<RowOutput>, RunError> {
        let _ = needs;
        Ok(self.run(work)?.into_iter().map(RowOutput::Logits).collect())
    }
}

/// What the engine needs of one sampled row (see [`Runner::run_sampled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Only the greedy token: a greedy request that asked for no logprobs.
    GreedyToken,
    /// The full logits: sampling at a temperature, or logprobs asked for.
    Logits,
}

impl Need {
    /// What a request with these sampling settings needs of each sampled row.
    pub fn of(sampling: &SamplingParams, logprobs: bool) -> Self {
        match sampling {
            SamplingParams::Greedy if !logprobs => Need::GreedyToken,
            _ => Need::Logits,
        }
    }
}

/// A runner's answer for one sampled row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutput {
    /// The row's full logits.
    Logits(Vec<f32>),
    /// The greedy token, chosen exactly as [`sampling::sample`] chooses it with
    /// [`SamplingParams::Greedy`]: the lowest id among the largest finite logits; `None` when no
    /// logit is finite (the engine then ends the request with
    /// [`SamplingError::NoFiniteLogits`]).
    Greedy(Option<TokenId>),
}

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineConfig {
    /// Batching limits.
    pub scheduler: SchedulerConfig,
    /// How long the run loop sleeps when idle before checking again (it also wakes on submit).
    pub idle_wait: Duration,
    /// Iterations over which tokens per second are averaged.
    pub throughput_window: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            idle_wait: Duration::from_millis(50),
            throughput_window: 64,
        }
    }
}

/// Why an engine operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The runner failed; the sequences of that batch were finished with an error.
    #[error("the iteration failed and its {failed} sequences were ended: {source}")]
    Run {
        /// The runner's error.
        source: RunError,
        /// Sequences ended.
        failed: usize,
    },
}

/// Engine-wide counters, updated after every iteration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineMetrics {
    /// Requests submitted but not yet admitted to a rank (intake plus scheduler queue).
    pub queue_depth: usize,
    /// Sequences admitted on a rank.
    pub running: usize,
    /// KV usage per rank.
    pub kv: Vec<RankKv>,
    /// Generated tokens per second over the recent iterations (busy time only).
    pub tokens_per_s: f64,
    /// Tokens generated since the start.
    pub generated_tokens: u64,
    /// Tokens computed in prefill (including recompute) since the start.
    pub prefill_tokens: u64,
    /// Preemptions since the start.
    pub preemptions: u64,
    /// Iterations run.
    pub iterations: u64,
    /// Requests finished (any reason).
    pub finished: u64,
    /// The last runner error, if any.
    pub last_error: Option<String>,
    /// Tokens computed (prefill plus decode rows given to the runner) since the start.
    pub computed_tokens: u64,
    /// Seconds spent inside the runner (`Runner::run_sampled`) since the start.
    pub runner_s: f64,
    /// Seconds spent in iterations (boundary actions, intake, scheduling, runner, sampling and
    /// streaming) since the start; `iteration_s - runner_s` is the engine's own host time.
    pub iteration_s: f64,
}

impl EngineMetrics {
    /// Fraction of all KV blocks in use.
    pub fn kv_utilisation(&self) -> f64 {
        let total: usize = self.kv.iter().map(|r| r.total_blocks).sum();
        let used: usize = self.kv.iter().map(|r| r.used_blocks).sum();
        if total == 0 {
            0.0
        } else {
            used as f64 / total as f64
        }
    }
}

/// What one iteration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Sequence chunks computed.
    pub chunks: usize,
    /// Tokens computed (prefill plus decode).
    pub tokens: usize,
    /// Tokens generated.
    pub generated: usize,
    /// Requests finished.
    pub finished: usize,
    /// Sequences preempted.
    pub preempted: usize,
    /// Boundary actions applied before the iteration.
    pub boundary_actions: usize,
    /// Requests scheduled on a rank for the first time.
    pub admitted: usize,
}

impl StepReport {
    /// Whether the iteration did nothing at all.
    pub fn is_idle(&self) -> bool {
        self.chunks == 0 && self.finished == 0 && self.boundary_actions == 0
    }
}

/// An action run between two iterations with the runner and the scheduler.
pub type BoundaryAction<R> = Box<dyn FnOnce(&mut R, &mut Scheduler) + Send>;

/// One iteration that did something, with engine-side timestamps, as the iteration observer
/// sees it ([`Engine::set_iteration_observer`]). Benchmarks read iteration gaps, stalls and
/// admissions from these instead of polling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IterationRecord {
    /// When the iteration began, before its boundary actions.
    pub started: Instant,
    /// When it ended: its tokens were streamed and its metrics published.
    pub ended: Instant,
    /// What it did.
    pub tokens: usize,
    /// Tokens generated (one per sampled sequence).
    pub generated: usize,
    /// Requests scheduled on a rank for the first time.
    pub admitted: usize,
    /// Boundary actions applied before it (a switch is one).
    pub boundary_actions: usize,
    /// Ranks serving after it (the runner's KV usage entries).
    pub ranks: usize,
}

/// A callback run after every iteration that did something (see
/// [`Engine::set_iteration_observer`]).
pub type IterationObserver = Arc<dyn Fn(&IterationRecord) + Send + Sync>;

/// A submitted request's stream of events.
///
/// Dropping the handle before the request finishes cancels it.
#[derive(Debug)]
pub struct RequestHandle {
    id: RequestId,
    submitted: Instant,
    rx: Receiver<Event>,
    intake: Weak<Intake>,
    done: bool,
}

impl RequestHandle {
    /// The request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// When the engine accepted the request: the instant every duration in its events
    /// ([`TokenEvent::at`], [`RequestTimings`]) counts from.
    pub fn submitted_at(&self) -> Instant {
        self.submitted
    }

    /// Waits for the next event. `None` once the request has finished (or the engine is gone).
    pub fn recv(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        match self.rx.recv() {
            Ok(e) => Some(self.note(e)),
            Err(_) => self.engine_gone(),
        }
    }

    /// Like [`RequestHandle::recv`], giving up after `timeout` (then `Ok(None)` means "nothing yet").
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Event> {
        if self.done {
            return None;
        }
        match self.rx.recv_timeout(timeout) {
            Ok(e) => Some(self.note(e)),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => self.engine_gone(),
        }
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        match self.rx.try_recv() {
            Ok(e) => Some(self.note(e)),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => self.engine_gone(),
        }
    }

    /// Whether the finish event has been received.
    pub fn is_finished(&self) -> bool {
        self.done
    }

    /// Asks the engine to cancel this request (takes effect at the next iteration boundary; a
    /// `Finished { reason: Cancelled }` event follows unless it finished first).
    pub fn cancel(&self) {
        if let Some(intake) = self.intake.upgrade() {
            intake.cancel(self.id);
        }
    }

    /// Blocks until the request finishes and gathers its stream.
    pub fn wait(mut self) -> Completion {
        let mut tokens = Vec::new();
        let mut logprobs = Vec::new();
        while let Some(e) = self.recv() {
            match e {
                Event::Token(t) => {
                    tokens.push(t.token);
                    logprobs.extend(t.logprob);
                }
                Event::Finished { reason, timings } => {
                    return Completion {
                        id: self.id,
                        tokens,
                        logprobs,
                        finish: reason,
                        timings,
                    };
                }
            }
        }
        Completion {
            id: self.id,
            tokens,
            logprobs,
            finish: FinishReason::Error("the engine stopped before the request finished".into()),
            timings: RequestTimings::default(),
        }
    }

    fn note(&mut self, e: Event) -> Event {
        if matches!(e, Event::Finished { .. }) {
            self.done = true;
        }
        e
    }

    fn engine_gone(&mut self) -> Option<Event> {
        self.done = true;
        Some(Event::Finished {
            reason: FinishReason::Error("the engine stopped before the request finished".into()),
            timings: RequestTimings::default(),
        })
    }
}

impl Iterator for RequestHandle {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.recv()
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        if !self.done {
            self.cancel();
        }
    }
}

/// A request the engine is serving.
struct Live {
    request: Request,
    /// Prompt followed by generated tokens.
    tokens: Vec<TokenId>,
    generated: usize,
    tx: Sender<Event>,
    submitted: Instant,
    timings: RequestTimings,
}

/// The iteration state, behind one lock that only the iteration takes.
struct Core<R> {
    runner: R,
    scheduler: Scheduler,
    live: BTreeMap<RequestId, Live>,
    metrics: EngineMetrics,
    window: VecDeque<(usize, Duration)>,
}

struct Shared<R> {
    intake: Arc<Intake>,
    core: Handoff<Core<R>>,
    actions: Mutex<Vec<BoundaryAction<R>>>,
    metrics: Mutex<EngineMetrics>,
    observer: Mutex<Option<IterationObserver>>,
    next_id: AtomicU64,
    config: EngineConfig,
}

/// The serving engine. Cheap to clone (all clones drive the same engine).
pub struct Engine<R: Runner> {
    shared: Arc<Shared<R>>,
}

impl<R: Runner> Clone for Engine<R> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<R: Runner> std::fmt::Debug for Engine<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("metrics", &self.metrics())
            .finish_non_exhaustive()
    }
}

impl<R: Runner> Engine<R> {
    /// An engine over `runner`.
    pub fn new(runner: R, config: EngineConfig) -> Self {
        let limits = runner.limits();
        let capacity_tokens = runner.kv_capacity_tokens();
        let scheduler = Scheduler::new(config.scheduler, runner.ranks());
        let metrics = EngineMetrics {
            kv: runner.kv_usage(),
            ..EngineMetrics::default()
        };
        let intake = Intake::new(limits, capacity_tokens);
        Self {
            shared: Arc::new(Shared {
                intake: Arc::new(intake),
                core: Handoff::new(Core {
                    runner,
                    scheduler,
                    live: BTreeMap::new(),
                    metrics: metrics.clone(),
                    window: VecDeque::new(),
                }),
                actions: Mutex::new(Vec::new()),
                metrics: Mutex::new(metrics),
                observer: Mutex::new(None),
                next_id: AtomicU64::new(0),
                config,
            }),
        }
    }

    /// Validates and queues a request. Never waits for the iteration in progress.
    pub fn submit(&self, request: Request) -> Result<RequestHandle, RequestError> {
        let intake = &self.shared.intake;
        let mut st = intake.lock();
        if st.stopped {
            return Err(RequestError::EngineStopped);
        }
        request.validate(&st.limits)?;
        let needed = (request.prompt.len() + request.max_tokens).min(st.limits.max_context);
        if needed > st.capacity_tokens {
            return Err(RequestError::ExceedsKvCapacity {
                needed_tokens: needed,
                capacity_tokens: st.capacity_tokens,
            });
        }
        let id = RequestId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = crossbeam_channel::unbounded();
        let at = Instant::now();
        st.new.push(Submitted {
            id,
            request,
            tx,
            at,
        });
        drop(st);
        intake.notify();
        Ok(RequestHandle {
            id,
            submitted: at,
            rx,
            intake: Arc::downgrade(&self.shared.intake),
            done: false,
        })
    }

    /// Cancels a request at the next iteration boundary, freeing its KV blocks. Unknown or finished
    /// ids are ignored.
    pub fn cancel(&self, id: RequestId) {
        self.shared.intake.cancel(id);
    }

    /// Queues an action to run between two iterations, with exclusive access to the runner and the
    /// scheduler (the scaler swaps deployments and moves sequences this way).
    pub fn at_boundary(&self, action: impl FnOnce(&mut R, &mut Scheduler) + Send + 'static) {
        lock(&self.shared.actions).push(Box::new(action));
        self.shared.intake.poke();
    }

    /// Calls `observer` on the run loop's thread after every iteration that did something
    /// (computed a chunk, finished a request or applied a boundary action), with its
    /// engine-side timestamps; `None` removes it. The observer runs outside the iteration's
    /// lock but on the serving thread, so it must be quick (push to a channel or a vector).
    pub fn set_iteration_observer(&self, observer: Option<IterationObserver>) {
        *lock(&self.shared.observer) = observer;
    }

    /// A snapshot of the metrics as of the last iteration.
    pub fn metrics(&self) -> EngineMetrics {
        let mut m = lock(&self.shared.metrics).clone();
        m.queue_depth += self.shared.intake.lock().new.len();
        m
    }

    /// Runs `f` on the runner between iterations (for inspection; it waits for the iteration in
    /// progress, and a busy run loop lets it in before its next iteration).
    pub fn with_runner<T>(&self, f: impl FnOnce(&R) -> T) -> T {
        f(&self.shared.core.lock_first().runner)
    }

    /// Stops taking requests. Running ones continue while iterations run.
    pub fn close(&self) {
        self.shared.intake.update(|st| st.stopped = true);
    }

    /// Whether nothing is queued, running, or waiting to be applied.
    pub fn is_idle(&self) -> bool {
        if self.shared.intake.has_work() {
            return false;
        }
        let no_actions = lock(&self.shared.actions).is_empty();
        no_actions && self.shared.core.lock_first().scheduler.is_idle()
    }

    /// Runs one iteration.
    pub fn step(&self) -> Result<StepReport, EngineError> {
        let mut core = self.shared.core.lock_after_others();
        let t_step = Instant::now();
        let mut report = StepReport::default();
        let actions = std::mem::take(&mut *lock(&self.shared.actions));
        report.boundary_actions = actions.len();
        for action in actions {
            let Core {
                runner, scheduler, ..
            } = &mut *core;
            action(runner, scheduler);
        }
        let (new, cancels) = {
            let mut st = self.shared.intake.lock();
            if report.boundary_actions > 0 {
                st.capacity_tokens = core.runner.kv_capacity_tokens();
                st.limits = core.runner.limits();
            }
            Intake::take(&mut st)
        };
        let result = core.iterate(
            new,
            cancels,
            &mut report,
            self.shared.config.throughput_window,
        );
        core.metrics.iteration_s += t_step.elapsed().as_secs_f64();
        *lock(&self.shared.metrics) = core.metrics.clone();
        let ranks = core.metrics.kv.len();
        drop(core);
        if !report.is_idle() {
            let observer = lock(&self.shared.observer).clone();
            if let Some(observe) = observer {
                observe(&IterationRecord {
                    started: t_step,
                    ended: Instant::now(),
                    tokens: report.tokens,
                    generated: report.generated,
                    admitted: report.admitted,
                    boundary_actions: report.boundary_actions,
                    ranks,
                });
            }
        }
        result.map(|()| report)
    }

    /// Runs a test-style loop on the calling thread until nothing is queued or running (at most
    /// `max_iterations`). Returns the number of iterations run.
    pub fn run_until_idle(&self, max_iterations: usize) -> Result<usize, EngineError> {
        let mut n = 0;
        while n < max_iterations && !self.is_idle() {
            self.step()?;
            n += 1;
        }
        Ok(n)
    }

    /// Starts the run loop on its own thread.
    pub fn start(&self) -> RunLoop {
        let engine = self.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("moe-engine".into())
            .spawn(move || engine.run_loop(&flag))
            .expect("spawning the engine thread");
        RunLoop {
            stop,
            thread: Some(thread),
            wake: Arc::downgrade(&self.shared.intake),
        }
    }

    fn run_loop(&self, stop: &AtomicBool) {
        while !stop.load(Ordering::Acquire) {
            // A runner error ends that batch's sequences and is kept in the metrics; serving goes on.
            let idle = self.step().is_ok_and(|r| r.is_idle());
            if idle {
                self.shared
                    .intake
                    .wait_for_work(stop, self.shared.config.idle_wait);
            }
        }
    }
}

/// The run loop's thread; stopping it (or dropping this) ends the loop after its current iteration.
#[derive(Debug)]
pub struct RunLoop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    wake: Weak<Intake>,
}

impl RunLoop {
    /// Stops the loop and waits for its thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(intake) = self.wake.upgrade() {
            intake.wake_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunLoop {
    fn drop(&mut self) {
        self.halt();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<R: Runner> Core<R> {
    fn iterate(
        &mut self,
        new: Vec<Submitted>,
        cancels: Vec<RequestId>,
        report: &mut StepReport,
        window: usize,
    ) -> Result<(), EngineError> {
        let started = Instant::now();
        for s in new {
            let prompt_len = s.request.prompt.len();
            if self.scheduler.add(s.id, prompt_len).is_err() {
                continue;
            }
            self.live.insert(
                s.id,
                Live {
                    tokens: s.request.prompt.clone(),
                    request: s.request,
                    generated: 0,
                    tx: s.tx,
                    submitted: s.at,
                    timings: RequestTimings::default(),
                },
            );
        }
        for id in cancels {
            if self.live.contains_key(&id) {
                self.finish(id, FinishReason::Cancelled);
                report.finished += 1;
            }
        }

        let plan = self.scheduler.schedule(self.runner.ledger());
        for c in &plan.chunks {
            if let Some(l) = self.live.get_mut(&c.seq) {
                if l.timings.admitted.is_none() {
                    l.timings.admitted = Some(started.saturating_duration_since(l.submitted));
                    report.admitted += 1;
                }
            }
        }
        report.preempted = plan.preempted.len();
        for &id in &plan.preempted {
            if let Some(l) = self.live.get_mut(&id) {
                l.timings.preemptions += 1;
            }
        }
        for &id in &plan.exhausted {
            // The scheduler already forgot it and released its KV.
            if let Some(l) = self.live.remove(&id) {
                report.finished += 1;
                self.metrics.finished += 1;
                Self::send_finish(l, FinishReason::KvExhausted);
            }
        }
        report.chunks = plan.chunks.len();
        report.tokens = plan.tokens();
        let prefill: usize = plan
            .chunks
            .iter()
            .filter(|c| c.len > 1 || !c.sample)
            .map(|c| c.len)
            .sum();

        let mut run_error = None;
        if !plan.chunks.is_empty() {
            let work: Vec<Work<'_>> = plan
                .chunks
                .iter()
                .map(|&chunk| Work {
                    chunk,
                    tokens: &self.live[&chunk.seq].tokens[chunk.start..chunk.start + chunk.len],
                })
                .collect();
            let samples: Vec<(RequestId, Need)> = plan
                .chunks
                .iter()
                .filter(|c| c.sample)
                .map(|c| {
                    let r = &self.live[&c.seq].request;
                    (
                        c.seq,
                        Need::of(&r.sampling, r.logprobs || r.top_logprobs > 0),
                    )
                })
                .collect();
            let needs: Vec<Need> = samples.iter().map(|s| s.1).collect();
            let t_run = Instant::now();
            let ran = self.runner.run_sampled(&work, &needs);
            self.metrics.runner_s += t_run.elapsed().as_secs_f64();
            match ran {
                Ok(rows) => {
                    if rows.len() == samples.len() {
                        for ((id, need), row) in samples.into_iter().zip(rows) {
                            let (generated, finished) = self.advance(id, need, row);
                            report.generated += generated;
                            report.finished += usize::from(finished);
                        }
                    } else {
                        run_error = Some(RunError(format!(
                            "the runner returned {} rows for {} sampled sequences",
                            rows.len(),
                            samples.len()
                        )));
                    }
                }
                Err(e) => run_error = Some(e),
            }
        }
        let result = match run_error {
            None => Ok(()),
            Some(source) => {
                let ids: Vec<RequestId> = plan.chunks.iter().map(|c| c.seq).collect();
                for &id in &ids {
                    self.finish(id, FinishReason::Error(source.0.clone()));
                }
                report.finished += ids.len();
                self.metrics.last_error = Some(source.0.clone());
                Err(EngineError::Run {
                    source,
                    failed: ids.len(),
                })
            }
        };

        // Metrics.
        let m = &mut self.metrics;
        m.iterations += 1;
        m.prefill_tokens += prefill as u64;
        m.generated_tokens += report.generated as u64;
        m.computed_tokens += report.tokens as u64;
        let stats = self.scheduler.stats();
        m.queue_depth = stats.waiting;
        m.running = stats.running;
        m.preemptions = stats.preemptions;
        m.kv = self.runner.kv_usage();
        if report.chunks > 0 {
            self.window.push_back((report.generated, started.elapsed()));
            while self.window.len() > window.max(1) {
                self.window.pop_front();
            }
            let toks: usize = self.window.iter().map(|w| w.0).sum();
            let secs: f64 = self.window.iter().map(|w| w.1.as_secs_f64()).sum();
            m.tokens_per_s = if secs > 0.0 { toks as f64 / secs } else { 0.0 };
        }
        result
    }

    /// Samples the next token of `id` from the runner's answer for its row (`need` is what was
    /// asked of the runner), streams it and finishes the sequence if it is done. Returns
    /// `(tokens generated, finished)`.
    fn advance(&mut self, id: RequestId, need: Need, row: RowOutput) -> (usize, bool) {
        let limits = self.runner.limits();
        let max_context = limits.max_context;
        let Some(l) = self.live.get_mut(&id) else {
            return (0, false);
        };
        if let RowOutput::Greedy(Some(t)) = row {
            if t as usize >= limits.vocab_size {
                let e = format!(
                    "the runner chose token {t}, outside the vocabulary (size {})",
                    limits.vocab_size
                );
                self.finish(id, FinishReason::Error(e));
                return (0, true);
            }
        }
        let mut top = Vec::new();
        let sampled = match row {
            RowOutput::Logits(logits) => {
                top = sampling::top_logprobs(&logits, l.request.top_logprobs);
                sampling::sample(&logits, &l.request.sampling, l.generated)
            }
            // Only a greedy request without logprobs may be answered with a token; its logprob
            // is never streamed.
            RowOutput::Greedy(token) if need == Need::GreedyToken => token
                .map(|token| sampling::Sampled {
                    token,
                    logprob: f32::NAN,
                })
                .ok_or(SamplingError::NoFiniteLogits),
            RowOutput::Greedy(_) => {
                let e = "the runner answered a row that needs logits with a greedy token";
                self.finish(id, FinishReason::Error(e.into()));
                return (0, true);
            }
        };
        let sampled = match sampled {
            Ok(s) => s,
            Err(e) => {
                self.finish(id, FinishReason::Error(e.to_string()));
                return (0, true);
            }
        };
        let at = l.submitted.elapsed();
        let event = TokenEvent {
            index: l.generated,
            token: sampled.token,
            logprob: l.request.logprobs.then_some(sampled.logprob),
            top_logprobs: top,
            at,
        };
        l.tokens.push(sampled.token);
        l.generated += 1;
        l.timings.ttft.get_or_insert(at);
        l.timings.token_times.push(at);
        if l.tx.send(Event::Token(event)).is_err() {
            // The handle is gone: nobody wants the rest.
            self.finish(id, FinishReason::Cancelled);
            return (1, true);
        }
        let reason = if l.request.stop_tokens.contains(&sampled.token) {
            Some(FinishReason::Stop(sampled.token))
        } else if l.generated >= l.request.max_tokens {
            Some(FinishReason::Length)
        } else if l.tokens.len() >= max_context {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        match reason {
            Some(r) => {
                self.finish(id, r);
                (1, true)
            }
            None => {
                // The scheduler planned this chunk to its end, so it is ready for the token; if its
                // bookkeeping disagrees, end the sequence rather than run it on stale state.
                match self.scheduler.push_token(id) {
                    Ok(()) => (1, false),
                    Err(e) => {
                        self.finish(id, FinishReason::Error(e.to_string()));
                        (1, true)
                    }
                }
            }
        }
    }

    fn finish(&mut self, id: RequestId, reason: FinishReason) {
        self.scheduler.remove(id, self.runner.ledger());
        if let Some(l) = self.live.remove(&id) {
            self.metrics.finished += 1;
            Self::send_finish(l, reason);
        }
    }

    fn send_finish(mut l: Live, reason: FinishReason) {
        l.timings.total = l.submitted.elapsed();
        let _ = l.tx.send(Event::Finished {
            reason,
            timings: l.timings,
        });
    }
}

#[cfg(test)]
mod tests;
