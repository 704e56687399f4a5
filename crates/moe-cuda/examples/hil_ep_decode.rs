//! Decode throughput of the CUDA runner on 1, 2, ... GPUs (up to `HIL_EP_MAX_GPUS`, default 4,
//! and the GPUs present), expert parallel against each rank reading remote experts over NVLink,
//! side by side in one process.
//!
//! Shapes as in `hil_decode` (random bf16 weights made on the device): `qwen3-30b-a3b` with 24
//! layers and `deepseek-v2-lite` with all 27. For a total batch B, the B one-token sequences are
//! dealt round-robin to the ranks (attention data parallel); then warm-up decode steps (at least 3
//! and 0.3 s) and 10 timed steps, greedy tokens chosen on the device (`Need::GreedyToken`).
//!
//! Paths (the same runner, switched with `CudaRunner::set_expert_parallel`):
//! - `expert-parallel` (the default with more than one GPU): each rank pushes its routed rows to
//!   the GPU holding the expert, which runs them for every rank and pushes the outputs back;
//! - `ep-device-dispatch`: expert parallel with every step's experts routed on the device
//!   (`moe_gemv`, no host synchronisation inside a step) instead of cuBLAS batched GEMMs above
//!   `DEVICE_DISPATCH_MAX_ROWS` rows;
//! - `remote-experts` (the way before): each rank runs its own rows through every expert it
//!   routed to, reading the other GPUs' experts over NVLink, ranks run one after the other.
//!
//! Floor per step: the bytes the busiest GPU must read (the replicated weights except the
//! embedding table, plus its share of the routed experts the step touched, counted as the step's
//! expert bytes divided by the GPU count), over the device copy bandwidth measured in the same
//! run. Results: `$HIL_RESULTS/cuda-ep-decode.json`.

use std::time::Instant;

use moe_cuda::{self as cuda, CudaConfig, CudaRunner, Precision};
use moe_engine::{Chunk, Need, RankId, RequestId, RowOutput, Runner, Work};
use moe_model::presets::{with_layers, Preset};

const WARMUP: usize = 3;
const WARMUP_MIN_S: f64 = 0.3;
const STEPS: usize = 10;

/// One decode step of `seqs` (sequence, rank) at position `pos`; feeds back the greedy tokens.
/// Returns the runner call's seconds.
fn step(r: &mut CudaRunner, seqs: &[(RequestId, RankId)], tokens: &mut [u32], pos: usize) -> f64 {
    for &(s, rank) in seqs {
        assert!(r.ledger().grow(rank, s, pos + 1), "KV full");
    }
    let toks: Vec<[u32; 1]> = tokens.iter().map(|&t| [t]).collect();
    let work: Vec<Work<'_>> = seqs
        .iter()
        .zip(&toks)
        .map(|(&(seq, rank), t)| Work {
            chunk: Chunk {
                seq,
                rank,
                start: pos,
                len: 1,
                sample: true,
            },
            tokens: t,
        })
        .collect();
    let t = Instant::now();
    let rows = r
        .run_sampled(&work, &vec![Need::GreedyToken; work.len()])
        .expect("decode step");
    let secs = t.elapsed().as_secs_f64();
    for (t, row) in tokens.iter_mut().zip(rows) {
        match row {
            RowOutput::Greedy(Some(g)) => *t = g,
            other => panic!("expected a greedy token, got {other:?}"),
        }
    }
    secs
}

fn main() {
    // Real GPUs only: expert parallelism across logical ranks of one GPU measures nothing.
    let present = match cuda::hil_gpus() {
        Ok(Some(n)) => n,
        Ok(None) => {
            println!("SKIPPED the expert-parallel decode benchmark: no GPU");
            return;
        }
        Err(e) => {
            eprintln!("the expert-parallel decode benchmark: {e}");
            std::process::exit(1);
        }
    };
    let max_gpus: usize = std::env::var("HIL_EP_MAX_GPUS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let mut rows = Vec::new();
    let mut card = String::new();
    for (preset, layers) in [
        (Preset::Qwen3_30bA3b, 24usize),
        (Preset::DeepseekV2Lite, 27),
    ] {
        let cfg = with_layers(&preset.config(), layers).expect("layer count");
        // Tokens per second of the 1-GPU runner per batch, for the speed-ups.
        let mut one_gpu: Vec<(usize, f64)> = Vec::new();
        for gpus in 1..=present.min(max_gpus) {
            let t = Instant::now();
            let mut r = CudaRunner::synthetic(
                &cfg,
                1,
                CudaConfig {
                    devices: gpus,
                    gpus: cuda::GpuMap::every_gpu(),
                    block_tokens: 16,
                    kv_blocks_per_rank: 1024,
                    max_batch_tokens: 256,
                    max_context: 64,
                    precision: Precision::Bf16,
                    batch_invariant: false,
                },
            )
            .unwrap_or_else(|e| panic!("{preset:?} on {gpus} GPU(s): {e}"));
            card = r.device_name().unwrap_or_default();
            let bw = r.copy_bandwidth(1 << 30, 20).expect("copy bandwidth");
            let embed = (cfg.vocab_size * cfg.hidden_size * 2) as u64;
            let replicated = r.replicated_weight_bytes() - embed;
            println!(
                "{preset:?} ({layers} layers) on {gpus} GPU(s): loaded in {:.1}s, copy bandwidth \
                 {:.0} GB/s",
                t.elapsed().as_secs_f64(),
                bw / 1e9
            );
            let paths: &[&str] = if gpus == 1 {
                &["single-gpu"]
            } else {
                &["expert-parallel", "ep-device-dispatch", "remote-experts"]
            };
            let mut next_id = 0u64;
            for batch in [8usize, 64, 256] {
                for &path in paths {
                    r.set_expert_parallel(path != "remote-experts");
                    r.set_device_dispatch_max_rows(if path == "ep-device-dispatch" {
                        usize::MAX
                    } else {
                        cuda::DEVICE_DISPATCH_MAX_ROWS
                    });
                    let seqs: Vec<(RequestId, RankId)> = (0..batch)
                        .map(|i| {
                            next_id += 1;
                            (RequestId(next_id), RankId((i % gpus) as u32))
                        })
                        .collect();
                    let mut tokens: Vec<u32> = (0..batch)
                        .map(|i| (i * 7919 % cfg.vocab_size) as u32)
                        .collect();
                    let warm = Instant::now();
                    let mut n = 0usize;
                    while n < WARMUP || warm.elapsed().as_secs_f64() < WARMUP_MIN_S {
                        step(&mut r, &seqs, &mut tokens, n % WARMUP);
                        n += 1;
                    }
                    let t = Instant::now();
                    let mut expert_bytes = 0u64;
                    for i in 0..STEPS {
                        step(&mut r, &seqs, &mut tokens, WARMUP + i);
                        expert_bytes += r.last_step_expert_bytes();
                    }
                    let secs = t.elapsed().as_secs_f64();
                    for &(s, rank) in &seqs {
                        r.ledger().release(rank, s);
                    }
                    let tps = (batch * STEPS) as f64 / secs;
                    let per_gpu = replicated as f64 + expert_bytes as f64 / (STEPS * gpus) as f64;
                    let floor_ms = per_gpu / bw * 1e3;
                    let ms = secs * 1e3 / STEPS as f64;
                    if gpus == 1 {
                        one_gpu.push((batch, tps));
                    }
                    let base = one_gpu
                        .iter()
                        .find(|(b, _)| *b == batch)
                        .map_or(f64::NAN, |(_, t)| *t);
                    println!(
                        "  batch {batch} [{path}]: {tps:.0} tok/s ({ms:.2} ms/step), {:.2}x one \
                         GPU, floor {floor_ms:.2} ms/step -> {:.2}x floor",
                        tps / base,
                        ms / floor_ms
                    );
                    rows.push(serde_json::json!({
                        "shape": preset.to_string(), "layers": layers, "gpus": gpus,
                        "batch": batch, "path": path, "tokens_per_s": tps,
                        "ms_per_step": ms, "speedup_vs_one_gpu": tps / base,
                        "floor_ms_per_step": floor_ms, "copy_bandwidth_bytes_per_s": bw,
                    }));
                }
            }
        }
    }
    let dir = std::env::var("HIL_RESULTS").unwrap_or_else(|_| ".".into());
    let _ = std::fs::create_dir_all(&dir);
    let path = std::path::Path::new(&dir).join("cuda-ep-decode.json");
    let out = serde_json::json!({"card": card, "decode": rows});
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
