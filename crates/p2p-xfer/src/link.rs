//! The link model: how fast bytes move between each pair of devices, and how long a plan takes.
//!
//! A [`LinkModel`] gives every directed device pair a [`LinkSpec`] (bandwidth and a per-copy
//! latency) and, optionally, every device a [`Ports`] limit: the total rate at which it can send
//! to and receive from *all* peers together. The ports matter on switched fabrics (NVSwitch): one
//! pair can already use most of a GPU's NVLink bandwidth, so a destination fed by two sources at
//! once is limited by its ingress, not by twice the pair bandwidth.
//!
//! Two times are derived from a set of link loads:
//! - [`LinkModel::bound_secs`], a lower bound: the longest of, for each link,
//!   `ops × latency + bytes / bandwidth` (copies on one link run one after another), and for each
//!   device, the bytes it sends to peers over its egress rate and the bytes it receives from peers
//!   over its ingress rate (device-local copies use neither port);
//! - [`LinkModel::predict_secs`], the prediction: a fluid simulation in which the links through a
//!   port share it max-min fairly (every link gets an equal share unless its own rate or another
//!   port holds it lower). A link's own rate is its bandwidth with its per-copy latencies folded
//!   in (`bytes / (bytes / bandwidth + ops × latency)`): a link pays its latencies itself, while
//!   the other links keep the port busy. A link that carries more than its fair share of a port's
//!   traffic outlives the others and finishes alone, which the bound does not see. For a plan
//!   that balances its links, the two agree.

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

    /// A lower bound on the seconds the given link loads take (see the module docs).
    pub fn bound_secs<'a>(&self, loads: impl IntoIterator<Item = (&'a Link, &'a LinkLoad)>) -> f64 {
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

    /// The predicted seconds the given link loads take: a max-min fair fluid simulation (see the
    /// module docs). Never less than [`bound_secs`](Self::bound_secs).
    pub fn predict_secs<'a>(
        &self,
        loads: impl IntoIterator<Item = (&'a Link, &'a LinkLoad)>,
    ) -> f64 {
        let mut sim = FairShare::default();
        for (link, load) in loads {
            let spec = self.link(*link);
            let alone = spec.secs(load.bytes, load.ops);
            if load.bytes == 0 {
                sim.done = sim.done.max(alone);
                continue;
            }
            let rate = load.bytes as f64 / alone;
            let mut uses = vec![sim.resource(Resource::Link(*link), rate)];
            if !link.is_local() {
                uses.push(sim.resource(Resource::Egress(link.src), self.ports(link.src).egress));
                uses.push(sim.resource(Resource::Ingress(link.dst), self.ports(link.dst).ingress));
            }
            sim.flows.push(Flow {
                start: 0.0,
                left: load.bytes as f64,
                uses,
                rate: 0.0,
            });
        }
        sim.run()
    }
    /// [`predict_secs`](Self::predict_secs) as a `Duration` (saturating).
    pub fn predict<'a>(
        &self,
        loads: impl IntoIterator<Item = (&'a Link, &'a LinkLoad)>,
    ) -> Duration {
        secs_to_duration(self.predict_secs(loads))
    }
}

/// What a flow of the fair-share simulation passes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Resource {
    Link(Link),
    Egress(DeviceId),
    Ingress(DeviceId),
}

/// One link's traffic in the simulation.
#[derive(Debug)]
struct Flow {
    /// When its bytes start moving.
    start: f64,
    /// Bytes still to move.
    left: f64,
    /// Indices into `FairShare::caps`.
    uses: Vec<usize>,
    rate: f64,
}

/// A max-min fair fluid simulation of flows through capacitated resources.
#[derive(Debug, Default)]
struct FairShare {
    index: BTreeMap<Resource, usize>,
    caps: Vec<f64>,
    flows: Vec<Flow>,
    /// The latest completion so far (flows of zero bytes end at their start).
    done: f64,
}

impl FairShare {
    fn resource(&mut self, r: Resource, cap: f64) -> usize {
        let next = self.caps.len();
        let i = *self.index.entry(r).or_insert(next);
        if i == next {
            self.caps.push(cap);
        }
        i
    }

    /// Max-min fair rates for the flows in `active` (progressive filling).
    fn fill(&mut self, active: &[usize]) {
        let mut used = vec![0.0f64; self.caps.len()];
        let mut frozen = vec![false; self.flows.len()];
        for &f in active {
            self.flows[f].rate = 0.0;
        }
        loop {
            // Unfrozen active flows through each resource.
            let mut count = vec![0usize; self.caps.len()];
            for &f in active.iter().filter(|&&f| !frozen[f]) {
                for &r in &self.flows[f].uses {
                    count[r] += 1;
                }
            }
            let step = (0..self.caps.len())
                .filter(|&r| count[r] > 0 && self.caps[r].is_finite())
                .map(|r| ((self.caps[r] - used[r]) / count[r] as f64).max(0.0))
                .fold(f64::INFINITY, f64::min);
            if !step.is_finite() {
                // Only unlimited resources left: cannot happen, every flow has a finite link.
                return;
            }
            for &f in active.iter().filter(|&&f| !frozen[f]) {
                self.flows[f].rate += step;
                for &r in &self.flows[f].uses {
                    used[r] += step;
                }
            }
            let saturated: Vec<bool> = (0..self.caps.len())
                .map(|r| self.caps[r].is_finite() && used[r] >= self.caps[r] * (1.0 - 1e-12))
                .collect();
            let mut any = false;
            for &f in active {
                if !frozen[f] && self.flows[f].uses.iter().any(|&r| saturated[r]) {
                    frozen[f] = true;
                    any = true;
                }
            }
            if !any || active.iter().all(|&f| frozen[f]) {
                return;
            }
        }
    }

    /// Run to completion; returns when the last flow finishes.
    fn run(mut self) -> f64 {
        let mut t = 0.0f64;
        loop {
            let active: Vec<usize> = (0..self.flows.len())
                .filter(|&f| self.flows[f].left > 0.0 && self.flows[f].start <= t)
                .collect();
            let next_start = self
                .flows
                .iter()
                .filter(|f| f.left > 0.0 && f.start > t)
                .map(|f| f.start)
                .fold(f64::INFINITY, f64::min);
            if active.is_empty() {
                if next_start.is_finite() {
                    t = next_start;
                    continue;
                }
                return t.max(self.done);
            }
            self.fill(&active);
            let finish = active
                .iter()
                .map(|&f| self.flows[f].left / self.flows[f].rate)
                .fold(f64::INFINITY, f64::min);
            let dt = finish.min(next_start - t);
            if !dt.is_finite() {
                // A flow with no rate and nothing else to wait for: never finishes.
                return f64::INFINITY;
            }
            for &f in &active {
                let fl = &mut self.flows[f];
                // The flow(s) that set `finish` end exactly now, whatever the rounding.
                if fl.left <= fl.rate * dt * (1.0 + 1e-12) {
                    fl.left = 0.0;
                } else {
                    fl.left -= fl.rate * dt;
                }
            }
            t += dt;
        }
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
    fn an_unbalanced_port_share_outlives_the_bound() {
        // Two 60 GB/s links into a 100 GB/s ingress: 2 GB and 1 GB. They share the port at 50
        // GB/s each until the 1 GB link finishes (20 ms); the other then runs alone at its own
        // 60 GB/s for its last 1 GB (16.7 ms). The bound only sees 2 GB over 60 GB/s.
        let m = LinkModel::uniform(LinkSpec::gbps(60.0, 0.0))
            .with_default_ports(Ports::symmetric_gbps(100.0));
        let gb = 1_000_000_000;
        let loads = [
            (Link::new(D0, D2), load(2 * gb, 1)),
            (Link::new(D1, D2), load(gb, 1)),
        ];
        let it = || loads.iter().map(|(l, x)| (l, x));
        assert!((m.bound_secs(it()) - 2.0 / 60.0).abs() < 1e-12);
        let t = m.predict_secs(it());
        assert!((t - (0.02 + 1.0 / 60.0)).abs() < 1e-9, "{t}");
    }

    #[test]
    fn latency_slows_only_its_own_link() {
        // Link A pays 1000 copies of 10 us: 10 ms of latency plus 10 ms of bytes, so it moves at
        // 50 GB/s on average; B moves at (almost) 100 GB/s. Through a 100 GB/s ingress, fair
        // sharing gives each 50 GB/s and both end at 20 ms: A's latencies cost the port nothing.
        let m = LinkModel::uniform(LinkSpec::gbps(100.0, 10.0))
            .with_default_ports(Ports::symmetric_gbps(100.0));
        let gb = 1_000_000_000;
        let loads = [
            (Link::new(D0, D2), load(gb, 1000)),
            (Link::new(D1, D2), load(gb, 1)),
        ];
        let it = || loads.iter().map(|(l, x)| (l, x));
        assert!((m.bound_secs(it()) - 0.02).abs() < 1e-12);
        let t = m.predict_secs(it());
        assert!((t - 0.02).abs() < 1e-9, "{t}");
        // Alone, a link takes its latencies plus its bytes.
        let one = [(Link::new(D0, D2), load(gb, 1000))];
        let t = m.predict_secs(one.iter().map(|(l, x)| (l, x)));
        assert!((t - 0.02).abs() < 1e-12, "{t}");
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
