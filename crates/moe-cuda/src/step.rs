//! One forward step across the ranks: inputs uploaded and embedded, the layers run in lock step
//! (one host thread per rank, meeting twice per MoE layer when expert parallel), the LM head,
//! the greedy argmax and the read-back; phase timing.

use cudarc::driver::CudaStream;
use moe_engine::lockstep::Lockstep;
use moe_engine::{Need, RowOutput};
use moe_model::schema::TensorRole;

use crate::error::CudaError;
use crate::experts::DispatchPath;
use crate::kernels::{DevPtr, Grid};
use crate::runner::CudaRunner;
use crate::weights::{has_role, slot_addr};

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
pub(crate) struct PhaseClock {
    pub(crate) on: bool,
    pub(crate) last: std::time::Instant,
    pub(crate) acc: [f64; PHASES.len()],
}

impl PhaseClock {
    pub(crate) fn mark(&mut self, stream: &CudaStream, phase: usize) -> Result<(), CudaError> {
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
pub(crate) struct StepChunk {
    pub(crate) tokens: Vec<u32>,
    pub(crate) start: usize,
    pub(crate) blocks: Vec<u32>,
    pub(crate) sample: bool,
    /// What the engine needs of the sampled row.
    pub(crate) need: Need,
}

/// One rank's part of a step in flight, from [`CudaRunner::begin`] to [`CudaRunner::finish`].
pub(crate) struct RankStep {
    pub(crate) ri: usize,
    pub(crate) rows: usize,
    pub(crate) path: DispatchPath,
    /// What the engine needs of each sampled row, in order.
    pub(crate) needs: Vec<Need>,
    pub(crate) ctx_max: usize,
    pub(crate) clock: PhaseClock,
}

/// What a rank's host thread brings back from a step.
#[derive(Default)]
pub(crate) struct RankDone {
    pub(crate) out: Vec<RowOutput>,
    pub(crate) expert_bytes: u64,
    pub(crate) phases: [f64; PHASES.len()],
}

impl CudaRunner {
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
        rank.htod(rank.scratch.logits, logits)?;
        rank.launch().argmax_rows(
            Grid::new((n as u32, 1), 1024, 0),
            DevPtr::f32(rank.scratch.logits),
            vocab as i32,
            DevPtr::i32(rank.scratch.argmax),
        )?;
        let ids: Vec<i32> = rank.dtoh(rank.scratch.argmax, n)?;
        Ok(ids.into_iter().map(|i| u32::try_from(i).ok()).collect())
    }

    /// The per-step tables every rank that computes experts reads: the expert addresses
    /// (`[layer][expert]`; the padded path's down-projection table is uploaded by
    /// [`CudaRunner::begin`]), and zeroed active-expert counts (layers not routed on the device
    /// report none).
    pub(crate) fn upload_tables(&self, ri: usize, etable: &[u64]) -> Result<(), CudaError> {
        let rank = &self.ranks[ri];
        rank.bind()?;
        rank.htod(rank.scratch.etable, etable)?;
        rank.htod(rank.scratch.active, &vec![0i32; self.dims.layers])
    }

    /// Starts a step on rank `ri`: checks and uploads its rows (tokens, positions, block tables,
    /// sampled rows) and embeds them; `etable` is the step's expert address table (the padded path derives its down-projection table from it). `None` when the rank has no rows in this step.
    pub(crate) fn begin(
        &self,
        ri: usize,
        items: &[StepChunk],
        etable: &[u64],
    ) -> Result<Option<RankStep>, CudaError> {
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
        let s = rank.scratch;
        rank.htod(s.tokens, &tokens)?;
        rank.htod(s.pos, &pos)?;
        rank.htod(s.tbl_off, &tbl_off)?;
        rank.htod(s.tables, &tables)?;
        rank.htod(s.last, &last)?;
        if let DispatchPath::Padded(cap) = path {
            // Padded layout: expert e's rows at e * cap in xg / gu / eh / eo.
            let e = d.experts;
            let (h, ie) = (d.hidden as u64, d.expert_inter as u64);
            let es = d.elem_bytes as u64;
            let mut p = vec![0u64; 4 * e];
            for x in 0..e {
                let g = (x * cap) as u64;
                p[x] = s.xg + g * es * h;
                p[e + x] = s.gu + g * 4 * 2 * ie;
                p[2 * e + x] = s.eh + g * es * ie;
                p[3 * e + x] = s.eo + g * 4 * h;
            }
            rank.htod(s.pptrs, &p)?;
            let es_ie = (d.elem_bytes * 2 * d.hidden * d.expert_inter) as u64;
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
            d.elem_bytes,
        )?;
        rank.launch().embed(
            Grid::new((rows as u32, 1), 256, 0),
            DevPtr::i32(s.tokens),
            DevPtr::act(g_embed),
            DevPtr::f32(s.hidden),
            d.hidden as i32,
        )?;
        Ok(Some(RankStep {
            ri,
            rows,
            path,
            needs,
            ctx_max,
            clock,
        }))
    }

    /// Queues the end of a step on its rank: the final norm of every row, the LM head on the
    /// sampled rows and, where a greedy token is all the engine needs, the argmax.
    pub(crate) fn finish(&self, st: &RankStep) -> Result<(), CudaError> {
        let d = self.dims;
        let n = st.needs.len();
        if n == 0 {
            return Ok(());
        }
        let rank = &self.ranks[st.ri];
        rank.bind()?;
        let (s, h) = (rank.scratch, d.hidden);
        let eps = self.cfg.rms_norm_eps as f32;
        let glay = self.model.layout().global();
        let g_norm = slot_addr(
            rank.global.addr(),
            glay,
            TensorRole::FinalNorm,
            d.elem_bytes,
        )?;
        let g_head = if has_role(glay, TensorRole::LmHead) {
            slot_addr(rank.global.addr(), glay, TensorRole::LmHead, d.elem_bytes)?
        } else {
            slot_addr(
                rank.global.addr(),
                glay,
                TensorRole::Embedding,
                d.elem_bytes,
            )?
        };
        rank.rms(s.hidden, h, 1, 0, g_norm, h, eps, 0, 0, s.xb, h, st.rows)?;
        rank.launch().gather_bf16(
            Grid::new((n as u32, 1), 256, 0),
            DevPtr::act(s.xb),
            h as i32,
            DevPtr::i32(s.last),
            DevPtr::act(s.lastb),
        )?;
        rank.gemm(
            g_head, s.lastb, h, s.logits, d.vocab, false, n, h, d.vocab, 0.0,
        )?;
        if st.needs.contains(&Need::GreedyToken) {
            rank.launch().argmax_rows(
                Grid::new((n as u32, 1), 1024, 0),
                DevPtr::f32(s.logits),
                d.vocab as i32,
                DevPtr::i32(s.argmax),
            )?;
        }
        Ok(())
    }

    /// Runs one step: `per_rank[r]` on rank `r`; returns each rank's sampled rows' outputs, in
    /// order. With more than one rank, each rank's work is queued by a host thread of its own,
    /// so the GPUs run side by side and no rank waits for another's launches; expert parallel
    /// (see [`CudaRunner::set_expert_parallel`]) the threads meet twice per MoE layer, every GPU
    /// running its own experts for all the step's rows.
    pub(crate) fn step(
        &mut self,
        per_rank: &[Vec<StepChunk>],
    ) -> Result<Vec<Vec<RowOutput>>, CudaError> {
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
        let rank_step = |g: usize, st: Option<&mut RankStep>| -> Result<RankDone, CudaError> {
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
    pub(crate) fn layers(
        &self,
        g: usize,
        mut st: Option<&mut RankStep>,
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
    /// [`RankState::read_back`]); returns it and the bytes of routed experts the rank's GPU read.
    pub(crate) fn collect(
        &self,
        ri: usize,
        needs: &[Need],
    ) -> Result<(Vec<RowOutput>, u64), CudaError> {
        let d = self.dims;
        let rank = &self.ranks[ri];
        rank.bind()?;
        let (out, active) = rank.read_back(needs, d.vocab, d.layers)?;
        let routed: u64 = active.iter().map(|&a| a.max(0) as u64).sum();
        Ok((
            out,
            routed * (3 * d.hidden * d.expert_inter * d.elem_bytes) as u64,
        ))
    }
}
