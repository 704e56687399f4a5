//! The CUDA backend (feature `cuda`): the driver's virtual memory management API through
//! cudarc's raw `driver::sys` bindings, loaded dynamically.
//!
//! - Chunks are `cuMemCreate` allocations (pinned device memory). Exportable chunks request
//!   `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR` at creation; it cannot be added later.
//! - Reservations are `cuMemAddressReserve` ranges aligned to the granularity.
//! - `map`/`unmap` are `cuMemMap`/`cuMemUnmap`; `set_access` is `cuMemSetAccess` with
//!   read-write for each listed device (`cuCtxEnablePeerAccess` does not cover VMM memory).
//! - Every call first makes the device's primary context current on the calling thread. The
//!   primary contexts are retained in [`CudaBackend::new`] and released when the backend drops
//!   (after every chunk and reservation, which keep the [`crate::Vmm`] alive).
//!
//! Teardown order matters on a GPU: synchronise the streams that used a range, unmap, release,
//! then free the reservation. The safe layer guarantees the last three (a mapping keeps its
//! chunk and reservation alive); synchronising streams is the caller's job.
//!
//! Mapped memory can be handed to cudarc's safe APIs through [`DeviceView`] (which implements
//! `DevicePtr`/`DevicePtrMut`); it is never wrapped in a `CudaSlice`, whose destructor would
//! free it.
//!
//! A missing driver library is [`VmmError::NoDriver`], never a panic.

use crate::{
    check_aligned, check_range, Backend, DeviceId, Mapping, PagedRegion, ProcessId, VmmError,
};
use cudarc::driver::sys::{
    self, cudaError_enum as CUresult, CUcontext, CUdevice, CUdeviceptr,
    CUmemAccess_flags_enum as AccessFlags, CUmemAllocationGranularity_flags_enum as GranFlags,
    CUmemAllocationHandleType_enum as HandleType, CUmemAllocationType_enum as AllocType,
    CUmemGenericAllocationHandle, CUmemLocationType_enum as LocType,
};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use std::ffi::{c_int, c_void};
use std::fmt;
use std::marker::PhantomData;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;

/// The GPUs a hardware-in-the-loop run demands: the environment variable `HIL_REQUIRE_GPUS`
/// (0 when unset or not a number). The GPU bundle's `run.sh` sets it to the GPUs the machine has.
pub fn required_gpus() -> usize {
    std::env::var("HIL_REQUIRE_GPUS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Turns a driver result into `Ok` or [`VmmError::Driver`].
fn check(call: &'static str, r: CUresult) -> Result<(), VmmError> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(VmmError::Driver {
            call,
            code: r as i32,
        })
    }
}

/// A retained primary context. Raw pointers are neither `Send` nor `Sync`; the driver's
/// contexts are safe to use from any thread (each thread makes it current before use).
#[derive(Clone, Copy)]
struct Ctx(CUcontext);

// SAFETY: a CUDA context handle may be made current on, and used from, any thread; the driver
// synchronises internally. We never dereference the pointer ourselves.
unsafe impl Send for Ctx {}
// SAFETY: as above; sharing the handle only lets other threads pass it to the driver.
unsafe impl Sync for Ctx {}

struct Device {
    ordinal: c_int,
    cu: CUdevice,
    ctx: Ctx,
    granularity: usize,
}

/// The CUDA backend: one entry per device, `DeviceId(i)` being a *logical* device on a CUDA
/// ordinal. [`CudaBackend::new`] gives every visible GPU once (`DeviceId(i)` on ordinal `i`);
/// [`CudaBackend::logical`] places any number of logical devices on any GPUs, several on one
/// GPU included (`[0, 0, 0, 0]`: four devices on GPU 0). Each logical device has its own
/// chunks, reservations and accounting above this layer; a copy between two logical devices of
/// one GPU is a device-local copy, and access grants name each GPU once.
pub struct CudaBackend {
    devices: Vec<Device>,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
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

/// A `cuMemCreate` allocation.
#[derive(Debug)]
pub struct CudaChunk {
    handle: CUmemGenericAllocationHandle,
    dev: DeviceId,
    size: usize,
    exportable: bool,
}

impl CudaChunk {
    /// The driver's allocation handle.
    pub fn handle(&self) -> CUmemGenericAllocationHandle {
        self.handle
    }
}

/// A `cuMemAddressReserve` range.
#[derive(Debug)]
pub struct CudaReservation {
    ptr: CUdeviceptr,
    len: usize,
    dev: DeviceId,
}

fn alloc_prop(ordinal: c_int, exportable: bool) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: AllocType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: if exportable {
            HandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        } else {
            HandleType::CU_MEM_HANDLE_TYPE_NONE
        },
        location: sys::CUmemLocation {
            type_: LocType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: ordinal,
        },
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

impl CudaBackend {
    /// Initialises the driver and retains the primary context of every visible GPU, one logical
    /// device per GPU.
    ///
    /// Errors: [`VmmError::NoDriver`] when `libcuda` is missing, the driver fails to initialise,
    /// or no GPU is visible.
    pub fn new() -> Result<Self, VmmError> {
        let count = Self::init()?;
        let all: Vec<u32> = (0..count as u32).collect();
        Self::open(&all)
    }

    /// Logical devices on the GPUs `ordinals`: `DeviceId(i)` lives on CUDA ordinal
    /// `ordinals[i]`. An ordinal may repeat (several logical devices on one GPU, which then
    /// share its primary context and memory).
    ///
    /// Errors: [`VmmError::NoDriver`] as [`CudaBackend::new`], or when `ordinals` is empty or
    /// names a GPU the driver does not see.
    pub fn logical(ordinals: &[u32]) -> Result<Self, VmmError> {
        let count = Self::init()?;
        if ordinals.is_empty() {
            return Err(VmmError::NoDriver("no logical device asked for".into()));
        }
        if let Some(o) = ordinals.iter().find(|&&o| o as usize >= count) {
            return Err(VmmError::NoDriver(format!(
                "GPU {o} asked for, the driver sees {count}"
            )));
        }
        Self::open(ordinals)
    }

    /// At least `devices` logical devices on the GPUs present: every GPU once where there are
    /// enough, otherwise `devices` logical devices dealt round-robin over the GPUs (all on GPU 0
    /// of a one-GPU machine). Multi-device code and its tests run this way on machines with
    /// fewer GPUs.
    ///
    /// Errors: [`VmmError::NoDriver`] as [`CudaBackend::new`].
    pub fn at_least(devices: usize) -> Result<Self, VmmError> {
        let gpus = Self::init()?;
        if gpus >= devices {
            let all: Vec<u32> = (0..gpus as u32).collect();
            return Self::open(&all);
        }
        let ordinals: Vec<u32> = (0..devices).map(|i| (i % gpus) as u32).collect();
        Self::open(&ordinals)
    }

    /// For hardware-in-the-loop tests: [`CudaBackend::at_least`] `devices`, `Ok(None)` without a
    /// usable GPU (the test reports SKIPPED), or an error when the environment variable
    /// `HIL_REQUIRE_GPUS=N` demands at least `N` GPUs and they are not all there, so that a GPU
    /// test never passes without its GPU.
    pub fn for_hil_test(devices: usize) -> Result<Option<Self>, VmmError> {
        let need = required_gpus();
        match Self::init() {
            Ok(gpus) if gpus >= need => Self::at_least(devices).map(Some),
            Ok(gpus) => Err(VmmError::NoDriver(format!(
                "HIL_REQUIRE_GPUS={need} but the driver sees {gpus} GPU(s)"
            ))),
            Err(e) if need > 0 => Err(VmmError::NoDriver(format!(
                "HIL_REQUIRE_GPUS={need} but no GPU can be used: {e}"
            ))),
            Err(_) => Ok(None),
        }
    }

    /// Loads and initialises the driver; returns the number of visible GPUs.
    fn init() -> Result<usize, VmmError> {
        // SAFETY: only tries to dlopen the driver library; it has no other effect.
        if !unsafe { sys::is_culib_present() } {
            return Err(VmmError::NoDriver(
                "libcuda.so was not found; install the NVIDIA driver or run on a GPU machine"
                    .into(),
            ));
        }
        // SAFETY: cuInit takes no pointers and may be called any number of times.
        let r = unsafe { sys::cuInit(0) };
        if r != CUresult::CUDA_SUCCESS {
            return Err(VmmError::NoDriver(format!(
                "cuInit failed with code {}",
                r as i32
            )));
        }
        let mut count: c_int = 0;
        // SAFETY: `count` is a valid out-pointer for the duration of the call.
        check("cuDeviceGetCount", unsafe {
            sys::cuDeviceGetCount(&mut count)
        })?;
        if count <= 0 {
            return Err(VmmError::NoDriver("the driver sees no CUDA device".into()));
        }
        Ok(count as usize)
    }

    /// Retains the primary context of each ordinal (once per logical device; the driver counts
    /// retains) and reads its granularity. The ordinals are below the driver's count.
    fn open(ordinals: &[u32]) -> Result<Self, VmmError> {
        let mut backend = CudaBackend {
            devices: Vec::with_capacity(ordinals.len()),
        };
        for &ordinal in ordinals {
            let ordinal = ordinal as c_int;
            let mut cu: CUdevice = 0;
            // SAFETY: `cu` is a valid out-pointer; `ordinal` is below the device count.
            check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut cu, ordinal) })?;
            let mut ctx: CUcontext = std::ptr::null_mut();
            // SAFETY: `ctx` is a valid out-pointer; `cu` is a device handle from cuDeviceGet.
            check("cuDevicePrimaryCtxRetain", unsafe {
                sys::cuDevicePrimaryCtxRetain(&mut ctx, cu)
            })?;
            // Pushed before anything else can fail, so that Drop releases it.
            backend.devices.push(Device {
                ordinal,
                cu,
                ctx: Ctx(ctx),
                granularity: 0,
            });
            // SAFETY: `ctx` is the primary context we just retained.
            check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx) })?;
            let prop = alloc_prop(ordinal, false);
            let mut granularity = 0usize;
            // SAFETY: both pointers are valid for the duration of the call.
            check("cuMemGetAllocationGranularity", unsafe {
                sys::cuMemGetAllocationGranularity(
                    &mut granularity,
                    &prop,
                    GranFlags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                )
            })?;
            if let Some(d) = backend.devices.last_mut() {
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

    /// Makes `dev`'s primary context current on the calling thread.
    pub fn bind(&self, dev: DeviceId) -> Result<(), VmmError> {
        let d = self.device(dev)?;
        // SAFETY: the context is a retained primary context, valid until `self` drops.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(d.ctx.0) })
    }

    /// The retained primary context of `dev` (valid as long as this backend lives), for callers
    /// that issue their own driver calls (copies, kernels).
    pub fn context(&self, dev: DeviceId) -> Result<CUcontext, VmmError> {
        Ok(self.device(dev)?.ctx.0)
    }

    /// The CUDA ordinal of the GPU that logical device `dev` lives on.
    pub fn ordinal(&self, dev: DeviceId) -> Result<u32, VmmError> {
        Ok(self.device(dev)?.ordinal as u32)
    }

    /// Whether logical devices `a` and `b` live on the same GPU.
    pub fn same_gpu(&self, a: DeviceId, b: DeviceId) -> Result<bool, VmmError> {
        Ok(self.device(a)?.ordinal == self.device(b)?.ordinal)
    }

    /// The driver's device handle of `dev`.
    pub fn cu_device(&self, dev: DeviceId) -> Result<CUdevice, VmmError> {
        Ok(self.device(dev)?.cu)
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
        r: &CudaReservation,
        offset: usize,
        len: usize,
    ) -> Result<(), VmmError> {
        let d = self.check_size(r.dev, "len", len)?;
        check_aligned("offset", offset, d.granularity)?;
        check_range("reservation", offset, len, r.len)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        for d in &self.devices {
            // SAFETY: each entry retained its primary context exactly once in `open`. Errors
            // are ignored: Drop must not panic and there is nobody left to tell.
            let _ = unsafe { sys::cuDevicePrimaryCtxRelease_v2(d.cu) };
        }
    }
}

impl Backend for CudaBackend {
    type Chunk = CudaChunk;
    type Reservation = CudaReservation;
    type ShareableHandle = OwnedFd;

    fn device_count(&self) -> usize {
        self.devices.len()
    }

    fn granularity(&self, dev: DeviceId) -> Result<usize, VmmError> {
        Ok(self.device(dev)?.granularity)
    }

    fn create(&self, dev: DeviceId, size: usize, exportable: bool) -> Result<CudaChunk, VmmError> {
        let d = self.check_size(dev, "size", size)?;
        self.bind(dev)?;
        let prop = alloc_prop(d.ordinal, exportable);
        let mut handle: CUmemGenericAllocationHandle = 0;
        // SAFETY: `handle` and `prop` are valid for the duration of the call; `size` is a
        // positive multiple of the granularity.
        let r = unsafe { sys::cuMemCreate(&mut handle, size, &prop, 0) };
        if r == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            let available = self.mem_info(dev).map(|(free, _)| free).unwrap_or(0);
            return Err(VmmError::OutOfMemory {
                device: dev,
                requested: size,
                available,
            });
        }
        check("cuMemCreate", r)?;
        Ok(CudaChunk {
            handle,
            dev,
            size,
            exportable,
        })
    }

    fn release(&self, chunk: CudaChunk) -> Result<(), VmmError> {
        self.bind(chunk.dev)?;
        // SAFETY: the handle came from cuMemCreate/cuMemImportFromShareableHandle and is
        // consumed here, so it is released exactly once.
        check("cuMemRelease", unsafe { sys::cuMemRelease(chunk.handle) })
    }

    fn reserve(&self, dev: DeviceId, size: usize) -> Result<CudaReservation, VmmError> {
        let d = self.check_size(dev, "size", size)?;
        self.bind(dev)?;
        let mut ptr: CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out-pointer; no fixed address is requested.
        check("cuMemAddressReserve", unsafe {
            sys::cuMemAddressReserve(&mut ptr, size, d.granularity, 0, 0)
        })?;
        Ok(CudaReservation {
            ptr,
            len: size,
            dev,
        })
    }

    fn free(&self, r: CudaReservation) -> Result<(), VmmError> {
        self.bind(r.dev)?;
        // SAFETY: the range came from cuMemAddressReserve with this size and is consumed here;
        // the safe layer frees it only after every mapping in it is gone.
        check("cuMemAddressFree", unsafe {
            sys::cuMemAddressFree(r.ptr, r.len)
        })
    }

    fn map(
        &self,
        r: &CudaReservation,
        offset: usize,
        c: &CudaChunk,
        chunk_offset: usize,
        len: usize,
    ) -> Result<(), VmmError> {
        self.check_sub_range(r, offset, len)?;
        check_aligned(
            "chunk_offset",
            chunk_offset,
            self.device(r.dev)?.granularity,
        )?;
        check_range("chunk", chunk_offset, len, c.size)?;
        self.bind(r.dev)?;
        // SAFETY: the target range lies inside our reservation and the source range inside
        // the chunk (both checked above); the handle is live while `c` is borrowed.
        check("cuMemMap", unsafe {
            sys::cuMemMap(r.ptr + offset as u64, len, chunk_offset, c.handle, 0)
        })
    }

    fn unmap(&self, r: &CudaReservation, offset: usize, len: usize) -> Result<(), VmmError> {
        self.check_sub_range(r, offset, len)?;
        self.bind(r.dev)?;
        // SAFETY: the range lies inside our reservation; the safe layer unmaps only ranges
        // that it mapped and that no view uses any more.
        check("cuMemUnmap", unsafe {
            sys::cuMemUnmap(r.ptr + offset as u64, len)
        })
    }

    fn set_access(
        &self,
        r: &CudaReservation,
        offset: usize,
        len: usize,
        devices: &[DeviceId],
    ) -> Result<(), VmmError> {
        self.check_sub_range(r, offset, len)?;
        let desc = |ordinal: c_int, flags: AccessFlags| sys::CUmemAccessDesc {
            location: sys::CUmemLocation {
                type_: LocType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: ordinal,
            },
            flags,
        };
        let descs: Vec<sys::CUmemAccessDesc> = if devices.is_empty() {
            // No device may access it: revoke the owner's access.
            vec![desc(
                self.device(r.dev)?.ordinal,
                AccessFlags::CU_MEM_ACCESS_FLAGS_PROT_NONE,
            )]
        } else {
            // Logical devices of one GPU share its grant: name each GPU once.
            let mut ordinals = Vec::with_capacity(devices.len());
            for &d in devices {
                let o = self.device(d)?.ordinal;
                if !ordinals.contains(&o) {
                    ordinals.push(o);
                }
            }
            ordinals
                .into_iter()
                .map(|o| desc(o, AccessFlags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE))
                .collect()
        };
        self.bind(r.dev)?;
        // SAFETY: the range lies inside our reservation; `descs` is valid for the call.
        check("cuMemSetAccess", unsafe {
            sys::cuMemSetAccess(r.ptr + offset as u64, len, descs.as_ptr(), descs.len())
        })
    }

    /// A POSIX fd. `importers` is ignored: whoever holds the fd may import.
    fn export(&self, c: &CudaChunk, _importers: &[ProcessId]) -> Result<OwnedFd, VmmError> {
        if !c.exportable {
            return Err(VmmError::NotExportable);
        }
        self.bind(c.dev)?;
        let mut fd: c_int = -1;
        // SAFETY: for POSIX fds the driver writes an `int` through the pointer; `fd` is valid.
        check("cuMemExportToShareableHandle", unsafe {
            sys::cuMemExportToShareableHandle(
                (&mut fd as *mut c_int).cast::<c_void>(),
                c.handle,
                HandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        })?;
        if fd < 0 {
            return Err(VmmError::Driver {
                call: "cuMemExportToShareableHandle",
                code: -1,
            });
        }
        // SAFETY: the driver returned a new file descriptor that nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn import(&self, dev: DeviceId, fd: OwnedFd, size: usize) -> Result<CudaChunk, VmmError> {
        self.check_size(dev, "size", size)?;
        self.bind(dev)?;
        let raw = fd.into_raw_fd();
        let mut handle: CUmemGenericAllocationHandle = 0;
        // SAFETY: for POSIX fds the driver takes the fd value itself in the pointer argument;
        // `handle` is a valid out-pointer.
        let r = unsafe {
            sys::cuMemImportFromShareableHandle(
                &mut handle,
                raw as isize as *mut c_void,
                HandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            )
        };
        // SAFETY: we own `raw` (from `into_raw_fd`); the driver keeps its own reference to the
        // memory, so the fd is closed here whatever the outcome.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
        if r != CUresult::CUDA_SUCCESS {
            return Err(VmmError::BadHandle(format!(
                "cuMemImportFromShareableHandle failed with code {} (not an exported CUDA allocation?)",
                r as i32
            )));
        }
        Ok(CudaChunk {
            handle,
            dev,
            size,
            exportable: true,
        })
    }

    fn base(&self, r: &CudaReservation) -> u64 {
        r.ptr
    }

    fn mem_info(&self, dev: DeviceId) -> Result<(usize, usize), VmmError> {
        self.bind(dev)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both are valid out-pointers for the call.
        check("cuMemGetInfo", unsafe {
            sys::cuMemGetInfo_v2(&mut free, &mut total)
        })?;
        Ok((free, total))
    }
}

/// A typed window onto mapped device memory, usable with cudarc's safe copy and launch APIs
/// (it implements [`DevicePtr`] and [`DevicePtrMut`]). It borrows the mapping (or region), so
/// the memory stays mapped while the view lives.
///
/// Unlike a `CudaSlice`, it owns nothing (dropping it frees nothing) and does no event
/// tracking: order the work on your streams yourself, and synchronise before the mapping goes.
pub struct DeviceView<'a, T> {
    ptr: CUdeviceptr,
    len: usize,
    stream: Arc<CudaStream>,
    _borrow: PhantomData<&'a T>,
}

impl<T> fmt::Debug for DeviceView<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceView")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .finish()
    }
}

impl<T> DeviceView<'_, T> {
    /// The device address of the first element.
    pub fn addr(&self) -> u64 {
        self.ptr
    }
}

impl<T> DeviceSlice<T> for DeviceView<'_, T> {
    fn len(&self) -> usize {
        self.len
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for DeviceView<'_, T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl<T> DevicePtrMut<T> for DeviceView<'_, T> {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

fn view_at<'a, T>(
    addr: u64,
    bytes: usize,
    stream: &Arc<CudaStream>,
) -> Result<DeviceView<'a, T>, VmmError> {
    let size = std::mem::size_of::<T>();
    if size == 0 {
        return Err(VmmError::ZeroSize {
            what: "element type",
        });
    }
    if !addr.is_multiple_of(std::mem::align_of::<T>() as u64) {
        return Err(VmmError::Unaligned {
            what: "view address",
            value: addr,
            granularity: std::mem::align_of::<T>(),
        });
    }
    Ok(DeviceView {
        ptr: addr,
        len: bytes / size,
        stream: Arc::clone(stream),
        _borrow: PhantomData,
    })
}

impl Mapping<CudaBackend> {
    /// The whole mapping as `len() / size_of::<T>()` elements of `T`, for work on `stream`.
    pub fn device_view<T>(&self, stream: &Arc<CudaStream>) -> Result<DeviceView<'_, T>, VmmError> {
        view_at(self.addr(), self.len(), stream)
    }
}

impl PagedRegion<CudaBackend> {
    /// `len` elements of `T` starting at byte `offset` of the region (which may span slots; all
    /// of them must be mapped), for work on `stream`.
    pub fn device_view<T>(
        &self,
        offset: usize,
        len: usize,
        stream: &Arc<CudaStream>,
    ) -> Result<DeviceView<'_, T>, VmmError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(VmmError::OutOfRange {
                what: "paged region",
                offset: offset as u64,
                len,
                limit: self.len(),
            })?;
        check_range("paged region", offset, bytes, self.len())?;
        if bytes > 0 {
            let first = offset / self.slot_size();
            let last = (offset + bytes - 1) / self.slot_size();
            self.check_slots(first, last - first + 1)?;
        }
        view_at(self.base() + offset as u64, bytes, stream)
    }
}
