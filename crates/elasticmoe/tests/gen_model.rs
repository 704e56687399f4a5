//! `elasticmoe gen-model` end to end: every tiny preset, layer override, determinism, and clear
//! errors for bad arguments.

use moe_model::checkpoint::{Checkpoint, INDEX_FILE};
use moe_model::config::{DType, ModelConfig};
use moe_model::presets::{self, Preset};
use moe_model::schema::ModelSchema;
use std::path::Path;
use std::process::{Command, Output};

fn elasticmoe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_elasticmoe"))
        .args(args)
        .output()
        .expect("run elasticmoe")
}

fn gen(preset: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "gen-model",
        "--preset",
        preset,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    elasticmoe(&args)
}

#[test]
fn writes_every_tiny_preset() {
    for p in [Preset::TinyQwen3, Preset::TinyDeepseek, Preset::TinyMixtral] {
        let dir = tempfile::tempdir().unwrap();
        let out = gen(p.name(), dir.path(), &["--seed", "3"]);
        assert!(
            out.status.success(),
            "{p}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cfg = ModelConfig::from_dir(dir.path()).unwrap();
        assert_eq!(cfg.architecture, p.config().architecture);
        assert_eq!(cfg.num_layers, p.config().num_layers);
        assert_eq!(cfg.torch_dtype, Some(DType::F32));
        assert!(
            dir.path().join(INDEX_FILE).exists(),
            "{p}: tiny presets are written in 1 MiB shards"
        );
        assert!(
            dir.path().join("tokenizer.json").exists()
                && dir.path().join("tokenizer_config.json").exists()
        );
        Checkpoint::open(dir.path())
            .unwrap()
            .validate(&ModelSchema::new(&cfg))
            .unwrap();
    }
}

#[test]
fn layers_seed_and_dtype_are_honoured() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&a, &b] {
        let out = gen(
            "tiny-deepseek",
            d.path(),
            &[
                "--layers",
                "2",
                "--seed",
                "11",
                "--dtype",
                "bf16",
                "--max-shard-mib",
                "4096",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cfg = ModelConfig::from_dir(a.path()).unwrap();
    assert_eq!(
        cfg,
        moe_model::synth::model_dir_config(
            &presets::with_layers(&Preset::TinyDeepseek.config(), 2).unwrap(),
            DType::BF16
        )
    );
    let ck = Checkpoint::open(a.path()).unwrap();
    assert_eq!(ck.num_shards(), 1);
    assert!(!ck.contains("model.layers.2.input_layernorm.weight"));
    let file = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(file(a.path()), file(b.path()), "same seed, same bytes");
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = gen("tiny-llama", dir.path(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown preset \"tiny-llama\"") && err.contains("tiny-qwen3"),
        "{err}"
    );

    let out = gen("tiny-deepseek", dir.path(), &["--layers", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--layers 1") && err.contains("first_k_dense_replace"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let out = elasticmoe(&["gen-model", "--preset", "tiny-qwen3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--out"));
}
