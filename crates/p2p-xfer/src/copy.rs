//! What a transfer is made of: [`Location`]s, [`CopyOp`]s, and the checks every batch passes before a
//! transport accepts it.

use crate::error::{Side, SubmitError};
use hbm_vmm::{DeviceId, VmmError};
use std::collections::BTreeMap;
use std::fmt;

/// A byte address on one device (a device virtual address; on the host backend, a process address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    /// The device whose memory holds the byte.
    pub device: DeviceId,
    /// The device virtual address.
    pub addr: u64,
}

impl Location {
    /// A location on `device` at `addr`.
    pub fn new(device: DeviceId, addr: u64) -> Self {
        Self { device, addr }
    }

    /// This location moved `by` bytes forward, or `None` on address overflow.
    pub fn offset(self, by: u64) -> Option<Self> {
        self.addr.checked_add(by).map(|addr| Self { addr, ..self })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{:#x}", self.device, self.addr)
    }
}

/// A directed device pair: bytes flow from `src` to `dst`. `src == dst` is a device-local copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Link {
    /// The sending device.
    pub src: DeviceId,
    /// The receiving device.
    pub dst: DeviceId,
}

impl Link {
    /// The link from `src` to `dst`.
    pub fn new(src: DeviceId, dst: DeviceId) -> Self {
        Self { src, dst }
    }

    /// Whether this "link" stays on one device.
    pub fn is_local(&self) -> bool {
        self.src == self.dst
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}", self.src, self.dst)
    }
}

/// One copy of `len` bytes from `src` to `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CopyOp {
    /// Where the bytes are read.
    pub src: Location,
    /// Where the bytes are written.
    pub dst: Location,
    /// How many bytes.
    pub len: u64,
}

impl CopyOp {
    /// A copy of `len` bytes from `src` to `dst`.
    pub fn new(src: Location, dst: Location, len: u64) -> Self {
        Self { src, dst, len }
    }

    /// The device pair this copy travels over.
    pub fn link(&self) -> Link {
        Link::new(self.src.device, self.dst.device)
    }
}

impl fmt::Display for CopyOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes {} -> {}", self.len, self.src, self.dst)
    }
}

/// Something that knows which device address ranges are mapped: the transports refuse a copy from
/// or to anything else before they submit it.
///
/// Implemented for [`hbm_vmm::Vmm`]; a test or a benchmark with its own allocations can implement it
/// over its own table.
pub trait AddressSpace: Send + Sync {
    /// `Ok` if `[addr, addr + len)` lies entirely inside live mappings on `dev`.
    fn check_range(&self, dev: DeviceId, addr: u64, len: u64) -> Result<(), VmmError>;
}

impl<B: hbm_vmm::Backend> AddressSpace for hbm_vmm::Vmm<B> {
    fn check_range(&self, dev: DeviceId, addr: u64, len: u64) -> Result<(), VmmError> {
        // A length past usize cannot be mapped; saturating makes the VMM refuse it.
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        hbm_vmm::Vmm::check_range(self, dev, addr, len)
    }
}

impl<T: AddressSpace + ?Sized> AddressSpace for std::sync::Arc<T> {
    fn check_range(&self, dev: DeviceId, addr: u64, len: u64) -> Result<(), VmmError> {
        (**self).check_range(dev, addr, len)
    }
}

/// Validate a batch before anything is submitted:
/// - every copy has a non-zero length and no address overflows;
/// - every source and destination range is mapped on its device (`space`);
/// - no two copies write the same byte, and no copy reads a byte that a copy of the batch writes
///   (the order of copies inside a batch is not defined, so either would make the result depend on
///   timing).
pub fn validate_batch(space: &dyn AddressSpace, batch: &[CopyOp]) -> Result<(), SubmitError> {
    for (index, op) in batch.iter().enumerate() {
        if op.len == 0 {
            return Err(SubmitError::ZeroLength { index });
        }
        for (side, loc) in [(Side::Source, op.src), (Side::Destination, op.dst)] {
            if loc.addr.checked_add(op.len).is_none() {
                return Err(SubmitError::AddressOverflow {
                    index,
                    side,
                    at: loc,
                    len: op.len,
                });
            }
            space
                .check_range(loc.device, loc.addr, op.len)
                .map_err(|source| SubmitError::Unmapped {
                    index,
                    side,
                    at: loc,
                    len: op.len,
                    source,
                })?;
        }
    }
    check_hazards(batch)
}

/// Refuse write/write and read/write overlaps inside one batch (see [`validate_batch`]).
/// Lengths must be non-zero and addresses must not overflow (checked first by the caller).
fn check_hazards(batch: &[CopyOp]) -> Result<(), SubmitError> {
    let writes: Vec<(Location, u64)> = batch.iter().map(|op| (op.dst, op.len)).collect();
    let reads: Vec<(Location, u64)> = batch.iter().map(|op| (op.src, op.len)).collect();
    find_hazard(&writes, &reads).map_err(|h| match h {
        Hazard::WriteWrite { first, second } => {
            SubmitError::OverlappingDestinations { first, second }
        }
        Hazard::ReadWrite { reader, writer } => SubmitError::ReadsWrittenBytes { reader, writer },
    })
}

/// An overlap between ranges that must stay apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hazard {
    /// Writes `first < second` overlap.
    WriteWrite { first: usize, second: usize },
    /// Read `reader` overlaps write `writer`.
    ReadWrite { reader: usize, writer: usize },
}

/// Find an overlap between two writes, or between a read and a write, in `O(n log n)`.
/// Ranges are `(start, len)` with `len > 0` and no overflow; indices are positions in the slices.
pub(crate) fn find_hazard(
    writes: &[(Location, u64)],
    reads: &[(Location, u64)],
) -> Result<(), Hazard> {
    // Write ranges per device, sorted by start: (start, end, index).
    let mut by_dev: BTreeMap<DeviceId, Vec<(u64, u64, usize)>> = BTreeMap::new();
    for (i, &(at, len)) in writes.iter().enumerate() {
        by_dev
            .entry(at.device)
            .or_default()
            .push((at.addr, at.addr + len, i));
    }
    for ranges in by_dev.values_mut() {
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            let ((_, end_a, a), (start_b, _, b)) = (pair[0], pair[1]);
            if start_b < end_a {
                return Err(Hazard::WriteWrite {
                    first: a.min(b),
                    second: a.max(b),
                });
            }
        }
    }
    // The writes are sorted and pairwise disjoint, so of those that start before a read ends, only
    // the last can reach into it.
    for (reader, &(at, len)) in reads.iter().enumerate() {
        let Some(ranges) = by_dev.get(&at.device) else {
            continue;
        };
        let (start, end) = (at.addr, at.addr + len);
        let before_end = ranges.partition_point(|&(s, _, _)| s < end);
        if before_end == 0 {
            continue;
        }
        let (_, w_end, writer) = ranges[before_end - 1];
        if w_end > start {
            return Err(Hazard::ReadWrite { reader, writer });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything in `[0, 1 << 40)` on devices 0..4 counts as mapped.
    struct Flat;
    impl AddressSpace for Flat {
        fn check_range(&self, dev: DeviceId, addr: u64, len: u64) -> Result<(), VmmError> {
            if dev.0 >= 4 {
                return Err(VmmError::NoSuchDevice(dev));
            }
            match addr.checked_add(len) {
                Some(end) if end <= 1 << 40 => Ok(()),
                _ => Err(VmmError::NotMapped {
                    device: dev,
                    addr,
                    len: len as usize,
                }),
            }
        }
    }

    fn op(sd: u32, sa: u64, dd: u32, da: u64, len: u64) -> CopyOp {
        CopyOp::new(
            Location::new(DeviceId(sd), sa),
            Location::new(DeviceId(dd), da),
            len,
        )
    }

    #[test]
    fn disjoint_batch_passes() {
        let batch = [
            op(0, 0, 1, 0, 100),
            op(0, 0, 1, 100, 100),
            op(1, 500, 2, 0, 10),
        ];
        validate_batch(&Flat, &batch).unwrap();
    }

    #[test]
    fn zero_length_is_refused() {
        let err = validate_batch(&Flat, &[op(0, 0, 1, 0, 0)]).unwrap_err();
        assert!(matches!(err, SubmitError::ZeroLength { index: 0 }));
    }

    #[test]
    fn overflow_is_refused() {
        let err = validate_batch(&Flat, &[op(0, u64::MAX - 3, 1, 0, 8)]).unwrap_err();
        assert!(matches!(
            err,
            SubmitError::AddressOverflow {
                index: 0,
                side: Side::Source,
                ..
            }
        ));
    }

    #[test]
    fn unmapped_destination_is_refused_with_the_vmm_error() {
        let err = validate_batch(&Flat, &[op(0, 0, 1, 0, 8), op(0, 0, 7, 0, 8)]).unwrap_err();
        match err {
            SubmitError::Unmapped {
                index: 1,
                side: Side::Destination,
                source: VmmError::NoSuchDevice(DeviceId(7)),
                ..
            } => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn overlapping_writes_are_refused() {
        let err = validate_batch(&Flat, &[op(0, 0, 1, 0, 100), op(2, 0, 1, 99, 10)]).unwrap_err();
        assert!(matches!(
            err,
            SubmitError::OverlappingDestinations {
                first: 0,
                second: 1
            }
        ));
        // Same addresses on different devices do not overlap.
        validate_batch(&Flat, &[op(0, 0, 1, 0, 100), op(0, 0, 2, 0, 100)]).unwrap();
    }

    #[test]
    fn reading_written_bytes_is_refused() {
        // Copy 1 reads [1:50, 1:60) which copy 0 writes.
        let err = validate_batch(&Flat, &[op(0, 0, 1, 0, 100), op(1, 50, 2, 0, 10)]).unwrap_err();
        assert!(matches!(
            err,
            SubmitError::ReadsWrittenBytes {
                reader: 1,
                writer: 0
            }
        ));
        // A copy onto itself (overlapping source and destination) is a read/write hazard too.
        let err = validate_batch(&Flat, &[op(1, 0, 1, 8, 16)]).unwrap_err();
        assert!(matches!(
            err,
            SubmitError::ReadsWrittenBytes {
                reader: 0,
                writer: 0
            }
        ));
        // Adjacent is fine.
        validate_batch(&Flat, &[op(0, 0, 1, 0, 100), op(1, 100, 2, 0, 10)]).unwrap();
    }

    #[test]
    fn read_hazard_found_behind_many_earlier_writes() {
        let mut batch: Vec<CopyOp> = (0..20).map(|i| op(0, 0, 1, i * 10, 10)).collect();
        batch.push(op(1, 135, 2, 0, 2));
        let err = validate_batch(&Flat, &batch).unwrap_err();
        assert!(matches!(
            err,
            SubmitError::ReadsWrittenBytes {
                reader: 20,
                writer: 13
            }
        ));
    }
}
