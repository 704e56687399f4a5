//! Devices and sets of devices.

use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt;

/// One accelerator, by its index on the host (the same numbering as `hbm_vmm::DeviceId`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize)]
#[serde(transparent)]
pub struct DeviceId(pub u32);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dev{}", self.0)
    }
}

/// An ordered set of devices. Deployments, transitions and the coordinator speak in these.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(transparent)]
pub struct DeviceSet(BTreeSet<DeviceId>);

impl DeviceSet {
    /// The empty set.
    pub fn new() -> DeviceSet {
        DeviceSet(BTreeSet::new())
    }

    /// Devices `0..n`.
    pub fn first(n: u32) -> DeviceSet {
        (0..n).map(DeviceId).collect()
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `device` is in the set.
    pub fn contains(&self, device: DeviceId) -> bool {
        self.0.contains(&device)
    }

    /// Adds `device`; returns whether it was new.
    pub fn insert(&mut self, device: DeviceId) -> bool {
        self.0.insert(device)
    }

    /// Removes `device`; returns whether it was there.
    pub fn remove(&mut self, device: DeviceId) -> bool {
        self.0.remove(&device)
    }

    /// The devices in ascending order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = DeviceId> + '_ {
        self.0.iter().copied()
    }

    /// Devices in `self` or `other`.
    pub fn union(&self, other: &DeviceSet) -> DeviceSet {
        self.0.union(&other.0).copied().collect()
    }

    /// Devices in both `self` and `other`.
    pub fn intersection(&self, other: &DeviceSet) -> DeviceSet {
        self.0.intersection(&other.0).copied().collect()
    }

    /// Devices in `self` but not in `other`.
    pub fn difference(&self, other: &DeviceSet) -> DeviceSet {
        self.0.difference(&other.0).copied().collect()
    }

    /// Whether every device of `self` is in `other`.
    pub fn is_subset(&self, other: &DeviceSet) -> bool {
        self.0.is_subset(&other.0)
    }

    /// Whether `self` and `other` share no device.
    pub fn is_disjoint(&self, other: &DeviceSet) -> bool {
        self.0.is_disjoint(&other.0)
    }
}

impl FromIterator<DeviceId> for DeviceSet {
    fn from_iter<I: IntoIterator<Item = DeviceId>>(iter: I) -> Self {
        DeviceSet(iter.into_iter().collect())
    }
}

impl<const N: usize> From<[u32; N]> for DeviceSet {
    fn from(ids: [u32; N]) -> Self {
        ids.into_iter().map(DeviceId).collect()
    }
}

impl fmt::Debug for DeviceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter().map(|d| d.0)).finish()
    }
}

impl fmt::Display for DeviceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_algebra() {
        let a = DeviceSet::from([0, 1, 2]);
        let b = DeviceSet::from([2, 3]);
        assert_eq!(a.union(&b), DeviceSet::first(4));
        assert_eq!(a.intersection(&b), DeviceSet::from([2]));
        assert_eq!(a.difference(&b), DeviceSet::from([0, 1]));
        assert!(DeviceSet::from([1]).is_subset(&a));
        assert!(!a.is_disjoint(&b));
        assert!(DeviceSet::from([0]).is_disjoint(&b));
        assert_eq!(format!("{a}"), "{0, 1, 2}");
    }
}
