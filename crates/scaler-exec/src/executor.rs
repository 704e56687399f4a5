//! The host executor: carries out a [`Transition`]'s actions on a live
//! `moe_engine::Engine`.
//!
//! [`HostExecutor::run`] drives one transition to its end on the calling thread while the
//! engine's own run loop ([`Engine::start`]) keeps serving and admitting on another. What each
//! action becomes on the host backend:
//!
//! | action | host implementation |
//! |---|---|
//! | `ComputePlan` | target [`Placement`] (`rebalanced_for` the running one, for the load the workers observed: tokens routed per expert per layer, `Deployment::routed_load`; uniform before any traffic; a fresh balanced one for a cold restart) and, per destination device, the weight chunks to copy from a healthy holder or reload from the checkpoint ([`HostPlan`]) |
//! | `AcquireWorkers` | device leases from the [`WarmPool`] ([`HostWorkers`]) |
//! | `StartCopies` | per destination, one batch through `p2p-xfer`'s [`HostTransport`] ([`WeightStore::copy_through`]: each chunk striped by the [`Planner`] over every device that holds it, as on GPUs; all or nothing), [`WeightStore::load`] for reloads; one `CopiesDone`/`CopiesFailed` per destination |
//! | `DiscardCopies` | releases every chunk the copies registered |
//! | `CloseRanks` / `ReopenRanks` / `FenceFailed` / `RequeueSequences` | scheduler changes at an iteration boundary ([`Engine::at_boundary`]) |
//! | `MigrateKv` | scale-down pre-copy: at a boundary, `DeploymentRunner::plan_precopy` lists the full KV blocks of every sequence on the (closed) leaving ranks; off the loop, `PrecopyPlan::copy` copies them into new KV sequences on staying ranks while those sequences keep decoding where they are; answered with the pre-copied sequences and bytes |
//! | `StopKvMigration` | drops the pre-copies, freeing their blocks on the staying ranks |
//! | `BuildDeployment` | [`Deployment::build`] beside the running deployment, reusing its KV pools, replicated views and unchanged expert ranges (zero-copy) |
//! | `RequestSwitch` | a pointer swap at the next iteration boundary (`DeploymentRunner::install_precopied`); sequences of leaving ranks move to their pre-copies and only the tail written since is copied there (a sequence without a valid pre-copy moves whole) |
//! | `RetireOld` / `ReleaseOldViews` | the old deployment is dropped through the `hbm-vmm` epoch after its last iteration; chunks no device needs any more are released |
//! | cold restart `StopOldDeployment` | a boundary action that re-queues every running sequence and holds the serving loop until a runner rebuilt from disk (a fresh store and fresh workers) replaces the old one |
//!
//! The colocated baseline (a second instance on old ∪ new devices) differs in these:
//!
//! | action | colocated |
//! |---|---|
//! | `ShrinkKvBudget` | at a boundary, `DeploymentRunner::set_kv_budget` limits the running instance's pools on the shared devices to half their chunks; where more blocks are in use, the youngest sequences of that rank are preempted (re-queued and recomputed, never dropped, counted in [`ScaleEvent::sequences_preempted`]); free chunks past the budget are unmapped. `RestoreKvBudget` lifts it (rollback) |
//! | `ComputePlan` | every chunk of the target placement is a copy, including those a device already holds for the running instance (a device-local duplicate, `ChunkSource::Peer` of the device itself): `bytes_zero_copy` is 0 |
//! | `StartCopies` | into a second [`WeightStore`] over the same devices ([`WeightStore::copy_through`] from the running store, a device's own copy included) |
//! | `BuildDeployment` | [`Deployment::build`] from that store with no `previous`: its own views and KV pools, within half the budget |
//! | `RequestSwitch` | `DeploymentRunner::install_instance` at a boundary: every running sequence's whole KV is copied into the new instance's pools (copied, not recomputed) and the old instance is dropped; the boundary holds the loop for that copy ([`ScaleEvent::switch_boundary_ms`]) |
//! | `ReleaseOldViews` / `DestroyKvPools` | the old store gives every chunk up; the new instance's KV budget is lifted |
//!
//! Reserving and mapping the next deployment's views happen inside [`Deployment::build`] (so
//! `ReserveNextViews`, `MapKeptExperts`, `MapMovedExperts` and `CreateKvPools` have no separate
//! host effect).
//!
//! Architecture invariant: the executor never blocks the serving loop in the elastic strategy;
//! everything slow (plan, copies, build) runs on the caller's thread. Only the cold-restart
//! baseline holds the loop, and that time is its measured downtime.
#![allow(clippy::module_name_repetitions)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use expert_placement::{ExpertLoad, Placement};
use hbm_vmm::DeviceId as HDev;
use moe_engine::{Engine, RankId, Request, RequestError, RequestHandle, Scheduler};
use moe_host::compute::cpu::CpuCompute;
use moe_host::deployment::{
    Deployment, DeploymentConfig, DeploymentError, PlacementKind, WeightKey, WeightStore,
};
use moe_host::model::Model;
use moe_host::worker::{DeploymentRunner, KvBudgetChange, KvPrecopy, RunnerConfig, SwapReport};
use moe_model::weights::TensorSource;
use p2p_xfer::{
    HostTransport, HostTransportConfig, LinkModel, LinkSpec, Planner, PlannerConfig, Transport,
};

use scaler::TransitionPlan;
use scaler::{millis, Time};
use scaler::{Action, Event, KvBudget, Step, WorkerSource};
use scaler::{DeviceId, DeviceSet};
use scaler::{Phase, TransitionReport};
use scaler::{SpecError, Transition, TransitionError, TransitionSpec};
use scaler::{Strategy, TransitionKind};
use scaler::{WarmPool, WarmPoolConfig, WorkerFactory};

fn hdev(d: DeviceId) -> HDev {
    HDev(d.0)
}

fn pdev(d: DeviceId) -> expert_placement::DeviceId {
    expert_placement::DeviceId(d.0)
}

fn ours(d: HDev) -> DeviceId {
    DeviceId(d.0)
}

/// The weight source of the checkpoint on disk (reloads and cold restarts read it).
pub type Checkpoint = Arc<dyn TensorSource + Send + Sync>;

/// Why the executor could not carry out a transition. The engine keeps serving in every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// The transition does not fit the running deployment.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The machine refused an event (a bug in the executor's ordering).
    #[error("the transition machine refused an event: {0}")]
    Machine(#[from] TransitionError),
    /// The transition names a device the host backend does not have.
    #[error("device {device} does not exist; the host backend has {available} devices")]
    NoSuchDevice {
        /// The device.
        device: DeviceId,
        /// Devices that exist.
        available: usize,
    },
    /// The spec's `from` is not the running deployment.
    #[error("the transition starts from {spec} but the engine serves on {running}")]
    NotRunning {
        /// What the spec says.
        spec: DeviceSet,
        /// What serves.
        running: DeviceSet,
    },
    /// The strategy cannot run on this executor.
    #[error("the {0} strategy is not implemented by the host executor")]
    Unsupported(Strategy),
    /// The engine did not reach an iteration boundary in time (it stopped, or an iteration hung).
    #[error(
        "the engine did not reach an iteration boundary within {0:?}; is its run loop started?"
    )]
    BoundaryTimeout(Duration),
    /// The machine waits for an event the executor cannot produce (a bug).
    #[error("the transition is stuck in phase {0:?} with no action to carry out")]
    Stuck(Phase),
}

/// Faults to inject, for tests of rollback.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Fail the copies into this device after its first chunk arrived.
    pub fail_copies_to: Option<DeviceId>,
    /// Fail building the next deployment.
    pub fail_build: bool,
}

/// Settings of a [`HostExecutor`].
#[derive(Clone, Copy, Debug)]
pub struct HostExecutorConfig {
    /// KV pools of new ranks (must match the running deployment's block size).
    pub deployment: DeploymentConfig,
    /// Idle workers kept warm.
    pub warm_pool_capacity: usize,
    /// The longest wait for an iteration boundary.
    pub boundary_timeout: Duration,
}

impl Default for HostExecutorConfig {
    fn default() -> Self {
        Self {
            deployment: DeploymentConfig::default(),
            warm_pool_capacity: 8,
            boundary_timeout: Duration::from_secs(60),
        }
    }
}

/// A host device's pre-initialised worker: the device checked against the backend, its
/// allocation granularity known. (The runtime starts the compute thread itself when the device
/// joins a deployment; on host that costs microseconds.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostWorker {
    /// The device.
    pub device: DeviceId,
    /// Its allocation granularity in bytes.
    pub granularity: usize,
}

/// Why a host worker could not be initialised.
#[derive(Debug, thiserror::Error)]
#[error("host device {device} cannot get a worker: {message}")]
pub struct HostWorkerError {
    /// The device.
    pub device: DeviceId,
    /// Why.
    pub message: String,
}

/// Makes [`HostWorker`]s over a weight store's backend.
#[derive(Debug)]
pub struct HostWorkers {
    store: Mutex<Arc<WeightStore>>,
}

impl WorkerFactory for HostWorkers {
    type Worker = HostWorker;
    type Error = HostWorkerError;
    fn init(&self, device: DeviceId) -> Result<HostWorker, HostWorkerError> {
        let store = Arc::clone(&lock(&self.store));
        let granularity = store
            .vmm()
            .granularity(hdev(device))
            .map_err(|e| HostWorkerError {
                device,
                message: e.to_string(),
            })?;
        Ok(HostWorker {
            device,
            granularity,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where a chunk of the next deployment comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkSource {
    /// Copied from the same chunk on another device.
    Peer(DeviceId),
    /// Read from the checkpoint.
    Checkpoint,
}

/// The host plan: the target placement and, per destination device, the chunks it receives.
#[derive(Clone, Debug)]
pub struct HostPlan {
    /// The next placement.
    pub placement: Placement,
    /// Per destination: `(key on the destination, where from, bytes)`.
    pub copies: BTreeMap<DeviceId, Vec<(WeightKey, ChunkSource, u64)>>,
    /// Bytes of chunks the next deployment maps where they are.
    pub zero_copy: u64,
}

impl TransitionPlan for HostPlan {
    fn copy_destinations(&self) -> DeviceSet {
        self.copies
            .iter()
            .filter(|(_, c)| !c.is_empty())
            .map(|(&d, _)| d)
            .collect()
    }
    fn bytes_moved(&self) -> u64 {
        self.copies
            .values()
            .flatten()
            .filter(|c| matches!(c.1, ChunkSource::Peer(_)))
            .map(|c| c.2)
            .sum()
    }
    fn bytes_zero_copy(&self) -> u64 {
        self.zero_copy
    }
    fn bytes_reloaded(&self) -> u64 {
        self.copies
            .values()
            .flatten()
            .filter(|c| c.1 == ChunkSource::Checkpoint)
            .map(|c| c.2)
            .sum()
    }
}

/// Pauses request intake (only the cold-restart baseline does). Submitters wait while it is
/// paused; nothing is dropped.
#[derive(Debug, Default)]
pub struct IntakeGate {
    paused: Mutex<bool>,
    resumed: Condvar,
}

impl IntakeGate {
    /// Submits `request` to `engine`, waiting first while intake is paused.
    pub fn submit(
        &self,
        engine: &Engine<DeploymentRunner>,
        request: Request,
    ) -> Result<RequestHandle, RequestError> {
        let mut paused = lock(&self.paused);
        while *paused {
            paused = self
                .resumed
                .wait(paused)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        drop(paused);
        engine.submit(request)
    }

    /// Whether intake is paused.
    pub fn is_paused(&self) -> bool {
        *lock(&self.paused)
    }

    fn set(&self, paused: bool) {
        *lock(&self.paused) = paused;
        if !paused {
            self.resumed.notify_all();
        }
    }
}

/// What one transition did, measured: the machine's report plus what only the executor sees.
#[derive(Clone, Debug)]
pub struct ScaleEvent {
    /// The machine's report (phases on the executor's clock, bytes, sequences).
    pub report: TransitionReport,
    /// How long the serving loop was stopped (only the cold restart stops it).
    pub downtime_ms: f64,
    /// How long the switch's boundary action held the serving loop (the pointer swap, plus
    /// the KV copies made there: the tails after a pre-copy, or every running sequence's whole
    /// KV for the colocated and extravagant baselines). The loop is not stopped, so this is not
    /// counted as downtime; the next iteration starts this much later.
    pub switch_boundary_ms: f64,
    /// The highest bytes each involved device held during the transition (weights and KV).
    pub peak_bytes_per_device: BTreeMap<DeviceId, u64>,
    /// What the runtime's swap did, if it switched.
    pub swap: Option<SwapReport>,
    /// Warm-pool hits among the workers taken.
    pub warm_workers: usize,
    /// Scale-down: KV bytes of sequences on leaving ranks pre-copied during Prepare while they
    /// kept decoding.
    pub kv_bytes_precopied: u64,
    /// KV bytes copied inside the switch's boundary action: for an elastic scale-down only the
    /// tails written since the pre-copy; for the colocated and extravagant baselines every
    /// running sequence's whole KV.
    pub kv_bytes_at_switch: u64,
    /// Colocated: the running instance's KV budgets halved before Prepare, per device.
    pub kv_budget: Vec<KvBudgetChange>,
    /// Sequences preempted (re-queued and recomputed, never lost) by this transition: to fit a
    /// halved KV budget, or at the switch when their KV did not fit the next instance.
    pub sequences_preempted: u64,
    /// Devices serving when it ended.
    pub devices_after: DeviceSet,
}

impl ScaleEvent {
    /// Whether it completed (rather than rolled back).
    pub fn completed(&self) -> bool {
        self.report.phase == Phase::Retired
    }
}

/// Executor state for one transition.
struct Ctx {
    plan: Option<Arc<HostPlan>>,
    copied: Vec<WeightKey>,
    workers: BTreeMap<DeviceId, HostWorker>,
    warm: usize,
    next: Option<Arc<Deployment>>,
    swap: Option<SwapReport>,
    switch_boundary: Duration,
    downtime: Duration,
    /// Cold restart: the store the new runner is built on, and the link to the held loop.
    cold_store: Option<Arc<WeightStore>>,
    cold_resume: Option<Sender<Option<DeploymentRunner>>>,
    cold_done: Option<Receiver<u64>>,
    cold_stopped_at: Option<Instant>,
    deferred_requeue: bool,
    /// Colocated: the new instance's own weight store (over the same devices).
    colo_store: Option<Arc<WeightStore>>,
    /// Scale-down: KV pre-copied to staying ranks during Prepare.
    precopy: Option<KvPrecopy>,
    kv_precopied: u64,
    kv_budget: Vec<KvBudgetChange>,
    preempted: u64,
    switched: bool,
    /// The store and deployment serving when the transition started.
    store: Arc<WeightStore>,
    cur: Arc<Deployment>,
}

/// Carries out transitions on a live engine. See the [module docs](self).
pub struct HostExecutor {
    /// Peer copies between host devices (`p2p-xfer`), over the memory of the store serving now
    /// (a cold restart's fresh store gets a fresh transport).
    transport: Mutex<Option<Arc<HostTransport>>>,
    /// Stripes each copy over the devices that hold its bytes.
    planner: Planner,
    engine: Engine<DeploymentRunner>,
    checkpoint: Checkpoint,
    config: HostExecutorConfig,
    pool: WarmPool<HostWorkers>,
    gate: Arc<IntakeGate>,
    faults: Faults,
    epoch: Instant,
}

impl std::fmt::Debug for HostExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostExecutor")
            .field("pool", &self.pool)
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

impl HostExecutor {
    /// An executor for `engine`, reading reloads from `checkpoint`.
    pub fn new(
        engine: Engine<DeploymentRunner>,
        checkpoint: Checkpoint,
        config: HostExecutorConfig,
    ) -> Self {
        let store = engine.with_runner(|r| Arc::clone(r.store()));
        let pool = WarmPool::new(
            HostWorkers {
                store: Mutex::new(store),
            },
            WarmPoolConfig {
                capacity: config.warm_pool_capacity,
            },
        );
        Self {
            transport: Mutex::new(None),
            // Host devices share one memory: every link is alike, so a uniform model only
            // steers the striping (its bandwidth is never used as a clock).
            planner: Planner::new(
                LinkModel::uniform(LinkSpec::gbps(10.0, 0.0)),
                PlannerConfig::default(),
            )
            .expect("the default planner settings are valid"),
            engine,
            checkpoint,
            config,
            pool,
            gate: Arc::new(IntakeGate::default()),
            faults: Faults::default(),
            epoch: Instant::now(),
        }
    }

    /// The transport over `store`'s memory (made on first use, and again when the store's
    /// memory manager changed).
    fn transport(&self, store: &WeightStore) -> Arc<HostTransport> {
        let mut t = lock(&self.transport);
        match t.as_ref() {
            Some(x) if x.vmm().same(store.vmm()) => Arc::clone(x),
            _ => {
                let x = Arc::new(HostTransport::new(
                    store.vmm().clone(),
                    HostTransportConfig::default(),
                ));
                *t = Some(Arc::clone(&x));
                x
            }
        }
    }

    /// Per-link counters of the peer copies made so far (weights copied between devices go
    /// through `p2p-xfer`'s transport; empty before the first copy).
    pub fn link_stats(&self) -> Vec<p2p_xfer::LinkStats> {
        lock(&self.transport)
            .as_ref()
            .map(|t| t.stats())
            .unwrap_or_default()
    }

    /// The engine.
    pub fn engine(&self) -> &Engine<DeploymentRunner> {
        &self.engine
    }

    /// The intake gate submitters should go through (it only ever closes for a cold restart).
    pub fn gate(&self) -> &Arc<IntakeGate> {
        &self.gate
    }

    /// The warm pool.
    pub fn warm_pool(&self) -> &WarmPool<HostWorkers> {
        &self.pool
    }

    /// Pre-initialises workers for `devices`.
    pub fn prewarm(&self, devices: &DeviceSet) -> usize {
        let ids: Vec<DeviceId> = devices.iter().collect();
        self.pool.prewarm(&ids).unwrap_or(0)
    }

    /// Faults to inject into the next transitions.
    pub fn set_faults(&mut self, faults: Faults) {
        self.faults = faults;
    }

    /// The devices serving now.
    pub fn devices(&self) -> DeviceSet {
        self.engine
            .with_runner(|r| r.deployment().devices().into_iter().map(ours).collect())
    }

    /// Devices of the host backend.
    pub fn device_count(&self) -> usize {
        self.store().vmm().device_count()
    }

    fn store(&self) -> Arc<WeightStore> {
        self.engine.with_runner(|r| Arc::clone(r.store()))
    }

    fn now(&self) -> Time {
        Time::from_duration(self.epoch.elapsed())
    }

    /// Runs one transition to its end (retired or rolled back) while the engine serves.
    pub fn run(&mut self, spec: TransitionSpec) -> Result<ScaleEvent, ExecError> {
        spec.validate()?;
        let running = self.devices();
        if spec.from != running {
            return Err(ExecError::NotRunning {
                spec: spec.from,
                running,
            });
        }
        let available = self.device_count();
        if let Some(device) = spec.to.iter().find(|d| d.0 as usize >= available) {
            return Err(ExecError::NoSuchDevice { device, available });
        }
        let involved = spec.from.union(&spec.to);
        let store = self.store();
        for d in involved.iter() {
            store.vmm().reset_peak(hdev(d));
        }
        let mut t = Transition::<HostPlan>::new(spec.clone(), self.now())?;
        let (store, cur) = self
            .engine
            .with_runner(|r| (Arc::clone(r.store()), Arc::clone(r.deployment())));
        let mut ctx = Ctx {
            plan: None,
            copied: Vec::new(),
            workers: BTreeMap::new(),
            warm: 0,
            next: None,
            swap: None,
            switch_boundary: Duration::ZERO,
            downtime: Duration::ZERO,
            cold_store: None,
            cold_resume: None,
            cold_done: None,
            cold_stopped_at: None,
            deferred_requeue: false,
            colo_store: None,
            precopy: None,
            kv_precopied: 0,
            kv_budget: Vec::new(),
            preempted: 0,
            switched: false,
            store,
            cur,
        };
        let mut events: Vec<Event<HostPlan>> = Vec::new();
        loop {
            while let Some(action) = t.poll_action() {
                self.act(&t, action, &mut ctx, &mut events);
            }
            if events.is_empty() {
                break;
            }
            for e in events.drain(..) {
                match t.handle(e, self.now()) {
                    Ok(()) => {}
                    // Answers after an abort are dropped (see the executor contract).
                    Err(TransitionError::Finished { .. }) => {}
                    Err(err) => return Err(err.into()),
                }
            }
        }
        if !t.is_finished() {
            return Err(ExecError::Stuck(t.phase()));
        }
        let store = self.store();
        let mut peak: BTreeMap<DeviceId, u64> = BTreeMap::new();
        for d in involved.iter() {
            let mut p = store.vmm().peak(hdev(d)) as u64;
            if let Some(cold) = &ctx.cold_store {
                p = p.max(cold.vmm().peak(hdev(d)) as u64);
            }
            peak.insert(d, p);
        }
        let swap = ctx.swap.take();
        Ok(ScaleEvent {
            report: t.report(),
            downtime_ms: millis(ctx.downtime),
            switch_boundary_ms: millis(ctx.switch_boundary),
            peak_bytes_per_device: peak,
            kv_bytes_precopied: ctx.kv_precopied,
            kv_bytes_at_switch: swap.as_ref().map_or(0, |s| s.kv_bytes as u64),
            kv_budget: std::mem::take(&mut ctx.kv_budget),
            sequences_preempted: ctx.preempted
                + swap.as_ref().map_or(0, |s| s.requeued.len() as u64),
            swap,
            warm_workers: ctx.warm,
            devices_after: self.devices(),
        })
    }

    /// Runs `f` at the next iteration boundary and waits for its answer.
    fn at_boundary<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut DeploymentRunner, &mut Scheduler) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = bounded(1);
        self.engine.at_boundary(move |r, s| {
            let _ = tx.send(f(r, s));
        });
        rx.recv_timeout(self.config.boundary_timeout).ok()
    }

    fn act(
        &mut self,
        t: &Transition<HostPlan>,
        action: Action<HostPlan>,
        ctx: &mut Ctx,
        events: &mut Vec<Event<HostPlan>>,
    ) {
        let spec = t.spec().clone();
        match action {
            Action::ComputePlan {
                kind,
                strategy,
                from,
                to,
            } => match self.plan(ctx, &kind, strategy, &from, &to) {
                Ok(plan) => {
                    let plan = Arc::new(plan);
                    ctx.plan = Some(Arc::clone(&plan));
                    events.push(Event::PlanReady(Arc::unwrap_or_clone(plan)));
                }
                Err(e) => events.push(Event::PlanFailed {
                    reason: e.to_string(),
                }),
            },
            Action::FenceFailed { devices } => {
                let ranks = ranks_of(&devices);
                let _ = self.at_boundary(move |_, s| {
                    for r in ranks {
                        let _ = s.close_rank(r);
                    }
                });
            }
            Action::RequeueSequences { devices } => {
                if spec.strategy == Strategy::ColdRestart && !spec.kind.failed().eq(&devices) {
                    // Done by the stop below, in the same boundary action.
                    ctx.deferred_requeue = true;
                } else {
                    let ranks = ranks_of(&devices);
                    let count = self
                        .at_boundary(move |r, s| requeue_all(r, s, &ranks))
                        .unwrap_or(0);
                    events.push(Event::SequencesRequeued { count });
                }
            }
            Action::PauseIntake => self.gate.set(true),
            Action::ResumeIntake => self.gate.set(false),
            Action::StopOldDeployment { devices } => {
                let ranks = ranks_of(&devices);
                let (ack_tx, ack_rx) = bounded(1);
                let (resume_tx, resume_rx) = bounded::<Option<DeploymentRunner>>(1);
                let (done_tx, done_rx) = bounded(1);
                self.engine.at_boundary(move |r, s| {
                    let n = requeue_all(r, s, &ranks);
                    let _ = ack_tx.send(n);
                    // The serving loop is down until a rebuilt runner (or none: roll back) comes.
                    if let Ok(Some(next)) = resume_rx.recv() {
                        let old: BTreeSet<RankId> = s.ranks().map(|(r, _)| r).collect();
                        let new: BTreeSet<RankId> = next
                            .deployment()
                            .ranks()
                            .iter()
                            .map(moe_host::deployment::Rank::id)
                            .collect();
                        for &rank in old.difference(&new) {
                            s.remove_rank(rank, r);
                        }
                        for &rank in &new {
                            s.add_rank(rank);
                        }
                        *r = next;
                    } else {
                        for rank in ranks {
                            s.add_rank(rank);
                        }
                    }
                    let _ = done_tx.send(r.deployment().generation());
                });
                let count = ack_rx
                    .recv_timeout(self.config.boundary_timeout)
                    .unwrap_or(0);
                ctx.cold_stopped_at = Some(Instant::now());
                ctx.cold_resume = Some(resume_tx);
                ctx.cold_done = Some(done_rx);
                if ctx.deferred_requeue {
                    ctx.deferred_requeue = false;
                    events.push(Event::SequencesRequeued { count });
                }
            }
            Action::RestartOldDeployment { .. } => {
                if let Some(tx) = ctx.cold_resume.take() {
                    let _ = tx.send(None);
                }
                if let Some(rx) = ctx.cold_done.take() {
                    let _ = rx.recv_timeout(self.config.boundary_timeout);
                }
                if let Some(at) = ctx.cold_stopped_at.take() {
                    ctx.downtime += at.elapsed();
                }
            }
            Action::AcquireWorkers { devices, source } => {
                let mut failed = None;
                for d in devices.iter() {
                    let got = match source {
                        WorkerSource::WarmPool => self
                            .pool
                            .take(d)
                            .map(|t| {
                                ctx.warm += usize::from(t.warm);
                                t.worker
                            })
                            .map_err(|e| e.to_string()),
                        WorkerSource::Cold => {
                            self.pool.factory().init(d).map_err(|e| e.to_string())
                        }
                    };
                    match got {
                        Ok(w) => {
                            ctx.workers.insert(d, w);
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if let Some(reason) = failed {
                    for (d, w) in std::mem::take(&mut ctx.workers) {
                        self.pool.give_back(d, w);
                    }
                    events.push(Event::StepFailed {
                        step: Step::AcquireWorkers,
                        reason,
                    });
                }
            }
            Action::ReleaseWorkers { devices } => {
                for d in devices.iter() {
                    // A device leaving a deployment: its worker goes back to the pool, warm.
                    let w = match ctx.workers.remove(&d) {
                        Some(w) => Some(w),
                        None => self.pool.factory().init(d).ok(),
                    };
                    if let Some(w) = w {
                        self.pool.give_back(d, w);
                    }
                }
            }
            Action::DiscardWorkers { devices } => {
                for d in devices.iter() {
                    ctx.workers.remove(&d);
                    self.pool.discard(d);
                }
            }
            // On host, the next views are reserved and mapped by `Deployment::build` (kept experts
            // zero-copy from their chunks, moved ones from the arrived chunks); KV pools of new
            // ranks are created there too, and dropped with the deployment.
            Action::ReserveNextViews { .. }
            | Action::ReleaseNextViews { .. }
            | Action::MapKeptExperts { .. }
            | Action::MapMovedExperts { .. }
            | Action::CreateKvPools { .. } => {}
            Action::DestroyKvPools { .. } => {
                // The old instance's pools went with it at the switch; before the switch, the
                // next instance's go with its deployment. Once the colocated baseline's old
                // instance is gone, the new one may use the whole device: its budget goes.
                if ctx.switched && spec.strategy == Strategy::Colocated {
                    let _ = self.at_boundary(|r, _| {
                        let devices = r.deployment().devices();
                        r.clear_kv_budget(&devices);
                    });
                }
            }
            Action::StopKvMigration => {
                // Dropping the pre-copies frees their blocks on the staying ranks.
                ctx.precopy = None;
            }
            Action::ShrinkKvBudget { devices, budget } => {
                let chunks = self.kv_budget_chunks(budget);
                let devs: Vec<HDev> = devices.iter().map(hdev).collect();
                let undo = devs.clone();
                match self.at_boundary(move |r, s| r.set_kv_budget(s, &devs, chunks)) {
                    Some(Ok(changes)) => {
                        ctx.preempted += changes
                            .iter()
                            .map(|c| c.preempted.len() as u64)
                            .sum::<u64>();
                        ctx.kv_budget = changes;
                    }
                    Some(Err(e)) => events.push(Event::StepFailed {
                        step: Step::ShrinkKvBudget,
                        reason: e.to_string(),
                    }),
                    None => {
                        // The budget may still be set when the engine reaches a boundary:
                        // queue its undo behind it (the step reports as undone).
                        self.engine
                            .at_boundary(move |r, _| r.clear_kv_budget(&undo));
                        events.push(Event::StepFailed {
                            step: Step::ShrinkKvBudget,
                            reason: ExecError::BoundaryTimeout(self.config.boundary_timeout)
                                .to_string(),
                        });
                    }
                }
            }
            Action::RestoreKvBudget { devices } => {
                let devs: Vec<HDev> = devices.iter().map(hdev).collect();
                let _ = self.at_boundary(move |r, _| r.clear_kv_budget(&devs));
            }
            Action::StartCopies { plan } => self.copy(&spec, &plan, ctx, events),
            Action::DiscardCopies => {
                let store = Arc::clone(ctx.colo_store.as_ref().unwrap_or(&ctx.store));
                for key in ctx.copied.drain(..) {
                    let _ = store.release(&key);
                }
                ctx.cold_store = None;
                ctx.colo_store = None;
            }
            Action::CloseRanks { devices } => {
                let ranks = ranks_of(&devices);
                let _ = self.at_boundary(move |_, s| {
                    for r in ranks {
                        let _ = s.close_rank(r);
                    }
                });
            }
            Action::ReopenRanks { devices } => {
                let ranks = ranks_of(&devices);
                let _ = self.at_boundary(move |_, s| {
                    for r in ranks {
                        s.add_rank(r);
                    }
                });
            }
            Action::MigrateKv { from, .. } => {
                // The ranks are closed. Pre-copy their sequences' full KV blocks to staying ranks
                // while they keep decoding; the switch copies only the tails written since.
                let leaving: Vec<HDev> = from.iter().map(hdev).collect();
                let plan = self.at_boundary(move |r, s| r.plan_precopy(s, &leaving));
                let precopy = plan.map(|p| p.copy()).unwrap_or_default();
                ctx.kv_precopied = precopy.bytes() as u64;
                events.push(Event::KvMigrated {
                    sequences: precopy.sequences() as u64,
                    bytes: precopy.bytes() as u64,
                });
                ctx.precopy = Some(precopy);
            }
            Action::BuildDeployment { .. } => match self.build(&spec, ctx) {
                Ok(d) => {
                    ctx.next = Some(Arc::new(d));
                    events.push(Event::DeploymentBuilt);
                }
                Err(reason) => events.push(Event::StepFailed {
                    step: Step::BuildDeployment,
                    reason,
                }),
            },
            Action::DropNextDeployment => ctx.next = None,
            Action::RequestSwitch { .. } => {
                if let Some(iteration) = self.switch(&spec, ctx) {
                    events.push(Event::Switched { iteration });
                }
            }
            Action::RetireOld { .. } => {
                // The swap ran at a boundary, so no iteration can still use the old deployment;
                // its views go at the next iteration's epoch collection.
                let deadline = Instant::now() + Duration::from_millis(500);
                while self.engine.with_runner(DeploymentRunner::pending_retired) > 0
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                events.push(Event::OldDrained);
            }
            Action::ReleaseOldViews { .. } if spec.strategy == Strategy::Colocated => {
                // The old instance was dropped at the switch; its store gives every chunk up.
                for key in ctx.store.keys() {
                    let _ = ctx.store.release(&key);
                }
            }
            Action::ReleaseOldViews { .. } => {
                let store = self.store();
                let placement = self
                    .engine
                    .with_runner(|r| r.deployment().placement().clone());
                let _ = store.release_unused(&placement);
            }
        }
    }

    fn plan(
        &self,
        ctx: &Ctx,
        kind: &TransitionKind,
        strategy: Strategy,
        from: &DeviceSet,
        to: &DeviceSet,
    ) -> Result<HostPlan, DeploymentError> {
        let (store, cur) = (&ctx.store, &ctx.cur);
        let cfg = store.model().config();
        let ids: Vec<expert_placement::DeviceId> = to.iter().map(pdev).collect();
        let placement = if strategy == Strategy::ColdRestart {
            PlacementKind::Balanced.placement_on(cfg, &ids)?
        } else {
            // The load the workers observed (tokens routed per expert per layer); uniform
            // before any traffic.
            let load = match cur.routed_load().snapshot() {
                Some(observed) => observed,
                None => ExpertLoad::uniform(cfg.num_moe_layers(), cfg.moe.num_experts)?,
            };
            Placement::rebalanced_for(cur.placement(), &ids, &load)?
        };
        let failed = kind.failed();
        let healthy: Vec<DeviceId> = from.difference(&failed).iter().collect();
        let mut copies: BTreeMap<DeviceId, Vec<(WeightKey, ChunkSource, u64)>> = BTreeMap::new();
        let mut zero_copy = 0u64;
        let size_of = |key: &WeightKey| -> u64 {
            (0..store.vmm().device_count() as u32)
                .find_map(|d| store.hmm().get(&key.on(HDev(d))))
                .map_or(0, |c| c.size() as u64)
        };
        for d in to.iter() {
            copies.entry(d).or_default();
            for key in store.keys_for(hdev(d), &placement) {
                let bytes = size_of(&key);
                if strategy == Strategy::ColdRestart {
                    copies
                        .entry(d)
                        .or_default()
                        .push((key, ChunkSource::Checkpoint, bytes));
                    continue;
                }
                if store.has(&key) && !failed.contains(d) {
                    if strategy == Strategy::Colocated {
                        // The second instance gets its own copy, also of what this device
                        // already holds for the running one: a device-local duplicate.
                        copies
                            .entry(d)
                            .or_default()
                            .push((key, ChunkSource::Peer(d), bytes));
                    } else {
                        zero_copy += bytes;
                    }
                    continue;
                }
                let source = healthy
                    .iter()
                    .copied()
                    .filter(|&s| s != d && store.has(&key.on(hdev(s))))
                    .min_by_key(|&s| {
                        let load: u64 = copies
                            .values()
                            .flatten()
                            .filter(|c| c.1 == ChunkSource::Peer(s))
                            .map(|c| c.2)
                            .sum();
                        (load, s)
                    });
                let list = copies.entry(d).or_default();
                match source {
                    Some(s) => list.push((key, ChunkSource::Peer(s), bytes)),
                    None => list.push((key, ChunkSource::Checkpoint, bytes)),
                }
            }
        }
        Ok(HostPlan {
            placement,
            copies,
            zero_copy,
        })
    }

    fn copy(
        &self,
        spec: &TransitionSpec,
        plan: &HostPlan,
        ctx: &mut Ctx,
        events: &mut Vec<Event<HostPlan>>,
    ) {
        let cold = spec.strategy == Strategy::ColdRestart;
        let store = if cold {
            // A cold restart rebuilds from disk on a fresh store over a fresh backend. (The
            // serving loop is held by the stop: the engine's runner must not be asked for here.)
            let old = Arc::clone(&ctx.store);
            let model = match Model::new(old.model().config(), CpuCompute::new()) {
                Ok(m) => Arc::new(m),
                Err(e) => {
                    if let Some(d) = plan.copy_destinations().iter().next() {
                        events.push(Event::CopiesFailed {
                            device: d,
                            reason: e.to_string(),
                        });
                    }
                    return;
                }
            };
            match WeightStore::host(model, old.vmm().device_count(), &self.config.deployment) {
                Ok(s) => {
                    let s = Arc::new(s);
                    ctx.cold_store = Some(Arc::clone(&s));
                    s
                }
                Err(e) => {
                    if let Some(d) = plan.copy_destinations().iter().next() {
                        events.push(Event::CopiesFailed {
                            device: d,
                            reason: e.to_string(),
                        });
                    }
                    return;
                }
            }
        } else if spec.strategy == Strategy::Colocated {
            // The second instance's own weight store, over the same devices.
            let s = Arc::new(WeightStore::new(
                Arc::clone(ctx.store.model()),
                ctx.store.vmm(),
            ));
            ctx.colo_store = Some(Arc::clone(&s));
            s
        } else {
            Arc::clone(&ctx.store)
        };
        let src_store = Arc::clone(&ctx.store);
        let transport = self.transport(&store);
        for (&dst, list) in &plan.copies {
            if list.is_empty() {
                continue;
            }
            let mut result: Result<(), String> = Ok(());
            let mut reload_experts: Vec<(usize, u32)> = Vec::new();
            let mut reload_any = false;
            // Peer chunks go through the transport in one batch, each striped over every
            // device that holds it (the planner chooses; the plan's source is one of them).
            let mut peer: Vec<WeightKey> = Vec::new();
            for &(key, source, _) in list {
                match source {
                    ChunkSource::Peer(s) => peer.push(key.on(hdev(s))),
                    ChunkSource::Checkpoint => {
                        reload_any = true;
                        if let WeightKey::Expert { layer, expert, .. } = key {
                            reload_experts.push((layer, expert));
                        }
                    }
                }
            }
            let failing = self.faults.fail_copies_to == Some(dst);
            if failing {
                // The injected fault: the link breaks after the first chunk arrived.
                peer.truncate(1);
            }
            if !peer.is_empty() {
                match store.copy_through(
                    &src_store,
                    &peer,
                    hdev(dst),
                    transport.as_ref(),
                    &self.planner,
                ) {
                    Ok(_) => ctx.copied.extend(peer.iter().map(|k| k.on(hdev(dst)))),
                    Err(e) => result = Err(e.to_string()),
                }
            }
            if failing && result.is_ok() {
                result = Err(format!(
                    "injected transfer failure on the link into {dst} after 1 of {} chunks",
                    list.len()
                ));
            }
            if result.is_ok() && reload_any {
                let before: BTreeSet<WeightKey> = store.keys().into_iter().collect();
                result = store
                    .load(hdev(dst), self.checkpoint.as_ref(), &reload_experts)
                    .map_err(|e| e.to_string());
                ctx.copied.extend(
                    store
                        .keys()
                        .into_iter()
                        .filter(|k| k.device() == hdev(dst) && !before.contains(k)),
                );
            }
            match result {
                Ok(()) => events.push(Event::CopiesDone { device: dst }),
                Err(reason) => {
                    events.push(Event::CopiesFailed {
                        device: dst,
                        reason,
                    });
                    return;
                }
            }
        }
    }

    fn build(&self, spec: &TransitionSpec, ctx: &Ctx) -> Result<Deployment, String> {
        if self.faults.fail_build {
            return Err("injected failure while building the next deployment".into());
        }
        let plan = ctx.plan.as_ref().ok_or("no plan")?;
        if spec.strategy == Strategy::ColdRestart {
            let store = ctx.cold_store.as_ref().ok_or("no store was rebuilt")?;
            return Deployment::build(store, &plan.placement, &self.config.deployment, None)
                .map_err(|e| e.to_string());
        }
        if spec.strategy == Strategy::Colocated {
            // A separate instance: its own views and KV pools, which start within half the
            // budget (they may grow to the full one once the old instance is gone).
            let store = ctx.colo_store.as_ref().ok_or("no store was copied")?;
            let half = self.kv_budget_chunks(KvBudget::Half);
            let config = DeploymentConfig {
                kv_chunks: self.config.deployment.kv_chunks.min(half),
                ..self.config.deployment
            };
            return Deployment::build(store, &plan.placement, &config, None)
                .map_err(|e| e.to_string());
        }
        Deployment::build(
            &ctx.store,
            &plan.placement,
            &self.config.deployment,
            Some(&ctx.cur),
        )
        .map_err(|e| e.to_string())
    }

    /// A KV budget in chunks per device.
    fn kv_budget_chunks(&self, budget: KvBudget) -> usize {
        let d = &self.config.deployment;
        let full = d.kv_max_chunks.max(d.kv_chunks).max(1);
        match budget {
            KvBudget::Full => full,
            KvBudget::Half => (full / 2).max(1),
        }
    }

    /// Swaps the next deployment in at an iteration boundary; returns the first iteration on it.
    fn switch(&self, spec: &TransitionSpec, ctx: &mut Ctx) -> Option<u64> {
        let next = ctx.next.take()?;
        if spec.strategy == Strategy::ColdRestart {
            let store = ctx.cold_store.clone()?;
            let runner = DeploymentRunner::new(store, next, RunnerConfig::default()).ok()?;
            let started = Instant::now();
            ctx.cold_resume.take()?.send(Some(runner)).ok()?;
            ctx.cold_done
                .take()?
                .recv_timeout(self.config.boundary_timeout)
                .ok()?;
            ctx.switch_boundary = started.elapsed();
            if let Some(at) = ctx.cold_stopped_at.take() {
                ctx.downtime += at.elapsed();
            }
            // Future workers and copies come from the new backend.
            *lock(self.pool_store()) = self.store();
            return Some(self.engine.metrics().iterations + 1);
        }
        if spec.strategy == Strategy::Colocated {
            let store = ctx.colo_store.clone()?;
            let half = self.kv_budget_chunks(KvBudget::Half);
            let (tx, rx) = bounded(1);
            self.engine.at_boundary(move |r, s| {
                let started = Instant::now();
                let out = r.install_instance(store, next, s, Some(half));
                let _ = tx.send((out, started.elapsed()));
            });
            let (out, took) = rx.recv_timeout(self.config.boundary_timeout).ok()?;
            ctx.switch_boundary = took;
            ctx.swap = Some(out.ok()?);
            ctx.switched = true;
            // Future workers and copies come from the new instance's store; the old instance
            // is no longer referenced here either.
            *lock(self.pool_store()) = self.store();
            ctx.cur = self.engine.with_runner(|r| Arc::clone(r.deployment()));
            return Some(self.engine.metrics().iterations + 1);
        }
        let failed: Vec<HDev> = spec.kind.failed().iter().map(hdev).collect();
        let precopy = ctx.precopy.take().unwrap_or_default();
        let (tx, rx) = bounded(1);
        self.engine.at_boundary(move |r, s| {
            let started = Instant::now();
            let out = r.install_precopied(next, s, &failed, precopy);
            let _ = tx.send((out, started.elapsed()));
        });
        let (out, took) = rx.recv_timeout(self.config.boundary_timeout).ok()?;
        ctx.switch_boundary = took;
        // A refused install changed nothing; the machine then stays in Switch (reported as stuck).
        ctx.swap = Some(out.ok()?);
        ctx.switched = true;
        Some(self.engine.metrics().iterations + 1)
    }

    fn pool_store(&self) -> &Mutex<Arc<WeightStore>> {
        &self.pool.factory().store
    }
}

fn ranks_of(devices: &DeviceSet) -> Vec<RankId> {
    devices.iter().map(|d| RankId(d.0)).collect()
}

/// Sends every running sequence of `ranks` back to the queue (KV released). Returns how many.
fn requeue_all(r: &mut DeploymentRunner, s: &mut Scheduler, ranks: &[RankId]) -> u64 {
    let mut n = 0;
    for &rank in ranks {
        for seq in s.running_on(rank).to_vec() {
            if s.requeue(seq, r).is_ok() {
                n += 1;
            }
        }
    }
    n
}
