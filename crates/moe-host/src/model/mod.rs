//! The model: weights resident in `hbm-vmm` chunks ([`weights`]) and the forward pass, cut into
//! the seams the multi-device engine composes.
//!
//! One decoder layer is:
//! 1. [`Model::attention_step`] on an attention rank: input norm, projections, rope, KV append into
//!    paged blocks, paged attention, output projection, residual add;
//! 2. [`Model::mlp_input`] (post-attention norm), then either a dense MLP ([`Model::dense_step`]) or
//!    [`Model::route`] → [`dispatch`] tokens to experts → [`Model::expert`] on any device that holds
//!    the expert → [`Model::combine`] back on the rank, in ascending expert id, plus shared experts.
//!
//! [`Model::mlp_step`] runs step 2 through an [`ExpertExec`] (who runs which expert is the
//! executor's business), [`Model::forward`] runs a whole batch on one device, and
//! [`runner::SingleDevice`] adds sequence bookkeeping for tests and the engine's simplest path.
//! KV blocks come from any [`KvBlocks`] store: [`crate::compute::VecKvBlocks`] in memory, or
//! [`kv::RegionKv`] over an `hbm-vmm` `PagedRegion` laid out the way `kv-pool` lays out its pool.
//!
//! Architecture invariant: nothing here depends on where a token's experts ran or what else is in
//! the batch; every seam is row-wise and combine order is fixed, so logits are bitwise identical
//! across batch mixes and placements. The model never decides placement and never owns memory
//! beyond the chunks its [`weights::DeviceWeights`] borrow from `hbm-vmm`.
//!
//! ```
//! use std::sync::Arc;
//! use moe_host::compute::cpu::CpuCompute;
//! use moe_model::config::ModelConfig;
//! use moe_host::model::{runner::SingleDevice, weights::MemTensors, Model};
//! use hbm_vmm::{host::{HostBackend, HostConfig}, DeviceId, Vmm};
//!
//! let cfg = ModelConfig::from_json_str(r#"{
//!   "architectures": ["MixtralForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
//!   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
//!   "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 40,
//!   "max_position_embeddings": 64
//! }"#).unwrap();
//! let model = Model::new(&cfg, CpuCompute::new()).unwrap();
//! let src = MemTensors::seeded(&cfg, 7); // random weights in memory
//! let vmm = Vmm::new(HostBackend::new(
//!     HostConfig::devices(1, 64 << 20).with_granularity(4096).unwrap()));
//! let mut run = SingleDevice::load(model, &vmm, DeviceId(0), &src, 4).unwrap();
//! let seq = run.add_sequence();
//! let logits = run.step(&[(seq, vec![1, 2, 3])]).unwrap();
//! assert_eq!(logits[0].len(), 40);
//! assert!(logits[0].iter().all(|l| l.is_finite()));
//! ```

pub mod kv;
pub mod runner;
pub mod weights;

use std::collections::BTreeMap;
use std::sync::Arc;

use hbm_vmm::{DeviceId, VmmError};

use crate::compute::{
    cpu::CpuCompute, AttnBatch, Compute, ComputeError, ExpertOutput, FfnWeights, GqaDims,
    GroupLimit, KvBlocks, KvGeometry, KvKind, MlaDims, Rope, RopeSite, RopeStyle, RouterSpec,
    SeqSpan, TokenRoute, YarnParams,
};
use moe_model::config::{Architecture, AttentionConfig, ModelConfig, TopkMethod};
use moe_model::schema::TensorRole;
use weights::{AttnWeights, GlobalWeights, LayerWeights, MlaQuery, MlpWeights, WeightLayout};

pub use moe_model::spec::AttnDims;

/// `eps` of DeepSeek-V2's `q_a_layernorm` and `kv_a_layernorm` (constructed without an `eps`
/// argument in the reference code, so the RMSNorm default).
const MLA_NORM_EPS: f32 = 1e-6;

/// What went wrong loading weights or running the model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A kernel refused its inputs.
    #[error(transparent)]
    Compute(#[from] ComputeError),
    /// Device memory could not be created or mapped.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// Reading a tensor from the checkpoint failed.
    #[error("reading tensor `{name}`: {source}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The weight layout has no tensor with this role (config and schema disagree).
    #[error("the weight layout has no {role:?} tensor")]
    Layout {
        /// The role looked for.
        role: TensorRole,
    },
    /// A chunk is smaller than the layout needs.
    #[error("a weight chunk holds {got} f32 elements but its layout needs {needed}")]
    ChunkTooSmall {
        /// Elements needed.
        needed: usize,
        /// Elements present.
        got: usize,
    },
    /// A layer index past the model's layers.
    #[error("layer {layer} does not exist in this model")]
    NoSuchLayer {
        /// The layer.
        layer: usize,
    },
    /// An expert that the layer does not have (or a dense layer).
    #[error("layer {layer} has no routed expert {expert}")]
    NoSuchExpert {
        /// The layer.
        layer: usize,
        /// The expert.
        expert: u32,
    },
    /// An expert that exists but is not held on the device asked to run it.
    #[error("expert {expert} of layer {layer} is not held on {device}")]
    ExpertNotHere {
        /// The layer.
        layer: usize,
        /// The expert.
        expert: u32,
        /// The device asked.
        device: DeviceId,
    },
    /// A chunk on the wrong device.
    #[error("the chunk is on {found}, but this device is {expected}")]
    WrongDevice {
        /// This device.
        expected: DeviceId,
        /// The chunk's device.
        found: DeviceId,
    },
    /// A batch buffer of the wrong length.
    #[error("{what}: expected {expected} elements, got {got}")]
    Shape {
        /// Which buffer.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// A config this model cannot run.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A sequence id the runner does not know.
    #[error("unknown sequence {0}")]
    NoSuchSequence(u64),
    /// A sequence listed twice in one step.
    #[error("sequence {0} appears twice in one step")]
    DuplicateSequence(u64),
    /// A step with no tokens for a sequence.
    #[error("sequence {0} was given no tokens in this step")]
    EmptyInput(u64),
}

fn check_shape(what: &'static str, expected: usize, got: usize) -> Result<(), ModelError> {
    if expected == got {
        Ok(())
    } else {
        Err(ModelError::Shape {
            what,
            expected,
            got,
        })
    }
}

/// Runs routed experts. The engine implements it over its devices; [`runner::LocalExperts`] runs
/// experts held by one [`weights::DeviceWeights`].
pub trait ExpertExec {
    /// Runs expert `expert` of `layer` on `rows` (`n * hidden`), writing `n * hidden` outputs.
    fn run(
        &mut self,
        layer: usize,
        expert: u32,
        rows: &[f32],
        out: &mut [f32],
    ) -> Result<(), ModelError>;
}

/// Tokens per expert for one layer: expert id (ascending) → `(token, slot)` pairs, where `slot` is
/// the expert's index in the token's route. Tokens appear in ascending order within each expert.
pub fn dispatch(routes: &[TokenRoute]) -> BTreeMap<u32, Vec<(usize, usize)>> {
    let mut m: BTreeMap<u32, Vec<(usize, usize)>> = BTreeMap::new();
    for (t, r) in routes.iter().enumerate() {
        for (s, c) in r.iter().enumerate() {
            m.entry(c.expert).or_default().push((t, s));
        }
    }
    m
}

/// The new tokens of one forward pass: sequences (with their block tables) and their tokens in
/// sequence order.
#[derive(Debug, Clone, Copy)]
pub struct StepBatch<'a> {
    /// The KV block layout.
    pub geo: &'a KvGeometry,
    /// The sequences, in row order.
    pub seqs: &'a [SeqSpan<'a>],
    /// Their new tokens, concatenated.
    pub tokens: &'a [u32],
}

/// Which rows [`Model::forward`] returns logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Each sequence's last new token (decoding, end of prefill).
    Last,
    /// Every new token.
    All,
}

/// A model's dimensions and derived constants, bound to a compute backend.
#[derive(Debug, Clone)]
pub struct Model<C: Compute = CpuCompute> {
    cfg: ModelConfig,
    layout: Arc<WeightLayout>,
    compute: C,
    rope: Rope,
    eps: f32,
    router: RouterSpec,
    attn: AttnDims,
}

impl<C: Compute> Model<C> {
    /// Derives everything the forward pass needs from `cfg`.
    pub fn new(cfg: &ModelConfig, compute: C) -> Result<Self, ModelError> {
        let scale = cfg.attention_softmax_scale() as f32;
        let (attn, style) = match &cfg.attention {
            AttentionConfig::Gqa(g) => (
                AttnDims::Gqa(GqaDims {
                    heads: g.num_heads,
                    kv_heads: g.num_kv_heads,
                    head_dim: g.head_dim,
                    scale,
                }),
                RopeStyle::Halves,
            ),
            AttentionConfig::Mla(m) => (
                AttnDims::Mla(MlaDims {
                    heads: m.num_heads,
                    qk_nope: m.qk_nope_head_dim,
                    qk_rope: m.qk_rope_head_dim,
                    v_head: m.v_head_dim,
                    kv_lora_rank: m.kv_lora_rank,
                    scale,
                }),
                RopeStyle::Interleaved,
            ),
        };
        let dim = cfg.attention.rope_dim();
        let rope = match &cfg.rope.yarn {
            None => Rope::new(dim, cfg.rope.theta, style)?,
            Some(y) => Rope::yarn(
                dim,
                cfg.rope.theta,
                style,
                YarnParams {
                    factor: y.factor,
                    original_max_position: y.original_max_position_embeddings as f64,
                    beta_fast: y.beta_fast,
                    beta_slow: y.beta_slow,
                    mscale: y.mscale,
                    mscale_all_dim: y.mscale_all_dim,
                },
            )?,
        };
        let moe = &cfg.moe;
        let groups = match moe.topk_method {
            TopkMethod::Greedy => None,
            TopkMethod::GroupLimitedGreedy {
                n_group,
                topk_group,
            } => Some(GroupLimit {
                n_group,
                topk_group,
            }),
        };
        // DeepSeek-V2 renormalises only when top_k > 1 and otherwise scales; Qwen3 and Mixtral
        // renormalise whenever norm_topk_prob is set and never scale.
        let normalize = match cfg.architecture {
            Architecture::DeepseekV2 => moe.norm_topk_prob && moe.top_k > 1,
            _ => moe.norm_topk_prob,
        };
        let router = RouterSpec {
            experts: moe.num_experts,
            top_k: moe.top_k,
            groups,
            normalize,
            scale: if normalize {
                1.0
            } else {
                moe.routed_scaling_factor as f32
            },
        };
        if cfg.num_moe_layers() > 0 && (router.top_k == 0 || router.top_k > router.experts) {
            return Err(ModelError::Unsupported(format!(
                "top_k {} with {} experts",
                router.top_k, router.experts
            )));
        }
        Ok(Self {
            cfg: cfg.clone(),
            layout: Arc::new(WeightLayout::new(cfg)),
            compute,
            rope,
            eps: cfg.rms_norm_eps as f32,
            router,
            attn,
        })
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The chunk layouts.
    pub fn layout(&self) -> &Arc<WeightLayout> {
        &self.layout
    }

    /// The compute backend.
    pub fn compute(&self) -> &C {
        &self.compute
    }

    /// The router's top-k rule.
    pub fn router_spec(&self) -> RouterSpec {
        self.router
    }

    /// The attention dimensions.
    pub fn attn_dims(&self) -> AttnDims {
        self.attn
    }

    /// The rotary embedding.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The KV block geometry for blocks of `block_tokens` tokens (the agreed layout).
    pub fn kv_geometry(&self, block_tokens: usize) -> KvGeometry {
        let kind = match self.attn {
            AttnDims::Gqa(d) => KvKind::Gqa {
                kv_heads: d.kv_heads,
                head_dim: d.head_dim,
            },
            AttnDims::Mla(d) => KvKind::Mla {
                kv_lora_rank: d.kv_lora_rank,
                rope_dim: d.qk_rope,
            },
        };
        KvGeometry {
            layers: self.cfg.num_layers,
            block_tokens,
            kind,
        }
    }

    fn hidden(&self) -> usize {
        self.cfg.hidden_size
    }

    fn linear(&self, x: &[f32], w: &[f32], i: usize, o: usize) -> Result<Vec<f32>, ModelError> {
        let rows = x.len() / i.max(1);
        let mut out = vec![0.0; rows * o];
        self.compute.linear(x, w, i, o, &mut out)?;
        Ok(out)
    }

    /// Token embeddings, one `hidden` row per token.
    pub fn embed(&self, g: &GlobalWeights<'_>, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let mut out = vec![0.0; tokens.len() * self.hidden()];
        self.compute
            .embed(g.embed, self.hidden(), tokens, &mut out)?;
        Ok(out)
    }

    /// Attention of one layer for a batch: `hidden` (the residual stream, one row per new token in
    /// `batch.seqs` order) gets the attention output added. The new tokens' KV entries are written
    /// into their blocks first.
    pub fn attention_step(
        &self,
        w: &LayerWeights<'_>,
        batch: AttnBatch<'_>,
        store: &mut dyn KvBlocks,
        hidden: &mut [f32],
    ) -> Result<(), ModelError> {
        let h = self.hidden();
        let rows = batch.rows();
        check_shape("attention hidden rows", rows * h, hidden.len())?;
        let positions: Vec<usize> = batch
            .seqs
            .iter()
            .flat_map(|s| s.start..s.start + s.len)
            .collect();
        let mut x = vec![0.0; rows * h];
        self.compute
            .rms_norm(hidden, w.input_norm, self.eps, &mut x)?;
        let attn_out = match (w.attn, self.attn) {
            (
                AttnWeights::Gqa {
                    q,
                    k,
                    v,
                    o,
                    q_norm,
                    k_norm,
                },
                AttnDims::Gqa(d),
            ) => {
                let (qw, kvw) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
                let mut qb = self.linear(&x, q, h, qw)?;
                let mut kb = self.linear(&x, k, h, kvw)?;
                let vb = self.linear(&x, v, h, kvw)?;
                if let Some(n) = q_norm {
                    self.compute.rms_norm_in_place(&mut qb, n, self.eps)?;
                }
                if let Some(n) = k_norm {
                    self.compute.rms_norm_in_place(&mut kb, n, self.eps)?;
                }
                let site = |width, heads| RopeSite {
                    row_width: width,
                    heads,
                    head_stride: d.head_dim,
                    offset: 0,
                };
                self.compute
                    .rope(&self.rope, site(qw, d.heads), &mut qb, &positions)?;
                self.compute
                    .rope(&self.rope, site(kvw, d.kv_heads), &mut kb, &positions)?;
                self.compute.kv_append_gqa(batch, store, &kb, &vb)?;
                let mut ab = vec![0.0; rows * qw];
                self.compute.attention_gqa(batch, store, d, &qb, &mut ab)?;
                self.linear(&ab, o, qw, h)?
            }
            (
                AttnWeights::Mla {
                    q,
                    kv_a,
                    kv_a_norm,
                    kv_b,
                    o,
                },
                AttnDims::Mla(d),
            ) => {
                let qhd = d.qk_nope + d.qk_rope;
                let qw = d.heads * qhd;
                let mut qb = match q {
                    MlaQuery::Proj(wq) => self.linear(&x, wq, h, qw)?,
                    MlaQuery::Lora { a, norm, b } => {
                        let r = norm.len();
                        let mut qa = self.linear(&x, a, h, r)?;
                        self.compute
                            .rms_norm_in_place(&mut qa, norm, MLA_NORM_EPS)?;
                        self.linear(&qa, b, r, qw)?
                    }
                };
                let r = d.kv_lora_rank;
                let kv = self.linear(&x, kv_a, h, r + d.qk_rope)?;
                let mut latent = Vec::with_capacity(rows * r);
                let mut k_pe = Vec::with_capacity(rows * d.qk_rope);
                for row in kv.chunks_exact(r + d.qk_rope) {
                    latent.extend_from_slice(&row[..r]);
                    k_pe.extend_from_slice(&row[r..]);
                }
                self.compute
                    .rms_norm_in_place(&mut latent, kv_a_norm, MLA_NORM_EPS)?;
                let q_site = RopeSite {
                    row_width: qw,
                    heads: d.heads,
                    head_stride: qhd,
                    offset: d.qk_nope,
                };
                self.compute.rope(&self.rope, q_site, &mut qb, &positions)?;
                let k_site = RopeSite {
                    row_width: d.qk_rope,
                    heads: 1,
                    head_stride: d.qk_rope,
                    offset: 0,
                };
                self.compute
                    .rope(&self.rope, k_site, &mut k_pe, &positions)?;
                self.compute.kv_append_mla(batch, store, &latent, &k_pe)?;
                let ow = d.heads * d.v_head;
                let mut ab = vec![0.0; rows * ow];
                self.compute
                    .attention_mla(batch, store, d, kv_b, &qb, &mut ab)?;
                self.linear(&ab, o, ow, h)?
            }
            _ => {
                return Err(ModelError::Unsupported(
                    "layer weights do not match the model's attention kind".into(),
                ))
            }
        };
        self.compute.add(hidden, &attn_out)?;
        Ok(())
    }

    /// The MLP input: `post_attention_layernorm` of the residual stream.
    pub fn mlp_input(&self, w: &LayerWeights<'_>, hidden: &[f32]) -> Result<Vec<f32>, ModelError> {
        let mut x = vec![0.0; hidden.len()];
        self.compute
            .rms_norm(hidden, w.post_norm, self.eps, &mut x)?;
        Ok(x)
    }

    /// Router top-k for a MoE layer's normed rows: each token's experts (ascending id) and weights.
    pub fn route(
        &self,
        w: &LayerWeights<'_>,
        normed: &[f32],
    ) -> Result<Vec<TokenRoute>, ModelError> {
        let MlpWeights::Moe { router, .. } = w.mlp else {
            return Err(ModelError::Unsupported("route() on a dense layer".into()));
        };
        let e = self.router.experts;
        let mut logits = vec![0.0; normed.len() / self.hidden().max(1) * e];
        self.compute
            .router_logits(normed, router, self.hidden(), e, &mut logits)?;
        Ok(self.compute.route(&logits, &self.router)?)
    }

    /// One routed expert on a group of rows (unweighted output, one `hidden` row per input row).
    /// Runs on any device that holds the expert.
    pub fn expert(&self, w: &FfnWeights<'_>, rows: &[f32]) -> Result<Vec<f32>, ModelError> {
        let mut out = vec![0.0; rows.len()];
        self.compute.swiglu(w, rows, &mut out)?;
        Ok(out)
    }

    /// The shared experts' output for a MoE layer's normed rows (`None` without shared experts).
    pub fn shared(
        &self,
        w: &LayerWeights<'_>,
        normed: &[f32],
    ) -> Result<Option<Vec<f32>>, ModelError> {
        match w.mlp {
            MlpWeights::Moe {
                shared: Some(f), ..
            } => self.expert(&f, normed).map(Some),
            _ => Ok(None),
        }
    }

    /// Adds each token's MoE output to its residual row. `results` holds, per token and per slot of
    /// its route, the expert's output row (`tokens * top_k * hidden`, route order); `shared` the
    /// shared experts' rows. Experts are summed in ascending id, whatever device ran them.
    pub fn combine(
        &self,
        routes: &[TokenRoute],
        results: &[f32],
        shared: Option<&[f32]>,
        hidden: &mut [f32],
    ) -> Result<(), ModelError> {
        let h = self.hidden();
        let k = self.router.top_k;
        check_shape("combine residual rows", routes.len() * h, hidden.len())?;
        check_shape(
            "combine expert results",
            routes.len() * k * h,
            results.len(),
        )?;
        if let Some(s) = shared {
            check_shape("combine shared rows", routes.len() * h, s.len())?;
        }
        for (t, (route, res)) in routes.iter().zip(hidden.chunks_exact_mut(h)).enumerate() {
            check_shape("route length", k, route.len())?;
            let parts: Vec<ExpertOutput<'_>> = route
                .iter()
                .enumerate()
                .map(|(s, c)| ExpertOutput {
                    expert: c.expert,
                    weight: c.weight,
                    row: &results[(t * k + s) * h..(t * k + s + 1) * h],
                })
                .collect();
            self.compute
                .combine(&parts, shared.map(|s| &s[t * h..(t + 1) * h]), res)?;
        }
        Ok(())
    }

    /// A dense layer's MLP added to the residual stream.
    pub fn dense_step(&self, w: &LayerWeights<'_>, hidden: &mut [f32]) -> Result<(), ModelError> {
        let MlpWeights::Dense(f) = w.mlp else {
            return Err(ModelError::Unsupported(
                "dense_step() on a MoE layer".into(),
            ));
        };
        let x = self.mlp_input(w, hidden)?;
        let y = self.expert(&f, &x)?;
        self.compute.add(hidden, &y)?;
        Ok(())
    }

    /// The feed-forward half of layer `layer` for a batch: dense MLP, or route, dispatch to
    /// `experts` one expert at a time (ascending id), shared experts and combine.
    pub fn mlp_step(
        &self,
        layer: usize,
        w: &LayerWeights<'_>,
        hidden: &mut [f32],
        experts: &mut dyn ExpertExec,
    ) -> Result<(), ModelError> {
        if let MlpWeights::Dense(_) = w.mlp {
            return self.dense_step(w, hidden);
        }
        let h = self.hidden();
        let k = self.router.top_k;
        let x = self.mlp_input(w, hidden)?;
        let routes = self.route(w, &x)?;
        for r in &routes {
            check_shape("route length", k, r.len())?;
        }
        let mut results = vec![0.0; routes.len() * k * h];
        for (e, group) in dispatch(&routes) {
            let mut rows = Vec::with_capacity(group.len() * h);
            for &(t, _) in &group {
                rows.extend_from_slice(&x[t * h..(t + 1) * h]);
            }
            let mut out = vec![0.0; rows.len()];
            experts.run(layer, e, &rows, &mut out)?;
            for (&(t, s), row) in group.iter().zip(out.chunks_exact(h)) {
                results[(t * k + s) * h..(t * k + s + 1) * h].copy_from_slice(row);
            }
        }
        let shared = self.shared(w, &x)?;
        self.combine(&routes, &results, shared.as_deref(), hidden)
    }

    /// Logits of the given residual rows: final norm, then the LM head.
    pub fn logits(&self, g: &GlobalWeights<'_>, hidden: &[f32]) -> Result<Vec<f32>, ModelError> {
        let mut x = vec![0.0; hidden.len()];
        self.compute.rms_norm(hidden, g.norm, self.eps, &mut x)?;
        let rows = hidden.len() / self.hidden();
        let mut out = vec![0.0; rows * self.cfg.vocab_size];
        self.compute
            .lm_head(&x, g.lm_head, self.hidden(), self.cfg.vocab_size, &mut out)?;
        Ok(out)
    }

    /// A whole forward pass of a batch on one device: `layers[l]` is layer `l`'s replicated
    /// weights, `experts` runs routed experts. Returns `vocab` logits per row: for every new token
    /// with [`Logits::All`], else for each sequence's last new token.
    pub fn forward(
        &self,
        global: &GlobalWeights<'_>,
        layers: &[LayerWeights<'_>],
        store: &mut dyn KvBlocks,
        batch: StepBatch<'_>,
        experts: &mut dyn ExpertExec,
        which: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        let StepBatch { geo, seqs, tokens } = batch;
        check_shape("layer weights", self.cfg.num_layers, layers.len())?;
        let rows: usize = seqs.iter().map(|s| s.len).sum();
        check_shape("forward tokens", rows, tokens.len())?;
        let h = self.hidden();
        let mut hidden = self.embed(global, tokens)?;
        for (l, w) in layers.iter().enumerate() {
            self.attention_step(
                w,
                AttnBatch {
                    geo,
                    layer: l,
                    seqs,
                },
                store,
                &mut hidden,
            )?;
            self.mlp_step(l, w, &mut hidden, experts)?;
        }
        if which == Logits::All {
            return self.logits(global, &hidden);
        }
        let mut last = Vec::with_capacity(seqs.len() * h);
        let mut end = 0;
        for s in seqs {
            end += s.len;
            if s.len > 0 {
                last.extend_from_slice(&hidden[(end - 1) * h..end * h]);
            }
        }
        self.logits(global, &last)
    }
}
