//! proptest: random sequences of create / map / unmap / remap / write / drop on a `PagedRegion`
//! (host backend) checked after every step against a plain model.

use hbm_vmm::host::{page_size, HostBackend, HostConfig};
use hbm_vmm::{DeviceId, PagedRegion, PhysChunk, Vmm, VmmError};
use proptest::prelude::*;

const D0: DeviceId = DeviceId(0);
const SLOTS: usize = 6;
const CAPACITY_PAGES: usize = 8;

#[derive(Debug, Clone)]
enum Op {
    Create,
    DropHandle(usize),
    Map(usize, usize),
    Unmap(usize),
    Remap(usize, usize),
    Write(usize, u8),
}

fn op() -> impl Strategy<Value = Op> {
    // Slot indices go one past the end to exercise NoSuchSlot.
    prop_oneof![
        3 => Just(Op::Create),
        1 => (0..16usize).prop_map(Op::DropHandle),
        4 => (0..=SLOTS, 0..16usize).prop_map(|(s, c)| Op::Map(s, c)),
        2 => (0..=SLOTS).prop_map(Op::Unmap),
        2 => (0..=SLOTS, 0..16usize).prop_map(|(s, c)| Op::Remap(s, c)),
        2 => (0..=SLOTS, any::<u8>()).prop_map(|(s, b)| Op::Write(s, b)),
    ]
}

/// What the model knows about a chunk: its tag (byte 0), its byte 1, and whether the test
/// still holds a handle.
struct ModelChunk {
    tag: u8,
    byte1: u8,
    handle: Option<PhysChunk<HostBackend>>,
}

struct Harness {
    vmm: Vmm<HostBackend>,
    g: usize,
    region: PagedRegion<HostBackend>,
    chunks: Vec<ModelChunk>,
    slots: Vec<Option<usize>>,
}

impl Harness {
    fn new() -> Self {
        let g = page_size();
        let cfg = HostConfig::devices(1, CAPACITY_PAGES * g)
            .with_granularity(g)
            .unwrap();
        let vmm = Vmm::new(HostBackend::new(cfg));
        let region = PagedRegion::new(&vmm, D0, g, SLOTS).unwrap();
        Harness {
            vmm,
            g,
            region,
            chunks: Vec::new(),
            slots: vec![None; SLOTS],
        }
    }

    fn live_chunks(&self) -> usize {
        (0..self.chunks.len())
            .filter(|&c| self.chunks[c].handle.is_some() || self.slots.contains(&Some(c)))
            .count()
    }

    /// A handle to model chunk `c` if the test still holds one.
    fn handle(&self, c: usize) -> Option<PhysChunk<HostBackend>> {
        self.chunks.get(c).and_then(|m| m.handle.clone())
    }

    fn apply(&mut self, op: &Op) {
        let g = self.g;
        match *op {
            Op::Create => {
                let r = self.vmm.create_chunk(D0, g, false);
                if self.live_chunks() >= CAPACITY_PAGES {
                    assert!(matches!(r, Err(VmmError::OutOfMemory { .. })), "{r:?}");
                    return;
                }
                let chunk = r.unwrap();
                let tag = self.chunks.len() as u8 + 1;
                // Tag it through a temporary view at another address.
                let view = self
                    .vmm
                    .reserve(D0, g)
                    .unwrap()
                    .map(0, &chunk, 0, g)
                    .unwrap();
                view.as_mut_slice()[0] = tag;
                drop(view);
                self.chunks.push(ModelChunk {
                    tag,
                    byte1: 0,
                    handle: Some(chunk),
                });
            }
            Op::DropHandle(c) => {
                if let Some(m) = self.chunks.get_mut(c) {
                    m.handle = None;
                }
            }
            Op::Map(s, c) => {
                let Some(chunk) = self.handle(c) else { return };
                let r = self.region.map_slot(s, chunk);
                match self.slots.get(s) {
                    None => assert!(matches!(r, Err(VmmError::NoSuchSlot { .. }))),
                    Some(Some(_)) => assert!(matches!(r, Err(VmmError::AlreadyMapped { .. }))),
                    Some(None) => {
                        r.unwrap();
                        self.slots[s] = Some(c);
                    }
                }
            }
            Op::Unmap(s) => {
                let r = self.region.unmap_slot(s);
                match self.slots.get(s) {
                    None => assert!(matches!(r, Err(VmmError::NoSuchSlot { .. }))),
                    Some(None) => assert!(matches!(r, Err(VmmError::NotMapped { .. }))),
                    Some(Some(c)) => {
                        let c = *c;
                        let got = r.unwrap();
                        assert_eq!(got.size(), g);
                        if let Some(h) = &self.chunks[c].handle {
                            assert!(got.same(h));
                        }
                        self.slots[s] = None;
                    }
                }
            }
            Op::Remap(s, c) => {
                let Some(chunk) = self.handle(c) else { return };
                let r = self.region.remap_slot(s, chunk);
                match self.slots.get(s) {
                    None => assert!(matches!(r, Err(VmmError::NoSuchSlot { .. }))),
                    Some(None) => assert!(matches!(r, Err(VmmError::NotMapped { .. }))),
                    Some(Some(old)) => {
                        let old = *old;
                        let got = r.unwrap();
                        if let Some(h) = &self.chunks[old].handle {
                            assert!(got.same(h));
                        }
                        self.slots[s] = Some(c);
                    }
                }
            }
            Op::Write(s, b) => {
                let r = self.region.write(s * g + 1, &[b]);
                match self.slots.get(s) {
                    None => assert!(matches!(r, Err(VmmError::OutOfRange { .. }))),
                    Some(None) => assert!(matches!(r, Err(VmmError::NotMapped { .. }))),
                    Some(Some(c)) => {
                        r.unwrap();
                        self.chunks[*c].byte1 = b;
                    }
                }
            }
        }
    }

    fn check(&self) {
        let g = self.g;
        assert_eq!(self.vmm.usage(D0), self.live_chunks() * g);
        for (s, slot) in self.slots.iter().enumerate() {
            assert_eq!(self.region.is_mapped(s), slot.is_some());
            let addr = self.region.slot_addr(s).unwrap();
            match slot {
                Some(c) => {
                    let bytes = self.region.slot_bytes(s).unwrap();
                    assert_eq!(
                        bytes[0], self.chunks[*c].tag,
                        "slot {s} shows the wrong chunk"
                    );
                    assert_eq!(bytes[1], self.chunks[*c].byte1, "slot {s} lost a write");
                    self.vmm.check_range(D0, addr, g).unwrap();
                }
                None => {
                    assert!(self.region.chunk(s).is_none());
                    assert!(self.vmm.check_range(D0, addr, 1).is_err());
                }
            }
        }
        assert!(self.vmm.take_errors().is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn paged_region_matches_model(ops in proptest::collection::vec(op(), 1..48)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
            h.check();
        }
        // Teardown returns every byte.
        let vmm = h.vmm.clone();
        drop(h);
        prop_assert_eq!(vmm.usage(D0), 0);
        prop_assert_eq!(vmm.mem_info(D0).unwrap().0, vmm.capacity(D0));
    }
}
