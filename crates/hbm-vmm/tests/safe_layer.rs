//! The safe layer on the host backend: chunks, reservations, mappings, paged regions and errors.

use hbm_vmm::host::{page_size, HostBackend, HostConfig};
use hbm_vmm::{DeviceId, PagedRegion, Vmm, VmmError};

const D0: DeviceId = DeviceId(0);
const D1: DeviceId = DeviceId(1);

fn vmm(pages_per_device: usize) -> (Vmm<HostBackend>, usize) {
    let g = page_size();
    let cfg = HostConfig::devices(2, pages_per_device * g)
        .with_granularity(g)
        .unwrap();
    (Vmm::new(HostBackend::new(cfg)), g)
}

#[test]
fn device_id_displays_as_dev_n() {
    assert_eq!(DeviceId(3).to_string(), "dev3");
}

#[test]
fn one_chunk_at_two_addresses_shares_bytes() {
    let (vmm, g) = vmm(16);
    let chunk = vmm.create_chunk(D0, 2 * g, false).unwrap();
    let r1 = vmm.reserve(D0, 4 * g).unwrap();
    let r2 = vmm.reserve(D0, 2 * g).unwrap();
    let a = r1.map(2 * g, &chunk, 0, 2 * g).unwrap();
    let b = r2.map(0, &chunk, 0, 2 * g).unwrap();
    assert_eq!(a.addr(), r1.base() + 2 * g as u64);
    assert_ne!(a.addr(), b.addr());
    a.as_mut_slice()[g..g + 4].copy_from_slice(&[1, 2, 3, 4]);
    assert_eq!(&b.as_slice()[g..g + 4], &[1, 2, 3, 4]);
    b.as_mut_slice()[0] = 9;
    assert_eq!(a.as_slice()[0], 9);
    // The bytes are counted once.
    assert_eq!(vmm.usage(D0), 2 * g);
}

#[test]
fn chunk_released_after_last_handle_and_mapping() {
    let (vmm, g) = vmm(4);
    let chunk = vmm.create_chunk(D0, 2 * g, false).unwrap();
    let r = vmm.reserve(D0, 2 * g).unwrap();
    let m = r.map(0, &chunk, 0, 2 * g).unwrap();
    drop(chunk);
    drop(r);
    // The mapping keeps chunk and reservation alive; the bytes are still there.
    m.as_mut_slice()[5] = 7;
    assert_eq!(vmm.usage(D0), 2 * g);
    assert_eq!(vmm.mem_info(D0).unwrap(), (2 * g, 4 * g));
    drop(m);
    assert_eq!(vmm.usage(D0), 0);
    assert_eq!(vmm.peak(D0), 2 * g);
    assert_eq!(vmm.mem_info(D0).unwrap(), (4 * g, 4 * g));
    assert!(vmm.take_errors().is_empty());
}

#[test]
fn capacity_is_enforced_per_device() {
    let (vmm, g) = vmm(4);
    let a = vmm.create_chunk(D0, 3 * g, false).unwrap();
    assert_eq!(
        vmm.create_chunk(D0, 2 * g, false).unwrap_err(),
        VmmError::OutOfMemory {
            device: D0,
            requested: 2 * g,
            available: g
        }
    );
    // The other device has its own budget.
    let _b = vmm.create_chunk(D1, 4 * g, false).unwrap();
    drop(a);
    let _c = vmm.create_chunk(D0, 4 * g, false).unwrap();
    assert_eq!(vmm.capacity(D0), 4 * g);
}

#[test]
fn bad_arguments_give_typed_errors() {
    let (vmm, g) = vmm(8);
    assert_eq!(
        vmm.create_chunk(DeviceId(7), g, false).unwrap_err(),
        VmmError::NoSuchDevice(DeviceId(7))
    );
    assert!(matches!(
        vmm.create_chunk(D0, g + 1, false),
        Err(VmmError::Unaligned { .. })
    ));
    assert!(matches!(
        vmm.create_chunk(D0, 0, false),
        Err(VmmError::ZeroSize { .. })
    ));
    assert!(matches!(
        vmm.reserve(D0, g / 2),
        Err(VmmError::Unaligned { .. })
    ));
    let chunk = vmm.create_chunk(D0, 2 * g, false).unwrap();
    let r = vmm.reserve(D0, 2 * g).unwrap();
    assert!(matches!(
        r.map(g / 2, &chunk, 0, g),
        Err(VmmError::Unaligned { what: "offset", .. })
    ));
    assert!(matches!(
        r.map(g, &chunk, 0, 2 * g),
        Err(VmmError::OutOfRange {
            what: "reservation",
            ..
        })
    ));
    assert!(matches!(
        r.map(0, &chunk, 2 * g, g),
        Err(VmmError::OutOfRange { what: "chunk", .. })
    ));
    let m = r.map(0, &chunk, 0, 2 * g).unwrap();
    assert!(matches!(
        r.map(g, &chunk, 0, g),
        Err(VmmError::AlreadyMapped { .. })
    ));
    let other = vmm.create_chunk(D1, g, false).unwrap();
    assert_eq!(
        r.map(0, &other, 0, g).unwrap_err(),
        VmmError::DeviceMismatch {
            expected: D0,
            found: D1
        }
    );
    assert_eq!(chunk.export().unwrap_err(), VmmError::NotExportable);
    drop(m);
    // After the unmap, the range can be mapped again.
    let _m = r.map(g, &chunk, g, g).unwrap();
}

#[test]
fn check_range_follows_live_mappings() {
    let (vmm, g) = vmm(8);
    let r = vmm.reserve(D0, 4 * g).unwrap();
    let c1 = vmm.create_chunk(D0, g, false).unwrap();
    let c2 = vmm.create_chunk(D0, g, false).unwrap();
    let base = r.base();
    let m1 = r.map(0, &c1, 0, g).unwrap();
    let _m2 = r.map(g, &c2, 0, g).unwrap();
    // Two adjacent mappings form one checked range.
    vmm.check_range(D0, base + 10, 2 * g - 10).unwrap();
    assert!(matches!(
        vmm.check_range(D0, base, 2 * g + 1),
        Err(VmmError::NotMapped { .. })
    ));
    assert!(matches!(
        vmm.check_range(D1, base, 1),
        Err(VmmError::NotMapped { .. })
    ));
    assert!(matches!(
        vmm.check_range(D0, base - 1, 2),
        Err(VmmError::NotMapped { .. })
    ));
    drop(m1);
    assert!(matches!(
        vmm.check_range(D0, base, 1),
        Err(VmmError::NotMapped { .. })
    ));
    vmm.check_range(D0, base + g as u64, g).unwrap();
}

#[test]
fn paged_region_map_unmap_remap() {
    let (vmm, g) = vmm(16);
    let mut region = PagedRegion::new(&vmm, D0, g, 4).unwrap();
    assert_eq!(region.slot_count(), 4);
    assert_eq!(region.slot_addr(2).unwrap(), region.base() + 2 * g as u64);
    let a = vmm.create_chunk(D0, g, false).unwrap();
    let b = vmm.create_chunk(D0, g, false).unwrap();
    region.map_slot(1, a.clone()).unwrap();
    region.slot_bytes_mut(1).unwrap()[..3].copy_from_slice(b"aaa");
    assert!(region.is_mapped(1) && !region.is_mapped(0));
    assert!(region.chunk(1).unwrap().same(&a));

    // Remap: the slot's address now shows b's bytes; a keeps its own.
    let old = region.remap_slot(1, b.clone()).unwrap();
    assert!(old.same(&a));
    assert_eq!(&region.slot_bytes(1).unwrap()[..3], &[0, 0, 0]);
    region.write(g + 1, b"bb").unwrap();
    let mut buf = [0u8; 3];
    region.read(g, &mut buf).unwrap();
    assert_eq!(&buf, &[0, b'b', b'b']);

    // Typed errors.
    assert!(matches!(
        region.map_slot(1, a.clone()),
        Err(VmmError::AlreadyMapped { .. })
    ));
    assert!(matches!(
        region.unmap_slot(2),
        Err(VmmError::NotMapped { .. })
    ));
    assert_eq!(
        region.map_slot(4, a.clone()).unwrap_err(),
        VmmError::NoSuchSlot { slot: 4, slots: 4 }
    );
    let big = vmm.create_chunk(D0, 2 * g, false).unwrap();
    assert_eq!(
        region.map_slot(0, big).unwrap_err(),
        VmmError::SizeMismatch {
            expected: g,
            found: 2 * g
        }
    );
    assert!(matches!(
        region.read(0, &mut buf),
        Err(VmmError::NotMapped { .. })
    ));
    assert!(matches!(
        region.slot_bytes(3),
        Err(VmmError::NotMapped { .. })
    ));

    let back = region.unmap_slot(1).unwrap();
    assert!(back.same(&b));
    assert_eq!(region.mapped_count(), 0);
}

#[test]
fn paged_region_spans_slots_contiguously() {
    let (vmm, g) = vmm(16);
    let mut region = PagedRegion::new(&vmm, D0, g, 3).unwrap();
    for i in 0..3 {
        region
            .map_slot(i, vmm.create_chunk(D0, g, false).unwrap())
            .unwrap();
    }
    let data: Vec<u8> = (0..2 * g).map(|i| (i % 251) as u8).collect();
    region.write(g / 2, &data).unwrap();
    // SAFETY: no writer is alive while the slice is used.
    let whole = unsafe { region.range(g / 2, 2 * g) }.unwrap();
    assert_eq!(whole, &data[..]);
    vmm.check_range(D0, region.base(), 3 * g).unwrap();
}

#[test]
fn import_rejects_bad_fds() {
    let (vmm, g) = vmm(8);
    let chunk = vmm.create_chunk(D0, g, true).unwrap();
    let fd = chunk.export().unwrap();
    assert!(matches!(
        vmm.import_chunk(D0, fd, 2 * g),
        Err(VmmError::BadHandle(_))
    ));
    let (rd, _wr) = std::io::pipe().unwrap();
    assert!(matches!(
        vmm.import_chunk(D0, rd.into(), g),
        Err(VmmError::BadHandle(_))
    ));
    // A good import sees the exporter's bytes and is not charged.
    let r = vmm.reserve(D0, g).unwrap();
    let m = r.map(0, &chunk, 0, g).unwrap();
    m.as_mut_slice()[0] = 42;
    let imported = vmm.import_chunk(D0, chunk.export().unwrap(), g).unwrap();
    let r2 = vmm.reserve(D0, g).unwrap();
    let m2 = r2.map(0, &imported, 0, g).unwrap();
    assert_eq!(m2.as_slice()[0], 42);
    assert_eq!(vmm.usage(D0), g);
}

#[test]
fn granularity_must_be_a_power_of_two_page_multiple() {
    let g = page_size();
    assert!(matches!(
        HostConfig::devices(1, g).with_granularity(g / 2),
        Err(VmmError::BadGranularity { .. })
    ));
    assert!(matches!(
        HostConfig::devices(1, g).with_granularity(3 * g),
        Err(VmmError::BadGranularity { .. })
    ));
    let vmm = Vmm::new(HostBackend::new(HostConfig::devices(1, 8 << 20)));
    assert_eq!(vmm.granularity(D0).unwrap(), 2 << 20);
    let r = vmm.reserve(D0, 4 << 20).unwrap();
    assert_eq!(
        r.base() % (2 << 20),
        0,
        "reservations are aligned to the granularity"
    );
}

#[test]
fn handles_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Vmm<HostBackend>>();
    assert_send_sync::<hbm_vmm::PhysChunk<HostBackend>>();
    assert_send_sync::<hbm_vmm::Reservation<HostBackend>>();
    assert_send_sync::<hbm_vmm::Mapping<HostBackend>>();
    assert_send_sync::<PagedRegion<HostBackend>>();
    assert_send_sync::<hbm_vmm::Hmm<HostBackend, String>>();
    assert_send_sync::<hbm_vmm::EpochGuard>();
}

#[test]
fn readers_on_many_threads_see_one_writer() {
    let (vmm, g) = vmm(8);
    let chunk = vmm.create_chunk(D0, g, false).unwrap();
    let views: Vec<_> = (0..4)
        .map(|_| vmm.reserve(D0, g).unwrap().map(0, &chunk, 0, g).unwrap())
        .collect();
    std::thread::scope(|s| {
        for (i, v) in views.iter().enumerate() {
            s.spawn(move || {
                for round in 0..100u32 {
                    if i == 0 {
                        let mut w = v.as_mut_slice();
                        // A writer fills the page with one value; readers must never see a mix.
                        w.fill((round % 251) as u8);
                    } else {
                        let r = v.as_slice();
                        assert!(r.iter().all(|&b| b == r[0]), "a torn write was visible");
                    }
                }
            });
        }
    });
}
