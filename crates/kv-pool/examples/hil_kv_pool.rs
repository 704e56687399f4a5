//! GPU benchmark of `kv-pool` on the CUDA backend: what growing, shrinking and migrating a KV cache
//! costs on real device memory, against the raw `hbm-vmm` and copy baselines measured in the same
//! run.
//!
//! For two real layouts (Qwen3-30B-A3B GQA and DeepSeek-V2-Lite MLA, both bf16):
//! - `grow`/`shrink`: one chunk per call through the pool, against `PagedRegion::map_slot` /
//!   `unmap_slot` of a fresh chunk (the pool's floor);
//! - bookkeeping: nanoseconds per append (one token), fork and free, on the host CPU;
//! - migration of one 4096-token sequence from GPU 0 to GPU 1 (or within GPU 0 if there is only
//!   one): contiguous blocks (coalesced copies) and interleaved blocks (one copy per block),
//!   against one copy of the same bytes between two contiguous ranges.
//!
//! Prints a table and writes `kv-pool.json` into `$HIL_RESULTS` (default: the current dir).
//! Built by `cargo xtask hil`; run `bash target/hil/run.sh hil_kv_pool`.

use std::error::Error;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaStream};
use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::{Backend, DeviceId, PagedRegion, Vmm};
use kv_pool::{BlockManifest, BlockPool, CopyRange, KvDtype, KvLayout, PoolConfig, SeqId};

type Pool = BlockPool<CudaBackend>;

const REPS: usize = 16;
const MIGRATE_TOKENS: usize = 4096;
const MIB: f64 = (1 << 20) as f64;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn p90(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[(v.len() * 9 / 10).min(v.len() - 1)]
    }
}

fn micros<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed().as_secs_f64() * 1e6)
}

struct Row {
    layout: &'static str,
    what: String,
    median: f64,
    p90: f64,
    unit: &'static str,
    note: String,
}

impl Row {
    fn json(&self) -> String {
        format!(
            "{{\"layout\":\"{}\",\"what\":\"{}\",\"median\":{},\"p90\":{},\"unit\":\"{}\",\"note\":\"{}\"}}",
            self.layout,
            self.what,
            num(self.median),
            num(self.p90),
            self.unit,
            self.note.replace(['"', '\\'], "'")
        )
    }
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

/// Grows and shrinks a pool one chunk at a time, and maps/unmaps the same number of chunks in a
/// bare region, alternating so drift hits both.
fn capacity_rows(
    vmm: &Vmm<CudaBackend>,
    name: &'static str,
    layout: KvLayout,
    rows: &mut Vec<Row>,
) -> Result<(), Box<dyn Error>> {
    let chunk = Pool::chunk_bytes_for(vmm, DeviceId(0), &layout, 16)?;
    let pool = Pool::new(vmm, PoolConfig::new(layout, DeviceId(0), chunk, REPS + 1))?;
    let mut region = PagedRegion::new(vmm, DeviceId(0), chunk, REPS + 1)?;
    let (mut grow, mut shrink, mut map, mut unmap) = (vec![], vec![], vec![], vec![]);
    // One warm-up round each, discarded.
    pool.grow(1)?;
    pool.shrink(1)?;
    region.map_slot(0, vmm.create_chunk(DeviceId(0), chunk, false)?)?;
    drop(region.unmap_slot(0)?);
    for i in 0..REPS {
        let (r, t) = micros(|| pool.grow(1));
        r?;
        grow.push(t);
        let (r, t) = micros(|| -> Result<(), Box<dyn Error>> {
            let c = vmm.create_chunk(DeviceId(0), chunk, false)?;
            region.map_slot(i, c)?;
            Ok(())
        });
        r?;
        map.push(t);
    }
    for i in (0..REPS).rev() {
        let (r, t) = micros(|| pool.shrink(1));
        r?;
        shrink.push(t);
        let (r, t) = micros(|| region.unmap_slot(i).map(drop));
        r?;
        unmap.push(t);
    }
    let note = format!(
        "{:.0} MiB chunks of {} blocks of {:.2} MiB",
        chunk as f64 / MIB,
        pool.blocks_per_chunk(),
        layout.block_bytes() as f64 / MIB
    );
    for (what, v) in [
        ("pool.grow(1)", grow),
        ("baseline: create+map_slot", map),
        ("pool.shrink(1)", shrink),
        ("baseline: unmap_slot+release", unmap),
    ] {
        rows.push(Row {
            layout: name,
            what: what.into(),
            median: median(v.clone()),
            p90: p90(v),
            unit: "us",
            note: note.clone(),
        });
    }
    Ok(())
}

/// Nanoseconds per bookkeeping operation on a pool with room for 32 sequences of 256 tokens.
fn bookkeeping_rows(
    vmm: &Vmm<CudaBackend>,
    name: &'static str,
    layout: KvLayout,
    rows: &mut Vec<Row>,
) -> Result<(), Box<dyn Error>> {
    let (seqs, tokens) = (32, 256);
    let chunk = Pool::chunk_bytes_for(vmm, DeviceId(0), &layout, 16)?;
    let blocks = 2 * seqs * layout.blocks_for(tokens);
    let chunks = blocks.div_ceil(layout.blocks_per_chunk(chunk));
    let pool = Pool::new(
        vmm,
        PoolConfig::new(layout, DeviceId(0), chunk, chunks).with_initial_chunks(chunks),
    )?;
    let ids: Vec<SeqId> = (0..seqs).map(|_| pool.create()).collect();
    let t = Instant::now();
    for _ in 0..tokens {
        for &s in &ids {
            pool.append(s, 1)?;
        }
    }
    let append = t.elapsed().as_secs_f64() * 1e9 / (seqs * tokens) as f64;
    let t = Instant::now();
    let children: Vec<SeqId> = ids
        .iter()
        .map(|&s| pool.fork(s).map(|f| f.child))
        .collect::<Result<_, _>>()?;
    let fork = t.elapsed().as_secs_f64() * 1e9 / seqs as f64;
    let t = Instant::now();
    for &s in ids.iter().chain(&children) {
        pool.free(s)?;
    }
    let free = t.elapsed().as_secs_f64() * 1e9 / (2 * seqs) as f64;
    let note =
        format!("{seqs} sequences of {tokens} tokens; fork and free include the whole table");
    for (what, v) in [("append 1 token", append), ("fork", fork), ("free", free)] {
        rows.push(Row {
            layout: name,
            what: what.into(),
            median: v,
            p90: f64::NAN,
            unit: "ns",
            note: note.clone(),
        });
    }
    Ok(())
}

/// Issues `copies` from `src` to `dst` on `stream` and waits; microseconds.
fn run_copies(
    src: &Pool,
    dst: &Pool,
    copies: &[CopyRange],
    s_src: &Arc<CudaStream>,
    s_dst: &Arc<CudaStream>,
) -> Result<f64, Box<dyn Error>> {
    let (sb, db) = (src.address_map().base, dst.address_map().base);
    src.with_region(|from| {
        dst.with_region(|to| -> Result<f64, Box<dyn Error>> {
            let views = copies
                .iter()
                .map(|c| {
                    let v = from.device_view::<u8>((c.src - sb) as usize, c.bytes, s_src)?;
                    let w = to.device_view::<u8>((c.dst - db) as usize, c.bytes, s_dst)?;
                    Ok((v, w))
                })
                .collect::<Result<Vec<_>, hbm_vmm::VmmError>>()?;
            s_src.synchronize()?;
            s_dst.synchronize()?;
            let t = Instant::now();
            for (v, mut w) in views {
                s_dst.memcpy_dtod(&v, &mut w)?;
            }
            s_dst.synchronize()?;
            Ok(t.elapsed().as_secs_f64() * 1e6)
        })
    })
}

fn migration_rows(
    vmm: &Vmm<CudaBackend>,
    name: &'static str,
    layout: KvLayout,
    rows: &mut Vec<Row>,
) -> Result<(), Box<dyn Error>> {
    let devices = vmm.device_count();
    let (d0, d1) = (DeviceId(0), DeviceId(if devices > 1 { 1 } else { 0 }));
    let chunk = Pool::chunk_bytes_for(vmm, d0, &layout, 16)?;
    let blocks = layout.blocks_for(MIGRATE_TOKENS);
    // One sequence grown alone plus two interleaved ones: three sequences of `blocks` blocks.
    let chunks = (3 * blocks).div_ceil(layout.blocks_per_chunk(chunk)) + 1;
    let make = |d| {
        Pool::new(
            vmm,
            PoolConfig::new(layout, d, chunk, chunks).with_initial_chunks(chunks),
        )
    };
    let (src, dst) = (make(d0)?, make(d1)?);
    src.set_access(&[d1])?;
    dst.set_access(&[d0])?;
    let s_src = CudaContext::new(vmm.backend().ordinal(d0)? as usize)?.new_stream()?;
    let s_dst = CudaContext::new(vmm.backend().ordinal(d1)? as usize)?.new_stream()?;
    let link = format!("{d0} -> {d1}");

    // Contiguous: one sequence grown alone. Interleaved: two grown a block at a time in turns.
    let alone = src.create();
    src.grow_to(alone, MIGRATE_TOKENS)?;
    let (x, y) = (src.create(), src.create());
    for b in 1..=blocks {
        src.grow_to(x, b * layout.block_tokens())?;
        src.grow_to(y, b * layout.block_tokens())?;
    }
    let plan = |seq: SeqId| -> Result<(BlockManifest, Vec<CopyRange>, f64), Box<dyn Error>> {
        let (r, t) = micros(|| -> Result<_, kv_pool::KvError> {
            let out = src.export(seq)?;
            let imported = dst.import(&out)?;
            let copies = out.copies_to(&imported.manifest)?;
            Ok((out, imported, copies))
        });
        let (out, imported, copies) = r?;
        dst.free(imported.seq)?; // the destination blocks stay where the next import puts them
        Ok((out, copies, t))
    };
    let (out, contiguous, t_plan) = plan(alone)?;
    let (_, interleaved, _) = plan(x)?;
    let bytes = out.bytes() as f64;
    // Baseline: the same bytes as one copy between the regions' first blocks.
    let whole = [CopyRange {
        src: src.address_map().base,
        dst: dst.address_map().base,
        bytes: out.blocks.len() * layout.block_stride(),
    }];
    let note = |n: usize| format!("{link}, {:.0} MiB in {n} copies", bytes / MIB);
    rows.push(Row {
        layout: name,
        what: "migration bookkeeping (export+import+copies_to)".into(),
        median: t_plan,
        p90: f64::NAN,
        unit: "us",
        note: format!("{} blocks", out.blocks.len()),
    });
    for (what, copies) in [
        ("baseline: one contiguous copy", &whole[..]),
        ("migrate contiguous blocks", &contiguous[..]),
        ("migrate interleaved blocks", &interleaved[..]),
    ] {
        run_copies(&src, &dst, copies, &s_src, &s_dst)?; // warm-up
        let times: Vec<f64> = (0..5)
            .map(|_| run_copies(&src, &dst, copies, &s_src, &s_dst))
            .collect::<Result<_, _>>()?;
        let gbps: Vec<f64> = times.iter().map(|us| bytes / (us * 1e3)).collect();
        rows.push(Row {
            layout: name,
            what: format!("{what} (time)"),
            median: median(times.clone()),
            p90: p90(times),
            unit: "us",
            note: note(copies.len()),
        });
        rows.push(Row {
            layout: name,
            what: format!("{what} (rate)"),
            median: median(gbps.clone()),
            p90: f64::NAN,
            unit: "GB/s",
            note: note(copies.len()),
        });
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let backend = match CudaBackend::for_hil_test(1) {
        Ok(Some(b)) => b,
        Ok(None) => {
            println!("SKIPPED hil_kv_pool: no GPU");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let devices = backend.device_count();
    let vmm = Vmm::new(backend);
    let card = CudaContext::new(0)?.name()?;
    println!("kv-pool on {devices} x {card}");
    let layouts = [
        (
            "qwen3-30b-a3b gqa bf16 b16",
            KvLayout::gqa(48, 4, 128, KvDtype::Bf16, 16)?,
        ),
        (
            "deepseek-v2-lite mla bf16 b64",
            KvLayout::mla(27, 512, 64, KvDtype::Bf16, 64)?,
        ),
    ];
    let mut rows = Vec::new();
    for (name, layout) in layouts {
        capacity_rows(&vmm, name, layout, &mut rows)?;
        bookkeeping_rows(&vmm, name, layout, &mut rows)?;
        migration_rows(&vmm, name, layout, &mut rows)?;
    }
    println!(
        "{:<32} {:<50} {:>12} {:>12} {:<5} note",
        "layout", "what", "median", "p90", "unit"
    );
    for r in &rows {
        println!(
            "{:<32} {:<50} {:>12} {:>12} {:<5} {}",
            r.layout,
            r.what,
            num(r.median),
            num(r.p90),
            r.unit,
            r.note
        );
    }
    let errors = vmm.take_errors();
    if !errors.is_empty() {
        println!("teardown errors recorded by the vmm: {errors:?}");
    }
    let json = format!(
        "{{\"bench\":\"kv-pool\",\"card\":\"{}\",\"devices\":{devices},\"rows\":[\n{}\n]}}\n",
        card.replace(['"', '\\'], "'"),
        rows.iter().map(Row::json).collect::<Vec<_>>().join(",\n")
    );
    let dir = std::env::var("HIL_RESULTS").unwrap_or_else(|_| ".".into());
    let path = std::path::Path::new(&dir).join("kv-pool.json");
    std::fs::write(&path, json)?;
    println!("wrote {}", path.display());
    Ok(())
}
