//! Shared helpers of the engine tests: tiny-preset engines on host devices, prompts, and the
//! single-device reference generation.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use hbm_vmm::host::{HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Vmm};
use moe_engine::{Completion, Engine, EngineConfig, Request, SchedulerConfig, TokenId};
use moe_host::compute::cpu::CpuCompute;
use moe_host::deployment::{DeploymentConfig, PlacementKind, WeightStore};
use moe_host::model::runner::SingleDevice;
use moe_host::model::Model;
use moe_host::worker::{DeploymentRunner, HostEngineConfig};
use moe_model::config::ModelConfig;
use moe_model::presets::Preset;
use moe_model::weights::MemTensors;

/// The three tiny presets.
pub const PRESETS: [Preset; 3] = [Preset::TinyQwen3, Preset::TinyDeepseek, Preset::TinyMixtral];

/// The seed of every test model's weights.
pub const SEED: u64 = 20;

/// The weights of `preset`'s test model (made once per test binary).
pub fn weights(preset: Preset) -> &'static MemTensors {
    static CACHE: OnceLock<[MemTensors; 3]> = OnceLock::new();
    let all = CACHE.get_or_init(|| PRESETS.map(|p| MemTensors::seeded(&p.config(), SEED)));
    let i = PRESETS
        .iter()
        .position(|&p| p == preset)
        .expect("a tiny preset");
    &all[i]
}

/// Small KV pools (4-token blocks), growing up to `max_chunks` chunks of 8 blocks per rank.
pub fn kv(max_chunks: usize) -> DeploymentConfig {
    DeploymentConfig {
        block_tokens: 4,
        blocks_per_chunk: 8,
        kv_chunks: 1.min(max_chunks),
        kv_max_chunks: max_chunks,
        ..DeploymentConfig::default()
    }
}

/// An engine for `preset` on `devices` host devices (room for `max_devices`).
pub fn engine_with(
    preset: Preset,
    devices: usize,
    max_devices: usize,
    placement: PlacementKind,
    deployment: DeploymentConfig,
    scheduler: SchedulerConfig,
) -> (Engine<DeploymentRunner>, Arc<WeightStore>) {
    let host = HostEngineConfig {
        devices,
        max_devices,
        placement,
        deployment,
        engine: EngineConfig {
            scheduler,
            ..EngineConfig::default()
        },
        ..HostEngineConfig::default()
    };
    DeploymentRunner::host_engine(&preset.config(), weights(preset), &host).expect("engine")
}

/// An engine with roomy KV and default batching.
pub fn engine(
    preset: Preset,
    devices: usize,
    placement: PlacementKind,
) -> Engine<DeploymentRunner> {
    engine_with(
        preset,
        devices,
        devices,
        placement,
        kv(16),
        SchedulerConfig::default(),
    )
    .0
}

/// `n` prompts of varied lengths within the vocabulary.
pub fn prompts(cfg: &ModelConfig, n: usize) -> Vec<Vec<TokenId>> {
    let v = cfg.vocab_size as u32;
    (0..n as u32)
        .map(|i| {
            let len = 1 + (i * 7) % 13;
            (0..len)
                .map(|j| (i * 37 + j * 11 + j * j * 3 + 1) % v)
                .collect()
        })
        .collect()
}

/// Submits every request, runs the engine on this thread until idle, and gathers the results.
pub fn complete(engine: &Engine<DeploymentRunner>, requests: Vec<Request>) -> Vec<Completion> {
    let handles: Vec<_> = requests
        .into_iter()
        .map(|r| engine.submit(r).expect("submit"))
        .collect();
    engine.run_until_idle(100_000).expect("iterations");
    handles.into_iter().map(|h| h.wait()).collect()
}

/// Greedy requests with logprobs for `prompts`, `n` tokens each.
pub fn greedy(prompts: &[Vec<TokenId>], n: usize) -> Vec<Request> {
    prompts
        .iter()
        .map(|p| Request::greedy(p.clone(), n).with_logprobs(true))
        .collect()
}

/// Token ids and logprob bit patterns: what "bitwise identical" compares.
pub fn bits(c: &Completion) -> (Vec<TokenId>, Vec<u32>) {
    (
        c.tokens.clone(),
        c.logprobs.iter().map(|l| l.to_bits()).collect(),
    )
}

/// Greedy tokens from the model's single-device path (no engine, no scheduler, no workers).
pub fn reference(preset: Preset, prompt: &[TokenId], n: usize) -> Vec<TokenId> {
    let cfg = preset.config();
    let host = HostConfig::devices(1, 256 << 20)
        .with_granularity(hbm_vmm::host::page_size())
        .expect("host");
    let vmm = Vmm::new(HostBackend::new(host));
    let model = Model::new(&cfg, CpuCompute::new()).expect("model");
    let mut run = SingleDevice::load(model, &vmm, DeviceId(0), weights(preset), 4).expect("load");
    run.generate_greedy(prompt, n).expect("generate").0
}
