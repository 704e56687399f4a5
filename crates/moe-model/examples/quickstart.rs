//! The tensor schema and the compute-free weight layout of a tiny Mixtral.
//!
//! Run: `cargo run -p moe-model --example quickstart` (no GPU needed).

use moe_model::presets::Preset;
use moe_model::schema::{ModelSchema, TensorOwner, TensorRole};
use moe_model::weights::WeightLayout;

fn main() {
    let cfg = Preset::TinyMixtral.config();
    let schema = ModelSchema::new(&cfg);
    let gate = schema
        .find(
            TensorOwner::Expert {
                layer: 1,
                expert: 3,
            },
            TensorRole::Gate,
        )
        .unwrap();
    assert_eq!(
        gate.shape,
        vec![cfg.moe.expert_intermediate_size, cfg.hidden_size]
    ); // [out, in]
       // One chunk per routed expert: [gate | up | down].
    let layout = WeightLayout::new(&cfg);
    assert_eq!(layout.expert_floats(), 3 * gate.numel());
    println!("moe-model: ok");
}
