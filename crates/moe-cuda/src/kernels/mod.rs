//! The NVRTC kernels of the CUDA backend: their CUDA C sources (`model.cu`, `bi_mma.cu`),
//! compiled once per device ([`Kernels::compile`]), their launch shapes, and the typed launchers
//! (`launch`), the only way the runner starts a kernel.
//!
//! bf16 is handled as raw `unsigned short` bits (no CUDA headers, so NVRTC needs no include path):
//! weights and GEMM inputs are bf16, everything else (residual stream, attention, router, KV cache)
//! is `f32`. Reductions run in `f32`. Compiled with `ACT_F32` defined (the runner's
//! [`crate::Precision::F32`]), the same source stores weights and GEMM inputs as `float` instead.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};

use crate::error::CudaError;

mod launch;

pub(crate) use launch::{DevPtr, Grid, Launcher};

/// `moe_gemv`'s shape, as in [`SOURCE`]: rows per shared-memory chunk at most, warps per
/// block, output columns per warp; and the shared memory it may take for one chunk of rows.
pub(crate) const MOE_ROWS: usize = 8;
pub(crate) const MOE_WARPS: usize = 8;
pub(crate) const MOE_COLS: usize = 4;
pub(crate) const MOE_SMEM: usize = 40 * 1024;

/// `bi_gemm`'s shape, as in [`SOURCE`]: rows per block, warps per block, output columns
/// per warp.
pub(crate) const BI_ROWS: usize = 16;
pub(crate) const BI_WARPS: usize = 8;
pub(crate) const BI_COLS: usize = 4;

/// `bi_mma`'s block tile, as in [`MMA_SOURCE`]: rows and columns (4 warps, 128 threads).
pub(crate) const MMA_ROWS: usize = 32;
pub(crate) const MMA_COLS: usize = 16;

/// Whether `bi_gemm` may use 128-bit loads: `k` a multiple of the vector width (`16 / es`
/// elements) and every address and element stride a multiple of 16 bytes. Either way the
/// kernel sums in the same order (the scalar loads pad with zeros past `k`), so this changes
/// only speed, never results.
pub(crate) fn bi_vectorizable(es: usize, k: usize, addrs: &[u64], strides: &[usize]) -> bool {
    let vec = 16 / es;
    k.is_multiple_of(vec)
        && addrs.iter().all(|a| a.is_multiple_of(16))
        && strides.iter().all(|s| (s * es).is_multiple_of(16))
}

/// Whether `moe_gemv` can run a model's routed experts: its vector width (`16 / es` elements)
/// divides the hidden and expert sizes and one row of either fits its shared memory.
pub(crate) fn moe_gemv_fits(hidden: usize, inter_e: usize, es: usize) -> bool {
    let vec = 16 / es;
    let fits = |k: usize| k.is_multiple_of(vec) && k * es <= MOE_SMEM;
    fits(hidden) && fits(inter_e)
}

/// The CUDA C source of every kernel but `bi_mma` (`kernels/model.cu`).
pub(crate) const SOURCE: &str = include_str!("model.cu");

/// The tensor-core batch-invariant GEMM `bi_mma` (bf16 storage only; `kernels/bi_mma.cu`, whose
/// header describes it), compiled for `compute_80` and up in a module of its own, and only for
/// runners in batch-invariant mode, so the other kernels' compilation is never touched.
pub(crate) const MMA_SOURCE: &str = include_str!("bi_mma.cu");

/// The compiled kernels of one device.
#[derive(Debug)]
pub(crate) struct Kernels {
    _module: Arc<CudaModule>,
    embed: CudaFunction,
    rms_norm: CudaFunction,
    rope: CudaFunction,
    kv_write: CudaFunction,
    attn_gqa: CudaFunction,
    attn_mla: CudaFunction,
    linear_f32: CudaFunction,
    route: CudaFunction,
    gather_bf16: CudaFunction,
    silu_mul: CudaFunction,
    combine: CudaFunction,
    cast_bf16: CudaFunction,
    moe_dispatch: CudaFunction,
    moe_dispatch_padded: CudaFunction,
    moe_dispatch_grouped: CudaFunction,
    moe_gemv: CudaFunction,
    ep_return: CudaFunction,
    argmax_rows: CudaFunction,
    bi_gemm: CudaFunction,
    bi_gemm_kn: CudaFunction,
    /// `bi_mma` from [`MMA_SOURCE`] (only in batch-invariant bf16 runners).
    bi_mma: Option<CudaFunction>,
    _mma_module: Option<Arc<CudaModule>>,
    fill_random: CudaFunction,
    fill_const: CudaFunction,
}

impl Kernels {
    /// Compiles [`SOURCE`] with NVRTC and loads it into `ctx`.
    /// With `f32_storage`, the `bf16` type of the source is `float` (see [`super::Precision`]).
    /// With `mma`, also [`MMA_SOURCE`] (for `compute_80`), in a module of its own.
    pub(crate) fn compile(
        ctx: &Arc<CudaContext>,
        f32_storage: bool,
        mma: bool,
    ) -> Result<Self, CudaError> {
        let src = if f32_storage {
            format!("#define ACT_F32\n{SOURCE}")
        } else {
            SOURCE.to_string()
        };
        let ptx =
            cudarc::nvrtc::compile_ptx(src).map_err(|e| CudaError::Compile(format!("{e:?}")))?;
        let module = ctx
            .load_module(ptx)
            .map_err(CudaError::driver("load_module"))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(CudaError::driver("load_function"))
        };
        let (bi_mma, mma_module) = if mma {
            let opts = cudarc::nvrtc::CompileOptions {
                arch: Some("compute_80"),
                ..Default::default()
            };
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(MMA_SOURCE, opts)
                .map_err(|e| CudaError::Compile(format!("{e:?}")))?;
            let m = ctx
                .load_module(ptx)
                .map_err(CudaError::driver("load_module"))?;
            let func = m
                .load_function("bi_mma")
                .map_err(CudaError::driver("load_function"))?;
            (Some(func), Some(m))
        } else {
            (None, None)
        };
        Ok(Self {
            embed: f("embed")?,
            rms_norm: f("rms_norm")?,
            rope: f("rope")?,
            kv_write: f("kv_write")?,
            attn_gqa: f("attn_gqa")?,
            attn_mla: f("attn_mla")?,
            linear_f32: f("linear_f32")?,
            route: f("route")?,
            gather_bf16: f("gather_bf16")?,
            silu_mul: f("silu_mul")?,
            combine: f("combine")?,
            cast_bf16: f("cast_bf16")?,
            moe_dispatch: f("moe_dispatch")?,
            moe_dispatch_padded: f("moe_dispatch_padded")?,
            moe_dispatch_grouped: f("moe_dispatch_grouped")?,
            moe_gemv: f("moe_gemv")?,
            ep_return: f("ep_return")?,
            argmax_rows: f("argmax_rows")?,
            bi_gemm: f("bi_gemm")?,
            bi_gemm_kn: f("bi_gemm_kn")?,
            bi_mma,
            _mma_module: mma_module,
            fill_random: f("fill_random")?,
            fill_const: f("fill_const")?,
            _module: module,
        })
    }
}
