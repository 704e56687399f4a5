//! The host executor end to end: transitions carried out on a live engine (its run loop on its
//! own thread) while requests keep arriving, compared bitwise with a fixed deployment.

use std::sync::Arc;
use std::time::Duration;

use moe_engine::{
    Completion, Engine, EngineConfig, FinishReason, Request, RequestHandle, SchedulerConfig,
    TokenId,
};
use moe_host::deployment::{DeploymentConfig, PlacementKind};
use moe_host::worker::{DeploymentRunner, HostEngineConfig};
use moe_model::presets::Preset;
use moe_model::weights::MemTensors;
use scaler::{DeviceSet, Phase, Strategy, TransitionKind, TransitionSpec};
use scaler_exec::executor::{Checkpoint, Faults, HostExecutor, HostExecutorConfig, ScaleEvent};

const PRESET: Preset = Preset::TinyQwen3;
const TOKENS: usize = 12;

fn kv() -> DeploymentConfig {
    DeploymentConfig {
        block_tokens: 4,
        blocks_per_chunk: 8,
        kv_chunks: 1,
        kv_max_chunks: 16,
        ..DeploymentConfig::default()
    }
}

fn checkpoint() -> Checkpoint {
    Arc::new(MemTensors::seeded(&PRESET.config(), 7))
}

fn engine(devices: usize, ck: &Checkpoint) -> Engine<DeploymentRunner> {
    let host = HostEngineConfig {
        devices,
        max_devices: 4,
        placement: PlacementKind::Balanced,
        deployment: kv(),
        engine: EngineConfig {
            scheduler: SchedulerConfig {
                max_batch_tokens: 16,
                max_running_per_rank: 6,
            },
            idle_wait: Duration::from_millis(2),
            ..EngineConfig::default()
        },
        ..HostEngineConfig::default()
    };
    DeploymentRunner::host_engine(&PRESET.config(), ck.as_ref(), &host)
        .expect("engine")
        .0
}

fn executor(e: &Engine<DeploymentRunner>, ck: &Checkpoint) -> HostExecutor {
    let config = HostExecutorConfig {
        deployment: kv(),
        ..HostExecutorConfig::default()
    };
    let x = HostExecutor::new(e.clone(), Arc::clone(ck), config);
    x.prewarm(&DeviceSet::first(4));
    x
}

fn prompts(n: usize) -> Vec<Vec<TokenId>> {
    let v = PRESET.config().vocab_size as u32;
    (0..n as u32)
        .map(|i| {
            let len = 2 + (i * 5) % 11;
            (0..len).map(|j| (i * 31 + j * 7 + 3) % v).collect()
        })
        .collect()
}

fn request(p: &[TokenId]) -> Request {
    Request::greedy(p.to_vec(), TOKENS).with_logprobs(true)
}

fn bits(c: &Completion) -> (Vec<TokenId>, Vec<u32>) {
    (
        c.tokens.clone(),
        c.logprobs.iter().map(|l| l.to_bits()).collect(),
    )
}

/// Tokens and logprob bits of every prompt on a fixed one-device deployment.
fn reference(ps: &[Vec<TokenId>], ck: &Checkpoint) -> Vec<(Vec<TokenId>, Vec<u32>)> {
    let e = engine(1, ck);
    let hs: Vec<_> = ps.iter().map(|p| e.submit(request(p)).unwrap()).collect();
    e.run_until_idle(100_000).unwrap();
    hs.into_iter().map(|h| bits(&h.wait())).collect()
}

fn submit(x: &HostExecutor, ps: &[Vec<TokenId>]) -> Vec<RequestHandle> {
    ps.iter()
        .map(|p| x.gate().submit(x.engine(), request(p)).unwrap())
        .collect()
}

fn spec(strategy: Strategy, from: &DeviceSet, to: DeviceSet) -> TransitionSpec {
    let kind = if to.len() > from.len() {
        TransitionKind::ScaleUp
    } else {
        TransitionKind::ScaleDown
    };
    TransitionSpec {
        kind,
        strategy,
        from: from.clone(),
        to,
    }
}

fn finish_all(handles: Vec<RequestHandle>) -> Vec<Completion> {
    handles.into_iter().map(RequestHandle::wait).collect()
}

fn assert_elastic(e: &ScaleEvent) {
    assert!(e.completed(), "{:?}", e.report);
    assert_eq!(e.report.intake_paused_ms, 0.0);
    assert_eq!(e.downtime_ms, 0.0);
}

#[test]
fn elastic_2_3_4_1_2_mid_stream_is_bitwise_identical_and_never_pauses() {
    let ck = checkpoint();
    let ps = prompts(40);
    let want = reference(&ps, &ck);
    let e = engine(2, &ck);
    let mut x = executor(&e, &ck);
    let run = e.start();
    let mut handles = submit(&x, &ps[..12]);
    let mut cur = x.devices();
    let mut events = Vec::new();
    let steps: [&[u32]; 4] = [&[0, 1, 2], &[0, 1, 2, 3], &[0], &[0, 1]];
    for (i, devices) in steps.iter().enumerate() {
        let to: DeviceSet = devices.iter().map(|&d| scaler::DeviceId(d)).collect();
        let ev = x.run(spec(Strategy::Elastic, &cur, to.clone())).unwrap();
        assert_elastic(&ev);
        assert_eq!(x.devices(), to);
        if i == 0 {
            // The weights device 2 received came through the p2p-xfer transport, from the
            // devices that held them.
            let stats = x.link_stats();
            let into_2: u64 = stats
                .iter()
                .filter(|l| l.link.dst.0 == 2)
                .map(|l| l.bytes)
                .sum();
            assert_eq!(into_2, ev.report.bytes_moved, "{stats:?}");
            assert!(stats.iter().all(|l| l.link.src.0 < 2 || l.bytes == 0));
        }
        cur = to;
        handles.extend(submit(&x, &ps[12 + i * 7..12 + (i + 1) * 7]));
        events.push(ev);
    }
    let done = finish_all(handles);
    run.stop();
    for c in &done {
        assert!(matches!(c.finish, FinishReason::Length), "{:?}", c.finish);
    }
    let got: Vec<_> = done.iter().map(bits).collect();
    assert_eq!(got, want);
    // The scale-up copied weights into the new device and reused the rest in place.
    assert!(events[0].report.bytes_moved > 0);
    assert!(events[0].report.bytes_zero_copy > 0);
    assert!(
        events[0].warm_workers >= 1,
        "device 2 came warm from the pool"
    );
    // Scale-downs moved KV of live sequences, or had none to move; nothing was recomputed.
    for ev in &events {
        let swap = ev.swap.as_ref().expect("switched");
        assert!(swap.requeued.is_empty(), "{swap:?}");
    }
    assert_eq!(e.metrics().preemptions, 0);
}

#[test]
fn an_injected_transfer_failure_rolls_back_with_nothing_lost() {
    let ck = checkpoint();
    let ps = prompts(16);
    let want = reference(&ps, &ck);
    let e = engine(2, &ck);
    let mut x = executor(&e, &ck);
    let store = e.with_runner(|r| Arc::clone(r.store()));
    let keys_before = store.keys();
    let usage_before = store.vmm().usage(hbm_vmm::DeviceId(2));
    let run = e.start();
    let mut handles = submit(&x, &ps[..8]);
    x.set_faults(Faults {
        fail_copies_to: Some(scaler::DeviceId(2)),
        ..Faults::default()
    });
    let from = DeviceSet::first(2);
    let ev = x
        .run(spec(Strategy::Elastic, &from, DeviceSet::first(3)))
        .unwrap();
    assert_eq!(ev.report.phase, Phase::Aborted);
    assert!(
        format!("{:?}", ev.report.abort_reason).contains("injected"),
        "{:?}",
        ev.report.abort_reason
    );
    assert_eq!(x.devices(), from, "still serving on the old deployment");
    assert_eq!(store.keys(), keys_before, "partial copies were released");
    assert_eq!(store.vmm().usage(hbm_vmm::DeviceId(2)), usage_before);
    handles.extend(submit(&x, &ps[8..]));
    // Without the fault the same scale-up then goes through.
    x.set_faults(Faults::default());
    let ok = x
        .run(spec(Strategy::Elastic, &from, DeviceSet::first(3)))
        .unwrap();
    assert_elastic(&ok);
    let got: Vec<_> = finish_all(handles).iter().map(bits).collect();
    run.stop();
    assert_eq!(got, want);
}

#[test]
fn a_failed_build_rolls_back_and_keeps_serving() {
    let ck = checkpoint();
    let ps = prompts(8);
    let want = reference(&ps, &ck);
    let e = engine(3, &ck);
    let mut x = executor(&e, &ck);
    let run = e.start();
    let handles = submit(&x, &ps);
    x.set_faults(Faults {
        fail_build: true,
        ..Faults::default()
    });
    let from = DeviceSet::first(3);
    let ev = x
        .run(spec(Strategy::Elastic, &from, DeviceSet::first(2)))
        .unwrap();
    assert_eq!(ev.report.phase, Phase::Aborted);
    assert_eq!(x.devices(), from);
    let got: Vec<_> = finish_all(handles).iter().map(bits).collect();
    run.stop();
    assert_eq!(got, want);
}

#[test]
fn a_device_failure_requeues_its_sequences_and_changes_no_output() {
    let ck = checkpoint();
    let ps = prompts(18);
    let want = reference(&ps, &ck);
    let e = engine(3, &ck);
    let mut x = executor(&e, &ck);
    let handles = submit(&x, &ps);
    // Run a few iterations by hand so device 2 has running sequences when it fails.
    for _ in 0..3 {
        e.step().unwrap();
    }
    let run = e.start();
    let failed = DeviceSet::from([2]);
    let ev = x
        .run(TransitionSpec {
            kind: TransitionKind::Failure {
                failed: failed.clone(),
            },
            strategy: Strategy::Elastic,
            from: DeviceSet::first(3),
            to: DeviceSet::first(2),
        })
        .unwrap();
    assert!(ev.completed(), "{:?}", ev.report);
    assert!(ev.report.sequences_requeued > 0, "device 2 had sequences");
    assert_eq!(x.devices(), DeviceSet::first(2));
    let got: Vec<_> = finish_all(handles).iter().map(bits).collect();
    run.stop();
    assert_eq!(got, want);
}

#[test]
fn baselines_run_on_the_same_engine_and_change_no_output() {
    let ck = checkpoint();
    let ps = prompts(16);
    let want = reference(&ps, &ck);
    for strategy in [Strategy::ColdRestart, Strategy::Extravagant] {
        let e = engine(1, &ck);
        let mut x = executor(&e, &ck);
        let run = e.start();
        let mut handles = submit(&x, &ps[..8]);
        let from = DeviceSet::first(1);
        let to = match strategy {
            Strategy::Extravagant => DeviceSet::from([1, 2]),
            _ => DeviceSet::first(2),
        };
        let up = x.run(spec(strategy, &from, to.clone())).unwrap();
        assert!(up.completed(), "{strategy}: {:?}", up.report);
        assert_eq!(x.devices(), to);
        handles.extend(submit(&x, &ps[8..]));
        let back = match strategy {
            Strategy::Extravagant => DeviceSet::from([0]),
            _ => DeviceSet::first(1),
        };
        let down = x.run(spec(strategy, &to, back.clone())).unwrap();
        assert!(down.completed(), "{strategy}: {:?}", down.report);
        assert_eq!(x.devices(), back);
        if strategy == Strategy::ColdRestart {
            assert!(up.report.intake_paused_ms > 0.0);
            assert!(up.downtime_ms > 0.0);
            assert!(up.report.bytes_reloaded > 0);
        } else {
            assert_eq!(up.report.intake_paused_ms, 0.0);
            assert!(up.report.bytes_moved > 0);
            assert_eq!(up.report.bytes_zero_copy, 0);
        }
        let got: Vec<_> = finish_all(handles).iter().map(bits).collect();
        run.stop();
        assert_eq!(got, want, "{strategy}");
    }
}

#[test]
fn bad_commands_are_typed_errors_and_change_nothing() {
    let ck = checkpoint();
    let e = engine(2, &ck);
    let mut x = executor(&e, &ck);
    let from = DeviceSet::first(2);
    let err = x
        .run(spec(Strategy::Elastic, &from, DeviceSet::first(5)))
        .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = x
        .run(spec(
            Strategy::Elastic,
            &DeviceSet::first(3),
            DeviceSet::first(4),
        ))
        .unwrap_err();
    assert!(err.to_string().contains("serves on"), "{err}");
    let err = x
        .run(spec(Strategy::Elastic, &from, DeviceSet::new()))
        .unwrap_err();
    assert!(err.to_string().contains("at least 1 device"), "{err}");
    assert_eq!(x.devices(), from);
}

/// Bytes of the weight chunks `store` holds on `device`.
fn weight_bytes(store: &moe_host::deployment::WeightStore, device: u32) -> u64 {
    store
        .keys()
        .into_iter()
        .filter(|k| k.device() == hbm_vmm::DeviceId(device))
        .filter_map(|k| store.hmm().get(&k).map(|c| c.size() as u64))
        .sum()
}

fn assert_colocated(ev: &ScaleEvent, shared: &[u32]) {
    assert!(ev.completed(), "{:?}", ev.report);
    assert_eq!(ev.report.strategy, Strategy::Colocated);
    assert_eq!(ev.report.intake_paused_ms, 0.0, "never paused");
    assert_eq!(ev.downtime_ms, 0.0, "the serving loop never stopped");
    assert_eq!(
        ev.report.bytes_zero_copy, 0,
        "the new instance shares nothing"
    );
    assert!(ev.report.bytes_moved > 0);
    // The running instance's KV budget was halved on every device both instances share.
    let halved: Vec<u32> = ev.kv_budget.iter().map(|c| c.device.0).collect();
    assert_eq!(halved, shared);
    for c in &ev.kv_budget {
        assert_eq!(c.max_chunks, kv().kv_max_chunks);
        assert_eq!(c.budget_chunks, kv().kv_max_chunks / 2, "{c:?}");
        assert!(
            c.chunks_after <= c.budget_chunks.max(c.chunks_before),
            "{c:?}"
        );
    }
    let preempted: u64 = ev.kv_budget.iter().map(|c| c.preempted.len() as u64).sum();
    let swap = ev.swap.as_ref().expect("switched");
    assert_eq!(
        ev.sequences_preempted,
        preempted + swap.requeued.len() as u64,
        "every preemption is counted"
    );
    // Every sequence that kept running moved its KV into the new instance, copied.
    assert_eq!(ev.kv_bytes_at_switch, swap.kv_bytes as u64);
    assert_eq!(ev.kv_bytes_precopied, 0);
}

#[test]
fn colocated_2_3_2_mid_stream_duplicates_weights_halves_kv_and_changes_no_output() {
    let ck = checkpoint();
    let ps = prompts(24);
    let want = reference(&ps, &ck);
    let e = engine(2, &ck);
    let mut x = executor(&e, &ck);
    let mut handles = submit(&x, &ps[..10]);
    // Sequences are running when the transition starts.
    for _ in 0..4 {
        e.step().unwrap();
    }
    let old_store = e.with_runner(|r| Arc::clone(r.store()));
    let old_w0 = weight_bytes(&old_store, 0);
    let run = e.start();
    let from = DeviceSet::first(2);
    let up = x
        .run(spec(Strategy::Colocated, &from, DeviceSet::first(3)))
        .unwrap();
    assert_colocated(&up, &[0, 1]);
    assert_eq!(x.devices(), DeviceSet::first(3));
    let swap = up.swap.as_ref().unwrap();
    assert!(
        swap.migrated.iter().all(|(_, a, b)| a == b),
        "staying ranks keep their sequences: {swap:?}"
    );
    // The new instance has its own copy of everything: its store is not the old one, and on
    // device 0 both instances' weights were resident at once.
    let new_store = e.with_runner(|r| Arc::clone(r.store()));
    assert!(!Arc::ptr_eq(&old_store, &new_store));
    let new_w0 = weight_bytes(&new_store, 0);
    let new_all: u64 = (0..3).map(|d| weight_bytes(&new_store, d)).sum();
    assert_eq!(up.report.bytes_moved, new_all, "every chunk copied");
    assert!(
        up.peak_bytes_per_device[&scaler::DeviceId(0)] >= old_w0 + new_w0,
        "peak {} < {} + {}",
        up.peak_bytes_per_device[&scaler::DeviceId(0)],
        old_w0,
        new_w0
    );
    assert!(
        old_store.keys().is_empty(),
        "the old instance's weights are released"
    );
    // The budget is the whole device again once the old instance is gone.
    for d in 0..3 {
        assert_eq!(
            x.engine()
                .with_runner(|r| r.kv_budget(hbm_vmm::DeviceId(d))),
            None
        );
    }
    handles.extend(submit(&x, &ps[10..]));
    let to = DeviceSet::first(2);
    let down = x
        .run(spec(Strategy::Colocated, &DeviceSet::first(3), to.clone()))
        .unwrap();
    assert_colocated(&down, &[0, 1]);
    assert_eq!(x.devices(), to);
    let swap = down.swap.as_ref().unwrap();
    assert!(
        swap.migrated.iter().all(|(_, _, b)| b.0 < 2),
        "device 2's sequences moved to the staying ranks: {swap:?}"
    );
    assert_eq!(swap.removed, vec![moe_engine::RankId(2)]);
    let done = finish_all(handles);
    run.stop();
    for c in &done {
        assert!(matches!(c.finish, FinishReason::Length), "{:?}", c.finish);
    }
    let got: Vec<_> = done.iter().map(bits).collect();
    assert_eq!(got, want, "bitwise identical to the fixed deployment");
}

#[test]
fn an_elastic_scale_down_precopies_kv_and_the_switch_copies_only_the_tail() {
    let ck = checkpoint();
    let v = PRESET.config().vocab_size as u32;
    let ps: Vec<Vec<TokenId>> = (0..9u32)
        .map(|i| (0..48).map(|j| (i * 13 + j * 5 + 1) % v).collect())
        .collect();
    let long = |p: &Vec<TokenId>| Request::greedy(p.clone(), 96).with_logprobs(true);
    let want: Vec<_> = {
        let e = engine(1, &ck);
        let hs: Vec<_> = ps.iter().map(|p| e.submit(long(p)).unwrap()).collect();
        e.run_until_idle(100_000).unwrap();
        hs.into_iter().map(|h| bits(&h.wait())).collect()
    };
    let e = engine(3, &ck);
    let mut x = executor(&e, &ck);
    let handles: Vec<_> = ps
        .iter()
        .map(|p| x.gate().submit(x.engine(), long(p)).unwrap())
        .collect();
    // Prefill by hand, so that device 2 has running sequences with full KV blocks.
    for _ in 0..16 {
        e.step().unwrap();
    }
    let run = e.start();
    let ev = x
        .run(spec(
            Strategy::Elastic,
            &DeviceSet::first(3),
            DeviceSet::first(2),
        ))
        .unwrap();
    assert_elastic(&ev);
    let swap = ev.swap.as_ref().expect("switched");
    assert!(swap.requeued.is_empty(), "{swap:?}");
    assert!(swap.precopied > 0, "{swap:?}");
    assert_eq!(ev.report.sequences_migrated, swap.precopied as u64);
    assert_eq!(ev.report.kv_bytes_migrated, ev.kv_bytes_precopied);
    assert!(ev.kv_bytes_precopied > 0);
    assert!(
        ev.kv_bytes_at_switch < ev.kv_bytes_precopied,
        "the switch copied {} bytes, the pre-copy {}",
        ev.kv_bytes_at_switch,
        ev.kv_bytes_precopied
    );
    let done = finish_all(handles);
    run.stop();
    let got: Vec<_> = done.iter().map(bits).collect();
    // (Two ranks may run short of KV for nine long sequences later and preempt one; that is
    // the scheduler's ordinary pressure handling, recomputed bitwise the same.)
    assert_eq!(got, want);
}

#[test]
fn a_colocated_transfer_failure_rolls_back_restoring_the_kv_budget() {
    let ck = checkpoint();
    let ps = prompts(12);
    let want = reference(&ps, &ck);
    let e = engine(2, &ck);
    let mut x = executor(&e, &ck);
    let store = e.with_runner(|r| Arc::clone(r.store()));
    let keys_before = store.keys();
    let usage_before = store.vmm().usage(hbm_vmm::DeviceId(2));
    let handles = submit(&x, &ps);
    for _ in 0..3 {
        e.step().unwrap();
    }
    let run = e.start();
    x.set_faults(Faults {
        fail_copies_to: Some(scaler::DeviceId(1)),
        ..Faults::default()
    });
    let from = DeviceSet::first(2);
    let ev = x
        .run(spec(Strategy::Colocated, &from, DeviceSet::first(3)))
        .unwrap();
    assert_eq!(ev.report.phase, Phase::Aborted);
    assert_eq!(
        ev.kv_budget.len(),
        2,
        "the budget was halved before the copies"
    );
    assert_eq!(x.devices(), from, "still serving on the old instance");
    for d in 0..2 {
        assert_eq!(
            x.engine()
                .with_runner(|r| r.kv_budget(hbm_vmm::DeviceId(d))),
            None,
            "the full budget is back"
        );
    }
    assert!(Arc::ptr_eq(
        &store,
        &e.with_runner(|r| Arc::clone(r.store()))
    ));
    assert_eq!(store.keys(), keys_before);
    assert_eq!(
        store.vmm().usage(hbm_vmm::DeviceId(2)),
        usage_before,
        "the second instance's copies were freed"
    );
    let got: Vec<_> = finish_all(handles).iter().map(bits).collect();
    run.stop();
    assert_eq!(got, want);
}
