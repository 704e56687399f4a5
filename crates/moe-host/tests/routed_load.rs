//! The workers count the tokens they route to each expert (`Deployment::routed_load`), the load
//! that load-aware placement balances: every computed position routes `top_k` slots in every
//! MoE layer, the counts survive a deployment built from the running one, and a layer's counts
//! are exactly the experts its router picked.

mod engine_support;

use std::sync::Arc;

use engine_support::{engine, prompts};
use moe_engine::Request;
use moe_host::deployment::{Deployment, PlacementKind};
use moe_model::presets::Preset;

#[test]
fn every_routed_slot_is_counted_once_and_the_count_outlives_the_deployment() {
    for preset in [Preset::TinyQwen3, Preset::TinyDeepseek] {
        let cfg = preset.config();
        let e = engine(preset, 2, PlacementKind::Balanced);
        assert!(
            e.with_runner(|r| r.deployment().routed_load().snapshot())
                .is_none(),
            "no load before any token"
        );
        let ps = prompts(&cfg, 6);
        let max_tokens = 5;
        let handles: Vec<_> = ps
            .iter()
            .map(|p| e.submit(Request::greedy(p.clone(), max_tokens)).unwrap())
            .collect();
        e.run_until_idle(10_000).unwrap();
        for h in handles {
            assert_eq!(h.wait().tokens.len(), max_tokens);
        }
        // Positions computed: each prompt, then every generated token but the last.
        let positions: u64 = ps.iter().map(|p| (p.len() + max_tokens - 1) as u64).sum();
        let top_k = cfg.moe.top_k as u64;
        let dep: Arc<Deployment> = e.with_runner(|r| Arc::clone(r.deployment()));
        let load = dep.routed_load().snapshot().expect("tokens were routed");
        assert_eq!(load.layers(), cfg.num_moe_layers());
        assert_eq!(load.experts(), cfg.moe.num_experts);
        for layer in 0..load.layers() {
            let routed: u64 = (0..load.experts()).map(|x| load.get(layer, x)).sum();
            assert_eq!(routed, positions * top_k, "{preset} MoE layer {layer}");
        }
        // A deployment built from this one (as every transition builds it) keeps counting
        // into the same table.
        let store = e.with_runner(|r| Arc::clone(r.store()));
        let next = Deployment::build(&store, dep.placement(), &engine_support::kv(16), Some(&dep))
            .unwrap();
        assert!(std::ptr::eq(next.routed_load(), dep.routed_load()));
    }
}
