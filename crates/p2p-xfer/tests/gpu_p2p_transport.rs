//! GPU tests of the CUDA transport (feature `cuda`; run through `cargo xtask hil`): between two
//! GPUs, or two logical devices of one GPU where the machine has one. Without a GPU each test
//! prints SKIPPED, and fails when `HIL_REQUIRE_GPUS` is set.

#![cfg(feature = "cuda")]

use cudarc::driver::sys;
use cudarc::driver::CudaContext;
use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::{DeviceId, Mapping, Reservation, Vmm};
use p2p_xfer::cuda::{CudaTransport, CudaTransportConfig};
use p2p_xfer::{BatchError, CopyOp, Link, Location, SubmitError, Transport};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::{Mutex, MutexGuard};

const D0: DeviceId = DeviceId(0);
const D1: DeviceId = DeviceId(1);
const MIB: u64 = 1 << 20;

/// GPU tests share the devices, so they run one at a time.
static GPU: Mutex<()> = Mutex::new(());

fn setup() -> Option<(MutexGuard<'static, ()>, Vmm<CudaBackend>)> {
    let guard = GPU
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // One GPU: two logical devices on it (CudaBackend::at_least), copies device-local.
    match CudaBackend::for_hil_test(2) {
        Ok(Some(b)) => Some((guard, Vmm::new(b))),
        Ok(None) => {
            println!("SKIPPED: no GPU");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// `bytes` of device memory on `dev`, accessible from every device in `access`.
fn buffer(
    vmm: &Vmm<CudaBackend>,
    dev: DeviceId,
    bytes: u64,
    access: &[DeviceId],
) -> (Reservation<CudaBackend>, Mapping<CudaBackend>) {
    let g = vmm.granularity(dev).unwrap() as u64;
    let bytes = bytes.div_ceil(g) * g;
    let chunk = vmm.create_chunk(dev, bytes as usize, false).unwrap();
    let res = vmm.reserve(dev, bytes as usize).unwrap();
    let map = res.map(0, &chunk, 0, bytes as usize).unwrap();
    res.set_access(access).unwrap();
    (res, map)
}

fn ok(call: &str, r: sys::CUresult) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{call} failed");
}

fn htod(vmm: &Vmm<CudaBackend>, at: Location, data: &[u8]) {
    vmm.check_range(at.device, at.addr, data.len()).unwrap();
    vmm.backend().bind(at.device).unwrap();
    // SAFETY: the range is a live mapping on its device (checked); `data` is a valid host
    // buffer; the copy is synchronous.
    ok("cuMemcpyHtoD", unsafe {
        sys::cuMemcpyHtoD_v2(at.addr, data.as_ptr().cast(), data.len())
    });
}

fn dtoh(vmm: &Vmm<CudaBackend>, at: Location, len: u64) -> Vec<u8> {
    vmm.check_range(at.device, at.addr, len as usize).unwrap();
    vmm.backend().bind(at.device).unwrap();
    let mut out = vec![0u8; len as usize];
    // SAFETY: as in `htod`, with `out` a valid, writable host buffer of `len` bytes.
    ok("cuMemcpyDtoH", unsafe {
        sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), at.addr, len as usize)
    });
    out
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn loc(m: &Mapping<CudaBackend>, off: u64) -> Location {
    Location::new(m.device(), m.addr() + off)
}

fn small_chunks() -> CudaTransportConfig {
    CudaTransportConfig {
        chunk_bytes: MIB,
        max_chunks_in_flight: 3,
        ..CudaTransportConfig::default()
    }
}

#[test]
fn gpu_random_batches_land_exactly() {
    let Some((_gpu, vmm)) = setup() else { return };
    let all = [D0, D1];
    let size = 64 * MIB;
    let src: Vec<_> = all.iter().map(|&d| buffer(&vmm, d, size, &all)).collect();
    let dst: Vec<_> = all.iter().map(|&d| buffer(&vmm, d, size, &all)).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (_, m) in &src {
        let mut data = vec![0u8; size as usize];
        rng.fill(&mut data[..]);
        htod(&vmm, loc(m, 0), &data);
    }
    let t = CudaTransport::new(vmm.clone(), small_chunks()).unwrap();
    for round in 0..4 {
        // Disjoint destination slots of 4 MiB; lengths up to a slot, so some copies span chunks.
        let slot = 4 * MIB;
        let mut batch = Vec::new();
        for (_, d_map) in &dst {
            for s in 0..(size / slot) {
                if rng.random_bool(0.5) {
                    continue;
                }
                let len = rng.random_range(1..=slot);
                let sd = rng.random_range(0..2);
                let so = rng.random_range(0..=size - len);
                batch.push(CopyOp::new(
                    loc(&src[sd].1, so),
                    loc(d_map, s * slot + rng.random_range(0..=slot - len)),
                    len,
                ));
            }
        }
        let report = t.submit(&batch).unwrap().wait().unwrap();
        assert_eq!(report.copies, batch.len(), "round {round}");
        for op in &batch {
            let want = dtoh(&vmm, op.src, op.len);
            let got = dtoh(&vmm, op.dst, op.len);
            assert_eq!(checksum(&got), checksum(&want), "round {round}: {op}");
        }
    }
    let total: u64 = t.stats().iter().map(|s| s.bytes).sum();
    assert!(total > 0);
    for s in t.stats() {
        println!(
            "{}: {} bytes, {} copies, {:.1} GB/s busy{}",
            s.link,
            s.bytes,
            s.copies,
            s.gbps(),
            if t.peer_call_refused(s.link) {
                " (cuMemcpyDtoDAsync)"
            } else {
                ""
            }
        );
    }
}

#[test]
fn gpu_compute_stream_waits_on_the_ticket_without_a_host_sync() {
    let Some((_gpu, vmm)) = setup() else { return };
    let all = [D0, D1];
    let size = 512 * MIB;
    let (_rs, src) = buffer(&vmm, D0, size, &all);
    let (_rd, dst) = buffer(&vmm, D1, size, &all);
    let (_rc, check) = buffer(&vmm, D1, size, &all);
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    htod(&vmm, loc(&src, 0), &data);
    let t = CudaTransport::new(vmm.clone(), CudaTransportConfig::default()).unwrap();

    let ctx = CudaContext::new(vmm.backend().ordinal(D1).unwrap() as usize).unwrap();
    let stream = ctx.new_stream().unwrap();
    let ticket = t
        .submit(&[CopyOp::new(loc(&src, 0), loc(&dst, 0), size)])
        .unwrap();
    // Device-side: the compute stream waits for the copy, then copies the destination onward.
    ticket.wait_on_stream(D1, &stream).unwrap();
    ctx.bind_to_thread().unwrap();
    // SAFETY: both ranges are live mappings on device 1; the stream is live and its context
    // current; the stream is synchronised before the buffers go.
    ok("cuMemcpyDtoDAsync", unsafe {
        sys::cuMemcpyDtoDAsync_v2(check.addr(), dst.addr(), size as usize, stream.cu_stream())
    });
    stream.synchronize().unwrap();
    assert_eq!(
        checksum(&dtoh(&vmm, loc(&check, 0), size)),
        checksum(&data),
        "the compute stream ran before the copy landed"
    );
    ticket.wait().unwrap();
    // A ticket with nothing for device 0 adds no wait there.
    let ctx0 = CudaContext::new(vmm.backend().ordinal(D0).unwrap() as usize).unwrap();
    ticket
        .wait_on_stream(D0, &ctx0.new_stream().unwrap())
        .unwrap();
}

#[test]
fn gpu_cancel_stops_early_and_reports_exactly_what_completed() {
    let Some((_gpu, vmm)) = setup() else { return };
    let all = [D0, D1];
    let size = 1024 * MIB;
    let (_rs, src) = buffer(&vmm, D0, size, &all);
    let (_rd, dst) = buffer(&vmm, D1, size, &all);
    let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    htod(&vmm, loc(&src, 0), &data);
    let t = CudaTransport::new(
        vmm.clone(),
        CudaTransportConfig {
            chunk_bytes: MIB,
            max_chunks_in_flight: 2,
            ..CudaTransportConfig::default()
        },
    )
    .unwrap();
    // 256 copies of 4 MiB, 1024 chunks, at most 2 enqueued at a time.
    let batch: Vec<CopyOp> = (0..256)
        .map(|i| CopyOp::new(loc(&src, i * 4 * MIB), loc(&dst, i * 4 * MIB), 4 * MIB))
        .collect();
    let ticket = t.submit(&batch).unwrap();
    ticket.cancel();
    let ctx = CudaContext::new(vmm.backend().ordinal(D1).unwrap() as usize).unwrap();
    let stream = ctx.new_stream().unwrap();
    // The fence is written even for a cancelled batch, so this cannot hang.
    ticket.wait_on_stream(D1, &stream).unwrap();
    stream.synchronize().unwrap();
    match ticket.wait() {
        Err(BatchError::Cancelled {
            completed,
            total: 256,
        }) => {
            assert!(completed.len() < 256, "cancel stopped nothing");
            for &i in &completed {
                let op = &batch[i];
                assert_eq!(
                    checksum(&dtoh(&vmm, op.dst, op.len)),
                    checksum(
                        &data[op.src.addr as usize - src.addr() as usize..][..op.len as usize]
                    ),
                    "copy {i} reported complete but its bytes differ"
                );
            }
            println!("cancel: {} of 256 copies had completed", completed.len());
        }
        other => panic!("expected a cancellation, got {other:?}"),
    }
}

#[test]
fn gpu_bad_copies_are_refused_before_submit() {
    let Some((_gpu, vmm)) = setup() else { return };
    let (_r0, a) = buffer(&vmm, D0, 4 * MIB, &[D0, D1]);
    // Device 1 memory that device 0 may not write.
    let (_r1, private) = buffer(&vmm, D1, 4 * MIB, &[]);
    if vmm.backend().same_gpu(D0, D1).unwrap() {
        // Two logical devices of one GPU share its memory permissions: the copy is
        // device-local and needs no grant (on its own transport, so that `t` below only ever
        // refuses).
        let local = CudaTransport::new(vmm.clone(), CudaTransportConfig::default()).unwrap();
        local
            .submit(&[CopyOp::new(loc(&a, 0), loc(&private, 0), MIB)])
            .expect("a device-local copy needs no grant")
            .wait()
            .unwrap();
    }
    let t = CudaTransport::new(vmm.clone(), CudaTransportConfig::default()).unwrap();
    if !vmm.backend().same_gpu(D0, D1).unwrap() {
        match t.submit(&[CopyOp::new(loc(&a, 0), loc(&private, 0), MIB)]) {
            Err(SubmitError::NoAccess {
                index: 0, device, ..
            }) => assert_eq!(device, D0),
            other => panic!("expected NoAccess, got {other:?}"),
        }
    }
    let end = private.addr() + private.len() as u64;
    assert!(matches!(
        t.submit(&[CopyOp::new(loc(&a, 0), Location::new(D1, end - 16), 64)]),
        Err(SubmitError::Unmapped { .. })
    ));
    assert!(matches!(
        t.submit(&[CopyOp::new(Location::new(D0, 0x1000), loc(&a, 0), 64)]),
        Err(SubmitError::Unmapped { .. })
    ));
    assert!(t.stats().is_empty(), "a refused batch moved bytes");
    assert!(!t.peer_call_refused(Link::new(D0, D1)));
}
