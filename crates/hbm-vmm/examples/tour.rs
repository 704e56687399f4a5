//! A short walk through `hbm-vmm` on the host backend (no GPU needed):
//! create chunks, reserve address space, map one chunk at two addresses (zero-copy), stitch
//! "experts" into a contiguous `PagedRegion` and remap one, and let the HBM manager (`Hmm`)
//! account for it all and retire an old view after the last reader.
//!
//! Run: `cargo run --release -p hbm-vmm --example tour`

use hbm_vmm::host::{HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Hmm, PagedRegion, Vmm, VmmError};

const MIB: usize = 1 << 20;

fn main() -> Result<(), VmmError> {
    let dev = DeviceId(0);
    // Two host "devices" with 64 MiB of "HBM" each and the GPU's 2 MiB granularity.
    let vmm = Vmm::new(HostBackend::new(HostConfig::devices(2, 64 * MIB)));
    let g = vmm.granularity(dev)?;
    println!(
        "== two host devices, {} MiB each, granularity {} MiB",
        vmm.capacity(dev) / MIB,
        g / MIB
    );

    // 1. A physical chunk, and two virtual views of it.
    let chunk = vmm.create_chunk(dev, 2 * g, false)?;
    let res_a = vmm.reserve(dev, 2 * g)?;
    let res_b = vmm.reserve(dev, 4 * g)?;
    let view_a = res_a.map(0, &chunk, 0, 2 * g)?;
    let view_b = res_b.map(2 * g, &chunk, 0, 2 * g)?;
    println!(
        "\n== {} mapped at {:#x} and at {:#x}",
        chunk.id(),
        view_a.addr(),
        view_b.addr()
    );
    view_a.as_mut_slice()[..20].copy_from_slice(b"written through A...");
    println!(
        "   read through B: {:?}",
        String::from_utf8_lossy(&view_b.as_slice()[..20])
    );
    println!(
        "   {dev} usage: {} MiB (counted once: zero-copy)",
        vmm.usage(dev) / MIB
    );
    drop((view_a, view_b, res_a, res_b));

    // 2. Experts in their own chunks, stitched into one contiguous range.
    let hmm: Hmm<HostBackend, String> = Hmm::new(&vmm);
    let mut experts = PagedRegion::new(&vmm, dev, g, 4)?;
    for e in 0..4 {
        let c = hmm.create(format!("layer0.expert{e}"), dev, g, false)?;
        experts.map_slot(e, c)?;
        experts.slot_bytes_mut(e)?[..8].copy_from_slice(format!("expert-{e}").as_bytes());
    }
    println!(
        "\n== experts 0..4 at [{:#x}, +{} MiB), one chunk each",
        experts.base(),
        experts.len() / MIB
    );
    print_slots(&experts)?;
    vmm.check_range(dev, experts.base(), experts.len())?;
    println!("   the whole range is mapped: a kernel can treat it as one array");

    // 3. Remap: slot 2 now shows a different expert; no bytes copied, the addresses stay.
    let e9 = hmm.create("layer0.expert9".into(), dev, g, false)?;
    experts
        .slot_bytes_mut(2)
        .map(|mut b| b[..8].copy_from_slice(b"old-exp2"))?;
    let view9 = vmm.reserve(dev, g)?.map(0, &e9, 0, g)?;
    view9.as_mut_slice()[..8].copy_from_slice(b"expert-9");
    drop(view9);
    let new_id = e9.id();
    let old = experts.remap_slot(2, e9)?;
    println!("\n== remapped slot 2 from {} to {}", old.id(), new_id);
    print_slots(&experts)?;
    drop(old);
    hmm.release(&"layer0.expert2".into())?;

    // 4. The HBM manager's accounting.
    println!(
        "\n== Hmm: {} keys, {dev} usage {} MiB, peak {} MiB",
        hmm.len(),
        hmm.usage(dev) / MIB,
        hmm.peak(dev) / MIB
    );

    // 5. Deferred release: an iteration still reading the old view keeps it mapped.
    let iteration = hmm.enter();
    let base = experts.base();
    hmm.retire(experts);
    println!(
        "\n== retired the expert range while an iteration (epoch {}) runs",
        iteration.epoch()
    );
    println!(
        "   collect now drops {} views; the range is still mapped: {}",
        hmm.collect(),
        vmm.check_range(dev, base, g).is_ok()
    );
    drop(iteration);
    println!(
        "   after the iteration ends, collect drops {}; still mapped: {}",
        hmm.collect(),
        vmm.check_range(dev, base, g).is_ok()
    );

    // 6. Capacity behaves like HBM.
    match vmm.create_chunk(dev, 64 * MIB, false) {
        Err(e) => println!("\n== asking for 64 MiB more: {e}"),
        Ok(_) => println!("\n== unexpectedly got 64 MiB more"),
    }
    for k in hmm.keys() {
        hmm.remove(&k)?;
    }
    drop(chunk);
    println!(
        "   after teardown {dev} usage is {} MiB",
        vmm.usage(dev) / MIB
    );
    Ok(())
}

fn print_slots(r: &PagedRegion<HostBackend>) -> Result<(), VmmError> {
    for s in 0..r.slot_count() {
        let bytes = r.slot_bytes(s)?;
        println!(
            "   slot {s} @ {:#x}: {} holds {:?}",
            r.slot_addr(s)?,
            r.chunk(s).map(|c| c.id().to_string()).unwrap_or_default(),
            String::from_utf8_lossy(&bytes[..8])
        );
    }
    Ok(())
}
