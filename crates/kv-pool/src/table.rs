//! Sequences, blocks and block tables: the names the engine holds.

use std::fmt;

/// A sequence in one pool. Ids are handed out by the pool ([`crate::BlockPool::create`],
/// [`crate::BlockPool::fork`], [`crate::BlockPool::import`]) and carry the pool's identity, so an id
/// from another pool is refused with [`crate::KvError::UnknownSequence`] rather than aliasing a
/// sequence here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId {
    pub(crate) pool: u64,
    pub(crate) index: u64,
}

impl SeqId {
    /// The pool-local number of this sequence (unique within its pool, never reused).
    pub fn index(self) -> u64 {
        self.index
    }
}

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sequence {} of pool {}", self.index, self.pool)
    }
}

/// A block in one pool: index `i` lives in chunk `i / blocks_per_chunk`, at
/// `(i % blocks_per_chunk) * block_stride` bytes from the chunk's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The index as a `usize`.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}

/// A snapshot of one sequence's block table: token `t` lives in slot `t % block_tokens` of
/// `blocks()[t / block_tokens]`.
///
/// It is a copy: it does not change when the pool does. Take a fresh one each iteration (after
/// growing, forking or committing a compaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTable {
    pub(crate) seq: SeqId,
    pub(crate) tokens: usize,
    pub(crate) block_tokens: usize,
    pub(crate) blocks: Vec<BlockId>,
}

impl BlockTable {
    /// The sequence.
    pub fn seq(&self) -> SeqId {
        self.seq
    }

    /// Tokens the sequence holds.
    pub fn len(&self) -> usize {
        self.tokens
    }

    /// Whether it holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// The blocks, in token order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// The block and the slot in it that hold token `token`, or `None` past the end.
    pub fn locate(&self, token: usize) -> Option<(BlockId, usize)> {
        if token >= self.tokens {
            return None;
        }
        let block = *self.blocks.get(token / self.block_tokens)?;
        Some((block, token % self.block_tokens))
    }
}

/// A copy the caller must make: the first `tokens` token slots of `src` into `dst`, for every layer.
///
/// Returned by a fork whose prefix ends inside a block. Both blocks are in the same pool. `src`
/// stays allocated as long as the parent holds it, so copy before freeing the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    /// The parent's block.
    pub src: BlockId,
    /// The child's new, private block.
    pub dst: BlockId,
    /// Token slots `0..tokens` to copy (copying the whole block is also correct).
    pub tokens: usize,
}

/// What a fork made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a fork may need a block copied before the child is used"]
pub struct Forked {
    /// The new sequence.
    pub child: SeqId,
    /// The copy to make before the child is read or written, if the prefix ends inside a block.
    pub copy: Option<BlockCopy>,
}

/// One move of a compaction: the bytes of `from` must be copied to `to` before the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relocation {
    /// The block being vacated (at the tail of the pool).
    pub from: BlockId,
    /// Its new place (lower in the pool).
    pub to: BlockId,
}

/// A compaction waiting for the caller's copies.
///
/// Made by [`crate::BlockPool::compact`]. Until it is committed, block tables still point at the
/// `from` blocks and the `to` blocks are reserved. The caller copies each `from` to its `to`
/// (while no one writes the moved blocks, e.g. between iterations), then calls
/// [`crate::BlockPool::commit_compaction`], which points the tables at the new blocks and frees the
/// old ones; or [`crate::BlockPool::abort_compaction`], which undoes the reservation.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a compaction holds blocks until it is committed or aborted"]
pub struct Compaction {
    pub(crate) pool: u64,
    pub(crate) id: u64,
    pub(crate) moves: Vec<Relocation>,
    pub(crate) target_chunks: usize,
}

impl Compaction {
    /// The moves, lowest destination first.
    pub fn moves(&self) -> &[Relocation] {
        &self.moves
    }

    /// Chunks the used blocks fit in once committed; everything above is free then (unless
    /// sequences grew meanwhile), so the pool can shrink to this.
    pub fn target_chunks(&self) -> usize {
        self.target_chunks
    }
}
