//! Planning time and bytes moved for DeepSeek-V3's shape (58 MoE layers x 256 routed experts,
//! 32 redundant slots per layer), going from 32 to 40 devices and back, after a failure, and for
//! a load-driven rebalance.
//!
//! Run: `cargo bench -p expert-placement`. No criterion: each case is timed with
//! `std::time::Instant` over several repetitions and the median is reported.

use std::hint::black_box;
use std::time::{Duration, Instant};

use expert_placement::{
    DeviceId, ExpertLoad, MemoryBudgets, MigrationPlan, Placement, PlacementShape, RebalanceConfig,
};

const LAYERS: usize = 58;
const EXPERTS: usize = 256;
const REDUNDANT: usize = 32;
/// One DeepSeek-V3 routed expert in FP8: gate, up and down projections of 7168 x 2048 (block
/// scales left out).
const EXPERT_BYTES: u64 = 3 * 7168 * 2048;
const REPS: usize = 21;
const GIB: f64 = (1u64 << 30) as f64;

fn devices(ids: impl IntoIterator<Item = u32>) -> Vec<DeviceId> {
    ids.into_iter().map(DeviceId).collect()
}

fn median<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(REPS);
    let mut last = None;
    for _ in 0..REPS {
        let start = Instant::now();
        let out = black_box(f());
        times.push(start.elapsed());
        last = Some(out);
    }
    times.sort();
    (times[REPS / 2], last.expect("REPS > 0"))
}

/// The fewest copies any balanced target on `new` needs from `old` when every old device can
/// send: per layer, the target's slots minus the most the surviving devices can keep, where the
/// surviving devices take the larger slot counts when they hold enough to fill them.
fn lower_bound_copies(old: &Placement, new_devices: &[DeviceId]) -> usize {
    let m = new_devices.len();
    let total = old.slots_per_layer().min(EXPERTS * m);
    let (q, rem) = (total / m, total % m);
    (0..old.layers())
        .map(|layer| {
            let mut held: Vec<usize> = new_devices
                .iter()
                .map(|&d| old.slots(layer, d).len())
                .collect();
            held.sort_unstable_by(|a, b| b.cmp(a));
            let keepable: usize = held
                .iter()
                .enumerate()
                .map(|(i, &h)| h.min(q + usize::from(i < rem)))
                .sum();
            total - keepable
        })
        .sum()
}

/// A skewed load: Zipf-like over a per-layer shuffled expert order.
fn skewed_load() -> ExpertLoad {
    let rows = (0..LAYERS)
        .map(|layer| {
            (0..EXPERTS)
                .map(|e| {
                    let rank = (e * 97 + layer * 31) % EXPERTS;
                    (1_000_000.0 / (rank as f64 + 1.0).powf(0.8)) as u64
                })
                .collect()
        })
        .collect();
    ExpertLoad::from_rows(rows).expect("non-empty table")
}

struct Case {
    name: &'static str,
    plan: Duration,
    target: Duration,
    plan_result: MigrationPlan,
    lower_bound: Option<usize>,
}

fn report(case: &Case) {
    let p = &case.plan_result;
    let moved = p.bytes_moved() as f64 / GIB;
    let peak = p
        .peak_bytes_per_device()
        .values()
        .copied()
        .max()
        .unwrap_or(0) as f64
        / GIB;
    let bound = case.lower_bound.map_or_else(
        || "-".to_string(),
        |lb| format!("{lb} ({:.1} GiB)", (lb as u64 * EXPERT_BYTES) as f64 / GIB),
    );
    println!(
        "| {} | {:.2} | {:.2} | {:.2} | {} ({moved:.1} GiB) | {bound} | {} | {} | {peak:.1} |",
        case.name,
        case.target.as_secs_f64() * 1e3,
        case.plan.as_secs_f64() * 1e3,
        (case.target + case.plan).as_secs_f64() * 1e3,
        p.moves(),
        p.reloads(),
        p.staged_copies(),
    );
}

fn main() {
    let shape = PlacementShape::new(LAYERS, EXPERTS, REDUNDANT);
    let d32 = devices(0..32);
    let d40 = devices(0..40);
    let uniform = ExpertLoad::uniform(LAYERS, EXPERTS).expect("non-empty");
    let ample = MemoryBudgets::uniform(d40.iter().copied(), 40 << 30);
    let mut cases = Vec::new();

    // Scale-up 32 -> 40, balanced to balanced.
    let old = Placement::balanced(&shape, &d32).expect("valid shape");
    let (target, new) = median(|| Placement::rebalanced_for(&old, &d40, &uniform).expect("target"));
    let (plan, plan_result) =
        median(|| MigrationPlan::between(&old, &new, EXPERT_BYTES, &ample).expect("plan"));
    plan_result
        .validate(&old, &new, &ample)
        .expect("the plan replays cleanly");
    cases.push(Case {
        name: "scale-up 32 -> 40",
        plan,
        target,
        plan_result,
        lower_bound: Some(lower_bound_copies(&old, &d40)),
    });

    // Same, with every budget exactly max(old, new) bytes: no slack at all.
    let slots =
        |p: &Placement, d: DeviceId| (0..LAYERS).map(|l| p.slots(l, d).len()).sum::<usize>() as u64;
    let tight: MemoryBudgets = d40
        .iter()
        .map(|&d| (d, slots(&old, d).max(slots(&new, d)) * EXPERT_BYTES))
        .collect();
    let (plan, plan_result) =
        median(|| MigrationPlan::between(&old, &new, EXPERT_BYTES, &tight).expect("plan"));
    plan_result
        .validate(&old, &new, &tight)
        .expect("the plan replays cleanly");
    cases.push(Case {
        name: "scale-up 32 -> 40, tight budgets",
        plan,
        target,
        plan_result,
        lower_bound: Some(lower_bound_copies(&old, &d40)),
    });

    // Scale-down 40 -> 32.
    let old = Placement::balanced(&shape, &d40).expect("valid shape");
    let (target, new) = median(|| Placement::rebalanced_for(&old, &d32, &uniform).expect("target"));
    let (plan, plan_result) =
        median(|| MigrationPlan::between(&old, &new, EXPERT_BYTES, &ample).expect("plan"));
    plan_result
        .validate(&old, &new, &ample)
        .expect("the plan replays cleanly");
    cases.push(Case {
        name: "scale-down 40 -> 32",
        plan,
        target,
        plan_result,
        lower_bound: Some(lower_bound_copies(&old, &d32)),
    });

    // Failure: 4 of 40 devices vanish: 8 and 9 hold experts with no replica (lost: reloaded),
    // 38 and 39 hold replicas (re-created peer-to-peer).
    let failed = devices([8, 9, 38, 39]);
    let alive: Vec<DeviceId> = d40
        .iter()
        .copied()
        .filter(|d| !failed.contains(d))
        .collect();
    let (target, new) =
        median(|| Placement::rebalanced_for(&old, &alive, &uniform).expect("target"));
    let (plan, plan_result) = median(|| {
        MigrationPlan::between_after_failure(&old, &new, &failed, EXPERT_BYTES, &ample)
            .expect("plan")
    });
    plan_result
        .validate(&old, &new, &ample)
        .expect("the plan replays cleanly");
    cases.push(Case {
        name: "failure of 4 of 40",
        plan,
        target,
        plan_result,
        lower_bound: None,
    });

    // Rebalance on 32 devices for a skewed load, with 16 extra copies per layer allowed.
    let load = skewed_load();
    let old = Placement::balanced(&shape, &d32).expect("valid shape");
    let config = RebalanceConfig {
        extra_moves_per_layer: 16,
        ..RebalanceConfig::default()
    };
    let (target, new) =
        median(|| Placement::rebalanced_for_with(&old, &d32, &load, &config).expect("target"));
    let (plan, plan_result) =
        median(|| MigrationPlan::between(&old, &new, EXPERT_BYTES, &ample).expect("plan"));
    plan_result
        .validate(&old, &new, &ample)
        .expect("the plan replays cleanly");
    let (before, after) = (
        old.imbalance(&load).expect("shape"),
        new.imbalance(&load).expect("shape"),
    );
    let (aware_time, aware) =
        median(|| Placement::load_aware(&shape, &d32, &load, None).expect("load-aware"));
    let fresh = aware.imbalance(&load).expect("shape");
    cases.push(Case {
        name: "rebalance 32, skewed load, +16/layer",
        plan,
        target,
        plan_result,
        lower_bound: None,
    });

    println!("DeepSeek-V3 shape: {LAYERS} layers x {EXPERTS} experts, {REDUNDANT} redundant slots/layer, {EXPERT_BYTES} bytes/expert; median of {REPS} runs");
    println!();
    println!("| case | target (ms) | plan (ms) | total (ms) | copies moved | lower bound | reloads | staged | peak/device (GiB) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for case in &cases {
        report(case);
    }
    println!();
    println!(
        "skewed load imbalance (max/mean device load): balanced {before:.3}, rebalanced with 16 extra copies/layer {after:.3}, fresh load_aware {fresh:.3} (built in {:.2} ms, would move {} copies)",
        aware_time.as_secs_f64() * 1e3,
        old.copies_needed(&aware),
    );
}
