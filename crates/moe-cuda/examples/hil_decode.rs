//! Decode throughput of the CUDA runner on one GPU, beside the weight-bytes-read floor.
//!
//! Shapes: `qwen3-30b-a3b` reduced to 24 of its 48 layers (the full model's bf16 weights, about
//! 61 GB, leave too little room on an 80 GB card next to the scratch and KV), and `deepseek-v2-lite`
//! with all 27 layers. Weights are random bf16 generated on the device (never written to disk).
//! For batch B, B sequences each get a one-token prompt, then warm-up decode steps (at least 3
//! and at least 0.3 s, at positions 0..3 over and over) and 10 timed decode steps (positions
//! 3..13).
//!
//! Floor: bytes read per step (every replicated weight except the embedding table, plus each
//! routed expert that the step's routes touched, once per layer) divided by the device copy
//! bandwidth measured in the same run (`cuMemcpyDtoDAsync` of 1 GiB, counting bytes read plus
//! written). Results go to `$HIL_RESULTS/cuda-runtime-decode.json`. `HIL_DECODE_ONLY=Preset:batch:path`
//! (e.g. `DeepseekV2Lite:64:auto`) runs that one measurement only (for a profiler).
//!
//! Each batch runs on five paths of the same runner, in the same process:
//! - `auto` (the serving path, the runner's defaults): greedy tokens chosen on the device
//!   (`run_sampled` with `Need::GreedyToken`, one token id per row comes back); experts routed
//!   on the device up to `DEVICE_DISPATCH_MAX_ROWS` rows, through the host above;
//! - `device-dispatch`: greedy on the device, experts always routed on the device (`moe_gemv`,
//!   no host sync inside a step);
//! - `padded`: greedy on the device; `moe_gemv` up to `DEVICE_DISPATCH_MAX_ROWS` rows, above it
//!   the padded device dispatch (tensor-core batched GEMMs over every expert, overflow rows
//!   through `moe_gemv`; no host sync inside a step);
//! - `host-dispatch`: greedy on the device, experts always through cuBLAS batched GEMMs over
//!   the active experts (their layout built on the device, its size read by the host once per
//!   MoE layer);
//! - `before` (the path before this work, the baseline): host dispatch, and every row's f32
//!   logits returned by `run`, with this benchmark's host argmax.
//!
//! `tokens_per_s` times whole steps; `run_ms_per_step` is the runner's call alone. After the timed
//! steps, 2 more steps run with the runner's phase timing on (a stream synchronisation at every
//! phase boundary) and print where a step's time goes.

use std::time::Instant;

use moe_cuda::{self as cuda, CudaConfig, CudaRunner, Precision};
use moe_engine::{Chunk, Need, RankId, RequestId, RowOutput, Runner, Work};
use moe_model::presets::{with_layers, Preset};

const WARMUP: usize = 3;
const WARMUP_MIN_S: f64 = 0.3;
const STEPS: usize = 10;

fn main() {
    match cuda::hil_gpus() {
        Ok(Some(_)) => {}
        Ok(None) => {
            println!("SKIPPED the decode benchmark: no GPU");
            return;
        }
        Err(e) => {
            eprintln!("the decode benchmark: {e}");
            std::process::exit(1);
        }
    }
    let mut rows = Vec::new();
    let mut card = String::new();
    for (preset, layers) in [
        (Preset::Qwen3_30bA3b, 24usize),
        (Preset::DeepseekV2Lite, 27),
    ] {
        let only = std::env::var("HIL_DECODE_ONLY").unwrap_or_default();
        let wanted = |batch: usize, path: &str| {
            only.is_empty() || only == format!("{preset:?}:{batch}:{path}")
        };
        if !only.is_empty() && !only.starts_with(&format!("{preset:?}:")) {
            continue;
        }
        let cfg = with_layers(&preset.config(), layers).expect("layer count");
        let t = Instant::now();
        let mut r = match CudaRunner::synthetic(
            &cfg,
            1,
            CudaConfig {
                devices: 1,
                gpus: cuda::GpuMap::every_gpu(),
                block_tokens: 16,
                kv_blocks_per_rank: 1024,
                max_batch_tokens: 256,
                max_context: 64,
                precision: Precision::Bf16,
                batch_invariant: false,
            },
        ) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{preset:?}: {e}");
                std::process::exit(1);
            }
        };
        card = r.device_name().unwrap_or_default();
        println!(
            "{preset:?} ({layers} layers) loaded in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let bw = r.copy_bandwidth(1 << 30, 20).expect("copy bandwidth");
        let embed = (cfg.vocab_size * cfg.hidden_size * 2) as u64;
        let replicated = r.replicated_weight_bytes() - embed;
        println!("copy bandwidth {:.0} GB/s", bw / 1e9);
        let mut next_id = 0u64;
        for (batch, path) in [1usize, 8, 64, 256].into_iter().flat_map(|b| {
            [
                "auto",
                "padded",
                "device-dispatch",
                "host-dispatch",
                "before",
            ]
            .map(|p| (b, p))
        }) {
            if !wanted(batch, path) {
                continue;
            }
            let device = path != "before";
            r.set_device_dispatch_max_rows(match path {
                "auto" | "padded" => cuda::DEVICE_DISPATCH_MAX_ROWS,
                "device-dispatch" => usize::MAX,
                _ => 0,
            });
            r.set_padded_dispatch_max_rows(match path {
                "auto" => cuda::PADDED_DISPATCH_MAX_ROWS,
                "padded" => usize::MAX,
                _ => 0,
            });
            let seqs: Vec<RequestId> = (0..batch)
                .map(|_| {
                    next_id += 1;
                    RequestId(next_id)
                })
                .collect();
            let mut tokens: Vec<u32> = (0..batch)
                .map(|i| (i * 7919 % cfg.vocab_size) as u32)
                .collect();
            let mut pos = WARMUP;
            let step = |r: &mut CudaRunner, tokens: &mut Vec<u32>, pos: usize| -> f64 {
                for &s in &seqs {
                    assert!(r.ledger().grow(RankId(0), s, pos + 1), "KV full");
                }
                let toks: Vec<[u32; 1]> = tokens.iter().map(|&t| [t]).collect();
                let work: Vec<Work<'_>> = seqs
                    .iter()
                    .zip(&toks)
                    .map(|(&s, t)| Work {
                        chunk: Chunk {
                            seq: s,
                            rank: RankId(0),
                            start: pos,
                            len: 1,
                            sample: true,
                        },
                        tokens: t,
                    })
                    .collect();
                let t_run = Instant::now();
                if device {
                    let rows = r
                        .run_sampled(&work, &vec![Need::GreedyToken; work.len()])
                        .expect("decode step");
                    let run_s = t_run.elapsed().as_secs_f64();
                    for (t, row) in tokens.iter_mut().zip(rows) {
                        match row {
                            RowOutput::Greedy(Some(g)) => *t = g,
                            other => panic!("expected a greedy token, got {other:?}"),
                        }
                    }
                    return run_s;
                }
                let logits = r.run(&work).expect("decode step");
                let run_s = t_run.elapsed().as_secs_f64();
                for (t, l) in tokens.iter_mut().zip(&logits) {
                    let mut best = 0;
                    for (i, &x) in l.iter().enumerate() {
                        if x > l[best] {
                            best = i;
                        }
                    }
                    *t = best as u32;
                }
                run_s
            };
            // Warm-up: at least WARMUP steps and WARMUP_MIN_S seconds (after a host-bound path
            // the GPU's clocks need a moment), at positions 0..WARMUP cycling, so the timed
            // steps start at position WARMUP with the same context whatever the warm-up took.
            let warm = Instant::now();
            let mut n = 0usize;
            while n < WARMUP || warm.elapsed().as_secs_f64() < WARMUP_MIN_S {
                step(&mut r, &mut tokens, n % WARMUP);
                n += 1;
            }
            let t = Instant::now();
            let mut bytes = 0u64;
            let mut run_s = 0.0;
            for _ in 0..STEPS {
                run_s += step(&mut r, &mut tokens, pos);
                bytes += replicated + r.last_step_expert_bytes();
                pos += 1;
            }
            let secs = t.elapsed().as_secs_f64();
            r.set_phase_timing(true);
            let _ = r.take_phase_times();
            for _ in 0..2 {
                step(&mut r, &mut tokens, pos);
                pos += 1;
            }
            r.set_phase_timing(false);
            let phases: Vec<(&str, f64)> = r
                .take_phase_times()
                .into_iter()
                .map(|(n, t)| (n, t * 1e3 / 2.0))
                .collect();
            println!("  phases (ms/step, synchronised): {phases:.2?}");
            let tps = (batch * STEPS) as f64 / secs;
            let floor_secs = bytes as f64 / bw;
            let floor = (batch * STEPS) as f64 / floor_secs;
            println!(
                "{preset:?} batch {batch} [{path}]: {tps:.1} tok/s ({:.2} ms/step), floor {floor:.1} tok/s ({:.2} ms/step, {:.2} GB/step) -> {:.2}x floor",
                secs * 1e3 / STEPS as f64,
                floor_secs * 1e3 / STEPS as f64,
                bytes as f64 / STEPS as f64 / 1e9,
                floor / tps
            );
            for &s in &seqs {
                r.ledger().release(RankId(0), s);
            }
            rows.push(serde_json::json!({
                "shape": preset.to_string(), "layers": layers, "batch": batch, "path": path,
                "tokens_per_s": tps, "floor_tokens_per_s": floor,
                "ms_per_step": secs * 1e3 / STEPS as f64,
                "run_ms_per_step": run_s * 1e3 / STEPS as f64,
                "phase_ms_per_step": phases.iter().map(|(n, t)| ((*n).to_string(), serde_json::Value::from(*t)))
                    .collect::<serde_json::Map<String, serde_json::Value>>(),
                "bytes_per_step": bytes / STEPS as u64, "copy_bandwidth_bytes_per_s": bw,
            }));
        }
    }
    let dir = std::env::var("HIL_RESULTS").unwrap_or_else(|_| ".".into());
    let _ = std::fs::create_dir_all(&dir);
    let path = std::path::Path::new(&dir).join("cuda-runtime-decode.json");
    let out = serde_json::json!({"card": card, "decode": rows});
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
