//! Cancellation (explicit or by dropping the handle) ends a request at the next iteration
//! boundary and frees its KV blocks; the other requests carry on unchanged.

mod engine_support;

use engine_support::{complete, engine, greedy, reference};
use moe_engine::{Event, FinishReason, Request};
use moe_host::deployment::PlacementKind;
use moe_model::presets::Preset;

fn used(e: &moe_engine::Engine<moe_host::worker::DeploymentRunner>) -> usize {
    e.metrics().kv.iter().map(|r| r.used_blocks).sum()
}

#[test]
fn cancellation_frees_kv_blocks() {
    let preset = Preset::TinyMixtral;
    let e = engine(preset, 2, PlacementKind::RoundRobin);
    let keep_prompt = vec![5u32, 6, 7];
    let keep = e.submit(Request::greedy(keep_prompt.clone(), 12)).unwrap();
    let mut gone = e.submit(Request::greedy((1..30).collect(), 40)).unwrap();
    let dropped = e.submit(Request::greedy((2..25).collect(), 40)).unwrap();
    for _ in 0..3 {
        e.step().unwrap();
    }
    let before = used(&e);
    // 3 + 3 tokens, 29 + 3 tokens and 23 + 3 tokens of KV in 4-token blocks.
    assert_eq!(before, 2 + 8 + 7);
    e.cancel(gone.id());
    drop(dropped);
    e.step().unwrap();
    assert!(
        used(&e) <= 3,
        "only the kept request's blocks remain ({} blocks)",
        used(&e)
    );
    let mut last = None;
    while let Some(ev) = gone.try_recv() {
        last = Some(ev);
    }
    assert!(
        matches!(
            last,
            Some(Event::Finished {
                reason: FinishReason::Cancelled,
                ..
            })
        ),
        "{last:?}"
    );
    e.run_until_idle(1000).unwrap();
    assert_eq!(keep.wait().tokens, reference(preset, &keep_prompt, 12));
    assert_eq!(used(&e), 0);
    // Cancelling an unknown or finished request is harmless.
    e.cancel(moe_engine::RequestId(999));
    assert_eq!(complete(&e, greedy(&[vec![1, 2]], 2))[0].tokens.len(), 2);
}
