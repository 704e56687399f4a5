//! The pool on the host backend, with real bytes: every token written through one sequence's
//! blocks reads back intact, whatever else happens (other sequences, forks, grows, shrinks,
//! compactions, migrations to another pool).

use super::*;
use crate::admission::Pressure;
use crate::layout::KvDtype;
use hbm_vmm::host::{page_size, HostBackend, HostConfig};
use hbm_vmm::VmmError;
use proptest::prelude::*;

type Pool = BlockPool<HostBackend>;

fn vmm(pages_per_device: usize) -> Vmm<HostBackend> {
    let page = page_size();
    let config = HostConfig::devices(2, pages_per_device * page)
        .with_granularity(page)
        .unwrap();
    Vmm::new(HostBackend::new(config))
}

/// 2 layers; per token and layer 512 bytes; 2-token blocks of 2 KiB: two blocks per 4 KiB page.
fn layout(mla: bool) -> KvLayout {
    if mla {
        KvLayout::mla(2, 96, 32, KvDtype::F32, 2).unwrap()
    } else {
        KvLayout::gqa(2, 2, 32, KvDtype::F32, 2).unwrap()
    }
}

fn pool(vmm: &Vmm<HostBackend>, dev: u32, mla: bool, initial: usize) -> Pool {
    let config =
        PoolConfig::new(layout(mla), DeviceId(dev), page_size(), 8).with_initial_chunks(initial);
    BlockPool::new(vmm, config).unwrap()
}

/// What token `tag` holds at `layer`: the tag itself, then bytes derived from it.
fn entry(tag: u64, layer: usize, len: usize) -> Vec<u8> {
    let mut v = tag.to_le_bytes().to_vec();
    v.extend((8..len).map(|i| {
        (tag as u8)
            .wrapping_mul(31)
            .wrapping_add((layer * 7 + i) as u8)
    }));
    v
}

fn write_tokens(p: &Pool, seq: SeqId, tags: &[u64], from: usize) {
    let table = p.table(seq).unwrap();
    let l = *p.layout();
    p.with_host_blocks(|kv| {
        for (t, &tag) in tags.iter().enumerate().skip(from) {
            let (b, slot) = table.locate(t).unwrap();
            for layer in 0..l.layers() {
                let off = l.token_offset(layer, slot).unwrap();
                kv.block_mut(b).unwrap()[off..off + l.token_bytes()].copy_from_slice(&entry(
                    tag,
                    layer,
                    l.token_bytes(),
                ));
            }
        }
    })
    .unwrap();
}

fn check_tokens(p: &Pool, seq: SeqId, tags: &[u64]) -> Result<(), TestCaseError> {
    let table = p.table(seq).unwrap();
    prop_assert_eq!(table.len(), tags.len());
    let l = *p.layout();
    p.with_host_blocks(|kv| {
        for (t, &tag) in tags.iter().enumerate() {
            let (b, slot) = table.locate(t).unwrap();
            for layer in 0..l.layers() {
                let off = l.token_offset(layer, slot).unwrap();
                let got = &kv.block(b).unwrap()[off..off + l.token_bytes()];
                prop_assert_eq!(
                    got,
                    &entry(tag, layer, l.token_bytes())[..],
                    "token {} layer {}",
                    t,
                    layer
                );
            }
        }
        Ok(())
    })
    .unwrap()
}

/// Copies `src`'s bytes into `dst` the way a transport would: by address, range by range.
fn transfer(from: &Pool, to: &Pool, src: &BlockManifest, dst: &BlockManifest) {
    let copies = src.copies_to(dst).unwrap();
    let (fb, tb) = (from.address_map().base, to.address_map().base);
    for c in copies {
        let mut buf = vec![0u8; c.bytes];
        from.region_read()
            .read((c.src - fb) as usize, &mut buf)
            .unwrap();
        to.region_read().write((c.dst - tb) as usize, &buf).unwrap();
    }
}

#[test]
fn grow_and_shrink_map_and_unmap_chunks() {
    let vmm = vmm(64);
    let p = pool(&vmm, 0, false, 1);
    let page = page_size();
    assert_eq!(p.blocks_per_chunk(), 2);
    assert_eq!(vmm.usage(DeviceId(0)), page);
    p.grow(2).unwrap();
    assert_eq!((p.stats().chunks, p.stats().capacity), (3, 6));
    assert_eq!(vmm.usage(DeviceId(0)), 3 * page);
    let s = p.create();
    p.grow_to(s, 6).unwrap(); // blocks 0, 1, 2: chunks 0 and 1
    assert_eq!(p.tokens(s).unwrap(), 6);
    assert_eq!(
        p.shrink(2),
        Err(KvError::ShrinkBelowUse {
            requested: 2,
            free_tail: 1
        })
    );
    p.shrink(1).unwrap();
    assert_eq!(vmm.usage(DeviceId(0)), 2 * page);
    assert_eq!(
        p.grow(7),
        Err(KvError::CapacityLimit {
            requested: 9,
            max_chunks: 8
        })
    );
    assert_eq!(p.stats().chunks, 2, "a refused grow changes nothing");
    assert_eq!(vmm.usage(DeviceId(0)), 2 * page, "and creates no chunk");
    p.free(s).unwrap();
    assert_eq!(p.shrink_free_tail(1).unwrap(), 1);
    assert_eq!(p.stats().chunks, 1);
    p.audit().unwrap();
    drop(p);
    assert_eq!(
        vmm.usage(DeviceId(0)),
        0,
        "dropping the pool releases its chunks"
    );
}

#[test]
fn device_out_of_memory_on_grow_changes_nothing() {
    let vmm = vmm(3);
    let p = pool(&vmm, 0, false, 2);
    let err = p.grow(2).unwrap_err();
    assert!(
        matches!(err, KvError::Vmm(VmmError::OutOfMemory { .. })),
        "{err}"
    );
    assert_eq!(p.stats().chunks, 2);
    assert_eq!(vmm.usage(DeviceId(0)), 2 * page_size());
    p.grow(1).unwrap();
    p.audit().unwrap();
}

#[test]
fn bad_configs_are_refused() {
    let vmm = vmm(8);
    let l = layout(false);
    let small = PoolConfig::new(l, DeviceId(0), page_size(), 4);
    let huge = KvLayout::gqa(64, 8, 128, KvDtype::F32, 16).unwrap();
    assert!(matches!(
        Pool::new(
            &vmm,
            PoolConfig {
                layout: huge,
                ..small
            }
        ),
        Err(KvError::ChunkTooSmall { .. })
    ));
    assert!(matches!(
        Pool::new(&vmm, small.with_initial_chunks(5)),
        Err(KvError::CapacityLimit {
            requested: 5,
            max_chunks: 4
        })
    ));
    assert!(matches!(
        Pool::new(
            &vmm,
            PoolConfig {
                chunk_bytes: page_size() + 8,
                ..small
            }
        ),
        Err(KvError::Vmm(VmmError::Unaligned { .. }))
    ));
    let bad = Watermarks {
        low: 0.95,
        ..Watermarks::default()
    };
    assert!(matches!(
        Pool::new(&vmm, small.with_watermarks(bad)),
        Err(KvError::BadWatermarks(_))
    ));
    assert!(matches!(
        Pool::new(
            &vmm,
            PoolConfig {
                device: DeviceId(5),
                ..small
            }
        ),
        Err(KvError::Vmm(VmmError::NoSuchDevice(DeviceId(5))))
    ));
}

#[test]
fn chunk_bytes_for_fits_the_blocks() {
    let vmm = vmm(8);
    let l = layout(false);
    let page = page_size();
    for want in [1, 2, 3, 9] {
        let c = Pool::chunk_bytes_for(&vmm, DeviceId(0), &l, want).unwrap();
        assert_eq!(c % page, 0);
        assert!(l.blocks_per_chunk(c) >= want);
        assert!(
            c == page || l.blocks_per_chunk(c - page) < want,
            "smallest such size"
        );
    }
}

#[test]
fn addresses_match_the_region_and_refuse_unmapped_blocks() {
    let vmm = vmm(16);
    let p = pool(&vmm, 0, true, 2);
    let map = p.address_map();
    let region = p.region_read();
    for b in 0..4u32 {
        let addr = p.block_addr(BlockId(b)).unwrap();
        let chunk = b as usize / 2;
        assert_eq!(
            addr,
            region.slot_addr(chunk).unwrap() + (b as u64 % 2) * 2048
        );
        assert_eq!(map.addr(BlockId(b)), addr);
    }
    drop(region);
    assert_eq!(
        p.block_addr(BlockId(4)),
        Err(KvError::NoSuchBlock {
            block: BlockId(4),
            capacity: 4
        })
    );
    p.set_access(&[DeviceId(1)]).unwrap();
}

#[test]
fn sequences_and_compactions_of_another_pool_are_refused() {
    let vmm = vmm(16);
    let a = pool(&vmm, 0, false, 1);
    let b = pool(&vmm, 0, false, 1);
    let s = a.create();
    b.create();
    assert_eq!(b.table(s), Err(KvError::UnknownSequence(s)));
    assert_eq!(b.free(s), Err(KvError::UnknownSequence(s)));
    assert_eq!(b.export(s), Err(KvError::UnknownSequence(s)));
    let c = a.compact().unwrap();
    assert_eq!(b.commit_compaction(c), Err(KvError::UnknownCompaction));
}

#[test]
fn import_checks_the_layout_and_the_manifest() {
    let vmm = vmm(16);
    let gqa = pool(&vmm, 0, false, 2);
    let mla = pool(&vmm, 1, true, 2);
    let s = gqa.create();
    gqa.grow_to(s, 3).unwrap();
    let m = gqa.export(s).unwrap();
    assert!(matches!(
        mla.import(&m),
        Err(KvError::LayoutMismatch { .. })
    ));
    let mut short = m.clone();
    short.blocks.pop();
    assert_eq!(
        gqa.import(&short),
        Err(KvError::BadManifest {
            blocks: 1,
            tokens: 3,
            block_tokens: 2
        })
    );
    let full = pool(&vmm, 1, false, 0);
    assert_eq!(
        full.import(&m),
        Err(KvError::OutOfBlocks { needed: 2, free: 0 })
    );
    assert_eq!(
        full.stats().sequences,
        0,
        "a refused import leaves nothing behind"
    );
}

#[test]
fn admission_and_pressure_follow_usage() {
    let vmm = vmm(16);
    let w = Watermarks {
        admit_reserve: 0.25,
        high: 0.75,
        low: 0.25,
    };
    let config = PoolConfig::new(layout(false), DeviceId(0), page_size(), 4)
        .with_initial_chunks(2)
        .with_watermarks(w);
    let p = Pool::new(&vmm, config).unwrap(); // 4 blocks of 2 tokens, 1 kept in reserve
    assert_eq!(p.pressure(), Pressure::Low);
    assert!(p.can_admit(6));
    assert!(!p.can_admit(7));
    let s = p.create();
    p.grow_to(s, 4).unwrap();
    assert_eq!(p.pressure(), Pressure::Normal);
    assert!(p.can_admit(2) && !p.can_admit(3));
    p.append(s, 2).unwrap();
    assert_eq!(p.pressure(), Pressure::High);
    assert_eq!(p.stats().peak_used, 3);
}

#[test]
fn appends_overflowing_usize_are_refused() {
    let vmm = vmm(16);
    let p = pool(&vmm, 0, false, 1);
    let s = p.create();
    p.append(s, 1).unwrap();
    assert!(matches!(
        p.append(s, usize::MAX),
        Err(KvError::OutOfBlocks { .. })
    ));
    assert_eq!(p.table(s).unwrap().len(), 1);
}

#[derive(Debug, Clone)]
enum Op {
    Create(usize),
    Append { pick: usize, tokens: usize },
    Free(usize),
    Fork { pick: usize, percent: usize },
    Grow { pool: usize, chunks: usize },
    Shrink { pool: usize, chunks: usize },
    ShrinkTail(usize),
    Compact { pool: usize, commit: bool },
    Migrate(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..2usize).prop_map(Op::Create),
        5 => (any::<usize>(), 1..6usize).prop_map(|(pick, tokens)| Op::Append { pick, tokens }),
        3 => any::<usize>().prop_map(Op::Free),
        2 => (any::<usize>(), 0..=100usize).prop_map(|(pick, percent)| Op::Fork { pick, percent }),
        1 => (0..2usize, 1..3usize).prop_map(|(pool, chunks)| Op::Grow { pool, chunks }),
        1 => (0..2usize, 1..3usize).prop_map(|(pool, chunks)| Op::Shrink { pool, chunks }),
        1 => (0..2usize).prop_map(Op::ShrinkTail),
        2 => (0..2usize, any::<bool>()).prop_map(|(pool, commit)| Op::Compact { pool, commit }),
        2 => any::<usize>().prop_map(Op::Migrate),
    ]
}

fn run(mla: bool, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let vmm = vmm(12);
    let pools = [pool(&vmm, 0, mla, 3), pool(&vmm, 1, mla, 3)];
    let mut seqs: Vec<(usize, SeqId, Vec<u64>)> = Vec::new();
    let mut next_tag = 0u64;
    // Start from interleaved sequences so that frees leave holes for compactions to fill.
    for p in [0, 1, 0, 1, 0, 1] {
        let s = pools[p].create();
        pools[p].grow_to(s, 3).unwrap();
        let tags: Vec<u64> = (0..3)
            .map(|_| {
                next_tag += 1;
                next_tag
            })
            .collect();
        write_tokens(&pools[p], s, &tags, 0);
        seqs.push((p, s, tags));
    }
    for op in ops {
        let n = seqs.len();
        match op {
            Op::Create(p) => seqs.push((p, pools[p].create(), Vec::new())),
            Op::Append { pick, tokens } if n > 0 => {
                let (p, s, tags) = &mut seqs[pick % n];
                let old = tags.len();
                match pools[*p].append(*s, tokens) {
                    Ok(_) => {
                        tags.extend((0..tokens).map(|_| {
                            next_tag += 1;
                            next_tag
                        }));
                        write_tokens(&pools[*p], *s, tags, old);
                    }
                    Err(e) => prop_assert!(matches!(e, KvError::OutOfBlocks { .. }), "{}", e),
                }
            }
            Op::Free(pick) if n > 0 => {
                let (p, s, _) = seqs.swap_remove(pick % n);
                pools[p].free(s).unwrap();
            }
            Op::Fork { pick, percent } if n > 0 => {
                let (p, s, tags) = seqs[pick % n].clone();
                let tokens = tags.len() * percent / 100;
                match pools[p].fork_prefix(s, tokens) {
                    Ok(f) => {
                        if let Some(c) = f.copy {
                            pools[p]
                                .with_host_blocks(|kv| kv.copy_block(c.src, c.dst))
                                .unwrap()
                                .unwrap();
                        }
                        seqs.push((p, f.child, tags[..tokens].to_vec()));
                    }
                    Err(e) => prop_assert!(matches!(e, KvError::OutOfBlocks { .. }), "{}", e),
                }
            }
            Op::Grow { pool, chunks } => match pools[pool].grow(chunks) {
                Ok(()) => {}
                Err(KvError::CapacityLimit { .. } | KvError::Vmm(VmmError::OutOfMemory { .. })) => {
                }
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            },
            Op::Shrink { pool, chunks } => {
                let tail = pools[pool].stats().free_tail_chunks;
                match pools[pool].shrink(chunks) {
                    Ok(()) => prop_assert!(chunks <= tail),
                    Err(e) => prop_assert_eq!(
                        e,
                        KvError::ShrinkBelowUse {
                            requested: chunks,
                            free_tail: tail
                        }
                    ),
                }
            }
            Op::ShrinkTail(pool) => {
                let before = pools[pool].stats();
                let k = pools[pool].shrink_free_tail(0).unwrap();
                prop_assert_eq!(k, before.free_tail_chunks);
                prop_assert_eq!(pools[pool].stats().free_tail_chunks, 0);
            }
            Op::Compact { pool, commit } => {
                let p = &pools[pool];
                let c = p.compact().unwrap();
                if commit {
                    p.with_host_blocks(|kv| {
                        for m in c.moves() {
                            kv.copy_block(m.from, m.to).unwrap();
                        }
                    })
                    .unwrap();
                    let target = c.target_chunks();
                    p.commit_compaction(c).unwrap();
                    prop_assert_eq!(p.stats().free_tail_chunks, p.stats().chunks - target);
                } else {
                    p.abort_compaction(c).unwrap();
                }
            }
            Op::Migrate(pick) if n > 0 => {
                let (p, s, tags) = seqs[pick % n].clone();
                let (from, to) = (&pools[p], &pools[1 - p]);
                let manifest = from.export(s).unwrap();
                prop_assert_eq!(
                    manifest.bytes(),
                    manifest.blocks.len() * from.layout().block_bytes()
                );
                match to.import(&manifest) {
                    Ok(imported) => {
                        transfer(from, to, &manifest, &imported.manifest);
                        from.free(s).unwrap();
                        seqs[pick % n] = (1 - p, imported.seq, tags);
                    }
                    Err(e) => prop_assert!(matches!(e, KvError::OutOfBlocks { .. }), "{}", e),
                }
            }
            _ => {}
        }
        for (i, p) in pools.iter().enumerate() {
            p.audit().map_err(TestCaseError::fail)?;
            prop_assert_eq!(
                vmm.usage(DeviceId(i as u32)),
                p.stats().chunks * page_size()
            );
        }
        for (p, s, tags) in &seqs {
            check_tokens(&pools[*p], *s, tags)?;
        }
    }
    for (p, s, _) in seqs {
        pools[p].free(s).unwrap();
    }
    for p in &pools {
        prop_assert_eq!(p.stats().used, 0);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Bytes written through one sequence's blocks never show up in another's, across forks,
    /// grows, shrinks, compactions and migrations between two pools.
    #[test]
    fn tokens_read_back_intact(mla in any::<bool>(), ops in proptest::collection::vec(op(), 1..50)) {
        run(mla, ops)?;
    }
}
