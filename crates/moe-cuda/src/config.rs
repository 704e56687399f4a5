//! A runner's settings: [`CudaConfig`], the storage [`Precision`], and [`check_config`], which
//! refuses a model the settings cannot run.

use moe_model::config::ModelConfig;

use crate::device::GpuMap;
use crate::error::CudaError;
use crate::kernels::{moe_gemv_fits, MOE_SMEM};

/// Checks that `config` can run `cfg`: in batch-invariant mode the routed experts need
/// `moe_gemv` (the only expert path whose results do not depend on the batch).
pub fn check_config(cfg: &ModelConfig, config: &CudaConfig) -> Result<(), CudaError> {
    let es = config.precision.elem_bytes();
    if config.batch_invariant
        && cfg.num_moe_layers() > 0
        && !moe_gemv_fits(cfg.hidden_size, cfg.moe.expert_intermediate_size, es)
    {
        return Err(CudaError::Unsupported(format!(
            "batch-invariant mode runs routed experts through moe_gemv, which needs the hidden \
             size ({}) and expert size ({}) to be multiples of {} and at most {} elements",
            cfg.hidden_size,
            cfg.moe.expert_intermediate_size,
            16 / es,
            MOE_SMEM / es
        )));
    }
    Ok(())
}

/// How weights and GEMM inputs are stored on the device. Accumulation, the residual stream, norms,
/// attention, the router and the KV cache are `f32` in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Precision {
    /// bf16 weights and bf16 GEMM inputs (cuBLAS bf16 GEMMs, f32 accumulation and outputs): the
    /// serving mode, half the bytes of `F32`.
    #[default]
    Bf16,
    /// Reference mode: weights hold the same bf16-rounded values but are stored as `f32`, and GEMM
    /// inputs stay `f32` (cuBLAS f32 GEMMs, pedantic: no TF32). This is the CPU reference's
    /// arithmetic, so it checks the kernels apart from activation rounding; twice the weight
    /// bytes, meant for small models.
    F32,
}

impl Precision {
    /// Bytes per stored weight or GEMM-input element.
    pub(crate) fn elem_bytes(self) -> usize {
        match self {
            Precision::Bf16 => 2,
            Precision::F32 => 4,
        }
    }
}

/// Settings of a [`CudaRunner`](crate::CudaRunner).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaConfig {
    /// Ranks to use: logical devices `0..devices` of [`CudaConfig::gpus`].
    pub devices: usize,
    /// Which GPU each logical device lives on (default: one per visible GPU).
    pub gpus: GpuMap,
    /// Tokens per KV block.
    pub block_tokens: usize,
    /// KV blocks per rank.
    pub kv_blocks_per_rank: usize,
    /// Most tokens one rank computes in one step.
    pub max_batch_tokens: usize,
    /// Most tokens a sequence may hold (capped by the model's `max_position_embeddings`).
    pub max_context: usize,
    /// Storage of weights and GEMM inputs.
    pub precision: Precision,
    /// Batch-invariant compute (see the module docs): every row's logits are bitwise the same
    /// whatever else shares its step, however many rows the step has, on whichever rank (GPU)
    /// it runs, and whether its positions were computed in a prefill chunk or one decode step at
    /// a time. The GEMMs run on fixed-order kernels instead of cuBLAS (tensor-core `bi_mma` in
    /// bf16) and the routed experts always on the device dispatch. Up to about 1.7x slower a
    /// decode step (measured; module docs); off by default.
    pub batch_invariant: bool,
}

impl Default for CudaConfig {
    fn default() -> Self {
        Self {
            devices: 1,
            gpus: GpuMap::every_gpu(),
            block_tokens: 16,
            kv_blocks_per_rank: 1024,
            max_batch_tokens: 256,
            max_context: 2048,
            precision: Precision::Bf16,
            batch_invariant: false,
        }
    }
}

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bi_vectorizable;
    use moe_model::presets::Preset;

    #[test]
    fn batch_invariant_config_defaults_off() {
        assert!(!CudaConfig::default().batch_invariant);
    }

    #[test]
    fn batch_invariant_mode_accepts_every_preset_it_can_run_on_moe_gemv() {
        for p in Preset::ALL {
            let cfg = p.config();
            for precision in [Precision::Bf16, Precision::F32] {
                let config = CudaConfig {
                    batch_invariant: true,
                    precision,
                    ..CudaConfig::default()
                };
                let fits = moe_gemv_fits(
                    cfg.hidden_size,
                    cfg.moe.expert_intermediate_size,
                    precision.elem_bytes(),
                );
                assert_eq!(
                    check_config(&cfg, &config).is_ok(),
                    fits || cfg.num_moe_layers() == 0,
                    "{p} {precision:?}"
                );
                // The default mode never refuses a model here.
                let plain = CudaConfig {
                    precision,
                    ..CudaConfig::default()
                };
                assert!(check_config(&cfg, &plain).is_ok());
            }
        }
        // Every shipped MoE preset fits in bf16.
        for p in [
            Preset::DeepseekV2Lite,
            Preset::Qwen3_30bA3b,
            Preset::TinyDeepseek,
        ] {
            let config = CudaConfig {
                batch_invariant: true,
                ..CudaConfig::default()
            };
            assert!(check_config(&p.config(), &config).is_ok(), "{p}");
        }
    }

    #[test]
    fn batch_invariant_mode_refuses_experts_moe_gemv_cannot_take() {
        let mut cfg = Preset::TinyQwen3.config();
        cfg.moe.expert_intermediate_size = 36; // not a multiple of 8 bf16 elements
        let config = CudaConfig {
            batch_invariant: true,
            ..CudaConfig::default()
        };
        let e = check_config(&cfg, &config).unwrap_err();
        assert!(matches!(e, CudaError::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("expert size (36)"), "{e}");
        // Too wide for one shared-memory row (40 KiB / 2 bytes).
        let mut wide = Preset::TinyQwen3.config();
        wide.hidden_size = MOE_SMEM / 2 + 8;
        assert!(check_config(&wide, &config).is_err());
        let plain = CudaConfig::default();
        assert!(check_config(&cfg, &plain).is_ok());
    }

    #[test]
    fn bi_gemm_vectorises_only_aligned_whole_vectors() {
        // bf16: 8 elements per 16 bytes.
        assert!(bi_vectorizable(2, 2048, &[0x1000, 0x2000], &[2048, 16, 0]));
        assert!(!bi_vectorizable(2, 2044, &[0x1000, 0x2000], &[2048]));
        assert!(!bi_vectorizable(2, 2048, &[0x1008, 0x2000], &[2048]));
        assert!(!bi_vectorizable(2, 2048, &[0x1000, 0x2000], &[2052]));
        // f32: 4 elements per 16 bytes.
        assert!(bi_vectorizable(4, 36, &[0x1000], &[36]));
        assert!(!bi_vectorizable(4, 34, &[0x1000], &[36]));
    }
}
