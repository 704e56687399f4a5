//! Where each byte of a KV block lives.
//!
//! A block holds `block_tokens` consecutive tokens of one sequence, for **every** layer. Inside a block
//! the bytes are laid out layer-major, then token-major (the layout `moe-host`'s kernels read):
//! token `slot` of `layer` starts at `(layer * block_tokens + slot) * token_bytes`, and holds
//!
//! - **GQA** (K and V per KV head): `[K: kv_heads * head_dim][V: kv_heads * head_dim]`;
//! - **MLA** (DeepSeek-V2: the compressed latent `c_kv` and the decoupled rope key `k_pe`):
//!   `[latent: kv_lora_rank][rope key: qk_rope_head_dim]`.
//!
//! So one layer's slice of a block is contiguous, and so is one token's entry of one layer.
//! Blocks sit in a pool at a stride of [`KvLayout::block_stride`], which is
//! [`KvLayout::block_bytes`] rounded up to [`BLOCK_ALIGN`] bytes so that every block starts aligned
//! for vector loads.

use crate::error::LayoutError;

/// Every block starts at a multiple of this many bytes from its chunk's start.
pub const BLOCK_ALIGN: usize = 256;

/// Element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KvDtype {
    /// 32-bit float (the CPU reference backend).
    F32,
    /// bfloat16 (the CUDA backend).
    Bf16,
    /// IEEE half.
    F16,
}

impl KvDtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }
}

/// The attention family, with the per-token cache shape of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AttentionKind {
    /// Grouped-query (and plain multi-head) attention: a K and a V vector per KV head.
    Gqa {
        /// KV heads on this rank.
        kv_heads: usize,
        /// Elements per head.
        head_dim: usize,
    },
    /// Multi-head latent attention (DeepSeek-V2/V3): one compressed latent plus one shared rope key.
    Mla {
        /// Elements of the compressed latent `c_kv`.
        kv_lora_rank: usize,
        /// Elements of the decoupled rope key `k_pe`.
        qk_rope_head_dim: usize,
    },
}

/// Byte strides of a GQA block, for kernels that do their own index math.
///
/// Element `d` of head `h` of token `t` of layer `l` is at byte
/// `l * layer + t * token + h * head + d * elem` for K, plus `v` for V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GqaStrides {
    /// Bytes per layer (`block_tokens * token`).
    pub layer: usize,
    /// Bytes per token of one layer (K and V together).
    pub token: usize,
    /// Offset of the V half within a token's entry.
    pub v: usize,
    /// Bytes per head.
    pub head: usize,
    /// Bytes per element.
    pub elem: usize,
}

/// Byte strides of an MLA block.
///
/// The latent of token `t` of layer `l` starts at `l * layer + t * token`; its rope key starts `rope`
/// bytes later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaStrides {
    /// Bytes per layer (`block_tokens * token`).
    pub layer: usize,
    /// Bytes per token of one layer (latent plus rope key).
    pub token: usize,
    /// Offset of the rope key within a token's entry.
    pub rope: usize,
    /// Bytes per element.
    pub elem: usize,
}

/// Strides for either family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvStrides {
    /// See [`GqaStrides`].
    Gqa(GqaStrides),
    /// See [`MlaStrides`].
    Mla(MlaStrides),
}

/// The shape of a KV cache block. Built with [`KvLayout::gqa`] or [`KvLayout::mla`], which check every
/// dimension, so every offset method only has to check its own arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvLayout {
    layers: usize,
    attention: AttentionKind,
    dtype: KvDtype,
    block_tokens: usize,
    // Derived, cached.
    token_bytes: usize,
    layer_bytes: usize,
    block_bytes: usize,
    block_stride: usize,
}

impl KvLayout {
    /// A GQA layout: `layers` layers, `kv_heads` heads of `head_dim` elements for K and for V.
    pub fn gqa(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
        block_tokens: usize,
    ) -> Result<Self, LayoutError> {
        nonzero("kv_heads", kv_heads)?;
        nonzero("head_dim", head_dim)?;
        Self::build(
            layers,
            AttentionKind::Gqa { kv_heads, head_dim },
            dtype,
            block_tokens,
        )
    }

    /// An MLA layout: per layer and token, `kv_lora_rank` latent elements then `qk_rope_head_dim`
    /// rope-key elements.
    pub fn mla(
        layers: usize,
        kv_lora_rank: usize,
        qk_rope_head_dim: usize,
        dtype: KvDtype,
        block_tokens: usize,
    ) -> Result<Self, LayoutError> {
        nonzero("kv_lora_rank", kv_lora_rank)?;
        // A zero-width rope key is legal in principle (no decoupled rope), so only the latent must be
        // non-empty.
        Self::build(
            layers,
            AttentionKind::Mla {
                kv_lora_rank,
                qk_rope_head_dim,
            },
            dtype,
            block_tokens,
        )
    }

    fn build(
        layers: usize,
        attention: AttentionKind,
        dtype: KvDtype,
        block_tokens: usize,
    ) -> Result<Self, LayoutError> {
        nonzero("layers", layers)?;
        nonzero("block_tokens", block_tokens)?;
        let elem = dtype.size();
        let (token_bytes, layer_bytes) = match attention {
            AttentionKind::Gqa { kv_heads, head_dim } => {
                let token = kv_heads
                    .checked_mul(head_dim)
                    .and_then(|x| x.checked_mul(2 * elem))
                    .ok_or(LayoutError::TooLarge)?;
                (
                    token,
                    token
                        .checked_mul(block_tokens)
                        .ok_or(LayoutError::TooLarge)?,
                )
            }
            AttentionKind::Mla {
                kv_lora_rank,
                qk_rope_head_dim,
            } => {
                let token = kv_lora_rank
                    .checked_add(qk_rope_head_dim)
                    .and_then(|x| x.checked_mul(elem))
                    .ok_or(LayoutError::TooLarge)?;
                (
                    token,
                    token
                        .checked_mul(block_tokens)
                        .ok_or(LayoutError::TooLarge)?,
                )
            }
        };
        let block_bytes = layer_bytes
            .checked_mul(layers)
            .ok_or(LayoutError::TooLarge)?;
        let block_stride = block_bytes
            .checked_next_multiple_of(BLOCK_ALIGN)
            .filter(|s| *s <= isize::MAX as usize)
            .ok_or(LayoutError::TooLarge)?;
        Ok(Self {
            layers,
            attention,
            dtype,
            block_tokens,
            token_bytes,
            layer_bytes,
            block_bytes,
            block_stride,
        })
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// The attention family and its per-token shape.
    pub fn attention(&self) -> AttentionKind {
        self.attention
    }

    /// Element type.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// Bytes of cache per token over all layers (K and V together for GQA).
    pub fn bytes_per_token(&self) -> usize {
        self.block_bytes / self.block_tokens
    }

    /// Bytes of payload in one block.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Distance between two neighbouring blocks in a chunk: `block_bytes` rounded up to
    /// [`BLOCK_ALIGN`].
    pub fn block_stride(&self) -> usize {
        self.block_stride
    }

    /// Bytes of one layer's slice of a block (contiguous).
    pub fn layer_bytes(&self) -> usize {
        self.layer_bytes
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// How many whole blocks fit in a chunk of `chunk_bytes`.
    pub fn blocks_per_chunk(&self, chunk_bytes: usize) -> usize {
        // The last block needs only its payload, not the padding after it.
        if chunk_bytes < self.block_bytes {
            0
        } else {
            (chunk_bytes - self.block_bytes) / self.block_stride + 1
        }
    }

    /// Strides for kernels that do their own index math.
    pub fn strides(&self) -> KvStrides {
        let elem = self.dtype.size();
        match self.attention {
            AttentionKind::Gqa { head_dim, .. } => KvStrides::Gqa(GqaStrides {
                layer: self.layer_bytes,
                token: self.token_bytes,
                v: self.token_bytes / 2,
                head: head_dim * elem,
                elem,
            }),
            AttentionKind::Mla { kv_lora_rank, .. } => KvStrides::Mla(MlaStrides {
                layer: self.layer_bytes,
                token: self.token_bytes,
                rope: kv_lora_rank * elem,
                elem,
            }),
        }
    }

    /// Byte offset, within a block, of the K vector of `head` for token `slot` (`0..block_tokens`)
    /// of `layer`. The vector is `head_dim` elements long.
    pub fn k_offset(&self, layer: usize, slot: usize, head: usize) -> Result<usize, LayoutError> {
        self.gqa_offset(layer, slot, head, false)
    }

    /// Byte offset, within a block, of the V vector; see [`KvLayout::k_offset`].
    pub fn v_offset(&self, layer: usize, slot: usize, head: usize) -> Result<usize, LayoutError> {
        self.gqa_offset(layer, slot, head, true)
    }

    /// Byte offset, within a block, of the MLA latent (`kv_lora_rank` elements) of token `slot` of
    /// `layer`.
    pub fn latent_offset(&self, layer: usize, slot: usize) -> Result<usize, LayoutError> {
        self.mla_offset(layer, slot).map(|(off, _)| off)
    }

    /// Byte offset, within a block, of the MLA rope key (`qk_rope_head_dim` elements) of token `slot`
    /// of `layer`.
    pub fn rope_offset(&self, layer: usize, slot: usize) -> Result<usize, LayoutError> {
        self.mla_offset(layer, slot).map(|(off, rope)| off + rope)
    }

    fn token_base(&self, layer: usize, slot: usize) -> usize {
        (layer * self.block_tokens + slot) * self.token_bytes
    }

    /// Byte offset, within a block, of the entry of token `slot` (`0..block_tokens`) of `layer`:
    /// [`KvLayout::token_bytes`] bytes, `[K | V]` for GQA and `[latent | rope key]` for MLA.
    pub fn token_offset(&self, layer: usize, slot: usize) -> Result<usize, LayoutError> {
        self.check("layer", layer, self.layers)?;
        self.check("slot", slot, self.block_tokens)?;
        Ok(self.token_base(layer, slot))
    }

    /// Bytes of one token's entry for one layer.
    pub fn token_bytes(&self) -> usize {
        self.token_bytes
    }

    fn check(&self, what: &'static str, index: usize, limit: usize) -> Result<(), LayoutError> {
        if index < limit {
            Ok(())
        } else {
            Err(LayoutError::OutOfRange { what, index, limit })
        }
    }

    fn gqa_offset(
        &self,
        layer: usize,
        slot: usize,
        head: usize,
        v: bool,
    ) -> Result<usize, LayoutError> {
        let AttentionKind::Gqa { kv_heads, head_dim } = self.attention else {
            return Err(LayoutError::WrongFamily {
                wanted: "GQA",
                layout: "MLA",
            });
        };
        self.check("layer", layer, self.layers)?;
        self.check("slot", slot, self.block_tokens)?;
        self.check("head", head, kv_heads)?;
        let half = if v { self.token_bytes / 2 } else { 0 };
        Ok(self.token_base(layer, slot) + half + head * head_dim * self.dtype.size())
    }

    fn mla_offset(&self, layer: usize, slot: usize) -> Result<(usize, usize), LayoutError> {
        let KvStrides::Mla(s) = self.strides() else {
            return Err(LayoutError::WrongFamily {
                wanted: "MLA",
                layout: "GQA",
            });
        };
        self.check("layer", layer, self.layers)?;
        self.check("slot", slot, self.block_tokens)?;
        Ok((self.token_base(layer, slot), s.rope))
    }
}

fn nonzero(what: &'static str, v: usize) -> Result<(), LayoutError> {
    if v == 0 {
        Err(LayoutError::Zero(what))
    } else {
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn gqa_sizes_match_the_shape() {
        // Qwen3-30B-A3B on one rank: 48 layers, 4 KV heads of 128, bf16, 16-token blocks.
        let l = KvLayout::gqa(48, 4, 128, KvDtype::Bf16, 16).unwrap();
        assert_eq!(l.bytes_per_token(), 48 * 2 * 4 * 128 * 2);
        assert_eq!(l.token_bytes(), 2 * 4 * 128 * 2);
        assert_eq!(l.block_bytes(), 16 * 48 * 2 * 4 * 128 * 2);
        assert_eq!(l.layer_bytes(), 2 * 16 * 4 * 128 * 2);
        assert_eq!(l.block_stride() % BLOCK_ALIGN, 0);
        assert_eq!(l.k_offset(0, 0, 0).unwrap(), 0);
        assert_eq!(l.v_offset(0, 0, 0).unwrap(), 4 * 128 * 2);
        assert_eq!(l.k_offset(1, 0, 0).unwrap(), l.layer_bytes());
        assert_eq!(l.k_offset(0, 1, 0).unwrap(), l.token_bytes());
        assert_eq!(l.k_offset(0, 0, 3).unwrap(), 3 * 128 * 2);
        assert_eq!(
            l.v_offset(2, 5, 1).unwrap(),
            l.token_offset(2, 5).unwrap() + (4 + 1) * 128 * 2
        );
        let KvStrides::Gqa(s) = l.strides() else {
            panic!("GQA layout")
        };
        assert_eq!(
            l.v_offset(3, 7, 2).unwrap(),
            3 * s.layer + 7 * s.token + s.v + 2 * s.head
        );
    }

    #[test]
    fn mla_sizes_match_deepseek_v2_lite() {
        // DeepSeek-V2-Lite: 27 layers, kv_lora_rank 512, rope head dim 64.
        let l = KvLayout::mla(27, 512, 64, KvDtype::Bf16, 64).unwrap();
        assert_eq!(l.bytes_per_token(), 27 * 576 * 2);
        assert_eq!(l.latent_offset(0, 1).unwrap(), 576 * 2);
        assert_eq!(l.rope_offset(0, 0).unwrap(), 512 * 2);
        assert_eq!(l.latent_offset(2, 0).unwrap(), 2 * 64 * 576 * 2);
        let KvStrides::Mla(s) = l.strides() else {
            panic!("MLA layout")
        };
        assert_eq!(
            l.rope_offset(4, 9).unwrap(),
            4 * s.layer + 9 * s.token + s.rope
        );
        assert_eq!(
            l.k_offset(0, 0, 0),
            Err(LayoutError::WrongFamily {
                wanted: "GQA",
                layout: "MLA"
            })
        );
    }

    #[test]
    fn bad_shapes_and_indices_are_typed_errors() {
        assert_eq!(
            KvLayout::gqa(0, 1, 1, KvDtype::F32, 1),
            Err(LayoutError::Zero("layers"))
        );
        assert_eq!(
            KvLayout::gqa(1, 0, 1, KvDtype::F32, 1),
            Err(LayoutError::Zero("kv_heads"))
        );
        assert_eq!(
            KvLayout::mla(1, 8, 0, KvDtype::F32, 0),
            Err(LayoutError::Zero("block_tokens"))
        );
        assert_eq!(
            KvLayout::gqa(usize::MAX / 2, 4, 4, KvDtype::F32, 4),
            Err(LayoutError::TooLarge)
        );
        let l = KvLayout::gqa(2, 2, 8, KvDtype::F32, 4).unwrap();
        assert_eq!(
            l.k_offset(0, 4, 0),
            Err(LayoutError::OutOfRange {
                what: "slot",
                index: 4,
                limit: 4
            })
        );
        assert_eq!(
            l.v_offset(2, 0, 0),
            Err(LayoutError::OutOfRange {
                what: "layer",
                index: 2,
                limit: 2
            })
        );
        assert!(l.latent_offset(0, 0).is_err());
    }

    #[test]
    fn blocks_per_chunk_uses_the_stride_but_not_the_last_padding() {
        let l = KvLayout::gqa(1, 1, 10, KvDtype::F32, 1).unwrap(); // 80 bytes, stride 256
        assert_eq!(l.block_bytes(), 80);
        assert_eq!(l.block_stride(), 256);
        assert_eq!(l.blocks_per_chunk(79), 0);
        assert_eq!(l.blocks_per_chunk(80), 1);
        assert_eq!(l.blocks_per_chunk(256 + 79), 1);
        assert_eq!(l.blocks_per_chunk(256 + 80), 2);
        assert_eq!(l.blocks_for(0), 0);
        assert_eq!(l.blocks_for(1), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every element of every token of every layer has its own bytes, and all of them fit in
        /// the block: the offsets tile the block exactly.
        #[test]
        fn offsets_tile_the_block(
            layers in 1usize..4, heads in 1usize..4, dim in 1usize..6, tokens in 1usize..5,
            mla in any::<bool>(), wide in any::<bool>(),
        ) {
            let dtype = if wide { KvDtype::F32 } else { KvDtype::Bf16 };
            let e = dtype.size();
            let mut seen = BTreeSet::new();
            let l = if mla {
                let l = KvLayout::mla(layers, dim, heads, dtype, tokens).unwrap();
                for layer in 0..layers {
                    for t in 0..tokens {
                        let a = l.latent_offset(layer, t).unwrap();
                        let r = l.rope_offset(layer, t).unwrap();
                        for i in 0..dim { prop_assert!(seen.insert(a + i * e)); }
                        for i in 0..heads { prop_assert!(seen.insert(r + i * e)); }
                    }
                }
                l
            } else {
                let l = KvLayout::gqa(layers, heads, dim, dtype, tokens).unwrap();
                for layer in 0..layers {
                    for t in 0..tokens {
                        for h in 0..heads {
                            let k = l.k_offset(layer, t, h).unwrap();
                            let v = l.v_offset(layer, t, h).unwrap();
                            for i in 0..dim {
                                prop_assert!(seen.insert(k + i * e));
                                prop_assert!(seen.insert(v + i * e));
                            }
                        }
                    }
                }
                l
            };
            prop_assert_eq!(seen.len() * e, l.block_bytes());
            prop_assert_eq!(*seen.iter().next_back().unwrap() + e, l.block_bytes());
        }
    }
}
