//! Host benchmark of the pool's bookkeeping (no device work): what the scheduler pays per append,
//! fork, free and export, and what a compaction plan costs, on pools of a realistic size.
//!
//! `cargo bench -p kv-pool --bench pool_ops`. Prints nanoseconds per operation; nothing is asserted.

use std::time::Instant;

use hbm_vmm::host::{page_size, HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Vmm};
use kv_pool::{BlockPool, KvDtype, KvLayout, PoolConfig, SeqId};

fn per_op(label: &str, ops: usize, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    let ns = t.elapsed().as_secs_f64() * 1e9 / ops as f64;
    println!("{label:<44} {ns:>10.1} ns/op  ({ops} ops)");
}

fn main() {
    let page = page_size();
    // Small blocks (one layer, one head of 16 f32s, 16 tokens: 2 KiB) so that thousands of blocks
    // fit in host memory; bookkeeping does not depend on the block size.
    let layout = KvLayout::gqa(1, 1, 16, KvDtype::F32, 16).unwrap();
    let chunk = 64 * page;
    let chunks = 64;
    let vmm = Vmm::new(HostBackend::new(
        HostConfig::devices(1, 2 * chunks * chunk)
            .with_granularity(page)
            .unwrap(),
    ));
    let config = PoolConfig::new(layout, DeviceId(0), chunk, chunks).with_initial_chunks(chunks);
    let pool = BlockPool::new(&vmm, config).unwrap();
    let capacity = pool.stats().capacity;
    let (seqs, tokens) = (256, 16 * (capacity / 2 / 256));
    println!("pool of {capacity} blocks; {seqs} sequences of {tokens} tokens");

    let ids: Vec<SeqId> = (0..seqs).map(|_| pool.create()).collect();
    per_op("append 1 token (round robin)", seqs * tokens, || {
        for _ in 0..tokens {
            for &s in &ids {
                pool.append(s, 1).unwrap();
            }
        }
    });
    per_op("table snapshot", seqs, || {
        for &s in &ids {
            std::hint::black_box(pool.table(s).unwrap());
        }
    });
    per_op("export", seqs, || {
        for &s in &ids {
            std::hint::black_box(pool.export(s).unwrap());
        }
    });
    let mut children = Vec::new();
    per_op("fork (whole sequence)", seqs, || {
        children = ids.iter().map(|&s| pool.fork(s).unwrap().child).collect();
    });
    per_op("free (children, all blocks shared)", seqs, || {
        for &c in &children {
            pool.free(c).unwrap();
        }
    });
    per_op("free every other sequence", seqs / 2, || {
        for &s in ids.iter().step_by(2) {
            pool.free(s).unwrap();
        }
    });
    let mut plan = None;
    per_op("compact (plan)", 1, || plan = Some(pool.compact().unwrap()));
    let plan = plan.unwrap();
    let moves = plan.moves().len();
    per_op(&format!("commit compaction ({moves} moves)"), 1, || {
        pool.commit_compaction(plan).unwrap()
    });
    per_op("can_admit", 10_000, || {
        for t in 0..10_000 {
            std::hint::black_box(pool.can_admit(t));
        }
    });
}
