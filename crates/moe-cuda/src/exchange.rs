//! The expert-parallel exchange: each rank pushes its rows and routes into every GPU's exchange
//! chunk, each GPU runs its own experts over all ranks' rows and returns the outputs to the
//! owning rank, which combines them in ascending expert id.

use crate::error::CudaError;
use crate::experts::{DispatchPath, ExpertRows};
use crate::kernels::{DevPtr, Grid};
use crate::memory::Dims;
use crate::runner::CudaRunner;
use crate::step::RankStep;

/// A rank's expert-parallel exchange buffers, in a chunk every GPU of the machine may read and
/// write: the other ranks push their rows in, the expert owners push their outputs back.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ExchangeBuffers {
    /// Every rank's normalised rows of the step (bf16), in rank order.
    pub(crate) rows_in: u64,
    /// Every rank's routes of the step (`top_k` expert ids per row), in rank order.
    pub(crate) routes_in: u64,
    /// This rank's rows' expert outputs (f32, `top_k` rows of `h` per row), in slot order.
    pub(crate) returned: u64,
}

impl ExchangeBuffers {
    /// Bytes of the three buffers (`rows_in`, `routes_in`, `returned`) for a rank of sizes `d`.
    fn sizes(d: &Dims) -> [usize; 3] {
        [
            d.elem_bytes * d.ep_rows() * d.hidden,
            4 * d.ep_rows() * d.top_k,
            4 * d.rows * d.top_k * d.hidden,
        ]
    }

    /// Bytes of the exchange chunk: the three buffers at 256-byte alignment.
    pub(crate) fn bytes(d: &Dims) -> usize {
        Self::sizes(d).iter().map(|b| b.div_ceil(256) * 256).sum()
    }

    /// The buffers' addresses in an exchange chunk of [`ExchangeBuffers::bytes`] mapped at `base`.
    pub(crate) fn carve(base: u64, d: &Dims) -> Self {
        let x_sizes = Self::sizes(d);
        ExchangeBuffers {
            rows_in: base,
            routes_in: base + (x_sizes[0].div_ceil(256) * 256) as u64,
            returned: base + ((x_sizes[0].div_ceil(256) + x_sizes[1].div_ceil(256)) * 256) as u64,
        }
    }
}

impl CudaRunner {
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
    pub(crate) fn expert_owners(&self) -> Option<Vec<i32>> {
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
    pub(crate) fn ep_tables(
        &self,
        g: usize,
        owners: &[i32],
        offs: &[i32],
    ) -> Result<(), CudaError> {
        let rank = &self.ranks[g];
        rank.bind()?;
        let rets: Vec<u64> = self.ranks.iter().map(|r| r.exchange.returned).collect();
        rank.htod(rank.scratch.eowner, owners)?;
        rank.htod(rank.scratch.ep_offs, offs)?;
        rank.htod(rank.scratch.ep_rets, &rets)
    }

    /// Expert parallel, layer `l`, on a rank with rows: pushes its normalised rows and routes to
    /// every GPU (at its first global row `off`), then queues its shared experts (they need
    /// only its own rows).
    pub(crate) fn ep_publish(
        &self,
        st: &mut RankStep,
        l: usize,
        off: usize,
    ) -> Result<(), CudaError> {
        let d = self.dims;
        let rank = &self.ranks[st.ri];
        rank.bind()?;
        let (s, rows) = (rank.scratch, st.rows);
        let xrow = d.elem_bytes * d.hidden;
        for g in &self.ranks {
            rank.dtod(g.exchange.rows_in + (off * xrow) as u64, s.xb, rows * xrow)?;
            rank.dtod(
                g.exchange.routes_in + (4 * off * d.top_k) as u64,
                s.ids,
                4 * rows * d.top_k,
            )?;
        }
        rank.ev_pub
            .record(&rank.stream)
            .map_err(CudaError::driver("cuEventRecord"))?;
        if self.cfg.moe.n_shared_experts > 0 {
            let inter = self.cfg.moe.n_shared_experts * d.expert_inter;
            self.swiglu(rank, l, rows, inter, s.y, d.hidden, 0.0)?;
        }
        st.clock.mark(&rank.stream, 2)
    }

    /// Expert parallel, layer `l`, on GPU `g`: waits for the rows of the ranks in `from`, lays
    /// out the slots routed to its own experts among the step's `total` rows and runs them. On
    /// the device dispatch it also sends the outputs back and returns false; on the host
    /// dispatch it returns true and [`CudaRunner::ep_finish`] completes the layer once the
    /// layout's size is on the host.
    pub(crate) fn ep_experts(
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
    pub(crate) fn ep_finish(&self, g: usize, l: usize, total: usize) -> Result<(), CudaError> {
        let gr = &self.ranks[g];
        gr.bind()?;
        self.experts_grouped_finish(gr, l, ExpertRows::gathered(gr, g, l, total, &self.dims))?;
        self.ep_return(g, l, total)
    }

    /// Expert parallel: GPU `g` sends its experts' outputs to the ranks whose rows they are and
    /// records that it has.
    pub(crate) fn ep_return(&self, g: usize, l: usize, total: usize) -> Result<(), CudaError> {
        let d = self.dims;
        let gr = &self.ranks[g];
        let s = gr.scratch;
        gr.launch().ep_return(
            Grid::new(((total * d.top_k) as u32, 1), 128, 0),
            DevPtr::i32(gr.exchange.routes_in),
            d.experts as i32,
            DevPtr::i32(s.eowner + (4 * l * d.experts) as u64),
            g as i32,
            DevPtr::i32(s.cidx),
            DevPtr::f32(s.eo),
            d.hidden as i32,
            d.top_k as i32,
            DevPtr::i32(s.ep_offs),
            self.ranks.len() as i32,
            DevPtr::u64(s.ep_rets),
        )?;
        gr.ev_ret
            .record(&gr.stream)
            .map_err(CudaError::driver("cuEventRecord"))
    }

    /// Expert parallel, layer `l`, on a rank with rows: waits for every GPU's outputs, then adds
    /// its rows' weighted expert outputs (ascending expert id, as on one GPU) and shared experts
    /// into the residual stream.
    pub(crate) fn ep_combine(&self, st: &mut RankStep) -> Result<(), CudaError> {
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
        let s = rank.scratch;
        let shared = if self.cfg.moe.n_shared_experts > 0 {
            s.y
        } else {
            0
        };
        rank.launch().combine(
            Grid::new((st.rows as u32, 1), 256, 0),
            DevPtr::f32(s.hidden),
            d.hidden as i32,
            d.top_k as i32,
            DevPtr::i32(s.iota),
            DevPtr::f32(s.wts),
            DevPtr::f32(rank.exchange.returned),
            DevPtr::f32(shared).or_null(),
            d.hidden as i32,
        )?;
        st.clock.mark(&rank.stream, 3)
    }
}
