//! The neutral model spec: the compute-free shapes that every backend reads from a config.
//!
//! These are plain descriptions (attention dimensions, the router's top-k rule, the paged KV
//! block geometry, the rope style); the kernels that use them live in the backends
//! (`moe-host`'s `compute` for the CPU reference, `moe-cuda` for GPUs).
//!
//! # The paged KV layout
//!
//! A KV block holds `block_tokens` tokens for every layer, layer-major then token-major
//! ([`KvGeometry::token_offset`]). Per token, GQA stores
//! `[K: kv_heads*head_dim][V: kv_heads*head_dim]` and MLA stores
//! `[latent: kv_lora_rank (after kv_a_layernorm)][rope key: qk_rope_head_dim (after rope)]`.
//! `kv-pool`'s `KvLayout` lays its blocks out the same way.
//!
//! ```
//! use moe_model::spec::{KvGeometry, KvKind};
//! let geo = KvGeometry {
//!     layers: 2,
//!     block_tokens: 16,
//!     kind: KvKind::Gqa { kv_heads: 4, head_dim: 8 },
//! };
//! assert_eq!(geo.token_floats(), 2 * 4 * 8); // [K | V]
//! assert_eq!(geo.blocks_for(17), 2);
//! ```

/// Which elements of a head rotate together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(i, i + dim/2)`: transformers' `rotate_half` (Llama, Qwen, Mixtral).
    Halves,
    /// Pairs `(2i, 2i+1)`: DeepSeek-V2's layout (its reference code de-interleaves, then rotates
    /// halves; attention scores are the same as rotating adjacent pairs in place, which is what we do).
    Interleaved,
}

/// What a KV token holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvKind {
    /// Grouped-query attention: `[K: kv_heads*head_dim][V: kv_heads*head_dim]`.
    Gqa {
        /// KV heads.
        kv_heads: usize,
        /// Width of one head.
        head_dim: usize,
    },
    /// Multi-head latent attention: `[latent: kv_lora_rank][rope key: rope_dim]`.
    Mla {
        /// Width of the compressed latent.
        kv_lora_rank: usize,
        /// Width of the shared rotary key.
        rope_dim: usize,
    },
}

impl KvKind {
    /// `"GQA"` or `"MLA"`, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            KvKind::Gqa { .. } => "GQA",
            KvKind::Mla { .. } => "MLA",
        }
    }
}

/// The geometry of paged KV blocks (the agreed layout, see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    /// Layers with attention (every decoder layer).
    pub layers: usize,
    /// Tokens per block.
    pub block_tokens: usize,
    /// What one token holds.
    pub kind: KvKind,
}

impl KvGeometry {
    /// `f32` elements per token per layer.
    pub fn token_floats(&self) -> usize {
        match self.kind {
            KvKind::Gqa { kv_heads, head_dim } => 2 * kv_heads * head_dim,
            KvKind::Mla {
                kv_lora_rank,
                rope_dim,
            } => kv_lora_rank + rope_dim,
        }
    }

    /// `f32` elements per block.
    pub fn block_floats(&self) -> usize {
        self.layers * self.block_tokens * self.token_floats()
    }

    /// Offset (in `f32` elements) of a token's entry for `layer` at `slot` inside its block.
    pub fn token_offset(&self, layer: usize, slot: usize) -> usize {
        (layer * self.block_tokens + slot) * self.token_floats()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }
}

/// The attention dimensions of a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttnDims {
    /// Grouped-query attention.
    Gqa(GqaDims),
    /// Multi-head latent attention.
    Mla(MlaDims),
}

/// Dimensions of grouped-query attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GqaDims {
    /// Query heads.
    pub heads: usize,
    /// KV heads (`heads` is a multiple of it).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Softmax scale (usually `head_dim^-0.5`).
    pub scale: f32,
}

/// Dimensions of DeepSeek's multi-head latent attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaDims {
    /// Query heads.
    pub heads: usize,
    /// Non-rotary part of a query/key head.
    pub qk_nope: usize,
    /// Rotary part of a query/key head.
    pub qk_rope: usize,
    /// Width of a value head.
    pub v_head: usize,
    /// Width of the compressed KV latent.
    pub kv_lora_rank: usize,
    /// Softmax scale (`(qk_nope+qk_rope)^-0.5`, times yarn's mscale squared when configured).
    pub scale: f32,
}

/// Group-limited routing (DeepSeek's `group_limited_greedy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimit {
    /// Groups the experts are split into (evenly, in id order).
    pub n_group: usize,
    /// Groups a token may route into.
    pub topk_group: usize,
}

/// How router logits become expert choices: softmax over all experts, optionally restricted to the
/// best groups, top-k, then either renormalised to sum to one or multiplied by a scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterSpec {
    /// Routed experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Group limit, if any.
    pub groups: Option<GroupLimit>,
    /// Renormalise the chosen weights to sum to one.
    pub normalize: bool,
    /// Multiply the chosen weights by this (used when not normalising; 1.0 for no scaling).
    pub scale: f32,
}
