//! The CPU reference backend: plain `f32` loops with a fixed reduction order.
//!
//! Every reduction goes through [`dot`], whose order depends only on the vector length (eight
//! interleaved partial sums, folded in a fixed tree, then the tail). Rust never contracts `a*b+c`
//! into a fused multiply-add on its own, so results are the same on every x86-64 or aarch64 CPU.
//! Rows never influence each other, so results do not depend on the batch.
//!
//! [`CpuCompute::with_act_precision`] selects the activation precision: [`ActPrecision::F32`]
//! (the default, [`CpuCompute::new`]) rounds nothing; [`ActPrecision::Bf16Gemm`] rounds GEMM
//! inputs to bf16 at exactly the points the CUDA runner's bf16 mode does (the table in the
//! [`super`] module docs). Rounding is elementwise, so both modes keep the batch- and
//! layout-invariance contract.
//!
//! ```
//! use moe_host::compute::{cpu::CpuCompute, ActPrecision, Compute};
//! let w = [1.0f32]; // y = x
//! let x = [1.0f32 + 1.0 / 256.0]; // halfway between two bf16 values
//! let mut y = [0.0f32];
//! CpuCompute::new().linear(&x, &w, 1, 1, &mut y).unwrap();
//! assert_eq!(y[0], x[0]);
//! CpuCompute::with_act_precision(ActPrecision::Bf16Gemm).linear(&x, &w, 1, 1, &mut y).unwrap();
//! assert_eq!(y[0], 1.0); // rounded to even before the product
//! ```

use std::borrow::Cow;

use super::{
    check_geometry, check_len, round_bf16, span_rows, ActPrecision, AttnBatch, Compute,
    ComputeError, ExpertOutput, FfnWeights, GqaDims, KvBlocks, KvGeometry, KvKind, MlaDims, Rope,
    RopeSite, RouterSpec, TokenRoute,
};
use crate::compute::ExpertChoice;

/// The CPU reference backend (stateless apart from its activation precision; cheap to create,
/// copy and share).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuCompute {
    act: ActPrecision,
}

impl CpuCompute {
    /// The reference backend with `f32` activations ([`ActPrecision::F32`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend with the given activation precision.
    pub fn with_act_precision(act: ActPrecision) -> Self {
        Self { act }
    }

    /// Its activation precision.
    pub fn act_precision(&self) -> ActPrecision {
        self.act
    }

    /// `x` as a GEMM input: unchanged in `F32`, rounded to bf16 elementwise in `Bf16Gemm`.
    fn gemm_input<'a>(&self, x: &'a [f32]) -> Cow<'a, [f32]> {
        match self.act {
            ActPrecision::F32 => Cow::Borrowed(x),
            ActPrecision::Bf16Gemm => Cow::Owned(x.iter().map(|&v| round_bf16(v)).collect()),
        }
    }

    /// Rounds `x` in place where the mode rounds GEMM inputs.
    fn round_gemm_input(&self, x: &mut [f32]) {
        if self.act == ActPrecision::Bf16Gemm {
            for v in x {
                *v = round_bf16(*v);
            }
        }
    }

    /// `out[m] = W x[m]` in `f32`, never rounded (shared by `linear` and `router_logits`).
    fn matmul_f32(
        x: &[f32],
        w: &[f32],
        in_features: usize,
        out_features: usize,
        out: &mut [f32],
    ) -> Result<(), ComputeError> {
        if out_features == 0 {
            return Err(ComputeError::Dims("linear with zero output features"));
        }
        let rows = rows_of("linear input", x.len(), in_features)?;
        check_len("linear weight", in_features * out_features, w.len())?;
        check_len("linear output", rows * out_features, out.len())?;
        // Weight-row outer loop: each weight row is streamed once for the whole batch; every output
        // element is one `dot`, so its value does not depend on `rows`.
        for (n, wr) in w.chunks_exact(in_features).enumerate() {
            for (m, xr) in x.chunks_exact(in_features).enumerate() {
                out[m * out_features + n] = dot(xr, wr);
            }
        }
        Ok(())
    }
}

/// The fixed-order dot product every CPU kernel reduces with.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) + tail
}

/// `x * sigmoid(x)`.
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// In-place softmax over `s`.
fn softmax_in_place(s: &mut [f32]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in s.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in s.iter_mut() {
        *v /= sum;
    }
}

fn rows_of(what: &'static str, len: usize, width: usize) -> Result<usize, ComputeError> {
    if width == 0 {
        return Err(ComputeError::Dims("zero row width"));
    }
    if !len.is_multiple_of(width) {
        return Err(ComputeError::Shape {
            what,
            expected: len.div_ceil(width) * width,
            got: len,
        });
    }
    Ok(len / width)
}

/// Block id and slot of `position` in a sequence, or the error saying the table is too short.
fn locate(geo: &KvGeometry, blocks: &[u32], position: usize) -> Result<(u32, usize), ComputeError> {
    let b = position / geo.block_tokens;
    match blocks.get(b) {
        Some(&id) => Ok((id, position % geo.block_tokens)),
        None => Err(ComputeError::KvTooShort {
            position,
            needed: b + 1,
            have: blocks.len(),
        }),
    }
}

fn block_checked<'s>(
    store: &'s dyn KvBlocks,
    geo: &KvGeometry,
    id: u32,
) -> Result<&'s [f32], ComputeError> {
    let blk = store.block(id)?;
    check_len("KV block", geo.block_floats(), blk.len())?;
    Ok(blk)
}

/// The blocks holding positions `0..tokens` of a sequence, each checked for size.
fn context_blocks<'s>(
    store: &'s dyn KvBlocks,
    geo: &KvGeometry,
    blocks: &[u32],
    tokens: usize,
) -> Result<Vec<&'s [f32]>, ComputeError> {
    blocks[..geo.blocks_for(tokens)]
        .iter()
        .map(|&id| block_checked(store, geo, id))
        .collect()
}

/// Writes `parts` (each a row per new token) one after the other into each token's KV entry.
fn kv_append(
    batch: AttnBatch<'_>,
    store: &mut dyn KvBlocks,
    parts: [(&'static str, &[f32], usize); 2],
) -> Result<(), ComputeError> {
    let AttnBatch { geo, layer, seqs } = batch;
    check_geometry(geo, layer)?;
    let rows = span_rows(seqs);
    for (what, data, width) in parts {
        check_len(what, rows * width, data.len())?;
    }
    let mut row = 0;
    for s in seqs {
        for i in 0..s.len {
            let (id, slot) = locate(geo, s.blocks, s.start + i)?;
            let blk = store.block_mut(id)?;
            check_len("KV block", geo.block_floats(), blk.len())?;
            let mut off = geo.token_offset(layer, slot);
            for (_, data, width) in parts {
                blk[off..off + width].copy_from_slice(&data[row * width..(row + 1) * width]);
                off += width;
            }
            row += 1;
        }
    }
    Ok(())
}

impl Compute for CpuCompute {
    fn name(&self) -> &'static str {
        match self.act {
            ActPrecision::F32 => "cpu",
            ActPrecision::Bf16Gemm => "cpu-bf16-gemm",
        }
    }

    fn embed(
        &self,
        table: &[f32],
        hidden: usize,
        tokens: &[u32],
        out: &mut [f32],
    ) -> Result<(), ComputeError> {
        let vocab = rows_of("embedding table", table.len(), hidden)?;
        check_len("embed output", tokens.len() * hidden, out.len())?;
        for (t, o) in tokens.iter().zip(out.chunks_exact_mut(hidden)) {
            let i = *t as usize;
            if i >= vocab {
                return Err(ComputeError::TokenOutOfRange { token: *t, vocab });
            }
            o.copy_from_slice(&table[i * hidden..(i + 1) * hidden]);
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &[f32],
        weight: &[f32],
        eps: f32,
        out: &mut [f32],
    ) -> Result<(), ComputeError> {
        let w = weight.len();
        rows_of("rms_norm input", x.len(), w)?;
        check_len("rms_norm output", x.len(), out.len())?;
        for (xr, or) in x.chunks_exact(w).zip(out.chunks_exact_mut(w)) {
            let inv = 1.0 / (dot(xr, xr) / w as f32 + eps).sqrt();
            for ((o, &v), &g) in or.iter_mut().zip(xr).zip(weight) {
                *o = g * (v * inv);
            }
        }
        Ok(())
    }

    fn rms_norm_in_place(
        &self,
        x: &mut [f32],
        weight: &[f32],
        eps: f32,
    ) -> Result<(), ComputeError> {
        let w = weight.len();
        rows_of("rms_norm input", x.len(), w)?;
        for xr in x.chunks_exact_mut(w) {
            let inv = 1.0 / (dot(xr, xr) / w as f32 + eps).sqrt();
            for (v, &g) in xr.iter_mut().zip(weight) {
                *v = g * (*v * inv);
            }
        }
        Ok(())
    }

    fn linear(
        &self,
        x: &[f32],
        w: &[f32],
        in_features: usize,
        out_features: usize,
        out: &mut [f32],
    ) -> Result<(), ComputeError> {
        Self::matmul_f32(&self.gemm_input(x), w, in_features, out_features, out)
    }

    fn router_logits(
        &self,
        x: &[f32],
        router: &[f32],
        hidden: usize,
        experts: usize,
        out: &mut [f32],
    ) -> Result<(), ComputeError> {
        Self::matmul_f32(x, router, hidden, experts, out)
    }

    fn add(&self, acc: &mut [f32], x: &[f32]) -> Result<(), ComputeError> {
        check_len("add operand", acc.len(), x.len())?;
        for (a, b) in acc.iter_mut().zip(x) {
            *a += b;
        }
        Ok(())
    }

    fn rope(
        &self,
        rope: &Rope,
        site: RopeSite,
        x: &mut [f32],
        positions: &[usize],
    ) -> Result<(), ComputeError> {
        let dim = rope.dim();
        if site.offset + dim > site.head_stride || site.heads * site.head_stride > site.row_width {
            return Err(ComputeError::Dims("rope site does not fit its rows"));
        }
        let rows = rows_of("rope input", x.len(), site.row_width)?;
        check_len("rope positions", rows, positions.len())?;
        let (mut cos, mut sin) = (vec![0.0f32; dim / 2], vec![0.0f32; dim / 2]);
        for (row, &pos) in x.chunks_exact_mut(site.row_width).zip(positions) {
            rope.cos_sin(pos, &mut cos, &mut sin);
            for h in 0..site.heads {
                let start = h * site.head_stride + site.offset;
                rope.apply(&mut row[start..start + dim], &cos, &sin);
            }
        }
        Ok(())
    }

    fn kv_append_gqa(
        &self,
        batch: AttnBatch<'_>,
        store: &mut dyn KvBlocks,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), ComputeError> {
        let KvKind::Gqa { kv_heads, head_dim } = batch.geo.kind else {
            return Err(ComputeError::WrongKvKind {
                have: batch.geo.kind.name(),
                want: "GQA",
            });
        };
        let w = kv_heads * head_dim;
        kv_append(batch, store, [("GQA keys", k, w), ("GQA values", v, w)])
    }

    fn attention_gqa(
        &self,
        batch: AttnBatch<'_>,
        store: &dyn KvBlocks,
        dims: GqaDims,
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), ComputeError> {
        let KvKind::Gqa { kv_heads, head_dim } = batch.geo.kind else {
            return Err(ComputeError::WrongKvKind {
                have: batch.geo.kind.name(),
                want: "GQA",
            });
        };
        let AttnBatch { geo, layer, seqs } = batch;
        check_geometry(geo, layer)?;
        if dims.kv_heads != kv_heads || dims.head_dim != head_dim {
            return Err(ComputeError::Dims(
                "attention dims differ from the KV geometry",
            ));
        }
        if dims.heads == 0 || !dims.heads.is_multiple_of(kv_heads) {
            return Err(ComputeError::Dims(
                "query heads must be a non-zero multiple of KV heads",
            ));
        }
        let group = dims.heads / kv_heads;
        let qw = dims.heads * head_dim;
        let kvw = kv_heads * head_dim;
        let rows = span_rows(seqs);
        check_len("attention queries", rows * qw, q.len())?;
        check_len("attention output", rows * qw, out.len())?;
        let mut scores = Vec::new();
        let mut row = 0;
        for s in seqs {
            if s.len == 0 {
                continue;
            }
            // Validate the whole context up front (no partial output on error) and look every
            // block up once.
            locate(geo, s.blocks, s.start + s.len - 1)?;
            let blks = context_blocks(store, geo, s.blocks, s.start + s.len)?;
            let at = |t: usize| {
                (
                    blks[t / geo.block_tokens],
                    geo.token_offset(layer, t % geo.block_tokens),
                )
            };
            for i in 0..s.len {
                let ctx = s.start + i + 1;
                let qr = &q[row * qw..(row + 1) * qw];
                let or = &mut out[row * qw..(row + 1) * qw];
                for h in 0..dims.heads {
                    let kvh = h / group;
                    let qh = &qr[h * head_dim..(h + 1) * head_dim];
                    scores.clear();
                    for t in 0..ctx {
                        let (blk, off) = at(t);
                        let off = off + kvh * head_dim;
                        scores.push(dot(qh, &blk[off..off + head_dim]) * dims.scale);
                    }
                    softmax_in_place(&mut scores);
                    let oh = &mut or[h * head_dim..(h + 1) * head_dim];
                    oh.fill(0.0);
                    for (t, &p) in scores.iter().enumerate() {
                        let (blk, off) = at(t);
                        let off = off + kvw + kvh * head_dim;
                        for (o, &vv) in oh.iter_mut().zip(&blk[off..off + head_dim]) {
                            *o += p * vv;
                        }
                    }
                }
                row += 1;
            }
        }
        Ok(())
    }

    fn kv_append_mla(
        &self,
        batch: AttnBatch<'_>,
        store: &mut dyn KvBlocks,
        latent: &[f32],
        k_rope: &[f32],
    ) -> Result<(), ComputeError> {
        let KvKind::Mla {
            kv_lora_rank,
            rope_dim,
        } = batch.geo.kind
        else {
            return Err(ComputeError::WrongKvKind {
                have: batch.geo.kind.name(),
                want: "MLA",
            });
        };
        kv_append(
            batch,
            store,
            [
                ("MLA latents", latent, kv_lora_rank),
                ("MLA rope keys", k_rope, rope_dim),
            ],
        )
    }

    fn attention_mla(
        &self,
        batch: AttnBatch<'_>,
        store: &dyn KvBlocks,
        dims: MlaDims,
        kv_b: &[f32],
        q: &[f32],
        out: &mut [f32],
    ) -> Result<(), ComputeError> {
        let AttnBatch { geo, layer, seqs } = batch;
        let KvKind::Mla {
            kv_lora_rank: r,
            rope_dim,
        } = geo.kind
        else {
            return Err(ComputeError::WrongKvKind {
                have: batch.geo.kind.name(),
                want: "MLA",
            });
        };
        check_geometry(geo, layer)?;
        if dims.kv_lora_rank != r || dims.qk_rope != rope_dim || dims.heads == 0 {
            return Err(ComputeError::Dims("MLA dims differ from the KV geometry"));
        }
        let qhd = dims.qk_nope + dims.qk_rope;
        let kvb_head = dims.qk_nope + dims.v_head;
        let rows = span_rows(seqs);
        check_len("MLA kv_b_proj", dims.heads * kvb_head * r, kv_b.len())?;
        check_len("MLA queries", rows * dims.heads * qhd, q.len())?;
        check_len("MLA output", rows * dims.heads * dims.v_head, out.len())?;
        let ow = dims.heads * dims.v_head;
        let mut q_lat = vec![0.0f32; r];
        let mut o_lat = vec![0.0f32; r];
        let mut scores = Vec::new();
        let mut row = 0;
        for s in seqs {
            if s.len == 0 {
                continue;
            }
            // Validate the whole context up front (no partial output on error) and look every
            // block up once.
            locate(geo, s.blocks, s.start + s.len - 1)?;
            let blks = context_blocks(store, geo, s.blocks, s.start + s.len)?;
            let at = |t: usize| {
                (
                    blks[t / geo.block_tokens],
                    geo.token_offset(layer, t % geo.block_tokens),
                )
            };
            for i in 0..s.len {
                let ctx = s.start + i + 1;
                let qr = &q[row * dims.heads * qhd..(row + 1) * dims.heads * qhd];
                let or = &mut out[row * ow..(row + 1) * ow];
                for h in 0..dims.heads {
                    let q_nope = &qr[h * qhd..h * qhd + dims.qk_nope];
                    let q_pe = &qr[h * qhd + dims.qk_nope..(h + 1) * qhd];
                    let w_head = &kv_b[h * kvb_head * r..(h + 1) * kvb_head * r];
                    let (w_uk, w_uv) = w_head.split_at(dims.qk_nope * r);
                    // Absorb: q_lat = W_UK^T q_nope, summed over the nope dimension in order.
                    // A GEMM on the GPU: its query operand is rounded in Bf16Gemm.
                    let q_nope = self.gemm_input(q_nope);
                    q_lat.fill(0.0);
                    for (j, &qj) in q_nope.iter().enumerate() {
                        for (l, &wv) in q_lat.iter_mut().zip(&w_uk[j * r..(j + 1) * r]) {
                            *l += qj * wv;
                        }
                    }
                    scores.clear();
                    for t in 0..ctx {
                        let (blk, off) = at(t);
                        let c = &blk[off..off + r];
                        let kpe = &blk[off + r..off + r + rope_dim];
                        scores.push((dot(&q_lat, c) + dot(q_pe, kpe)) * dims.scale);
                    }
                    softmax_in_place(&mut scores);
                    o_lat.fill(0.0);
                    for (t, &p) in scores.iter().enumerate() {
                        let (blk, off) = at(t);
                        for (o, &c) in o_lat.iter_mut().zip(&blk[off..off + r]) {
                            *o += p * c;
                        }
                    }
                    // Expand (a GEMM on the GPU, whose latent operand is rounded in Bf16Gemm).
                    self.round_gemm_input(&mut o_lat);
                    let oh = &mut or[h * dims.v_head..(h + 1) * dims.v_head];
                    for (o, wr) in oh.iter_mut().zip(w_uv.chunks_exact(r)) {
                        *o = dot(wr, &o_lat);
                    }
                }
                row += 1;
            }
        }
        Ok(())
    }

    fn route(&self, logits: &[f32], spec: &RouterSpec) -> Result<Vec<TokenRoute>, ComputeError> {
        let n = spec.experts;
        if n == 0 || spec.top_k == 0 || spec.top_k > n {
            return Err(ComputeError::Router(
                "top_k must be between 1 and the number of experts",
            ));
        }
        if let Some(g) = spec.groups {
            if g.n_group == 0 || !n.is_multiple_of(g.n_group) {
                return Err(ComputeError::Router(
                    "n_group must divide the number of experts",
                ));
            }
            if g.topk_group == 0 || g.topk_group > g.n_group {
                return Err(ComputeError::Router(
                    "topk_group must be between 1 and n_group",
                ));
            }
            if spec.top_k > g.topk_group * (n / g.n_group) {
                return Err(ComputeError::Router(
                    "top_k exceeds the experts in topk_group groups",
                ));
            }
        }
        let rows = rows_of("router logits", logits.len(), n)?;
        let mut out = Vec::with_capacity(rows);
        let mut probs = vec![0.0f32; n];
        let mut allowed = vec![true; n];
        for lr in logits.chunks_exact(n) {
            probs.copy_from_slice(lr);
            softmax_in_place(&mut probs);
            allowed.fill(true);
            if let Some(g) = spec.groups {
                let per = n / g.n_group;
                let group_score: Vec<f32> = probs
                    .chunks_exact(per)
                    .map(|c| c.iter().copied().fold(f32::NEG_INFINITY, f32::max))
                    .collect();
                let keep = top_indices(&group_score, g.topk_group, |_| true);
                for (e, a) in allowed.iter_mut().enumerate() {
                    *a = keep.contains(&(e / per));
                }
            }
            let chosen = top_indices(&probs, spec.top_k, |e| allowed[e]);
            let mut route: TokenRoute = chosen
                .iter()
                .map(|&e| ExpertChoice {
                    expert: e as u32,
                    weight: probs[e],
                })
                .collect();
            if spec.normalize {
                let sum: f32 = route.iter().map(|c| c.weight).sum();
                for c in &mut route {
                    c.weight /= sum;
                }
            } else {
                for c in &mut route {
                    c.weight *= spec.scale;
                }
            }
            route.sort_by_key(|c| c.expert);
            out.push(route);
        }
        Ok(out)
    }

    fn swiglu(&self, w: &FfnWeights<'_>, x: &[f32], out: &mut [f32]) -> Result<(), ComputeError> {
        w.check()?;
        let rows = rows_of("ffn input", x.len(), w.hidden)?;
        check_len("ffn output", rows * w.hidden, out.len())?;
        let mut h = vec![0.0f32; w.inter];
        // Both GEMM inputs (x into gate/up, h into down) are rounded in Bf16Gemm.
        let x = self.gemm_input(x);
        for (xr, or) in x.chunks_exact(w.hidden).zip(out.chunks_exact_mut(w.hidden)) {
            for ((hv, gr), ur) in h
                .iter_mut()
                .zip(w.gate.chunks_exact(w.hidden))
                .zip(w.up.chunks_exact(w.hidden))
            {
                *hv = silu(dot(xr, gr)) * dot(xr, ur);
            }
            self.round_gemm_input(&mut h);
            for (o, dr) in or.iter_mut().zip(w.down.chunks_exact(w.inter)) {
                *o = dot(&h, dr);
            }
        }
        Ok(())
    }

    fn combine(
        &self,
        parts: &[ExpertOutput<'_>],
        shared: Option<&[f32]>,
        residual: &mut [f32],
    ) -> Result<(), ComputeError> {
        let hidden = residual.len();
        for pair in parts.windows(2) {
            if pair[0].expert >= pair[1].expert {
                return Err(ComputeError::CombineOrder {
                    prev: pair[0].expert,
                    next: pair[1].expert,
                });
            }
        }
        for p in parts {
            check_len("expert output row", hidden, p.row.len())?;
        }
        if let Some(s) = shared {
            check_len("shared expert row", hidden, s.len())?;
        }
        let mut acc = vec![0.0f32; hidden];
        for p in parts {
            for (a, &y) in acc.iter_mut().zip(p.row) {
                *a += y * p.weight;
            }
        }
        if let Some(s) = shared {
            for (a, &y) in acc.iter_mut().zip(s) {
                *a += y;
            }
        }
        for (r, a) in residual.iter_mut().zip(&acc) {
            *r += a;
        }
        Ok(())
    }
}

/// The `k` best indices of `score` among those `allowed`, best first; ties go to the lower index.
fn top_indices(score: &[f32], k: usize, allowed: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..score.len()).filter(|&i| allowed(i)).collect();
    // total_cmp puts NaN above everything; a NaN logit is a model bug the caller sees as NaN weights.
    idx.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::{GroupLimit, RopeStyle, SeqSpan, VecKvBlocks};
    use proptest::prelude::*;

    fn seq_f32(n: usize, seed: u32) -> Vec<f32> {
        // A deterministic, irregular sequence in about [-1, 1].
        (0..n)
            .map(|i| {
                let v = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(97));
                ((v >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn dot_matches_sequential_sum_closely() {
        for n in [0, 1, 7, 8, 9, 63, 64, 100] {
            let (a, b) = (seq_f32(n, 1), seq_f32(n, 2));
            let naive: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert!((f64::from(dot(&a, &b)) - naive).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn embed_copies_rows_and_refuses_bad_tokens() {
        let cpu = CpuCompute::new();
        let table: Vec<f32> = (0..12).map(|i| i as f32).collect(); // vocab 4, hidden 3
        let mut out = vec![0.0; 6];
        cpu.embed(&table, 3, &[2, 0], &mut out).unwrap();
        assert_eq!(out, [6.0, 7.0, 8.0, 0.0, 1.0, 2.0]);
        assert_eq!(
            cpu.embed(&table, 3, &[4, 0], &mut out),
            Err(ComputeError::TokenOutOfRange { token: 4, vocab: 4 })
        );
        assert!(matches!(
            cpu.embed(&table, 5, &[0], &mut out),
            Err(ComputeError::Shape { .. })
        ));
    }

    #[test]
    fn rms_norm_unit_rms() {
        let cpu = CpuCompute::new();
        let x = [3.0f32, -4.0, 0.0, 0.0];
        let mut out = [0.0; 4];
        cpu.rms_norm(&x, &[1.0, 1.0, 2.0, 2.0], 0.0, &mut out)
            .unwrap();
        // rms = sqrt(25/4) = 2.5
        assert_eq!(out, [1.2, -1.6, 0.0, 0.0]);
        let mut y = [3.0f32, -4.0, 1.0, 1.0];
        cpu.rms_norm_in_place(&mut y, &[1.0, 2.0], 0.0).unwrap();
        // Two segments normalised separately: [3,-4] has rms sqrt(12.5), [1,1] has rms 1.
        let r = (12.5f32).sqrt();
        assert!((y[0] - 3.0 / r).abs() < 1e-6 && (y[1] + 8.0 / r).abs() < 1e-6);
        assert_eq!(&y[2..], &[1.0, 2.0]);
    }

    #[test]
    fn linear_shape_errors() {
        let cpu = CpuCompute::new();
        let mut out = [0.0; 2];
        assert!(matches!(
            cpu.linear(&[1.0, 2.0, 3.0], &[0.0; 6], 2, 3, &mut out),
            Err(ComputeError::Shape {
                what: "linear input",
                ..
            })
        ));
        assert!(matches!(
            cpu.linear(&[1.0, 2.0], &[0.0; 5], 2, 3, &mut out),
            Err(ComputeError::Shape {
                what: "linear weight",
                ..
            })
        ));
        assert!(matches!(
            cpu.linear(&[1.0, 2.0], &[0.0; 6], 2, 3, &mut out),
            Err(ComputeError::Shape {
                what: "linear output",
                ..
            })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A row's linear output is bitwise the same alone and inside any batch.
        #[test]
        fn linear_is_batch_invariant(rows in 1usize..9, pick in 0usize..8, k in 1usize..40,
                                     n in 1usize..20, seed in 0u32..1000) {
            let pick = pick % rows;
            let cpu = CpuCompute::new();
            let x = seq_f32(rows * k, seed);
            let w = seq_f32(n * k, seed + 1);
            let mut all = vec![0.0; rows * n];
            cpu.linear(&x, &w, k, n, &mut all).unwrap();
            let mut one = vec![0.0; n];
            cpu.linear(&x[pick * k..(pick + 1) * k], &w, k, n, &mut one).unwrap();
            prop_assert_eq!(&all[pick * n..(pick + 1) * n], &one[..]);
        }

        /// Router weights: top_k ascending ids, within allowed groups, normalised when asked.
        #[test]
        fn router_invariants(seed in 0u32..1000, top_k in 1usize..5, normalize: bool) {
            let cpu = CpuCompute::new();
            let spec = RouterSpec {
                experts: 16, top_k, groups: Some(GroupLimit { n_group: 4, topk_group: 2 }),
                normalize, scale: 2.5,
            };
            let logits: Vec<f32> = seq_f32(3 * 16, seed).iter().map(|v| v * 4.0).collect();
            let routes = cpu.route(&logits, &spec).unwrap();
            prop_assert_eq!(routes.len(), 3);
            for r in &routes {
                prop_assert_eq!(r.len(), top_k);
                prop_assert!(r.windows(2).all(|w| w[0].expert < w[1].expert));
                let groups: std::collections::BTreeSet<u32> = r.iter().map(|c| c.expert / 4).collect();
                prop_assert!(groups.len() <= 2);
                let sum: f32 = r.iter().map(|c| c.weight).sum();
                if normalize { prop_assert!((sum - 1.0).abs() < 1e-5); }
                prop_assert!(r.iter().all(|c| c.weight > 0.0 && c.weight.is_finite()));
            }
        }
    }

    #[test]
    fn router_greedy_picks_the_largest_and_scales() {
        let cpu = CpuCompute::new();
        let logits = [0.0f32, 3.0, 1.0, 3.0, -1.0, 2.0];
        let spec = RouterSpec {
            experts: 6,
            top_k: 3,
            groups: None,
            normalize: false,
            scale: 2.0,
        };
        let r = &cpu.route(&logits, &spec).unwrap()[0];
        let ids: Vec<u32> = r.iter().map(|c| c.expert).collect();
        assert_eq!(ids, [1, 3, 5]);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((r[0].weight - 2.0 * 3f32.exp() / z).abs() < 1e-6);
        assert!((r[2].weight - 2.0 * 2f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn router_group_limit_excludes_other_groups() {
        let cpu = CpuCompute::new();
        // Groups of 2: g0 = [5, 4.9], g1 = [5.5, -9], g2 = [0, 0]. Best groups by max: g1, g0.
        let logits = [5.0f32, 4.9, 5.5, -9.0, 0.0, 0.0];
        let spec = RouterSpec {
            experts: 6,
            top_k: 2,
            groups: Some(GroupLimit {
                n_group: 3,
                topk_group: 1,
            }),
            normalize: true,
            scale: 1.0,
        };
        let r = &cpu.route(&logits, &spec).unwrap()[0];
        // Only g1 may be used: experts 2 and 3.
        assert_eq!(r.iter().map(|c| c.expert).collect::<Vec<_>>(), [2, 3]);
        let bad = RouterSpec {
            groups: Some(GroupLimit {
                n_group: 4,
                topk_group: 1,
            }),
            ..spec
        };
        assert!(matches!(
            cpu.route(&logits, &bad),
            Err(ComputeError::Router(_))
        ));
        let bad = RouterSpec {
            top_k: 7,
            groups: None,
            ..spec
        };
        assert!(matches!(
            cpu.route(&logits, &bad),
            Err(ComputeError::Router(_))
        ));
    }

    #[test]
    fn combine_requires_ascending_ids_and_adds_in_order() {
        let cpu = CpuCompute::new();
        let (a, b) = ([1.0f32, 2.0], [10.0f32, 20.0]);
        let mut res = [100.0f32, 100.0];
        let parts = [
            ExpertOutput {
                expert: 1,
                weight: 0.5,
                row: &a,
            },
            ExpertOutput {
                expert: 4,
                weight: 0.25,
                row: &b,
            },
        ];
        cpu.combine(&parts, Some(&[1.0, 1.0]), &mut res).unwrap();
        assert_eq!(res, [100.0 + (0.5 + 2.5 + 1.0), 100.0 + (1.0 + 5.0 + 1.0)]);
        let swapped = [parts[1], parts[0]];
        assert_eq!(
            cpu.combine(&swapped, None, &mut res),
            Err(ComputeError::CombineOrder { prev: 4, next: 1 })
        );
    }

    #[test]
    fn swiglu_matches_formula() {
        let cpu = CpuCompute::new();
        let (hidden, inter) = (3, 2);
        let gate = seq_f32(6, 3);
        let up = seq_f32(6, 4);
        let down = seq_f32(6, 5);
        let x = seq_f32(3, 6);
        let w = FfnWeights {
            gate: &gate,
            up: &up,
            down: &down,
            hidden,
            inter,
        };
        let mut out = vec![0.0; 3];
        cpu.swiglu(&w, &x, &mut out).unwrap();
        let mut h = [0.0f32; 2];
        for i in 0..2 {
            let g: f32 = (0..3).map(|j| x[j] * gate[i * 3 + j]).sum();
            let u: f32 = (0..3).map(|j| x[j] * up[i * 3 + j]).sum();
            h[i] = g / (1.0 + (-g).exp()) * u;
        }
        for j in 0..3 {
            let e: f32 = (0..2).map(|i| h[i] * down[j * 2 + i]).sum();
            assert!((out[j] - e).abs() < 1e-6);
        }
        let short = FfnWeights {
            down: &down[..5],
            ..w
        };
        assert!(matches!(
            cpu.swiglu(&short, &x, &mut out),
            Err(ComputeError::Shape { .. })
        ));
    }

    fn gqa_geo() -> KvGeometry {
        KvGeometry {
            layers: 2,
            block_tokens: 4,
            kind: KvKind::Gqa {
                kv_heads: 2,
                head_dim: 4,
            },
        }
    }

    /// Plain attention for one query over explicit keys/values.
    fn naive_attn(q: &[f32], ks: &[Vec<f32>], vs: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let s: Vec<f32> = ks
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|v| (v - m).exp()).collect();
        let z: f32 = e.iter().sum();
        let mut o = vec![0.0; vs[0].len()];
        for (p, v) in e.iter().zip(vs) {
            for (oo, vv) in o.iter_mut().zip(v) {
                *oo += p / z * vv;
            }
        }
        o
    }

    #[test]
    fn gqa_attention_over_pages_matches_plain_attention() {
        let cpu = CpuCompute::new();
        let geo = gqa_geo();
        let mut store = VecKvBlocks::new(geo.block_floats());
        // Blocks deliberately out of order.
        let b: Vec<u32> = (0..3).map(|_| store.alloc()).collect();
        let table = [b[2], b[0], b[1]];
        let n = 9;
        let k = seq_f32(n * 8, 11);
        let v = seq_f32(n * 8, 12);
        let q = seq_f32(n * 16, 13);
        let dims = GqaDims {
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            scale: 0.5,
        };
        // Prefill 5 tokens, then 4 more in a second step.
        let s1 = [SeqSpan {
            blocks: &table,
            start: 0,
            len: 5,
        }];
        cpu.kv_append_gqa(
            AttnBatch {
                geo: &geo,
                layer: 1,
                seqs: &s1,
            },
            &mut store,
            &k[..40],
            &v[..40],
        )
        .unwrap();
        let mut o1 = vec![0.0; 5 * 16];
        cpu.attention_gqa(
            AttnBatch {
                geo: &geo,
                layer: 1,
                seqs: &s1,
            },
            &store,
            dims,
            &q[..80],
            &mut o1,
        )
        .unwrap();
        let s2 = [SeqSpan {
            blocks: &table,
            start: 5,
            len: 4,
        }];
        cpu.kv_append_gqa(
            AttnBatch {
                geo: &geo,
                layer: 1,
                seqs: &s2,
            },
            &mut store,
            &k[40..],
            &v[40..],
        )
        .unwrap();
        let mut o2 = vec![0.0; 4 * 16];
        cpu.attention_gqa(
            AttnBatch {
                geo: &geo,
                layer: 1,
                seqs: &s2,
            },
            &store,
            dims,
            &q[80..],
            &mut o2,
        )
        .unwrap();
        let out: Vec<f32> = o1.into_iter().chain(o2).collect();
        for t in 0..n {
            for h in 0..4 {
                let kvh = h / 2;
                let ks: Vec<Vec<f32>> = (0..=t)
                    .map(|u| k[u * 8 + kvh * 4..u * 8 + kvh * 4 + 4].to_vec())
                    .collect();
                let vs: Vec<Vec<f32>> = (0..=t)
                    .map(|u| v[u * 8 + kvh * 4..u * 8 + kvh * 4 + 4].to_vec())
                    .collect();
                let e = naive_attn(&q[t * 16 + h * 4..t * 16 + h * 4 + 4], &ks, &vs, 0.5);
                for d in 0..4 {
                    assert!((out[t * 16 + h * 4 + d] - e[d]).abs() < 1e-5);
                }
            }
        }
        // Layer 0 was never written: still zeros.
        let blk = store.block(b[2]).unwrap();
        assert!(blk[..geo.token_offset(1, 0)].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn attention_errors_are_typed() {
        let cpu = CpuCompute::new();
        let geo = gqa_geo();
        let mut store = VecKvBlocks::new(geo.block_floats());
        let b0 = store.alloc();
        let blocks = [b0];
        let s = [SeqSpan {
            blocks: &blocks,
            start: 3,
            len: 2,
        }];
        let kv = vec![0.0; 16];
        assert_eq!(
            cpu.kv_append_gqa(
                AttnBatch {
                    geo: &geo,
                    layer: 0,
                    seqs: &s
                },
                &mut store,
                &kv,
                &kv
            ),
            Err(ComputeError::KvTooShort {
                position: 4,
                needed: 2,
                have: 1
            })
        );
        let bad = [SeqSpan {
            blocks: &[7],
            start: 0,
            len: 1,
        }];
        assert_eq!(
            cpu.kv_append_gqa(
                AttnBatch {
                    geo: &geo,
                    layer: 0,
                    seqs: &bad
                },
                &mut store,
                &kv[..8],
                &kv[..8]
            ),
            Err(ComputeError::NoSuchBlock {
                block: 7,
                blocks: 1
            })
        );
        let one = [SeqSpan {
            blocks: &blocks,
            start: 0,
            len: 1,
        }];
        assert_eq!(
            cpu.kv_append_gqa(
                AttnBatch {
                    geo: &geo,
                    layer: 2,
                    seqs: &one
                },
                &mut store,
                &kv[..8],
                &kv[..8]
            ),
            Err(ComputeError::NoSuchLayer {
                layer: 2,
                layers: 2
            })
        );
        assert!(matches!(
            cpu.kv_append_mla(
                AttnBatch {
                    geo: &geo,
                    layer: 0,
                    seqs: &one
                },
                &mut store,
                &kv[..8],
                &kv[..8]
            ),
            Err(ComputeError::WrongKvKind { .. })
        ));
    }

    #[test]
    fn mla_absorbed_matches_unabsorbed() {
        let cpu = CpuCompute::new();
        let (heads, nope, rope, vh, r) = (2usize, 4usize, 2usize, 3usize, 5usize);
        let geo = KvGeometry {
            layers: 1,
            block_tokens: 2,
            kind: KvKind::Mla {
                kv_lora_rank: r,
                rope_dim: rope,
            },
        };
        let mut store = VecKvBlocks::new(geo.block_floats());
        let table: Vec<u32> = (0..3).map(|_| store.alloc()).collect();
        let n = 5;
        let lat = seq_f32(n * r, 21);
        let kpe = seq_f32(n * rope, 22);
        let q = seq_f32(n * heads * (nope + rope), 23);
        let kv_b = seq_f32(heads * (nope + vh) * r, 24);
        let dims = MlaDims {
            heads,
            qk_nope: nope,
            qk_rope: rope,
            v_head: vh,
            kv_lora_rank: r,
            scale: 0.4,
        };
        let s = [SeqSpan {
            blocks: &table,
            start: 0,
            len: n,
        }];
        cpu.kv_append_mla(
            AttnBatch {
                geo: &geo,
                layer: 0,
                seqs: &s,
            },
            &mut store,
            &lat,
            &kpe,
        )
        .unwrap();
        let mut out = vec![0.0; n * heads * vh];
        cpu.attention_mla(
            AttnBatch {
                geo: &geo,
                layer: 0,
                seqs: &s,
            },
            &store,
            dims,
            &kv_b,
            &q,
            &mut out,
        )
        .unwrap();
        for t in 0..n {
            for h in 0..heads {
                let wrow =
                    |i: usize| &kv_b[(h * (nope + vh) + i) * r..(h * (nope + vh) + i + 1) * r];
                let ks: Vec<Vec<f32>> = (0..=t)
                    .map(|u| {
                        let c = &lat[u * r..(u + 1) * r];
                        let mut k: Vec<f32> = (0..nope).map(|i| dot(wrow(i), c)).collect();
                        k.extend_from_slice(&kpe[u * rope..(u + 1) * rope]);
                        k
                    })
                    .collect();
                let vs: Vec<Vec<f32>> = (0..=t)
                    .map(|u| {
                        (0..vh)
                            .map(|i| dot(wrow(nope + i), &lat[u * r..(u + 1) * r]))
                            .collect()
                    })
                    .collect();
                let qh = &q[(t * heads + h) * (nope + rope)..(t * heads + h + 1) * (nope + rope)];
                let e = naive_attn(qh, &ks, &vs, 0.4);
                for d in 0..vh {
                    assert!((out[(t * heads + h) * vh + d] - e[d]).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn rope_site_applies_to_each_head_part() {
        let cpu = CpuCompute::new();
        let rope = Rope::new(2, 10000.0, RopeStyle::Interleaved).unwrap();
        // Two heads of [nope 1 | rope 2] per row.
        let mut x = vec![1.0f32, 1.0, 0.0, 2.0, 0.0, 1.0];
        let site = RopeSite {
            row_width: 6,
            heads: 2,
            head_stride: 3,
            offset: 1,
        };
        cpu.rope(&rope, site, &mut x, &[1]).unwrap();
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert_eq!(x[0], 1.0);
        assert_eq!(x[3], 2.0);
        assert!((x[1] - c).abs() < 1e-7 && (x[2] - s).abs() < 1e-7);
        assert!((x[4] + s).abs() < 1e-7 && (x[5] - c).abs() < 1e-7);
        let bad = RopeSite { offset: 2, ..site };
        assert!(matches!(
            cpu.rope(&rope, bad, &mut x, &[1]),
            Err(ComputeError::Dims(_))
        ));
    }
}
