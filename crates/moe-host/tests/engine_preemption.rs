//! When a rank runs out of KV blocks, the youngest sequence is preempted and later recomputed;
//! the tokens come out the same as with room to spare, and every preemption is counted.

mod engine_support;

use engine_support::{bits, complete, engine_with, greedy, kv, prompts};
use moe_engine::{FinishReason, SchedulerConfig};
use moe_host::deployment::PlacementKind;
use moe_model::presets::Preset;

#[test]
fn preemption_and_recompute_give_the_same_tokens() {
    for preset in [Preset::TinyQwen3, Preset::TinyDeepseek] {
        let cfg = preset.config();
        let ps: Vec<_> = prompts(&cfg, 12)
            .into_iter()
            .filter(|p| p.len() >= 5)
            .take(6)
            .collect();
        let batching = SchedulerConfig {
            max_batch_tokens: 64,
            max_running_per_rank: 8,
        };
        let (roomy, _) = engine_with(preset, 1, 1, PlacementKind::Balanced, kv(16), batching);
        let want: Vec<_> = complete(&roomy, greedy(&ps, 14)).iter().map(bits).collect();
        assert_eq!(roomy.metrics().preemptions, 0);

        // One chunk of 8 blocks of 4 tokens: six sequences of up to 27 tokens cannot all fit.
        let (tight, _) = engine_with(preset, 1, 1, PlacementKind::Balanced, kv(1), batching);
        let got = complete(&tight, greedy(&ps, 14));
        let m = tight.metrics();
        assert!(
            m.preemptions > 0,
            "{preset}: the pool was tight enough to preempt"
        );
        assert_eq!(
            got.iter()
                .map(|c| u64::from(c.timings.preemptions))
                .sum::<u64>(),
            m.preemptions
        );
        assert!(got.iter().all(|c| c.finish == FinishReason::Length));
        assert_eq!(got.iter().map(bits).collect::<Vec<_>>(), want, "{preset}");
        assert_eq!(
            m.kv.iter().map(|r| r.used_blocks).sum::<usize>(),
            0,
            "all blocks back"
        );
    }
}
