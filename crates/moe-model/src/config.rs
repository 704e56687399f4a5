//! Model configuration, parsed from a Hugging Face `config.json`.
//!
//! Three architectures are understood, under their HF class names:
//!
//! | `architectures[0]`        | attention                          | routed MoE                                   |
//! |---------------------------|------------------------------------|----------------------------------------------|
//! | `Qwen3MoeForCausalLM`     | GQA with per-head q/k RMS norms    | softmax top-k, optional `norm_topk_prob`     |
//! | `MixtralForCausalLM`      | GQA                                | softmax top-k, always renormalised           |
//! | `DeepseekV2ForCausalLM`   | MLA (latent KV, optional q LoRA)   | greedy or group-limited top-k, shared experts |
//!
//! [`ModelConfig`] is architecture-neutral: the engine asks it questions (how many experts, is layer
//! `l` an MoE layer, how many bytes per expert) instead of matching on the architecture everywhere.
//! [`ModelConfig::to_hf_json`] writes the config back out with exactly the keys the real checkpoints
//! use, so a directory written by `gen-model` loads in transformers.
//!
//! Parsing follows transformers' defaults for optional keys, but the keys that fix tensor shapes
//! (`hidden_size`, `num_hidden_layers`, head counts, expert counts and sizes, MLA ranks) are required:
//! a config that omits them gives [`ConfigError::MissingField`] naming the key instead of silently
//! assuming a default. Every error names the JSON key it is about.
//!
//! ```
//! use moe_model::config::{Architecture, ModelConfig};
//! let json = r#"{
//!   "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
//!   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
//!   "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 300,
//!   "max_position_embeddings": 512
//! }"#;
//! let cfg = ModelConfig::from_json_str(json).unwrap();
//! assert_eq!(cfg.architecture, Architecture::Mixtral);
//! assert_eq!(cfg.num_moe_layers(), 2);
//! assert_eq!(cfg.top_k(), 2);
//! ```

use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};

/// What went wrong reading a `config.json`. Every variant names the offending key (dotted for
/// nested keys, e.g. `rope_scaling.factor`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read model config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not JSON, or not a JSON object.
    #[error("model config is not a JSON object: {0}")]
    NotJson(String),
    /// `architectures` (or `model_type`) names an architecture this engine does not implement.
    #[error("unknown architecture {found:?} in field `architectures`; supported: Qwen3MoeForCausalLM, MixtralForCausalLM, DeepseekV2ForCausalLM")]
    UnknownArchitecture {
        /// What the config says.
        found: String,
    },
    /// A required key is absent (or `null` where a value is needed).
    #[error("missing field `{field}` in model config")]
    MissingField {
        /// The key.
        field: String,
    },
    /// A key has the wrong JSON type or an unparsable value.
    #[error("malformed field `{field}`: expected {expected}, found {found}")]
    Malformed {
        /// The key.
        field: String,
        /// What was expected.
        expected: &'static str,
        /// What was found (JSON text).
        found: String,
    },
    /// A key is well-formed but inconsistent with the rest of the config.
    #[error("invalid field `{field}`: {reason}")]
    Invalid {
        /// The key.
        field: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A key asks for a feature this engine does not implement.
    #[error("unsupported value for field `{field}`: {value} ({reason})")]
    Unsupported {
        /// The key.
        field: String,
        /// The value (JSON text).
        value: String,
        /// What is supported instead.
        reason: &'static str,
    },
}

impl ConfigError {
    /// The JSON key this error is about, if it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::MissingField { field }
            | ConfigError::Malformed { field, .. }
            | ConfigError::Invalid { field, .. }
            | ConfigError::Unsupported { field, .. } => Some(field),
            ConfigError::UnknownArchitecture { .. } => Some("architectures"),
            ConfigError::Io { .. } | ConfigError::NotJson(_) => None,
        }
    }
}

/// Storage element type of a tensor (checkpoint or device copy). Compute is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name transformers uses in `torch_dtype` (`float32`, `float16`, `bfloat16`).
    pub const fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// Parses a `torch_dtype` name.
    pub fn from_torch_name(s: &str) -> Option<DType> {
        match s {
            "float32" | "float" => Some(DType::F32),
            "float16" | "half" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// The model architecture (HF class name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// `Qwen3MoeForCausalLM` (`model_type` `qwen3_moe`).
    Qwen3Moe,
    /// `MixtralForCausalLM` (`model_type` `mixtral`).
    Mixtral,
    /// `DeepseekV2ForCausalLM` (`model_type` `deepseek_v2`).
    DeepseekV2,
}

impl Architecture {
    /// The HF class name, as written in `architectures`.
    pub const fn hf_class(self) -> &'static str {
        match self {
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
            Architecture::Mixtral => "MixtralForCausalLM",
            Architecture::DeepseekV2 => "DeepseekV2ForCausalLM",
        }
    }

    /// The HF `model_type`.
    pub const fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Mixtral => "mixtral",
            Architecture::DeepseekV2 => "deepseek_v2",
        }
    }

    fn from_hf_class(s: &str) -> Option<Architecture> {
        [
            Architecture::Qwen3Moe,
            Architecture::Mixtral,
            Architecture::DeepseekV2,
        ]
        .into_iter()
        .find(|a| a.hf_class() == s)
    }

    fn from_model_type(s: &str) -> Option<Architecture> {
        [
            Architecture::Qwen3Moe,
            Architecture::Mixtral,
            Architecture::DeepseekV2,
        ]
        .into_iter()
        .find(|a| a.model_type() == s)
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hf_class())
    }
}

/// Grouped-query attention (Qwen3-MoE, Mixtral).
#[derive(Debug, Clone, PartialEq)]
pub struct GqaConfig {
    /// Query heads (`num_attention_heads`).
    pub num_heads: usize,
    /// Key/value heads (`num_key_value_heads`); divides `num_heads`.
    pub num_kv_heads: usize,
    /// Per-head dimension (`head_dim`, default `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// Per-head RMS norm on q and k before rope (`q_norm`, `k_norm`; Qwen3 only).
    pub qk_norm: bool,
}

/// Multi-head latent attention (DeepSeek-V2).
///
/// Per token, `kv_a_proj_with_mqa` produces `kv_lora_rank + qk_rope_head_dim` values: the latent
/// (normed by `kv_a_layernorm`, then expanded by `kv_b_proj` into per-head `qk_nope_head_dim` keys and
/// `v_head_dim` values) and one rope key shared by all heads.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// Heads (`num_attention_heads`).
    pub num_heads: usize,
    /// Query compression rank (`q_lora_rank`); `None` means a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// KV latent rank (`kv_lora_rank`).
    pub kv_lora_rank: usize,
    /// Per-head non-rope q/k dimension (`qk_nope_head_dim`).
    pub qk_nope_head_dim: usize,
    /// Per-head rope q/k dimension (`qk_rope_head_dim`).
    pub qk_rope_head_dim: usize,
    /// Per-head value dimension (`v_head_dim`).
    pub v_head_dim: usize,
}

impl MlaConfig {
    /// Per-head q/k dimension: `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn q_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

/// The attention flavour of a model.
#[derive(Debug, Clone, PartialEq)]
pub enum AttentionConfig {
    /// Grouped-query attention.
    Gqa(GqaConfig),
    /// Multi-head latent attention.
    Mla(MlaConfig),
}

impl AttentionConfig {
    /// Number of query heads.
    pub fn num_heads(&self) -> usize {
        match self {
            AttentionConfig::Gqa(g) => g.num_heads,
            AttentionConfig::Mla(m) => m.num_heads,
        }
    }

    /// Number of rotary dimensions per head (the full head for GQA, `qk_rope_head_dim` for MLA).
    pub fn rope_dim(&self) -> usize {
        match self {
            AttentionConfig::Gqa(g) => g.head_dim,
            AttentionConfig::Mla(m) => m.qk_rope_head_dim,
        }
    }

    /// Per-head q·k dimension (what the softmax scale is computed from before any yarn mscale).
    pub fn qk_head_dim(&self) -> usize {
        match self {
            AttentionConfig::Gqa(g) => g.head_dim,
            AttentionConfig::Mla(m) => m.q_head_dim(),
        }
    }

    /// Elements cached per token per layer.
    ///
    /// GQA caches K and V: `2 * num_kv_heads * head_dim`. MLA caches the compressed latent after
    /// `kv_a_layernorm` plus the shared rope key: `kv_lora_rank + qk_rope_head_dim` (the "absorbed"
    /// form; the per-head keys/values are re-expanded from it through `kv_b_proj`).
    pub fn kv_elems_per_token(&self) -> usize {
        match self {
            AttentionConfig::Gqa(g) => 2 * g.num_kv_heads * g.head_dim,
            AttentionConfig::Mla(m) => m.kv_lora_rank + m.qk_rope_head_dim,
        }
    }
}

/// How the router picks experts (DeepSeek's `topk_method`; Qwen3 and Mixtral are always `Greedy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Top-k over all routed experts (`greedy`, also HF's default spelling `gready`).
    Greedy,
    /// Experts are split into `n_group` equal groups; keep the `topk_group` groups with the highest
    /// best-expert score, then take the top-k among their experts (`group_limited_greedy`).
    GroupLimitedGreedy {
        /// Number of expert groups (`n_group`).
        n_group: usize,
        /// Groups kept per token (`topk_group`).
        topk_group: usize,
    },
}

/// The router's score function (`scoring_func`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    /// Softmax over all routed experts' logits (in f32).
    Softmax,
}

/// Which layers have a routed MoE block; the rest have a dense MLP of `intermediate_size`.
#[derive(Debug, Clone, PartialEq)]
pub enum MoeLayerRule {
    /// Every layer (Mixtral).
    All,
    /// Qwen3: layer `l` is MoE iff `l` is not in `mlp_only_layers` and
    /// `(l + 1).is_multiple_of(*decoder_sparse_step)`.
    Qwen3 {
        /// `decoder_sparse_step` (≥ 1).
        decoder_sparse_step: usize,
        /// `mlp_only_layers`.
        mlp_only_layers: Vec<usize>,
    },
    /// DeepSeek: layer `l` is MoE iff `l >= first_k_dense_replace` and `l.is_multiple_of(*moe_layer_freq)`.
    DeepSeek {
        /// `first_k_dense_replace`.
        first_k_dense_replace: usize,
        /// `moe_layer_freq` (≥ 1).
        moe_layer_freq: usize,
    },
}

/// The routed-expert part of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Routed experts per MoE layer (`num_experts` / `num_local_experts` / `n_routed_experts`).
    pub num_experts: usize,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub top_k: usize,
    /// Hidden size of one routed expert's SwiGLU (`moe_intermediate_size`; Mixtral's
    /// `intermediate_size`).
    pub expert_intermediate_size: usize,
    /// Shared (always-on) experts per MoE layer (`n_shared_experts`; 0 for Qwen3 and Mixtral). They
    /// are stored as one SwiGLU of width `n_shared_experts * expert_intermediate_size`.
    pub n_shared_experts: usize,
    /// Renormalise the top-k weights to sum to 1 (`norm_topk_prob`; always true for Mixtral).
    pub norm_topk_prob: bool,
    /// Multiplier on the routed output (`routed_scaling_factor`; 1.0 outside DeepSeek). In
    /// DeepSeek-V2's reference code it is applied to the top-k weights only when they are *not*
    /// renormalised.
    pub routed_scaling_factor: f64,
    /// Top-k selection method.
    pub topk_method: TopkMethod,
    /// Score function.
    pub scoring: ScoringFunc,
    /// Which layers are MoE layers.
    pub layer_rule: MoeLayerRule,
}

/// YaRN rope scaling parameters (`rope_scaling` with `type`/`rope_type` `yarn`), with DeepSeek's
/// defaults for absent keys.
#[derive(Debug, Clone, PartialEq)]
pub struct YarnConfig {
    /// Context extension factor (`factor`).
    pub factor: f64,
    /// Pre-extension context (`original_max_position_embeddings`).
    pub original_max_position_embeddings: usize,
    /// `beta_fast` (default 32).
    pub beta_fast: f64,
    /// `beta_slow` (default 1).
    pub beta_slow: f64,
    /// `mscale` (default 1).
    pub mscale: f64,
    /// `mscale_all_dim` (default 0).
    pub mscale_all_dim: f64,
}

impl YarnConfig {
    /// YaRN's attention temperature `0.1 * m * ln(factor) + 1` (1 when `factor <= 1`).
    pub fn get_mscale(factor: f64, m: f64) -> f64 {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * m * factor.ln() + 1.0
        }
    }

    /// The factor on cos/sin tables: `get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)`.
    pub fn cos_sin_mscale(&self) -> f64 {
        Self::get_mscale(self.factor, self.mscale)
            / Self::get_mscale(self.factor, self.mscale_all_dim)
    }
}

/// Rotary position embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base (`rope_theta`).
    pub theta: f64,
    /// `rope_scaling`, if any (only yarn is supported).
    pub yarn: Option<YarnConfig>,
}

/// A parsed, validated model config.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture.
    pub architecture: Architecture,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// Dense MLP width (`intermediate_size`) for non-MoE layers. For Mixtral (no dense layers) this
    /// equals the expert width.
    pub intermediate_size: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// `tie_word_embeddings`: if true there is no `lm_head.weight`; the embedding is reused.
    pub tie_word_embeddings: bool,
    /// Attention.
    pub attention: AttentionConfig,
    /// Routed experts.
    pub moe: MoeConfig,
    /// Rope.
    pub rope: RopeConfig,
    /// `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (one or several).
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` (or `dtype`), if given.
    pub torch_dtype: Option<DType>,
}

// ---------------------------------------------------------------------------------------------
// Field access with named errors.

struct Fields<'a> {
    obj: &'a Map<String, Value>,
    prefix: &'static str,
}

fn json_text(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(77).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

impl<'a> Fields<'a> {
    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// The value, treating JSON `null` as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn missing(&self, key: &str) -> ConfigError {
        ConfigError::MissingField {
            field: self.name(key),
        }
    }

    fn malformed(&self, key: &str, expected: &'static str, v: &Value) -> ConfigError {
        ConfigError::Malformed {
            field: self.name(key),
            expected,
            found: json_text(v),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .or_else(|| {
                    // Accept integral floats such as `2.0`, which some exporters write.
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1e15)
                        .map(|f| f as usize)
                })
                .map(Some)
                .ok_or_else(|| self.malformed(key, "a non-negative integer", v)),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    fn positive(&self, key: &str) -> Result<usize, ConfigError> {
        let n = self.usize(key)?;
        if n == 0 {
            return Err(ConfigError::Invalid {
                field: self.name(key),
                reason: "must be at least 1".into(),
            });
        }
        Ok(n)
    }

    fn opt_positive(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.opt_usize(key)? {
            Some(0) => Err(ConfigError::Invalid {
                field: self.name(key),
                reason: "must be at least 1".into(),
            }),
            other => Ok(other),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(f) if f.is_finite() => Ok(Some(f)),
                _ => Err(self.malformed(key, "a finite number", v)),
            },
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.malformed(key, "true or false", v)),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.malformed(key, "a string", v)),
        }
    }

    fn usize_list(&self, key: &str) -> Result<Vec<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| self.malformed(key, "a list of non-negative integers", v))
                })
                .collect(),
            Some(v) => Err(self.malformed(key, "a list of non-negative integers", v)),
        }
    }

    fn token_ids(&self, key: &str) -> Result<Vec<u32>, ConfigError> {
        let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    one(v)
                        .ok_or_else(|| self.malformed(key, "a token id or a list of token ids", v))
                })
                .collect(),
            Some(v) => one(v)
                .map(|id| vec![id])
                .ok_or_else(|| self.malformed(key, "a token id or a list of token ids", v)),
        }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

fn require(cond: bool, field: &str, reason: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if cond {
        Ok(())
    } else {
        Err(invalid(field, reason()))
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing.

impl ModelConfig {
    /// Reads and parses `path` (a `config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<ModelConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<ModelConfig, ConfigError> {
        Self::from_file(dir.as_ref().join("config.json"))
    }

    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<ModelConfig, ConfigError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| ConfigError::NotJson(e.to_string()))?;
        Self::from_json(&v)
    }

    /// Parses a `config.json` already read as JSON.
    pub fn from_json(v: &Value) -> Result<ModelConfig, ConfigError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ConfigError::NotJson(format!("top level is {}", json_text(v))))?;
        let f = Fields { obj, prefix: "" };
        let architecture = detect_architecture(&f)?;

        let hidden_size = f.positive("hidden_size")?;
        let num_layers = f.positive("num_hidden_layers")?;
        let vocab_size = f.positive("vocab_size")?;
        let max_position_embeddings = f.positive("max_position_embeddings")?;
        let num_heads = f.positive("num_attention_heads")?;
        let rms_norm_eps = f.f64_or(
            "rms_norm_eps",
            match architecture {
                Architecture::Mixtral => 1e-5,
                _ => 1e-6,
            },
        )?;
        require(rms_norm_eps > 0.0, "rms_norm_eps", || {
            "must be positive".into()
        })?;
        let tie_word_embeddings = f.bool_or("tie_word_embeddings", false)?;

        match f.opt_str("hidden_act")? {
            None | Some("silu") | Some("swish") => {}
            Some(other) => {
                return Err(ConfigError::Unsupported {
                    field: "hidden_act".into(),
                    value: format!("{other:?}"),
                    reason: "only silu (SwiGLU) experts are implemented",
                })
            }
        }
        if f.bool_or("attention_bias", false)? {
            return Err(ConfigError::Unsupported {
                field: "attention_bias".into(),
                value: "true".into(),
                reason: "attention projections with bias are not implemented",
            });
        }

        let attention = match architecture {
            Architecture::Qwen3Moe | Architecture::Mixtral => {
                let num_kv_heads = f.positive("num_key_value_heads")?;
                require(
                    num_heads.is_multiple_of(num_kv_heads),
                    "num_key_value_heads",
                    || format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"),
                )?;
                let head_dim = match f.opt_positive("head_dim")? {
                    Some(d) => d,
                    None => {
                        require(hidden_size.is_multiple_of(num_heads), "head_dim", || {
                            format!(
                                "absent, and hidden_size = {hidden_size} is not a multiple of num_attention_heads = {num_heads}"
                            )
                        })?;
                        hidden_size / num_heads
                    }
                };
                require(head_dim.is_multiple_of(2), "head_dim", || {
                    format!("{head_dim} must be even for rope")
                })?;
                AttentionConfig::Gqa(GqaConfig {
                    num_heads,
                    num_kv_heads,
                    head_dim,
                    qk_norm: architecture == Architecture::Qwen3Moe,
                })
            }
            Architecture::DeepseekV2 => {
                if !obj.contains_key("q_lora_rank") {
                    return Err(f.missing("q_lora_rank"));
                }
                let m = MlaConfig {
                    num_heads,
                    q_lora_rank: f.opt_positive("q_lora_rank")?,
                    kv_lora_rank: f.positive("kv_lora_rank")?,
                    qk_nope_head_dim: f.positive("qk_nope_head_dim")?,
                    qk_rope_head_dim: f.positive("qk_rope_head_dim")?,
                    v_head_dim: f.positive("v_head_dim")?,
                };
                require(
                    m.qk_rope_head_dim.is_multiple_of(2),
                    "qk_rope_head_dim",
                    || format!("{} must be even for rope", m.qk_rope_head_dim),
                )?;
                AttentionConfig::Mla(m)
            }
        };

        let (moe, intermediate_size) = parse_moe(architecture, &f, num_layers)?;
        let rope = parse_rope(architecture, &f)?;

        if architecture == Architecture::Mixtral {
            if let Some(w) = f.opt_usize("sliding_window")? {
                return Err(ConfigError::Unsupported {
                    field: "sliding_window".into(),
                    value: w.to_string(),
                    reason: "sliding-window attention is not implemented; use null",
                });
            }
        }
        if architecture == Architecture::Qwen3Moe && f.bool_or("use_sliding_window", false)? {
            return Err(ConfigError::Unsupported {
                field: "use_sliding_window".into(),
                value: "true".into(),
                reason: "sliding-window attention is not implemented",
            });
        }

        let bos = f.token_ids("bos_token_id")?;
        require(bos.len() <= 1, "bos_token_id", || {
            "must be a single token id".into()
        })?;
        let eos_token_ids = f.token_ids("eos_token_id")?;
        let dtype_key = if f.get("torch_dtype").is_some() {
            "torch_dtype"
        } else {
            "dtype"
        };
        let torch_dtype = match f.opt_str(dtype_key)? {
            None => None,
            Some(s) => Some(
                DType::from_torch_name(s).ok_or_else(|| ConfigError::Unsupported {
                    field: dtype_key.into(),
                    value: format!("{s:?}"),
                    reason: "supported: float32, float16, bfloat16",
                })?,
            ),
        };

        let cfg = ModelConfig {
            architecture,
            hidden_size,
            num_layers,
            vocab_size,
            intermediate_size,
            rms_norm_eps,
            max_position_embeddings,
            tie_word_embeddings,
            attention,
            moe,
            rope,
            bos_token_id: bos.first().copied(),
            eos_token_ids,
            torch_dtype,
        };
        for (field, id) in cfg
            .bos_token_id
            .iter()
            .map(|b| ("bos_token_id", b))
            .chain(cfg.eos_token_ids.iter().map(|e| ("eos_token_id", e)))
        {
            require((*id as usize) < cfg.vocab_size, field, || {
                format!("token id {id} is outside vocab_size = {}", cfg.vocab_size)
            })?;
        }
        Ok(cfg)
    }
}

fn detect_architecture(f: &Fields<'_>) -> Result<Architecture, ConfigError> {
    match f.get("architectures") {
        Some(Value::Array(items)) => {
            let first = items
                .first()
                .ok_or_else(|| ConfigError::UnknownArchitecture { found: "[]".into() })?;
            let name = first
                .as_str()
                .ok_or_else(|| f.malformed("architectures", "a list of class names", first))?;
            Architecture::from_hf_class(name).ok_or_else(|| ConfigError::UnknownArchitecture {
                found: name.to_string(),
            })
        }
        Some(v) => Err(f.malformed("architectures", "a list of class names", v)),
        None => match f.opt_str("model_type")? {
            Some(t) => {
                Architecture::from_model_type(t).ok_or_else(|| ConfigError::UnknownArchitecture {
                    found: format!("model_type {t:?}"),
                })
            }
            None => Err(f.missing("architectures")),
        },
    }
}

fn parse_moe(
    arch: Architecture,
    f: &Fields<'_>,
    num_layers: usize,
) -> Result<(MoeConfig, usize), ConfigError> {
    let top_k = f.positive("num_experts_per_tok")?;
    let (num_experts_key, num_experts) = match arch {
        Architecture::Qwen3Moe => ("num_experts", f.positive("num_experts")?),
        Architecture::Mixtral => ("num_local_experts", f.positive("num_local_experts")?),
        Architecture::DeepseekV2 => ("n_routed_experts", f.positive("n_routed_experts")?),
    };
    require(top_k <= num_experts, "num_experts_per_tok", || {
        format!("{top_k} exceeds {num_experts_key} = {num_experts}")
    })?;
    let intermediate_size = f.positive("intermediate_size")?;
    let expert_intermediate_size = match arch {
        Architecture::Mixtral => intermediate_size,
        _ => f.positive("moe_intermediate_size")?,
    };

    let (norm_topk_prob, n_shared_experts, routed_scaling_factor, topk_method, layer_rule) =
        match arch {
            Architecture::Mixtral => (true, 0, 1.0, TopkMethod::Greedy, MoeLayerRule::All),
            Architecture::Qwen3Moe => {
                let decoder_sparse_step = f.opt_positive("decoder_sparse_step")?.unwrap_or(1);
                let mlp_only_layers = f.usize_list("mlp_only_layers")?;
                if let Some(&bad) = mlp_only_layers.iter().find(|&&l| l >= num_layers) {
                    return Err(invalid(
                        "mlp_only_layers",
                        format!("layer {bad} is outside num_hidden_layers = {num_layers}"),
                    ));
                }
                (
                    f.bool_or("norm_topk_prob", false)?,
                    0,
                    1.0,
                    TopkMethod::Greedy,
                    MoeLayerRule::Qwen3 {
                        decoder_sparse_step,
                        mlp_only_layers,
                    },
                )
            }
            Architecture::DeepseekV2 => {
                let n_shared = f.opt_usize("n_shared_experts")?.unwrap_or(0);
                let scale = f.f64_or("routed_scaling_factor", 1.0)?;
                require(scale > 0.0, "routed_scaling_factor", || {
                    "must be positive".into()
                })?;
                let method = match f.opt_str("topk_method")?.unwrap_or("greedy") {
                    "greedy" | "gready" => TopkMethod::Greedy,
                    "group_limited_greedy" => {
                        let n_group = f
                            .opt_positive("n_group")?
                            .ok_or_else(|| f.missing("n_group"))?;
                        let topk_group = f
                            .opt_positive("topk_group")?
                            .ok_or_else(|| f.missing("topk_group"))?;
                        require(num_experts.is_multiple_of(n_group), "n_group", || {
                            format!("{n_group} does not divide n_routed_experts = {num_experts}")
                        })?;
                        require(topk_group <= n_group, "topk_group", || {
                            format!("{topk_group} exceeds n_group = {n_group}")
                        })?;
                        require(
                            top_k <= topk_group * (num_experts / n_group),
                            "num_experts_per_tok",
                            || {
                                format!(
                            "{top_k} exceeds the {} experts in the topk_group = {topk_group} kept groups",
                            topk_group * (num_experts / n_group)
                        )
                            },
                        )?;
                        TopkMethod::GroupLimitedGreedy {
                            n_group,
                            topk_group,
                        }
                    }
                    other => {
                        return Err(ConfigError::Unsupported {
                            field: "topk_method".into(),
                            value: format!("{other:?}"),
                            reason: "supported: greedy, group_limited_greedy",
                        })
                    }
                };
                let first_k_dense_replace = f.opt_usize("first_k_dense_replace")?.unwrap_or(0);
                let moe_layer_freq = f.opt_positive("moe_layer_freq")?.unwrap_or(1);
                (
                    f.bool_or("norm_topk_prob", false)?,
                    n_shared,
                    scale,
                    method,
                    MoeLayerRule::DeepSeek {
                        first_k_dense_replace,
                        moe_layer_freq,
                    },
                )
            }
        };

    if arch == Architecture::DeepseekV2 {
        match f.opt_str("scoring_func")?.unwrap_or("softmax") {
            "softmax" => {}
            other => {
                return Err(ConfigError::Unsupported {
                    field: "scoring_func".into(),
                    value: format!("{other:?}"),
                    reason: "supported: softmax",
                })
            }
        }
    }

    let moe = MoeConfig {
        num_experts,
        top_k,
        expert_intermediate_size,
        n_shared_experts,
        norm_topk_prob,
        routed_scaling_factor,
        topk_method,
        scoring: ScoringFunc::Softmax,
        layer_rule,
    };
    if (0..num_layers).all(|l| !moe.is_moe_layer(l)) {
        let field = match arch {
            Architecture::Qwen3Moe => "mlp_only_layers",
            _ => "first_k_dense_replace",
        };
        return Err(invalid(
            field,
            "leaves no MoE layer; this engine serves MoE models",
        ));
    }
    Ok((moe, intermediate_size))
}

fn parse_rope(arch: Architecture, f: &Fields<'_>) -> Result<RopeConfig, ConfigError> {
    let theta = f.f64_or(
        "rope_theta",
        match arch {
            Architecture::Qwen3Moe | Architecture::DeepseekV2 => 10000.0,
            Architecture::Mixtral => 1e6,
        },
    )?;
    require(theta > 0.0, "rope_theta", || "must be positive".into())?;
    let yarn = match f.get("rope_scaling") {
        None => None,
        Some(Value::Object(obj)) => {
            let r = Fields {
                obj,
                prefix: "rope_scaling",
            };
            let kind_key = if r.get("type").is_some() {
                "type"
            } else {
                "rope_type"
            };
            match r.opt_str(kind_key)? {
                Some("yarn") => {}
                Some("default") => return Ok(RopeConfig { theta, yarn: None }),
                Some(other) => {
                    return Err(ConfigError::Unsupported {
                        field: r.name(kind_key),
                        value: format!("{other:?}"),
                        reason: "only yarn rope scaling is implemented",
                    })
                }
                None => return Err(r.missing("type")),
            }
            let factor = r.opt_f64("factor")?.ok_or_else(|| r.missing("factor"))?;
            require(factor >= 1.0, "rope_scaling.factor", || {
                format!("{factor} must be at least 1")
            })?;
            let y = YarnConfig {
                factor,
                original_max_position_embeddings: r.positive("original_max_position_embeddings")?,
                beta_fast: r.f64_or("beta_fast", 32.0)?,
                beta_slow: r.f64_or("beta_slow", 1.0)?,
                mscale: r.f64_or("mscale", 1.0)?,
                mscale_all_dim: r.f64_or("mscale_all_dim", 0.0)?,
            };
            require(y.beta_fast > y.beta_slow, "rope_scaling.beta_fast", || {
                format!("{} must exceed beta_slow = {}", y.beta_fast, y.beta_slow)
            })?;
            Some(y)
        }
        Some(v) => return Err(f.malformed("rope_scaling", "an object or null", v)),
    };
    Ok(RopeConfig { theta, yarn })
}

// ---------------------------------------------------------------------------------------------
// Questions the rest of the system asks.

impl MoeConfig {
    /// Whether layer `l` has a routed MoE block (else a dense MLP).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        match &self.layer_rule {
            MoeLayerRule::All => true,
            MoeLayerRule::Qwen3 {
                decoder_sparse_step,
                mlp_only_layers,
            } => !mlp_only_layers.contains(&l) && (l + 1).is_multiple_of(*decoder_sparse_step),
            MoeLayerRule::DeepSeek {
                first_k_dense_replace,
                moe_layer_freq,
            } => l >= *first_k_dense_replace && l.is_multiple_of(*moe_layer_freq),
        }
    }
}

impl ModelConfig {
    /// Whether layer `l` has a routed MoE block (else a dense MLP of `intermediate_size`).
    /// Layers at or beyond `num_layers` are never MoE layers.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        l < self.num_layers && self.moe.is_moe_layer(l)
    }

    /// The MoE layers, ascending.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_layers).filter(|&l| self.is_moe_layer(l))
    }

    /// How many layers are MoE layers.
    pub fn num_moe_layers(&self) -> usize {
        self.moe_layers().count()
    }

    /// Routed experts per MoE layer.
    pub fn experts_per_layer(&self) -> usize {
        self.moe.num_experts
    }

    /// Routed experts per token.
    pub fn top_k(&self) -> usize {
        self.moe.top_k
    }

    /// Parameters of one routed expert (gate, up and down projections).
    pub fn expert_params(&self) -> usize {
        3 * self.hidden_size * self.moe.expert_intermediate_size
    }

    /// Bytes of one routed expert stored as `dtype` (the size of its `hbm-vmm` chunk before rounding
    /// to the allocation granularity).
    pub fn expert_bytes(&self, dtype: DType) -> usize {
        self.expert_params() * dtype.size_bytes()
    }

    /// Bytes of all routed experts of one MoE layer.
    pub fn routed_bytes_per_moe_layer(&self, dtype: DType) -> usize {
        self.expert_bytes(dtype) * self.moe.num_experts
    }

    /// KV-cache elements per token per layer (see [`AttentionConfig::kv_elems_per_token`]).
    pub fn kv_elems_per_token_per_layer(&self) -> usize {
        self.attention.kv_elems_per_token()
    }

    /// KV-cache bytes per token over all layers, stored as `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: DType) -> usize {
        self.kv_elems_per_token_per_layer() * self.num_layers * dtype.size_bytes()
    }

    /// Parameters of one layer's attention block, including its two layer norms
    /// (`input_layernorm`, `post_attention_layernorm`) — every tensor the schema tags
    /// `Attention(l)`. The same for every layer.
    pub fn attention_params_per_layer(&self) -> usize {
        crate::schema::attention_tensors(self, 0)
            .iter()
            .map(|t| t.numel())
            .sum()
    }

    /// Bytes of one layer's attention block stored as `dtype`.
    pub fn attention_bytes_per_layer(&self, dtype: DType) -> usize {
        self.attention_params_per_layer() * dtype.size_bytes()
    }

    /// Parameters replicated on every attention rank for layer `l`: attention, plus the router,
    /// shared experts or dense MLP that layer has (everything except routed experts).
    pub fn replicated_params_for_layer(&self, l: usize) -> usize {
        crate::schema::layer_tensors(self, l)
            .iter()
            .filter(|t| !matches!(t.owner, crate::schema::TensorOwner::Expert { .. }))
            .map(|t| t.numel())
            .sum()
    }

    /// The softmax scale of attention: `qk_head_dim^-0.5`, times `mscale^2` for yarn-scaled MLA
    /// (DeepSeek-V2 multiplies by `get_mscale(factor, mscale_all_dim)^2` when `mscale_all_dim` is set).
    pub fn attention_softmax_scale(&self) -> f64 {
        let base = (self.attention.qk_head_dim() as f64).powf(-0.5);
        match (&self.attention, &self.rope.yarn) {
            (AttentionConfig::Mla(_), Some(y)) if y.mscale_all_dim != 0.0 => {
                let m = YarnConfig::get_mscale(y.factor, y.mscale_all_dim);
                base * m * m
            }
            _ => base,
        }
    }

    /// Total parameters of the model (every tensor of the schema).
    pub fn total_params(&self) -> usize {
        crate::schema::ModelSchema::new(self)
            .tensors()
            .iter()
            .map(|t| t.numel())
            .sum()
    }
}

// ---------------------------------------------------------------------------------------------
// Writing back out.

impl ModelConfig {
    /// The config as a Hugging Face `config.json` object, with the keys the real checkpoints of this
    /// architecture use. [`ModelConfig::from_json`] of the result gives back `self`.
    pub fn to_hf_json(&self) -> Value {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        let a = self.architecture;
        put("architectures", Value::from(vec![a.hf_class()]));
        put("model_type", a.model_type().into());
        put("hidden_act", "silu".into());
        put("hidden_size", self.hidden_size.into());
        put("intermediate_size", self.intermediate_size.into());
        put("num_hidden_layers", self.num_layers.into());
        put("num_attention_heads", self.attention.num_heads().into());
        put("vocab_size", self.vocab_size.into());
        put(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        put("rms_norm_eps", self.rms_norm_eps.into());
        put("rope_theta", self.rope.theta.into());
        put("tie_word_embeddings", self.tie_word_embeddings.into());
        put("attention_bias", false.into());
        put("attention_dropout", 0.0.into());
        put("initializer_range", 0.02.into());
        put("use_cache", true.into());
        put("num_experts_per_tok", self.moe.top_k.into());
        if let Some(b) = self.bos_token_id {
            put("bos_token_id", b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => put("eos_token_id", (*one).into()),
            many => put("eos_token_id", many.to_vec().into()),
        }
        if let Some(d) = self.torch_dtype {
            put("torch_dtype", d.torch_name().into());
        }
        put(
            "rope_scaling",
            match &self.rope.yarn {
                None => Value::Null,
                Some(y) => serde_json::json!({
                    "type": "yarn",
                    "factor": y.factor,
                    "original_max_position_embeddings": y.original_max_position_embeddings,
                    "beta_fast": y.beta_fast,
                    "beta_slow": y.beta_slow,
                    "mscale": y.mscale,
                    "mscale_all_dim": y.mscale_all_dim,
                }),
            },
        );
        match &self.attention {
            AttentionConfig::Gqa(g) => {
                put("num_key_value_heads", g.num_kv_heads.into());
                put("head_dim", g.head_dim.into());
            }
            AttentionConfig::Mla(mla) => {
                put("num_key_value_heads", mla.num_heads.into());
                put(
                    "q_lora_rank",
                    mla.q_lora_rank.map_or(Value::Null, Value::from),
                );
                put("kv_lora_rank", mla.kv_lora_rank.into());
                put("qk_nope_head_dim", mla.qk_nope_head_dim.into());
                put("qk_rope_head_dim", mla.qk_rope_head_dim.into());
                put("v_head_dim", mla.v_head_dim.into());
            }
        }
        match a {
            Architecture::Mixtral => {
                put("num_local_experts", self.moe.num_experts.into());
                put("sliding_window", Value::Null);
                put("router_aux_loss_coef", 0.02.into());
                put("output_router_logits", false.into());
            }
            Architecture::Qwen3Moe => {
                put("num_experts", self.moe.num_experts.into());
                put(
                    "moe_intermediate_size",
                    self.moe.expert_intermediate_size.into(),
                );
                put("norm_topk_prob", self.moe.norm_topk_prob.into());
                put("use_sliding_window", false.into());
                put("sliding_window", Value::Null);
                put("max_window_layers", self.num_layers.into());
                put("router_aux_loss_coef", 0.001.into());
                put("output_router_logits", false.into());
                if let MoeLayerRule::Qwen3 {
                    decoder_sparse_step,
                    mlp_only_layers,
                } = &self.moe.layer_rule
                {
                    put("decoder_sparse_step", (*decoder_sparse_step).into());
                    put("mlp_only_layers", mlp_only_layers.clone().into());
                }
            }
            Architecture::DeepseekV2 => {
                put("n_routed_experts", self.moe.num_experts.into());
                put("n_shared_experts", self.moe.n_shared_experts.into());
                put(
                    "moe_intermediate_size",
                    self.moe.expert_intermediate_size.into(),
                );
                put("norm_topk_prob", self.moe.norm_topk_prob.into());
                put(
                    "routed_scaling_factor",
                    self.moe.routed_scaling_factor.into(),
                );
                put("scoring_func", "softmax".into());
                put("aux_loss_alpha", 0.001.into());
                put("seq_aux", true.into());
                put("ep_size", 1.into());
                put("pretraining_tp", 1.into());
                match self.moe.topk_method {
                    TopkMethod::Greedy => {
                        put("topk_method", "greedy".into());
                        put("n_group", 1.into());
                        put("topk_group", 1.into());
                    }
                    TopkMethod::GroupLimitedGreedy {
                        n_group,
                        topk_group,
                    } => {
                        put("topk_method", "group_limited_greedy".into());
                        put("n_group", n_group.into());
                        put("topk_group", topk_group.into());
                    }
                }
                if let MoeLayerRule::DeepSeek {
                    first_k_dense_replace,
                    moe_layer_freq,
                } = &self.moe.layer_rule
                {
                    put("first_k_dense_replace", (*first_k_dense_replace).into());
                    put("moe_layer_freq", (*moe_layer_freq).into());
                }
            }
        }
        Value::Object(m)
    }

    /// [`ModelConfig::to_hf_json`] as pretty-printed text.
    pub fn to_hf_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.to_hf_json())
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}
