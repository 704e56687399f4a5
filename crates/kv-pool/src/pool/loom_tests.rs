//! loom models of a pool shared by the scheduler (alloc, free, fork) and the scaler (grow, shrink,
//! export, compact). Run with `RUSTFLAGS="--cfg loom" cargo test --release -p kv-pool -- loom`.
//!
//! Each model checks, for every interleaving, that the outcome is one a serial order would give
//! and that the pool's invariants hold afterwards (the ledger audit, plus: exactly the ledger's
//! chunks are mapped, and the device's usage matches).

use super::*;
use crate::layout::KvDtype;
use hbm_vmm::host::{page_size, HostBackend, HostConfig};
use loom::sync::Arc;
use loom::thread;

type Pool = BlockPool<HostBackend>;

/// Two-token blocks, two per page-sized chunk, at most 4 chunks.
fn pool(initial: usize) -> (Vmm<HostBackend>, Arc<Pool>) {
    let page = page_size();
    let config = HostConfig::devices(1, 8 * page)
        .with_granularity(page)
        .unwrap();
    let vmm = Vmm::new(HostBackend::new(config));
    let layout = KvLayout::gqa(2, 2, 32, KvDtype::F32, 2).unwrap();
    let config = PoolConfig::new(layout, DeviceId(0), page, 4).with_initial_chunks(initial);
    let pool = Arc::new(BlockPool::new(&vmm, config).unwrap());
    assert_eq!(pool.blocks_per_chunk(), 2);
    (vmm, pool)
}

fn settled(vmm: &Vmm<HostBackend>, pool: &Pool) {
    pool.audit().unwrap();
    assert_eq!(vmm.usage(DeviceId(0)), pool.stats().chunks * page_size());
}

/// Checks that `blocks` are mapped. It looks while holding the region lock, a loom-visible
/// operation, so that loom orders the check against the scaler's map and unmap calls (the mapping
/// state itself lives in `hbm-vmm`, outside loom's view).
fn assert_mapped(vmm: &Vmm<HostBackend>, pool: &Pool, blocks: &[BlockId]) {
    let region = pool.region_read();
    for &b in blocks {
        region
            .check_slots(b.index() / pool.blocks_per_chunk(), 1)
            .unwrap();
        let addr = pool.block_addr(b).unwrap();
        vmm.check_range(DeviceId(0), addr, pool.layout().block_bytes())
            .unwrap();
    }
}

/// The scheduler allocates into the last chunk while the scaler tries to release it: exactly one
/// of them wins, and a block is never handed out in an unmapped chunk.
#[test]
fn loom_alloc_races_shrink() {
    loom::model(|| {
        let (vmm, pool) = pool(2);
        let p = Arc::clone(&pool);
        let scheduler = thread::spawn(move || {
            let s = p.create();
            p.grow_to(s, 5).map(|_| s) // 3 blocks: needs the second chunk
        });
        let shrunk = pool.shrink(1);
        let grown = scheduler.join().unwrap();
        match (&grown, &shrunk) {
            (
                Ok(s),
                Err(KvError::ShrinkBelowUse {
                    requested: 1,
                    free_tail: 0,
                }),
            ) => {
                assert_eq!(pool.table(*s).unwrap().blocks().len(), 3);
                assert_eq!(pool.stats().chunks, 2);
            }
            (Err(KvError::OutOfBlocks { needed: 3, free: 2 }), Ok(())) => {
                assert_eq!(pool.stats().chunks, 1);
                assert_eq!(pool.stats().used, 0);
            }
            other => panic!("not a serial outcome: {other:?}"),
        }
        settled(&vmm, &pool);
    });
}

/// A fork races the parent's free: the child either gets the shared prefix (and keeps it alive)
/// or the parent is already gone. No block is freed while the child still lists it.
#[test]
fn loom_fork_races_free() {
    loom::model(|| {
        let (vmm, pool) = pool(2);
        let parent = pool.create();
        pool.grow_to(parent, 3).unwrap(); // block 0 full, block 1 holds one token
        let p = Arc::clone(&pool);
        let forker = thread::spawn(move || p.fork(parent));
        let freed = pool.free(parent).unwrap();
        match forker.join().unwrap() {
            Ok(f) => {
                let copy = f.copy.expect("the prefix ends inside block 1");
                assert_eq!(copy.src, BlockId(1));
                let t = pool.table(f.child).unwrap();
                assert_eq!(t.blocks(), &[BlockId(0), copy.dst]);
                assert_eq!(freed, 1, "block 0 stays for the child");
                assert_eq!(pool.stats().used, 2);
            }
            Err(e) => {
                assert_eq!(e, KvError::UnknownSequence(parent));
                assert_eq!(freed, 2);
                assert_eq!(pool.stats().used, 0);
            }
        }
        settled(&vmm, &pool);
    });
}

/// The scaler exports a running sequence while the pool grows and gives back free chunks:
/// every address in the manifest is mapped and still belongs to the sequence's blocks.
#[test]
fn loom_export_races_grow_and_shrink() {
    loom::model(|| {
        let (vmm, pool) = pool(1);
        let s = pool.create();
        pool.grow_to(s, 4).unwrap();
        let p = Arc::clone(&pool);
        let scaler = thread::spawn(move || {
            p.grow(1).unwrap();
            p.shrink_free_tail(1).unwrap()
        });
        let manifest = pool.export(s).unwrap();
        let released = scaler.join().unwrap();
        assert_eq!(released, 1);
        assert_eq!(manifest.tokens, 4);
        for (extent, block) in manifest.blocks.iter().zip(pool.table(s).unwrap().blocks()) {
            assert_eq!(extent.block, *block);
            vmm.check_range(DeviceId(0), extent.addr, extent.bytes)
                .unwrap();
        }
        settled(&vmm, &pool);
    });
}

/// Two sequences allocate at once from a pool with room for only one of them to get everything:
/// their blocks never overlap and the failing one allocates nothing.
#[test]
fn loom_concurrent_allocations_are_disjoint() {
    loom::model(|| {
        let (vmm, pool) = pool(2); // 4 blocks
        let p = Arc::clone(&pool);
        let other = thread::spawn(move || {
            let s = p.create();
            p.grow_to(s, 5).map(|_| s) // 3 blocks
        });
        let mine = pool.create();
        let a = pool.grow_to(mine, 4).map(|_| mine); // 2 blocks
        let b = other.join().unwrap();
        let live: Vec<SeqId> = [a, b].into_iter().filter_map(Result::ok).collect();
        assert_eq!(live.len(), 1, "4 blocks cannot hold 2 + 3");
        let used: usize = live
            .iter()
            .map(|&s| pool.table(s).unwrap().blocks().len())
            .sum();
        assert_eq!(pool.stats().used, used);
        settled(&vmm, &pool);
    });
}

/// A compaction is planned, copied and committed by the scaler while the scheduler frees one
/// sequence and appends to another: tables end up pointing at live blocks, and nothing moved
/// is lost or double-freed.
#[test]
fn loom_compaction_races_free_and_append() {
    loom::model(|| {
        let (vmm, pool) = pool(3); // 6 blocks
        let a = pool.create();
        let b = pool.create();
        let c = pool.create();
        pool.grow_to(a, 4).unwrap(); // 0, 1
        pool.grow_to(b, 2).unwrap(); // 2
        pool.grow_to(c, 4).unwrap(); // 3, 4
        pool.free(a).unwrap(); // holes at 0, 1
        let p = Arc::clone(&pool);
        let scaler = thread::spawn(move || {
            let plan = p.compact().unwrap();
            // (the caller's copies would run here)
            p.commit_compaction(plan).unwrap();
        });
        pool.free(b).unwrap();
        pool.append(c, 1).unwrap();
        scaler.join().unwrap();
        let t = pool.table(c).unwrap();
        assert_eq!(t.len(), 5);
        assert_eq!(pool.stats().used, 3);
        assert_eq!(pool.stats().sequences, 1);
        settled(&vmm, &pool);
    });
}

/// Blocks of a chunk being added are handed out only once the chunk is mapped: the scheduler
/// checks the device addresses of what it got while the grow may still be running.
#[test]
fn loom_blocks_are_mapped_before_they_are_handed_out() {
    loom::model(|| {
        let (vmm, pool) = pool(1);
        let full = pool.create();
        pool.grow_to(full, 4).unwrap(); // the only chunk is full
        let p = Arc::clone(&pool);
        let scaler = thread::spawn(move || p.grow(1).unwrap());
        let s = pool.create();
        if let Ok(blocks) = pool.grow_to(s, 2) {
            assert_mapped(&vmm, &pool, &blocks);
        }
        scaler.join().unwrap();
        settled(&vmm, &pool);
    });
}

/// Chunks leave the ledger before they are unmapped: an allocation racing a shrink of the free
/// tail either gets a mapped block or none.
#[test]
fn loom_shrink_never_unmaps_a_block_handed_out() {
    loom::model(|| {
        let (vmm, pool) = pool(2);
        let full = pool.create();
        pool.grow_to(full, 4).unwrap(); // chunk 0 full, chunk 1 free
        let p = Arc::clone(&pool);
        let scaler = thread::spawn(move || p.shrink_free_tail(0).unwrap());
        let s = pool.create();
        let got = pool.grow_to(s, 1);
        let released = scaler.join().unwrap();
        match got {
            Ok(blocks) => {
                assert_eq!(released, 0);
                assert_mapped(&vmm, &pool, &blocks);
            }
            Err(e) => {
                assert_eq!(e, KvError::OutOfBlocks { needed: 1, free: 0 });
                assert_eq!(released, 1);
            }
        }
        settled(&vmm, &pool);
    });
}
