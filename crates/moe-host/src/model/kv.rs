//! KV blocks that live in an `hbm-vmm` [`PagedRegion`] of the host backend, laid out the way
//! `kv-pool` lays out its pool: slot `s` of the region is one chunk holding `blocks_per_slot`
//! blocks; block `b` sits in slot `b / blocks_per_slot` at byte `(b % blocks_per_slot) * stride`.
//!
//! [`RegionKv`] takes exclusive host access to every mapped slot for as long as it lives (one
//! engine iteration on one rank), and hands the attention kernels `f32` views of single blocks.

use hbm_vmm::host::HostBackend;
use hbm_vmm::{HostWrite, PagedRegion};

use super::ModelError;
use crate::compute::{ComputeError, KvBlocks, KvGeometry};

/// Paged KV blocks over a host [`PagedRegion`] (see the module docs).
#[derive(Debug)]
pub struct RegionKv<'a> {
    slots: Vec<Option<HostWrite<'a>>>,
    block_floats: usize,
    stride_floats: usize,
    per_slot: usize,
}

impl<'a> RegionKv<'a> {
    /// Views `region`'s mapped slots as blocks of `geo`, `block_stride` bytes apart, with
    /// `blocks_per_slot` blocks in each slot. Unmapped slots hold no blocks.
    pub fn new(
        region: &'a PagedRegion<HostBackend>,
        geo: &KvGeometry,
        block_stride: usize,
        blocks_per_slot: usize,
    ) -> Result<Self, ModelError> {
        let block_floats = geo.block_floats();
        if !block_stride.is_multiple_of(4)
            || block_stride < block_floats * 4
            || blocks_per_slot == 0
        {
            return Err(ModelError::Unsupported(format!(
                "KV stride {block_stride} bytes for blocks of {} bytes, {blocks_per_slot} per slot",
                block_floats * 4
            )));
        }
        let needed = (blocks_per_slot - 1) * block_stride + block_floats * 4;
        if needed > region.slot_size() {
            return Err(ModelError::ChunkTooSmall {
                needed: needed / 4,
                got: region.slot_size() / 4,
            });
        }
        let slots = (0..region.slot_count())
            .map(|i| {
                if region.is_mapped(i) {
                    region.slot_bytes_mut(i).ok()
                } else {
                    None
                }
            })
            .collect();
        Ok(Self {
            slots,
            block_floats,
            stride_floats: block_stride / 4,
            per_slot: blocks_per_slot,
        })
    }

    /// Blocks addressable through this view (mapped or not).
    pub fn capacity(&self) -> usize {
        self.slots.len() * self.per_slot
    }

    fn place(&self, id: u32) -> Result<(usize, usize), ComputeError> {
        let (slot, i) = (id as usize / self.per_slot, id as usize % self.per_slot);
        match self.slots.get(slot) {
            Some(Some(_)) => Ok((slot, i * self.stride_floats)),
            _ => Err(ComputeError::NoSuchBlock {
                block: id,
                blocks: self.capacity(),
            }),
        }
    }
}

impl KvBlocks for RegionKv<'_> {
    fn block(&self, id: u32) -> Result<&[f32], ComputeError> {
        let (slot, off) = self.place(id)?;
        let data = self.slots[slot]
            .as_ref()
            .map(|g| g.as_f32())
            .unwrap_or_default();
        Ok(&data[off..off + self.block_floats])
    }

    fn block_mut(&mut self, id: u32) -> Result<&mut [f32], ComputeError> {
        let (slot, off) = self.place(id)?;
        let n = self.block_floats;
        let data = self.slots[slot]
            .as_mut()
            .map(|g| g.as_f32_mut())
            .unwrap_or_default();
        Ok(&mut data[off..off + n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::cpu::CpuCompute;
    use crate::compute::{SeqSpan, VecKvBlocks};
    use crate::model::runner::{LocalExperts, ReplicaGuards};
    use crate::model::weights::{DeviceWeights, MemTensors};
    use crate::model::{Logits, Model, StepBatch};
    use hbm_vmm::host::HostConfig;
    use hbm_vmm::{DeviceId, Vmm};
    use moe_model::presets::Preset;

    #[test]
    fn forward_over_a_paged_region_matches_owned_blocks_bitwise() {
        let cfg = Preset::TinyDeepseek.config();
        let model = Model::new(&cfg, CpuCompute::new()).unwrap();
        let src = MemTensors::seeded(&cfg, 4);
        let page = hbm_vmm::host::page_size();
        let vmm = Vmm::new(HostBackend::new(
            HostConfig::devices(1, 64 << 20)
                .with_granularity(page)
                .unwrap(),
        ));
        let dev = DeviceId(0);
        let experts: Vec<(usize, u32)> = cfg
            .moe_layers()
            .flat_map(|l| (0..cfg.moe.num_experts as u32).map(move |e| (l, e)))
            .collect();
        let w = DeviceWeights::load(&vmm, dev, model.layout(), &src, experts).unwrap();
        let geo = model.kv_geometry(4);
        // Stride padded to 256 bytes, as a pool might; two blocks per slot, slot 1 left unmapped.
        let stride = (geo.block_floats() * 4).div_ceil(256) * 256;
        let slot_size = (stride + geo.block_floats() * 4).div_ceil(page) * page;
        let mut region = PagedRegion::new(&vmm, dev, slot_size, 4).unwrap();
        for s in [0, 2, 3] {
            region
                .map_slot(s, vmm.create_chunk(dev, slot_size, false).unwrap())
                .unwrap();
        }
        let tokens: Vec<u32> = (0..10)
            .map(|i| (i * 29 + 3) % cfg.vocab_size as u32)
            .collect();
        let run = |store: &mut dyn KvBlocks, blocks: &[u32]| {
            let guards = ReplicaGuards::new(&w).unwrap();
            let global = guards.global(&w).unwrap();
            let layers = guards.layers(&w).unwrap();
            let mut ex = LocalExperts::new(&model, &w);
            let seqs = [SeqSpan {
                blocks,
                start: 0,
                len: tokens.len(),
            }];
            let batch = StepBatch {
                geo: &geo,
                seqs: &seqs,
                tokens: &tokens,
            };
            model
                .forward(&global, &layers, store, batch, &mut ex, Logits::All)
                .unwrap()
        };
        let mut owned = VecKvBlocks::new(geo.block_floats());
        let own_blocks: Vec<u32> = (0..3).map(|_| owned.alloc()).collect();
        let want = run(&mut owned, &own_blocks);
        let mut paged = RegionKv::new(&region, &geo, stride, 2).unwrap();
        assert_eq!(paged.capacity(), 8);
        // Blocks 7, 0, 5: slots 3, 0, 2, out of order.
        let got = run(&mut paged, &[7, 0, 5]);
        assert!(want
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        // The same KV bytes landed in the region.
        for (o, p) in own_blocks.iter().zip([7u32, 0, 5]) {
            assert_eq!(owned.block(*o).unwrap(), paged.block(p).unwrap());
        }
        // Blocks of an unmapped slot, or past the region, are refused.
        assert!(matches!(
            paged.block(2),
            Err(ComputeError::NoSuchBlock {
                block: 2,
                blocks: 8
            })
        ));
        assert!(matches!(
            paged.block_mut(8),
            Err(ComputeError::NoSuchBlock { .. })
        ));
        drop(paged);
        // A stride shorter than a block, or slots too small, are refused.
        assert!(RegionKv::new(&region, &geo, 4, 2).is_err());
        assert!(matches!(
            RegionKv::new(&region, &geo, stride, 64),
            Err(ModelError::ChunkTooSmall { .. })
        ));
    }
}
