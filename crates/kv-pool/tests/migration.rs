//! Live migration of sequences between two pools through `p2p-xfer`'s host transport, the way the
//! scaler moves a leaving device's sequences: export, import, copy, free, carry on.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use hbm_vmm::host::{page_size, HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Vmm};
use kv_pool::{BlockManifest, BlockPool, KvDtype, KvError, KvLayout, PoolConfig, SeqId};
use p2p_xfer::{CopyOp, HostTransport, HostTransportConfig, Location, Transport};

type Pool = BlockPool<HostBackend>;

const INITIAL: usize = 16;

fn setup() -> (Vmm<HostBackend>, Arc<Pool>, Arc<Pool>) {
    let page = page_size();
    let config = HostConfig::devices(2, 256 * page)
        .with_granularity(page)
        .unwrap();
    let vmm = Vmm::new(HostBackend::new(config));
    // An MLA layout (DeepSeek-V2 style, shrunk): 3 layers of 64-element latents and 16-element
    // rope keys, f32, 4-token blocks of 3840 bytes; chunks of four blocks.
    let layout = KvLayout::mla(3, 64, 16, KvDtype::F32, 4).unwrap();
    let chunk = Pool::chunk_bytes_for(&vmm, DeviceId(0), &layout, 4).unwrap();
    let pool = |dev| {
        let c = PoolConfig::new(layout, DeviceId(dev), chunk, 32).with_initial_chunks(INITIAL);
        let p = Arc::new(Pool::new(&vmm, c).unwrap());
        p.set_access(&[DeviceId(1 - dev)]).unwrap();
        p
    };
    let (a, b) = (pool(0), pool(1));
    (vmm, a, b)
}

/// The value of element `i` of token `t` of layer `l` of the sequence tagged `tag`.
fn value(tag: u32, t: usize, l: usize, i: usize) -> f32 {
    (tag as usize * 1_000_000 + t * 1000 + l * 100 + i) as f32
}

fn write(p: &Pool, seq: SeqId, tag: u32, from: usize) {
    let table = p.table(seq).unwrap();
    let l = *p.layout();
    let width = l.token_bytes() / 4;
    p.with_host_blocks(|kv| {
        for t in from..table.len() {
            let (b, slot) = table.locate(t).unwrap();
            let blk = kv.block_f32_mut(b).unwrap();
            for layer in 0..l.layers() {
                let at = l.token_offset(layer, slot).unwrap() / 4;
                for i in 0..width {
                    blk[at + i] = value(tag, t, layer, i);
                }
            }
        }
    })
    .unwrap();
}

fn check(p: &Pool, seq: SeqId, tag: u32) {
    let table = p.table(seq).unwrap();
    let l = *p.layout();
    let width = l.token_bytes() / 4;
    p.with_host_blocks(|kv| {
        for t in 0..table.len() {
            let (b, slot) = table.locate(t).unwrap();
            let blk = kv.block_f32(b).unwrap();
            for layer in 0..l.layers() {
                let at = l.token_offset(layer, slot).unwrap() / 4;
                for i in 0..width {
                    assert_eq!(blk[at + i], value(tag, t, layer, i), "seq {tag} token {t}");
                }
            }
        }
    })
    .unwrap();
}

fn copy_ops(from: &BlockManifest, to: &BlockManifest) -> Vec<CopyOp> {
    from.copies_to(to)
        .unwrap()
        .into_iter()
        .map(|c| {
            CopyOp::new(
                Location::new(from.device, c.src),
                Location::new(to.device, c.dst),
                c.bytes as u64,
            )
        })
        .collect()
}

/// Moves `seq` from `from` to `to`; returns its id there and the number of copies it took.
fn migrate(t: &HostTransport, from: &Pool, to: &Pool, seq: SeqId) -> (SeqId, usize) {
    let out = from.export(seq).unwrap();
    let imported = to.import(&out).unwrap();
    let ops = copy_ops(&out, &imported.manifest);
    let report = t.submit(&ops).unwrap().wait().unwrap();
    assert!(report.bytes >= out.bytes() as u64);
    from.free(seq).unwrap();
    (imported.seq, ops.len())
}

#[test]
fn a_leaving_devices_sequences_move_and_keep_decoding() {
    let (vmm, a, b) = setup();
    let transport = HostTransport::new(vmm.clone(), HostTransportConfig::default());
    // Grow four sequences in turns so their blocks interleave, as they do under real load.
    let seqs: Vec<SeqId> = (0..4).map(|_| a.create()).collect();
    for round in 0..5 {
        for (tag, &s) in seqs.iter().enumerate() {
            let before = a.table(s).unwrap().len();
            a.append(s, 3 + tag + round).unwrap();
            write(&a, s, tag as u32, before);
        }
    }
    // A long contiguous one, grown in one go.
    let long = a.create();
    a.grow_to(long, 40).unwrap();
    write(&a, long, 9, 0);

    let mut moved = Vec::new();
    for (tag, &s) in seqs.iter().enumerate() {
        let (n, copies) = migrate(&transport, &a, &b, s);
        assert!(copies <= b.table(n).unwrap().blocks().len());
        moved.push((tag as u32, n));
    }
    let (long_b, copies) = migrate(&transport, &a, &b, long);
    assert!(
        copies < 10,
        "contiguous blocks travel as few copies ({copies} for 10 blocks)"
    );
    moved.push((9, long_b));

    // The source is empty and can give every chunk back; the destination has everything.
    assert_eq!(a.stats().used, 0);
    assert_eq!(a.shrink_free_tail(0).unwrap(), INITIAL);
    assert_eq!(vmm.usage(DeviceId(0)), 0);
    for &(tag, s) in &moved {
        check(&b, s, tag);
    }
    // Decoding continues on the destination.
    for &(tag, s) in &moved {
        let before = b.table(s).unwrap().len();
        b.append(s, 1).unwrap();
        write(&b, s, tag, before);
        check(&b, s, tag);
    }
}

#[test]
fn migration_runs_while_the_scheduler_allocates_and_the_pool_grows() {
    let (vmm, a, b) = setup();
    let transport = HostTransport::new(vmm.clone(), HostTransportConfig::default());
    let seqs: Vec<SeqId> = (0..6).map(|_| a.create()).collect();
    for (tag, &s) in seqs.iter().enumerate() {
        a.grow_to(s, 5 + 3 * tag).unwrap();
        write(&a, s, tag as u32, 0);
    }
    // The scheduler keeps allocating and freeing other sequences on the source (bookkeeping
    // only: it writes no bytes while the transport reads), and the scaler grows the pool.
    let stop = Arc::new(AtomicBool::new(false));
    let scheduler = {
        let (a, stop) = (Arc::clone(&a), Arc::clone(&stop));
        thread::spawn(move || {
            let mut rounds = 0usize;
            while !stop.load(Ordering::Relaxed) || rounds < 100 {
                let s = a.create();
                match a.grow_to(s, 1 + rounds % 9) {
                    Ok(_) | Err(KvError::OutOfBlocks { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
                if let Ok(f) = a.fork(s) {
                    a.free(f.child).unwrap();
                }
                a.free(s).unwrap();
                rounds += 1;
            }
            rounds
        })
    };
    a.grow(2).unwrap();
    let moved: Vec<(u32, SeqId)> = seqs
        .iter()
        .enumerate()
        .map(|(tag, &s)| (tag as u32, migrate(&transport, &a, &b, s).0))
        .collect();
    stop.store(true, Ordering::Relaxed);
    assert!(scheduler.join().unwrap() >= 100);
    for (tag, s) in moved {
        check(&b, s, tag);
    }
    assert_eq!(a.stats().used, 0);
    assert_eq!(a.stats().sequences, 0);
}

#[test]
fn an_import_that_does_not_fit_leaves_both_pools_as_they_were() {
    let (_vmm, a, b) = setup();
    let s = a.create();
    a.grow_to(s, 4 * b.stats().capacity + 1).unwrap_err(); // too big for a, too
    a.grow(8).unwrap();
    a.grow_to(s, 4 * b.stats().capacity + 1).unwrap();
    write(&a, s, 1, 0);
    let out = a.export(s).unwrap();
    let before = b.stats();
    assert!(matches!(b.import(&out), Err(KvError::OutOfBlocks { .. })));
    assert_eq!(b.stats(), before);
    // The caller's choice: grow the destination and try again.
    b.grow(8).unwrap();
    let transport = HostTransport::new(a.vmm().clone(), HostTransportConfig::default());
    let (moved, _) = migrate(&transport, &a, &b, s);
    check(&b, moved, 1);
}
