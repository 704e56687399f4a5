//! Host benchmark (no GPU): the host transport's memcpy throughput by worker count, how closely
//! a paced run matches the planner's prediction, and how long planning a large scale-up takes.
//! Reports only; nothing here is asserted. Run: `cargo bench -p p2p-xfer --bench host_transport`.

use hbm_vmm::host::{HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Mapping, Vmm};
use p2p_xfer::{
    CopyOp, HostTransport, HostTransportConfig, LinkModel, LinkSpec, Location, Need, Planner,
    PlannerConfig, Ports, Transport,
};
use std::time::Instant;

const MIB: u64 = 1 << 20;
const REGION: u64 = 256 * MIB;

fn main() {
    let n = 4;
    let vmm = Vmm::new(HostBackend::new(HostConfig::devices(
        n,
        2 * REGION as usize,
    )));
    let maps: Vec<(Mapping<HostBackend>, Mapping<HostBackend>)> = (0..n as u32)
        .map(|d| {
            let dev = DeviceId(d);
            let mk = || {
                let c = vmm.create_chunk(dev, REGION as usize, false).unwrap();
                vmm.reserve(dev, REGION as usize)
                    .unwrap()
                    .map(0, &c, 0, REGION as usize)
                    .unwrap()
            };
            let (src, dst) = (mk(), mk());
            src.as_mut_slice().fill(d as u8 + 1);
            (src, dst)
        })
        .collect();
    let src = |d: usize, off: u64| Location::new(DeviceId(d as u32), maps[d].0.addr() + off);
    let dst = |d: usize, off: u64| Location::new(DeviceId(d as u32), maps[d].1.addr() + off);

    println!("unpaced memcpy, a ring of 4 links, 128 MiB per link:");
    for workers in [1, 2, 4] {
        let t = HostTransport::new(
            vmm.clone(),
            HostTransportConfig {
                workers,
                ..HostTransportConfig::default()
            },
        );
        let batch: Vec<CopyOp> = (0..n)
            .map(|d| CopyOp::new(src(d, 0), dst((d + 1) % n, 0), 128 * MIB))
            .collect();
        t.submit(&batch).unwrap().wait().unwrap(); // warm the pages
        let start = Instant::now();
        let r = t.submit(&batch).unwrap().wait().unwrap();
        println!(
            "  {workers} worker(s): {:.1} GB/s aggregate",
            r.bytes as f64 / start.elapsed().as_secs_f64() / 1e9
        );
    }

    // A paced emulation: links at 1 GB/s, ports at 1.5 GB/s; device 3 gets 8 x 16 MiB held by
    // devices 0..3, striped. (Pacing can only slow copies down: the model must stay well below
    // what the host's memcpy sustains per worker, or the run is memcpy-bound.)
    let model = LinkModel::uniform(LinkSpec::gbps(1.0, 20.0))
        .with_default_ports(Ports::symmetric_gbps(1.5));
    let planner = Planner::new(model.clone(), PlannerConfig::default()).unwrap();
    let needs: Vec<Need> = (0..8)
        .map(|k| {
            Need::new(
                dst(3, k * 16 * MIB),
                16 * MIB,
                (0..3).map(|h| src(h, k * 16 * MIB)).collect(),
            )
        })
        .collect();
    let plan = planner.plan(&needs).unwrap();
    let t = HostTransport::new(
        vmm.clone(),
        HostTransportConfig {
            workers: 8,
            chunk_bytes: MIB,
            link_model: Some(model),
        },
    );
    let start = Instant::now();
    t.submit(&plan.batch()).unwrap().wait().unwrap();
    let measured = start.elapsed();
    println!(
        "paced striped plan (128 MiB into dev3 from 3 holders): predicted {:.1} ms, measured {:.1} ms",
        plan.predicted_secs() * 1e3,
        measured.as_secs_f64() * 1e3
    );

    // Planning cost for a large scale-up: 4096 tensors of 8 MiB from 7 holders to one device.
    let big = Planner::new(LinkModel::nvlink4(), PlannerConfig::default()).unwrap();
    let needs: Vec<Need> = (0..4096u64)
        .map(|k| {
            Need::new(
                Location::new(DeviceId(7), k * 8 * MIB),
                8 * MIB,
                (0..7)
                    .map(|h| Location::new(DeviceId(h), (1 << 40) + k * 8 * MIB))
                    .collect(),
            )
        })
        .collect();
    let start = Instant::now();
    let plan = big.plan(&needs).unwrap();
    println!(
        "planning 4096 x 8 MiB from 7 holders: {:.1} ms, {} copies, predicted transfer {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3,
        plan.copies().len(),
        plan.predicted_secs() * 1e3
    );
}
