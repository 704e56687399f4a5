//! The one error type of this crate. Every fallible operation returns it; tests compare variants.

use crate::DeviceId;

/// What went wrong in a virtual-memory operation.
///
/// The variants carry plain data (no boxed sources) so that the type is `Clone + Eq` and tests can
/// compare errors directly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VmmError {
    /// Creating a chunk would exceed the device's memory.
    #[error("{device}: out of memory: asked for {requested} bytes, {available} bytes available")]
    OutOfMemory {
        /// The device that is full.
        device: DeviceId,
        /// Bytes asked for.
        requested: usize,
        /// Bytes still free on the device.
        available: usize,
    },
    /// A size or offset is not a multiple of the allocation granularity.
    #[error("{what} = {value} is not a multiple of the granularity ({granularity} bytes)")]
    Unaligned {
        /// Which argument (for example `"size"` or `"offset"`).
        what: &'static str,
        /// Its value.
        value: u64,
        /// The granularity it must be a multiple of.
        granularity: usize,
    },
    /// A range does not fit inside the object it addresses.
    #[error("{what}: range [{offset}, {offset}+{len}) does not fit in {limit} bytes")]
    OutOfRange {
        /// What the range addresses (for example `"reservation"`).
        what: &'static str,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: usize,
        /// Size of the object.
        limit: usize,
    },
    /// A size of zero was given where a positive size is needed.
    #[error("{what} must not be zero")]
    ZeroSize {
        /// Which argument.
        what: &'static str,
    },
    /// The range (or slot) already holds a mapping.
    #[error("{device}: [{addr:#x}, +{len:#x}) is already mapped")]
    AlreadyMapped {
        /// The device of the reservation.
        device: DeviceId,
        /// First address of the requested range.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// The range (or slot) is not (entirely) mapped.
    #[error("{device}: [{addr:#x}, +{len:#x}) is not mapped")]
    NotMapped {
        /// The device asked about.
        device: DeviceId,
        /// First address of the range.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// A slot index past the end of a paged region.
    #[error("slot {slot} is out of range (the region has {slots} slots)")]
    NoSuchSlot {
        /// The slot asked for.
        slot: usize,
        /// How many slots the region has.
        slots: usize,
    },
    /// A chunk's size does not match what it is used for (for example a region's slot size).
    #[error("chunk of {found} bytes where {expected} bytes are needed")]
    SizeMismatch {
        /// The size needed.
        expected: usize,
        /// The chunk's size.
        found: usize,
    },
    /// A chunk lives on another device than the reservation it is mapped into.
    #[error("chunk is on {found}, but the reservation is on {expected}")]
    DeviceMismatch {
        /// The reservation's device.
        expected: DeviceId,
        /// The chunk's device.
        found: DeviceId,
    },
    /// The device does not exist in this backend.
    #[error("no such device: {0}")]
    NoSuchDevice(DeviceId),
    /// A handle (fd, chunk) is not usable for this operation.
    #[error("bad handle: {0}")]
    BadHandle(String),
    /// The chunk was created without `exportable` and cannot be shared.
    #[error("chunk was not created exportable; pass exportable = true to create_chunk")]
    NotExportable,
    /// The backend maps only whole chunks (ACL's `aclrtMapMem`), and part of one was asked for.
    #[error(
        "this backend maps only whole chunks: asked for {len} bytes at chunk offset \
         {chunk_offset} of a {chunk_size}-byte chunk; allocate chunks of the size you map"
    )]
    PartialMapUnsupported {
        /// The offset into the chunk that was asked for.
        chunk_offset: usize,
        /// The length that was asked for.
        len: usize,
        /// The chunk's size.
        chunk_size: usize,
    },
    /// The backend cannot map chunks made here and chunks imported from another process into
    /// one reservation (ACL).
    #[error(
        "{device}: this backend cannot mix chunks created here and imported chunks in one \
         reservation; reserve a separate range for the {adding} chunk"
    )]
    MixedOrigins {
        /// The reservation's device.
        device: DeviceId,
        /// The origin of the chunk that was refused: `"imported"` or `"local"`.
        adding: &'static str,
    },
    /// The backend shares chunks only with named processes (ACL's whitelist), and none was named.
    #[error(
        "this backend exports only to named processes; pass the importers' process ids \
         (ipc::send_chunks asks the peer for its id)"
    )]
    NoImporters,
    /// The backend's device API cannot do this at all.
    #[error("not supported by this backend: {0}")]
    Unsupported(&'static str),
    /// The granularity asked for is not a power of two at least the page size.
    #[error(
        "granularity {granularity} must be a power of two and at least the page size ({page_size})"
    )]
    BadGranularity {
        /// The granularity asked for.
        granularity: usize,
        /// The system page size.
        page_size: usize,
    },
    /// A key is not (or already) in the HBM manager's registry.
    #[error("key {key}: {problem}")]
    Key {
        /// The key, as `Debug` prints it.
        key: String,
        /// `"not registered"` or `"already registered"`.
        problem: &'static str,
    },
    /// An operating-system call failed (host backend, IPC).
    #[error("{call} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Os {
        /// The system call.
        call: &'static str,
        /// Its `errno`.
        errno: i32,
    },
    /// A device driver call failed (CUDA or ACL backend).
    #[error("driver call {call} failed with code {code}")]
    Driver {
        /// The driver function.
        call: &'static str,
        /// The driver's result code.
        code: i32,
    },
    /// The device driver library is not installed or not usable.
    #[error("no device driver: {0}")]
    NoDriver(String),
    /// The IPC peer sent something that is not a valid message.
    #[error("IPC protocol error: {0}")]
    Protocol(String),
}

impl VmmError {
    pub(crate) fn os(call: &'static str, e: rustix::io::Errno) -> Self {
        VmmError::Os {
            call,
            errno: e.raw_os_error(),
        }
    }

    pub(crate) fn io(call: &'static str, e: &std::io::Error) -> Self {
        VmmError::Os {
            call,
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}
