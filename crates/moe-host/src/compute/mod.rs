//! The per-device kernels of a MoE forward pass, behind the [`Compute`] trait.
//!
//! A backend implements embedding, RMS norm, rotary embeddings (plain or yarn), attention over paged
//! KV blocks (GQA, and DeepSeek's MLA), router top-k, the SwiGLU feed-forward used by routed experts,
//! shared experts and dense MLPs, the fixed-order combine of expert outputs, and the LM head.
//! [`cpu::CpuCompute`] is the reference every other backend is checked against.
//!
//! Data is plain `f32` row-major: a batch of `rows` vectors of width `w` is a slice of `rows * w`
//! elements. Weight matrices use the Hugging Face `nn.Linear` layout `[out_features, in_features]`.
//!
//! # The invariance contract
//!
//! Every kernel computes each output row from its own input row (and, for attention, its own
//! sequence's KV blocks) with a reduction order that depends only on the tensor shapes, never on how
//! many rows are in the batch or where they sit in it. [`Compute::combine`] adds expert outputs in
//! ascending expert id, whatever device produced them. A sequence's logits are therefore bitwise
//! identical whatever else is batched with it and wherever its experts live.
//!
//! # The paged KV layout
//!
//! A KV block holds `block_tokens` tokens for every layer, layer-major then token-major
//! ([`KvGeometry::token_offset`]). Per token, GQA stores `[K: kv_heads*head_dim][V: kv_heads*head_dim]`
//! and MLA stores `[latent: kv_lora_rank (after kv_a_layernorm)][rope key: qk_rope_head_dim (after
//! rope)]`. Kernels reach blocks through [`KvBlocks`], so the engine can back them by any pool.
//!
//! # Activation precision: the CUDA runner's bf16 contract on the CPU
//!
//! The CUDA runner's serving mode (`moe_cuda::Precision::Bf16`) rounds activations to bf16
//! (round-to-nearest-even) exactly where they become inputs of its cuBLAS GEMMs, and keeps
//! everything else in `f32`. [`cpu::CpuCompute`] follows the same contract when built with
//! [`ActPrecision::Bf16Gemm`] (the default, [`ActPrecision::F32`], rounds nothing). The rounding
//! points, each applied with [`round_bf16`] (bit-identical to the CUDA kernels' `f2b`):
//!
//! | where (CPU kernel) | value rounded | on the GPU |
//! |---|---|---|
//! | [`Compute::linear`] | every input row `x` | the bf16 `x` of `cublasGemmEx`: normed hidden into Q/K/V, `q_proj`, `q_a_proj`, `kv_a_proj`; normed `q_a` into `q_b_proj`; the attention output (GQA, or MLA after the value expansion) into `o_proj` |
//! | [`Compute::lm_head`] (default: `linear`) | final-normed rows | `lastb` into the LM head GEMM |
//! | [`Compute::swiglu`] | input rows `x`, and `silu(gate x) * up x` before `down` | `xb`/`xg` into gate/up, `silu_mul`'s bf16 output into down (routed experts, shared experts, dense MLP) |
//! | [`Compute::attention_mla`] | the non-rotary query before the absorb product, the latent attention output before the value expansion | `cast_bf16(q)` into the strided absorb GEMM; `attn_mla`'s bf16 `olat` into the expand GEMM |
//!
//! Not rounded, in either mode: weights (the caller supplies the values it wants; the GPU tests
//! load bf16-rounded weights on both sides), the residual stream, every norm's statistics,
//! rope, Q/K norms, attention scores and softmax, the rotary query part, the KV cache,
//! [`Compute::router_logits`] (an `f32` dot product from the `f32` normed rows, the GPU's
//! `linear_f32` kernel), routing weights, combine and the logits. Products of two bf16 values
//! are exact in `f32` and both sides accumulate in `f32`, so with the same contract the only
//! difference left between the GPU and the CPU is `f32` summation order.
//!
//! Architecture invariant: the CPU `Bf16Gemm` mode rounds at exactly the CUDA `Bf16` points
//! listed above, no more and no fewer. A change to where the CUDA runner stores an activation as
//! bf16 must change this table and [`cpu::CpuCompute`] with it; `moe-cuda`'s
//! `tests/gpu_runtime.rs` checks the pair on the GPU machine.
//!
//! Architecture invariant: kernels never allocate device memory that outlives a call and never see
//! requests, devices or placements; they see rows, weights and KV blocks.
//!
//! ```
//! use moe_host::compute::{cpu::CpuCompute, Compute};
//! let cpu = CpuCompute::new();
//! // y = x W^T for one row x = [1, 2] and W = [[1, 0], [1, 1], [0, 2]] ([out=3, in=2]).
//! let mut y = [0.0f32; 3];
//! cpu.linear(&[1.0, 2.0], &[1.0, 0.0, 1.0, 1.0, 0.0, 2.0], 2, 3, &mut y).unwrap();
//! assert_eq!(y, [1.0, 3.0, 4.0]);
//! ```

pub mod cpu;

mod rope;

pub use moe_model::spec::{
    GqaDims, GroupLimit, KvGeometry, KvKind, MlaDims, RopeStyle, RouterSpec,
};
pub use rope::{Rope, YarnParams};

use std::fmt;

/// Which activations a backend rounds to bf16 (see the module docs for the exact points).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ActPrecision {
    /// Every activation stays `f32` (the reference arithmetic; the CUDA runner's `F32` mode).
    #[default]
    F32,
    /// Activations are rounded to bf16 (round-to-nearest-even) where they enter a GEMM, and only
    /// there: the CUDA runner's serving (`Bf16`) mode.
    Bf16Gemm,
}

impl ActPrecision {
    /// A short name for logs and reports (`"f32"`, `"bf16-gemm"`).
    pub fn name(self) -> &'static str {
        match self {
            ActPrecision::F32 => "f32",
            ActPrecision::Bf16Gemm => "bf16-gemm",
        }
    }
}

impl fmt::Display for ActPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `x` rounded to the nearest bf16 value (ties to even), returned as `f32`.
///
/// Bit-identical to the CUDA kernels' `f2b`: finite values that round past the largest bf16
/// become infinities, infinities stay, and every NaN becomes the canonical quiet NaN
/// `0x7fc0_0000`.
///
/// ```
/// use moe_host::compute::round_bf16;
/// // 1 + 2^-8 is halfway between the bf16 neighbours 1 and 1 + 2^-7: ties go to the even one.
/// assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
/// assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
/// ```
pub fn round_bf16(x: f32) -> f32 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return f32::from_bits(0x7fc0_0000);
    }
    // Add just under half an ulp of bf16, plus one when the kept part is odd, then truncate. No
    // finite input wraps: the largest magnitude, -inf, is 0xff80_0000.
    let u = u + 0x7fff + ((u >> 16) & 1);
    f32::from_bits(u & 0xffff_0000)
}

/// Why a kernel refused its inputs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ComputeError {
    /// A buffer does not have the length the dimensions call for.
    #[error("{what}: expected {expected} elements, got {got}")]
    Shape {
        /// Which argument.
        what: &'static str,
        /// The length the dimensions call for.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A dimension is zero or inconsistent with another one.
    #[error("bad dimensions: {0}")]
    Dims(&'static str),
    /// A token id is not a row of the embedding table.
    #[error("token id {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange {
        /// The token id.
        token: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A block id that the KV store does not hold.
    #[error("KV block {block} does not exist in this store ({blocks} blocks)")]
    NoSuchBlock {
        /// The block id asked for.
        block: u32,
        /// How many blocks the store holds.
        blocks: usize,
    },
    /// A sequence's block list is too short for the positions it is asked to hold.
    #[error(
        "position {position} needs {needed} KV blocks but the sequence has only {have}; \
         append blocks before running the step"
    )]
    KvTooShort {
        /// The position that does not fit.
        position: usize,
        /// Blocks needed.
        needed: usize,
        /// Blocks given.
        have: usize,
    },
    /// A layer index beyond the KV geometry's layer count.
    #[error("layer {layer} is outside the KV geometry ({layers} layers)")]
    NoSuchLayer {
        /// The layer asked for.
        layer: usize,
        /// Layers in the geometry.
        layers: usize,
    },
    /// The router configuration cannot be satisfied.
    #[error("router: {0}")]
    Router(&'static str),
    /// Expert outputs handed to combine are not in strictly ascending expert order.
    #[error("combine: expert ids must be strictly ascending, got {prev} then {next}")]
    CombineOrder {
        /// The earlier id.
        prev: u32,
        /// The id that followed it.
        next: u32,
    },
    /// The KV geometry does not match the attention kind asked for (GQA vs MLA).
    #[error("KV geometry is {have}, but the kernel needs {want}")]
    WrongKvKind {
        /// The geometry's kind.
        have: &'static str,
        /// The kernel's kind.
        want: &'static str,
    },
}

/// Access to KV blocks by id, each exactly [`KvGeometry::block_floats`] elements long.
///
/// The engine implements this over its block pool; [`VecKvBlocks`] is a plain in-memory store.
pub trait KvBlocks {
    /// Block `id`, for reading.
    fn block(&self, id: u32) -> Result<&[f32], ComputeError>;
    /// Block `id`, for writing.
    fn block_mut(&mut self, id: u32) -> Result<&mut [f32], ComputeError>;
}

/// A KV store of owned vectors, one per block (tests, benchmarks and single-device runs).
#[derive(Debug, Clone, Default)]
pub struct VecKvBlocks {
    blocks: Vec<Vec<f32>>,
    block_floats: usize,
    free: Vec<u32>,
}

impl VecKvBlocks {
    /// An empty store for blocks of `block_floats` elements.
    pub fn new(block_floats: usize) -> Self {
        Self {
            blocks: Vec::new(),
            block_floats,
            free: Vec::new(),
        }
    }

    /// A zeroed block's id (reusing freed ones, lowest first).
    pub fn alloc(&mut self) -> u32 {
        if let Some(id) = self.free.pop() {
            self.blocks[id as usize].fill(0.0);
            return id;
        }
        self.blocks.push(vec![0.0; self.block_floats]);
        (self.blocks.len() - 1) as u32
    }

    /// Returns a block for reuse.
    pub fn release(&mut self, id: u32) {
        if (id as usize) < self.blocks.len() && !self.free.contains(&id) {
            self.free.push(id);
            self.free.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    /// Blocks ever allocated (live and free).
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// True when no block was ever allocated.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

impl KvBlocks for VecKvBlocks {
    fn block(&self, id: u32) -> Result<&[f32], ComputeError> {
        self.blocks
            .get(id as usize)
            .map(Vec::as_slice)
            .ok_or(ComputeError::NoSuchBlock {
                block: id,
                blocks: self.blocks.len(),
            })
    }

    fn block_mut(&mut self, id: u32) -> Result<&mut [f32], ComputeError> {
        let blocks = self.blocks.len();
        self.blocks
            .get_mut(id as usize)
            .map(Vec::as_mut_slice)
            .ok_or(ComputeError::NoSuchBlock { block: id, blocks })
    }
}

/// One sequence's share of an attention batch: its new tokens are rows `[row, row+len)` of the
/// batch's query buffer, at positions `[start, start+len)`; `blocks` is its block table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan<'a> {
    /// The sequence's KV blocks, in position order.
    pub blocks: &'a [u32],
    /// Position of the first new token (tokens already in the cache).
    pub start: usize,
    /// Number of new tokens.
    pub len: usize,
}

/// The KV side of one attention call: which layer, and the sequences whose new tokens are the
/// batch's rows (in order).
#[derive(Debug, Clone, Copy)]
pub struct AttnBatch<'a> {
    /// The block layout.
    pub geo: &'a KvGeometry,
    /// The decoder layer.
    pub layer: usize,
    /// The sequences, in row order.
    pub seqs: &'a [SeqSpan<'a>],
}

impl AttnBatch<'_> {
    /// Total new tokens (rows).
    pub fn rows(&self) -> usize {
        span_rows(self.seqs)
    }
}

/// Where rotary embedding applies inside a batch of rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeSite {
    /// Elements per row.
    pub row_width: usize,
    /// Heads per row.
    pub heads: usize,
    /// Elements per head.
    pub head_stride: usize,
    /// Offset of the rotary part inside a head (the rotary width is the [`Rope`]'s dimension).
    pub offset: usize,
}

/// One routed expert of a token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertChoice {
    /// The expert id within its layer.
    pub expert: u32,
    /// Its combine weight.
    pub weight: f32,
}

/// A token's routing: its experts in ascending id order.
pub type TokenRoute = Vec<ExpertChoice>;

/// Weights of a SwiGLU feed-forward: `down(silu(gate x) * up x)`.
#[derive(Debug, Clone, Copy)]
pub struct FfnWeights<'a> {
    /// `[inter, hidden]`.
    pub gate: &'a [f32],
    /// `[inter, hidden]`.
    pub up: &'a [f32],
    /// `[hidden, inter]`.
    pub down: &'a [f32],
    /// Model width.
    pub hidden: usize,
    /// Intermediate width.
    pub inter: usize,
}

impl FfnWeights<'_> {
    fn check(&self) -> Result<(), ComputeError> {
        let n = self.hidden * self.inter;
        if n == 0 {
            return Err(ComputeError::Dims("feed-forward with zero width"));
        }
        for (what, w) in [
            ("ffn gate", self.gate),
            ("ffn up", self.up),
            ("ffn down", self.down),
        ] {
            if w.len() != n {
                return Err(ComputeError::Shape {
                    what,
                    expected: n,
                    got: w.len(),
                });
            }
        }
        Ok(())
    }
}

/// One expert's contribution to a token, for [`Compute::combine`].
#[derive(Debug, Clone, Copy)]
pub struct ExpertOutput<'a> {
    /// The expert id (combine order).
    pub expert: u32,
    /// The routing weight.
    pub weight: f32,
    /// The expert's unweighted output row.
    pub row: &'a [f32],
}

/// The per-device kernels. See the module docs for layouts and the invariance contract.
pub trait Compute: Send + Sync + fmt::Debug {
    /// A short backend name for logs and reports.
    fn name(&self) -> &'static str;

    /// `out[t] = table[tokens[t]]`; `table` is `[vocab, hidden]`.
    fn embed(
        &self,
        table: &[f32],
        hidden: usize,
        tokens: &[u32],
        out: &mut [f32],
    ) -> Result<(), ComputeError>;

    /// RMS norm of each row of `x` (width `weight.len()`): `x / sqrt(mean(x^2) + eps) * weight`.
    fn rms_norm(
        &self,
        x: &[f32],
        weight: &[f32],
        eps: f32,
        out: &mut [f32],
    ) -> Result<(), ComputeError>;

    /// RMS norm applied in place to every `weight.len()`-wide segment of `x` (per-head norms).
    fn rms_norm_in_place(
        &self,
        x: &mut [f32],
        weight: &[f32],
        eps: f32,
    ) -> Result<(), ComputeError>;

    /// `out[m] = W x[m]` for every row; `w` is `[out_features, in_features]`.
    fn linear(
        &self,
        x: &[f32],
        w: &[f32],
        in_features: usize,
        out_features: usize,
        out: &mut [f32],
    ) -> Result<(), ComputeError>;

    /// `acc += x`, elementwise.
    fn add(&self, acc: &mut [f32], x: &[f32]) -> Result<(), ComputeError>;

    /// Rotary embedding in place; row `r` of `x` is at position `positions[r]`.
    fn rope(
        &self,
        rope: &Rope,
        site: RopeSite,
        x: &mut [f32],
        positions: &[usize],
    ) -> Result<(), ComputeError>;

    /// Writes the GQA keys and values of the batch's new tokens into their blocks.
    /// `k` and `v` have one `kv_heads*head_dim` row per new token, sequences in `seqs` order.
    fn kv_append_gqa(
        &self,
        batch: AttnBatch<'_>,
        store: &mut dyn KvBlocks,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), ComputeError>;

    /// Causal GQA attention of the new tokens over everything in their sequence's cache up to and
    /// including themselves (call [`Compute::kv_append_gqa`] first). `q` and `out` have one
    /// `heads*head_dim` row per new token.
    fn attention_gqa(
        &self,
        batch: AttnBatch<'_>,
        store: &dyn KvBlocks,
        dims: GqaDims,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), ComputeError>;

    /// Writes MLA latents (after `kv_a_layernorm`) and rotary keys (after rope) into their blocks.
    fn kv_append_mla(
        &self,
        batch: AttnBatch<'_>,
        store: &mut dyn KvBlocks,
        latent: &[f32],
        k_rope: &[f32],
    ) -> Result<(), ComputeError>;

    /// Causal MLA attention, computed in the absorbed form: each head's non-rotary query is folded
    /// through the key half of `kv_b` (`[heads*(qk_nope+v_head), kv_lora_rank]`) into latent space,
    /// attention runs over the cached latents, and the result is expanded through the value half.
    /// `q` has one `heads*(qk_nope+qk_rope)` row per new token (rope already applied to the rotary
    /// part); `out` has one `heads*v_head` row per token.
    fn attention_mla(
        &self,
        batch: AttnBatch<'_>,
        store: &dyn KvBlocks,
        dims: MlaDims,
        kv_b: &[f32],
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), ComputeError>;

    /// Router top-k from router logits (`[rows, experts]`). Each token's choices come back in
    /// ascending expert id. Ties in score go to the lower id.
    fn route(&self, logits: &[f32], spec: &RouterSpec) -> Result<Vec<TokenRoute>, ComputeError>;

    /// SwiGLU feed-forward of every row: `down(silu(gate x) * up x)`.
    fn swiglu(&self, w: &FfnWeights<'_>, x: &[f32], out: &mut [f32]) -> Result<(), ComputeError>;

    /// One token's MoE output added to its residual:
    /// `residual += (sum_e weight_e * row_e [ascending e]) + shared`.
    fn combine(
        &self,
        parts: &[ExpertOutput<'_>],
        shared: Option<&[f32]>,
        residual: &mut [f32],
    ) -> Result<(), ComputeError>;

    /// Router logits of every row (`router` is `[experts, hidden]`): a plain `f32` product in
    /// every [`ActPrecision`], never rounded (the GPU computes them with an `f32` kernel, not a
    /// bf16 GEMM). The default is [`Compute::linear`], right for backends that never round.
    fn router_logits(
        &self,
        x: &[f32],
        router: &[f32],
        hidden: usize,
        experts: usize,
        out: &mut [f32],
    ) -> Result<(), ComputeError> {
        self.linear(x, router, hidden, experts, out)
    }

    /// Logits of every row: `lm_head` is `[vocab, hidden]`.
    fn lm_head(
        &self,
        x: &[f32],
        lm_head: &[f32],
        hidden: usize,
        vocab: usize,
        out: &mut [f32],
    ) -> Result<(), ComputeError> {
        self.linear(x, lm_head, hidden, vocab, out)
    }
}

/// Checks that `got == expected`, naming the argument otherwise.
/// Checks that `geo` is usable and has `layer` (what every attention kernel checks first).
pub(crate) fn check_geometry(geo: &KvGeometry, layer: usize) -> Result<(), ComputeError> {
    if geo.block_tokens == 0 || geo.token_floats() == 0 {
        return Err(ComputeError::Dims(
            "KV geometry with zero block tokens or zero width",
        ));
    }
    if layer >= geo.layers {
        return Err(ComputeError::NoSuchLayer {
            layer,
            layers: geo.layers,
        });
    }
    Ok(())
}

pub(crate) fn check_len(
    what: &'static str,
    expected: usize,
    got: usize,
) -> Result<(), ComputeError> {
    if expected == got {
        Ok(())
    } else {
        Err(ComputeError::Shape {
            what,
            expected,
            got,
        })
    }
}

/// Total new tokens of a batch of sequences.
pub(crate) fn span_rows(seqs: &[SeqSpan<'_>]) -> usize {
    seqs.iter().map(|s| s.len).sum()
}
