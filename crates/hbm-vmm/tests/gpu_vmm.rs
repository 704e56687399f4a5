//! GPU tests of the CUDA backend (feature `cuda`; run through `cargo xtask hil`). The two-device
//! tests run on two logical devices of one GPU where the machine has one. Without a GPU each
//! test prints SKIPPED, and fails when `HIL_REQUIRE_GPUS` is set.

#![cfg(feature = "cuda")]

use cudarc::driver::sys;
use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::{ipc, DeviceId, PagedRegion, Vmm, VmmError};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const D0: DeviceId = DeviceId(0);
const D1: DeviceId = DeviceId(1);
const CHILD_ENV: &str = "HBM_VMM_GPU_CHILD";
const TIMEOUT: Duration = Duration::from_secs(60);

/// GPU tests share the devices (and `cuMemGetInfo` is device-wide), so they run one at a time.
static GPU: Mutex<()> = Mutex::new(());

fn setup(min_devices: usize) -> Option<(MutexGuard<'static, ()>, Vmm<CudaBackend>)> {
    let guard = GPU
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Fewer GPUs than devices: logical devices on the GPUs there are (CudaBackend::at_least).
    match CudaBackend::for_hil_test(min_devices) {
        Ok(Some(b)) => Some((guard, Vmm::new(b))),
        Ok(None) => {
            println!("SKIPPED: no GPU");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn ok(call: &str, r: sys::CUresult) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{call} failed");
}

fn htod(vmm: &Vmm<CudaBackend>, dev: DeviceId, addr: u64, data: &[u8]) {
    vmm.check_range(dev, addr, data.len()).unwrap();
    vmm.backend().bind(dev).unwrap();
    // SAFETY: [addr, addr + len) is a live mapping on `dev` (checked) with access granted to
    // `dev`; `data` is a valid host buffer. The copy is synchronous.
    ok("cuMemcpyHtoD", unsafe {
        sys::cuMemcpyHtoD_v2(addr, data.as_ptr().cast(), data.len())
    });
}

fn dtoh(vmm: &Vmm<CudaBackend>, dev: DeviceId, addr: u64, len: usize) -> Vec<u8> {
    vmm.check_range(dev, addr, len).unwrap();
    vmm.backend().bind(dev).unwrap();
    let mut out = vec![0u8; len];
    // SAFETY: as in `htod`, with `out` a valid, writable host buffer of `len` bytes.
    ok("cuMemcpyDtoH", unsafe {
        sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), addr, len)
    });
    out
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn gpu_chunk_lifecycle() {
    let Some((_gpu, vmm)) = setup(1) else { return };
    let g = vmm.granularity(D0).unwrap();
    let chunk = vmm.create_chunk(D0, 2 * g, false).unwrap();
    assert_eq!(vmm.usage(D0), 2 * g);
    let res = vmm.reserve(D0, 2 * g).unwrap();
    assert_eq!(res.base() % g as u64, 0);
    let m = res.map(0, &chunk, 0, 2 * g).unwrap();
    let data = pattern(1, 2 * g);
    htod(&vmm, D0, m.addr(), &data);
    assert_eq!(dtoh(&vmm, D0, m.addr(), 2 * g), data);
    // Bad input is refused before the driver sees it.
    assert!(matches!(
        res.map(0, &chunk, 0, g),
        Err(VmmError::AlreadyMapped { .. })
    ));
    assert!(matches!(
        vmm.create_chunk(D0, g + 1, false),
        Err(VmmError::Unaligned { .. })
    ));
    assert_eq!(chunk.export().unwrap_err(), VmmError::NotExportable);

    // A paged region: map, remap, unmap.
    let other = vmm.create_chunk(D0, g, false).unwrap();
    let mut region = PagedRegion::new(&vmm, D0, g, 2).unwrap();
    let half = vmm.create_chunk(D0, g, false).unwrap();
    region.map_slot(0, half.clone()).unwrap();
    region.map_slot(1, other.clone()).unwrap();
    htod(&vmm, D0, region.slot_addr(1).unwrap(), &pattern(3, g));
    let old = region.remap_slot(0, other.clone()).unwrap();
    assert!(old.same(&half));
    // Slot 0 now shows `other`, which slot 1 also maps: the same bytes at two addresses.
    assert_eq!(
        dtoh(&vmm, D0, region.slot_addr(0).unwrap(), g),
        pattern(3, g)
    );
    vmm.check_range(D0, region.base(), 2 * g).unwrap();
    assert!(region.unmap_slot(1).unwrap().same(&other));

    m.unmap().unwrap();
    drop((res, region, old, half, other, chunk));
    assert_eq!(vmm.usage(D0), 0);
    assert!(vmm.take_errors().is_empty(), "{:?}", vmm.take_errors());
}

#[test]
fn gpu_one_chunk_two_addresses() {
    let Some((_gpu, vmm)) = setup(1) else { return };
    let g = vmm.granularity(D0).unwrap();
    let chunk = vmm.create_chunk(D0, g, false).unwrap();
    let a = vmm.reserve(D0, g).unwrap().map(0, &chunk, 0, g).unwrap();
    let b = vmm
        .reserve(D0, 3 * g)
        .unwrap()
        .map(2 * g, &chunk, 0, g)
        .unwrap();
    assert_ne!(a.addr(), b.addr());
    let data = pattern(7, g);
    htod(&vmm, D0, a.addr(), &data);
    assert_eq!(
        dtoh(&vmm, D0, b.addr(), g),
        data,
        "written through A, read through B"
    );
    let data2 = pattern(9, 4096);
    htod(&vmm, D0, b.addr() + 4096, &data2);
    assert_eq!(
        dtoh(&vmm, D0, a.addr() + 4096, 4096),
        data2,
        "and the other way"
    );
}

#[test]
fn gpu_export_to_second_process() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        export_child(&path);
        return;
    }
    let Some((_gpu, vmm)) = setup(1) else { return };
    let g = vmm.granularity(D0).unwrap();
    let path = std::env::temp_dir().join(format!("hbm-vmm-gpu-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "gpu_export_to_second_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut sock = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("the child exited before connecting: {status}");
                }
                assert!(start.elapsed() < TIMEOUT, "the child did not connect");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let _ = std::fs::remove_file(&path);
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();

    let chunk = vmm.create_chunk(D0, 2 * g, true).unwrap();
    let view = vmm
        .reserve(D0, 2 * g)
        .unwrap()
        .map(0, &chunk, 0, 2 * g)
        .unwrap();
    htod(&vmm, D0, view.addr(), &pattern(11, 2 * g));
    let t = Instant::now();
    ipc::send_chunks(&sock, &[("gpu-shared".to_string(), chunk.clone())]).unwrap();
    let mut ack = [0u8; 1];
    sock.read_exact(&mut ack).unwrap();
    println!(
        "export + child import/map/read/write round trip: {:?}",
        t.elapsed()
    );
    assert_eq!(&ack, b"1");
    // The child's write is visible here.
    assert_eq!(dtoh(&vmm, D0, view.addr() + g as u64, g), pattern(12, g));
    sock.write_all(b"2").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "the child failed: {status}");
}

fn export_child(path: &str) {
    let mut sock = UnixStream::connect(path).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let vmm = Vmm::new(CudaBackend::new().expect("the parent saw a GPU, so must the child"));
    let g = vmm.granularity(D0).unwrap();
    let shared = ipc::recv_chunks(&sock, &vmm).unwrap().pop().unwrap();
    assert_eq!(shared.manifest.key, "gpu-shared");
    assert_eq!(shared.chunk.size(), 2 * g);
    let view = vmm
        .reserve(D0, 2 * g)
        .unwrap()
        .map(0, &shared.chunk, 0, 2 * g)
        .unwrap();
    assert_eq!(
        dtoh(&vmm, D0, view.addr(), g),
        pattern(11, g),
        "the parent's bytes"
    );
    htod(&vmm, D0, view.addr() + g as u64, &pattern(12, g));
    sock.write_all(b"1").unwrap();
    let mut go = [0u8; 1];
    sock.read_exact(&mut go).unwrap();
    assert_eq!(&go, b"2");
}

#[test]
fn gpu_peer_access_copy_from_gpu0_into_gpu1_chunk() {
    let Some((_gpu, vmm)) = setup(2) else { return };
    let g = vmm.granularity(D1).unwrap();
    // The destination: a chunk on GPU 1, mapped, with access granted to GPU 0 too.
    let dst_chunk = vmm.create_chunk(D1, g, false).unwrap();
    let dst_res = vmm.reserve(D1, g).unwrap();
    let dst = dst_res.map(0, &dst_chunk, 0, g).unwrap();
    dst_res.set_access(&[D0]).unwrap();
    assert_eq!(dst_res.access(), vec![D0, D1]);
    // The source: a chunk on GPU 0.
    let src_chunk = vmm.create_chunk(D0, g, false).unwrap();
    let src = vmm
        .reserve(D0, g)
        .unwrap()
        .map(0, &src_chunk, 0, g)
        .unwrap();
    let data = pattern(21, g);
    htod(&vmm, D0, src.addr(), &data);

    // GPU 0 copies into GPU 1's memory, then GPU 0 also sets the first 256 bytes itself.
    vmm.backend().bind(D0).unwrap();
    // SAFETY: both ranges are live mappings of `g` bytes; GPU 0 has access to both.
    unsafe {
        ok(
            "cuMemcpyDtoD",
            sys::cuMemcpyDtoD_v2(dst.addr(), src.addr(), g),
        );
        ok("cuMemsetD8", sys::cuMemsetD8_v2(dst.addr(), 0xAB, 256));
        ok("cuCtxSynchronize", sys::cuCtxSynchronize());
    }
    let got = dtoh(&vmm, D1, dst.addr(), g);
    assert!(got[..256].iter().all(|&b| b == 0xAB));
    assert_eq!(&got[256..], &data[256..]);
}

#[test]
fn gpu_free_memory_returns_after_teardown() {
    let Some((_gpu, vmm)) = setup(1) else { return };
    let g = vmm.granularity(D0).unwrap();
    let size = 64 << 20;
    let cycle = |n: usize| {
        let mut keep = Vec::new();
        for _ in 0..n {
            let c = vmm.create_chunk(D0, size, false).unwrap();
            let m = vmm.reserve(D0, size).unwrap().map(0, &c, 0, size).unwrap();
            keep.push(m);
        }
        let during = vmm.mem_info(D0).unwrap().0;
        drop(keep);
        during
    };
    // Warm up once, so that lazily created driver state is not counted as a leak.
    cycle(1);
    let before = vmm.mem_info(D0).unwrap().0;
    let during = cycle(4);
    let after = vmm.mem_info(D0).unwrap().0;
    println!("free: before {before}, during {during}, after {after} (granularity {g})");
    assert!(
        before.saturating_sub(during) >= 4 * size,
        "4 x 64 MiB were really allocated"
    );
    assert!(
        after.abs_diff(before) <= g,
        "free memory came back ({before} -> {after})"
    );
    assert_eq!(vmm.usage(D0), 0);
    assert!(vmm.take_errors().is_empty());
}

#[test]
fn gpu_import_rejects_a_bad_fd() {
    let Some((_gpu, vmm)) = setup(1) else { return };
    let g = vmm.granularity(D0).unwrap();
    let (rd, _wr) = std::io::pipe().unwrap();
    assert!(matches!(
        vmm.import_chunk(D0, rd.into(), g),
        Err(VmmError::BadHandle(_))
    ));
    assert_eq!(
        vmm.create_chunk(DeviceId(99), g, false).unwrap_err(),
        VmmError::NoSuchDevice(DeviceId(99))
    );
}

#[test]
fn gpu_device_views_work_with_cudarc_copies() {
    let Some((_gpu, vmm)) = setup(1) else { return };
    let g = vmm.granularity(D0).unwrap();
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    let mut region = PagedRegion::new(&vmm, D0, g, 2).unwrap();
    region
        .map_slot(0, vmm.create_chunk(D0, g, false).unwrap())
        .unwrap();
    region
        .map_slot(1, vmm.create_chunk(D0, g, false).unwrap())
        .unwrap();
    // A view spanning both slots, written and read with cudarc's safe copies.
    let n = g / 4; // u32 elements in one slot
    let data: Vec<u32> = (0..n as u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    let mut view = region.device_view::<u32>(g / 2, n, &stream).unwrap();
    stream.memcpy_htod(&data, &mut view).unwrap();
    let mut back = vec![0u32; n];
    stream.memcpy_dtoh(&view, &mut back).unwrap();
    stream.synchronize().unwrap();
    assert_eq!(back, data);
    // The same bytes through the second slot's own mapping.
    let slot1 = region
        .mapping(1)
        .unwrap()
        .device_view::<u32>(&stream)
        .unwrap();
    let mut tail = vec![0u32; n];
    stream.memcpy_dtoh(&slot1, &mut tail).unwrap();
    stream.synchronize().unwrap();
    assert_eq!(&tail[..n / 2], &data[n / 2..]);
    // Views are checked like everything else.
    region.unmap_slot(1).unwrap();
    assert!(matches!(
        region.device_view::<u32>(g / 2, n, &stream),
        Err(VmmError::NotMapped { .. })
    ));
}
