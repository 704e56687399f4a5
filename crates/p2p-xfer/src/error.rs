//! The errors of this crate: [`SubmitError`] (a batch refused before anything moved),
//! [`BatchError`] (a submitted batch that did not complete, with exactly which copies did),
//! [`CopyFault`] (why one copy failed) and [`PlanError`] (bad planner input).

use crate::copy::Location;
use hbm_vmm::{DeviceId, VmmError};
use std::fmt;

/// Which end of a copy an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The bytes being read.
    Source,
    /// The bytes being written.
    Destination,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// A batch refused at submit time. Nothing of it was copied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// A copy of zero bytes: almost always a planning bug, so it is refused rather than skipped.
    #[error("copy {index} has length 0; drop it from the batch")]
    ZeroLength {
        /// The copy's index in the batch.
        index: usize,
    },
    /// `addr + len` does not fit in 64 bits.
    #[error("copy {index}: {side} {at} + {len} bytes overflows the address space")]
    AddressOverflow {
        /// The copy's index in the batch.
        index: usize,
        /// Which end overflows.
        side: Side,
        /// The start of the range.
        at: Location,
        /// The copy's length.
        len: u64,
    },
    /// A range that is not entirely inside live mappings on its device.
    #[error("copy {index}: {side} range {at} + {len} bytes is not mapped ({source}); map it first or fix the address")]
    Unmapped {
        /// The copy's index in the batch.
        index: usize,
        /// Which end is not mapped.
        side: Side,
        /// The start of the range.
        at: Location,
        /// The copy's length.
        len: u64,
        /// What the memory manager said.
        source: VmmError,
    },
    /// Two copies of the batch write the same byte.
    #[error("copies {first} and {second} write overlapping destination ranges; the result would depend on timing")]
    OverlappingDestinations {
        /// The lower index.
        first: usize,
        /// The higher index.
        second: usize,
    },
    /// A copy reads bytes that a copy of the same batch writes (possibly itself).
    #[error("copy {reader} reads bytes that copy {writer} writes; split the batch so the write finishes first")]
    ReadsWrittenBytes {
        /// The copy that reads.
        reader: usize,
        /// The copy that writes.
        writer: usize,
    },
    /// The device is not one this transport was built for.
    #[error("copy {index} touches {device}, which this transport does not drive")]
    UnknownDevice {
        /// The copy's index in the batch.
        index: usize,
        /// The device.
        device: DeviceId,
    },
    /// The source device may not write the destination (CUDA transport: grant it access with
    /// the destination reservation's `set_access`).
    #[error("copy {index}: {device} has no read-write access to destination {at}; grant it with set_access")]
    NoAccess {
        /// The copy's index in the batch.
        index: usize,
        /// The device that would write.
        device: DeviceId,
        /// The destination address it cannot write.
        at: Location,
    },
    /// The transport is shutting down and takes no more work.
    #[error("the transport is shutting down; submit to a live transport")]
    ShutDown,
    /// A driver call failed while the batch was being set up (CUDA transport).
    #[error("driver call {call} failed with code {code} while submitting")]
    Driver {
        /// The driver function.
        call: &'static str,
        /// Its result code.
        code: i32,
    },
}

/// Why one copy of a submitted batch failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CopyFault {
    /// A range stopped being mapped between submit and copy (it was unmapped while in flight).
    #[error("{side} range {at} + {len} bytes was unmapped while the copy was queued: {detail}")]
    UnmappedInFlight {
        /// Which end.
        side: Side,
        /// Start of the chunk that could not be copied.
        at: Location,
        /// Length of that chunk.
        len: u64,
        /// What the memory manager said.
        detail: String,
    },
    /// A driver call failed.
    #[error("driver call {call} failed with code {code}")]
    Driver {
        /// The driver function.
        call: &'static str,
        /// Its result code.
        code: i32,
    },
}

/// A submitted batch that did not complete. Every variant says exactly which copies completed
/// (indices into the submitted batch, ascending): their destination bytes are final. The other
/// copies' destinations hold unspecified bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// [`Ticket::cancel`](crate::Ticket::cancel) was called before every copy completed.
    #[error("batch cancelled: {} of {total} copies completed", completed.len())]
    Cancelled {
        /// The copies that completed.
        completed: Vec<usize>,
        /// How many copies the batch had.
        total: usize,
    },
    /// At least one copy failed; the others ran to completion.
    #[error("copy {index} failed ({fault}); {} of {total} copies completed", completed.len())]
    Failed {
        /// The first copy that failed.
        index: usize,
        /// Why.
        fault: CopyFault,
        /// The copies that completed.
        completed: Vec<usize>,
        /// How many copies the batch had.
        total: usize,
    },
    /// The transport was dropped before every copy ran.
    #[error("the transport shut down with the batch in flight: {} of {total} copies completed", completed.len())]
    ShutDown {
        /// The copies that completed.
        completed: Vec<usize>,
        /// How many copies the batch had.
        total: usize,
    },
}

impl BatchError {
    /// The indices of the copies that completed, ascending.
    pub fn completed(&self) -> &[usize] {
        match self {
            BatchError::Cancelled { completed, .. }
            | BatchError::Failed { completed, .. }
            | BatchError::ShutDown { completed, .. } => completed,
        }
    }

    /// How many copies the batch had.
    pub fn total(&self) -> usize {
        match self {
            BatchError::Cancelled { total, .. }
            | BatchError::Failed { total, .. }
            | BatchError::ShutDown { total, .. } => *total,
        }
    }
}

/// Planner input that cannot be planned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A need with no device holding its bytes.
    #[error("need {need} has no holders; at least one device must hold the bytes")]
    NoHolders {
        /// The need's index.
        need: usize,
    },
    /// A need of zero bytes.
    #[error("need {need} has length 0")]
    ZeroLength {
        /// The need's index.
        need: usize,
    },
    /// A need whose range overflows the address space on one of its locations.
    #[error("need {need}: {at} + {len} bytes overflows the address space")]
    AddressOverflow {
        /// The need's index.
        need: usize,
        /// The location that overflows.
        at: Location,
        /// The need's length.
        len: u64,
    },
    /// The same device listed twice as a holder of one need.
    #[error("need {need} lists {device} as a holder twice")]
    DuplicateHolder {
        /// The need's index.
        need: usize,
        /// The repeated device.
        device: DeviceId,
    },
    /// Two needs want overlapping destination bytes.
    #[error("needs {first} and {second} have overlapping destinations")]
    OverlappingDestinations {
        /// The lower index.
        first: usize,
        /// The higher index.
        second: usize,
    },
    /// A holder's bytes overlap a need's destination, so reading it would race with the write.
    #[error("a holder of need {need} overlaps the destination of need {destination_of}")]
    HolderOverlapsDestination {
        /// The need whose holder overlaps.
        need: usize,
        /// The need whose destination it overlaps.
        destination_of: usize,
    },
    /// A link the plan would use has no usable bandwidth in the model.
    #[error("the link model gives {link} no bandwidth (it must be finite and > 0)")]
    UnusableLink {
        /// The link.
        link: crate::copy::Link,
    },
    /// A planner setting out of range.
    #[error("bad planner configuration: {0}")]
    BadConfig(&'static str),
}
