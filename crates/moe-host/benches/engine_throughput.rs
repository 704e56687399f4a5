//! Serving-engine throughput on the CPU reference backend, per tiny preset and device count
//! (report only; nothing is asserted).
//!
//! `cargo bench -p moe-host --bench engine_throughput` runs, for each tiny preset on `host:1`
//! to `host:4` (balanced placement), 32 greedy requests of 16 prompt tokens and 32 generated
//! tokens each through the whole engine (scheduler, device workers, all-to-all expert exchange,
//! sampling), and prints generated tokens/s, iterations and mean time per iteration. With
//! `ENGINE_BENCH_JSON=path`, it also writes the rows as JSON.
//!
//! The host devices share this machine's cores, so more devices mean more threads and more
//! exchange, not more compute: the numbers show the engine's overhead per device, not a speed-up.

use std::time::Instant;

use moe_engine::{EngineConfig, Request, SchedulerConfig};
use moe_host::deployment::{DeploymentConfig, PlacementKind};
use moe_host::worker::{DeploymentRunner, HostEngineConfig};
use moe_model::presets::Preset;
use moe_model::weights::MemTensors;

const REQUESTS: u32 = 32;
const PROMPT: u32 = 16;
const OUTPUT: usize = 32;

fn main() {
    println!(
        "{:<14} {:>7} {:>12} {:>10} {:>14} {:>10}",
        "preset", "devices", "gen tok/s", "iterations", "ms/iteration", "wall s"
    );
    let mut rows = Vec::new();
    for preset in [Preset::TinyQwen3, Preset::TinyDeepseek, Preset::TinyMixtral] {
        let cfg = preset.config();
        let src = MemTensors::seeded(&cfg, 1);
        let vocab = cfg.vocab_size as u32;
        for devices in 1..=4 {
            let host = HostEngineConfig {
                devices,
                max_devices: devices,
                placement: PlacementKind::Balanced,
                deployment: DeploymentConfig::default(),
                engine: EngineConfig {
                    scheduler: SchedulerConfig {
                        max_batch_tokens: 256,
                        max_running_per_rank: 64,
                    },
                    ..EngineConfig::default()
                },
                ..HostEngineConfig::default()
            };
            let (engine, _store) =
                DeploymentRunner::host_engine(&cfg, &src, &host).expect("engine");
            let t = Instant::now();
            let handles: Vec<_> = (0..REQUESTS)
                .map(|r| {
                    let prompt = (0..PROMPT)
                        .map(|i| (r * 131 + i * 37 + 11) % vocab)
                        .collect();
                    engine
                        .submit(Request::greedy(prompt, OUTPUT))
                        .expect("submit")
                })
                .collect();
            engine.run_until_idle(usize::MAX).expect("run");
            let generated: usize = handles.into_iter().map(|h| h.wait().tokens.len()).sum();
            let wall = t.elapsed().as_secs_f64();
            let m = engine.metrics();
            let rate = generated as f64 / wall;
            let per_iter = wall * 1e3 / m.iterations as f64;
            println!(
                "{:<14} {:>7} {:>12.1} {:>10} {:>14.2} {:>10.2}",
                preset.name(),
                devices,
                rate,
                m.iterations,
                per_iter,
                wall
            );
            rows.push(format!(
                "{{\"preset\":\"{}\",\"devices\":{devices},\"generated_tokens\":{generated},\"tokens_per_s\":{rate:.3},\"iterations\":{},\"ms_per_iteration\":{per_iter:.4},\"wall_s\":{wall:.4}}}",
                preset.name(),
                m.iterations
            ));
        }
    }
    if let Ok(path) = std::env::var("ENGINE_BENCH_JSON") {
        let text = format!("[\n  {}\n]\n", rows.join(",\n  "));
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("engine_throughput: could not write {path}: {e}");
        }
    }
}
