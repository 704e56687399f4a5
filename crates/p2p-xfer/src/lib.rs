//! `p2p-xfer`: moving bytes between devices at link speed, alongside serving.
//!
//! # What it owns
//! - The [`Transport`] trait: submit a batch of [`CopyOp`]s, get a [`Ticket`] to poll, wait on or
//!   cancel; per-link byte counters and achieved bandwidth ([`LinkStats`]).
//! - [`HostTransport`]: worker threads that `memcpy` between host-backend mappings, optionally
//!   paced by a [`LinkModel`] so a host run takes NVLink or PCIe time.
//! - `CudaTransport` (feature `cuda`): one low-priority copy stream per device pair, copies cut into
//!   chunks so compute interleaves, completion recorded as events that a destination's compute
//!   stream can wait on without a host synchronisation.
//! - The [`Planner`]: stripes each [`Need`] over every device holding its bytes, balancing the load
//!   on every link and port, and predicts the completion time under a [`LinkModel`].
//!
//! # Architecture invariants
//! - **Never allocates device memory.** Sources and destinations are given; the transports only
//!   read and write them (the CUDA transport keeps streams and events, no buffers).
//! - **Never reports completion before the bytes are visible to the destination's compute.** A
//!   ticket finishes only when every copy has landed or been resolved as failed or skipped, and
//!   its report lists exactly the copies that completed.
//! - **Refuses bad copies before submitting anything**: unmapped or out-of-range addresses (checked
//!   with [`hbm_vmm::Vmm::check_range`] through [`AddressSpace`]), zero lengths, overflowing ranges,
//!   and batches whose copies overlap (two writes to one byte, or a read of a byte the batch
//!   writes). Such a batch gets a typed [`SubmitError`] and moves no byte.
//! - The planner is pure: no I/O and no clock. The same input gives the same plan.
//!
//! # The caller's contract
//! Like a DMA engine, a transport works on memory that Rust does not track. From submit until the
//! ticket finishes, the caller keeps every source and destination range mapped, does not write the
//! sources, and neither reads nor writes the destinations. (The host transport re-checks that each
//! range is still mapped before each part and fails that copy if not.)
//!
//! # Example
//! ```
//! use hbm_vmm::{host::{HostBackend, HostConfig}, DeviceId, Vmm};
//! use p2p_xfer::{
//!     HostTransport, HostTransportConfig, LinkModel, Location, Need, Planner, PlannerConfig, Transport,
//! };
//!
//! let vmm = Vmm::new(HostBackend::new(HostConfig::devices(3, 64 << 20)));
//! let gran = vmm.granularity(DeviceId(0)).unwrap();
//! // Devices 0 and 1 hold the same 4 MiB; device 2 needs them.
//! let mut maps = Vec::new();
//! for dev in 0..3 {
//!     let chunk = vmm.create_chunk(DeviceId(dev), 4 << 20, false).unwrap();
//!     let res = vmm.reserve(DeviceId(dev), 4 << 20).unwrap();
//!     let mut map = res.map(0, &chunk, 0, 4 << 20).unwrap();
//!     if dev < 2 {
//!         map.as_mut_slice().fill(7);
//!     }
//!     maps.push((res, map));
//! }
//! let at = |dev: usize| Location::new(DeviceId(dev as u32), maps[dev].1.addr());
//!
//! let planner = Planner::new(LinkModel::nvlink4(), PlannerConfig::default()).unwrap();
//! let plan = planner.plan(&[Need::new(at(2), 4 << 20, vec![at(0), at(1)])]).unwrap();
//! assert_eq!(plan.copies().len(), 2); // striped over both holders
//!
//! let transport = HostTransport::new(vmm.clone(), HostTransportConfig::default());
//! let report = transport.submit(&plan.batch()).unwrap().wait().unwrap();
//! assert_eq!(report.bytes, 4 << 20);
//! assert!(maps[2].1.as_slice().iter().all(|&b| b == 7));
//! # let _ = gran;
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(not(target_pointer_width = "64"))]
compile_error!("p2p-xfer needs a 64-bit target (device addresses and lengths are 64-bit)");

mod copy;
mod error;
mod host;
mod lanes;
mod link;
mod loom;
mod plan;
mod stats;
mod ticket;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use copy::{validate_batch, AddressSpace, CopyOp, Link, Location};
pub use error::{BatchError, CopyFault, PlanError, Side, SubmitError};
pub use host::{HostTransport, HostTransportConfig};
pub use link::{LinkLoad, LinkModel, LinkSpec, Ports};
pub use plan::{Need, Plan, PlannedCopy, Planner, PlannerConfig};
pub use stats::LinkStats;
pub use ticket::{BatchReport, Ticket};

pub use hbm_vmm::DeviceId;

/// Something that moves bytes between devices.
///
/// A batch is validated as a whole before anything moves (see [`validate_batch`]); inside a batch
/// copies have no defined order. Batches submitted one after another on the same link run in
/// submission order on that link.
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// Validate `batch` and start it. Nothing is copied if this returns an error.
    fn submit(&self, batch: &[CopyOp]) -> Result<Ticket, SubmitError>;

    /// Per-link counters since the transport was created, ordered by link.
    fn stats(&self) -> Vec<LinkStats>;

    /// A short name for reports ("host", "cuda").
    fn name(&self) -> &'static str;
}
