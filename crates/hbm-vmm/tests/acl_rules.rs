//! The safe layer and `ipc` under Ascend ACL's rules, without an NPU.
//!
//! `AclModel` is the host backend with ACL's restrictions enforced the way the CANN runtime
//! enforces them (whole-chunk `aclrtMapMem`, `aclrtMemSetAccess` and `aclrtUnmapMem` on exactly
//! one mapping, no local and imported chunks in one reservation, `u64` shareable handles with a
//! process whitelist, no import in the exporting process). Each violation is a `Driver` error
//! from the model. The tests check that the safe layer never triggers one when the model reports
//! `Capabilities::ACL`. They refuse what ACL cannot do with the typed errors instead. A control
//! model that claims `Capabilities::UNRESTRICTED` shows that the checks do fire.

use hbm_vmm::host::{page_size, HostBackend, HostChunk, HostConfig, HostReservation};
use hbm_vmm::{
    ipc, Backend, Capabilities, DeviceId, HandleToken, Mapping, PagedRegion, ProcessId, Vmm,
    VmmError,
};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

const D0: DeviceId = DeviceId(0);
const D1: DeviceId = DeviceId(1);

/// The "runtime's" table of exported handles, shared by every model in this test process (as
/// the driver's is shared by every process on a machine).
struct Exported {
    fd: OwnedFd,
    exporter: ProcessId,
    whitelist: Vec<ProcessId>,
}

fn exported() -> &'static Mutex<HashMap<u64, Exported>> {
    static TABLE: OnceLock<Mutex<HashMap<u64, Exported>>> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(0x5eed_0000);

fn refused(call: &'static str) -> VmmError {
    VmmError::Driver { call, code: 107000 }
}

#[derive(Debug)]
struct ModelChunk {
    host: HostChunk,
    imported: bool,
    /// The one shareable handle of this allocation in this process, once exported.
    token: Mutex<Option<u64>>,
}

#[derive(Debug, Default)]
struct ResRecord {
    /// offset -> len of each live mapping.
    mapped: BTreeMap<usize, usize>,
    imported: Option<bool>,
}

#[derive(Debug)]
struct AclModel {
    host: HostBackend,
    caps: Capabilities,
    me: ProcessId,
    /// Per reservation base: its mappings and their origin.
    records: Mutex<HashMap<u64, ResRecord>>,
    /// Ranges of every `set_access` call, for the tests to inspect.
    access_calls: Mutex<Vec<(usize, usize)>>,
}

impl AclModel {
    fn new(caps: Capabilities, me: i32) -> Self {
        let g = page_size();
        let cfg = HostConfig::devices(2, 64 * g).with_granularity(g).unwrap();
        AclModel {
            host: HostBackend::new(cfg),
            caps,
            me: ProcessId(me),
            records: Mutex::new(HashMap::new()),
            access_calls: Mutex::new(Vec::new()),
        }
    }

    /// `Ok` if `[offset, offset + len)` is exactly one live mapping of `r`.
    fn exactly_one_mapping(
        &self,
        r: &HostReservation,
        offset: usize,
        len: usize,
    ) -> Result<(), ()> {
        let records = self.records.lock().unwrap();
        match records
            .get(&self.host.base(r))
            .and_then(|rec| rec.mapped.get(&offset))
        {
            Some(&l) if l == len => Ok(()),
            _ => Err(()),
        }
    }
}

impl Backend for AclModel {
    type Chunk = ModelChunk;
    type Reservation = HostReservation;
    type ShareableHandle = HandleToken;

    fn capabilities(&self) -> Capabilities {
        self.caps
    }
    fn device_count(&self) -> usize {
        self.host.device_count()
    }
    fn granularity(&self, dev: DeviceId) -> Result<usize, VmmError> {
        self.host.granularity(dev)
    }
    fn create(&self, dev: DeviceId, size: usize, exportable: bool) -> Result<ModelChunk, VmmError> {
        Ok(ModelChunk {
            host: self.host.create(dev, size, exportable)?,
            imported: false,
            token: Mutex::new(None),
        })
    }
    fn release(&self, chunk: ModelChunk) -> Result<(), VmmError> {
        self.host.release(chunk.host)
    }
    fn reserve(&self, dev: DeviceId, size: usize) -> Result<HostReservation, VmmError> {
        let r = self.host.reserve(dev, size)?;
        self.records
            .lock()
            .unwrap()
            .insert(self.host.base(&r), ResRecord::default());
        Ok(r)
    }
    fn free(&self, r: HostReservation) -> Result<(), VmmError> {
        let rec = self.records.lock().unwrap().remove(&self.host.base(&r));
        if rec.is_some_and(|rec| !rec.mapped.is_empty()) {
            return Err(refused("aclrtReleaseMemAddress"));
        }
        self.host.free(r)
    }
    fn map(
        &self,
        r: &HostReservation,
        offset: usize,
        c: &ModelChunk,
        chunk_offset: usize,
        len: usize,
    ) -> Result<(), VmmError> {
        // aclrtMapMem: offset 0, size of the whole allocation.
        if chunk_offset != 0 || len != c.host.size() {
            return Err(refused("aclrtMapMem"));
        }
        let mut records = self.records.lock().unwrap();
        let rec = records.entry(self.host.base(r)).or_default();
        if rec.imported.is_some_and(|i| i != c.imported) {
            return Err(refused("aclrtMapMem"));
        }
        self.host.map(r, offset, &c.host, chunk_offset, len)?;
        rec.mapped.insert(offset, len);
        rec.imported = Some(c.imported);
        Ok(())
    }
    fn unmap(&self, r: &HostReservation, offset: usize, len: usize) -> Result<(), VmmError> {
        // aclrtUnmapMem takes only the address of one mapping.
        self.exactly_one_mapping(r, offset, len)
            .map_err(|()| refused("aclrtUnmapMem"))?;
        self.host.unmap(r, offset, len)?;
        let mut records = self.records.lock().unwrap();
        let rec = records.entry(self.host.base(r)).or_default();
        rec.mapped.remove(&offset);
        if rec.mapped.is_empty() {
            rec.imported = None;
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
        // aclrtMemSetAccess: exactly one aclrtMapMem's range, read-write only.
        self.exactly_one_mapping(r, offset, len)
            .map_err(|()| refused("aclrtMemSetAccess"))?;
        if devices.is_empty() {
            return Err(VmmError::Unsupported("revoking access"));
        }
        self.access_calls.lock().unwrap().push((offset, len));
        self.host.set_access(r, offset, len, devices)
    }
    fn export(&self, c: &ModelChunk, importers: &[ProcessId]) -> Result<HandleToken, VmmError> {
        if importers.is_empty() {
            return Err(VmmError::NoImporters);
        }
        if c.imported {
            return Err(VmmError::Unsupported("exporting an imported chunk"));
        }
        let mut token = c.token.lock().unwrap();
        let mut table = exported().lock().unwrap();
        let t = match *token {
            Some(t) => t,
            None => {
                let t = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
                let fd = self.host.export(&c.host, &[])?;
                table.insert(
                    t,
                    Exported {
                        fd,
                        exporter: self.me,
                        whitelist: Vec::new(),
                    },
                );
                *token = Some(t);
                t
            }
        };
        let entry = table
            .get_mut(&t)
            .expect("exported tokens stay in the table");
        entry.whitelist.extend_from_slice(importers);
        Ok(HandleToken(t))
    }
    fn import(
        &self,
        dev: DeviceId,
        handle: HandleToken,
        size: usize,
    ) -> Result<ModelChunk, VmmError> {
        let table = exported().lock().unwrap();
        let Some(entry) = table.get(&handle.0) else {
            return Err(refused("aclrtMemImportFromShareableHandle"));
        };
        if entry.exporter == self.me {
            return Err(VmmError::Unsupported("importing in the exporting process"));
        }
        if !entry.whitelist.contains(&self.me) {
            return Err(refused("aclrtMemImportFromShareableHandle"));
        }
        let fd = entry
            .fd
            .try_clone()
            .map_err(|_| refused("aclrtMemImportFromShareableHandle"))?;
        Ok(ModelChunk {
            host: self.host.import(dev, fd, size)?,
            imported: true,
            token: Mutex::new(None),
        })
    }
    fn base(&self, r: &HostReservation) -> u64 {
        self.host.base(r)
    }
    fn mem_info(&self, dev: DeviceId) -> Result<(usize, usize), VmmError> {
        self.host.mem_info(dev)
    }
    fn process_id(&self) -> Result<ProcessId, VmmError> {
        Ok(self.me)
    }
}

/// Writes one byte through a mapping (the model's addresses are this process's).
fn poke(m: &Mapping<AclModel>, at: usize, value: u8) {
    assert!(at < m.len());
    // SAFETY: the mapping is live and read-write for the whole test, its address is a real
    // address of this process (host memfd underneath), and no Rust reference to it exists.
    unsafe { (m.addr() as usize as *mut u8).add(at).write_volatile(value) }
}

/// Reads one byte through a mapping.
fn peek(m: &Mapping<AclModel>, at: usize) -> u8 {
    assert!(at < m.len());
    // SAFETY: as in `poke`; nothing writes concurrently.
    unsafe { (m.addr() as usize as *const u8).add(at).read_volatile() }
}

fn acl(me: i32) -> (Vmm<AclModel>, usize) {
    (Vmm::new(AclModel::new(Capabilities::ACL, me)), page_size())
}

#[test]
fn partial_maps_are_refused_before_the_backend_sees_them() {
    let (vmm, g) = acl(100);
    let chunk = vmm.create_chunk(D0, 2 * g, false).unwrap();
    let r = vmm.reserve(D0, 2 * g).unwrap();
    assert_eq!(
        r.map(0, &chunk, 0, g).unwrap_err(),
        VmmError::PartialMapUnsupported {
            chunk_offset: 0,
            len: g,
            chunk_size: 2 * g
        }
    );
    assert!(matches!(
        r.map(g, &chunk, g, g),
        Err(VmmError::PartialMapUnsupported { chunk_offset, .. }) if chunk_offset == g
    ));
    // The whole chunk maps, and its bytes are there.
    let m = r.map(0, &chunk, 0, 2 * g).unwrap();
    poke(&m, 2 * g - 1, 7);
    assert_eq!(peek(&m, 2 * g - 1), 7);
    drop(m);
    assert!(vmm.take_errors().is_empty());
}

/// `Reservation::set_access` covers adjacent mappings one call each under ACL's rules, and
/// teardown unmaps each mapping by itself, so the model never refuses a call.
#[test]
fn access_is_granted_one_mapping_at_a_time() {
    let (vmm, g) = acl(100);
    let mut region = PagedRegion::new(&vmm, D0, g, 4).unwrap();
    for slot in 0..3 {
        region
            .map_slot(slot, vmm.create_chunk(D0, g, false).unwrap())
            .unwrap();
    }
    vmm.backend().access_calls.lock().unwrap().clear();
    region.set_access(&[D1]).unwrap();
    let calls = vmm.backend().access_calls.lock().unwrap().clone();
    assert_eq!(calls, vec![(0, g), (g, g), (2 * g, g)]);
    // Mapped later: granted with the region's access list, again one mapping.
    region
        .map_slot(3, vmm.create_chunk(D0, g, false).unwrap())
        .unwrap();
    assert_eq!(
        vmm.backend().access_calls.lock().unwrap().last(),
        Some(&(3 * g, g))
    );
    let old = region
        .remap_slot(1, vmm.create_chunk(D0, g, false).unwrap())
        .unwrap();
    drop((old, region));
    assert!(vmm.take_errors().is_empty());
    assert_eq!(vmm.usage(D0), 0);
}

/// The control: the same calls on a model that claims no restrictions trip its ACL checks.
/// So the test above would notice a safe layer that merged the adjacent mappings.
#[test]
fn a_backend_claiming_no_restrictions_gets_merged_access_calls() {
    let vmm = Vmm::new(AclModel::new(Capabilities::UNRESTRICTED, 100));
    let g = page_size();
    let mut region = PagedRegion::new(&vmm, D0, g, 2).unwrap();
    for slot in 0..2 {
        region
            .map_slot(slot, vmm.create_chunk(D0, g, false).unwrap())
            .unwrap();
    }
    assert_eq!(
        region.set_access(&[D1]).unwrap_err(),
        refused("aclrtMemSetAccess")
    );
    let chunk = vmm.create_chunk(D0, 2 * g, false).unwrap();
    let r = vmm.reserve(D0, 2 * g).unwrap();
    assert_eq!(r.map(0, &chunk, 0, g).unwrap_err(), refused("aclrtMapMem"));
}

#[test]
fn local_and_imported_chunks_never_share_a_reservation() {
    let (exporter, g) = acl(100);
    let (importer, _) = acl(200);
    let theirs = exporter.create_chunk(D0, g, true).unwrap();
    let token = theirs.export_to(&[ProcessId(200)]).unwrap();
    let imported = importer.import_chunk(D0, token, g).unwrap();
    assert!(imported.is_imported());
    let mine = importer.create_chunk(D0, g, false).unwrap();

    let mut region = PagedRegion::new(&importer, D0, g, 2).unwrap();
    region.map_slot(0, mine.clone()).unwrap();
    assert_eq!(
        region.map_slot(1, imported.clone()).unwrap_err(),
        VmmError::MixedOrigins {
            device: D0,
            adding: "imported"
        }
    );
    // Once the local chunk is gone, the range may hold imported chunks.
    region.unmap_slot(0).unwrap();
    region.map_slot(1, imported).unwrap();
    assert_eq!(
        region.map_slot(0, mine).unwrap_err(),
        VmmError::MixedOrigins {
            device: D0,
            adding: "local"
        }
    );
    assert!(importer.take_errors().is_empty());
}

#[test]
fn exports_name_their_importers() {
    let (exporter, g) = acl(100);
    let (stranger, _) = acl(300);
    let chunk = exporter.create_chunk(D0, g, true).unwrap();
    assert_eq!(chunk.export().unwrap_err(), VmmError::NoImporters);
    let token = chunk.export_to(&[ProcessId(200)]).unwrap();
    // One shareable handle per allocation: a second export extends the whitelist.
    assert_eq!(chunk.export_to(&[ProcessId(201)]).unwrap(), token);
    assert_eq!(
        stranger.import_chunk(D0, token, g).unwrap_err(),
        refused("aclrtMemImportFromShareableHandle")
    );
    let plain = exporter.create_chunk(D0, g, false).unwrap();
    assert_eq!(
        plain.export_to(&[ProcessId(200)]).unwrap_err(),
        VmmError::NotExportable
    );
}

/// Over a socket, the receiver announces itself first and the sender exports to it.
#[test]
fn token_handles_cross_a_socket_after_the_importer_is_announced() {
    let (exporter, g) = acl(100);
    let (importer, _) = acl(200);
    let mut sent = Vec::new();
    for i in 0..3u8 {
        let dev = DeviceId(u32::from(i % 2));
        let chunk = exporter.create_chunk(dev, g, true).unwrap();
        let view = exporter
            .reserve(dev, g)
            .unwrap()
            .map(0, &chunk, 0, g)
            .unwrap();
        poke(&view, 0, 10 + i);
        sent.push((format!("expert-{i}"), chunk));
    }
    let (a, b) = UnixStream::pair().unwrap();
    let sender = std::thread::spawn(move || ipc::send_chunks(&a, &sent));
    let got = ipc::recv_chunks(&b, &importer).unwrap();
    sender.join().unwrap().unwrap();
    assert_eq!(got.len(), 3);
    for (i, s) in got.iter().enumerate() {
        assert_eq!(s.manifest.key, format!("expert-{i}"));
        assert!(s.chunk.is_imported());
        let view = importer
            .reserve(s.manifest.device, g)
            .unwrap()
            .map(0, &s.chunk, 0, g)
            .unwrap();
        assert_eq!(peek(&view, 0), 10 + i as u8);
    }
    assert_eq!(importer.usage(D0), 0);
}

/// A receiver whose handles are fds refuses a token handle with a typed error.
#[test]
fn a_host_receiver_refuses_token_handles() {
    let (exporter, g) = acl(100);
    let chunk = exporter.create_chunk(D0, g, true).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let sender = std::thread::spawn(move || ipc::send_chunks(&a, &[("x".to_string(), chunk)]));
    // The host receiver does not announce itself; the token sender waits for it.
    ipc::announce_importer(&b, ProcessId(200)).unwrap();
    let host = Vmm::new(HostBackend::new(
        HostConfig::devices(1, 4 * g).with_granularity(g).unwrap(),
    ));
    assert!(matches!(
        ipc::recv_chunks(&b, &host),
        Err(VmmError::BadHandle(_))
    ));
    sender.join().unwrap().unwrap();
}
