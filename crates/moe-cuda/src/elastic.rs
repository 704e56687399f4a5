//! Elastic scaling of a live [`CudaRunner`]: prepare the next device set beside the running one,
//! switch between two iterations, retire what no device needs.
//!
//! - **Prepare** ([`Blueprint::prepare`]) runs on the caller's thread while the engine keeps
//!   serving; it only reads a [`Snapshot`] (handles to the physical chunks the runner serves
//!   from, taken in microseconds between iterations).
//!   - A joining GPU's rank (context, stream, cuBLAS handle, compiled kernels, scratch, empty
//!     weight, KV and scratch chunks) comes from a [`CudaWarmPool`]; its replicated weights
//!     arrive by peer copies from every GPU that holds them, striped over the holders by
//!     `p2p-xfer`'s planner, on the transport's low-priority copy streams.
//!   - Routed experts get new contiguous virtual ranges per (layer, device) under the balanced
//!     contiguous-range placement of the target set. A kept expert's physical chunk is mapped
//!     into the new range (zero-copy); a moving expert gets a fresh chunk in the new range and
//!     its bytes are copied peer-to-peer from its current holder. Every new range grants access
//!     to every device of the old and new sets.
//!   - For a scale-down, each staying rank's KV chunk is mapped a second time with access for
//!     the leaving devices, so their sequences' blocks can be pushed into it at the switch; for
//!     a scale-up, each joining rank's KV chunk is mapped with access for the staying devices.
//!   - KV pools of staying ranks stay where they are.
//! - **Switch** ([`CudaRunner::install`], meant for `Engine::at_boundary`): a pointer swap of
//!   the expert table and the rank list. Sequences running on leaving ranks get blocks on the
//!   staying rank with the most free blocks and their KV blocks are copied there peer-to-peer
//!   (contiguous runs coalesced) before the next iteration: they continue without recompute.
//!   At a scale-up, each staying rank's sequences beyond an even share (its shortest first)
//!   move onto the joining ranks the same way, so the ranks, which run each step in lock step,
//!   start balanced. A sequence that fits nowhere is re-queued (counted in
//!   [`SwitchReport::requeued`]).
//! - **Retire**: [`Retired`] holds the old expert mappings and the leaving ranks; dropping it
//!   (off the serving path) synchronises their streams and unmaps. Physical chunks still mapped
//!   in the new configuration stay alive through their new mappings.
//!
//! The baselines run on the same engine: [`CudaRunner::restart_from`] (cold restart: release
//! everything, reload from the checkpoint, called inside the boundary action that holds the
//! loop) and [`CudaRunner::install_runner`] (colocated: a second runner built beside the first
//! with [`Blueprint::load_runner`]; extravagant: one on a disjoint GPU set with every weight
//! copied peer-to-peer by [`Blueprint::copy_runner`]; either switched in with KV migration).
//!
//! Invariant: nothing here runs on the serving path except `install`/`install_runner`, whose
//! only device work is the KV blocks of sequences that change rank.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hbm_vmm::PhysChunk;
pub use p2p_xfer::cuda::CudaTransport;
use p2p_xfer::cuda::CudaTransportConfig;
use p2p_xfer::{CopyOp, LinkModel, Location, Need, Planner, PlannerConfig, Transport};

use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::{DeviceId, Vmm};

use crate::config::CudaConfig;
use crate::error::CudaError;
use crate::kv_ledger::{BlockLedger, RankBlocks};
use crate::memory::{DevBuf, Dims};
use crate::rank::RankState;
use crate::runner::CudaRunner;
use crate::weights::{ExpertBuf, Fill};
use moe_engine::{KvLedger, RankId, RequestId, Scheduler};
use moe_host::compute::cpu::CpuCompute;
use moe_host::model::Model;
use moe_model::config::ModelConfig;
use moe_model::spec::KvGeometry;
use moe_model::weights::{TensorSource, WeightLayout};

fn scale_err(what: &str) -> impl Fn(String) -> CudaError + '_ {
    move |e| CudaError::Scale(format!("{what}: {e}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A mapped buffer of the running runner, by its physical chunk (kept alive here).
#[derive(Debug, Clone)]
struct BufRef {
    chunk: PhysChunk<CudaBackend>,
    chunk_offset: usize,
    addr: u64,
    len: usize,
    dev: DeviceId,
}

impl BufRef {
    fn of(b: &DevBuf) -> Self {
        Self {
            chunk: b.map.chunk().clone(),
            chunk_offset: b.map.chunk_offset(),
            addr: b.addr(),
            len: b.len(),
            dev: b.map.device(),
        }
    }
}

/// Maps `b`'s physical bytes at a new address of its device, readable and writable by `access`
/// (no copy).
fn alias(vmm: &Vmm<CudaBackend>, b: &BufRef, access: &[DeviceId]) -> Result<DevBuf, CudaError> {
    let res = vmm.reserve(b.dev, b.len)?;
    res.set_access(access)?;
    let map = res.map(0, &b.chunk, b.chunk_offset, b.len)?;
    Ok(DevBuf { map })
}

/// What the runner serves from, by physical chunk: taken between two iterations
/// ([`CudaRunner::snapshot`]), read by [`Blueprint::prepare`] while serving goes on.
///
/// The addresses stay mapped until the switch that consumes the [`Prepared`] built from it
/// (only `install` changes a runner's buffers).
#[derive(Debug, Clone)]
pub struct Snapshot {
    devices: Vec<DeviceId>,
    global: Vec<BufRef>,
    layers: Vec<Vec<BufRef>>,
    kv: Vec<BufRef>,
    experts: Vec<Vec<BufRef>>,
}

impl Snapshot {
    /// The devices serving when it was taken, in rank order.
    pub fn devices(&self) -> &[DeviceId] {
        &self.devices
    }

    /// Whether it still describes what `runner` serves from: the same devices and every buffer
    /// at the same address. A runner's buffers change only at a switch, so a snapshot taken right
    /// after one (or before the runner started serving) stays valid until the next; a stale one
    /// is refused by [`CudaRunner::install`].
    pub fn describes(&self, runner: &CudaRunner) -> bool {
        fn same(a: &[BufRef], b: &[DevBuf]) -> bool {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.addr == y.addr())
        }
        self.devices == runner.devices()
            && self.global.len() == runner.ranks.len()
            && self.kv.len() == runner.ranks.len()
            && self.layers.len() == runner.ranks.len()
            && runner.ranks.iter().enumerate().all(|(i, r)| {
                self.global[i].addr == r.global.addr()
                    && self.kv[i].addr == r.kv.addr()
                    && same(&self.layers[i], &r.layers)
            })
            && self.experts.len() == runner.experts.len()
            && self.experts.iter().zip(&runner.experts).all(|(a, b)| {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.addr == y.buf.addr())
            })
    }

    /// How many fresh expert chunks (of which size) each device of `target` needs for a
    /// transition from this configuration to `target` (experts that change device), by
    /// `(device, chunk bytes)`.
    fn moving_chunks(&self, target: &[DeviceId]) -> BTreeMap<(DeviceId, usize), usize> {
        let layers: Vec<Vec<(DeviceId, usize)>> = self
            .experts
            .iter()
            .map(|l| l.iter().map(|b| (b.dev, b.len)).collect())
            .collect();
        moving_chunks(&layers, target)
    }
}

/// Everything needed to make ranks and runners of the same model and settings on the same
/// `hbm-vmm` manager as a running runner (cheap to clone, `Send`).
#[derive(Clone)]
pub struct Blueprint {
    vmm: Vmm<CudaBackend>,
    cfg: ModelConfig,
    config: CudaConfig,
    dims: Dims,
    geo: KvGeometry,
}

impl std::fmt::Debug for Blueprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blueprint")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Pre-initialised ranks for GPUs that may join: context, stream, cuBLAS handle, compiled
/// kernels, rope tables, and the (empty) weight, KV and scratch chunks, so that a joining GPU
/// only waits for its bytes.
#[derive(Debug, Default)]
pub struct CudaWarmPool {
    ranks: BTreeMap<DeviceId, RankState>,
    /// Fresh (unmapped) physical chunks for experts about to arrive, by `(device, bytes)`.
    chunks: BTreeMap<(DeviceId, usize), Vec<PhysChunk<CudaBackend>>>,
}

impl CudaWarmPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Initialises a rank for each of `devices` not already in the pool; returns the time taken.
    pub fn prewarm(&mut self, bp: &Blueprint, devices: &[DeviceId]) -> Result<Duration, CudaError> {
        let t = Instant::now();
        for &d in devices {
            if let std::collections::btree_map::Entry::Vacant(v) = self.ranks.entry(d) {
                v.insert(bp.warm_rank(d)?);
            }
        }
        Ok(t.elapsed())
    }

    /// Devices with a warm rank.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.ranks.keys().copied().collect()
    }

    fn take(&mut self, d: DeviceId) -> Option<RankState> {
        self.ranks.remove(&d)
    }

    /// Creates, ahead of the request, the physical chunks a transition from the configuration
    /// `snap` describes to `target` would create for the experts that change device (chunks
    /// already in the pool count); returns the time taken. [`Blueprint::prepare`] takes them
    /// instead of creating chunks on the spot.
    pub fn prewarm_experts(
        &mut self,
        bp: &Blueprint,
        snap: &Snapshot,
        target: &[DeviceId],
    ) -> Result<Duration, CudaError> {
        let t = Instant::now();
        for ((d, len), n) in snap.moving_chunks(target) {
            let have = self.chunks.entry((d, len)).or_default();
            while have.len() < n {
                have.push(bp.vmm.create_chunk(d, len, false)?);
            }
        }
        Ok(t.elapsed())
    }

    /// Expert chunks waiting in the pool.
    pub fn expert_chunks(&self) -> usize {
        self.chunks.values().map(Vec::len).sum()
    }

    /// Gives back the pool's expert chunks (their memory returns to the device).
    pub fn release_expert_chunks(&mut self) {
        self.chunks.clear();
    }

    fn take_chunk(&mut self, d: DeviceId, len: usize) -> Option<PhysChunk<CudaBackend>> {
        self.chunks.get_mut(&(d, len)).and_then(Vec::pop)
    }
}

/// Where the time of a prepare went, and what it moved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrepareReport {
    /// Snapshot checks and the copy plan.
    pub plan_ms: f64,
    /// Ranks for joining GPUs (0 with a warm pool hit; the full initialisation otherwise).
    pub workers_ms: f64,
    /// New expert ranges reserved, kept chunks mapped (zero-copy), new chunks created and mapped,
    /// access granted.
    pub map_ms: f64,
    /// Peer copies, from submit until the last landed.
    pub copy_ms: f64,
    /// Bytes copied between GPUs.
    pub bytes_moved: u64,
    /// Bytes of experts kept in place and remapped.
    pub bytes_zero_copy: u64,
    /// Most bytes any one GPU received.
    pub max_bytes_into_device: u64,
    /// The copy batch's achieved rate (10⁹ bytes/s).
    pub copy_gbps: f64,
    /// Joining ranks that came from the warm pool.
    pub warm_hits: usize,
    /// Joining ranks initialised on the spot.
    pub cold_workers: usize,
    /// Expert chunks taken from the warm pool (created ahead by
    /// [`CudaWarmPool::prewarm_experts`]) rather than on the spot.
    pub prewarmed_chunks: usize,
}

/// A configuration laid out beside the running one but not yet filled (no byte copied): what
/// [`Blueprint::stage`] builds ahead of a request and [`Blueprint::fill`] completes.
pub struct Staged {
    snapshot: Snapshot,
    target: Vec<DeviceId>,
    joining: Vec<RankState>,
    experts: Vec<Vec<ExpertBuf>>,
    kv_alias: BTreeMap<DeviceId, DevBuf>,
    needs: Vec<Need>,
    keep_alive: Vec<DevBuf>,
    report: PrepareReport,
}

impl Staged {
    /// The target devices, sorted.
    pub fn target(&self) -> &[DeviceId] {
        &self.target
    }

    /// What staging did so far (plan, workers, map).
    pub fn report(&self) -> &PrepareReport {
        &self.report
    }

    /// The snapshot it was staged from.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("from", &self.snapshot.devices)
            .field("to", &self.target)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

/// The next configuration, built beside the running one; install it with
/// [`CudaRunner::install`].
pub struct Prepared {
    snapshot: Snapshot,
    target: Vec<DeviceId>,
    joining: Vec<RankState>,
    experts: Vec<Vec<ExpertBuf>>,
    kv_alias: BTreeMap<DeviceId, DevBuf>,
    transport: Arc<CudaTransport>,
    /// What prepare did.
    pub report: PrepareReport,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("from", &self.snapshot.devices)
            .field("to", &self.target)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

/// What a switch did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SwitchReport {
    /// Sequences that moved rank with their KV.
    pub migrated: usize,
    /// Sequences that had to be re-queued (no room on any staying rank).
    pub requeued: usize,
    /// KV bytes copied.
    pub kv_bytes: u64,
    /// Time spent copying KV (inside the boundary action).
    pub kv_copy_ms: f64,
    /// The whole boundary action.
    pub total_ms: f64,
}

/// What the switch replaced; drop it off the serving path (its `Drop` synchronises the old
/// ranks' streams, then unmaps).
pub struct Retired {
    ranks: Vec<RankState>,
    experts: Vec<Vec<ExpertBuf>>,
    _runner: Option<CudaRunner>,
    _aliases: Vec<DevBuf>,
    _snapshot: Option<Snapshot>,
}

impl std::fmt::Debug for Retired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retired")
            .field("ranks", &self.ranks.len())
            .field("expert_layers", &self.experts.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Retired {
    fn drop(&mut self) {
        // Errors are ignored: Drop must not panic and the memory is released either way.
        for r in &self.ranks {
            let _ = r.bind();
            let _ = r.stream.synchronize();
        }
    }
}

impl Retired {
    /// Drops everything now and returns how long it took.
    pub fn release(self) -> Duration {
        let t = Instant::now();
        drop(self);
        t.elapsed()
    }
}

/// For experts held as `layers[layer][expert] = (device, chunk bytes)`: how many fresh chunks
/// (of which size: the layer's first expert's, as `Blueprint::stage` pads them) each device of
/// `target` needs for the experts that change device under the target's placement.
fn moving_chunks(
    layers: &[Vec<(DeviceId, usize)>],
    target: &[DeviceId],
) -> BTreeMap<(DeviceId, usize), usize> {
    let mut target = target.to_vec();
    target.sort();
    target.dedup();
    let mut out = BTreeMap::new();
    for layer in layers {
        let Some(&(_, pad)) = layer.first() else {
            continue;
        };
        for (i, &d) in target.iter().enumerate() {
            for ex in expert_range(i, target.len(), layer.len()) {
                if layer[ex].0 != d {
                    *out.entry((d, pad)).or_insert(0) += 1;
                }
            }
        }
    }
    out
}

/// The contiguous range of expert ids device index `i` of `n` owns (the runner's placement).
fn expert_range(i: usize, n: usize, experts: usize) -> std::ops::Range<usize> {
    let lo = (0..experts)
        .find(|&e| e * n / experts == i)
        .unwrap_or(experts);
    let hi = (lo..experts)
        .find(|&e| e * n / experts != i)
        .unwrap_or(experts);
    lo..hi
}

impl Blueprint {
    /// The memory manager shared by every runner made from this blueprint.
    pub fn vmm(&self) -> &Vmm<CudaBackend> {
        &self.vmm
    }

    /// Raw peer bandwidth in 10⁹ bytes/s: `iters` back-to-back `cuMemcpyPeerAsync` of one
    /// `bytes`-byte buffer from `src` to `dst` on a fresh stream, host-timed after one warm-up
    /// copy. The ceiling that [`peer_bandwidth`] (the project's transport) is judged against.
    pub fn raw_peer_bandwidth(
        &self,
        src: DeviceId,
        dst: DeviceId,
        bytes: usize,
        iters: usize,
    ) -> Result<f64, CudaError> {
        let a = DevBuf::new(&self.vmm, src, bytes, &[])?;
        let b = DevBuf::new(&self.vmm, dst, bytes, &[src, dst])?;
        let be = self.vmm.backend();
        let (sc, dc) = (be.context(src)?, be.context(dst)?);
        be.bind(src)?;
        let mut stream: cudarc::driver::sys::CUstream = std::ptr::null_mut();
        // SAFETY: `stream` is a valid out-pointer and the source's context is current.
        crate::error::cu("cuStreamCreate", unsafe {
            cudarc::driver::sys::cuStreamCreate(&mut stream, 0)
        })?;
        let copies = |n: usize| -> Result<(), CudaError> {
            for _ in 0..n {
                // SAFETY: both buffers are live mappings of at least `bytes` bytes (the
                // destination open to the source device) that outlive the synchronise below;
                // the stream is live.
                crate::error::cu("cuMemcpyPeerAsync", unsafe {
                    cudarc::driver::sys::cuMemcpyPeerAsync(
                        b.addr(),
                        dc,
                        a.addr(),
                        sc,
                        bytes,
                        stream,
                    )
                })?;
            }
            // SAFETY: a live stream.
            crate::error::cu("cuStreamSynchronize", unsafe {
                cudarc::driver::sys::cuStreamSynchronize(stream)
            })
        };
        let timed = copies(1).and_then(|()| {
            let t = Instant::now();
            copies(iters.max(1)).map(|()| t.elapsed())
        });
        // SAFETY: the stream is idle (synchronised, or its copies failed) and never used again.
        let _ = unsafe { cudarc::driver::sys::cuStreamDestroy_v2(stream) };
        Ok((bytes * iters.max(1)) as f64 / timed?.as_secs_f64() / 1e9)
    }

    /// The settings.
    pub fn config(&self) -> CudaConfig {
        self.config
    }

    /// Bytes held on each GPU of the machine by this manager now, and the peak since the last
    /// [`Blueprint::reset_peaks`] (needs no runner: safe to call while the engine serves).
    pub fn memory_per_device(&self) -> Vec<(usize, usize)> {
        (0..self.vmm.device_count() as u32)
            .map(|d| (self.vmm.usage(DeviceId(d)), self.vmm.peak(DeviceId(d))))
            .collect()
    }

    /// Restarts the peak counters of [`Blueprint::memory_per_device`].
    pub fn reset_peaks(&self) {
        for d in 0..self.vmm.device_count() as u32 {
            self.vmm.reset_peak(DeviceId(d));
        }
    }

    /// A peer-copy transport over every GPU of the manager.
    pub fn transport(&self) -> Result<Arc<CudaTransport>, CudaError> {
        CudaTransport::new(self.vmm.clone(), CudaTransportConfig::default())
            .map(Arc::new)
            .map_err(|e| CudaError::Scale(format!("starting the peer-copy transport: {e}")))
    }

    fn warm_rank(&self, dev: DeviceId) -> Result<RankState, CudaError> {
        let model = Model::new(&self.cfg, CpuCompute::new())?;
        let layout = model.layout().clone();
        let mut seed = 0;
        let r = CudaRunner::make_rank(
            &self.vmm,
            dev,
            &self.cfg,
            &model,
            &self.dims,
            &self.geo,
            &self.config,
            &layout,
            &Fill::Skip,
            &mut seed,
        )?;
        r.stream
            .synchronize()
            .map_err(CudaError::driver("cuStreamSynchronize"))?;
        Ok(r)
    }

    /// A runner on GPUs `0..devices` with `kv_blocks_per_rank` blocks per rank, its weights read
    /// from `src`, on this blueprint's memory manager (so it can sit beside the running one and
    /// exchange KV with it): the cold-restart and colocated baselines.
    pub fn load_runner(
        &self,
        src: &dyn TensorSource,
        devices: usize,
        kv_blocks_per_rank: usize,
    ) -> Result<CudaRunner, CudaError> {
        let config = CudaConfig {
            devices,
            kv_blocks_per_rank,
            ..self.config
        };
        CudaRunner::build(&self.cfg, config, Fill::Source(src), Some(self.vmm.clone()))
    }

    /// The extravagant baseline's new instance: a runner on `target`, a device set disjoint
    /// from the running one `snap` describes ([`check_disjoint`]), with `kv_blocks_per_rank`
    /// blocks per rank and empty KV, every weight byte copied peer-to-peer from the running
    /// instance: the replicated weights striped over every running GPU, each routed expert
    /// from the GPU that holds it. Nothing is read from disk and nothing is shared zero-copy.
    /// Runs while the engine serves (it only reads the running instance's weights); switch to
    /// the runner with [`CudaRunner::install_runner`], which migrates every running sequence's
    /// KV into it. `snap` must still describe the running runner (a snapshot kept from the last
    /// switch does until the next one).
    ///
    /// The report's `workers_ms` is the new instance's start (contexts, kernels, empty chunks),
    /// `map_ms` the destination aliases, `copy_ms` the weight copies.
    pub fn copy_runner(
        &self,
        snap: &Snapshot,
        target: &[DeviceId],
        kv_blocks_per_rank: usize,
        transport: &CudaTransport,
    ) -> Result<(CudaRunner, PrepareReport), CudaError> {
        let t0 = Instant::now();
        let target = check_disjoint(&snap.devices, target, self.vmm.device_count())?;
        let model = Model::new(&self.cfg, CpuCompute::new())?;
        let layout = model.layout().clone();
        let es = self.dims.elem_bytes;
        let mut report = PrepareReport {
            plan_ms: ms(t0.elapsed()),
            ..PrepareReport::default()
        };

        let experts_of = |l: usize| {
            if self.cfg.is_moe_layer(l) {
                self.cfg.moe.num_experts
            } else {
                0
            }
        };
        if snap.experts.len() != self.cfg.num_layers
            || snap
                .experts
                .iter()
                .enumerate()
                .any(|(l, e)| e.len() != experts_of(l))
            || snap.global.is_empty()
            || snap.layers.iter().any(|l| l.len() != self.cfg.num_layers)
        {
            return Err(CudaError::Scale(
                "the snapshot does not describe a runner of this blueprint's model".into(),
            ));
        }

        let t = Instant::now();
        let config = CudaConfig {
            kv_blocks_per_rank,
            ..self.config
        };
        let next = CudaRunner::build_on(
            &self.cfg,
            config,
            Fill::Skip,
            Some(self.vmm.clone()),
            &target,
        )?;
        report.workers_ms = ms(t.elapsed());
        report.cold_workers = target.len();

        let t = Instant::now();
        let mut needs: Vec<Need> = Vec::new();
        let mut keep_alive: Vec<DevBuf> = Vec::new();
        // Each destination is written by the copy engine of its source GPU.
        let access_for = |dev: DeviceId| {
            let mut a = snap.devices.clone();
            a.push(dev);
            a
        };
        let every: Vec<usize> = (0..snap.devices.len()).collect();
        for r in &next.ranks {
            self.replicated_needs(snap, &every, r, &layout, &mut needs, &mut keep_alive)?;
        }
        let ebytes = (layout.expert_floats() * es) as u64;
        for (new_layer, old_layer) in next.experts.iter().zip(&snap.experts) {
            for (e, cur) in new_layer.iter().zip(old_layer) {
                let a = alias(&self.vmm, &BufRef::of(&e.buf), &access_for(e.dev))?;
                needs.push(Need::new(
                    Location::new(e.dev, a.addr()),
                    ebytes,
                    vec![Location::new(cur.dev, cur.addr)],
                ));
                keep_alive.push(a);
            }
        }
        report.map_ms = ms(t.elapsed());
        copy_needs(&needs, transport, &mut report)?;
        drop(keep_alive);
        Ok((next, report))
    }

    /// Peer-copy needs for a new rank's replicated weights (the global chunk and every layer's),
    /// each to be read from every holder (`holders`: rank indices of `snap`): `r`'s buffers are
    /// aliased writable by the holders' GPUs (a destination is written by its source GPU's copy
    /// engine), the aliases kept in `keep_alive` until the copies end.
    fn replicated_needs(
        &self,
        snap: &Snapshot,
        holders: &[usize],
        r: &RankState,
        layout: &WeightLayout,
        needs: &mut Vec<Need>,
        keep_alive: &mut Vec<DevBuf>,
    ) -> Result<(), CudaError> {
        let es = self.dims.elem_bytes;
        let from = |pick: &dyn Fn(usize) -> Option<u64>| -> Vec<Location> {
            holders
                .iter()
                .filter_map(|&i| pick(i).map(|a| Location::new(snap.devices[i], a)))
                .collect()
        };
        let mut access: Vec<DeviceId> = holders.iter().map(|&i| snap.devices[i]).collect();
        access.push(r.dev);
        let g = alias(&self.vmm, &BufRef::of(&r.global), &access)?;
        needs.push(Need::new(
            Location::new(r.dev, g.addr()),
            (layout.global().floats() * es) as u64,
            from(&|i| snap.global.get(i).map(|b| b.addr)),
        ));
        keep_alive.push(g);
        for (l, buf) in r.layers.iter().enumerate() {
            let len = (layout.layer(l).map_or(0, |c| c.floats()) * es) as u64;
            if len == 0 {
                continue;
            }
            let a = alias(&self.vmm, &BufRef::of(buf), &access)?;
            needs.push(Need::new(
                Location::new(r.dev, a.addr()),
                len,
                from(&|i| snap.layers.get(i).and_then(|ls| ls.get(l)).map(|b| b.addr)),
            ));
            keep_alive.push(a);
        }
        Ok(())
    }

    /// Builds the configuration for `target` beside the running one described by `snap`
    /// (see the module docs). Runs while the engine serves. The same as [`Blueprint::stage`]
    /// then [`Blueprint::fill`].
    pub fn prepare(
        &self,
        snap: Snapshot,
        target: &[DeviceId],
        pool: &mut CudaWarmPool,
        transport: &Arc<CudaTransport>,
    ) -> Result<Prepared, CudaError> {
        let staged = self.stage(snap, target, pool)?;
        Self::fill(staged, transport)
    }

    /// The first half of [`Blueprint::prepare`], everything but the copies: joining ranks from
    /// the pool, the new expert ranges reserved with kept experts mapped (zero-copy) and fresh
    /// chunks mapped for moving ones, aliases, access. Touches no byte the runner reads, so it
    /// can run ahead of a scale request (it holds the fresh chunks' memory until used or
    /// dropped); valid while `snap` describes the runner (until its next switch).
    pub fn stage(
        &self,
        snap: Snapshot,
        target: &[DeviceId],
        pool: &mut CudaWarmPool,
    ) -> Result<Staged, CudaError> {
        let t0 = Instant::now();
        let mut target = target.to_vec();
        target.sort();
        target.dedup();
        if target.is_empty() {
            return Err(CudaError::Scale("the target device set is empty".into()));
        }
        let n_dev = self.vmm.device_count();
        if let Some(d) = target.iter().find(|d| d.index() >= n_dev) {
            return Err(CudaError::Scale(format!(
                "device {} does not exist ({n_dev} GPUs)",
                d.0
            )));
        }
        if target == snap.devices {
            return Err(CudaError::Scale(
                "the target device set is the running one".into(),
            ));
        }
        let old: BTreeSet<DeviceId> = snap.devices.iter().copied().collect();
        let new: BTreeSet<DeviceId> = target.iter().copied().collect();
        let staying: Vec<usize> = (0..snap.devices.len())
            .filter(|&i| new.contains(&snap.devices[i]))
            .collect();
        if staying.is_empty() {
            return Err(CudaError::Scale(
                "no GPU stays: the elastic strategy needs at least one GPU of the running set \
                 in the target (use a disjoint-set baseline instead)"
                    .into(),
            ));
        }
        let leaving: Vec<DeviceId> = old.difference(&new).copied().collect();
        let union: Vec<DeviceId> = old.union(&new).copied().collect();
        let model = Model::new(&self.cfg, CpuCompute::new())?;
        let layout = model.layout().clone();
        let es = self.dims.elem_bytes;
        let mut report = PrepareReport {
            plan_ms: ms(t0.elapsed()),
            ..PrepareReport::default()
        };

        // Joining ranks from the warm pool.
        let t = Instant::now();
        let mut joining = Vec::new();
        for &d in new.difference(&old) {
            match pool.take(d) {
                Some(r) => {
                    report.warm_hits += 1;
                    joining.push(r);
                }
                None => {
                    report.cold_workers += 1;
                    joining.push(self.warm_rank(d)?);
                }
            }
        }
        report.workers_ms = ms(t.elapsed());

        let t = Instant::now();
        let mut needs: Vec<Need> = Vec::new();
        let mut keep_alive: Vec<DevBuf> = Vec::new();
        // Replicated weights of joining ranks, from every staying holder.
        for r in &joining {
            self.replicated_needs(&snap, &staying, r, &layout, &mut needs, &mut keep_alive)?;
        }
        // Routed experts: new contiguous ranges per (layer, device).
        let ebytes = (layout.expert_floats() * es) as u64;
        let n = target.len();
        let mut experts: Vec<Vec<ExpertBuf>> = Vec::with_capacity(snap.experts.len());
        for layer in &snap.experts {
            let e_count = layer.len();
            let mut slots: Vec<Option<ExpertBuf>> = (0..e_count).map(|_| None).collect();
            if let Some(first) = layer.first() {
                let pad = first.len;
                for (i, &d) in target.iter().enumerate() {
                    let range = expert_range(i, n, e_count);
                    if range.is_empty() {
                        continue;
                    }
                    let res = self.vmm.reserve(d, pad * range.len())?;
                    res.set_access(&union)?;
                    for (k, ex) in range.enumerate() {
                        let cur = &layer[ex];
                        if cur.len != pad {
                            return Err(CudaError::Scale(
                                "routed experts of one layer have different chunk sizes".into(),
                            ));
                        }
                        let map = if cur.dev == d {
                            report.bytes_zero_copy += ebytes;
                            res.map(k * pad, &cur.chunk, cur.chunk_offset, pad)?
                        } else {
                            let chunk = match pool.take_chunk(d, pad) {
                                Some(c) => {
                                    report.prewarmed_chunks += 1;
                                    c
                                }
                                None => self.vmm.create_chunk(d, pad, false)?,
                            };
                            let map = res.map(k * pad, &chunk, 0, pad)?;
                            needs.push(Need::new(
                                Location::new(d, map.addr()),
                                ebytes,
                                vec![Location::new(cur.dev, cur.addr)],
                            ));
                            map
                        };
                        slots[ex] = Some(ExpertBuf {
                            dev: d,
                            buf: DevBuf { map },
                        });
                    }
                }
            }
            experts.push(
                slots
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| CudaError::Scale("an expert was left without a slot".into()))?,
            );
        }
        // Scale-down: staying ranks' KV, writable by the leaving GPUs. Scale-up: joining ranks'
        // KV, writable by the staying GPUs (the switch moves a share of the running sequences
        // onto the joining ranks, see `CudaRunner::install`).
        let mut kv_alias = BTreeMap::new();
        if !leaving.is_empty() {
            for &i in &staying {
                let d = snap.devices[i];
                let mut access = leaving.clone();
                access.push(d);
                kv_alias.insert(d, alias(&self.vmm, &snap.kv[i], &access)?);
            }
        } else {
            for r in &joining {
                let mut access: Vec<DeviceId> = staying.iter().map(|&i| snap.devices[i]).collect();
                access.push(r.dev);
                kv_alias.insert(r.dev, alias(&self.vmm, &BufRef::of(&r.kv), &access)?);
            }
        }
        report.map_ms = ms(t.elapsed());
        Ok(Staged {
            snapshot: snap,
            target,
            joining,
            experts,
            kv_alias,
            needs,
            keep_alive,
            report,
        })
    }

    /// The second half of [`Blueprint::prepare`]: the copies of a [`Staged`] configuration,
    /// planned over the holders and pushed on the transport's low-priority copy streams.
    pub fn fill(staged: Staged, transport: &Arc<CudaTransport>) -> Result<Prepared, CudaError> {
        let Staged {
            snapshot: snap,
            target,
            joining,
            experts,
            kv_alias,
            needs,
            keep_alive,
            mut report,
        } = staged;
        copy_needs(&needs, transport, &mut report)?;
        drop(keep_alive);
        Ok(Prepared {
            snapshot: snap,
            target,
            joining,
            experts,
            kv_alias,
            transport: Arc::clone(transport),
            report,
        })
    }
}

/// Copies `needs` (each from any of its holders), planned over the holders and pushed on the
/// transport's low-priority copy streams; records plan time, bytes, the most bytes into one
/// device, copy time and rate in `report`.
fn copy_needs(
    needs: &[Need],
    transport: &CudaTransport,
    report: &mut PrepareReport,
) -> Result<(), CudaError> {
    if needs.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    let planner = Planner::new(LinkModel::nvlink4(), PlannerConfig::default())
        .map_err(|e| scale_err("planning the copies")(e.to_string()))?;
    let plan = planner
        .plan(needs)
        .map_err(|e| scale_err("planning the copies")(e.to_string()))?;
    let mut into: BTreeMap<DeviceId, u64> = BTreeMap::new();
    for need in needs {
        *into.entry(need.dst.device).or_default() += need.len;
    }
    report.max_bytes_into_device = into.values().copied().max().unwrap_or(0);
    report.bytes_moved = needs.iter().map(|n| n.len).sum();
    report.plan_ms += ms(t.elapsed());
    let t = Instant::now();
    let ticket = transport
        .submit(&plan.batch())
        .map_err(|e| scale_err("submitting the copies")(e.to_string()))?;
    let done = ticket
        .wait()
        .map_err(|e| scale_err("copying")(e.to_string()))?;
    report.copy_ms = ms(t.elapsed());
    report.copy_gbps = done.gbps();
    Ok(())
}

/// A sequence whose KV moves from one rank to another.
struct Move {
    seq: RequestId,
    from: RankId,
    src_blocks: Vec<u32>,
}

/// The running sequences of `ranks` and their blocks in `ledger`.
fn moves_of(sched: &Scheduler, ledger: &BlockLedger, ranks: &[RankId]) -> Vec<Move> {
    let mut out = Vec::new();
    for &from in ranks {
        for &seq in sched.running_on(from) {
            let src_blocks = ledger
                .rank(from)
                .and_then(|l| l.tables.get(&seq))
                .cloned()
                .unwrap_or_default();
            out.push(Move {
                seq,
                from,
                src_blocks,
            });
        }
    }
    out
}

/// Scale-up by `joining` ranks: from each of `staying` running more than its even share
/// (`ceil(total / (staying + joining))`), the sequences beyond it, those with the fewest KV
/// blocks first (the least to copy).
fn balance_moves(
    sched: &Scheduler,
    ledger: &BlockLedger,
    staying: &[RankId],
    joining: usize,
) -> Vec<Move> {
    let total: usize = staying.iter().map(|&r| sched.running_on(r).len()).sum();
    let ranks = staying.len() + joining;
    if joining == 0 || ranks == 0 {
        return Vec::new();
    }
    let share = total.div_ceil(ranks);
    let mut out = Vec::new();
    for &from in staying {
        let mut here = moves_of(sched, ledger, &[from]);
        let extra = here.len().saturating_sub(share);
        here.sort_by_key(|m| (m.src_blocks.len(), m.seq));
        out.extend(here.into_iter().take(extra));
    }
    out
}

/// Gives each move blocks on the destination rank (of `targets`) with the most free blocks that
/// has room; `None` where none has.
fn place(
    moves: &[Move],
    dst: &mut BlockLedger,
    targets: &[RankId],
    bt: usize,
) -> Vec<Option<(RankId, Vec<u32>)>> {
    moves
        .iter()
        .map(|m| {
            let need = m.src_blocks.len();
            let best = targets
                .iter()
                .filter_map(|&r| dst.rank(r).map(|l| (l.free.len(), r)))
                .filter(|&(free, _)| free >= need)
                .max_by_key(|&(free, r)| (free, std::cmp::Reverse(r)))
                .map(|(_, r)| r)?;
            if !dst.grow(best, m.seq, need * bt) {
                return None;
            }
            let blocks = dst.rank(best)?.tables.get(&m.seq).cloned()?;
            Some((best, blocks))
        })
        .collect()
}

/// Pairs `(src[i], dst[i])` grouped into maximal runs where both sides are consecutive:
/// `(first src block, first dst block, blocks)`.
fn block_runs(src: &[u32], dst: &[u32]) -> Vec<(u32, u32, u64)> {
    let mut runs: Vec<(u32, u32, u64)> = Vec::new();
    for (&s, &d) in src.iter().zip(dst) {
        match runs.last_mut() {
            Some((s0, d0, len))
                if u64::from(s) == u64::from(*s0) + *len
                    && u64::from(d) == u64::from(*d0) + *len =>
            {
                *len += 1;
            }
            _ => runs.push((s, d, 1)),
        }
    }
    runs
}

/// Copy ops for the placed moves, contiguous runs of blocks coalesced.
fn kv_ops(
    moves: &[Move],
    placed: &[Option<(RankId, Vec<u32>)>],
    src_kv: &BTreeMap<RankId, (DeviceId, u64)>,
    dst_kv: &BTreeMap<RankId, (DeviceId, u64)>,
    block_bytes: u64,
) -> Result<Vec<CopyOp>, CudaError> {
    let mut ops: Vec<CopyOp> = Vec::new();
    for (m, p) in moves.iter().zip(placed) {
        let Some((to, dst_blocks)) = p else { continue };
        let &(sd, sbase) = src_kv
            .get(&m.from)
            .ok_or_else(|| CudaError::Scale(format!("no KV address for {}", m.from)))?;
        let &(dd, dbase) = dst_kv
            .get(to)
            .ok_or_else(|| CudaError::Scale(format!("no KV address for {to}")))?;
        for (s0, d0, len) in block_runs(&m.src_blocks, dst_blocks) {
            ops.push(CopyOp::new(
                Location::new(sd, sbase + u64::from(s0) * block_bytes),
                Location::new(dd, dbase + u64::from(d0) * block_bytes),
                len * block_bytes,
            ));
        }
    }
    Ok(ops)
}

fn copy_now(transport: &CudaTransport, ops: &[CopyOp]) -> Result<u64, CudaError> {
    if ops.is_empty() {
        return Ok(0);
    }
    let ticket = transport
        .submit(ops)
        .map_err(|e| scale_err("submitting the KV copies")(e.to_string()))?;
    let r = ticket
        .wait()
        .map_err(|e| scale_err("copying KV")(e.to_string()))?;
    Ok(r.bytes)
}

impl CudaRunner {
    /// The GPUs serving, in rank order.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.ranks.iter().map(|r| r.dev).collect()
    }

    /// What it takes to make more ranks or runners like this one.
    pub fn blueprint(&self) -> Blueprint {
        Blueprint {
            vmm: self.vmm.clone(),
            cfg: self.cfg.clone(),
            config: self.config,
            dims: self.dims,
            geo: self.geo,
        }
    }

    /// Handles to every chunk it serves from (cheap: run it between iterations).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            devices: self.devices(),
            global: self.ranks.iter().map(|r| BufRef::of(&r.global)).collect(),
            layers: self
                .ranks
                .iter()
                .map(|r| r.layers.iter().map(BufRef::of).collect())
                .collect(),
            kv: self.ranks.iter().map(|r| BufRef::of(&r.kv)).collect(),
            experts: self
                .experts
                .iter()
                .map(|l| l.iter().map(|e| BufRef::of(&e.buf)).collect())
                .collect(),
        }
    }

    /// The switch: installs `next` (built from a snapshot of this runner) between two
    /// iterations. Leaving ranks' sequences move with their KV; see the module docs. On an
    /// error nothing changed (except sequences already re-queued, which recompute).
    pub fn install(
        &mut self,
        next: Prepared,
        sched: &mut Scheduler,
    ) -> Result<(SwitchReport, Retired), CudaError> {
        let t0 = Instant::now();
        if self.devices() != next.snapshot.devices {
            return Err(CudaError::Scale(format!(
                "prepared for devices {:?} but the runner serves on {:?}",
                next.snapshot.devices,
                self.devices()
            )));
        }
        if !next.snapshot.describes(self) {
            return Err(CudaError::Scale(
                "prepared from a stale snapshot: the runner's buffers changed since it was taken"
                    .into(),
            ));
        }
        let target: BTreeSet<DeviceId> = next.target.iter().copied().collect();
        let leaving: Vec<RankId> = self
            .ranks
            .iter()
            .filter(|r| !target.contains(&r.dev))
            .map(|r| RankId(r.dev.0))
            .collect();
        let staying: Vec<RankId> = self
            .ranks
            .iter()
            .filter(|r| target.contains(&r.dev))
            .map(|r| RankId(r.dev.0))
            .collect();
        let mut report = SwitchReport::default();
        // Joining ranks open first (their ledgers are empty).
        for r in &next.joining {
            self.ledger.ranks.push((
                RankId(r.dev.0),
                RankBlocks {
                    total: self.config.kv_blocks_per_rank,
                    free: (0..self.config.kv_blocks_per_rank as u32).rev().collect(),
                    tables: BTreeMap::new(),
                },
            ));
            sched.add_rank(RankId(r.dev.0));
        }
        self.ledger.ranks.sort_by_key(|(r, _)| *r);
        // Leaving ranks: closed, their sequences moved with their KV.
        for &r in &leaving {
            let _ = sched.close_rank(r);
        }
        let joined: Vec<RankId> = next.joining.iter().map(|r| RankId(r.dev.0)).collect();
        let (moves, targets) = if leaving.is_empty() {
            // Scale-up: the joining ranks take an even share of the running sequences now,
            // instead of only the new arrivals (which would leave every step, in lock step across
            // the ranks, waiting for the old ranks' larger batches until the load evens out).
            (
                balance_moves(sched, &self.ledger, &staying, joined.len()),
                &joined,
            )
        } else {
            (moves_of(sched, &self.ledger, &leaving), &staying)
        };
        let bt = self.config.block_tokens;
        let placed = place(&moves, &mut self.ledger, targets, bt);
        let src_kv: BTreeMap<RankId, (DeviceId, u64)> = self
            .ranks
            .iter()
            .map(|r| (RankId(r.dev.0), (r.dev, r.kv.addr())))
            .collect();
        let dst_kv: BTreeMap<RankId, (DeviceId, u64)> = next
            .kv_alias
            .iter()
            .map(|(d, b)| (RankId(d.0), (*d, b.addr())))
            .collect();
        let block_bytes = (self.geo.block_floats() * 4) as u64;
        let t = Instant::now();
        let copied = kv_ops(&moves, &placed, &src_kv, &dst_kv, block_bytes)
            .and_then(|ops| copy_now(&next.transport, &ops));
        report.kv_copy_ms = ms(t.elapsed());
        match copied {
            Ok(bytes) => report.kv_bytes = bytes,
            Err(e) => {
                // Undo: the destination blocks go back, the leaving ranks reopen.
                for (m, p) in moves.iter().zip(&placed) {
                    if let Some((to, _)) = p {
                        self.ledger.release(*to, m.seq);
                    }
                }
                for &r in &leaving {
                    sched.add_rank(r);
                }
                for r in &next.joining {
                    let _ = sched.close_rank(RankId(r.dev.0));
                }
                self.ledger
                    .ranks
                    .retain(|(r, _)| !next.joining.iter().any(|j| j.dev.0 == r.0));
                return Err(e);
            }
        }
        for (m, p) in moves.iter().zip(&placed) {
            match p {
                Some((to, _)) => {
                    self.ledger.release(m.from, m.seq);
                    if sched.move_to(m.seq, *to).is_ok() {
                        report.migrated += 1;
                    } else {
                        self.ledger.release(*to, m.seq);
                        report.requeued += 1;
                    }
                }
                None => report.requeued += 1,
            }
        }
        for &r in &leaving {
            // Whatever could not move is re-queued here (its KV released).
            let _ = sched.remove_rank(r, &mut self.ledger);
        }
        self.ledger.ranks.retain(|(r, _)| !leaving.contains(r));
        // The pointer swap.
        let Prepared {
            joining,
            experts,
            kv_alias,
            snapshot,
            ..
        } = next;
        let old_ranks = std::mem::take(&mut self.ranks);
        let (stay, gone): (Vec<RankState>, Vec<RankState>) =
            old_ranks.into_iter().partition(|r| target.contains(&r.dev));
        self.ranks = stay;
        self.ranks.extend(joining);
        self.ranks.sort_by_key(|r| r.dev);
        let old_experts = std::mem::replace(&mut self.experts, experts);
        self.config.devices = self.ranks.len();
        report.total_ms = ms(t0.elapsed());
        Ok((
            report,
            Retired {
                ranks: gone,
                experts: old_experts,
                _runner: None,
                _aliases: kv_alias.into_values().collect(),
                _snapshot: Some(snapshot),
            },
        ))
    }

    /// The colocated baseline's switch: replaces this runner by `next` (built beside it on the
    /// same memory manager with [`Blueprint::load_runner`]), moving every running sequence's
    /// KV to `next`'s rank on the same GPU, or to its rank with the most free blocks where its
    /// GPU leaves. `next` takes this runner's settings (phase timing, expert parallelism,
    /// dispatch thresholds), as [`CudaRunner::restart_from`]'s reloaded runner does. The old
    /// runner comes back in the [`Retired`].
    pub fn install_runner(
        &mut self,
        mut next: CudaRunner,
        transport: &CudaTransport,
        sched: &mut Scheduler,
    ) -> Result<(SwitchReport, Retired), CudaError> {
        let t0 = Instant::now();
        if !self.vmm.same(&next.vmm) {
            return Err(CudaError::Scale(
                "the next runner lives on another memory manager; build it with \
                 Blueprint::load_runner"
                    .into(),
            ));
        }
        next.adopt_settings(self);
        let old_ranks: Vec<RankId> = self.ranks.iter().map(|r| RankId(r.dev.0)).collect();
        let new_ranks: Vec<RankId> = next.ranks.iter().map(|r| RankId(r.dev.0)).collect();
        let union: Vec<DeviceId> = self
            .devices()
            .into_iter()
            .chain(next.devices())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // The next runner's KV, writable from every GPU involved.
        let mut aliases = Vec::new();
        let mut dst_kv = BTreeMap::new();
        for r in &next.ranks {
            let a = alias(&self.vmm, &BufRef::of(&r.kv), &union)?;
            dst_kv.insert(RankId(r.dev.0), (r.dev, a.addr()));
            aliases.push(a);
        }
        let src_kv: BTreeMap<RankId, (DeviceId, u64)> = self
            .ranks
            .iter()
            .map(|r| (RankId(r.dev.0), (r.dev, r.kv.addr())))
            .collect();
        let moves = moves_of(sched, &self.ledger, &old_ranks);
        let bt = self.config.block_tokens;
        let mut placed = Vec::with_capacity(moves.len());
        for m in &moves {
            let prefer = if new_ranks.contains(&m.from) {
                vec![m.from]
            } else {
                new_ranks.clone()
            };
            let mut p = place(std::slice::from_ref(m), &mut next.ledger, &prefer, bt);
            if p[0].is_none() && prefer.len() == 1 {
                p = place(std::slice::from_ref(m), &mut next.ledger, &new_ranks, bt);
            }
            placed.push(p.pop().flatten());
        }
        let block_bytes = (self.geo.block_floats() * 4) as u64;
        let t = Instant::now();
        let bytes = copy_now(
            transport,
            &kv_ops(&moves, &placed, &src_kv, &dst_kv, block_bytes)?,
        )?;
        let mut report = SwitchReport {
            kv_bytes: bytes,
            kv_copy_ms: ms(t.elapsed()),
            ..SwitchReport::default()
        };
        for &r in &new_ranks {
            sched.add_rank(r);
        }
        for (m, p) in moves.iter().zip(&placed) {
            self.ledger.release(m.from, m.seq);
            match p {
                Some((to, _)) if *to == m.from || sched.move_to(m.seq, *to).is_ok() => {
                    report.migrated += 1;
                }
                Some((to, _)) => {
                    next.ledger.release(*to, m.seq);
                    let _ = sched.requeue(m.seq, &mut next.ledger);
                    report.requeued += 1;
                }
                None => {
                    let _ = sched.requeue(m.seq, &mut next.ledger);
                    report.requeued += 1;
                }
            }
        }
        for r in old_ranks.iter().filter(|r| !new_ranks.contains(r)) {
            let _ = sched.close_rank(*r);
            let _ = sched.remove_rank(*r, &mut next.ledger);
        }
        let old = std::mem::replace(self, next);
        report.total_ms = ms(t0.elapsed());
        Ok((
            report,
            Retired {
                ranks: Vec::new(),
                experts: Vec::new(),
                _runner: Some(old),
                _aliases: aliases,
                _snapshot: None,
            },
        ))
    }

    /// The cold-restart baseline, inside the boundary action that holds the serving loop:
    /// re-queues every running sequence (their KV is released: they recompute), releases every
    /// chunk of this runner, and reloads the model from `src` on GPUs `0..devices`. If the
    /// reload fails, it reloads on the old device count instead and returns the error.
    pub fn restart_from(
        &mut self,
        src: &dyn TensorSource,
        devices: usize,
        sched: &mut Scheduler,
    ) -> Result<usize, CudaError> {
        let old: Vec<RankId> = self.ranks.iter().map(|r| RankId(r.dev.0)).collect();
        let mut requeued = 0;
        for &r in &old {
            for seq in sched.running_on(r).to_vec() {
                if sched.requeue(seq, &mut self.ledger).is_ok() {
                    requeued += 1;
                }
            }
        }
        let bp = self.blueprint();
        let old_count = self.ranks.len();
        for r in &self.ranks {
            let _ = r.bind();
            let _ = r.stream.synchronize();
        }
        self.experts.clear();
        self.ranks.clear();
        let kv = self.config.kv_blocks_per_rank;
        let (mut next, err) = match bp.load_runner(src, devices, kv) {
            Ok(n) => (n, None),
            Err(e) => (bp.load_runner(src, old_count, kv)?, Some(e)),
        };
        next.adopt_settings(self);
        let new: Vec<RankId> = next.ranks.iter().map(|r| RankId(r.dev.0)).collect();
        for r in old.iter().filter(|r| !new.contains(r)) {
            let _ = sched.close_rank(*r);
            let _ = sched.remove_rank(*r, &mut self.ledger);
        }
        for &r in &new {
            sched.add_rank(r);
        }
        *self = next;
        match err {
            Some(e) => Err(e),
            None => Ok(requeued),
        }
    }
}

/// Why a target device set cannot take the extravagant baseline's new instance (it must be
/// disjoint from the running set, on GPUs that exist).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceSetError {
    /// No target device.
    #[error("the target device set is empty")]
    Empty,
    /// Fewer free GPUs than the new instance needs.
    #[error(
        "the extravagant baseline needs {need} GPUs (a disjoint set of {to} beside the {running} \
         serving); {have} present"
    )]
    TooFewGpus {
        /// GPUs serving now.
        running: usize,
        /// GPUs the new instance asks for.
        to: usize,
        /// `running + to`.
        need: usize,
        /// GPUs present.
        have: usize,
    },
    /// A target GPU that does not exist.
    #[error("GPU {device} does not exist ({have} present)")]
    NoSuchDevice {
        /// The GPU asked for.
        device: u32,
        /// GPUs present.
        have: usize,
    },
    /// A GPU named twice in the target.
    #[error("GPU {device} is named twice in the target device set")]
    Duplicate {
        /// The GPU.
        device: u32,
    },
    /// A target GPU that is serving now.
    #[error(
        "the target device set {target:?} shares GPU {device} with the running set {running:?}; \
         the extravagant baseline needs a disjoint set"
    )]
    Overlap {
        /// The first shared GPU.
        device: u32,
        /// The running GPUs.
        running: Vec<u32>,
        /// The target GPUs.
        target: Vec<u32>,
    },
}

/// The extravagant baseline's new device set: the `to` lowest-numbered of `gpus` GPUs that are
/// not in `running` (1→2 from GPU 0 on 3 GPUs: GPUs 1 and 2; 2→1 from GPUs 0, 1: GPU 2).
pub fn disjoint_devices(
    running: &[DeviceId],
    to: usize,
    gpus: usize,
) -> Result<Vec<DeviceId>, DeviceSetError> {
    if to == 0 {
        return Err(DeviceSetError::Empty);
    }
    let busy: BTreeSet<DeviceId> = running.iter().copied().collect();
    let free: Vec<DeviceId> = (0..gpus as u32)
        .map(DeviceId)
        .filter(|d| !busy.contains(d))
        .take(to)
        .collect();
    if free.len() < to {
        return Err(DeviceSetError::TooFewGpus {
            running: busy.len(),
            to,
            need: busy.len() + to,
            have: gpus,
        });
    }
    Ok(free)
}

/// Checks that `target` can take a new instance beside `running` on a machine of `gpus` GPUs:
/// not empty, no GPU twice, every GPU present, none serving now. Returns it sorted.
pub fn check_disjoint(
    running: &[DeviceId],
    target: &[DeviceId],
    gpus: usize,
) -> Result<Vec<DeviceId>, DeviceSetError> {
    if target.is_empty() {
        return Err(DeviceSetError::Empty);
    }
    let mut sorted = target.to_vec();
    sorted.sort();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(DeviceSetError::Duplicate { device: w[0].0 });
    }
    if let Some(d) = sorted.iter().find(|d| d.index() >= gpus) {
        return Err(DeviceSetError::NoSuchDevice {
            device: d.0,
            have: gpus,
        });
    }
    if let Some(d) = sorted.iter().find(|d| running.contains(d)) {
        return Err(DeviceSetError::Overlap {
            device: d.0,
            running: running.iter().map(|d| d.0).collect(),
            target: target.iter().map(|d| d.0).collect(),
        });
    }
    Ok(sorted)
}

/// GPUs `0..n`, as the device ids [`Blueprint::prepare`] and [`peer_bandwidth`] take.
pub fn first_devices(n: usize) -> Vec<DeviceId> {
    (0..n as u32).map(DeviceId).collect()
}

/// Peer copy bandwidth from `src` to `dst` in 10⁹ bytes per second, measured through
/// `transport` with `iters` copies of `bytes` bytes (after one warm-up copy).
pub fn peer_bandwidth(
    bp: &Blueprint,
    transport: &CudaTransport,
    src: DeviceId,
    dst: DeviceId,
    bytes: usize,
    iters: usize,
) -> Result<f64, CudaError> {
    let a = DevBuf::new(&bp.vmm, src, bytes, &[])?;
    let b = DevBuf::new(&bp.vmm, dst, bytes, &[src, dst])?;
    let op = CopyOp::new(
        Location::new(src, a.addr()),
        Location::new(dst, b.addr()),
        bytes as u64,
    );
    copy_now(transport, &[op])?;
    let t = Instant::now();
    let mut moved = 0u64;
    for _ in 0..iters.max(1) {
        moved += copy_now(transport, &[op])?;
    }
    Ok(moved as f64 / t.elapsed().as_secs_f64() / 1e9)
}

#[cfg(test)]
mod tests {
    use super::{
        balance_moves, block_runs, check_disjoint, disjoint_devices, expert_range, moving_chunks,
        place, DeviceSetError, Move,
    };
    use crate::kv_ledger::{BlockLedger, RankBlocks};
    use hbm_vmm::DeviceId;
    use moe_engine::{RankId, RequestId};
    use moe_engine::{Scheduler, SchedulerConfig};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn expert_ranges_match_the_runners_placement_and_cover_every_expert() {
        for experts in [1usize, 7, 64, 128] {
            for n in 1..=4usize {
                let mut seen = Vec::new();
                for i in 0..n {
                    for e in expert_range(i, n, experts) {
                        assert_eq!(e * n / experts, i, "expert {e} of {experts} on {n}");
                        seen.push(e);
                    }
                }
                assert_eq!(seen, (0..experts).collect::<Vec<_>>());
            }
        }
    }

    fn ledger(free: &[(u32, u32)]) -> BlockLedger {
        BlockLedger {
            block_tokens: 4,
            ranks: free
                .iter()
                .map(|&(r, n)| {
                    (
                        RankId(r),
                        RankBlocks {
                            total: n as usize,
                            free: (0..n).rev().collect(),
                            tables: BTreeMap::new(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_scale_up_moves_each_rank_s_shortest_sequences_beyond_an_even_share() {
        let ranks = [RankId(0), RankId(1)];
        let mut l = ledger(&[(0, 256), (1, 256)]);
        let config = SchedulerConfig {
            max_batch_tokens: 4096,
            max_running_per_rank: 16,
        };
        let mut s = Scheduler::new(config, ranks);
        for i in 0..11u64 {
            s.add(RequestId(i), 3 + 5 * i as usize).unwrap();
        }
        let _ = s.schedule(&mut l);
        let counts: Vec<usize> = ranks.iter().map(|&r| s.running_on(r).len()).collect();
        let total: usize = counts.iter().sum();
        assert!(total >= 8, "the scheduler admitted {counts:?}");
        let moves = balance_moves(&s, &l, &ranks, 2);
        let share = total.div_ceil(4);
        let want: usize = counts.iter().map(|c| c.saturating_sub(share)).sum();
        assert_eq!(moves.len(), want, "{counts:?}, share {share}");
        let blocks = |r: RankId, q: RequestId| l.rank(r).unwrap().tables[&q].len();
        for &r in &ranks {
            let moved: Vec<RequestId> = moves
                .iter()
                .filter(|m| m.from == r)
                .map(|m| m.seq)
                .collect();
            for m in moves.iter().filter(|m| m.from == r) {
                assert_eq!(m.src_blocks.len(), blocks(r, m.seq));
            }
            // What stays has at least as many blocks as anything that moves.
            for &kept in s.running_on(r).iter().filter(|q| !moved.contains(q)) {
                for &q in &moved {
                    assert!(blocks(r, q) <= blocks(r, kept), "{q} moved before {kept}");
                }
            }
        }
        // Nothing joins: nothing moves.
        assert!(balance_moves(&s, &l, &ranks, 0).is_empty());
    }

    /// Experts of `layers` layers of `experts` each, placed over `n` devices as the runner does.
    fn placed(layers: usize, experts: usize, n: usize, len: usize) -> Vec<Vec<(DeviceId, usize)>> {
        (0..layers)
            .map(|_| {
                (0..experts)
                    .map(|e| (DeviceId((e * n / experts) as u32), len))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn moving_chunks_count_what_a_step_moves_onto_each_device() {
        // 1→2 of 2 layers × 8 experts: the upper half of every layer moves to GPU 1.
        let one = placed(2, 8, 1, 4096);
        let up = moving_chunks(&one, &[DeviceId(0), DeviceId(1)]);
        assert_eq!(up, BTreeMap::from([((DeviceId(1), 4096), 8)]));
        // 2→1: GPU 1's experts come back to GPU 0.
        let two = placed(2, 8, 2, 4096);
        let down = moving_chunks(&two, &[DeviceId(0)]);
        assert_eq!(down, BTreeMap::from([((DeviceId(0), 4096), 8)]));
        // The running set: nothing moves.
        assert!(moving_chunks(&two, &[DeviceId(1), DeviceId(0)]).is_empty());
    }

    fn devs(ids: &[u32]) -> Vec<DeviceId> {
        ids.iter().copied().map(DeviceId).collect()
    }

    #[test]
    fn disjoint_devices_take_the_lowest_free_gpus() {
        // 1→2 on 3 GPUs from GPU 0: GPUs 1 and 2; 2→1 from GPUs 0, 1: GPU 2.
        assert_eq!(disjoint_devices(&devs(&[0]), 2, 3), Ok(devs(&[1, 2])));
        assert_eq!(disjoint_devices(&devs(&[0, 1]), 1, 3), Ok(devs(&[2])));
        // 2→4 on 8: GPUs 2..6; a running set not at the start leaves the gaps first.
        assert_eq!(
            disjoint_devices(&devs(&[0, 1]), 4, 8),
            Ok(devs(&[2, 3, 4, 5]))
        );
        assert_eq!(disjoint_devices(&devs(&[1, 2]), 2, 4), Ok(devs(&[0, 3])));
    }

    #[test]
    fn disjoint_devices_refuse_too_few_gpus_and_an_empty_target() {
        let err = disjoint_devices(&devs(&[0]), 2, 2).unwrap_err();
        assert_eq!(
            err,
            DeviceSetError::TooFewGpus {
                running: 1,
                to: 2,
                need: 3,
                have: 2
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("needs 3 GPUs") && msg.contains("2 present"),
            "{msg}"
        );
        assert_eq!(
            disjoint_devices(&devs(&[0, 1]), 4, 5),
            Err(DeviceSetError::TooFewGpus {
                running: 2,
                to: 4,
                need: 6,
                have: 5
            })
        );
        assert_eq!(
            disjoint_devices(&devs(&[0]), 0, 3),
            Err(DeviceSetError::Empty)
        );
    }

    #[test]
    fn check_disjoint_refuses_overlap_duplicates_and_missing_gpus() {
        assert_eq!(
            check_disjoint(&devs(&[0]), &devs(&[2, 1]), 3),
            Ok(devs(&[1, 2]))
        );
        let err = check_disjoint(&devs(&[0, 1]), &devs(&[1, 2]), 3).unwrap_err();
        assert_eq!(
            err,
            DeviceSetError::Overlap {
                device: 1,
                running: vec![0, 1],
                target: vec![1, 2]
            }
        );
        assert!(err.to_string().contains("disjoint"), "{err}");
        assert_eq!(
            check_disjoint(&devs(&[0]), &devs(&[1, 1]), 3),
            Err(DeviceSetError::Duplicate { device: 1 })
        );
        let err = check_disjoint(&devs(&[0]), &devs(&[1, 3]), 3).unwrap_err();
        assert_eq!(err, DeviceSetError::NoSuchDevice { device: 3, have: 3 });
        assert!(err.to_string().contains("GPU 3 does not exist"), "{err}");
        assert_eq!(
            check_disjoint(&devs(&[0]), &[], 3),
            Err(DeviceSetError::Empty)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// After a scale-up's moves every staying rank keeps at most the even share, keeps all
        /// it had if it had no more, and gives up its shortest sequences; every move names a
        /// sequence running on its rank with that rank's blocks, and no sequence moves twice.
        #[test]
        fn scale_up_moves_leave_every_rank_at_most_an_even_share(
            prompts in proptest::collection::vec(1usize..40, 0..24),
            staying in 1usize..4,
            joining in 0usize..4,
        ) {
            let ranks: Vec<RankId> = (0..staying as u32).map(RankId).collect();
            let free: Vec<(u32, u32)> = (0..staying as u32).map(|r| (r, 512)).collect();
            let mut l = ledger(&free);
            let config = SchedulerConfig {
                max_batch_tokens: 4096,
                max_running_per_rank: 64,
            };
            let mut s = Scheduler::new(config, ranks.clone());
            for (i, &n) in prompts.iter().enumerate() {
                s.add(RequestId(i as u64), n).unwrap();
            }
            let _ = s.schedule(&mut l);
            let moves = balance_moves(&s, &l, &ranks, joining);
            let total: usize = ranks.iter().map(|&r| s.running_on(r).len()).sum();
            if joining == 0 {
                prop_assert!(moves.is_empty());
                return Ok(());
            }
            let share = total.div_ceil(staying + joining);
            let mut seen = std::collections::BTreeSet::new();
            for m in &moves {
                prop_assert!(seen.insert(m.seq), "{} moves twice", m.seq);
                prop_assert!(s.running_on(m.from).contains(&m.seq));
                prop_assert_eq!(&m.src_blocks, &l.rank(m.from).unwrap().tables[&m.seq]);
            }
            for &r in &ranks {
                let here = s.running_on(r);
                let moved: Vec<RequestId> =
                    moves.iter().filter(|m| m.from == r).map(|m| m.seq).collect();
                prop_assert_eq!(here.len() - moved.len(), here.len().min(share));
                let blocks = |q: &RequestId| l.rank(r).unwrap().tables[q].len();
                let longest_moved = moved.iter().map(blocks).max().unwrap_or(0);
                for q in here.iter().filter(|q| !moved.contains(q)) {
                    prop_assert!(blocks(q) >= longest_moved);
                }
            }
        }

        /// The new set is disjoint from the running one, of the asked size, on GPUs that exist,
        /// and the lowest free ones; it is refused exactly when too few GPUs are free, and
        /// `check_disjoint` accepts it.
        #[test]
        fn disjoint_devices_are_free_lowest_and_checked(
            gpus in 1usize..10,
            running_mask in 0u32..1024,
            to in 1usize..10,
        ) {
            let running: Vec<DeviceId> = (0..gpus as u32)
                .filter(|d| running_mask & (1 << d) != 0)
                .map(DeviceId)
                .collect();
            let free: Vec<DeviceId> = (0..gpus as u32)
                .map(DeviceId)
                .filter(|d| !running.contains(d))
                .collect();
            match disjoint_devices(&running, to, gpus) {
                Ok(got) => {
                    prop_assert_eq!(&got, &free[..to].to_vec());
                    prop_assert_eq!(check_disjoint(&running, &got, gpus), Ok(got.clone()));
                }
                Err(e) => {
                    prop_assert!(free.len() < to);
                    prop_assert_eq!(
                        e,
                        DeviceSetError::TooFewGpus {
                            running: running.len(),
                            to,
                            need: running.len() + to,
                            have: gpus,
                        }
                    );
                }
            }
        }

        /// Every expert whose owner changes is counted once, on its new owner, and no other.
        #[test]
        fn moving_chunks_match_the_placement_change(
            layers in 1usize..4,
            experts in 1usize..40,
            from in 1usize..5,
            to in 1usize..5,
        ) {
            let cur = placed(layers, experts, from, 64);
            let target: Vec<DeviceId> = (0..to as u32).map(DeviceId).collect();
            let got = moving_chunks(&cur, &target);
            let mut want: BTreeMap<(DeviceId, usize), usize> = BTreeMap::new();
            for layer in &cur {
                for (e, &(d, _)) in layer.iter().enumerate() {
                    let new = DeviceId((e * to / experts) as u32);
                    if new != d {
                        *want.entry((new, 64)).or_insert(0) += 1;
                    }
                }
            }
            prop_assert_eq!(got, want);
        }

        /// Runs expand back to exactly the pairs, in order, and are maximal.
        #[test]
        fn block_runs_cover_every_pair_once_and_are_maximal(
            pairs in proptest::collection::vec((0u32..64, 0u32..64), 0..40),
        ) {
            let (src, dst): (Vec<u32>, Vec<u32>) = pairs.iter().copied().unzip();
            let runs = block_runs(&src, &dst);
            let expanded: Vec<(u32, u32)> = runs
                .iter()
                .flat_map(|&(s, d, n)| (0..n as u32).map(move |k| (s + k, d + k)))
                .collect();
            prop_assert_eq!(expanded, pairs);
            for w in runs.windows(2) {
                let (s, d, n) = w[0];
                prop_assert!(!(w[1].0 == s + n as u32 && w[1].1 == d + n as u32));
            }
        }

        /// Placement never over-allocates: each placed sequence gets exactly as many blocks as
        /// it holds, on a target rank, and every rank's blocks are conserved.
        #[test]
        fn placement_gives_exact_blocks_and_conserves_the_pool(
            sizes in proptest::collection::vec(0usize..12, 0..12),
            free0 in 0u32..40,
            free1 in 0u32..40,
        ) {
            let mut l = ledger(&[(0, free0), (1, free1)]);
            let moves: Vec<Move> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| Move {
                    seq: RequestId(i as u64),
                    from: RankId(9),
                    src_blocks: (0..n as u32).collect(),
                })
                .collect();
            let placed = place(&moves, &mut l, &[RankId(0), RankId(1)], 4);
            let mut used: BTreeMap<RankId, usize> = BTreeMap::new();
            for (m, p) in moves.iter().zip(&placed) {
                if let Some((to, blocks)) = p {
                    prop_assert_eq!(blocks.len(), m.src_blocks.len());
                    prop_assert_eq!(l.rank(*to).unwrap().tables.get(&m.seq), Some(blocks));
                    *used.entry(*to).or_default() += blocks.len();
                }
            }
            for (r, total) in [(RankId(0), free0), (RankId(1), free1)] {
                let rl = l.rank(r).unwrap();
                let held: usize = rl.tables.values().map(Vec::len).sum();
                prop_assert_eq!(held, used.get(&r).copied().unwrap_or(0));
                prop_assert_eq!(rl.free.len() + held, total as usize);
            }
            // A sequence left unplaced did not fit on either rank at its turn (free blocks only
            // shrink, so it does not fit now either).
            for (m, p) in moves.iter().zip(&placed) {
                if p.is_none() {
                    for r in [RankId(0), RankId(1)] {
                        prop_assert!(l.rank(r).unwrap().free.len() < m.src_blocks.len());
                    }
                }
            }
        }
    }
}
