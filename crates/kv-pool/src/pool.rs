//! [`BlockPool`]: the ledger under a lock, over a [`PagedRegion`] of KV chunks.
//!
//! # Locking
//!
//! Two locks, always taken in this order:
//!
//! 1. `region` (a reader-writer lock around the [`PagedRegion`]): written only by
//!    [`BlockPool::grow`] and the shrinks, which map and unmap chunks; read by host memory access
//!    and [`BlockPool::set_access`].
//! 2. `ledger` (a mutex around the bookkeeping): every sequence operation takes only this one, so
//!    the scheduler's allocations never wait for a chunk to be created or mapped.
//!
//! A grow maps its chunks *before* it tells the ledger, and a shrink takes its chunks out of the
//! ledger *before* it unmaps them; both hold the region's write lock throughout. So every block the
//! ledger can hand out, and every address a manifest names, is mapped. The region's base address
//! never changes, which lets addresses be computed without the region lock.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use hbm_vmm::{Backend, DeviceId, PagedRegion, Vmm};

use crate::admission::{Pressure, Watermarks};
use crate::error::KvError;
use crate::layout::KvLayout;
use crate::ledger::{Ledger, PoolStats};
use crate::loom::{Mutex, RwLock, RwLockReadGuard};
use crate::manifest::{BlockExtent, BlockManifest};
use crate::table::{BlockId, BlockTable, Compaction, Forked, SeqId};

/// Pool identities, so that a [`SeqId`] or [`Compaction`] from one pool is refused by another.
/// (A plain std atomic even under loom: it only has to hand out distinct numbers.)
static NEXT_POOL: AtomicU64 = AtomicU64::new(1);

/// How to build a [`BlockPool`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolConfig {
    /// The block layout.
    pub layout: KvLayout,
    /// The device the pool's memory is on.
    pub device: DeviceId,
    /// Bytes per chunk (a slot of the region): a multiple of the device's VMM granularity that
    /// holds at least one block. [`BlockPool::chunk_bytes_for`] picks one.
    pub chunk_bytes: usize,
    /// Chunks the region has room for: the most the pool can ever grow to. Only address space is
    /// reserved for them up front.
    pub max_chunks: usize,
    /// Chunks mapped at construction.
    pub initial_chunks: usize,
    /// Admission and pressure thresholds.
    pub watermarks: Watermarks,
    /// Create chunks that can be exported to another process (must be decided at creation).
    pub exportable: bool,
}

impl PoolConfig {
    /// A config with no initial chunks, default watermarks and non-exportable chunks.
    pub fn new(layout: KvLayout, device: DeviceId, chunk_bytes: usize, max_chunks: usize) -> Self {
        Self {
            layout,
            device,
            chunk_bytes,
            max_chunks,
            initial_chunks: 0,
            watermarks: Watermarks::default(),
            exportable: false,
        }
    }

    /// Maps `chunks` chunks at construction.
    pub fn with_initial_chunks(mut self, chunks: usize) -> Self {
        self.initial_chunks = chunks;
        self
    }

    /// Uses `watermarks`.
    pub fn with_watermarks(mut self, watermarks: Watermarks) -> Self {
        self.watermarks = watermarks;
        self
    }

    /// Creates exportable chunks.
    pub fn with_exportable(mut self, exportable: bool) -> Self {
        self.exportable = exportable;
        self
    }
}

/// Where blocks are in device memory: block `b` starts at
/// `base + (b / blocks_per_chunk) * chunk_bytes + (b % blocks_per_chunk) * block_stride`.
///
/// These numbers never change for a pool, so a kernel can be given them once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockAddressMap {
    /// Device virtual address of chunk 0.
    pub base: u64,
    /// Bytes per chunk.
    pub chunk_bytes: usize,
    /// Blocks per chunk.
    pub blocks_per_chunk: usize,
    /// Bytes between neighbouring blocks of a chunk.
    pub block_stride: usize,
}

impl BlockAddressMap {
    /// The address of block `b` (mapped or not; [`BlockPool::block_addr`] checks).
    pub fn addr(&self, b: BlockId) -> u64 {
        let (chunk, within) = (
            b.index() / self.blocks_per_chunk,
            b.index() % self.blocks_per_chunk,
        );
        self.base + (chunk * self.chunk_bytes + within * self.block_stride) as u64
    }

    /// Byte offset of block `b` from `base`.
    pub fn offset(&self, b: BlockId) -> usize {
        (self.addr(b) - self.base) as usize
    }
}

/// A sequence made by [`BlockPool::import`], with its blocks as a manifest on this pool.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "the imported sequence's blocks must be filled by copying from the source"]
pub struct Imported {
    /// The new sequence.
    pub seq: SeqId,
    /// Its blocks here: pass it to the source manifest's [`BlockManifest::copies_to`].
    pub manifest: BlockManifest,
}

/// A paged KV cache for one attention rank, over one [`PagedRegion`] on one device.
///
/// Share it as `Arc<BlockPool<B>>`: every method takes `&self`. The scheduler creates, grows, forks
/// and frees sequences while the scaler grows, shrinks, compacts or exports, on other threads.
/// See the crate docs for a walk-through.
pub struct BlockPool<B: Backend> {
    id: u64,
    vmm: Vmm<B>,
    layout: KvLayout,
    device: DeviceId,
    chunk_bytes: usize,
    per_chunk: usize,
    max_chunks: usize,
    exportable: bool,
    watermarks: Watermarks,
    addresses: BlockAddressMap,
    region: RwLock<PagedRegion<B>>,
    ledger: Mutex<Ledger>,
}

impl<B: Backend> fmt::Debug for BlockPool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockPool")
            .field("id", &self.id)
            .field("device", &self.device)
            .field("layout", &self.layout)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("blocks_per_chunk", &self.per_chunk)
            .field("max_chunks", &self.max_chunks)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<B: Backend> BlockPool<B> {
    /// The smallest chunk size (a multiple of `dev`'s granularity) that holds at least
    /// `min_blocks` blocks of `layout`.
    pub fn chunk_bytes_for(
        vmm: &Vmm<B>,
        dev: DeviceId,
        layout: &KvLayout,
        min_blocks: usize,
    ) -> Result<usize, KvError> {
        let granularity = vmm.granularity(dev)?;
        let need = min_blocks
            .max(1)
            .checked_sub(1)
            .and_then(|n| n.checked_mul(layout.block_stride()))
            .and_then(|n| n.checked_add(layout.block_bytes()))
            .and_then(|n| n.checked_next_multiple_of(granularity))
            .ok_or(crate::error::LayoutError::TooLarge)?;
        Ok(need)
    }

    /// Reserves the region and maps `config.initial_chunks` chunks.
    pub fn new(vmm: &Vmm<B>, config: PoolConfig) -> Result<Self, KvError> {
        config.watermarks.validate()?;
        let layout = config.layout;
        let per_chunk = layout.blocks_per_chunk(config.chunk_bytes);
        if per_chunk == 0 {
            return Err(KvError::ChunkTooSmall {
                chunk_bytes: config.chunk_bytes,
                block_bytes: layout.block_bytes(),
            });
        }
        // Block ids are u32.
        let id_limit = (u32::MAX as usize / per_chunk).max(1);
        if config.max_chunks > id_limit {
            return Err(KvError::CapacityLimit {
                requested: config.max_chunks,
                max_chunks: id_limit,
            });
        }
        if config.initial_chunks > config.max_chunks {
            return Err(KvError::CapacityLimit {
                requested: config.initial_chunks,
                max_chunks: config.max_chunks,
            });
        }
        let region = PagedRegion::new(vmm, config.device, config.chunk_bytes, config.max_chunks)?;
        let id = NEXT_POOL.fetch_add(1, Ordering::Relaxed);
        let pool = Self {
            id,
            vmm: vmm.clone(),
            layout,
            device: config.device,
            chunk_bytes: config.chunk_bytes,
            per_chunk,
            max_chunks: config.max_chunks,
            exportable: config.exportable,
            watermarks: config.watermarks,
            addresses: BlockAddressMap {
                base: region.base(),
                chunk_bytes: config.chunk_bytes,
                blocks_per_chunk: per_chunk,
                block_stride: layout.block_stride(),
            },
            region: RwLock::new(region),
            ledger: Mutex::new(Ledger::new(id, layout.block_tokens(), per_chunk)),
        };
        pool.grow(config.initial_chunks)?;
        Ok(pool)
    }

    /// The block layout.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// The device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// Bytes per chunk.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// Blocks per chunk.
    pub fn blocks_per_chunk(&self) -> usize {
        self.per_chunk
    }

    /// The most chunks the pool can hold.
    pub fn max_chunks(&self) -> usize {
        self.max_chunks
    }

    /// The watermarks.
    pub fn watermarks(&self) -> &Watermarks {
        &self.watermarks
    }

    /// The virtual-memory manager the pool's chunks come from.
    pub fn vmm(&self) -> &Vmm<B> {
        &self.vmm
    }

    /// Where blocks are (constant for the pool's life).
    pub fn address_map(&self) -> BlockAddressMap {
        self.addresses
    }

    // ---- capacity -------------------------------------------------------------------------

    /// Adds `chunks` chunks at the tail, each holding [`BlockPool::blocks_per_chunk`] new free
    /// blocks. All or nothing: on an error (device out of memory, past `max_chunks`) the pool is
    /// unchanged.
    pub fn grow(&self, chunks: usize) -> Result<(), KvError> {
        if chunks == 0 {
            return Ok(());
        }
        // A cheap early refusal before creating anything; re-checked under the lock below.
        let now = self.ledger.lock().chunks();
        if now.saturating_add(chunks) > self.max_chunks {
            return Err(KvError::CapacityLimit {
                requested: now.saturating_add(chunks),
                max_chunks: self.max_chunks,
            });
        }
        // Create outside every lock: this is the slow part on a real device.
        let fresh = (0..chunks)
            .map(|_| {
                self.vmm
                    .create_chunk(self.device, self.chunk_bytes, self.exportable)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut region = self.region.write();
        // The chunk count only changes under the region's write lock, which we hold.
        let start = self.ledger.lock().chunks();
        if start + chunks > self.max_chunks {
            return Err(KvError::CapacityLimit {
                requested: start + chunks,
                max_chunks: self.max_chunks,
            });
        }
        for (j, chunk) in fresh.into_iter().enumerate() {
            if let Err(e) = region.map_slot(start + j, chunk) {
                for undo in (start..start + j).rev() {
                    // Undoing a mapping we just made; if even that fails the vmm records it.
                    let _ = region.unmap_slot(undo);
                }
                return Err(e.into());
            }
        }
        self.ledger.lock().add_chunks(chunks);
        Ok(())
    }

    /// Releases the last `chunks` chunks. Refused with [`KvError::ShrinkBelowUse`], changing
    /// nothing, unless all their blocks are free (see [`PoolStats::free_tail_chunks`]).
    pub fn shrink(&self, chunks: usize) -> Result<(), KvError> {
        self.shrink_with(|ledger| ledger.remove_tail_chunks(chunks).map(|()| chunks))
            .map(|_| ())
    }

    /// Releases every free chunk at the tail but keeps at least `keep` chunks; returns how many
    /// were released.
    pub fn shrink_free_tail(&self, keep: usize) -> Result<usize, KvError> {
        self.shrink_with(|ledger| {
            let k = ledger
                .free_tail_chunks()
                .min(ledger.chunks().saturating_sub(keep));
            ledger.remove_tail_chunks(k).map(|()| k)
        })
    }

    fn shrink_with(
        &self,
        take: impl FnOnce(&mut Ledger) -> Result<usize, KvError>,
    ) -> Result<usize, KvError> {
        let mut region = self.region.write();
        let (new_len, k) = {
            let mut ledger = self.ledger.lock();
            let k = take(&mut ledger)?;
            (ledger.chunks(), k)
        };
        // The ledger no longer hands out these blocks; now unmap, top down.
        for i in (new_len..new_len + k).rev() {
            if let Err(e) = region.unmap_slot(i) {
                // Slots new_len..=i are still mapped and empty: give them back to the ledger.
                self.ledger.lock().add_chunks(i + 1 - new_len);
                return Err(e.into());
            }
        }
        Ok(k)
    }

    /// Grants `devices` access to the pool's memory (now and for chunks mapped later), so that
    /// peers can copy blocks in or out. Expensive on real devices; do it once, off the serving
    /// path.
    pub fn set_access(&self, devices: &[DeviceId]) -> Result<(), KvError> {
        Ok(self.region.read().set_access(devices)?)
    }

    /// Runs `f` with the pool's region, which cannot grow or shrink meanwhile. This is the door to
    /// backend-specific access: `slot_bytes` on the host backend, `device_view` on CUDA (for
    /// cudarc copies and kernels). Block `b` is at byte [`BlockAddressMap::offset`] of the region.
    ///
    /// Do not call [`BlockPool::grow`], the shrinks or [`BlockPool::with_host_blocks`] from inside
    /// `f`: they wait for the region, which `f`'s caller holds.
    pub fn with_region<R>(&self, f: impl FnOnce(&PagedRegion<B>) -> R) -> R {
        f(&self.region.read())
    }

    // ---- sequences ------------------------------------------------------------------------

    /// A new, empty sequence.
    pub fn create(&self) -> SeqId {
        self.ledger.lock().create()
    }

    /// Grows `seq` so that it holds `tokens` tokens, allocating blocks as needed (a no-op when it
    /// already holds that many). Returns the new blocks. All or nothing:
    /// [`KvError::OutOfBlocks`] allocates nothing.
    pub fn grow_to(&self, seq: SeqId, tokens: usize) -> Result<Vec<BlockId>, KvError> {
        self.ledger.lock().grow_to(seq, tokens)
    }

    /// Appends `tokens` tokens to `seq`; see [`BlockPool::grow_to`].
    pub fn append(&self, seq: SeqId, tokens: usize) -> Result<Vec<BlockId>, KvError> {
        let mut ledger = self.ledger.lock();
        let len = ledger.len(seq)?;
        let target = len.checked_add(tokens).ok_or(KvError::OutOfBlocks {
            needed: usize::MAX,
            free: ledger.free_blocks(),
        })?;
        ledger.grow_to(seq, target)
    }

    /// Frees `seq`. Blocks it shared with other sequences stay theirs; returns how many blocks
    /// became free.
    pub fn free(&self, seq: SeqId) -> Result<usize, KvError> {
        self.ledger.lock().release(seq)
    }

    /// A new sequence sharing all of `parent`'s tokens; see [`BlockPool::fork_prefix`].
    pub fn fork(&self, parent: SeqId) -> Result<Forked, KvError> {
        let mut ledger = self.ledger.lock();
        let len = ledger.len(parent)?;
        ledger.fork(parent, len)
    }

    /// A new sequence holding the first `tokens` tokens of `parent`. Whole blocks are shared (by
    /// reference count, no bytes move). If the prefix ends inside a block, the child gets a fresh
    /// block for it and the returned [`Forked::copy`] names the copy the caller must make before
    /// using the child. After a fork, neither sequence ever writes into a shared block.
    pub fn fork_prefix(&self, parent: SeqId, tokens: usize) -> Result<Forked, KvError> {
        self.ledger.lock().fork(parent, tokens)
    }

    /// Tokens `seq` holds.
    pub fn tokens(&self, seq: SeqId) -> Result<usize, KvError> {
        self.ledger.lock().len(seq)
    }

    /// A snapshot of `seq`'s block table.
    pub fn table(&self, seq: SeqId) -> Result<BlockTable, KvError> {
        self.ledger.lock().table(seq)
    }

    /// The device address of block `b`.
    pub fn block_addr(&self, b: BlockId) -> Result<u64, KvError> {
        let capacity = self.ledger.lock().capacity();
        if b.index() >= capacity {
            return Err(KvError::NoSuchBlock { block: b, capacity });
        }
        Ok(self.addresses.addr(b))
    }

    // ---- migration ------------------------------------------------------------------------

    /// `seq`'s blocks as device ranges, to copy it to another pool. Nothing is held: keep the
    /// sequence alive (and do not commit a compaction) until the copies are done.
    pub fn export(&self, seq: SeqId) -> Result<BlockManifest, KvError> {
        let table = self.table(seq)?;
        Ok(self.manifest_of(&table))
    }

    fn manifest_of(&self, table: &BlockTable) -> BlockManifest {
        BlockManifest {
            seq: table.seq(),
            layout: self.layout,
            device: self.device,
            tokens: table.len(),
            blocks: table
                .blocks()
                .iter()
                .map(|&block| BlockExtent {
                    block,
                    addr: self.addresses.addr(block),
                    bytes: self.layout.block_bytes(),
                })
                .collect(),
        }
    }

    /// A new sequence with room for the tokens of `manifest` (exported by another pool). The
    /// caller copies the bytes (`manifest.copies_to(&imported.manifest)`) before using it.
    /// Sharing between exported sequences is not preserved: each import gets private blocks.
    pub fn import(&self, manifest: &BlockManifest) -> Result<Imported, KvError> {
        if manifest.layout != self.layout {
            return Err(KvError::LayoutMismatch {
                pool: Box::new(self.layout),
                manifest: Box::new(manifest.layout),
            });
        }
        let block_tokens = self.layout.block_tokens();
        if manifest.blocks.len() != self.layout.blocks_for(manifest.tokens) {
            return Err(KvError::BadManifest {
                blocks: manifest.blocks.len(),
                tokens: manifest.tokens,
                block_tokens,
            });
        }
        let table = {
            let mut ledger = self.ledger.lock();
            let seq = ledger.import(manifest.tokens)?;
            ledger.table(seq)?
        };
        Ok(Imported {
            seq: table.seq(),
            manifest: self.manifest_of(&table),
        })
    }

    // ---- compaction -----------------------------------------------------------------------

    /// Plans packing every used block into the lowest chunks. Nothing moves yet; see
    /// [`Compaction`] for the protocol (copy each move, then
    /// [`BlockPool::commit_compaction`]). Refused while another compaction is pending.
    pub fn compact(&self) -> Result<Compaction, KvError> {
        self.ledger.lock().compact()
    }

    /// Points every block table at the moved blocks and frees the old ones. Call after copying
    /// every move's bytes. Then [`BlockPool::shrink_free_tail`] can release the emptied chunks.
    pub fn commit_compaction(&self, compaction: Compaction) -> Result<(), KvError> {
        self.ledger.lock().commit(compaction)
    }

    /// Drops a compaction without moving anything.
    pub fn abort_compaction(&self, compaction: Compaction) -> Result<(), KvError> {
        self.ledger.lock().abort(compaction)
    }

    // ---- accounting -----------------------------------------------------------------------

    /// Current counts.
    pub fn stats(&self) -> PoolStats {
        self.ledger.lock().stats()
    }

    /// Whether a new sequence of `tokens` tokens may be admitted: its blocks plus the admission
    /// reserve are free. Advisory: a later grow can still fail if others allocate in between.
    pub fn can_admit(&self, tokens: usize) -> bool {
        let (capacity, free) = {
            let ledger = self.ledger.lock();
            (ledger.capacity(), ledger.free_blocks())
        };
        self.watermarks
            .admits(capacity, free, self.layout.blocks_for(tokens))
    }

    /// How full the pool is against its watermarks.
    pub fn pressure(&self) -> Pressure {
        let (capacity, used) = {
            let ledger = self.ledger.lock();
            (ledger.capacity(), ledger.used())
        };
        self.watermarks.pressure(capacity, used)
    }

    pub(crate) fn region_read(&self) -> RwLockReadGuard<'_, PagedRegion<B>> {
        self.region.read()
    }

    /// Mapped chunks; stable while the caller holds the region lock.
    pub(crate) fn mapped_chunks(&self) -> usize {
        self.ledger.lock().chunks()
    }

    #[cfg(test)]
    pub(crate) fn audit(&self) -> Result<(), String> {
        let region = self.region.read();
        let ledger = self.ledger.lock();
        for i in 0..self.max_chunks {
            if region.is_mapped(i) != (i < ledger.chunks()) {
                return Err(format!(
                    "slot {i}: mapped {} but ledger has {} chunks",
                    region.is_mapped(i),
                    ledger.chunks()
                ));
            }
        }
        ledger.audit()
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
