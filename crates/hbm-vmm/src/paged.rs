//! [`PagedRegion`]: a reserved range of equal slots, each of which can hold one chunk.

use crate::{check_aligned, Backend, DeviceId, Mapping, PhysChunk, Reservation, Vmm, VmmError};
use std::fmt;

/// A reservation of `slots` slots of `slot_size` bytes each. Every slot can be mapped to a
/// chunk of exactly `slot_size` bytes, unmapped, or remapped to another chunk, without
/// touching the other slots. The addresses of the slots never change, so a contiguous range
/// of slots is a contiguous range of device memory no matter which chunks back it.
///
/// This is how experts are stitched into one contiguous range per device, and how a KV pool
/// grows and shrinks.
pub struct PagedRegion<B: Backend> {
    res: Reservation<B>,
    slot_size: usize,
    slots: Vec<Option<Mapping<B>>>,
}

impl<B: Backend> fmt::Debug for PagedRegion<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagedRegion")
            .field("device", &self.res.device())
            .field("base", &format_args!("{:#x}", self.res.base()))
            .field("slot_size", &self.slot_size)
            .field("slots", &self.slots.len())
            .field("mapped", &self.mapped_count())
            .finish()
    }
}

impl<B: Backend> PagedRegion<B> {
    /// Reserves `slots * slot_size` bytes on `dev`. `slot_size` must be a positive multiple of
    /// the granularity and `slots` positive.
    pub fn new(
        vmm: &Vmm<B>,
        dev: DeviceId,
        slot_size: usize,
        slots: usize,
    ) -> Result<Self, VmmError> {
        let granularity = vmm.granularity(dev)?;
        if slot_size == 0 {
            return Err(VmmError::ZeroSize { what: "slot_size" });
        }
        if slots == 0 {
            return Err(VmmError::ZeroSize { what: "slots" });
        }
        check_aligned("slot_size", slot_size, granularity)?;
        let total = slot_size.checked_mul(slots).ok_or(VmmError::OutOfRange {
            what: "address space",
            offset: 0,
            len: slot_size,
            limit: usize::MAX / slots,
        })?;
        let res = vmm.reserve(dev, total)?;
        Ok(PagedRegion {
            res,
            slot_size,
            slots: (0..slots).map(|_| None).collect(),
        })
    }

    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Size of each slot in bytes.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Device virtual address of slot 0.
    pub fn base(&self) -> u64 {
        self.res.base()
    }

    /// Total length in bytes (`slot_count * slot_size`).
    pub fn len(&self) -> usize {
        self.res.len()
    }

    /// Whether the region has no bytes (never).
    pub fn is_empty(&self) -> bool {
        self.res.is_empty()
    }

    /// The region's device.
    pub fn device(&self) -> DeviceId {
        self.res.device()
    }

    /// The underlying reservation.
    pub fn reservation(&self) -> &Reservation<B> {
        &self.res
    }

    /// How many slots are mapped.
    pub fn mapped_count(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    fn check_slot(&self, i: usize) -> Result<(), VmmError> {
        if i < self.slots.len() {
            Ok(())
        } else {
            Err(VmmError::NoSuchSlot {
                slot: i,
                slots: self.slots.len(),
            })
        }
    }

    /// Device virtual address of slot `i`.
    pub fn slot_addr(&self, i: usize) -> Result<u64, VmmError> {
        self.check_slot(i)?;
        Ok(self.res.base() + (i * self.slot_size) as u64)
    }

    /// Whether slot `i` is mapped (false for a slot out of range).
    pub fn is_mapped(&self, i: usize) -> bool {
        self.slots.get(i).is_some_and(Option::is_some)
    }

    /// The chunk mapped at slot `i`, if any.
    pub fn chunk(&self, i: usize) -> Option<&PhysChunk<B>> {
        self.slots
            .get(i)
            .and_then(Option::as_ref)
            .map(Mapping::chunk)
    }

    /// The mapping of slot `i`, if any.
    pub fn mapping(&self, i: usize) -> Option<&Mapping<B>> {
        self.slots.get(i).and_then(Option::as_ref)
    }

    fn check_chunk(&self, chunk: &PhysChunk<B>) -> Result<(), VmmError> {
        if chunk.size() != self.slot_size {
            return Err(VmmError::SizeMismatch {
                expected: self.slot_size,
                found: chunk.size(),
            });
        }
        if chunk.device() != self.res.device() {
            return Err(VmmError::DeviceMismatch {
                expected: self.res.device(),
                found: chunk.device(),
            });
        }
        if !self.res.vmm().same(chunk.vmm()) {
            return Err(VmmError::BadHandle(
                "the chunk belongs to another Vmm".into(),
            ));
        }
        Ok(())
    }

    /// Maps `chunk` (exactly `slot_size` bytes, on the region's device) at slot `i`.
    pub fn map_slot(&mut self, i: usize, chunk: PhysChunk<B>) -> Result<(), VmmError> {
        self.check_slot(i)?;
        self.check_chunk(&chunk)?;
        if self.slots[i].is_some() {
            return Err(VmmError::AlreadyMapped {
                device: self.device(),
                addr: self.slot_addr(i)?,
                len: self.slot_size,
            });
        }
        let m = self
            .res
            .map(i * self.slot_size, &chunk, 0, self.slot_size)?;
        self.slots[i] = Some(m);
        Ok(())
    }

    /// Unmaps slot `i` and returns its chunk.
    pub fn unmap_slot(&mut self, i: usize) -> Result<PhysChunk<B>, VmmError> {
        self.check_slot(i)?;
        let Some(m) = self.slots[i].take() else {
            return Err(VmmError::NotMapped {
                device: self.device(),
                addr: self.slot_addr(i)?,
                len: self.slot_size,
            });
        };
        let chunk = m.chunk().clone();
        m.unmap()?;
        Ok(chunk)
    }

    /// Replaces the chunk at mapped slot `i` with `chunk` and returns the old one. If mapping the
    /// new chunk fails, the old one is mapped back and the error is returned.
    pub fn remap_slot(&mut self, i: usize, chunk: PhysChunk<B>) -> Result<PhysChunk<B>, VmmError> {
        self.check_slot(i)?;
        self.check_chunk(&chunk)?;
        if self.slots[i].is_none() {
            return Err(VmmError::NotMapped {
                device: self.device(),
                addr: self.slot_addr(i)?,
                len: self.slot_size,
            });
        }
        let old = self.unmap_slot(i)?;
        match self.res.map(i * self.slot_size, &chunk, 0, self.slot_size) {
            Ok(m) => {
                self.slots[i] = Some(m);
                Ok(old)
            }
            Err(e) => {
                let back = self.res.map(i * self.slot_size, &old, 0, self.slot_size)?;
                self.slots[i] = Some(back);
                Err(e)
            }
        }
    }

    /// Grants `devices` (in addition to the region's own device) access to every mapped slot
    /// now and every slot mapped later.
    pub fn set_access(&self, devices: &[DeviceId]) -> Result<(), VmmError> {
        self.res.set_access(devices)
    }

    /// `Ok` if slots `first..first + count` are all mapped (typed error naming the range
    /// otherwise).
    pub fn check_slots(&self, first: usize, count: usize) -> Result<(), VmmError> {
        let end = first
            .checked_add(count)
            .filter(|&e| e <= self.slots.len())
            .ok_or(VmmError::NoSuchSlot {
                slot: first.saturating_add(count),
                slots: self.slots.len(),
            })?;
        for i in first..end {
            if self.slots[i].is_none() {
                return Err(VmmError::NotMapped {
                    device: self.device(),
                    addr: self.slot_addr(i)?,
                    len: self.slot_size,
                });
            }
        }
        Ok(())
    }
}
