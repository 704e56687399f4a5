//! Swapping the deployment mid-stream (built beside the running one) changes no output: scale up
//! 2 → 3 devices, scale down 3 → 2 with live KV migration, and a failure of a device whose
//! sequences are recomputed elsewhere. Intake never pauses: requests are submitted throughout.

mod engine_support;

use std::sync::Arc;

use engine_support::{bits, complete, engine_with, greedy, kv, prompts};
use expert_placement::{DeviceId as PDev, ExpertLoad, Placement};
use hbm_vmm::DeviceId;
use moe_engine::{Engine, RankId, Request, RequestHandle, SchedulerConfig};
use moe_host::deployment::{Deployment, PlacementKind, WeightStore};
use moe_host::worker::{DeploymentRunner, SwapDeployment, SwapReport};
use moe_model::presets::Preset;

const TOKENS: usize = 8;

fn batching() -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens: 16,
        max_running_per_rank: 8,
    }
}

/// Builds the deployment for `devices` beside the running one (copying what the newcomers need)
/// and swaps it in at the next iteration boundary.
fn scale(
    e: &Engine<DeploymentRunner>,
    store: &Arc<WeightStore>,
    devices: &[u32],
    failed: &[u32],
) -> crossbeam_channel::Receiver<Result<SwapReport, moe_host::deployment::DeploymentError>> {
    let cur = e.with_runner(|r| Arc::clone(r.deployment()));
    let cfg = store.model().config();
    let load = ExpertLoad::uniform(cfg.num_moe_layers(), cfg.moe.num_experts).unwrap();
    let ids: Vec<PDev> = devices.iter().map(|&d| PDev(d)).collect();
    let next: Placement = Placement::rebalanced_for(cur.placement(), &ids, &load).unwrap();
    for &f in failed {
        // A failed device's chunks cannot serve as copy sources.
        for key in store
            .keys()
            .into_iter()
            .filter(|k| k.device() == DeviceId(f))
        {
            store.release(&key).unwrap();
        }
    }
    store.prepare(&next).unwrap();
    let d = Deployment::build(store, &next, &kv(16), Some(&cur)).unwrap();
    if failed.is_empty() {
        e.swap_deployment(Arc::new(d))
    } else {
        e.swap_deployment_after_failure(Arc::new(d), failed.iter().map(|&f| DeviceId(f)).collect())
    }
}

fn submit_all(e: &Engine<DeploymentRunner>, reqs: Vec<Request>) -> Vec<RequestHandle> {
    reqs.into_iter().map(|r| e.submit(r).unwrap()).collect()
}

/// Runs `steps` iterations.
fn steps(e: &Engine<DeploymentRunner>, n: usize) {
    for _ in 0..n {
        e.step().unwrap();
    }
}

#[test]
fn scaling_up_and_down_mid_stream_changes_no_output() {
    let preset = Preset::TinyQwen3;
    let cfg = preset.config();
    let ps = prompts(&cfg, 24);
    let (still, _) = engine_with(preset, 2, 2, PlacementKind::Balanced, kv(16), batching());
    let want: Vec<_> = complete(&still, greedy(&ps, TOKENS))
        .iter()
        .map(bits)
        .collect();

    let (e, store) = engine_with(preset, 2, 3, PlacementKind::Balanced, kv(16), batching());
    let mut handles = submit_all(&e, greedy(&ps[..12], TOKENS));
    steps(&e, 3);

    // 2 -> 3: device 2 joins; running sequences stay where their KV is.
    let up = scale(&e, &store, &[0, 1, 2], &[]);
    handles.extend(submit_all(&e, greedy(&ps[12..18], TOKENS)));
    steps(&e, 1);
    let report = up.try_recv().expect("applied at the boundary").unwrap();
    assert_eq!(report.added, vec![RankId(2)]);
    assert!(report.migrated.is_empty() && report.requeued.is_empty());
    steps(&e, 2);
    assert!(e.with_runner(|r| r.deployment().devices().len()) == 3);
    assert!(
        e.metrics()
            .kv
            .iter()
            .any(|r| r.rank == RankId(2) && r.used_blocks > 0),
        "rank 2 took new sequences"
    );
    assert_eq!(
        e.with_runner(DeploymentRunner::pending_retired),
        0,
        "the old deployment was dropped after its last iteration"
    );

    // 3 -> 2: device 0 leaves; its sequences move with their KV.
    let down = scale(&e, &store, &[1, 2], &[]);
    handles.extend(submit_all(&e, greedy(&ps[18..], TOKENS)));
    steps(&e, 1);
    let report = down.try_recv().expect("applied").unwrap();
    assert_eq!(report.removed, vec![RankId(0)]);
    assert!(!report.migrated.is_empty(), "rank 0 had running sequences");
    assert!(report.requeued.is_empty());
    assert!(report.kv_bytes > 0);
    assert_eq!(
        e.with_runner(DeploymentRunner::worker_devices),
        vec![DeviceId(1), DeviceId(2)]
    );

    e.run_until_idle(10_000).unwrap();
    let got: Vec<_> = handles.into_iter().map(|h| bits(&h.wait())).collect();
    assert_eq!(got, want);
    assert_eq!(e.metrics().preemptions, 0, "nothing was recomputed");
    // Device 0's chunks can go now; its memory returns.
    let before = store.vmm().usage(DeviceId(0));
    let placement = e.with_runner(|r| r.deployment().placement().clone());
    store.release_unused(&placement).unwrap();
    assert!(store.vmm().usage(DeviceId(0)) < before);
}

#[test]
fn a_failed_device_s_sequences_are_recomputed_elsewhere() {
    let preset = Preset::TinyMixtral;
    let cfg = preset.config();
    let ps = prompts(&cfg, 12);
    let (still, _) = engine_with(preset, 3, 3, PlacementKind::RoundRobin, kv(16), batching());
    let want: Vec<_> = complete(&still, greedy(&ps, TOKENS))
        .iter()
        .map(bits)
        .collect();

    let (e, store) = engine_with(preset, 3, 3, PlacementKind::RoundRobin, kv(16), batching());
    let handles = submit_all(&e, greedy(&ps, TOKENS));
    steps(&e, 4);
    let rx = scale(&e, &store, &[0, 1], &[2]);
    steps(&e, 1);
    let report = rx.try_recv().expect("applied").unwrap();
    assert_eq!(report.removed, vec![RankId(2)]);
    assert!(report.migrated.is_empty());
    assert!(!report.requeued.is_empty(), "rank 2 had running sequences");
    e.run_until_idle(10_000).unwrap();
    let got: Vec<_> = handles.into_iter().map(|h| bits(&h.wait())).collect();
    assert_eq!(got, want);
}
