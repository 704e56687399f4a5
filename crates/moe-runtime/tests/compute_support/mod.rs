//! Shared helpers of the `compute_*` integration tests: tiny model directories on disk and
//! host devices.
#![allow(dead_code)]

use hbm_vmm::host::{HostBackend, HostConfig};
use hbm_vmm::Vmm;
use moe_runtime::config::ModelConfig;
use moe_runtime::presets::Preset;
use moe_runtime::synth::{self, SynthOptions};

/// The tiny presets every compute test runs on.
pub const TINY: [Preset; 3] = [Preset::TinyQwen3, Preset::TinyDeepseek, Preset::TinyMixtral];

/// A `gen-model` directory of `preset` with seed `seed` (the format engineer's synthetic weights),
/// in a fresh temporary directory.
pub fn model_dir(preset: Preset, seed: u64) -> (tempfile::TempDir, ModelConfig) {
    let cfg = preset.config();
    let dir = tempfile::tempdir().expect("temp dir");
    synth::write_model(&cfg, dir.path(), &SynthOptions::new(seed), |_| {}).expect("gen-model");
    let cfg = ModelConfig::from_dir(dir.path()).expect("config.json");
    (dir, cfg)
}

/// `n` host devices of 256 MiB each with page-sized granularity (tiny experts stay tiny).
pub fn host_vmm(n: usize) -> Vmm<HostBackend> {
    let cfg = HostConfig::devices(n, 256 << 20)
        .with_granularity(hbm_vmm::host::page_size())
        .expect("granularity");
    Vmm::new(HostBackend::new(cfg))
}
