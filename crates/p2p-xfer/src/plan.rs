//! The transfer planner: stripe every need over all the devices that hold its bytes, balance the
//! load on every link and port, and predict when the whole schedule completes.
//!
//! The planner is pure and deterministic: no I/O, no clock; the same input gives the same plan.
//!
//! # How it plans
//! Needs are taken most constrained first (fewest holders), then largest first. Each need is cut
//! into steps of the configured granularity (coarser for very large needs, so planning stays cheap)
//! and every step goes to the holder on which it would finish earliest, given everything already
//! planned: that holder's link (per-copy latency the first time the link is used for this need,
//! then bytes over bandwidth), the holder's egress port and the destination's ingress port. Ties
//! (typically: every holder limited by the same destination ingress) go to the least loaded
//! link, so links that share a port carry equal time. A holder's steps are then laid out as one
//! contiguous copy, so a need striped over `k` holders becomes at most `k` copies.
//!
//! The plan's prediction is [`LinkModel::predict_secs`] of its link loads: a max-min fair
//! simulation, never below the simple bound [`LinkModel::bound_secs`] that the greedy balances.

use crate::copy::{find_hazard, CopyOp, Hazard, Link, Location};
use crate::error::PlanError;
use crate::link::{secs_to_duration, LinkLoad, LinkModel};
use hbm_vmm::DeviceId;
use std::collections::BTreeMap;
use std::time::Duration;

/// Bytes a destination needs, and where they can be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    /// Where the bytes must end up.
    pub dst: Location,
    /// How many bytes.
    pub len: u64,
    /// Every location holding an identical copy of the bytes, at most one per device.
    pub holders: Vec<Location>,
}

impl Need {
    /// `len` bytes to `dst`, readable at each of `holders`.
    pub fn new(dst: Location, len: u64, holders: Vec<Location>) -> Self {
        Self { dst, len, holders }
    }
}

/// Planner settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannerConfig {
    /// The unit a need is striped in, in bytes: every copy but a need's last starts and ends on a
    /// multiple of it (relative to the need). 2 MiB (the VMM granularity) by default.
    pub granularity: u64,
    /// At most this many steps per need; larger needs use a coarser multiple of the granularity.
    pub max_steps_per_need: u64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            granularity: 2 << 20,
            max_steps_per_need: 4096,
        }
    }
}

/// One planned copy: part of a need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedCopy {
    /// The index of the need in the planner's input.
    pub need: usize,
    /// Where in the need the copy starts.
    pub offset: u64,
    /// The copy itself.
    pub op: CopyOp,
}

/// A schedule: the copies, what each link carries, and the predicted completion time.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    copies: Vec<PlannedCopy>,
    loads: BTreeMap<Link, LinkLoad>,
    predicted_secs: f64,
    bound_secs: f64,
}

impl Plan {
    /// The copies, ordered by need, then offset.
    pub fn copies(&self) -> &[PlannedCopy] {
        &self.copies
    }

    /// The copies as a batch to submit.
    pub fn batch(&self) -> Vec<CopyOp> {
        self.copies.iter().map(|c| c.op).collect()
    }

    /// What each used link carries.
    pub fn link_loads(&self) -> &BTreeMap<Link, LinkLoad> {
        &self.loads
    }

    /// Bytes the plan puts on `link`.
    pub fn bytes_on(&self, link: Link) -> u64 {
        self.loads.get(&link).map_or(0, |l| l.bytes)
    }

    /// Total bytes moved.
    pub fn total_bytes(&self) -> u64 {
        self.loads.values().map(|l| l.bytes).sum()
    }

    /// The predicted completion time, in seconds, under the planner's link model.
    pub fn predicted_secs(&self) -> f64 {
        self.predicted_secs
    }

    /// The lower bound on the completion time under the planner's link model
    /// ([`LinkModel::bound_secs`]); equal to the prediction when the plan's links are balanced.
    pub fn bound_secs(&self) -> f64 {
        self.bound_secs
    }

    /// The predicted completion time.
    pub fn predicted(&self) -> Duration {
        secs_to_duration(self.predicted_secs)
    }
}

/// Plans striped, load-balanced schedules over a [`LinkModel`].
#[derive(Clone, Debug)]
pub struct Planner {
    model: LinkModel,
    config: PlannerConfig,
}

/// Running totals while planning: seconds per link, bytes through each port.
#[derive(Default)]
struct Usage {
    link_secs: BTreeMap<Link, f64>,
    egress: BTreeMap<DeviceId, u64>,
    ingress: BTreeMap<DeviceId, u64>,
}

impl Planner {
    /// A planner over `model`. Fails if the configuration is out of range.
    pub fn new(model: LinkModel, config: PlannerConfig) -> Result<Self, PlanError> {
        if config.granularity == 0 {
            return Err(PlanError::BadConfig("granularity must be at least 1 byte"));
        }
        if config.max_steps_per_need == 0 {
            return Err(PlanError::BadConfig(
                "max_steps_per_need must be at least 1",
            ));
        }
        Ok(Self { model, config })
    }

    /// The link model plans are made against.
    pub fn model(&self) -> &LinkModel {
        &self.model
    }

    /// Plan `needs`. Every need is met exactly once: its bytes are covered by copies from its
    /// holders with no gap and no overlap.
    pub fn plan(&self, needs: &[Need]) -> Result<Plan, PlanError> {
        self.check(needs)?;
        let mut order: Vec<usize> = (0..needs.len()).collect();
        order.sort_by_key(|&i| (needs[i].holders.len(), std::cmp::Reverse(needs[i].len), i));

        let mut usage = Usage::default();
        let mut copies = Vec::new();
        for i in order {
            self.plan_need(i, &needs[i], &mut usage, &mut copies);
        }
        copies.sort_by_key(|c: &PlannedCopy| (c.need, c.offset));

        let mut loads: BTreeMap<Link, LinkLoad> = BTreeMap::new();
        for c in &copies {
            let l = loads.entry(c.op.link()).or_default();
            l.bytes += c.op.len;
            l.ops += 1;
        }
        let predicted_secs = self.model.predict_secs(&loads);
        let bound_secs = self.model.bound_secs(&loads);
        Ok(Plan {
            copies,
            loads,
            predicted_secs,
            bound_secs,
        })
    }

    fn check(&self, needs: &[Need]) -> Result<(), PlanError> {
        let mut writes = Vec::with_capacity(needs.len());
        let mut reads = Vec::new();
        let mut read_need = Vec::new();
        for (i, n) in needs.iter().enumerate() {
            if n.len == 0 {
                return Err(PlanError::ZeroLength { need: i });
            }
            if n.holders.is_empty() {
                return Err(PlanError::NoHolders { need: i });
            }
            for at in std::iter::once(n.dst).chain(n.holders.iter().copied()) {
                if at.addr.checked_add(n.len).is_none() {
                    return Err(PlanError::AddressOverflow {
                        need: i,
                        at,
                        len: n.len,
                    });
                }
            }
            for (k, h) in n.holders.iter().enumerate() {
                if n.holders[..k].iter().any(|o| o.device == h.device) {
                    return Err(PlanError::DuplicateHolder {
                        need: i,
                        device: h.device,
                    });
                }
                self.model.check(Link::new(h.device, n.dst.device))?;
                reads.push((*h, n.len));
                read_need.push(i);
            }
            writes.push((n.dst, n.len));
        }
        find_hazard(&writes, &reads).map_err(|h| match h {
            Hazard::WriteWrite { first, second } => {
                PlanError::OverlappingDestinations { first, second }
            }
            Hazard::ReadWrite { reader, writer } => PlanError::HolderOverlapsDestination {
                need: read_need[reader],
                destination_of: writer,
            },
        })
    }

    /// Stripe one need over its holders (see the module docs) and append its copies.
    fn plan_need(&self, index: usize, need: &Need, usage: &mut Usage, out: &mut Vec<PlannedCopy>) {
        let g = self.config.granularity;
        let steps_at_g = need.len.div_ceil(g);
        let step = if steps_at_g > self.config.max_steps_per_need {
            steps_at_g.div_ceil(self.config.max_steps_per_need) * g
        } else {
            g
        };
        // Holders in device order so that ties go to the lowest device, whatever the input order.
        let mut holders = need.holders.clone();
        holders.sort_by_key(|h| h.device);
        let dst = need.dst.device;
        let mut share = vec![0u64; holders.len()];
        let mut left = need.len;
        while left > 0 {
            let bytes = step.min(left);
            // Earliest finish first; among equals (e.g. all limited by the destination's
            // ingress), the least loaded link, so that links sharing a port stay balanced.
            let mut best: Option<((f64, f64), usize)> = None;
            for (k, h) in holders.iter().enumerate() {
                let t = self.finish_if(usage, Link::new(h.device, dst), bytes, share[k] == 0);
                if best.is_none_or(|(bt, _)| t < bt) {
                    best = Some((t, k));
                }
            }
            let (_, k) = best.expect("a need has at least one holder (checked)");
            self.charge(
                usage,
                Link::new(holders[k].device, dst),
                bytes,
                share[k] == 0,
            );
            share[k] += bytes;
            left -= bytes;
        }
        let mut offset = 0;
        for (h, bytes) in holders.iter().zip(share) {
            if bytes == 0 {
                continue;
            }
            // No overflow: `check` verified `addr + len` for every holder and the destination.
            let op = CopyOp::new(
                Location::new(h.device, h.addr + offset),
                Location::new(dst, need.dst.addr + offset),
                bytes,
            );
            out.push(PlannedCopy {
                need: index,
                offset,
                op,
            });
            offset += bytes;
        }
    }

    /// When the resources `link` uses would be free if `bytes` more went over it, and when the
    /// link alone would be.
    fn finish_if(&self, usage: &Usage, link: Link, bytes: u64, new_op: bool) -> (f64, f64) {
        let spec = self.model.link(link);
        let link_t = usage.link_secs.get(&link).copied().unwrap_or(0.0)
            + spec.secs(bytes, u64::from(new_op));
        if link.is_local() {
            return (link_t, link_t);
        }
        let out = usage.egress.get(&link.src).copied().unwrap_or(0) + bytes;
        let inn = usage.ingress.get(&link.dst).copied().unwrap_or(0) + bytes;
        let all = link_t
            .max(out as f64 / self.model.ports(link.src).egress)
            .max(inn as f64 / self.model.ports(link.dst).ingress);
        (all, link_t)
    }

    fn charge(&self, usage: &mut Usage, link: Link, bytes: u64, new_op: bool) {
        let spec = self.model.link(link);
        *usage.link_secs.entry(link).or_default() += spec.secs(bytes, u64::from(new_op));
        if !link.is_local() {
            *usage.egress.entry(link.src).or_default() += bytes;
            *usage.ingress.entry(link.dst).or_default() += bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{LinkSpec, Ports};

    const MIB: u64 = 1 << 20;

    fn at(dev: u32, addr: u64) -> Location {
        Location::new(DeviceId(dev), addr)
    }

    fn planner(model: LinkModel) -> Planner {
        Planner::new(model, PlannerConfig::default()).unwrap()
    }

    #[test]
    fn equal_holders_split_a_need_evenly() {
        let p = planner(LinkModel::uniform(LinkSpec::gbps(100.0, 0.0)));
        let need = Need::new(at(3, 0), 96 * MIB, vec![at(2, 0), at(0, 0), at(1, 0)]);
        let plan = p.plan(&[need]).unwrap();
        assert_eq!(plan.copies().len(), 3);
        for dev in 0..3 {
            assert_eq!(
                plan.bytes_on(Link::new(DeviceId(dev), DeviceId(3))),
                32 * MIB
            );
        }
        // Laid out in device order, contiguous.
        let offsets: Vec<(u32, u64)> = plan
            .copies()
            .iter()
            .map(|c| (c.op.src.device.0, c.offset))
            .collect();
        assert_eq!(offsets, vec![(0, 0), (1, 32 * MIB), (2, 64 * MIB)]);
        let expect = 32.0 * MIB as f64 / 100e9;
        assert!((plan.predicted_secs() - expect).abs() < 1e-12);
    }

    #[test]
    fn a_faster_link_carries_proportionally_more() {
        let model = LinkModel::uniform(LinkSpec::gbps(100.0, 0.0)).with_link(
            DeviceId(1),
            DeviceId(2),
            LinkSpec::gbps(300.0, 0.0),
        );
        let plan = planner(model)
            .plan(&[Need::new(at(2, 0), 400 * MIB, vec![at(0, 0), at(1, 0)])])
            .unwrap();
        assert_eq!(
            plan.bytes_on(Link::new(DeviceId(0), DeviceId(2))),
            100 * MIB
        );
        assert_eq!(
            plan.bytes_on(Link::new(DeviceId(1), DeviceId(2))),
            300 * MIB
        );
    }

    #[test]
    fn single_holder_needs_go_first_and_others_route_around_them() {
        // Need 0 can only come from device 0; need 1 from 0 or 1. Device 0's egress is the
        // bottleneck, so need 1 should avoid it.
        let model = LinkModel::uniform(LinkSpec::gbps(100.0, 0.0))
            .with_default_ports(Ports::symmetric_gbps(100.0));
        let needs = [
            Need::new(at(3, 0), 100 * MIB, vec![at(0, 0), at(1, 0)]),
            Need::new(at(2, 0), 100 * MIB, vec![at(0, 0)]),
        ];
        let plan = planner(model).plan(&needs).unwrap();
        assert_eq!(
            plan.bytes_on(Link::new(DeviceId(0), DeviceId(2))),
            100 * MIB
        );
        assert_eq!(
            plan.bytes_on(Link::new(DeviceId(1), DeviceId(3))),
            100 * MIB
        );
        assert_eq!(plan.bytes_on(Link::new(DeviceId(0), DeviceId(3))), 0);
    }

    #[test]
    fn ingress_limit_shifts_work_to_a_local_holder() {
        // Destination 1 already holds a copy elsewhere in its own memory; the peer link is fast
        // but the ingress port is slow, so most bytes should come from the local copy.
        let model = LinkModel::uniform(LinkSpec::gbps(100.0, 0.0))
            .with_local(LinkSpec::gbps(100.0, 0.0))
            .with_ports(
                DeviceId(1),
                Ports {
                    egress: f64::INFINITY,
                    ingress: 25e9,
                },
            );
        let plan = planner(model)
            .plan(&[Need::new(
                at(1, 0),
                100 * MIB,
                vec![at(0, 0), at(1, 1 << 30)],
            )])
            .unwrap();
        assert_eq!(plan.bytes_on(Link::new(DeviceId(0), DeviceId(1))), 20 * MIB);
        assert_eq!(plan.bytes_on(Link::new(DeviceId(1), DeviceId(1))), 80 * MIB);
    }

    #[test]
    fn a_need_smaller_than_one_granule_is_one_copy() {
        let plan = planner(LinkModel::nvlink4())
            .plan(&[Need::new(at(1, 4096), 1000, vec![at(0, 8192), at(2, 0)])])
            .unwrap();
        assert_eq!(
            plan.batch(),
            vec![CopyOp::new(at(0, 8192), at(1, 4096), 1000)]
        );
    }

    #[test]
    fn huge_needs_use_coarser_steps() {
        let config = PlannerConfig {
            granularity: 1,
            max_steps_per_need: 16,
        };
        let p = Planner::new(LinkModel::uniform(LinkSpec::gbps(1.0, 0.0)), config).unwrap();
        let plan = p
            .plan(&[Need::new(at(2, 0), 1 << 40, vec![at(0, 0), at(1, 0)])])
            .unwrap();
        assert_eq!(plan.bytes_on(Link::new(DeviceId(0), DeviceId(2))), 1 << 39);
        assert_eq!(plan.total_bytes(), 1 << 40);
    }

    #[test]
    fn bad_input_gets_typed_errors() {
        let p = planner(LinkModel::nvlink4());
        assert_eq!(
            p.plan(&[Need::new(at(1, 0), 0, vec![at(0, 0)])]),
            Err(PlanError::ZeroLength { need: 0 })
        );
        assert_eq!(
            p.plan(&[Need::new(at(1, 0), 8, vec![])]),
            Err(PlanError::NoHolders { need: 0 })
        );
        assert_eq!(
            p.plan(&[Need::new(at(1, 0), 8, vec![at(0, 0), at(0, 64)])]),
            Err(PlanError::DuplicateHolder {
                need: 0,
                device: DeviceId(0)
            })
        );
        assert_eq!(
            p.plan(&[Need::new(at(1, u64::MAX - 1), 8, vec![at(0, 0)])]),
            Err(PlanError::AddressOverflow {
                need: 0,
                at: at(1, u64::MAX - 1),
                len: 8
            })
        );
        assert_eq!(
            p.plan(&[
                Need::new(at(1, 0), 8, vec![at(0, 0)]),
                Need::new(at(1, 4), 8, vec![at(0, 0)]),
            ]),
            Err(PlanError::OverlappingDestinations {
                first: 0,
                second: 1
            })
        );
        assert_eq!(
            p.plan(&[
                Need::new(at(1, 0), 8, vec![at(0, 0)]),
                Need::new(at(2, 0), 8, vec![at(1, 4)]),
            ]),
            Err(PlanError::HolderOverlapsDestination {
                need: 1,
                destination_of: 0
            })
        );
        assert!(matches!(
            Planner::new(
                LinkModel::nvlink4(),
                PlannerConfig {
                    granularity: 0,
                    ..Default::default()
                }
            ),
            Err(PlanError::BadConfig(_))
        ));
        let broken = planner(LinkModel::uniform(LinkSpec::gbps(-1.0, 0.0)));
        assert!(matches!(
            broken.plan(&[Need::new(at(1, 0), 8, vec![at(0, 0)])]),
            Err(PlanError::UnusableLink { .. })
        ));
    }

    #[test]
    fn holder_order_does_not_change_the_plan() {
        let p = planner(LinkModel::nvlink4());
        let a = p
            .plan(&[Need::new(
                at(3, 0),
                50 * MIB,
                vec![at(0, 0), at(1, 0), at(2, 0)],
            )])
            .unwrap();
        let b = p
            .plan(&[Need::new(
                at(3, 0),
                50 * MIB,
                vec![at(2, 0), at(0, 0), at(1, 0)],
            )])
            .unwrap();
        assert_eq!(a, b);
    }
}
