//! Manifests: a sequence's blocks as device addresses, for moving it to another pool.

use hbm_vmm::DeviceId;

use crate::error::KvError;
use crate::layout::KvLayout;
use crate::table::{BlockId, SeqId};

/// One block of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockExtent {
    /// The block in its pool.
    pub block: BlockId,
    /// Its device virtual address.
    pub addr: u64,
    /// Its payload in bytes ([`KvLayout::block_bytes`]).
    pub bytes: usize,
}

/// A sequence's KV as a list of device ranges, in token order.
///
/// Made by [`crate::BlockPool::export`] on the source pool and by [`crate::BlockPool::import`] on the
/// destination. Pair the two with [`BlockManifest::copies_to`] and hand the copies to `p2p-xfer`.
/// The addresses stay valid while the sequence lives in its pool and no compaction of that pool
/// commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockManifest {
    /// The sequence in its pool.
    pub seq: SeqId,
    /// The block layout (an import checks it against its own).
    pub layout: KvLayout,
    /// The device the addresses are on.
    pub device: DeviceId,
    /// Tokens the sequence holds.
    pub tokens: usize,
    /// The blocks, in token order.
    pub blocks: Vec<BlockExtent>,
}

/// One device-to-device copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRange {
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Bytes.
    pub bytes: usize,
}

impl BlockManifest {
    /// Total payload bytes.
    pub fn bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.bytes).sum()
    }

    /// The copies that move this sequence's bytes into `dst` (made by importing this manifest),
    /// with runs of blocks that are adjacent on both sides merged into one copy.
    ///
    /// A merged copy also carries the alignment padding between its blocks, which is never read.
    pub fn copies_to(&self, dst: &BlockManifest) -> Result<Vec<CopyRange>, KvError> {
        if self.layout != dst.layout {
            return Err(KvError::LayoutMismatch {
                pool: Box::new(dst.layout),
                manifest: Box::new(self.layout),
            });
        }
        if self.blocks.len() != dst.blocks.len() || self.tokens != dst.tokens {
            return Err(KvError::BadManifest {
                blocks: dst.blocks.len(),
                tokens: self.tokens,
                block_tokens: self.layout.block_tokens(),
            });
        }
        let stride = self.layout.block_stride() as u64;
        let mut out: Vec<CopyRange> = Vec::new();
        for (s, d) in self.blocks.iter().zip(&dst.blocks) {
            if let Some(last) = out.last_mut() {
                // `last` ends with a whole block payload; the next block starts one stride after
                // that block's start on both sides.
                let block_start_src = last.src + last.bytes as u64 - s.bytes as u64;
                let block_start_dst = last.dst + last.bytes as u64 - s.bytes as u64;
                if s.addr == block_start_src + stride && d.addr == block_start_dst + stride {
                    last.bytes = (s.addr + s.bytes as u64 - last.src) as usize;
                    continue;
                }
            }
            out.push(CopyRange {
                src: s.addr,
                dst: d.addr,
                bytes: s.bytes,
            });
        }
        Ok(out)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::layout::KvDtype;

    fn manifest(layout: KvLayout, addrs: &[u64]) -> BlockManifest {
        BlockManifest {
            seq: SeqId { pool: 1, index: 0 },
            layout,
            device: DeviceId(0),
            tokens: addrs.len() * layout.block_tokens(),
            blocks: addrs
                .iter()
                .enumerate()
                .map(|(i, &addr)| BlockExtent {
                    block: BlockId(i as u32),
                    addr,
                    bytes: layout.block_bytes(),
                })
                .collect(),
        }
    }

    #[test]
    fn adjacent_runs_merge_on_both_sides_only() {
        let l = KvLayout::gqa(1, 1, 10, KvDtype::F32, 2).unwrap(); // 160 bytes, stride 256
        let s = manifest(l, &[0, 256, 512, 4096, 4352]);
        let d = manifest(l, &[1024, 1280, 8192, 8448, 8704]);
        let c = s.copies_to(&d).unwrap();
        assert_eq!(
            c,
            vec![
                CopyRange {
                    src: 0,
                    dst: 1024,
                    bytes: 256 + 160
                },
                CopyRange {
                    src: 512,
                    dst: 8192,
                    bytes: 160
                },
                CopyRange {
                    src: 4096,
                    dst: 8448,
                    bytes: 256 + 160
                },
            ]
        );
        // Every block's payload is inside exactly one copy, at the same offset on both sides.
        for (sb, db) in s.blocks.iter().zip(&d.blocks) {
            let hits: Vec<_> = c
                .iter()
                .filter(|r| sb.addr >= r.src && sb.addr + sb.bytes as u64 <= r.src + r.bytes as u64)
                .collect();
            assert_eq!(hits.len(), 1);
            assert_eq!(db.addr - hits[0].dst, sb.addr - hits[0].src);
        }
    }

    #[test]
    fn mismatched_manifests_are_refused() {
        let l = KvLayout::gqa(1, 1, 10, KvDtype::F32, 2).unwrap();
        let m = KvLayout::mla(1, 10, 2, KvDtype::F32, 2).unwrap();
        assert!(matches!(
            manifest(l, &[0]).copies_to(&manifest(m, &[0])),
            Err(KvError::LayoutMismatch { .. })
        ));
        assert!(matches!(
            manifest(l, &[0]).copies_to(&manifest(l, &[0, 256])),
            Err(KvError::BadManifest { .. })
        ));
    }
}
