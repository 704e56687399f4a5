//! Batch invariance of the CUDA runner (`CudaConfig::batch_invariant`; feature `cuda`, run
//! through `cargo xtask hil`). The 2-rank schedules run on two logical ranks of one GPU where the
//! machine has one (`GpuMap::for_ranks`). Without a GPU it prints SKIPPED, and fails when
//! `HIL_REQUIRE_GPUS` is set.
//!
//! A fixed set of target sequences (prompts of several lengths, then greedy decoding) runs under
//! several schedules, and every target's sampled logits must be bitwise the same in all of them:
//! - `alone`: each target by itself, its prompt prefilled in one chunk (the reference);
//! - `together`: all targets in every step;
//! - `with-others`: the targets between unrelated sequences that join later (their prompts
//!   prefill in the same steps as the targets' decodes, so steps mix prefill and decode rows and
//!   the row count changes from step to step);
//! - `chunked`: prompts prefilled in chunks of 5 tokens;
//! - `token-by-token`: prompts fed one token per step;
//! - `2-gpu`: `with-others` on two GPUs with the routed experts split between them, targets and
//!   others alternating between the ranks (when two GPUs exist), expert parallel (each GPU runs
//!   its own experts for both ranks' rows);
//! - `2-gpu-rank-1-only`: the targets together on rank 1 of the two GPUs (GPU 0 only runs its
//!   experts for them);
//! - `2-gpu-remote-experts`: `2-gpu` with expert parallelism off (each rank reads the other
//!   GPU's experts over NVLink).
//!
//! Models: the tiny presets (weights from the CPU reference's seeded source, rounded to bf16) and
//! real shapes cut to 2 layers (`deepseek-v2-lite`: one dense and one MoE layer with MLA;
//! `qwen3-30b-a3b`: two MoE layers), with random weights made on the device. The tiny presets'
//! `alone` runs are also checked against the CPU reference (`ActPrecision::Bf16Gemm`, fed the
//! same tokens) at `gpu_runtime`'s thresholds: token match >= 0.99, relative logit error <= 2e-2.
//! Batch-invariant mode runs in bf16 (tensor-core `bi_mma`) on every model, and in the f32
//! reference precision (CUDA-core `bi_gemm`, `moe_gemv`; against `ActPrecision::F32`) on the
//! tiny presets.
//!
//! The same schedules run with `batch_invariant: false` (the default path: cuBLAS picks its
//! kernel by shape; experts go through `moe_gemv` or cuBLAS by row count) and the test prints how
//! many of the targets' sampled positions then differ from `alone` (greedy token and bitwise
//! logits): the measured evidence that batch composition is what moved outputs before. Printed,
//! not asserted. Results also go to `$HIL_RESULTS/batch-invariance.json`.

#![cfg(feature = "cuda")]

mod gpu_support;

use hbm_vmm::host::{HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Vmm};
use moe_cuda::{CudaConfig, CudaRunner, GpuMap, Precision};
use moe_engine::{Chunk, RankId, RequestId, Runner, Work};
use moe_host::compute::cpu::CpuCompute;
use moe_host::compute::ActPrecision;
use moe_host::model::runner::SingleDevice;
use moe_host::model::weights::{MemTensors, RoundedToBf16};
use moe_host::model::Model;
use moe_model::config::ModelConfig;
use moe_model::presets::{with_layers, Preset};

/// Tokens each target generates.
const GEN: usize = 6;

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn rel_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    let scale = cpu.iter().fold(0.0f64, |m, &x| m.max(f64::from(x.abs())));
    let diff = gpu
        .iter()
        .zip(cpu)
        .fold(0.0f64, |m, (&g, &c)| m.max(f64::from((g - c).abs())));
    diff / scale.max(1e-6)
}

/// Fixed pseudo-random prompts of the given lengths.
fn prompts(lens: &[usize], vocab: usize, mut seed: u32) -> Vec<Vec<u32>> {
    lens.iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 8) % vocab as u32
                })
                .collect()
        })
        .collect()
}

/// One sequence of a schedule.
#[derive(Debug, Clone)]
struct Seq {
    prompt: Vec<u32>,
    rank: u32,
    /// The step at which it starts.
    start_step: usize,
    /// Prompt tokens per prefill chunk.
    chunk: usize,
    /// Tokens to generate.
    gen: usize,
}

/// Runs `seqs` to completion (every active sequence in every step, in the given order) and
/// returns each sequence's sampled logits, one per generated token.
fn drive(runner: &mut CudaRunner, seqs: &[Seq], base_id: u64) -> Vec<Vec<Vec<f32>>> {
    let n = seqs.len();
    let mut fed = vec![0usize; n];
    let mut gen: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut out: Vec<Vec<Vec<f32>>> = vec![Vec::new(); n];
    let id = |i: usize| RequestId(base_id + i as u64);
    let mut step = 0;
    while (0..n).any(|i| gen[i].len() < seqs[i].gen) {
        let mut inputs: Vec<(usize, usize, Vec<u32>, bool)> = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if step < s.start_step || gen[i].len() >= s.gen {
                continue;
            }
            let (toks, sample) = if fed[i] < s.prompt.len() {
                let end = fed[i].saturating_add(s.chunk).min(s.prompt.len());
                (s.prompt[fed[i]..end].to_vec(), end == s.prompt.len())
            } else {
                (vec![*gen[i].last().expect("a generated token")], true)
            };
            inputs.push((i, fed[i], toks, sample));
        }
        for (i, start, toks, _) in &inputs {
            let grown = runner
                .ledger()
                .grow(RankId(seqs[*i].rank), id(*i), start + toks.len());
            assert!(grown, "KV room for sequence {i}");
        }
        let work: Vec<Work<'_>> = inputs
            .iter()
            .map(|(i, start, toks, sample)| Work {
                chunk: Chunk {
                    seq: id(*i),
                    rank: RankId(seqs[*i].rank),
                    start: *start,
                    len: toks.len(),
                    sample: *sample,
                },
                tokens: toks,
            })
            .collect();
        let logits = runner.run(&work).expect("a step");
        let mut rows = logits.into_iter();
        for (i, _, toks, sample) in &inputs {
            fed[*i] += toks.len();
            if *sample {
                let l = rows.next().expect("a row per sampled chunk");
                gen[*i].push(argmax(&l));
                out[*i].push(l);
                if gen[*i].len() == seqs[*i].gen {
                    runner.ledger().release(RankId(seqs[*i].rank), id(*i));
                }
            }
        }
        step += 1;
    }
    out
}

/// The targets' sampled logits under each schedule, `(name, per target, per position)`.
type Runs = Vec<(&'static str, Vec<Vec<Vec<f32>>>)>;

/// Runs every schedule on `one` (and `two`, two GPUs, when given).
fn schedules(
    one: &mut CudaRunner,
    two: Option<&mut CudaRunner>,
    vocab: usize,
) -> (Runs, Vec<Vec<u32>>) {
    let targets = prompts(&[7, 19, 2, 30], vocab, 4242);
    let others = prompts(&[11, 1, 25, 4, 16, 9, 3, 21, 13, 6], vocab, 777);
    let t = |p: &Vec<u32>, chunk: usize| Seq {
        prompt: p.clone(),
        rank: 0,
        start_step: 0,
        chunk,
        gen: GEN,
    };
    let mut runs: Runs = Vec::new();
    let mut next_id = 0u64;
    let mut go = |r: &mut CudaRunner, seqs: &[Seq]| {
        let o = drive(r, seqs, next_id);
        next_id += seqs.len() as u64;
        o
    };
    let alone: Vec<Vec<Vec<f32>>> = targets
        .iter()
        .map(|p| go(one, &[t(p, usize::MAX)]).remove(0))
        .collect();
    runs.push(("alone", alone));
    let all: Vec<Seq> = targets.iter().map(|p| t(p, usize::MAX)).collect();
    runs.push(("together", go(one, &all)));
    // Others first and between the targets, joining at steps 0..3, each a different length.
    let mixed = |ranks: u32| -> (Vec<Seq>, Vec<usize>) {
        let mut seqs = Vec::new();
        let mut at = Vec::new();
        for (j, p) in others.iter().enumerate() {
            seqs.push(Seq {
                prompt: p.clone(),
                rank: (j as u32 + 1) % ranks,
                start_step: j % 4,
                chunk: if j % 3 == 0 { 8 } else { usize::MAX },
                gen: 2 + j % 5,
            });
            if j % 3 == 1 && at.len() < targets.len() {
                let k = at.len();
                at.push(seqs.len());
                seqs.push(Seq {
                    rank: k as u32 % ranks,
                    ..t(&targets[k], usize::MAX)
                });
            }
        }
        while at.len() < targets.len() {
            let k = at.len();
            at.push(seqs.len());
            seqs.push(Seq {
                rank: k as u32 % ranks,
                ..t(&targets[k], usize::MAX)
            });
        }
        (seqs, at)
    };
    let (seqs, at) = mixed(1);
    let o = go(one, &seqs);
    runs.push(("with-others", at.iter().map(|&i| o[i].clone()).collect()));
    let chunked: Vec<Seq> = targets.iter().map(|p| t(p, 5)).collect();
    runs.push(("chunked", go(one, &chunked)));
    let single: Vec<Seq> = targets.iter().map(|p| t(p, 1)).collect();
    runs.push(("token-by-token", go(one, &single)));
    if let Some(two) = two {
        // Expert parallel (the default): each GPU runs its own experts for both ranks' rows.
        assert!(two.expert_parallel());
        let (seqs, at) = mixed(2);
        let o = go(two, &seqs);
        runs.push(("2-gpu", at.iter().map(|&i| o[i].clone()).collect()));
        // Every row on rank 1: GPU 0 has no rows of its own but still runs its experts.
        let on_one: Vec<Seq> = targets
            .iter()
            .map(|p| Seq {
                rank: 1,
                ..t(p, usize::MAX)
            })
            .collect();
        runs.push(("2-gpu-rank-1-only", go(two, &on_one)));
        // Each rank reading the other GPU's experts over NVLink (expert parallelism off).
        two.set_expert_parallel(false);
        let o = go(two, &seqs);
        runs.push((
            "2-gpu-remote-experts",
            at.iter().map(|&i| o[i].clone()).collect(),
        ));
        two.set_expert_parallel(true);
    }
    (runs, targets)
}

/// Per schedule: (sampled positions whose greedy token differs from `alone`, positions whose
/// logits are not bitwise those of `alone`, positions).
fn differences(runs: &Runs) -> Vec<(&'static str, usize, usize, usize)> {
    let reference = &runs[0].1;
    runs.iter()
        .skip(1)
        .map(|(name, targets)| {
            let (mut tok, mut bits, mut total) = (0, 0, 0);
            for (got, want) in targets.iter().zip(reference) {
                assert_eq!(got.len(), want.len(), "{name}: positions per target");
                for (g, w) in got.iter().zip(want) {
                    total += 1;
                    tok += usize::from(argmax(g) != argmax(w));
                    let same = g.len() == w.len()
                        && g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                    bits += usize::from(!same);
                }
            }
            (*name, tok, bits, total)
        })
        .collect()
}

/// The machine the test runs on (set once it found a GPU).
static MACHINE: std::sync::OnceLock<GpuMap> = std::sync::OnceLock::new();

fn config(devices: usize, batch_invariant: bool, precision: Precision) -> CudaConfig {
    CudaConfig {
        devices,
        gpus: *MACHINE.get().expect("the test sets the machine first"),
        block_tokens: 16,
        kv_blocks_per_rank: 256,
        max_batch_tokens: 256,
        max_context: 256,
        precision,
        batch_invariant,
    }
}

/// The tiny preset's `alone` logits against the CPU reference fed the same tokens:
/// (token match fraction, max relative logit error).
fn against_cpu(
    cfg: &ModelConfig,
    act: ActPrecision,
    targets: &[Vec<u32>],
    alone: &[Vec<Vec<f32>>],
) -> (f64, f64) {
    let src = RoundedToBf16(MemTensors::seeded(cfg, 11));
    let host = Vmm::new(HostBackend::new(
        HostConfig::devices(1, 1 << 30)
            .with_granularity(4096)
            .unwrap(),
    ));
    let model = Model::new(cfg, CpuCompute::with_act_precision(act)).unwrap();
    let mut cpu = SingleDevice::load(model, &host, DeviceId(0), &src, 16).unwrap();
    let (mut matched, mut total, mut worst) = (0usize, 0usize, 0.0f64);
    for (prompt, gpu) in targets.iter().zip(alone) {
        let id = cpu.add_sequence();
        let mut input = prompt.clone();
        for g in gpu {
            let c = cpu.step(&[(id, input)]).unwrap().remove(0);
            total += 1;
            matched += usize::from(argmax(&c) == argmax(g));
            worst = worst.max(rel_err(g, &c));
            input = vec![argmax(g)];
        }
    }
    (matched as f64 / total as f64, worst)
}

#[test]
fn gpu_batch_invariant_outputs_do_not_depend_on_the_batch() {
    let Some(map) =
        gpu_support::machine("gpu_batch_invariant_outputs_do_not_depend_on_the_batch", 2)
    else {
        return;
    };
    MACHINE.get_or_init(|| map);
    let models: Vec<(String, ModelConfig, bool)> = vec![
        ("tiny-qwen3".into(), Preset::TinyQwen3.config(), true),
        ("tiny-mixtral".into(), Preset::TinyMixtral.config(), true),
        ("tiny-deepseek".into(), Preset::TinyDeepseek.config(), true),
        (
            "deepseek-v2-lite/2 layers".into(),
            with_layers(&Preset::DeepseekV2Lite.config(), 2).unwrap(),
            false,
        ),
        (
            "qwen3-30b-a3b/2 layers".into(),
            with_layers(&Preset::Qwen3_30bA3b.config(), 2).unwrap(),
            false,
        ),
    ];
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for (name, cfg, tiny) in &models {
        // (batch-invariant, precision): the f32 reference precision only on the tiny presets.
        let modes: &[(bool, Precision)] = if *tiny {
            &[
                (true, Precision::Bf16),
                (false, Precision::Bf16),
                (true, Precision::F32),
            ]
        } else {
            &[(true, Precision::Bf16), (false, Precision::Bf16)]
        };
        for &(bi, precision) in modes {
            let make = |devices: usize| {
                if *tiny {
                    let src = RoundedToBf16(MemTensors::seeded(cfg, 11));
                    CudaRunner::load(cfg, &src, config(devices, bi, precision))
                } else {
                    CudaRunner::synthetic(cfg, 7, config(devices, bi, precision))
                }
                .unwrap()
            };
            let mut one = make(1);
            let mut two = Some(make(2));
            if let (Some(t), Some(l)) = (&two, cfg.moe_layers().next()) {
                let last = cfg.moe.num_experts - 1;
                assert_eq!(t.expert_device(l, 0), Some(DeviceId(0)));
                assert_eq!(t.expert_device(l, last), Some(DeviceId(1)));
            }
            let (runs, targets) = schedules(&mut one, two.as_mut(), cfg.vocab_size);
            drop((one, two));
            let mode = match (bi, precision) {
                (true, Precision::F32) => "batch-invariant f32",
                (true, _) => "batch-invariant",
                (false, _) => "default",
            };
            for (sched, tok, bits, total) in differences(&runs) {
                println!(
                    "{name}, {mode}: {sched} vs alone: {tok}/{total} greedy tokens differ, \
                     {bits}/{total} positions' logits not bitwise equal"
                );
                rows.push(serde_json::json!({
                    "model": name, "mode": mode, "schedule": sched,
                    "tokens_differ": tok, "logits_differ": bits, "positions": total,
                }));
                if bi && (tok > 0 || bits > 0) {
                    failures.push(format!(
                        "{name} {sched}: {tok} tokens, {bits} logits differ"
                    ));
                }
            }
            if *tiny {
                let act = if precision == Precision::F32 {
                    ActPrecision::F32
                } else {
                    ActPrecision::Bf16Gemm
                };
                let (tm, err) = against_cpu(cfg, act, &targets, &runs[0].1);
                let pass = tm >= 0.99 && err <= 2e-2;
                println!(
                    "{name}, {mode}: alone vs CPU {act}: token match {tm:.4}, max rel logit err \
                     {err:.3e} -> {}",
                    if pass { "pass" } else { "FAIL" }
                );
                rows.push(serde_json::json!({
                    "model": name, "mode": mode, "schedule": "alone-vs-cpu",
                    "token_match_fraction": tm, "max_rel_logit_err": err,
                }));
                if !pass {
                    failures.push(format!("{name} {mode} vs CPU: match {tm}, err {err}"));
                }
            }
        }
    }
    let dir = std::env::var("HIL_RESULTS").unwrap_or_else(|_| ".".into());
    let _ = std::fs::create_dir_all(&dir);
    let path = std::path::Path::new(&dir).join("batch-invariance.json");
    std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    assert!(failures.is_empty(), "failed checks: {failures:?}");
}
