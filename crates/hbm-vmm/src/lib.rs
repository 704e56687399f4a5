//! `hbm-vmm`: device memory as *virtual* memory.
//!
//! # What it owns
//!
//! Every physical chunk of device memory and every virtual range it is mapped into:
//!
//! - the [`Backend`] trait (granularity, create, reserve, map, unmap, set-access, export/import
//!   of a shareable handle, release), with associated types in the style of wgpu-hal. There are
//!   three backends:
//!   - [`host`], always compiled: `memfd` chunks mapped into `PROT_NONE` reservations, with a
//!     capacity budget per "device";
//!   - `cuda`, behind the feature `cuda`: the CUDA driver's VMM API through cudarc's
//!     `driver::sys`;
//!   - `ascend`, behind the feature `ascend`: ACL's VMM API in `libascendcl.so`, loaded with
//!     `dlopen`. It builds without CANN and has not yet run on an NPU.
//!
//!   The [`backend`] module docs map every trait method to its CUDA, host and ACL calls. They
//!   also say how the trait absorbs ACL's stricter rules: [`Capabilities`], an associated
//!   [`ShareableHandle`] type, and export to named [`ProcessId`]s;
//! - the safe layer: [`Vmm`] (the cheap-to-clone entry point), RAII [`PhysChunk`],
//!   [`Reservation`] and [`Mapping`], and [`PagedRegion`] (a reserved range of equal slots, each
//!   mappable, unmappable and remappable to a chunk);
//! - [`Hmm`], the HBM manager: a per-device registry of chunks under an opaque key, with
//!   refcounts, usage and peak accounting, and deferred release by epochs;
//! - [`ipc`]: sharing chunks with another process over a Unix socket. Fds go via `SCM_RIGHTS`;
//!   ACL's `u64` handles go in the message, after the importer has announced its process id.
//!
//! # Architecture invariants
//!
//! - This crate never knows about models, requests, experts or KV blocks. Keys in [`Hmm`] are
//!   opaque to it.
//! - It never unmaps a range that a live view still uses: a [`Mapping`] keeps its chunk and its
//!   reservation alive, a chunk is released only when its last handle *and* its last mapping are
//!   gone, a reservation is freed only after its last mapping, and [`Hmm::retire`] defers dropping
//!   a view until every epoch guard that could still see it has gone.
//! - `Drop` never panics. A backend error during teardown is recorded and can be read with
//!   [`Vmm::take_errors`].
//! - Bad input returns a typed [`VmmError`]; nothing here panics on it.
//!
//! # Example
//!
//! ```
//! use hbm_vmm::{host::{HostBackend, HostConfig}, DeviceId, Vmm};
//!
//! # fn main() -> Result<(), hbm_vmm::VmmError> {
//! let page = hbm_vmm::host::page_size();
//! let vmm = Vmm::new(HostBackend::new(HostConfig::devices(2, 64 * page).with_granularity(page)?));
//! let dev = DeviceId(0);
//! let chunk = vmm.create_chunk(dev, page, false)?;
//! // One chunk, two virtual addresses: zero-copy views.
//! let a = vmm.reserve(dev, page)?.map(0, &chunk, 0, page)?;
//! let b = vmm.reserve(dev, page)?.map(0, &chunk, 0, page)?;
//! a.as_mut_slice()[..5].copy_from_slice(b"hello");
//! assert_eq!(&b.as_slice()[..5], b"hello");
//! assert_ne!(a.addr(), b.addr());
//! assert_eq!(vmm.usage(dev), page);
//! drop((a, b, chunk));
//! assert_eq!(vmm.usage(dev), 0);
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
mod error;
pub mod hmm;
pub mod host;
mod host_access;
pub mod ipc;
mod loom;
mod paged;
mod vmm;

#[cfg(feature = "ascend")]
pub mod ascend;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use backend::{Backend, Capabilities, HandleToken, ProcessId, ShareableHandle, WireHandle};
pub use error::VmmError;
pub use hmm::{EpochGuard, Hmm};
pub use host_access::{HostRead, HostWrite};
pub use paged::PagedRegion;
pub use vmm::{ChunkId, Mapping, PhysChunk, Reservation, Vmm};

use std::fmt;

/// A device, by index into its backend (`dev0`, `dev1`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub u32);

impl DeviceId {
    /// The index as a `usize`, for indexing per-device tables.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dev{}", self.0)
    }
}

/// Checks that `value` is a multiple of `granularity` (a power of two).
pub(crate) fn check_aligned(
    what: &'static str,
    value: usize,
    granularity: usize,
) -> Result<(), VmmError> {
    if !value.is_multiple_of(granularity) {
        return Err(VmmError::Unaligned {
            what,
            value: value as u64,
            granularity,
        });
    }
    Ok(())
}

/// Checks that `[offset, offset + len)` lies inside `limit` bytes, without overflow.
pub(crate) fn check_range(
    what: &'static str,
    offset: usize,
    len: usize,
    limit: usize,
) -> Result<(), VmmError> {
    match offset.checked_add(len) {
        Some(end) if end <= limit => Ok(()),
        _ => Err(VmmError::OutOfRange {
            what,
            offset: offset as u64,
            len,
            limit,
        }),
    }
}
