//! Shared helpers of the `compute_*` integration tests: tiny model directories on disk and
//! host devices.
#![allow(dead_code)]

use hbm_vmm::host::{HostBackend, HostConfig};
use hbm_vmm::Vmm;
use moe_model::config::{DType, ModelConfig};
use moe_model::presets::Preset;
use moe_model::synth::{self, SynthOptions};

/// The tiny presets every compute test runs on.
pub const TINY: [Preset; 3] = [Preset::TinyQwen3, Preset::TinyDeepseek, Preset::TinyMixtral];

/// A `gen-model` directory of `preset` with seed `seed` (the format engineer's synthetic weights),
/// in a fresh temporary directory.
pub fn model_dir(preset: Preset, seed: u64) -> (tempfile::TempDir, ModelConfig) {
    model_dir_as(preset, seed, DType::F32)
}

/// As [`model_dir`], stored as `dtype`, in shards of at most 256 KiB.
pub fn model_dir_as(preset: Preset, seed: u64, dtype: DType) -> (tempfile::TempDir, ModelConfig) {
    let cfg = preset.config();
    let dir = tempfile::tempdir().expect("temp dir");
    let opts = SynthOptions {
        dtype,
        max_shard_bytes: 256 << 10,
        ..SynthOptions::new(seed)
    };
    synth::write_model(&cfg, dir.path(), &opts, |_| {}).expect("gen-model");
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
