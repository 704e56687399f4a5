//! CPU access to memory of the host backend, whose device virtual addresses are real addresses
//! in this process.
//!
//! Safe slices are handed out through guards that hold the chunk's host lock: any number of
//! [`HostRead`]s of one chunk, or one [`HostWrite`], across *all* of its mappings in this
//! process. So a chunk mapped at two addresses never gives a `&[u8]` and a `&mut [u8]` to the
//! same bytes at once. (Another process that maps the same memfd can still write concurrently,
//! as with any shared memory; coordinate such access out of band.)

use crate::host::HostBackend;
use crate::{check_range, Mapping, PagedRegion, VmmError};
use parking_lot::{RwLockReadGuard, RwLockWriteGuard};
use std::fmt;
use std::ops::{Deref, DerefMut};

/// Shared access to host-backend bytes; holds the chunk's host lock for reading.
pub struct HostRead<'a> {
    _guard: RwLockReadGuard<'a, ()>,
    bytes: &'a [u8],
}

/// Exclusive access to host-backend bytes; holds the chunk's host lock for writing.
pub struct HostWrite<'a> {
    _guard: RwLockWriteGuard<'a, ()>,
    bytes: &'a mut [u8],
}

impl fmt::Debug for HostRead<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostRead")
            .field("addr", &self.bytes.as_ptr())
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl fmt::Debug for HostWrite<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostWrite")
            .field("addr", &self.bytes.as_ptr())
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl Deref for HostRead<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl Deref for HostWrite<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl DerefMut for HostWrite<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.bytes
    }
}

fn f32s(bytes: &[u8]) -> &[f32] {
    // SAFETY: every bit pattern is a valid f32; `align_to` only yields correctly aligned,
    // in-bounds elements.
    let (head, body, _tail) = unsafe { bytes.align_to::<f32>() };
    // Mapped memory starts on a page boundary, so there is never a misaligned head.
    debug_assert!(head.is_empty());
    body
}

fn f32s_mut(bytes: &mut [u8]) -> &mut [f32] {
    // SAFETY: every bit pattern is a valid f32 and every f32 a valid set of bytes; `align_to_mut`
    // only yields correctly aligned, in-bounds elements.
    let (head, body, _tail) = unsafe { bytes.align_to_mut::<f32>() };
    debug_assert!(head.is_empty());
    body
}

impl HostRead<'_> {
    /// The bytes as little-endian `f32`s (the weights' format); a trailing partial element is
    /// left out.
    pub fn as_f32(&self) -> &[f32] {
        f32s(self.bytes)
    }
}

impl HostWrite<'_> {
    /// The bytes as `f32`s.
    pub fn as_f32(&self) -> &[f32] {
        f32s(self.bytes)
    }

    /// The bytes as mutable `f32`s.
    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        f32s_mut(self.bytes)
    }
}

impl Mapping<HostBackend> {
    /// The mapped bytes, shared. Blocks while a [`HostWrite`] of the same chunk is alive.
    pub fn as_slice(&self) -> HostRead<'_> {
        let guard = self.chunk().host_lock().read_recursive();
        // SAFETY: the mapping is live for `'_` (we borrow it), its range is mapped readable and
        // writable for the owner device (the safe layer always grants it), and the chunk's host
        // lock, held for reading, excludes every `&mut` to these bytes in this process.
        let bytes = unsafe { std::slice::from_raw_parts(self.host_ptr(), self.len()) };
        HostRead {
            _guard: guard,
            bytes,
        }
    }

    /// The mapped bytes, exclusive. Blocks while any other guard of the same chunk is alive.
    pub fn as_mut_slice(&self) -> HostWrite<'_> {
        let guard = self.chunk().host_lock().write();
        // SAFETY: as in `as_slice`, and the write lock excludes every other slice of the
        // chunk's bytes in this process.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.host_ptr(), self.len()) };
        HostWrite {
            _guard: guard,
            bytes,
        }
    }
}

impl PagedRegion<HostBackend> {
    fn slot_mapping(&self, i: usize) -> Result<&Mapping<HostBackend>, VmmError> {
        self.check_slots(i, 1)?;
        self.mapping(i).ok_or(VmmError::NoSuchSlot {
            slot: i,
            slots: self.slot_count(),
        })
    }

    /// The bytes of mapped slot `i`, shared.
    pub fn slot_bytes(&self, i: usize) -> Result<HostRead<'_>, VmmError> {
        Ok(self.slot_mapping(i)?.as_slice())
    }

    /// The bytes of mapped slot `i`, exclusive.
    pub fn slot_bytes_mut(&self, i: usize) -> Result<HostWrite<'_>, VmmError> {
        Ok(self.slot_mapping(i)?.as_mut_slice())
    }

    /// Copies `buf.len()` bytes starting at byte `offset` of the region into `buf`; the range may
    /// span slots, all of which must be mapped.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), VmmError> {
        self.check_byte_range(offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done;
            let (slot, within) = (at / self.slot_size(), at % self.slot_size());
            let n = (self.slot_size() - within).min(buf.len() - done);
            let src = self.slot_bytes(slot)?;
            buf[done..done + n].copy_from_slice(&src[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// Copies `data` to byte `offset` of the region; the range may span slots, all of which
    /// must be mapped.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), VmmError> {
        self.check_byte_range(offset, data.len())?;
        let mut done = 0;
        while done < data.len() {
            let at = offset + done;
            let (slot, within) = (at / self.slot_size(), at % self.slot_size());
            let n = (self.slot_size() - within).min(data.len() - done);
            let mut dst = self.slot_bytes_mut(slot)?;
            dst[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    fn check_byte_range(&self, offset: usize, len: usize) -> Result<(), VmmError> {
        check_range("paged region", offset, len, self.len())?;
        if len == 0 {
            return Ok(());
        }
        let first = offset / self.slot_size();
        let last = (offset + len - 1) / self.slot_size();
        self.check_slots(first, last - first + 1)
    }

    /// A raw pointer to byte `offset` of the region after checking that
    /// `[offset, offset + len)` is inside it and entirely mapped. Creating the pointer is safe;
    /// dereferencing it is up to the caller, who must not let it outlive the mappings nor race
    /// with writers (the slot guards do not cover raw pointers).
    pub fn range_ptr(&self, offset: usize, len: usize) -> Result<*mut u8, VmmError> {
        self.check_byte_range(offset, len)?;
        Ok((self.base() as usize + offset) as *mut u8)
    }

    /// The bytes `[offset, offset + len)` of the region as one slice, spanning slots (they are
    /// contiguous in virtual memory). Checked: the range must be inside the region and mapped.
    ///
    /// # Safety
    ///
    /// The host locks are not taken for a multi-slot range: for the lifetime of the slice, no
    /// [`HostWrite`] of any chunk in the range may exist and nothing may write those bytes (in
    /// this or another process).
    pub unsafe fn range(&self, offset: usize, len: usize) -> Result<&[u8], VmmError> {
        let p = self.range_ptr(offset, len)?;
        // SAFETY: the range is inside the region and every slot of it is mapped and accessible
        // for as long as `self` is borrowed (unmapping needs `&mut self`); the caller promises no
        // concurrent writer.
        Ok(unsafe { std::slice::from_raw_parts(p, len) })
    }
}
