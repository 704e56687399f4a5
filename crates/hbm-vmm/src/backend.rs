//! The raw backend seam: [`Backend`], what a backend can and cannot do ([`Capabilities`]), and
//! how its chunks travel to another process ([`ShareableHandle`]).
//!
//! Three device virtual-memory APIs sit under this trait. The host backend is a device-free
//! model built on `memfd` and `mmap`. The CUDA driver's VMM API (`cuMem*`) is the model the
//! trait was first written against. Huawei Ascend's ACL runtime (`aclrt*`, CANN) has the same
//! shape, but its rules are stricter in four places. The trait absorbs them as follows:
//!
//! - **Whole-chunk mapping.** `aclrtMapMem` maps a whole physical allocation: its `offset`
//!   must be 0 and its `size` must equal the allocation's. The backend reports this as
//!   [`Capabilities::partial_map`] `= false`. [`crate::Reservation::map`] then refuses a partial
//!   map with [`VmmError::PartialMapUnsupported`] before it calls the backend. `PagedRegion`,
//!   `Hmm` and `kv-pool` only ever map whole chunks, so they run unchanged.
//! - **Access per mapping.** `aclrtMemSetAccess` takes exactly the `virPtr` and `size` of one
//!   `aclrtMapMem`. `cuMemSetAccess` takes any mapped range, so the safe layer covers each run of
//!   adjacent mappings with one call. With [`Capabilities::access_spans_mappings`] `= false` it
//!   makes one call per mapping instead.
//! - **No mixed origins.** On ACL, a reserved range may not hold chunks allocated in this
//!   process together with chunks imported from another one. With
//!   [`Capabilities::mixed_origins`] `= false`, the safe layer refuses such a mapping with
//!   [`VmmError::MixedOrigins`].
//! - **Sharing by number, to named processes.** `aclrtMemExportToShareableHandle` gives a `u64`.
//!   The exporter puts the importers' process ids on a whitelist
//!   (`aclrtMemSetPidToShareableHandle`). So [`Backend::ShareableHandle`] is an associated type:
//!   an `OwnedFd` on host and CUDA, a [`HandleToken`] on ACL. [`Backend::export`] takes the
//!   importers' [`ProcessId`]s. The fd backends ignore them, because whoever holds the fd may
//!   import. [`crate::ipc`] carries either kind, and does the handshake a whitelist needs (see
//!   [`ShareableHandle::NAMES_IMPORTER`]).
//!
//! # The mapping, method by method
//!
//! Unless it says otherwise, "ACL" below means the CANN runtime API of `acl/acl_rt.h` (CANN 8
//! and 9, Atlas A2/A3). The `ascend` backend (feature `ascend`) implements this column.
//!
//! ## `device_count`
//! - CUDA: `cuDeviceGetCount`, once, in `CudaBackend::new`.
//! - Host: the length of `HostConfig`'s capacity list.
//! - ACL: `aclrtGetDeviceCount`, once, after `aclInit`.
//!
//! ## `granularity(dev)`
//! - CUDA: `cuMemGetAllocationGranularity(prop, MINIMUM)` for a pinned device allocation. It is
//!   2 MiB on current GPUs.
//! - Host: the configured granularity, a power of two of at least one page.
//! - ACL: `aclrtMemGetAllocationGranularity(prop, ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM)` with
//!   `ACL_HBM_MEM_HUGE` memory (2 MiB).
//! - Differences: none that the trait sees. On ACL, `aclrtMapMem` also demands 2 MiB-aligned
//!   addresses, which the granularity already implies.
//!
//! ## `create(dev, size, exportable)`
//! - CUDA: `cuMemCreate` of a pinned allocation on `dev`. `exportable` asks for
//!   `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`, which cannot be added later.
//! - Host: `memfd_create` plus `ftruncate`, charged to the device's capacity budget.
//! - ACL: `aclrtMallocPhysical` with `ACL_MEM_HANDLE_TYPE_NONE`, `ACL_MEM_ALLOCATION_TYPE_PINNED`
//!   and `ACL_MEM_LOCATION_TYPE_DEVICE`.
//! - Differences: ACL has no handle type to request; any allocation can be exported. The flag
//!   is kept for every backend, and the safe layer enforces it
//!   ([`VmmError::NotExportable`]), so a program behaves the same on all of them.
//!
//! ## `release(chunk)`
//! - CUDA: `cuMemRelease`. The memory lives on while mappings of it exist.
//! - Host: close the memfd. Its pages live on while mappings of it exist.
//! - ACL: `aclrtFreePhysical`. Its docs ask for `aclrtUnmapMem` first.
//! - Differences: the safe layer releases a chunk only after its last mapping is gone, which
//!   satisfies all three. For a shared chunk, ACL frees the memory once every process has
//!   freed its handle. CUDA and host do the same.
//!
//! ## `reserve(dev, size)`
//! - CUDA: `cuMemAddressReserve(size, alignment = granularity)`.
//! - Host: an anonymous `PROT_NONE` mapping, trimmed to a granularity-aligned range.
//! - ACL: `aclrtReserveMemAddress(size, alignment = 0, expectPtr = NULL, flags = 0)`, after
//!   making `dev` current.
//! - Differences: ACL has no alignment argument (it must be 0). The backend checks that the
//!   base it gets is granularity-aligned, and returns [`VmmError::Driver`] if not.
//!
//! ## `free(reservation)`
//! - CUDA: `cuMemAddressFree(ptr, size)`.
//! - Host: `munmap`.
//! - ACL: `aclrtReleaseMemAddress(ptr)`, without a size.
//! - Differences: none. The safe layer frees a reservation only after its last mapping.
//!
//! ## `map(r, offset, chunk, chunk_offset, len)`
//! - CUDA: `cuMemMap(base + offset, len, chunk_offset, handle)`. Any granularity-aligned part of
//!   the chunk can be mapped.
//! - Host: `mmap(MAP_FIXED | MAP_SHARED, memfd, chunk_offset)` over the `PROT_NONE`
//!   reservation.
//! - ACL: `aclrtMapMem(base + offset, len, 0, handle, 0)`. It requires `chunk_offset == 0` and
//!   `len == chunk size`.
//! - How the trait absorbs it: [`Capabilities::partial_map`] is false on ACL, and the safe layer
//!   refuses a partial map up front with [`VmmError::PartialMapUnsupported`]. A caller that
//!   needs part of a chunk at some address should allocate chunks of that size instead. The
//!   elastic paths already map whole chunks. Two more ACL rules are covered:
//!   - one reserved range may not hold chunks of two devices. The safe layer already refuses
//!     that everywhere ([`VmmError::DeviceMismatch`]);
//!   - it may not hold both local and imported chunks. [`Capabilities::mixed_origins`] makes
//!     the safe layer refuse that ([`VmmError::MixedOrigins`]).
//!
//! ## `unmap(r, offset, len)`
//! - CUDA: `cuMemUnmap(base + offset, len)`. It may cover several mappings.
//! - Host: `mmap(MAP_FIXED, PROT_NONE)` of anonymous memory over the range, so the range stays
//!   reserved.
//! - ACL: `aclrtUnmapMem(base + offset)`, which takes no length and unmaps the one mapping that
//!   starts there.
//! - How the trait absorbs it: the trait's contract is that `unmap` gets exactly the
//!   `(offset, len)` of one earlier `map`. The safe layer only ever unmaps that way: a
//!   [`crate::Mapping`] unmaps itself. The ACL backend checks the range against its own record
//!   of mappings.
//!
//! ## `set_access(r, offset, len, devices)`
//! - CUDA: `cuMemSetAccess` with one read-write descriptor per device, over any mapped range.
//!   An empty device list revokes the owner's access (`PROT_NONE`).
//! - Host: `mprotect` to read-write, or to `PROT_NONE` for an empty list. All host devices share
//!   one address space.
//! - ACL: `aclrtMemSetAccess(virPtr, size, desc[], n)` with
//!   `ACL_RT_MEM_ACCESS_FLAGS_READWRITE`. Its `virPtr` and `size` must equal one
//!   `aclrtMapMem`'s. Each other device first needs `aclrtDeviceEnablePeerAccess`.
//! - How the trait absorbs it: with [`Capabilities::access_spans_mappings`] false,
//!   [`crate::Reservation::set_access`] makes one call per mapping instead of one per run of
//!   adjacent mappings. The ACL backend enables peer access once per pair of devices. ACL
//!   documents only read-write access, so revoking (an empty list) is
//!   [`VmmError::Unsupported`] there. The safe layer never revokes, because a reservation's
//!   access list always includes its own device.
//!
//! ## `export(chunk, importers)`
//! - CUDA: `cuMemExportToShareableHandle(POSIX_FILE_DESCRIPTOR)` gives an fd. Whoever receives
//!   the fd may import, so `importers` is ignored.
//! - Host: `dup` of the memfd. `importers` is ignored, as on CUDA.
//! - ACL: `aclrtMemExportToShareableHandle(handle, NONE, ACL_RT_VMM_EXPORT_FLAG_DEFAULT)` gives
//!   a `u64`, then `aclrtMemSetPidToShareableHandle(token, pids)` whitelists the importers.
//! - How the trait absorbs it:
//!   - the result is `Self::ShareableHandle`: an `OwnedFd`, or a [`HandleToken`];
//!   - `importers` are [`ProcessId`]s, and [`Backend::process_id`] says how a process names
//!     itself (`aclrtDeviceGetBareTgid` on ACL, which sees through containers);
//!   - an ACL export with no importers is [`VmmError::NoImporters`]. Whitelist checking is
//!     never turned off;
//!   - ACL allows one shareable handle per allocation per process, and exporting twice is an
//!     error. The ACL chunk therefore keeps its token and its whitelist, and a second export
//!     only extends the whitelist;
//!   - only chunks created in this process can be exported on ACL; exporting an imported one
//!     is [`VmmError::Unsupported`]. CUDA and host can re-export an imported chunk.
//!
//! ## `import(dev, handle, size)`
//! - CUDA: `cuMemImportFromShareableHandle(fd)`, then the fd is closed.
//! - Host: `fstat` checks of the fd, then keep it. The chunk is not charged, because its
//!   memory is the exporter's.
//! - ACL: `aclrtMemImportFromShareableHandle(token, dev)`.
//! - Differences:
//!   - ACL can import onto another device than the exporter's; the trait's `dev` already
//!     says which one;
//!   - ACL refuses an import in the process that exported the handle. That is
//!     [`Capabilities::import_in_exporting_process`], and the ACL backend returns
//!     [`VmmError::Unsupported`] for it before calling the runtime;
//!   - the ACL import fails unless the exporter whitelisted this process.
//!
//! ## `base(r)`, `mem_info(dev)`, `process_id()`
//! - `base`: the reserved pointer on all three backends.
//! - `mem_info`:
//!   - CUDA: `cuMemGetInfo`;
//!   - host: the capacity budget minus chunks created;
//!   - ACL: `aclrtGetMemInfo(ACL_HBM_MEM)` with `dev` current.
//! - `process_id`: `getpid` by default, `aclrtDeviceGetBareTgid` on ACL.
//!
//! ## Contexts and threads
//! - CUDA: each call makes the device's retained primary context current on the calling thread
//!   (`cuCtxSetCurrent`).
//! - ACL: each call does the same with the device's default context (`aclrtSetCurrentContext`,
//!   taken after `aclrtSetDevice` in `new`).
//! - Host: nothing to bind.

use crate::{DeviceId, VmmError};
use std::fmt;
use std::os::fd::OwnedFd;

/// A process, as the device runtime names it: what an exporter puts on an import whitelist.
///
/// This is `getpid()` for the host and CUDA backends. ACL uses `aclrtDeviceGetBareTgid`, which
/// gives the id on the physical host even inside a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProcessId(pub i32);

impl ProcessId {
    /// This process, by the operating system's pid.
    pub fn current() -> Self {
        ProcessId(rustix::process::getpid().as_raw_nonzero().get())
    }
}

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.0)
    }
}

/// What a backend can do beyond the rules every backend follows. The safe layer reads it and
/// either adapts (one `set_access` per mapping) or refuses up front with a typed error (a partial
/// map). Backends outside this crate start from one of the presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// `map` accepts part of a chunk: a `chunk_offset` other than 0, or a `len` shorter than the
    /// chunk. True on CUDA and host. False on ACL, where `aclrtMapMem` maps whole allocations.
    pub partial_map: bool,
    /// One `set_access` call may cover several adjacent mappings. True on CUDA and host. False
    /// on ACL, where `aclrtMemSetAccess` takes exactly one mapping's range.
    pub access_spans_mappings: bool,
    /// One reservation may hold both chunks created in this process and imported ones. False
    /// on ACL.
    pub mixed_origins: bool,
    /// A process may import a handle that it exported itself. True on host (and on the CUDA
    /// drivers we run on). False on ACL, which shares only across processes.
    pub import_in_exporting_process: bool,
}

impl Capabilities {
    /// Everything allowed: the host and CUDA backends.
    pub const UNRESTRICTED: Capabilities = Capabilities {
        partial_map: true,
        access_spans_mappings: true,
        mixed_origins: true,
        import_in_exporting_process: true,
    };

    /// The rules of Ascend ACL's virtual memory API (see the [module docs](self)).
    pub const ACL: Capabilities = Capabilities {
        partial_map: false,
        access_spans_mappings: false,
        mixed_origins: false,
        import_in_exporting_process: false,
    };
}

/// How an exported chunk crosses a process boundary.
///
/// [`crate::ipc`] is generic over it. A [`WireHandle::Fd`] rides in `SCM_RIGHTS` and grants
/// access by being held. A [`WireHandle::Token`] is a plain number in the message and grants
/// nothing by itself: the exporter must whitelist the importer first, so the importer says who it
/// is before the exporter exports ([`ShareableHandle::NAMES_IMPORTER`]).
pub trait ShareableHandle: Send + fmt::Debug + Sized + 'static {
    /// Whether the exporter must know the importing process before it exports. When true,
    /// [`crate::ipc::recv_chunks`] first sends this process's [`ProcessId`], and
    /// [`crate::ipc::send_chunks`] waits for it.
    const NAMES_IMPORTER: bool;

    /// The handle as it goes on the wire.
    fn into_wire(self) -> WireHandle;

    /// The handle back from the wire; a handle of the other kind is [`VmmError::BadHandle`].
    fn from_wire(wire: WireHandle) -> Result<Self, VmmError>;
}

/// A shareable handle in transit: what [`crate::ipc`] sends and receives.
#[derive(Debug)]
pub enum WireHandle {
    /// A file descriptor (host memfd, CUDA POSIX fd), passed with `SCM_RIGHTS`.
    Fd(OwnedFd),
    /// A number (ACL's shareable handle), sent in the message body.
    Token(u64),
}

impl WireHandle {
    /// `"fd"` or `"token"`, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            WireHandle::Fd(_) => "fd",
            WireHandle::Token(_) => "token",
        }
    }
}

impl ShareableHandle for OwnedFd {
    const NAMES_IMPORTER: bool = false;

    fn into_wire(self) -> WireHandle {
        WireHandle::Fd(self)
    }

    fn from_wire(wire: WireHandle) -> Result<Self, VmmError> {
        match wire {
            WireHandle::Fd(fd) => Ok(fd),
            other => Err(VmmError::BadHandle(format!(
                "expected a file descriptor, got a {}: the peer runs another backend",
                other.kind()
            ))),
        }
    }
}

/// A shareable handle that is a number, valid only for the processes the exporter whitelisted:
/// ACL's `aclrtMemExportToShareableHandle` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandleToken(pub u64);

impl ShareableHandle for HandleToken {
    const NAMES_IMPORTER: bool = true;

    fn into_wire(self) -> WireHandle {
        WireHandle::Token(self.0)
    }

    fn from_wire(wire: WireHandle) -> Result<Self, VmmError> {
        match wire {
            WireHandle::Token(t) => Ok(HandleToken(t)),
            other => Err(VmmError::BadHandle(format!(
                "expected a handle token, got a {}: the peer runs another backend",
                other.kind()
            ))),
        }
    }
}

/// A device virtual-memory backend: the raw layer under [`crate::Vmm`]. See the
/// [module docs](self) for how each method maps to CUDA, host and ACL calls.
///
/// Each method validates its arguments (device, alignment, bounds) and returns a typed error.
/// State-dependent rules (is this range already mapped, is this chunk still in use) are the safe
/// layer's job; a backend may or may not check them.
///
/// All sizes and offsets must be multiples of [`Backend::granularity`].
///
/// Contract with the safe layer, which lets the strictest backend (ACL) implement every method
/// faithfully:
/// - `unmap` is called with exactly the `(offset, len)` of one earlier successful `map`;
/// - `set_access` is called on mapped ranges only. When [`Capabilities::access_spans_mappings`]
///   is false, each call covers exactly one mapping;
/// - `map` is called with `chunk_offset == 0` and `len` equal to the chunk's size when
///   [`Capabilities::partial_map`] is false;
/// - `release` and `free` are called only after every mapping of the chunk or in the
///   reservation is gone.
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// A physical chunk of device memory.
    type Chunk: Send + Sync + fmt::Debug;
    /// A reserved range of device virtual addresses.
    type Reservation: Send + Sync + fmt::Debug;
    /// What [`Backend::export`] gives and [`Backend::import`] takes: an `OwnedFd` (host, CUDA)
    /// or a [`HandleToken`] (ACL).
    type ShareableHandle: ShareableHandle;

    /// What this backend allows beyond the common rules. The default is
    /// [`Capabilities::UNRESTRICTED`] (host and CUDA semantics).
    fn capabilities(&self) -> Capabilities {
        Capabilities::UNRESTRICTED
    }
    /// How many devices this backend drives (`dev0..devN`).
    fn device_count(&self) -> usize;
    /// The allocation granularity of `dev` in bytes (a power of two).
    fn granularity(&self, dev: DeviceId) -> Result<usize, VmmError>;
    /// Allocates a physical chunk of `size` bytes on `dev`. `exportable` chunks can be shared with
    /// other processes through [`Backend::export`].
    fn create(&self, dev: DeviceId, size: usize, exportable: bool)
        -> Result<Self::Chunk, VmmError>;
    /// Releases a chunk. Mappings of it that still exist keep the memory until they are unmapped.
    fn release(&self, chunk: Self::Chunk) -> Result<(), VmmError>;
    /// Reserves `size` bytes of virtual address space, aligned to the granularity, for `dev`.
    fn reserve(&self, dev: DeviceId, size: usize) -> Result<Self::Reservation, VmmError>;
    /// Frees a reservation. Everything in it must have been unmapped first.
    fn free(&self, r: Self::Reservation) -> Result<(), VmmError>;
    /// Maps `c[chunk_offset..chunk_offset + len]` at `r.base() + offset`. The mapped range is not
    /// accessible until [`Backend::set_access`] grants it. Without
    /// [`Capabilities::partial_map`], only the whole chunk (`chunk_offset == 0`, `len` its size).
    fn map(
        &self,
        r: &Self::Reservation,
        offset: usize,
        c: &Self::Chunk,
        chunk_offset: usize,
        len: usize,
    ) -> Result<(), VmmError>;
    /// Unmaps the mapping at `[offset, offset + len)` of `r` (exactly one earlier `map`'s range).
    /// The range goes back to reserved, inaccessible address space (never a hole another
    /// allocation could take).
    fn unmap(&self, r: &Self::Reservation, offset: usize, len: usize) -> Result<(), VmmError>;
    /// Makes the mapped range `[offset, offset + len)` of `r` readable and writable from `devices`.
    fn set_access(
        &self,
        r: &Self::Reservation,
        offset: usize,
        len: usize,
        devices: &[DeviceId],
    ) -> Result<(), VmmError>;
    /// Exports an exportable chunk so that another process can import it. `importers` are the
    /// processes allowed to import it. Backends whose handle grants access by being held (fds)
    /// ignore the list; whitelisting backends (ACL) refuse an empty one with
    /// [`VmmError::NoImporters`].
    fn export(
        &self,
        c: &Self::Chunk,
        importers: &[ProcessId],
    ) -> Result<Self::ShareableHandle, VmmError>;
    /// Imports a chunk of `size` bytes on `dev` from a handle made by [`Backend::export`] in
    /// another process (or in this one, where [`Capabilities::import_in_exporting_process`]).
    fn import(
        &self,
        dev: DeviceId,
        handle: Self::ShareableHandle,
        size: usize,
    ) -> Result<Self::Chunk, VmmError>;
    /// The device virtual address of the start of `r`.
    fn base(&self, r: &Self::Reservation) -> u64;
    /// `(free, total)` bytes of `dev`'s memory.
    fn mem_info(&self, dev: DeviceId) -> Result<(usize, usize), VmmError>;
    /// This process as [`Backend::export`]'s `importers` name it. The default is the operating
    /// system's pid.
    fn process_id(&self) -> Result<ProcessId, VmmError> {
        Ok(ProcessId::current())
    }
}
