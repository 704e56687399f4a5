//! GPU elastic scaling of a live CUDA runner inside the engine (feature `cuda`; run through
//! `cargo xtask hil`). The scenarios need up to 3 devices; on a machine with fewer GPUs they run
//! on logical ranks (several ranks on one GPU, `GpuMap::for_ranks`) with the same assertions.
//! Without a GPU the test prints SKIPPED, and fails when `HIL_REQUIRE_GPUS` is set.
//!
//! Each scenario serves the same greedy requests as a reference engine that never scales, and
//! performs its transition between two iterations (the engine is stepped on this thread, so the
//! switch lands at the same iteration every run). Every request's tokens must equal the
//! reference's: no request is lost, paused for good or recomputed differently.
//! - elastic 1→2: the joining GPU gets its replicated weights and half the experts by peer
//!   copies; kept experts are remapped zero-copy; requests admitted after the switch run on
//!   the new rank.
//! - elastic 2→1: the leaving GPU's experts move first; its running sequences move to GPU 0
//!   with their KV blocks (migrated, none re-queued).
//! - colocated 1→1 and 2→1: a second runner loaded beside the first; running sequences' KV
//!   moves into it at the switch.
//! - cold restart 1→1: everything released and reloaded; running sequences recompute.
//! - elastic 1→2→1 from kept snapshots: the second step prepares from the snapshot the first
//!   switch took inside its boundary action (as `CudaScaler` does, no boundary wait), the 1→2
//!   with its expert chunks created ahead in the warm pool, the 2→1 staged (ranges mapped)
//!   before an iteration and filled after it; a configuration prepared from a snapshot taken
//!   before both switches is refused at install and changes nothing.
//! - extravagant 1→2 (needs 3 GPUs): a new instance on GPUs 1 and 2 beside GPU 0, every weight
//!   byte copied peer-to-peer from the running one, every running sequence's KV migrated into
//!   it at the switch; GPU 0's memory is released afterwards. Once stepped here, and once
//!   through `CudaScaler::extravagant` under a steady load on the engine's own run loop in the
//!   batch-invariant mode (the switch lands at any iteration; every request must still equal
//!   the never-scaled run). Overlapping and too-large target sets are refused with typed errors.
//!
//! Precision is [`Precision::F32`] (pedantic f32 GEMMs), so a changed batch composition after a
//! switch cannot flip a greedy token through bf16 rounding (the run-loop extravagant check uses
//! the batch-invariant mode instead, where no composition changes a token).

#![cfg(feature = "cuda")]

mod gpu_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hbm_vmm::DeviceId;
use moe_cuda::{
    self as cuda, CudaConfig, CudaError, CudaRunner, CudaScaler, CudaWarmPool, DeviceSetError,
    GpuMap, Precision, Snapshot,
};
use moe_engine::{
    Engine, EngineConfig, Event, FinishReason, Request, RequestHandle, SchedulerConfig,
};
use moe_host::compute::cpu::CpuCompute;
use moe_host::model::Model;
use moe_model::config::ModelConfig;
use moe_model::presets::Preset;
use moe_model::weights::MemTensors;

const KV_BLOCKS: usize = 256;

/// The most devices a scenario uses (the extravagant 1->2 beside the running one).
const MACHINE_DEVICES: usize = 3;

/// The machine every scenario runs on, set by the test that starts first.
static MACHINE: OnceLock<GpuMap> = OnceLock::new();

/// The machine's device count, or `None` (after printing SKIPPED) without a GPU.
fn machine(test: &str) -> Option<usize> {
    let map = gpu_support::machine(test, MACHINE_DEVICES)?;
    let map = *MACHINE.get_or_init(|| map);
    Some(
        map.vmm()
            .expect("the machine's memory manager")
            .device_count(),
    )
}

fn config(devices: usize) -> CudaConfig {
    CudaConfig {
        devices,
        gpus: *MACHINE.get().expect("machine() runs first"),
        block_tokens: 16,
        kv_blocks_per_rank: KV_BLOCKS,
        max_batch_tokens: 128,
        max_context: 256,
        precision: Precision::F32,
        batch_invariant: false,
    }
}

fn engine(cfg: &ModelConfig, src: &MemTensors, devices: usize) -> Engine<CudaRunner> {
    let runner = CudaRunner::load(cfg, src, config(devices)).expect("loading the runner");
    Engine::new(
        runner,
        EngineConfig {
            scheduler: SchedulerConfig {
                max_batch_tokens: 128,
                max_running_per_rank: 16,
            },
            ..EngineConfig::default()
        },
    )
}

fn prompts(vocab: u32, n: usize, salt: u32) -> Vec<Vec<u32>> {
    let mut seed = 977u32 ^ salt;
    (0..n)
        .map(|i| {
            (0..3 + (i * 7) % 19)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 8) % vocab
                })
                .collect()
        })
        .collect()
}

/// Serves `first` from the start and `second` from iteration `at`, calling `switch` at that
/// iteration (before `second` is submitted). Returns every request's tokens.
fn serve(
    e: &Engine<CudaRunner>,
    first: &[Vec<u32>],
    second: &[Vec<u32>],
    at: usize,
    mut switch: impl FnMut(&Engine<CudaRunner>),
) -> Vec<Vec<u32>> {
    let mut handles: Vec<RequestHandle> = first
        .iter()
        .map(|p| e.submit(Request::greedy(p.clone(), 24)).unwrap())
        .collect();
    for _ in 0..at {
        e.step().expect("iteration");
    }
    switch(e);
    handles.extend(
        second
            .iter()
            .map(|p| e.submit(Request::greedy(p.clone(), 24)).unwrap()),
    );
    e.run_until_idle(10_000).expect("iterations");
    assert!(e.is_idle());
    handles.into_iter().map(|h| h.wait().tokens).collect()
}

fn check(name: &str, got: &[Vec<u32>], want: &[Vec<u32>]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), 24, "{name}: request {i} did not complete");
        assert_eq!(
            g, w,
            "{name}: request {i} differs from the never-scaled run"
        );
    }
    println!("{name}: {} requests equal to the reference", got.len());
}

fn elastic(
    e: &Engine<CudaRunner>,
    to: usize,
    pool: &mut CudaWarmPool,
) -> (cuda::PrepareReport, cuda::SwitchReport) {
    let (p, sw, _) = elastic_from(e, to, pool, None);
    (p, sw)
}

/// An elastic step from `snap` (or a snapshot taken now); returns the snapshot taken inside
/// the switch's boundary action, right after the install.
fn elastic_from(
    e: &Engine<CudaRunner>,
    to: usize,
    pool: &mut CudaWarmPool,
    snap: Option<Snapshot>,
) -> (cuda::PrepareReport, cuda::SwitchReport, Snapshot) {
    let bp = e.with_runner(CudaRunner::blueprint);
    let transport = bp.transport().unwrap();
    let snap = snap.unwrap_or_else(|| e.with_runner(CudaRunner::snapshot));
    let prepared = bp
        .prepare(snap, &cuda::first_devices(to), pool, &transport)
        .expect("prepare");
    let report = prepared.report.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    e.at_boundary(move |r, s| {
        let _ = tx.send(r.install(prepared, s).map(|x| (x, r.snapshot())));
    });
    e.step().expect("the switch iteration");
    let ((sw, retired), kept) = rx.recv().unwrap().expect("install");
    retired.release();
    assert_eq!(e.with_runner(|r| r.rank_count()), to);
    assert!(e.with_runner(|r| kept.describes(r)));
    (report, sw, kept)
}

#[test]
fn gpu_elastic_scaling_keeps_outputs_identical() {
    let Some(n) = machine("gpu_elastic_scaling_keeps_outputs_identical") else {
        return;
    };
    assert!(n >= 2, "the machine has {n} devices");
    for preset in [Preset::TinyQwen3, Preset::TinyDeepseek] {
        let cfg = preset.config();
        let src = MemTensors::seeded(&cfg, 21);
        let vocab = cfg.vocab_size as u32;
        let first = prompts(vocab, 10, 1);
        let second = prompts(vocab, 6, 2);
        let reference = serve(&engine(&cfg, &src, 1), &first, &second, 6, |_| {});
        let name = preset.name();

        // Colocated 1→1: a second runner beside the first, KV moved into it.
        let e = engine(&cfg, &src, 1);
        let src_arc = Arc::new(src.clone());
        let got = serve(&e, &first, &second, 6, |e| {
            let bp = e.with_runner(CudaRunner::blueprint);
            let transport = bp.transport().unwrap();
            let next = bp.load_runner(src_arc.as_ref(), 1, KV_BLOCKS).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            e.at_boundary(move |r, s| {
                let _ = tx.send(r.install_runner(next, &transport, s));
            });
            e.step().unwrap();
            let (sw, retired) = rx.recv().unwrap().expect("install_runner");
            retired.release();
            assert!(sw.migrated > 0 && sw.kv_bytes > 0, "{sw:?}");
            assert_eq!(sw.requeued, 0);
        });
        check(&format!("{name} colocated 1->1"), &got, &reference);

        // Cold restart 1→1: running sequences recompute after the reload.
        let e = engine(&cfg, &src, 1);
        let got = serve(&e, &first, &second, 6, |e| {
            let (tx, rx) = std::sync::mpsc::channel();
            let s2 = Arc::clone(&src_arc);
            e.at_boundary(move |r, s| {
                let _ = tx.send(r.restart_from(s2.as_ref(), 1, s));
            });
            e.step().unwrap();
            let requeued = rx.recv().unwrap().expect("restart");
            assert!(requeued > 0);
        });
        check(&format!("{name} cold restart 1->1"), &got, &reference);

        // Elastic 1→2 with a warm rank, then 2→1.
        let e = engine(&cfg, &src, 1);
        let mut pool = CudaWarmPool::new();
        let bp = e.with_runner(CudaRunner::blueprint);
        pool.prewarm(&bp, &cuda::first_devices(2)[1..]).unwrap();
        let got = serve(&e, &first, &second, 6, |e| {
            let (p, sw) = elastic(e, 2, &mut pool);
            println!("{name} elastic 1->2: {p:?} {sw:?}");
            assert_eq!(p.warm_hits, 1);
            assert!(p.bytes_moved > 0 && p.bytes_zero_copy > 0);
            assert_eq!(sw.requeued, 0);
        });
        check(&format!("{name} elastic 1->2"), &got, &reference);
        let l = cfg.moe_layers().next().unwrap();
        assert_eq!(
            e.with_runner(|r| r.expert_device(l, cfg.moe.num_experts - 1)),
            Some(cuda::first_devices(2)[1])
        );

        // Elastic 1→2→1 from kept snapshots, then a stale snapshot refused.
        let e = engine(&cfg, &src, 1);
        let mut pool = CudaWarmPool::new();
        let got = serve(&e, &first, &second, 6, |e| {
            let before = e.with_runner(CudaRunner::snapshot);
            let bp = e.with_runner(CudaRunner::blueprint);
            let transport = bp.transport().unwrap();
            // Prepared now (its source addresses are mapped), installed after two switches.
            let stale = bp
                .prepare(
                    before.clone(),
                    &cuda::first_devices(2),
                    &mut CudaWarmPool::new(),
                    &transport,
                )
                .expect("prepare");
            pool.prewarm_experts(&bp, &before, &cuda::first_devices(2))
                .unwrap();
            let ahead = pool.expert_chunks();
            assert!(ahead > 0, "a 1->2 step moves experts to GPU 1");
            let (p, _, kept) = elastic_from(e, 2, &mut pool, None);
            assert_eq!(p.prewarmed_chunks, ahead);
            assert_eq!(pool.expert_chunks(), 0);
            e.step().expect("serving between the steps");
            assert!(e.with_runner(|r| kept.describes(r)), "no switch since");
            // 2→1 staged ahead from the kept snapshot, serving between staging and filling.
            let staged = bp
                .stage(kept, &cuda::first_devices(1), &mut pool)
                .expect("stage");
            e.step().expect("serving while staged");
            let prepared = cuda::Blueprint::fill(staged, &transport).expect("fill");
            assert!(prepared.report.bytes_moved > 0);
            let (tx, rx) = std::sync::mpsc::channel();
            e.at_boundary(move |r, s| {
                let _ = tx.send(r.install(prepared, s));
            });
            e.step().expect("the switch iteration");
            let (sw, retired) = rx.recv().unwrap().expect("install");
            retired.release();
            assert_eq!(sw.requeued, 0);
            assert_eq!(e.with_runner(|r| r.rank_count()), 1);
            assert!(!e.with_runner(|r| before.describes(r)));
            let (tx, rx) = std::sync::mpsc::channel();
            e.at_boundary(move |r, s| {
                let _ = tx.send(r.install(stale, s).map(|_| ()));
            });
            e.step().unwrap();
            let err = rx.recv().unwrap().expect_err("a stale snapshot is refused");
            assert!(err.to_string().contains("stale"), "{err}");
            assert_eq!(e.with_runner(|r| r.rank_count()), 1);
        });
        check(
            &format!("{name} elastic 1->2->1 kept snapshots"),
            &got,
            &reference,
        );

        let e = engine(&cfg, &src, 2);
        let got = serve(&e, &first, &second, 6, |e| {
            let (p, sw) = elastic(e, 1, &mut CudaWarmPool::new());
            println!("{name} elastic 2->1: {p:?} {sw:?}");
            assert!(sw.migrated > 0 && sw.kv_bytes > 0, "{sw:?}");
            assert_eq!(sw.requeued, 0);
            assert!(p.bytes_moved > 0);
        });
        check(&format!("{name} elastic 2->1"), &got, &reference);

        // Colocated 2→1 across GPUs.
        let e = engine(&cfg, &src, 2);
        let got = serve(&e, &first, &second, 6, |e| {
            let bp = e.with_runner(CudaRunner::blueprint);
            let transport = bp.transport().unwrap();
            let next = bp.load_runner(src_arc.as_ref(), 1, KV_BLOCKS).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            e.at_boundary(move |r, s| {
                let _ = tx.send(r.install_runner(next, &transport, s));
            });
            e.step().unwrap();
            let (sw, retired) = rx.recv().unwrap().expect("install_runner");
            retired.release();
            assert!(sw.migrated > 0, "{sw:?}");
        });
        check(&format!("{name} colocated 2->1"), &got, &reference);
    }
}

/// Weight bytes of `cfg` at `es` bytes per element: (replicated per rank, every routed expert).
fn weight_bytes(cfg: &ModelConfig, es: usize) -> (u64, u64) {
    let model = Model::new(cfg, CpuCompute::new()).unwrap();
    let layout = model.layout();
    let replicated = layout.global().floats()
        + (0..cfg.num_layers)
            .map(|l| layout.layer(l).map_or(0, |c| c.floats()))
            .sum::<usize>();
    let experts = layout.expert_floats() * cfg.moe.num_experts * cfg.num_moe_layers();
    ((replicated * es) as u64, (experts * es) as u64)
}

fn bi_engine(cfg: &ModelConfig, src: &MemTensors, devices: usize) -> Engine<CudaRunner> {
    let config = CudaConfig {
        precision: Precision::Bf16,
        batch_invariant: true,
        ..config(devices)
    };
    let runner = CudaRunner::load(cfg, src, config).expect("loading the batch-invariant runner");
    Engine::new(
        runner,
        EngineConfig {
            scheduler: SchedulerConfig {
                max_batch_tokens: 128,
                max_running_per_rank: 16,
            },
            idle_wait: Duration::from_millis(1),
            ..EngineConfig::default()
        },
    )
}

/// A request the load finished: its tokens and why it ended.
struct Done {
    tokens: Vec<u32>,
    finish: FinishReason,
}

/// Keeps `in_flight` requests (prompts `prompts(vocab, ..)` in order, `max_tokens` each) in
/// flight on `e` until `stop` is set; returns every request's prompt index and completion. It
/// reads each request's stream as it goes (a handle only knows it has finished once its finish
/// event has been received).
fn load(
    e: Engine<CudaRunner>,
    all: Vec<Vec<u32>>,
    in_flight: usize,
    max_tokens: usize,
    stop: Arc<AtomicBool>,
) -> Vec<(usize, Done)> {
    let mut live: Vec<(usize, RequestHandle, Vec<u32>)> = Vec::new();
    let mut done = Vec::new();
    let mut next = 0;
    while !stop.load(Ordering::Acquire) && next < all.len() {
        let mut i = 0;
        while i < live.len() {
            let mut finish = None;
            while let Some(ev) = live[i].1.try_recv() {
                match ev {
                    Event::Token(t) => live[i].2.push(t.token),
                    Event::Finished { reason, .. } => {
                        finish = Some(reason);
                        break;
                    }
                }
            }
            match finish {
                Some(finish) => {
                    let (index, _, tokens) = live.swap_remove(i);
                    done.push((index, Done { tokens, finish }));
                }
                None => i += 1,
            }
        }
        while live.len() < in_flight && next < all.len() {
            let h = e
                .submit(Request::greedy(all[next].clone(), max_tokens))
                .expect("submit");
            live.push((next, h, Vec::new()));
            next += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for (index, h, mut tokens) in live {
        let rest = h.wait();
        tokens.extend(rest.tokens);
        done.push((
            index,
            Done {
                tokens,
                finish: rest.finish,
            },
        ));
    }
    done
}

#[test]
fn gpu_extravagant_scaling_moves_to_a_disjoint_set() {
    // The extravagant 1->2 step needs 3 devices (0 serving, a new instance on 1 and 2): logical
    // ranks where the machine has fewer GPUs.
    let Some(n) = machine("gpu_extravagant_scaling_moves_to_a_disjoint_set") else {
        return;
    };
    assert!(n >= 3, "the machine has {n} devices");
    let new_set = [DeviceId(1), DeviceId(2)];
    for preset in [Preset::TinyQwen3, Preset::TinyDeepseek] {
        let cfg = preset.config();
        let name = preset.name();
        let src = MemTensors::seeded(&cfg, 21);
        let vocab = cfg.vocab_size as u32;
        let first = prompts(vocab, 10, 1);
        let second = prompts(vocab, 6, 2);
        let reference = serve(&engine(&cfg, &src, 1), &first, &second, 6, |_| {});

        // Stepped: the new instance copied from a snapshot, switched in at iteration 6.
        let e = engine(&cfg, &src, 1);
        let got = serve(&e, &first, &second, 6, |e| {
            let bp = e.with_runner(CudaRunner::blueprint);
            let transport = bp.transport().unwrap();
            let snap = e.with_runner(CudaRunner::snapshot);
            let err = bp
                .copy_runner(&snap, &cuda::first_devices(2), KV_BLOCKS, &transport)
                .expect_err("a target sharing GPU 0 is refused");
            assert!(
                matches!(
                    err,
                    CudaError::DeviceSet(DeviceSetError::Overlap { device: 0, .. })
                ),
                "{err}"
            );
            let target = cuda::disjoint_devices(snap.devices(), 2, n).unwrap();
            assert_eq!(target, new_set);
            let (next, p) = bp
                .copy_runner(&snap, &target, KV_BLOCKS, &transport)
                .expect("copy_runner");
            println!("{name} extravagant 1->2 copy: {p:?}");
            assert_eq!(next.devices(), new_set);
            // Every weight byte copied: the replicated weights onto both GPUs, every expert
            // once; nothing zero-copy.
            let (replicated, experts) = weight_bytes(&cfg, 4);
            assert_eq!(p.bytes_moved, 2 * replicated + experts);
            assert_eq!(p.bytes_zero_copy, 0);
            assert!(p.max_bytes_into_device >= replicated + experts / 2);
            drop(snap);
            let (tx, rx) = std::sync::mpsc::channel();
            e.at_boundary(move |r, s| {
                let _ = tx.send(r.install_runner(next, &transport, s));
            });
            e.step().unwrap();
            let (sw, retired) = rx.recv().unwrap().expect("install_runner");
            retired.release();
            println!("{name} extravagant 1->2 switch: {sw:?}");
            assert!(sw.migrated > 0 && sw.kv_bytes > 0, "{sw:?}");
            assert_eq!(sw.requeued, 0);
            assert_eq!(e.with_runner(CudaRunner::devices), new_set);
            assert_eq!(bp.vmm().usage(DeviceId(0)), 0, "GPU 0 released");
        });
        check(
            &format!("{name} extravagant 1->2 stepped"),
            &got,
            &reference,
        );
        drop(e);

        // Under load on the run loop, through the scaler, batch-invariant.
        let all = prompts(vocab, 5000, 3);
        let e = bi_engine(&cfg, &src, 1);
        let bp = e.with_runner(CudaRunner::blueprint);
        let snap = e.with_runner(CudaRunner::snapshot);
        let mut scaler = CudaScaler::new(e.clone(), bp).unwrap();
        scaler.adopt_snapshot(snap);
        let run = e.start();
        let stop = Arc::new(AtomicBool::new(false));
        let loader = {
            let (e, all, stop) = (e.clone(), all.clone(), Arc::clone(&stop));
            std::thread::spawn(move || load(e, all, 12, 24, stop))
        };
        let t = Instant::now();
        while e.metrics().generated_tokens < 100 && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let m = e.metrics();
        assert!(
            m.generated_tokens >= 100 && m.running > 0,
            "the load is not running: {m:?}"
        );
        let o = scaler.extravagant(2).expect("extravagant 1->2");
        println!("{name} extravagant 1->2 under load: {o:?}");
        // Requests admitted after the switch run on the new instance.
        let after = e.metrics().generated_tokens;
        while e.metrics().generated_tokens < after + 100 && t.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(2));
        }
        // Too many GPUs asked for: refused, nothing changes.
        let err = scaler
            .extravagant(n)
            .expect_err("a disjoint set of n beside 2 does not fit on n GPUs");
        assert!(
            matches!(
                err,
                CudaError::DeviceSet(DeviceSetError::TooFewGpus { running: 2, .. })
            ),
            "{err}"
        );
        assert!(scaler.has_snapshot());
        stop.store(true, Ordering::Release);
        let mut done = loader.join().unwrap();
        run.stop();
        assert_eq!(e.with_runner(CudaRunner::devices), new_set);
        assert_eq!(e.metrics().last_error, None);
        assert_eq!(o.devices_after, 2);
        assert_eq!(o.requeued, 0, "{o:?}");
        assert!(
            o.kv_migrated > 0,
            "sequences were running at the switch: {o:?}"
        );
        assert_eq!(o.downtime_ms, 0.0);
        assert_eq!(o.bytes_zero_copy, 0);
        let (replicated, experts) = weight_bytes(&cfg, 2);
        assert!(
            o.bytes_moved > 2 * replicated + experts,
            "weights and KV: {o:?}"
        );
        assert!(o.max_bytes_into_device >= replicated + experts / 2);
        for phase in ["start_instance", "copy", "switch", "kv_copy", "retire"] {
            assert!(
                o.phases_ms.iter().any(|(k, _)| *k == phase),
                "{phase}: {o:?}"
            );
        }
        assert!(o.peak_bytes_per_device.len() >= 3);
        assert!(o.peak_bytes_per_device[1] > 0 && o.peak_bytes_per_device[2] > 0);
        let mem = scaler.blueprint().memory_per_device();
        assert_eq!(mem[0].0, 0, "GPU 0's memory released: {mem:?}");
        assert!(mem[1].0 > 0 && mem[2].0 > 0, "{mem:?}");
        drop(scaler);
        drop(e);

        // No request failed, and each equals the never-scaled run's.
        done.sort_by_key(|(i, _)| *i);
        assert!(
            done.len() > 12,
            "the load kept going: {} requests",
            done.len()
        );
        let prompts_done: Vec<Vec<u32>> = done.iter().map(|(i, _)| all[*i].clone()).collect();
        let e = bi_engine(&cfg, &src, 1);
        let handles: Vec<RequestHandle> = prompts_done
            .iter()
            .map(|p| e.submit(Request::greedy(p.clone(), 24)).unwrap())
            .collect();
        e.run_until_idle(100_000).expect("the reference run");
        for ((i, c), h) in done.iter().zip(handles) {
            assert_eq!(c.finish, FinishReason::Length, "{name}: request {i} failed");
            assert_eq!(
                c.tokens,
                h.wait().tokens,
                "{name}: request {i} differs from the never-scaled run"
            );
        }
        println!(
            "{name} extravagant 1->2 under load: {} requests equal to the reference",
            done.len()
        );
    }
}
