//! Property tests of the planner: every need is met exactly once, link loads are exactly what the
//! copies carry, the prediction is the model's time for those loads and within the greedy bound,
//! and plans are deterministic and evenly striped where they should be.

use p2p_xfer::{
    validate_batch, AddressSpace, DeviceId, Link, LinkLoad, LinkModel, LinkSpec, Location, Need,
    Planner, PlannerConfig, Ports,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// Destinations live below this address on every device, holders above it, so the needs built
/// here never overlap (the planner refuses overlaps; that is tested in its unit tests).
const HOLDER_BASE: u64 = 1 << 40;
/// Each need gets its own window of this size, so needs never overlap.
const WINDOW: u64 = 1 << 30;

/// Every range of the test address space counts as mapped.
struct Everything;
impl AddressSpace for Everything {
    fn check_range(&self, _: DeviceId, _: u64, _: u64) -> Result<(), hbm_vmm::VmmError> {
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Case {
    devices: u32,
    needs: Vec<Need>,
    model: LinkModel,
    config: PlannerConfig,
}

fn model_strategy(devices: u32) -> impl Strategy<Value = LinkModel> {
    let n = devices as usize;
    (
        1.0f64..500.0,
        0.0f64..20.0,
        prop::collection::vec(prop::option::of(1.0f64..500.0), n * n),
        prop::collection::vec(prop::option::of(10.0f64..800.0), n),
        1.0f64..3000.0,
    )
        .prop_map(move |(bw, lat, pairs, ports, local)| {
            let mut m =
                LinkModel::uniform(LinkSpec::gbps(bw, lat)).with_local(LinkSpec::gbps(local, 1.0));
            for (i, p) in pairs.into_iter().enumerate() {
                if let Some(gb) = p {
                    let (s, d) = ((i / n) as u32, (i % n) as u32);
                    m = m.with_link(DeviceId(s), DeviceId(d), LinkSpec::gbps(gb, lat));
                }
            }
            for (d, p) in ports.into_iter().enumerate() {
                if let Some(gb) = p {
                    m = m.with_ports(DeviceId(d as u32), Ports::symmetric_gbps(gb));
                }
            }
            m
        })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (2u32..7).prop_flat_map(|devices| {
        let need = (
            0..devices,
            1u64..(64 << 20),
            prop::collection::btree_set(0..devices, 1..=devices as usize),
        );
        (
            Just(devices),
            prop::collection::vec(need, 1..12),
            model_strategy(devices),
            prop_oneof![Just(4096u64), Just(2 << 20), 1u64..(1 << 20)],
            prop_oneof![Just(4096u64), 1u64..64],
        )
            .prop_map(|(devices, raw, model, granularity, max_steps)| Case {
                devices,
                needs: raw
                    .into_iter()
                    .enumerate()
                    .map(|(i, (dst, len, holders))| {
                        let w = i as u64 * WINDOW;
                        Need::new(
                            Location::new(DeviceId(dst), w),
                            len,
                            holders
                                .into_iter()
                                .map(|h| {
                                    Location::new(
                                        DeviceId(h),
                                        HOLDER_BASE + w + u64::from(h) * 4096,
                                    )
                                })
                                .collect(),
                        )
                    })
                    .collect(),
                model,
                config: PlannerConfig {
                    granularity,
                    max_steps_per_need: max_steps,
                },
            })
    })
}

/// The step the planner uses for a need (see `PlannerConfig`).
fn step(config: &PlannerConfig, len: u64) -> u64 {
    let g = config.granularity;
    let steps = len.div_ceil(g);
    if steps > config.max_steps_per_need {
        steps.div_ceil(config.max_steps_per_need) * g
    } else {
        g
    }
}

/// Time to move `bytes` from `holder` to `dst` as one copy with nothing else running.
fn alone(model: &LinkModel, holder: DeviceId, dst: DeviceId, bytes: u64) -> f64 {
    let link = Link::new(holder, dst);
    let load = LinkLoad { bytes, ops: 1 };
    model.predict_secs([(&link, &load)])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn every_need_is_met_exactly_once(case in case_strategy()) {
        let planner = Planner::new(case.model.clone(), case.config).unwrap();
        let plan = planner.plan(&case.needs).unwrap();
        let mut per_need: BTreeMap<usize, Vec<_>> = BTreeMap::new();
        for c in plan.copies() {
            per_need.entry(c.need).or_default().push(*c);
        }
        prop_assert_eq!(per_need.len(), case.needs.len());
        for (i, need) in case.needs.iter().enumerate() {
            let mut copies = per_need.remove(&i).unwrap_or_default();
            copies.sort_by_key(|c| c.offset);
            let mut next = 0;
            for c in &copies {
                prop_assert_eq!(c.offset, next, "gap or overlap in need {}", i);
                prop_assert!(c.op.len > 0);
                prop_assert_eq!(c.op.dst, Location::new(need.dst.device, need.dst.addr + c.offset));
                let holder = need.holders.iter().find(|h| h.device == c.op.src.device);
                prop_assert!(holder.is_some(), "copy from a device that does not hold need {}", i);
                prop_assert_eq!(c.op.src.addr, holder.unwrap().addr + c.offset);
                next += c.op.len;
            }
            prop_assert_eq!(next, need.len, "need {} not fully covered", i);
            // At most one copy per holder.
            let mut devs: Vec<_> = copies.iter().map(|c| c.op.src.device).collect();
            devs.dedup();
            prop_assert_eq!(devs.len(), copies.len());
        }
        // And the batch is one a transport accepts.
        prop_assert!(validate_batch(&Everything, &plan.batch()).is_ok());
    }

    #[test]
    fn no_link_carries_more_than_the_plan_says(case in case_strategy()) {
        let planner = Planner::new(case.model.clone(), case.config).unwrap();
        let plan = planner.plan(&case.needs).unwrap();
        let mut carried: BTreeMap<Link, LinkLoad> = BTreeMap::new();
        for c in plan.copies() {
            let l = carried.entry(c.op.link()).or_default();
            l.bytes += c.op.len;
            l.ops += 1;
        }
        prop_assert_eq!(&carried, plan.link_loads());
        for s in 0..case.devices {
            for d in 0..case.devices {
                let link = Link::new(DeviceId(s), DeviceId(d));
                prop_assert_eq!(plan.bytes_on(link), carried.get(&link).map_or(0, |l| l.bytes));
            }
        }
        prop_assert_eq!(plan.total_bytes(), case.needs.iter().map(|n| n.len).sum::<u64>());
    }

    #[test]
    fn the_prediction_is_consistent_and_bounded(case in case_strategy()) {
        let planner = Planner::new(case.model.clone(), case.config).unwrap();
        let plan = planner.plan(&case.needs).unwrap();
        let model = &case.model;
        // Exactly the model's times for the plan's loads.
        prop_assert_eq!(plan.predicted_secs(), model.predict_secs(plan.link_loads()));
        prop_assert_eq!(plan.bound_secs(), model.bound_secs(plan.link_loads()));
        // The simulation never beats the bound, which is at least every link's own time.
        prop_assert!(plan.predicted_secs() >= plan.bound_secs() * (1.0 - 1e-9));
        for (link, load) in plan.link_loads() {
            prop_assert!(plan.bound_secs() >= model.link(*link).secs(load.bytes, load.ops) * (1.0 - 1e-12));
        }
        // Max-min fairness keeps some resource saturated whenever bytes move, so the
        // prediction is at most the sum of every resource's busy time (a link's includes its
        // latencies).
        let mut busy: BTreeMap<String, f64> = BTreeMap::new();
        for (link, load) in plan.link_loads() {
            let spec = model.link(*link);
            *busy.entry(format!("{link}")).or_default() += spec.secs(load.bytes, load.ops);
            if !link.is_local() {
                *busy.entry(format!("out {}", link.src)).or_default() +=
                    load.bytes as f64 / model.ports(link.src).egress;
                *busy.entry(format!("in {}", link.dst)).or_default() +=
                    load.bytes as f64 / model.ports(link.dst).ingress;
            }
        }
        let saturation: f64 = busy.values().sum::<f64>();
        prop_assert!(
            plan.predicted_secs() <= saturation * (1.0 + 1e-9),
            "predicted {} > {}", plan.predicted_secs(), saturation
        );
        // The greedy balances the bound: at most what sending each need alone from its best
        // holder, one need after another, would take (with one extra step of slack per need for
        // the planner's rounding).
        let bound: f64 = case
            .needs
            .iter()
            .map(|n| {
                let extra = n.len + step(&case.config, n.len);
                n.holders
                    .iter()
                    .map(|h| alone(model, h.device, n.dst.device, extra))
                    .fold(f64::INFINITY, f64::min)
            })
            .sum();
        prop_assert!(
            plan.bound_secs() <= bound * (1.0 + 1e-9),
            "bound {} > serial {}", plan.bound_secs(), bound
        );
    }

    #[test]
    fn plans_are_deterministic_whatever_the_holder_order(case in case_strategy()) {
        let planner = Planner::new(case.model.clone(), case.config).unwrap();
        let a = planner.plan(&case.needs).unwrap();
        let reversed: Vec<Need> = case
            .needs
            .iter()
            .map(|n| Need::new(n.dst, n.len, n.holders.iter().rev().copied().collect()))
            .collect();
        let b = planner.plan(&reversed).unwrap();
        prop_assert_eq!(a, b);
    }

    /// Equal holders over equal links share a need evenly, to the step.
    #[test]
    fn equal_holders_get_equal_shares(holders in 1u32..8, steps_each in 1u64..64, gb in 1.0f64..500.0) {
        let g = 4096;
        let model = LinkModel::uniform(LinkSpec::gbps(gb, 0.0));
        let planner = Planner::new(model, PlannerConfig { granularity: g, max_steps_per_need: 1 << 20 }).unwrap();
        let len = u64::from(holders) * steps_each * g;
        let need = Need::new(
            Location::new(DeviceId(holders), 0),
            len,
            (0..holders).map(|h| Location::new(DeviceId(h), HOLDER_BASE)).collect(),
        );
        let plan = planner.plan(&[need]).unwrap();
        for h in 0..holders {
            prop_assert_eq!(plan.bytes_on(Link::new(DeviceId(h), DeviceId(holders))), steps_each * g);
        }
        let ideal = (steps_each * g) as f64 / (gb * 1e9);
        prop_assert!((plan.predicted_secs() - ideal).abs() <= ideal * 1e-9);
    }
}
