//! Typed errors. Every refusal leaves the pool exactly as it was; the caller decides what to do
//! (preempt a sequence, grow the pool, retry after a compaction).

use hbm_vmm::VmmError;

use crate::layout::KvLayout;
use crate::table::{BlockId, SeqId};

/// A bad KV layout, or a bad index into one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// A dimension that must be at least one is zero.
    #[error("KV layout: {0} must not be zero")]
    Zero(&'static str),
    /// The block size does not fit in `usize`.
    #[error("KV layout: a block would be larger than the address space")]
    TooLarge,
    /// An index is past its dimension.
    #[error("KV layout: {what} {index} is out of range (there are {limit})")]
    OutOfRange {
        /// Which index (`layer`, `slot`, `head`).
        what: &'static str,
        /// The index given.
        index: usize,
        /// The dimension's size.
        limit: usize,
    },
    /// A GQA offset asked of an MLA layout, or the other way round.
    #[error("KV layout: asked for a {wanted} offset, but the layout is {layout}")]
    WrongFamily {
        /// The family the caller assumed.
        wanted: &'static str,
        /// The layout's family.
        layout: &'static str,
    },
}

/// Why a pool operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// Not enough free blocks. Nothing was allocated; the caller may preempt a sequence, grow the
    /// pool, or wait.
    #[error(
        "out of KV blocks: {needed} needed, {free} free (preempt a sequence or grow the pool)"
    )]
    OutOfBlocks {
        /// Blocks the operation needed.
        needed: usize,
        /// Blocks that were free.
        free: usize,
    },
    /// The sequence is not in this pool (never was, already freed, or from another pool).
    #[error("{0} is not in this pool (freed already, or it belongs to another pool)")]
    UnknownSequence(SeqId),
    /// A shrink would unmap chunks that still hold blocks in use.
    #[error(
        "cannot shrink by {requested} chunk(s): only the last {free_tail} chunk(s) are free \
         (free sequences, or compact and shrink again)"
    )]
    ShrinkBelowUse {
        /// Chunks the caller asked to release.
        requested: usize,
        /// Chunks at the tail with no block in use.
        free_tail: usize,
    },
    /// A grow would pass the region reserved for the pool.
    #[error(
        "cannot grow to {requested} chunks: the pool reserved room for {max_chunks} \
         (build it with a larger max_chunks)"
    )]
    CapacityLimit {
        /// Chunks the pool would have.
        requested: usize,
        /// Chunks its region has slots for.
        max_chunks: usize,
    },
    /// A manifest made by a pool with another block layout.
    #[error("cannot import: the manifest's layout {manifest:?} differs from the pool's {pool:?}")]
    LayoutMismatch {
        /// The importing pool's layout.
        pool: Box<KvLayout>,
        /// The manifest's layout.
        manifest: Box<KvLayout>,
    },
    /// A block index past the pool's capacity.
    #[error("{block} is not in the pool ({capacity} blocks mapped)")]
    NoSuchBlock {
        /// The block asked for.
        block: BlockId,
        /// Blocks the pool has now.
        capacity: usize,
    },
    /// A manifest whose block list does not match its token count.
    #[error(
        "malformed manifest: {blocks} block(s) for {tokens} token(s) at {block_tokens} per block"
    )]
    BadManifest {
        /// Blocks listed.
        blocks: usize,
        /// Tokens claimed.
        tokens: usize,
        /// Tokens per block of its layout.
        block_tokens: usize,
    },
    /// A fork asked for more tokens than the parent has.
    #[error("cannot fork {tokens} tokens of {seq}: it has only {len}")]
    ForkBeyondEnd {
        /// The parent.
        seq: SeqId,
        /// Tokens asked for.
        tokens: usize,
        /// The parent's length.
        len: usize,
    },
    /// A second compaction while one is waiting for commit or abort.
    #[error("a compaction is already pending; commit or abort it first")]
    CompactionPending,
    /// A compaction that is not this pool's pending one.
    #[error("this compaction does not belong to this pool, or it was already finished")]
    UnknownCompaction,
    /// The chunk size cannot hold even one block.
    #[error(
        "a chunk of {chunk_bytes} bytes cannot hold one KV block of {block_bytes} bytes \
         (use larger chunks or smaller blocks)"
    )]
    ChunkTooSmall {
        /// Bytes per chunk.
        chunk_bytes: usize,
        /// Bytes per block.
        block_bytes: usize,
    },
    /// Watermarks outside `0.0..=1.0` or out of order.
    #[error("bad watermarks: {0}")]
    BadWatermarks(&'static str),
    /// A bad layout or layout index.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The virtual-memory layer refused (out of device memory, unmapped range, ...).
    #[error("device memory: {0}")]
    Vmm(#[from] VmmError),
}
