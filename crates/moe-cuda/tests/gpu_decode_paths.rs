//! The CUDA runner's decode fast paths against its own reference paths, on the GPU machine:
//! - device-side expert dispatch (`moe_gemv`; and the padded tensor-core dispatch, with its
//!   automatic capacity and with a capacity of 2 rows so that most rows overflow into
//!   `moe_gemv`), with no host synchronisation, gives the same logits and counts the same active
//!   experts as the host-synchronised cuBLAS dispatch;
//! - greedy tokens chosen on the device ([`Need::GreedyToken`]) are exactly what the host sampler
//!   picks from the same logits, ties and non-finite values included;
//! - rows that need logits still get them, bit for bit, in a mixed batch;
//! - the router kernel picks exactly the CPU router's experts, ties and group limit included.
//!
//! On 1 and 2 ranks (logical ranks on one GPU where the machine has one). Without a GPU it prints
//! SKIPPED, and fails when `HIL_REQUIRE_GPUS` is set.

#![cfg(feature = "cuda")]

mod gpu_support;

use moe_cuda::{CudaConfig, CudaRunner, GpuMap, Precision};
use moe_engine::sampling::{sample, SamplingError};
use moe_engine::{Chunk, Need, RankId, RequestId, RowOutput, Runner, SamplingParams, Work};
use moe_host::compute::cpu::CpuCompute;
use moe_host::compute::Compute;
use moe_host::model::Model;
use moe_model::config::ModelConfig;
use moe_model::presets::Preset;
use moe_model::weights::MemTensors;

/// How the runner under test routes its experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Host,
    Gemv,
    Padded,
    PaddedOverflow,
}

/// The machine of the test that runs first (every test asks for the same one).
static MACHINE: std::sync::OnceLock<GpuMap> = std::sync::OnceLock::new();

/// The machine (2 ranks), or `None` after printing SKIPPED.
fn machine(test: &str) -> Option<GpuMap> {
    let map = gpu_support::machine(test, 2)?;
    Some(*MACHINE.get_or_init(|| map))
}

fn runner(cfg: &ModelConfig, gpus: usize, precision: Precision, path: Path) -> CudaRunner {
    let src = MemTensors::seeded(cfg, 5);
    let mut r = CudaRunner::load(
        cfg,
        &src,
        CudaConfig {
            devices: gpus,
            gpus: *MACHINE.get().expect("the test sets the machine first"),
            block_tokens: 16,
            kv_blocks_per_rank: 64,
            max_batch_tokens: 128,
            max_context: 128,
            precision,
            batch_invariant: false,
        },
    )
    .unwrap();
    // Every step (prefill included) on the path under test.
    r.set_device_dispatch_max_rows(if path == Path::Gemv { usize::MAX } else { 0 });
    r.set_padded_dispatch_max_rows(match path {
        Path::Padded | Path::PaddedOverflow => usize::MAX,
        _ => 0,
    });
    if path == Path::PaddedOverflow {
        r.set_expert_capacity(Some(2));
    }
    r
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max(f64::from(x - y).abs()));
    diff / scale.max(1e-30)
}

fn greedy(logits: &[f32]) -> Option<u32> {
    match sample(logits, &SamplingParams::Greedy, 0) {
        Ok(s) => Some(s.token),
        Err(SamplingError::NoFiniteLogits) => None,
        Err(e) => panic!("{e}"),
    }
}

/// Prefill 6 prompts then 7 decode steps on both dispatch paths; returns the worst relative
/// logit difference between them.
fn compare_paths(cfg: &ModelConfig, gpus: usize, precision: Precision, path: Path) -> f64 {
    let mut dev = runner(cfg, gpus, precision, path);
    let mut host = runner(cfg, gpus, precision, Path::Host);
    let vocab = cfg.vocab_size as u32;
    let mut inputs: Vec<Vec<u32>> = [5usize, 12, 1, 23, 8, 3]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n as u32)
                .map(|j| (i as u32 * 31 + j * 7) % vocab)
                .collect()
        })
        .collect();
    let mut start = vec![0usize; inputs.len()];
    let rank = |i: usize| RankId((i % gpus) as u32);
    let mut worst = 0.0f64;
    for step in 0..8 {
        for r in [&mut dev, &mut host] {
            for (i, t) in inputs.iter().enumerate() {
                assert!(r
                    .ledger()
                    .grow(rank(i), RequestId(i as u64), start[i] + t.len()));
            }
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
        let a = dev.run(&work).unwrap();
        let b = host.run(&work).unwrap();
        assert_eq!(
            dev.last_step_expert_bytes(),
            host.last_step_expert_bytes(),
            "step {step}: both paths read the same experts"
        );
        assert!(dev.last_step_expert_bytes() > 0);
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max(rel_err(x, y));
        }
        // The same step again (it rewrites the same KV values), asking for greedy tokens only.
        let needs = vec![Need::GreedyToken; work.len()];
        let toks = dev.run_sampled(&work, &needs).unwrap();
        for (i, (t, l)) in toks.iter().zip(&a).enumerate() {
            assert_eq!(*t, RowOutput::Greedy(greedy(l)), "step {step} row {i}");
        }
        // And mixed: logits rows come back bit for bit, token rows as tokens.
        let mixed: Vec<Need> = (0..work.len())
            .map(|i| {
                if i % 2 == 0 {
                    Need::Logits
                } else {
                    Need::GreedyToken
                }
            })
            .collect();
        let rows = dev.run_sampled(&work, &mixed).unwrap();
        for (i, row) in rows.iter().enumerate() {
            match (mixed[i], row) {
                (Need::Logits, RowOutput::Logits(l)) => assert_eq!(l, &a[i], "row {i}"),
                (Need::GreedyToken, RowOutput::Greedy(t)) => assert_eq!(*t, greedy(&a[i])),
                other => panic!("row {i}: {other:?}"),
            }
        }
        for (i, t) in inputs.iter_mut().enumerate() {
            start[i] += t.len();
            *t = vec![greedy(&a[i]).expect("finite logits")];
        }
    }
    worst
}

#[test]
fn gpu_decode_paths_agree() {
    if machine("gpu_decode_paths_agree").is_none() {
        return;
    }
    for preset in [Preset::TinyQwen3, Preset::TinyMixtral, Preset::TinyDeepseek] {
        let cfg = preset.config();
        for gpus in [1usize, 2] {
            for (precision, path) in [Precision::F32, Precision::Bf16]
                .into_iter()
                .flat_map(|p| [Path::Gemv, Path::Padded, Path::PaddedOverflow].map(|d| (p, d)))
            {
                let worst = compare_paths(&cfg, gpus, precision, path);
                println!(
                    "{preset} on {gpus} GPU(s), {precision:?}: {path:?} vs host dispatch, max \
                     rel logit difference {worst:.2e}"
                );
                // f32: only summation order differs. bf16: the same, plus activation rounding
                // of two different orders (routes may flip at near-ties on these tiny models).
                let bound = if precision == Precision::F32 {
                    1e-4
                } else {
                    5e-2
                };
                assert!(
                    worst < bound,
                    "{preset} {gpus} GPU(s) {precision:?}: {worst}"
                );
            }
        }
    }
}

#[test]
fn gpu_greedy_breaks_ties_like_the_host_sampler() {
    if machine("gpu_greedy_breaks_ties_like_the_host_sampler").is_none() {
        return;
    }
    let cfg = Preset::TinyQwen3.config();
    let gpu = runner(&cfg, 1, Precision::Bf16, Path::Gemv);
    let v = cfg.vocab_size;
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let mut rows: Vec<Vec<f32>> = Vec::new();
    let base = |i: usize| ((i * 7919) % 97) as f32 / 10.0 - 3.0;
    rows.push((0..v).map(base).collect());
    // Ties at the maximum, far apart and within one thread's stride: the lowest id wins.
    for (a, b) in [(3usize, 200usize), (250, 5), (0, v - 1), (17, 18)] {
        let mut r: Vec<f32> = (0..v).map(base).collect();
        r[a] = 50.0;
        r[b] = 50.0;
        rows.push(r);
    }
    // Non-finite values never win; an all-non-finite row has no choice.
    let mut r: Vec<f32> = (0..v).map(base).collect();
    r[1] = inf;
    r[2] = nan;
    r[9] = 40.0;
    rows.push(r);
    rows.push(
        (0..v)
            .map(|i| if i % 2 == 0 { nan } else { -inf })
            .collect(),
    );
    rows.push(
        (0..v)
            .map(|i| if i == v - 1 { -1e30 } else { -inf })
            .collect(),
    );
    // Signed zeros compare equal: the first one wins.
    rows.push(
        (0..v)
            .map(|i| {
                if i == 4 {
                    -0.0
                } else if i == 9 {
                    0.0
                } else {
                    -1.0
                }
            })
            .collect(),
    );
    rows.push(vec![1.0; v]);
    let flat: Vec<f32> = rows.concat();
    let got = gpu.device_argmax(&flat, v).unwrap();
    for (i, (g, row)) in got.iter().zip(&rows).enumerate() {
        assert_eq!(*g, greedy(row), "row {i}");
    }
    assert_eq!(got[1], Some(3));
    assert_eq!(got[2], Some(5));
    assert_eq!(got[6], None);
    assert!(
        gpu.device_argmax(&flat[1..], v).is_err(),
        "ragged rows are refused"
    );
}

/// The router kernel (one warp per row) picks exactly the CPU router's experts (ties: the lowest
/// id, at the top and at the k-th place, within one lane's stride and across lanes; DeepSeek's
/// group limit; underflowed probabilities that tie at 0) with the same weights up to `exp`'s
/// last bits.
#[test]
fn gpu_router_matches_the_cpu_router() {
    if machine("gpu_router_matches_the_cpu_router").is_none() {
        return;
    }
    for preset in [Preset::TinyQwen3, Preset::TinyMixtral, Preset::TinyDeepseek] {
        let cfg = preset.config();
        let gpu = runner(&cfg, 1, Precision::F32, Path::Host);
        let model = Model::new(&cfg, CpuCompute::new()).unwrap();
        let spec = model.router_spec();
        let (e, k) = (spec.experts, spec.top_k);
        let mut rows: Vec<Vec<f32>> = Vec::new();
        // Values on a coarse grid: distinct values never round to the same probability, and
        // equal values (there are many) are exact ties.
        for r in 0..24usize {
            rows.push(
                (0..e)
                    .map(|i| ((i * 7919 + r * 131) % 23) as f32 / 4.0 - 3.0)
                    .collect(),
            );
        }
        rows.push(vec![0.5; e]);
        // k - 1 clear winners, then a tie for the k-th place spread over the row.
        let mut r = vec![-2.0f32; e];
        for (j, x) in r.iter_mut().enumerate().take(k - 1) {
            *x = 4.0 + j as f32;
        }
        for j in (k - 1..e).step_by(3) {
            r[j] = 1.0;
        }
        rows.push(r.clone());
        r.reverse();
        rows.push(r);
        // One expert takes everything; the rest underflow to probability 0 and tie.
        let mut r = vec![-160.0f32; e];
        r[e / 2] = 80.0;
        rows.push(r);
        // Masked experts (-inf) are never preferred to finite ones.
        rows.push(
            (0..e)
                .map(|i| {
                    if i % 2 == 0 {
                        f32::NEG_INFINITY
                    } else {
                        (i % 5) as f32
                    }
                })
                .collect(),
        );
        let flat = rows.concat();
        let got = gpu.device_route(&flat).unwrap();
        let want = model.compute().route(&flat, &spec).unwrap();
        assert_eq!(got.len(), rows.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let gi: Vec<u32> = g.iter().map(|c| c.0).collect();
            let wi: Vec<u32> = w.iter().map(|c| c.expert).collect();
            assert_eq!(gi, wi, "{preset} row {i}: experts");
            for (a, b) in g.iter().zip(w.iter()) {
                let d = (a.1 - b.weight).abs();
                assert!(
                    d <= 1e-5 * b.weight.abs().max(1e-30),
                    "{preset} row {i} expert {}: weight {} vs {}",
                    a.0,
                    a.1,
                    b.weight
                );
            }
        }
        if let Some(g) = spec.groups {
            // Every pick lies in one of the topk_group kept groups.
            let per = e / g.n_group;
            for route in &got {
                let mut groups: Vec<usize> = route.iter().map(|c| c.0 as usize / per).collect();
                groups.dedup();
                assert!(groups.len() <= g.topk_group, "{preset}: {route:?}");
            }
        }
        println!(
            "{preset}: router kernel = CPU router on {} rows",
            rows.len()
        );
        assert!(
            gpu.device_route(&flat[1..]).is_err(),
            "ragged rows are refused"
        );
    }
}
