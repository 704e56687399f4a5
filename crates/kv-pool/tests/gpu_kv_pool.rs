//! GPU tests of the pool on the CUDA backend (feature `cuda`; run through `cargo xtask hil`).
//! Two-device tests run on two logical devices of one GPU where the machine has one. Without a
//! GPU each test prints SKIPPED, and fails when `HIL_REQUIRE_GPUS` is set.
//!
//! Bytes go in and out through `hbm-vmm`'s `DeviceView`s with cudarc's safe copies; the pool only
//! says which blocks to copy.
#![cfg(feature = "cuda")]

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaContext, CudaStream};
use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::{DeviceId, Vmm};
use kv_pool::{BlockId, BlockPool, KvDtype, KvError, KvLayout, PoolConfig, SeqId};

type Pool = BlockPool<CudaBackend>;

const D0: DeviceId = DeviceId(0);
const D1: DeviceId = DeviceId(1);

/// GPU tests share the devices and their usage counters, so they run one at a time.
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

/// A stream on the GPU that `dev` lives on (a logical device's GPU, see `CudaBackend::at_least`).
fn stream(vmm: &Vmm<CudaBackend>, dev: DeviceId) -> Arc<CudaStream> {
    let ordinal = vmm.backend().ordinal(dev).unwrap() as usize;
    CudaContext::new(ordinal).unwrap().new_stream().unwrap()
}

/// A Qwen3-style GQA rank in bf16: 4 layers, 4 KV heads of 128, 16-token blocks (128 KiB).
fn layout() -> KvLayout {
    KvLayout::gqa(4, 4, 128, KvDtype::Bf16, 16).unwrap()
}

fn pool(vmm: &Vmm<CudaBackend>, dev: DeviceId, initial: usize) -> Pool {
    let l = layout();
    let chunk = Pool::chunk_bytes_for(vmm, dev, &l, 1).unwrap();
    assert_eq!(
        chunk,
        vmm.granularity(dev).unwrap(),
        "one granule holds several blocks"
    );
    Pool::new(
        vmm,
        PoolConfig::new(l, dev, chunk, 64).with_initial_chunks(initial),
    )
    .unwrap()
}

fn pattern(tag: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(tag)
                .to_le_bytes()[1]
        })
        .collect()
}

fn write_block(p: &Pool, s: &Arc<CudaStream>, b: BlockId, data: &[u8]) {
    let off = p.address_map().offset(b);
    p.with_region(|r| {
        let mut view = r.device_view::<u8>(off, data.len(), s).unwrap();
        s.memcpy_htod(data, &mut view).unwrap();
        s.synchronize().unwrap();
    });
}

fn read_block(p: &Pool, s: &Arc<CudaStream>, b: BlockId) -> Vec<u8> {
    let n = p.layout().block_bytes();
    let off = p.address_map().offset(b);
    p.with_region(|r| {
        let view = r.device_view::<u8>(off, n, s).unwrap();
        let mut out = vec![0u8; n];
        s.memcpy_dtoh(&view, &mut out).unwrap();
        s.synchronize().unwrap();
        out
    })
}

/// Copies block `src` over block `dst` inside one pool, on the device.
fn copy_block(p: &Pool, s: &Arc<CudaStream>, src: BlockId, dst: BlockId) {
    let n = p.layout().block_bytes();
    let map = p.address_map();
    p.with_region(|r| {
        let from = r.device_view::<u8>(map.offset(src), n, s).unwrap();
        let mut to = r.device_view::<u8>(map.offset(dst), n, s).unwrap();
        s.memcpy_dtod(&from, &mut to).unwrap();
        s.synchronize().unwrap();
    });
}

/// Fills every block of `seq` with its own pattern; returns the patterns in table order.
fn fill(p: &Pool, s: &Arc<CudaStream>, seq: SeqId, tag: u32) -> Vec<Vec<u8>> {
    let n = p.layout().block_bytes();
    p.table(seq)
        .unwrap()
        .blocks()
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            let data = pattern(tag * 1000 + i as u32, n);
            write_block(p, s, b, &data);
            data
        })
        .collect()
}

fn assert_holds(p: &Pool, s: &Arc<CudaStream>, seq: SeqId, expected: &[Vec<u8>]) {
    let blocks = p.table(seq).unwrap().blocks().to_vec();
    assert_eq!(blocks.len(), expected.len());
    for (i, (&b, want)) in blocks.iter().zip(expected).enumerate() {
        assert!(
            read_block(p, s, b) == *want,
            "{seq}: block {i} ({b}) lost its bytes"
        );
    }
}

#[test]
fn gpu_pool_grows_forks_compacts_and_shrinks_with_bytes_intact() {
    let Some((_gpu, vmm)) = setup(1) else { return };
    let s = stream(&vmm, D0);
    let p = pool(&vmm, D0, 1);
    let chunk = p.chunk_bytes();
    let per = p.blocks_per_chunk();
    println!(
        "{} blocks of {} bytes per {} byte chunk",
        per,
        p.layout().block_bytes(),
        chunk
    );
    assert_eq!(vmm.usage(D0), chunk);

    // Fill the first chunk, then run out, grow, and go on.
    let a = p.create();
    p.grow_to(a, per * 16).unwrap();
    let b = p.create();
    assert!(matches!(p.grow_to(b, 40), Err(KvError::OutOfBlocks { .. })));
    p.grow(2).unwrap();
    assert_eq!(vmm.usage(D0), 3 * chunk);
    p.grow_to(b, 40).unwrap(); // 3 blocks, the last one partial
    let a_bytes = fill(&p, &s, a, 1);
    let b_bytes = fill(&p, &s, b, 2);

    // Fork: two shared blocks, one copied by us on the device.
    let f = p.fork(b).unwrap();
    let copy = f.copy.expect("40 tokens end inside a block");
    copy_block(&p, &s, copy.src, copy.dst);
    assert_holds(&p, &s, f.child, &b_bytes);

    assert_holds(&p, &s, a, &a_bytes); // growing moved nothing

    // Free the big one, compact the rest into the first chunk, and give the others back.
    p.free(a).unwrap();
    let plan = p.compact().unwrap();
    assert!(!plan.moves().is_empty());
    for m in plan.moves() {
        copy_block(&p, &s, m.from, m.to);
    }
    p.commit_compaction(plan).unwrap();
    assert_eq!(p.shrink_free_tail(1).unwrap(), 2);
    assert_eq!(vmm.usage(D0), chunk);
    assert_holds(&p, &s, b, &b_bytes);
    assert_holds(&p, &s, f.child, &b_bytes);
    p.free(b).unwrap();
    p.free(f.child).unwrap();
    assert_eq!(p.stats().used, 0);
    drop(p);
    assert_eq!(vmm.usage(D0), 0);
    assert!(vmm.take_errors().is_empty());
}

#[test]
fn gpu_sequence_migrates_to_another_gpu() {
    let Some((_gpu, vmm)) = setup(2) else { return };
    let (s0, s1) = (stream(&vmm, D0), stream(&vmm, D1));
    let src = pool(&vmm, D0, 2);
    let dst = pool(&vmm, D1, 2);
    src.set_access(&[D1]).unwrap();
    dst.set_access(&[D0]).unwrap();

    // Two sequences grown in turns, so their blocks interleave.
    let (x, y) = (src.create(), src.create());
    for round in 1..=6 {
        src.grow_to(x, 16 * round).unwrap();
        src.grow_to(y, 16 * round - 5).unwrap();
    }
    let x_bytes = fill(&src, &s0, x, 7);
    let y_bytes = fill(&src, &s0, y, 8);

    for (seq, bytes) in [(x, &x_bytes), (y, &y_bytes)] {
        let out = src.export(seq).unwrap();
        let imported = dst.import(&out).unwrap();
        let copies = out.copies_to(&imported.manifest).unwrap();
        assert!(copies.len() <= out.blocks.len());
        let (sb, db) = (src.address_map().base, dst.address_map().base);
        src.with_region(|from| {
            dst.with_region(|to| {
                for c in &copies {
                    let v = from
                        .device_view::<u8>((c.src - sb) as usize, c.bytes, &s0)
                        .unwrap();
                    let mut w = to
                        .device_view::<u8>((c.dst - db) as usize, c.bytes, &s1)
                        .unwrap();
                    s1.memcpy_dtod(&v, &mut w).unwrap();
                }
                s1.synchronize().unwrap();
            })
        });
        src.free(seq).unwrap();
        assert_holds(&dst, &s1, imported.seq, bytes);
    }
    assert_eq!(src.stats().used, 0);
    assert_eq!(src.shrink_free_tail(0).unwrap(), 2);
    assert_eq!(vmm.usage(D0), 0);
    assert!(vmm.take_errors().is_empty());
}
