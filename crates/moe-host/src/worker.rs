//! Device workers: one thread per device, running one engine iteration together.
//!
//! In every iteration each worker runs, for its rank's sequences:
//!
//! 1. the embedding, then per decoder layer the attention step over its rank's KV pool;
//! 2. on a MoE layer, expert parallelism: it routes its tokens, sends each token row to the device
//!    that serves each of its top-k experts (a deterministic replica choice by token, see
//!    [`Deployment::replica_for`]), runs the experts it holds on the rows it received from every
//!    device, sends the outputs back, and combines each token's expert outputs in ascending expert
//!    id (plus shared experts) into its residual stream;
//! 3. the LM head for the sequences whose logits are sampled.
//!
//! Every kernel is row-wise and the combine order is fixed, so a sequence's logits are bitwise the
//! same whatever the placement, the number of devices and the rest of the batch.
//!
//! The exchange is an all-to-all over the engine's `mesh` module: on the host backend the rows move
//! between the worker threads as owned buffers (all device memory is host memory there). A worker
//! that fails closes the iteration's mesh, so the others stop waiting and the iteration reports
//! the error instead of hanging.
//!
//! [`DeploymentRunner`] is the engine's [`Runner`] over a [`DeploymentSlot`] and these workers; it
//! also keeps each sequence's KV block table and applies deployment swaps between iterations
//! ([`SwapDeployment::swap_deployment`]), moving the KV of sequences on leaving devices to staying ones.
//!
//! # Example
//!
//! ```
//! use moe_host::deployment::{DeploymentConfig, PlacementKind};
//! use moe_engine::{EngineConfig, Request};
//! use moe_model::weights::MemTensors;
//! use moe_model::presets::Preset;
//! use moe_host::worker::{DeploymentRunner, HostEngineConfig};
//!
//! let cfg = Preset::TinyMixtral.config();
//! let src = MemTensors::seeded(&cfg, 1);
//! let host = HostEngineConfig { devices: 2, ..HostEngineConfig::default() };
//! let (engine, _store) = DeploymentRunner::host_engine(&cfg, &src, &host).unwrap();
//! let h = engine.submit(Request::greedy(vec![1, 2, 3], 4)).unwrap();
//! engine.run_until_idle(100).unwrap();
//! assert_eq!(h.wait().tokens.len(), 4);
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use hbm_vmm::host::HostBackend;
use hbm_vmm::{DeviceId, VmmError};
use kv_pool::{BlockId, BlockPool, HostBlocks, KvError};

use crate::compute::{AttnBatch, ComputeError, KvBlocks, SeqSpan};
use crate::deployment::{
    migrate_kv, Deployment, DeploymentConfig, DeploymentError, DeploymentSlot, PlacementKind,
    WeightStore,
};
use crate::model::weights::{LayerWeights, TensorSource, WeightViews};
use crate::model::{Model, ModelError};
use moe_engine::mesh::{Lane, Mesh, MeshError};
use moe_engine::{
    Engine, EngineConfig, KvLedger, RankId, RankKv, RequestId, RequestLimits, RunError, Runner,
    Scheduler, Work,
};
use moe_model::config::ModelConfig;

mod install;

pub use install::{KvBudgetChange, KvPrecopy, PrecopyPlan};

/// Why a worker could not finish its part of an iteration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// A model seam failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// KV pool access failed.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// Weight memory access failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The exchange with the other devices failed.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// The placement sent a token to a device that does not hold the expert.
    #[error("expert {expert} of layer {layer} is not held on {device}")]
    ExpertNotHere {
        /// Decoder layer.
        layer: usize,
        /// Expert.
        expert: u32,
        /// The device asked.
        device: DeviceId,
    },
    /// No device of the deployment holds the expert.
    #[error("no device of the deployment holds expert {expert} of layer {layer}")]
    NoHolder {
        /// Decoder layer.
        layer: usize,
        /// Expert.
        expert: u32,
    },
    /// A device answered with rows for other tokens than were sent.
    #[error("device {device} returned {got} expert rows for {sent} sent")]
    Protocol {
        /// The device.
        device: usize,
        /// Rows sent.
        sent: usize,
        /// Rows returned.
        got: usize,
    },
    /// The worker thread is gone.
    #[error("the worker of {0} is not running")]
    Gone(DeviceId),
    /// A worker failed (its error, or its panic, as text).
    #[error("the worker of {device} failed: {message}")]
    Device {
        /// The device.
        device: DeviceId,
        /// What went wrong.
        message: String,
    },
    /// Workers did not answer in time.
    #[error("the iteration timed out after {0:?}")]
    Timeout(Duration),
}

/// Rows of one exchange: `items[i] = (expert, origin)` owns `rows[i*hidden..(i+1)*hidden]`;
/// `origin` is `token * top_k + slot` on the sending rank.
#[derive(Debug, Default)]
struct Packet {
    items: Vec<(u32, u32)>,
    rows: Vec<f32>,
}

/// One rank's share of an iteration.
#[derive(Debug, Default)]
struct RankWork {
    /// `(blocks, start, len)` per sequence.
    spans: Vec<(Vec<u32>, usize, usize)>,
    tokens: Vec<u32>,
    /// Per token: the hash that picks expert replicas.
    hashes: Vec<u64>,
    /// Rows whose logits are sampled.
    sample_rows: Vec<usize>,
}

type Done = (usize, Result<Vec<Vec<f32>>, String>);

struct Job {
    deployment: Arc<Deployment>,
    index: usize,
    mesh: Arc<Mesh<Packet>>,
    work: RankWork,
    timeout: Duration,
    done: Sender<Done>,
}

enum Msg {
    Run(Box<Job>),
    Stop,
}

struct WorkerThread {
    tx: Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

/// The worker threads, one per device, kept across deployments.
pub struct Workers {
    threads: BTreeMap<DeviceId, WorkerThread>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("devices", &self.threads.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for Workers {
    fn default() -> Self {
        Self::new()
    }
}

impl Workers {
    /// No workers yet.
    pub fn new() -> Self {
        Self {
            threads: BTreeMap::new(),
        }
    }

    /// Devices with a worker.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.threads.keys().copied().collect()
    }

    /// Starts a worker for every device in `devices` that has none.
    pub fn ensure(&mut self, devices: &[DeviceId]) -> std::io::Result<()> {
        for &d in devices {
            if self.threads.contains_key(&d) {
                continue;
            }
            let (tx, rx) = crossbeam_channel::unbounded();
            let thread = std::thread::Builder::new()
                .name(format!("moe-worker-{d}"))
                .spawn(move || worker_main(d, &rx))?;
            self.threads.insert(
                d,
                WorkerThread {
                    tx,
                    thread: Some(thread),
                },
            );
        }
        Ok(())
    }

    /// Stops the workers of devices not in `devices`.
    pub fn retain(&mut self, devices: &[DeviceId]) {
        let gone: Vec<DeviceId> = self
            .threads
            .keys()
            .copied()
            .filter(|d| !devices.contains(d))
            .collect();
        for d in gone {
            if let Some(mut w) = self.threads.remove(&d) {
                stop(&mut w);
            }
        }
    }

    /// Runs one iteration: `works[i]` on rank `i` of `deployment`. Returns each rank's sampled
    /// logits.
    fn run(
        &self,
        deployment: &Arc<Deployment>,
        works: Vec<RankWork>,
        timeout: Duration,
    ) -> Result<Vec<Vec<Vec<f32>>>, WorkerError> {
        let n = works.len();
        let mesh = Arc::new(Mesh::new(n));
        let (done_tx, done_rx) = crossbeam_channel::bounded(n);
        for (index, work) in works.into_iter().enumerate() {
            let device = deployment.ranks()[index].device();
            let job = Job {
                deployment: Arc::clone(deployment),
                index,
                mesh: Arc::clone(&mesh),
                work,
                timeout,
                done: done_tx.clone(),
            };
            let sent = self
                .threads
                .get(&device)
                .map(|w| w.tx.send(Msg::Run(Box::new(job))));
            if !matches!(sent, Some(Ok(()))) {
                mesh.close();
                return Err(WorkerError::Gone(device));
            }
        }
        drop(done_tx);
        let mut out: Vec<Option<Vec<Vec<f32>>>> = (0..n).map(|_| None).collect();
        // The first failure closes the mesh and the others then report "closed": keep the cause.
        let closed = MeshError::Closed.to_string();
        let mut first_err: Option<(usize, String)> = None;
        for _ in 0..n {
            match done_rx.recv_timeout(timeout + Duration::from_secs(1)) {
                Ok((i, Ok(logits))) => out[i] = Some(logits),
                Ok((i, Err(e))) => {
                    let replace = match &first_err {
                        None => true,
                        Some((_, prev)) => *prev == closed && e != closed,
                    };
                    if replace {
                        first_err = Some((i, e));
                    }
                }
                Err(_) => {
                    mesh.close();
                    return Err(WorkerError::Timeout(timeout));
                }
            }
        }
        if let Some((i, message)) = first_err {
            return Err(WorkerError::Device {
                device: deployment.ranks()[i].device(),
                message,
            });
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }
}

fn stop(w: &mut WorkerThread) {
    let _ = w.tx.send(Msg::Stop);
    if let Some(t) = w.thread.take() {
        let _ = t.join();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in self.threads.values_mut() {
            stop(w);
        }
    }
}

fn worker_main(device: DeviceId, rx: &Receiver<Msg>) {
    while let Ok(msg) = rx.recv() {
        let job = match msg {
            Msg::Stop => return,
            Msg::Run(job) => job,
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(&job)));
        let result = match result {
            Ok(Ok(logits)) => Ok(logits),
            Ok(Err(e)) => Err(e.to_string()),
            Err(p) => {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(format!("panic: {what} (on {device})"))
            }
        };
        if result.is_err() {
            job.mesh.close();
        }
        let Job { done, index, .. } = *job;
        let _ = done.send((index, result));
    }
}

/// The attention kernels' view of a rank's KV pool.
struct PoolKv<'a, 'b>(&'a mut HostBlocks<'b>);

impl KvBlocks for PoolKv<'_, '_> {
    fn block(&self, id: u32) -> Result<&[f32], ComputeError> {
        let blocks = self.0.capacity();
        self.0
            .block_f32(BlockId(id))
            .map_err(|_| ComputeError::NoSuchBlock { block: id, blocks })
    }

    fn block_mut(&mut self, id: u32) -> Result<&mut [f32], ComputeError> {
        let blocks = self.0.capacity();
        self.0
            .block_f32_mut(BlockId(id))
            .map_err(|_| ComputeError::NoSuchBlock { block: id, blocks })
    }
}

fn execute(job: &Job) -> Result<Vec<Vec<f32>>, WorkerError> {
    let dep = &job.deployment;
    let rank = &dep.ranks()[job.index];
    let model = dep.model();
    let layout = model.layout();
    let cfg = model.config();
    let h = cfg.hidden_size;
    let w = &job.work;
    let rows = w.tokens.len();
    let global_bytes = rank.replicas().global();
    let global = layout.global_view(global_bytes.as_f32())?;
    let mut hidden = if rows > 0 {
        model.embed(&global, &w.tokens)?
    } else {
        Vec::new()
    };
    let spans: Vec<SeqSpan<'_>> = w
        .spans
        .iter()
        .map(|(blocks, start, len)| SeqSpan {
            blocks,
            start: *start,
            len: *len,
        })
        .collect();
    let geo = dep.kv_geometry();
    for layer in 0..cfg.num_layers {
        let bytes = rank.replicas().layer(layer)?;
        let lw = layout.layer_view(layer, bytes.as_f32())?;
        if rows > 0 {
            rank.pool().with_host_blocks(|kv| {
                model.attention_step(
                    &lw,
                    AttnBatch {
                        geo,
                        layer,
                        seqs: &spans,
                    },
                    &mut PoolKv(kv),
                    &mut hidden,
                )
            })??;
        }
        if dep.moe_index(layer).is_some() {
            moe_layer(job, layer, &lw, &mut hidden)?;
        } else if rows > 0 {
            model.dense_step(&lw, &mut hidden)?;
        }
    }
    if w.sample_rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut last = Vec::with_capacity(w.sample_rows.len() * h);
    for &r in &w.sample_rows {
        last.extend_from_slice(&hidden[r * h..(r + 1) * h]);
    }
    let logits = model.logits(&global, &last)?;
    Ok(logits
        .chunks_exact(cfg.vocab_size)
        .map(<[f32]>::to_vec)
        .collect())
}

/// The MoE half of `layer` for this rank's tokens, with the all-to-all exchange.
fn moe_layer(
    job: &Job,
    layer: usize,
    lw: &LayerWeights<'_>,
    hidden: &mut [f32],
) -> Result<(), WorkerError> {
    let dep = &job.deployment;
    let model = dep.model();
    let h = model.config().hidden_size;
    let k = model.router_spec().top_k;
    let me = job.index;
    let n = dep.ranks().len();
    let tag = layer as u64;
    let rows = hidden.len() / h;
    let (x, routes) = if rows > 0 {
        let x = model.mlp_input(lw, hidden)?;
        let routes = model.route(lw, &x)?;
        if let Some(m) = dep.moe_index(layer) {
            for c in routes.iter().flatten() {
                dep.routed_load().add(m, c.expert as usize);
            }
        }
        (x, routes)
    } else {
        (Vec::new(), Vec::new())
    };

    // Dispatch every (token, slot) to the device serving its expert.
    let mut out: Vec<Packet> = (0..n).map(|_| Packet::default()).collect();
    for (t, route) in routes.iter().enumerate() {
        for (s, c) in route.iter().enumerate() {
            let dev = dep.replica_for(layer, c.expert, job.work.hashes[t]).ok_or(
                WorkerError::NoHolder {
                    layer,
                    expert: c.expert,
                },
            )?;
            let di = dep.index_of(dev).ok_or(WorkerError::NoHolder {
                layer,
                expert: c.expert,
            })?;
            out[di].items.push((c.expert, (t * k + s) as u32));
            out[di].rows.extend_from_slice(&x[t * h..(t + 1) * h]);
        }
    }
    let sent: Vec<usize> = out.iter().map(|p| p.items.len()).collect();
    for (di, p) in out.into_iter().enumerate() {
        job.mesh.send(Lane::Dispatch, me, di, tag, Ok(p))?;
    }
    let incoming = job.mesh.gather(Lane::Dispatch, me, tag, job.timeout)?;

    // Run the experts held here on every row received, one expert at a time (ascending id).
    let rank = &dep.ranks()[me];
    let layout = model.layout();
    let mut by_expert: BTreeMap<u32, Vec<(usize, usize)>> = BTreeMap::new();
    for (sender, p) in incoming.iter().enumerate() {
        for (i, &(e, _)) in p.items.iter().enumerate() {
            by_expert.entry(e).or_default().push((sender, i));
        }
    }
    let mut replies: Vec<Packet> = incoming
        .iter()
        .map(|p| Packet {
            items: p.items.clone(),
            rows: vec![0.0; p.rows.len()],
        })
        .collect();
    for (expert, list) in by_expert {
        let not_here = || WorkerError::ExpertNotHere {
            layer,
            expert,
            device: rank.device(),
        };
        let bytes = rank
            .experts(layer)
            .and_then(|r| r.expert(expert))
            .ok_or_else(not_here)??;
        let ffn = layout.expert_view(bytes.as_f32())?;
        let mut input = Vec::with_capacity(list.len() * h);
        for &(s, i) in &list {
            input.extend_from_slice(&incoming[s].rows[i * h..(i + 1) * h]);
        }
        let y = model.expert(&ffn, &input)?;
        for (j, &(s, i)) in list.iter().enumerate() {
            replies[s].rows[i * h..(i + 1) * h].copy_from_slice(&y[j * h..(j + 1) * h]);
        }
    }
    for (s, p) in replies.into_iter().enumerate() {
        job.mesh.send(Lane::Results, me, s, tag, Ok(p))?;
    }
    let back = job.mesh.gather(Lane::Results, me, tag, job.timeout)?;
    if rows == 0 {
        return Ok(());
    }

    // Combine in ascending expert id (the route's order), plus shared experts.
    let mut results = vec![0.0; rows * k * h];
    for (device, p) in back.iter().enumerate() {
        if p.items.len() != sent[device] || p.rows.len() != sent[device] * h {
            return Err(WorkerError::Protocol {
                device,
                sent: sent[device],
                got: p.items.len(),
            });
        }
        for (j, &(_, origin)) in p.items.iter().enumerate() {
            let o = origin as usize;
            results[o * h..(o + 1) * h].copy_from_slice(&p.rows[j * h..(j + 1) * h]);
        }
    }
    let shared = model.shared(lw, &x)?;
    model.combine(&routes, &results, shared.as_deref(), hidden)?;
    Ok(())
}

/// The hash that picks a token's expert replicas: a function of the sequence and the position
/// only, so the choice (and the result) does not depend on the batch.
fn token_hash(seq: RequestId, position: usize) -> u64 {
    seq.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (position as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Settings of a [`DeploymentRunner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    /// How long a worker waits for the others in one exchange round before giving up.
    pub exchange_timeout: Duration,
    /// An artificial delay added to every step (zero by default): it emulates slower devices,
    /// so that demos and tests can check that what they show does not depend on how fast the
    /// machine is. It changes no output.
    pub step_delay: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            exchange_timeout: Duration::from_secs(60),
            step_delay: Duration::ZERO,
        }
    }
}

/// What a deployment swap did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwapReport {
    /// Generation of the retired deployment.
    pub retired: u64,
    /// Generation of the installed one.
    pub installed: u64,
    /// Ranks added.
    pub added: Vec<RankId>,
    /// Ranks removed.
    pub removed: Vec<RankId>,
    /// Sequences whose KV moved to another rank: `(sequence, from, to)`.
    pub migrated: Vec<(RequestId, RankId, RankId)>,
    /// Sequences sent back to the queue for recompute.
    pub requeued: Vec<RequestId>,
    /// KV bytes copied inside the swap (for sequences whose KV was pre-copied, only the tail
    /// written since; see [`DeploymentRunner::install_precopied`]).
    pub kv_bytes: usize,
    /// Sequences that moved on a pre-copy (only their tail was copied in the swap).
    pub precopied: usize,
}

/// Knobs of [`DeploymentRunner::host_engine`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostEngineConfig {
    /// Devices to serve on at the start.
    pub devices: usize,
    /// Devices the host backend has (room to scale up to).
    pub max_devices: usize,
    /// Expert layout.
    pub placement: PlacementKind,
    /// KV pools.
    pub deployment: DeploymentConfig,
    /// Batching.
    pub engine: EngineConfig,
    /// Workers.
    pub runner: RunnerConfig,
}

impl Default for HostEngineConfig {
    fn default() -> Self {
        Self {
            devices: 1,
            max_devices: 0,
            placement: PlacementKind::Balanced,
            deployment: DeploymentConfig::default(),
            engine: EngineConfig::default(),
            runner: RunnerConfig::default(),
        }
    }
}

/// The engine's [`Runner`] over a deployment and its device workers.
#[derive(Debug)]
pub struct DeploymentRunner {
    store: Arc<WeightStore>,
    slot: DeploymentSlot,
    workers: Workers,
    seqs: BTreeMap<RequestId, (RankId, kv_pool::SeqId)>,
    config: RunnerConfig,
    /// KV budgets below the pools' reserved maximum, in chunks per device (see
    /// [`DeploymentRunner::set_kv_budget`]).
    kv_budget: BTreeMap<DeviceId, usize>,
}

impl DeploymentRunner {
    /// A runner serving `deployment` (built from `store`), with a worker per device.
    pub fn new(
        store: Arc<WeightStore>,
        deployment: Arc<Deployment>,
        config: RunnerConfig,
    ) -> Result<Self, DeploymentError> {
        let mut workers = Workers::new();
        workers
            .ensure(&deployment.devices())
            .map_err(|e| DeploymentError::Unsupported(format!("starting workers: {e}")))?;
        let slot = DeploymentSlot::new(deployment, &store);
        Ok(Self {
            store,
            slot,
            workers,
            seqs: BTreeMap::new(),
            config,
            kv_budget: BTreeMap::new(),
        })
    }

    /// Loads `cfg` from `src` onto `config.devices` host devices and returns an engine over it,
    /// with the weight store (for scaling).
    pub fn host_engine(
        cfg: &ModelConfig,
        src: &dyn TensorSource,
        config: &HostEngineConfig,
    ) -> Result<(Engine<DeploymentRunner>, Arc<WeightStore>), DeploymentError> {
        let model = Arc::new(Model::new(cfg, crate::compute::cpu::CpuCompute::new())?);
        let placement = config.placement.placement(cfg, config.devices)?;
        let store = Arc::new(WeightStore::host(
            model,
            config.max_devices.max(config.devices),
            &config.deployment,
        )?);
        store.load_placement(src, &placement)?;
        let deployment = Arc::new(Deployment::build(
            &store,
            &placement,
            &config.deployment,
            None,
        )?);
        let runner = Self::new(Arc::clone(&store), deployment, config.runner)?;
        Ok((Engine::new(runner, config.engine), store))
    }

    /// The deployment in service.
    pub fn deployment(&self) -> &Arc<Deployment> {
        self.slot.current()
    }

    /// The weight store.
    pub fn store(&self) -> &Arc<WeightStore> {
        &self.store
    }

    /// Retired deployments not yet dropped.
    pub fn pending_retired(&self) -> usize {
        self.slot.pending()
    }

    /// Devices with a running worker.
    pub fn worker_devices(&self) -> Vec<DeviceId> {
        self.workers.devices()
    }

    /// The rank and KV sequence of a request, while it holds KV.
    pub fn kv_sequence(&self, seq: RequestId) -> Option<(RankId, kv_pool::SeqId)> {
        self.seqs.get(&seq).copied()
    }

    fn pool(&self, rank: RankId) -> Option<&Arc<BlockPool<HostBackend>>> {
        self.slot
            .current()
            .rank_on(DeviceId(rank.0))
            .map(|r| r.pool())
    }

    /// The rank bookkeeping every switch shares: workers for the next device set, new ranks
    /// opened, leaving ranks closed. Returns the report to fill and the leaving devices.
    fn open_swap(
        &mut self,
        cur: &Deployment,
        next: &Deployment,
        scheduler: &mut Scheduler,
    ) -> Result<(SwapReport, Vec<DeviceId>), DeploymentError> {
        let (old_devs, new_devs) = (cur.devices(), next.devices());
        self.workers
            .ensure(&new_devs)
            .map_err(|e| DeploymentError::Unsupported(format!("starting workers: {e}")))?;
        let mut report = SwapReport {
            retired: cur.generation(),
            installed: next.generation(),
            ..SwapReport::default()
        };
        for &d in new_devs.iter().filter(|d| !old_devs.contains(d)) {
            scheduler.add_rank(RankId(d.0));
            report.added.push(RankId(d.0));
        }
        let leaving: Vec<DeviceId> = old_devs
            .iter()
            .copied()
            .filter(|d| !new_devs.contains(d))
            .collect();
        for &d in &leaving {
            let _ = scheduler.close_rank(RankId(d.0));
        }
        Ok((report, leaving))
    }

    /// Installs `next` between iterations. Sequences on devices that stay keep their KV where it
    /// is; sequences on leaving devices move with their KV to the least loaded staying rank (or,
    /// when that fails or the device is in `failed`, go back to the queue for recompute). The old
    /// deployment is retired and dropped after its last iteration.
    pub fn install(
        &mut self,
        next: Arc<Deployment>,
        scheduler: &mut Scheduler,
        failed: &[DeviceId],
    ) -> Result<SwapReport, DeploymentError> {
        self.install_precopied(next, scheduler, failed, KvPrecopy::default())
    }

    /// As [`DeploymentRunner::install`], with the KV of sequences on leaving devices already
    /// pre-copied ([`DeploymentRunner::plan_precopy`], [`PrecopyPlan::copy`]) while they kept
    /// decoding: a sequence whose pre-copy is still valid (same KV sequence, same blocks, its
    /// destination rank stays and is open) moves there and only the blocks written since the
    /// pre-copy (the tail) are copied now. Any other sequence moves as in `install`. Pre-copies
    /// left unused are freed.
    pub fn install_precopied(
        &mut self,
        next: Arc<Deployment>,
        scheduler: &mut Scheduler,
        failed: &[DeviceId],
        mut precopy: KvPrecopy,
    ) -> Result<SwapReport, DeploymentError> {
        let cur = Arc::clone(self.slot.current());
        let (old_devs, new_devs) = (cur.devices(), next.devices());
        for &d in new_devs.iter().filter(|d| old_devs.contains(d)) {
            let same = cur
                .rank_on(d)
                .zip(next.rank_on(d))
                .is_some_and(|(a, b)| Arc::ptr_eq(a.pool(), b.pool()));
            if !same {
                return Err(DeploymentError::Unsupported(format!(
                    "{d} stays but the next deployment has another KV pool for it; build it with the \
                     current deployment as `previous`"
                )));
            }
        }
        let (mut report, leaving) = self.open_swap(&cur, &next, scheduler)?;
        for &d in &leaving {
            let from = RankId(d.0);
            for seq in scheduler.running_on(from).to_vec() {
                let moved = if failed.contains(&d) {
                    None
                } else if let Some((to, bytes)) =
                    self.finish_precopy(&next, scheduler, &mut precopy, seq, from)
                {
                    report.precopied += 1;
                    Some((to, bytes))
                } else {
                    self.migrate(&next, scheduler, seq, from)
                };
                match moved {
                    Some((to, bytes)) => {
                        report.migrated.push((seq, from, to));
                        report.kv_bytes += bytes;
                    }
                    None => {
                        let _ = scheduler.requeue(seq, self);
                        report.requeued.push(seq);
                    }
                }
            }
            report.requeued.extend(scheduler.remove_rank(from, self));
            report.removed.push(from);
        }
        // Pre-copies of sequences that finished (or were not used) give their blocks back.
        drop(precopy);
        self.slot.swap(next);
        // This runs between iterations, so no iteration's epoch can still see the old deployment:
        // drop it now rather than at the next iteration (which may be far off when idle).
        self.slot.collect();
        self.workers.retain(&new_devs);
        Ok(report)
    }

    /// Moves `seq`'s KV from rank `from` to the least loaded rank of `next` that stays.
    fn migrate(
        &mut self,
        next: &Deployment,
        scheduler: &mut Scheduler,
        seq: RequestId,
        from: RankId,
    ) -> Option<(RankId, usize)> {
        let (rank, sid) = *self.seqs.get(&seq)?;
        debug_assert_eq!(rank, from);
        let src = Arc::clone(self.pool(from)?);
        let mut candidates: Vec<(usize, RankId)> = scheduler
            .ranks()
            .filter(|&(r, open)| open && next.rank_on(DeviceId(r.0)).is_some())
            .map(|(r, _)| (scheduler.running_on(r).len(), r))
            .collect();
        candidates.sort();
        for (_, to) in candidates {
            let dst = next.rank_on(DeviceId(to.0))?.pool();
            // Grow the destination pool (within its limit) until the blocks fit.
            let need = src.table(sid).map(|t| t.blocks().len()).unwrap_or(0);
            let limit = self.chunk_limit(DeviceId(to.0), dst);
            while dst.stats().free < need && dst.stats().chunks < limit {
                if dst.grow(1).is_err() {
                    break;
                }
            }
            if let Ok(new_sid) = migrate_kv(&src, sid, dst) {
                let bytes = src.export(sid).map(|m| m.bytes()).unwrap_or(0);
                let _ = src.free(sid);
                self.seqs.insert(seq, (to, new_sid));
                if scheduler.move_to(seq, to).is_ok() {
                    return Some((to, bytes));
                }
                // The scheduler refused: undo and recompute instead.
                let _ = dst.free(new_sid);
                self.seqs.remove(&seq);
                return None;
            }
        }
        None
    }
}

/// Blocks a pool could still hand out within `limit` chunks: free ones plus those it could get by
/// growing (with the pool under its limit this is `limit` chunks' blocks minus the used ones).
fn headroom(pool: &BlockPool<HostBackend>, limit: usize) -> usize {
    (limit * pool.blocks_per_chunk()).saturating_sub(pool.stats().used)
}

impl KvLedger for DeploymentRunner {
    fn can_admit(&self, rank: RankId, tokens: usize) -> bool {
        let Some(pool) = self.pool(rank) else {
            return false;
        };
        let limit = self.chunk_limit(DeviceId(rank.0), pool);
        let max_blocks = limit * pool.blocks_per_chunk();
        let need = pool.layout().blocks_for(tokens) + pool.watermarks().reserve_blocks(max_blocks);
        need <= headroom(pool, limit)
    }

    fn grow(&mut self, rank: RankId, seq: RequestId, tokens: usize) -> bool {
        let Some(pool) = self.pool(rank).cloned() else {
            return false;
        };
        let sid = match self.seqs.get(&seq) {
            Some(&(r, sid)) if r == rank => sid,
            Some(_) => return false,
            None => {
                let sid = pool.create();
                self.seqs.insert(seq, (rank, sid));
                sid
            }
        };
        let limit = self.chunk_limit(DeviceId(rank.0), &pool);
        loop {
            if !self.within_budget(DeviceId(rank.0), &pool, sid, tokens) {
                break;
            }
            match pool.grow_to(sid, tokens) {
                Ok(_) => return true,
                Err(KvError::OutOfBlocks { .. }) if pool.stats().chunks < limit => {
                    if pool.grow(1).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        // Nothing was allocated; a sequence that never held KV is forgotten again.
        if pool.table(sid).is_ok_and(|t| t.is_empty()) {
            let _ = pool.free(sid);
            self.seqs.remove(&seq);
        }
        false
    }

    fn release(&mut self, rank: RankId, seq: RequestId) {
        if let Some((r, sid)) = self.seqs.remove(&seq) {
            debug_assert_eq!(r, rank);
            if let Some(pool) = self.pool(r) {
                let _ = pool.free(sid);
                self.trim_to_budget(DeviceId(r.0), pool);
            }
        }
    }

    fn reduced(&self, rank: RankId) -> bool {
        let device = DeviceId(rank.0);
        self.pool(rank)
            .is_some_and(|pool| self.chunk_limit(device, pool) < pool.max_chunks())
    }
}

impl Runner for DeploymentRunner {
    fn limits(&self) -> RequestLimits {
        let cfg = self.slot.current().model().config();
        RequestLimits {
            vocab_size: cfg.vocab_size,
            max_context: cfg.max_position_embeddings,
        }
    }

    fn kv_capacity_tokens(&self) -> usize {
        self.slot
            .current()
            .ranks()
            .iter()
            .map(|r| {
                let p = r.pool();
                p.max_chunks() * p.blocks_per_chunk() * p.layout().block_tokens()
            })
            .max()
            .unwrap_or(0)
    }

    fn ranks(&self) -> Vec<RankId> {
        self.slot.current().ranks().iter().map(|r| r.id()).collect()
    }

    fn ledger(&mut self) -> &mut dyn KvLedger {
        self
    }

    fn kv_usage(&self) -> Vec<RankKv> {
        self.slot
            .current()
            .ranks()
            .iter()
            .map(|r| {
                let s = r.pool().stats();
                RankKv {
                    rank: r.id(),
                    used_blocks: s.used,
                    total_blocks: s.capacity,
                }
            })
            .collect()
    }

    fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Vec<f32>>, RunError> {
        if !self.config.step_delay.is_zero() {
            std::thread::sleep(self.config.step_delay);
        }
        self.slot.collect();
        let _epoch = self.slot.enter();
        let dep = Arc::clone(self.slot.current());
        let mut works: Vec<RankWork> = (0..dep.ranks().len())
            .map(|_| RankWork::default())
            .collect();
        let mut samples: Vec<(usize, usize)> = Vec::new();
        for w in work {
            let c = w.chunk;
            let di = dep
                .index_of(DeviceId(c.rank.0))
                .ok_or_else(|| RunError(format!("{} is not in the deployment", c.rank)))?;
            let &(rank, sid) = self
                .seqs
                .get(&c.seq)
                .ok_or_else(|| RunError(format!("{} holds no KV", c.seq)))?;
            if rank != c.rank {
                return Err(RunError(format!(
                    "{} has its KV on {rank}, not {}",
                    c.seq, c.rank
                )));
            }
            let table = dep.ranks()[di]
                .pool()
                .table(sid)
                .map_err(|e| RunError(e.to_string()))?;
            let rw = &mut works[di];
            rw.spans
                .push((table.blocks().iter().map(|b| b.0).collect(), c.start, c.len));
            rw.tokens.extend_from_slice(w.tokens);
            rw.hashes
                .extend((c.start..c.start + c.len).map(|p| token_hash(c.seq, p)));
            if c.sample {
                rw.sample_rows.push(rw.tokens.len() - 1);
                samples.push((di, rw.sample_rows.len() - 1));
            }
        }
        let mut per_rank = self
            .workers
            .run(&dep, works, self.config.exchange_timeout)
            .map_err(|e| RunError(e.to_string()))?;
        samples
            .into_iter()
            .map(|(di, j)| {
                per_rank[di]
                    .get_mut(j)
                    .map(std::mem::take)
                    .ok_or_else(|| RunError(format!("rank {di} returned too few logit rows")))
            })
            .collect()
    }
}

/// Deployment swaps on a host engine: `moe_engine::Engine` knows no deployments, so the host
/// runner adds them to `Engine<DeploymentRunner>` here.
pub trait SwapDeployment {
    /// Installs `next` at the next iteration boundary (see [`DeploymentRunner::install`]). The
    /// returned channel yields the outcome once applied. Intake and running sequences continue;
    /// sequences on leaving devices move with their KV.
    fn swap_deployment(
        &self,
        next: Arc<Deployment>,
    ) -> Receiver<Result<SwapReport, DeploymentError>>;

    /// As [`SwapDeployment::swap_deployment`], for a transition after devices failed: sequences
    /// on the `failed` devices go back to the queue and are recomputed instead of moved.
    fn swap_deployment_after_failure(
        &self,
        next: Arc<Deployment>,
        failed: Vec<DeviceId>,
    ) -> Receiver<Result<SwapReport, DeploymentError>>;
}

impl SwapDeployment for Engine<DeploymentRunner> {
    fn swap_deployment(
        &self,
        next: Arc<Deployment>,
    ) -> Receiver<Result<SwapReport, DeploymentError>> {
        self.swap_deployment_after_failure(next, Vec::new())
    }

    fn swap_deployment_after_failure(
        &self,
        next: Arc<Deployment>,
        failed: Vec<DeviceId>,
    ) -> Receiver<Result<SwapReport, DeploymentError>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.at_boundary(move |runner: &mut DeploymentRunner, scheduler| {
            let _ = tx.send(runner.install(next, scheduler, &failed));
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::MemTensors;
    use moe_engine::{FinishReason, Request};
    use moe_model::presets::Preset;

    fn engine(
        preset: Preset,
        devices: usize,
        placement: PlacementKind,
    ) -> Engine<DeploymentRunner> {
        let cfg = preset.config();
        let host = HostEngineConfig {
            devices,
            max_devices: 4,
            placement,
            deployment: DeploymentConfig {
                block_tokens: 4,
                kv_chunks: 2,
                kv_max_chunks: 8,
                ..DeploymentConfig::default()
            },
            ..HostEngineConfig::default()
        };
        DeploymentRunner::host_engine(&cfg, &MemTensors::seeded(&cfg, 11), &host)
            .unwrap()
            .0
    }

    fn generate(e: &Engine<DeploymentRunner>, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| e.submit(Request::greedy(p.clone(), n)).unwrap())
            .collect();
        e.run_until_idle(1000).unwrap();
        hs.into_iter().map(|h| h.wait().tokens).collect()
    }

    #[test]
    fn replicas_and_device_counts_give_identical_tokens() {
        let prompts = vec![
            vec![3, 1, 4, 1, 5],
            vec![9, 2, 6],
            vec![5, 3, 5, 8, 9, 7, 9],
        ];
        let one = generate(
            &engine(Preset::TinyQwen3, 1, PlacementKind::Balanced),
            &prompts,
            5,
        );
        let three = generate(
            &engine(Preset::TinyQwen3, 3, PlacementKind::LoadAware),
            &prompts,
            5,
        );
        assert_eq!(one, three);
    }

    #[test]
    fn a_stopped_worker_is_an_error_not_a_hang() {
        let e = engine(Preset::TinyMixtral, 2, PlacementKind::Balanced);
        let h = e.submit(Request::greedy(vec![1, 2], 3)).unwrap();
        e.step().unwrap();
        e.at_boundary(|r: &mut DeploymentRunner, _| {
            r.workers.retain(&[DeviceId(0)]);
        });
        let err = e.step().unwrap_err();
        assert!(err.to_string().contains("not running"), "{err}");
        assert!(matches!(h.wait().finish, FinishReason::Error(_)));
    }

    #[test]
    fn an_idle_engine_drops_the_old_deployment_at_the_swap() {
        let e = engine(Preset::TinyMixtral, 2, PlacementKind::Balanced);
        let (store, cur) = e.with_runner(|r| (Arc::clone(r.store()), Arc::clone(r.deployment())));
        let config = DeploymentConfig {
            block_tokens: 4,
            kv_chunks: 2,
            kv_max_chunks: 8,
            ..DeploymentConfig::default()
        };
        let next =
            Arc::new(Deployment::build(&store, cur.placement(), &config, Some(&cur)).unwrap());
        let old = Arc::downgrade(&cur);
        drop(cur);
        let rx = e.swap_deployment(Arc::clone(&next));
        assert!(!e.is_idle(), "a queued swap is work");
        let report = e.step().unwrap();
        assert_eq!(report.boundary_actions, 1);
        let swap = rx.try_recv().unwrap().unwrap();
        assert_eq!(swap.installed, next.generation());
        assert!(old.upgrade().is_none(), "dropped without another iteration");
        assert_eq!(e.with_runner(DeploymentRunner::pending_retired), 0);
    }

    #[test]
    fn token_hashes_depend_on_sequence_and_position_only() {
        assert_eq!(token_hash(RequestId(3), 9), token_hash(RequestId(3), 9));
        assert_ne!(token_hash(RequestId(3), 9), token_hash(RequestId(3), 10));
        assert_ne!(token_hash(RequestId(3), 9), token_hash(RequestId(4), 9));
    }
}
