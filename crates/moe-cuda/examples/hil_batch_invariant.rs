//! What batch-invariant compute (`CudaConfig::batch_invariant`) costs in decode, beside the
//! default path, in the same process on one GPU.
//!
//! Shapes: `qwen3-30b-a3b` and `deepseek-v2-lite`, each cut to its first 8 layers (enough to
//! weigh attention, dense and MoE layers; the per-layer cost is what compares), random bf16
//! weights made on the device. For batch B (1, 8, 64, 256), B sequences each get a one-token
//! prompt, then 3 warm-up and 10 timed decode steps, greedy tokens chosen on the device
//! (`run_sampled` with `Need::GreedyToken`, as the engine serves). The runner's defaults
//! otherwise (device dispatch up to `DEVICE_DISPATCH_MAX_ROWS` rows, host dispatch above).
//! Results go to `$HIL_RESULTS/batch-invariant-decode.json`.

use std::time::Instant;

use moe_cuda::{self as cuda, CudaConfig, CudaRunner, Precision};
use moe_engine::{Chunk, Need, RankId, RequestId, RowOutput, Runner, Work};
use moe_model::presets::{with_layers, Preset};

const LAYERS: usize = 8;
const WARMUP: usize = 3;
const STEPS: usize = 10;

/// Milliseconds per decode step at `batch` (one token per sequence per step).
fn decode_ms(r: &mut CudaRunner, batch: usize, vocab: usize, next_id: &mut u64) -> f64 {
    let seqs: Vec<RequestId> = (0..batch)
        .map(|_| {
            *next_id += 1;
            RequestId(*next_id)
        })
        .collect();
    let mut tokens: Vec<u32> = (0..batch).map(|i| (i * 7919 % vocab) as u32).collect();
    let mut step = |r: &mut CudaRunner, pos: usize| {
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
        let rows = r
            .run_sampled(&work, &vec![Need::GreedyToken; work.len()])
            .expect("decode step");
        for (t, row) in tokens.iter_mut().zip(rows) {
            match row {
                RowOutput::Greedy(Some(g)) => *t = g,
                other => panic!("expected a greedy token, got {other:?}"),
            }
        }
    };
    for pos in 0..WARMUP {
        step(r, pos);
    }
    let t = Instant::now();
    for pos in WARMUP..WARMUP + STEPS {
        step(r, pos);
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / STEPS as f64;
    for &s in &seqs {
        r.ledger().release(RankId(0), s);
    }
    ms
}

fn main() {
    match cuda::hil_gpus() {
        Ok(Some(_)) => {}
        Ok(None) => {
            println!("SKIPPED the batch-invariance cost benchmark: no GPU");
            return;
        }
        Err(e) => {
            eprintln!("the batch-invariance cost benchmark: {e}");
            std::process::exit(1);
        }
    }
    let mut rows = Vec::new();
    let mut card = String::new();
    for preset in [Preset::Qwen3_30bA3b, Preset::DeepseekV2Lite] {
        let cfg = with_layers(&preset.config(), LAYERS).expect("layer count");
        let mut ms = [[0.0f64; 4]; 2];
        for (m, bi) in [false, true].into_iter().enumerate() {
            let mut r = match CudaRunner::synthetic(
                &cfg,
                1,
                CudaConfig {
                    devices: 1,
                    gpus: cuda::GpuMap::every_gpu(),
                    block_tokens: 16,
                    kv_blocks_per_rank: 512,
                    max_batch_tokens: 256,
                    max_context: 64,
                    precision: Precision::Bf16,
                    batch_invariant: bi,
                },
            ) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{preset:?}: {e}");
                    std::process::exit(1);
                }
            };
            card = r.device_name().unwrap_or_default();
            let mut next_id = 0;
            for (b, batch) in [1usize, 8, 64, 256].into_iter().enumerate() {
                ms[m][b] = decode_ms(&mut r, batch, cfg.vocab_size, &mut next_id);
            }
        }
        for (b, batch) in [1usize, 8, 64, 256].into_iter().enumerate() {
            let (d, i) = (ms[0][b], ms[1][b]);
            println!(
                "{preset} ({LAYERS} layers) batch {batch}: default {d:.2} ms/step, \
                 batch-invariant {i:.2} ms/step -> {:.2}x",
                i / d
            );
            rows.push(serde_json::json!({
                "shape": preset.to_string(), "layers": LAYERS, "batch": batch,
                "default_ms_per_step": d, "batch_invariant_ms_per_step": i,
                "slowdown": i / d,
            }));
        }
    }
    let out = serde_json::json!({"card": card, "decode": rows});
    let dir = std::env::var("HIL_RESULTS").unwrap_or_else(|_| ".".into());
    let _ = std::fs::create_dir_all(&dir);
    let path = std::path::Path::new(&dir).join("batch-invariant-decode.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
