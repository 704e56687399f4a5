//! A paged KV cache on the host backend: admit and grow a sequence, fork it, export it to a pool on another device, and shrink the pool.
//!
//! Run: `cargo run -p kv-pool --example quickstart` (no GPU needed).

use hbm_vmm::{
    host::{HostBackend, HostConfig},
    DeviceId, Vmm,
};
use kv_pool::{BlockPool, KvDtype, KvLayout, PoolConfig};
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let page = hbm_vmm::host::page_size();
    let vmm = Vmm::new(HostBackend::new(
        HostConfig::devices(2, 256 * page).with_granularity(page)?,
    ));
    // A small GQA model: 2 layers, 2 KV heads of 8 elements, f32 on the CPU, 4-token blocks.
    let layout = KvLayout::gqa(2, 2, 8, KvDtype::F32, 4)?;
    let chunk = BlockPool::chunk_bytes_for(&vmm, DeviceId(0), &layout, 8)?;
    let config = PoolConfig::new(layout, DeviceId(0), chunk, 16).with_initial_chunks(1);
    let pool = Arc::new(BlockPool::new(&vmm, config)?);

    // Admission, then prefill of a 10-token prompt: 3 blocks.
    assert!(pool.can_admit(10));
    let seq = pool.create();
    assert_eq!(pool.grow_to(seq, 10)?.len(), 3);

    // The kernel finds token 9's K vector for layer 1, head 0 through the table and the layout.
    let (block, slot) = pool.table(seq)?.locate(9).expect("token 9 exists");
    let k = layout.k_offset(1, slot, 0)? / 4;
    pool.with_host_blocks(|kv| kv.block_f32_mut(block).map(|b| b[k] = 1.5))??;

    // Parallel sampling: the child shares the two full blocks and gets a copy of the partial one,
    // which the caller makes.
    let forked = pool.fork(seq)?;
    if let Some(copy) = forked.copy {
        pool.with_host_blocks(|kv| kv.copy_block(copy.src, copy.dst))??;
    }
    assert_eq!(pool.stats().shared, 2);
    pool.append(forked.child, 1)?; // decode step: token 10 fits in the child's own block

    // Scale-down: move `seq` to a pool on device 1 and carry on there.
    let other = BlockPool::new(
        &vmm,
        PoolConfig::new(layout, DeviceId(1), chunk, 16).with_initial_chunks(1),
    )?;
    let manifest = pool.export(seq)?;
    let imported = other.import(&manifest)?;
    assert_eq!(manifest.copies_to(&imported.manifest)?.len(), 1); // both sides contiguous: one copy
    for (src, dst) in manifest.blocks.iter().zip(&imported.manifest.blocks) {
        // On GPUs p2p-xfer makes these copies; on the host backend, plain memory copies.
        let bytes = pool.with_host_blocks(|kv| kv.block(src.block).map(<[u8]>::to_vec))??;
        other
            .with_host_blocks(|kv| kv.block_mut(dst.block).map(|b| b.copy_from_slice(&bytes)))??;
    }
    pool.free(seq)?;
    let (block, slot) = other.table(imported.seq)?.locate(9).expect("token 9 moved");
    let k = layout.k_offset(1, slot, 0)? / 4;
    assert_eq!(
        other.with_host_blocks(|kv| kv.block_f32(block).map(|b| b[k]))??,
        1.5
    );

    // The scaler: grow under pressure, give back free chunks when load drops.
    pool.grow(1)?;
    pool.free(forked.child)?;
    assert_eq!(pool.shrink_free_tail(1)?, 1);
    assert_eq!(pool.stats().used, 0);
    println!("kv-pool: ok");
    Ok(())
}
