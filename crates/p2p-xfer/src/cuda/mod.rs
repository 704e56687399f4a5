//! The CUDA transport (feature `cuda`): peer copies on copy-engine streams, alongside serving.
//!
//! - **One stream per (source, destination) pair**, created in the source device's primary
//!   context with the *lowest* priority, so compute kernels go first. Copies are pushed: the
//!   source's copy engine writes into the destination.
//! - **Chunks.** Every copy is cut into chunks of [`CudaTransportConfig::chunk_bytes`] (64 MiB by
//!   default). A pump thread keeps at most [`CudaTransportConfig::max_chunks_in_flight`] chunks
//!   enqueued per link and enqueues more as they land, so a cancelled batch stops after the
//!   chunks already handed to the copy engine, and the link never idles while work is queued.
//! - **Completion.** Each chunk is bracketed by two timing events. The pump polls them to mark
//!   parts done on the ticket (host side) and to time each link (stats are copy-engine busy time).
//! - **Device-side waits.** After the last chunk of a batch on a link, the link's stream writes
//!   the batch's sequence number into a fence word in pinned host memory
//!   (`cuStreamWriteValue32`). [`Ticket::wait_on_stream`] makes a compute stream wait
//!   (`cuStreamWaitValue32`, "greater or equal") for every link feeding a destination, so the
//!   serving path never blocks the host, and the wait is valid even before the pump has enqueued
//!   the last chunk. A cancelled or failed batch still writes its fences (after whatever it did
//!   enqueue), so a waiting stream never hangs; check the ticket on the host before using data.
//!
//! Copies use `cuMemcpyPeerAsync` between devices and `cuMemcpyDtoDAsync` within one. If the
//! driver refuses the peer call for a link, that link switches to `cuMemcpyDtoDAsync` (valid in
//! the unified address space), and [`CudaTransport::peer_call_refused`] says so.
//!
//! # The caller's contract
//! Besides the crate-wide one (ranges stay mapped and untouched until the ticket finishes):
//! destination memory must be accessible from the source device (hbm-vmm's
//! `Reservation::set_access` with the source listed). Submit checks this with `cuMemGetAccess`
//! where the driver can answer (VMM memory) and refuses the batch otherwise.
//!
//! # What it never does
//! It allocates no device memory. Its only allocation is one page of pinned host memory for the
//! fence words; that page is deliberately never freed, because a compute stream may still be
//! waiting on a fence when the transport is dropped.

use crate::copy::{validate_batch, CopyOp, Link, Location};
use crate::error::{CopyFault, SubmitError};
use crate::stats::{LinkStats, StatsRecorder};
use crate::ticket::{Ticket, TicketCore};
use crate::Transport;
use cudarc::driver::sys::{
    self, CUcontext, CUdeviceptr, CUevent, CUevent_flags_enum as EventFlags, CUresult, CUstream,
    CUstreamWaitValue_flags_enum as WaitFlags, CUstreamWriteValue_flags_enum as WriteFlags,
    CUstream_flags_enum as StreamFlags,
};
use hbm_vmm::cuda::CudaBackend;
use hbm_vmm::{DeviceId, Vmm, VmmError};
use std::collections::{BTreeMap, VecDeque};
use std::ffi::c_void;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// What can go wrong setting up or driving the CUDA transport (outside of a batch).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// The memory manager refused (for example: no driver, no device).
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A driver call failed.
    #[error("driver call {call} failed with code {code}")]
    Driver {
        /// The driver function.
        call: &'static str,
        /// Its result code.
        code: i32,
    },
    /// The device is not one this transport drives.
    #[error("{device} is not a device of this transport ({count} devices)")]
    NoSuchDevice {
        /// The device asked for.
        device: DeviceId,
        /// How many devices the transport drives.
        count: usize,
    },
    /// The ticket came from another transport, so it has no device-side fences.
    #[error("this ticket was not issued by a CUDA transport; wait on it on the host instead")]
    NotACudaTicket,
    /// A configuration value out of range.
    #[error("bad CUDA transport configuration: {0}")]
    BadConfig(&'static str),
}

fn check(call: &'static str, r: CUresult) -> Result<(), CudaError> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Driver {
            call,
            code: r as i32,
        })
    }
}

fn fault(call: &'static str, r: CUresult) -> CopyFault {
    CopyFault::Driver {
        call,
        code: r as i32,
    }
}

/// CUDA transport settings.
#[derive(Clone, Debug)]
pub struct CudaTransportConfig {
    /// Copies are cut into chunks of at most this many bytes (64 MiB by default): the unit that
    /// compute interleaves with, and the unit of cancellation.
    pub chunk_bytes: u64,
    /// At most this many chunks are enqueued per link at once (8 by default). At least 2 keeps
    /// the copy engine busy while the pump refills.
    pub max_chunks_in_flight: usize,
    /// How often the pump looks for landed chunks while work is in flight (20 µs by default).
    pub poll_interval: Duration,
    /// Create the copy streams with the lowest priority (the default) or the default priority.
    pub low_priority: bool,
}

impl Default for CudaTransportConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: 64 << 20,
            max_chunks_in_flight: 8,
            poll_interval: Duration::from_micros(20),
            low_priority: true,
        }
    }
}

/// A driver handle (context, stream, event, pinned pointer) that is moved between threads.
#[derive(Clone, Copy, Debug)]
struct Raw<T>(T);
// SAFETY: CUDA handles are plain identifiers that any thread may pass to the driver (with the
// right context current, which every user here makes sure of); we never dereference them except
// the fence page, whose words are only written through volatile stores or by the device.
unsafe impl<T> Send for Raw<T> {}
// SAFETY: as above; sharing a handle only lets other threads pass it to the driver.
unsafe impl<T> Sync for Raw<T> {}

/// The pinned host page holding one fence word per link (`src * n + dst`).
#[derive(Clone, Copy, Debug)]
struct FencePage {
    host: Raw<*mut u32>,
    dev: CUdeviceptr,
}

impl FencePage {
    fn word_dev(&self, index: usize) -> CUdeviceptr {
        self.dev + 4 * index as u64
    }

    /// Write a fence word from the host (used only when the device-side write is refused).
    fn host_write(&self, index: usize, value: u32) {
        // SAFETY: the page holds `n * n` words, `index < n * n` (a link index), and is never
        // freed. Volatile, because the device reads the word behind the compiler's back.
        unsafe { self.host.0.add(index).write_volatile(value) }
    }
}

/// The device-side fences of one ticket: `(destination, fence word address, sequence)`.
#[derive(Debug)]
struct CudaFences {
    fences: Vec<(DeviceId, CUdeviceptr, u32)>,
}

impl Ticket {
    /// Make `stream` wait, on the device, until every copy of this batch into `dst` has landed
    /// (or the batch was cancelled or failed: check [`Ticket::wait`]/[`Ticket::poll`] on the
    /// host before trusting the data). The host does not block. A batch with no copy into `dst`
    /// adds no wait.
    pub fn wait_on_stream(
        &self,
        dst: DeviceId,
        stream: &cudarc::driver::CudaStream,
    ) -> Result<(), CudaError> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| CudaError::Driver {
                call: "cuCtxSetCurrent",
                code: e.0 as i32,
            })?;
        // SAFETY: `stream` is a live cudarc stream (borrowed for the call) and its context is now
        // current on this thread.
        unsafe { self.wait_on_raw_stream(dst, stream.cu_stream()) }
    }

    /// [`wait_on_stream`](Ticket::wait_on_stream) for a raw driver stream.
    ///
    /// # Safety
    /// `stream` must be a live stream whose context is current on the calling thread.
    pub unsafe fn wait_on_raw_stream(
        &self,
        dst: DeviceId,
        stream: CUstream,
    ) -> Result<(), CudaError> {
        let fences = self
            .ext()
            .and_then(|e| e.downcast_ref::<CudaFences>())
            .ok_or(CudaError::NotACudaTicket)?;
        for &(d, word, seq) in &fences.fences {
            if d != dst {
                continue;
            }
            // SAFETY: `word` is in the transport's pinned, device-mapped fence page, which is
            // never freed; the caller guarantees `stream` is live with its context current.
            check("cuStreamWaitValue32", unsafe {
                sys::cuStreamWaitValue32_v2(
                    stream,
                    word,
                    seq,
                    WaitFlags::CU_STREAM_WAIT_VALUE_GEQ as u32,
                )
            })?;
        }
        Ok(())
    }
}

/// One chunk of one copy.
struct Chunk {
    ticket: Arc<TicketCore>,
    copy: usize,
    src: CUdeviceptr,
    dst: CUdeviceptr,
    len: u64,
    last_of_copy: bool,
    /// The batch's fence on this link, written after this chunk (its last on the link).
    fence: Option<u32>,
}

struct InFlight {
    chunk: Chunk,
    start: Raw<CUevent>,
    end: Raw<CUevent>,
    /// How to resolve the copy once this chunk has landed, when a later chunk of the same copy
    /// was skipped or failed meanwhile. (Resolving it earlier would let the ticket finish while
    /// this chunk is still writing the destination.)
    then: Option<Resolution>,
}

enum Resolution {
    Skip,
    Fail(CopyFault),
}

/// What `submit` hands the pump: one batch's chunks per link.
struct NewBatch {
    segments: Vec<(usize, Vec<Chunk>)>,
}

struct Inbox {
    batches: VecDeque<NewBatch>,
    /// The last sequence number handed out per link.
    seq: Vec<u32>,
    shutdown: bool,
}

struct Shared {
    inbox: Mutex<Inbox>,
    wake: Condvar,
}

/// Per-link state owned by the pump thread.
struct LinkState {
    link: Link,
    index: usize,
    stream: Raw<CUstream>,
    src_ctx: Raw<CUcontext>,
    dst_ctx: Raw<CUcontext>,
    pending: VecDeque<Chunk>,
    in_flight: VecDeque<InFlight>,
    free_events: Vec<(Raw<CUevent>, Raw<CUevent>)>,
}

struct Pump {
    links: Vec<LinkState>,
    fences: FencePage,
    stats: Arc<StatsRecorder>,
    dtod: Arc<Vec<AtomicBool>>,
    window: usize,
    poll: Duration,
}

/// Peer copies on low-priority copy streams; see the module docs.
pub struct CudaTransport {
    vmm: Vmm<CudaBackend>,
    n: usize,
    ctxs: Vec<Raw<CUcontext>>,
    chunk_bytes: u64,
    fences: FencePage,
    shared: Arc<Shared>,
    stats: Arc<StatsRecorder>,
    dtod: Arc<Vec<AtomicBool>>,
    pump: Option<JoinHandle<()>>,
}

impl fmt::Debug for CudaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaTransport")
            .field("devices", &self.n)
            .field("chunk_bytes", &self.chunk_bytes)
            .finish_non_exhaustive()
    }
}

impl CudaTransport {
    /// A transport over every device of `vmm`: creates the copy streams (one per ordered device
    /// pair, including each device with itself) and starts the pump thread.
    pub fn new(vmm: Vmm<CudaBackend>, config: CudaTransportConfig) -> Result<Self, CudaError> {
        if config.chunk_bytes == 0 {
            return Err(CudaError::BadConfig("chunk_bytes must be at least 1"));
        }
        if config.max_chunks_in_flight == 0 {
            return Err(CudaError::BadConfig(
                "max_chunks_in_flight must be at least 1",
            ));
        }
        let n = vmm.device_count();
        let ctxs: Vec<Raw<CUcontext>> = (0..n)
            .map(|d| vmm.backend().context(DeviceId(d as u32)).map(Raw))
            .collect::<Result<_, _>>()?;

        let fences = alloc_fence_page(&vmm, n)?;
        let mut links = Vec::with_capacity(n * n);
        let made = (|| {
            for s in 0..n {
                vmm.backend().bind(DeviceId(s as u32))?;
                let (mut least, mut greatest) = (0, 0);
                // SAFETY: both out-pointers are valid for the call; the source's context is current.
                check("cuCtxGetStreamPriorityRange", unsafe {
                    sys::cuCtxGetStreamPriorityRange(&mut least, &mut greatest)
                })?;
                let priority = if config.low_priority { least } else { 0 };
                for d in 0..n {
                    let mut stream: CUstream = std::ptr::null_mut();
                    // SAFETY: `stream` is a valid out-pointer; the source's context is current.
                    check("cuStreamCreateWithPriority", unsafe {
                        sys::cuStreamCreateWithPriority(
                            &mut stream,
                            StreamFlags::CU_STREAM_NON_BLOCKING as u32,
                            priority,
                        )
                    })?;
                    links.push(LinkState {
                        link: Link::new(DeviceId(s as u32), DeviceId(d as u32)),
                        index: s * n + d,
                        stream: Raw(stream),
                        src_ctx: ctxs[s],
                        dst_ctx: ctxs[d],
                        pending: VecDeque::new(),
                        in_flight: VecDeque::new(),
                        free_events: Vec::new(),
                    });
                }
            }
            Ok::<(), CudaError>(())
        })();
        if let Err(e) = made {
            for l in &links {
                // SAFETY: each stream was created above in its source's context and has no work.
                unsafe {
                    let _ = sys::cuCtxSetCurrent(l.src_ctx.0);
                    let _ = sys::cuStreamDestroy_v2(l.stream.0);
                }
            }
            return Err(e);
        }

        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox {
                batches: VecDeque::new(),
                seq: vec![0; n * n],
                shutdown: false,
            }),
            wake: Condvar::new(),
        });
        let stats = Arc::new(StatsRecorder::default());
        let dtod = Arc::new(
            (0..n * n)
                .map(|_| AtomicBool::new(false))
                .collect::<Vec<_>>(),
        );
        let pump = Pump {
            links,
            fences,
            stats: stats.clone(),
            dtod: dtod.clone(),
            window: config.max_chunks_in_flight,
            poll: config.poll_interval,
        };
        let sh = shared.clone();
        let handle = std::thread::Builder::new()
            .name("p2p-xfer-cuda-pump".into())
            .spawn(move || pump.run(&sh))
            .map_err(|_| CudaError::BadConfig("could not start the pump thread"))?;
        Ok(Self {
            vmm,
            n,
            ctxs,
            chunk_bytes: config.chunk_bytes,
            fences,
            shared,
            stats,
            dtod,
            pump: Some(handle),
        })
    }

    /// The memory manager whose mappings this transport copies between.
    pub fn vmm(&self) -> &Vmm<CudaBackend> {
        &self.vmm
    }

    /// Whether the driver refused `cuMemcpyPeerAsync` on `link`, which then uses
    /// `cuMemcpyDtoDAsync` instead.
    pub fn peer_call_refused(&self, link: Link) -> bool {
        let (s, d) = (link.src.index(), link.dst.index());
        s < self.n && d < self.n && self.dtod[s * self.n + d].load(Ordering::Relaxed)
    }

    /// Refuse copies whose destination the source device cannot write, where the driver can tell
    /// (VMM memory). Other memory (e.g. `cuMemAlloc`) is left to the driver.
    fn check_access(&self, batch: &[CopyOp]) -> Result<(), SubmitError> {
        for (index, op) in batch.iter().enumerate() {
            if op.src.device == op.dst.device {
                continue;
            }
            let src = op.src.device.index();
            // SAFETY: the context is a primary context retained by the backend, which `self.vmm`
            // keeps alive.
            let r = unsafe { sys::cuCtxSetCurrent(self.ctxs[src].0) };
            if r != CUresult::CUDA_SUCCESS {
                return Err(SubmitError::Driver {
                    call: "cuCtxSetCurrent",
                    code: r as i32,
                });
            }
            // The driver knows GPUs, not logical devices: ask about the source's GPU (logical
            // devices of one GPU share its permissions).
            let ordinal =
                self.vmm
                    .backend()
                    .ordinal(op.src.device)
                    .map_err(|_| SubmitError::Driver {
                        call: "ordinal",
                        code: 0,
                    })?;
            for at in [op.dst.addr, op.dst.addr + op.len - 1] {
                let location = sys::CUmemLocation {
                    type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                    id: ordinal as i32,
                };
                let mut flags: std::ffi::c_ulonglong = 0;
                // SAFETY: both pointers are valid for the call; `at` is an address the VMM just
                // confirmed mapped.
                let r = unsafe { sys::cuMemGetAccess(&mut flags, &location, at) };
                let read_write = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE
                    as std::ffi::c_ulonglong;
                if r == CUresult::CUDA_SUCCESS && flags != read_write {
                    return Err(SubmitError::NoAccess {
                        index,
                        device: op.src.device,
                        at: Location::new(op.dst.device, at),
                    });
                }
            }
        }
        Ok(())
    }
}

fn alloc_fence_page(vmm: &Vmm<CudaBackend>, n: usize) -> Result<FencePage, CudaError> {
    vmm.backend().bind(DeviceId(0))?;
    let bytes = (4 * n * n).max(4096);
    let mut host: *mut c_void = std::ptr::null_mut();
    // SAFETY: `host` is a valid out-pointer; a context is current.
    check("cuMemHostAlloc", unsafe {
        sys::cuMemHostAlloc(
            &mut host,
            bytes,
            sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP,
        )
    })?;
    // SAFETY: `host` points to `bytes` bytes of pinned memory that we own; zero them (the
    // sequence numbers start at 1).
    unsafe { std::ptr::write_bytes(host.cast::<u8>(), 0, bytes) };
    let mut dev: CUdeviceptr = 0;
    // SAFETY: `dev` is a valid out-pointer and `host` a device-mapped pinned allocation.
    check("cuMemHostGetDevicePointer", unsafe {
        sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0)
    })?;
    Ok(FencePage {
        host: Raw(host.cast()),
        dev,
    })
}

impl Transport for CudaTransport {
    fn submit(&self, batch: &[CopyOp]) -> Result<Ticket, SubmitError> {
        validate_batch(&self.vmm, batch)?;
        for (index, op) in batch.iter().enumerate() {
            for device in [op.src.device, op.dst.device] {
                if device.index() >= self.n {
                    return Err(SubmitError::UnknownDevice { index, device });
                }
            }
        }
        self.check_access(batch)?;

        let part_lens: Vec<u64> = batch
            .iter()
            .map(|op| self.chunk_bytes.max(op.len.div_ceil(u64::from(u32::MAX))))
            .collect();
        let parts: Vec<u32> = batch
            .iter()
            .zip(&part_lens)
            .map(|(op, &pl)| u32::try_from(op.len.div_ceil(pl)).unwrap_or(u32::MAX))
            .collect();
        let bytes = batch.iter().map(|op| op.len).sum();
        let core = Arc::new(TicketCore::new(&parts, bytes));
        let mut by_link: BTreeMap<usize, Vec<Chunk>> = BTreeMap::new();
        for (copy, op) in batch.iter().enumerate() {
            let index = op.src.device.index() * self.n + op.dst.device.index();
            let mut off = 0;
            while off < op.len {
                let len = part_lens[copy].min(op.len - off);
                by_link.entry(index).or_default().push(Chunk {
                    ticket: core.clone(),
                    copy,
                    src: op.src.addr + off,
                    dst: op.dst.addr + off,
                    len,
                    last_of_copy: off + len == op.len,
                    fence: None,
                });
                off += len;
            }
        }

        let mut inbox = self
            .shared
            .inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if inbox.shutdown {
            return Err(SubmitError::ShutDown);
        }
        let mut fences = Vec::with_capacity(by_link.len());
        let mut segments = Vec::with_capacity(by_link.len());
        for (index, mut chunks) in by_link {
            inbox.seq[index] = inbox.seq[index].wrapping_add(1).max(1);
            let seq = inbox.seq[index];
            if let Some(last) = chunks.last_mut() {
                last.fence = Some(seq);
            }
            fences.push((
                DeviceId((index % self.n) as u32),
                self.fences.word_dev(index),
                seq,
            ));
            segments.push((index, chunks));
        }
        inbox.batches.push_back(NewBatch { segments });
        drop(inbox);
        self.shared.wake.notify_one();
        Ok(Ticket::new(core, Some(Arc::new(CudaFences { fences }))))
    }

    fn stats(&self) -> Vec<LinkStats> {
        self.stats.snapshot()
    }

    fn name(&self) -> &'static str {
        "cuda"
    }
}

impl Drop for CudaTransport {
    fn drop(&mut self) {
        self.shared
            .inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .shutdown = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.pump.take() {
            // The pump resolves every ticket, writes every fence and destroys its streams and
            // events before it returns; a panic there is not ours to raise in Drop.
            let _ = h.join();
        }
    }
}

impl Pump {
    fn run(mut self, shared: &Shared) {
        loop {
            let (new, shutdown) = {
                let mut inbox = shared.inbox.lock().unwrap_or_else(PoisonError::into_inner);
                (std::mem::take(&mut inbox.batches), inbox.shutdown)
            };
            for batch in new {
                for (index, chunks) in batch.segments {
                    self.links[index].pending.extend(chunks);
                }
            }
            if shutdown {
                break;
            }
            let mut busy = false;
            for i in 0..self.links.len() {
                if self.links[i].pending.is_empty() && self.links[i].in_flight.is_empty() {
                    continue;
                }
                self.retire(i);
                self.issue(i);
                let l = &self.links[i];
                busy |= !l.pending.is_empty() || !l.in_flight.is_empty();
            }
            let inbox = shared.inbox.lock().unwrap_or_else(PoisonError::into_inner);
            if inbox.batches.is_empty() && !inbox.shutdown {
                // Idle: sleep until a submit. Busy: look again after the poll interval (or sooner
                // if a submit arrives).
                let timeout = if busy {
                    self.poll
                } else {
                    Duration::from_secs(3600)
                };
                let _ = shared
                    .wake
                    .wait_timeout(inbox, timeout)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        self.shut_down();
    }

    /// Mark every landed chunk of link `i` done, in stream order.
    fn retire(&mut self, i: usize) {
        let l = &mut self.links[i];
        // SAFETY: the source context is retained by the backend for the transport's lifetime.
        unsafe { sys::cuCtxSetCurrent(l.src_ctx.0) };
        while let Some(f) = l.in_flight.front() {
            // SAFETY: `end` is a live event recorded on this link's stream.
            let r = unsafe { sys::cuEventQuery(f.end.0) };
            if r == CUresult::CUDA_ERROR_NOT_READY {
                break;
            }
            let Some(f) = l.in_flight.pop_front() else {
                break;
            };
            let c = f.chunk;
            if r == CUresult::CUDA_SUCCESS {
                let mut ms = 0f32;
                // SAFETY: both events were recorded on this stream, in this order, and have
                // completed; `ms` is a valid out-pointer.
                let t = unsafe { sys::cuEventElapsedTime_v2(&mut ms, f.start.0, f.end.0) };
                let busy = if t == CUresult::CUDA_SUCCESS {
                    Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3)
                } else {
                    Duration::ZERO
                };
                // Stats first, so they include the bytes by the time the ticket reports them.
                self.stats
                    .add(l.link, c.len, u64::from(c.last_of_copy), busy);
                c.ticket.part_done(c.copy);
            } else {
                c.ticket.fail(c.copy, fault("cuEventQuery", r));
            }
            match f.then {
                Some(Resolution::Skip) => c.ticket.skip(c.copy),
                Some(Resolution::Fail(why)) => c.ticket.fail(c.copy, why),
                None => {}
            }
            l.free_events.push((f.start, f.end));
        }
    }

    /// Enqueue pending chunks of link `i` up to the window.
    fn issue(&mut self, i: usize) {
        while self.links[i].in_flight.len() < self.window {
            let Some(c) = self.links[i].pending.pop_front() else {
                return;
            };
            if !c.ticket.should_run(c.copy) {
                // Cancelled (or the copy already failed): skip, but keep the fence promise.
                self.resolve(i, &c, Resolution::Skip);
                if let Some(seq) = c.fence {
                    self.write_fence(i, seq);
                }
                continue;
            }
            let l = &mut self.links[i];
            // SAFETY: the source context is retained by the backend for the transport's lifetime.
            unsafe { sys::cuCtxSetCurrent(l.src_ctx.0) };
            let (start, end) = match l.free_events.pop() {
                Some(pair) => pair,
                None => match (new_event(), new_event()) {
                    (Ok(a), Ok(b)) => (a, b),
                    (a, b) => {
                        for e in [a, b].into_iter().flatten() {
                            // SAFETY: a live event we just created and never recorded.
                            unsafe { sys::cuEventDestroy_v2(e.0) };
                        }
                        let why = fault("cuEventCreate", CUresult::CUDA_ERROR_OUT_OF_MEMORY);
                        self.resolve(i, &c, Resolution::Fail(why));
                        if let Some(seq) = c.fence {
                            self.write_fence(i, seq);
                        }
                        continue;
                    }
                },
            };
            let stream = l.stream.0;
            let n = c.len as usize;
            // SAFETY: the events are live and belong to the current (source) context; `stream` is
            // this link's stream. The copy's ranges were checked mapped at submit and the caller
            // keeps them mapped until the ticket finishes; the destination is accessible from the
            // source device (checked at submit where the driver can tell).
            let r = unsafe {
                sys::cuEventRecord(start.0, stream);
                if l.link.is_local() || self.dtod[l.index].load(Ordering::Relaxed) {
                    sys::cuMemcpyDtoDAsync_v2(c.dst, c.src, n, stream)
                } else {
                    let r =
                        sys::cuMemcpyPeerAsync(c.dst, l.dst_ctx.0, c.src, l.src_ctx.0, n, stream);
                    if r == CUresult::CUDA_SUCCESS {
                        r
                    } else {
                        let again = sys::cuMemcpyDtoDAsync_v2(c.dst, c.src, n, stream);
                        if again == CUresult::CUDA_SUCCESS {
                            self.dtod[l.index].store(true, Ordering::Relaxed);
                        }
                        again
                    }
                }
            };
            if r != CUresult::CUDA_SUCCESS {
                l.free_events.push((start, end));
                self.resolve(i, &c, Resolution::Fail(fault("cuMemcpyPeerAsync", r)));
                if let Some(seq) = c.fence {
                    self.write_fence(i, seq);
                }
                continue;
            }
            // SAFETY: as above.
            let r = unsafe { sys::cuEventRecord(end.0, stream) };
            if r != CUresult::CUDA_SUCCESS {
                // Without the end event we cannot see this chunk land; wait for the stream.
                // SAFETY: `stream` is this link's live stream.
                let s = unsafe { sys::cuStreamSynchronize(stream) };
                l.free_events.push((start, end));
                // The stream is drained, so nothing of this copy is in flight any more.
                self.retire(i);
                let why = if s == CUresult::CUDA_SUCCESS {
                    fault("cuEventRecord", r)
                } else {
                    fault("cuStreamSynchronize", s)
                };
                self.resolve(i, &c, Resolution::Fail(why));
                if let Some(seq) = c.fence {
                    self.write_fence(i, seq);
                }
                continue;
            }
            let fence = c.fence;
            l.in_flight.push_back(InFlight {
                chunk: c,
                start,
                end,
                then: None,
            });
            if let Some(seq) = fence {
                self.write_fence(i, seq);
            }
        }
    }

    /// Resolve the copy of chunk `c` (which was not enqueued) as skipped or failed: at once, or,
    /// if an earlier chunk of the same copy is still in flight on link `i`, when that lands.
    fn resolve(&mut self, i: usize, c: &Chunk, how: Resolution) {
        // Chunks of one copy are consecutive on one link, so only the newest in-flight chunk
        // can belong to it.
        if let Some(back) = self.links[i].in_flight.back_mut() {
            if Arc::ptr_eq(&back.chunk.ticket, &c.ticket) && back.chunk.copy == c.copy {
                if back.then.is_none() {
                    back.then = Some(how);
                }
                return;
            }
        }
        match how {
            Resolution::Skip => c.ticket.skip(c.copy),
            Resolution::Fail(why) => c.ticket.fail(c.copy, why),
        }
    }

    /// Write `seq` into link `i`'s fence word after everything enqueued on its stream.
    fn write_fence(&mut self, i: usize, seq: u32) {
        let l = &self.links[i];
        // SAFETY: the source context is retained; the fence word lies in the never-freed pinned
        // page; `stream` is this link's live stream.
        let r = unsafe {
            sys::cuCtxSetCurrent(l.src_ctx.0);
            sys::cuStreamWriteValue32_v2(
                l.stream.0,
                self.fences.word_dev(l.index),
                seq,
                WriteFlags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
            )
        };
        if r != CUresult::CUDA_SUCCESS {
            // The device-side write was refused: let the stream drain, then write from the host,
            // which keeps the promise (later than it could have been).
            // SAFETY: `stream` is this link's live stream.
            unsafe { sys::cuStreamSynchronize(l.stream.0) };
            self.fences.host_write(l.index, seq);
        }
    }

    /// Resolve everything still queued as shut down, let in-flight chunks land, and destroy the
    /// streams and events.
    fn shut_down(mut self) {
        for i in 0..self.links.len() {
            let l = &self.links[i];
            // SAFETY: the context is retained; the stream is live. Synchronising lets the
            // in-flight chunks land before `retire` reads their events, and before any copy is
            // resolved, so no ticket finishes while its bytes are still moving.
            unsafe {
                sys::cuCtxSetCurrent(l.src_ctx.0);
                sys::cuStreamSynchronize(l.stream.0);
            }
            self.retire(i);
            let l = &mut self.links[i];
            // Anything `retire` could not read (a failed event) is resolved here.
            for f in l.in_flight.drain(..) {
                f.chunk.ticket.shut_down(f.chunk.copy);
                l.free_events.push((f.start, f.end));
            }
            while let Some(c) = self.links[i].pending.pop_front() {
                c.ticket.shut_down(c.copy);
                if let Some(seq) = c.fence {
                    self.write_fence(i, seq);
                }
            }
            let l = &mut self.links[i];
            // SAFETY: the fences just written are stream work; let them run before teardown.
            unsafe { sys::cuStreamSynchronize(l.stream.0) };
            for (a, b) in l.free_events.drain(..) {
                // SAFETY: the events are live and no longer recorded on any running work.
                unsafe {
                    sys::cuEventDestroy_v2(a.0);
                    sys::cuEventDestroy_v2(b.0);
                }
            }
            // SAFETY: the stream is drained and nothing else uses it.
            unsafe { sys::cuStreamDestroy_v2(l.stream.0) };
        }
    }
}

fn new_event() -> Result<Raw<CUevent>, CudaError> {
    let mut e: CUevent = std::ptr::null_mut();
    // SAFETY: `e` is a valid out-pointer; the caller made a context current.
    check("cuEventCreate", unsafe {
        sys::cuEventCreate(&mut e, EventFlags::CU_EVENT_DEFAULT as u32)
    })?;
    Ok(Raw(e))
}
