//! [`MigrationPlan`]: the ordered steps that take one placement to another.

use std::collections::BTreeMap;

use crate::{DeviceId, ExpertId, Placement, PlanError};

/// One step of a [`MigrationPlan`]. Steps run in order; each one changes at most one copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrationStep {
    /// The copy stays where it is (the engine maps the existing chunk into the new layout,
    /// zero-copy). Changes nothing.
    Keep {
        /// MoE layer.
        layer: usize,
        /// The device that keeps it.
        device: DeviceId,
        /// The expert.
        expert: ExpertId,
    },
    /// Copy an expert peer-to-peer from `from` (which keeps its copy) to `to`.
    Move {
        /// MoE layer.
        layer: usize,
        /// The expert.
        expert: ExpertId,
        /// A device holding a live copy: the least-loaded one (fewest copies sent so far).
        from: DeviceId,
        /// The device receiving it.
        to: DeviceId,
    },
    /// Release a copy. Never the last live copy of an expert.
    Drop {
        /// MoE layer.
        layer: usize,
        /// The device releasing it.
        device: DeviceId,
        /// The expert.
        expert: ExpertId,
    },
    /// Load an expert from the checkpoint: only for an expert whose every copy was on failed
    /// devices, and only once per such expert (later copies come from this one).
    Reload {
        /// MoE layer.
        layer: usize,
        /// The expert.
        expert: ExpertId,
        /// The device receiving it.
        to: DeviceId,
    },
}

/// Expert memory each device may use, in bytes, over all layers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryBudgets {
    bytes: BTreeMap<DeviceId, u64>,
}

impl MemoryBudgets {
    /// No budgets yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same budget for every device listed.
    pub fn uniform(devices: impl IntoIterator<Item = DeviceId>, bytes: u64) -> Self {
        devices.into_iter().map(|d| (d, bytes)).collect()
    }

    /// Sets one device's budget (replacing any earlier one).
    pub fn set(&mut self, device: DeviceId, bytes: u64) -> &mut Self {
        self.bytes.insert(device, bytes);
        self
    }

    /// One device's budget.
    pub fn get(&self, device: DeviceId) -> Option<u64> {
        self.bytes.get(&device).copied()
    }
}

impl FromIterator<(DeviceId, u64)> for MemoryBudgets {
    fn from_iter<I: IntoIterator<Item = (DeviceId, u64)>>(iter: I) -> Self {
        Self {
            bytes: iter.into_iter().collect(),
        }
    }
}

/// The steps from an old placement to a new one, and what they cost.
///
/// # Guarantees (replayed by [`MigrationPlan::validate`])
/// - every expert that has a live copy keeps at least one at every step (an expert lost with
///   failed devices has none until its reload, and at least one from then on);
/// - no device holds more than its budget at any step;
/// - after the last step the copies are exactly the new placement's;
/// - every copy both placements share gets a [`MigrationStep::Keep`]; copies are created by
///   [`MigrationStep::Move`] from the least-loaded live holder, or by [`MigrationStep::Reload`] only for experts
///   with no live copy left (one reload each, the fewest possible);
/// - order: keeps; then copies, reloads first, then experts whose only live copies are on leaving
///   devices (so those devices empty out first), then the rest; then drops, leaving devices first.
///   A drop comes before a copy only where a device's budget cannot hold its old and new experts
///   at once ([`MigrationPlan::drops_deferred`] says whether that happened).
///
/// Execution model: the engine keeps serving from the old deployment while copies run. A drop
/// must wait until no routing table in use points at that copy; while copies and drops
/// interleave, route to the expert's other live copies (one is guaranteed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationPlan {
    steps: Vec<MigrationStep>,
    expert_bytes: u64,
    failed: Vec<DeviceId>,
    bytes_moved: u64,
    bytes_reloaded: u64,
    peak: BTreeMap<DeviceId, u64>,
    staged: usize,
}

impl MigrationPlan {
    /// Plans a migration in which every device of `old` stays reachable until its copies are
    /// dropped (scale-up, graceful scale-down, rebalance). `expert_bytes` is the size of one
    /// expert of one layer; `budgets` must cover every device of both placements.
    pub fn between(
        old: &Placement,
        new: &Placement,
        expert_bytes: u64,
        budgets: &MemoryBudgets,
    ) -> Result<Self, PlanError> {
        Self::between_after_failure(old, new, &[], expert_bytes, budgets)
    }

    /// Plans a migration after the devices in `failed` vanished: their copies are gone, they can
    /// send nothing, and `new` must not use them. Experts left without a live copy are reloaded
    /// from the checkpoint once each, then copied peer-to-peer to their other target devices.
    pub fn between_after_failure(
        old: &Placement,
        new: &Placement,
        failed: &[DeviceId],
        expert_bytes: u64,
        budgets: &MemoryBudgets,
    ) -> Result<Self, PlanError> {
        Scheduler::new(old, new, failed, expert_bytes, budgets)?.run()
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[MigrationStep] {
        &self.steps
    }

    /// Size of one expert of one layer, as given.
    pub fn expert_bytes(&self) -> u64 {
        self.expert_bytes
    }

    /// The failed devices, as given (sorted, without repeats).
    pub fn failed_devices(&self) -> &[DeviceId] {
        &self.failed
    }

    /// Bytes copied peer-to-peer (every [`MigrationStep::Move`], temporary staging copies included).
    pub fn bytes_moved(&self) -> u64 {
        self.bytes_moved
    }

    /// Bytes loaded from the checkpoint (every [`MigrationStep::Reload`]).
    pub fn bytes_reloaded(&self) -> u64 {
        self.bytes_reloaded
    }

    /// The most expert bytes each device holds at any point of the plan (devices of both
    /// placements, failed ones excluded).
    pub fn peak_bytes_per_device(&self) -> &BTreeMap<DeviceId, u64> {
        &self.peak
    }

    /// Number of [`MigrationStep::Move`]s.
    pub fn moves(&self) -> usize {
        self.count(|s| matches!(s, MigrationStep::Move { .. }))
    }

    /// Number of [`MigrationStep::Reload`]s.
    pub fn reloads(&self) -> usize {
        self.count(|s| matches!(s, MigrationStep::Reload { .. }))
    }

    /// Number of [`MigrationStep::Keep`]s.
    pub fn keeps(&self) -> usize {
        self.count(|s| matches!(s, MigrationStep::Keep { .. }))
    }

    /// Number of [`MigrationStep::Drop`]s.
    pub fn drops(&self) -> usize {
        self.count(|s| matches!(s, MigrationStep::Drop { .. }))
    }

    fn count(&self, f: impl Fn(&MigrationStep) -> bool) -> usize {
        self.steps.iter().filter(|s| f(s)).count()
    }

    /// Copies made only to break a cycle of full devices (each also dropped later). They are
    /// counted in [`MigrationPlan::bytes_moved`]; 0 whenever budgets leave any slack.
    pub fn staged_copies(&self) -> usize {
        self.staged
    }

    /// Whether every drop comes after every copy, so the whole copy phase can run while the old
    /// deployment serves unchanged.
    pub fn drops_deferred(&self) -> bool {
        let last_copy = self
            .steps
            .iter()
            .rposition(|s| matches!(s, MigrationStep::Move { .. } | MigrationStep::Reload { .. }));
        let first_drop = self
            .steps
            .iter()
            .position(|s| matches!(s, MigrationStep::Drop { .. }));
        match (last_copy, first_drop) {
            (Some(c), Some(d)) => c < d,
            _ => true,
        }
    }
}

/// A copy the target needs that the live state lacks.
#[derive(Debug, Clone, Copy)]
struct Create {
    layer: usize,
    expert: usize,
    to: usize,
    done: bool,
}

/// A copy the target does not have (or a staging copy).
#[derive(Debug, Clone, Copy)]
struct Release {
    layer: usize,
    device: usize,
    expert: usize,
    done: bool,
}

/// The planner's working state. Devices are indices into `devices` (old and new, sorted).
struct Scheduler {
    experts: usize,
    devices: Vec<DeviceId>,
    failed: Vec<DeviceId>,
    expert_bytes: u64,
    /// `holds[(layer * devices + device) * experts + expert]`: a live copy.
    holds: Vec<bool>,
    /// `live[layer * experts + expert]`: live copies.
    live: Vec<u32>,
    used: Vec<u64>,
    budget: Vec<u64>,
    peak: Vec<u64>,
    sent: Vec<u64>,
    steps: Vec<MigrationStep>,
    creates: Vec<Create>,
    releases: Vec<Release>,
    /// Indices into `releases`, per device.
    releases_on: Vec<Vec<usize>>,
    pending_to: Vec<usize>,
    staged: usize,
    bytes_moved: u64,
    bytes_reloaded: u64,
}

impl Scheduler {
    fn new(
        old: &Placement,
        new: &Placement,
        failed: &[DeviceId],
        expert_bytes: u64,
        budgets: &MemoryBudgets,
    ) -> Result<Self, PlanError> {
        let (layers, experts) = (old.layers(), old.experts_per_layer());
        if (layers, experts) != (new.layers(), new.experts_per_layer()) {
            return Err(PlanError::ShapeMismatch {
                old_layers: layers,
                old_experts: experts,
                new_layers: new.layers(),
                new_experts: new.experts_per_layer(),
            });
        }
        if expert_bytes == 0 {
            return Err(PlanError::ZeroExpertBytes);
        }
        let mut failed = failed.to_vec();
        failed.sort_unstable();
        failed.dedup();
        for &d in &failed {
            if old.device_index(d).is_none() {
                return Err(PlanError::FailedDeviceNotInOld { device: d });
            }
            if new.device_index(d).is_some() {
                return Err(PlanError::FailedDeviceInTarget { device: d });
            }
        }
        let mut devices: Vec<DeviceId> =
            old.devices().iter().chain(new.devices()).copied().collect();
        devices.sort_unstable();
        devices.dedup();
        devices.retain(|d| failed.binary_search(d).is_err());
        let nu = devices.len();
        let budget = devices
            .iter()
            .map(|&device| {
                budgets
                    .get(device)
                    .ok_or(PlanError::MissingBudget { device })
            })
            .collect::<Result<Vec<u64>, _>>()?;

        let needed = (layers as u64 * experts as u64).saturating_mul(expert_bytes);
        let total_budget = new
            .devices()
            .iter()
            .map(|&d| budget[devices.binary_search(&d).expect("new devices are listed")])
            .fold(0u64, u64::saturating_add);
        if total_budget < needed {
            return Err(PlanError::BudgetTooSmall {
                needed,
                total_budget,
            });
        }
        for &device in new.devices() {
            let slots: usize = (0..layers).map(|l| new.slots(l, device).len()).sum();
            let bytes = (slots as u64).saturating_mul(expert_bytes);
            let b = budget[devices
                .binary_search(&device)
                .expect("new devices are listed")];
            if bytes > b {
                return Err(PlanError::TargetOverBudget {
                    device,
                    slots,
                    bytes,
                    budget: b,
                });
            }
        }

        let mut s = Self {
            experts,
            holds: vec![false; layers * nu * experts],
            live: vec![0; layers * experts],
            used: vec![0; nu],
            peak: vec![0; nu],
            sent: vec![0; nu],
            budget,
            devices,
            failed,
            expert_bytes,
            steps: Vec::new(),
            creates: Vec::new(),
            releases: Vec::new(),
            releases_on: vec![Vec::new(); nu],
            pending_to: vec![0; nu],
            staged: 0,
            bytes_moved: 0,
            bytes_reloaded: 0,
        };
        for (u, &device) in s.devices.clone().iter().enumerate() {
            for layer in 0..layers {
                for &x in old.slots(layer, device) {
                    s.add(layer, u, x.index());
                }
            }
            if s.used[u] > s.budget[u] {
                return Err(PlanError::OldOverBudget {
                    device,
                    bytes: s.used[u],
                    budget: s.budget[u],
                });
            }
        }
        s.peak.clone_from(&s.used);

        let leaving: Vec<bool> = s
            .devices
            .iter()
            .map(|&d| new.device_index(d).is_none())
            .collect();
        // Keeps, and the copies to create, with their priority.
        let mut creates = Vec::new();
        for layer in 0..layers {
            for &device in new.devices() {
                let u = s.index(device);
                for &x in new.slots(layer, device) {
                    let x = x.index();
                    if s.held(layer, u, x) {
                        s.steps.push(MigrationStep::Keep {
                            layer,
                            device,
                            expert: ExpertId(x as u32),
                        });
                    } else {
                        let priority = if s.live[layer * experts + x] == 0 {
                            0
                        } else if (0..nu).all(|v| !s.held(layer, v, x) || leaving[v]) {
                            1
                        } else {
                            2
                        };
                        creates.push((priority, layer, x, u));
                    }
                }
            }
        }
        creates.sort_unstable();
        s.creates = creates
            .into_iter()
            .map(|(_, layer, expert, to)| Create {
                layer,
                expert,
                to,
                done: false,
            })
            .collect();
        for c in &s.creates {
            s.pending_to[c.to] += 1;
        }
        // Copies the target does not have, leaving devices first.
        let mut releases = Vec::new();
        for (u, &device) in s.devices.iter().enumerate() {
            for layer in 0..layers {
                for &x in old.slots(layer, device) {
                    if !new.holds(layer, device, x) {
                        releases.push((!leaving[u], layer, u, x.index()));
                    }
                }
            }
        }
        releases.sort_unstable();
        for (_, layer, device, expert) in releases {
            s.push_release(layer, device, expert);
        }
        Ok(s)
    }

    fn index(&self, device: DeviceId) -> usize {
        self.devices
            .binary_search(&device)
            .expect("device is in the union of both placements")
    }

    fn slot(&self, layer: usize, u: usize, x: usize) -> usize {
        (layer * self.devices.len() + u) * self.experts + x
    }

    fn held(&self, layer: usize, u: usize, x: usize) -> bool {
        self.holds[self.slot(layer, u, x)]
    }

    fn add(&mut self, layer: usize, u: usize, x: usize) {
        let i = self.slot(layer, u, x);
        self.holds[i] = true;
        self.live[layer * self.experts + x] += 1;
        self.used[u] = self.used[u].saturating_add(self.expert_bytes);
        self.peak[u] = self.peak[u].max(self.used[u]);
    }

    fn remove(&mut self, layer: usize, u: usize, x: usize) {
        let i = self.slot(layer, u, x);
        self.holds[i] = false;
        self.live[layer * self.experts + x] -= 1;
        self.used[u] = self.used[u].saturating_sub(self.expert_bytes);
    }

    fn has_room(&self, u: usize) -> bool {
        self.used[u].saturating_add(self.expert_bytes) <= self.budget[u]
    }

    fn push_release(&mut self, layer: usize, device: usize, expert: usize) {
        self.releases_on[device].push(self.releases.len());
        self.releases.push(Release {
            layer,
            device,
            expert,
            done: false,
        });
    }

    fn run(mut self) -> Result<MigrationPlan, PlanError> {
        let mut remaining = self.creates.len();
        // A generous bound on stuck rounds; each round drops or stages at least one copy.
        let mut rounds_left = self.releases.len() + self.creates.len() + 1;
        while remaining > 0 {
            let mut progressed = false;
            for i in 0..self.creates.len() {
                if !self.creates[i].done && self.try_create(i) {
                    remaining -= 1;
                    progressed = true;
                }
            }
            if remaining == 0 || progressed {
                continue;
            }
            if rounds_left == 0 || !(self.free_room() || self.stage()) {
                let c = self
                    .creates
                    .iter()
                    .find(|c| !c.done)
                    .expect("creates remain");
                return Err(PlanError::NoFeasibleOrder {
                    device: self.devices[c.to],
                    layer: c.layer,
                    expert: ExpertId(c.expert as u32),
                });
            }
            rounds_left -= 1;
        }
        // Every target copy exists, so none of the remaining drops is an expert's last copy.
        for i in 0..self.releases.len() {
            if !self.releases[i].done {
                self.release(i);
            }
        }
        let peak = self
            .devices
            .iter()
            .copied()
            .zip(self.peak.iter().copied())
            .collect();
        Ok(MigrationPlan {
            steps: self.steps,
            expert_bytes: self.expert_bytes,
            failed: self.failed,
            bytes_moved: self.bytes_moved,
            bytes_reloaded: self.bytes_reloaded,
            peak,
            staged: self.staged,
        })
    }

    /// Creates copy `i` if its destination has room.
    fn try_create(&mut self, i: usize) -> bool {
        let Create {
            layer, expert, to, ..
        } = self.creates[i];
        if !self.has_room(to) {
            return false;
        }
        let x = ExpertId(expert as u32);
        let dest = self.devices[to];
        if self.live[layer * self.experts + expert] == 0 {
            self.steps.push(MigrationStep::Reload {
                layer,
                expert: x,
                to: dest,
            });
            self.bytes_reloaded = self.bytes_reloaded.saturating_add(self.expert_bytes);
        } else {
            let from = self.source(layer, expert);
            self.sent[from] += 1;
            self.steps.push(MigrationStep::Move {
                layer,
                expert: x,
                from: self.devices[from],
                to: dest,
            });
            self.bytes_moved = self.bytes_moved.saturating_add(self.expert_bytes);
        }
        self.add(layer, to, expert);
        self.creates[i].done = true;
        self.pending_to[to] -= 1;
        true
    }

    /// The live holder that has sent the fewest copies so far (ties: lower device id).
    fn source(&self, layer: usize, x: usize) -> usize {
        (0..self.devices.len())
            .filter(|&u| self.held(layer, u, x))
            .min_by_key(|&u| (self.sent[u], u))
            .expect("an expert with live copies has a holder")
    }

    fn release(&mut self, i: usize) {
        let Release {
            layer,
            device,
            expert,
            ..
        } = self.releases[i];
        debug_assert!(
            self.live[layer * self.experts + expert] >= 2,
            "never drop a last copy"
        );
        self.remove(layer, device, expert);
        self.releases[i].done = true;
        self.steps.push(MigrationStep::Drop {
            layer,
            device: self.devices[device],
            expert: ExpertId(expert as u32),
        });
    }

    /// Devices that must receive copies but are full.
    fn blocked(&self) -> Vec<usize> {
        (0..self.devices.len())
            .filter(|&u| self.pending_to[u] > 0 && !self.has_room(u))
            .collect()
    }

    /// On each blocked device, drops one copy the target does not need and that is not its
    /// expert's last. Returns whether it dropped anything.
    fn free_room(&mut self) -> bool {
        let mut freed = false;
        for u in self.blocked() {
            let candidate = self.releases_on[u].iter().copied().find(|&i| {
                let r = self.releases[i];
                !r.done && self.live[r.layer * self.experts + r.expert] >= 2
            });
            if let Some(i) = candidate {
                self.release(i);
                freed = true;
            }
        }
        freed
    }

    /// Breaks a cycle of full devices: copies the last live copy of an unneeded expert off a
    /// blocked device onto a device with room (preferring one that expects no copies), then drops
    /// the original. The staging copy is dropped at the end.
    fn stage(&mut self) -> bool {
        for u in self.blocked() {
            let candidates: Vec<usize> = self.releases_on[u]
                .iter()
                .copied()
                .filter(|&i| !self.releases[i].done)
                .collect();
            for i in candidates {
                let Release { layer, expert, .. } = self.releases[i];
                let host = (0..self.devices.len())
                    .filter(|&f| f != u && self.has_room(f) && !self.held(layer, f, expert))
                    .min_by_key(|&f| {
                        (
                            self.pending_to[f] > 0,
                            std::cmp::Reverse(self.budget[f] - self.used[f]),
                            f,
                        )
                    });
                let Some(f) = host else { continue };
                self.sent[u] += 1;
                self.steps.push(MigrationStep::Move {
                    layer,
                    expert: ExpertId(expert as u32),
                    from: self.devices[u],
                    to: self.devices[f],
                });
                self.bytes_moved = self.bytes_moved.saturating_add(self.expert_bytes);
                self.staged += 1;
                self.add(layer, f, expert);
                self.push_release(layer, f, expert);
                self.release(i);
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExpertLoad, PlacementShape, PlanViolation};

    const EB: u64 = 100;

    fn one_layer(devices: &[u32], rows: &[&[u32]], experts: usize) -> Placement {
        let devices: Vec<DeviceId> = devices.iter().map(|&d| DeviceId(d)).collect();
        let rows = rows
            .iter()
            .map(|r| r.iter().map(|&e| ExpertId(e)).collect())
            .collect();
        Placement::from_slots(experts, &devices, vec![rows]).unwrap()
    }

    fn budgets(pairs: &[(u32, u64)]) -> MemoryBudgets {
        pairs
            .iter()
            .map(|&(d, slots)| (DeviceId(d), slots * EB))
            .collect()
    }

    #[test]
    fn swap_cycle_is_staged_through_spare_room() {
        let old = one_layer(&[0, 1, 2], &[&[0], &[1], &[2]], 3);
        let new = one_layer(&[0, 1, 2], &[&[1], &[0], &[2]], 3);
        let b = budgets(&[(0, 1), (1, 1), (2, 2)]);
        let plan = MigrationPlan::between(&old, &new, EB, &b).unwrap();
        assert_eq!(plan.staged_copies(), 1);
        assert_eq!(
            plan.bytes_moved(),
            3 * EB,
            "two real copies and one staging copy"
        );
        assert!(!plan.drops_deferred());
        let report = plan.validate(&old, &new, &b).unwrap();
        assert_eq!(report.min_live_copies, 1);
        assert_eq!(plan.peak_bytes_per_device()[&DeviceId(2)], 2 * EB);

        // Without the spare slot on device 2 no order exists.
        let b = budgets(&[(0, 1), (1, 1), (2, 1)]);
        let err = MigrationPlan::between(&old, &new, EB, &b).unwrap_err();
        assert!(matches!(err, PlanError::NoFeasibleOrder { .. }), "{err}");
        assert!(err.to_string().contains("give at least one device room"));
    }

    #[test]
    fn a_full_device_drops_a_replica_before_receiving() {
        // Device 0 holds {0, 1}; expert 1 also lives on device 1. Device 0 must end with {0, 2}
        // within a 2-slot budget, so it drops its replica of 1 first.
        let old = one_layer(&[0, 1], &[&[0, 1], &[1, 2]], 3);
        let new = one_layer(&[0, 1], &[&[0, 2], &[1, 2]], 3);
        let b = budgets(&[(0, 2), (1, 2)]);
        let plan = MigrationPlan::between(&old, &new, EB, &b).unwrap();
        let layer = 0;
        assert_eq!(
            plan.steps(),
            &[
                MigrationStep::Keep {
                    layer,
                    device: DeviceId(0),
                    expert: ExpertId(0)
                },
                MigrationStep::Keep {
                    layer,
                    device: DeviceId(1),
                    expert: ExpertId(1)
                },
                MigrationStep::Keep {
                    layer,
                    device: DeviceId(1),
                    expert: ExpertId(2)
                },
                MigrationStep::Drop {
                    layer,
                    device: DeviceId(0),
                    expert: ExpertId(1)
                },
                MigrationStep::Move {
                    layer,
                    expert: ExpertId(2),
                    from: DeviceId(1),
                    to: DeviceId(0)
                },
            ]
        );
        assert_eq!(plan.staged_copies(), 0);
        plan.validate(&old, &new, &b).unwrap();
    }

    #[test]
    fn moves_spread_over_the_least_loaded_sources() {
        // Expert 0 has copies on devices 0 and 1; device 2..5 each need it.
        let old = one_layer(
            &[0, 1, 2, 3, 4, 5],
            &[&[0, 1], &[0, 2], &[3], &[4], &[5], &[]],
            6,
        );
        let new = one_layer(
            &[0, 1, 2, 3, 4, 5],
            &[&[0, 1], &[0, 2], &[3, 0], &[4, 0], &[5, 0], &[0]],
            6,
        );
        let b = MemoryBudgets::uniform((0..6).map(DeviceId), 10 * EB);
        let plan = MigrationPlan::between(&old, &new, EB, &b).unwrap();
        let sources: Vec<DeviceId> = plan
            .steps()
            .iter()
            .filter_map(|s| match s {
                MigrationStep::Move { from, .. } => Some(*from),
                _ => None,
            })
            .collect();
        // Each new copy may be a source for the next: the sender with the fewest sends wins.
        assert_eq!(sources.len(), 4);
        let max_per_source = (0..6)
            .map(|d| sources.iter().filter(|&&s| s == DeviceId(d)).count())
            .max()
            .unwrap();
        assert_eq!(max_per_source, 1, "{sources:?}");
        plan.validate(&old, &new, &b).unwrap();
    }

    #[test]
    fn scale_down_empties_the_leaving_device_first() {
        let shape = PlacementShape::new(2, 12, 2);
        let all: Vec<DeviceId> = (0..4).map(DeviceId).collect();
        let old = Placement::balanced(&shape, &all).unwrap();
        let stay = [DeviceId(0), DeviceId(2), DeviceId(3)];
        let load = ExpertLoad::uniform(2, 12).unwrap();
        let new = Placement::rebalanced_for(&old, &stay, &load).unwrap();
        let b = MemoryBudgets::uniform(all.iter().copied(), 100 * EB);
        let plan = MigrationPlan::between(&old, &new, EB, &b).unwrap();
        plan.validate(&old, &new, &b).unwrap();
        let steps = plan.steps();
        let first_drop = steps
            .iter()
            .position(|s| matches!(s, MigrationStep::Drop { .. }))
            .unwrap();
        assert!(plan.drops_deferred());
        // The first drops are all the leaving device's.
        let leaving_drops = old.slots(0, DeviceId(1)).len() + old.slots(1, DeviceId(1)).len();
        for s in &steps[first_drop..first_drop + leaving_drops] {
            assert!(
                matches!(
                    s,
                    MigrationStep::Drop {
                        device: DeviceId(1),
                        ..
                    }
                ),
                "{s:?}"
            );
        }
        assert_eq!(plan.bytes_moved(), leaving_drops as u64 * EB);
    }

    #[test]
    fn failure_reloads_only_lost_experts_once() {
        // Expert 0 lives on devices 0 and 1, expert 1 only on device 1, expert 2 on device 2.
        let old = one_layer(&[0, 1, 2], &[&[0], &[0, 1], &[2]], 3);
        let new = one_layer(&[0, 2], &[&[0, 1], &[2, 1]], 3);
        let b = MemoryBudgets::uniform((0..3).map(DeviceId), 4 * EB);
        let plan =
            MigrationPlan::between_after_failure(&old, &new, &[DeviceId(1)], EB, &b).unwrap();
        assert_eq!(plan.reloads(), 1);
        assert_eq!(
            plan.moves(),
            1,
            "the second copy of expert 1 comes from the reloaded one"
        );
        assert_eq!(plan.bytes_reloaded(), EB);
        assert!(matches!(
            plan.steps()[2],
            MigrationStep::Reload {
                expert: ExpertId(1),
                ..
            }
        ));
        assert_eq!(plan.failed_devices(), &[DeviceId(1)]);
        plan.validate(&old, &new, &b).unwrap();
        // Replaying as if nothing failed catches the needless reload.
        let graceful = MigrationPlan {
            failed: Vec::new(),
            ..plan.clone()
        };
        assert!(matches!(
            graceful.validate(&old, &new, &b),
            Err(PlanViolation::NeedlessReload { .. })
        ));
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        let old = one_layer(&[0, 1], &[&[0, 1], &[2]], 3);
        let new = one_layer(&[0, 1], &[&[0], &[1, 2]], 3);
        let b = MemoryBudgets::uniform([DeviceId(0), DeviceId(1)], 2 * EB);
        assert_eq!(
            MigrationPlan::between(&old, &new, 0, &b),
            Err(PlanError::ZeroExpertBytes)
        );
        let other = one_layer(&[0], &[&[0, 1]], 2);
        assert!(matches!(
            MigrationPlan::between(&old, &other, EB, &b),
            Err(PlanError::ShapeMismatch {
                old_experts: 3,
                new_experts: 2,
                ..
            })
        ));
        let partial = budgets(&[(0, 2)]);
        assert_eq!(
            MigrationPlan::between(&old, &new, EB, &partial),
            Err(PlanError::MissingBudget {
                device: DeviceId(1)
            })
        );
        let small = budgets(&[(0, 1), (1, 1)]);
        let err = MigrationPlan::between(&old, &new, EB, &small).unwrap_err();
        assert_eq!(
            err,
            PlanError::BudgetTooSmall {
                needed: 3 * EB,
                total_budget: 2 * EB
            }
        );
        assert!(
            err.to_string().contains("one copy of every expert"),
            "{err}"
        );
        let lopsided = budgets(&[(0, 2), (1, 1)]);
        assert_eq!(
            MigrationPlan::between(&old, &new, EB, &lopsided),
            Err(PlanError::TargetOverBudget {
                device: DeviceId(1),
                slots: 2,
                bytes: 2 * EB,
                budget: EB
            })
        );
        let before = budgets(&[(0, 1), (1, 2)]);
        assert_eq!(
            MigrationPlan::between(&old, &new, EB, &before),
            Err(PlanError::OldOverBudget {
                device: DeviceId(0),
                bytes: 2 * EB,
                budget: EB
            })
        );
        assert_eq!(
            MigrationPlan::between_after_failure(&old, &new, &[DeviceId(1)], EB, &b),
            Err(PlanError::FailedDeviceInTarget {
                device: DeviceId(1)
            })
        );
        assert_eq!(
            MigrationPlan::between_after_failure(&old, &new, &[DeviceId(7)], EB, &b),
            Err(PlanError::FailedDeviceNotInOld {
                device: DeviceId(7)
            })
        );
    }

    #[test]
    fn replay_catches_a_plan_checked_against_the_wrong_inputs() {
        let old = one_layer(&[0, 1], &[&[0, 1], &[2]], 3);
        let new = one_layer(&[0, 1], &[&[0], &[1, 2]], 3);
        let b = MemoryBudgets::uniform([DeviceId(0), DeviceId(1)], 3 * EB);
        let plan = MigrationPlan::between(&old, &new, EB, &b).unwrap();
        plan.validate(&old, &new, &b).unwrap();
        // Another target: the final state differs.
        let elsewhere = one_layer(&[0, 1], &[&[0, 1], &[1, 2]], 3);
        assert_eq!(
            plan.validate(&old, &elsewhere, &b),
            Err(PlanViolation::FinalStateDiffers {
                layer: 0,
                device: DeviceId(0),
                expert: ExpertId(1),
                what: "lacks"
            })
        );
        // A tighter budget than planned for: the copy to device 1 overflows it.
        let tight = budgets(&[(0, 2), (1, 1)]);
        assert!(matches!(
            plan.validate(&old, &new, &tight),
            Err(PlanViolation::OverBudget {
                device: DeviceId(1),
                ..
            })
        ));
        // A different starting point: the move reads a copy that is not there.
        let start = one_layer(&[0, 1], &[&[0], &[1, 2]], 3);
        assert!(matches!(
            plan.validate(&start, &new, &b),
            Err(PlanViolation::BadKeep { .. } | PlanViolation::SourceNotLive { .. })
        ));
        // Dropping steps breaks the final state; doctored accounting is caught too.
        let truncated = MigrationPlan {
            steps: plan.steps[..plan.steps.len() - 1].to_vec(),
            ..plan.clone()
        };
        assert!(truncated.validate(&old, &new, &b).is_err());
        let inflated = MigrationPlan {
            bytes_moved: plan.bytes_moved + 1,
            ..plan.clone()
        };
        assert!(matches!(
            inflated.validate(&old, &new, &b),
            Err(PlanViolation::ReportMismatch {
                what: "bytes moved",
                ..
            })
        ));
        let last_copy = MigrationPlan {
            steps: vec![MigrationStep::Drop {
                layer: 0,
                device: DeviceId(1),
                expert: ExpertId(2),
            }],
            ..plan.clone()
        };
        assert!(matches!(
            last_copy.validate(&old, &new, &b),
            Err(PlanViolation::LastReplicaDropped { step: 0, .. })
        ));
    }
}
