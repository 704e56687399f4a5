//! The link model: how fast bytes move between each pair of devices, and how long a plan takes.
//!
//! A [`LinkModel`] gives every directed device pair a [`LinkSpec`] (bandwidth and a per-copy
//! latency) and, optionally, every device a [`Ports`] limit: the total rate at which it can send
//! to and receive from *all* peers together. The ports matter on switched fabrics (NVSwitch): one
//! pair can already use most of a GPU's NVLink bandwidth, so a destination fed by two sources at
//! once is limited by its ingress, not by twice the pair bandwidth.
//!
//! The time a set of link loads takes ([`LinkModel::predict`]) is the longest of:
//! - for each link, `ops × latency + bytes / bandwidth` (copies on one link run one after another);
//! - for each device, the bytes it sends to peers divided by its egress rate, and the bytes it
//!   receives from peers divided by its ingress rate (device-local copies use neither).

use crate::copy::Link;
use crate::error::PlanError;
use hbm_vmm::DeviceId;
use std::collections::BTreeMap;
use std::time::Duration;

/// Bandwidth and per-copy latency of one directed link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSpec {
    /// Bytes per second. Must be finite and greater than zero.
    pub bandwidth: f64,
    /// Fixed cost of each copy on the link (launch, setup, first byte).
    pub latency: Duration,
}

impl LinkSpec {
    /// A link of `gb_per_s` × 10⁹ bytes per second with `latency_us` microseconds per copy.
    pub fn gbps(gb_per_s: f64, latency_us: f64) -> Self {
        Self {
            bandwidth: gb_per_s * 1e9,
            latency: Duration::from_secs_f64((latency_us * 1e-6).max(0.0)),
        }
    }

    /// Seconds to move `bytes` in `ops` copies over this link alone.
    pub fn secs(&self, bytes: u64, ops: u64) -> f64 {
        ops as f64 * self.latency.as_secs_f64() + bytes as f64 / self.bandwidth
    }

    fn usable(&self) -> bool {
        self.bandwidth.is_finite() && self.bandwidth > 0.0
    }
}

/// A device's aggregate limits over all its peer links together, in bytes per second.
/// `f64::INFINITY` means no limit beyond the links themselves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ports {
    /// Total rate the device can send to peers.
    pub egress: f64,
    /// Total rate the device can receive from peers.
    pub ingress: f64,
}

impl Ports {
    /// No aggregate limit.
    pub const UNLIMITED: Ports = Ports {
        egress: f64::INFINITY,
        ingress: f64::INFINITY,
    };

    /// The same limit, `gb_per_s` × 10⁹ bytes per second, each way.
    pub fn symmetric_gbps(gb_per_s: f64) -> Self {
        Self {
            egress: gb_per_s * 1e9,
            ingress: gb_per_s * 1e9,
        }
    }

    fn usable(&self) -> bool {
        self.egress > 0.0 && self.ingress > 0.0 && !self.egress.is_nan() && !self.ingress.is_nan()
    }
}

/// How much a plan puts on one link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkLoad {
    /// Bytes carried.
    pub bytes: u64,
    /// Copies issued on the link.
    pub ops: u64,
}

/// Bandwidth and latency for every device pair, plus optional per-device port limits.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkModel {
    default: LinkSpec,
    local: Option<LinkSpec>,
    links: BTreeMap<Link, LinkSpec>,
    default_ports: Ports,
    ports: BTreeMap<DeviceId, Ports>,
}

impl LinkModel {
    /// Every pair, and every device-local copy, at `spec`; no port limits.
    pub fn uniform(spec: LinkSpec) -> Self {
        Self {
            default: spec,
            local: None,
            links: BTreeMap::new(),
            default_ports: Ports::UNLIMITED,
            ports: BTreeMap::new(),
        }
    }

    /// A starting point for H100/H200 SXM boards on NVSwitch (NVLink 4): 396 GB/s per pair and per
    /// device each way (measured peak on H200, shared/ANCHORS.md), 10 µs per copy, device-local
    /// copies at 2 TB/s. Calibrate with measured numbers when you have them.
    pub fn nvlink4() -> Self {
        Self::uniform(LinkSpec::gbps(396.0, 10.0))
            .with_local(LinkSpec::gbps(2000.0, 5.0))
            .with_default_ports(Ports::symmetric_gbps(396.0))
    }

    /// A starting point for peers behind one PCIe 5 switch: 50 GB/s per pair and per device each
    /// way, 15 µs per copy, device-local copies at 2 TB/s.
    pub fn pcie5() -> Self {
        Self::uniform(LinkSpec::gbps(50.0, 15.0))
            .with_local(LinkSpec::gbps(2000.0, 5.0))
            .with_default_ports(Ports::symmetric_gbps(50.0))
    }

    /// Use `spec` for device-local copies (`src == dst`) instead of the default.
    pub fn with_local(mut self, spec: LinkSpec) -> Self {
        self.local = Some(spec);
        self
    }

    /// Use `spec` for the directed link `src -> dst`.
    pub fn with_link(mut self, src: DeviceId, dst: DeviceId, spec: LinkSpec) -> Self {
        self.links.insert(Link::new(src, dst), spec);
        self
    }

    /// Use `ports` for every device without its own entry.
    pub fn with_default_ports(mut self, ports: Ports) -> Self {
        self.default_ports = ports;
        self
    }

    /// Use `ports` for `device`.
    pub fn with_ports(mut self, device: DeviceId, ports: Ports) -> Self {
        self.ports.insert(device, ports);
        self
    }

    /// The spec of a link.
    pub fn link(&self, link: Link) -> LinkSpec {
        if let Some(spec) = self.links.get(&link) {
            return *spec;
        }
        match (link.is_local(), self.local) {
            (true, Some(local)) => local,
            _ => self.default,
        }
    }

    /// The port limits of a device.
    pub fn ports(&self, device: DeviceId) -> Ports {
        self.ports
            .get(&device)
            .copied()
            .unwrap_or(self.default_ports)
    }

    /// Check that `link` and its two devices' ports have usable numbers.
    pub fn check(&self, link: Link) -> Result<(), PlanError> {
        let ok = self.link(link).usable()
            && self.ports(link.src).usable()
            && self.ports(link.dst).usable();
        if ok {
            Ok(())
        } else {
            Err(PlanError::UnusableLink { link })
        }
    }

    /// Seconds the given link loads take together (see the module docs).
    pub fn predict_secs<'a>(
        &self,
        loads: impl IntoIterator<Item = (&'a Link, &'a LinkLoad)>,
    ) -> f64 {
        let mut worst: f64 = 0.0;
        let mut egress: BTreeMap<DeviceId, u64> = BTreeMap::new();
        let mut ingress: BTreeMap<DeviceId, u64> = BTreeMap::new();
        for (link, load) in loads {
            worst = worst.max(self.link(*link).secs(load.bytes, load.ops));
            if !link.is_local() {
                *egress.entry(link.src).or_default() += load.bytes;
                *ingress.entry(link.dst).or_default() += load.bytes;
            }
        }
        for (dev, bytes) in egress {
            worst = worst.max(bytes as f64 / self.ports(dev).egress);
        }
        for (dev, bytes) in ingress {
            worst = worst.max(bytes as f64 / self.ports(dev).ingress);
        }
        worst
    }

    /// [`predict_secs`](Self::predict_secs) as a `Duration` (saturating).
    pub fn predict<'a>(
        &self,
        loads: impl IntoIterator<Item = (&'a Link, &'a LinkLoad)>,
    ) -> Duration {
        secs_to_duration(self.predict_secs(loads))
    }
}

/// A non-negative, finite number of seconds as a `Duration`; out-of-range values saturate.
pub(crate) fn secs_to_duration(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D0: DeviceId = DeviceId(0);
    const D1: DeviceId = DeviceId(1);
    const D2: DeviceId = DeviceId(2);

    fn load(bytes: u64, ops: u64) -> LinkLoad {
        LinkLoad { bytes, ops }
    }

    #[test]
    fn one_link_is_latency_plus_bytes_over_bandwidth() {
        let m = LinkModel::uniform(LinkSpec::gbps(100.0, 10.0));
        let loads = [(Link::new(D0, D1), load(1_000_000_000, 2))];
        let t = m.predict_secs(loads.iter().map(|(l, x)| (l, x)));
        assert!((t - (0.01 + 20e-6)).abs() < 1e-12, "{t}");
    }

    #[test]
    fn specific_links_and_local_override_the_default() {
        let m = LinkModel::uniform(LinkSpec::gbps(10.0, 0.0))
            .with_local(LinkSpec::gbps(1000.0, 0.0))
            .with_link(D0, D1, LinkSpec::gbps(50.0, 0.0));
        assert_eq!(m.link(Link::new(D0, D1)).bandwidth, 50e9);
        assert_eq!(m.link(Link::new(D1, D0)).bandwidth, 10e9);
        assert_eq!(m.link(Link::new(D2, D2)).bandwidth, 1000e9);
    }

    #[test]
    fn ingress_limits_two_sources_feeding_one_device() {
        let m = LinkModel::uniform(LinkSpec::gbps(100.0, 0.0))
            .with_default_ports(Ports::symmetric_gbps(120.0));
        let gb = 1_000_000_000;
        let loads = [
            (Link::new(D0, D2), load(gb, 1)),
            (Link::new(D1, D2), load(gb, 1)),
        ];
        // Each link alone: 10 ms. Device 2 receives 2 GB at 120 GB/s: 16.7 ms.
        let t = m.predict_secs(loads.iter().map(|(l, x)| (l, x)));
        assert!((t - 2.0 / 120.0).abs() < 1e-9, "{t}");
        // Device-local traffic does not count against the ports.
        let loads = [(Link::new(D2, D2), load(10 * gb, 1))];
        let t = m.predict_secs(loads.iter().map(|(l, x)| (l, x)));
        assert!((t - 0.1).abs() < 1e-9, "{t}");
    }

    #[test]
    fn unusable_numbers_are_reported() {
        let m = LinkModel::uniform(LinkSpec::gbps(0.0, 1.0));
        assert_eq!(
            m.check(Link::new(D0, D1)),
            Err(PlanError::UnusableLink {
                link: Link::new(D0, D1)
            })
        );
        let m = LinkModel::uniform(LinkSpec::gbps(1.0, 1.0))
            .with_ports(D1, Ports::symmetric_gbps(f64::NAN));
        assert!(m.check(Link::new(D0, D1)).is_err());
        assert!(m.check(Link::new(D0, D2)).is_ok());
    }

    #[test]
    fn empty_load_takes_no_time() {
        let m = LinkModel::nvlink4();
        assert_eq!(m.predict(std::iter::empty()), Duration::ZERO);
    }
}
