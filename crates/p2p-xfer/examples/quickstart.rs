//! Plan a copy striped over two holders and carry it out on the host transport.
//!
//! Run: `cargo run -p p2p-xfer --example quickstart` (no GPU needed).

use hbm_vmm::{
    host::{HostBackend, HostConfig},
    DeviceId, Vmm,
};
use p2p_xfer::{
    HostTransport, HostTransportConfig, LinkModel, Location, Need, Planner, PlannerConfig,
    Transport,
};

fn main() {
    let vmm = Vmm::new(HostBackend::new(HostConfig::devices(3, 64 << 20)));
    // Devices 0 and 1 hold the same 4 MiB; device 2 needs them.
    let mut maps = Vec::new();
    for dev in 0..3 {
        let chunk = vmm.create_chunk(DeviceId(dev), 4 << 20, false).unwrap();
        let res = vmm.reserve(DeviceId(dev), 4 << 20).unwrap();
        let map = res.map(0, &chunk, 0, 4 << 20).unwrap();
        if dev < 2 {
            map.as_mut_slice().fill(7);
        }
        maps.push((res, map));
    }
    let at = |dev: usize| Location::new(DeviceId(dev as u32), maps[dev].1.addr());

    let planner = Planner::new(LinkModel::nvlink4(), PlannerConfig::default()).unwrap();
    let plan = planner
        .plan(&[Need::new(at(2), 4 << 20, vec![at(0), at(1)])])
        .unwrap();
    assert_eq!(plan.copies().len(), 2); // striped over both holders

    let transport = HostTransport::new(vmm.clone(), HostTransportConfig::default());
    let report = transport.submit(&plan.batch()).unwrap().wait().unwrap();
    assert_eq!(report.bytes, 4 << 20);
    assert!(maps[2].1.as_slice().iter().all(|&b| b == 7));
    println!("p2p-xfer: ok");
}
