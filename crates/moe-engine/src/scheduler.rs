//! Continuous batching: which sequences run in the next iteration, and how many of their tokens.
//!
//! The scheduler is deterministic bookkeeping with no I/O and no clock. It tracks, per sequence, how
//! many tokens are known (prompt plus generated) and how many of them already have KV in the cache;
//! per rank, which sequences run there in admission order. Each call to [`Scheduler::schedule`]
//! builds one iteration:
//!
//! 1. on every rank, running sequences that are decoding (one token left to compute) come first, then
//!    running sequences that are still prefilling, each taking a chunk of what is left of the rank's
//!    token budget (chunked prefill);
//! 2. waiting sequences are admitted in arrival order, each on the least loaded rank that has budget,
//!    a free running slot and KV above the watermark ([`KvLedger::can_admit`]);
//! 3. when a running sequence needs a KV block and its rank has none free, the youngest sequence on
//!    that rank is preempted (its KV is freed and it goes back to the queue, to be recomputed later).
//!    Preemption happens only then, and is counted.
//!
//! The KV cache itself stays outside: the scheduler asks a [`KvLedger`] to grow and release
//! sequences' KV, so the same logic drives the engine's `kv-pool` block pools and the unit tests'
//! counting ledger.

use std::collections::{BTreeMap, BTreeSet};

use crate::request::RequestId;

/// An attention data-parallel rank (one per device; the id is the device ordinal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RankId(pub u32);

impl std::fmt::Display for RankId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {}", self.0)
    }
}

/// Limits of one iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens computed per rank per iteration (decodes count one each; prefill chunks fill the rest).
    pub max_batch_tokens: usize,
    /// Sequences running at once on one rank.
    pub max_running_per_rank: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 256,
            max_running_per_rank: 64,
        }
    }
}

/// The KV cache as the scheduler sees it.
pub trait KvLedger {
    /// Whether a new sequence needing `tokens` tokens of KV may be admitted on `rank` (the rank would
    /// stay above its watermark).
    fn can_admit(&self, rank: RankId, tokens: usize) -> bool;
    /// Grows `seq`'s KV on `rank` so that it holds `tokens` tokens. Returns `false`, changing
    /// nothing, when the rank has too few free blocks.
    fn grow(&mut self, rank: RankId, seq: RequestId, tokens: usize) -> bool;
    /// Frees all of `seq`'s KV on `rank`.
    fn release(&mut self, rank: RankId, seq: RequestId);
    /// Whether `rank` holds fewer blocks than it will again (a temporary budget): a sequence that
    /// does not fit there even alone then goes back to the queue to wait, instead of ending as
    /// exhausted.
    fn reduced(&self, rank: RankId) -> bool {
        let _ = rank;
        false
    }
}

/// One sequence's work in an iteration: compute tokens `start..start + len` on `rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// The sequence.
    pub seq: RequestId,
    /// Where it runs.
    pub rank: RankId,
    /// First token position computed.
    pub start: usize,
    /// Number of tokens computed.
    pub len: usize,
    /// Whether this chunk reaches the last known token, so the logits of its last position are
    /// sampled for the next token.
    pub sample: bool,
}

/// One iteration's plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Work per sequence, ordered by rank, then decodes before prefills, then admission order.
    pub chunks: Vec<Chunk>,
    /// Sequences preempted while building this iteration (they are back in the queue).
    pub preempted: Vec<RequestId>,
    /// Sequences that can not continue: they are alone on their rank and still lack KV blocks.
    /// They have been removed from the scheduler; the caller finishes them.
    pub exhausted: Vec<RequestId>,
}

impl Schedule {
    /// Total tokens computed in this iteration.
    pub fn tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.len).sum()
    }
}

/// Why a scheduler operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// The sequence id is already known.
    #[error("sequence {0} is already scheduled")]
    Duplicate(RequestId),
    /// The sequence id is not known.
    #[error("sequence {0} is unknown to the scheduler")]
    UnknownSequence(RequestId),
    /// The rank is not known.
    #[error("{0} is not in the scheduler's rank set")]
    UnknownRank(RankId),
    /// A sequence with no tokens.
    #[error("sequence {0} has no tokens")]
    EmptySequence(RequestId),
    /// A token was appended to a sequence that has uncomputed tokens.
    #[error("sequence {0} got a token before its known tokens were computed")]
    NotReadyForToken(RequestId),
    /// A sequence was moved to a rank that does not accept sequences.
    #[error("{0} is being removed and accepts no sequences")]
    RankClosed(RankId),
}

#[derive(Debug, Clone)]
struct SeqState {
    arrival: u64,
    total: usize,
    computed: usize,
    rank: Option<RankId>,
    preemptions: u32,
}

#[derive(Debug, Clone, Default)]
struct RankState {
    /// Running sequences in admission order (oldest first).
    running: Vec<RequestId>,
    /// Whether new sequences may be placed here.
    open: bool,
}

/// Counters the engine reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Sequences waiting to be admitted.
    pub waiting: usize,
    /// Sequences admitted on a rank.
    pub running: usize,
    /// Preemptions since the start.
    pub preemptions: u64,
}

/// The continuous-batching scheduler.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    seqs: BTreeMap<RequestId, SeqState>,
    ranks: BTreeMap<RankId, RankState>,
    /// Waiting sequences by arrival order (preempted ones keep their original place).
    waiting: BTreeSet<(u64, RequestId)>,
    next_arrival: u64,
    preemptions: u64,
}

impl Scheduler {
    /// A scheduler over `ranks`, all open.
    pub fn new(config: SchedulerConfig, ranks: impl IntoIterator<Item = RankId>) -> Self {
        let ranks = ranks
            .into_iter()
            .map(|r| {
                (
                    r,
                    RankState {
                        running: Vec::new(),
                        open: true,
                    },
                )
            })
            .collect();
        Self {
            config: SchedulerConfig {
                max_batch_tokens: config.max_batch_tokens.max(1),
                max_running_per_rank: config.max_running_per_rank.max(1),
            },
            seqs: BTreeMap::new(),
            ranks,
            waiting: BTreeSet::new(),
            next_arrival: 0,
            preemptions: 0,
        }
    }

    /// The limits in force.
    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Queues a new sequence whose prompt has `prompt_len` tokens.
    pub fn add(&mut self, seq: RequestId, prompt_len: usize) -> Result<(), SchedulerError> {
        if self.seqs.contains_key(&seq) {
            return Err(SchedulerError::Duplicate(seq));
        }
        if prompt_len == 0 {
            return Err(SchedulerError::EmptySequence(seq));
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.seqs.insert(
            seq,
            SeqState {
                arrival,
                total: prompt_len,
                computed: 0,
                rank: None,
                preemptions: 0,
            },
        );
        self.waiting.insert((arrival, seq));
        Ok(())
    }

    /// Records a sampled token: the sequence now knows one more token (whose KV is not yet computed).
    pub fn push_token(&mut self, seq: RequestId) -> Result<(), SchedulerError> {
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(SchedulerError::UnknownSequence(seq))?;
        if s.computed != s.total {
            return Err(SchedulerError::NotReadyForToken(seq));
        }
        s.total += 1;
        Ok(())
    }

    /// Removes a sequence (finished or cancelled), freeing its KV. Returns whether it was known.
    pub fn remove(&mut self, seq: RequestId, kv: &mut (impl KvLedger + ?Sized)) -> bool {
        let Some(s) = self.seqs.remove(&seq) else {
            return false;
        };
        self.waiting.remove(&(s.arrival, seq));
        if let Some(rank) = s.rank {
            kv.release(rank, seq);
            if let Some(r) = self.ranks.get_mut(&rank) {
                r.running.retain(|&x| x != seq);
            }
        }
        true
    }

    /// The rank a sequence runs on (none while it waits).
    pub fn rank_of(&self, seq: RequestId) -> Option<RankId> {
        self.seqs.get(&seq).and_then(|s| s.rank)
    }

    /// `(known tokens, tokens with KV)` of a sequence.
    pub fn progress(&self, seq: RequestId) -> Option<(usize, usize)> {
        self.seqs.get(&seq).map(|s| (s.total, s.computed))
    }

    /// How often a sequence has been preempted.
    pub fn preemptions_of(&self, seq: RequestId) -> Option<u32> {
        self.seqs.get(&seq).map(|s| s.preemptions)
    }

    /// Sequences running on `rank`, oldest first.
    pub fn running_on(&self, rank: RankId) -> &[RequestId] {
        self.ranks.get(&rank).map_or(&[], |r| r.running.as_slice())
    }

    /// The ranks, in order, with whether each is open for new sequences.
    pub fn ranks(&self) -> impl Iterator<Item = (RankId, bool)> + '_ {
        self.ranks.iter().map(|(&r, s)| (r, s.open))
    }

    /// Counters.
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            waiting: self.waiting.len(),
            running: self.seqs.len() - self.waiting.len(),
            preemptions: self.preemptions,
        }
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Adds an open rank (a device joined). Adding a known rank reopens it.
    pub fn add_rank(&mut self, rank: RankId) {
        self.ranks.entry(rank).or_default().open = true;
    }

    /// Stops placing new sequences on `rank` (a device is leaving); running ones stay until moved.
    pub fn close_rank(&mut self, rank: RankId) -> Result<(), SchedulerError> {
        self.ranks
            .get_mut(&rank)
            .ok_or(SchedulerError::UnknownRank(rank))?
            .open = false;
        Ok(())
    }

    /// Removes a rank whose sequences have all been moved or requeued. Sequences still running there
    /// are requeued for recompute (their KV is released) and returned.
    pub fn remove_rank(
        &mut self,
        rank: RankId,
        kv: &mut (impl KvLedger + ?Sized),
    ) -> Vec<RequestId> {
        let Some(state) = self.ranks.remove(&rank) else {
            return Vec::new();
        };
        for &seq in &state.running {
            kv.release(rank, seq);
            self.back_to_queue(seq);
        }
        state.running
    }

    /// Moves a running sequence to another rank with its KV (the caller migrated the blocks). It keeps
    /// its computed tokens and its age.
    pub fn move_to(&mut self, seq: RequestId, to: RankId) -> Result<(), SchedulerError> {
        let dest = self.ranks.get(&to).ok_or(SchedulerError::UnknownRank(to))?;
        if !dest.open {
            return Err(SchedulerError::RankClosed(to));
        }
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(SchedulerError::UnknownSequence(seq))?;
        let Some(from) = s.rank.replace(to) else {
            return Err(SchedulerError::UnknownSequence(seq));
        };
        if let Some(r) = self.ranks.get_mut(&from) {
            r.running.retain(|&x| x != seq);
        }
        let arrival = s.arrival;
        let running = &mut self.ranks.get_mut(&to).expect("checked above").running;
        // Keep admission order by arrival so preemption still picks the youngest.
        let at = running.partition_point(|x| self.seqs[x].arrival < arrival);
        running.insert(at, seq);
        Ok(())
    }

    /// Sends a running sequence back to the queue for recompute, releasing its KV (a rank failed).
    pub fn requeue(
        &mut self,
        seq: RequestId,
        kv: &mut (impl KvLedger + ?Sized),
    ) -> Result<(), SchedulerError> {
        let s = self
            .seqs
            .get(&seq)
            .ok_or(SchedulerError::UnknownSequence(seq))?;
        if let Some(rank) = s.rank {
            self.preempt(rank, seq, kv);
        }
        Ok(())
    }

    fn back_to_queue(&mut self, seq: RequestId) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.rank = None;
            s.computed = 0;
            self.waiting.insert((s.arrival, seq));
        }
    }

    fn preempt(&mut self, rank: RankId, seq: RequestId, kv: &mut (impl KvLedger + ?Sized)) {
        kv.release(rank, seq);
        if let Some(r) = self.ranks.get_mut(&rank) {
            r.running.retain(|&x| x != seq);
        }
        self.back_to_queue(seq);
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.preemptions += 1;
        }
        self.preemptions += 1;
    }

    /// Plans the next iteration. The plan is committed: the scheduler assumes every chunk runs (the
    /// caller then reports sampled tokens with [`Scheduler::push_token`] and ends sequences with
    /// [`Scheduler::remove`]).
    pub fn schedule(&mut self, kv: &mut (impl KvLedger + ?Sized)) -> Schedule {
        let mut out = Schedule::default();
        let ranks: Vec<RankId> = self.ranks.keys().copied().collect();
        let mut budget: BTreeMap<RankId, usize> = ranks
            .iter()
            .map(|&r| (r, self.config.max_batch_tokens))
            .collect();
        let mut preempted_on: BTreeSet<RankId> = BTreeSet::new();

        for &rank in &ranks {
            // Decodes first, then prefills in progress; each group oldest first.
            let running = self.ranks[&rank].running.clone();
            let (decodes, prefills): (Vec<_>, Vec<_>) = running
                .into_iter()
                .partition(|s| self.seqs[s].total - self.seqs[s].computed == 1);
            for seq in decodes.into_iter().chain(prefills) {
                // An earlier sequence may have preempted this one.
                if self.seqs.get(&seq).and_then(|s| s.rank) != Some(rank) {
                    continue;
                }
                let left = budget[&rank];
                if left == 0 {
                    break;
                }
                let s = &self.seqs[&seq];
                let len = (s.total - s.computed).min(left);
                if len == 0 {
                    // Nothing to compute until a token is pushed (the caller's bookkeeping lags).
                    continue;
                }
                if self.grow_or_preempt(rank, seq, s.computed + len, kv, &mut out) {
                    *budget.get_mut(&rank).expect("rank exists") -= len;
                    self.commit(rank, seq, len, &mut out);
                } else {
                    preempted_on.insert(rank);
                }
            }
        }

        // Admission: arrival order; stop at the first sequence no rank can take (no overtaking).
        let candidates: Vec<(u64, RequestId)> = self.waiting.iter().copied().collect();
        for (arrival, seq) in candidates {
            if out.preempted.contains(&seq) {
                break;
            }
            let total = self.seqs[&seq].total;
            let mut options: Vec<(usize, RankId)> = self
                .ranks
                .iter()
                .filter(|(r, st)| {
                    st.open
                        && !preempted_on.contains(r)
                        && st.running.len() < self.config.max_running_per_rank
                        && budget[r] > 0
                })
                .map(|(&r, st)| (st.running.len(), r))
                .collect();
            options.sort();
            let mut admitted = false;
            for (load, rank) in options {
                // An empty rank ignores the watermark so that a large prompt is never starved.
                if !kv.can_admit(rank, total) && load > 0 {
                    continue;
                }
                let len = total.min(budget[&rank]);
                if !kv.grow(rank, seq, len) {
                    continue;
                }
                self.waiting.remove(&(arrival, seq));
                let s = self
                    .seqs
                    .get_mut(&seq)
                    .expect("waiting sequences are known");
                s.rank = Some(rank);
                s.computed = 0;
                self.ranks
                    .get_mut(&rank)
                    .expect("rank exists")
                    .running
                    .push(seq);
                *budget.get_mut(&rank).expect("rank exists") -= len;
                self.commit(rank, seq, len, &mut out);
                admitted = true;
                break;
            }
            if !admitted {
                break;
            }
        }
        out.chunks.sort_by_key(|c| c.rank);
        out
    }

    fn commit(&mut self, rank: RankId, seq: RequestId, len: usize, out: &mut Schedule) {
        let s = self
            .seqs
            .get_mut(&seq)
            .expect("scheduled sequences are known");
        let start = s.computed;
        s.computed += len;
        out.chunks.push(Chunk {
            seq,
            rank,
            start,
            len,
            sample: s.computed == s.total,
        });
    }

    /// Grows `seq` to `tokens` tokens of KV on `rank`, preempting younger sequences on the rank while
    /// blocks are short. Returns whether `seq` may run; if not, it was preempted itself or exhausted.
    fn grow_or_preempt(
        &mut self,
        rank: RankId,
        seq: RequestId,
        tokens: usize,
        kv: &mut (impl KvLedger + ?Sized),
        out: &mut Schedule,
    ) -> bool {
        loop {
            if kv.grow(rank, seq, tokens) {
                return true;
            }
            let running = &self.ranks[&rank].running;
            let me = self.seqs[&seq].arrival;
            let victim = running
                .iter()
                .rev()
                .copied()
                .find(|v| *v != seq && self.seqs[v].arrival > me);
            match victim {
                Some(v) => {
                    // Undo the victim's work in this iteration, if it was already planned.
                    out.chunks.retain(|c| c.seq != v);
                    self.preempt(rank, v, kv);
                    out.preempted.push(v);
                }
                None if running.len() > 1 => {
                    self.preempt(rank, seq, kv);
                    out.preempted.push(seq);
                    return false;
                }
                None if kv.reduced(rank) => {
                    self.preempt(rank, seq, kv);
                    out.preempted.push(seq);
                    return false;
                }
                None => {
                    self.remove(seq, kv);
                    out.exhausted.push(seq);
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A counting ledger: `blocks` blocks of `block_tokens` tokens per rank, admission keeps
    /// `watermark` blocks free.
    #[derive(Debug)]
    struct Counting {
        block_tokens: usize,
        blocks: usize,
        watermark: usize,
        held: BTreeMap<(RankId, RequestId), usize>,
    }

    impl Counting {
        fn new(block_tokens: usize, blocks: usize, watermark: usize) -> Self {
            Self {
                block_tokens,
                blocks,
                watermark,
                held: BTreeMap::new(),
            }
        }
        fn used(&self, rank: RankId) -> usize {
            self.held
                .iter()
                .filter(|((r, _), _)| *r == rank)
                .map(|(_, b)| *b)
                .sum()
        }
        fn blocks_for(&self, tokens: usize) -> usize {
            tokens.div_ceil(self.block_tokens)
        }
    }

    impl KvLedger for Counting {
        fn can_admit(&self, rank: RankId, tokens: usize) -> bool {
            self.used(rank) + self.blocks_for(tokens) + self.watermark <= self.blocks
        }
        fn grow(&mut self, rank: RankId, seq: RequestId, tokens: usize) -> bool {
            let have = self.held.get(&(rank, seq)).copied().unwrap_or(0);
            let want = self.blocks_for(tokens).max(have);
            if self.used(rank) - have + want > self.blocks {
                return false;
            }
            self.held.insert((rank, seq), want);
            true
        }
        fn release(&mut self, rank: RankId, seq: RequestId) {
            self.held.remove(&(rank, seq));
        }
    }

    fn ranks(n: u32) -> Vec<RankId> {
        (0..n).map(RankId).collect()
    }

    /// Runs sequences to completion: each generates `gen` tokens. Returns the schedules.
    fn drive(
        s: &mut Scheduler,
        kv: &mut Counting,
        gen: &BTreeMap<RequestId, usize>,
    ) -> Vec<Schedule> {
        let mut produced: BTreeMap<RequestId, usize> = BTreeMap::new();
        let mut plans = Vec::new();
        for _ in 0..10_000 {
            if s.is_idle() {
                return plans;
            }
            let plan = s.schedule(kv);
            for c in plan.chunks.iter().filter(|c| c.sample) {
                let n = produced.entry(c.seq).or_default();
                *n += 1;
                if *n >= gen[&c.seq] {
                    assert!(s.remove(c.seq, kv));
                } else {
                    s.push_token(c.seq).unwrap();
                }
            }
            plans.push(plan);
        }
        panic!("sequences did not finish");
    }

    #[test]
    fn prefill_is_chunked_under_the_token_budget() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: 8,
                max_running_per_rank: 4,
            },
            ranks(1),
        );
        let mut kv = Counting::new(4, 100, 0);
        s.add(RequestId(1), 20).unwrap();
        let p = s.schedule(&mut kv);
        assert_eq!(
            p.chunks,
            vec![Chunk {
                seq: RequestId(1),
                rank: RankId(0),
                start: 0,
                len: 8,
                sample: false
            }]
        );
        let p = s.schedule(&mut kv);
        assert_eq!(
            (p.chunks[0].start, p.chunks[0].len, p.chunks[0].sample),
            (8, 8, false)
        );
        let p = s.schedule(&mut kv);
        assert_eq!(
            (p.chunks[0].start, p.chunks[0].len, p.chunks[0].sample),
            (16, 4, true)
        );
        s.push_token(RequestId(1)).unwrap();
        let p = s.schedule(&mut kv);
        assert_eq!(
            (p.chunks[0].start, p.chunks[0].len, p.chunks[0].sample),
            (20, 1, true)
        );
        assert_eq!(kv.used(RankId(0)), 6);
    }

    #[test]
    fn prefill_and_decode_share_an_iteration_decodes_first() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: 6,
                max_running_per_rank: 4,
            },
            ranks(1),
        );
        let mut kv = Counting::new(4, 100, 0);
        s.add(RequestId(1), 3).unwrap();
        let p = s.schedule(&mut kv);
        assert!(p.chunks[0].sample);
        s.push_token(RequestId(1)).unwrap();
        s.add(RequestId(2), 10).unwrap();
        let p = s.schedule(&mut kv);
        assert_eq!(p.chunks.len(), 2);
        assert_eq!((p.chunks[0].seq, p.chunks[0].len), (RequestId(1), 1));
        assert_eq!((p.chunks[1].seq, p.chunks[1].len), (RequestId(2), 5));
    }

    #[test]
    fn a_sequence_waiting_for_its_token_is_not_planned_empty() {
        let mut s = Scheduler::new(SchedulerConfig::default(), ranks(1));
        let mut kv = Counting::new(4, 100, 0);
        s.add(RequestId(1), 3).unwrap();
        assert!(s.schedule(&mut kv).chunks[0].sample);
        // The caller has not pushed the sampled token yet: nothing to compute.
        assert!(s.schedule(&mut kv).chunks.is_empty());
        assert_eq!(s.push_token(RequestId(1)), Ok(()));
        assert_eq!(
            s.push_token(RequestId(1)),
            Err(SchedulerError::NotReadyForToken(RequestId(1)))
        );
        assert_eq!(s.schedule(&mut kv).chunks.len(), 1);
    }

    #[test]
    fn new_sequences_go_to_the_least_loaded_rank() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: 64,
                max_running_per_rank: 8,
            },
            ranks(3),
        );
        let mut kv = Counting::new(4, 100, 0);
        for i in 0..7 {
            s.add(RequestId(i), 4).unwrap();
        }
        s.schedule(&mut kv);
        let counts: Vec<usize> = ranks(3).iter().map(|&r| s.running_on(r).len()).collect();
        assert_eq!(counts, vec![3, 2, 2]);
        assert_eq!(s.rank_of(RequestId(0)), Some(RankId(0)));
        assert_eq!(s.rank_of(RequestId(1)), Some(RankId(1)));
        assert_eq!(s.rank_of(RequestId(3)), Some(RankId(0)));
    }

    #[test]
    fn admission_respects_the_watermark_but_an_empty_rank_always_admits() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: 64,
                max_running_per_rank: 8,
            },
            ranks(1),
        );
        // 10 blocks of 4 tokens, 4 kept free at admission.
        let mut kv = Counting::new(4, 10, 4);
        s.add(RequestId(1), 28).unwrap(); // 7 blocks: above the watermark, but the rank is empty
        s.add(RequestId(2), 4).unwrap(); // 1 block: 7 + 1 + 4 > 10, must wait
        let p = s.schedule(&mut kv);
        assert_eq!(p.chunks.len(), 1);
        assert_eq!(
            s.stats(),
            SchedulerStats {
                waiting: 1,
                running: 1,
                preemptions: 0
            }
        );
    }

    #[test]
    fn preemption_only_when_blocks_run_out_and_it_takes_the_youngest() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: 64,
                max_running_per_rank: 8,
            },
            ranks(1),
        );
        let mut kv = Counting::new(4, 4, 0);
        s.add(RequestId(1), 8).unwrap();
        s.add(RequestId(2), 8).unwrap();
        let p = s.schedule(&mut kv);
        assert_eq!(p.chunks.len(), 2);
        assert_eq!(kv.used(RankId(0)), 4);
        s.push_token(RequestId(1)).unwrap();
        s.push_token(RequestId(2)).unwrap();
        // Both need a 3rd block; there is none: seq 2 (younger) is preempted, seq 1 runs.
        let p = s.schedule(&mut kv);
        assert_eq!(p.preempted, vec![RequestId(2)]);
        assert_eq!(p.chunks.len(), 1);
        assert_eq!(p.chunks[0].seq, RequestId(1));
        assert_eq!(s.stats().preemptions, 1);
        assert_eq!(
            s.progress(RequestId(2)),
            Some((9, 0)),
            "recompute keeps the generated token"
        );
        assert_eq!(s.preemptions_of(RequestId(2)), Some(1));
    }

    #[test]
    fn a_lone_sequence_without_blocks_is_exhausted_not_looped() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: 64,
                max_running_per_rank: 8,
            },
            ranks(1),
        );
        let mut kv = Counting::new(4, 2, 0);
        s.add(RequestId(1), 8).unwrap();
        s.schedule(&mut kv);
        s.push_token(RequestId(1)).unwrap();
        let p = s.schedule(&mut kv);
        assert_eq!(p.exhausted, vec![RequestId(1)]);
        assert!(s.is_idle());
        assert_eq!(kv.used(RankId(0)), 0);
    }

    /// The same lone sequence on a rank under a temporary budget waits in the queue instead.
    #[test]
    fn a_lone_sequence_on_a_reduced_rank_waits_instead_of_ending() {
        struct Reduced(Counting);
        impl KvLedger for Reduced {
            fn can_admit(&self, rank: RankId, tokens: usize) -> bool {
                self.0.can_admit(rank, tokens)
            }
            fn grow(&mut self, rank: RankId, seq: RequestId, tokens: usize) -> bool {
                self.0.grow(rank, seq, tokens)
            }
            fn release(&mut self, rank: RankId, seq: RequestId) {
                self.0.release(rank, seq);
            }
            fn reduced(&self, _: RankId) -> bool {
                true
            }
        }
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: 64,
                max_running_per_rank: 8,
            },
            ranks(1),
        );
        let mut kv = Reduced(Counting::new(4, 2, 0));
        s.add(RequestId(1), 8).unwrap();
        s.schedule(&mut kv);
        s.push_token(RequestId(1)).unwrap();
        let p = s.schedule(&mut kv);
        assert!(p.exhausted.is_empty(), "{p:?}");
        assert_eq!(p.preempted, vec![RequestId(1)]);
        assert!(!s.is_idle(), "it waits in the queue");
        assert_eq!(s.stats().preemptions, 1);
        assert_eq!(kv.0.used(RankId(0)), 0);
        // Capacity comes back: it runs again from the start of its 9 tokens.
        kv.0.blocks = 4;
        let p = s.schedule(&mut kv);
        assert_eq!(p.tokens(), 9, "{p:?}");
    }

    #[test]
    fn a_requeued_sequence_counts_as_preempted() {
        let mut s = Scheduler::new(SchedulerConfig::default(), ranks(1));
        let mut kv = Counting::new(4, 64, 0);
        s.add(RequestId(1), 8).unwrap();
        s.schedule(&mut kv);
        s.requeue(RequestId(1), &mut kv).unwrap();
        assert_eq!(s.stats().preemptions, 1);
        assert_eq!(s.preemptions_of(RequestId(1)), Some(1));
        assert_eq!(kv.used(RankId(0)), 0);
    }

    #[test]
    fn remove_frees_kv_and_forgets() {
        let mut s = Scheduler::new(SchedulerConfig::default(), ranks(2));
        let mut kv = Counting::new(4, 16, 0);
        s.add(RequestId(1), 9).unwrap();
        s.add(RequestId(2), 5).unwrap();
        s.schedule(&mut kv);
        assert_eq!(kv.used(RankId(0)) + kv.used(RankId(1)), 5);
        assert!(s.remove(RequestId(1), &mut kv));
        assert!(!s.remove(RequestId(1), &mut kv));
        assert_eq!(kv.used(RankId(0)) + kv.used(RankId(1)), 2);
        assert_eq!(
            s.add(RequestId(2), 3),
            Err(SchedulerError::Duplicate(RequestId(2)))
        );
        assert_eq!(
            s.add(RequestId(3), 0),
            Err(SchedulerError::EmptySequence(RequestId(3)))
        );
    }

    #[test]
    fn ranks_join_close_and_leave() {
        let mut s = Scheduler::new(SchedulerConfig::default(), ranks(2));
        let mut kv = Counting::new(4, 16, 0);
        for i in 0..4 {
            s.add(RequestId(i), 3).unwrap();
        }
        s.schedule(&mut kv);
        s.add_rank(RankId(2));
        s.close_rank(RankId(0)).unwrap();
        for i in 4..6 {
            s.add(RequestId(i), 3).unwrap();
        }
        s.schedule(&mut kv);
        assert!(!s.running_on(RankId(0)).contains(&RequestId(4)));
        assert_eq!(
            s.running_on(RankId(2)),
            &[RequestId(4), RequestId(5)],
            "the new rank is least loaded"
        );
        // Move one of rank 0's sequences (KV migrated by the caller); requeue the other.
        let on0 = s.running_on(RankId(0)).to_vec();
        assert_eq!(on0, vec![RequestId(0), RequestId(2)]);
        assert_eq!(
            s.move_to(RequestId(0), RankId(0)),
            Err(SchedulerError::RankClosed(RankId(0)))
        );
        s.move_to(RequestId(0), RankId(2)).unwrap();
        assert_eq!(
            s.running_on(RankId(2)),
            &[RequestId(0), RequestId(4), RequestId(5)],
            "kept in arrival order"
        );
        let requeued = s.remove_rank(RankId(0), &mut kv);
        assert_eq!(requeued, vec![RequestId(2)]);
        assert_eq!(s.rank_of(RequestId(2)), None);
        assert_eq!(s.progress(RequestId(2)).unwrap().1, 0);
    }

    #[test]
    fn many_sequences_all_finish_on_a_tight_pool() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_batch_tokens: 16,
                max_running_per_rank: 6,
            },
            ranks(2),
        );
        let mut kv = Counting::new(4, 12, 1);
        let mut gen = BTreeMap::new();
        for i in 0..40u64 {
            s.add(RequestId(i), 1 + (i as usize * 7) % 13).unwrap();
            gen.insert(RequestId(i), 1 + (i as usize * 5) % 17);
        }
        let plans = drive(&mut s, &mut kv, &gen);
        assert!(plans.iter().all(|p| p.exhausted.is_empty()));
        assert!(
            s.stats().preemptions > 0,
            "the pool is tight enough to force preemption"
        );
        assert_eq!(kv.held.len(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Budgets, running limits and KV capacity hold in every iteration, each sequence is planned
        /// at most once per iteration, chunks continue where the last one ended, and everything
        /// finishes.
        #[test]
        fn iterations_respect_limits_and_all_finish(
            prompts in prop::collection::vec((1usize..20, 1usize..12), 1..30),
            n_ranks in 1u32..4,
            budget in 1usize..24,
            max_running in 1usize..6,
            blocks in 6usize..20,
            block_tokens in 1usize..5,
        ) {
            let mut s = Scheduler::new(SchedulerConfig { max_batch_tokens: budget, max_running_per_rank: max_running }, ranks(n_ranks));
            let mut kv = Counting::new(block_tokens, blocks, 1);
            let cap = blocks * block_tokens;
            let mut gen = BTreeMap::new();
            let mut expect_start: BTreeMap<RequestId, usize> = BTreeMap::new();
            for (i, &(p, g)) in prompts.iter().enumerate() {
                // Callers validate that a sequence fits a rank alone.
                let p = p.min(cap - 1).max(1);
                let g = g.min(cap - p + 1).max(1);
                s.add(RequestId(i as u64), p).unwrap();
                gen.insert(RequestId(i as u64), g);
            }
            let mut produced: BTreeMap<RequestId, usize> = BTreeMap::new();
            let mut done = 0;
            for _ in 0..20_000 {
                if s.is_idle() { break; }
                let plan = s.schedule(&mut kv);
                prop_assert!(plan.exhausted.is_empty());
                for r in ranks(n_ranks) {
                    let toks: usize = plan.chunks.iter().filter(|c| c.rank == r).map(|c| c.len).sum();
                    prop_assert!(toks <= budget);
                    prop_assert!(s.running_on(r).len() <= max_running);
                    prop_assert!(kv.used(r) <= blocks);
                }
                let mut seen = BTreeSet::new();
                for c in &plan.chunks {
                    prop_assert!(seen.insert(c.seq));
                    prop_assert!(c.len > 0);
                    prop_assert_eq!(s.rank_of(c.seq), Some(c.rank));
                    let want = if plan.preempted.contains(&c.seq) { 0 } else { expect_start.get(&c.seq).copied().unwrap_or(0) };
                    prop_assert!(c.start == want || c.start == 0, "chunk restarts only after preemption");
                    expect_start.insert(c.seq, c.start + c.len);
                }
                for &p in &plan.preempted { expect_start.insert(p, 0); }
                for c in plan.chunks.iter().filter(|c| c.sample) {
                    let n = produced.entry(c.seq).or_default();
                    *n += 1;
                    if *n >= gen[&c.seq] {
                        s.remove(c.seq, &mut kv);
                        done += 1;
                    } else {
                        s.push_token(c.seq).unwrap();
                    }
                }
            }
            prop_assert_eq!(done, prompts.len());
            prop_assert!(kv.held.is_empty());
        }
    }
}
