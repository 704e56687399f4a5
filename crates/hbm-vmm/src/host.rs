//! The host backend: a faithful, device-free model of device virtual memory.
//!
//! - A chunk is a `memfd` of its size; exporting it hands out a duplicate of the fd.
//! - A reservation is an anonymous `PROT_NONE` mapping, aligned to the granularity.
//! - Mapping a chunk replaces part of the reservation with `mmap(MAP_FIXED | MAP_SHARED)` of the
//!   memfd (still `PROT_NONE`); [`Backend::set_access`] makes it readable and writable, as
//!   `cuMemSetAccess` does on a GPU. Unmapping puts `PROT_NONE` anonymous memory back, so the
//!   range never becomes a hole that another `mmap` could take.
//! - Each host "device" has a capacity budget. Creating a chunk past it fails with
//!   [`VmmError::OutOfMemory`], as it would on HBM. Imported chunks are not charged: their memory
//!   belongs to the exporter, as with CUDA.
//!
//! Virtual addresses of this backend are real addresses in this process, which is what lets the
//! CPU compute read weights straight from chunk memory (see [`crate::Mapping::as_slice`]).
//!
//! Differences from CUDA: all host devices share one address space and one CPU, so access
//! granted to any non-empty set of devices means "readable and writable by this process".

use crate::{check_aligned, check_range, Backend, DeviceId, ProcessId, VmmError};
use parking_lot::Mutex;
use rustix::fs::{FileType, MemfdFlags};
use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};
use std::ffi::c_void;
use std::os::fd::OwnedFd;
use std::ptr;

/// Default allocation granularity: 2 MiB, the same as CUDA's on current GPUs.
pub const DEFAULT_GRANULARITY: usize = 2 << 20;

/// The system page size: the smallest granularity the host backend accepts.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// Configuration of a [`HostBackend`]: how many devices, each one's capacity, and the granularity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    capacities: Vec<usize>,
    granularity: usize,
}

impl HostConfig {
    /// `n` devices of `capacity_bytes` each, with the default 2 MiB granularity.
    pub fn devices(n: usize, capacity_bytes: usize) -> Self {
        HostConfig {
            capacities: vec![capacity_bytes; n],
            granularity: DEFAULT_GRANULARITY,
        }
    }

    /// Devices with the given capacities (one entry per device), with the default granularity.
    pub fn with_capacities(capacities: Vec<usize>) -> Self {
        HostConfig {
            capacities,
            granularity: DEFAULT_GRANULARITY,
        }
    }

    /// Sets the granularity. It must be a power of two and at least the page size; tests use the
    /// page size to keep chunks small.
    pub fn with_granularity(mut self, granularity: usize) -> Result<Self, VmmError> {
        let page_size = page_size();
        if !granularity.is_power_of_two() || granularity < page_size {
            return Err(VmmError::BadGranularity {
                granularity,
                page_size,
            });
        }
        self.granularity = granularity;
        Ok(self)
    }

    /// The granularity in bytes.
    pub fn granularity(&self) -> usize {
        self.granularity
    }

    /// The capacity of each device in bytes.
    pub fn capacities(&self) -> &[usize] {
        &self.capacities
    }
}

/// The host backend. See the [module docs](self).
#[derive(Debug)]
pub struct HostBackend {
    config: HostConfig,
    /// Bytes of chunks created (not imported) per device.
    used: Vec<Mutex<usize>>,
}

/// A host chunk: a memfd.
#[derive(Debug)]
pub struct HostChunk {
    fd: OwnedFd,
    dev: DeviceId,
    size: usize,
    exportable: bool,
    /// Whether `size` is charged to `dev`'s capacity (created here, not imported).
    charged: bool,
}

impl HostChunk {
    /// The device the chunk is on.
    pub fn device(&self) -> DeviceId {
        self.dev
    }

    /// Its size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }
}

/// A host reservation: a `PROT_NONE` range of this process's address space.
#[derive(Debug)]
pub struct HostReservation {
    base: usize,
    len: usize,
    dev: DeviceId,
}

impl HostReservation {
    /// The device the reservation is for.
    pub fn device(&self) -> DeviceId {
        self.dev
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: reservations have a positive size).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl HostBackend {
    /// A host backend with the given devices and granularity.
    pub fn new(config: HostConfig) -> Self {
        let used = config.capacities.iter().map(|_| Mutex::new(0)).collect();
        HostBackend { config, used }
    }

    /// The configuration this backend was made with.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    fn check_dev(&self, dev: DeviceId) -> Result<(), VmmError> {
        if dev.index() < self.config.capacities.len() {
            Ok(())
        } else {
            Err(VmmError::NoSuchDevice(dev))
        }
    }

    fn check_size(&self, what: &'static str, size: usize) -> Result<(), VmmError> {
        if size == 0 {
            return Err(VmmError::ZeroSize { what });
        }
        check_aligned(what, size, self.config.granularity)
    }

    fn check_sub_range(
        &self,
        r: &HostReservation,
        offset: usize,
        len: usize,
    ) -> Result<(), VmmError> {
        self.check_size("len", len)?;
        check_aligned("offset", offset, self.config.granularity)?;
        check_range("reservation", offset, len, r.len)
    }

    fn charge(&self, dev: DeviceId, size: usize) -> Result<(), VmmError> {
        let capacity = self.config.capacities[dev.index()];
        let mut used = self.used[dev.index()].lock();
        let available = capacity.saturating_sub(*used);
        if size > available {
            return Err(VmmError::OutOfMemory {
                device: dev,
                requested: size,
                available,
            });
        }
        *used += size;
        Ok(())
    }

    fn uncharge(&self, dev: DeviceId, size: usize) {
        let mut used = self.used[dev.index()].lock();
        *used = used.saturating_sub(size);
    }
}

impl Backend for HostBackend {
    type Chunk = HostChunk;
    type Reservation = HostReservation;
    type ShareableHandle = OwnedFd;

    fn device_count(&self) -> usize {
        self.config.capacities.len()
    }

    fn granularity(&self, dev: DeviceId) -> Result<usize, VmmError> {
        self.check_dev(dev)?;
        Ok(self.config.granularity)
    }

    fn create(&self, dev: DeviceId, size: usize, exportable: bool) -> Result<HostChunk, VmmError> {
        self.check_dev(dev)?;
        self.check_size("size", size)?;
        self.charge(dev, size)?;
        let made = rustix::fs::memfd_create("hbm-vmm-chunk", MemfdFlags::CLOEXEC)
            .map_err(|e| VmmError::os("memfd_create", e))
            .and_then(|fd| {
                rustix::fs::ftruncate(&fd, size as u64)
                    .map_err(|e| VmmError::os("ftruncate", e))
                    .map(|()| fd)
            });
        match made {
            Ok(fd) => Ok(HostChunk {
                fd,
                dev,
                size,
                exportable,
                charged: true,
            }),
            Err(e) => {
                self.uncharge(dev, size);
                Err(e)
            }
        }
    }

    fn release(&self, chunk: HostChunk) -> Result<(), VmmError> {
        if chunk.charged {
            self.uncharge(chunk.dev, chunk.size);
        }
        // Closing the memfd frees its pages once no mapping uses them any more.
        drop(chunk.fd);
        Ok(())
    }

    fn reserve(&self, dev: DeviceId, size: usize) -> Result<HostReservation, VmmError> {
        self.check_dev(dev)?;
        self.check_size("size", size)?;
        let gran = self.config.granularity;
        let total = size.checked_add(gran).ok_or(VmmError::OutOfRange {
            what: "address space",
            offset: 0,
            len: size,
            limit: usize::MAX,
        })?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks (null hint, no
        // MAP_FIXED) cannot alias any existing memory.
        let raw = unsafe {
            rustix::mm::mmap_anonymous(
                ptr::null_mut(),
                total,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(|e| VmmError::os("mmap(reserve)", e))?;
        // Trim to a granularity-aligned range, as cuMemAddressReserve aligns its result.
        let start = raw as usize;
        let base = start.next_multiple_of(gran);
        let head = base - start;
        let tail = total - head - size;
        // SAFETY: [start, base) and [base + size, start + total) lie inside the mapping we just
        // made and that nothing else knows about.
        unsafe {
            if head > 0 {
                rustix::mm::munmap(raw, head).map_err(|e| VmmError::os("munmap(trim)", e))?;
            }
            if tail > 0 {
                rustix::mm::munmap((base + size) as *mut c_void, tail)
                    .map_err(|e| VmmError::os("munmap(trim)", e))?;
            }
        }
        Ok(HostReservation {
            base,
            len: size,
            dev,
        })
    }

    fn free(&self, r: HostReservation) -> Result<(), VmmError> {
        // SAFETY: the reservation owns [base, base + len) of the address space; it is consumed
        // here, and the safe layer frees it only after every mapping and view into it is gone.
        unsafe { rustix::mm::munmap(r.base as *mut c_void, r.len) }
            .map_err(|e| VmmError::os("munmap(free)", e))
    }

    fn map(
        &self,
        r: &HostReservation,
        offset: usize,
        c: &HostChunk,
        chunk_offset: usize,
        len: usize,
    ) -> Result<(), VmmError> {
        self.check_sub_range(r, offset, len)?;
        check_aligned("chunk_offset", chunk_offset, self.config.granularity)?;
        check_range("chunk", chunk_offset, len, c.size)?;
        let addr = (r.base + offset) as *mut c_void;
        // SAFETY: [addr, addr + len) lies inside the reservation, which owns that address
        // space; MAP_FIXED replaces only pages of it. The new pages are PROT_NONE, so no Rust
        // reference can observe the replacement.
        let got = unsafe {
            rustix::mm::mmap(
                addr,
                len,
                ProtFlags::empty(),
                MapFlags::SHARED | MapFlags::FIXED,
                &c.fd,
                chunk_offset as u64,
            )
        }
        .map_err(|e| VmmError::os("mmap(map)", e))?;
        if got != addr {
            return Err(VmmError::Os {
                call: "mmap(map)",
                errno: libc::EFAULT,
            });
        }
        Ok(())
    }

    fn unmap(&self, r: &HostReservation, offset: usize, len: usize) -> Result<(), VmmError> {
        self.check_sub_range(r, offset, len)?;
        let addr = (r.base + offset) as *mut c_void;
        // SAFETY: [addr, addr + len) lies inside the reservation; replacing it with fresh
        // PROT_NONE anonymous memory keeps the address space reserved. The safe layer calls this
        // only when no view of the range is alive.
        let got = unsafe {
            rustix::mm::mmap_anonymous(
                addr,
                len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
            )
        }
        .map_err(|e| VmmError::os("mmap(unmap)", e))?;
        if got != addr {
            return Err(VmmError::Os {
                call: "mmap(unmap)",
                errno: libc::EFAULT,
            });
        }
        Ok(())
    }

    fn set_access(
        &self,
        r: &HostReservation,
        offset: usize,
        len: usize,
        devices: &[DeviceId],
    ) -> Result<(), VmmError> {
        self.check_sub_range(r, offset, len)?;
        for &d in devices {
            self.check_dev(d)?;
        }
        let flags = if devices.is_empty() {
            MprotectFlags::empty()
        } else {
            MprotectFlags::READ | MprotectFlags::WRITE
        };
        // SAFETY: the range lies inside the reservation. Granting access only widens what may
        // be done with it; revoking is done by the safe layer only when no view is alive.
        unsafe { rustix::mm::mprotect((r.base + offset) as *mut c_void, len, flags) }
            .map_err(|e| VmmError::os("mprotect", e))
    }

    /// A `dup` of the memfd. `importers` is ignored: whoever holds the fd may import.
    fn export(&self, c: &HostChunk, _importers: &[ProcessId]) -> Result<OwnedFd, VmmError> {
        if !c.exportable {
            return Err(VmmError::NotExportable);
        }
        c.fd.try_clone().map_err(|e| VmmError::io("dup", &e))
    }

    fn import(&self, dev: DeviceId, fd: OwnedFd, size: usize) -> Result<HostChunk, VmmError> {
        self.check_dev(dev)?;
        self.check_size("size", size)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| VmmError::BadHandle(format!("fstat: {e}")))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(VmmError::BadHandle(
                "fd is not a memory file (expected a memfd exported by hbm-vmm)".into(),
            ));
        }
        if (st.st_size as u64) < size as u64 {
            return Err(VmmError::BadHandle(format!(
                "fd holds {} bytes, but {size} bytes were asked for",
                st.st_size
            )));
        }
        Ok(HostChunk {
            fd,
            dev,
            size,
            exportable: true,
            charged: false,
        })
    }

    fn base(&self, r: &HostReservation) -> u64 {
        r.base as u64
    }

    fn mem_info(&self, dev: DeviceId) -> Result<(usize, usize), VmmError> {
        self.check_dev(dev)?;
        let total = self.config.capacities[dev.index()];
        let used = *self.used[dev.index()].lock();
        Ok((total.saturating_sub(used), total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> (HostBackend, usize) {
        let g = page_size();
        (
            HostBackend::new(HostConfig::devices(2, 8 * g).with_granularity(g).unwrap()),
            g,
        )
    }

    /// The raw backend validates every argument itself, without the safe layer.
    #[test]
    fn raw_calls_validate_arguments() {
        let (b, g) = backend();
        let d0 = DeviceId(0);
        assert_eq!(
            b.create(DeviceId(2), g, false).unwrap_err(),
            VmmError::NoSuchDevice(DeviceId(2))
        );
        let c = b.create(d0, 2 * g, true).unwrap();
        let r = b.reserve(d0, 2 * g).unwrap();
        assert!(matches!(
            b.map(&r, 1, &c, 0, g),
            Err(VmmError::Unaligned { what: "offset", .. })
        ));
        assert!(matches!(
            b.map(&r, 0, &c, g, 2 * g),
            Err(VmmError::OutOfRange { what: "chunk", .. })
        ));
        assert!(matches!(
            b.map(&r, 2 * g, &c, 0, g),
            Err(VmmError::OutOfRange { .. })
        ));
        assert!(matches!(
            b.unmap(&r, 0, 3 * g),
            Err(VmmError::OutOfRange { .. })
        ));
        assert!(matches!(b.unmap(&r, 0, 0), Err(VmmError::ZeroSize { .. })));
        assert!(matches!(
            b.set_access(&r, 0, g, &[DeviceId(5)]),
            Err(VmmError::NoSuchDevice(DeviceId(5)))
        ));
        b.map(&r, 0, &c, 0, 2 * g).unwrap();
        b.set_access(&r, 0, 2 * g, &[d0]).unwrap();
        b.unmap(&r, 0, 2 * g).unwrap();
        b.free(r).unwrap();
        b.release(c).unwrap();
        assert_eq!(b.mem_info(d0).unwrap(), (8 * g, 8 * g));
    }

    /// Mapped memory is inaccessible until access is granted, as on a GPU, and unmapping leaves
    /// reserved address space behind (no hole): a fresh anonymous mapping cannot land there.
    #[test]
    fn access_and_unmap_semantics() {
        let (b, g) = backend();
        let d0 = DeviceId(0);
        let c = b.create(d0, g, false).unwrap();
        let r = b.reserve(d0, g).unwrap();
        b.map(&r, 0, &c, 0, g).unwrap();
        b.set_access(&r, 0, g, &[d0]).unwrap();
        let p = b.base(&r) as usize as *mut u8;
        // SAFETY: the page is mapped and readable/writable; nothing else references it.
        unsafe {
            p.write(5);
            assert_eq!(p.read(), 5);
        }
        b.unmap(&r, 0, g).unwrap();
        // The range is still ours: MAP_FIXED_NOREPLACE at exactly that address is refused
        // because something (our PROT_NONE placeholder) is there.
        // SAFETY: FIXED_NOREPLACE never replaces an existing mapping.
        let taken = unsafe {
            rustix::mm::mmap_anonymous(
                p.cast(),
                g,
                ProtFlags::READ,
                MapFlags::PRIVATE | MapFlags::FIXED_NOREPLACE,
            )
        };
        assert_eq!(taken.unwrap_err(), rustix::io::Errno::EXIST);
        // Remap: the chunk's bytes are still there.
        b.map(&r, 0, &c, 0, g).unwrap();
        b.set_access(&r, 0, g, &[d0]).unwrap();
        // SAFETY: mapped and accessible again.
        assert_eq!(unsafe { p.read() }, 5);
        b.free(r).unwrap();
        b.release(c).unwrap();
    }

    #[test]
    fn export_needs_exportable_and_import_is_not_charged() {
        let (b, g) = backend();
        let d0 = DeviceId(0);
        let plain = b.create(d0, g, false).unwrap();
        assert_eq!(b.export(&plain, &[]).unwrap_err(), VmmError::NotExportable);
        let shared = b.create(d0, g, true).unwrap();
        let fd = b.export(&shared, &[]).unwrap();
        let imported = b.import(DeviceId(1), fd, g).unwrap();
        assert_eq!(b.mem_info(DeviceId(1)).unwrap().0, 8 * g);
        assert_eq!(b.mem_info(d0).unwrap().0, 6 * g);
        b.release(imported).unwrap();
        b.release(plain).unwrap();
        b.release(shared).unwrap();
        assert_eq!(b.mem_info(d0).unwrap().0, 8 * g);
    }
}
