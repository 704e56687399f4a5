//! Config parsing: the real published `config.json` files of all three architectures, the helpers
//! the rest of the system relies on, a write/parse round trip, and every error naming its field.

use moe_model::config::{
    Architecture, AttentionConfig, ConfigError, DType, ModelConfig, MoeLayerRule, TopkMethod,
};
use serde_json::Value;

const QWEN3_30B_A3B: &str = include_str!("fixtures/qwen3-30b-a3b.config.json");
const MIXTRAL_8X7B: &str = include_str!("fixtures/mixtral-8x7b.config.json");
const DEEPSEEK_V2_LITE: &str = include_str!("fixtures/deepseek-v2-lite.config.json");
const DEEPSEEK_V2: &str = include_str!("fixtures/deepseek-v2.config.json");

fn parse(s: &str) -> ModelConfig {
    ModelConfig::from_json_str(s).unwrap_or_else(|e| panic!("fixture must parse: {e}"))
}

/// Parses `base` with `edit` applied to its JSON object.
fn parse_edited(
    base: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Result<ModelConfig, ConfigError> {
    let mut v: Value = serde_json::from_str(base).unwrap();
    edit(v.as_object_mut().unwrap());
    ModelConfig::from_json(&v)
}

fn err_field(
    base: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> (String, String) {
    let e = parse_edited(base, edit).expect_err("edited config must be rejected");
    (e.field().unwrap_or("<none>").to_string(), e.to_string())
}

#[test]
fn qwen3_30b_a3b_parses() {
    let c = parse(QWEN3_30B_A3B);
    assert_eq!(c.architecture, Architecture::Qwen3Moe);
    assert_eq!(
        (c.hidden_size, c.num_layers, c.vocab_size),
        (2048, 48, 151936)
    );
    let AttentionConfig::Gqa(g) = &c.attention else {
        panic!("qwen3 is GQA")
    };
    assert_eq!(
        (g.num_heads, g.num_kv_heads, g.head_dim, g.qk_norm),
        (32, 4, 128, true)
    );
    assert_eq!(
        (
            c.experts_per_layer(),
            c.top_k(),
            c.moe.expert_intermediate_size
        ),
        (128, 8, 768)
    );
    assert!(c.moe.norm_topk_prob);
    assert_eq!(c.moe.n_shared_experts, 0);
    assert_eq!(c.num_moe_layers(), 48);
    assert_eq!(c.rope.theta, 1e6);
    assert!(c.rope.yarn.is_none());
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.bos_token_id, Some(151643));
    assert_eq!(c.eos_token_ids, vec![151645]);
    assert_eq!(c.torch_dtype, Some(DType::BF16));
    assert!(!c.tie_word_embeddings);
    // One expert: 3 * 2048 * 768 parameters.
    assert_eq!(c.expert_params(), 3 * 2048 * 768);
    assert_eq!(c.expert_bytes(DType::BF16), 3 * 2048 * 768 * 2);
    // KV: 2 (K and V) * 4 heads * 128 dims * 48 layers * 2 bytes.
    assert_eq!(c.kv_bytes_per_token(DType::BF16), 2 * 4 * 128 * 48 * 2);
    // Attention per layer: q, k, v, o, two per-head norms, two layer norms.
    let attn = 4096 * 2048 + 2 * 512 * 2048 + 2048 * 4096 + 2 * 128 + 2 * 2048;
    assert_eq!(c.attention_params_per_layer(), attn);
    assert_eq!(c.attention_bytes_per_layer(DType::F32), attn * 4);
}

#[test]
fn mixtral_8x7b_parses() {
    let c = parse(MIXTRAL_8X7B);
    assert_eq!(c.architecture, Architecture::Mixtral);
    let AttentionConfig::Gqa(g) = &c.attention else {
        panic!("mixtral is GQA")
    };
    assert_eq!(
        (g.num_heads, g.num_kv_heads, g.head_dim, g.qk_norm),
        (32, 8, 128, false)
    );
    assert_eq!((c.experts_per_layer(), c.top_k()), (8, 2));
    assert_eq!(c.moe.expert_intermediate_size, 14336);
    assert!(
        c.moe.norm_topk_prob,
        "Mixtral always renormalises its top-k weights"
    );
    assert_eq!(c.moe.layer_rule, MoeLayerRule::All);
    assert_eq!(c.num_moe_layers(), 32);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.kv_bytes_per_token(DType::F16), 2 * 8 * 128 * 32 * 2);
}

#[test]
fn deepseek_v2_lite_parses() {
    let c = parse(DEEPSEEK_V2_LITE);
    assert_eq!(c.architecture, Architecture::DeepseekV2);
    let AttentionConfig::Mla(m) = &c.attention else {
        panic!("deepseek is MLA")
    };
    assert_eq!(m.q_lora_rank, None);
    assert_eq!(
        (
            m.kv_lora_rank,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim
        ),
        (512, 128, 64, 128)
    );
    assert_eq!(m.q_head_dim(), 192);
    assert_eq!(
        (c.experts_per_layer(), c.top_k(), c.moe.n_shared_experts),
        (64, 6, 2)
    );
    assert_eq!(c.moe.topk_method, TopkMethod::Greedy);
    assert!(!c.moe.norm_topk_prob);
    assert_eq!(c.moe.routed_scaling_factor, 1.0);
    assert!(
        !c.is_moe_layer(0),
        "first_k_dense_replace = 1 makes layer 0 dense"
    );
    assert!(c.is_moe_layer(1) && c.is_moe_layer(26) && !c.is_moe_layer(27));
    assert_eq!(c.num_moe_layers(), 26);
    let y = c.rope.yarn.as_ref().expect("yarn");
    assert_eq!((y.factor, y.original_max_position_embeddings), (40.0, 4096));
    assert_eq!(
        (y.beta_fast, y.beta_slow, y.mscale, y.mscale_all_dim),
        (32.0, 1.0, 0.707, 0.707)
    );
    assert_eq!(
        y.cos_sin_mscale(),
        1.0,
        "mscale == mscale_all_dim cancels on cos/sin"
    );
    let m_all = 0.1 * 0.707 * 40f64.ln() + 1.0;
    let expected = 192f64.powf(-0.5) * m_all * m_all;
    assert!((c.attention_softmax_scale() - expected).abs() < 1e-15);
    // MLA caches the latent plus the shared rope key.
    assert_eq!(c.kv_elems_per_token_per_layer(), 512 + 64);
    assert_eq!(c.kv_bytes_per_token(DType::BF16), 576 * 27 * 2);
}

#[test]
fn deepseek_v2_full_parses_with_q_lora_and_group_limited_greedy() {
    let c = parse(DEEPSEEK_V2);
    let AttentionConfig::Mla(m) = &c.attention else {
        panic!("deepseek is MLA")
    };
    assert_eq!(m.q_lora_rank, Some(1536));
    assert_eq!(
        c.moe.topk_method,
        TopkMethod::GroupLimitedGreedy {
            n_group: 8,
            topk_group: 3
        }
    );
    assert_eq!(c.moe.routed_scaling_factor, 16.0);
    assert_eq!((c.experts_per_layer(), c.num_moe_layers()), (160, 59));
}

#[test]
fn published_parameter_counts_match() {
    // Totals from the model cards / safetensors metadata.
    assert_eq!(parse(MIXTRAL_8X7B).total_params(), 46_702_792_704);
    assert_eq!(parse(QWEN3_30B_A3B).total_params(), 30_532_122_624);
    let lite = parse(DEEPSEEK_V2_LITE).total_params();
    assert!(
        (15_600_000_000..15_800_000_000).contains(&lite),
        "DeepSeek-V2-Lite is 15.7B, got {lite}"
    );
    let full = parse(DEEPSEEK_V2).total_params();
    assert!(
        (235_000_000_000..236_500_000_000).contains(&full),
        "DeepSeek-V2 is 236B, got {full}"
    );
}

#[test]
fn qwen3_layer_rules() {
    let c = parse_edited(QWEN3_30B_A3B, |m| {
        m.insert("decoder_sparse_step".into(), 2.into());
        m.insert("mlp_only_layers".into(), serde_json::json!([3]));
    })
    .unwrap();
    // (l + 1) % 2 == 0 → odd layers, minus layer 3.
    let moe: Vec<usize> = c.moe_layers().take(4).collect();
    assert_eq!(moe, vec![1, 5, 7, 9]);
    assert_eq!(c.num_moe_layers(), 23);
}

#[test]
fn deepseek_moe_layer_freq() {
    let c = parse_edited(DEEPSEEK_V2_LITE, |m| {
        m.insert("first_k_dense_replace".into(), 3.into());
        m.insert("moe_layer_freq".into(), 2.into());
    })
    .unwrap();
    let moe: Vec<usize> = c.moe_layers().take(3).collect();
    assert_eq!(moe, vec![4, 6, 8]);
}

#[test]
fn hf_json_round_trips_for_every_fixture() {
    for text in [QWEN3_30B_A3B, MIXTRAL_8X7B, DEEPSEEK_V2_LITE, DEEPSEEK_V2] {
        let c = parse(text);
        let back = ModelConfig::from_json(&c.to_hf_json()).unwrap();
        assert_eq!(back, c);
        let again = ModelConfig::from_json_str(&c.to_hf_json_string()).unwrap();
        assert_eq!(again, c);
    }
}

#[test]
fn written_config_keeps_the_real_key_set() {
    // Every key the engine needs from the real file is written back under the same name and value.
    for text in [QWEN3_30B_A3B, MIXTRAL_8X7B, DEEPSEEK_V2_LITE, DEEPSEEK_V2] {
        let orig: Value = serde_json::from_str(text).unwrap();
        let written = parse(text).to_hf_json();
        for key in [
            "architectures",
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "num_experts_per_tok",
            "max_position_embeddings",
            "bos_token_id",
            "eos_token_id",
            "tie_word_embeddings",
            "num_experts",
            "num_local_experts",
            "n_routed_experts",
            "n_shared_experts",
            "moe_intermediate_size",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "first_k_dense_replace",
            "moe_layer_freq",
            "topk_method",
            "n_group",
            "topk_group",
            "norm_topk_prob",
            "decoder_sparse_step",
            "mlp_only_layers",
            "head_dim",
            "torch_dtype",
        ] {
            if let Some(v) = orig.get(key) {
                assert_eq!(written.get(key), Some(v), "key {key}");
            }
        }
        for key in ["rope_theta", "rms_norm_eps", "routed_scaling_factor"] {
            if let Some(v) = orig.get(key) {
                assert_eq!(written[key].as_f64(), v.as_f64(), "key {key}");
            }
        }
    }
}

#[test]
fn unknown_architecture_is_named() {
    let (field, msg) = err_field(MIXTRAL_8X7B, |m| {
        m.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
    });
    assert_eq!(field, "architectures");
    assert!(msg.contains("LlamaForCausalLM"), "{msg}");
}

#[test]
fn model_type_is_a_fallback_for_architectures() {
    let c = parse_edited(MIXTRAL_8X7B, |m| {
        m.remove("architectures");
    })
    .unwrap();
    assert_eq!(c.architecture, Architecture::Mixtral);
    let (field, _) = err_field(MIXTRAL_8X7B, |m| {
        m.remove("architectures");
        m.remove("model_type");
    });
    assert_eq!(field, "architectures");
}

#[test]
fn missing_fields_are_named() {
    let cases: &[(&str, &str)] = &[
        (QWEN3_30B_A3B, "hidden_size"),
        (QWEN3_30B_A3B, "num_experts"),
        (QWEN3_30B_A3B, "moe_intermediate_size"),
        (QWEN3_30B_A3B, "num_key_value_heads"),
        (MIXTRAL_8X7B, "num_local_experts"),
        (MIXTRAL_8X7B, "num_experts_per_tok"),
        (MIXTRAL_8X7B, "vocab_size"),
        (DEEPSEEK_V2_LITE, "kv_lora_rank"),
        (DEEPSEEK_V2_LITE, "q_lora_rank"),
        (DEEPSEEK_V2_LITE, "qk_rope_head_dim"),
        (DEEPSEEK_V2_LITE, "v_head_dim"),
        (DEEPSEEK_V2_LITE, "n_routed_experts"),
        (DEEPSEEK_V2_LITE, "max_position_embeddings"),
    ];
    for &(base, key) in cases {
        let e = parse_edited(base, |m| {
            m.remove(key);
        })
        .expect_err(key);
        assert!(matches!(e, ConfigError::MissingField { .. }), "{key}: {e}");
        assert_eq!(e.field(), Some(key));
        assert!(e.to_string().contains(key), "{e}");
    }
    let (field, _) = err_field(DEEPSEEK_V2, |m| {
        m.remove("n_group");
    });
    assert_eq!(field, "n_group");
    let (field, _) = err_field(DEEPSEEK_V2_LITE, |m| {
        m.get_mut("rope_scaling")
            .unwrap()
            .as_object_mut()
            .unwrap()
            .remove("factor");
    });
    assert_eq!(field, "rope_scaling.factor");
}

#[test]
fn malformed_fields_are_named() {
    let cases: Vec<(&str, &str, Value)> = vec![
        (QWEN3_30B_A3B, "hidden_size", "2048".into()),
        (QWEN3_30B_A3B, "num_experts", (-1).into()),
        (QWEN3_30B_A3B, "norm_topk_prob", 1.into()),
        (QWEN3_30B_A3B, "mlp_only_layers", "none".into()),
        (QWEN3_30B_A3B, "rms_norm_eps", "1e-6".into()),
        (MIXTRAL_8X7B, "num_key_value_heads", 2.5.into()),
        (MIXTRAL_8X7B, "eos_token_id", "</s>".into()),
        (DEEPSEEK_V2_LITE, "kv_lora_rank", serde_json::json!([512])),
        (DEEPSEEK_V2_LITE, "rope_scaling", "yarn".into()),
        (
            DEEPSEEK_V2_LITE,
            "architectures",
            "DeepseekV2ForCausalLM".into(),
        ),
    ];
    for (base, key, value) in cases {
        let e = parse_edited(base, |m| {
            m.insert(key.into(), value.clone());
        })
        .expect_err(key);
        assert!(matches!(e, ConfigError::Malformed { .. }), "{key}: {e}");
        assert_eq!(e.field(), Some(key), "{e}");
    }
}

#[test]
fn inconsistent_fields_are_named() {
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        (
            QWEN3_30B_A3B,
            "num_key_value_heads",
            5.into(),
            "num_key_value_heads",
        ),
        (
            QWEN3_30B_A3B,
            "num_experts_per_tok",
            129.into(),
            "num_experts_per_tok",
        ),
        (
            QWEN3_30B_A3B,
            "mlp_only_layers",
            serde_json::json!([48]),
            "mlp_only_layers",
        ),
        (
            QWEN3_30B_A3B,
            "num_hidden_layers",
            0.into(),
            "num_hidden_layers",
        ),
        (QWEN3_30B_A3B, "eos_token_id", 151936.into(), "eos_token_id"),
        (DEEPSEEK_V2, "topk_group", 9.into(), "topk_group"),
        (DEEPSEEK_V2, "n_group", 7.into(), "n_group"),
        (
            DEEPSEEK_V2_LITE,
            "first_k_dense_replace",
            27.into(),
            "first_k_dense_replace",
        ),
    ];
    for (base, key, value, field) in cases {
        let e = parse_edited(base, |m| {
            m.insert(key.into(), value.clone());
        })
        .expect_err(key);
        assert!(matches!(e, ConfigError::Invalid { .. }), "{key}: {e}");
        assert_eq!(e.field(), Some(field), "{e}");
    }
}

#[test]
fn unsupported_features_are_named() {
    let cases: Vec<(&str, &str, Value)> = vec![
        (DEEPSEEK_V2_LITE, "topk_method", "noaux_tc".into()),
        (DEEPSEEK_V2_LITE, "scoring_func", "sigmoid".into()),
        (QWEN3_30B_A3B, "hidden_act", "gelu".into()),
        (QWEN3_30B_A3B, "attention_bias", true.into()),
        (QWEN3_30B_A3B, "use_sliding_window", true.into()),
        (MIXTRAL_8X7B, "sliding_window", 4096.into()),
        (MIXTRAL_8X7B, "torch_dtype", "int8".into()),
    ];
    for (base, key, value) in cases {
        let e = parse_edited(base, |m| {
            m.insert(key.into(), value.clone());
        })
        .expect_err(key);
        assert!(matches!(e, ConfigError::Unsupported { .. }), "{key}: {e}");
        assert_eq!(e.field(), Some(key), "{e}");
    }
    let (field, _) = err_field(DEEPSEEK_V2_LITE, |m| {
        m["rope_scaling"]["type"] = "dynamic".into();
    });
    assert_eq!(field, "rope_scaling.type");
}

#[test]
fn q_lora_rank_null_and_set_both_parse() {
    let set = parse_edited(DEEPSEEK_V2_LITE, |m| {
        m.insert("q_lora_rank".into(), 96.into());
    })
    .unwrap();
    let AttentionConfig::Mla(m) = &set.attention else {
        panic!()
    };
    assert_eq!(m.q_lora_rank, Some(96));
    let AttentionConfig::Mla(m) = &parse(DEEPSEEK_V2_LITE).attention else {
        panic!()
    };
    assert_eq!(m.q_lora_rank, None);
}

#[test]
fn not_json_and_io_errors() {
    assert!(matches!(
        ModelConfig::from_json_str("{"),
        Err(ConfigError::NotJson(_))
    ));
    assert!(matches!(
        ModelConfig::from_json_str("[1]"),
        Err(ConfigError::NotJson(_))
    ));
    let dir = tempfile::tempdir().unwrap();
    let e = ModelConfig::from_dir(dir.path()).unwrap_err();
    assert!(matches!(e, ConfigError::Io { .. }));
    assert!(e.to_string().contains("config.json"), "{e}");
    std::fs::write(dir.path().join("config.json"), MIXTRAL_8X7B).unwrap();
    assert_eq!(
        ModelConfig::from_dir(dir.path()).unwrap(),
        parse(MIXTRAL_8X7B)
    );
}
