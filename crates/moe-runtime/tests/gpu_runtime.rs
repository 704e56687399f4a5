//! GPU correctness of the CUDA runner against the CPU reference (feature `cuda`; run through
//! `cargo xtask hil`). Without a GPU the test prints why it skips and returns.
//!
//! Both sides run the same bf16-rounded synthetic weights, so the comparison measures the CUDA
//! kernels, not weight quantisation. Decoding is teacher-forced with the CPU's greedy tokens (each
//! step feeds the CPU's argmax to both sides), so one flipped token never cascades and every
//! position compares the same context.
//!
//! Metric, per position: `max_v |gpu_v - cpu_v| / max_v |cpu_v|` (error relative to the largest
//! logit, as the CPU-side reference tests measure it); the check takes the worst position.
//!
//! Each preset runs in both precisions. [`Precision::F32`] (f32 GEMM inputs, the CPU reference's
//! arithmetic) must meet the thresholds (token match >= 0.99, error <= 2e-2).
//! [`Precision::Bf16`] (the serving mode: activations rounded to bf16 before every GEMM) is
//! measured and reported beside it but not asserted: on these tiny random models a bf16-rounded
//! activation can flip a router near-tie, which changes a whole expert's contribution.

#![cfg(feature = "cuda")]

use hbm_vmm::host::{HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Vmm};
use moe_runtime::compute::cpu::CpuCompute;
use moe_runtime::config::ModelConfig;
use moe_runtime::cuda::{self, CudaConfig, CudaRunner, Precision};
use moe_runtime::engine::{Chunk, RankId, RequestId, Runner, Work};
use moe_runtime::model::runner::SingleDevice;
use moe_runtime::model::weights::{MemTensors, TensorSource};
use moe_runtime::model::Model;
use moe_runtime::presets::Preset;
use moe_runtime::schema::TensorSpec;

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

/// A source whose values are rounded to bf16 (what the GPU holds).
struct Bf16Rounded(MemTensors);

impl TensorSource for Bf16Rounded {
    fn read_f32_into(&self, name: &str, out: &mut [f32]) -> Result<(), BoxErr> {
        self.0.read_f32_into(name, out)?;
        for v in out.iter_mut() {
            *v = half::bf16::from_f32(*v).to_f32();
        }
        Ok(())
    }
    fn check(&self, spec: &TensorSpec) -> Result<(), BoxErr> {
        self.0.check(spec)
    }
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

fn rel_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    let scale = cpu.iter().fold(0.0f64, |m, &x| m.max(f64::from(x.abs())));
    let diff = gpu
        .iter()
        .zip(cpu)
        .fold(0.0f64, |m, (&g, &c)| m.max(f64::from((g - c).abs())));
    diff / scale.max(1e-6)
}

struct Outcome {
    token_match: f64,
    max_rel: f64,
    /// Every position's relative error, for the diagnostic print.
    errs: Vec<f64>,
    /// (step, sequence, error) of positions over 2e-2.
    bad: Vec<(usize, usize, f64)>,
}

/// Prompts of several lengths (fixed), prefilled as one batch, then `steps` batched decodes.
fn compare(cfg: &ModelConfig, gpus: usize, precision: Precision) -> Outcome {
    let src = Bf16Rounded(MemTensors::seeded(cfg, 11));
    let host = Vmm::new(HostBackend::new(
        HostConfig::devices(1, 1 << 30)
            .with_granularity(4096)
            .unwrap(),
    ));
    let model = Model::new(cfg, CpuCompute::new()).unwrap();
    let mut cpu = SingleDevice::load(model, &host, DeviceId(0), &src, 16).unwrap();
    let mut gpu = CudaRunner::load(
        cfg,
        &src,
        CudaConfig {
            devices: gpus,
            block_tokens: 16,
            kv_blocks_per_rank: 128,
            max_batch_tokens: 128,
            max_context: 256,
            precision,
        },
    )
    .unwrap();
    if gpus > 1 {
        // Experts really are split between the devices.
        let l = cfg.moe_layers().next().unwrap();
        let last = cfg.moe.num_experts - 1;
        assert_eq!(gpu.expert_device(l, 0), Some(DeviceId(0)));
        assert_eq!(gpu.expert_device(l, last), Some(DeviceId(gpus as u32 - 1)));
    }
    let vocab = cfg.vocab_size as u32;
    let lens = [5usize, 12, 1, 23, 8, 3];
    let mut seed = 12345u32;
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 8) % vocab
                })
                .collect()
        })
        .collect();
    let ids: Vec<_> = prompts.iter().map(|_| cpu.add_sequence()).collect();
    let rank = |i: usize| RankId((i % gpus) as u32);
    let mut inputs: Vec<Vec<u32>> = prompts.clone();
    let mut start = vec![0usize; prompts.len()];
    let (mut matched, mut total, mut max_rel) = (0usize, 0usize, 0.0f64);
    let mut errs = Vec::new();
    let mut bad = Vec::new();
    for step in 0..12 {
        let cpu_in: Vec<_> = ids
            .iter()
            .zip(&inputs)
            .map(|(&s, t)| (s, t.clone()))
            .collect();
        let cpu_logits = cpu.step(&cpu_in).unwrap();
        for (i, t) in inputs.iter().enumerate() {
            assert!(gpu
                .ledger()
                .grow(rank(i), RequestId(i as u64), start[i] + t.len()));
        }
        let work: Vec<Work<'_>> = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| Work {
                chunk: Chunk {
                    seq: RequestId(i as u64),
                    rank: rank(i),
                    start: start[i],
                    len: t.len(),
                    sample: true,
                },
                tokens: t,
            })
            .collect();
        let gpu_logits = gpu.run(&work).unwrap();
        assert_eq!(gpu_logits.len(), cpu_logits.len());
        for (i, (g, c)) in gpu_logits.iter().zip(&cpu_logits).enumerate() {
            assert_eq!(g.len(), c.len());
            assert!(g.iter().all(|x| x.is_finite()), "non-finite GPU logits");
            total += 1;
            let want = argmax(c);
            if argmax(g) == want {
                matched += 1;
            }
            let e = rel_err(g, c);
            errs.push(e);
            if e > 2e-2 {
                bad.push((step, i, e));
            }
            max_rel = max_rel.max(e);
            start[i] += inputs[i].len();
            inputs[i] = vec![want as u32];
        }
    }
    Outcome {
        token_match: matched as f64 / total as f64,
        max_rel,
        errs,
        bad,
    }
}

#[test]
fn gpu_runtime_matches_cpu_reference() {
    let n = match cuda::device_count() {
        Ok(n) => n,
        Err(e) => {
            println!("no GPU ({e}): skipping");
            return;
        }
    };
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for preset in [Preset::TinyQwen3, Preset::TinyMixtral, Preset::TinyDeepseek] {
        for (gpus, precision) in [1usize, 2]
            .into_iter()
            .flat_map(|g| [(g, Precision::F32), (g, Precision::Bf16)])
        {
            if gpus > n {
                println!("only {n} GPU(s): skipping the {gpus}-GPU check");
                continue;
            }
            let cfg = preset.config();
            let o = compare(&cfg, gpus, precision);
            let name = preset.to_string();
            let mut sorted = o.errs.clone();
            sorted.sort_by(f64::total_cmp);
            println!(
                "  per-position rel err: first {:?}, median {:.3e}, p90 {:.3e}, over 2e-2: {}",
                &o.errs[..o.errs.len().min(6)],
                sorted[sorted.len() / 2],
                sorted[sorted.len() * 9 / 10],
                sorted.iter().filter(|&&e| e > 2e-2).count()
            );
            println!("  positions over 2e-2 (step, seq, err): {:?}", o.bad);
            let asserted = precision == Precision::F32;
            let pass = o.token_match >= 0.99 && o.max_rel <= 2e-2;
            println!(
                "{name} on {gpus} GPU(s), {precision:?}: token match {:.4}, max rel logit err \
                 {:.3e}, median {:.3e} -> {}",
                o.token_match,
                o.max_rel,
                sorted[sorted.len() / 2],
                match (pass, asserted) {
                    (true, _) => "pass",
                    (false, true) => "FAIL",
                    (false, false) => "over the thresholds (reported, not asserted)",
                }
            );
            if asserted && !pass {
                failures.push(format!("{name}/{gpus}/{precision:?}"));
            }
            rows.push(serde_json::json!({
                "preset": name, "gpus": gpus,
                "precision": format!("{precision:?}").to_lowercase(),
                "token_match_fraction": o.token_match, "max_rel_logit_err": o.max_rel,
                "median_rel_logit_err": sorted[sorted.len() / 2],
                "positions": o.errs.len(),
            }));
        }
    }
    let dir = std::env::var("HIL_RESULTS").unwrap_or_else(|_| ".".into());
    let _ = std::fs::create_dir_all(&dir);
    let path = std::path::Path::new(&dir).join("cuda-runtime-correctness.json");
    std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    assert!(failures.is_empty(), "failed checks: {failures:?}");
}
