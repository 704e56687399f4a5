//! The host transport end to end on host-backend memory: random batches verified byte for byte and
//! by checksum, plans executed, cancellation, shutdown, bad addresses refused before submit, and
//! ranges unmapped while queued.

use hbm_vmm::host::{page_size, HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Mapping, Vmm, VmmError};
use p2p_xfer::{
    BatchError, CopyFault, CopyOp, HostTransport, HostTransportConfig, Link, LinkModel, LinkSpec,
    Location, Need, Planner, PlannerConfig, Ports, Side, SubmitError, Transport,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};

/// Host devices, each with one mapping of `bytes`: the lower half holds sources, the upper half
/// receives copies.
struct Rig {
    vmm: Vmm<HostBackend>,
    maps: Vec<Mapping<HostBackend>>,
}

impl Rig {
    fn new(devices: usize, bytes: usize) -> Self {
        let page = page_size();
        let bytes = bytes.div_ceil(page) * page;
        // Room for the rig's mapping plus a few pages that tests map and unmap themselves.
        let config = HostConfig::devices(devices, bytes + 16 * page)
            .with_granularity(page)
            .unwrap();
        let vmm = Vmm::new(HostBackend::new(config));
        let maps = (0..devices)
            .map(|d| {
                let dev = DeviceId(d as u32);
                let chunk = vmm.create_chunk(dev, bytes, false).unwrap();
                vmm.reserve(dev, bytes)
                    .unwrap()
                    .map(0, &chunk, 0, bytes)
                    .unwrap()
            })
            .collect();
        Self { vmm, maps }
    }

    fn half(&self) -> u64 {
        self.maps[0].len() as u64 / 2
    }

    /// Byte `off` of the source half of device `d`.
    fn src(&self, d: usize, off: u64) -> Location {
        Location::new(DeviceId(d as u32), self.maps[d].addr() + off)
    }

    /// Byte `off` of the destination half of device `d`.
    fn dst(&self, d: usize, off: u64) -> Location {
        Location::new(DeviceId(d as u32), self.maps[d].addr() + self.half() + off)
    }

    fn fill_sources(&self, rng: &mut ChaCha8Rng) {
        let half = self.half() as usize;
        for m in &self.maps {
            rng.fill(&mut m.as_mut_slice()[..half]);
        }
    }

    fn bytes(&self, at: Location, len: u64) -> Vec<u8> {
        let m = &self.maps[at.device.index()];
        let off = (at.addr - m.addr()) as usize;
        m.as_slice()[off..off + len as usize].to_vec()
    }
}

/// FNV-1a, so a mismatch is reported as two numbers rather than two megabyte dumps.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn transport(rig: &Rig, config: HostTransportConfig) -> HostTransport {
    HostTransport::new(rig.vmm.clone(), config)
}

/// Random copies from source halves into disjoint pieces of destination halves.
fn random_batch(rig: &Rig, rng: &mut ChaCha8Rng, devices: usize, copies: usize) -> Vec<CopyOp> {
    let half = rig.half();
    // Cut each destination half into `copies` slots; each copy writes inside one slot.
    let slot = half / copies as u64;
    let mut slots: Vec<(usize, u64)> = (0..devices)
        .flat_map(|d| (0..copies as u64).map(move |s| (d, s * slot)))
        .collect();
    let mut batch = Vec::new();
    for _ in 0..copies {
        let (dd, base) = slots.swap_remove(rng.random_range(0..slots.len()));
        let len = rng.random_range(1..=slot);
        let dst_off = base + rng.random_range(0..=slot - len);
        let sd = rng.random_range(0..devices);
        let src_off = rng.random_range(0..=half - len);
        batch.push(CopyOp::new(rig.src(sd, src_off), rig.dst(dd, dst_off), len));
    }
    batch
}

fn assert_copied(rig: &Rig, op: &CopyOp) {
    let want = rig.bytes(op.src, op.len);
    let got = rig.bytes(op.dst, op.len);
    assert_eq!(
        checksum(&got),
        checksum(&want),
        "checksum mismatch for {op}"
    );
    assert!(got == want, "bytes differ for {op}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    /// Random batches land byte for byte, untouched destination bytes stay zero, and the per-link
    /// counters add up to the batch.
    #[test]
    fn random_batches_land_exactly(
        seed in any::<u64>(),
        devices in 2usize..5,
        copies in 1usize..24,
        workers in 1usize..5,
        chunk_kib in 1u64..64,
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let rig = Rig::new(devices, 512 << 10);
        rig.fill_sources(&mut rng);
        let t = transport(&rig, HostTransportConfig {
            workers,
            chunk_bytes: chunk_kib << 10,
            link_model: None,
        });
        let batch = random_batch(&rig, &mut rng, devices, copies);
        let report = t.submit(&batch).unwrap().wait().unwrap();
        prop_assert_eq!(report.copies, batch.len());
        prop_assert_eq!(report.bytes, batch.iter().map(|c| c.len).sum::<u64>());
        for op in &batch {
            assert_copied(&rig, op);
        }
        // Nothing outside the copies' destinations was written.
        let written: u64 = batch.iter().map(|c| c.len).sum();
        let nonzero_possible: usize = (0..devices)
            .map(|d| {
                let m = &rig.maps[d];
                let half = rig.half() as usize;
                let dst = &m.as_slice()[half..];
                let mut covered = vec![false; dst.len()];
                for op in batch.iter().filter(|c| c.dst.device.index() == d) {
                    let off = (op.dst.addr - m.addr()) as usize - half;
                    covered[off..off + op.len as usize].fill(true);
                }
                dst.iter().zip(&covered).filter(|(&b, &c)| !c && b != 0).count()
            })
            .sum();
        prop_assert_eq!(nonzero_possible, 0, "stray writes outside {} copied bytes", written);
        let stats = t.stats();
        for s in &stats {
            let (bytes, count) = batch
                .iter()
                .filter(|c| c.link() == s.link)
                .fold((0, 0), |(b, n), c| (b + c.len, n + 1));
            prop_assert_eq!((s.bytes, s.copies), (bytes, count), "stats of {}", s.link);
        }
        let links: std::collections::BTreeSet<Link> = batch.iter().map(CopyOp::link).collect();
        prop_assert_eq!(stats.len(), links.len());
    }
}

#[test]
fn many_batches_in_flight_at_once_all_land() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let rig = Rig::new(4, 1 << 20);
    rig.fill_sources(&mut rng);
    let t = transport(&rig, HostTransportConfig::default());
    // Eight batches, each writing its own eighth of every destination half.
    let eighth = rig.half() / 8;
    let batches: Vec<Vec<CopyOp>> = (0..8)
        .map(|b| {
            (0..4)
                .map(|d| {
                    let len = rng.random_range(1..=eighth);
                    let src = rig.src(
                        (d + 1 + b as usize) % 4,
                        rng.random_range(0..rig.half() - len),
                    );
                    CopyOp::new(src, rig.dst(d, b * eighth), len)
                })
                .collect()
        })
        .collect();
    let tickets: Vec<_> = batches.iter().map(|b| t.submit(b).unwrap()).collect();
    for (ticket, batch) in tickets.iter().zip(&batches) {
        ticket.wait().unwrap();
        for op in batch {
            assert_copied(&rig, op);
        }
    }
}

#[test]
fn a_striped_plan_runs_and_rebuilds_the_tensor() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let rig = Rig::new(4, 2 << 20);
    // Devices 0, 1 and 2 hold the same 600 KiB tensor at different offsets; device 3 needs it.
    let len = 600 << 10;
    let mut tensor = vec![0u8; len as usize];
    rng.fill(&mut tensor[..]);
    let holders: Vec<Location> = (0..3)
        .map(|d| {
            let at = rig.src(d, 4096 * (d as u64 + 1));
            let m = &rig.maps[d];
            let off = (at.addr - m.addr()) as usize;
            m.as_mut_slice()[off..off + len as usize].copy_from_slice(&tensor);
            at
        })
        .collect();
    let planner = Planner::new(
        LinkModel::uniform(LinkSpec::gbps(100.0, 0.0)),
        PlannerConfig {
            granularity: 64 << 10,
            ..PlannerConfig::default()
        },
    )
    .unwrap();
    let need = Need::new(rig.dst(3, 0), len, holders);
    let plan = planner.plan(&[need]).unwrap();
    assert_eq!(plan.copies().len(), 3, "striped over every holder");
    let t = transport(&rig, HostTransportConfig::default());
    t.submit(&plan.batch()).unwrap().wait().unwrap();
    assert_eq!(rig.bytes(rig.dst(3, 0), len), tensor);
    for s in t.stats() {
        assert_eq!(s.bytes, plan.bytes_on(s.link));
    }
}

#[test]
fn pacing_takes_at_least_the_model_time() {
    let rig = Rig::new(3, 4 << 20);
    // 1 GB/s links, 0.5 GB/s ingress at device 2: two 1 MB copies into it take >= 4 ms.
    let model = LinkModel::uniform(LinkSpec::gbps(1.0, 100.0)).with_ports(
        DeviceId(2),
        Ports {
            egress: f64::INFINITY,
            ingress: 0.5e9,
        },
    );
    let t = transport(
        &rig,
        HostTransportConfig {
            workers: 4,
            chunk_bytes: 256 << 10,
            link_model: Some(model.clone()),
        },
    );
    let batch = [
        CopyOp::new(rig.src(0, 0), rig.dst(2, 0), 1_000_000),
        CopyOp::new(rig.src(1, 0), rig.dst(2, 1 << 20), 1_000_000),
    ];
    let start = Instant::now();
    t.submit(&batch).unwrap().wait().unwrap();
    let elapsed = start.elapsed();
    let loads: Vec<(Link, p2p_xfer::LinkLoad)> = batch
        .iter()
        .map(|c| {
            (
                c.link(),
                p2p_xfer::LinkLoad {
                    bytes: c.len,
                    ops: 1,
                },
            )
        })
        .collect();
    // The ingress bound: 2 MB at 0.5 GB/s; each link's latency hides behind the shared port.
    let bound = model.bound_secs(loads.iter().map(|(l, x)| (l, x)));
    assert!((bound - 0.004).abs() < 1e-12, "{bound}");
    let predicted = model.predict(loads.iter().map(|(l, x)| (l, x)));
    assert_eq!(predicted, Duration::from_millis(4));
    assert!(elapsed.as_secs_f64() >= bound, "{elapsed:?} < {bound} s");
    // The paced busy time is what the stats see, so achieved bandwidth reflects the model.
    for s in t.stats() {
        assert!(s.busy >= Duration::from_millis(2), "{s:?}");
    }
}

/// A transport whose links crawl (100 kB/s in 4 KiB parts, so about 40 ms a part), so a test
/// can act while a large copy is still running. The tests below never depend on how long a
/// thread sleeps or runs: they wait for what they can observe (a counter, a ticket), and the
/// copy they act during lasts seconds, where the test needs microseconds.
fn slow(rig: &Rig) -> HostTransport {
    transport(
        rig,
        HostTransportConfig {
            workers: 2,
            chunk_bytes: 4096,
            link_model: Some(LinkModel::uniform(LinkSpec::gbps(0.0001, 0.0))),
        },
    )
}

#[test]
fn cancel_stops_the_batch_and_reports_exactly_what_completed() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let rig = Rig::new(2, 1 << 20);
    rig.fill_sources(&mut rng);
    let t = slow(&rig);
    // Four small copies (under a millisecond each at this pace), then one of 256 KiB (about
    // 2.6 s), all on one link.
    let mut batch: Vec<CopyOp> = (0..4)
        .map(|i| CopyOp::new(rig.src(0, i * 64), rig.dst(1, i * 64), 64))
        .collect();
    batch.push(CopyOp::new(rig.src(0, 4096), rig.dst(1, 4096), 256 << 10));
    let ticket = t.submit(&batch).unwrap();
    // Cancel once the link's counter shows the small copies landed: the large one is running.
    while t.stats().first().map_or(0, |s| s.copies) < 4 {
        std::thread::yield_now();
    }
    ticket.cancel();
    let err = ticket.wait().unwrap_err();
    let BatchError::Cancelled { completed, total } = &err else {
        panic!("expected a cancellation, got {err:?}");
    };
    assert_eq!(*total, 5);
    // One link runs in order, so the completed copies are a prefix: the four small ones.
    assert_eq!(*completed, vec![0, 1, 2, 3]);
    for &i in completed {
        assert_copied(&rig, &batch[i]);
    }
    // The large copy was cut short: not all of it landed.
    let next = &batch[4];
    assert_ne!(rig.bytes(next.dst, next.len), rig.bytes(next.src, next.len));
    // The stats count exactly the parts that ran.
    let s = &t.stats()[0];
    assert_eq!(s.copies, 4);
    assert!(s.bytes >= 4 * 64 && s.bytes < 4 * 64 + (256 << 10), "{s:?}");
    // The transport is still usable.
    let again = [CopyOp::new(rig.src(0, 0), rig.dst(0, 0), 100)];
    t.submit(&again).unwrap().wait().unwrap();
}

#[test]
fn cancel_on_a_finished_batch_is_harmless() {
    let rig = Rig::new(2, 64 << 10);
    let t = transport(&rig, HostTransportConfig::default());
    let ticket = t
        .submit(&[CopyOp::new(rig.src(0, 0), rig.dst(1, 0), 1000)])
        .unwrap();
    ticket.wait().unwrap();
    ticket.cancel();
    assert!(ticket.is_cancelled());
    assert!(ticket.wait().is_ok());
}

#[test]
fn dropping_the_transport_resolves_pending_tickets() {
    let rig = Rig::new(2, 1 << 20);
    let t = slow(&rig);
    // A small copy, then one of 256 KiB (about 2.6 s at this pace): the transport is dropped
    // long before the second could finish.
    let batch = [
        CopyOp::new(rig.src(0, 0), rig.dst(1, 0), 64),
        CopyOp::new(rig.src(0, 4096), rig.dst(1, 4096), 256 << 10),
    ];
    let ticket = t.submit(&batch).unwrap();
    drop(t);
    match ticket.wait() {
        Err(BatchError::ShutDown {
            completed,
            total: 2,
        }) => {
            assert!(completed.len() < 2, "{completed:?}")
        }
        other => panic!("expected a shutdown report, got {other:?}"),
    }
}

#[test]
fn bad_addresses_are_refused_before_anything_moves() {
    let rig = Rig::new(2, 64 << 10);
    rig.maps[0].as_mut_slice().fill(0xAB);
    let t = transport(&rig, HostTransportConfig::default());
    let good = CopyOp::new(rig.src(0, 0), rig.dst(1, 0), 100);
    let end = rig.maps[1].addr() + rig.maps[1].len() as u64;

    // Past the end of the destination mapping.
    let past_end = CopyOp::new(rig.src(0, 0), Location::new(DeviceId(1), end - 50), 100);
    match t.submit(&[good, past_end]) {
        Err(SubmitError::Unmapped {
            index: 1,
            side: Side::Destination,
            source: VmmError::NotMapped { .. },
            ..
        }) => {}
        other => panic!("expected an unmapped destination, got {other:?}"),
    }
    // An address nobody mapped.
    let wild = CopyOp::new(Location::new(DeviceId(0), 0x1000), rig.dst(1, 4096), 8);
    assert!(matches!(
        t.submit(&[good, wild]),
        Err(SubmitError::Unmapped {
            index: 1,
            side: Side::Source,
            ..
        })
    ));
    // A device that does not exist.
    let nodev = CopyOp::new(rig.src(0, 0), Location::new(DeviceId(9), 0), 8);
    assert!(matches!(
        t.submit(&[nodev]),
        Err(SubmitError::Unmapped {
            source: VmmError::NoSuchDevice(DeviceId(9)),
            ..
        })
    ));
    // Zero length, overflow, overlapping writes.
    assert!(matches!(
        t.submit(&[CopyOp::new(rig.src(0, 0), rig.dst(1, 0), 0)]),
        Err(SubmitError::ZeroLength { index: 0 })
    ));
    assert!(matches!(
        t.submit(&[CopyOp::new(
            Location::new(DeviceId(0), u64::MAX),
            rig.dst(1, 0),
            2
        )]),
        Err(SubmitError::AddressOverflow { .. })
    ));
    assert!(matches!(
        t.submit(&[good, CopyOp::new(rig.src(0, 500), rig.dst(1, 99), 10)]),
        Err(SubmitError::OverlappingDestinations {
            first: 0,
            second: 1
        })
    ));
    // None of the refused batches wrote anything, not even their good first copy.
    assert!(rig.maps[1].as_slice().iter().all(|&b| b == 0));
    assert!(t.stats().is_empty());
}

#[test]
fn a_dropped_mapping_is_refused_at_submit() {
    let rig = Rig::new(2, 64 << 10);
    let vmm = rig.vmm.clone();
    let chunk = vmm.create_chunk(DeviceId(1), page_size(), false).unwrap();
    let res = vmm.reserve(DeviceId(1), page_size()).unwrap();
    let m = res.map(0, &chunk, 0, page_size()).unwrap();
    let at = Location::new(DeviceId(1), m.addr());
    drop(m);
    let t = transport(&rig, HostTransportConfig::default());
    assert!(matches!(
        t.submit(&[CopyOp::new(rig.src(0, 0), at, 16)]),
        Err(SubmitError::Unmapped {
            side: Side::Destination,
            ..
        })
    ));
}

#[test]
fn a_range_unmapped_while_queued_fails_only_its_copy() {
    let rig = Rig::new(2, 1 << 20);
    let vmm = rig.vmm.clone();
    let page = page_size();
    let chunk = vmm.create_chunk(DeviceId(1), page, false).unwrap();
    let res = vmm.reserve(DeviceId(1), page).unwrap();
    let doomed = res.map(0, &chunk, 0, page).unwrap();
    let t = slow(&rig);
    // Copy 0 occupies the 0->1 lane for about 650 ms; copy 1 is queued behind it, and its
    // range is gone long before it starts.
    let batch = [
        CopyOp::new(rig.src(0, 0), rig.dst(1, 0), 64 << 10),
        CopyOp::new(rig.src(0, 0), Location::new(DeviceId(1), doomed.addr()), 64),
    ];
    let ticket = t.submit(&batch).unwrap();
    drop(doomed);
    match ticket.wait() {
        Err(BatchError::Failed {
            index: 1,
            fault:
                CopyFault::UnmappedInFlight {
                    side: Side::Destination,
                    ..
                },
            completed,
            total: 2,
        }) => assert_eq!(completed, vec![0]),
        other => panic!("expected copy 1 to fail, got {other:?}"),
    }
    assert_copied(&rig, &batch[0]);
}

#[test]
fn an_empty_batch_finishes_at_once() {
    let rig = Rig::new(1, 64 << 10);
    let t = transport(&rig, HostTransportConfig::default());
    let ticket = t.submit(&[]).unwrap();
    assert!(ticket.poll().is_ready());
    assert_eq!(ticket.wait().unwrap().copies, 0);
}
