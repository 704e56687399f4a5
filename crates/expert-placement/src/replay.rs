//! [`MigrationPlan::validate`]: an independent replay of a plan, step by step.
//!
//! Kept deliberately simple (ordered sets and maps, no code shared with the planner) so that it
//! checks the planner rather than repeating its mistakes.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    DeviceId, ExpertId, MemoryBudgets, MigrationPlan, MigrationStep, Placement, PlanViolation,
};

/// What a replay measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// Bytes copied peer-to-peer.
    pub bytes_moved: u64,
    /// Bytes loaded from the checkpoint.
    pub bytes_reloaded: u64,
    /// The most bytes each device held at any step.
    pub peak_bytes: BTreeMap<DeviceId, u64>,
    /// The fewest live copies that any expert had after any step, counting only experts that had
    /// a copy at that point (so it is at least 1 whenever the plan is valid).
    pub min_live_copies: u32,
}

/// `(layer, device, expert)`.
type Copy = (usize, DeviceId, ExpertId);

fn copies_of(p: &Placement) -> BTreeSet<Copy> {
    let mut set = BTreeSet::new();
    for layer in 0..p.layers() {
        for &d in p.devices() {
            for &x in p.slots(layer, d) {
                set.insert((layer, d, x));
            }
        }
    }
    set
}

/// The replayed state.
struct Replay<'a> {
    failed: BTreeSet<DeviceId>,
    budgets: &'a MemoryBudgets,
    expert_bytes: u64,
    state: BTreeSet<Copy>,
    live: BTreeMap<(usize, ExpertId), u32>,
    used: BTreeMap<DeviceId, u64>,
    peak: BTreeMap<DeviceId, u64>,
}

impl Replay<'_> {
    fn budget(&self, device: DeviceId) -> Result<u64, PlanViolation> {
        self.budgets
            .get(device)
            .ok_or(PlanViolation::MissingBudget { device })
    }

    fn live(&self, layer: usize, expert: ExpertId) -> u32 {
        self.live.get(&(layer, expert)).copied().unwrap_or(0)
    }

    fn receive(
        &mut self,
        step: usize,
        layer: usize,
        expert: ExpertId,
        to: DeviceId,
    ) -> Result<(), PlanViolation> {
        if self.failed.contains(&to) {
            return Err(PlanViolation::FailedDeviceUsed { step, device: to });
        }
        if !self.state.insert((layer, to, expert)) {
            return Err(PlanViolation::AlreadyHeld {
                step,
                layer,
                expert,
                device: to,
            });
        }
        let budget = self.budget(to)?;
        let bytes = self.used.entry(to).or_default();
        *bytes = bytes.saturating_add(self.expert_bytes);
        if *bytes > budget {
            return Err(PlanViolation::OverBudget {
                step,
                device: to,
                bytes: *bytes,
                budget,
            });
        }
        let bytes = *bytes;
        let peak = self.peak.entry(to).or_default();
        *peak = (*peak).max(bytes);
        *self.live.entry((layer, expert)).or_default() += 1;
        Ok(())
    }
}

impl MigrationPlan {
    /// Replays the plan from `old` (minus the failed devices' copies) and checks every guarantee
    /// listed on [`MigrationPlan`]: every live expert keeps a live copy at every step, no device
    /// goes over its budget in `budgets`, moves read from live copies, reloads happen only for
    /// experts without a live copy, every shared copy has a keep, and the final state is exactly
    /// `new`. It also checks that the plan's reported bytes and peaks match the replay.
    pub fn validate(
        &self,
        old: &Placement,
        new: &Placement,
        budgets: &MemoryBudgets,
    ) -> Result<ReplayReport, PlanViolation> {
        let (layers, experts) = (old.layers(), old.experts_per_layer());
        if (layers, experts) != (new.layers(), new.experts_per_layer()) {
            return Err(PlanViolation::ShapeMismatch {
                old_layers: layers,
                old_experts: experts,
                new_layers: new.layers(),
                new_experts: new.experts_per_layer(),
            });
        }
        let failed: BTreeSet<DeviceId> = self.failed_devices().iter().copied().collect();
        let target = copies_of(new);
        let initial: BTreeSet<Copy> = copies_of(old)
            .into_iter()
            .filter(|(_, d, _)| !failed.contains(d))
            .collect();
        let mut r = Replay {
            failed,
            budgets,
            expert_bytes: self.expert_bytes(),
            state: initial.clone(),
            live: BTreeMap::new(),
            used: BTreeMap::new(),
            peak: BTreeMap::new(),
        };
        for d in old.devices().iter().chain(new.devices()) {
            if !r.failed.contains(d) {
                r.used.insert(*d, 0);
            }
        }
        for &(layer, d, x) in &initial {
            let used = r.used.get_mut(&d).expect("old devices are listed");
            *used = used.saturating_add(r.expert_bytes);
            *r.live.entry((layer, x)).or_default() += 1;
        }
        for (&device, &bytes) in &r.used {
            let budget = r.budget(device)?;
            if bytes > budget {
                return Err(PlanViolation::InitialOverBudget {
                    device,
                    bytes,
                    budget,
                });
            }
        }
        r.peak.clone_from(&r.used);
        let mut min_live = r.live.values().copied().min().unwrap_or(u32::MAX);

        let (mut moved, mut reloaded) = (0u64, 0u64);
        let mut keeps = BTreeSet::new();
        for (step, s) in self.steps().iter().enumerate() {
            let (layer, expert) = match *s {
                MigrationStep::Keep { layer, expert, .. }
                | MigrationStep::Move { layer, expert, .. }
                | MigrationStep::Drop { layer, expert, .. }
                | MigrationStep::Reload { layer, expert, .. } => (layer, expert),
            };
            if layer >= layers || expert.index() >= experts {
                return Err(PlanViolation::OutOfRange {
                    step,
                    layer,
                    expert,
                });
            }
            match *s {
                MigrationStep::Keep { device, .. } => {
                    let bad = |reason| PlanViolation::BadKeep {
                        step,
                        layer,
                        expert,
                        device,
                        reason,
                    };
                    let copy = (layer, device, expert);
                    if !r.state.contains(&copy) {
                        return Err(bad("that copy is not live"));
                    }
                    if !target.contains(&copy) {
                        return Err(bad("the new placement does not have it"));
                    }
                    if !initial.contains(&copy) {
                        return Err(bad("the copy was created by the plan, not kept"));
                    }
                    keeps.insert(copy);
                }
                MigrationStep::Move { from, to, .. } => {
                    if r.failed.contains(&from) {
                        return Err(PlanViolation::FailedDeviceUsed { step, device: from });
                    }
                    if !r.state.contains(&(layer, from, expert)) {
                        return Err(PlanViolation::SourceNotLive {
                            step,
                            layer,
                            expert,
                            from,
                        });
                    }
                    r.receive(step, layer, expert, to)?;
                    moved = moved.saturating_add(r.expert_bytes);
                }
                MigrationStep::Reload { to, .. } => {
                    if r.live(layer, expert) > 0 {
                        return Err(PlanViolation::NeedlessReload {
                            step,
                            layer,
                            expert,
                        });
                    }
                    r.receive(step, layer, expert, to)?;
                    reloaded = reloaded.saturating_add(r.expert_bytes);
                }
                MigrationStep::Drop { device, .. } => {
                    if !r.state.remove(&(layer, device, expert)) {
                        return Err(PlanViolation::DropOfAbsentCopy {
                            step,
                            layer,
                            expert,
                            device,
                        });
                    }
                    let left = r
                        .live
                        .get_mut(&(layer, expert))
                        .expect("a dropped copy was live");
                    *left -= 1;
                    if *left == 0 {
                        return Err(PlanViolation::LastReplicaDropped {
                            step,
                            layer,
                            expert,
                            device,
                        });
                    }
                    min_live = min_live.min(*left);
                    let used = r
                        .used
                        .get_mut(&device)
                        .expect("a device that held a copy is listed");
                    *used = used.saturating_sub(r.expert_bytes);
                }
            }
        }

        if let Some(&(layer, device, expert)) = target.difference(&r.state).next() {
            return Err(PlanViolation::FinalStateDiffers {
                layer,
                device,
                expert,
                what: "lacks",
            });
        }
        if let Some(&(layer, device, expert)) = r.state.difference(&target).next() {
            return Err(PlanViolation::FinalStateDiffers {
                layer,
                device,
                expert,
                what: "holds",
            });
        }
        if let Some(&(layer, device, expert)) =
            target.intersection(&initial).find(|c| !keeps.contains(*c))
        {
            return Err(PlanViolation::MissingKeep {
                layer,
                device,
                expert,
            });
        }
        let mismatch = |what, reported: u64, replayed: u64| {
            (reported != replayed).then_some(PlanViolation::ReportMismatch {
                what,
                reported,
                replayed,
            })
        };
        if let Some(v) = mismatch("bytes moved", self.bytes_moved(), moved)
            .or_else(|| mismatch("bytes reloaded", self.bytes_reloaded(), reloaded))
        {
            return Err(v);
        }
        for (&d, &p) in &r.peak {
            let reported = self.peak_bytes_per_device().get(&d).copied().unwrap_or(0);
            if let Some(v) = mismatch("peak bytes of a device", reported, p) {
                return Err(v);
            }
        }
        Ok(ReplayReport {
            bytes_moved: moved,
            bytes_reloaded: reloaded,
            peak_bytes: r.peak,
            min_live_copies: if min_live == u32::MAX { 0 } else { min_live },
        })
    }
}
