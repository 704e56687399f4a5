//! [`Placement`]: which experts each device holds, per MoE layer, and its constructors.

use crate::replication::apportion;
use crate::{DeviceId, ExpertId, ExpertLoad, PlacementError};

/// The size of a placement: layers, experts per layer, and redundant slots per layer.
///
/// Each layer has `experts_per_layer + redundant_slots` slots in total: one copy of every expert,
/// plus `redundant_slots` extra copies (replicas) of some experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementShape {
    /// MoE layers (DeepSeek-V3: 58).
    pub layers: usize,
    /// Routed experts per layer (DeepSeek-V3: 256).
    pub experts_per_layer: usize,
    /// Extra copies per layer beyond one of each expert.
    pub redundant_slots: usize,
}

impl PlacementShape {
    /// A shape from its three numbers.
    pub const fn new(layers: usize, experts_per_layer: usize, redundant_slots: usize) -> Self {
        Self {
            layers,
            experts_per_layer,
            redundant_slots,
        }
    }

    /// Slots per layer: `experts_per_layer + redundant_slots`.
    pub const fn slots_per_layer(&self) -> usize {
        self.experts_per_layer + self.redundant_slots
    }
}

/// The most MoE layers a placement or load table may have.
pub const MAX_LAYERS: usize = 1 << 12;
/// The most routed experts per layer a placement or load table may have.
pub const MAX_EXPERTS_PER_LAYER: usize = 1 << 16;

/// Checks that a model has at least one, and not absurdly many, layers and experts.
pub(crate) fn check_dims(layers: usize, experts: usize) -> Result<(), PlacementError> {
    if layers == 0 {
        return Err(PlacementError::NoLayers);
    }
    if experts == 0 {
        return Err(PlacementError::NoExperts);
    }
    if layers > MAX_LAYERS || experts > MAX_EXPERTS_PER_LAYER {
        return Err(PlacementError::TooLarge {
            layers,
            experts,
            max_layers: MAX_LAYERS,
            max_experts: MAX_EXPERTS_PER_LAYER,
        });
    }
    Ok(())
}

/// The most redundant slots per layer that `devices` devices can hold for `experts` experts: a
/// device holds at most one copy of an expert, so each expert has at most `devices` copies.
pub const fn max_redundant_slots(experts: usize, devices: usize) -> usize {
    experts * devices.saturating_sub(1)
}

/// Where every expert of every MoE layer lives.
///
/// For each layer and each device, an ordered list of expert ids: the device's *slots*. The order
/// is the layout of that device's contiguous expert range (slot `i` is the `i`-th chunk of the
/// range). An expert may have copies (replicas) on several devices.
///
/// # Invariants (checked by every constructor, and by [`Placement::check_invariants`])
/// - at least one layer, one expert and one device; device ids are unique and kept sorted;
/// - every slot names an expert in `0..experts_per_layer`;
/// - a device holds at most one copy of an expert in a layer;
/// - every expert has at least one copy in every layer;
/// - every layer has the same number of slots (`experts_per_layer + redundant_slots()`).
///
/// Device slot counts may differ: [`Placement::balanced`] keeps them within one of each other,
/// [`Placement::load_aware`] trades that for load balance under a slot budget.
///
/// The accessors never panic: an unknown layer, device or expert reads as empty (no slots, no
/// holders, `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    experts: usize,
    devices: Vec<DeviceId>,
    /// `slots[layer][device_index]`, `device_index` into `devices`.
    slots: Vec<Vec<Vec<ExpertId>>>,
    /// `holders[layer * experts + expert]`: the devices holding a copy, sorted by id.
    holders: Vec<Vec<DeviceId>>,
}

impl Placement {
    /// A placement from explicit slots: `slots[layer][i]` is the ordered slot list of `devices[i]`.
    /// Devices may come in any order; they are sorted (with their rows) by id.
    pub fn from_slots(
        experts_per_layer: usize,
        devices: &[DeviceId],
        slots: Vec<Vec<Vec<ExpertId>>>,
    ) -> Result<Self, PlacementError> {
        check_dims(slots.len(), experts_per_layer)?;
        let sorted = sorted_unique(devices)?;
        for (layer, rows) in slots.iter().enumerate() {
            if rows.len() != devices.len() {
                return Err(PlacementError::DeviceCountMismatch {
                    layer,
                    found: rows.len(),
                    expected: devices.len(),
                });
            }
        }
        // Reorder rows to sorted device order.
        let mut order: Vec<usize> = (0..devices.len()).collect();
        order.sort_by_key(|&i| devices[i]);
        let slots = slots
            .into_iter()
            .map(|mut rows| {
                order
                    .iter()
                    .map(|&i| std::mem::take(&mut rows[i]))
                    .collect()
            })
            .collect();
        Self::build(experts_per_layer, sorted, slots)
    }

    /// Builds and checks a placement; `devices` is sorted and unique.
    pub(crate) fn build(
        experts: usize,
        devices: Vec<DeviceId>,
        slots: Vec<Vec<Vec<ExpertId>>>,
    ) -> Result<Self, PlacementError> {
        let mut holders = vec![Vec::new(); slots.len() * experts];
        let mut expected_total = None;
        for (layer, rows) in slots.iter().enumerate() {
            let mut total = 0;
            for (d, row) in rows.iter().enumerate() {
                total += row.len();
                for &expert in row {
                    let device = devices[d];
                    if expert.index() >= experts {
                        return Err(PlacementError::ExpertOutOfRange {
                            layer,
                            device,
                            expert,
                            experts,
                        });
                    }
                    let h: &mut Vec<DeviceId> = &mut holders[layer * experts + expert.index()];
                    // Rows are visited in device order, so a repeat is always the last entry.
                    if h.last() == Some(&device) {
                        return Err(PlacementError::DuplicateSlot {
                            layer,
                            device,
                            expert,
                        });
                    }
                    h.push(device);
                }
            }
            if let Some(e) = (0..experts).find(|&e| holders[layer * experts + e].is_empty()) {
                return Err(PlacementError::MissingExpert {
                    layer,
                    expert: ExpertId(e as u32),
                });
            }
            match expected_total {
                None => expected_total = Some(total),
                Some(expected) if expected != total => {
                    return Err(PlacementError::UnequalSlotTotals {
                        layer,
                        found: total,
                        expected,
                    })
                }
                Some(_) => {}
            }
        }
        Ok(Self {
            experts,
            devices,
            slots,
            holders,
        })
    }

    /// Re-checks every invariant listed on [`Placement`]. Constructors already do; this is for
    /// callers that want to assert it (tests, the scaler).
    pub fn check_invariants(&self) -> Result<(), PlacementError> {
        let rebuilt = Self::build(self.experts, self.devices.clone(), self.slots.clone())?;
        assert_eq!(
            rebuilt.holders, self.holders,
            "holder index out of sync with the slots"
        );
        Ok(())
    }

    /// Every device gets the same number of slots, within one; experts sit in contiguous blocks
    /// (device 0 holds experts `0..k`, device 1 `k..2k`, ...), and the redundant slots continue
    /// the sequence from expert 0 again (so experts `0..redundant_slots` get the replicas). Every
    /// layer is laid out the same way.
    pub fn balanced(shape: &PlacementShape, devices: &[DeviceId]) -> Result<Self, PlacementError> {
        let devices = check_request(shape, devices)?;
        let order: Vec<ExpertId> = (0..shape.experts_per_layer as u32).map(ExpertId).collect();
        let rows = cyclic_layout(&order, shape.slots_per_layer(), devices.len());
        Self::build(shape.experts_per_layer, devices, vec![rows; shape.layers])
    }

    /// Interleaved layout: without redundant slots, expert `e` lives on the `e % n`-th device (in
    /// id order). Redundant slots continue the same interleaved sequence. Slot counts are within
    /// one of each other, as with [`Placement::balanced`].
    pub fn round_robin(
        shape: &PlacementShape,
        devices: &[DeviceId],
    ) -> Result<Self, PlacementError> {
        let devices = check_request(shape, devices)?;
        let n = devices.len();
        let mut order: Vec<ExpertId> = (0..shape.experts_per_layer as u32).map(ExpertId).collect();
        order.sort_by_key(|e| (e.index() % n, e.index() / n));
        let rows = cyclic_layout(&order, shape.slots_per_layer(), n);
        Self::build(shape.experts_per_layer, devices, vec![rows; shape.layers])
    }

    /// A layout for a known load, in the spirit of DeepSeek's EPLB:
    ///
    /// 1. **Replicate.** Each expert gets one copy; each redundant slot then goes to the expert
    ///    with the highest load per copy (D'Hondt apportionment), so hot experts get replicas.
    /// 2. **Pack.** Copies, heaviest (load per copy) first, go to the device with the least load
    ///    so far that has a free slot and does not hold that expert yet (greedy longest-processing
    ///    -time bin packing).
    ///
    /// `max_slots_per_device` is the slot budget of every device (its expert memory, in experts);
    /// `None` means `ceil(slots_per_layer / devices)`, the least that fits. Devices may end up with
    /// fewer slots than the budget. Slots within a device are sorted by expert id.
    pub fn load_aware(
        shape: &PlacementShape,
        devices: &[DeviceId],
        load: &ExpertLoad,
        max_slots_per_device: Option<usize>,
    ) -> Result<Self, PlacementError> {
        let devices = check_request(shape, devices)?;
        load.check_shape(shape.layers, shape.experts_per_layer)?;
        let n = devices.len();
        let total = shape.slots_per_layer();
        let cap = max_slots_per_device
            .unwrap_or_else(|| total.div_ceil(n))
            .min(shape.experts_per_layer);
        if cap * n < total {
            return Err(PlacementError::SlotBudgetTooSmall {
                max_slots_per_device: cap,
                devices: n,
                capacity: cap * n,
                needed: total,
            });
        }
        let slots = (0..shape.layers)
            .map(|layer| {
                let tokens = load.row(layer);
                let copies = apportion(tokens, shape.redundant_slots, n as u32, None);
                crate::packing::pack_layer(tokens, &copies, n, cap)
            })
            .collect();
        Self::build(shape.experts_per_layer, devices, slots)
    }

    /// Number of MoE layers.
    pub fn layers(&self) -> usize {
        self.slots.len()
    }

    /// The devices, sorted by id.
    pub fn devices(&self) -> &[DeviceId] {
        &self.devices
    }

    /// Routed experts per layer.
    pub fn experts_per_layer(&self) -> usize {
        self.experts
    }

    /// Slots per layer, over all devices: `experts_per_layer() + redundant_slots()`.
    pub fn slots_per_layer(&self) -> usize {
        self.slots[0].iter().map(Vec::len).sum()
    }

    /// Extra copies per layer beyond one of each expert.
    pub fn redundant_slots(&self) -> usize {
        self.slots_per_layer() - self.experts
    }

    /// The shape of this placement.
    pub fn shape(&self) -> PlacementShape {
        PlacementShape::new(self.layers(), self.experts, self.redundant_slots())
    }

    /// The most slots any device has in any layer: the size, in experts, of the largest per-device
    /// expert range.
    pub fn max_slots_per_device(&self) -> usize {
        self.slots.iter().flatten().map(Vec::len).max().unwrap_or(0)
    }

    /// The position of `device` in [`Placement::devices`].
    pub fn device_index(&self, device: DeviceId) -> Option<usize> {
        self.devices.binary_search(&device).ok()
    }

    /// The ordered slots of `device` in `layer`: slot `i` holds the returned `[i]`. Empty for an
    /// unknown layer or device.
    pub fn slots(&self, layer: usize, device: DeviceId) -> &[ExpertId] {
        match (self.slots.get(layer), self.device_index(device)) {
            (Some(rows), Some(d)) => &rows[d],
            _ => &[],
        }
    }

    /// The devices holding a copy of `expert` in `layer`, in id order.
    pub fn holders(&self, layer: usize, expert: ExpertId) -> impl Iterator<Item = DeviceId> + '_ {
        self.holder_slice(layer, expert).iter().copied()
    }

    /// Number of copies of `expert` in `layer` (0 if out of range).
    pub fn copies(&self, layer: usize, expert: ExpertId) -> usize {
        self.holder_slice(layer, expert).len()
    }

    fn holder_slice(&self, layer: usize, expert: ExpertId) -> &[DeviceId] {
        if layer >= self.layers() || expert.index() >= self.experts {
            return &[];
        }
        &self.holders[layer * self.experts + expert.index()]
    }

    /// The slot of `expert` on `device` in `layer`, if it holds a copy.
    pub fn slot_of(&self, layer: usize, device: DeviceId, expert: ExpertId) -> Option<usize> {
        self.slots(layer, device).iter().position(|&e| e == expert)
    }

    /// Whether `device` holds a copy of `expert` in `layer`.
    pub fn holds(&self, layer: usize, device: DeviceId, expert: ExpertId) -> bool {
        self.holder_slice(layer, expert)
            .binary_search(&device)
            .is_ok()
    }

    /// The device that serves `expert` in `layer` for a token with hash `token_hash` (any
    /// well-spread per-token value: a sequence id mixed with a position, say).
    ///
    /// Deterministic, and spreads tokens evenly over the replicas: the hash is mixed (SplitMix64's
    /// finaliser) and mapped onto the holders by multiply-shift, so each of `r` replicas serves
    /// `1/r` of a uniform hash range. `None` for an unknown layer or expert.
    pub fn replica_for(&self, layer: usize, expert: ExpertId, token_hash: u64) -> Option<DeviceId> {
        let holders = self.holder_slice(layer, expert);
        if holders.is_empty() {
            return None;
        }
        let pick = (u128::from(mix64(token_hash)) * holders.len() as u128) >> 64;
        Some(holders[pick as usize])
    }

    /// Expected load of each device in `layer` (in [`Placement::devices`] order) if tokens for an
    /// expert spread evenly over its replicas (as [`Placement::replica_for`] does): the sum over
    /// its slots of `tokens / copies`. Empty if `layer` is out of range of either.
    pub fn device_loads(&self, layer: usize, load: &ExpertLoad) -> Vec<f64> {
        let tokens = load.row(layer);
        let Some(rows) = self.slots.get(layer) else {
            return Vec::new();
        };
        if tokens.len() != self.experts {
            return Vec::new();
        }
        rows.iter()
            .map(|row| {
                row.iter()
                    .map(|&e| tokens[e.index()] as f64 / self.copies(layer, e) as f64)
                    .sum()
            })
            .collect()
    }

    /// How far the expected MoE time is from perfect balance: over all layers, the sum of the
    /// most loaded device's load divided by the sum of the mean device load. Each MoE layer waits
    /// for its slowest device, so this is the expected slowdown against an ideal spread; 1.0 is
    /// perfect (also returned when there is no load). Errors if the load's shape differs.
    pub fn imbalance(&self, load: &ExpertLoad) -> Result<f64, PlacementError> {
        load.check_shape(self.layers(), self.experts)?;
        let (mut max_sum, mut mean_sum) = (0.0, 0.0);
        for layer in 0..self.layers() {
            let loads = self.device_loads(layer, load);
            max_sum += loads.iter().copied().fold(0.0, f64::max);
            mean_sum += loads.iter().sum::<f64>() / loads.len() as f64;
        }
        Ok(if mean_sum > 0.0 {
            max_sum / mean_sum
        } else {
            1.0
        })
    }

    /// How many expert copies `target` has that `self` does not (same layer, same device): the
    /// copies a migration from `self` to `target` must create, if every device of `self` can send.
    /// Counts 0 for shapes that differ in layers beyond the shorter one.
    pub fn copies_needed(&self, target: &Placement) -> usize {
        let mut n = 0;
        for layer in 0..self.layers().min(target.layers()) {
            for (d, &device) in target.devices.iter().enumerate() {
                n += target.slots[layer][d]
                    .iter()
                    .filter(|&&e| !self.holds(layer, device, e))
                    .count();
            }
        }
        n
    }

    /// Rows of one layer, in device order (crate-internal).
    pub(crate) fn layer_rows(&self, layer: usize) -> &[Vec<ExpertId>] {
        &self.slots[layer]
    }
}

/// SplitMix64's output function: a bijective mix so nearby hashes land far apart.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Sorted, unique, non-empty device list.
pub(crate) fn sorted_unique(devices: &[DeviceId]) -> Result<Vec<DeviceId>, PlacementError> {
    if devices.is_empty() {
        return Err(PlacementError::NoDevices);
    }
    let mut sorted = devices.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(PlacementError::DuplicateDevice(w[0]));
    }
    Ok(sorted)
}

/// Checks a constructor's request and returns the sorted devices.
fn check_request(
    shape: &PlacementShape,
    devices: &[DeviceId],
) -> Result<Vec<DeviceId>, PlacementError> {
    check_dims(shape.layers, shape.experts_per_layer)?;
    let devices = sorted_unique(devices)?;
    check_redundancy(
        shape.redundant_slots,
        shape.experts_per_layer,
        devices.len(),
    )?;
    Ok(devices)
}

pub(crate) fn check_redundancy(
    redundant: usize,
    experts: usize,
    devices: usize,
) -> Result<(), PlacementError> {
    let max = max_redundant_slots(experts, devices);
    if redundant > max {
        return Err(PlacementError::TooManyRedundantSlots {
            requested: redundant,
            max,
            devices,
            experts,
        });
    }
    Ok(())
}

/// Slot counts for `total` slots over `n` devices: the first `total % n` get one more.
pub(crate) fn balanced_counts(total: usize, n: usize) -> Vec<usize> {
    (0..n)
        .map(|d| total / n + usize::from(d < total % n))
        .collect()
}

/// Cuts the cyclic sequence `order, order, ...` (truncated to `total`) into `n` contiguous chunks
/// with [`balanced_counts`]. A chunk is at most `ceil(total / n) <= order.len()` long (the caller
/// checked `total <= n * order.len()`), so no chunk holds an expert twice.
fn cyclic_layout(order: &[ExpertId], total: usize, n: usize) -> Vec<Vec<ExpertId>> {
    let mut seq = order.iter().copied().cycle();
    balanced_counts(total, n)
        .into_iter()
        .map(|count| seq.by_ref().take(count).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devs(n: u32) -> Vec<DeviceId> {
        (0..n).map(DeviceId).collect()
    }

    fn ids(v: &[u32]) -> Vec<ExpertId> {
        v.iter().map(|&e| ExpertId(e)).collect()
    }

    #[test]
    fn balanced_is_contiguous_with_wrapping_replicas() {
        let p = Placement::balanced(&PlacementShape::new(2, 8, 2), &devs(3)).unwrap();
        assert_eq!(p.slots(0, DeviceId(0)), ids(&[0, 1, 2, 3]).as_slice());
        assert_eq!(p.slots(1, DeviceId(1)), ids(&[4, 5, 6]).as_slice());
        assert_eq!(p.slots(0, DeviceId(2)), ids(&[7, 0, 1]).as_slice());
        assert_eq!(
            p.holders(0, ExpertId(0)).collect::<Vec<_>>(),
            vec![DeviceId(0), DeviceId(2)]
        );
        assert_eq!(p.slot_of(0, DeviceId(2), ExpertId(1)), Some(2));
        assert_eq!(p.slot_of(0, DeviceId(1), ExpertId(1)), None);
        assert_eq!((p.redundant_slots(), p.max_slots_per_device()), (2, 4));
    }

    #[test]
    fn round_robin_without_replicas_is_modulo() {
        let p = Placement::round_robin(&PlacementShape::new(1, 10, 0), &devs(4)).unwrap();
        for e in 0..10u32 {
            let h: Vec<_> = p.holders(0, ExpertId(e)).collect();
            assert_eq!(h, vec![DeviceId(e % 4)]);
        }
        assert_eq!(p.slots(0, DeviceId(1)), ids(&[1, 5, 9]).as_slice());
    }

    #[test]
    fn from_slots_sorts_devices_and_rejects_bad_input() {
        let p = Placement::from_slots(
            3,
            &[DeviceId(7), DeviceId(2)],
            vec![vec![ids(&[0]), ids(&[1, 2])]],
        )
        .unwrap();
        assert_eq!(p.devices(), &[DeviceId(2), DeviceId(7)]);
        assert_eq!(p.slots(0, DeviceId(7)), ids(&[0]).as_slice());

        let d = [DeviceId(0), DeviceId(1)];
        let err = |slots: Vec<Vec<Vec<ExpertId>>>| Placement::from_slots(3, &d, slots).unwrap_err();
        assert_eq!(
            err(vec![vec![ids(&[0, 1]), ids(&[2, 3])]]),
            PlacementError::ExpertOutOfRange {
                layer: 0,
                device: DeviceId(1),
                expert: ExpertId(3),
                experts: 3
            }
        );
        assert_eq!(
            err(vec![vec![ids(&[0, 1, 0]), ids(&[2])]]),
            PlacementError::DuplicateSlot {
                layer: 0,
                device: DeviceId(0),
                expert: ExpertId(0)
            }
        );
        assert_eq!(
            err(vec![vec![ids(&[0]), ids(&[1])]]),
            PlacementError::MissingExpert {
                layer: 0,
                expert: ExpertId(2)
            }
        );
        assert_eq!(
            err(vec![
                vec![ids(&[0, 1]), ids(&[2])],
                vec![ids(&[0, 1]), ids(&[2, 0])]
            ]),
            PlacementError::UnequalSlotTotals {
                layer: 1,
                found: 4,
                expected: 3
            }
        );
        assert_eq!(
            err(vec![vec![ids(&[0, 1, 2])]]),
            PlacementError::DeviceCountMismatch {
                layer: 0,
                found: 1,
                expected: 2
            }
        );
        assert_eq!(err(vec![]), PlacementError::NoLayers);
        assert_eq!(
            Placement::from_slots(
                1,
                &[DeviceId(3), DeviceId(3)],
                vec![vec![ids(&[0]), vec![]]]
            ),
            Err(PlacementError::DuplicateDevice(DeviceId(3)))
        );
    }

    #[test]
    fn constructor_errors_explain_themselves() {
        let shape = PlacementShape::new(1, 4, 1);
        assert_eq!(
            Placement::balanced(&shape, &[]),
            Err(PlacementError::NoDevices)
        );
        let err = Placement::balanced(&shape, &devs(1)).unwrap_err();
        assert_eq!(
            err,
            PlacementError::TooManyRedundantSlots {
                requested: 1,
                max: 0,
                devices: 1,
                experts: 4
            }
        );
        assert!(
            err.to_string().contains("at most 0 redundant slots fit"),
            "{err}"
        );
        assert_eq!(
            Placement::round_robin(&PlacementShape::new(0, 4, 0), &devs(2)),
            Err(PlacementError::NoLayers)
        );
        let huge = Placement::balanced(&PlacementShape::new(58, usize::MAX, 0), &devs(2));
        assert!(
            matches!(huge, Err(PlacementError::TooLarge { .. })),
            "{huge:?}"
        );
        let load = ExpertLoad::uniform(1, 4).unwrap();
        assert_eq!(
            Placement::load_aware(&PlacementShape::new(1, 4, 2), &devs(2), &load, Some(2)),
            Err(PlacementError::SlotBudgetTooSmall {
                max_slots_per_device: 2,
                devices: 2,
                capacity: 4,
                needed: 6
            })
        );
        let wrong = ExpertLoad::uniform(2, 4).unwrap();
        assert!(matches!(
            Placement::load_aware(&PlacementShape::new(1, 4, 0), &devs(2), &wrong, None),
            Err(PlacementError::LoadShapeMismatch { .. })
        ));
    }

    #[test]
    fn replica_for_spreads_evenly_and_is_deterministic() {
        let p = Placement::balanced(&PlacementShape::new(1, 4, 4), &devs(4)).unwrap();
        let holders: Vec<_> = p.holders(0, ExpertId(0)).collect();
        assert_eq!(holders.len(), 2);
        let mut hits = [0u32; 2];
        for token in 0..10_000u64 {
            let d = p.replica_for(0, ExpertId(0), token).unwrap();
            assert_eq!(p.replica_for(0, ExpertId(0), token), Some(d));
            hits[holders.iter().position(|&h| h == d).unwrap()] += 1;
        }
        // Sequential hashes still split close to 50/50.
        assert!(
            hits.iter().all(|&h| (4_700..=5_300).contains(&h)),
            "{hits:?}"
        );
        assert_eq!(p.replica_for(0, ExpertId(9), 1), None);
        assert_eq!(p.replica_for(3, ExpertId(0), 1), None);
    }

    #[test]
    fn load_aware_beats_balanced_on_a_skewed_load() {
        // Experts 0..4 are hot and sit together on device 0 in the balanced layout.
        let mut row = vec![10u64; 32];
        for hot in row.iter_mut().take(4) {
            *hot = 400;
        }
        let load = ExpertLoad::from_rows(vec![row]).unwrap();
        let shape = PlacementShape::new(1, 32, 4);
        let balanced = Placement::balanced(&shape, &devs(4)).unwrap();
        let aware = Placement::load_aware(&shape, &devs(4), &load, None).unwrap();
        aware.check_invariants().unwrap();
        // The four hot experts got the four replicas.
        for e in 0..4 {
            assert_eq!(aware.copies(0, ExpertId(e)), 2);
        }
        let (b, a) = (
            balanced.imbalance(&load).unwrap(),
            aware.imbalance(&load).unwrap(),
        );
        assert!(a < 1.05, "load-aware imbalance {a}");
        assert!(b > 1.5, "balanced imbalance {b}");
    }

    #[test]
    fn device_loads_and_copies_needed() {
        let p = Placement::balanced(&PlacementShape::new(1, 4, 0), &devs(2)).unwrap();
        let load = ExpertLoad::from_rows(vec![vec![1, 2, 3, 4]]).unwrap();
        assert_eq!(p.device_loads(0, &load), vec![3.0, 7.0]);
        assert!((p.imbalance(&load).unwrap() - 7.0 / 5.0).abs() < 1e-12);
        let q = Placement::round_robin(&PlacementShape::new(1, 4, 0), &devs(2)).unwrap();
        // balanced: {0,1},{2,3}; round robin: {0,2},{1,3}: experts 2 and 1 change device.
        assert_eq!(p.copies_needed(&q), 2);
        assert_eq!(p.copies_needed(&p), 0);
    }
}
