//! The tensor schema against the real checkpoints' names and shapes, plus structural invariants
//! (unique names, one tensor per owner/role, owners partition the model) over random configs.

use moe_model::config::{DType, ModelConfig};
use moe_model::schema::{self, ModelSchema, TensorOwner, TensorRole};
use proptest::prelude::*;
use std::collections::HashSet;

const QWEN3_30B_A3B: &str = include_str!("fixtures/qwen3-30b-a3b.config.json");
const MIXTRAL_8X7B: &str = include_str!("fixtures/mixtral-8x7b.config.json");
const DEEPSEEK_V2_LITE: &str = include_str!("fixtures/deepseek-v2-lite.config.json");
const DEEPSEEK_V2: &str = include_str!("fixtures/deepseek-v2.config.json");

fn schema_of(text: &str) -> (ModelConfig, ModelSchema) {
    let c = ModelConfig::from_json_str(text).unwrap();
    let s = ModelSchema::new(&c);
    (c, s)
}

fn shape(s: &ModelSchema, name: &str) -> Vec<usize> {
    s.get(name)
        .unwrap_or_else(|| panic!("schema lacks {name}"))
        .shape
        .clone()
}

#[test]
fn qwen3_30b_a3b_names_and_shapes() {
    let (_, s) = schema_of(QWEN3_30B_A3B);
    // The published checkpoint has 18867 tensors: 48 * (8 attention + 1 router + 128 * 3) + 3.
    assert_eq!(s.tensors().len(), 18867);
    assert_eq!(shape(&s, "model.embed_tokens.weight"), [151936, 2048]);
    assert_eq!(shape(&s, "lm_head.weight"), [151936, 2048]);
    assert_eq!(shape(&s, "model.norm.weight"), [2048]);
    assert_eq!(
        shape(&s, "model.layers.0.self_attn.q_proj.weight"),
        [4096, 2048]
    );
    assert_eq!(
        shape(&s, "model.layers.0.self_attn.k_proj.weight"),
        [512, 2048]
    );
    assert_eq!(
        shape(&s, "model.layers.0.self_attn.v_proj.weight"),
        [512, 2048]
    );
    assert_eq!(
        shape(&s, "model.layers.0.self_attn.o_proj.weight"),
        [2048, 4096]
    );
    assert_eq!(shape(&s, "model.layers.0.self_attn.q_norm.weight"), [128]);
    assert_eq!(shape(&s, "model.layers.0.self_attn.k_norm.weight"), [128]);
    assert_eq!(shape(&s, "model.layers.47.mlp.gate.weight"), [128, 2048]);
    assert_eq!(
        shape(&s, "model.layers.47.mlp.experts.127.gate_proj.weight"),
        [768, 2048]
    );
    assert_eq!(
        shape(&s, "model.layers.47.mlp.experts.127.up_proj.weight"),
        [768, 2048]
    );
    assert_eq!(
        shape(&s, "model.layers.47.mlp.experts.127.down_proj.weight"),
        [2048, 768]
    );
    assert!(
        s.get("model.layers.0.mlp.gate_proj.weight").is_none(),
        "no dense layers"
    );
    assert!(s
        .get("model.layers.0.mlp.experts.128.gate_proj.weight")
        .is_none());
}

#[test]
fn mixtral_8x7b_names_and_shapes() {
    let (_, s) = schema_of(MIXTRAL_8X7B);
    // 32 * (6 attention + 1 router + 8 * 3) + 3 = 995, as in the published index.
    assert_eq!(s.tensors().len(), 995);
    assert_eq!(
        shape(&s, "model.layers.3.self_attn.k_proj.weight"),
        [1024, 4096]
    );
    assert_eq!(
        shape(&s, "model.layers.3.block_sparse_moe.gate.weight"),
        [8, 4096]
    );
    assert_eq!(
        shape(&s, "model.layers.3.block_sparse_moe.experts.7.w1.weight"),
        [14336, 4096]
    );
    assert_eq!(
        shape(&s, "model.layers.3.block_sparse_moe.experts.7.w3.weight"),
        [14336, 4096]
    );
    assert_eq!(
        shape(&s, "model.layers.3.block_sparse_moe.experts.7.w2.weight"),
        [4096, 14336]
    );
    assert!(s.get("model.layers.0.self_attn.q_norm.weight").is_none());
    let w1 = s
        .find(
            TensorOwner::Expert {
                layer: 3,
                expert: 7,
            },
            TensorRole::Gate,
        )
        .unwrap();
    assert_eq!(
        w1.name,
        "model.layers.3.block_sparse_moe.experts.7.w1.weight"
    );
    let w2 = s
        .find(
            TensorOwner::Expert {
                layer: 3,
                expert: 7,
            },
            TensorRole::Down,
        )
        .unwrap();
    assert_eq!(
        w2.name,
        "model.layers.3.block_sparse_moe.experts.7.w2.weight"
    );
}

#[test]
fn deepseek_v2_lite_names_and_shapes() {
    let (c, s) = schema_of(DEEPSEEK_V2_LITE);
    // Layer 0 is dense (first_k_dense_replace = 1).
    assert_eq!(
        shape(&s, "model.layers.0.mlp.gate_proj.weight"),
        [10944, 2048]
    );
    assert_eq!(
        shape(&s, "model.layers.0.mlp.down_proj.weight"),
        [2048, 10944]
    );
    assert!(s.get("model.layers.0.mlp.gate.weight").is_none());
    assert!(s
        .get("model.layers.0.mlp.experts.0.gate_proj.weight")
        .is_none());
    // MLA without q compression.
    assert_eq!(
        shape(&s, "model.layers.0.self_attn.q_proj.weight"),
        [3072, 2048]
    );
    assert!(s.get("model.layers.0.self_attn.q_a_proj.weight").is_none());
    assert_eq!(
        shape(&s, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"),
        [576, 2048]
    );
    assert_eq!(
        shape(&s, "model.layers.0.self_attn.kv_a_layernorm.weight"),
        [512]
    );
    assert_eq!(
        shape(&s, "model.layers.0.self_attn.kv_b_proj.weight"),
        [4096, 512]
    );
    assert_eq!(
        shape(&s, "model.layers.0.self_attn.o_proj.weight"),
        [2048, 2048]
    );
    // MoE layers: router, shared experts (2 * 1408 wide), routed experts.
    assert_eq!(shape(&s, "model.layers.1.mlp.gate.weight"), [64, 2048]);
    assert!(s
        .get("model.layers.1.mlp.gate.e_score_correction_bias")
        .is_none());
    assert_eq!(
        shape(&s, "model.layers.1.mlp.shared_experts.gate_proj.weight"),
        [2816, 2048]
    );
    assert_eq!(
        shape(&s, "model.layers.1.mlp.shared_experts.down_proj.weight"),
        [2048, 2816]
    );
    assert_eq!(
        shape(&s, "model.layers.26.mlp.experts.63.up_proj.weight"),
        [1408, 2048]
    );
    assert!(s.get("model.layers.1.mlp.gate_proj.weight").is_none());
    let per_moe_layer = 7 + 1 + 3 + 64 * 3;
    assert_eq!(s.tensors().len(), 3 + (7 + 3) + 26 * per_moe_layer);
    assert_eq!(s.owned_by(TensorOwner::SharedExperts(1)).count(), 3);
    assert_eq!(s.owned_by(TensorOwner::DenseMlp(0)).count(), 3);
    assert_eq!(c.expert_bytes(DType::BF16), 3 * 2048 * 1408 * 2);
}

#[test]
fn deepseek_v2_q_lora_names_and_shapes() {
    let (_, s) = schema_of(DEEPSEEK_V2);
    assert!(s.get("model.layers.0.self_attn.q_proj.weight").is_none());
    assert_eq!(
        shape(&s, "model.layers.0.self_attn.q_a_proj.weight"),
        [1536, 5120]
    );
    assert_eq!(
        shape(&s, "model.layers.0.self_attn.q_a_layernorm.weight"),
        [1536]
    );
    assert_eq!(
        shape(&s, "model.layers.0.self_attn.q_b_proj.weight"),
        [128 * 192, 1536]
    );
    assert_eq!(shape(&s, "model.layers.59.mlp.gate.weight"), [160, 5120]);
}

#[test]
fn tied_embeddings_drop_the_lm_head() {
    let mut v: serde_json::Value = serde_json::from_str(MIXTRAL_8X7B).unwrap();
    v["tie_word_embeddings"] = true.into();
    let s = ModelSchema::new(&ModelConfig::from_json(&v).unwrap());
    assert!(s.get("lm_head.weight").is_none());
    assert_eq!(s.owned_by(TensorOwner::Global).count(), 2);
}

#[test]
fn expert_tensor_name_agrees_with_the_schema() {
    for text in [QWEN3_30B_A3B, MIXTRAL_8X7B, DEEPSEEK_V2_LITE] {
        let (c, s) = schema_of(text);
        let l = c.moe_layers().last().unwrap();
        for role in [TensorRole::Gate, TensorRole::Up, TensorRole::Down] {
            let name = schema::expert_tensor_name(c.architecture, l, 1, role).unwrap();
            assert_eq!(
                s.find(
                    TensorOwner::Expert {
                        layer: l,
                        expert: 1
                    },
                    role
                )
                .unwrap()
                .name,
                name
            );
        }
        assert!(schema::expert_tensor_name(c.architecture, l, 1, TensorRole::QProj).is_none());
    }
}

/// A small random config of any of the three architectures.
fn arb_config() -> impl Strategy<Value = ModelConfig> {
    (
        0usize..3,
        1usize..5,
        prop::sample::select(vec![1usize, 2, 4]),
        1usize..4,
        prop::sample::select(vec![4usize, 8, 16]),
        any::<bool>(),
        any::<bool>(),
        0usize..3,
    )
        .prop_map(
            |(arch, layers, kv, heads_mul, experts, tie, q_lora, dense)| {
                let heads = kv * heads_mul;
                let mut v = serde_json::json!({
                    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": layers,
                    "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 8,
                    "vocab_size": 300, "max_position_embeddings": 256, "num_experts_per_tok": 2,
                    "tie_word_embeddings": tie, "moe_intermediate_size": 24,
                });
                let m = v.as_object_mut().unwrap();
                match arch {
                    0 => {
                        m.insert(
                            "architectures".into(),
                            serde_json::json!(["Qwen3MoeForCausalLM"]),
                        );
                        m.insert("num_experts".into(), experts.into());
                        let only: Vec<usize> = (0..dense.min(layers - 1)).collect();
                        m.insert("mlp_only_layers".into(), only.into());
                    }
                    1 => {
                        m.insert(
                            "architectures".into(),
                            serde_json::json!(["MixtralForCausalLM"]),
                        );
                        m.insert("num_local_experts".into(), experts.into());
                    }
                    _ => {
                        m.insert(
                            "architectures".into(),
                            serde_json::json!(["DeepseekV2ForCausalLM"]),
                        );
                        m.insert("n_routed_experts".into(), experts.into());
                        m.insert("n_shared_experts".into(), (dense % 2 + 1).into());
                        m.insert("first_k_dense_replace".into(), dense.min(layers - 1).into());
                        m.insert(
                            "q_lora_rank".into(),
                            if q_lora {
                                16.into()
                            } else {
                                serde_json::Value::Null
                            },
                        );
                        m.insert("kv_lora_rank".into(), 16.into());
                        m.insert("qk_nope_head_dim".into(), 8.into());
                        m.insert("qk_rope_head_dim".into(), 4.into());
                        m.insert("v_head_dim".into(), 8.into());
                    }
                }
                ModelConfig::from_json(&v).expect("generated config is valid")
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn schema_is_well_formed(c in arb_config()) {
        let s = ModelSchema::new(&c);
        let names: HashSet<&str> = s.tensors().iter().map(|t| t.name.as_str()).collect();
        prop_assert_eq!(names.len(), s.tensors().len(), "names are unique");
        let pairs: HashSet<_> = s.tensors().iter().map(|t| (t.owner, t.role)).collect();
        prop_assert_eq!(pairs.len(), s.tensors().len(), "owner/role pairs are unique");
        for t in s.tensors() {
            prop_assert!(t.numel() > 0, "{} is empty", t.name);
            prop_assert!(t.name.ends_with(".weight"));
            prop_assert_eq!(s.get(&t.name), Some(t));
            prop_assert_eq!(s.find(t.owner, t.role), Some(t));
            if let Some(l) = t.owner.layer() {
                let prefix = format!("model.layers.{l}.");
                prop_assert!(t.name.starts_with(&prefix));
            }
            prop_assert_eq!(t.role.is_norm(), t.shape.len() == 1);
        }
        // Owners partition the model.
        let mut sum = s.owned_by(TensorOwner::Global).map(|t| t.numel()).sum::<usize>();
        for l in 0..c.num_layers {
            let layer: usize = schema::layer_tensors(&c, l).iter().map(|t| t.numel()).sum();
            let attn: usize = s.owned_by(TensorOwner::Attention(l)).map(|t| t.numel()).sum();
            prop_assert_eq!(attn, c.attention_params_per_layer());
            let experts = s.tensors().iter().filter(|t| matches!(t.owner, TensorOwner::Expert { layer, .. } if layer == l));
            let routed: usize = experts.map(|t| t.numel()).sum();
            prop_assert_eq!(routed, if c.is_moe_layer(l) { c.experts_per_layer() * c.expert_params() } else { 0 });
            prop_assert_eq!(layer, c.replicated_params_for_layer(l) + routed);
            prop_assert_eq!(s.owned_by(TensorOwner::Router(l)).count(), usize::from(c.is_moe_layer(l)));
            prop_assert_eq!(s.owned_by(TensorOwner::DenseMlp(l)).count(), if c.is_moe_layer(l) { 0 } else { 3 });
            sum += layer;
        }
        prop_assert_eq!(sum, s.total_params());
        prop_assert_eq!(s.total_bytes(DType::BF16), 2 * s.total_params());
        prop_assert_eq!(c.total_params(), s.total_params());
    }
}
