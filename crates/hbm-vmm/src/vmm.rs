//! The safe layer: [`Vmm`], [`PhysChunk`], [`Reservation`] and [`Mapping`].

use crate::{check_aligned, check_range, Backend, Capabilities, DeviceId, ProcessId, VmmError};
use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The entry point: a backend plus per-device accounting and the table of live mappings.
///
/// Cheap to clone (an `Arc` inside); every chunk, reservation and mapping holds a clone, so the
/// backend outlives them all.
pub struct Vmm<B: Backend> {
    inner: Arc<VmmInner<B>>,
}

struct VmmInner<B: Backend> {
    backend: B,
    devices: Vec<DeviceState>,
    next_id: AtomicU64,
    /// Errors from teardown in `Drop`, which must not panic; read with [`Vmm::take_errors`].
    errors: Mutex<Vec<VmmError>>,
}

#[derive(Default)]
struct DeviceState {
    acct: Mutex<Acct>,
    /// Live mappings on this device: start address -> length.
    live: Mutex<BTreeMap<u64, usize>>,
}

#[derive(Default, Clone, Copy)]
struct Acct {
    usage: usize,
    peak: usize,
}

impl<B: Backend> Clone for Vmm<B> {
    fn clone(&self) -> Self {
        Vmm {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: Backend> fmt::Debug for Vmm<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vmm")
            .field("backend", &self.inner.backend)
            .field("devices", &self.inner.devices.len())
            .finish()
    }
}

impl<B: Backend> Vmm<B> {
    /// Wraps a backend.
    pub fn new(backend: B) -> Self {
        let devices = (0..backend.device_count())
            .map(|_| DeviceState::default())
            .collect();
        Vmm {
            inner: Arc::new(VmmInner {
                backend,
                devices,
                next_id: AtomicU64::new(1),
                errors: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The raw backend.
    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    /// What the backend allows beyond the common rules (see [`Capabilities`]).
    pub fn capabilities(&self) -> Capabilities {
        self.inner.backend.capabilities()
    }

    /// How many devices the backend drives.
    pub fn device_count(&self) -> usize {
        self.inner.devices.len()
    }

    /// Whether `self` and `other` are the same manager (clones of one another).
    pub fn same(&self, other: &Vmm<B>) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    fn device(&self, dev: DeviceId) -> Result<&DeviceState, VmmError> {
        self.inner
            .devices
            .get(dev.index())
            .ok_or(VmmError::NoSuchDevice(dev))
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn record_error(&self, e: VmmError) {
        self.inner.errors.lock().push(e);
    }

    /// Errors that happened during teardown (in `Drop`) since the last call. `Drop` never
    /// panics; it records what went wrong here instead.
    pub fn take_errors(&self) -> Vec<VmmError> {
        std::mem::take(&mut *self.inner.errors.lock())
    }

    /// The allocation granularity of `dev`.
    pub fn granularity(&self, dev: DeviceId) -> Result<usize, VmmError> {
        self.device(dev)?;
        self.inner.backend.granularity(dev)
    }

    /// Allocates a physical chunk of `size` bytes (a positive multiple of the granularity) on
    /// `dev`. Pass `exportable = true` if it may ever be shared with another process.
    pub fn create_chunk(
        &self,
        dev: DeviceId,
        size: usize,
        exportable: bool,
    ) -> Result<PhysChunk<B>, VmmError> {
        let state = self.device(dev)?;
        let raw = self.inner.backend.create(dev, size, exportable)?;
        {
            let mut a = state.acct.lock();
            a.usage += size;
            a.peak = a.peak.max(a.usage);
        }
        Ok(self.wrap_chunk(raw, dev, size, exportable, true))
    }

    /// Imports a chunk exported by another process (see [`PhysChunk::export_to`] and
    /// [`crate::ipc`]). The handle is an fd on host and CUDA, a [`crate::HandleToken`] on ACL.
    /// Imported chunks do not count toward [`Vmm::usage`]: their memory is the exporter's.
    pub fn import_chunk(
        &self,
        dev: DeviceId,
        handle: B::ShareableHandle,
        size: usize,
    ) -> Result<PhysChunk<B>, VmmError> {
        self.device(dev)?;
        let raw = self.inner.backend.import(dev, handle, size)?;
        Ok(self.wrap_chunk(raw, dev, size, true, false))
    }

    fn wrap_chunk(
        &self,
        raw: B::Chunk,
        dev: DeviceId,
        size: usize,
        exportable: bool,
        charged: bool,
    ) -> PhysChunk<B> {
        PhysChunk {
            inner: Arc::new(ChunkInner {
                vmm: self.clone(),
                raw: Some(raw),
                id: ChunkId(self.next_id()),
                dev,
                size,
                exportable,
                charged,
                host_lock: RwLock::new(()),
            }),
        }
    }

    /// Reserves `size` bytes (a positive multiple of the granularity) of virtual address space
    /// for `dev`.
    pub fn reserve(&self, dev: DeviceId, size: usize) -> Result<Reservation<B>, VmmError> {
        self.device(dev)?;
        let granularity = self.inner.backend.granularity(dev)?;
        let raw = self.inner.backend.reserve(dev, size)?;
        let base = self.inner.backend.base(&raw);
        Ok(Reservation {
            inner: Arc::new(ResInner {
                vmm: self.clone(),
                raw: Some(raw),
                dev,
                base,
                len: size,
                granularity,
                state: Mutex::new(ResState {
                    mapped: BTreeMap::new(),
                    access: vec![dev],
                    origin: None,
                }),
            }),
        })
    }

    /// `Ok` if `[addr, addr + len)` lies entirely inside live mappings on `dev` (adjacent
    /// mappings count as one range). An empty range is always `Ok` on an existing device.
    pub fn check_range(&self, dev: DeviceId, addr: u64, len: usize) -> Result<(), VmmError> {
        let state = self.device(dev)?;
        if len == 0 {
            return Ok(());
        }
        let not_mapped = VmmError::NotMapped {
            device: dev,
            addr,
            len,
        };
        let end = addr.checked_add(len as u64).ok_or(not_mapped.clone())?;
        let live = state.live.lock();
        let mut cursor = addr;
        // The mapping that contains `cursor` starts at or before it.
        let Some((&start, &l)) = live.range(..=cursor).next_back() else {
            return Err(not_mapped);
        };
        if start + l as u64 <= cursor {
            return Err(not_mapped);
        }
        cursor = start + l as u64;
        while cursor < end {
            match live.get(&cursor) {
                Some(&l) => cursor += l as u64,
                None => return Err(not_mapped),
            }
        }
        Ok(())
    }

    /// Bytes of chunks created on `dev` through this manager and not yet released.
    pub fn usage(&self, dev: DeviceId) -> usize {
        self.device(dev).map(|s| s.acct.lock().usage).unwrap_or(0)
    }

    /// The highest [`Vmm::usage`] of `dev` since creation or the last [`Vmm::reset_peak`].
    pub fn peak(&self, dev: DeviceId) -> usize {
        self.device(dev).map(|s| s.acct.lock().peak).unwrap_or(0)
    }

    /// Resets the peak of `dev` to its current usage.
    pub fn reset_peak(&self, dev: DeviceId) {
        if let Ok(s) = self.device(dev) {
            let mut a = s.acct.lock();
            a.peak = a.usage;
        }
    }

    /// Total memory of `dev` in bytes as the backend reports it (0 for an unknown device).
    pub fn capacity(&self, dev: DeviceId) -> usize {
        self.inner
            .backend
            .mem_info(dev)
            .map(|(_, total)| total)
            .unwrap_or(0)
    }

    /// `(free, total)` bytes of `dev` as the backend reports them.
    pub fn mem_info(&self, dev: DeviceId) -> Result<(usize, usize), VmmError> {
        self.device(dev)?;
        self.inner.backend.mem_info(dev)
    }
}

/// Identifies a chunk within one [`Vmm`] (unique for the manager's lifetime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub u64);

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chunk#{}", self.0)
    }
}

/// A physical chunk of device memory.
///
/// Cloning is cheap and shares the chunk. The backend releases it when the last clone *and*
/// the last [`Mapping`] of it are gone.
pub struct PhysChunk<B: Backend> {
    inner: Arc<ChunkInner<B>>,
}

pub(crate) struct ChunkInner<B: Backend> {
    vmm: Vmm<B>,
    raw: Option<B::Chunk>,
    id: ChunkId,
    dev: DeviceId,
    size: usize,
    exportable: bool,
    charged: bool,
    /// Serialises host access (shared reads, exclusive writes) to the chunk's bytes across all
    /// of its mappings in this process, so that safe slices never alias a writer.
    pub(crate) host_lock: RwLock<()>,
}

impl<B: Backend> Drop for ChunkInner<B> {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            if let Err(e) = self.vmm.inner.backend.release(raw) {
                self.vmm.record_error(e);
            }
        }
        if self.charged {
            if let Ok(s) = self.vmm.device(self.dev) {
                let mut a = s.acct.lock();
                a.usage = a.usage.saturating_sub(self.size);
            }
        }
    }
}

impl<B: Backend> Clone for PhysChunk<B> {
    fn clone(&self) -> Self {
        PhysChunk {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: Backend> fmt::Debug for PhysChunk<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PhysChunk")
            .field("id", &self.inner.id)
            .field("device", &self.inner.dev)
            .field("size", &self.inner.size)
            .field("exportable", &self.inner.exportable)
            .finish()
    }
}

impl<B: Backend> PhysChunk<B> {
    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// The device the memory is on.
    pub fn device(&self) -> DeviceId {
        self.inner.dev
    }

    /// Its id within the manager.
    pub fn id(&self) -> ChunkId {
        self.inner.id
    }

    /// Whether it was created exportable (or imported).
    pub fn is_exportable(&self) -> bool {
        self.inner.exportable
    }

    /// Whether it was imported from another process (its memory is the exporter's).
    pub fn is_imported(&self) -> bool {
        !self.inner.charged
    }

    /// The manager that owns it.
    pub fn vmm(&self) -> &Vmm<B> {
        &self.inner.vmm
    }

    /// Whether `self` and `other` are handles to the same chunk.
    pub fn same(&self, other: &PhysChunk<B>) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// How many handles (clones and mappings) keep the chunk alive.
    pub fn handle_count(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// Exports the chunk without naming importers: an fd that another process can import with
    /// [`Vmm::import_chunk`] on host and CUDA. On a backend that whitelists importers (ACL) this
    /// is [`VmmError::NoImporters`]; use [`PhysChunk::export_to`] (or [`crate::ipc`], which asks
    /// the peer for its id).
    pub fn export(&self) -> Result<B::ShareableHandle, VmmError> {
        self.export_to(&[])
    }

    /// Exports the chunk for `importers` to import with [`Vmm::import_chunk`]. Backends whose
    /// handle is an fd ignore the list (holding the fd is the permission).
    pub fn export_to(&self, importers: &[ProcessId]) -> Result<B::ShareableHandle, VmmError> {
        if !self.inner.exportable {
            return Err(VmmError::NotExportable);
        }
        self.inner.vmm.backend().export(self.raw(), importers)
    }

    pub(crate) fn raw(&self) -> &B::Chunk {
        // `raw` is `Some` from construction until `Drop`.
        self.inner
            .raw
            .as_ref()
            .expect("chunk handle used after release")
    }

    pub(crate) fn host_lock(&self) -> &RwLock<()> {
        &self.inner.host_lock
    }
}

/// A reserved range of device virtual addresses. Chunks are mapped into it with
/// [`Reservation::map`]; it is freed when it and every [`Mapping`] into it are gone.
pub struct Reservation<B: Backend> {
    inner: Arc<ResInner<B>>,
}

struct ResInner<B: Backend> {
    vmm: Vmm<B>,
    raw: Option<B::Reservation>,
    dev: DeviceId,
    base: u64,
    len: usize,
    granularity: usize,
    state: Mutex<ResState>,
}

struct ResState {
    /// Live mappings: offset -> length.
    mapped: BTreeMap<usize, usize>,
    /// Devices granted access to every mapping of this reservation (always includes the owner).
    access: Vec<DeviceId>,
    /// Whether the live mappings are of imported chunks (`None` while nothing is mapped). Kept
    /// for backends without [`Capabilities::mixed_origins`].
    origin: Option<Origin>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Local,
    Imported,
}

impl Origin {
    fn of<B: Backend>(chunk: &PhysChunk<B>) -> Self {
        if chunk.is_imported() {
            Origin::Imported
        } else {
            Origin::Local
        }
    }

    fn name(self) -> &'static str {
        match self {
            Origin::Local => "local",
            Origin::Imported => "imported",
        }
    }
}

impl<B: Backend> ResInner<B> {
    fn raw(&self) -> &B::Reservation {
        // `raw` is `Some` from construction until `Drop`.
        self.raw.as_ref().expect("reservation used after free")
    }
}

impl<B: Backend> Drop for ResInner<B> {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            if let Err(e) = self.vmm.inner.backend.free(raw) {
                self.vmm.record_error(e);
            }
        }
    }
}

impl<B: Backend> fmt::Debug for Reservation<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("device", &self.inner.dev)
            .field("base", &format_args!("{:#x}", self.inner.base))
            .field("len", &self.inner.len)
            .finish()
    }
}

impl<B: Backend> Reservation<B> {
    /// The device virtual address of the start of the range.
    pub fn base(&self) -> u64 {
        self.inner.base
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Whether the range is empty (never: reservations have a positive size).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// The device it was reserved for.
    pub fn device(&self) -> DeviceId {
        self.inner.dev
    }

    /// The granularity of its device.
    pub fn granularity(&self) -> usize {
        self.inner.granularity
    }

    /// The manager that owns it.
    pub fn vmm(&self) -> &Vmm<B> {
        &self.inner.vmm
    }

    /// Bytes currently mapped.
    pub fn mapped_bytes(&self) -> usize {
        self.inner.state.lock().mapped.values().sum()
    }

    /// The devices that can access its mappings (always includes its own device).
    pub fn access(&self) -> Vec<DeviceId> {
        self.inner.state.lock().access.clone()
    }

    /// Maps `chunk[chunk_offset..chunk_offset + len]` at `base() + offset` and makes it
    /// accessible to [`Reservation::access`]. The mapping lasts until the returned [`Mapping`]
    /// is dropped. The chunk must be on this reservation's device.
    ///
    /// On a backend without [`Capabilities::partial_map`] (ACL) only the whole chunk can be
    /// mapped ([`VmmError::PartialMapUnsupported`] otherwise); without
    /// [`Capabilities::mixed_origins`], a reservation holds either local or imported chunks at a
    /// time ([`VmmError::MixedOrigins`]).
    pub fn map(
        &self,
        offset: usize,
        chunk: &PhysChunk<B>,
        chunk_offset: usize,
        len: usize,
    ) -> Result<Mapping<B>, VmmError> {
        let r = &self.inner;
        if !r.vmm.same(chunk.vmm()) {
            return Err(VmmError::BadHandle(
                "the chunk belongs to another Vmm".into(),
            ));
        }
        if chunk.device() != r.dev {
            return Err(VmmError::DeviceMismatch {
                expected: r.dev,
                found: chunk.device(),
            });
        }
        if len == 0 {
            return Err(VmmError::ZeroSize { what: "len" });
        }
        check_aligned("offset", offset, r.granularity)?;
        check_aligned("chunk_offset", chunk_offset, r.granularity)?;
        check_aligned("len", len, r.granularity)?;
        check_range("reservation", offset, len, r.len)?;
        check_range("chunk", chunk_offset, len, chunk.size())?;
        let caps = r.vmm.capabilities();
        if !caps.partial_map && (chunk_offset != 0 || len != chunk.size()) {
            return Err(VmmError::PartialMapUnsupported {
                chunk_offset,
                len,
                chunk_size: chunk.size(),
            });
        }
        let origin = Origin::of(chunk);
        let mut state = r.state.lock();
        if !caps.mixed_origins && state.origin.is_some_and(|o| o != origin) {
            return Err(VmmError::MixedOrigins {
                device: r.dev,
                adding: origin.name(),
            });
        }
        let end = offset + len;
        if let Some((&o, &l)) = state.mapped.range(..end).next_back() {
            if o + l > offset {
                return Err(VmmError::AlreadyMapped {
                    device: r.dev,
                    addr: r.base + offset as u64,
                    len,
                });
            }
        }
        let backend = r.vmm.backend();
        backend.map(r.raw(), offset, chunk.raw(), chunk_offset, len)?;
        if let Err(e) = backend.set_access(r.raw(), offset, len, &state.access) {
            if let Err(e2) = backend.unmap(r.raw(), offset, len) {
                r.vmm.record_error(e2);
            }
            return Err(e);
        }
        state.mapped.insert(offset, len);
        state.origin = Some(origin);
        let addr = r.base + offset as u64;
        r.vmm.device(r.dev)?.live.lock().insert(addr, len);
        Ok(Mapping {
            res: Arc::clone(&self.inner),
            chunk: chunk.clone(),
            offset,
            chunk_offset,
            len,
            live: true,
        })
    }

    /// Grants `devices` (in addition to the reservation's own device) access to every current
    /// and future mapping of this reservation.
    pub fn set_access(&self, devices: &[DeviceId]) -> Result<(), VmmError> {
        let r = &self.inner;
        for &d in devices {
            r.vmm.device(d)?;
        }
        let mut access = vec![r.dev];
        access.extend_from_slice(devices);
        access.sort();
        access.dedup();
        let mut state = r.state.lock();
        // Apply per run of adjacent mappings (fewer, larger driver calls) where the backend
        // allows it; otherwise once per mapping (ACL).
        let spans = r.vmm.capabilities().access_spans_mappings;
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (&o, &l) in &state.mapped {
            match runs.last_mut() {
                Some((ro, rl)) if spans && *ro + *rl == o => *rl += l,
                _ => runs.push((o, l)),
            }
        }
        for (o, l) in runs {
            r.vmm.backend().set_access(r.raw(), o, l, &access)?;
        }
        state.access = access;
        Ok(())
    }
}

/// A chunk (or part of one) mapped into a reservation. Dropping it unmaps the range; it keeps its
/// chunk and its reservation alive until then.
pub struct Mapping<B: Backend> {
    res: Arc<ResInner<B>>,
    chunk: PhysChunk<B>,
    offset: usize,
    chunk_offset: usize,
    len: usize,
    live: bool,
}

impl<B: Backend> fmt::Debug for Mapping<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("device", &self.res.dev)
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .field("chunk", &self.chunk.id())
            .field("chunk_offset", &self.chunk_offset)
            .finish()
    }
}

impl<B: Backend> Mapping<B> {
    /// The device virtual address of the mapped range.
    pub fn addr(&self) -> u64 {
        self.res.base + self.offset as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mappings have a positive size).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset of the mapping inside its reservation.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The device of the reservation (and of the chunk).
    pub fn device(&self) -> DeviceId {
        self.res.dev
    }

    /// The mapped chunk.
    pub fn chunk(&self) -> &PhysChunk<B> {
        &self.chunk
    }

    /// Offset of the mapped range inside the chunk.
    pub fn chunk_offset(&self) -> usize {
        self.chunk_offset
    }

    /// Unmaps now and reports a backend error instead of recording it (as `Drop` does).
    pub fn unmap(mut self) -> Result<(), VmmError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), VmmError> {
        if !std::mem::replace(&mut self.live, false) {
            return Ok(());
        }
        let r = &self.res;
        let mut state = r.state.lock();
        state.mapped.remove(&self.offset);
        if state.mapped.is_empty() {
            state.origin = None;
        }
        if let Ok(d) = r.vmm.device(r.dev) {
            d.live.lock().remove(&(r.base + self.offset as u64));
        }
        r.vmm.backend().unmap(r.raw(), self.offset, self.len)
    }

    /// The host address of the mapped bytes (host backend: a real address in this process).
    pub(crate) fn host_ptr(&self) -> *mut u8 {
        self.addr() as usize as *mut u8
    }
}

impl<B: Backend> Drop for Mapping<B> {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            self.res.vmm.record_error(e);
        }
    }
}
