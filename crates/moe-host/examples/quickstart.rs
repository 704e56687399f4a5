//! A tiny Qwen3-MoE with seeded weights on one host device, through the real engine.
//!
//! Run: `cargo run -p moe-host --example quickstart` (no GPU needed).

use moe_engine::{FinishReason, Request};
use moe_host::worker::{DeploymentRunner, HostEngineConfig};
use moe_model::presets::Preset;
use moe_model::weights::MemTensors;

fn main() {
    let cfg = Preset::TinyQwen3.config();
    let src = MemTensors::seeded(&cfg, 1);
    let host = HostEngineConfig::default(); // one host device
    let (engine, _store) = DeploymentRunner::host_engine(&cfg, &src, &host).unwrap();
    let handle = engine.submit(Request::greedy(vec![1, 2, 3], 8)).unwrap();
    let run = engine.start(); // iterations on a thread; submit keeps working meanwhile
    let done = handle.wait();
    assert_eq!((done.tokens.len(), done.finish), (8, FinishReason::Length));
    run.stop();
    println!("moe-host: ok");
}
