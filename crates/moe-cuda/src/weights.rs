//! Where the weights live on the devices and how they get their values: routed experts'
//! chunks ([`ExpertBuf`]), tensor addresses inside a chunk, and filling a tensor from a source,
//! at random or not at all ([`Fill`]).

use cudarc::cublas::sys as blas_sys;
use hbm_vmm::DeviceId;
use moe_host::model::ModelError;
use moe_model::schema::TensorRole;
use moe_model::weights::{ChunkLayout, TensorSource};

use crate::error::CudaError;
use crate::memory::DevBuf;
use crate::rank::RankState;
use crate::runner::CudaRunner;

/// A routed expert's chunk, on the device that holds it.
#[derive(Debug)]
pub(crate) struct ExpertBuf {
    pub(crate) dev: DeviceId,
    pub(crate) buf: DevBuf,
}

pub(crate) fn slot_addr(
    base: u64,
    layout: &ChunkLayout,
    role: TensorRole,
    es: usize,
) -> Result<u64, CudaError> {
    layout
        .tensors()
        .iter()
        .find(|t| t.role == role)
        .map(|t| base + (es * t.offset) as u64)
        .ok_or(CudaError::Model(ModelError::Layout { role }))
}

pub(crate) fn has_role(layout: &ChunkLayout, role: TensorRole) -> bool {
    layout.tensors().iter().any(|t| t.role == role)
}

/// How weights get their values.
pub(crate) enum Fill<'a> {
    Source(&'a dyn TensorSource),
    Random(u64),
    /// Left as allocated: the bytes arrive later by peer copies (a warm rank).
    Skip,
}

impl CudaRunner {
    pub(crate) fn fill_tensor(
        rank: &RankState,
        addr: u64,
        n: usize,
        spec: &moe_model::schema::TensorSpec,
        fill: &Fill<'_>,
        seed_ctr: &mut u64,
    ) -> Result<(), CudaError> {
        match fill {
            Fill::Source(src) => {
                src.check(spec).map_err(|e| CudaError::Tensor {
                    name: spec.name.clone(),
                    msg: e.to_string(),
                })?;
                let tensor_err = |e: Box<dyn std::error::Error + Send + Sync>| CudaError::Tensor {
                    name: spec.name.clone(),
                    msg: e.to_string(),
                };
                if rank.blas_type == blas_sys::cudaDataType::CUDA_R_32F {
                    // Reference mode: the same bf16 values, stored as f32.
                    let mut f = vec![0.0f32; n];
                    src.read_f32_into(&spec.name, &mut f).map_err(tensor_err)?;
                    for v in &mut f {
                        *v = half::bf16::from_f32(*v).to_f32();
                    }
                    rank.htod(addr, &f)
                } else {
                    // Straight from the file when it stores bf16 (the device's layout).
                    let mut b = vec![0u8; 2 * n];
                    src.read_bf16_into(&spec.name, &mut b).map_err(tensor_err)?;
                    rank.htod(addr, &b)
                }
            }
            Fill::Skip => Ok(()),
            Fill::Random(seed) => {
                *seed_ctr += 1;
                if spec.shape.len() == 1 {
                    rank.fill(addr, n, None, 1.0)
                } else {
                    let fan_in = *spec.shape.last().unwrap_or(&1) as f32;
                    let s = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ *seed_ctr;
                    rank.fill(addr, n, Some((s, 1.0 / fan_in.sqrt())), 0.0)
                }
            }
        }
    }

    /// The address of `role`'s tensor in layer `l`'s replicated chunk on `rank`.
    pub(crate) fn weight(
        &self,
        rank: &RankState,
        l: usize,
        role: TensorRole,
    ) -> Result<u64, CudaError> {
        let lay = self
            .model
            .layout()
            .layer(l)
            .ok_or(CudaError::Model(ModelError::NoSuchLayer { layer: l }))?;
        slot_addr(rank.layers[l].addr(), lay, role, self.dims.elem_bytes)
    }

    /// Base addresses of every routed expert, `[layer][expert]` (0 for dense layers), as the
    /// device-side dispatch reads them. Derived from `self.experts` at every step, so replacing
    /// that table wholesale between steps is all a placement change needs.
    pub(crate) fn expert_table(&self) -> Vec<u64> {
        let e = self.dims.experts;
        let mut t = vec![0u64; self.dims.layers * e];
        for (l, layer) in self.experts.iter().enumerate() {
            for (x, buf) in layer.iter().enumerate().take(e) {
                t[l * e + x] = buf.buf.addr();
            }
        }
        t
    }
}
