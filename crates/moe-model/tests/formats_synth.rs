//! Synthetic model directories: every tiny preset written and read back through the checkpoint
//! reader, determinism for a fixed seed, the byte-level tokenizer loaded by the `tokenizers`
//! library, and the full-size presets' configs and shapes (via the schema, without writing them).

use moe_model::checkpoint::{Checkpoint, INDEX_FILE, SINGLE_FILE};
use moe_model::config::{DType, ModelConfig};
use moe_model::presets::{self, Preset};
use moe_model::schema::{ModelSchema, TensorOwner, TensorRole};
use moe_model::synth::{self, SynthError, SynthOptions};
use std::path::Path;

const QWEN3_30B_A3B: &str = include_str!("fixtures/qwen3-30b-a3b.config.json");
const MIXTRAL_8X7B: &str = include_str!("fixtures/mixtral-8x7b.config.json");
const DEEPSEEK_V2_LITE: &str = include_str!("fixtures/deepseek-v2-lite.config.json");

const TINY: [Preset; 3] = [Preset::TinyQwen3, Preset::TinyDeepseek, Preset::TinyMixtral];

fn gen(
    cfg: &ModelConfig,
    dir: &Path,
    seed: u64,
    dtype: DType,
    max_shard: u64,
) -> synth::SynthReport {
    let opts = SynthOptions {
        seed,
        dtype,
        max_shard_bytes: max_shard,
    };
    let mut last = 0;
    let report = synth::write_model(cfg, dir, &opts, |p| {
        assert_eq!(
            p.tensors_done,
            last + 1,
            "progress is reported once per tensor, in order"
        );
        last = p.tensors_done;
        assert!(p.bytes_done <= p.bytes_total);
    })
    .unwrap();
    assert_eq!(last, report.tensors);
    report
}

#[test]
fn every_tiny_preset_writes_a_loadable_directory() {
    for p in TINY {
        let cfg = p.config();
        let dir = tempfile::tempdir().unwrap();
        // 256 KiB shards so the tiny models are sharded too.
        let report = gen(&cfg, dir.path(), 5, p.default_dtype(), 256 << 10);
        let schema = ModelSchema::new(&cfg);
        assert_eq!(report.tensors, schema.tensors().len());
        assert_eq!(report.bytes, schema.total_bytes(DType::F32) as u64);
        for f in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            INDEX_FILE,
        ] {
            assert!(dir.path().join(f).is_file(), "{p}: {f} missing");
        }
        // config.json is the preset's config with the tokenizer's special ids.
        let written = ModelConfig::from_dir(dir.path()).unwrap();
        assert_eq!(written, synth::model_dir_config(&cfg, DType::F32));
        assert_eq!(written.bos_token_id, Some(synth::BOS_ID));
        // Every tensor is there with the right shape, and reads back exactly (f32 storage).
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert!(ck.num_shards() > 1, "{p}: expected several shards");
        ck.validate(&schema).unwrap();
        assert_eq!(ck.names().len(), schema.tensors().len());
        for spec in schema.tensors() {
            let got = ck.read_f32(&spec.name).unwrap();
            assert_eq!(
                got,
                synth::tensor_values(&cfg, 5, spec),
                "{p}: {}",
                spec.name
            );
            assert!(got.iter().all(|x| x.is_finite()));
            if spec.role.is_norm() {
                assert!(
                    got.iter().all(|&x| x == 1.0),
                    "{p}: norm {} is ones",
                    spec.name
                );
            } else {
                let rms = (got.iter().map(|x| x * x).sum::<f32>() / got.len() as f32).sqrt();
                assert!(rms > 0.0 && rms < 2.0, "{p}: {} has rms {rms}", spec.name);
            }
        }
    }
}

#[test]
fn init_scales_follow_fan_in_and_depth() {
    let cfg = Preset::TinyMixtral.config();
    let s = ModelSchema::new(&cfg);
    let std_of = |owner, role| match synth::init_for(&cfg, s.find(owner, role).unwrap()) {
        synth::Init::Normal { std } => std,
        synth::Init::Ones => panic!("not a normal init"),
    };
    assert_eq!(std_of(TensorOwner::Global, TensorRole::Embedding), 1.0);
    assert!((std_of(TensorOwner::Attention(0), TensorRole::QProj) - 1.0 / 8.0).abs() < 1e-7);
    assert!((std_of(TensorOwner::Global, TensorRole::LmHead) - 1.0 / 8.0).abs() < 1e-7);
    let down = std_of(
        TensorOwner::Expert {
            layer: 0,
            expert: 0,
        },
        TensorRole::Down,
    );
    assert!(
        (down - 1.0 / (128f32.sqrt() * 2.0)).abs() < 1e-7,
        "1/sqrt(128) / sqrt(2 * 2 layers), got {down}"
    );
    assert_eq!(
        synth::init_for(
            &cfg,
            s.find(TensorOwner::Global, TensorRole::FinalNorm).unwrap()
        ),
        synth::Init::Ones
    );
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let cfg = Preset::TinyDeepseek.config();
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let ra = gen(&cfg, a.path(), 42, DType::BF16, u64::MAX);
    gen(&cfg, b.path(), 42, DType::BF16, u64::MAX);
    gen(&cfg, c.path(), 43, DType::BF16, u64::MAX);
    for f in &ra.files {
        let name = f.file_name().unwrap();
        assert_eq!(
            std::fs::read(f).unwrap(),
            std::fs::read(b.path().join(name)).unwrap(),
            "{name:?} differs for the same seed"
        );
    }
    let st = |d: &Path| std::fs::read(d.join(SINGLE_FILE)).unwrap();
    assert_ne!(st(a.path()), st(c.path()));
    assert_eq!(
        std::fs::read(a.path().join("config.json")).unwrap(),
        std::fs::read(c.path().join("config.json")).unwrap()
    );
}

#[test]
fn layer_override_keeps_shared_draws() {
    let cfg = Preset::TinyQwen3.config();
    let short = presets::with_layers(&cfg, 2).unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    gen(&cfg, a.path(), 9, DType::F32, u64::MAX);
    gen(&short, b.path(), 9, DType::F32, u64::MAX);
    let (ca, cb) = (
        Checkpoint::open(a.path()).unwrap(),
        Checkpoint::open(b.path()).unwrap(),
    );
    assert!(
        ca.contains("model.layers.2.mlp.gate.weight")
            && !cb.contains("model.layers.2.mlp.gate.weight")
    );
    for name in [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.experts.3.up_proj.weight",
    ] {
        assert_eq!(
            ca.read_f32(name).unwrap(),
            cb.read_f32(name).unwrap(),
            "{name}"
        );
    }
    // Output projections are depth-scaled: same draws, scale sqrt(3/2) apart.
    let (x, y) = (
        ca.read_f32("model.layers.0.self_attn.o_proj.weight")
            .unwrap(),
        cb.read_f32("model.layers.0.self_attn.o_proj.weight")
            .unwrap(),
    );
    for (p, q) in x.iter().zip(&y) {
        assert!(
            (q - p * 1.5f32.sqrt()).abs() <= 1e-6 * q.abs().max(1.0),
            "{p} vs {q}"
        );
    }
}

#[test]
fn bf16_and_f16_storage_round_through_the_reader() {
    for dtype in [DType::BF16, DType::F16] {
        let cfg = Preset::TinyMixtral.config();
        let dir = tempfile::tempdir().unwrap();
        gen(&cfg, dir.path(), 1, dtype, u64::MAX);
        let ck = Checkpoint::open(dir.path()).unwrap();
        let spec = ModelSchema::new(&cfg)
            .find(TensorOwner::Attention(1), TensorRole::KProj)
            .unwrap()
            .clone();
        assert_eq!(ck.info(&spec.name).unwrap().dtype, Ok(dtype));
        let want: Vec<f32> = synth::tensor_values(&cfg, 1, &spec)
            .iter()
            .map(|&v| moe_model::checkpoint::round_through(dtype, v))
            .collect();
        assert_eq!(ck.read_f32(&spec.name).unwrap(), want);
        assert_eq!(
            ModelConfig::from_dir(dir.path()).unwrap().torch_dtype,
            Some(dtype)
        );
    }
}

#[test]
fn vocab_must_cover_the_tokenizer() {
    let mut v = Preset::TinyMixtral.config().to_hf_json();
    v["vocab_size"] = 200.into();
    v["eos_token_id"] = 2.into();
    v["bos_token_id"] = 1.into();
    let cfg = ModelConfig::from_json(&v).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = synth::write_model(&cfg, dir.path(), &SynthOptions::new(0), |_| {}).unwrap_err();
    assert!(
        matches!(e, SynthError::VocabTooSmall { vocab_size: 200 }),
        "{e}"
    );
}

#[test]
fn byte_tokenizer_loads_in_the_tokenizers_library() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(
        &path,
        serde_json::to_string(&synth::byte_tokenizer_json()).unwrap(),
    )
    .unwrap();
    let tok = tokenizers::Tokenizer::from_file(&path).expect("tokenizers loads our tokenizer.json");
    assert_eq!(tok.get_vocab_size(true), synth::TOKENIZER_VOCAB);
    for text in [
        "hello world",
        "héllo, wörld!\n\ttabs  and  spaces ",
        "日本語 🙂",
        "",
    ] {
        let enc = tok.encode(text, false).unwrap();
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(enc.get_ids(), &ids[..], "one token per byte for {text:?}");
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
    }
    let chat = "<|im_start|>user\nhi<|im_end|>\n";
    let enc = tok.encode(chat, false).unwrap();
    let mut want = vec![synth::IM_START_ID];
    want.extend(b"user\nhi".iter().map(|&b| u32::from(b)));
    want.push(synth::IM_END_ID);
    want.push(u32::from(b'\n'));
    assert_eq!(enc.get_ids(), &want[..]);
    for (i, t) in synth::SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_to_id(t), Some(synth::BYTE_TOKENS + i as u32));
    }
    assert_eq!(
        tok.decode(&[synth::BOS_ID, u32::from(b'a')], true).unwrap(),
        "a",
        "specials are skipped"
    );
}

#[test]
fn tokenizer_config_has_a_chat_template() {
    let v = synth::tokenizer_config_json(2048);
    assert_eq!(v["chat_template"], synth::CHAT_TEMPLATE);
    assert_eq!(v["eos_token"], "<|im_end|>");
    assert_eq!(v["added_tokens_decoder"]["259"]["content"], "<|im_end|>");
    assert_eq!(v["model_max_length"], 2048);
}

#[test]
fn full_size_presets_are_the_published_configs() {
    for (p, text) in [
        (Preset::Qwen3_30bA3b, QWEN3_30B_A3B),
        (Preset::Mixtral8x7b, MIXTRAL_8X7B),
        (Preset::DeepseekV2Lite, DEEPSEEK_V2_LITE),
    ] {
        assert_eq!(p.config(), ModelConfig::from_json_str(text).unwrap(), "{p}");
        assert_eq!(p.default_dtype(), DType::BF16);
    }
    // Shapes of what gen-model would write, from the schema (without writing tens of GB).
    let q = ModelSchema::new(&Preset::Qwen3_30bA3b.config());
    assert_eq!(q.total_bytes(DType::BF16), 2 * 30_532_122_624);
    assert_eq!(
        q.get("model.layers.47.mlp.experts.127.down_proj.weight")
            .unwrap()
            .shape,
        vec![2048, 768]
    );
    let m = ModelSchema::new(&Preset::Mixtral8x7b.config());
    assert_eq!(m.total_params(), 46_702_792_704);
    let d = ModelSchema::new(&Preset::DeepseekV2Lite.config());
    assert_eq!(
        d.get("model.layers.1.mlp.shared_experts.up_proj.weight")
            .unwrap()
            .shape,
        vec![2816, 2048]
    );
    assert_eq!(
        d.get("model.layers.0.self_attn.kv_b_proj.weight")
            .unwrap()
            .shape,
        vec![4096, 512]
    );
    // The config gen-model writes for them parses back to the same model with tokenizer ids.
    for p in [
        Preset::Qwen3_30bA3b,
        Preset::Mixtral8x7b,
        Preset::DeepseekV2Lite,
    ] {
        let c = synth::model_dir_config(&p.config(), DType::BF16);
        assert_eq!(ModelConfig::from_json(&c.to_hf_json()).unwrap(), c);
    }
}
