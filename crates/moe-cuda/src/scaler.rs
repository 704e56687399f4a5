//! [`CudaScaler`]: carries out a transition on a live `Engine<CudaRunner>` whose run loop serves
//! on its own thread, by the elastic strategy or one of the baselines, and measures it.
//!
//! Everything it asks of the engine goes through boundary actions (`Engine::at_boundary`), which
//! the run loop performs at its next iteration boundary, with mutable access and a measured
//! hold time (`Engine::with_runner` is read-only and only for inspection).
//!
//! | strategy | what the serving loop sees |
//! |---|---|
//! | [`CudaScaler::elastic`] | only the switch: a pointer swap plus the KV of sequences on leaving GPUs (the snapshot is the one kept from the last switch, taken inside its boundary action; only without one does it wait for a boundary to take one) |
//! | [`CudaScaler::colocated`] | a second runner loaded beside the first (KV budget halved by the caller in advance), then a switch that moves every running sequence's KV into it |
//! | [`CudaScaler::extravagant`] | a second instance started on a disjoint set of GPUs beside the running one (needs `from + to` GPUs), its weights all copied peer-to-peer from the running instance, then a switch that moves every running sequence's KV into it; the old GPUs are released after |
//! | [`CudaScaler::cold_restart`] | the loop is held while every chunk is released and the model reloads from disk; running sequences recompute |
//!
//! Ahead of a request, [`CudaScaler::prewarm`] readies ranks for joining GPUs and
//! [`CudaScaler::stage_ahead`] lays the next elastic step out from the kept snapshot (new expert
//! ranges reserved and mapped, fresh chunks for moving experts, aliases), so that the request
//! itself only copies bytes and switches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::elastic::{
    disjoint_devices, first_devices, Blueprint, CudaTransport, CudaWarmPool, Snapshot, Staged,
    SwitchReport,
};
use crate::error::CudaError;
use crate::runner::CudaRunner;
use hbm_vmm::DeviceId;
use moe_engine::{Engine, Scheduler};
use moe_model::weights::TensorSource;

/// What [`CudaScaler::switch_to`] measured.
struct Switched {
    sw: SwitchReport,
    switch_ms: f64,
    held_ms: f64,
    ranks: usize,
    /// When the new runner served (before the old one was retired).
    at: Instant,
    retire_ms: f64,
}

/// What one transition measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScaleOutcome {
    /// From the call until the next configuration served (the switch returned).
    pub latency_ms: f64,
    /// Where the time went, in order.
    pub phases_ms: Vec<(&'static str, f64)>,
    /// How long the serving loop was held for the transition's own work beyond a switch (the
    /// cold restart's reload; 0 otherwise).
    pub downtime_ms: f64,
    /// Bytes copied between or within GPUs (weights and KV).
    pub bytes_moved: u64,
    /// Bytes of experts kept in place and remapped.
    pub bytes_zero_copy: u64,
    /// Most bytes any one GPU received (the cold restart: the largest share reloaded).
    pub max_bytes_into_device: u64,
    /// Sequences that moved with their KV.
    pub kv_migrated: u64,
    /// Sequences re-queued for recompute.
    pub requeued: u64,
    /// GPUs serving afterwards.
    pub devices_after: usize,
    /// Peak bytes per GPU of the machine during the transition.
    pub peak_bytes_per_device: Vec<u64>,
    /// Expert chunks the elastic step took from the warm pool instead of creating them.
    pub prewarmed_chunks: u64,
    /// Whether the elastic step used a snapshot kept from the last switch (no boundary wait).
    pub kept_snapshot: bool,
    /// Whether the elastic step was laid out ahead of the request ([`CudaScaler::stage_ahead`]);
    /// its map time is then reported as `staged_ahead_map`, off the path.
    pub staged_ahead: bool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Scales a live CUDA engine (see the module docs).
pub struct CudaScaler {
    engine: Engine<CudaRunner>,
    bp: Blueprint,
    transport: Arc<CudaTransport>,
    pool: CudaWarmPool,
    timeout: Duration,
    /// What the runner serves from, as of the last switch (or [`CudaScaler::adopt_snapshot`]):
    /// still valid because a runner's buffers change only at a switch, and every switch made
    /// here refreshes it inside its boundary action. `None`: the next elastic step takes one at
    /// a boundary.
    snapshot: Option<Snapshot>,
    /// The next elastic step laid out ahead of its request ([`CudaScaler::stage_ahead`]).
    staged: Option<Staged>,
}

impl std::fmt::Debug for CudaScaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaScaler")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl CudaScaler {
    /// A scaler for `engine`, whose runner `bp` describes (take it with
    /// [`CudaRunner::blueprint`] before the runner goes into the engine). Starts the peer-copy
    /// transport.
    pub fn new(engine: Engine<CudaRunner>, bp: Blueprint) -> Result<Self, CudaError> {
        let transport = bp.transport()?;
        Ok(Self {
            engine,
            bp,
            transport,
            pool: CudaWarmPool::new(),
            timeout: Duration::from_secs(120),
            snapshot: None,
            staged: None,
        })
    }

    /// Keeps `snap`, a snapshot of the engine's runner taken before it started serving (or at any
    /// time the runner was not being switched), so that the next elastic step need not wait for
    /// an iteration boundary to take one. A snapshot that no longer describes the runner makes
    /// that step fail at its switch, changing nothing.
    pub fn adopt_snapshot(&mut self, snap: Snapshot) {
        self.snapshot = Some(snap);
    }

    /// Whether a snapshot is kept for the next elastic step.
    pub fn has_snapshot(&self) -> bool {
        self.snapshot.is_some()
    }

    /// The longest wait for an iteration boundary (120 s by default).
    pub fn set_boundary_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The blueprint of the runners it makes.
    pub fn blueprint(&self) -> &Blueprint {
        &self.bp
    }

    /// The peer-copy transport.
    pub fn transport(&self) -> &Arc<CudaTransport> {
        &self.transport
    }

    /// Pre-initialises ranks for GPUs `from..to` (those a scale-up to `to` GPUs would add).
    pub fn prewarm(&mut self, from: usize, to: usize) -> Result<Duration, CudaError> {
        let spare: Vec<DeviceId> = first_devices(to).into_iter().skip(from).collect();
        self.pool.prewarm(&self.bp, &spare)
    }

    /// Creates ahead the expert chunks an elastic step to GPUs `0..to` would create (needs the
    /// kept snapshot; without one it does nothing and returns 0 chunks). Returns the chunks now
    /// waiting in the pool and the time taken.
    pub fn prewarm_experts(&mut self, to: usize) -> Result<(usize, Duration), CudaError> {
        let Some(snap) = &self.snapshot else {
            return Ok((self.pool.expert_chunks(), Duration::ZERO));
        };
        let t = self
            .pool
            .prewarm_experts(&self.bp, snap, &first_devices(to))?;
        Ok((self.pool.expert_chunks(), t))
    }

    /// Lays out the elastic step to GPUs `0..to` ahead of its request ([`Blueprint::stage`]
    /// from the kept snapshot: warm ranks, new expert ranges mapped, aliases), so that the
    /// request only copies and switches. Needs the kept snapshot (returns `None` without one);
    /// returns the time taken. A later switch makes it stale: the next elastic step then
    /// stages again.
    pub fn stage_ahead(&mut self, to: usize) -> Result<Option<Duration>, CudaError> {
        let Some(snap) = &self.snapshot else {
            return Ok(None);
        };
        let t = Instant::now();
        self.staged = None;
        self.staged = Some(
            self.bp
                .stage(snap.clone(), &first_devices(to), &mut self.pool)?,
        );
        Ok(Some(t.elapsed()))
    }

    /// Runs `f` at the next iteration boundary; returns its answer and how long it held the loop.
    fn at_boundary<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut CudaRunner, &mut Scheduler) -> T + Send + 'static,
    ) -> Result<(T, Duration), CudaError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.engine.at_boundary(move |r, s| {
            let t = Instant::now();
            let out = f(r, s);
            let _ = tx.send((out, t.elapsed()));
        });
        rx.recv_timeout(self.timeout).map_err(|_| {
            CudaError::Scale(format!(
                "the engine did not reach an iteration boundary within {:?}; is its run loop \
                 started?",
                self.timeout
            ))
        })
    }

    fn finish(&self, mut out: ScaleOutcome) -> ScaleOutcome {
        out.peak_bytes_per_device = self
            .bp
            .memory_per_device()
            .into_iter()
            .map(|(_, p)| p as u64)
            .collect();
        out
    }

    /// Ours: prepare beside the running configuration on this thread, switch at a boundary,
    /// retire here. Scales to GPUs `0..to`.
    pub fn elastic(&mut self, to: usize) -> Result<ScaleOutcome, CudaError> {
        self.bp.reset_peaks();
        let t0 = Instant::now();
        // The kept snapshot needs no boundary; without one, wait for a boundary to take it.
        let target = first_devices(to);
        let ahead = self
            .staged
            .take()
            .filter(|s| s.target() == target.as_slice());
        let staged_ahead = ahead.is_some();
        let kept_snapshot = staged_ahead || self.snapshot.is_some();
        let (staged, snap_ms) = match ahead {
            Some(s) => (s, 0.0),
            None => {
                let snap = match self.snapshot.take() {
                    Some(s) => s,
                    None => self.at_boundary(|r, _| r.snapshot())?.0,
                };
                let snap_ms = ms(t0.elapsed());
                (self.bp.stage(snap, &target, &mut self.pool)?, snap_ms)
            }
        };
        self.snapshot = None;
        let prepared = Blueprint::fill(staged, &self.transport)?;
        let p = prepared.report.clone();
        let t_sw = Instant::now();
        let (out, held) = self.at_boundary(move |r, s| {
            r.install(prepared, s)
                .map(|(sw, ret)| (sw, ret, r.rank_count(), r.snapshot()))
        })?;
        let switch_ms = ms(t_sw.elapsed());
        let (sw, retired, ranks, snap) = out?;
        self.snapshot = Some(snap);
        let latency_ms = ms(t0.elapsed());
        let retire = retired.release();
        Ok(self.finish(ScaleOutcome {
            latency_ms,
            phases_ms: vec![
                ("snapshot", snap_ms),
                ("plan", if staged_ahead { 0.0 } else { p.plan_ms }),
                ("workers", if staged_ahead { 0.0 } else { p.workers_ms }),
                ("map", if staged_ahead { 0.0 } else { p.map_ms }),
                ("copy", p.copy_ms),
                ("switch", switch_ms),
                ("switch_boundary", ms(held)),
                ("kv_copy", sw.kv_copy_ms),
                ("retire", ms(retire)),
                // Off the path: done before the request (0 when nothing was staged ahead).
                (
                    "staged_ahead_map",
                    if staged_ahead { p.map_ms } else { 0.0 },
                ),
            ],
            downtime_ms: 0.0,
            bytes_moved: p.bytes_moved + sw.kv_bytes,
            bytes_zero_copy: p.bytes_zero_copy,
            max_bytes_into_device: p.max_bytes_into_device,
            kv_migrated: sw.migrated as u64,
            requeued: sw.requeued as u64,
            devices_after: ranks,
            peak_bytes_per_device: Vec::new(),
            prewarmed_chunks: p.prewarmed_chunks as u64,
            kept_snapshot,
            staged_ahead,
        }))
    }

    /// Baseline: start a new instance on `to` GPUs disjoint from the running ones (the
    /// lowest-numbered free GPUs, [`disjoint_devices`]; with `from` GPUs serving the machine
    /// needs `from + to`) with the running instance's KV budget, copy every weight byte into
    /// it peer-to-peer from the running instance ([`Blueprint::copy_runner`]) while serving
    /// goes on, then switch at a boundary with every running sequence's KV migrated
    /// ([`CudaRunner::install_runner`]); the old instance's GPUs are released after the switch.
    /// Serving is never paused.
    pub fn extravagant(&mut self, to: usize) -> Result<ScaleOutcome, CudaError> {
        self.bp.reset_peaks();
        self.staged = None;
        self.pool.release_expert_chunks();
        let t0 = Instant::now();
        let kept_snapshot = self.snapshot.is_some();
        let snap = match self.snapshot.take() {
            Some(s) => s,
            None => self.at_boundary(|r, _| r.snapshot())?.0,
        };
        let snap_ms = ms(t0.elapsed());
        let target = disjoint_devices(snap.devices(), to, self.bp.vmm().device_count());
        let target = match target {
            Ok(t) => t,
            Err(e) => {
                self.snapshot = Some(snap);
                return Err(e.into());
            }
        };
        let kv = self.bp.config().kv_blocks_per_rank;
        let (next, p) = match self.bp.copy_runner(&snap, &target, kv, &self.transport) {
            Ok(x) => x,
            Err(e) => {
                self.snapshot = Some(snap);
                return Err(e);
            }
        };
        let w = self.switch_to(next, Some(snap))?;
        Ok(self.finish(ScaleOutcome {
            latency_ms: ms(w.at - t0),
            phases_ms: vec![
                ("snapshot", snap_ms),
                ("plan", p.plan_ms),
                ("start_instance", p.workers_ms),
                ("map", p.map_ms),
                ("copy", p.copy_ms),
                ("switch", w.switch_ms),
                ("switch_boundary", w.held_ms),
                ("kv_copy", w.sw.kv_copy_ms),
                ("retire", w.retire_ms),
            ],
            bytes_moved: p.bytes_moved + w.sw.kv_bytes,
            max_bytes_into_device: p.max_bytes_into_device,
            kv_migrated: w.sw.migrated as u64,
            requeued: w.sw.requeued as u64,
            devices_after: w.ranks,
            kept_snapshot,
            ..ScaleOutcome::default()
        }))
    }

    /// Switches the engine at a boundary to `next`, built beside the running runner, with every
    /// running sequence's KV migrated ([`CudaRunner::install_runner`], which carries the running
    /// runner's settings over). With `copied_from` (the snapshot
    /// `next`'s weights were copied from), refuses if the running runner changed since. Keeps
    /// the new runner's snapshot and retires the old one.
    fn switch_to(
        &mut self,
        next: CudaRunner,
        copied_from: Option<Snapshot>,
    ) -> Result<Switched, CudaError> {
        let transport = Arc::clone(&self.transport);
        let t_sw = Instant::now();
        let (out, held) = self.at_boundary(move |r, s| {
            if copied_from.as_ref().is_some_and(|snap| !snap.describes(r)) {
                return Err(CudaError::Scale(
                    "the running instance changed while the new one was copied from it".into(),
                ));
            }
            drop(copied_from);
            r.install_runner(next, &transport, s)
                .map(|(sw, ret)| (sw, ret, r.rank_count(), r.snapshot()))
        })?;
        let switch_ms = ms(t_sw.elapsed());
        let (sw, retired, ranks, snap) = out?;
        self.snapshot = Some(snap);
        let at = Instant::now();
        let retire_ms = ms(retired.release());
        Ok(Switched {
            sw,
            switch_ms,
            held_ms: ms(held),
            ranks,
            at,
            retire_ms,
        })
    }

    /// Baseline: hold the loop, release everything, reload GPUs `0..to` from `src`; running
    /// sequences recompute.
    pub fn cold_restart(
        &mut self,
        src: Arc<dyn TensorSource + Send + Sync>,
        to: usize,
    ) -> Result<ScaleOutcome, CudaError> {
        self.bp.reset_peaks();
        // The kept snapshot would keep the old chunks alive through the reload.
        self.snapshot = None;
        self.staged = None;
        self.pool.release_expert_chunks();
        let t0 = Instant::now();
        let (out, held) = self.at_boundary(move |r, s| {
            let out = r.restart_from(src.as_ref(), to, s);
            (out.map(|n| (n, r.rank_count())), r.snapshot())
        })?;
        let latency_ms = ms(t0.elapsed());
        let (out, snap) = out;
        self.snapshot = Some(snap);
        let (requeued, ranks) = out?;
        let largest_share = self
            .bp
            .memory_per_device()
            .iter()
            .map(|x| x.0 as u64)
            .max()
            .unwrap_or(0);
        Ok(self.finish(ScaleOutcome {
            latency_ms,
            phases_ms: vec![("stopped_reload", ms(held))],
            downtime_ms: ms(held),
            max_bytes_into_device: largest_share,
            requeued: requeued as u64,
            devices_after: ranks,
            ..ScaleOutcome::default()
        }))
    }

    /// Baseline: load a second runner on GPUs `0..to` from `src` beside the running one (with
    /// `kv_blocks_per_rank` blocks per rank), then switch with KV migration.
    pub fn colocated(
        &mut self,
        src: &dyn TensorSource,
        to: usize,
        kv_blocks_per_rank: usize,
    ) -> Result<ScaleOutcome, CudaError> {
        self.bp.reset_peaks();
        self.snapshot = None;
        self.staged = None;
        self.pool.release_expert_chunks();
        let t0 = Instant::now();
        let next = self.bp.load_runner(src, to, kv_blocks_per_rank)?;
        let load_ms = ms(t0.elapsed());
        let w = self.switch_to(next, None)?;
        Ok(self.finish(ScaleOutcome {
            latency_ms: ms(w.at - t0),
            phases_ms: vec![
                ("load_beside", load_ms),
                ("switch", w.switch_ms),
                ("switch_boundary", w.held_ms),
                ("kv_copy", w.sw.kv_copy_ms),
                ("retire", w.retire_ms),
            ],
            bytes_moved: w.sw.kv_bytes,
            kv_migrated: w.sw.migrated as u64,
            requeued: w.sw.requeued as u64,
            devices_after: w.ranks,
            ..ScaleOutcome::default()
        }))
    }
}
