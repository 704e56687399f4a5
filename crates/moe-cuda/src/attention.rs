//! A layer's attention block on a rank: input norm, projections, rope, the KV write, paged
//! attention (GQA, or MLA in the absorbed form) and the output projection.

use moe_host::model::ModelError;
use moe_model::schema::TensorRole;
use moe_model::spec::{AttnDims, RopeStyle};

use crate::error::CudaError;
use crate::kernels::{DevPtr, Grid};
use crate::runner::CudaRunner;
use crate::step::RankStep;
use crate::weights::has_role;

/// `eps` of DeepSeek-V2's `q_a_layernorm` and `kv_a_layernorm` (as in the CPU model).
pub(crate) const MLA_NORM_EPS: f32 = 1e-6;

impl CudaRunner {
    /// Layer `l`'s attention block on the step's rows: input norm, projections, rope, the KV
    /// write, attention and the output projection added into the residual stream.
    pub(crate) fn attention(&self, st: &mut RankStep, l: usize) -> Result<(), CudaError> {
        let d = self.dims;
        let (rows, ctx_max, geo, h) = (st.rows, st.ctx_max, self.geo, d.hidden);
        let rank = &self.ranks[st.ri];
        rank.bind()?;
        let s = rank.scratch;
        let eps = self.cfg.rms_norm_eps as f32;
        let w = |role| self.weight(rank, l, role);
        let lay = self
            .model
            .layout()
            .layer(l)
            .ok_or(CudaError::Model(ModelError::NoSuchLayer { layer: l }))?;
        let launch = rank.launch();
        // The paged KV cache's parameters of `kv_write`, `attn_gqa` and `attn_mla`.
        let kv = DevPtr::f32(rank.kv.addr());
        let (block_floats, block_tokens) = (geo.block_floats() as i32, geo.block_tokens as i32);
        let (layer, token_floats) = (l as i32, geo.token_floats() as i32);
        let (tables, tbl_off, pos) = (
            DevPtr::i32(s.tables),
            DevPtr::i32(s.tbl_off),
            DevPtr::i32(s.pos),
        );
        let per_row = Grid::new((rows as u32, 1), 128, 0);
        let rope = |x: u64, row: usize, heads: usize, hs: usize, off: usize| {
            launch.rope(
                per_row,
                DevPtr::f32(x),
                row as i32,
                heads as i32,
                hs as i32,
                off as i32,
                2 * d.half_rope as i32,
                pos,
                DevPtr::f32(s.cos),
                DevPtr::f32(s.sin),
                i32::from(self.model.rope().style() == RopeStyle::Interleaved),
            )
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
                let (qw, kvw, hd) = (d.q_width, d.kv_width, a.head_dim);
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
                rope(s.q, qw, a.heads, hd, 0)?;
                rope(s.kbuf, kvw, a.kv_heads, hd, 0)?;
                launch.kv_write(
                    per_row,
                    kv,
                    block_floats,
                    block_tokens,
                    layer,
                    token_floats,
                    tables,
                    tbl_off,
                    pos,
                    DevPtr::f32(s.kbuf),
                    kvw as i32,
                    kvw as i32,
                    DevPtr::f32(s.vbuf),
                    kvw as i32,
                    kvw as i32,
                )?;
                let smem = (4 * (hd + ctx_max)) as u32;
                launch.attn_gqa(
                    Grid::new((a.heads as u32, rows as u32), 128, smem),
                    DevPtr::f32(s.q),
                    qw as i32,
                    kv,
                    block_floats,
                    block_tokens,
                    layer,
                    token_floats,
                    tables,
                    tbl_off,
                    pos,
                    a.heads as i32,
                    a.kv_heads as i32,
                    hd as i32,
                    a.scale,
                    DevPtr::act(s.att),
                    qw as i32,
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
                let (qw, r) = (d.q_width, a.kv_lora_rank);
                if d.q_lora_rank > 0 {
                    let qr = d.q_lora_rank;
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
                let kvw = d.kv_width;
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
                rope(s.q, qw, a.heads, qhd, a.qk_nope)?;
                rope(s.vbuf, kvw, 1, a.qk_rope, r)?;
                launch.kv_write(
                    per_row,
                    kv,
                    block_floats,
                    block_tokens,
                    layer,
                    token_floats,
                    tables,
                    tbl_off,
                    pos,
                    DevPtr::f32(s.vbuf),
                    kvw as i32,
                    r as i32,
                    DevPtr::f32(s.vbuf + 4 * r as u64),
                    kvw as i32,
                    a.qk_rope as i32,
                )?;
                // Absorb: q_lat[row, h] = W_UK[h]^T q_nope[row, h] (per head, strided).
                let n = (rows * qw) as i64;
                launch.cast_bf16(
                    Grid::new(((n as usize).div_ceil(256).min(65535) as u32, 1), 256, 0),
                    DevPtr::f32(s.q),
                    DevPtr::act(s.qbf),
                    n,
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
                let smem = (4 * (r + a.qk_rope + ctx_max)) as u32;
                launch.attn_mla(
                    Grid::new((a.heads as u32, rows as u32), 128, smem),
                    DevPtr::f32(s.qlat),
                    DevPtr::f32(s.q),
                    qw as i32,
                    qhd as i32,
                    a.qk_nope as i32,
                    a.qk_rope as i32,
                    r as i32,
                    kv,
                    block_floats,
                    block_tokens,
                    layer,
                    token_floats,
                    tables,
                    tbl_off,
                    pos,
                    a.heads as i32,
                    a.scale,
                    DevPtr::act(s.att),
                )?;
                // Expand: out[row, h] = W_UV[h] o_lat[row, h].
                rank.gemm_strided(
                    true,
                    a.v_head,
                    rows,
                    r,
                    kv_b + (d.elem_bytes * a.qk_nope * r) as u64,
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
}
