//! [`TransitionPlan`] for `expert-placement`'s [`MigrationPlan`], the plan the executor computes
//! when it answers [`Action::ComputePlan`](crate::Action::ComputePlan).
//!
//! Both crates number devices the same way (`DeviceId(u32)`), so the conversion is the index.
//! The machine only needs the summary: where copies and reloads land, and the byte counts. The
//! executor walks [`MigrationPlan::steps`] itself to start the copies; a plan whose drops are not
//! deferred ([`MigrationPlan::drops_deferred`] is false, only under tight memory budgets) asks the
//! executor to release those copies during Prepare, after routing has stopped using them.

use crate::device::{DeviceId, DeviceSet};
use crate::plan::TransitionPlan;
use expert_placement::{MigrationPlan, MigrationStep};
use std::collections::BTreeMap;

fn ours(d: expert_placement::DeviceId) -> DeviceId {
    DeviceId(d.0)
}

impl TransitionPlan for MigrationPlan {
    fn copy_destinations(&self) -> DeviceSet {
        self.steps()
            .iter()
            .filter_map(|s| match *s {
                MigrationStep::Move { to, .. } | MigrationStep::Reload { to, .. } => Some(ours(to)),
                MigrationStep::Keep { .. } | MigrationStep::Drop { .. } => None,
            })
            .collect()
    }

    fn bytes_moved(&self) -> u64 {
        MigrationPlan::bytes_moved(self)
    }

    fn bytes_zero_copy(&self) -> u64 {
        (self.keeps() as u64).saturating_mul(self.expert_bytes())
    }

    fn bytes_reloaded(&self) -> u64 {
        MigrationPlan::bytes_reloaded(self)
    }

    fn peak_bytes_per_device(&self) -> BTreeMap<DeviceId, u64> {
        MigrationPlan::peak_bytes_per_device(self)
            .iter()
            .map(|(&d, &b)| (ours(d), b))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Event, Phase, Strategy, Time, Transition, TransitionKind, TransitionSpec};
    use expert_placement::{ExpertLoad, MemoryBudgets, Placement, PlacementShape};

    fn ids(n: u32) -> Vec<expert_placement::DeviceId> {
        (0..n).map(expert_placement::DeviceId).collect()
    }

    #[test]
    fn a_real_scale_up_plan_drives_the_machine() {
        let shape = PlacementShape::new(2, 8, 2);
        let old = Placement::balanced(&shape, &ids(2)).unwrap();
        let load = ExpertLoad::uniform(2, 8).unwrap();
        let new = Placement::rebalanced_for(&old, &ids(3), &load).unwrap();
        let budgets = MemoryBudgets::uniform(ids(3), 16 << 20);
        let plan = MigrationPlan::between(&old, &new, 1 << 20, &budgets).unwrap();

        assert_eq!(plan.copy_destinations(), DeviceSet::from([2]));
        assert_eq!(TransitionPlan::bytes_moved(&plan), 6 << 20);
        assert_eq!(plan.bytes_zero_copy(), plan.keeps() as u64 * (1 << 20));
        assert!(plan.bytes_zero_copy() > 0);
        assert_eq!(TransitionPlan::peak_bytes_per_device(&plan).len(), 3);

        let spec = TransitionSpec {
            kind: TransitionKind::ScaleUp,
            strategy: Strategy::Elastic,
            from: DeviceSet::first(2),
            to: DeviceSet::first(3),
        };
        let mut t = Transition::new(spec, Time::ZERO).unwrap();
        t.handle(Event::PlanReady(plan), Time::from_millis(1))
            .unwrap();
        assert_eq!(t.copies_outstanding(), &DeviceSet::from([2]));
        t.handle(
            Event::CopiesDone {
                device: DeviceId(2),
            },
            Time::from_millis(9),
        )
        .unwrap();
        t.handle(Event::DeploymentBuilt, Time::from_millis(10))
            .unwrap();
        t.handle(Event::Switched { iteration: 4 }, Time::from_millis(11))
            .unwrap();
        t.handle(Event::OldDrained, Time::from_millis(12)).unwrap();
        assert_eq!(t.phase(), Phase::Retired);
        assert_eq!(t.report().bytes_moved, 6 << 20);
    }

    #[test]
    fn a_failure_plan_reports_its_reloads() {
        let shape = PlacementShape::new(1, 6, 0);
        let old = Placement::balanced(&shape, &ids(3)).unwrap();
        let survivors = [expert_placement::DeviceId(0), expert_placement::DeviceId(2)];
        let load = ExpertLoad::uniform(1, 6).unwrap();
        let new = Placement::rebalanced_for(&old, &survivors, &load).unwrap();
        let budgets = MemoryBudgets::uniform(ids(3), 16 << 20);
        let plan = MigrationPlan::between_after_failure(
            &old,
            &new,
            &[expert_placement::DeviceId(1)],
            1 << 10,
            &budgets,
        )
        .unwrap();
        // Device 1 held 2 of the 6 experts alone: both come back from the checkpoint.
        assert_eq!(TransitionPlan::bytes_reloaded(&plan), 2 << 10);
        assert!(plan.copy_destinations().is_subset(&DeviceSet::from([0, 2])));
        assert!(!plan.copy_destinations().is_empty());
    }
}
