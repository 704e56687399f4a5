//! GPU benchmark of the CUDA transport (feature `cuda`), on two GPUs, and on more when present.
//!
//! 1. **Ours against raw `cuMemcpyPeerAsync`**, GPU 0 → GPU 1, 2 MiB to 1 GiB, in the same run on
//!    the same hbm-vmm memory: `R` copies back to back (about 2 GiB in all per trial), timed on
//!    the host from the first submit to the last completion; the median of 5 alternating trials.
//!    "ours" pays everything a caller pays: validation, the pump, events, host-side completion.
//! 2. **Interference**: a bf16 cuBLAS GEMM loop (8192³) runs on the source and on the destination,
//!    alone and then while 1 GiB batches stream from source to destination. Reported: the GEMM's
//!    slowdown (the worse of the two devices) and the transfer rate during the loop.
//! 3. **Planner**: a link model calibrated from single-link measurements (bandwidth per pair from
//!    8 x 256 MiB batches, per-copy latency from a batch of 256 x 2 MiB, device-local bandwidth,
//!    and with 3+ GPUs the ingress/egress port limits from two concurrent links),
//!    then plans the calibration never ran (bidirectional, local+peer striped, many small
//!    tensors; with 3+ GPUs a new device fed by all others, partial holders; with 4+ two new
//!    devices at once): predicted against measured time.
//!
//! Writes `p2p-xfer.json` into `$HIL_RESULTS` (default: the current directory) with the schema
//! of docs/benchmarks/p2p-xfer.md, and prints a table. `P2P_BENCH_MAX_GPUS` caps the GPUs used.
//! Built by `cargo xtask hil`; run `bash target/hil/run.sh hil_p2p_bench`.

use cudarc::cublas::sys as blas;
use cudarc::driver::sys::{self, CUresult, CUstream};
use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::{Backend, DeviceId, Mapping, Reservation, Vmm};
use p2p_xfer::cuda::{CudaTransport, CudaTransportConfig};
use p2p_xfer::{
    CopyOp, Link, LinkModel, LinkSpec, Location, Need, Plan, Planner, PlannerConfig, Ports, Ticket,
    Transport,
};
use serde_json::{json, Value};
use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Each device gets a source region and a destination region of this size.
const REGION: u64 = 2 * GIB;
const TRIALS: usize = 5;

type Res<T> = Result<T, Box<dyn Error>>;

fn ok(call: &'static str, r: CUresult) -> Res<()> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{call} failed with {r:?}").into())
    }
}

fn blas_ok(call: &'static str, r: blas::cublasStatus_t) -> Res<()> {
    if r == blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(format!("{call} failed with {r:?}").into())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// One device's memory: a source and a destination region, accessible from every device.
struct DevMem {
    _res: Vec<Reservation<CudaBackend>>,
    src: Mapping<CudaBackend>,
    dst: Mapping<CudaBackend>,
}

impl DevMem {
    fn src(&self, off: u64) -> Location {
        Location::new(self.src.device(), self.src.addr() + off)
    }
    fn dst(&self, off: u64) -> Location {
        Location::new(self.dst.device(), self.dst.addr() + off)
    }
}

fn region(
    vmm: &Vmm<CudaBackend>,
    dev: DeviceId,
    bytes: u64,
    all: &[DeviceId],
) -> Res<(Reservation<CudaBackend>, Mapping<CudaBackend>)> {
    let chunk = vmm.create_chunk(dev, bytes as usize, false)?;
    let res = vmm.reserve(dev, bytes as usize)?;
    let map = res.map(0, &chunk, 0, bytes as usize)?;
    res.set_access(all)?;
    Ok((res, map))
}

struct Bench {
    vmm: Vmm<CudaBackend>,
    n: usize,
    mem: Vec<DevMem>,
    t: CudaTransport,
    /// Raw streams per (src, dst) for the baseline, in the source's context.
    raw_streams: Vec<CUstream>,
}

impl Bench {
    fn dev(&self, i: usize) -> DeviceId {
        DeviceId(i as u32)
    }

    fn bind(&self, i: usize) -> Res<()> {
        Ok(self.vmm.backend().bind(self.dev(i))?)
    }

    /// `reps` raw `cuMemcpyPeerAsync` of `size` from `s` to `d` back to back; host-timed.
    fn raw(&self, s: usize, d: usize, size: u64, reps: usize) -> Res<Duration> {
        self.bind(s)?;
        let stream = self.raw_streams[s * self.n + d];
        let (sc, dc) = (
            self.vmm.backend().context(self.dev(s))?,
            self.vmm.backend().context(self.dev(d))?,
        );
        let (src, dst) = (self.mem[s].src.addr(), self.mem[d].dst.addr());
        let t0 = Instant::now();
        for _ in 0..reps {
            // SAFETY: both ranges are live mappings of at least `size` bytes, accessible from
            // both devices; the stream is live and is synchronised below.
            ok("cuMemcpyPeerAsync", unsafe {
                sys::cuMemcpyPeerAsync(dst, dc, src, sc, size as usize, stream)
            })?;
        }
        // SAFETY: a live stream.
        ok("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(stream)
        })?;
        Ok(t0.elapsed())
    }

    /// `reps` one-copy batches through our transport, submitted back to back; host-timed from
    /// the first submit until the last ticket finished.
    fn ours(&self, s: usize, d: usize, size: u64, reps: usize) -> Res<Duration> {
        let op = CopyOp::new(self.mem[s].src(0), self.mem[d].dst(0), size);
        let t0 = Instant::now();
        let tickets: Vec<Ticket> = (0..reps)
            .map(|_| self.t.submit(&[op]))
            .collect::<Result<_, _>>()?;
        for t in &tickets {
            t.wait()?;
        }
        Ok(t0.elapsed())
    }

    /// Run a batch through our transport `trials` times; the median wall time.
    fn run_batch(&self, batch: &[CopyOp], trials: usize) -> Res<Duration> {
        let mut times = Vec::new();
        for _ in 0..trials {
            let t0 = Instant::now();
            self.t.submit(batch)?.wait()?;
            times.push(t0.elapsed().as_secs_f64());
        }
        Ok(Duration::from_secs_f64(median(times)))
    }
}

fn card_name(vmm: &Vmm<CudaBackend>) -> Res<String> {
    let cu = vmm.backend().cu_device(DeviceId(0))?;
    let mut buf = [0 as std::ffi::c_char; 256];
    // SAFETY: `buf` is valid for 256 bytes; the driver writes a NUL-terminated name.
    ok("cuDeviceGetName", unsafe {
        sys::cuDeviceGetName(buf.as_mut_ptr(), 256, cu)
    })?;
    // SAFETY: NUL-terminated by the driver within the buffer.
    Ok(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hil_p2p_bench failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let backend = match CudaBackend::for_hil_test(1) {
        Ok(Some(b)) => b,
        Ok(None) => {
            println!("SKIPPED hil_p2p_bench: no GPU");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let cap: usize = std::env::var("P2P_BENCH_MAX_GPUS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    let n = backend.device_count().min(cap);
    if n < 2 {
        // Peer bandwidth needs two real GPUs (logical devices of one GPU would measure a
        // device-local copy): reported as skipped, never as a pass.
        println!("SKIPPED hil_p2p_bench: {n} GPU(s); the peer-to-peer benchmark needs two");
        return Ok(());
    }
    // SAFETY: only tries to dlopen the library.
    if !unsafe { blas::is_culib_present() } {
        return Err("libcublas was not found; the interference benchmark needs it".into());
    }
    let vmm = Vmm::new(backend);
    let card = card_name(&vmm)?;
    println!("{n} x {card}");
    let all: Vec<DeviceId> = (0..n as u32).map(DeviceId).collect();
    let mut mem = Vec::new();
    for &d in &all {
        let (rs, src) = region(&vmm, d, REGION, &all)?;
        let (rd, dst) = region(&vmm, d, REGION, &all)?;
        vmm.backend().bind(d)?;
        // SAFETY: `src` is a live mapping of REGION bytes on `d`, whose context is current.
        ok("cuMemsetD8", unsafe {
            sys::cuMemsetD8_v2(src.addr(), 0x40 + d.0 as u8, REGION as usize)
        })?;
        mem.push(DevMem {
            _res: vec![rs, rd],
            src,
            dst,
        });
    }
    let mut raw_streams = Vec::new();
    for s in 0..n {
        vmm.backend().bind(DeviceId(s as u32))?;
        for _ in 0..n {
            let mut st: CUstream = std::ptr::null_mut();
            // SAFETY: valid out-pointer; the source's context is current.
            ok("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut st, 1) })?;
            raw_streams.push(st);
        }
    }
    let config = CudaTransportConfig::default();
    let t = CudaTransport::new(vmm.clone(), config.clone())?;
    let b = Bench {
        vmm: vmm.clone(),
        n,
        mem,
        t,
        raw_streams,
    };

    // Warm-up, and a correctness spot check of one copy.
    b.raw(0, 1, 64 * MIB, 4)?;
    b.ours(0, 1, 64 * MIB, 4)?;
    b.bind(1)?;
    let mut probe = vec![0u8; 4096];
    // SAFETY: `dst` of device 1 is live and at least 4096 bytes; `probe` is a valid buffer.
    ok("cuMemcpyDtoH", unsafe {
        sys::cuMemcpyDtoH_v2(probe.as_mut_ptr().cast(), b.mem[1].dst.addr(), 4096)
    })?;
    if probe.iter().any(|&x| x != 0x40) {
        return Err("spot check failed: device 1 did not receive device 0's bytes".into());
    }

    let sizes = sizes_table(&b)?;
    let interference = interference(&b)?;
    let (model, calibration) = calibrate(&b)?;
    let planner = planner_runs(&b, &model)?;

    for s in b.t.stats() {
        println!(
            "link {}: {:.2} GB moved, {:.1} GB/s while busy{}",
            s.link,
            s.bytes as f64 / 1e9,
            s.gbps(),
            if b.t.peer_call_refused(s.link) {
                " (cuMemcpyDtoDAsync fallback)"
            } else {
                ""
            }
        );
    }
    let out = json!({
        "card": card,
        "gpus": n,
        "sizes": sizes,
        "interference": interference,
        "planner": planner,
        "calibration": calibration,
        "config": {
            "chunk_bytes": config.chunk_bytes,
            "max_chunks_in_flight": config.max_chunks_in_flight,
            "poll_interval_us": config.poll_interval.as_micros() as u64,
            "trials": TRIALS,
        },
    });
    let dir = std::env::var("HIL_RESULTS").unwrap_or_else(|_| ".".into());
    let path = std::path::Path::new(&dir).join("p2p-xfer.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// Ours against raw for 2 MiB .. 1 GiB, GPU 0 -> GPU 1.
fn sizes_table(b: &Bench) -> Res<Vec<Value>> {
    println!(
        "\n{:>10} {:>6} {:>12} {:>12} {:>8}",
        "size", "reps", "ours GB/s", "raw GB/s", "ratio"
    );
    let mut rows = Vec::new();
    for mib in [2u64, 8, 32, 64, 128, 256, 512, 1024] {
        let size = mib * MIB;
        let reps = ((2 * GIB) / size).clamp(4, 1024) as usize;
        let (mut ours, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..TRIALS {
            raw.push(gbps(size * reps as u64, b.raw(0, 1, size, reps)?));
            ours.push(gbps(size * reps as u64, b.ours(0, 1, size, reps)?));
        }
        let (o, r) = (median(ours), median(raw));
        println!(
            "{:>7} MiB {:>6} {:>12.1} {:>12.1} {:>7.1}%",
            mib,
            reps,
            o,
            r,
            100.0 * o / r
        );
        rows.push(json!({"bytes": size, "ours_gbps": o, "raw_gbps": r, "reps": reps}));
    }
    Ok(rows)
}

/// A bf16 GEMM loop on one device.
struct Gemm {
    dev: usize,
    handle: blas::cublasHandle_t,
    stream: CUstream,
    /// Timing events around each loop.
    events: [sys::CUevent; 2],
    a: u64,
    b: u64,
    c: u64,
    _mem: (Reservation<CudaBackend>, Mapping<CudaBackend>),
}

const GEMM_N: i32 = 8192;

impl Gemm {
    fn new(bench: &Bench, dev: usize) -> Res<Self> {
        let elems = (GEMM_N as u64) * (GEMM_N as u64);
        let bytes = 3 * elems * 2;
        let g = bench.vmm.granularity(bench.dev(dev))? as u64;
        let (res, map) = region(&bench.vmm, bench.dev(dev), bytes.div_ceil(g) * g, &[])?;
        bench.bind(dev)?;
        // SAFETY: the mapping is live and holds 3 * elems bf16 values; context current.
        // 0x3C00 is bf16 0.0078125: small enough that the sums stay finite.
        ok("cuMemsetD16", unsafe {
            sys::cuMemsetD16_v2(map.addr(), 0x3C00, (3 * elems) as usize)
        })?;
        let mut stream: CUstream = std::ptr::null_mut();
        // SAFETY: valid out-pointer; context current.
        ok("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut stream, 1)
        })?;
        let mut handle: blas::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: valid out-pointer; context current.
        blas_ok("cublasCreate", unsafe {
            blas::cublasCreate_v2(&mut handle)
        })?;
        // SAFETY: live handle and stream of the same context.
        blas_ok("cublasSetStream", unsafe {
            blas::cublasSetStream_v2(handle, stream.cast())
        })?;
        let base = map.addr();
        let mut events = [std::ptr::null_mut(); 2];
        for e in &mut events {
            // SAFETY: valid out-pointer; context current.
            ok("cuEventCreate", unsafe { sys::cuEventCreate(e, 0) })?;
        }
        Ok(Self {
            dev,
            handle,
            stream,
            events,
            a: base,
            b: base + 2 * elems,
            c: base + 4 * elems,
            _mem: (res, map),
        })
    }

    fn enqueue(&self, bench: &Bench, iters: usize) -> Res<()> {
        bench.bind(self.dev)?;
        // SAFETY: a live event and stream of the current context.
        ok("cuEventRecord", unsafe {
            sys::cuEventRecord(self.events[0], self.stream)
        })?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        for _ in 0..iters {
            // SAFETY: A, B, C are live device buffers of GEMM_N² bf16 each on this device;
            // alpha/beta outlive the call (host scalars are read at enqueue time).
            blas_ok("cublasGemmEx", unsafe {
                blas::cublasGemmEx(
                    self.handle,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    blas::cublasOperation_t::CUBLAS_OP_N,
                    GEMM_N,
                    GEMM_N,
                    GEMM_N,
                    (&alpha as *const f32).cast(),
                    self.a as *const std::ffi::c_void,
                    blas::cudaDataType::CUDA_R_16BF,
                    GEMM_N,
                    self.b as *const std::ffi::c_void,
                    blas::cudaDataType::CUDA_R_16BF,
                    GEMM_N,
                    (&beta as *const f32).cast(),
                    self.c as *mut std::ffi::c_void,
                    blas::cudaDataType::CUDA_R_16BF,
                    GEMM_N,
                    blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            })?;
        }
        // SAFETY: as above.
        ok("cuEventRecord", unsafe {
            sys::cuEventRecord(self.events[1], self.stream)
        })
    }

    /// The device time of the last loop (call after `sync`).
    fn elapsed(&self) -> Res<Duration> {
        let mut ms = 0f32;
        // SAFETY: both events were recorded on this stream and have completed.
        ok("cuEventElapsedTime", unsafe {
            sys::cuEventElapsedTime_v2(&mut ms, self.events[0], self.events[1])
        })?;
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }

    fn sync(&self, bench: &Bench) -> Res<()> {
        bench.bind(self.dev)?;
        // SAFETY: a live stream.
        ok("cuStreamSynchronize", unsafe {
            sys::cuStreamSynchronize(self.stream)
        })
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: the handle and stream are live; the stream is idle after `sync`.
        unsafe {
            blas::cublasDestroy_v2(self.handle);
            sys::cuEventDestroy_v2(self.events[0]);
            sys::cuEventDestroy_v2(self.events[1]);
            sys::cuStreamDestroy_v2(self.stream);
        }
    }
}

/// Run `iters` GEMMs on both devices at once; each device's loop time, timed on the device.
fn gemm_pair(b: &Bench, g: &[Gemm; 2], iters: usize) -> Res<[Duration; 2]> {
    g[0].enqueue(b, iters)?;
    g[1].enqueue(b, iters)?;
    g[0].sync(b)?;
    g[1].sync(b)?;
    Ok([g[0].elapsed()?, g[1].elapsed()?])
}

fn interference(b: &Bench) -> Res<Value> {
    let g = [Gemm::new(b, 0)?, Gemm::new(b, 1)?];
    // Warm up (cuBLAS picks its kernel), then size the loop to about 300 ms.
    gemm_pair(b, &g, 3)?;
    let one = gemm_pair(b, &g, 5)?[1].as_secs_f64() / 5.0;
    let iters = ((0.3 / one).ceil() as usize).max(10);
    let flops = 2.0 * f64::from(GEMM_N).powi(3) * iters as f64;
    let mut alone = Vec::new();
    for _ in 0..3 {
        alone.push(gemm_pair(b, &g, iters)?);
    }
    let alone_s: [f64; 2] =
        [0, 1].map(|k| median(alone.iter().map(|t| t[k].as_secs_f64()).collect()));

    // Stream 1 GiB batches 0 -> 1, two in flight, logging (time, bytes) at each completion.
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let op = CopyOp::new(b.mem[0].src(0), b.mem[1].dst(0), GIB);
    let mut with = Vec::new();
    std::thread::scope(|scope| -> Res<()> {
        let (stop2, log2) = (stop.clone(), log.clone());
        let t = &b.t;
        let pump = scope.spawn(move || -> Result<(), String> {
            let mut q: std::collections::VecDeque<Ticket> = std::collections::VecDeque::new();
            let mut total = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                while q.len() < 2 {
                    q.push_back(t.submit(&[op]).map_err(|e| e.to_string())?);
                }
                if let Some(front) = q.pop_front() {
                    front.wait().map_err(|e| e.to_string())?;
                    total += GIB;
                    log2.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((Instant::now(), total));
                }
            }
            for t in q {
                t.wait().map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        std::thread::sleep(Duration::from_millis(20));
        for _ in 0..3 {
            let start = Instant::now();
            let times = gemm_pair(b, &g, iters)?;
            with.push((start, times));
        }
        stop.store(true, Ordering::Relaxed);
        pump.join().map_err(|_| "transfer thread panicked")??;
        Ok(())
    })?;
    let log = log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    // Transfer rate inside the GEMM windows: bytes completed between their starts and ends.
    let bytes_at = |t: Instant| {
        log.iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map_or(0, |x| x.1)
    };
    let (mut moved, mut window) = (0u64, 0f64);
    for (start, times) in &with {
        let end = *start + times[1];
        moved += bytes_at(end) - bytes_at(*start);
        window += times[1].as_secs_f64();
    }
    let with_s: [f64; 2] =
        [0, 1].map(|k| median(with.iter().map(|(_, t)| t[k].as_secs_f64()).collect()));
    let slow = [with_s[0] / alone_s[0], with_s[1] / alone_s[1]];
    let transfer = moved as f64 / window / 1e9;
    println!(
        "\ninterference: GEMM {:.0} TFLOP/s alone; slowdown x{:.3} (source), x{:.3} (destination); transfer {:.1} GB/s during the loop",
        flops / alone_s[0] / 1e12,
        slow[0],
        slow[1],
        transfer
    );
    Ok(json!({
        "gemm_slowdown": slow[0].max(slow[1]),
        "transfer_gbps": transfer,
        "gemm_slowdown_source": slow[0],
        "gemm_slowdown_destination": slow[1],
        "gemm_tflops_alone": flops / alone_s[0] / 1e12,
        "gemm_n": GEMM_N,
        "gemm_iters": iters,
    }))
}

/// A link model from measurements the planner runs below never repeat.
fn calibrate(b: &Bench) -> Res<(LinkModel, Value)> {
    let n = b.n;
    // Bandwidth of 0 -> 1 from one batch of 8 x 256 MiB; per-copy latency from one batch of
    // 256 x 2 MiB on the same link: its time beyond the bytes at that bandwidth, per copy.
    let big: Vec<CopyOp> = (0..8)
        .map(|k| {
            CopyOp::new(
                b.mem[0].src(k * 256 * MIB),
                b.mem[1].dst(k * 256 * MIB),
                256 * MIB,
            )
        })
        .collect();
    let bw01 = (2 * GIB) as f64 / b.run_batch(&big, 3)?.as_secs_f64();
    let small: Vec<CopyOp> = (0..256)
        .map(|k| {
            CopyOp::new(
                b.mem[0].src(k * 2 * MIB),
                b.mem[1].dst(k * 2 * MIB),
                2 * MIB,
            )
        })
        .collect();
    let t_small = b.run_batch(&small, 3)?.as_secs_f64();
    let latency_s = ((t_small - (512 * MIB) as f64 / bw01) / 256.0).max(0.0);

    let mut model = LinkModel::uniform(LinkSpec {
        bandwidth: bw01,
        latency: Duration::from_secs_f64(latency_s),
    });
    let mut pairs = Vec::new();
    for s in 0..n {
        for d in 0..n {
            let bytes = if s == d { GIB } else { 2 * GIB };
            let batch: Vec<CopyOp> = if s == d {
                vec![CopyOp::new(b.mem[s].src(0), b.mem[d].dst(0), bytes)]
            } else {
                (0..8)
                    .map(|k| {
                        CopyOp::new(
                            b.mem[s].src(k * 256 * MIB),
                            b.mem[d].dst(k * 256 * MIB),
                            256 * MIB,
                        )
                    })
                    .collect()
            };
            let t = b.run_batch(&batch, 3)?;
            let bw = bytes as f64 / t.as_secs_f64();
            let spec = LinkSpec {
                bandwidth: bw,
                latency: Duration::from_secs_f64(latency_s),
            };
            model = model.with_link(b.dev(s), b.dev(d), spec);
            pairs.push(json!({"src": s, "dst": d, "gbps": bw / 1e9}));
        }
    }
    let mut ports = Value::Null;
    if n >= 3 {
        // Ingress: devices 0 and 1 into 2 at once. Egress: device 0 into 1 and 2 at once.
        let into2 = [
            CopyOp::new(b.mem[0].src(0), b.mem[2].dst(0), GIB),
            CopyOp::new(b.mem[1].src(0), b.mem[2].dst(GIB), GIB),
        ];
        let from0 = [
            CopyOp::new(b.mem[0].src(0), b.mem[1].dst(0), GIB),
            CopyOp::new(b.mem[0].src(GIB), b.mem[2].dst(0), GIB),
        ];
        let ingress = 2.0 * GIB as f64 / b.run_batch(&into2, 3)?.as_secs_f64();
        let egress = 2.0 * GIB as f64 / b.run_batch(&from0, 3)?.as_secs_f64();
        model = model.with_default_ports(Ports { egress, ingress });
        ports = json!({"ingress_gbps": ingress / 1e9, "egress_gbps": egress / 1e9});
    }
    println!(
        "\ncalibration: per-copy latency {:.1} us; ports {}",
        latency_s * 1e6,
        if ports.is_null() {
            "unlimited (2 GPUs)".to_string()
        } else {
            ports.to_string()
        }
    );
    Ok((
        model,
        json!({"latency_us": latency_s * 1e6, "links": pairs, "ports": ports}),
    ))
}

fn planner_runs(b: &Bench, model: &LinkModel) -> Res<Vec<Value>> {
    let n = b.n;
    let planner = Planner::new(model.clone(), PlannerConfig::default())?;
    let mut cases: Vec<(String, Vec<Need>)> = Vec::new();
    let t256 = 256 * MIB;
    // Both directions at once.
    cases.push((
        "bidirectional 0<->1, 1 GiB each".into(),
        vec![
            Need::new(b.mem[1].dst(0), GIB, vec![b.mem[0].src(0)]),
            Need::new(b.mem[0].dst(0), GIB, vec![b.mem[1].src(0)]),
        ],
    ));
    // Device 1 already holds a copy locally: striped over the local copy and the peer.
    cases.push((
        "local+peer striped into 1, 2 GiB".into(),
        vec![Need::new(
            b.mem[1].dst(0),
            REGION,
            vec![b.mem[0].src(0), b.mem[1].src(0)],
        )],
    ));
    // Many small tensors (per-copy latency matters).
    cases.push((
        "64 x 8 MiB 0->1".into(),
        (0..64)
            .map(|k| {
                Need::new(
                    b.mem[1].dst(k * 8 * MIB),
                    8 * MIB,
                    vec![b.mem[0].src(k * 8 * MIB)],
                )
            })
            .collect(),
    ));
    if n >= 3 {
        let new = n - 1;
        let others: Vec<usize> = (0..new).collect();
        cases.push((
            format!(
                "scale-up: dev{new} gets 8 x 256 MiB from all {} others",
                others.len()
            ),
            (0..8)
                .map(|k| {
                    Need::new(
                        b.mem[new].dst(k * t256),
                        t256,
                        others.iter().map(|&o| b.mem[o].src(k * t256)).collect(),
                    )
                })
                .collect(),
        ));
        cases.push((
            format!("scale-up: dev{new} gets 8 x 256 MiB, two holders each"),
            (0..8)
                .map(|k| {
                    let h = [
                        others[k as usize % others.len()],
                        others[(k as usize + 1) % others.len()],
                    ];
                    Need::new(
                        b.mem[new].dst(k * t256),
                        t256,
                        h.iter().map(|&o| b.mem[o].src(k * t256)).collect(),
                    )
                })
                .collect(),
        ));
    }
    if n >= 4 {
        let (a, c) = (n - 2, n - 1);
        let holders: Vec<usize> = (0..n - 2).collect();
        let mut needs = Vec::new();
        for (dst, base) in [(a, 0u64), (c, 4)] {
            for k in 0..4u64 {
                needs.push(Need::new(
                    b.mem[dst].dst(k * t256),
                    t256,
                    holders
                        .iter()
                        .map(|&o| b.mem[o].src((base + k) * t256))
                        .collect(),
                ));
            }
        }
        cases.push((
            format!("two new devices dev{a}, dev{c}: 4 x 256 MiB each"),
            needs,
        ));
    }
    println!(
        "\n{:<58} {:>12} {:>12} {:>8}",
        "plan", "predicted", "measured", "error"
    );
    let mut rows = Vec::new();
    for (name, needs) in cases {
        let plan: Plan = planner.plan(&needs)?;
        let batch = plan.batch();
        b.run_batch(&batch, 1)?; // warm-up
        let measured = b.run_batch(&batch, TRIALS)?;
        let predicted_ms = plan.predicted_secs() * 1e3;
        let measured_ms = measured.as_secs_f64() * 1e3;
        let links: Vec<Value> = plan
            .link_loads()
            .iter()
            .map(|(l, load): (&Link, _)| json!({"link": l.to_string(), "bytes": load.bytes, "copies": load.ops}))
            .collect();
        println!(
            "{:<58} {:>9.3} ms {:>9.3} ms {:>+7.1}%",
            name,
            predicted_ms,
            measured_ms,
            100.0 * (measured_ms - predicted_ms) / predicted_ms
        );
        rows.push(json!({
            "name": name,
            "predicted_ms": predicted_ms,
            "measured_ms": measured_ms,
            "bound_ms": plan.bound_secs() * 1e3,
            "bytes": plan.total_bytes(),
            "links": links,
        }));
    }
    Ok(rows)
}
