//! Many requests submitted concurrently from several threads to the engine's run loop all
//! complete, with the same tokens as when run one after another.

mod engine_support;

use std::sync::Arc;

use engine_support::{complete, engine, prompts};
use moe_engine::{FinishReason, Request, SamplingParams};
use moe_host::deployment::PlacementKind;
use moe_model::presets::Preset;

fn request(p: &[u32], i: usize) -> Request {
    let r = Request::greedy(p.to_vec(), 2 + i % 5);
    if i.is_multiple_of(3) {
        r.with_sampling(SamplingParams::Random {
            temperature: 0.9,
            top_p: 0.95,
            seed: i as u64,
        })
    } else {
        r
    }
}

#[test]
fn many_concurrent_requests_all_complete() {
    let preset = Preset::TinyQwen3;
    let ps = Arc::new(prompts(&preset.config(), 48));
    let sequential: Vec<Vec<u32>> = {
        let e = engine(preset, 1, PlacementKind::Balanced);
        ps.iter()
            .enumerate()
            .map(|(i, p)| complete(&e, vec![request(p, i)]).remove(0).tokens)
            .collect()
    };
    let e = engine(preset, 3, PlacementKind::LoadAware);
    let run = e.start();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (e, ps) = (e.clone(), Arc::clone(&ps));
            std::thread::spawn(move || {
                let mine: Vec<usize> = (t..ps.len()).step_by(4).collect();
                let handles: Vec<_> = mine
                    .iter()
                    .map(|&i| (i, e.submit(request(&ps[i], i)).unwrap()))
                    .collect();
                handles
                    .into_iter()
                    .map(|(i, h)| {
                        let c = h.wait();
                        assert_eq!(c.finish, FinishReason::Length, "request {i}");
                        assert!(c.timings.ttft.is_some());
                        (i, c.tokens)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut got = vec![Vec::new(); ps.len()];
    for t in threads {
        for (i, tokens) in t.join().unwrap() {
            got[i] = tokens;
        }
    }
    run.stop();
    assert_eq!(got, sequential);
    let m = e.metrics();
    assert_eq!(m.finished, 48);
    assert_eq!((m.queue_depth, m.running), (0, 0));
    assert!(m.tokens_per_s > 0.0);
}
