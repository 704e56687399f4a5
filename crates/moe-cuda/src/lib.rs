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
//! - physical memory comes only from `hbm-vmm` (`Vmm<CudaBackend>` chunks);
//! - a kernel starts only through its typed launcher (`kernels/launch.rs`), whose parameter list
//!   a host test checks against the `.cu` source, and which refuses a null or misaligned pointer
//!   before the `unsafe` launch.
//!
//! Module layout, by layer (bottom to top; each module's `//!` doc says more):
//! - `error`: `CudaError` and the driver/cuBLAS status checks;
//! - `device`: the CUDA libraries and GPUs present (`device_count`, `hil_gpus`), `GpuMap`;
//! - `config`: `CudaConfig`, `Precision`, `check_config`;
//! - `memory`: device chunks (`DevBuf`), page-locked host staging (`PinnedHost`), a rank's
//!   sizes (`Dims`) and scratch layout (`Scratch`);
//! - `kernels`: the CUDA C sources (`kernels/model.cu`, `kernels/bi_mma.cu`), their NVRTC
//!   compilation and the kernels' launch shapes;
//! - `rank`: one rank's device state (stream, cuBLAS handle, kernels, weights, KV, scratch), how
//!   it is built, its host/device copies and launches;
//! - `gemm`: a rank's GEMMs (cuBLAS, or the batch-invariant kernels);
//! - `kv_ledger`: the per-rank KV block bookkeeping the engine's scheduler drives;
//! - `weights`: where each weight lives (expert chunks, tensor addresses) and how it is filled;
//! - `attention`: a layer's attention block (GQA, MLA);
//! - `experts`: the router, the dense and shared-expert MLP, the routed experts' three dispatch
//!   paths and the combine;
//! - `exchange`: the expert-parallel exchange between ranks;
//! - `step`: one forward step across the ranks (lock step per MoE layer), the LM head and
//!   read-back, phase timing;
//! - `runner`: `CudaRunner` (building it, settings, accessors) and its `moe_engine::Runner`
//!   implementation;
//! - `elastic`: scaling a live runner (`Blueprint`, `Snapshot`, `CudaWarmPool`, install);
//! - `scaler`: `CudaScaler`, the boundary-action driver of a scaling step.
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
//! [`Runner`](moe_engine::Runner) with device-resident state.
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
//! - **Sampling.** [`Runner::run_sampled`](moe_engine::Runner::run_sampled): rows whose request needs only the greedy token get
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

mod attention;
mod config;
mod device;
mod elastic;
mod error;
mod exchange;
mod experts;
mod gemm;
mod kernels;
mod kv_ledger;
mod memory;
mod rank;
mod runner;
mod scaler;
mod step;
mod weights;

pub use config::{check_config, CudaConfig, Precision};
pub use device::{device_count, hil_gpus, GpuMap};
pub use elastic::{
    check_disjoint, disjoint_devices, first_devices, peer_bandwidth, Blueprint, CudaTransport,
    CudaWarmPool, DeviceSetError, PrepareReport, Prepared, Retired, Snapshot, Staged, SwitchReport,
};
pub use error::CudaError;
pub use experts::{DEVICE_DISPATCH_MAX_ROWS, PADDED_DISPATCH_MAX_ROWS};
pub use runner::CudaRunner;
pub use scaler::{CudaScaler, ScaleOutcome};
pub use step::PHASES;
