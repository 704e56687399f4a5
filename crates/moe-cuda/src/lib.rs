//! `moe-cuda`: the CUDA runner of the MoE engine, and the runtime's GPU unsafe boundary.
//!
//! Without its `cuda` feature this crate is empty, so the workspace builds and tests on machines
//! without CUDA; the docs below the overview are built with the feature
//! (`cargo doc -p moe-cuda --features cuda`). With the feature it owns the whole GPU path:
//! - `CudaRunner`: the model on one or more NVIDIA GPUs, implementing `moe_engine::Runner`
//!   with device-resident state (weights and KV in `hbm-vmm` chunks, NVRTC kernels from the
//!   `kernels` module, cuBLAS, expert-parallel steps across GPUs);
//! - the `elastic` module: the warm pool, `Snapshot`, `Blueprint::prepare` beside the live
//!   runner with peer copies planned by `p2p-xfer`, `CudaRunner::install` as a pointer swap, and
//!   the baselines (`restart_from`, `install_runner`);
//! - the `scaler` module: `CudaScaler`, which drives a live `Engine<CudaRunner>` through boundary
//!   actions only and measures each phase.
//!
//! Architecture invariants:
//! - this is the only runtime crate with unsafe code (kernel launches, device addresses, cuBLAS
//!   and driver calls); every `unsafe` block carries a `// SAFETY:` comment, and `moe-model`,
//!   `moe-engine` and `moe-host` forbid unsafe code;
//! - it never panics on a machine without a GPU or driver: every entry point checks the CUDA
//!   libraries first and returns `CudaError::NoGpu`;
//! - it never decides *when* to scale; the scaler (or a test) asks, and it carries the step out;
//! - physical memory comes only from `hbm-vmm` (`Vmm<CudaBackend>` chunks).
//!
//! Known debt (issue 19, step 1 carved the crates without changing behaviour): the runner still
//! builds a CPU `moe_host::model::Model<CpuCompute>` to derive the model's shapes (attention
//! dimensions, router spec, rope tables, KV geometry), so this crate depends on `moe-host`. The
//! compute-free types it reads already come from `moe_model::spec` and `moe_model::weights`; once
//! `moe-model` holds a neutral model spec with the rope tables, the `moe-host` dependency goes.
//!
//! ```no_run
//! # #[cfg(feature = "cuda")] {
//! use moe_cuda::{CudaConfig, CudaRunner};
//! use moe_model::presets::Preset;
//! let cfg = Preset::TinyQwen3.config();
//! match CudaRunner::synthetic(&cfg, 7, CudaConfig::default()) {
//!     Ok(r) => println!("{} rank(s)", r.rank_count()),
//!     Err(e) => println!("no GPU run: {e}"),
//! }
//! # }
//! ```
#![cfg(feature = "cuda")]
//!
//! # The CUDA runner
//!
//! [`CudaRunner`] runs the model on one or more NVIDIA GPUs and implements the engine's
//! [`Runner`] with device-resident state.
//!
//! - **Memory.** Every byte it uses on a device is an `hbm-vmm` chunk: one global chunk (embedding,
//!   final norm, LM head), one chunk per layer (norms, attention, router, shared experts or dense
//!   MLP), one chunk per routed expert per MoE layer (`[gate | up | down]`), a KV chunk and a scratch
//!   chunk per rank. Weights are bf16; the residual stream, attention, router and KV cache are f32.
//! - **Compute.** cuBLAS (`cublasGemmEx`, bf16 inputs, f32 accumulation) for projections, the
//!   LM head and MLA's absorbed per-head products (strided-batched). NVRTC kernels (module
//!   `kernels`) do embedding, RMS norm, rope (plain and yarn, from host-computed tables, so the
//!   same values as the CPU reference), paged attention (GQA, and MLA in the absorbed form), the
//!   softmax/top-k router (with DeepSeek's group limit and scaling), SiLU-mul, the fixed-order
//!   combine and the greedy argmax.
//! - **Routed experts, three paths.** Steps with at most
//!   [`CudaRunner::set_device_dispatch_max_rows`] tokens on a rank (decode; default
//!   [`DEVICE_DISPATCH_MAX_ROWS`]) dispatch on the device: `moe_dispatch` turns the routes into
//!   per-expert counts, offsets and a gather list, and `moe_gemv` (a memory-bound small-M kernel
//!   on CUDA cores) runs every expert's `[gate|up]` and `down` products reading the counts on
//!   the device; an expert with no rows returns at once, so batch 1 reads only the experts it
//!   routed to. Expert addresses come from a per-step upload of the `[layer][expert]` address
//!   table derived from `experts`. Larger steps lay the rows out per active expert on the device
//!   (`moe_dispatch_grouped`), read the layout's size on the host and run two pointer-array
//!   batched GEMMs per layer on tensor cores (`cublasGemmBatchedEx`, padded to the busiest
//!   expert's count). A third path, off by default
//!   ([`CudaRunner::set_padded_dispatch_max_rows`]), keeps larger steps on the device too:
//!   `moe_dispatch_padded` lays the rows out at a fixed capacity per expert, one batched GEMM
//!   runs over every expert, and rows past an expert's capacity go through `moe_gemv`.
//! - **Sampling.** [`Runner::run_sampled`]: rows whose request needs only the greedy token get
//!   it from `argmax_rows` on the device (lowest id among the largest finite logits, the host
//!   sampler's rule), so one `i32` per row comes back instead of the vocabulary's f32 logits;
//!   rows that need logits (temperature sampling, logprobs) get them as before.
//! - **Ranks and experts.** Each device is an attention data-parallel rank with its own stream,
//!   cuBLAS handle, kernels, replicated weights and KV. Routed experts are split between the
//!   devices in contiguous id ranges (any placement works: the owner of each expert is read
//!   from `experts` at every step). With more than one rank a step runs **expert parallel**
//!   ([`CudaRunner::set_expert_parallel`], on by default), one MoE layer at a time across the
//!   ranks:
//!   1. each rank computes attention and the router on its own rows, then pushes its
//!      normalised rows (bf16) and routes into every GPU's exchange chunk at its global row
//!      offset (`cuMemcpyDtoDAsync` over NVLink) and records an event; it queues its shared
//!      experts meanwhile;
//!   2. each GPU waits (on the device) for the ranks' events, lays out the slots routed to its
//!      own experts among all the step's rows (the dispatch kernels' owner mask) and runs
//!      them, reading only local weights; `ep_return` then writes each output row straight into
//!      the return buffer of the rank that owns the row, in slot order, and records an event;
//!   3. each rank waits for every GPU's event and combines its rows' expert outputs in
//!      ascending expert id, exactly as on one GPU, so a row's logits are the same on 1 and N
//!      GPUs (bitwise in batch-invariant mode).
//!
//!   Every rank is driven by a host thread of its own; the threads meet at two barriers per MoE
//!   layer so that each event wait is queued after its record. The exchange chunks grant every
//!   GPU of the machine access (`cuMemSetAccess` through `Reservation::set_access`), so a rank
//!   that joins later needs no new grant; where the driver refuses that grant, and with
//!   expert parallelism off, each rank reads the routed experts that live on other GPUs
//!   directly over NVLink (the expert reservations grant every device access), which is about
//!   ten times slower (`examples/hil_ep_decode.rs`).
//! - **Host synchronisation.** Per rank and step:
//!   - one at the end of the step, to read back what the engine needs (greedy tokens or logits,
//!     through page-locked buffers, plus the per-layer active-expert counts for
//!     [`CudaRunner::last_step_expert_bytes`]): the engine needs the tokens before it can plan
//!     the next step;
//!   - on the host-dispatch path only (by default, steps of more than
//!     [`DEVICE_DISPATCH_MAX_ROWS`] tokens on a rank), one per MoE layer: `moe_dispatch_grouped`
//!     lays the routed rows out per active expert and writes the batched GEMMs' pointer arrays
//!     on the device, and the host reads back only the layout's size (active experts, busiest
//!     expert's rows) through a page-locked buffer and an event, because cuBLAS takes its
//!     shapes from the host. The shared experts (which do not need the routes) are queued
//!     before the host waits, so the GPU works on them while the host wakes up and launches the
//!     routed GEMMs. The two device paths avoid the wait but are not faster at those sizes (see
//!     the constants' docs);
//!   - host-to-device uploads of the step's inputs (tokens, positions, block tables, the expert
//!     address table) are stream-ordered copies from host memory and do not wait for the GPU.
//!
//!   With several ranks, each rank's thread waits only for its own GPU.
//! - **Batch invariance** ([`CudaConfig::batch_invariant`], off by default). By default a row's
//!   logits depend on the rest of its step: cuBLAS picks its kernel (tile shape, split-K) from
//!   the GEMM's shape, so the same row is summed in another order in a step of 5 rows than in
//!   one of 64; the routed experts switch between `moe_gemv` and cuBLAS batched GEMMs (padded to
//!   the busiest expert) by row count; a prompt prefilled in one chunk and the same tokens
//!   decoded one at a time go through different M. Greedy argmax then flips on near-ties. In
//!   batch-invariant mode every row's logits are bitwise independent of the other rows, of the
//!   step's row count, of the rank (GPU) serving it and of prefill chunking:
//!   - in bf16, every projection, the dense and shared-expert MLPs, the LM head, MLA's expand
//!     and the routed experts run on `bi_mma` (in `kernels/bi_mma.cu`): tensor-core
//!     `mma.sync` m16n8k16 with one fixed tiling (32 rows x 16 columns per block), k in
//!     32-element chunks dealt to the block's 4 warps by chunk index and the warps' partial
//!     sums added in warp order. An output element's arithmetic is fixed by `k` alone; an mma
//!     computes each output from its own row and column, so neither M nor a row's place in the
//!     tile changes it. No split-K across blocks, no atomics, no choice of kernel by shape.
//!     The routed experts use its expert mode, which reads the device dispatch's counts and
//!     offsets like `moe_gemv` (so every step routes on the device, with no host sync);
//!   - MLA's absorb (weights `[k, n]`) runs on `bi_gemm_kn` (one ascending `fmaf` chain per
//!     output, CUDA cores; k is 128), and in the f32 reference precision the GEMMs run on
//!     `bi_gemm` (CUDA cores, lane-strided groups then a fixed xor butterfly) and the experts on
//!     `moe_gemv`, whose per-row order depends only on `k` too; [`check_config`] refuses a
//!     model whose expert or hidden size the expert path cannot take;
//!   - the other kernels were already row-local with a fixed order: embedding, RMS norm (one
//!     block per row, fixed block size), rope, the KV write, attention (one block per head and
//!     row; the scores, softmax and weighted sum depend only on the row's position and the KV
//!     cache, whose entries are themselves invariant, so a position computed in a prefill
//!     chunk and in a decode step reads the same values), the router's logits and top-k (one
//!     block or thread per row), SiLU-mul, the combine (ascending expert id, then the shared
//!     expert) and the greedy argmax (ties to the lowest id).
//!
//!   Cost, measured on H200 (8-layer shapes, decode, `examples/hil_batch_invariant.rs`): Qwen3
//!   0.96-1.19x the default path's step time at batch 1-256, DeepSeek-V2-Lite 1.19-1.67x
//!   (probably its MLA absorb on CUDA cores and the 32-row tile's waste at small batches).
//!   Details: `docs/benchmarks/cuda-runtime.md` ("Batch-invariant mode").
//!
//! Architecture invariant: it never panics on a machine without a GPU or driver; every entry
//! point checks the CUDA libraries first and returns [`CudaError::NoGpu`].

mod elastic;
mod kernels;
mod scaler;

pub use elastic::{
    check_disjoint, disjoint_devices, first_devices, peer_bandwidth, Blueprint, CudaTransport,
    CudaWarmPool, DeviceSetError, PrepareReport, Prepared, Retired, Snapshot, Staged, SwitchReport,
};
pub use scaler::{CudaScaler, ScaleOutcome};

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaStream, LaunchConfig, PushKernelArg,
};
use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::{DeviceId, Mapping, Vmm, VmmError};

use kernels::Kernels;
use moe_engine::lockstep::Lockstep;
use moe_engine::{
    KvLedger, Need, RankId, RankKv, RequestId, RequestLimits, RowOutput, RunError, Runner, Work,
};
use moe_host::compute::cpu::CpuCompute;
use moe_host::model::{Model, ModelError};
use moe_model::config::ModelConfig;
use moe_model::schema::{self, TensorRole};
use moe_model::spec::{AttnDims, KvGeometry, RopeStyle};
use moe_model::weights::{ChunkLayout, TensorSource};

/// `eps` of DeepSeek-V2's `q_a_layernorm` and `kv_a_layernorm` (as in the CPU model).
const MLA_NORM_EPS: f32 = 1e-6;

/// `moe_gemv`'s shape, as in [`kernels::SOURCE`]: rows per shared-memory chunk at most, warps per
/// block, output columns per warp; and the shared memory it may take for one chunk of rows.
const MOE_ROWS: usize = 8;
const MOE_WARPS: usize = 8;
const MOE_COLS: usize = 4;
const MOE_SMEM: usize = 40 * 1024;

/// `bi_gemm`'s shape, as in [`kernels::SOURCE`]: rows per block, warps per block, output columns
/// per warp.
const BI_ROWS: usize = 16;
const BI_WARPS: usize = 8;
const BI_COLS: usize = 4;

/// `bi_mma`'s block tile, as in [`kernels::MMA_SOURCE`]: rows and columns (4 warps, 128 threads).
const MMA_ROWS: usize = 32;
const MMA_COLS: usize = 16;

/// Whether `bi_gemm` may use 128-bit loads: `k` a multiple of the vector width (`16 / es`
/// elements) and every address and element stride a multiple of 16 bytes. Either way the
/// kernel sums in the same order (the scalar loads pad with zeros past `k`), so this changes
/// only speed, never results.
fn bi_vectorizable(es: usize, k: usize, addrs: &[u64], strides: &[usize]) -> bool {
    let vec = 16 / es;
    k.is_multiple_of(vec)
        && addrs.iter().all(|a| a.is_multiple_of(16))
        && strides.iter().all(|s| (s * es).is_multiple_of(16))
}

/// Whether `moe_gemv` can run a model's routed experts: its vector width (`16 / es` elements)
/// divides the hidden and expert sizes and one row of either fits its shared memory.
fn moe_gemv_fits(hidden: usize, inter_e: usize, es: usize) -> bool {
    let vec = 16 / es;
    let fits = |k: usize| k.is_multiple_of(vec) && k * es <= MOE_SMEM;
    fits(hidden) && fits(inter_e)
}

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

/// What went wrong in the CUDA backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No driver, no CUDA library or no GPU.
    #[error("no usable GPU: {0}")]
    NoGpu(String),
    /// A driver call failed.
    #[error("CUDA {call} failed: {msg}")]
    Driver {
        /// The call.
        call: &'static str,
        /// The driver's error.
        msg: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS {call} failed with status {status}")]
    Blas {
        /// The call.
        call: &'static str,
        /// The status code.
        status: i32,
    },
    /// NVRTC refused the kernels.
    #[error("NVRTC could not compile the kernels: {0}")]
    Compile(String),
    /// Device memory could not be created or mapped.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The model config or a weight is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Reading a tensor failed.
    #[error("reading tensor `{name}`: {msg}")]
    Tensor {
        /// The tensor.
        name: String,
        /// Why.
        msg: String,
    },
    /// The model or settings are outside what this backend supports.
    #[error("unsupported by the CUDA backend: {0}")]
    Unsupported(String),
    /// A step's input does not fit the runner (too many tokens, unknown sequence, ...).
    #[error("bad step input: {0}")]
    Input(String),
    /// Elastic scaling could not prepare or install the next configuration (see `elastic`).
    #[error("elastic scaling: {0}")]
    Scale(String),
    /// A target device set unusable for a new instance beside the running one.
    #[error(transparent)]
    DeviceSet(#[from] DeviceSetError),
}

impl CudaError {
    fn driver<E: std::fmt::Debug>(call: &'static str) -> impl Fn(E) -> CudaError {
        move |e| CudaError::Driver {
            call,
            msg: format!("{e:?}"),
        }
    }
}

fn cu(call: &'static str, r: sys::CUresult) -> Result<(), CudaError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Driver {
            call,
            msg: format!("{r:?}"),
        })
    }
}

fn blas(call: &'static str, s: blas_sys::cublasStatus_t) -> Result<(), CudaError> {
    if s == blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Blas {
            call,
            status: s as i32,
        })
    }
}

/// Checks that the driver, cuBLAS and NVRTC libraries load and returns the number of GPUs.
pub fn device_count() -> Result<usize, CudaError> {
    // SAFETY: each check only tries to dlopen a library; it has no other effect.
    let libs = unsafe {
        [
            ("libcuda", sys::is_culib_present()),
            ("libcublas", blas_sys::is_culib_present()),
            ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
        ]
    };
    for (name, ok) in libs {
        if !ok {
            return Err(CudaError::NoGpu(format!(
                "{name} was not found; run on a machine with the NVIDIA driver and CUDA 13"
            )));
        }
    }
    let n = CudaContext::device_count().map_err(|e| CudaError::NoGpu(format!("{e:?}")))?;
    if n <= 0 {
        return Err(CudaError::NoGpu("the driver sees no CUDA device".into()));
    }
    Ok(n as usize)
}

/// The GPUs a hardware-in-the-loop test or benchmark may use: `Ok(Some(n))` with `n` GPUs,
/// `Ok(None)` without a usable GPU (the caller reports it as SKIPPED), or an error when the
/// environment variable `HIL_REQUIRE_GPUS=N` demands at least `N` GPUs and they are not there
/// (no GPU, a missing CUDA library, or fewer GPUs): a GPU run must never pass vacuously.
pub fn hil_gpus() -> Result<Option<usize>, CudaError> {
    let need: usize = std::env::var("HIL_REQUIRE_GPUS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    match device_count() {
        Ok(n) if n >= need => Ok(Some(n)),
        Ok(n) => Err(CudaError::NoGpu(format!(
            "HIL_REQUIRE_GPUS={need} but the driver sees {n} GPU(s)"
        ))),
        Err(e) if need > 0 => Err(CudaError::NoGpu(format!(
            "HIL_REQUIRE_GPUS={need} but no GPU can be used: {e}"
        ))),
        Err(_) => Ok(None),
    }
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
    fn elem_bytes(self) -> usize {
        match self {
            Precision::Bf16 => 2,
            Precision::F32 => 4,
        }
    }
}

/// Which GPU each logical device lives on: the machine as the CUDA path sees it.
///
/// [`GpuMap::every_gpu`] (the default) is one logical device per visible GPU. [`GpuMap::new`]
/// places logical devices on any GPUs, several on one included: `[0, 0, 0, 0]` runs four ranks
/// on GPU 0, each with its own KV, its own experts and its own stream, so that the multi-rank
/// and elastic paths run on a one-GPU machine; copies between them are device-local. It is
/// `Copy` (at most [`GpuMap::MAX`] logical devices) so that [`CudaConfig`] stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct GpuMap {
    len: u8,
    ordinals: [u8; GpuMap::MAX],
}

impl GpuMap {
    /// The most logical devices a map holds.
    pub const MAX: usize = 64;

    /// One logical device per visible GPU (`DeviceId(i)` on GPU `i`).
    pub const fn every_gpu() -> Self {
        Self {
            len: 0,
            ordinals: [0; Self::MAX],
        }
    }

    /// Logical device `i` on GPU `ordinals[i]`; ordinals may repeat.
    ///
    /// Errors: [`CudaError::Unsupported`] for an empty list, more than [`GpuMap::MAX`] devices
    /// or an ordinal above 255.
    pub fn new(ordinals: &[u32]) -> Result<Self, CudaError> {
        if ordinals.is_empty() || ordinals.len() > Self::MAX {
            return Err(CudaError::Unsupported(format!(
                "a GPU map holds 1 to {} logical devices, not {}",
                Self::MAX,
                ordinals.len()
            )));
        }
        let mut map = Self::every_gpu();
        for (i, &o) in ordinals.iter().enumerate() {
            map.ordinals[i] = u8::try_from(o)
                .map_err(|_| CudaError::Unsupported(format!("GPU ordinal {o} is above 255")))?;
        }
        map.len = ordinals.len() as u8;
        Ok(map)
    }

    /// A machine of at least `ranks` logical devices on the GPUs present: every GPU once where
    /// there are enough of them, otherwise `ranks` logical devices dealt round-robin over the
    /// GPUs (on one GPU, all of them there). This is how multi-rank code runs on a machine with
    /// fewer GPUs than ranks.
    ///
    /// Errors: [`CudaError::NoGpu`] without a GPU or the CUDA libraries.
    pub fn for_ranks(ranks: usize) -> Result<Self, CudaError> {
        let gpus = device_count()?;
        if gpus >= ranks {
            return Ok(Self::every_gpu());
        }
        let ordinals: Vec<u32> = (0..ranks).map(|i| (i % gpus) as u32).collect();
        Self::new(&ordinals)
    }

    /// The GPU of each logical device, or `None` for [`GpuMap::every_gpu`].
    pub fn ordinals(&self) -> Option<Vec<u32>> {
        (self.len > 0).then(|| {
            self.ordinals[..self.len as usize]
                .iter()
                .map(|&o| u32::from(o))
                .collect()
        })
    }

    /// The memory manager of this machine: a CUDA backend with these logical devices.
    pub fn vmm(&self) -> Result<Vmm<CudaBackend>, CudaError> {
        let backend = match self.ordinals() {
            None => CudaBackend::new()?,
            Some(o) => CudaBackend::logical(&o)?,
        };
        Ok(Vmm::new(backend))
    }
}

impl Default for GpuMap {
    fn default() -> Self {
        Self::every_gpu()
    }
}

impl std::fmt::Debug for GpuMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ordinals() {
            None => f.write_str("GpuMap(every GPU)"),
            Some(o) => write!(f, "GpuMap({o:?})"),
        }
    }
}

/// Settings of a [`CudaRunner`].
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

/// One device allocation: an `hbm-vmm` chunk mapped into its own reservation (the mapping keeps
/// both alive).
struct DevBuf {
    map: Mapping<CudaBackend>,
}

impl DevBuf {
    fn new(
        vmm: &Vmm<CudaBackend>,
        dev: DeviceId,
        bytes: usize,
        access: &[DeviceId],
    ) -> Result<Self, CudaError> {
        let g = vmm.granularity(dev)?;
        let size = bytes.max(1).div_ceil(g) * g;
        let chunk = vmm.create_chunk(dev, size, false)?;
        let res = vmm.reserve(dev, size)?;
        if !access.is_empty() {
            res.set_access(access)?;
        }
        let map = res.map(0, &chunk, 0, size)?;
        Ok(Self { map })
    }

    fn addr(&self) -> u64 {
        self.map.addr()
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.addr(), self.len())
    }
}

/// Page-locked host memory for reading logits back (`cuMemAllocHost` in the rank's context): a
/// device-to-host copy into it runs at full PCIe speed, where a copy into fresh pageable memory
/// is staged and page-faulted (it took about 50 ms for 64 rows of Qwen3's vocabulary). Host
/// memory, so outside `hbm-vmm`, which owns device memory only.
struct PinnedHost {
    ptr: *mut f32,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the pointer is memory this value owns alone (allocated in `new`, freed in `drop`); it is
// written only by copies that `Rank::read_back` (or, for `pinned_info`, `Rank::fetch_info`)
// issues and waits for, and read only there (or in `Rank::wait_info`).
unsafe impl Send for PinnedHost {}
// SAFETY: as above; a shared reference gives no way to touch the memory outside `read_back`,
// whose caller holds the runner mutably.
unsafe impl Sync for PinnedHost {}

impl PinnedHost {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, CudaError> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ctx` is bound to this thread (the caller bound it); `p` is a valid out-pointer.
        cu("cuMemAllocHost", unsafe {
            sys::cuMemAllocHost_v2(&mut p, 4 * len.max(1))
        })?;
        Ok(Self {
            ptr: p.cast(),
            len,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        // Errors are ignored: Drop must not panic.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `cuMemAllocHost` and is freed once; the rank's stream was
        // synchronised by `CudaRunner::drop` before its ranks drop, so no copy still writes it.
        let _ = unsafe { sys::cuMemFreeHost(self.ptr.cast()) };
    }
}

impl std::fmt::Debug for PinnedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedHost({} floats)", self.len)
    }
}

/// A kernel argument (kept alive in a vector until the launch).
#[derive(Debug, Clone, Copy)]
enum Arg {
    P(u64),
    I(i32),
    L(i64),
    U(u64),
    F(f32),
}

/// Addresses of one rank's scratch buffers (all in its scratch chunk).
#[derive(Debug, Default, Clone, Copy)]
struct Scratch {
    hidden: u64,
    xn: u64,
    xb: u64,
    q: u64,
    qbf: u64,
    kbuf: u64,
    vbuf: u64,
    att: u64,
    att2: u64,
    qlat: u64,
    rlogits: u64,
    ids: u64,
    wts: u64,
    f1: u64,
    f2: u64,
    hb: u64,
    y: u64,
    xg: u64,
    gu: u64,
    eh: u64,
    eo: u64,
    gidx: u64,
    cidx: u64,
    ptrs: u64,
    tokens: u64,
    pos: u64,
    tbl_off: u64,
    last: u64,
    tables: u64,
    lastb: u64,
    logits: u64,
    cos: u64,
    sin: u64,
    counts: u64,
    offsets: u64,
    active: u64,
    etable: u64,
    argmax: u64,
    etable_down: u64,
    pptrs: u64,
    ov_counts: u64,
    ov_offsets: u64,
    ov_gidx: u64,
    /// `{active experts, busiest expert's rows, bad id}` of the host path's grouped dispatch.
    dinfo: u64,
    /// Expert parallel: the rank index owning each routed expert, `[layer][expert]`.
    eowner: u64,
    /// Expert parallel: the step's first global row of each rank (`ranks + 1` entries).
    ep_offs: u64,
    /// Expert parallel: each rank's return buffer ([`Exchange::ret`]).
    ep_rets: u64,
    /// `0, 1, 2, ...`: the combine's slot index when the expert outputs are already in slot order.
    iota: u64,
}

/// A rank's expert-parallel exchange buffers, in a chunk every GPU of the machine may read and
/// write: the other ranks push their rows in, the expert owners push their outputs back.
#[derive(Debug, Default, Clone, Copy)]
struct Exchange {
    /// Every rank's normalised rows of the step (bf16), in rank order.
    xin: u64,
    /// Every rank's routes of the step (`top_k` expert ids per row), in rank order.
    idin: u64,
    /// This rank's rows' expert outputs (f32, `top_k` rows of `h` per row), in slot order.
    ret: u64,
}

/// Sizes the scratch of a rank needs.
#[derive(Debug, Clone, Copy)]
struct Dims {
    h: usize,
    vocab: usize,
    qw: usize,
    kvw: usize,
    qr: usize,
    attw: usize,
    lat: usize,
    inter_max: usize,
    inter_e: usize,
    experts: usize,
    top_k: usize,
    rows: usize,
    table_cap: usize,
    gather_cap: usize,
    half_rope: usize,
    max_context: usize,
    /// Bytes per weight / GEMM-input element (2 for bf16, 4 for f32).
    es: usize,
    /// Layers of the model.
    layers: usize,
    /// GPUs of the machine: the most ranks a runner can grow to.
    gpus: usize,
}

impl Dims {
    /// The most rows one expert-parallel step gathers on a GPU: every rank's, at most `rows`
    /// each.
    fn ep_rows(&self) -> usize {
        self.rows * self.gpus
    }
}

/// One GPU: an attention rank with its stream, handles, kernels, replicated weights, KV and scratch.
struct Rank {
    dev: DeviceId,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    global: DevBuf,
    layers: Vec<DevBuf>,
    kv: DevBuf,
    _scratch: DevBuf,
    s: Scratch,
    _xchg: DevBuf,
    x: Exchange,
    /// Whether every GPU of the machine may read and write the exchange chunk.
    peer_exchange: bool,
    /// Recorded once the rank has pushed a layer's rows and routes to every GPU.
    ev_pub: CudaEvent,
    /// Recorded once the GPU has pushed a layer's expert outputs back to every rank.
    ev_ret: CudaEvent,
    /// Page-locked staging for the logits of up to `rows` sampled rows.
    pinned: PinnedHost,
    /// Page-locked staging for the greedy tokens of up to `rows` rows, then one active-expert
    /// count per layer (32-bit integers).
    pinned_small: PinnedHost,
    /// Page-locked staging for the host-dispatch layout's size (`s.dinfo`, 3 integers), and the
    /// event that says it has arrived (see [`Rank::fetch_info`]).
    pinned_info: PinnedHost,
    info_ready: CudaEvent,
    /// cuBLAS type of weights and GEMM inputs (bf16 or f32).
    dt: blas_sys::cudaDataType,
    /// cuBLAS compute type (f32 accumulation; pedantic in the f32 reference mode).
    ct: blas_sys::cublasComputeType_t,
    /// [`CudaConfig::batch_invariant`]: GEMMs go through `bi_gemm` / `bi_gemm_kn`.
    bi: bool,
}

impl std::fmt::Debug for Rank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rank")
            .field("dev", &self.dev)
            .field("kv", &self.kv)
            .finish()
    }
}

impl Rank {
    fn bind(&self) -> Result<(), CudaError> {
        self.ctx
            .bind_to_thread()
            .map_err(CudaError::driver("cuCtxSetCurrent"))
    }

    fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        if grid.0 == 0 || grid.1 == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(v) | Arg::U(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::L(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid.0, grid.1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: every argument matches the kernel's parameter list in `kernels::SOURCE` (device
        // addresses as u64, ints as i32/i64, floats as f32), and every address points into a live
        // chunk of this rank (or a peer chunk this device was granted access to) sized for the
        // launch by the caller.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("cuLaunchKernel"))?;
        Ok(())
    }

    fn htod<T: Copy>(&self, dst: u64, src: &[T]) -> Result<(), CudaError> {
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: `dst` is an address inside a live scratch chunk of this rank with room for
        // `src` (the caller sized the scratch for the step's limits, checked before the copy);
        // `src` is a valid host slice. From pageable memory the call returns only once `src`
        // has been staged, so the slice may be dropped afterwards.
        cu("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst,
                src.as_ptr().cast::<c_void>(),
                std::mem::size_of_val(src),
                self.stream.cu_stream(),
            )
        })
    }

    /// Ends a step: copies what `needs` asks of the sampled rows (the greedy token from
    /// `s.argmax`, or the row's f32 logits from `s.logits`) and the active-expert count of each of
    /// the `layers` layers (`s.active`) through the page-locked buffers, then synchronises the
    /// stream once.
    fn read_back(
        &self,
        needs: &[Need],
        vocab: usize,
        layers: usize,
    ) -> Result<(Vec<RowOutput>, Vec<i32>), CudaError> {
        let n = needs.len();
        if n * vocab > self.pinned.len || n + layers > self.pinned_small.len {
            return Err(CudaError::Input(format!(
                "{n} sampled rows exceed the pinned read-back buffers"
            )));
        }
        let stream = self.stream.cu_stream();
        let copy = |dst: *mut c_void, src: u64, bytes: usize| {
            if bytes == 0 {
                return Ok(());
            }
            // SAFETY: every caller below passes a destination inside one of this rank's pinned
            // buffers (bounds checked above) and a source inside its scratch chunk holding
            // `bytes` bytes written by this step; nothing else uses the buffers meanwhile.
            cu("cuMemcpyDtoHAsync", unsafe {
                sys::cuMemcpyDtoHAsync_v2(dst, src, bytes, stream)
            })
        };
        let small = self.pinned_small.ptr.cast::<i32>();
        if needs.contains(&Need::GreedyToken) {
            copy(small.cast(), self.s.argmax, 4 * n)?;
        }
        // SAFETY: `n + layers` i32 slots fit the small buffer (checked above).
        copy(unsafe { small.add(n) }.cast(), self.s.active, 4 * layers)?;
        // Runs of consecutive rows that need logits go in one copy each.
        let mut i = 0;
        while i < n {
            if needs[i] != Need::Logits {
                i += 1;
                continue;
            }
            let run = needs[i..]
                .iter()
                .take_while(|&&x| x == Need::Logits)
                .count();
            copy(
                // SAFETY: rows `i..i + run` lie within the `n * vocab` floats checked above.
                unsafe { self.pinned.ptr.add(i * vocab) }.cast(),
                self.s.logits + (4 * i * vocab) as u64,
                4 * run * vocab,
            )?;
            i += run;
        }
        self.stream
            .synchronize()
            .map_err(CudaError::driver("cuStreamSynchronize"))?;
        // SAFETY: both buffers are live and every part read below was written by a copy above
        // that completed (the stream was synchronised); no other copy into them is queued.
        let (ints, floats) = unsafe {
            (
                std::slice::from_raw_parts(small, n + layers),
                std::slice::from_raw_parts(self.pinned.ptr, n * vocab),
            )
        };
        let out = needs
            .iter()
            .enumerate()
            .map(|(i, need)| match need {
                Need::GreedyToken => RowOutput::Greedy(u32::try_from(ints[i]).ok()),
                Need::Logits => RowOutput::Logits(floats[i * vocab..(i + 1) * vocab].to_vec()),
            })
            .collect();
        Ok((out, ints[n..].to_vec()))
    }

    /// Queues the copy of the host-dispatch layout's size (`s.dinfo`) into `pinned_info` and
    /// records `info_ready` behind it; [`Rank::wait_info`] reads it. The stream goes on with
    /// whatever is queued after this (work that does not need the routes), so the host's wait
    /// and its next launches overlap with it.
    fn fetch_info(&self) -> Result<(), CudaError> {
        // SAFETY: `pinned_info` holds 4 i32 slots of page-locked memory owned by this rank and
        // `s.dinfo` 4 i32 slots of its scratch chunk; only this function writes the buffer, and
        // `wait_info` reads it after the event behind this copy completed. The next copy is
        // queued only after that read (both run on the thread driving the rank, in order).
        cu("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                self.pinned_info.ptr.cast::<c_void>(),
                self.s.dinfo,
                3 * std::mem::size_of::<i32>(),
                self.stream.cu_stream(),
            )
        })?;
        self.info_ready
            .record(&self.stream)
            .map_err(CudaError::driver("cuEventRecord"))
    }

    /// Waits for the copy [`Rank::fetch_info`] queued; returns `{active experts, busiest
    /// expert's rows, bad id}`.
    fn wait_info(&self) -> Result<[i32; 3], CudaError> {
        self.info_ready
            .synchronize()
            .map_err(CudaError::driver("cuEventSynchronize"))?;
        // SAFETY: the copy into these 3 slots completed (its event completed above) and nothing
        // else writes them (see `fetch_info`).
        let v = unsafe { std::slice::from_raw_parts(self.pinned_info.ptr.cast::<i32>(), 3) };
        Ok([v[0], v[1], v[2]])
    }

    /// Queues a copy of `bytes` bytes from `src` (this rank's memory) to `dst` (its own or a peer
    /// GPU's) on this rank's stream.
    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: `src` holds `bytes` bytes of a live chunk of this rank and `dst` has room for
        // them in a live chunk that this device was granted access to (an exchange chunk, which
        // every GPU of the machine may write); the caller orders the copy against the buffers'
        // other users with stream order and events.
        cu("cuMemcpyDtoDAsync", unsafe {
            sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, self.stream.cu_stream())
        })
    }

    fn dtoh<T: Copy + Default>(&self, src: u64, n: usize) -> Result<Vec<T>, CudaError> {
        let mut out = vec![T::default(); n];
        if n == 0 {
            return Ok(out);
        }
        // SAFETY: `src` holds at least `n` elements of `T` in a live chunk of this rank; `out` is
        // a writable host buffer of that size; the stream is synchronised before `out` is read.
        cu("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                out.as_mut_ptr().cast::<c_void>(),
                src,
                n * std::mem::size_of::<T>(),
                self.stream.cu_stream(),
            )
        })?;
        self.stream
            .synchronize()
            .map_err(CudaError::driver("cuStreamSynchronize"))?;
        Ok(out)
    }

    /// `y[rows, outf] (ldy) = x[rows, inf] (ldx, bf16) * w[outf, inf]^T (bf16) + beta * y`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        w: u64,
        x: u64,
        ldx: usize,
        y: u64,
        ldy: usize,
        y_bf16: bool,
        rows: usize,
        inf: usize,
        outf: usize,
        beta: f32,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        if self.bi {
            let x_ = (x, ldx, 0);
            let w_ = (w, inf, 0);
            return self.bi_gemm(
                false,
                x_,
                w_,
                (y, ldy, 0, y_bf16),
                beta,
                (rows, outf, inf),
                1,
            );
        }
        let alpha = 1.0f32;
        let ct = if y_bf16 {
            self.dt
        } else {
            blas_sys::cudaDataType::CUDA_R_32F
        };
        // SAFETY: the handle is bound to this rank's stream; `w` holds `outf*inf` bf16 values,
        // `x` `rows` rows of `ldx` bf16 values and `y` `rows` rows of `ldy` outputs, all in live
        // chunks this device can access; alpha and beta are host scalars (host pointer mode).
        blas("cublasGemmEx", unsafe {
            blas_sys::cublasGemmEx(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                outf as i32,
                rows as i32,
                inf as i32,
                (&alpha as *const f32).cast(),
                w as *const c_void,
                self.dt,
                inf as i32,
                x as *const c_void,
                self.dt,
                ldx as i32,
                (&beta as *const f32).cast(),
                y as *mut c_void,
                ct,
                ldy as i32,
                self.ct,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        })
    }

    /// Batched `C_i[n, m] = B_i[n, k] * A_i[m, k]^T` from device pointer arrays (bf16 in, f32 out).
    #[allow(clippy::too_many_arguments)]
    fn gemm_batched(
        &self,
        a: u64,
        b: u64,
        c: u64,
        m: usize,
        n: usize,
        k: usize,
        count: usize,
    ) -> Result<(), CudaError> {
        if count == 0 || n == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: `a`, `b`, `c` are device arrays of `count` pointers (uploaded before this call
        // on the same stream) to bf16 `[m, k]` weights, bf16 `[n, k]` rows and f32 `[n, m]`
        // outputs in live chunks this device can access.
        blas("cublasGemmBatchedEx", unsafe {
            blas_sys::cublasGemmBatchedEx(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                a as *const *const c_void,
                self.dt,
                k as i32,
                b as *const *const c_void,
                self.dt,
                k as i32,
                (&beta as *const f32).cast(),
                c as *const *mut c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                m as i32,
                count as i32,
                self.ct,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        })
    }

    /// Strided-batched GEMM over heads (bf16 inputs, f32 or bf16 output), column-major terms.
    #[allow(clippy::too_many_arguments)]
    fn gemm_strided(
        &self,
        trans_a: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        sa: usize,
        b: u64,
        ldb: usize,
        sb: usize,
        c: u64,
        ldc: usize,
        sc: usize,
        c_bf16: bool,
        count: usize,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        if self.bi {
            // Column-major C(i, j) = op(A)(i, p) B(p, j) is row-major out[j, i] = x[j, p] w(i, p)
            // with x = B, out = C, and w = A read as [m, k] rows (`trans_a`) or as [k, m] rows.
            let (x_, w_) = ((b, ldb, sb), (a, lda, sa));
            return self.bi_gemm(
                !trans_a,
                x_,
                w_,
                (c, ldc, sc, c_bf16),
                0.0,
                (n, m, k),
                count,
            );
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let ta = if trans_a {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        };
        let ct = if c_bf16 {
            self.dt
        } else {
            blas_sys::cudaDataType::CUDA_R_32F
        };
        // SAFETY: the caller passes matrices in live chunks of this rank whose extents cover
        // `count` batches at the given strides and leading dimensions.
        blas("cublasGemmStridedBatchedEx", unsafe {
            blas_sys::cublasGemmStridedBatchedEx(
                *self.blas.handle(),
                ta,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                a as *const c_void,
                self.dt,
                lda as i32,
                sa as i64,
                b as *const c_void,
                self.dt,
                ldb as i32,
                sb as i64,
                (&beta as *const f32).cast(),
                c as *mut c_void,
                ct,
                ldc as i32,
                sc as i64,
                count as i32,
                self.ct,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        })
    }

    /// The batch-invariant GEMM (see `bi_gemm` in [`kernels::SOURCE`]): for each of `count`
    /// batches, `out[m, n] = sum_k x[m, k] * w(n, k) (+ beta * out)` with `(rows, cols, k)` =
    /// `(m, n, k)`. `x`, `w` and `out` are `(address, leading dimension, batch stride)` in
    /// elements (`out` also says whether it is bf16); `w(n, k)` is `w[n * ld + k]`, or with
    /// `k_major` `w[k * ld + n]`. Every output element's summation order depends on `k` alone.
    #[allow(clippy::too_many_arguments)]
    fn bi_gemm(
        &self,
        k_major: bool,
        (x, ldx, sx): (u64, usize, usize),
        (w, ldw, sw): (u64, usize, usize),
        (out, ldo, so, out_bf16): (u64, usize, usize, bool),
        beta: f32,
        (rows, cols, k): (usize, usize, usize),
        count: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 || cols == 0 || count == 0 {
            return Ok(());
        }
        let es = if self.dt == blas_sys::cudaDataType::CUDA_R_32F {
            4
        } else {
            2
        };
        let mut args = vec![
            Arg::P(x),
            Arg::I(ldx as i32),
            Arg::L(sx as i64),
            Arg::P(w),
            Arg::I(ldw as i32),
            Arg::L(sw as i64),
            Arg::P(out),
            Arg::I(ldo as i32),
            Arg::L(so as i64),
            Arg::I(i32::from(out_bf16)),
            Arg::F(beta),
            Arg::I(rows as i32),
            Arg::I(cols as i32),
            Arg::I(k as i32),
        ];
        let row_tiles = rows.div_ceil(BI_ROWS) as u32;
        if k_major {
            return self.launch3(
                &self.k.bi_gemm_kn,
                (cols.div_ceil(128) as u32, row_tiles, count as u32),
                128,
                &args,
            );
        }
        args.push(Arg::I(i32::from(bi_vectorizable(
            es,
            k,
            &[x, w],
            &[ldx, ldw, sx, sw],
        ))));
        if let Some(mma) = &self.k.bi_mma {
            // Tensor cores (bf16): plain mode, no expert arrays.
            args.extend([Arg::P(0), Arg::P(0), Arg::P(0), Arg::P(0), Arg::L(0)]);
            return self.launch3(
                mma,
                (
                    cols.div_ceil(MMA_COLS) as u32,
                    rows.div_ceil(MMA_ROWS) as u32,
                    count as u32,
                ),
                128,
                &args,
            );
        }
        self.launch3(
            &self.k.bi_gemm,
            (
                cols.div_ceil(BI_WARPS * BI_COLS) as u32,
                row_tiles,
                count as u32,
            ),
            (32 * BI_WARPS) as u32,
            &args,
        )
    }

    /// [`Rank::launch`] on a three-dimensional grid, without dynamic shared memory.
    fn launch3(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(v) | Arg::U(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::L(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as in `launch`: the arguments match the kernel's parameter list in
        // `kernels::SOURCE`, and every address points into a live chunk this device can access,
        // sized by the caller for the whole grid.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("cuLaunchKernel"))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn rms(
        &self,
        x: u64,
        x_row: usize,
        segs: usize,
        seg_stride: usize,
        w: u64,
        width: usize,
        eps: f32,
        out_f: u64,
        of_row: usize,
        out_b: u64,
        ob_row: usize,
        rows: usize,
    ) -> Result<(), CudaError> {
        self.launch(
            &self.k.rms_norm,
            (segs as u32, rows as u32),
            256,
            0,
            &[
                Arg::P(x),
                Arg::I(x_row as i32),
                Arg::I(seg_stride as i32),
                Arg::P(w),
                Arg::I(width as i32),
                Arg::F(eps),
                Arg::P(out_f),
                Arg::I(of_row as i32),
                Arg::P(out_b),
                Arg::I(ob_row as i32),
            ],
        )
    }

    fn fill(
        &self,
        ptr: u64,
        n: usize,
        random: Option<(u64, f32)>,
        v: f32,
    ) -> Result<(), CudaError> {
        let grid = (n.div_ceil(256).min(65535) as u32).max(1);
        match random {
            Some((seed, scale)) => self.launch(
                &self.k.fill_random,
                (grid, 1),
                256,
                0,
                &[Arg::P(ptr), Arg::L(n as i64), Arg::U(seed), Arg::F(scale)],
            ),
            None => self.launch(
                &self.k.fill_const,
                (grid, 1),
                256,
                0,
                &[Arg::P(ptr), Arg::L(n as i64), Arg::F(v)],
            ),
        }
    }
}

/// A routed expert's chunk, on the device that holds it.
#[derive(Debug)]
struct ExpertBuf {
    dev: DeviceId,
    buf: DevBuf,
}

#[derive(Debug, Default)]
struct RankLedger {
    total: usize,
    free: Vec<u32>,
    tables: BTreeMap<RequestId, Vec<u32>>,
}

/// Per-rank KV bookkeeping for the scheduler.
#[derive(Debug)]
struct Ledger {
    block_tokens: usize,
    ranks: Vec<(RankId, RankLedger)>,
}

impl Ledger {
    fn rank(&self, r: RankId) -> Option<&RankLedger> {
        self.ranks.iter().find(|(id, _)| *id == r).map(|(_, l)| l)
    }
    fn rank_mut(&mut self, r: RankId) -> Option<&mut RankLedger> {
        self.ranks
            .iter_mut()
            .find(|(id, _)| *id == r)
            .map(|(_, l)| l)
    }
}

impl KvLedger for Ledger {
    fn can_admit(&self, rank: RankId, tokens: usize) -> bool {
        self.rank(rank)
            .is_some_and(|l| l.free.len() > tokens.div_ceil(self.block_tokens))
    }
    fn grow(&mut self, rank: RankId, seq: RequestId, tokens: usize) -> bool {
        let bt = self.block_tokens;
        let Some(l) = self.rank_mut(rank) else {
            return false;
        };
        let have = l.tables.get(&seq).map_or(0, Vec::len);
        let need = tokens.div_ceil(bt).saturating_sub(have);
        if need > l.free.len() {
            return false;
        }
        let new: Vec<u32> = (0..need).filter_map(|_| l.free.pop()).collect();
        l.tables.entry(seq).or_default().extend(new);
        true
    }
    fn release(&mut self, rank: RankId, seq: RequestId) {
        if let Some(l) = self.rank_mut(rank) {
            if let Some(t) = l.tables.remove(&seq) {
                l.free.extend(t);
                l.free.sort_unstable_by(|a, b| b.cmp(a));
            }
        }
    }
}

/// Default of [`CudaRunner::set_padded_dispatch_max_rows`] (0: off). Measured on H200: the
/// padded dispatch ties with the host dispatch at batch 64 (14.78 vs 14.68 ms/step on Qwen3,
/// 15.32 vs 15.41 on DeepSeek), is slower at 8 (it reads every expert) and mixed at 256; what it
/// saves in host syncs (about 0.45 ms a step at 64) it spends on the experts no row was routed
/// to and on padding. Off until it wins.
pub const PADDED_DISPATCH_MAX_ROWS: usize = 0;

/// How a step routes its experts (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DispatchPath {
    /// Routes to the host once per MoE layer; cuBLAS batched GEMMs over the active experts.
    Host,
    /// On the device: `moe_gemv` over the experts with rows.
    Gemv,
    /// On the device: cuBLAS batched GEMMs over every expert, this many rows each; the rest
    /// through `moe_gemv`.
    Padded(usize),
}

/// Automatic rows per expert of the padded dispatch: twice the mean load plus 4, at least 8,
/// at most `rows`.
fn padded_capacity(rows: usize, top_k: usize, experts: usize) -> usize {
    (2 * (rows * top_k).div_ceil(experts.max(1)) + 4)
        .max(8)
        .min(rows.max(1))
}

/// Default of [`CudaRunner::set_device_dispatch_max_rows`]: steps of up to this many tokens per
/// rank route on the device through `moe_gemv`. Measured on H200 (`docs/benchmarks/
/// cuda-runtime.md`, both shapes, two runs): at batch 1 it and the host dispatch are within 5%
/// (5.92 vs 6.25 ms/step on Qwen3 in one run, 5.87 vs 5.60 in the other); from batch 8 on,
/// cuBLAS's tensor-core GEMMs beat `moe_gemv` on CUDA cores clearly (8.55 vs 10.47 ms at 8,
/// 14.68 vs 22.71 at 64). 4 lies between the measured points.
pub const DEVICE_DISPATCH_MAX_ROWS: usize = 4;

/// Names of the phases [`CudaRunner::take_phase_times`] reports, in order: attention (norm to
/// output projection), the dense MLP layers, the router (plus the padded path's dispatch;
/// expert parallel, plus pushing the rows and routes to every GPU and the shared experts), the
/// routed experts with their dispatch and the combine (expert parallel: until every GPU's
/// outputs are back), and the final norm, LM head and read-back. Summed over ranks; each mark
/// synchronises the rank's own stream.
pub const PHASES: [&str; 5] = [
    "attention",
    "dense_mlp",
    "router_dispatch",
    "experts_combine",
    "lm_head_logits",
];

/// Host-timed phases of a step (only when phase timing is on: each mark synchronises the stream,
/// so timed steps are slower than untimed ones).
struct PhaseClock {
    on: bool,
    last: std::time::Instant,
    acc: [f64; PHASES.len()],
}

impl PhaseClock {
    fn mark(&mut self, stream: &CudaStream, phase: usize) -> Result<(), CudaError> {
        if !self.on {
            return Ok(());
        }
        stream
            .synchronize()
            .map_err(CudaError::driver("cuStreamSynchronize"))?;
        let now = std::time::Instant::now();
        self.acc[phase] += (now - self.last).as_secs_f64();
        self.last = now;
        Ok(())
    }
}

/// One sequence chunk of a step on one rank.
#[derive(Debug, Clone)]
struct Item {
    tokens: Vec<u32>,
    start: usize,
    blocks: Vec<u32>,
    sample: bool,
    /// What the engine needs of the sampled row.
    need: Need,
}

/// One rank's part of a step in flight, from [`CudaRunner::begin`] to [`CudaRunner::finish`].
struct Step {
    ri: usize,
    rows: usize,
    path: DispatchPath,
    /// What the engine needs of each sampled row, in order.
    needs: Vec<Need>,
    ctx_max: usize,
    clock: PhaseClock,
}

/// The rows a GPU runs layer `l`'s routed experts on: its rank's own rows of the step (`s.xb`,
/// `s.ids`; every expert), or, expert parallel, every rank's rows gathered in its exchange chunk,
/// of which it runs only the slots routed to the experts it owns.
#[derive(Debug, Clone, Copy)]
struct ExpertRows {
    /// The rows' normalised inputs (bf16, `h` per row).
    x: u64,
    /// Their routes (`top_k` expert ids per row).
    ids: u64,
    rows: usize,
    /// The owner rank of each expert of the layer (0: no mask, every expert runs here).
    owner: u64,
    /// This GPU's rank index (with `owner`).
    me: i32,
}

impl ExpertRows {
    fn own(rank: &Rank, rows: usize) -> Self {
        Self {
            x: rank.s.xb,
            ids: rank.s.ids,
            rows,
            owner: 0,
            me: 0,
        }
    }

    fn gathered(rank: &Rank, g: usize, l: usize, total: usize, d: &Dims) -> Self {
        Self {
            x: rank.x.xin,
            ids: rank.x.idin,
            rows: total,
            owner: rank.s.eowner + (4 * l * d.experts) as u64,
            me: g as i32,
        }
    }
}

/// What a rank's host thread brings back from a step.
#[derive(Default)]
struct RankDone {
    out: Vec<RowOutput>,
    expert_bytes: u64,
    phases: [f64; PHASES.len()],
}

/// The model on one or more GPUs, serving the engine (see the module docs).
pub struct CudaRunner {
    ranks: Vec<Rank>,
    experts: Vec<Vec<ExpertBuf>>,
    model: Model<CpuCompute>,
    cfg: ModelConfig,
    config: CudaConfig,
    dims: Dims,
    geo: KvGeometry,
    ledger: Ledger,
    last_expert_bytes: u64,
    phase_timing: bool,
    phases: [f64; PHASES.len()],
    device_dispatch_max_rows: usize,
    padded_dispatch_max_rows: usize,
    forced_capacity: Option<usize>,
    expert_parallel: bool,
    vmm: Vmm<CudaBackend>,
}

impl std::fmt::Debug for CudaRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaRunner")
            .field("ranks", &self.ranks)
            .field("config", &self.config)
            .finish()
    }
}

impl Drop for CudaRunner {
    fn drop(&mut self) {
        // Work still queued on a stream must finish before its chunks are unmapped. Errors are
        // ignored: Drop must not panic, and the memory is released either way.
        for r in &self.ranks {
            let _ = r.stream.synchronize();
        }
    }
}

fn slot_addr(
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

fn has_role(layout: &ChunkLayout, role: TensorRole) -> bool {
    layout.tensors().iter().any(|t| t.role == role)
}

/// How weights get their values.
enum Fill<'a> {
    Source(&'a dyn TensorSource),
    Random(u64),
    /// Left as allocated: the bytes arrive later by peer copies (a warm rank).
    Skip,
}

impl CudaRunner {
    /// Loads every tensor from `src` (read as f32, converted to bf16 on the host, copied in).
    pub fn load(
        cfg: &ModelConfig,
        src: &dyn TensorSource,
        config: CudaConfig,
    ) -> Result<Self, CudaError> {
        Self::build(cfg, config, Fill::Source(src), None)
    }

    /// Random bf16 weights generated on the device (uniform in `±1/sqrt(fan_in)`, norms 1), for
    /// benchmarks of shapes too large to write to disk. The same `cfg` and `seed` give the same
    /// weights on any number of devices (every rank's replicated copy is identical).
    pub fn synthetic(cfg: &ModelConfig, seed: u64, config: CudaConfig) -> Result<Self, CudaError> {
        Self::build(cfg, config, Fill::Random(seed), None)
    }

    fn build(
        cfg: &ModelConfig,
        config: CudaConfig,
        fill: Fill<'_>,
        vmm: Option<Vmm<CudaBackend>>,
    ) -> Result<Self, CudaError> {
        let devs: Vec<DeviceId> = (0..config.devices as u32).map(DeviceId).collect();
        Self::build_on(cfg, config, fill, vmm, &devs)
    }

    /// [`CudaRunner::build`] on the GPUs `devs` (distinct, in rank order; `config.devices`
    /// becomes their count): a runner beside another on a disjoint set (the extravagant
    /// baseline, [`Blueprint::copy_runner`]).
    fn build_on(
        cfg: &ModelConfig,
        mut config: CudaConfig,
        fill: Fill<'_>,
        vmm: Option<Vmm<CudaBackend>>,
        devs: &[DeviceId],
    ) -> Result<Self, CudaError> {
        device_count()?;
        let vmm = match vmm {
            Some(v) => v,
            None => config.gpus.vmm()?,
        };
        // Logical devices: one per GPU, or several on one (`GpuMap`).
        let n_dev = vmm.device_count();
        config.devices = devs.len();
        if devs.is_empty() || devs.len() > n_dev {
            return Err(CudaError::NoGpu(format!(
                "{} device(s) asked for, {n_dev} present",
                devs.len()
            )));
        }
        if let Some(d) = devs.iter().find(|d| d.index() >= n_dev) {
            return Err(CudaError::NoGpu(format!(
                "device {} asked for, {n_dev} present",
                d.0
            )));
        }
        if config.block_tokens == 0
            || config.kv_blocks_per_rank == 0
            || config.max_batch_tokens == 0
        {
            return Err(CudaError::Unsupported(
                "block_tokens, kv_blocks_per_rank and max_batch_tokens must be positive".into(),
            ));
        }
        check_config(cfg, &config)?;
        let model = Model::new(cfg, CpuCompute::new())?;
        let spec = model.router_spec();
        if cfg.num_moe_layers() > 0 && (spec.experts > 256 || spec.top_k > 32) {
            return Err(CudaError::Unsupported(format!(
                "router with {} experts and top-{} (at most 256 and 32)",
                spec.experts, spec.top_k
            )));
        }
        if spec.groups.is_some_and(|g| g.n_group > 64) {
            return Err(CudaError::Unsupported("more than 64 expert groups".into()));
        }
        let max_context = config.max_context.min(cfg.max_position_embeddings).max(1);
        let geo = model.kv_geometry(config.block_tokens);
        let h = cfg.hidden_size;
        let (qw, kvw, qr, attw, lat) = match model.attn_dims() {
            AttnDims::Gqa(d) => (
                d.heads * d.head_dim,
                d.kv_heads * d.head_dim,
                0,
                d.heads * d.head_dim,
                0,
            ),
            AttnDims::Mla(d) => {
                let qr = match &cfg.attention {
                    moe_model::config::AttentionConfig::Mla(m) => m.q_lora_rank.unwrap_or(0),
                    _ => 0,
                };
                (
                    d.heads * (d.qk_nope + d.qk_rope),
                    d.kv_lora_rank + d.qk_rope,
                    qr,
                    d.heads * d.v_head,
                    d.heads * d.kv_lora_rank,
                )
            }
        };
        let inter_e = cfg.moe.expert_intermediate_size;
        let inter_max = cfg
            .intermediate_size
            .max(cfg.moe.n_shared_experts * inter_e)
            .max(1);
        let rows = config.max_batch_tokens;
        let e = spec.experts.max(1);
        let dims = Dims {
            h,
            vocab: cfg.vocab_size,
            qw,
            kvw,
            qr,
            attw,
            lat,
            inter_max,
            inter_e,
            experts: e,
            top_k: spec.top_k,
            rows,
            table_cap: rows * max_context.div_ceil(config.block_tokens),
            // Room for the grouped layout of any `rows` routed rows, the padded layout, and the
            // compact layout of an expert-parallel step's rows from every GPU.
            gather_cap: (e.min(rows * spec.top_k.max(1)) * rows)
                .max(e * padded_capacity(rows, spec.top_k, e) + rows * spec.top_k)
                .max(n_dev * rows * spec.top_k),
            half_rope: model.rope().dim() / 2,
            max_context,
            es: config.precision.elem_bytes(),
            layers: cfg.num_layers,
            gpus: n_dev,
        };
        // Shared memory of the attention kernels: the query parts plus one score per context token.
        let smem = 4 * (dims.lat.max(qw) + max_context) + 256;
        if smem > 48 * 1024 {
            return Err(CudaError::Unsupported(format!(
                "max_context {max_context} needs {smem} bytes of shared memory per attention block \
                 (at most 48 KiB); lower max_context"
            )));
        }
        let layout = model.layout().clone();
        let mut ranks = Vec::with_capacity(devs.len());
        // Random weights: every rank's replicated tensors restart the seed counter, so every
        // rank holds the same model, and the experts continue after them whatever the device
        // count (a synthetic model is the same on 1 GPU and on 2).
        let mut seed_ctr = 0u64;
        for &dev in devs {
            let mut rank_ctr = 0u64;
            ranks.push(Self::make_rank(
                &vmm,
                dev,
                cfg,
                &model,
                &dims,
                &geo,
                &config,
                &layout,
                &fill,
                &mut rank_ctr,
            )?);
            seed_ctr = rank_ctr;
        }
        // Routed experts: contiguous id ranges per device, readable by every device.
        let mut experts = Vec::with_capacity(cfg.num_layers);
        let es = dims.es;
        let ebytes = layout.expert_floats() * es;
        for l in 0..cfg.num_layers {
            let mut layer = Vec::new();
            if cfg.is_moe_layer(l) {
                for ex in 0..cfg.moe.num_experts {
                    let owner = ex * devs.len() / cfg.moe.num_experts;
                    let rank = &ranks[owner];
                    rank.bind()?;
                    let access = if devs.len() > 1 {
                        devs.to_vec()
                    } else {
                        Vec::new()
                    };
                    let buf = DevBuf::new(&vmm, rank.dev, ebytes, &access)?;
                    let specs = schema::expert_tensors(cfg, l, ex);
                    let mut off = 0u64;
                    for s in &specs {
                        let n = s.numel();
                        Self::fill_tensor(rank, buf.addr() + off, n, s, &fill, &mut seed_ctr)?;
                        off += (es * n) as u64;
                    }
                    layer.push(ExpertBuf { dev: rank.dev, buf });
                }
            }
            experts.push(layer);
        }
        for r in &ranks {
            r.stream
                .synchronize()
                .map_err(CudaError::driver("cuStreamSynchronize"))?;
        }
        let ledger = Ledger {
            block_tokens: config.block_tokens,
            ranks: devs
                .iter()
                .map(|d| {
                    (
                        RankId(d.0),
                        RankLedger {
                            total: config.kv_blocks_per_rank,
                            free: (0..config.kv_blocks_per_rank as u32).rev().collect(),
                            tables: BTreeMap::new(),
                        },
                    )
                })
                .collect(),
        };
        Ok(Self {
            ranks,
            experts,
            cfg: cfg.clone(),
            model,
            config,
            dims,
            geo,
            ledger,
            last_expert_bytes: 0,
            phase_timing: false,
            phases: [0.0; PHASES.len()],
            device_dispatch_max_rows: DEVICE_DISPATCH_MAX_ROWS,
            padded_dispatch_max_rows: PADDED_DISPATCH_MAX_ROWS,
            forced_capacity: None,
            expert_parallel: true,
            vmm,
        })
    }

    fn fill_tensor(
        rank: &Rank,
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
                if rank.dt == blas_sys::cudaDataType::CUDA_R_32F {
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

    #[allow(clippy::too_many_arguments)]
    fn make_rank(
        vmm: &Vmm<CudaBackend>,
        dev: DeviceId,
        cfg: &ModelConfig,
        model: &Model<CpuCompute>,
        d: &Dims,
        geo: &KvGeometry,
        config: &CudaConfig,
        layout: &moe_model::weights::WeightLayout,
        fill: &Fill<'_>,
        seed_ctr: &mut u64,
    ) -> Result<Rank, CudaError> {
        // A logical device's GPU: several ranks may share one (their own streams, handles and
        // kernels, in the GPU's primary context).
        let ordinal = vmm.backend().ordinal(dev)? as usize;
        let ctx = CudaContext::new(ordinal).map_err(CudaError::driver("cuCtxCreate"))?;
        let stream = ctx
            .new_stream()
            .map_err(CudaError::driver("cuStreamCreate"))?;
        let blas_h = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas {
            call: "cublasCreate",
            status: e.0 as i32,
        })?;
        let f32_storage = config.precision == Precision::F32;
        let k = Kernels::compile(&ctx, f32_storage, config.batch_invariant && !f32_storage)?;
        let es = d.es;
        let global = DevBuf::new(vmm, dev, layout.global().floats() * es, &[])?;
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let lay = layout
                    .layer(l)
                    .ok_or(CudaError::Model(ModelError::NoSuchLayer { layer: l }))?;
                DevBuf::new(vmm, dev, lay.floats() * es, &[])
            })
            .collect::<Result<Vec<_>, _>>()?;
        let kv = DevBuf::new(
            vmm,
            dev,
            geo.block_floats() * 4 * config.kv_blocks_per_rank,
            &[],
        )?;
        // Scratch: bump-allocate every buffer at 256-byte alignment.
        let r = d.rows;
        let sizes: Vec<(&str, usize)> = vec![
            ("hidden", 4 * r * d.h),
            ("xn", 4 * r * d.h),
            ("xb", es * r * d.h.max(d.qr)),
            ("q", 4 * r * d.qw),
            ("qbf", es * r * d.qw),
            ("kbuf", 4 * r * d.kvw.max(d.qr)),
            ("vbuf", 4 * r * d.kvw),
            ("att", es * r * d.attw.max(d.lat)),
            ("att2", es * r * d.attw),
            ("qlat", 4 * r * d.lat),
            ("rlogits", 4 * r * d.experts),
            ("ids", 4 * r * d.top_k),
            ("wts", 4 * r * d.top_k),
            ("f1", 4 * r * d.inter_max),
            ("f2", 4 * r * d.inter_max),
            ("hb", es * r * d.inter_max),
            ("y", 4 * r * d.h),
            ("xg", es * d.gather_cap * d.h),
            ("gu", 4 * d.gather_cap * 2 * d.inter_e),
            ("eh", es * d.gather_cap * d.inter_e),
            ("eo", 4 * d.gather_cap * d.h),
            ("gidx", 4 * d.gather_cap),
            ("cidx", 4 * d.ep_rows() * d.top_k),
            ("ptrs", 8 * 6 * d.experts),
            ("tokens", 4 * r),
            ("pos", 4 * r),
            ("tbl_off", 4 * r),
            ("last", 4 * r),
            ("tables", 4 * d.table_cap),
            ("lastb", es * r * d.h.max(d.qr)),
            ("logits", 4 * r * d.vocab),
            ("cos", 4 * d.max_context * d.half_rope),
            ("sin", 4 * d.max_context * d.half_rope),
            ("counts", 4 * d.experts),
            ("offsets", 4 * d.experts),
            ("active", 4 * d.layers.max(1)),
            ("etable", 8 * d.layers.max(1) * d.experts),
            ("etable_down", 8 * d.layers.max(1) * d.experts),
            ("pptrs", 8 * 4 * d.experts),
            ("ov_counts", 4 * d.experts),
            ("ov_offsets", 4 * d.experts),
            ("ov_gidx", 4 * r * d.top_k),
            ("argmax", 4 * r),
            ("dinfo", 4 * 4),
            ("eowner", 4 * d.layers.max(1) * d.experts),
            ("ep_offs", 4 * (d.gpus + 1)),
            ("ep_rets", 8 * d.gpus),
            ("iota", 4 * r * d.top_k),
        ];
        let total: usize = sizes.iter().map(|(_, b)| b.div_ceil(256) * 256 + 256).sum();
        let scratch = DevBuf::new(vmm, dev, total, &[])?;
        ctx.bind_to_thread()
            .map_err(CudaError::driver("cuCtxSetCurrent"))?;
        let pinned = PinnedHost::new(&ctx, r * d.vocab)?;
        let pinned_small = PinnedHost::new(&ctx, r + d.layers)?;
        let pinned_info = PinnedHost::new(&ctx, 4)?;
        let info_ready = ctx
            .new_event(None)
            .map_err(CudaError::driver("cuEventCreate"))?;
        let mut at = scratch.addr();
        let mut addr = BTreeMap::new();
        for (name, b) in &sizes {
            addr.insert(*name, at);
            at += (b.div_ceil(256) * 256 + 256) as u64;
        }
        let a = |n: &str| addr[n];
        let s = Scratch {
            hidden: a("hidden"),
            xn: a("xn"),
            xb: a("xb"),
            q: a("q"),
            qbf: a("qbf"),
            kbuf: a("kbuf"),
            vbuf: a("vbuf"),
            att: a("att"),
            att2: a("att2"),
            qlat: a("qlat"),
            rlogits: a("rlogits"),
            ids: a("ids"),
            wts: a("wts"),
            f1: a("f1"),
            f2: a("f2"),
            hb: a("hb"),
            y: a("y"),
            xg: a("xg"),
            gu: a("gu"),
            eh: a("eh"),
            eo: a("eo"),
            gidx: a("gidx"),
            cidx: a("cidx"),
            ptrs: a("ptrs"),
            tokens: a("tokens"),
            pos: a("pos"),
            tbl_off: a("tbl_off"),
            last: a("last"),
            tables: a("tables"),
            lastb: a("lastb"),
            logits: a("logits"),
            cos: a("cos"),
            sin: a("sin"),
            counts: a("counts"),
            offsets: a("offsets"),
            active: a("active"),
            etable: a("etable"),
            etable_down: a("etable_down"),
            pptrs: a("pptrs"),
            ov_counts: a("ov_counts"),
            ov_offsets: a("ov_offsets"),
            ov_gidx: a("ov_gidx"),
            argmax: a("argmax"),
            dinfo: a("dinfo"),
            eowner: a("eowner"),
            ep_offs: a("ep_offs"),
            ep_rets: a("ep_rets"),
            iota: a("iota"),
        };
        // The exchange chunk: readable and writable by every GPU of the machine, so any rank that
        // joins later can use it without a new grant.
        let x_sizes = [
            d.es * d.ep_rows() * d.h,
            4 * d.ep_rows() * d.top_k,
            4 * r * d.top_k * d.h,
        ];
        let x_len: usize = x_sizes.iter().map(|b| b.div_ceil(256) * 256).sum();
        let everyone: Vec<DeviceId> = if d.gpus > 1 {
            (0..d.gpus as u32).map(DeviceId).collect()
        } else {
            Vec::new()
        };
        // Without peer access between some GPUs the grant fails; the rank then keeps its
        // exchange chunk to itself and steps run without expert parallelism.
        let (xchg, peer_exchange) = match DevBuf::new(vmm, dev, x_len, &everyone) {
            Ok(b) => (b, !everyone.is_empty()),
            Err(_) => (DevBuf::new(vmm, dev, x_len, &[])?, false),
        };
        let x = Exchange {
            xin: xchg.addr(),
            idin: xchg.addr() + (x_sizes[0].div_ceil(256) * 256) as u64,
            ret: xchg.addr() + ((x_sizes[0].div_ceil(256) + x_sizes[1].div_ceil(256)) * 256) as u64,
        };
        let event = || {
            ctx.new_event(None)
                .map_err(CudaError::driver("cuEventCreate"))
        };
        let (ev_pub, ev_ret) = (event()?, event()?);
        let rank = Rank {
            dev,
            ctx,
            stream,
            blas: blas_h,
            k,
            global,
            layers,
            kv,
            _scratch: scratch,
            s,
            _xchg: xchg,
            x,
            peer_exchange,
            ev_pub,
            ev_ret,
            pinned,
            pinned_small,
            pinned_info,
            info_ready,
            dt: if f32_storage {
                blas_sys::cudaDataType::CUDA_R_32F
            } else {
                blas_sys::cudaDataType::CUDA_R_16BF
            },
            ct: if f32_storage {
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC
            } else {
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
            },
            bi: config.batch_invariant,
        };
        rank.bind()?;
        // Rope tables, computed on the host exactly as the CPU reference computes them.
        let half = d.half_rope;
        let (mut cos, mut sin) = (
            vec![0.0f32; d.max_context * half],
            vec![0.0f32; d.max_context * half],
        );
        for p in 0..d.max_context {
            model.rope().cos_sin(
                p,
                &mut cos[p * half..(p + 1) * half],
                &mut sin[p * half..(p + 1) * half],
            );
        }
        rank.htod(rank.s.cos, &cos)?;
        rank.htod(rank.s.sin, &sin)?;
        let iota: Vec<i32> = (0..(r * d.top_k) as i32).collect();
        rank.htod(rank.s.iota, &iota)?;
        // Replicated weights.
        let fill_chunk =
            |base: u64, lay: &ChunkLayout, seed_ctr: &mut u64| -> Result<(), CudaError> {
                for t in lay.tensors() {
                    Self::fill_tensor(
                        &rank,
                        base + (d.es * t.offset) as u64,
                        t.len,
                        &t.spec(),
                        fill,
                        seed_ctr,
                    )?;
                }
                Ok(())
            };
        fill_chunk(rank.global.addr(), layout.global(), seed_ctr)?;
        for (l, buf) in rank.layers.iter().enumerate() {
            if let Some(lay) = layout.layer(l) {
                fill_chunk(buf.addr(), lay, seed_ctr)?;
            }
        }
        Ok(rank)
    }

    /// The name of rank 0's GPU (for reports).
    pub fn device_name(&self) -> Result<String, CudaError> {
        self.ranks[0]
            .ctx
            .name()
            .map_err(CudaError::driver("cuDeviceGetName"))
    }

    /// Ranks (GPUs) in use.
    pub fn rank_count(&self) -> usize {
        self.ranks.len()
    }

    /// The device holding routed expert `expert` of `layer` (`None` for dense layers or bad ids).
    pub fn expert_device(&self, layer: usize, expert: usize) -> Option<DeviceId> {
        self.experts.get(layer)?.get(expert).map(|e| e.dev)
    }

    /// The KV block geometry.
    pub fn kv_geometry(&self) -> KvGeometry {
        self.geo
    }

    /// Bytes of one rank's replicated weights (global plus every layer's chunk as stored, unpadded).
    pub fn replicated_weight_bytes(&self) -> u64 {
        let layout = self.model.layout();
        let mut f = layout.global().floats();
        for l in 0..self.cfg.num_layers {
            f += layout.layer(l).map_or(0, ChunkLayout::floats);
        }
        (self.dims.es * f) as u64
    }

    /// Routed-expert weight bytes the last step read (each active expert once per rank and layer).
    pub fn last_step_expert_bytes(&self) -> u64 {
        self.last_expert_bytes
    }

    /// The greedy choice the runner makes on the device (the kernel behind
    /// [`Need::GreedyToken`]) for each row of `logits` (`vocab` values each), on rank 0: the
    /// lowest id among the largest finite values, `None` when no value is finite. For checks
    /// against the host sampler.
    pub fn device_argmax(
        &self,
        logits: &[f32],
        vocab: usize,
    ) -> Result<Vec<Option<u32>>, CudaError> {
        if vocab != self.dims.vocab || !logits.len().is_multiple_of(vocab.max(1)) {
            return Err(CudaError::Input(format!(
                "{} values are not rows of the vocabulary size {}",
                logits.len(),
                self.dims.vocab
            )));
        }
        let n = logits.len() / vocab;
        if n > self.dims.rows {
            return Err(CudaError::Input(format!(
                "{n} rows; the runner was sized for {}",
                self.dims.rows
            )));
        }
        let rank = &self.ranks[0];
        rank.bind()?;
        rank.htod(rank.s.logits, logits)?;
        rank.launch(
            &rank.k.argmax_rows,
            (n as u32, 1),
            1024,
            0,
            &[
                Arg::P(rank.s.logits),
                Arg::I(vocab as i32),
                Arg::P(rank.s.argmax),
            ],
        )?;
        let ids: Vec<i32> = rank.dtoh(rank.s.argmax, n)?;
        Ok(ids.into_iter().map(|i| u32::try_from(i).ok()).collect())
    }

    /// Launches the router kernel (`route`, one warp per row) over the first `rows` rows of the
    /// rank's router logits (`s.rlogits`), writing `s.ids` / `s.wts`.
    fn launch_route(
        rank: &Rank,
        spec: &moe_model::spec::RouterSpec,
        rows: usize,
    ) -> Result<(), CudaError> {
        let s = rank.s;
        let (ng, tg) = spec.groups.map_or((0, 0), |g| (g.n_group, g.topk_group));
        rank.launch(
            &rank.k.route,
            (rows as u32, 1),
            32,
            0,
            &[
                Arg::P(s.rlogits),
                Arg::I(rows as i32),
                Arg::I(spec.experts as i32),
                Arg::I(spec.top_k as i32),
                Arg::I(ng as i32),
                Arg::I(tg as i32),
                Arg::I(i32::from(spec.normalize)),
                Arg::F(spec.scale),
                Arg::P(s.ids),
                Arg::P(s.wts),
            ],
        )
    }

    /// The routes the runner's router kernel (`route`, one warp per row) chooses for each row of
    /// `logits` (router logits, the model's expert count per row), on rank 0: per row, the
    /// chosen experts ascending by id with their weights. For checks against the CPU router.
    pub fn device_route(&self, logits: &[f32]) -> Result<Vec<Vec<(u32, f32)>>, CudaError> {
        let spec = self.model.router_spec();
        let (e, k) = (spec.experts, spec.top_k);
        if e == 0 || self.cfg.num_moe_layers() == 0 {
            return Err(CudaError::Input("the model has no routed experts".into()));
        }
        if !logits.len().is_multiple_of(e) {
            return Err(CudaError::Input(format!(
                "{} values are not rows of the expert count {e}",
                logits.len()
            )));
        }
        let n = logits.len() / e;
        if n > self.dims.rows {
            return Err(CudaError::Input(format!(
                "{n} rows; the runner was sized for {}",
                self.dims.rows
            )));
        }
        let rank = &self.ranks[0];
        rank.bind()?;
        let s = rank.s;
        rank.htod(s.rlogits, logits)?;
        Self::launch_route(rank, &spec, n)?;
        let ids: Vec<i32> = rank.dtoh(s.ids, n * k)?;
        let wts: Vec<f32> = rank.dtoh(s.wts, n * k)?;
        ids.chunks(k.max(1))
            .zip(wts.chunks(k.max(1)))
            .map(|(i, w)| {
                i.iter()
                    .zip(w)
                    .map(|(&x, &wt)| {
                        u32::try_from(x)
                            .map(|x| (x, wt))
                            .map_err(|_| CudaError::Input(format!("router produced id {x}")))
                    })
                    .collect()
            })
            .collect()
    }

    /// Steps with at most `rows` tokens on a rank route their experts on the device (no host
    /// synchronisation; `moe_gemv` on CUDA cores, which skips experts with no rows); larger steps
    /// (prefill) copy the routes to the host and run cuBLAS batched GEMMs on tensor cores. 0
    /// always takes the host path. Default [`DEVICE_DISPATCH_MAX_ROWS`].
    pub fn set_device_dispatch_max_rows(&mut self, rows: usize) {
        self.device_dispatch_max_rows = rows;
    }

    /// Steps with more tokens on a rank than [`CudaRunner::set_device_dispatch_max_rows`] and at
    /// most `rows` use the padded device dispatch: routes never go to the host; every expert runs
    /// in one cuBLAS batched GEMM on tensor cores over `capacity` padded rows (reading every
    /// expert's weights), and the rows past an expert's capacity go through `moe_gemv`. 0 turns
    /// it off. Default [`PADDED_DISPATCH_MAX_ROWS`].
    pub fn set_padded_dispatch_max_rows(&mut self, rows: usize) {
        self.padded_dispatch_max_rows = rows;
    }

    /// Rows per expert of the padded dispatch (`None`: automatic, about twice the mean load plus
    /// a margin). A forced value that does not fit the scratch sized at build falls back to the
    /// host dispatch; for tests of the overflow path.
    pub fn set_expert_capacity(&mut self, capacity: Option<usize>) {
        self.forced_capacity = capacity;
    }

    /// Turns per-phase timing on or off (for benchmarks: every phase boundary then synchronises
    /// the stream, which slows the step down).
    pub fn set_phase_timing(&mut self, on: bool) {
        self.phase_timing = on;
    }

    /// Seconds spent in each of [`PHASES`] since the last call (summed over ranks and steps run
    /// with phase timing on), and resets them.
    pub fn take_phase_times(&mut self) -> Vec<(&'static str, f64)> {
        let out = PHASES.iter().copied().zip(self.phases).collect();
        self.phases = [0.0; PHASES.len()];
        out
    }

    /// Device memory bandwidth of rank 0, measured with `iters` device-to-device copies of `bytes`
    /// bytes; returns bytes moved (read plus written) per second.
    pub fn copy_bandwidth(&self, bytes: usize, iters: usize) -> Result<f64, CudaError> {
        let r = &self.ranks[0];
        r.bind()?;
        let buf = DevBuf::new(&self.vmm, r.dev, 2 * bytes, &[])?;
        let copy = || {
            // SAFETY: both halves lie in `buf`, a live mapping of `2 * bytes` (or more) bytes on
            // this device, and do not overlap.
            cu("cuMemcpyDtoDAsync", unsafe {
                sys::cuMemcpyDtoDAsync_v2(
                    buf.addr() + bytes as u64,
                    buf.addr(),
                    bytes,
                    r.stream.cu_stream(),
                )
            })
        };
        copy()?;
        r.stream
            .synchronize()
            .map_err(CudaError::driver("cuStreamSynchronize"))?;
        let t = std::time::Instant::now();
        for _ in 0..iters.max(1) {
            copy()?;
        }
        r.stream
            .synchronize()
            .map_err(CudaError::driver("cuStreamSynchronize"))?;
        Ok(2.0 * bytes as f64 * iters.max(1) as f64 / t.elapsed().as_secs_f64())
    }

    fn rank_index(&self, r: RankId) -> Option<usize> {
        self.ranks.iter().position(|k| k.dev.0 == r.0)
    }

    /// Whether a step of `rows` tokens routes its experts on the device (see
    /// [`CudaRunner::set_device_dispatch_max_rows`]): also needs `moe_gemv`'s vector width to
    /// divide the hidden and expert sizes and one row of either to fit its shared memory.
    fn dispatch_path(&self, rows: usize) -> DispatchPath {
        let d = &self.dims;
        if self.cfg.num_moe_layers() == 0 || !moe_gemv_fits(d.h, d.inter_e, d.es) {
            return DispatchPath::Host;
        }
        // Batch-invariant: `moe_gemv` at every size (`check_config` made sure it fits).
        if self.config.batch_invariant || rows <= self.device_dispatch_max_rows {
            return DispatchPath::Gemv;
        }
        let cap = self
            .forced_capacity
            .unwrap_or_else(|| padded_capacity(rows, d.top_k, d.experts))
            .clamp(1, rows);
        if rows <= self.padded_dispatch_max_rows && d.experts * cap + rows * d.top_k <= d.gather_cap
        {
            DispatchPath::Padded(cap)
        } else {
            DispatchPath::Host
        }
    }

    /// Base addresses of every routed expert, `[layer][expert]` (0 for dense layers), as the
    /// device-side dispatch reads them. Derived from `self.experts` at every step, so replacing
    /// that table wholesale between steps is all a placement change needs.
    fn expert_table(&self) -> Vec<u64> {
        let e = self.dims.experts;
        let mut t = vec![0u64; self.dims.layers * e];
        for (l, layer) in self.experts.iter().enumerate() {
            for (x, buf) in layer.iter().enumerate().take(e) {
                t[l * e + x] = buf.buf.addr();
            }
        }
        t
    }

    /// Launches `moe_gemv` over every expert of a layer: `out[row] = x[row_idx[row]] W_e^T` for the
    /// rows each expert has (`counts`/`offsets` device arrays; `row_idx` 0: the compact rows
    /// themselves).
    #[allow(clippy::too_many_arguments)]
    fn moe_gemv(
        &self,
        rank: &Rank,
        (counts, offsets): (u64, u64),
        table: u64,
        row_idx: u64,
        x: u64,
        ldx: usize,
        w_off: usize,
        n: usize,
        k: usize,
        out: u64,
        ldo: usize,
    ) -> Result<(), CudaError> {
        let es = self.dims.es;
        let rchunk = (MOE_SMEM / (k * es)).clamp(1, MOE_ROWS);
        let cols = MOE_WARPS * MOE_COLS;
        rank.launch(
            &rank.k.moe_gemv,
            (n.div_ceil(cols) as u32, self.dims.experts as u32),
            (32 * MOE_WARPS) as u32,
            (rchunk * k * es) as u32,
            &[
                Arg::P(counts),
                Arg::P(offsets),
                Arg::P(row_idx),
                Arg::P(x),
                Arg::I(ldx as i32),
                Arg::P(table),
                Arg::L(w_off as i64),
                Arg::I(n as i32),
                Arg::I(k as i32),
                Arg::P(out),
                Arg::I(ldo as i32),
                Arg::I(rchunk as i32),
            ],
        )
    }

    /// The routed experts' products of the device dispatch: `moe_gemv`, or in batch-invariant
    /// bf16 mode `bi_mma` in its expert mode (tensor cores; a row's result independent of the
    /// other rows, as `moe_gemv`'s is). Same arguments as [`CudaRunner::moe_gemv`], plus `rows`,
    /// the step's token count (no expert has more).
    #[allow(clippy::too_many_arguments)]
    fn expert_products(
        &self,
        rank: &Rank,
        co: (u64, u64),
        table: u64,
        row_idx: u64,
        (x, ldx): (u64, usize),
        w_off: usize,
        (n, k): (usize, usize),
        (out, ldo): (u64, usize),
        rows: usize,
    ) -> Result<(), CudaError> {
        let Some(mma) = &rank.k.bi_mma else {
            return self.moe_gemv(rank, co, table, row_idx, x, ldx, w_off, n, k, out, ldo);
        };
        let es = self.dims.es;
        let aligned = bi_vectorizable(es, k, &[x, (es * w_off) as u64], &[ldx, k]);
        rank.launch3(
            mma,
            (
                n.div_ceil(MMA_COLS) as u32,
                rows.div_ceil(MMA_ROWS) as u32,
                self.dims.experts as u32,
            ),
            128,
            &[
                Arg::P(x),
                Arg::I(ldx as i32),
                Arg::L(0),
                Arg::P(0),
                Arg::I(k as i32),
                Arg::L(0),
                Arg::P(out),
                Arg::I(ldo as i32),
                Arg::L(0),
                Arg::I(0),
                Arg::F(0.0),
                Arg::I(rows as i32),
                Arg::I(n as i32),
                Arg::I(k as i32),
                Arg::I(i32::from(aligned)),
                Arg::P(co.0),
                Arg::P(co.1),
                Arg::P(row_idx),
                Arg::P(table),
                Arg::L(w_off as i64),
            ],
        )
    }

    /// The address of `role`'s tensor in layer `l`'s replicated chunk on `rank`.
    fn weight(&self, rank: &Rank, l: usize, role: TensorRole) -> Result<u64, CudaError> {
        let lay = self
            .model
            .layout()
            .layer(l)
            .ok_or(CudaError::Model(ModelError::NoSuchLayer { layer: l }))?;
        slot_addr(rank.layers[l].addr(), lay, role, self.dims.es)
    }

    /// The SwiGLU MLP of layer `l` (dense, or its shared experts) on the step's normalised rows
    /// (`s.xb`): `out[rows, h] (ldo) = down(silu(gate x) * up x) + beta * out`.
    #[allow(clippy::too_many_arguments)]
    fn swiglu(
        &self,
        rank: &Rank,
        l: usize,
        rows: usize,
        inter: usize,
        out: u64,
        ldo: usize,
        beta: f32,
    ) -> Result<(), CudaError> {
        let (s, h) = (rank.s, self.dims.h);
        let w = |role| self.weight(rank, l, role);
        rank.gemm(
            w(TensorRole::Gate)?,
            s.xb,
            h,
            s.f1,
            inter,
            false,
            rows,
            h,
            inter,
            0.0,
        )?;
        rank.gemm(
            w(TensorRole::Up)?,
            s.xb,
            h,
            s.f2,
            inter,
            false,
            rows,
            h,
            inter,
            0.0,
        )?;
        rank.launch(
            &rank.k.silu_mul,
            (rows as u32, 1),
            256,
            0,
            &[
                Arg::P(s.f1),
                Arg::I(inter as i32),
                Arg::P(s.f2),
                Arg::I(inter as i32),
                Arg::P(s.hb),
                Arg::I(inter as i32),
            ],
        )?;
        rank.gemm(
            w(TensorRole::Down)?,
            s.hb,
            inter,
            out,
            ldo,
            false,
            rows,
            inter,
            h,
            beta,
        )
    }

    /// The per-step tables every rank that computes experts reads: the expert addresses
    /// (`[layer][expert]`; the padded path's down-projection table is uploaded by
    /// [`CudaRunner::begin`]), and zeroed active-expert counts (layers not routed on the device
    /// report none).
    fn upload_tables(&self, ri: usize, etable: &[u64]) -> Result<(), CudaError> {
        let rank = &self.ranks[ri];
        rank.bind()?;
        rank.htod(rank.s.etable, etable)?;
        rank.htod(rank.s.active, &vec![0i32; self.dims.layers])
    }

    /// Starts a step on rank `ri`: checks and uploads its rows (tokens, positions, block tables,
    /// sampled rows) and embeds them; `etable` is the step's expert address table (the padded path derives its down-projection table from it). `None` when the rank has no rows in this step.
    fn begin(&self, ri: usize, items: &[Item], etable: &[u64]) -> Result<Option<Step>, CudaError> {
        let d = self.dims;
        let rows: usize = items.iter().map(|i| i.tokens.len()).sum();
        if rows == 0 {
            return Ok(None);
        }
        if rows > d.rows {
            return Err(CudaError::Input(format!(
                "{rows} tokens in one step on one rank; the runner was sized for {}",
                d.rows
            )));
        }
        let (mut tokens, mut pos, mut tbl_off, mut tables, mut last, mut needs) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for it in items {
            let off = tables.len() as i32;
            tables.extend(it.blocks.iter().map(|&b| b as i32));
            for (j, &t) in it.tokens.iter().enumerate() {
                if t as usize >= d.vocab {
                    return Err(CudaError::Input(format!(
                        "token id {t} is outside the vocabulary (size {})",
                        d.vocab
                    )));
                }
                tokens.push(t as i32);
                pos.push((it.start + j) as i32);
                tbl_off.push(off);
            }
            if it.sample {
                last.push(tokens.len() as i32 - 1);
                needs.push(it.need);
            }
        }
        if tables.len() > d.table_cap {
            return Err(CudaError::Input("too many KV blocks in one step".into()));
        }
        let ctx_max = items
            .iter()
            .map(|i| i.start + i.tokens.len())
            .max()
            .unwrap_or(0);
        let path = self.dispatch_path(rows);
        let rank = &self.ranks[ri];
        rank.bind()?;
        let clock = PhaseClock {
            on: self.phase_timing,
            last: std::time::Instant::now(),
            acc: [0.0; PHASES.len()],
        };
        let s = rank.s;
        rank.htod(s.tokens, &tokens)?;
        rank.htod(s.pos, &pos)?;
        rank.htod(s.tbl_off, &tbl_off)?;
        rank.htod(s.tables, &tables)?;
        rank.htod(s.last, &last)?;
        if let DispatchPath::Padded(cap) = path {
            // Padded layout: expert e's rows at e * cap in xg / gu / eh / eo.
            let e = d.experts;
            let (h, ie) = (d.h as u64, d.inter_e as u64);
            let es = d.es as u64;
            let mut p = vec![0u64; 4 * e];
            for x in 0..e {
                let g = (x * cap) as u64;
                p[x] = s.xg + g * es * h;
                p[e + x] = s.gu + g * 4 * 2 * ie;
                p[2 * e + x] = s.eh + g * es * ie;
                p[3 * e + x] = s.eo + g * 4 * h;
            }
            rank.htod(s.pptrs, &p)?;
            let es_ie = (d.es * 2 * d.h * d.inter_e) as u64;
            let etable_down: Vec<u64> = etable
                .iter()
                .map(|&a| if a == 0 { 0 } else { a + es_ie })
                .collect();
            rank.htod(s.etable_down, &etable_down)?;
        }
        let g_embed = slot_addr(
            rank.global.addr(),
            self.model.layout().global(),
            TensorRole::Embedding,
            d.es,
        )?;
        rank.launch(
            &rank.k.embed,
            (rows as u32, 1),
            256,
            0,
            &[
                Arg::P(s.tokens),
                Arg::P(g_embed),
                Arg::P(s.hidden),
                Arg::I(d.h as i32),
            ],
        )?;
        Ok(Some(Step {
            ri,
            rows,
            path,
            needs,
            ctx_max,
            clock,
        }))
    }

    /// Layer `l`'s attention block on the step's rows: input norm, projections, rope, the KV
    /// write, attention and the output projection added into the residual stream.
    fn attention(&self, st: &mut Step, l: usize) -> Result<(), CudaError> {
        let d = self.dims;
        let (rows, ctx_max, geo, h) = (st.rows, st.ctx_max, self.geo, d.h);
        let rank = &self.ranks[st.ri];
        rank.bind()?;
        let s = rank.s;
        let eps = self.cfg.rms_norm_eps as f32;
        let w = |role| self.weight(rank, l, role);
        let lay = self
            .model
            .layout()
            .layer(l)
            .ok_or(CudaError::Model(ModelError::NoSuchLayer { layer: l }))?;
        let kv_args = |layer: usize| {
            [
                Arg::P(rank.kv.addr()),
                Arg::I(geo.block_floats() as i32),
                Arg::I(geo.block_tokens as i32),
                Arg::I(layer as i32),
                Arg::I(geo.token_floats() as i32),
                Arg::P(s.tables),
                Arg::P(s.tbl_off),
                Arg::P(s.pos),
            ]
        };
        let rope_args = |x: u64, row: usize, heads: usize, hs: usize, off: usize| {
            [
                Arg::P(x),
                Arg::I(row as i32),
                Arg::I(heads as i32),
                Arg::I(hs as i32),
                Arg::I(off as i32),
                Arg::I(2 * d.half_rope as i32),
                Arg::P(s.pos),
                Arg::P(s.cos),
                Arg::P(s.sin),
                Arg::I(i32::from(
                    self.model.rope().style() == RopeStyle::Interleaved,
                )),
            ]
        };
        rank.rms(
            s.hidden,
            h,
            1,
            0,
            w(TensorRole::InputNorm)?,
            h,
            eps,
            0,
            0,
            s.xb,
            h,
            rows,
        )?;
        match self.model.attn_dims() {
            AttnDims::Gqa(a) => {
                let (qw, kvw, hd) = (d.qw, d.kvw, a.head_dim);
                rank.gemm(
                    w(TensorRole::QProj)?,
                    s.xb,
                    h,
                    s.q,
                    qw,
                    false,
                    rows,
                    h,
                    qw,
                    0.0,
                )?;
                rank.gemm(
                    w(TensorRole::KProj)?,
                    s.xb,
                    h,
                    s.kbuf,
                    kvw,
                    false,
                    rows,
                    h,
                    kvw,
                    0.0,
                )?;
                rank.gemm(
                    w(TensorRole::VProj)?,
                    s.xb,
                    h,
                    s.vbuf,
                    kvw,
                    false,
                    rows,
                    h,
                    kvw,
                    0.0,
                )?;
                if has_role(lay, TensorRole::QNorm) {
                    rank.rms(
                        s.q,
                        qw,
                        a.heads,
                        hd,
                        w(TensorRole::QNorm)?,
                        hd,
                        eps,
                        s.q,
                        qw,
                        0,
                        0,
                        rows,
                    )?;
                }
                if has_role(lay, TensorRole::KNorm) {
                    rank.rms(
                        s.kbuf,
                        kvw,
                        a.kv_heads,
                        hd,
                        w(TensorRole::KNorm)?,
                        hd,
                        eps,
                        s.kbuf,
                        kvw,
                        0,
                        0,
                        rows,
                    )?;
                }
                rank.launch(
                    &rank.k.rope,
                    (rows as u32, 1),
                    128,
                    0,
                    &rope_args(s.q, qw, a.heads, hd, 0),
                )?;
                rank.launch(
                    &rank.k.rope,
                    (rows as u32, 1),
                    128,
                    0,
                    &rope_args(s.kbuf, kvw, a.kv_heads, hd, 0),
                )?;
                let mut args = kv_args(l).to_vec();
                args.extend([
                    Arg::P(s.kbuf),
                    Arg::I(kvw as i32),
                    Arg::I(kvw as i32),
                    Arg::P(s.vbuf),
                    Arg::I(kvw as i32),
                    Arg::I(kvw as i32),
                ]);
                rank.launch(&rank.k.kv_write, (rows as u32, 1), 128, 0, &args)?;
                let mut args = vec![Arg::P(s.q), Arg::I(qw as i32)];
                args.extend(kv_args(l)[..8].iter().copied());
                args.extend([
                    Arg::I(a.heads as i32),
                    Arg::I(a.kv_heads as i32),
                    Arg::I(hd as i32),
                    Arg::F(a.scale),
                    Arg::P(s.att),
                    Arg::I(qw as i32),
                ]);
                let smem = (4 * (hd + ctx_max)) as u32;
                rank.launch(
                    &rank.k.attn_gqa,
                    (a.heads as u32, rows as u32),
                    128,
                    smem,
                    &args,
                )?;
                rank.gemm(
                    w(TensorRole::OProj)?,
                    s.att,
                    qw,
                    s.hidden,
                    h,
                    false,
                    rows,
                    qw,
                    h,
                    1.0,
                )?;
            }
            AttnDims::Mla(a) => {
                let qhd = a.qk_nope + a.qk_rope;
                let (qw, r) = (d.qw, a.kv_lora_rank);
                if d.qr > 0 {
                    let qr = d.qr;
                    rank.gemm(
                        w(TensorRole::QAProj)?,
                        s.xb,
                        h,
                        s.kbuf,
                        qr,
                        false,
                        rows,
                        h,
                        qr,
                        0.0,
                    )?;
                    // Normalised q_a goes to `lastb` (bf16) as the input of q_b_proj.
                    rank.rms(
                        s.kbuf,
                        qr,
                        1,
                        0,
                        w(TensorRole::QANorm)?,
                        qr,
                        MLA_NORM_EPS,
                        0,
                        0,
                        s.lastb,
                        qr,
                        rows,
                    )?;
                    rank.gemm(
                        w(TensorRole::QBProj)?,
                        s.lastb,
                        qr,
                        s.q,
                        qw,
                        false,
                        rows,
                        qr,
                        qw,
                        0.0,
                    )?;
                } else {
                    rank.gemm(
                        w(TensorRole::QProj)?,
                        s.xb,
                        h,
                        s.q,
                        qw,
                        false,
                        rows,
                        h,
                        qw,
                        0.0,
                    )?;
                }
                let kvw = d.kvw;
                rank.gemm(
                    w(TensorRole::KvAProjWithMqa)?,
                    s.xb,
                    h,
                    s.vbuf,
                    kvw,
                    false,
                    rows,
                    h,
                    kvw,
                    0.0,
                )?;
                rank.rms(
                    s.vbuf,
                    kvw,
                    1,
                    0,
                    w(TensorRole::KvANorm)?,
                    r,
                    MLA_NORM_EPS,
                    s.vbuf,
                    kvw,
                    0,
                    0,
                    rows,
                )?;
                rank.launch(
                    &rank.k.rope,
                    (rows as u32, 1),
                    128,
                    0,
                    &rope_args(s.q, qw, a.heads, qhd, a.qk_nope),
                )?;
                rank.launch(
                    &rank.k.rope,
                    (rows as u32, 1),
                    128,
                    0,
                    &rope_args(s.vbuf, kvw, 1, a.qk_rope, r),
                )?;
                let mut args = kv_args(l).to_vec();
                args.extend([
                    Arg::P(s.vbuf),
                    Arg::I(kvw as i32),
                    Arg::I(r as i32),
                    Arg::P(s.vbuf + 4 * r as u64),
                    Arg::I(kvw as i32),
                    Arg::I(a.qk_rope as i32),
                ]);
                rank.launch(&rank.k.kv_write, (rows as u32, 1), 128, 0, &args)?;
                // Absorb: q_lat[row, h] = W_UK[h]^T q_nope[row, h] (per head, strided).
                let n = (rows * qw) as i64;
                rank.launch(
                    &rank.k.cast_bf16,
                    ((n as usize).div_ceil(256).min(65535) as u32, 1),
                    256,
                    0,
                    &[Arg::P(s.q), Arg::P(s.qbf), Arg::L(n)],
                )?;
                let kv_b = w(TensorRole::KvBProj)?;
                let kvb_head = (a.qk_nope + a.v_head) * r;
                rank.gemm_strided(
                    false,
                    r,
                    rows,
                    a.qk_nope,
                    kv_b,
                    r,
                    kvb_head,
                    s.qbf,
                    a.heads * qhd,
                    qhd,
                    s.qlat,
                    a.heads * r,
                    r,
                    false,
                    a.heads,
                )?;
                let mut args = vec![
                    Arg::P(s.qlat),
                    Arg::P(s.q),
                    Arg::I(qw as i32),
                    Arg::I(qhd as i32),
                    Arg::I(a.qk_nope as i32),
                    Arg::I(a.qk_rope as i32),
                    Arg::I(r as i32),
                ];
                args.extend(kv_args(l)[..8].iter().copied());
                args.extend([Arg::I(a.heads as i32), Arg::F(a.scale), Arg::P(s.att)]);
                let smem = (4 * (r + a.qk_rope + ctx_max)) as u32;
                rank.launch(
                    &rank.k.attn_mla,
                    (a.heads as u32, rows as u32),
                    128,
                    smem,
                    &args,
                )?;
                // Expand: out[row, h] = W_UV[h] o_lat[row, h].
                rank.gemm_strided(
                    true,
                    a.v_head,
                    rows,
                    r,
                    kv_b + (d.es * a.qk_nope * r) as u64,
                    r,
                    kvb_head,
                    s.att,
                    a.heads * r,
                    r,
                    s.att2,
                    a.heads * a.v_head,
                    a.v_head,
                    true,
                    a.heads,
                )?;
                let ow = a.heads * a.v_head;
                rank.gemm(
                    w(TensorRole::OProj)?,
                    s.att2,
                    ow,
                    s.hidden,
                    h,
                    false,
                    rows,
                    ow,
                    h,
                    1.0,
                )?;
            }
        }
        st.clock.mark(&rank.stream, 0)
    }

    /// Layer `l`'s feed-forward input: the post-attention norm, then either the dense MLP
    /// (returns false: the layer is done) or the router's logits and routes (returns true: the
    /// routed experts come next).
    fn ffn_in(&self, st: &mut Step, l: usize) -> Result<bool, CudaError> {
        let (d, rows) = (self.dims, st.rows);
        let rank = &self.ranks[st.ri];
        rank.bind()?;
        let (s, h) = (rank.s, d.h);
        let eps = self.cfg.rms_norm_eps as f32;
        rank.rms(
            s.hidden,
            h,
            1,
            0,
            self.weight(rank, l, TensorRole::PostAttentionNorm)?,
            h,
            eps,
            s.xn,
            h,
            s.xb,
            h,
            rows,
        )?;
        if !self.cfg.is_moe_layer(l) {
            self.swiglu(rank, l, rows, self.cfg.intermediate_size, s.hidden, h, 1.0)?;
            st.clock.mark(&rank.stream, 1)?;
            return Ok(false);
        }
        let spec = self.model.router_spec();
        rank.launch(
            &rank.k.linear_f32,
            (spec.experts as u32, rows as u32),
            128,
            0,
            &[
                Arg::P(s.xn),
                Arg::P(self.weight(rank, l, TensorRole::RouterGate)?),
                Arg::P(s.rlogits),
                Arg::I(h as i32),
                Arg::I(spec.experts as i32),
            ],
        )?;
        Self::launch_route(rank, &spec, rows).map(|()| true)
    }

    /// Layer `l`'s routed experts on the rank's own rows, every expert read where it lies (remote
    /// experts over NVLink), then the shared experts and the combine into the residual stream.
    fn local_experts(&self, st: &mut Step, l: usize) -> Result<(), CudaError> {
        let d = self.dims;
        let (rows, path, h, ie) = (st.rows, st.path, d.h, d.inter_e);
        let rank = &self.ranks[st.ri];
        rank.bind()?;
        let s = rank.s;
        let (e, k) = (d.experts, d.top_k);
        let clock = &mut st.clock;
        let swiglu = |inter: usize, out: u64, ldo: usize, beta: f32| {
            self.swiglu(rank, l, rows, inter, out, ldo, beta)
        };
        let own = ExpertRows::own(rank, rows);
        let mut shared_done = false;
        if path == DispatchPath::Gemv {
            // Counts, offsets and the gather computed on the device; the expert products
            // read the counts there, so the host never waits for the routes.
            clock.mark(&rank.stream, 2)?;
            self.experts_gemv(rank, l, own)?;
        } else if let DispatchPath::Padded(cap) = path {
            // Padded: every expert in one tensor-core batched GEMM over `cap` rows each,
            // the rows past an expert's capacity through `moe_gemv`; no host sync.
            rank.launch(
                &rank.k.moe_dispatch_padded,
                (1, 1),
                256,
                0,
                &[
                    Arg::P(s.ids),
                    Arg::I((rows * k) as i32),
                    Arg::I(e as i32),
                    Arg::I(k as i32),
                    Arg::I(cap as i32),
                    Arg::P(s.gidx),
                    Arg::P(s.cidx),
                    Arg::P(s.ov_counts),
                    Arg::P(s.ov_offsets),
                    Arg::P(s.ov_gidx),
                    Arg::P(s.active + 4 * l as u64),
                ],
            )?;
            clock.mark(&rank.stream, 2)?;
            let padded = e * cap;
            rank.launch(
                &rank.k.gather_bf16,
                (padded as u32, 1),
                256,
                0,
                &[Arg::P(s.xb), Arg::I(h as i32), Arg::P(s.gidx), Arg::P(s.xg)],
            )?;
            let table = s.etable + (8 * l * d.experts) as u64;
            let table_down = s.etable_down + (8 * l * d.experts) as u64;
            let pp = |i: usize| s.pptrs + (8 * i * e) as u64;
            let ov = padded as u64;
            let co = (s.ov_counts, s.ov_offsets);
            rank.gemm_batched(table, pp(0), pp(1), 2 * ie, cap, h, e)?;
            let gu_ov = s.gu + ov * 4 * 2 * ie as u64;
            self.moe_gemv(
                rank,
                co,
                table,
                s.ov_gidx,
                s.xb,
                h,
                0,
                2 * ie,
                h,
                gu_ov,
                2 * ie,
            )?;
            self.expert_silu(rank, padded + rows * k)?;
            rank.gemm_batched(table_down, pp(2), pp(3), h, cap, ie, e)?;
            let eh_ov = s.eh + ov * (d.es * ie) as u64;
            let eo_ov = s.eo + ov * 4 * h as u64;
            self.moe_gemv(rank, co, table, 0, eh_ov, ie, 2 * h * ie, h, ie, eo_ov, h)?;
        } else {
            // The grouped layout (gather list, compact rows, the GEMMs' pointer arrays) is
            // built on the device; the one host synchronisation of the layer reads back only
            // its size, because cuBLAS takes the GEMM shapes from the host.
            clock.mark(&rank.stream, 2)?;
            self.experts_grouped_start(rank, l, own)?;
            // The shared experts do not need the routes: queued before the host waits, they
            // run while it wakes up and launches the routed experts' GEMMs.
            if self.cfg.moe.n_shared_experts > 0 {
                swiglu(self.cfg.moe.n_shared_experts * ie, s.y, h, 0.0)?;
                shared_done = true;
            }
            self.experts_grouped_finish(rank, l, own)?;
        }
        let shared = if self.cfg.moe.n_shared_experts > 0 {
            if !shared_done {
                swiglu(self.cfg.moe.n_shared_experts * ie, s.y, h, 0.0)?;
            }
            s.y
        } else {
            0
        };
        rank.launch(
            &rank.k.combine,
            (rows as u32, 1),
            256,
            0,
            &[
                Arg::P(s.hidden),
                Arg::I(h as i32),
                Arg::I(k as i32),
                Arg::P(s.cidx),
                Arg::P(s.wts),
                Arg::P(s.eo),
                Arg::P(shared),
                Arg::I(h as i32),
            ],
        )?;
        clock.mark(&rank.stream, 3)
    }

    /// Queues the end of a step on its rank: the final norm of every row, the LM head on the
    /// sampled rows and, where a greedy token is all the engine needs, the argmax.
    fn finish(&self, st: &Step) -> Result<(), CudaError> {
        let d = self.dims;
        let n = st.needs.len();
        if n == 0 {
            return Ok(());
        }
        let rank = &self.ranks[st.ri];
        rank.bind()?;
        let (s, h) = (rank.s, d.h);
        let eps = self.cfg.rms_norm_eps as f32;
        let glay = self.model.layout().global();
        let g_norm = slot_addr(rank.global.addr(), glay, TensorRole::FinalNorm, d.es)?;
        let g_head = if has_role(glay, TensorRole::LmHead) {
            slot_addr(rank.global.addr(), glay, TensorRole::LmHead, d.es)?
        } else {
            slot_addr(rank.global.addr(), glay, TensorRole::Embedding, d.es)?
        };
        rank.rms(s.hidden, h, 1, 0, g_norm, h, eps, 0, 0, s.xb, h, st.rows)?;
        rank.launch(
            &rank.k.gather_bf16,
            (n as u32, 1),
            256,
            0,
            &[
                Arg::P(s.xb),
                Arg::I(h as i32),
                Arg::P(s.last),
                Arg::P(s.lastb),
            ],
        )?;
        rank.gemm(
            g_head, s.lastb, h, s.logits, d.vocab, false, n, h, d.vocab, 0.0,
        )?;
        if st.needs.contains(&Need::GreedyToken) {
            rank.launch(
                &rank.k.argmax_rows,
                (n as u32, 1),
                1024,
                0,
                &[Arg::P(s.logits), Arg::I(d.vocab as i32), Arg::P(s.argmax)],
            )?;
        }
        Ok(())
    }

    /// Takes `from`'s tuning (phase timing, expert parallelism, the dispatch thresholds and a
    /// forced expert capacity): a runner that replaces another at a switch or a restart serves
    /// the way it did.
    pub(crate) fn adopt_settings(&mut self, from: &CudaRunner) {
        self.phase_timing = from.phase_timing;
        self.expert_parallel = from.expert_parallel;
        self.device_dispatch_max_rows = from.device_dispatch_max_rows;
        self.padded_dispatch_max_rows = from.padded_dispatch_max_rows;
        self.forced_capacity = from.forced_capacity;
    }

    /// Whether steps run expert parallel (see [`CudaRunner::set_expert_parallel`]).
    pub fn expert_parallel(&self) -> bool {
        self.expert_parallel
    }

    /// With more than one rank, route every token to the GPU that holds its expert and bring
    /// the result back (expert parallelism; the default): each GPU reads only its own experts,
    /// and the ranks run side by side, one layer at a time. Off: each rank runs on its own and
    /// reads the experts of other GPUs over NVLink (the way before; kept for comparisons). The
    /// results are the same (bitwise in batch-invariant mode).
    pub fn set_expert_parallel(&mut self, on: bool) {
        self.expert_parallel = on;
    }

    /// The rank index owning each routed expert, `[layer][expert]` (0 for dense layers), when
    /// this step can run expert parallel: more than one rank, a model with routed experts, every
    /// rank's exchange chunk open to its peers, and every expert on one of the ranks' GPUs.
    fn expert_owners(&self) -> Option<Vec<i32>> {
        if !self.expert_parallel
            || self.ranks.len() < 2
            || self.cfg.num_moe_layers() == 0
            || !self.ranks.iter().all(|r| r.peer_exchange)
        {
            return None;
        }
        let e = self.dims.experts;
        let mut t = vec![0i32; self.dims.layers * e];
        for (l, layer) in self.experts.iter().enumerate() {
            for (x, buf) in layer.iter().enumerate().take(e) {
                t[l * e + x] = self.ranks.iter().position(|r| r.dev == buf.dev)? as i32;
            }
        }
        Some(t)
    }

    /// Expert parallel, once per step on every GPU: the owner table, the ranks' first global
    /// rows and their return buffers.
    fn ep_tables(&self, g: usize, owners: &[i32], offs: &[i32]) -> Result<(), CudaError> {
        let rank = &self.ranks[g];
        rank.bind()?;
        let rets: Vec<u64> = self.ranks.iter().map(|r| r.x.ret).collect();
        rank.htod(rank.s.eowner, owners)?;
        rank.htod(rank.s.ep_offs, offs)?;
        rank.htod(rank.s.ep_rets, &rets)
    }

    /// Expert parallel, layer `l`, on a rank with rows: pushes its normalised rows and routes to
    /// every GPU (at its first global row `off`), then queues its shared experts (they need
    /// only its own rows).
    fn ep_publish(&self, st: &mut Step, l: usize, off: usize) -> Result<(), CudaError> {
        let d = self.dims;
        let rank = &self.ranks[st.ri];
        rank.bind()?;
        let (s, rows) = (rank.s, st.rows);
        let xrow = d.es * d.h;
        for g in &self.ranks {
            rank.dtod(g.x.xin + (off * xrow) as u64, s.xb, rows * xrow)?;
            rank.dtod(
                g.x.idin + (4 * off * d.top_k) as u64,
                s.ids,
                4 * rows * d.top_k,
            )?;
        }
        rank.ev_pub
            .record(&rank.stream)
            .map_err(CudaError::driver("cuEventRecord"))?;
        if self.cfg.moe.n_shared_experts > 0 {
            let inter = self.cfg.moe.n_shared_experts * d.inter_e;
            self.swiglu(rank, l, rows, inter, s.y, d.h, 0.0)?;
        }
        st.clock.mark(&rank.stream, 2)
    }

    /// Expert parallel, layer `l`, on GPU `g`: waits for the rows of the ranks in `from`, lays
    /// out the slots routed to its own experts among the step's `total` rows and runs them. On
    /// the device dispatch it also sends the outputs back and returns false; on the host
    /// dispatch it returns true and [`CudaRunner::ep_finish`] completes the layer once the
    /// layout's size is on the host.
    fn ep_experts(
        &self,
        g: usize,
        l: usize,
        total: usize,
        from: &[usize],
    ) -> Result<bool, CudaError> {
        let gr = &self.ranks[g];
        gr.bind()?;
        for &r in from {
            if r != g {
                gr.stream
                    .wait(&self.ranks[r].ev_pub)
                    .map_err(CudaError::driver("cuStreamWaitEvent"))?;
            }
        }
        let rows = ExpertRows::gathered(gr, g, l, total, &self.dims);
        if self.dispatch_path(total) == DispatchPath::Gemv {
            self.experts_gemv(gr, l, rows)?;
            self.ep_return(g, l, total)?;
            return Ok(false);
        }
        self.experts_grouped_start(gr, l, rows)?;
        Ok(true)
    }

    /// Expert parallel, the host dispatch's second half on GPU `g` (see
    /// [`CudaRunner::ep_experts`]); then the outputs go back.
    fn ep_finish(&self, g: usize, l: usize, total: usize) -> Result<(), CudaError> {
        let gr = &self.ranks[g];
        gr.bind()?;
        self.experts_grouped_finish(gr, l, ExpertRows::gathered(gr, g, l, total, &self.dims))?;
        self.ep_return(g, l, total)
    }

    /// SiLU-mul of the routed experts' `[gate | up]` rows (`s.gu`, f32) into `s.eh` (the down
    /// projections' input), `rows` rows.
    fn expert_silu(&self, rank: &Rank, rows: usize) -> Result<(), CudaError> {
        let (s, ie) = (rank.s, self.dims.inter_e);
        rank.launch(
            &rank.k.silu_mul,
            (rows as u32, 1),
            256,
            0,
            &[
                Arg::P(s.gu),
                Arg::I(2 * ie as i32),
                Arg::P(s.gu + 4 * ie as u64),
                Arg::I(2 * ie as i32),
                Arg::P(s.eh),
                Arg::I(ie as i32),
            ],
        )
    }

    /// The device dispatch of layer `l`'s routed experts over `r` on `rank`: counts, offsets and
    /// the compact layout on the device, then `moe_gemv` (or `bi_mma` in batch-invariant bf16
    /// mode) reading the counts there; the host never waits for the routes. Outputs in `s.eo`
    /// at each slot's compact row (`s.cidx`).
    fn experts_gemv(&self, rank: &Rank, l: usize, r: ExpertRows) -> Result<(), CudaError> {
        let d = self.dims;
        let s = rank.s;
        let (e, k, h, ie) = (d.experts, d.top_k, d.h, d.inter_e);
        rank.launch(
            &rank.k.moe_dispatch,
            (1, 1),
            256,
            0,
            &[
                Arg::P(r.ids),
                Arg::I((r.rows * k) as i32),
                Arg::I(e as i32),
                Arg::I(k as i32),
                Arg::P(s.counts),
                Arg::P(s.offsets),
                Arg::P(s.gidx),
                Arg::P(s.cidx),
                Arg::P(s.active + 4 * l as u64),
                Arg::P(r.owner),
                Arg::I(r.me),
            ],
        )?;
        let table = s.etable + (8 * l * e) as u64;
        let co = (s.counts, s.offsets);
        let gu = (s.gu, 2 * ie);
        self.expert_products(
            rank,
            co,
            table,
            s.gidx,
            (r.x, h),
            0,
            (2 * ie, h),
            gu,
            r.rows,
        )?;
        self.expert_silu(rank, r.rows * k)?;
        let (eh, eo) = ((s.eh, ie), (s.eo, h));
        self.expert_products(rank, co, table, 0, eh, 2 * h * ie, (h, ie), eo, r.rows)
    }

    /// The host dispatch of layer `l`'s routed experts over `r` on `rank`, first half: the
    /// grouped layout (gather list, compact rows, the batched GEMMs' pointer arrays) built on
    /// the device, and the copy of its size to the host queued ([`Rank::fetch_info`]).
    fn experts_grouped_start(&self, rank: &Rank, l: usize, r: ExpertRows) -> Result<(), CudaError> {
        let d = self.dims;
        let s = rank.s;
        let (e, k, h, ie) = (d.experts, d.top_k, d.h, d.inter_e);
        rank.launch(
            &rank.k.moe_dispatch_grouped,
            (1, 1),
            256,
            0,
            &[
                Arg::P(r.ids),
                Arg::I((r.rows * k) as i32),
                Arg::I(e as i32),
                Arg::I(k as i32),
                Arg::I(d.gather_cap as i32),
                Arg::P(s.etable + (8 * l * e) as u64),
                Arg::L((d.es * 2 * h * ie) as i64),
                Arg::U(s.xg),
                Arg::L((d.es * h) as i64),
                Arg::U(s.gu),
                Arg::L((4 * 2 * ie) as i64),
                Arg::U(s.eh),
                Arg::L((d.es * ie) as i64),
                Arg::U(s.eo),
                Arg::L((4 * h) as i64),
                Arg::P(s.gidx),
                Arg::P(s.cidx),
                Arg::P(s.ptrs),
                Arg::P(s.dinfo),
                Arg::P(s.active + 4 * l as u64),
                Arg::P(r.owner),
                Arg::I(r.me),
            ],
        )?;
        rank.fetch_info()
    }

    /// The host dispatch's second half: waits for the layout's size, then gathers the rows and
    /// runs two pointer-array batched GEMMs (tensor cores) over the active experts, padded to
    /// the busiest one. A layout too large for the gather buffers (possible only for an
    /// expert-parallel step's rows from several ranks) goes through the device dispatch instead.
    fn experts_grouped_finish(
        &self,
        rank: &Rank,
        l: usize,
        r: ExpertRows,
    ) -> Result<(), CudaError> {
        let d = self.dims;
        let (s, h, ie) = (rank.s, d.h, d.inter_e);
        let info = rank.wait_info()?;
        if info[2] != 0 {
            return Err(CudaError::Input(format!(
                "router produced an expert id outside 0..{}",
                d.experts
            )));
        }
        let (active, max_n) = (info[0].max(0) as usize, info[1].max(0) as usize);
        if active * max_n > d.gather_cap {
            if !moe_gemv_fits(h, ie, d.es) {
                return Err(CudaError::Input(
                    "expert dispatch exceeds the gather buffer".into(),
                ));
            }
            return self.experts_gemv(rank, l, r);
        }
        let rows = (active * max_n) as u32;
        rank.launch(
            &rank.k.gather_bf16,
            (rows, 1),
            256,
            0,
            &[Arg::P(r.x), Arg::I(h as i32), Arg::P(s.gidx), Arg::P(s.xg)],
        )?;
        let p = |i: usize| s.ptrs + (8 * i * active) as u64;
        rank.gemm_batched(p(0), p(1), p(2), 2 * ie, max_n, h, active)?;
        self.expert_silu(rank, rows as usize)?;
        rank.gemm_batched(p(3), p(4), p(5), h, max_n, ie, active)
    }

    /// Expert parallel: GPU `g` sends its experts' outputs to the ranks whose rows they are and
    /// records that it has.
    fn ep_return(&self, g: usize, l: usize, total: usize) -> Result<(), CudaError> {
        let d = self.dims;
        let gr = &self.ranks[g];
        let s = gr.s;
        gr.launch(
            &gr.k.ep_return,
            ((total * d.top_k) as u32, 1),
            128,
            0,
            &[
                Arg::P(gr.x.idin),
                Arg::I(d.experts as i32),
                Arg::P(s.eowner + (4 * l * d.experts) as u64),
                Arg::I(g as i32),
                Arg::P(s.cidx),
                Arg::P(s.eo),
                Arg::I(d.h as i32),
                Arg::I(d.top_k as i32),
                Arg::P(s.ep_offs),
                Arg::I(self.ranks.len() as i32),
                Arg::P(s.ep_rets),
            ],
        )?;
        gr.ev_ret
            .record(&gr.stream)
            .map_err(CudaError::driver("cuEventRecord"))
    }

    /// Expert parallel, layer `l`, on a rank with rows: waits for every GPU's outputs, then adds
    /// its rows' weighted expert outputs (ascending expert id, as on one GPU) and shared experts
    /// into the residual stream.
    fn ep_combine(&self, st: &mut Step) -> Result<(), CudaError> {
        let d = self.dims;
        let rank = &self.ranks[st.ri];
        rank.bind()?;
        for (g, gr) in self.ranks.iter().enumerate() {
            if g != st.ri {
                rank.stream
                    .wait(&gr.ev_ret)
                    .map_err(CudaError::driver("cuStreamWaitEvent"))?;
            }
        }
        let s = rank.s;
        let shared = if self.cfg.moe.n_shared_experts > 0 {
            s.y
        } else {
            0
        };
        rank.launch(
            &rank.k.combine,
            (st.rows as u32, 1),
            256,
            0,
            &[
                Arg::P(s.hidden),
                Arg::I(d.h as i32),
                Arg::I(d.top_k as i32),
                Arg::P(s.iota),
                Arg::P(s.wts),
                Arg::P(rank.x.ret),
                Arg::P(shared),
                Arg::I(d.h as i32),
            ],
        )?;
        st.clock.mark(&rank.stream, 3)
    }

    /// Runs one step: `per_rank[r]` on rank `r`; returns each rank's sampled rows' outputs, in
    /// order. With more than one rank, each rank's work is queued by a host thread of its own,
    /// so the GPUs run side by side and no rank waits for another's launches; expert parallel
    /// (see [`CudaRunner::set_expert_parallel`]) the threads meet twice per MoE layer, every GPU
    /// running its own experts for all the step's rows.
    fn step(&mut self, per_rank: &[Vec<Item>]) -> Result<Vec<Vec<RowOutput>>, CudaError> {
        let n = self.ranks.len();
        let mut steps = Vec::with_capacity(n);
        let etable = self.expert_table();
        for (ri, items) in per_rank.iter().enumerate() {
            steps.push(self.begin(ri, items, &etable)?);
        }
        let owners = if steps.iter().any(Option::is_some) {
            self.expert_owners()
        } else {
            None
        };
        // Expert parallel, every GPU computes (its experts, for every rank's rows).
        for (r, st) in steps.iter().enumerate() {
            if owners.is_some() || st.is_some() {
                self.upload_tables(r, &etable)?;
            }
        }
        let mut offs = vec![0i32; n + 1];
        for (r, st) in steps.iter().enumerate() {
            offs[r + 1] = offs[r] + st.as_ref().map_or(0, |s| s.rows) as i32;
        }
        if let Some(owners) = &owners {
            for g in 0..n {
                self.ep_tables(g, owners, &offs)?;
            }
        }
        let ep = owners.is_some();
        let from: Vec<usize> = (0..n).filter(|&r| steps[r].is_some()).collect();
        let sync = Lockstep::new(n);
        let this = &*self;
        let rank_step = |g: usize, st: Option<&mut Step>| -> Result<RankDone, CudaError> {
            if st.is_none() && !ep {
                return Ok(RankDone::default());
            }
            let mut st = st;
            this.layers(g, st.as_deref_mut(), ep, &offs, &from, &sync)?;
            let needs = st.as_ref().map_or(&[][..], |s| &s.needs[..]);
            let (out, expert_bytes) = this.collect(g, needs)?;
            let mut phases = [0.0; PHASES.len()];
            if let Some(st) = st {
                st.clock.mark(&this.ranks[g].stream, 4)?;
                phases = st.clock.acc;
            }
            Ok(RankDone {
                out,
                expert_bytes,
                phases,
            })
        };
        let done: Vec<Result<RankDone, CudaError>> = if n == 1 {
            vec![rank_step(0, steps[0].as_mut())]
        } else {
            std::thread::scope(|sc| {
                let handles: Vec<_> = steps
                    .iter_mut()
                    .enumerate()
                    .map(|(g, st)| sc.spawn(move || rank_step(g, st.as_mut())))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(CudaError::Input("a rank's host thread panicked".into()))
                        })
                    })
                    .collect()
            })
        };
        let mut outs = Vec::with_capacity(n);
        let mut bytes = 0;
        for d in done {
            let d = d?;
            for (a, c) in self.phases.iter_mut().zip(d.phases) {
                *a += c;
            }
            bytes += d.expert_bytes;
            outs.push(d.out);
        }
        self.last_expert_bytes = bytes;
        Ok(outs)
    }

    /// Rank `g`'s side of a step's layers and its end (see [`CudaRunner::step`]), on the rank's
    /// host thread; `st` is `None` when the rank has no rows (expert parallel, its GPU still runs
    /// its experts for the others). Expert parallel, the ranks' threads meet (`sync`, a
    /// [`Lockstep`]) twice per MoE layer: once every rank has pushed its rows (so a GPU's wait
    /// for them is queued after they were recorded), once every GPU has pushed its outputs
    /// back. After a failure on any rank a thread stops launching but still meets the others,
    /// so none is left waiting; the first error it saw is returned.
    #[allow(clippy::too_many_arguments)]
    fn layers(
        &self,
        g: usize,
        mut st: Option<&mut Step>,
        ep: bool,
        offs: &[i32],
        from: &[usize],
        sync: &Lockstep,
    ) -> Result<(), CudaError> {
        let total = offs[self.ranks.len()] as usize;
        let mut first = None;
        for l in 0..self.dims.layers {
            sync.run(&mut first, || {
                if let Some(st) = st.as_deref_mut() {
                    self.attention(st, l)?;
                    if self.ffn_in(st, l)? && !ep {
                        self.local_experts(st, l)?;
                    }
                }
                Ok(())
            });
            if !(ep && self.cfg.is_moe_layer(l)) {
                continue;
            }
            sync.run(&mut first, || match st.as_deref_mut() {
                Some(st) => self.ep_publish(st, l, offs[g] as usize),
                None => Ok(()),
            });
            sync.meet();
            sync.run(&mut first, || {
                if self.ep_experts(g, l, total, from)? {
                    self.ep_finish(g, l, total)?;
                }
                Ok(())
            });
            sync.meet();
            sync.run(&mut first, || match st.as_deref_mut() {
                Some(st) => self.ep_combine(st),
                None => Ok(()),
            });
        }
        sync.run(&mut first, || match st.as_deref() {
            Some(st) => self.finish(st),
            None => Ok(()),
        });
        first.map_or(Ok(()), Err)
    }

    /// Waits for rank `ri`'s part of the step and reads back what `needs` asks (see
    /// [`Rank::read_back`]); returns it and the bytes of routed experts the rank's GPU read.
    fn collect(&self, ri: usize, needs: &[Need]) -> Result<(Vec<RowOutput>, u64), CudaError> {
        let d = self.dims;
        let rank = &self.ranks[ri];
        rank.bind()?;
        let (out, active) = rank.read_back(needs, d.vocab, d.layers)?;
        let routed: u64 = active.iter().map(|&a| a.max(0) as u64).sum();
        Ok((out, routed * (3 * d.h * d.inter_e * d.es) as u64))
    }
}

impl Runner for CudaRunner {
    fn limits(&self) -> RequestLimits {
        RequestLimits {
            vocab_size: self.cfg.vocab_size,
            max_context: self.dims.max_context,
        }
    }

    fn kv_capacity_tokens(&self) -> usize {
        self.config.kv_blocks_per_rank * self.config.block_tokens
    }

    fn ranks(&self) -> Vec<RankId> {
        self.ranks.iter().map(|r| RankId(r.dev.0)).collect()
    }

    fn ledger(&mut self) -> &mut dyn KvLedger {
        &mut self.ledger
    }

    fn kv_usage(&self) -> Vec<RankKv> {
        self.ledger
            .ranks
            .iter()
            .map(|(rank, l)| RankKv {
                rank: *rank,
                used_blocks: l.total - l.free.len(),
                total_blocks: l.total,
            })
            .collect()
    }

    fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Vec<f32>>, RunError> {
        let sampled = work.iter().filter(|w| w.chunk.sample).count();
        self.run_sampled(work, &vec![Need::Logits; sampled])?
            .into_iter()
            .map(|row| match row {
                RowOutput::Logits(l) => Ok(l),
                RowOutput::Greedy(_) => Err(RunError("a logits row came back as a token".into())),
            })
            .collect()
    }

    fn run_sampled(
        &mut self,
        work: &[Work<'_>],
        needs: &[Need],
    ) -> Result<Vec<RowOutput>, RunError> {
        let err = |e: CudaError| RunError(e.to_string());
        let sampled = work.iter().filter(|w| w.chunk.sample).count();
        if needs.len() != sampled {
            return Err(RunError(format!(
                "{} needs given for {sampled} sampled work items",
                needs.len()
            )));
        }
        let mut needs = needs.iter();
        let mut per_rank: Vec<Vec<Item>> = vec![Vec::new(); self.ranks.len()];
        let mut order = Vec::new();
        for w in work {
            let c = w.chunk;
            let ri = self
                .rank_index(c.rank)
                .ok_or_else(|| RunError(format!("{} is not a rank of this runner", c.rank)))?;
            if w.tokens.len() != c.len || c.len == 0 {
                return Err(RunError(format!(
                    "{}: chunk of {} tokens came with {} token ids",
                    c.seq,
                    c.len,
                    w.tokens.len()
                )));
            }
            if c.start + c.len > self.dims.max_context {
                return Err(RunError(format!(
                    "{} reaches position {}, beyond max_context {}",
                    c.seq,
                    c.start + c.len,
                    self.dims.max_context
                )));
            }
            let blocks = self
                .ledger
                .rank(c.rank)
                .and_then(|l| l.tables.get(&c.seq))
                .cloned()
                .unwrap_or_default();
            if blocks.len() * self.config.block_tokens < c.start + c.len {
                return Err(RunError(format!("{} has no KV room", c.seq)));
            }
            let need = if c.sample {
                order.push(ri);
                needs.next().copied().unwrap_or(Need::Logits)
            } else {
                Need::Logits
            };
            per_rank[ri].push(Item {
                tokens: w.tokens.to_vec(),
                start: c.start,
                blocks,
                sample: c.sample,
                need,
            });
        }
        let mut outs: Vec<_> = self
            .step(&per_rank)
            .map_err(err)?
            .into_iter()
            .map(Vec::into_iter)
            .collect();
        order
            .into_iter()
            .map(|ri| {
                outs[ri]
                    .next()
                    .ok_or_else(|| RunError("missing output row".into()))
            })
            .collect()
    }
}

#[cfg(test)]
mod bi_tests {
    use super::*;
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
