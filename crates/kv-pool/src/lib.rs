//! `kv-pool`: a paged KV cache per attention rank that stays in place, grows, shrinks and migrates.
//!
//! # What it owns
//!
//! - [`KvLayout`]: where each byte of a block lives, for GQA (K and V per KV head) and MLA
//!   (DeepSeek-V2's compressed latent plus rope key) models. A block holds `block_tokens` tokens
//!   of one sequence for every layer, in the layout `moe-host`'s kernels read.
//! - [`BlockPool`]: the blocks of one rank, in chunks mapped into an [`hbm_vmm::PagedRegion`]. It
//!   grows by mapping chunks at the tail and shrinks by unmapping free chunks at the tail; block
//!   addresses never change while a block lives, so running sequences are never disturbed.
//! - Per-sequence block tables ([`BlockTable`]): grow (append), free, and [`BlockPool::fork`]
//!   with reference-counted prefix sharing and copy-on-write of a partial last block.
//! - Migration: [`BlockPool::export`] gives a [`BlockManifest`] (addresses and sizes);
//!   [`BlockPool::import`] on another pool allocates the matching blocks.
//! - Compaction on request ([`BlockPool::compact`]), as a relocation list.
//! - Accounting ([`PoolStats`]) and [`Watermarks`] for admission ([`BlockPool::can_admit`]) and
//!   scaling ([`BlockPool::pressure`]).
//!
//! # Architecture invariants
//!
//! - **It never copies KV bytes.** Forks, compactions and migrations *say* which bytes must move
//!   ([`BlockCopy`], [`Relocation`], [`BlockManifest::copies_to`]); the caller moves them (with
//!   `p2p-xfer`, a kernel, or [`HostBlocks::copy_block`] on the host backend).
//! - **It never frees a block that is still referenced.** A block is free only when no block table
//!   lists it and no pending compaction holds it; a shrink only unmaps chunks whose blocks are all
//!   free.
//! - **It never writes into a shared block.** Only full blocks are shared; a fork whose prefix
//!   ends inside a block gives the child its own copy of that block.
//! - It calls no device API except through `hbm-vmm`, and has no `unsafe`.
//! - Every refusal is a typed [`KvError`] and leaves the pool unchanged; the caller decides what
//!   to do (for [`KvError::OutOfBlocks`]: preempt, grow, or wait).
//!
//! # Sharing
//!
//! A pool is `Sync`; share it as `Arc<BlockPool<B>>`. Sequence operations take one short lock on
//! the bookkeeping; growing and shrinking also take the region's lock, and map or unmap outside
//! the bookkeeping lock, so the scheduler can allocate while the scaler reshapes the pool. The
//! loom models (`src/pool/loom_tests.rs`) check alloc, free, fork, grow, shrink and export running
//! at once.
//!
//! # How an engine uses it
//!
//! ```
//! use std::sync::Arc;
//! use hbm_vmm::{host::{HostBackend, HostConfig}, DeviceId, Vmm};
//! use kv_pool::{BlockPool, KvDtype, KvLayout, PoolConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let page = hbm_vmm::host::page_size();
//! let vmm = Vmm::new(HostBackend::new(HostConfig::devices(2, 256 * page).with_granularity(page)?));
//! // A small GQA model: 2 layers, 2 KV heads of 8 elements, f32 on the CPU, 4-token blocks.
//! let layout = KvLayout::gqa(2, 2, 8, KvDtype::F32, 4)?;
//! let chunk = BlockPool::chunk_bytes_for(&vmm, DeviceId(0), &layout, 8)?;
//! let config = PoolConfig::new(layout, DeviceId(0), chunk, 16).with_initial_chunks(1);
//! let pool = Arc::new(BlockPool::new(&vmm, config)?);
//!
//! // Admission, then prefill of a 10-token prompt: 3 blocks.
//! assert!(pool.can_admit(10));
//! let seq = pool.create();
//! assert_eq!(pool.grow_to(seq, 10)?.len(), 3);
//!
//! // The kernel finds token 9's K vector for layer 1, head 0 through the table and the layout.
//! let (block, slot) = pool.table(seq)?.locate(9).expect("token 9 exists");
//! let k = layout.k_offset(1, slot, 0)? / 4;
//! pool.with_host_blocks(|kv| kv.block_f32_mut(block).map(|b| b[k] = 1.5))??;
//!
//! // Parallel sampling: the child shares the two full blocks and gets a copy of the partial one,
//! // which the caller makes.
//! let forked = pool.fork(seq)?;
//! if let Some(copy) = forked.copy {
//!     pool.with_host_blocks(|kv| kv.copy_block(copy.src, copy.dst))??;
//! }
//! assert_eq!(pool.stats().shared, 2);
//! pool.append(forked.child, 1)?; // decode step: token 10 fits in the child's own block
//!
//! // Scale-down: move `seq` to a pool on device 1 and carry on there.
//! let other = BlockPool::new(&vmm, PoolConfig::new(layout, DeviceId(1), chunk, 16).with_initial_chunks(1))?;
//! let manifest = pool.export(seq)?;
//! let imported = other.import(&manifest)?;
//! assert_eq!(manifest.copies_to(&imported.manifest)?.len(), 1); // both sides contiguous: one copy
//! for (src, dst) in manifest.blocks.iter().zip(&imported.manifest.blocks) {
//!     // On GPUs p2p-xfer makes these copies; on the host backend, plain memory copies.
//!     let bytes = pool.with_host_blocks(|kv| kv.block(src.block).map(<[u8]>::to_vec))??;
//!     other.with_host_blocks(|kv| kv.block_mut(dst.block).map(|b| b.copy_from_slice(&bytes)))??;
//! }
//! pool.free(seq)?;
//! let (block, slot) = other.table(imported.seq)?.locate(9).expect("token 9 moved");
//! let k = layout.k_offset(1, slot, 0)? / 4;
//! assert_eq!(other.with_host_blocks(|kv| kv.block_f32(block).map(|b| b[k]))??, 1.5);
//!
//! // The scaler: grow under pressure, give back free chunks when load drops.
//! pool.grow(1)?;
//! pool.free(forked.child)?;
//! assert_eq!(pool.shrink_free_tail(1)?, 1);
//! assert_eq!(pool.stats().used, 0);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

mod admission;
mod error;
mod host;
mod layout;
mod ledger;
mod loom;
mod manifest;
mod pool;
mod table;

pub use admission::{Pressure, Watermarks};
pub use error::{KvError, LayoutError};
pub use host::HostBlocks;
pub use layout::{
    AttentionKind, GqaStrides, KvDtype, KvLayout, KvStrides, MlaStrides, BLOCK_ALIGN,
};
pub use ledger::PoolStats;
pub use manifest::{BlockExtent, BlockManifest, CopyRange};
pub use pool::{BlockAddressMap, BlockPool, Imported, PoolConfig};
pub use table::{BlockCopy, BlockId, BlockTable, Compaction, Forked, Relocation, SeqId};
