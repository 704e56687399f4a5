//! Property tests over random shapes (up to 256 experts, 64 layers, 1-64 devices, 0-32 redundant
//! slots): every constructor's invariants, the migration guarantees (replayed step by step), and
//! bytes moved equal to an independently computed lower bound for scale-up and scale-down.

use expert_placement::{
    max_redundant_slots, DeviceId, ExpertId, ExpertLoad, MemoryBudgets, MigrationPlan,
    MigrationStep, Placement, PlacementError, PlacementShape, PlanError, RebalanceConfig,
};
use proptest::prelude::*;
use proptest::sample::subsequence;

const EB: u64 = 1_000;

/// `cases` by default (so CI stays fast); `PROPTEST_CASES` overrides it for a deeper search.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// SplitMix64, for loads derived from a seed (cheaper to shrink than a 16k-entry vector).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A skewed random load: a few experts carry most tokens, some carry none.
fn random_load(layers: usize, experts: usize, seed: u64) -> ExpertLoad {
    let mut s = seed;
    let rows = (0..layers)
        .map(|_| {
            (0..experts)
                .map(|_| {
                    let r = splitmix(&mut s) % 1000;
                    if r < 50 {
                        0
                    } else {
                        r * r * r / 1000
                    }
                })
                .collect()
        })
        .collect();
    ExpertLoad::from_rows(rows).unwrap()
}

fn devices(ids: impl IntoIterator<Item = u32>) -> Vec<DeviceId> {
    ids.into_iter().map(DeviceId).collect()
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Balanced,
    RoundRobin,
    LoadAware,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Balanced),
        Just(Kind::RoundRobin),
        Just(Kind::LoadAware)
    ]
}

fn build(kind: Kind, shape: &PlacementShape, devs: &[DeviceId], load: &ExpertLoad) -> Placement {
    match kind {
        Kind::Balanced => Placement::balanced(shape, devs),
        Kind::RoundRobin => Placement::round_robin(shape, devs),
        Kind::LoadAware => Placement::load_aware(shape, devs, load, None),
    }
    .unwrap()
}

/// Caps the redundant slots at what fits, checking that asking for more is a typed error.
fn fitting_shape(layers: usize, experts: usize, redundant: usize, n: usize) -> PlacementShape {
    let max = max_redundant_slots(experts, n);
    let shape = PlacementShape::new(layers, experts, redundant);
    if redundant > max {
        let err = Placement::balanced(&shape, &devices(0..n as u32)).unwrap_err();
        assert_eq!(
            err,
            PlacementError::TooManyRedundantSlots {
                requested: redundant,
                max,
                devices: n,
                experts
            }
        );
    }
    PlacementShape::new(layers, experts, redundant.min(max))
}

fn slots_on(p: &Placement, d: DeviceId) -> u64 {
    (0..p.layers()).map(|l| p.slots(l, d).len() as u64).sum()
}

/// Budgets of `max(old, new)` slots plus `slack` spare slots for every device.
fn budgets_with_slack(
    old: &Placement,
    new: &Placement,
    slack: impl Fn(DeviceId) -> u64,
) -> MemoryBudgets {
    old.devices()
        .iter()
        .chain(new.devices())
        .map(|&d| (d, (slots_on(old, d).max(slots_on(new, d)) + slack(d)) * EB))
        .collect()
}

/// The fewest copies any balanced target over `new_devices` with `total` slots per layer needs
/// from `old`: per layer, `total` minus the most the surviving devices can keep, with the larger
/// slot counts going to the survivors that hold the most.
fn lower_bound_general(old: &Placement, new_devices: &[DeviceId], total: usize) -> usize {
    let m = new_devices.len();
    let (q, rem) = (total / m, total % m);
    (0..old.layers())
        .map(|layer| {
            let mut held: Vec<usize> = new_devices
                .iter()
                .map(|&d| old.slots(layer, d).len())
                .collect();
            held.sort_unstable_by(|a, b| b.cmp(a));
            let keep: usize = held
                .iter()
                .enumerate()
                .map(|(i, &h)| h.min(q + usize::from(i < rem)))
                .sum();
            total - keep
        })
        .sum()
}

fn counts_within_one(p: &Placement) -> bool {
    (0..p.layers()).all(|l| {
        let counts: Vec<usize> = p.devices().iter().map(|&d| p.slots(l, d).len()).collect();
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1
    })
}

/// Checks accessors against each other.
fn accessors_agree(p: &Placement) {
    for layer in 0..p.layers() {
        let mut total = 0;
        for &d in p.devices() {
            for (i, &x) in p.slots(layer, d).iter().enumerate() {
                assert_eq!(p.slot_of(layer, d, x), Some(i));
                assert!(p.holds(layer, d, x));
                assert!(p.holders(layer, x).any(|h| h == d));
                total += 1;
            }
        }
        let copies: usize = (0..p.experts_per_layer())
            .map(|x| p.copies(layer, ExpertId(x as u32)))
            .sum();
        assert_eq!(copies, total);
        assert_eq!(total, p.slots_per_layer());
        for x in 0..p.experts_per_layer() as u32 {
            let holders: Vec<DeviceId> = p.holders(layer, ExpertId(x)).collect();
            for hash in [0, 1, 0xdead_beef, u64::MAX] {
                let d = p.replica_for(layer, ExpertId(x), hash).unwrap();
                assert!(holders.contains(&d));
            }
        }
    }
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn constructors_uphold_their_invariants(
        layers in 1usize..=64,
        experts in 1usize..=256,
        n in 1usize..=64,
        redundant in 0usize..=32,
        kind in kind(),
        seed in any::<u64>(),
    ) {
        let shape = fitting_shape(layers, experts, redundant, n);
        let devs = devices((0..n as u32).map(|d| d * 3 + 1));
        let load = random_load(layers, experts, seed);
        let p = build(kind, &shape, &devs, &load);
        p.check_invariants().unwrap();
        prop_assert_eq!(p.shape(), shape);
        prop_assert_eq!(p.devices(), devs.as_slice());
        accessors_agree(&p);
        match kind {
            Kind::Balanced | Kind::RoundRobin => prop_assert!(counts_within_one(&p)),
            Kind::LoadAware => {
                let cap = shape.slots_per_layer().div_ceil(n);
                prop_assert!(p.max_slots_per_device() <= cap);
                // Replicas follow load (D'Hondt): an expert with c >= 2 copies got its last one
                // because its load per copy beat every expert that could still take one.
                for layer in 0..layers {
                    let row = load.row(layer);
                    for a in 0..experts {
                        let ca = p.copies(layer, ExpertId(a as u32)) as u128;
                        if ca < 2 {
                            continue;
                        }
                        for b in 0..experts {
                            let cb = p.copies(layer, ExpertId(b as u32)) as u128;
                            if a != b && (cb as usize) < n {
                                prop_assert!(
                                    u128::from(row[a]) * cb >= u128::from(row[b]) * (ca - 1),
                                    "layer {}: expert {} has {} copies ({} tokens) but expert {} has {} ({} tokens)",
                                    layer, a, ca, row[a], b, cb, row[b]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn scale_up_and_down_move_exactly_the_lower_bound(
        layers in 1usize..=64,
        experts in 1usize..=256,
        n in 1usize..=64,
        redundant in 0usize..=32,
        grow in any::<bool>(),
        k in 1usize..=16,
        pick in any::<u64>(),
    ) {
        let shape = fitting_shape(layers, experts, redundant, n);
        let old_devs = devices(0..n as u32);
        let old = Placement::balanced(&shape, &old_devs).unwrap();
        let (new_devs, removed) = if grow || n == 1 {
            (devices(0..(n + k) as u32), Vec::new())
        } else {
            // Remove k random devices (at least one stays).
            let k = k.min(n - 1);
            let mut s = pick;
            let mut ids: Vec<u32> = (0..n as u32).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, (splitmix(&mut s) % (i as u64 + 1)) as usize);
            }
            let removed = devices(ids[..k].iter().copied());
            let mut stay = ids[k..].to_vec();
            stay.sort_unstable();
            (devices(stay), removed)
        };
        let load = ExpertLoad::uniform(layers, experts).unwrap();
        let new = Placement::rebalanced_for(&old, &new_devs, &load).unwrap();
        prop_assert_eq!(&new, &Placement::rebalanced_for(&old, &new_devs, &load).unwrap(), "deterministic");
        new.check_invariants().unwrap();
        prop_assert!(counts_within_one(&new));
        let m = new_devs.len();
        let total = shape.slots_per_layer().min(experts * m);
        prop_assert_eq!(new.slots_per_layer(), total);

        let budgets = budgets_with_slack(&old, &new, |_| 0);
        let plan = MigrationPlan::between(&old, &new, EB, &budgets).unwrap();
        let report = plan.validate(&old, &new, &budgets).unwrap();
        prop_assert!(report.min_live_copies >= 1);
        prop_assert_eq!(plan.staged_copies(), 0);
        prop_assert_eq!(plan.reloads(), 0);
        prop_assert!(plan.drops_deferred() || !grow);

        // The lower bound, computed two ways: in general, and as the issue states it.
        let bound = lower_bound_general(&old, &new_devs, total);
        prop_assert_eq!(plan.bytes_moved(), bound as u64 * EB);
        prop_assert_eq!(old.copies_needed(&new), bound);
        let s = shape.slots_per_layer();
        if grow || n == 1 {
            // The fewest copies that must land on the k newcomers: q each, plus the extra slots
            // that the survivors cannot take because they hold too few.
            let (q, rem) = (s / m, s % m);
            let per_layer: Vec<usize> = (0..layers)
                .map(|l| {
                    let able = old_devs.iter().filter(|&&d| old.slots(l, d).len() > q).count();
                    (m - n) * q + rem.saturating_sub(able)
                })
                .collect();
            prop_assert_eq!(bound, per_layer.iter().sum::<usize>());
        } else if total == s {
            // Scale-down without lowering the redundancy: exactly what the leaving devices held.
            let held: u64 = removed.iter().map(|&d| slots_on(&old, d)).sum();
            prop_assert_eq!(bound as u64, held);
            // ...and those copies move out before anything else.
            let only_on_leaving = |layer: usize, x: ExpertId| old.holders(layer, x).all(|d| removed.contains(&d));
            let evacuations: Vec<bool> = plan
                .steps()
                .iter()
                .filter_map(|s| match *s {
                    MigrationStep::Move { layer, expert, .. } => Some(only_on_leaving(layer, expert)),
                    _ => None,
                })
                .collect();
            let first_other = evacuations.iter().position(|&e| !e).unwrap_or(evacuations.len());
            let in_order = evacuations[first_other..].iter().all(|&e| !e);
            prop_assert!(in_order, "a copy off the leaving devices comes after another copy");
        }
    }

    #[test]
    fn any_migration_keeps_every_expert_live_and_every_device_in_budget(
        layers in 1usize..=16,
        experts in 1usize..=64,
        old_set in subsequence((0u32..24).collect::<Vec<_>>(), 1..=24),
        new_set in subsequence((0u32..24).collect::<Vec<_>>(), 1..=24),
        r_old in 0usize..=32,
        r_new in 0usize..=32,
        kinds in (kind(), kind()),
        slack in proptest::collection::vec(0u64..=2, 24),
        seed in any::<u64>(),
    ) {
        let old_devs = devices(old_set);
        let new_devs = devices(new_set);
        let load = random_load(layers, experts, seed);
        let old_shape = PlacementShape::new(layers, experts, r_old.min(max_redundant_slots(experts, old_devs.len())));
        let new_shape = PlacementShape::new(layers, experts, r_new.min(max_redundant_slots(experts, new_devs.len())));
        let old = build(kinds.0, &old_shape, &old_devs, &load);
        let new = build(kinds.1, &new_shape, &new_devs, &load);
        let budgets = budgets_with_slack(&old, &new, |d| slack[d.0 as usize]);
        match MigrationPlan::between(&old, &new, EB, &budgets) {
            Ok(plan) => {
                let report = plan.validate(&old, &new, &budgets).unwrap();
                prop_assert!(report.min_live_copies >= 1);
                prop_assert_eq!(plan.reloads(), 0);
                prop_assert_eq!(plan.moves() - plan.staged_copies(), old.copies_needed(&new));
                for (d, &peak) in plan.peak_bytes_per_device() {
                    prop_assert!(peak <= budgets.get(*d).unwrap());
                }
            }
            Err(PlanError::NoFeasibleOrder { .. }) => {
                // Only when some device has no spare slot at all.
                prop_assert!(old.devices().iter().chain(new.devices()).any(|d| slack[d.0 as usize] == 0));
            }
            Err(e) => prop_assert!(false, "unexpected error: {}", e),
        }
    }

    #[test]
    fn failure_reloads_exactly_the_lost_experts(
        layers in 1usize..=32,
        experts in 1usize..=256,
        n in 2usize..=64,
        redundant in 0usize..=32,
        kind in kind(),
        fail_mask in any::<u64>(),
        seed in any::<u64>(),
    ) {
        let shape = PlacementShape::new(layers, experts, redundant.min(max_redundant_slots(experts, n)));
        let devs = devices(0..n as u32);
        let load = random_load(layers, experts, seed);
        let old = build(kind, &shape, &devs, &load);
        let mut failed: Vec<DeviceId> = devs.iter().copied().filter(|d| fail_mask >> d.0 & 1 == 1).collect();
        if failed.len() == n {
            failed.pop();
        }
        if failed.is_empty() {
            failed.push(DeviceId(0));
        }
        let alive: Vec<DeviceId> = devs.iter().copied().filter(|d| !failed.contains(d)).collect();
        let new = Placement::rebalanced_for(&old, &alive, &load).unwrap();
        let budgets = budgets_with_slack(&old, &new, |_| 1);
        let plan = MigrationPlan::between_after_failure(&old, &new, &failed, EB, &budgets).unwrap();
        plan.validate(&old, &new, &budgets).unwrap();
        let lost = (0..layers)
            .flat_map(|l| (0..experts as u32).map(move |x| (l, ExpertId(x))))
            .filter(|&(l, x)| old.holders(l, x).all(|d| failed.contains(&d)))
            .count();
        prop_assert_eq!(plan.reloads(), lost);
        prop_assert_eq!(plan.bytes_reloaded(), lost as u64 * EB);
        // Nothing is touched on a failed device.
        for s in plan.steps() {
            let touched = match *s {
                MigrationStep::Keep { device, .. } | MigrationStep::Drop { device, .. } => vec![device],
                MigrationStep::Move { from, to, .. } => vec![from, to],
                MigrationStep::Reload { to, .. } => vec![to],
            };
            prop_assert!(touched.iter().all(|d| !failed.contains(d)));
        }
    }

    #[test]
    fn rebalance_spends_at_most_its_budget_and_never_worsens_balance(
        layers in 1usize..=16,
        experts in 2usize..=128,
        n in 2usize..=32,
        redundant in 0usize..=32,
        budget in 0usize..=12,
        seed in any::<u64>(),
    ) {
        let shape = PlacementShape::new(layers, experts, redundant.min(max_redundant_slots(experts, n)));
        let devs = devices(0..n as u32);
        let old = Placement::balanced(&shape, &devs).unwrap();
        let load = random_load(layers, experts, seed);
        let config = RebalanceConfig { extra_moves_per_layer: budget, ..RebalanceConfig::default() };
        let new = Placement::rebalanced_for_with(&old, &devs, &load, &config).unwrap();
        new.check_invariants().unwrap();
        prop_assert!(counts_within_one(&new), "swaps and replacements keep slot counts");
        let square_sum = |p: &Placement, l: usize| p.device_loads(l, &load).iter().map(|x| x * x).sum::<f64>();
        for l in 0..layers {
            let one_layer_created = new
                .devices()
                .iter()
                .map(|&d| new.slots(l, d).iter().filter(|&&x| !old.holds(l, d, x)).count())
                .sum::<usize>();
            prop_assert!(one_layer_created <= budget, "layer {}: {} copies", l, one_layer_created);
            prop_assert!(square_sum(&new, l) <= square_sum(&old, l) * (1.0 + 1e-12));
        }
        let budgets = budgets_with_slack(&old, &new, |_| 1);
        let plan = MigrationPlan::between(&old, &new, EB, &budgets).unwrap();
        plan.validate(&old, &new, &budgets).unwrap();
    }
}
