//! Greedy outputs are bitwise identical (token ids and logprobs) whatever the device count
//! (`host:1` to `host:4`), the expert placement (balanced, round-robin, load-aware with replicas)
//! and the batch (a request alone, or among 50 others), and equal to the model's single-device
//! path.

mod engine_support;

use engine_support::{
    bits, complete, engine, engine_with, greedy, kv, prompts, reference, PRESETS,
};
use moe_engine::{FinishReason, SchedulerConfig};
use moe_host::deployment::PlacementKind;

const TOKENS: usize = 6;

#[test]
fn outputs_match_across_device_counts_and_placements() {
    for preset in PRESETS {
        let cfg = preset.config();
        let ps = prompts(&cfg, 3);
        let base = complete(
            &engine(preset, 1, PlacementKind::Balanced),
            greedy(&ps, TOKENS),
        );
        for (p, c) in ps.iter().zip(&base) {
            assert_eq!(c.finish, FinishReason::Length);
            assert_eq!(
                c.tokens,
                reference(preset, p, TOKENS),
                "{preset}: engine vs single-device path"
            );
        }
        let want: Vec<_> = base.iter().map(bits).collect();
        for devices in 1..=4 {
            for placement in [
                PlacementKind::Balanced,
                PlacementKind::RoundRobin,
                PlacementKind::LoadAware,
            ] {
                let got: Vec<_> =
                    complete(&engine(preset, devices, placement), greedy(&ps, TOKENS))
                        .iter()
                        .map(bits)
                        .collect();
                assert_eq!(got, want, "{preset} on host:{devices} with {placement:?}");
            }
        }
    }
}

#[test]
fn a_request_alone_matches_it_among_fifty_others() {
    for preset in PRESETS {
        let cfg = preset.config();
        let others = prompts(&cfg, 51);
        let target = others[7].clone();
        let alone = complete(
            &engine(preset, 2, PlacementKind::Balanced),
            greedy(std::slice::from_ref(&target), TOKENS),
        );
        // Among 50 others, on 3 devices with replicas, with a small token budget so that prefills
        // are chunked and share iterations with decodes.
        let (e, _) = engine_with(
            preset,
            3,
            3,
            PlacementKind::LoadAware,
            kv(16),
            SchedulerConfig {
                max_batch_tokens: 24,
                max_running_per_rank: 12,
            },
        );
        let mut reqs = greedy(&others[..7], TOKENS);
        reqs.extend(greedy(&[target], TOKENS));
        reqs.extend(greedy(&others[8..], TOKENS));
        let all = complete(&e, reqs);
        assert_eq!(bits(&all[7]), bits(&alone[0]), "{preset}");
        assert!(all.iter().all(|c| c.tokens.len() == TOKENS));
        let m = e.metrics();
        assert_eq!(m.finished, 51);
        assert!(
            m.iterations < 51 * TOKENS as u64,
            "requests were batched ({} iterations)",
            m.iterations
        );
    }
}
