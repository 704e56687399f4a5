//! Scaling beyond the in-place swap of [`DeploymentRunner::install`]:
//!
//! - **KV budgets** below a pool's reserved maximum ([`DeploymentRunner::set_kv_budget`]): the
//!   colocated baseline halves the running instance's budget before a second instance is built
//!   beside it. Blocks in use above the new budget are freed by preempting the youngest
//!   sequences of that rank (they go back to the queue and are recomputed; nothing is lost), and
//!   free chunks past the budget are unmapped.
//! - **A separate instance** with its own weight store and KV pools
//!   ([`DeploymentRunner::install_instance`]): at the switch, every running sequence's KV is
//!   copied into the new instance's pools (same rank where the device stays, the least loaded
//!   rank otherwise), and the old instance is dropped.
//! - **Pre-copied KV** for a scale-down ([`DeploymentRunner::plan_precopy`], then
//!   [`PrecopyPlan::copy`] off the serving loop, then
//!   [`DeploymentRunner::install_precopied`]): the full blocks of sequences on leaving ranks are
//!   copied to a staying rank while the sequences keep decoding where they are; the switch then
//!   copies only the blocks written since (the tail).
//!
//! A full KV block is never written again while its sequence lives (tokens are only appended),
//! so a pre-copied block stays valid as long as its sequence keeps the same KV sequence on the
//! same rank; the switch checks exactly that (and the block ids) before using a pre-copy, and
//! falls back to a full copy otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hbm_vmm::host::HostBackend;
use hbm_vmm::DeviceId;
use kv_pool::{BlockId, BlockPool, KvError, SeqId};

use super::{DeploymentRunner, SwapReport};
use crate::deployment::{migrate_kv, Deployment, DeploymentError, DeploymentSlot, WeightStore};
use moe_engine::{RankId, RequestId, Scheduler};

type Pool = BlockPool<HostBackend>;

/// What [`DeploymentRunner::set_kv_budget`] did on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvBudgetChange {
    /// The device.
    pub device: DeviceId,
    /// Chunks the pool reserved room for (its full budget).
    pub max_chunks: usize,
    /// The budget now, in chunks.
    pub budget_chunks: usize,
    /// Chunks mapped before.
    pub chunks_before: usize,
    /// Chunks mapped after (more than the budget only while used blocks sit in chunks past it;
    /// they are unmapped as those blocks are freed).
    pub chunks_after: usize,
    /// Blocks in use before.
    pub used_blocks_before: usize,
    /// Sequences preempted (re-queued for recompute) to fit the budget, youngest first.
    pub preempted: Vec<RequestId>,
}

fn is_open(scheduler: &Scheduler, rank: RankId) -> bool {
    scheduler.ranks().any(|(r, open)| r == rank && open)
}

/// Grows `seq` in `pool` to `tokens`, mapping chunks up to `limit` when blocks run out.
fn grow_within(pool: &Pool, seq: SeqId, tokens: usize, limit: usize) -> Result<(), KvError> {
    loop {
        match pool.grow_to(seq, tokens) {
            Ok(_) => return Ok(()),
            Err(KvError::OutOfBlocks { .. }) if pool.stats().chunks < limit => pool.grow(1)?,
            Err(e) => return Err(e),
        }
    }
}

/// Copies the bytes of blocks `from` of `src` into blocks `to` of `dst` (pairwise).
fn copy_blocks(src: &Pool, from: &[BlockId], dst: &Pool, to: &[BlockId]) -> Result<(), KvError> {
    if src.layout() != dst.layout() {
        return Err(KvError::LayoutMismatch {
            pool: Box::new(*dst.layout()),
            manifest: Box::new(*src.layout()),
        });
    }
    let bytes: Vec<Vec<u8>> = src.with_host_blocks(|kv| {
        from.iter()
            .map(|&b| kv.block(b).map(<[u8]>::to_vec))
            .collect::<Result<_, _>>()
    })??;
    dst.with_host_blocks(|kv| {
        for (&b, data) in to.iter().zip(&bytes) {
            kv.block_mut(b)?.copy_from_slice(data);
        }
        Ok::<(), KvError>(())
    })??;
    Ok(())
}

impl DeploymentRunner {
    /// The chunks `pool` (on `device`) may map: its budget, or its reserved maximum.
    pub(super) fn chunk_limit(&self, device: DeviceId, pool: &Pool) -> usize {
        self.kv_budget
            .get(&device)
            .map_or(pool.max_chunks(), |&b| b.min(pool.max_chunks()))
    }

    /// Whether growing `seq` to `tokens` keeps the pool's used blocks within its budget.
    pub(super) fn within_budget(
        &self,
        device: DeviceId,
        pool: &Pool,
        seq: SeqId,
        tokens: usize,
    ) -> bool {
        if !self.kv_budget.contains_key(&device) {
            return true;
        }
        let have = pool.table(seq).map_or(0, |t| t.blocks().len());
        let need = pool.layout().blocks_for(tokens).saturating_sub(have);
        pool.stats().used + need <= self.chunk_limit(device, pool) * pool.blocks_per_chunk()
    }

    /// Unmaps free tail chunks past the budget.
    pub(super) fn trim_to_budget(&self, device: DeviceId, pool: &Pool) {
        if let Some(&budget) = self.kv_budget.get(&device) {
            if pool.stats().chunks > budget {
                // Only free chunks go; the rest follow as their blocks are freed.
                let _ = pool.shrink_free_tail(budget);
            }
        }
    }

    /// Limits the KV pools of `devices` to `chunks` chunks each (at most their reserved maximum)
    /// until [`DeploymentRunner::clear_kv_budget`]. Admission and growth respect the budget from
    /// now on. Where more blocks are in use than the budget holds, the youngest sequences of
    /// that rank are preempted (re-queued for recompute, never dropped) until they fit; free
    /// chunks past the budget are unmapped at once. Run it between iterations.
    pub fn set_kv_budget(
        &mut self,
        scheduler: &mut Scheduler,
        devices: &[DeviceId],
        chunks: usize,
    ) -> Result<Vec<KvBudgetChange>, DeploymentError> {
        if chunks == 0 {
            return Err(DeploymentError::ZeroKvBudget);
        }
        let dep = Arc::clone(self.slot.current());
        let pools = devices
            .iter()
            .map(|&device| {
                dep.rank_on(device)
                    .map(|r| (device, Arc::clone(r.pool())))
                    .ok_or(DeploymentError::NotServing { device })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(pools.len());
        for (device, pool) in pools {
            let before = pool.stats();
            let budget = chunks.min(pool.max_chunks());
            self.kv_budget.insert(device, budget);
            let rank = RankId(device.0);
            let mut preempted = Vec::new();
            while pool.stats().used > budget * pool.blocks_per_chunk() {
                let Some(&seq) = scheduler.running_on(rank).last() else {
                    break;
                };
                if scheduler.requeue(seq, self).is_err() {
                    break;
                }
                preempted.push(seq);
            }
            self.trim_to_budget(device, &pool);
            out.push(KvBudgetChange {
                device,
                max_chunks: pool.max_chunks(),
                budget_chunks: budget,
                chunks_before: before.chunks,
                chunks_after: pool.stats().chunks,
                used_blocks_before: before.used,
                preempted,
            });
        }
        Ok(out)
    }

    /// Gives the KV pools of `devices` their full budget back.
    pub fn clear_kv_budget(&mut self, devices: &[DeviceId]) {
        for d in devices {
            self.kv_budget.remove(d);
        }
    }

    /// The KV budget of `device` in chunks, if one is set.
    pub fn kv_budget(&self, device: DeviceId) -> Option<usize> {
        self.kv_budget.get(&device).copied()
    }

    /// Installs `next`, a separate instance built from its own weight `store` (no KV pool or view
    /// shared with the running deployment), between iterations. Every running sequence's KV is
    /// copied into the next instance's pools: on the same rank where its device stays, else on
    /// the least loaded open rank. A sequence that does not fit goes back to the queue for
    /// recompute (reported in [`SwapReport::requeued`]). `kv_budget` (chunks) limits the next
    /// instance's pools until [`DeploymentRunner::clear_kv_budget`]. The old instance, its
    /// views and pools are dropped here; its weight store is released by its owner.
    pub fn install_instance(
        &mut self,
        store: Arc<WeightStore>,
        next: Arc<Deployment>,
        scheduler: &mut Scheduler,
        kv_budget: Option<usize>,
    ) -> Result<SwapReport, DeploymentError> {
        if kv_budget == Some(0) {
            return Err(DeploymentError::ZeroKvBudget);
        }
        if !Arc::ptr_eq(store.model(), next.model()) {
            return Err(DeploymentError::Unsupported(
                "the next instance was not built from the given weight store".into(),
            ));
        }
        let cur = Arc::clone(self.slot.current());
        for r in next.ranks() {
            if let Some(old) = cur.rank_on(r.device()) {
                if Arc::ptr_eq(old.pool(), r.pool()) {
                    return Err(DeploymentError::Unsupported(format!(
                        "{} keeps the running instance's KV pool; a separate instance needs its \
                         own (build it without `previous`)",
                        r.device()
                    )));
                }
            }
        }
        let (old_devs, new_devs) = (cur.devices(), next.devices());
        let (mut report, leaving) = self.open_swap(&cur, &next, scheduler)?;
        // From here on the budget is the next instance's.
        self.kv_budget = kv_budget
            .map(|b| new_devs.iter().map(|&d| (d, b)).collect())
            .unwrap_or_default();
        let mut load: BTreeMap<RankId, usize> = new_devs
            .iter()
            .map(|&d| (RankId(d.0), scheduler.running_on(RankId(d.0)).len()))
            .collect();
        let mut moved: BTreeSet<RequestId> = BTreeSet::new();
        for &d in &old_devs {
            let from = RankId(d.0);
            for seq in scheduler.running_on(from).to_vec() {
                let to = if next.rank_on(d).is_some() {
                    Some(from)
                } else {
                    load.iter()
                        .filter(|(&r, _)| is_open(scheduler, r))
                        .min_by_key(|(&r, &n)| (n, r))
                        .map(|(&r, _)| r)
                };
                let copied = to.and_then(|to| {
                    self.copy_to_instance(&next, scheduler, seq, from, to)
                        .map(|b| (to, b))
                });
                match copied {
                    Some((to, bytes)) => {
                        if to != from {
                            *load.entry(to).or_default() += 1;
                        }
                        report.migrated.push((seq, from, to));
                        report.kv_bytes += bytes;
                        moved.insert(seq);
                    }
                    None => {
                        let _ = scheduler.requeue(seq, self);
                        report.requeued.push(seq);
                    }
                }
            }
        }
        for &d in &leaving {
            report
                .requeued
                .extend(scheduler.remove_rank(RankId(d.0), self));
            report.removed.push(RankId(d.0));
        }
        // Every KV sequence left in the ledger lives in the old pools, which go now.
        self.seqs.retain(|s, _| moved.contains(s));
        self.store = store;
        let old = std::mem::replace(&mut self.slot, DeploymentSlot::new(next, &self.store));
        // Between iterations: no iteration can still see the old instance.
        old.collect();
        drop(old);
        self.workers.retain(&new_devs);
        Ok(report)
    }

    /// Copies `seq`'s KV from rank `from` of the running instance into rank `to` of `next`.
    /// Returns the bytes copied, or `None` (nothing changed) when it does not fit.
    fn copy_to_instance(
        &mut self,
        next: &Deployment,
        scheduler: &mut Scheduler,
        seq: RequestId,
        from: RankId,
        to: RankId,
    ) -> Option<usize> {
        let &(rank, sid) = self.seqs.get(&seq)?;
        if rank != from {
            return None;
        }
        let src = Arc::clone(self.pool(from)?);
        let dst = Arc::clone(next.rank_on(DeviceId(to.0))?.pool());
        let manifest = src.export(sid).ok()?;
        let limit = self.chunk_limit(DeviceId(to.0), &dst);
        if dst.stats().used + manifest.blocks.len() > limit * dst.blocks_per_chunk() {
            return None;
        }
        while dst.stats().free < manifest.blocks.len() && dst.stats().chunks < limit {
            if dst.grow(1).is_err() {
                break;
            }
        }
        let new_sid = migrate_kv(&src, sid, &dst).ok()?;
        let _ = src.free(sid);
        self.seqs.insert(seq, (to, new_sid));
        if to != from && scheduler.move_to(seq, to).is_err() {
            // Its KV is gone from the old pool: the caller re-queues it for recompute.
            let _ = dst.free(new_sid);
            self.seqs.remove(&seq);
            return None;
        }
        Some(manifest.bytes())
    }

    /// Between iterations: what to pre-copy for a scale-down that removes `leaving` (whose ranks
    /// should already be closed). Each running sequence there gets a destination among the open
    /// staying ranks (least loaded first) and the list of its full blocks. Nothing is copied
    /// yet; run [`PrecopyPlan::copy`] off the serving loop.
    pub fn plan_precopy(&self, scheduler: &Scheduler, leaving: &[DeviceId]) -> PrecopyPlan {
        let dep = self.slot.current();
        let mut load: BTreeMap<RankId, usize> = scheduler
            .ranks()
            .filter(|&(r, open)| {
                let d = DeviceId(r.0);
                open && !leaving.contains(&d) && dep.rank_on(d).is_some()
            })
            .map(|(r, _)| (r, scheduler.running_on(r).len()))
            .collect();
        let mut items = Vec::new();
        for &d in leaving {
            let from = RankId(d.0);
            let Some(src_pool) = dep.rank_on(d).map(|r| Arc::clone(r.pool())) else {
                continue;
            };
            for &seq in scheduler.running_on(from) {
                let Some(&(rank, src)) = self.seqs.get(&seq) else {
                    continue;
                };
                let (Some((_, computed)), Ok(table)) =
                    (scheduler.progress(seq), src_pool.table(src))
                else {
                    continue;
                };
                // Only blocks whose every token has its KV written: they never change again.
                let full = computed.min(table.len()) / table.block_tokens();
                let Some(to) = load.iter().min_by_key(|(&r, &n)| (n, r)).map(|(&r, _)| r) else {
                    break;
                };
                let Some(dst_pool) = dep.rank_on(DeviceId(to.0)).map(|r| Arc::clone(r.pool()))
                else {
                    continue;
                };
                if rank != from || full == 0 {
                    continue;
                }
                *load.entry(to).or_default() += 1;
                items.push(PrecopyItem {
                    seq,
                    from,
                    src_pool: Arc::clone(&src_pool),
                    src,
                    blocks: table.blocks()[..full].to_vec(),
                    to,
                    dst_pool,
                });
            }
        }
        PrecopyPlan { items }
    }

    /// Moves `seq` (running on leaving rank `from`) onto its pre-copy, copying only the blocks
    /// written since. `None` when there is no valid pre-copy (then nothing changed, and a stale
    /// pre-copy's blocks were freed).
    pub(super) fn finish_precopy(
        &mut self,
        next: &Deployment,
        scheduler: &mut Scheduler,
        precopy: &mut KvPrecopy,
        seq: RequestId,
        from: RankId,
    ) -> Option<(RankId, usize)> {
        let p = precopy.seqs.remove(&seq)?;
        let tail = self.copy_tail(next, scheduler, &p, seq, from);
        let Some((src, bytes)) = tail else {
            let _ = p.dst_pool.free(p.dst);
            return None;
        };
        let _ = src.free(p.src);
        self.seqs.insert(seq, (p.to, p.dst));
        if scheduler.move_to(seq, p.to).is_err() {
            // Its KV is gone from the old pool: the caller re-queues it for recompute.
            let _ = p.dst_pool.free(p.dst);
            self.seqs.remove(&seq);
            return None;
        }
        Some((p.to, bytes))
    }

    /// Checks pre-copy `p` of `seq` and copies its tail; returns the source pool and the bytes.
    fn copy_tail(
        &self,
        next: &Deployment,
        scheduler: &Scheduler,
        p: &Precopied,
        seq: RequestId,
        from: RankId,
    ) -> Option<(Arc<Pool>, usize)> {
        if p.from != from || self.seqs.get(&seq) != Some(&(from, p.src)) {
            return None;
        }
        let staying = next.rank_on(DeviceId(p.to.0))?.pool();
        if !Arc::ptr_eq(staying, &p.dst_pool) || !is_open(scheduler, p.to) {
            return None;
        }
        let src = Arc::clone(self.pool(from)?);
        let table = src.table(p.src).ok()?;
        if !table.blocks().starts_with(&p.blocks) {
            return None;
        }
        let limit = self.chunk_limit(DeviceId(p.to.0), &p.dst_pool);
        grow_within(&p.dst_pool, p.dst, table.len(), limit).ok()?;
        let dst_table = p.dst_pool.table(p.dst).ok()?;
        let k = p.blocks.len();
        let (src_tail, dst_tail) = (table.blocks().get(k..)?, dst_table.blocks().get(k..)?);
        if src_tail.len() != dst_tail.len() {
            return None;
        }
        copy_blocks(&src, src_tail, &p.dst_pool, dst_tail).ok()?;
        let bytes = src_tail.len() * src.layout().block_bytes();
        Some((src, bytes))
    }
}

/// One sequence to pre-copy.
#[derive(Debug)]
struct PrecopyItem {
    seq: RequestId,
    from: RankId,
    src_pool: Arc<Pool>,
    src: SeqId,
    blocks: Vec<BlockId>,
    to: RankId,
    dst_pool: Arc<Pool>,
}

/// What to pre-copy, from [`DeploymentRunner::plan_precopy`].
#[derive(Debug, Default)]
#[must_use = "a plan copies nothing until `copy` runs"]
pub struct PrecopyPlan {
    items: Vec<PrecopyItem>,
}

impl PrecopyPlan {
    /// Sequences planned.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is planned.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Copies the planned blocks into new KV sequences on the destination ranks, off the serving
    /// loop (the sequences keep decoding meanwhile; only their full blocks are read). A sequence
    /// whose destination has no room is left out (it moves whole at the switch).
    pub fn copy(self) -> KvPrecopy {
        let mut out = KvPrecopy::default();
        for it in self.items {
            let dst = it.dst_pool.create();
            let filled = (|| {
                let tokens = it.blocks.len() * it.dst_pool.layout().block_tokens();
                grow_within(&it.dst_pool, dst, tokens, it.dst_pool.max_chunks())?;
                let dst_blocks = it.dst_pool.table(dst)?.blocks().to_vec();
                copy_blocks(&it.src_pool, &it.blocks, &it.dst_pool, &dst_blocks)
            })();
            if filled.is_err() {
                let _ = it.dst_pool.free(dst);
                continue;
            }
            out.bytes += it.blocks.len() * it.src_pool.layout().block_bytes();
            out.seqs.insert(
                it.seq,
                Precopied {
                    from: it.from,
                    src: it.src,
                    blocks: it.blocks,
                    to: it.to,
                    dst_pool: it.dst_pool,
                    dst,
                },
            );
        }
        out
    }
}

/// One sequence's pre-copied blocks.
#[derive(Debug)]
pub(super) struct Precopied {
    from: RankId,
    src: SeqId,
    blocks: Vec<BlockId>,
    to: RankId,
    dst_pool: Arc<Pool>,
    dst: SeqId,
}

/// KV blocks of sequences on leaving ranks, already copied to staying ranks (from
/// [`PrecopyPlan::copy`]); hand it to [`DeploymentRunner::install_precopied`]. Dropping it
/// frees every pre-copy not used (a rolled-back scale-down).
#[derive(Debug, Default)]
pub struct KvPrecopy {
    seqs: BTreeMap<RequestId, Precopied>,
    bytes: usize,
}

impl KvPrecopy {
    /// Sequences pre-copied.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Bytes pre-copied.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The destination rank of `seq`'s pre-copy.
    pub fn destination(&self, seq: RequestId) -> Option<RankId> {
        self.seqs.get(&seq).map(|p| p.to)
    }
}

impl Drop for KvPrecopy {
    fn drop(&mut self) {
        for p in self.seqs.values() {
            // A sequence we created in a live pool; freeing it cannot conflict with anyone.
            let _ = p.dst_pool.free(p.dst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployment::{DeploymentConfig, PlacementKind};
    use crate::model::weights::MemTensors;
    use crate::worker::HostEngineConfig;
    use expert_placement::ExpertLoad;
    use moe_engine::{Engine, Request, RequestHandle};
    use moe_model::presets::Preset;

    const CONFIG: DeploymentConfig = DeploymentConfig {
        block_tokens: 4,
        blocks_per_chunk: 4,
        kv_chunks: 2,
        kv_max_chunks: 8,
        watermarks: kv_pool::Watermarks {
            admit_reserve: 0.02,
            high: 0.9,
            low: 0.3,
        },
    };

    fn engine(devices: usize) -> Engine<DeploymentRunner> {
        let cfg = Preset::TinyMixtral.config();
        let host = HostEngineConfig {
            devices,
            max_devices: 3,
            placement: PlacementKind::Balanced,
            deployment: CONFIG,
            ..HostEngineConfig::default()
        };
        DeploymentRunner::host_engine(&cfg, &MemTensors::seeded(&cfg, 7), &host)
            .unwrap()
            .0
    }

    fn prompts() -> Vec<Vec<u32>> {
        (0..6u32)
            .map(|i| (0..18 + i).map(|j| 1 + (i * 7 + j * 3) % 60).collect())
            .collect()
    }

    fn submit(e: &Engine<DeploymentRunner>) -> Vec<RequestHandle> {
        prompts()
            .into_iter()
            .map(|p| e.submit(Request::greedy(p, 24)).unwrap())
            .collect()
    }

    fn at<T: Send + 'static>(
        e: &Engine<DeploymentRunner>,
        f: impl FnOnce(&mut DeploymentRunner, &mut Scheduler) -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = crossbeam_channel::bounded(1);
        e.at_boundary(move |r, s| {
            let _ = tx.send(f(r, s));
        });
        e.step().unwrap();
        rx.try_recv().unwrap()
    }

    fn reference() -> Vec<Vec<u32>> {
        let e = engine(3);
        let hs = submit(&e);
        e.run_until_idle(10_000).unwrap();
        hs.into_iter().map(|h| h.wait().tokens).collect()
    }

    #[test]
    fn a_scale_down_switch_copies_only_the_tail_written_after_the_precopy() {
        let e = engine(3);
        let hs = submit(&e);
        for _ in 0..12 {
            e.step().unwrap();
        }
        let leaving = [DeviceId(2)];
        let plan = at(&e, move |r, s| {
            s.close_rank(RankId(2)).unwrap();
            r.plan_precopy(s, &leaving)
        });
        assert!(!plan.is_empty(), "sequences run on the leaving rank");
        let planned = plan.len();
        let precopy = plan.copy();
        assert_eq!(precopy.sequences(), planned);
        let block_bytes =
            e.with_runner(|r| r.deployment().ranks()[0].pool().layout().block_bytes());
        assert!(
            precopy.bytes() >= planned * 4 * block_bytes,
            "18+ tokens: 4+ full blocks each"
        );
        // They keep decoding on rank 2 meanwhile.
        let steps_after: usize = 3;
        for _ in 0..steps_after {
            e.step().unwrap();
        }
        let (store, cur) = e.with_runner(|r| (Arc::clone(r.store()), Arc::clone(r.deployment())));
        let cfg = store.model().config().clone();
        let two = expert_placement::Placement::rebalanced_for(
            cur.placement(),
            &[0, 1].map(expert_placement::DeviceId),
            &ExpertLoad::uniform(cfg.num_moe_layers(), cfg.moe.num_experts).unwrap(),
        )
        .unwrap();
        store.prepare(&two).unwrap();
        let next = Arc::new(Deployment::build(&store, &two, &CONFIG, Some(&cur)).unwrap());
        drop(cur);
        let pre_bytes = precopy.bytes();
        let swap = at(&e, move |r, s| {
            r.install_precopied(next, s, &[], precopy).unwrap()
        });
        assert_eq!(swap.precopied, planned, "{swap:?}");
        assert!(swap.requeued.is_empty(), "{swap:?}");
        // The tail: at most the block in progress at the pre-copy plus the blocks the steps since
        // could have opened (one token per step).
        let tail_blocks_max = 1 + steps_after.div_ceil(4) + 1;
        assert!(swap.kv_bytes > 0);
        assert!(
            swap.kv_bytes <= planned * tail_blocks_max * block_bytes,
            "{} bytes at the switch for {planned} sequences",
            swap.kv_bytes
        );
        assert!(swap.kv_bytes < pre_bytes);
        e.run_until_idle(10_000).unwrap();
        let got: Vec<Vec<u32>> = hs.into_iter().map(|h| h.wait().tokens).collect();
        assert_eq!(
            got,
            reference(),
            "bitwise the same tokens as without scaling"
        );
        // Nothing leaked into the staying pools.
        e.with_runner(|r| {
            for rank in r.deployment().ranks() {
                assert_eq!(rank.pool().stats().used, 0, "{:?}", rank.device());
            }
        });
    }

    #[test]
    fn an_unused_precopy_gives_its_blocks_back_and_a_stale_one_is_not_used() {
        let e = engine(3);
        let hs = submit(&e);
        for _ in 0..12 {
            e.step().unwrap();
        }
        let used = |e: &Engine<DeploymentRunner>| {
            e.with_runner(|r| {
                r.deployment().ranks()[..2]
                    .iter()
                    .map(|x| x.pool().stats().used)
                    .sum::<usize>()
            })
        };
        let plan = at(&e, |r, s| {
            s.close_rank(RankId(2)).unwrap();
            r.plan_precopy(s, &[DeviceId(2)])
        });
        let before = used(&e);
        let precopy = plan.copy();
        assert!(used(&e) > before);
        // Rolled back: dropping it frees what it took on the staying ranks.
        drop(precopy);
        assert_eq!(used(&e), before);
        at(&e, |_, s| s.add_rank(RankId(2)));
        e.run_until_idle(10_000).unwrap();
        let got: Vec<Vec<u32>> = hs.into_iter().map(|h| h.wait().tokens).collect();
        assert_eq!(got, reference());
    }

    #[test]
    fn a_budget_preempts_the_youngest_and_limits_growth() {
        let e = engine(1);
        let hs = submit(&e);
        for _ in 0..20 {
            e.step().unwrap();
        }
        let changes = at(&e, |r, s| r.set_kv_budget(s, &[DeviceId(0)], 2).unwrap());
        let c = &changes[0];
        assert_eq!((c.max_chunks, c.budget_chunks), (8, 2));
        assert!(c.used_blocks_before > 8, "{c:?}");
        assert!(!c.preempted.is_empty(), "{c:?}");
        e.with_runner(|r| {
            let p = r.deployment().ranks()[0].pool();
            assert!(p.stats().used <= 2 * p.blocks_per_chunk());
        });
        let err = at(&e, |r, s| {
            r.set_kv_budget(s, &[DeviceId(2)], 2).unwrap_err()
        });
        assert!(matches!(err, DeploymentError::NotServing { .. }), "{err}");
        let err = at(&e, |r, s| {
            r.set_kv_budget(s, &[DeviceId(0)], 0).unwrap_err()
        });
        assert!(matches!(err, DeploymentError::ZeroKvBudget), "{err}");
        // Serving continues under the budget; every pool step stays within it.
        for _ in 0..40 {
            e.step().unwrap();
            e.with_runner(|r| {
                let p = r.deployment().ranks()[0].pool();
                assert!(p.stats().used <= 2 * p.blocks_per_chunk());
            });
        }
        at(&e, |r, _| r.clear_kv_budget(&[DeviceId(0)]));
        e.run_until_idle(10_000).unwrap();
        let got: Vec<Vec<u32>> = hs.into_iter().map(|h| h.wait().tokens).collect();
        let one = {
            let e = engine(1);
            let hs = submit(&e);
            e.run_until_idle(10_000).unwrap();
            hs.into_iter().map(|h| h.wait().tokens).collect::<Vec<_>>()
        };
        assert_eq!(got, one, "preempted sequences are recomputed, not lost");
    }

    fn one_device_reference() -> &'static Vec<Vec<u32>> {
        static REF: std::sync::OnceLock<Vec<Vec<u32>>> = std::sync::OnceLock::new();
        REF.get_or_init(|| {
            let e = engine(1);
            let hs = submit(&e);
            e.run_until_idle(10_000).unwrap();
            hs.into_iter().map(|h| h.wait().tokens).collect()
        })
    }

    #[test]
    fn a_sequence_that_outgrows_a_tiny_budget_waits_for_it_to_be_lifted() {
        for budget in [1, 2] {
            let e = engine(1);
            let hs = submit(&e);
            for _ in 0..10 {
                e.step().unwrap();
            }
            let changes = at(&e, move |r, s| {
                r.set_kv_budget(s, &[DeviceId(0)], budget).unwrap()
            });
            assert!(
                !changes[0].preempted.is_empty(),
                "budget {budget}: {changes:?}"
            );
            let preempted_before = e.metrics().preemptions;
            for _ in 0..40 {
                e.step().unwrap();
            }
            assert!(
                e.metrics().running + e.metrics().queue_depth > 0,
                "budget {budget}: some sequences wait for the budget"
            );
            assert!(e.metrics().preemptions >= preempted_before);
            at(&e, |r, _| r.clear_kv_budget(&[DeviceId(0)]));
            e.run_until_idle(10_000).unwrap();
            let got: Vec<Vec<u32>> = hs.into_iter().map(|h| h.wait().tokens).collect();
            assert_eq!(&got, one_device_reference(), "budget {budget}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(6))]

        /// Whatever the budget and whenever it is set, the pool's used blocks stay within it
        /// from then on, and once it is lifted every request completes with the tokens of a run
        /// that never had one. Budgets from 1 chunk: smaller than what one of these sequences needs, so a sequence
        /// that does not fit even alone must wait in the queue until the budget is cleared, not end.
        #[test]
        fn a_budget_bounds_used_blocks_and_loses_nothing(budget in 1usize..=8, warm in 0usize..30) {
            let e = engine(1);
            let hs = submit(&e);
            for _ in 0..warm {
                e.step().unwrap();
            }
            let changes = at(&e, move |r, s| r.set_kv_budget(s, &[DeviceId(0)], budget).unwrap());
            proptest::prop_assert_eq!(changes[0].budget_chunks, budget);
            for _ in 0..30 {
                let (used, per) = e.with_runner(|r| {
                    let p = r.deployment().ranks()[0].pool();
                    (p.stats().used, p.blocks_per_chunk())
                });
                proptest::prop_assert!(used <= budget * per, "{} > {} blocks", used, budget * per);
                e.step().unwrap();
            }
            at(&e, |r, _| r.clear_kv_budget(&[DeviceId(0)]));
            e.run_until_idle(10_000).unwrap();
            let got: Vec<Vec<u32>> = hs.into_iter().map(|h| h.wait().tokens).collect();
            proptest::prop_assert_eq!(&got, one_device_reference());
        }
    }
}
