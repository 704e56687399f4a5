//! CPU reference forward pass throughput per tiny preset (report only; nothing is asserted).
//!
//! `cargo bench -p moe-host --bench cpu_forward` prints, per preset: prefill tokens/s (one
//! 64-token prompt), decode tokens/s for one sequence, and decode tokens/s for a batch of 8.

use std::time::{Duration, Instant};

use hbm_vmm::host::{HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Vmm};
use moe_host::compute::cpu::CpuCompute;
use moe_host::model::runner::{argmax, SingleDevice};
use moe_host::model::Model;
use moe_model::presets::Preset;
use moe_model::weights::MemTensors;

fn runner(preset: Preset) -> SingleDevice {
    let cfg = preset.config();
    let src = MemTensors::seeded(&cfg, 1);
    let host = HostConfig::devices(1, 1 << 30)
        .with_granularity(hbm_vmm::host::page_size())
        .expect("granularity");
    let vmm = Vmm::new(HostBackend::new(host));
    let model = Model::new(&cfg, CpuCompute::new()).expect("model");
    SingleDevice::load(model, &vmm, DeviceId(0), &src, 16).expect("load")
}

fn rate(tokens: usize, t: Duration) -> f64 {
    tokens as f64 / t.as_secs_f64()
}

fn main() {
    println!(
        "{:<14} {:>14} {:>16} {:>18}",
        "preset", "prefill tok/s", "decode b=1 tok/s", "decode b=8 tok/s"
    );
    for preset in [Preset::TinyQwen3, Preset::TinyDeepseek, Preset::TinyMixtral] {
        let mut run = runner(preset);
        let vocab = run.model().config().vocab_size as u32;
        let prompt: Vec<u32> = (0..64).map(|i| (i * 37 + 11) % vocab).collect();

        let id = run.add_sequence();
        let t = Instant::now();
        let mut logits = run
            .step(&[(id, prompt.clone())])
            .expect("prefill")
            .remove(0);
        let prefill = rate(prompt.len(), t.elapsed());

        let steps = 64;
        let t = Instant::now();
        for _ in 0..steps {
            logits = run
                .step(&[(id, vec![argmax(&logits)])])
                .expect("decode")
                .remove(0);
        }
        let decode1 = rate(steps, t.elapsed());
        run.remove_sequence(id).expect("remove");

        let ids: Vec<_> = (0..8).map(|_| run.add_sequence()).collect();
        let first: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, prompt[..8 + i].to_vec()))
            .collect();
        let mut last = run.step(&first).expect("batch prefill");
        let steps8 = 32;
        let t = Instant::now();
        for _ in 0..steps8 {
            let inputs: Vec<_> = ids
                .iter()
                .zip(&last)
                .map(|(&s, l)| (s, vec![argmax(l)]))
                .collect();
            last = run.step(&inputs).expect("batch decode");
        }
        let decode8 = rate(steps8 * ids.len(), t.elapsed());
        println!(
            "{:<14} {:>14.0} {:>16.0} {:>18.0}",
            preset.name(),
            prefill,
            decode1,
            decode8
        );
    }
}
