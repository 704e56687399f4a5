//! The per-rank KV block bookkeeping the engine's scheduler drives ([`BlockLedger`], the runner's
//! `moe_engine::KvLedger`).

use std::collections::BTreeMap;

use moe_engine::{KvLedger, RankId, RequestId};

#[derive(Debug, Default)]
pub(crate) struct RankBlocks {
    pub(crate) total: usize,
    pub(crate) free: Vec<u32>,
    pub(crate) tables: BTreeMap<RequestId, Vec<u32>>,
}

/// Per-rank KV bookkeeping for the scheduler.
#[derive(Debug)]
pub(crate) struct BlockLedger {
    pub(crate) block_tokens: usize,
    pub(crate) ranks: Vec<(RankId, RankBlocks)>,
}

impl BlockLedger {
    pub(crate) fn rank(&self, r: RankId) -> Option<&RankBlocks> {
        self.ranks.iter().find(|(id, _)| *id == r).map(|(_, l)| l)
    }
    pub(crate) fn rank_mut(&mut self, r: RankId) -> Option<&mut RankBlocks> {
        self.ranks
            .iter_mut()
            .find(|(id, _)| *id == r)
            .map(|(_, l)| l)
    }
}

impl KvLedger for BlockLedger {
    fn can_admit(&self, rank: RankId, tokens: usize) -> bool {
        self.rank(rank)
            .is_some_and(|l| l.free.len() > tokens.div_ceil(self.block_tokens))
    }
    fn grow(&mut self, rank: RankId, seq: RequestId, tokens: usize) -> bool {
        let bt = self.block_tokens;
        let Some(l) = self.rank_mut(rank) else {
            return false;
        };
        let have = l.tables.get(&seq).map_or(0, Vec::len);
        let need = tokens.div_ceil(bt).saturating_sub(have);
        if need > l.free.len() {
            return false;
        }
        let new: Vec<u32> = (0..need).filter_map(|_| l.free.pop()).collect();
        l.tables.entry(seq).or_default().extend(new);
        true
    }
    fn release(&mut self, rank: RankId, seq: RequestId) {
        if let Some(l) = self.rank_mut(rank) {
            if let Some(t) = l.tables.remove(&seq) {
                l.free.extend(t);
                l.free.sort_unstable_by(|a, b| b.cmp(a));
            }
        }
    }
}
