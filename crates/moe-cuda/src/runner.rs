//! [`CudaRunner`]: building it (weights, KV, ranks, experts), its settings and accessors, and
//! the engine's [`Runner`] seam.

use std::collections::BTreeMap;

use cudarc::driver::sys;
use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::{DeviceId, Vmm};
use moe_engine::{
    KvLedger, Need, RankId, RankKv, RequestLimits, RowOutput, RunError, Runner, Work,
};
use moe_host::compute::cpu::CpuCompute;
use moe_host::model::Model;
use moe_model::config::ModelConfig;
use moe_model::schema;
use moe_model::spec::{AttnDims, KvGeometry};
use moe_model::weights::{ChunkLayout, TensorSource};

use crate::config::{check_config, CudaConfig};
use crate::device::device_count;
use crate::error::{cu, CudaError};
use crate::experts::{padded_capacity, DEVICE_DISPATCH_MAX_ROWS, PADDED_DISPATCH_MAX_ROWS};
use crate::kv_ledger::{BlockLedger, RankBlocks};
use crate::memory::{DevBuf, Dims};
use crate::rank::RankState;
use crate::step::{StepChunk, PHASES};
use crate::weights::{ExpertBuf, Fill};

/// The model on one or more GPUs, serving the engine (see the module docs).
pub struct CudaRunner {
    pub(crate) ranks: Vec<RankState>,
    pub(crate) experts: Vec<Vec<ExpertBuf>>,
    pub(crate) model: Model<CpuCompute>,
    pub(crate) cfg: ModelConfig,
    pub(crate) config: CudaConfig,
    pub(crate) dims: Dims,
    pub(crate) geo: KvGeometry,
    pub(crate) ledger: BlockLedger,
    pub(crate) last_expert_bytes: u64,
    pub(crate) phase_timing: bool,
    pub(crate) phases: [f64; PHASES.len()],
    pub(crate) device_dispatch_max_rows: usize,
    pub(crate) padded_dispatch_max_rows: usize,
    pub(crate) forced_capacity: Option<usize>,
    pub(crate) expert_parallel: bool,
    pub(crate) vmm: Vmm<CudaBackend>,
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
        let mut per_rank: Vec<Vec<StepChunk>> = vec![Vec::new(); self.ranks.len()];
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
            per_rank[ri].push(StepChunk {
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

    pub(crate) fn build(
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
    pub(crate) fn build_on(
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
            hidden: h,
            vocab: cfg.vocab_size,
            q_width: qw,
            kv_width: kvw,
            q_lora_rank: qr,
            attn_width: attw,
            latent_width: lat,
            inter_max,
            expert_inter: inter_e,
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
            elem_bytes: config.precision.elem_bytes(),
            layers: cfg.num_layers,
            gpus: n_dev,
        };
        // Shared memory of the attention kernels: the query parts plus one score per context token.
        let smem = 4 * (dims.latent_width.max(qw) + max_context) + 256;
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
        let es = dims.elem_bytes;
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
        let ledger = BlockLedger {
            block_tokens: config.block_tokens,
            ranks: devs
                .iter()
                .map(|d| {
                    (
                        RankId(d.0),
                        RankBlocks {
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
        (self.dims.elem_bytes * f) as u64
    }

    /// Routed-expert weight bytes the last step read (each active expert once per rank and layer).
    pub fn last_step_expert_bytes(&self) -> u64 {
        self.last_expert_bytes
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

    pub(crate) fn rank_index(&self, r: RankId) -> Option<usize> {
        self.ranks.iter().position(|k| k.dev.0 == r.0)
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
}
