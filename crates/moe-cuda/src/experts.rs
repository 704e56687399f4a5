//! The feed-forward side of a layer on a rank: the dense or shared-expert SwiGLU MLP, the
//! router, and the three dispatch paths of the routed experts (device `moe_gemv`, host-grouped
//! batched GEMMs, padded batched GEMMs) with the combine.

use moe_model::schema::TensorRole;

use crate::error::CudaError;
use crate::kernels::{
    bi_vectorizable, moe_gemv_fits, MMA_COLS, MMA_ROWS, MOE_COLS, MOE_ROWS, MOE_SMEM, MOE_WARPS,
};
use crate::kernels::{DevPtr, Grid};
use crate::memory::Dims;
use crate::rank::RankState;
use crate::runner::CudaRunner;
use crate::step::RankStep;

/// Default of [`CudaRunner::set_padded_dispatch_max_rows`] (0: off). Measured on H200: the
/// padded dispatch ties with the host dispatch at batch 64 (14.78 vs 14.68 ms/step on Qwen3,
/// 15.32 vs 15.41 on DeepSeek), is slower at 8 (it reads every expert) and mixed at 256; what it
/// saves in host syncs (about 0.45 ms a step at 64) it spends on the experts no row was routed
/// to and on padding. Off until it wins.
pub const PADDED_DISPATCH_MAX_ROWS: usize = 0;

/// How a step routes its experts (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DispatchPath {
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
pub(crate) fn padded_capacity(rows: usize, top_k: usize, experts: usize) -> usize {
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

/// The rows a GPU runs layer `l`'s routed experts on: its rank's own rows of the step (`s.xb`,
/// `s.ids`; every expert), or, expert parallel, every rank's rows gathered in its exchange chunk,
/// of which it runs only the slots routed to the experts it owns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExpertRows {
    /// The rows' normalised inputs (bf16, `h` per row).
    pub(crate) x: u64,
    /// Their routes (`top_k` expert ids per row).
    pub(crate) ids: u64,
    pub(crate) rows: usize,
    /// The owner rank of each expert of the layer (0: no mask, every expert runs here).
    pub(crate) owner: u64,
    /// This GPU's rank index (with `owner`).
    pub(crate) me: i32,
}

impl ExpertRows {
    pub(crate) fn own(rank: &RankState, rows: usize) -> Self {
        Self {
            x: rank.scratch.xb,
            ids: rank.scratch.ids,
            rows,
            owner: 0,
            me: 0,
        }
    }

    pub(crate) fn gathered(rank: &RankState, g: usize, l: usize, total: usize, d: &Dims) -> Self {
        Self {
            x: rank.exchange.rows_in,
            ids: rank.exchange.routes_in,
            rows: total,
            owner: rank.scratch.eowner + (4 * l * d.experts) as u64,
            me: g as i32,
        }
    }
}

impl CudaRunner {
    /// Launches the router kernel (`route`, one warp per row) over the first `rows` rows of the
    /// rank's router logits (`s.rlogits`), writing `s.ids` / `s.wts`.
    pub(crate) fn launch_route(
        rank: &RankState,
        spec: &moe_model::spec::RouterSpec,
        rows: usize,
    ) -> Result<(), CudaError> {
        let s = rank.scratch;
        let (ng, tg) = spec.groups.map_or((0, 0), |g| (g.n_group, g.topk_group));
        rank.launch().route(
            Grid::new((rows as u32, 1), 32, 0),
            DevPtr::f32(s.rlogits),
            rows as i32,
            spec.experts as i32,
            spec.top_k as i32,
            ng as i32,
            tg as i32,
            i32::from(spec.normalize),
            spec.scale,
            DevPtr::i32(s.ids),
            DevPtr::f32(s.wts),
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
        let s = rank.scratch;
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

    /// Whether a step of `rows` tokens routes its experts on the device (see
    /// [`CudaRunner::set_device_dispatch_max_rows`]): also needs `moe_gemv`'s vector width to
    /// divide the hidden and expert sizes and one row of either to fit its shared memory.
    pub(crate) fn dispatch_path(&self, rows: usize) -> DispatchPath {
        let d = &self.dims;
        if self.cfg.num_moe_layers() == 0 || !moe_gemv_fits(d.hidden, d.expert_inter, d.elem_bytes)
        {
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

    /// Launches `moe_gemv` over every expert of a layer: `out[row] = x[row_idx[row]] W_e^T` for the
    /// rows each expert has (`counts`/`offsets` device arrays; `row_idx` 0: the compact rows
    /// themselves).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn moe_gemv(
        &self,
        rank: &RankState,
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
        let es = self.dims.elem_bytes;
        let rchunk = (MOE_SMEM / (k * es)).clamp(1, MOE_ROWS);
        let cols = MOE_WARPS * MOE_COLS;
        rank.launch().moe_gemv(
            Grid::new(
                (n.div_ceil(cols) as u32, self.dims.experts as u32),
                (32 * MOE_WARPS) as u32,
                (rchunk * k * es) as u32,
            ),
            DevPtr::i32(counts),
            DevPtr::i32(offsets),
            DevPtr::i32(row_idx).or_null(),
            DevPtr::act(x),
            ldx as i32,
            DevPtr::u64(table),
            w_off as i64,
            n as i32,
            k as i32,
            DevPtr::f32(out),
            ldo as i32,
            rchunk as i32,
        )
    }

    /// The routed experts' products of the device dispatch: `moe_gemv`, or in batch-invariant
    /// bf16 mode `bi_mma` in its expert mode (tensor cores; a row's result independent of the
    /// other rows, as `moe_gemv`'s is). Same arguments as [`CudaRunner::moe_gemv`], plus `rows`,
    /// the step's token count (no expert has more).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn expert_products(
        &self,
        rank: &RankState,
        co: (u64, u64),
        table: u64,
        row_idx: u64,
        (x, ldx): (u64, usize),
        w_off: usize,
        (n, k): (usize, usize),
        (out, ldo): (u64, usize),
        rows: usize,
    ) -> Result<(), CudaError> {
        let launch = rank.launch();
        if !launch.has_bi_mma() {
            return self.moe_gemv(rank, co, table, row_idx, x, ldx, w_off, n, k, out, ldo);
        }
        let es = self.dims.elem_bytes;
        let aligned = bi_vectorizable(es, k, &[x, (es * w_off) as u64], &[ldx, k]);
        // Expert mode: no plain weights (`w`), the experts' weights from `wptrs`.
        launch.bi_mma(
            Grid::xyz(
                (
                    n.div_ceil(MMA_COLS) as u32,
                    rows.div_ceil(MMA_ROWS) as u32,
                    self.dims.experts as u32,
                ),
                128,
            ),
            DevPtr::act(x),
            ldx as i32,
            0,
            None,
            k as i32,
            0,
            DevPtr::untyped(out),
            ldo as i32,
            0,
            0,
            0.0,
            rows as i32,
            n as i32,
            k as i32,
            i32::from(aligned),
            Some(DevPtr::i32(co.0)),
            Some(DevPtr::i32(co.1)),
            DevPtr::i32(row_idx).or_null(),
            Some(DevPtr::u64(table)),
            w_off as i64,
        )
    }

    /// The SwiGLU MLP of layer `l` (dense, or its shared experts) on the step's normalised rows
    /// (`s.xb`): `out[rows, h] (ldo) = down(silu(gate x) * up x) + beta * out`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn swiglu(
        &self,
        rank: &RankState,
        l: usize,
        rows: usize,
        inter: usize,
        out: u64,
        ldo: usize,
        beta: f32,
    ) -> Result<(), CudaError> {
        let (s, h) = (rank.scratch, self.dims.hidden);
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
        rank.launch().silu_mul(
            Grid::new((rows as u32, 1), 256, 0),
            DevPtr::f32(s.f1),
            inter as i32,
            DevPtr::f32(s.f2),
            inter as i32,
            DevPtr::act(s.hb),
            inter as i32,
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

    /// Layer `l`'s feed-forward input: the post-attention norm, then either the dense MLP
    /// (returns false: the layer is done) or the router's logits and routes (returns true: the
    /// routed experts come next).
    pub(crate) fn ffn_in(&self, st: &mut RankStep, l: usize) -> Result<bool, CudaError> {
        let (d, rows) = (self.dims, st.rows);
        let rank = &self.ranks[st.ri];
        rank.bind()?;
        let (s, h) = (rank.scratch, d.hidden);
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
        rank.launch().linear_f32(
            Grid::new((spec.experts as u32, rows as u32), 128, 0),
            DevPtr::f32(s.xn),
            DevPtr::act(self.weight(rank, l, TensorRole::RouterGate)?),
            DevPtr::f32(s.rlogits),
            h as i32,
            spec.experts as i32,
        )?;
        Self::launch_route(rank, &spec, rows).map(|()| true)
    }

    /// Layer `l`'s routed experts on the rank's own rows, every expert read where it lies (remote
    /// experts over NVLink), then the shared experts and the combine into the residual stream.
    pub(crate) fn local_experts(&self, st: &mut RankStep, l: usize) -> Result<(), CudaError> {
        let d = self.dims;
        let (rows, path, h, ie) = (st.rows, st.path, d.hidden, d.expert_inter);
        let rank = &self.ranks[st.ri];
        rank.bind()?;
        let s = rank.scratch;
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
            rank.launch().moe_dispatch_padded(
                Grid::new((1, 1), 256, 0),
                DevPtr::i32(s.ids),
                (rows * k) as i32,
                e as i32,
                k as i32,
                cap as i32,
                DevPtr::i32(s.gidx),
                DevPtr::i32(s.cidx),
                DevPtr::i32(s.ov_counts),
                DevPtr::i32(s.ov_offsets),
                DevPtr::i32(s.ov_gidx),
                DevPtr::i32(s.active + 4 * l as u64),
            )?;
            clock.mark(&rank.stream, 2)?;
            let padded = e * cap;
            rank.launch().gather_bf16(
                Grid::new((padded as u32, 1), 256, 0),
                DevPtr::act(s.xb),
                h as i32,
                DevPtr::i32(s.gidx),
                DevPtr::act(s.xg),
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
            let eh_ov = s.eh + ov * (d.elem_bytes * ie) as u64;
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
        rank.launch().combine(
            Grid::new((rows as u32, 1), 256, 0),
            DevPtr::f32(s.hidden),
            h as i32,
            k as i32,
            DevPtr::i32(s.cidx),
            DevPtr::f32(s.wts),
            DevPtr::f32(s.eo),
            DevPtr::f32(shared).or_null(),
            h as i32,
        )?;
        clock.mark(&rank.stream, 3)
    }

    /// SiLU-mul of the routed experts' `[gate | up]` rows (`s.gu`, f32) into `s.eh` (the down
    /// projections' input), `rows` rows.
    pub(crate) fn expert_silu(&self, rank: &RankState, rows: usize) -> Result<(), CudaError> {
        let (s, ie) = (rank.scratch, self.dims.expert_inter);
        rank.launch().silu_mul(
            Grid::new((rows as u32, 1), 256, 0),
            DevPtr::f32(s.gu),
            2 * ie as i32,
            DevPtr::f32(s.gu + 4 * ie as u64),
            2 * ie as i32,
            DevPtr::act(s.eh),
            ie as i32,
        )
    }

    /// The device dispatch of layer `l`'s routed experts over `r` on `rank`: counts, offsets and
    /// the compact layout on the device, then `moe_gemv` (or `bi_mma` in batch-invariant bf16
    /// mode) reading the counts there; the host never waits for the routes. Outputs in `s.eo`
    /// at each slot's compact row (`s.cidx`).
    pub(crate) fn experts_gemv(
        &self,
        rank: &RankState,
        l: usize,
        r: ExpertRows,
    ) -> Result<(), CudaError> {
        let d = self.dims;
        let s = rank.scratch;
        let (e, k, h, ie) = (d.experts, d.top_k, d.hidden, d.expert_inter);
        rank.launch().moe_dispatch(
            Grid::new((1, 1), 256, 0),
            DevPtr::i32(r.ids),
            (r.rows * k) as i32,
            e as i32,
            k as i32,
            DevPtr::i32(s.counts),
            DevPtr::i32(s.offsets),
            DevPtr::i32(s.gidx),
            DevPtr::i32(s.cidx),
            DevPtr::i32(s.active + 4 * l as u64),
            DevPtr::i32(r.owner).or_null(),
            r.me,
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
    /// the device, and the copy of its size to the host queued ([`RankState::fetch_info`]).
    pub(crate) fn experts_grouped_start(
        &self,
        rank: &RankState,
        l: usize,
        r: ExpertRows,
    ) -> Result<(), CudaError> {
        let d = self.dims;
        let s = rank.scratch;
        let (e, k, h, ie) = (d.experts, d.top_k, d.hidden, d.expert_inter);
        rank.launch().moe_dispatch_grouped(
            Grid::new((1, 1), 256, 0),
            DevPtr::i32(r.ids),
            (r.rows * k) as i32,
            e as i32,
            k as i32,
            d.gather_cap as i32,
            DevPtr::u64(s.etable + (8 * l * e) as u64),
            (d.elem_bytes * 2 * h * ie) as i64,
            s.xg,
            (d.elem_bytes * h) as i64,
            s.gu,
            (4 * 2 * ie) as i64,
            s.eh,
            (d.elem_bytes * ie) as i64,
            s.eo,
            (4 * h) as i64,
            DevPtr::i32(s.gidx),
            DevPtr::i32(s.cidx),
            DevPtr::u64(s.ptrs),
            DevPtr::i32(s.dinfo),
            DevPtr::i32(s.active + 4 * l as u64),
            DevPtr::i32(r.owner).or_null(),
            r.me,
        )?;
        rank.fetch_info()
    }

    /// The host dispatch's second half: waits for the layout's size, then gathers the rows and
    /// runs two pointer-array batched GEMMs (tensor cores) over the active experts, padded to
    /// the busiest one. A layout too large for the gather buffers (possible only for an
    /// expert-parallel step's rows from several ranks) goes through the device dispatch instead.
    pub(crate) fn experts_grouped_finish(
        &self,
        rank: &RankState,
        l: usize,
        r: ExpertRows,
    ) -> Result<(), CudaError> {
        let d = self.dims;
        let (s, h, ie) = (rank.scratch, d.hidden, d.expert_inter);
        let info = rank.wait_info()?;
        if info[2] != 0 {
            return Err(CudaError::Input(format!(
                "router produced an expert id outside 0..{}",
                d.experts
            )));
        }
        let (active, max_n) = (info[0].max(0) as usize, info[1].max(0) as usize);
        if active * max_n > d.gather_cap {
            if !moe_gemv_fits(h, ie, d.elem_bytes) {
                return Err(CudaError::Input(
                    "expert dispatch exceeds the gather buffer".into(),
                ));
            }
            return self.experts_gemv(rank, l, r);
        }
        let rows = (active * max_n) as u32;
        rank.launch().gather_bf16(
            Grid::new((rows, 1), 256, 0),
            DevPtr::act(r.x),
            h as i32,
            DevPtr::i32(s.gidx),
            DevPtr::act(s.xg),
        )?;
        let p = |i: usize| s.ptrs + (8 * i * active) as u64;
        rank.gemm_batched(p(0), p(1), p(2), 2 * ie, max_n, h, active)?;
        self.expert_silu(rank, rows as usize)?;
        rank.gemm_batched(p(3), p(4), p(5), h, max_n, ie, active)
    }
}
