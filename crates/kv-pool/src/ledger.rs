//! The pool's bookkeeping, with no memory and no locks: which blocks exist, who references them,
//! which are free, and every sequence's block list.
//!
//! Invariants (checked by [`Ledger::audit`] in the tests):
//! - `refs[b]` is the number of times `b` appears in all block tables;
//! - `b` is in `free` exactly when `refs[b] == 0` and no compaction holds it;
//! - a sequence of `n` tokens has `ceil(n / block_tokens)` blocks, all distinct;
//! - a sequence's last block, when partly filled, is referenced by that sequence only (only full
//!   blocks are ever shared, so an append never writes into a block another sequence reads);
//! - blocks are allocated lowest index first, so used blocks gather at the bottom and the tail
//!   chunks empty out on their own.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::KvError;
use crate::table::{BlockCopy, BlockId, BlockTable, Compaction, Forked, Relocation, SeqId};

#[derive(Debug, Clone)]
struct Seq {
    blocks: Vec<u32>,
    tokens: usize,
}

/// Counts, all in blocks unless named otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Chunks mapped.
    pub chunks: usize,
    /// Blocks in the mapped chunks.
    pub capacity: usize,
    /// Blocks referenced by a sequence or held by a pending compaction.
    pub used: usize,
    /// Blocks ready to allocate.
    pub free: usize,
    /// The most blocks ever used at once (since the pool was built).
    pub peak_used: usize,
    /// Blocks referenced by more than one sequence (prefix sharing).
    pub shared: usize,
    /// Live sequences.
    pub sequences: usize,
    /// Chunks at the tail with no block in use: how far the pool can shrink right now.
    pub free_tail_chunks: usize,
}

#[derive(Debug)]
pub(crate) struct Ledger {
    pool: u64,
    block_tokens: usize,
    per_chunk: usize,
    chunks: usize,
    refs: Vec<u32>,
    held: Vec<bool>,
    free: BTreeSet<u32>,
    seqs: BTreeMap<u64, Seq>,
    next_seq: u64,
    pending: Option<u64>,
    next_compaction: u64,
    peak_used: usize,
    /// Per chunk, its blocks that are not free (so the free tail is found per chunk, not block).
    chunk_busy: Vec<u32>,
    /// Blocks with more than one reference.
    shared: usize,
}

impl Ledger {
    pub(crate) fn new(pool: u64, block_tokens: usize, per_chunk: usize) -> Self {
        assert!(
            block_tokens > 0 && per_chunk > 0,
            "checked by the pool's constructor"
        );
        Self {
            pool,
            block_tokens,
            per_chunk,
            chunks: 0,
            refs: Vec::new(),
            held: Vec::new(),
            free: BTreeSet::new(),
            seqs: BTreeMap::new(),
            next_seq: 0,
            pending: None,
            next_compaction: 0,
            peak_used: 0,
            chunk_busy: Vec::new(),
            shared: 0,
        }
    }

    pub(crate) fn chunks(&self) -> usize {
        self.chunks
    }

    pub(crate) fn capacity(&self) -> usize {
        self.refs.len()
    }

    pub(crate) fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub(crate) fn used(&self) -> usize {
        self.capacity() - self.free.len()
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    fn is_free(&self, b: usize) -> bool {
        self.refs[b] == 0 && !self.held[b]
    }

    fn note_peak(&mut self) {
        self.peak_used = self.peak_used.max(self.used());
    }

    /// Takes the lowest free block off the free list.
    fn pop_free(&mut self) -> Option<u32> {
        let b = self.free.pop_first()?;
        self.chunk_busy[b as usize / self.per_chunk] += 1;
        Some(b)
    }

    /// Takes block `b` (which must be free) off the free list.
    fn claim(&mut self, b: u32) {
        let was_free = self.free.remove(&b);
        debug_assert!(was_free);
        self.chunk_busy[b as usize / self.per_chunk] += 1;
    }

    /// Puts `b` back on the free list if nothing references or holds it; returns whether it did.
    fn release_if_free(&mut self, b: usize) -> bool {
        if self.is_free(b) && self.free.insert(b as u32) {
            self.chunk_busy[b / self.per_chunk] -= 1;
            true
        } else {
            false
        }
    }

    fn add_ref(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        *r += 1;
        if *r == 2 {
            self.shared += 1;
        }
    }

    /// Adds `k` empty chunks at the tail. The caller has mapped them already.
    pub(crate) fn add_chunks(&mut self, k: usize) {
        let start = self.capacity();
        let end = start + k * self.per_chunk;
        assert!(
            end <= u32::MAX as usize + 1,
            "checked by the pool's constructor"
        );
        self.refs.resize(end, 0);
        self.held.resize(end, false);
        self.free.extend((start..end).map(|b| b as u32));
        self.chunk_busy.resize(self.chunks + k, 0);
        self.chunks += k;
    }

    /// Chunks at the tail whose blocks are all free.
    pub(crate) fn free_tail_chunks(&self) -> usize {
        self.chunk_busy
            .iter()
            .rev()
            .take_while(|&&busy| busy == 0)
            .count()
    }

    /// Removes the last `k` chunks if none of their blocks is in use. The caller unmaps them after.
    pub(crate) fn remove_tail_chunks(&mut self, k: usize) -> Result<(), KvError> {
        let free_tail = self.free_tail_chunks();
        if k > free_tail {
            return Err(KvError::ShrinkBelowUse {
                requested: k,
                free_tail,
            });
        }
        let end = (self.chunks - k) * self.per_chunk;
        for b in end..self.capacity() {
            self.free.remove(&(b as u32));
        }
        self.refs.truncate(end);
        self.held.truncate(end);
        self.chunks -= k;
        self.chunk_busy.truncate(self.chunks);
        Ok(())
    }

    fn seq(&self, id: SeqId) -> Result<&Seq, KvError> {
        if id.pool != self.pool {
            return Err(KvError::UnknownSequence(id));
        }
        self.seqs.get(&id.index).ok_or(KvError::UnknownSequence(id))
    }

    fn insert_seq(&mut self, seq: Seq) -> SeqId {
        let index = self.next_seq;
        self.next_seq += 1;
        self.seqs.insert(index, seq);
        SeqId {
            pool: self.pool,
            index,
        }
    }

    /// Takes `n` free blocks, lowest first, with one reference each; all or nothing.
    fn take(&mut self, n: usize) -> Result<Vec<u32>, KvError> {
        if n > self.free.len() {
            return Err(KvError::OutOfBlocks {
                needed: n,
                free: self.free.len(),
            });
        }
        let taken: Vec<u32> = (0..n).filter_map(|_| self.pop_free()).collect();
        for &b in &taken {
            self.refs[b as usize] = 1;
        }
        self.note_peak();
        Ok(taken)
    }

    /// Drops one reference to `b`, freeing it when it was the last and nothing holds it.
    fn unref(&mut self, b: u32) -> bool {
        let r = &mut self.refs[b as usize];
        if *r == 2 {
            self.shared -= 1;
        }
        *r -= 1;
        self.release_if_free(b as usize)
    }

    pub(crate) fn create(&mut self) -> SeqId {
        self.insert_seq(Seq {
            blocks: Vec::new(),
            tokens: 0,
        })
    }

    /// Grows `id` to hold `tokens` tokens (a no-op when it already holds that many). Returns the
    /// newly allocated blocks.
    pub(crate) fn grow_to(&mut self, id: SeqId, tokens: usize) -> Result<Vec<BlockId>, KvError> {
        let seq = self.seq(id)?;
        if tokens <= seq.tokens {
            return Ok(Vec::new());
        }
        let needed = self.blocks_for(tokens) - seq.blocks.len();
        let new = self.take(needed)?;
        let seq = self.seqs.get_mut(&id.index).expect("looked up above");
        seq.blocks.extend_from_slice(&new);
        seq.tokens = tokens;
        Ok(new.into_iter().map(BlockId).collect())
    }

    /// Frees `id`; returns how many blocks went back to the free list (shared ones may not).
    pub(crate) fn release(&mut self, id: SeqId) -> Result<usize, KvError> {
        self.seq(id)?;
        let seq = self.seqs.remove(&id.index).expect("looked up above");
        Ok(seq.blocks.into_iter().filter(|&b| self.unref(b)).count())
    }

    /// A new sequence holding the first `tokens` tokens of `parent`. Whole blocks are shared; a
    /// partial last block gets a private copy (allocated here, copied by the caller).
    pub(crate) fn fork(&mut self, parent: SeqId, tokens: usize) -> Result<Forked, KvError> {
        let p = self.seq(parent)?;
        if tokens > p.tokens {
            return Err(KvError::ForkBeyondEnd {
                seq: parent,
                tokens,
                len: p.tokens,
            });
        }
        let full = tokens / self.block_tokens;
        let rem = tokens % self.block_tokens;
        let mut blocks = p.blocks[..full].to_vec();
        let partial_src = (rem > 0).then(|| p.blocks[full]);
        let copy = match partial_src {
            Some(src) => {
                let dst = self.take(1)?[0];
                blocks.push(dst);
                Some(BlockCopy {
                    src: BlockId(src),
                    dst: BlockId(dst),
                    tokens: rem,
                })
            }
            None => None,
        };
        for &b in &blocks[..full] {
            self.add_ref(b);
        }
        let child = self.insert_seq(Seq { blocks, tokens });
        Ok(Forked { child, copy })
    }

    /// A new sequence of `tokens` tokens on fresh blocks (the target of a migration).
    pub(crate) fn import(&mut self, tokens: usize) -> Result<SeqId, KvError> {
        let blocks = self.take(self.blocks_for(tokens))?;
        Ok(self.insert_seq(Seq { blocks, tokens }))
    }

    /// Tokens `id` holds.
    pub(crate) fn len(&self, id: SeqId) -> Result<usize, KvError> {
        Ok(self.seq(id)?.tokens)
    }

    pub(crate) fn table(&self, id: SeqId) -> Result<BlockTable, KvError> {
        let seq = self.seq(id)?;
        Ok(BlockTable {
            seq: id,
            tokens: seq.tokens,
            block_tokens: self.block_tokens,
            blocks: seq.blocks.iter().copied().map(BlockId).collect(),
        })
    }

    /// Plans moving every used block above the smallest prefix of chunks that can hold them all
    /// into free blocks below it. Sources and destinations are held until commit or abort.
    pub(crate) fn compact(&mut self) -> Result<Compaction, KvError> {
        if self.pending.is_some() {
            return Err(KvError::CompactionPending);
        }
        let target_chunks = self.used().div_ceil(self.per_chunk);
        let line = target_chunks * self.per_chunk;
        let sources: Vec<u32> = (line..self.capacity())
            .filter(|&b| !self.is_free(b))
            .map(|b| b as u32)
            .collect();
        // There are enough free blocks below the line: line >= used, and every used block above it
        // is a source, so free-below = line - (used - sources) >= sources.
        let dests: Vec<u32> = self
            .free
            .range(..line as u32)
            .take(sources.len())
            .copied()
            .collect();
        debug_assert_eq!(dests.len(), sources.len());
        let mut moves = Vec::with_capacity(sources.len());
        for (&from, &to) in sources.iter().zip(&dests) {
            self.claim(to);
            self.held[from as usize] = true;
            self.held[to as usize] = true;
            moves.push(Relocation {
                from: BlockId(from),
                to: BlockId(to),
            });
        }
        let id = self.next_compaction;
        self.next_compaction += 1;
        self.pending = Some(id);
        self.note_peak();
        Ok(Compaction {
            pool: self.pool,
            id,
            moves,
            target_chunks,
        })
    }

    fn check_pending(&self, c: &Compaction) -> Result<(), KvError> {
        if c.pool == self.pool && self.pending == Some(c.id) {
            Ok(())
        } else {
            Err(KvError::UnknownCompaction)
        }
    }

    /// Points every table at the new blocks and frees the old ones.
    pub(crate) fn commit(&mut self, c: Compaction) -> Result<(), KvError> {
        self.check_pending(&c)?;
        let map: HashMap<u32, u32> = c.moves.iter().map(|m| (m.from.0, m.to.0)).collect();
        for seq in self.seqs.values_mut() {
            for b in &mut seq.blocks {
                if let Some(&to) = map.get(b) {
                    *b = to;
                }
            }
        }
        for m in &c.moves {
            let (from, to) = (m.from.index(), m.to.index());
            self.refs[to] = self.refs[from];
            self.refs[from] = 0;
            self.held[from] = false;
            self.held[to] = false;
            for b in [from, to] {
                self.release_if_free(b);
            }
        }
        self.pending = None;
        Ok(())
    }

    /// Releases a compaction's holds without moving anything.
    pub(crate) fn abort(&mut self, c: Compaction) -> Result<(), KvError> {
        self.check_pending(&c)?;
        for m in &c.moves {
            for b in [m.from.index(), m.to.index()] {
                self.held[b] = false;
                self.release_if_free(b);
            }
        }
        self.pending = None;
        Ok(())
    }

    pub(crate) fn stats(&self) -> PoolStats {
        PoolStats {
            chunks: self.chunks,
            capacity: self.capacity(),
            used: self.used(),
            free: self.free.len(),
            peak_used: self.peak_used,
            shared: self.shared,
            sequences: self.seqs.len(),
            free_tail_chunks: self.free_tail_chunks(),
        }
    }

    /// Checks every invariant in the module docs; `Err` says which one broke.
    #[cfg(test)]
    pub(crate) fn audit(&self) -> Result<(), String> {
        let mut count = vec![0u32; self.capacity()];
        for (i, s) in &self.seqs {
            if s.blocks.len() != self.blocks_for(s.tokens) {
                return Err(format!(
                    "seq {i}: {} blocks for {} tokens",
                    s.blocks.len(),
                    s.tokens
                ));
            }
            let distinct: BTreeSet<_> = s.blocks.iter().collect();
            if distinct.len() != s.blocks.len() {
                return Err(format!("seq {i} lists a block twice"));
            }
            for &b in &s.blocks {
                count[b as usize] += 1;
            }
        }
        for (i, s) in &self.seqs {
            if s.tokens % self.block_tokens != 0 {
                let last = *s.blocks.last().expect("partial implies a block") as usize;
                if count[last] != 1 {
                    return Err(format!("seq {i}: partial last block {last} is shared"));
                }
            }
        }
        for (b, (&listed, &refs)) in count.iter().zip(&self.refs).enumerate() {
            if listed != refs {
                return Err(format!("block {b}: refs {refs} but {listed} table entries"));
            }
            if self.is_free(b) != self.free.contains(&(b as u32)) {
                return Err(format!("block {b}: free list disagrees with refs/holds"));
            }
        }
        if self.pending.is_none() && self.held.iter().any(|&h| h) {
            return Err("a block is held with no compaction pending".into());
        }
        for (c, &busy) in self.chunk_busy.iter().enumerate() {
            let counted = (c * self.per_chunk..(c + 1) * self.per_chunk)
                .filter(|&b| !self.is_free(b))
                .count();
            if counted != busy as usize {
                return Err(format!(
                    "chunk {c}: busy count {busy} but {counted} blocks in use"
                ));
            }
        }
        if self.shared != self.refs.iter().filter(|&&r| r > 1).count() {
            return Err("shared-block count disagrees with refs".into());
        }
        if self.chunk_busy.len() != self.chunks || self.chunks * self.per_chunk != self.capacity() {
            return Err("chunk count disagrees with capacity".into());
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
