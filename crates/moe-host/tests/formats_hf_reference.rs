//! The engine against Hugging Face transformers' own implementations.
//!
//! `fixtures/hf_tiny_logits.json` was produced by `scripts/check_hf_load.py --dump` (transformers
//! 5.24, torch 2.15, float32, CPU) on `elasticmoe gen-model --preset P` directories (seed 0, f32):
//! per tiny preset, the chat-template prompt ids, transformers' 64 greedy tokens, and its logits for
//! the first 16 of them. That the directories loaded there with no missing, unexpected or
//! mis-shaped weights is what makes them the real architectures; this test checks that our CPU
//! forward computes what transformers computes on them (within 1e-5 of the logit scale),
//! teacher-forced along transformers' greedy path.
//!
//! The fixture is tied to the synthetic weights: if `synth`'s initialisation ever changes, rerun
//! `elasticmoe gen-model --preset P --out DIR` for the three tiny presets and
//! `scripts/check_hf_load.py DIR... --dump dump.json`, and rebuild the fixture from the dump (first
//! 16 logit rows per preset).

use hbm_vmm::host::{HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Vmm};
use moe_host::compute::cpu::CpuCompute;
use moe_host::model::runner::SingleDevice;
use moe_host::model::Model;
use moe_model::checkpoint::Checkpoint;
use moe_model::config::{DType, ModelConfig};
use moe_model::presets::Preset;
use moe_model::synth::{self, SynthOptions};
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/hf_tiny_logits.json");

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check(preset: Preset) {
    let fx: Value = serde_json::from_str(FIXTURE).unwrap();
    let fx = &fx[preset.name()];
    let prompt = ids(&fx["prompt_ids"]);
    let greedy = ids(&fx["greedy"]);
    let hf: Vec<Vec<f32>> = fx["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        dtype: DType::F32,
        ..SynthOptions::new(0)
    };
    synth::write_model(&preset.config(), dir.path(), &opts, |_| {}).unwrap();
    let cfg = ModelConfig::from_dir(dir.path()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let vmm = Vmm::new(HostBackend::new(
        HostConfig::devices(1, 256 << 20)
            .with_granularity(hbm_vmm::host::page_size())
            .unwrap(),
    ));
    let model = Model::new(&cfg, CpuCompute::new()).unwrap();
    let mut ours = SingleDevice::load(model, &vmm, DeviceId(0), &ck, 8).unwrap();
    let seq = ours.add_sequence();

    let mut next = prompt;
    let mut worst = 0f32;
    for (step, &tok) in greedy.iter().enumerate() {
        let logits = ours.step(&[(seq, next)]).unwrap().remove(0);
        assert!(
            logits.iter().all(|x| x.is_finite()),
            "{preset} step {step}: non-finite logits"
        );
        if let Some(want) = hf.get(step) {
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = logits
                .iter()
                .zip(want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            worst = worst.max(err / scale);
            assert!(
                err <= 1e-5 * scale,
                "{preset} step {step}: max |ours - transformers| = {err} (scale {scale})"
            );
        }
        // Our greedy choice agrees with transformers' unless the top two are a near tie.
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let ours_tok = moe_host::model::runner::argmax(&logits);
        assert!(
            ours_tok == tok || sorted[0] - sorted[1] < 1e-4,
            "{preset} step {step}: we pick {ours_tok}, transformers picked {tok}"
        );
        next = vec![tok];
    }
    eprintln!("{preset}: worst relative logit difference vs transformers {worst:e}");
}

#[test]
fn tiny_qwen3_matches_transformers() {
    check(Preset::TinyQwen3);
}

#[test]
fn tiny_mixtral_matches_transformers() {
    check(Preset::TinyMixtral);
}

#[test]
fn tiny_deepseek_matches_transformers() {
    check(Preset::TinyDeepseek);
}
