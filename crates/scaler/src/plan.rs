//! What the transition machine needs to know about a migration plan.
//!
//! The plan itself is computed outside the machine (by `expert-placement`, answering
//! [`Action::ComputePlan`](crate::Action::ComputePlan)), so the machine is generic over it.

use crate::device::{DeviceId, DeviceSet};
use std::collections::BTreeMap;
use std::fmt::Debug;

/// The summary of a weight-migration plan the transition machine works from.
pub trait TransitionPlan: Debug {
    /// Devices that receive bytes (peer-to-peer copies or reloads from the checkpoint). The
    /// machine waits for one [`Event::CopiesDone`](crate::Event::CopiesDone) per device.
    fn copy_destinations(&self) -> DeviceSet;
    /// Bytes copied between devices.
    fn bytes_moved(&self) -> u64;
    /// Bytes reused in place (kept experts mapped into the next deployment without a copy).
    fn bytes_zero_copy(&self) -> u64;
    /// Bytes read back from the checkpoint on disk (experts that have no live copy left).
    fn bytes_reloaded(&self) -> u64;
    /// The most expert bytes each device holds at any point of the plan, if the plan knows.
    fn peak_bytes_per_device(&self) -> BTreeMap<DeviceId, u64> {
        BTreeMap::new()
    }
}

/// A plain plan summary: the bytes each destination receives and the bytes kept in place.
///
/// Executors that compute the real plan elsewhere can summarise it into this; tests use it
/// directly.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct PlanSummary {
    /// Bytes copied peer-to-peer into each destination device.
    pub moved_to: BTreeMap<DeviceId, u64>,
    /// Bytes reloaded from the checkpoint into each destination device.
    pub reloaded_to: BTreeMap<DeviceId, u64>,
    /// Bytes kept in place.
    pub zero_copy: u64,
    /// The most expert bytes each device holds during the plan.
    pub peak_per_device: BTreeMap<DeviceId, u64>,
}

impl PlanSummary {
    /// A plan that copies `bytes` into each of `devices` and keeps `zero_copy` bytes in place.
    pub fn copies(devices: &DeviceSet, bytes: u64, zero_copy: u64) -> PlanSummary {
        PlanSummary {
            moved_to: devices.iter().map(|d| (d, bytes)).collect(),
            reloaded_to: BTreeMap::new(),
            zero_copy,
            peak_per_device: BTreeMap::new(),
        }
    }
}

impl TransitionPlan for PlanSummary {
    fn copy_destinations(&self) -> DeviceSet {
        self.moved_to
            .iter()
            .chain(&self.reloaded_to)
            .filter(|(_, &b)| b > 0)
            .map(|(&d, _)| d)
            .collect()
    }
    fn bytes_moved(&self) -> u64 {
        self.moved_to.values().sum()
    }
    fn bytes_zero_copy(&self) -> u64 {
        self.zero_copy
    }
    fn bytes_reloaded(&self) -> u64 {
        self.reloaded_to.values().sum()
    }
    fn peak_bytes_per_device(&self) -> BTreeMap<DeviceId, u64> {
        self.peak_per_device.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_destinations_with_bytes_only() {
        let mut p = PlanSummary::copies(&DeviceSet::from([2, 3]), 100, 7);
        p.moved_to.insert(DeviceId(4), 0);
        p.reloaded_to.insert(DeviceId(1), 30);
        assert_eq!(p.copy_destinations(), DeviceSet::from([1, 2, 3]));
        assert_eq!(p.bytes_moved(), 200);
        assert_eq!(p.bytes_reloaded(), 30);
        assert_eq!(p.bytes_zero_copy(), 7);
        assert!(p.peak_bytes_per_device().is_empty());
        p.peak_per_device.insert(DeviceId(2), 400);
        assert_eq!(
            p.peak_bytes_per_device(),
            BTreeMap::from([(DeviceId(2), 400)])
        );
    }
}
