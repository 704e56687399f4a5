//! CPU access to the blocks of a pool on the host backend (the CPU reference engine and the tests).

use hbm_vmm::host::HostBackend;
use hbm_vmm::HostWrite;

use crate::error::KvError;
use crate::pool::BlockPool;
use crate::table::BlockId;

/// Every mapped block of a host pool, readable and writable, for the length of one
/// [`BlockPool::with_host_blocks`] call.
///
/// Block slices are exactly [`crate::KvLayout::block_bytes`] long (no padding), laid out as
/// [`crate::KvLayout`] describes.
pub struct HostBlocks<'a> {
    chunks: Vec<HostWrite<'a>>,
    per_chunk: usize,
    stride: usize,
    block_bytes: usize,
}

impl std::fmt::Debug for HostBlocks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBlocks")
            .field("chunks", &self.chunks.len())
            .field("blocks_per_chunk", &self.per_chunk)
            .finish()
    }
}

impl HostBlocks<'_> {
    /// Blocks reachable (every block of every mapped chunk).
    pub fn capacity(&self) -> usize {
        self.chunks.len() * self.per_chunk
    }

    fn place(&self, b: BlockId) -> Result<(usize, usize), KvError> {
        if b.index() >= self.capacity() {
            return Err(KvError::NoSuchBlock {
                block: b,
                capacity: self.capacity(),
            });
        }
        Ok((
            b.index() / self.per_chunk,
            (b.index() % self.per_chunk) * self.stride,
        ))
    }

    /// Block `b`'s bytes.
    pub fn block(&self, b: BlockId) -> Result<&[u8], KvError> {
        let (c, off) = self.place(b)?;
        Ok(&self.chunks[c][off..off + self.block_bytes])
    }

    /// Block `b`'s bytes, writable.
    pub fn block_mut(&mut self, b: BlockId) -> Result<&mut [u8], KvError> {
        let (c, off) = self.place(b)?;
        let n = self.block_bytes;
        Ok(&mut self.chunks[c][off..off + n])
    }

    /// Block `b` as `f32`s (for [`crate::KvDtype::F32`] layouts).
    pub fn block_f32(&self, b: BlockId) -> Result<&[f32], KvError> {
        let (c, off) = self.place(b)?;
        let (start, n) = (off / 4, self.block_bytes / 4);
        Ok(&self.chunks[c].as_f32()[start..start + n])
    }

    /// Block `b` as writable `f32`s.
    pub fn block_f32_mut(&mut self, b: BlockId) -> Result<&mut [f32], KvError> {
        let (c, off) = self.place(b)?;
        let (start, n) = (off / 4, self.block_bytes / 4);
        Ok(&mut self.chunks[c].as_f32_mut()[start..start + n])
    }

    /// Copies block `src` over block `dst` (a caller-side helper for [`crate::BlockCopy`] and
    /// [`crate::Relocation`] on the host backend).
    pub fn copy_block(&mut self, src: BlockId, dst: BlockId) -> Result<(), KvError> {
        let (sc, so) = self.place(src)?;
        let (dc, d_off) = self.place(dst)?;
        let n = self.block_bytes;
        if sc == dc {
            self.chunks[sc].copy_within(so..so + n, d_off);
        } else {
            let (lo, hi) = self.chunks.split_at_mut(sc.max(dc));
            let (s, d) = if sc < dc {
                (&lo[sc], &mut hi[0])
            } else {
                (&hi[0], &mut lo[dc])
            };
            d[d_off..d_off + n].copy_from_slice(&s[so..so + n]);
        }
        Ok(())
    }
}

impl BlockPool<HostBackend> {
    /// Runs `f` with CPU access to every mapped block.
    ///
    /// While `f` runs, the pool cannot grow or shrink and no other host access to its chunks can
    /// start (it holds the region for reading and every chunk's host lock for writing). Sequence
    /// operations ([`BlockPool::grow_to`], [`BlockPool::fork`], ...) still work from inside `f`
    /// and from other threads; do not call [`BlockPool::grow`], the shrinks or
    /// `with_host_blocks` itself from inside `f` (they would wait for `f` forever).
    pub fn with_host_blocks<R>(
        &self,
        f: impl FnOnce(&mut HostBlocks<'_>) -> R,
    ) -> Result<R, KvError> {
        let region = self.region_read();
        let chunks = self.mapped_chunks();
        let guards = (0..chunks)
            .map(|i| region.slot_bytes_mut(i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut blocks = HostBlocks {
            chunks: guards,
            per_chunk: self.blocks_per_chunk(),
            stride: self.layout().block_stride(),
            block_bytes: self.layout().block_bytes(),
        };
        Ok(f(&mut blocks))
    }
}
