//! The tensor schema: for a [`ModelConfig`], every tensor the real Hugging Face checkpoint has, with
//! its exact name, its shape, who owns it, and what it is.
//!
//! Shapes follow PyTorch: an `nn.Linear(in_features, out_features)` weight is stored
//! **`[out_features, in_features]`** (row-major), so `y = x · Wᵀ`. Norm weights are `[dim]`; the
//! embedding is `[vocab_size, hidden_size]`.
//!
//! Owners say which device needs a tensor: every attention rank needs `Global`, `Attention(l)`,
//! `Router(l)`, `DenseMlp(l)` and `SharedExperts(l)` (the replicated part); a routed expert
//! `Expert { layer, expert }` lives only where the placement puts it (one `hbm-vmm` chunk each).
//!
//! Names per architecture (`{l}` layer, `{e}` expert; all under `model.layers.{l}.` except globals):
//!
//! | what | Qwen3-MoE | Mixtral | DeepSeek-V2 |
//! |---|---|---|---|
//! | norms | `input_layernorm`, `post_attention_layernorm` | same | same |
//! | attention | `self_attn.{q,k,v,o}_proj`, `self_attn.{q,k}_norm` | `self_attn.{q,k,v,o}_proj` | `self_attn.q_proj` or `self_attn.q_a_proj`, `q_a_layernorm`, `q_b_proj`; `self_attn.kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj` |
//! | router | `mlp.gate` | `block_sparse_moe.gate` | `mlp.gate` |
//! | expert | `mlp.experts.{e}.{gate,up,down}_proj` | `block_sparse_moe.experts.{e}.{w1,w3,w2}` | `mlp.experts.{e}.{gate,up,down}_proj` |
//! | shared | — | — | `mlp.shared_experts.{gate,up,down}_proj` |
//! | dense layer | `mlp.{gate,up,down}_proj` | — | `mlp.{gate,up,down}_proj` |
//!
//! Globals: `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight` (absent when
//! `tie_word_embeddings`). Every name ends in `.weight`.
//!
//! ```
//! use moe_model::config::ModelConfig;
//! use moe_model::schema::{ModelSchema, TensorOwner, TensorRole};
//! let cfg = ModelConfig::from_json_str(r#"{
//!   "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
//!   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
//!   "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 300,
//!   "max_position_embeddings": 512
//! }"#).unwrap();
//! let schema = ModelSchema::new(&cfg);
//! let w1 = schema.find(TensorOwner::Expert { layer: 1, expert: 3 }, TensorRole::Gate).unwrap();
//! assert_eq!(w1.name, "model.layers.1.block_sparse_moe.experts.3.w1.weight");
//! assert_eq!(w1.shape, vec![128, 64]); // [out, in]
//! ```

use crate::config::{Architecture, AttentionConfig, DType, ModelConfig};
use std::collections::HashMap;

/// Who needs a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorOwner {
    /// Embedding, final norm, LM head.
    Global,
    /// A layer's attention block, including its `input_layernorm` and `post_attention_layernorm`.
    Attention(usize),
    /// A non-MoE layer's dense MLP.
    DenseMlp(usize),
    /// A MoE layer's shared experts (DeepSeek).
    SharedExperts(usize),
    /// A MoE layer's router.
    Router(usize),
    /// One routed expert of one MoE layer.
    Expert {
        /// Layer index.
        layer: usize,
        /// Expert index within the layer.
        expert: usize,
    },
}

impl TensorOwner {
    /// The layer this owner belongs to (`None` for `Global`).
    pub fn layer(self) -> Option<usize> {
        match self {
            TensorOwner::Global => None,
            TensorOwner::Attention(l)
            | TensorOwner::DenseMlp(l)
            | TensorOwner::SharedExperts(l)
            | TensorOwner::Router(l)
            | TensorOwner::Expert { layer: l, .. } => Some(l),
        }
    }
}

/// What a tensor is, independent of its architecture-specific name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TensorRole {
    /// Token embedding `[vocab, hidden]`.
    Embedding,
    /// Final RMS norm `[hidden]`.
    FinalNorm,
    /// Output projection `[vocab, hidden]`.
    LmHead,
    /// `input_layernorm` `[hidden]`.
    InputNorm,
    /// `post_attention_layernorm` `[hidden]`.
    PostAttentionNorm,
    /// `q_proj` (GQA: `[heads*head_dim, hidden]`; MLA without q LoRA: `[heads*q_head_dim, hidden]`).
    QProj,
    /// `k_proj` `[kv_heads*head_dim, hidden]`.
    KProj,
    /// `v_proj` `[kv_heads*head_dim, hidden]`.
    VProj,
    /// `o_proj` (GQA: `[hidden, heads*head_dim]`; MLA: `[hidden, heads*v_head_dim]`).
    OProj,
    /// Qwen3's per-head `q_norm` `[head_dim]`.
    QNorm,
    /// Qwen3's per-head `k_norm` `[head_dim]`.
    KNorm,
    /// MLA `q_a_proj` `[q_lora_rank, hidden]`.
    QAProj,
    /// MLA `q_a_layernorm` `[q_lora_rank]`.
    QANorm,
    /// MLA `q_b_proj` `[heads*q_head_dim, q_lora_rank]`.
    QBProj,
    /// MLA `kv_a_proj_with_mqa` `[kv_lora_rank + qk_rope_head_dim, hidden]`.
    KvAProjWithMqa,
    /// MLA `kv_a_layernorm` `[kv_lora_rank]`.
    KvANorm,
    /// MLA `kv_b_proj` `[heads*(qk_nope_head_dim + v_head_dim), kv_lora_rank]`.
    KvBProj,
    /// Router logits `[num_experts, hidden]`.
    RouterGate,
    /// SwiGLU gate projection `[inter, hidden]` (Mixtral `w1`).
    Gate,
    /// SwiGLU up projection `[inter, hidden]` (Mixtral `w3`).
    Up,
    /// SwiGLU down projection `[hidden, inter]` (Mixtral `w2`).
    Down,
}

impl TensorRole {
    /// Whether this is a norm weight (initialised to ones).
    pub fn is_norm(self) -> bool {
        matches!(
            self,
            TensorRole::FinalNorm
                | TensorRole::InputNorm
                | TensorRole::PostAttentionNorm
                | TensorRole::QNorm
                | TensorRole::KNorm
                | TensorRole::QANorm
                | TensorRole::KvANorm
        )
    }
}

/// One tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The exact Hugging Face name.
    pub name: String,
    /// The shape; for linear weights `[out_features, in_features]`.
    pub shape: Vec<usize>,
    /// Who needs it.
    pub owner: TensorOwner,
    /// What it is.
    pub role: TensorRole,
}

impl TensorSpec {
    fn new(name: String, shape: Vec<usize>, owner: TensorOwner, role: TensorRole) -> TensorSpec {
        TensorSpec {
            name,
            shape,
            owner,
            role,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes when stored as `dtype`.
    pub fn bytes(&self, dtype: DType) -> usize {
        self.numel() * dtype.size_bytes()
    }

    /// For a linear weight `[out, in]`, the fan-in `in`; for other tensors the last dimension.
    pub fn fan_in(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
}

/// The three SwiGLU projections of an expert or MLP, in a fixed order.
const SWIGLU_ROLES: [TensorRole; 3] = [TensorRole::Gate, TensorRole::Up, TensorRole::Down];

fn swiglu(
    prefix: &str,
    names: [&str; 3],
    hidden: usize,
    inter: usize,
    owner: TensorOwner,
) -> Vec<TensorSpec> {
    SWIGLU_ROLES
        .iter()
        .zip(names)
        .map(|(&role, n)| {
            let shape = if role == TensorRole::Down {
                vec![hidden, inter]
            } else {
                vec![inter, hidden]
            };
            TensorSpec::new(format!("{prefix}{n}.weight"), shape, owner, role)
        })
        .collect()
}

fn layer_prefix(l: usize) -> String {
    format!("model.layers.{l}.")
}

/// The name of the SwiGLU projection `role` (`Gate`, `Up` or `Down`) of routed expert `expert` of
/// layer `layer`.
pub fn expert_tensor_name(
    arch: Architecture,
    layer: usize,
    expert: usize,
    role: TensorRole,
) -> Option<String> {
    let i = SWIGLU_ROLES.iter().position(|&r| r == role)?;
    Some(match arch {
        Architecture::Mixtral => {
            format!(
                "model.layers.{layer}.block_sparse_moe.experts.{expert}.{}.weight",
                ["w1", "w3", "w2"][i]
            )
        }
        Architecture::Qwen3Moe | Architecture::DeepseekV2 => {
            format!(
                "model.layers.{layer}.mlp.experts.{expert}.{}.weight",
                ["gate_proj", "up_proj", "down_proj"][i]
            )
        }
    })
}

/// The global tensors: embedding, final norm, and (unless tied) the LM head.
pub fn global_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let mut t = vec![
        TensorSpec::new(
            "model.embed_tokens.weight".into(),
            vec![v, h],
            TensorOwner::Global,
            TensorRole::Embedding,
        ),
        TensorSpec::new(
            "model.norm.weight".into(),
            vec![h],
            TensorOwner::Global,
            TensorRole::FinalNorm,
        ),
    ];
    if !cfg.tie_word_embeddings {
        t.push(TensorSpec::new(
            "lm_head.weight".into(),
            vec![v, h],
            TensorOwner::Global,
            TensorRole::LmHead,
        ));
    }
    t
}

/// Layer `l`'s attention tensors, including both of its layer norms.
pub fn attention_tensors(cfg: &ModelConfig, l: usize) -> Vec<TensorSpec> {
    let h = cfg.hidden_size;
    let p = layer_prefix(l);
    let owner = TensorOwner::Attention(l);
    let t = |suffix: &str, shape: Vec<usize>, role| {
        TensorSpec::new(format!("{p}{suffix}"), shape, owner, role)
    };
    let mut out = vec![
        t("input_layernorm.weight", vec![h], TensorRole::InputNorm),
        t(
            "post_attention_layernorm.weight",
            vec![h],
            TensorRole::PostAttentionNorm,
        ),
    ];
    match &cfg.attention {
        AttentionConfig::Gqa(g) => {
            let (q, kv) = (g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim);
            out.push(t("self_attn.q_proj.weight", vec![q, h], TensorRole::QProj));
            out.push(t("self_attn.k_proj.weight", vec![kv, h], TensorRole::KProj));
            out.push(t("self_attn.v_proj.weight", vec![kv, h], TensorRole::VProj));
            out.push(t("self_attn.o_proj.weight", vec![h, q], TensorRole::OProj));
            if g.qk_norm {
                out.push(t(
                    "self_attn.q_norm.weight",
                    vec![g.head_dim],
                    TensorRole::QNorm,
                ));
                out.push(t(
                    "self_attn.k_norm.weight",
                    vec![g.head_dim],
                    TensorRole::KNorm,
                ));
            }
        }
        AttentionConfig::Mla(m) => {
            let q_out = m.num_heads * m.q_head_dim();
            match m.q_lora_rank {
                None => out.push(t(
                    "self_attn.q_proj.weight",
                    vec![q_out, h],
                    TensorRole::QProj,
                )),
                Some(r) => {
                    out.push(t(
                        "self_attn.q_a_proj.weight",
                        vec![r, h],
                        TensorRole::QAProj,
                    ));
                    out.push(t(
                        "self_attn.q_a_layernorm.weight",
                        vec![r],
                        TensorRole::QANorm,
                    ));
                    out.push(t(
                        "self_attn.q_b_proj.weight",
                        vec![q_out, r],
                        TensorRole::QBProj,
                    ));
                }
            }
            out.push(t(
                "self_attn.kv_a_proj_with_mqa.weight",
                vec![m.kv_lora_rank + m.qk_rope_head_dim, h],
                TensorRole::KvAProjWithMqa,
            ));
            out.push(t(
                "self_attn.kv_a_layernorm.weight",
                vec![m.kv_lora_rank],
                TensorRole::KvANorm,
            ));
            out.push(t(
                "self_attn.kv_b_proj.weight",
                vec![
                    m.num_heads * (m.qk_nope_head_dim + m.v_head_dim),
                    m.kv_lora_rank,
                ],
                TensorRole::KvBProj,
            ));
            out.push(t(
                "self_attn.o_proj.weight",
                vec![h, m.num_heads * m.v_head_dim],
                TensorRole::OProj,
            ));
        }
    }
    out
}

fn mlp_prefix(arch: Architecture, l: usize) -> String {
    match arch {
        Architecture::Mixtral => format!("{}block_sparse_moe.", layer_prefix(l)),
        _ => format!("{}mlp.", layer_prefix(l)),
    }
}

/// Layer `l`'s router tensors (empty for a dense layer).
pub fn router_tensors(cfg: &ModelConfig, l: usize) -> Vec<TensorSpec> {
    if !cfg.is_moe_layer(l) {
        return Vec::new();
    }
    vec![TensorSpec::new(
        format!("{}gate.weight", mlp_prefix(cfg.architecture, l)),
        vec![cfg.moe.num_experts, cfg.hidden_size],
        TensorOwner::Router(l),
        TensorRole::RouterGate,
    )]
}

/// Layer `l`'s dense MLP (empty for a MoE layer).
pub fn dense_mlp_tensors(cfg: &ModelConfig, l: usize) -> Vec<TensorSpec> {
    if cfg.is_moe_layer(l) || l >= cfg.num_layers {
        return Vec::new();
    }
    swiglu(
        &mlp_prefix(cfg.architecture, l),
        ["gate_proj", "up_proj", "down_proj"],
        cfg.hidden_size,
        cfg.intermediate_size,
        TensorOwner::DenseMlp(l),
    )
}

/// Layer `l`'s shared experts, stored as one SwiGLU of width
/// `n_shared_experts * moe_intermediate_size` (empty unless a MoE layer with shared experts).
pub fn shared_expert_tensors(cfg: &ModelConfig, l: usize) -> Vec<TensorSpec> {
    if !cfg.is_moe_layer(l) || cfg.moe.n_shared_experts == 0 {
        return Vec::new();
    }
    swiglu(
        &format!("{}shared_experts.", mlp_prefix(cfg.architecture, l)),
        ["gate_proj", "up_proj", "down_proj"],
        cfg.hidden_size,
        cfg.moe.n_shared_experts * cfg.moe.expert_intermediate_size,
        TensorOwner::SharedExperts(l),
    )
}

/// Routed expert `e` of layer `l`: gate, up, down in that order (empty for a dense layer or an
/// out-of-range expert).
pub fn expert_tensors(cfg: &ModelConfig, l: usize, e: usize) -> Vec<TensorSpec> {
    if !cfg.is_moe_layer(l) || e >= cfg.moe.num_experts {
        return Vec::new();
    }
    let names = match cfg.architecture {
        Architecture::Mixtral => ["w1", "w3", "w2"],
        _ => ["gate_proj", "up_proj", "down_proj"],
    };
    swiglu(
        &format!("{}experts.{e}.", mlp_prefix(cfg.architecture, l)),
        names,
        cfg.hidden_size,
        cfg.moe.expert_intermediate_size,
        TensorOwner::Expert {
            layer: l,
            expert: e,
        },
    )
}

/// Every tensor of layer `l`: attention, then router, shared experts or dense MLP, then the routed
/// experts in expert order.
pub fn layer_tensors(cfg: &ModelConfig, l: usize) -> Vec<TensorSpec> {
    let mut t = attention_tensors(cfg, l);
    t.extend(router_tensors(cfg, l));
    t.extend(shared_expert_tensors(cfg, l));
    t.extend(dense_mlp_tensors(cfg, l));
    if cfg.is_moe_layer(l) {
        for e in 0..cfg.moe.num_experts {
            t.extend(expert_tensors(cfg, l, e));
        }
    }
    t
}

/// All tensors of a model, in a fixed order (embedding first, then layers in order, then final norm
/// and LM head), with a by-name index.
#[derive(Debug, Clone)]
pub struct ModelSchema {
    tensors: Vec<TensorSpec>,
    by_name: HashMap<String, usize>,
    by_owner_role: HashMap<(TensorOwner, TensorRole), usize>,
}

impl ModelSchema {
    /// The full schema of `cfg`. For full-size models this is a few thousand small entries (tensor
    /// descriptions only, no data).
    pub fn new(cfg: &ModelConfig) -> ModelSchema {
        let globals = global_tensors(cfg);
        let mut tensors = Vec::new();
        tensors.extend(
            globals
                .iter()
                .filter(|t| t.role == TensorRole::Embedding)
                .cloned(),
        );
        for l in 0..cfg.num_layers {
            tensors.extend(layer_tensors(cfg, l));
        }
        tensors.extend(
            globals
                .into_iter()
                .filter(|t| t.role != TensorRole::Embedding),
        );
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let by_owner_role = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| ((t.owner, t.role), i))
            .collect();
        ModelSchema {
            tensors,
            by_name,
            by_owner_role,
        }
    }

    /// Every tensor, in schema order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor with this owner and role (each pair is unique).
    pub fn find(&self, owner: TensorOwner, role: TensorRole) -> Option<&TensorSpec> {
        self.by_owner_role
            .get(&(owner, role))
            .map(|&i| &self.tensors[i])
    }

    /// The tensors of one owner, in schema order.
    pub fn owned_by(&self, owner: TensorOwner) -> impl Iterator<Item = &TensorSpec> + '_ {
        self.tensors.iter().filter(move |t| t.owner == owner)
    }

    /// The tensors an attention rank replicates: everything except routed experts.
    pub fn replicated(&self) -> impl Iterator<Item = &TensorSpec> + '_ {
        self.tensors
            .iter()
            .filter(|t| !matches!(t.owner, TensorOwner::Expert { .. }))
    }

    /// Total elements.
    pub fn total_params(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    /// Total bytes when stored as `dtype`.
    pub fn total_bytes(&self, dtype: DType) -> usize {
        self.total_params() * dtype.size_bytes()
    }
}
