//! Model presets for `gen-model`: the real checkpoints' configs, and tiny versions of the same
//! architectures for tests and demos.
//!
//! | preset | architecture | what it is |
//! |---|---|---|
//! | `qwen3-30b-a3b` | Qwen3-MoE | `Qwen/Qwen3-30B-A3B` exactly (48 layers, 128 experts, top-8) |
//! | `deepseek-v2-lite` | DeepSeek-V2 | `deepseek-ai/DeepSeek-V2-Lite` exactly (MLA, q_lora_rank null, 64+2 experts) |
//! | `mixtral-8x7b` | Mixtral | `mistralai/Mixtral-8x7B-v0.1` exactly (32 layers, 8 experts, top-2) |
//! | `tiny-qwen3` | Qwen3-MoE | hidden 64, 3 layers, 16 experts, top-4, GQA 4/2 with q/k norms |
//! | `tiny-deepseek` | DeepSeek-V2 | hidden 64, 3 layers (layer 0 dense), MLA with q_lora_rank 32, 16 experts in 4 groups (group-limited greedy, top-4 of 2 groups), 2 shared experts, yarn |
//! | `tiny-mixtral` | Mixtral | hidden 64, 2 layers, 8 experts, top-2 |
//!
//! Tiny presets have `vocab_size` 272, covering the byte-level tokenizer's 256 byte tokens and its
//! special tokens (see [`crate::synth`]). `q_lora_rank: null` (the other MLA variant) is what
//! `deepseek-v2-lite` uses; the config tests cover both.
//!
//! ```
//! use moe_model::presets::Preset;
//! let p: Preset = "tiny-deepseek".parse().unwrap();
//! let cfg = p.config();
//! assert_eq!(cfg.num_layers, 3);
//! assert!(!cfg.is_moe_layer(0) && cfg.is_moe_layer(1));
//! let two = moe_model::presets::with_layers(&cfg, 2).unwrap();
//! assert_eq!(two.num_moe_layers(), 1);
//! ```

use crate::config::{ConfigError, DType, ModelConfig};
use serde_json::Value;
use std::fmt;
use std::str::FromStr;

/// A named model preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// `Qwen/Qwen3-30B-A3B`.
    Qwen3_30bA3b,
    /// `deepseek-ai/DeepSeek-V2-Lite`.
    DeepseekV2Lite,
    /// `mistralai/Mixtral-8x7B-v0.1`.
    Mixtral8x7b,
    /// Tiny Qwen3-MoE.
    TinyQwen3,
    /// Tiny DeepSeek-V2.
    TinyDeepseek,
    /// Tiny Mixtral.
    TinyMixtral,
}

/// An unknown preset name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown preset {name:?}; known presets: qwen3-30b-a3b, deepseek-v2-lite, mixtral-8x7b, tiny-qwen3, tiny-deepseek, tiny-mixtral")]
#[non_exhaustive]
pub struct UnknownPreset {
    /// What was asked for.
    pub name: String,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 6] = [
        Preset::Qwen3_30bA3b,
        Preset::DeepseekV2Lite,
        Preset::Mixtral8x7b,
        Preset::TinyQwen3,
        Preset::TinyDeepseek,
        Preset::TinyMixtral,
    ];

    /// The preset's command-line name.
    pub const fn name(self) -> &'static str {
        match self {
            Preset::Qwen3_30bA3b => "qwen3-30b-a3b",
            Preset::DeepseekV2Lite => "deepseek-v2-lite",
            Preset::Mixtral8x7b => "mixtral-8x7b",
            Preset::TinyQwen3 => "tiny-qwen3",
            Preset::TinyDeepseek => "tiny-deepseek",
            Preset::TinyMixtral => "tiny-mixtral",
        }
    }

    /// Whether this is a tiny (test-sized) preset.
    pub const fn is_tiny(self) -> bool {
        matches!(
            self,
            Preset::TinyQwen3 | Preset::TinyDeepseek | Preset::TinyMixtral
        )
    }

    /// The storage dtype `gen-model` uses by default: bf16 for full-size presets (as published),
    /// f32 for tiny ones (exact reference comparisons).
    pub const fn default_dtype(self) -> DType {
        if self.is_tiny() {
            DType::F32
        } else {
            DType::BF16
        }
    }

    /// The preset's `config.json` text.
    pub const fn config_json(self) -> &'static str {
        match self {
            Preset::Qwen3_30bA3b => QWEN3_30B_A3B,
            Preset::DeepseekV2Lite => DEEPSEEK_V2_LITE,
            Preset::Mixtral8x7b => MIXTRAL_8X7B,
            Preset::TinyQwen3 => TINY_QWEN3,
            Preset::TinyDeepseek => TINY_DEEPSEEK,
            Preset::TinyMixtral => TINY_MIXTRAL,
        }
    }

    /// The preset's config.
    pub fn config(self) -> ModelConfig {
        // The texts are constants checked by this module's tests; a failure here is a bug in them.
        ModelConfig::from_json_str(self.config_json()).unwrap_or_else(|e| {
            panic!("built-in preset {} has an invalid config: {e}", self.name())
        })
    }
}

impl FromStr for Preset {
    type Err = UnknownPreset;

    fn from_str(s: &str) -> Result<Preset, UnknownPreset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPreset {
                name: s.to_string(),
            })
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `cfg` with `num_hidden_layers = layers`: Qwen3's `mlp_only_layers` beyond the new count are
/// dropped; anything else that no longer fits (e.g. `first_k_dense_replace >= layers`, leaving no MoE
/// layer) is a [`ConfigError`] naming the field.
pub fn with_layers(cfg: &ModelConfig, layers: usize) -> Result<ModelConfig, ConfigError> {
    let mut v = cfg.to_hf_json();
    let m = v
        .as_object_mut()
        .ok_or_else(|| ConfigError::NotJson("config did not serialise to an object".into()))?;
    m.insert("num_hidden_layers".into(), layers.into());
    if let Some(Value::Array(only)) = m.get_mut("mlp_only_layers") {
        only.retain(|l| l.as_u64().is_some_and(|l| (l as usize) < layers));
    }
    if m.contains_key("max_window_layers") {
        m.insert("max_window_layers".into(), layers.into());
    }
    ModelConfig::from_json(&v)
}

/// `Qwen/Qwen3-30B-A3B` `config.json`.
const QWEN3_30B_A3B: &str = r#"{
  "architectures": ["Qwen3MoeForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "decoder_sparse_step": 1,
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 6144,
  "max_position_embeddings": 40960,
  "max_window_layers": 48,
  "mlp_only_layers": [],
  "model_type": "qwen3_moe",
  "moe_intermediate_size": 768,
  "norm_topk_prob": true,
  "num_attention_heads": 32,
  "num_experts": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 48,
  "num_key_value_heads": 4,
  "output_router_logits": false,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.001,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
}"#;

/// `deepseek-ai/DeepSeek-V2-Lite` `config.json` (without `auto_map`).
const DEEPSEEK_V2_LITE: &str = r#"{
  "architectures": ["DeepseekV2ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001,
  "bos_token_id": 100000,
  "eos_token_id": 100001,
  "first_k_dense_replace": 1,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 10944,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "model_type": "deepseek_v2",
  "moe_intermediate_size": 1408,
  "moe_layer_freq": 1,
  "n_group": 1,
  "n_routed_experts": 64,
  "n_shared_experts": 2,
  "norm_topk_prob": false,
  "num_attention_heads": 16,
  "num_experts_per_tok": 6,
  "num_hidden_layers": 27,
  "num_key_value_heads": 16,
  "pretraining_tp": 1,
  "q_lora_rank": null,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 4096,
    "type": "yarn"
  },
  "rope_theta": 10000,
  "routed_scaling_factor": 1.0,
  "scoring_func": "softmax",
  "seq_aux": true,
  "tie_word_embeddings": false,
  "topk_group": 1,
  "topk_method": "greedy",
  "torch_dtype": "bfloat16",
  "use_cache": true,
  "v_head_dim": 128,
  "vocab_size": 102400
}"#;

/// `mistralai/Mixtral-8x7B-v0.1` `config.json`.
const MIXTRAL_8X7B: &str = r#"{
  "architectures": ["MixtralForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mixtral",
  "num_attention_heads": 32,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "num_local_experts": 8,
  "output_router_logits": false,
  "rms_norm_eps": 1e-05,
  "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.02,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "use_cache": true,
  "vocab_size": 32000
}"#;

const TINY_QWEN3: &str = r#"{
  "architectures": ["Qwen3MoeForCausalLM"],
  "model_type": "qwen3_moe",
  "attention_bias": false,
  "bos_token_id": 256,
  "eos_token_id": [257, 259],
  "decoder_sparse_step": 1,
  "mlp_only_layers": [],
  "head_dim": 16,
  "hidden_act": "silu",
  "hidden_size": 64,
  "intermediate_size": 128,
  "max_position_embeddings": 2048,
  "moe_intermediate_size": 32,
  "norm_topk_prob": true,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "num_experts": 16,
  "num_experts_per_tok": 4,
  "num_hidden_layers": 3,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "float32",
  "use_sliding_window": false,
  "vocab_size": 272
}"#;

const TINY_DEEPSEEK: &str = r#"{
  "architectures": ["DeepseekV2ForCausalLM"],
  "model_type": "deepseek_v2",
  "attention_bias": false,
  "bos_token_id": 256,
  "eos_token_id": [257, 259],
  "first_k_dense_replace": 1,
  "hidden_act": "silu",
  "hidden_size": 64,
  "intermediate_size": 128,
  "kv_lora_rank": 32,
  "max_position_embeddings": 2048,
  "moe_intermediate_size": 32,
  "moe_layer_freq": 1,
  "n_group": 4,
  "n_routed_experts": 16,
  "n_shared_experts": 2,
  "norm_topk_prob": false,
  "num_attention_heads": 4,
  "num_experts_per_tok": 4,
  "num_hidden_layers": 3,
  "num_key_value_heads": 4,
  "q_lora_rank": 32,
  "qk_nope_head_dim": 16,
  "qk_rope_head_dim": 8,
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 4,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 512,
    "type": "yarn"
  },
  "rope_theta": 10000,
  "routed_scaling_factor": 2.0,
  "scoring_func": "softmax",
  "tie_word_embeddings": false,
  "topk_group": 2,
  "topk_method": "group_limited_greedy",
  "torch_dtype": "float32",
  "v_head_dim": 16,
  "vocab_size": 272
}"#;

const TINY_MIXTRAL: &str = r#"{
  "architectures": ["MixtralForCausalLM"],
  "model_type": "mixtral",
  "bos_token_id": 256,
  "eos_token_id": [257, 259],
  "hidden_act": "silu",
  "hidden_size": 64,
  "intermediate_size": 128,
  "max_position_embeddings": 2048,
  "num_attention_heads": 4,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "num_local_experts": 8,
  "rms_norm_eps": 1e-05,
  "rope_theta": 1000000.0,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "float32",
  "vocab_size": 272
}"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AttentionConfig, TopkMethod};

    #[test]
    fn every_preset_parses_and_round_trips_its_name() {
        for p in Preset::ALL {
            let c = p.config();
            assert_eq!(p.name().parse::<Preset>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
            assert_eq!(
                c.torch_dtype,
                Some(if p.is_tiny() { DType::F32 } else { DType::BF16 })
            );
            assert_eq!(p.default_dtype(), c.torch_dtype.unwrap());
        }
        let e = "qwen3-235b".parse::<Preset>().unwrap_err();
        assert!(e.to_string().contains("tiny-qwen3"), "{e}");
    }

    #[test]
    fn tiny_deepseek_exercises_every_deepseek_feature() {
        let c = Preset::TinyDeepseek.config();
        let AttentionConfig::Mla(m) = &c.attention else {
            panic!("MLA expected")
        };
        assert_eq!(m.q_lora_rank, Some(32));
        assert_eq!(c.moe.n_shared_experts, 2);
        assert!(!c.is_moe_layer(0) && c.is_moe_layer(1) && c.is_moe_layer(2));
        assert_eq!(
            c.moe.topk_method,
            TopkMethod::GroupLimitedGreedy {
                n_group: 4,
                topk_group: 2
            }
        );
        assert!(c.rope.yarn.is_some());
        assert_eq!(c.moe.routed_scaling_factor, 2.0);
    }

    #[test]
    fn tiny_presets_are_small() {
        for p in Preset::ALL.into_iter().filter(|p| p.is_tiny()) {
            let c = p.config();
            let bytes = c.total_params() * 4;
            assert!(bytes < 8 << 20, "{p} is {bytes} bytes in f32");
            assert!(c.vocab_size >= 261, "{p} must cover the byte tokenizer");
            assert!((8..=16).contains(&c.experts_per_layer()) && (2..=4).contains(&c.top_k()));
        }
    }

    #[test]
    fn with_layers_overrides_and_validates() {
        let q = with_layers(&Preset::Qwen3_30bA3b.config(), 4).unwrap();
        assert_eq!((q.num_layers, q.num_moe_layers()), (4, 4));
        let d = with_layers(&Preset::TinyDeepseek.config(), 5).unwrap();
        assert_eq!(d.num_moe_layers(), 4);
        let e = with_layers(&Preset::TinyDeepseek.config(), 1).unwrap_err();
        assert_eq!(e.field(), Some("first_k_dense_replace"));
        let e = with_layers(&Preset::TinyMixtral.config(), 0).unwrap_err();
        assert_eq!(e.field(), Some("num_hidden_layers"));
    }
}
