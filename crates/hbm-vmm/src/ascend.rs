//! The Ascend backend (feature `ascend`): ACL's virtual memory API (`aclrtReserveMemAddress`,
//! `aclrtMallocPhysical`, `aclrtMapMem`, ...) in `libascendcl.so`, loaded at run time with
//! `dlopen`.
//!
//! It builds on any Linux machine, with no CANN toolkit present. A missing library is
//! [`VmmError::NoDriver`] from [`AscendBackend::new`], never a link error or a panic. It has not
//! run on an NPU yet. The declarations below follow CANN's `acl/acl_rt.h` (CANN 8 and 9); the
//! [`crate::backend`] docs map each trait method to its calls and say how the trait absorbs
//! ACL's rules. The backend states them as [`Capabilities::ACL`] and checks them itself too,
//! with the same typed errors as the safe layer:
//! - a chunk maps only whole ([`VmmError::PartialMapUnsupported`]);
//! - `unmap` and `set_access` take exactly one mapping;
//! - a reservation holds either local or imported chunks ([`VmmError::MixedOrigins`]);
//! - exports name their importers ([`VmmError::NoImporters`]), and one allocation has one
//!   shareable handle per process. A second export extends the whitelist;
//! - a process does not import its own export ([`VmmError::Unsupported`]).
//!
//! Every call first makes the device's default context current on the calling thread
//! (`aclrtSetCurrentContext`). Those contexts come from `aclrtSetDevice` in
//! [`AscendBackend::new`], and `aclrtResetDevice` balances them when the backend drops, after
//! every chunk and reservation (they keep the [`crate::Vmm`] alive).
//!
//! Not covered yet: copies and kernels (a `p2p_xfer::Transport` over `aclrtMemcpyAsync` would
//! take [`AscendBackend::bind`] like the CUDA transport takes `CudaBackend::bind`).

use crate::{
    check_aligned, check_range, Backend, Capabilities, DeviceId, HandleToken, ProcessId, VmmError,
};
use std::collections::{BTreeMap, HashSet};
use std::ffi::c_void;
use std::fmt;
use std::sync::{Mutex, OnceLock, PoisonError};

/// Raw declarations of the part of `acl/acl_rt.h` this backend uses, and the loader.
mod sys {
    use std::ffi::{c_char, c_int, c_void, CStr};

    pub(super) type AclError = c_int;
    pub(super) type DrvMemHandle = *mut c_void;
    pub(super) type Context = *mut c_void;

    pub(super) const ACL_SUCCESS: AclError = 0;
    pub(super) const ACL_ERROR_REPEAT_INITIALIZE: AclError = 100_002;
    pub(super) const ACL_ERROR_RT_MEMORY_ALLOCATION: AclError = 207_001;

    /// `aclrtMemHandleType::ACL_MEM_HANDLE_TYPE_NONE`.
    pub(super) const HANDLE_TYPE_NONE: c_int = 0;
    /// `aclrtMemAllocationType::ACL_MEM_ALLOCATION_TYPE_PINNED`.
    pub(super) const ALLOCATION_TYPE_PINNED: c_int = 0;
    /// `aclrtMemAttr::ACL_HBM_MEM` (for `aclrtGetMemInfo`).
    pub(super) const HBM_MEM: c_int = 1;
    /// `aclrtMemAttr::ACL_HBM_MEM_HUGE`: 2 MiB pages of HBM.
    pub(super) const HBM_MEM_HUGE: c_int = 4;
    /// `aclrtMemLocationType::ACL_MEM_LOCATION_TYPE_DEVICE`.
    pub(super) const LOCATION_TYPE_DEVICE: c_int = 1;
    /// `aclrtMemGranularityOptions::ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM`.
    pub(super) const GRANULARITY_MINIMUM: c_int = 0;
    /// `aclrtMemAccessFlags::ACL_RT_MEM_ACCESS_FLAGS_READWRITE`.
    pub(super) const ACCESS_READWRITE: c_int = 0x3;
    /// `ACL_RT_VMM_EXPORT_FLAG_DEFAULT`: importers are checked against the pid whitelist.
    pub(super) const VMM_EXPORT_FLAG_DEFAULT: u64 = 0;

    /// `aclrtMemLocation`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub(super) struct MemLocation {
        pub(super) id: u32,
        pub(super) type_: c_int,
    }

    /// `aclrtPhysicalMemProp`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub(super) struct PhysicalMemProp {
        pub(super) handle_type: c_int,
        pub(super) allocation_type: c_int,
        pub(super) mem_attr: c_int,
        pub(super) location: MemLocation,
        pub(super) reserve: u64,
    }

    /// `aclrtMemAccessDesc`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub(super) struct MemAccessDesc {
        pub(super) flags: c_int,
        pub(super) location: MemLocation,
        pub(super) rsv: [u8; 12],
    }

    /// The entry points, resolved from `libascendcl.so`.
    #[derive(Debug)]
    pub(super) struct Acl {
        pub(super) init: unsafe extern "C" fn(*const c_char) -> AclError,
        pub(super) get_device_count: unsafe extern "C" fn(*mut u32) -> AclError,
        pub(super) set_device: unsafe extern "C" fn(i32) -> AclError,
        pub(super) reset_device: unsafe extern "C" fn(i32) -> AclError,
        pub(super) get_current_context: unsafe extern "C" fn(*mut Context) -> AclError,
        pub(super) set_current_context: unsafe extern "C" fn(Context) -> AclError,
        pub(super) device_enable_peer_access: unsafe extern "C" fn(i32, u32) -> AclError,
        pub(super) get_mem_info: unsafe extern "C" fn(c_int, *mut usize, *mut usize) -> AclError,
        pub(super) mem_get_allocation_granularity:
            unsafe extern "C" fn(*mut PhysicalMemProp, c_int, *mut usize) -> AclError,
        pub(super) malloc_physical:
            unsafe extern "C" fn(*mut DrvMemHandle, usize, *const PhysicalMemProp, u64) -> AclError,
        pub(super) free_physical: unsafe extern "C" fn(DrvMemHandle) -> AclError,
        pub(super) reserve_mem_address:
            unsafe extern "C" fn(*mut *mut c_void, usize, usize, *mut c_void, u64) -> AclError,
        pub(super) release_mem_address: unsafe extern "C" fn(*mut c_void) -> AclError,
        pub(super) map_mem:
            unsafe extern "C" fn(*mut c_void, usize, usize, DrvMemHandle, u64) -> AclError,
        pub(super) unmap_mem: unsafe extern "C" fn(*mut c_void) -> AclError,
        pub(super) mem_set_access:
            unsafe extern "C" fn(*mut c_void, usize, *mut MemAccessDesc, usize) -> AclError,
        pub(super) mem_export_to_shareable_handle:
            unsafe extern "C" fn(DrvMemHandle, c_int, u64, *mut u64) -> AclError,
        pub(super) mem_set_pid_to_shareable_handle:
            unsafe extern "C" fn(u64, *mut i32, usize) -> AclError,
        pub(super) mem_import_from_shareable_handle:
            unsafe extern "C" fn(u64, i32, *mut DrvMemHandle) -> AclError,
        pub(super) device_get_bare_tgid: unsafe extern "C" fn(*mut i32) -> AclError,
    }

    /// Resolves `name` in `lib` as a function pointer of type `F`.
    ///
    /// # Safety
    ///
    /// `lib` is a live handle from `dlopen`, and `F` is an `unsafe extern "C" fn` type whose
    /// signature is the C declaration of `name`.
    unsafe fn sym<F: Copy>(lib: *mut c_void, name: &CStr) -> Result<F, String> {
        assert_eq!(
            std::mem::size_of::<F>(),
            std::mem::size_of::<*mut c_void>(),
            "symbols resolve to function pointers"
        );
        // SAFETY: `lib` is live (caller's contract) and `name` is NUL-terminated.
        let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
        if p.is_null() {
            return Err(format!(
                "libascendcl.so has no {}; this CANN is too old for the VMM API",
                name.to_string_lossy()
            ));
        }
        // SAFETY: `p` is the address of the function `name`, and `F` is a function pointer type
        // of the same size with that function's signature (caller's contract).
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }

    impl Acl {
        /// Opens `libascendcl.so` (kept open for the life of the process) and resolves every
        /// entry point.
        pub(super) fn load() -> Result<Acl, String> {
            // SAFETY: dlopen with a NUL-terminated name; loading the library runs its
            // initialisers, which is what using ACL means.
            let lib = unsafe { libc::dlopen(c"libascendcl.so".as_ptr(), libc::RTLD_NOW) };
            if lib.is_null() {
                return Err("libascendcl.so was not found; install CANN and source its \
                            set_env.sh, or run on an Ascend machine"
                    .into());
            }
            // SAFETY: `lib` is live and never closed; each type below is the signature of the
            // symbol's declaration in acl/acl_rt.h (or acl/acl.h for aclInit).
            unsafe {
                Ok(Acl {
                    init: sym(lib, c"aclInit")?,
                    get_device_count: sym(lib, c"aclrtGetDeviceCount")?,
                    set_device: sym(lib, c"aclrtSetDevice")?,
                    reset_device: sym(lib, c"aclrtResetDevice")?,
                    get_current_context: sym(lib, c"aclrtGetCurrentContext")?,
                    set_current_context: sym(lib, c"aclrtSetCurrentContext")?,
                    device_enable_peer_access: sym(lib, c"aclrtDeviceEnablePeerAccess")?,
                    get_mem_info: sym(lib, c"aclrtGetMemInfo")?,
                    mem_get_allocation_granularity: sym(lib, c"aclrtMemGetAllocationGranularity")?,
                    malloc_physical: sym(lib, c"aclrtMallocPhysical")?,
                    free_physical: sym(lib, c"aclrtFreePhysical")?,
                    reserve_mem_address: sym(lib, c"aclrtReserveMemAddress")?,
                    release_mem_address: sym(lib, c"aclrtReleaseMemAddress")?,
                    map_mem: sym(lib, c"aclrtMapMem")?,
                    unmap_mem: sym(lib, c"aclrtUnmapMem")?,
                    mem_set_access: sym(lib, c"aclrtMemSetAccess")?,
                    mem_export_to_shareable_handle: sym(lib, c"aclrtMemExportToShareableHandle")?,
                    mem_set_pid_to_shareable_handle: sym(lib, c"aclrtMemSetPidToShareableHandle")?,
                    mem_import_from_shareable_handle: sym(
                        lib,
                        c"aclrtMemImportFromShareableHandle",
                    )?,
                    device_get_bare_tgid: sym(lib, c"aclrtDeviceGetBareTgid")?,
                })
            }
        }
    }
}

/// Loads ACL once per process.
fn acl() -> Result<&'static sys::Acl, VmmError> {
    static ACL: OnceLock<Result<sys::Acl, String>> = OnceLock::new();
    ACL.get_or_init(sys::Acl::load)
        .as_ref()
        .map_err(|e| VmmError::NoDriver(e.clone()))
}

/// Turns an ACL result into `Ok` or [`VmmError::Driver`].
fn check(call: &'static str, r: sys::AclError) -> Result<(), VmmError> {
    if r == sys::ACL_SUCCESS {
        Ok(())
    } else {
        Err(VmmError::Driver { call, code: r })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A device's default context. Raw pointers are neither `Send` nor `Sync`; ACL contexts may be
/// made current on any thread.
#[derive(Clone, Copy)]
struct Ctx(sys::Context);

// SAFETY: an ACL context handle may be made current on, and used from, any thread; the runtime
// synchronises internally. We never dereference the pointer ourselves.
unsafe impl Send for Ctx {}
// SAFETY: as above; sharing the handle only lets other threads pass it to the runtime.
unsafe impl Sync for Ctx {}

struct Device {
    id: i32,
    ctx: Ctx,
    granularity: usize,
}

/// The Ascend backend: one entry per visible NPU, `DeviceId(i)` being ACL device `i`.
pub struct AscendBackend {
    acl: &'static sys::Acl,
    devices: Vec<Device>,
    /// `(accessor, owner)` pairs with `aclrtDeviceEnablePeerAccess` done.
    peers: Mutex<HashSet<(i32, i32)>>,
    /// Shareable handles exported by this process, which it may not import itself.
    exported: Mutex<HashSet<u64>>,
}

impl fmt::Debug for AscendBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AscendBackend")
            .field("devices", &self.devices.len())
            .field(
                "granularity",
                &self
                    .devices
                    .iter()
                    .map(|d| d.granularity)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// An `aclrtDrvMemHandle`.
#[derive(Debug, Clone, Copy)]
struct MemHandle(sys::DrvMemHandle);

// SAFETY: a physical memory handle is an opaque token that the runtime accepts from any thread;
// we never dereference it.
unsafe impl Send for MemHandle {}
// SAFETY: as above.
unsafe impl Sync for MemHandle {}

/// The shareable handle of a chunk and the processes allowed to import it.
#[derive(Debug)]
struct Shared {
    token: u64,
    whitelist: Vec<i32>,
}

/// An `aclrtMallocPhysical` allocation, or one imported with
/// `aclrtMemImportFromShareableHandle`.
#[derive(Debug)]
pub struct AscendChunk {
    handle: MemHandle,
    dev: DeviceId,
    size: usize,
    exportable: bool,
    imported: bool,
    /// ACL gives one shareable handle per allocation per process: kept after the first export.
    shared: Mutex<Option<Shared>>,
}

/// An `aclrtReserveMemAddress` range, with its live mappings (ACL unmaps and grants access by
/// whole mapping).
#[derive(Debug)]
pub struct AscendReservation {
    ptr: u64,
    len: usize,
    dev: DeviceId,
    state: Mutex<ResState>,
}

#[derive(Debug, Default)]
struct ResState {
    /// offset -> len.
    mapped: BTreeMap<usize, usize>,
    /// Whether the live mappings are imported chunks (`None` while nothing is mapped).
    imported: Option<bool>,
}

impl AscendBackend {
    /// Loads `libascendcl.so`, initialises ACL and opens every visible NPU.
    ///
    /// Errors: [`VmmError::NoDriver`] when the library or one of its VMM entry points is
    /// missing, `aclInit` fails, or no NPU is visible.
    pub fn new() -> Result<Self, VmmError> {
        let acl = acl()?;
        // SAFETY: a null config path means "no configuration file"; a second aclInit in the
        // process reports REPEAT_INITIALIZE, which is fine.
        let r = unsafe { (acl.init)(std::ptr::null()) };
        if r != sys::ACL_SUCCESS && r != sys::ACL_ERROR_REPEAT_INITIALIZE {
            return Err(VmmError::NoDriver(format!("aclInit failed with code {r}")));
        }
        let mut count = 0u32;
        // SAFETY: `count` is a valid out-pointer for the call.
        let r = unsafe { (acl.get_device_count)(&mut count) };
        if r != sys::ACL_SUCCESS || count == 0 {
            return Err(VmmError::NoDriver(format!(
                "ACL sees no NPU (aclrtGetDeviceCount: code {r}, count {count})"
            )));
        }
        let mut backend = AscendBackend {
            acl,
            devices: Vec::with_capacity(count as usize),
            peers: Mutex::new(HashSet::new()),
            exported: Mutex::new(HashSet::new()),
        };
        for id in 0..count as i32 {
            // SAFETY: `id` is below the device count.
            check("aclrtSetDevice", unsafe { (acl.set_device)(id) })?;
            // Pushed before anything else can fail, so that Drop resets it.
            backend.devices.push(Device {
                id,
                ctx: Ctx(std::ptr::null_mut()),
                granularity: 0,
            });
            let mut ctx: sys::Context = std::ptr::null_mut();
            // SAFETY: `ctx` is a valid out-pointer; aclrtSetDevice just made this device's
            // default context current on this thread.
            check("aclrtGetCurrentContext", unsafe {
                (acl.get_current_context)(&mut ctx)
            })?;
            let mut prop = phys_prop(id);
            let mut granularity = 0usize;
            // SAFETY: both pointers are valid for the duration of the call.
            check("aclrtMemGetAllocationGranularity", unsafe {
                (acl.mem_get_allocation_granularity)(
                    &mut prop,
                    sys::GRANULARITY_MINIMUM,
                    &mut granularity,
                )
            })?;
            if !granularity.is_power_of_two() {
                return Err(VmmError::Driver {
                    call: "aclrtMemGetAllocationGranularity",
                    code: -1,
                });
            }
            if let Some(d) = backend.devices.last_mut() {
                d.ctx = Ctx(ctx);
                d.granularity = granularity;
            }
        }
        Ok(backend)
    }

    fn device(&self, dev: DeviceId) -> Result<&Device, VmmError> {
        self.devices
            .get(dev.index())
            .ok_or(VmmError::NoSuchDevice(dev))
    }

    /// Makes `dev`'s default context current on the calling thread, for callers that issue
    /// their own ACL calls (copies, kernels).
    pub fn bind(&self, dev: DeviceId) -> Result<(), VmmError> {
        let d = self.device(dev)?;
        // SAFETY: the context is the device's default context, valid until `self` drops
        // (aclrtResetDevice runs in Drop).
        check("aclrtSetCurrentContext", unsafe {
            (self.acl.set_current_context)(d.ctx.0)
        })
    }

    fn check_size(
        &self,
        dev: DeviceId,
        what: &'static str,
        size: usize,
    ) -> Result<&Device, VmmError> {
        let d = self.device(dev)?;
        if size == 0 {
            return Err(VmmError::ZeroSize { what });
        }
        check_aligned(what, size, d.granularity)?;
        Ok(d)
    }

    fn check_sub_range(
        &self,
        r: &AscendReservation,
        offset: usize,
        len: usize,
    ) -> Result<(), VmmError> {
        let d = self.check_size(r.dev, "len", len)?;
        check_aligned("offset", offset, d.granularity)?;
        check_range("reservation", offset, len, r.len)
    }

    /// `Ok` if `[offset, offset + len)` is exactly one live mapping of `r`.
    fn check_one_mapping(
        r: &AscendReservation,
        state: &ResState,
        offset: usize,
        len: usize,
    ) -> Result<(), VmmError> {
        match state.mapped.get(&offset) {
            Some(&l) if l == len => Ok(()),
            _ => Err(VmmError::NotMapped {
                device: r.dev,
                addr: r.ptr + offset as u64,
                len,
            }),
        }
    }

    /// Lets `accessor` reach memory on `owner` (once per pair).
    fn enable_peer(&self, accessor: DeviceId, owner: DeviceId) -> Result<(), VmmError> {
        let (a, o) = (self.device(accessor)?.id, self.device(owner)?.id);
        let mut peers = lock(&self.peers);
        if a == o || peers.contains(&(a, o)) {
            return Ok(());
        }
        self.bind(accessor)?;
        // SAFETY: `o` is a valid device id; flags must be 0.
        check("aclrtDeviceEnablePeerAccess", unsafe {
            (self.acl.device_enable_peer_access)(o, 0)
        })?;
        peers.insert((a, o));
        Ok(())
    }
}

fn phys_prop(id: i32) -> sys::PhysicalMemProp {
    sys::PhysicalMemProp {
        handle_type: sys::HANDLE_TYPE_NONE,
        allocation_type: sys::ALLOCATION_TYPE_PINNED,
        mem_attr: sys::HBM_MEM_HUGE,
        location: sys::MemLocation {
            id: id as u32,
            type_: sys::LOCATION_TYPE_DEVICE,
        },
        reserve: 0,
    }
}

impl Drop for AscendBackend {
    fn drop(&mut self) {
        for d in &self.devices {
            // SAFETY: each device was set exactly once in `new`. Errors are ignored: Drop must
            // not panic and there is nobody left to tell.
            let _ = unsafe { (self.acl.reset_device)(d.id) };
        }
    }
}

impl Backend for AscendBackend {
    type Chunk = AscendChunk;
    type Reservation = AscendReservation;
    type ShareableHandle = HandleToken;

    fn capabilities(&self) -> Capabilities {
        Capabilities::ACL
    }

    fn device_count(&self) -> usize {
        self.devices.len()
    }

    fn granularity(&self, dev: DeviceId) -> Result<usize, VmmError> {
        Ok(self.device(dev)?.granularity)
    }

    /// `aclrtMallocPhysical`. ACL needs no handle type for sharing; `exportable` is kept so that
    /// the safe layer's rule holds on every backend.
    fn create(
        &self,
        dev: DeviceId,
        size: usize,
        exportable: bool,
    ) -> Result<AscendChunk, VmmError> {
        let d = self.check_size(dev, "size", size)?;
        self.bind(dev)?;
        let prop = phys_prop(d.id);
        let mut handle: sys::DrvMemHandle = std::ptr::null_mut();
        // SAFETY: `handle` and `prop` are valid for the call; `size` is a positive multiple of
        // the granularity; flags must be 0.
        let r = unsafe { (self.acl.malloc_physical)(&mut handle, size, &prop, 0) };
        if r == sys::ACL_ERROR_RT_MEMORY_ALLOCATION {
            let available = self.mem_info(dev).map(|(free, _)| free).unwrap_or(0);
            return Err(VmmError::OutOfMemory {
                device: dev,
                requested: size,
                available,
            });
        }
        check("aclrtMallocPhysical", r)?;
        Ok(AscendChunk {
            handle: MemHandle(handle),
            dev,
            size,
            exportable,
            imported: false,
            shared: Mutex::new(None),
        })
    }

    fn release(&self, chunk: AscendChunk) -> Result<(), VmmError> {
        if let Some(s) = lock(&chunk.shared).take() {
            lock(&self.exported).remove(&s.token);
        }
        self.bind(chunk.dev)?;
        // SAFETY: the handle came from aclrtMallocPhysical or aclrtMemImportFromShareableHandle
        // and is consumed here, so it is freed exactly once, after its last mapping.
        check("aclrtFreePhysical", unsafe {
            (self.acl.free_physical)(chunk.handle.0)
        })
    }

    fn reserve(&self, dev: DeviceId, size: usize) -> Result<AscendReservation, VmmError> {
        let d = self.check_size(dev, "size", size)?;
        self.bind(dev)?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; alignment 0, no expected address and flags 0
        // are the documented defaults.
        check("aclrtReserveMemAddress", unsafe {
            (self.acl.reserve_mem_address)(&mut ptr, size, 0, std::ptr::null_mut(), 0)
        })?;
        if !(ptr as usize).is_multiple_of(d.granularity) {
            // SAFETY: `ptr` was just reserved and nothing is mapped in it.
            let _ = unsafe { (self.acl.release_mem_address)(ptr) };
            return Err(VmmError::Driver {
                call: "aclrtReserveMemAddress (address not aligned to the granularity)",
                code: -1,
            });
        }
        Ok(AscendReservation {
            ptr: ptr as u64,
            len: size,
            dev,
            state: Mutex::new(ResState::default()),
        })
    }

    fn free(&self, r: AscendReservation) -> Result<(), VmmError> {
        self.bind(r.dev)?;
        // SAFETY: the range came from aclrtReserveMemAddress and is consumed here; the safe
        // layer frees it only after every mapping in it is gone.
        check("aclrtReleaseMemAddress", unsafe {
            (self.acl.release_mem_address)(r.ptr as *mut c_void)
        })
    }

    fn map(
        &self,
        r: &AscendReservation,
        offset: usize,
        c: &AscendChunk,
        chunk_offset: usize,
        len: usize,
    ) -> Result<(), VmmError> {
        self.check_sub_range(r, offset, len)?;
        if c.dev != r.dev {
            return Err(VmmError::DeviceMismatch {
                expected: r.dev,
                found: c.dev,
            });
        }
        if chunk_offset != 0 || len != c.size {
            return Err(VmmError::PartialMapUnsupported {
                chunk_offset,
                len,
                chunk_size: c.size,
            });
        }
        let mut state = lock(&r.state);
        if state.imported.is_some_and(|i| i != c.imported) {
            return Err(VmmError::MixedOrigins {
                device: r.dev,
                adding: if c.imported { "imported" } else { "local" },
            });
        }
        self.bind(r.dev)?;
        // SAFETY: the target range lies inside our reservation (checked above) and the whole
        // allocation is mapped at offset 0, as aclrtMapMem requires; the handle is live while
        // `c` is borrowed; flags must be 0.
        check("aclrtMapMem", unsafe {
            (self.acl.map_mem)(
                (r.ptr + offset as u64) as *mut c_void,
                len,
                0,
                c.handle.0,
                0,
            )
        })?;
        state.mapped.insert(offset, len);
        state.imported = Some(c.imported);
        Ok(())
    }

    fn unmap(&self, r: &AscendReservation, offset: usize, len: usize) -> Result<(), VmmError> {
        self.check_sub_range(r, offset, len)?;
        let mut state = lock(&r.state);
        Self::check_one_mapping(r, &state, offset, len)?;
        self.bind(r.dev)?;
        // SAFETY: exactly one live mapping starts at this address (checked above); the safe
        // layer unmaps only ranges that no view uses any more.
        check("aclrtUnmapMem", unsafe {
            (self.acl.unmap_mem)((r.ptr + offset as u64) as *mut c_void)
        })?;
        state.mapped.remove(&offset);
        if state.mapped.is_empty() {
            state.imported = None;
        }
        Ok(())
    }

    fn set_access(
        &self,
        r: &AscendReservation,
        offset: usize,
        len: usize,
        devices: &[DeviceId],
    ) -> Result<(), VmmError> {
        self.check_sub_range(r, offset, len)?;
        Self::check_one_mapping(r, &lock(&r.state), offset, len)?;
        if devices.is_empty() {
            return Err(VmmError::Unsupported(
                "revoking access: ACL's aclrtMemSetAccess documents read-write access only",
            ));
        }
        let mut descs = Vec::with_capacity(devices.len());
        for &d in devices {
            self.enable_peer(d, r.dev)?;
            descs.push(sys::MemAccessDesc {
                flags: sys::ACCESS_READWRITE,
                location: sys::MemLocation {
                    id: self.device(d)?.id as u32,
                    type_: sys::LOCATION_TYPE_DEVICE,
                },
                rsv: [0; 12],
            });
        }
        self.bind(r.dev)?;
        // SAFETY: the range is exactly one live mapping (checked above), as aclrtMemSetAccess
        // requires; `descs` is valid for the call.
        check("aclrtMemSetAccess", unsafe {
            (self.acl.mem_set_access)(
                (r.ptr + offset as u64) as *mut c_void,
                len,
                descs.as_mut_ptr(),
                descs.len(),
            )
        })
    }

    /// `aclrtMemExportToShareableHandle` (whitelist checking on), then
    /// `aclrtMemSetPidToShareableHandle` with every importer named so far.
    fn export(&self, c: &AscendChunk, importers: &[ProcessId]) -> Result<HandleToken, VmmError> {
        if !c.exportable {
            return Err(VmmError::NotExportable);
        }
        if importers.is_empty() {
            return Err(VmmError::NoImporters);
        }
        if c.imported {
            return Err(VmmError::Unsupported(
                "exporting an imported chunk: ACL exports aclrtMallocPhysical allocations only",
            ));
        }
        self.bind(c.dev)?;
        let mut shared = lock(&c.shared);
        let s = match &mut *shared {
            Some(s) => s,
            None => {
                let mut token = 0u64;
                // SAFETY: the handle is a live aclrtMallocPhysical allocation, exported once
                // (later exports reuse the token); `token` is a valid out-pointer.
                check("aclrtMemExportToShareableHandle", unsafe {
                    (self.acl.mem_export_to_shareable_handle)(
                        c.handle.0,
                        sys::HANDLE_TYPE_NONE,
                        sys::VMM_EXPORT_FLAG_DEFAULT,
                        &mut token,
                    )
                })?;
                lock(&self.exported).insert(token);
                shared.insert(Shared {
                    token,
                    whitelist: Vec::new(),
                })
            }
        };
        let before = s.whitelist.len();
        for p in importers {
            if !s.whitelist.contains(&p.0) {
                s.whitelist.push(p.0);
            }
        }
        if s.whitelist.len() > before {
            // SAFETY: `token` is this process's live shareable handle; the pointer and length
            // describe `whitelist` for the duration of the call.
            check("aclrtMemSetPidToShareableHandle", unsafe {
                (self.acl.mem_set_pid_to_shareable_handle)(
                    s.token,
                    s.whitelist.as_mut_ptr(),
                    s.whitelist.len(),
                )
            })?;
        }
        Ok(HandleToken(s.token))
    }

    fn import(
        &self,
        dev: DeviceId,
        handle: HandleToken,
        size: usize,
    ) -> Result<AscendChunk, VmmError> {
        let d = self.check_size(dev, "size", size)?;
        if lock(&self.exported).contains(&handle.0) {
            return Err(VmmError::Unsupported(
                "importing a handle in the process that exported it (ACL shares across \
                 processes only); map the original chunk instead",
            ));
        }
        self.bind(dev)?;
        let mut raw: sys::DrvMemHandle = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; the token is a plain number that the runtime
        // validates (unknown or not whitelisted for us: an error code).
        let r = unsafe { (self.acl.mem_import_from_shareable_handle)(handle.0, d.id, &mut raw) };
        if r != sys::ACL_SUCCESS {
            return Err(VmmError::BadHandle(format!(
                "aclrtMemImportFromShareableHandle failed with code {r} (was this process \
                 whitelisted by the exporter, and is the exporter's chunk still alive?)"
            )));
        }
        Ok(AscendChunk {
            handle: MemHandle(raw),
            dev,
            size,
            exportable: true,
            imported: true,
            shared: Mutex::new(None),
        })
    }

    fn base(&self, r: &AscendReservation) -> u64 {
        r.ptr
    }

    fn mem_info(&self, dev: DeviceId) -> Result<(usize, usize), VmmError> {
        self.bind(dev)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both are valid out-pointers for the call.
        check("aclrtGetMemInfo", unsafe {
            (self.acl.get_mem_info)(sys::HBM_MEM, &mut free, &mut total)
        })?;
        Ok((free, total))
    }

    /// `aclrtDeviceGetBareTgid`: the id ACL's whitelists use, right inside containers too.
    fn process_id(&self) -> Result<ProcessId, VmmError> {
        let mut pid = 0i32;
        // SAFETY: `pid` is a valid out-pointer for the call.
        check("aclrtDeviceGetBareTgid", unsafe {
            (self.acl.device_get_bare_tgid)(&mut pid)
        })?;
        Ok(ProcessId(pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C layouts the runtime reads (acl/acl_rt.h): a 4-byte enum, `aclrtMemLocation` of 8
    /// bytes, `aclrtPhysicalMemProp` of 32 and `aclrtMemAccessDesc` of 24.
    #[test]
    fn struct_layouts_match_acl_rt_h() {
        assert_eq!(std::mem::size_of::<sys::MemLocation>(), 8);
        assert_eq!(std::mem::size_of::<sys::PhysicalMemProp>(), 32);
        assert_eq!(std::mem::offset_of!(sys::PhysicalMemProp, location), 12);
        assert_eq!(std::mem::offset_of!(sys::PhysicalMemProp, reserve), 24);
        assert_eq!(std::mem::size_of::<sys::MemAccessDesc>(), 24);
    }

    /// Without CANN installed, `new` says so with a typed error instead of failing to link or
    /// panicking. With CANN and an NPU, it opens every device.
    #[test]
    fn new_reports_a_missing_runtime() {
        match AscendBackend::new() {
            Err(VmmError::NoDriver(msg)) => assert!(!msg.is_empty()),
            Ok(b) => assert!(b.device_count() > 0),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
