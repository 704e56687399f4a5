//! Stable rebalancing: a balanced target for a new device set (or a new load) that keeps every
//! copy it can, so a migration moves as few bytes as possible.

use std::cmp::Reverse;

use crate::placement::{check_redundancy, max_redundant_slots, sorted_unique};
use crate::replication::apportion;
use crate::{DeviceId, ExpertId, ExpertLoad, Placement, PlacementError};

/// Knobs for [`Placement::rebalanced_for_with`]. The default keeps the old redundancy and spends no
/// extra moves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebalanceConfig {
    /// Redundant slots per layer in the target. `None`: the old placement's number, lowered to
    /// what the new device set can hold ([`crate::max_redundant_slots`]) if it has to be.
    pub redundant_slots: Option<usize>,
    /// Copies per layer that the rebalancer may create beyond the minimum in order to even out
    /// device load (by swapping experts between the hottest and the coolest device, or by moving a
    /// replica from a cold expert to a hot one). Each step it takes strictly lowers the sum of
    /// squared device loads. 0 keeps the target as stable as possible; a rebalance on the same
    /// devices needs a budget here to change anything.
    pub extra_moves_per_layer: usize,
}

impl Placement {
    /// A target placement for `new_devices` that is balanced (slot counts within one of each
    /// other) and keeps as many of `old`'s copies in place as a balanced layout allows. See
    /// [`Placement::rebalanced_for_with`].
    pub fn rebalanced_for(
        old: &Placement,
        new_devices: &[DeviceId],
        load: &ExpertLoad,
    ) -> Result<Placement, PlacementError> {
        Self::rebalanced_for_with(old, new_devices, load, &RebalanceConfig::default())
    }

    /// A target placement for `new_devices` (which may add devices to, remove devices from, or
    /// equal `old`'s), for the given load. Per layer:
    ///
    /// 1. **Replica counts** by load (D'Hondt, as in [`Placement::load_aware`]); on ties the old
    ///    placement's counts win, so a uniform (or all-zero) load keeps the old replica choice.
    /// 2. **Slot counts**: `slots_per_layer / n`, one more for `slots_per_layer % n` devices, the
    ///    extra ones going to the devices that already hold the most.
    /// 3. **Keep**: each surviving device keeps its old experts, up to its new slot count;
    ///    devices that must shrink give up surplus replicas first. Kept experts keep their
    ///    relative slot order.
    /// 4. **Fill** the free slots (new devices, and survivors that grow): first experts left with
    ///    no copy, then the replicas that step 1 asked for, then whatever expert gains most from
    ///    another copy; each onto the device with the least expected load. New experts are
    ///    appended to a device's slots in id order.
    /// 5. **Improve**: local search on the sum of squared device loads, by swapping experts
    ///    between the hottest and the coolest device or by turning a cold expert's replica into a
    ///    hot expert's. Steps that create no extra copies are always taken (so a new device's
    ///    replicas may go to the experts that relieve the busiest devices); steps that do cost
    ///    copies are capped by [`RebalanceConfig::extra_moves_per_layer`].
    ///
    /// Without extra moves, the copies to create are the least any balanced target needs: a
    /// scale-up creates only what the new devices must hold, a scale-down only what the leaving
    /// devices held.
    pub fn rebalanced_for_with(
        old: &Placement,
        new_devices: &[DeviceId],
        load: &ExpertLoad,
        config: &RebalanceConfig,
    ) -> Result<Placement, PlacementError> {
        let devices = sorted_unique(new_devices)?;
        let experts = old.experts_per_layer();
        load.check_shape(old.layers(), experts)?;
        let m = devices.len();
        let redundant = match config.redundant_slots {
            Some(r) => {
                check_redundancy(r, experts, m)?;
                r
            }
            None => old.redundant_slots().min(max_redundant_slots(experts, m)),
        };
        let old_index: Vec<Option<usize>> = devices.iter().map(|&d| old.device_index(d)).collect();
        let slots = (0..old.layers())
            .map(|layer| {
                let rows = old.layer_rows(layer);
                let old_rows: Vec<&[ExpertId]> = old_index
                    .iter()
                    .map(|i| i.map_or(&[][..], |i| rows[i].as_slice()))
                    .collect();
                let old_copies: Vec<u32> = (0..experts)
                    .map(|x| old.copies(layer, ExpertId(x as u32)) as u32)
                    .collect();
                LayerRebalance {
                    experts,
                    redundant,
                    tokens: load.row(layer),
                    old_rows,
                    old_copies,
                    extra_moves: config.extra_moves_per_layer,
                }
                .run()
            })
            .collect();
        Placement::build(experts, devices, slots)
    }
}

/// One layer's rebalance; `old_rows[j]` is new device `j`'s old slots (empty for a newcomer).
struct LayerRebalance<'a> {
    experts: usize,
    redundant: usize,
    tokens: &'a [u64],
    old_rows: Vec<&'a [ExpertId]>,
    old_copies: Vec<u32>,
    extra_moves: usize,
}

impl LayerRebalance<'_> {
    fn run(&self) -> Vec<Vec<ExpertId>> {
        let e = self.experts;
        let m = self.old_rows.len();
        let total = e + self.redundant;
        let desired = apportion(
            self.tokens,
            self.redundant,
            m as u32,
            Some(&self.old_copies),
        );
        let weight: Vec<f64> = (0..e)
            .map(|x| self.tokens[x] as f64 / f64::from(desired[x]))
            .collect();

        // Slot counts: the extra slots go to the devices that hold the most already.
        let (q, rem) = (total / m, total % m);
        let mut order: Vec<usize> = (0..m).collect();
        order.sort_by_key(|&j| (Reverse(self.old_rows[j].len().min(q + 1)), j));
        let mut target = vec![q; m];
        for &j in &order[..rem] {
            target[j] += 1;
        }

        // Keep what fits; shrinking devices give up surplus replicas first.
        let mut kept: Vec<Vec<usize>> = self
            .old_rows
            .iter()
            .map(|r| r.iter().map(|x| x.index()).collect())
            .collect();
        let mut count = vec![0u32; e];
        for &x in kept.iter().flatten() {
            count[x] += 1;
        }
        for j in 0..m {
            while kept[j].len() > target[j] {
                let (pos, &x) = kept[j]
                    .iter()
                    .enumerate()
                    .max_by_key(|&(pos, &x)| (count[x] > desired[x], count[x], pos))
                    .expect("a row longer than its target is not empty");
                kept[j].remove(pos);
                count[x] -= 1;
            }
        }
        // If the redundancy shrank, more copies may be kept than the target has room for once
        // every missing expert is placed: drop the most-replicated ones.
        let distinct = count.iter().filter(|&&c| c > 0).count();
        let mut kept_total: usize = kept.iter().map(Vec::len).sum();
        while kept_total - distinct > self.redundant {
            let x = (0..e)
                .max_by_key(|&x| (count[x], Reverse(x)))
                .expect("experts > 0");
            let j = (0..m)
                .filter(|&j| kept[j].contains(&x))
                .max_by_key(|&j| (kept[j].len(), j))
                .expect("an expert with two or more kept copies has a holder");
            kept[j].retain(|&y| y != x);
            count[x] -= 1;
            kept_total -= 1;
        }

        let mut fill = Fill::new(e, &kept, &target, &weight, count);
        // A: experts with no copy left, heaviest first.
        let mut missing: Vec<usize> = (0..e).filter(|&x| fill.count[x] == 0).collect();
        missing.sort_by(|&a, &b| weight[b].total_cmp(&weight[a]).then(a.cmp(&b)));
        for x in missing {
            let j = fill
                .coolest(|_| true)
                .expect("free slots >= experts without a copy");
            fill.place(j, x);
        }
        // B: the replicas the load asks for, heaviest first, where they fit.
        let mut extras: Vec<usize> = (0..e)
            .flat_map(|x| std::iter::repeat_n(x, desired[x].saturating_sub(fill.count[x]) as usize))
            .collect();
        extras.sort_by(|&a, &b| weight[b].total_cmp(&weight[a]).then(a.cmp(&b)));
        for x in extras {
            if let Some(j) = fill.coolest(|holds| !holds[x]) {
                fill.place(j, x);
            }
        }
        // C: any slot still free gets the expert that gains most from one more copy.
        while let Some(j) = fill.coolest(|_| true) {
            let x = (0..e)
                .filter(|&x| !fill.holds[j * e + x])
                .max_by(|&a, &b| {
                    let lhs = u128::from(self.tokens[a]) * u128::from(fill.count[b] + 1);
                    let rhs = u128::from(self.tokens[b]) * u128::from(fill.count[a] + 1);
                    lhs.cmp(&rhs).then(b.cmp(&a))
                })
                .expect("a device with a free slot holds fewer than `experts` experts");
            fill.place(j, x);
        }

        let mut rows: Vec<Vec<ExpertId>> = kept
            .into_iter()
            .zip(fill.added)
            .map(|(mut row, mut added)| {
                added.sort_unstable();
                row.extend(added);
                row.into_iter().map(|x| ExpertId(x as u32)).collect()
            })
            .collect();
        let mut old_holds = vec![false; m * e];
        for (j, row) in self.old_rows.iter().enumerate() {
            for x in row.iter() {
                old_holds[j * e + x.index()] = true;
            }
        }
        improve(&mut rows, &old_holds, self.tokens, self.extra_moves);
        rows
    }
}

/// Free-slot bookkeeping while filling a layer.
struct Fill<'a> {
    experts: usize,
    holds: Vec<bool>,
    count: Vec<u32>,
    room: Vec<usize>,
    est: Vec<f64>,
    weight: &'a [f64],
    added: Vec<Vec<usize>>,
}

impl<'a> Fill<'a> {
    fn new(
        e: usize,
        kept: &[Vec<usize>],
        target: &[usize],
        weight: &'a [f64],
        count: Vec<u32>,
    ) -> Self {
        let m = kept.len();
        let mut holds = vec![false; m * e];
        let mut est = vec![0.0; m];
        for (j, row) in kept.iter().enumerate() {
            for &x in row {
                holds[j * e + x] = true;
                est[j] += weight[x];
            }
        }
        let room = (0..m).map(|j| target[j] - kept[j].len()).collect();
        Self {
            experts: e,
            holds,
            count,
            room,
            est,
            weight,
            added: vec![Vec::new(); m],
        }
    }

    /// The device with a free slot and the least expected load among those `ok` accepts (given
    /// the device's row of the holds table); ties go to more free slots, then the lower index.
    fn coolest(&self, ok: impl Fn(&[bool]) -> bool) -> Option<usize> {
        let e = self.experts;
        (0..self.room.len())
            .filter(|&j| self.room[j] > 0 && ok(&self.holds[j * e..(j + 1) * e]))
            .min_by(|&a, &b| {
                self.est[a]
                    .total_cmp(&self.est[b])
                    .then(self.room[b].cmp(&self.room[a]))
                    .then(a.cmp(&b))
            })
    }

    fn place(&mut self, j: usize, x: usize) {
        self.holds[j * self.experts + x] = true;
        self.count[x] += 1;
        self.room[j] -= 1;
        self.est[j] += self.weight[x];
        self.added[j].push(x);
    }
}

/// One local-search step.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Expert `x` on device `a` and expert `y` on device `b` trade places.
    Swap {
        a: usize,
        x: usize,
        b: usize,
        y: usize,
    },
    /// Device `j` gives up its copy of `x` (which has others) for a new copy of `y`.
    Replace { j: usize, x: usize, y: usize },
}

/// Hill-climbs on the sum of squared device loads, taking only steps that keep the copies created
/// (against `old_holds`) within `budget` of where they started. Steps that create no extra copies
/// are always allowed.
fn improve(rows: &mut [Vec<ExpertId>], old_holds: &[bool], tokens: &[u64], budget: usize) {
    const CANDIDATES: usize = 4;
    let m = rows.len();
    let e = tokens.len();
    let mut holds = vec![false; m * e];
    let mut count = vec![0u32; e];
    for (j, row) in rows.iter().enumerate() {
        for x in row {
            holds[j * e + x.index()] = true;
            count[x.index()] += 1;
        }
    }
    let cost = |j: usize, x: usize| i64::from(!old_holds[j * e + x]);
    let mut created: i64 = rows
        .iter()
        .enumerate()
        .map(|(j, row)| row.iter().map(|x| cost(j, x.index())).sum::<i64>())
        .sum();
    let limit = created + budget as i64;
    let share = |x: usize, c: u32| tokens[x] as f64 / f64::from(c);

    for _ in 0..4 * (budget + m) + 16 {
        let load: Vec<f64> = rows
            .iter()
            .map(|row| row.iter().map(|x| share(x.index(), count[x.index()])).sum())
            .collect();
        let sq = |v: f64| v * v;
        let objective: f64 = load.iter().map(|&l| sq(l)).sum();
        let mut best: Option<(f64, Op, i64)> = None;
        let mut consider = |df: f64, op: Op, dm: i64| {
            if created + dm <= limit
                && df < -1e-9 * objective
                && best.is_none_or(|(b, _, _)| df < b)
            {
                best = Some((df, op, dm));
            }
        };

        let by_load = |a: &usize, b: &usize| load[*a].total_cmp(&load[*b]).then(b.cmp(a));
        let hot_dev = (0..m).max_by(by_load).expect("at least one device");
        let cool_dev = (0..m).min_by(by_load).expect("at least one device");
        if hot_dev != cool_dev {
            let (a, b) = (hot_dev, cool_dev);
            for &xi in &rows[a] {
                let x = xi.index();
                if holds[b * e + x] {
                    continue;
                }
                for &yi in &rows[b] {
                    let y = yi.index();
                    if holds[a * e + y] {
                        continue;
                    }
                    let (wx, wy) = (share(x, count[x]), share(y, count[y]));
                    let df =
                        sq(load[a] - wx + wy) + sq(load[b] - wy + wx) - sq(load[a]) - sq(load[b]);
                    let dm = cost(b, x) + cost(a, y) - cost(a, x) - cost(b, y);
                    consider(df, Op::Swap { a, x, b, y }, dm);
                }
            }
        }

        // Replace: a copy of a cold replicated expert becomes a copy of a hot expert.
        let hotter = |a: &usize, b: &usize| {
            share(*b, count[*b])
                .total_cmp(&share(*a, count[*a]))
                .then(a.cmp(b))
        };
        let colder = |a: &usize, b: &usize| {
            share(*a, count[*a])
                .total_cmp(&share(*b, count[*b]))
                .then(a.cmp(b))
        };
        let hot = top(
            (0..e).filter(|&y| (count[y] as usize) < m).collect(),
            CANDIDATES,
            hotter,
        );
        let cold = top(
            (0..e).filter(|&x| count[x] >= 2).collect(),
            CANDIDATES,
            colder,
        );
        for &y in &hot {
            let new_wy = share(y, count[y] + 1);
            let dy = share(y, count[y]) - new_wy;
            let gain_y: f64 = (0..m)
                .filter(|&k| holds[k * e + y])
                .map(|k| sq(load[k] - dy) - sq(load[k]))
                .sum();
            for &x in &cold {
                if x == y {
                    continue;
                }
                let wx = share(x, count[x]);
                let dx = share(x, count[x] - 1) - wx;
                let holders_x: Vec<usize> = (0..m).filter(|&k| holds[k * e + x]).collect();
                let sum_x: f64 = holders_x
                    .iter()
                    .map(|&k| sq(load[k] + dx) - sq(load[k]))
                    .sum();
                // Devices holding both see dx and -dy at once: correct the separable sum.
                let both = holders_x.iter().filter(|&&k| holds[k * e + y]).count() as f64;
                let overlap = -2.0 * dx * dy * both;
                for &j in &holders_x {
                    if holds[j * e + y] {
                        continue;
                    }
                    let lj = load[j];
                    let df = gain_y + sum_x - (sq(lj + dx) - sq(lj))
                        + overlap
                        + (sq(lj - wx + new_wy) - sq(lj));
                    consider(df, Op::Replace { j, x, y }, cost(j, y) - cost(j, x));
                }
            }
        }

        let Some((_, op, dm)) = best else { break };
        created += dm;
        let mut set = |j: usize, from: usize, to: usize| {
            let slot = rows[j]
                .iter()
                .position(|z| z.index() == from)
                .expect("op names a held copy");
            rows[j][slot] = ExpertId(to as u32);
            holds[j * e + from] = false;
            holds[j * e + to] = true;
        };
        match op {
            Op::Swap { a, x, b, y } => {
                set(a, x, y);
                set(b, y, x);
            }
            Op::Replace { j, x, y } => {
                set(j, x, y);
                count[x] -= 1;
                count[y] += 1;
            }
        }
    }
}

/// The first `k` of `items` in `order`, sorted.
fn top(
    mut items: Vec<usize>,
    k: usize,
    order: impl Fn(&usize, &usize) -> std::cmp::Ordering,
) -> Vec<usize> {
    if items.len() > k {
        items.select_nth_unstable_by(k, &order);
        items.truncate(k);
    }
    items.sort_by(order);
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PlacementShape;

    fn devs(range: std::ops::Range<u32>) -> Vec<DeviceId> {
        range.map(DeviceId).collect()
    }

    #[test]
    fn scale_up_keeps_everything_that_can_stay() {
        let old = Placement::balanced(&PlacementShape::new(2, 16, 4), &devs(0..4)).unwrap();
        let load = ExpertLoad::uniform(2, 16).unwrap();
        let new = Placement::rebalanced_for(&old, &devs(0..5), &load).unwrap();
        // 20 slots over 5 devices: 4 each. Old devices had 5: each keeps 4, the newcomer gets 4.
        for layer in 0..2 {
            for d in 0..5 {
                assert_eq!(new.slots(layer, DeviceId(d)).len(), 4);
            }
        }
        assert_eq!(old.copies_needed(&new), 2 * 4);
        assert_eq!(new.redundant_slots(), old.redundant_slots());
        // Free swaps may move replicas towards the busier devices, but never make things worse.
        assert!(new.imbalance(&load).unwrap() <= old.imbalance(&load).unwrap() + 1e-12);
    }

    #[test]
    fn scale_down_moves_only_what_the_leaving_device_held() {
        let old = Placement::balanced(&PlacementShape::new(1, 12, 3), &devs(0..5)).unwrap();
        let load = ExpertLoad::uniform(1, 12).unwrap();
        let keep = [DeviceId(0), DeviceId(1), DeviceId(3), DeviceId(4)];
        let new = Placement::rebalanced_for(&old, &keep, &load).unwrap();
        assert_eq!(new.devices(), &keep);
        assert_eq!(old.copies_needed(&new), old.slots(0, DeviceId(2)).len());
        for &d in &keep {
            // Survivors keep their slots in order, as a prefix.
            let before = old.slots(0, d);
            assert_eq!(&new.slots(0, d)[..before.len()], before);
        }
    }

    #[test]
    fn rebalance_with_budget_evens_out_a_skewed_load() {
        let shape = PlacementShape::new(1, 16, 4);
        let old = Placement::balanced(&shape, &devs(0..4)).unwrap();
        // The balanced layout puts experts 5..10 together on device 1; make them hot.
        let mut row = vec![10u64; 16];
        for hot in &mut row[5..10] {
            *hot = 200;
        }
        let load = ExpertLoad::from_rows(vec![row]).unwrap();
        let stable = Placement::rebalanced_for(&old, old.devices(), &load).unwrap();
        assert_eq!(
            stable, old,
            "without a move budget a same-device rebalance changes nothing"
        );
        let config = RebalanceConfig {
            extra_moves_per_layer: 8,
            ..RebalanceConfig::default()
        };
        let moved = Placement::rebalanced_for_with(&old, old.devices(), &load, &config).unwrap();
        moved.check_invariants().unwrap();
        assert!(old.copies_needed(&moved) <= 8);
        let (before, after) = (
            old.imbalance(&load).unwrap(),
            moved.imbalance(&load).unwrap(),
        );
        assert!(after < before * 0.7, "imbalance {before} -> {after}");
    }

    #[test]
    fn redundancy_is_lowered_only_when_it_must_be() {
        let old = Placement::balanced(&PlacementShape::new(1, 4, 4), &devs(0..4)).unwrap();
        let load = ExpertLoad::uniform(1, 4).unwrap();
        let one = Placement::rebalanced_for(&old, &devs(0..1), &load).unwrap();
        assert_eq!(one.redundant_slots(), 0);
        let two = Placement::rebalanced_for(&old, &devs(0..2), &load).unwrap();
        assert_eq!(two.redundant_slots(), 4);
        let config = RebalanceConfig {
            redundant_slots: Some(5),
            ..RebalanceConfig::default()
        };
        assert_eq!(
            Placement::rebalanced_for_with(&old, &devs(0..2), &load, &config),
            Err(PlacementError::TooManyRedundantSlots {
                requested: 5,
                max: 4,
                devices: 2,
                experts: 4
            })
        );
        let fewer = RebalanceConfig {
            redundant_slots: Some(1),
            ..RebalanceConfig::default()
        };
        let p = Placement::rebalanced_for_with(&old, &devs(0..3), &load, &fewer).unwrap();
        assert_eq!(p.redundant_slots(), 1);
    }
}
