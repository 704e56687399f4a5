//! The host transport: a pool of worker threads that `memcpy` between host-backend mappings, with
//! optional pacing by a [`LinkModel`] so a run on the host takes as long as it would on NVLink or
//! PCIe.
//!
//! Every copy is split into parts of [`HostTransportConfig::chunk_bytes`]. Parts queue on one lane
//! per [`Link`] (in submission order, one at a time per link, like a copy stream per device pair);
//! links run in parallel up to the number of workers. Before each part a worker checks that the
//! ticket was not cancelled and that both ranges are still mapped.
//!
//! With a link model, each part also reserves time on its link and on the sender's egress and the
//! receiver's ingress ports (each a virtual clock); the worker copies, then sleeps until the latest
//! of those reservations ends. Several links through one port thus share its rate, as they would on
//! a switch.

use crate::copy::{validate_batch, AddressSpace, CopyOp, Link};
use crate::error::{CopyFault, Side, SubmitError};
use crate::lanes::Lanes;
use crate::link::LinkModel;
use crate::loom::{lock, Arc, Mutex};
use crate::stats::{LinkStats, StatsRecorder};
use crate::ticket::{Ticket, TicketCore};
use crate::Transport;
use hbm_vmm::host::HostBackend;
use hbm_vmm::{DeviceId, Vmm};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// How far behind real time a link's virtual clock may fall and still count as busy.
const PACING_SLACK: Duration = Duration::from_millis(2);

/// Host transport settings.
#[derive(Clone, Debug)]
pub struct HostTransportConfig {
    /// Worker threads; at most this many links move bytes at once. At least 1.
    pub workers: usize,
    /// Copies are split into parts of at most this many bytes: the unit of cancellation and of
    /// pacing. At least 1.
    pub chunk_bytes: u64,
    /// Pace copies to this model's bandwidth and latency; `None` copies at memory speed.
    pub link_model: Option<LinkModel>,
}

impl Default for HostTransportConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            chunk_bytes: 4 << 20,
            link_model: None,
        }
    }
}

/// One part of one copy.
struct Part {
    ticket: Arc<TicketCore>,
    copy: usize,
    link: Link,
    src: u64,
    dst: u64,
    len: u64,
    /// The first part of its copy (pays the link latency when paced).
    first: bool,
    /// The last part of its copy (landing it completes the copy).
    last: bool,
}

/// Virtual clocks for links and ports (see the module docs).
#[derive(Debug, Default)]
struct Clocks {
    links: BTreeMap<Link, Instant>,
    egress: BTreeMap<DeviceId, Instant>,
    ingress: BTreeMap<DeviceId, Instant>,
}

#[derive(Debug)]
struct Pacer {
    model: LinkModel,
    clocks: Mutex<Clocks>,
}

impl Pacer {
    /// Reserve `len` bytes on `link` starting no earlier than `now`; returns when they would land.
    fn reserve(&self, link: Link, len: u64, first: bool, now: Instant) -> Instant {
        let spec = self.model.link(link);
        let secs =
            |rate: f64| Duration::try_from_secs_f64(len as f64 / rate).unwrap_or(Duration::ZERO);
        let mut c = lock(&self.clocks);
        // A clock that fell behind `now` by less than the slack belongs to a link that stayed
        // busy and whose worker merely woke late: continue from the clock, so scheduler delays
        // are caught up instead of stretching the emulated time. Further behind, the link idled.
        let bump = |clock: &mut Instant, d: Duration| {
            let start = if now.saturating_duration_since(*clock) > PACING_SLACK {
                now
            } else {
                *clock
            };
            *clock = start + d;
            *clock
        };
        let latency = if first { spec.latency } else { Duration::ZERO };
        let mut done = bump(
            c.links.entry(link).or_insert(now),
            latency + secs(spec.bandwidth),
        );
        if !link.is_local() {
            let ports_src = self.model.ports(link.src);
            let ports_dst = self.model.ports(link.dst);
            done = done.max(bump(
                c.egress.entry(link.src).or_insert(now),
                secs(ports_src.egress),
            ));
            done = done.max(bump(
                c.ingress.entry(link.dst).or_insert(now),
                secs(ports_dst.ingress),
            ));
        }
        done
    }
}

struct Inner {
    vmm: Vmm<HostBackend>,
    pacer: Option<Pacer>,
    stats: StatsRecorder,
}

impl Inner {
    fn run(&self, part: Part) {
        let Part {
            ticket,
            copy,
            link,
            src,
            dst,
            len,
            first,
            last,
        } = part;
        if !ticket.should_run(copy) {
            ticket.skip(copy);
            return;
        }
        // The ranges were checked at submit; check again in case they were unmapped since.
        for (side, dev, addr) in [
            (Side::Source, link.src, src),
            (Side::Destination, link.dst, dst),
        ] {
            if let Err(e) = AddressSpace::check_range(&self.vmm, dev, addr, len) {
                ticket.fail(
                    copy,
                    CopyFault::UnmappedInFlight {
                        side,
                        at: crate::Location::new(dev, addr),
                        len,
                        detail: e.to_string(),
                    },
                );
                return;
            }
        }
        self.stats.begin(link);
        let start = Instant::now();
        let landed = self
            .pacer
            .as_ref()
            .map(|p| p.reserve(link, len, first, start));
        // Lossless: the crate only builds for 64-bit targets.
        let n = len as usize;
        // SAFETY: `vmm` is a host-backend VMM, whose device addresses are addresses of this
        // process; `check_range` just confirmed that both `[src, src+len)` and `[dst, dst+len)`
        // lie inside live mappings (readable and writable shared memory). Submit-time validation
        // refused batches whose ranges overlap, so the two ranges are disjoint. The transport's
        // contract (crate docs) makes the caller keep the ranges mapped, and untouched by anything
        // else, until the ticket finishes, as with a DMA engine.
        unsafe {
            std::ptr::copy_nonoverlapping(src as usize as *const u8, dst as usize as *mut u8, n);
        }
        if let Some(landed) = landed {
            let now = Instant::now();
            if landed > now {
                std::thread::sleep(landed - now);
            }
        }
        // Count the bytes before the ticket can report them, so stats read after `wait` include
        // them. Parts of one copy run one after another on its lane, so the last part completes it.
        self.stats.end(link, len, u64::from(last));
        ticket.part_done(copy);
    }
}

/// Copies between host-backend mappings with a pool of worker threads. See the module docs.
pub struct HostTransport {
    inner: Arc<Inner>,
    lanes: Lanes<Link, Part>,
    chunk_bytes: u64,
}

impl fmt::Debug for HostTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostTransport")
            .field("lanes", &self.lanes)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("paced", &self.inner.pacer.is_some())
            .finish()
    }
}

impl HostTransport {
    /// A transport over `vmm`'s host devices.
    pub fn new(vmm: Vmm<HostBackend>, config: HostTransportConfig) -> Self {
        let inner = Arc::new(Inner {
            vmm,
            pacer: config.link_model.map(|model| Pacer {
                model,
                clocks: Mutex::new(Clocks::default()),
            }),
            stats: StatsRecorder::default(),
        });
        let exec = inner.clone();
        let lanes = Lanes::new(config.workers, move |part| exec.run(part));
        Self {
            inner,
            lanes,
            chunk_bytes: config.chunk_bytes.max(1),
        }
    }

    /// The memory this transport copies between.
    pub fn vmm(&self) -> &Vmm<HostBackend> {
        &self.inner.vmm
    }
}

impl Transport for HostTransport {
    fn submit(&self, batch: &[CopyOp]) -> Result<Ticket, SubmitError> {
        validate_batch(&self.inner.vmm, batch)?;
        // Parts of `chunk_bytes`, or bigger if a copy would otherwise need more than u32::MAX.
        let part_lens: Vec<u64> = batch
            .iter()
            .map(|op| self.chunk_bytes.max(op.len.div_ceil(u64::from(u32::MAX))))
            .collect();
        let parts: Vec<u32> = batch
            .iter()
            .zip(&part_lens)
            .map(|(op, &pl)| u32::try_from(op.len.div_ceil(pl)).unwrap_or(u32::MAX))
            .collect();
        let bytes: u64 = batch.iter().map(|op| op.len).sum();
        let core = Arc::new(TicketCore::new(&parts, bytes));
        let mut by_link: BTreeMap<Link, Vec<Part>> = BTreeMap::new();
        for (copy, op) in batch.iter().enumerate() {
            let mut off = 0;
            while off < op.len {
                let len = part_lens[copy].min(op.len - off);
                by_link.entry(op.link()).or_default().push(Part {
                    ticket: core.clone(),
                    copy,
                    link: op.link(),
                    src: op.src.addr + off,
                    dst: op.dst.addr + off,
                    len,
                    first: off == 0,
                    last: off + len == op.len,
                });
                off += len;
            }
        }
        for (link, parts) in by_link {
            if let Err(parts) = self.lanes.push(link, parts) {
                for p in parts {
                    p.ticket.shut_down(p.copy);
                }
                return Err(SubmitError::ShutDown);
            }
        }
        Ok(Ticket::new(core, None))
    }

    fn stats(&self) -> Vec<LinkStats> {
        self.inner.stats.snapshot()
    }

    fn name(&self) -> &'static str {
        "host"
    }
}

impl Drop for HostTransport {
    fn drop(&mut self) {
        for part in self.lanes.shutdown() {
            part.ticket.shut_down(part.copy);
        }
    }
}
