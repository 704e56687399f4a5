//! Sharing chunks with another process over a Unix domain socket.
//!
//! The sender writes a manifest (key, size, device of each chunk) and the chunks' shareable
//! handles; the receiver imports them with [`Vmm::import_chunk`] and maps them like any other
//! chunk. Only exportable chunks can be sent (see [`Vmm::create_chunk`]).
//!
//! The layer is generic over the backend's [`ShareableHandle`] kind:
//! - **fds** (host memfd, CUDA POSIX fd) ride in `SCM_RIGHTS` ancillary data. Holding one is the
//!   permission to import, so the receiver just receives.
//! - **tokens** (ACL's `u64` shareable handle) ride in the message body. They are useless to a
//!   process the exporter did not whitelist, so the receiver first announces its [`ProcessId`]
//!   ([`announce_importer`]: `aclrtDeviceGetBareTgid` on ACL) and the sender exports to it
//!   ([`await_importer`], then [`crate::PhysChunk::export_to`]). [`send_chunks`] and
//!   [`recv_chunks`] do this handshake by themselves when
//!   [`ShareableHandle::NAMES_IMPORTER`] says so. The socket is trusted as with fds: whoever is
//!   connected to it may ask for the chunks.
//!
//! Wire format (version 2; all integers little-endian):
//! - Importer announcement (token backends only, receiver to sender, once): `b"HVMI"`,
//!   version `u16`, zero `u16`, process id `i32`, zero `u32` (16 bytes).
//! - Then, repeated per batch of at most [`MAX_FDS_PER_MESSAGE`] chunks: a 16-byte header
//!   `b"HVMM"`, version `u16`, flags `u16` (bit 0: last batch), entry count `u32`, payload
//!   length `u32`; then the payload, one entry per chunk: key length `u32`, key bytes (UTF-8),
//!   size `u64`, device `u32`, handle kind `u8` (0: fd, 1: token), and for a token its value
//!   `u64`. The batch's fds ride on the header, in entry order.
//!
//! ```no_run
//! # use hbm_vmm::{ipc, host::{HostBackend, HostConfig}, DeviceId, Vmm};
//! # fn main() -> Result<(), hbm_vmm::VmmError> {
//! # let vmm = Vmm::new(HostBackend::new(HostConfig::devices(1, 1 << 30)));
//! let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
//! let chunk = vmm.create_chunk(DeviceId(0), 2 << 20, true)?;
//! ipc::send_chunks(&a, &[("layer0.attn".to_string(), chunk)])?;
//! // ... in the other process, with its own `Vmm`:
//! for shared in ipc::recv_chunks(&b, &vmm)? {
//!     println!("{} ({} bytes on {})", shared.manifest.key, shared.manifest.size, shared.manifest.device);
//! }
//! # Ok(())
//! # }
//! ```

use crate::{Backend, DeviceId, PhysChunk, ProcessId, ShareableHandle, Vmm, VmmError, WireHandle};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Most chunks (fds) sent in one message; longer lists are split into batches.
pub const MAX_FDS_PER_MESSAGE: usize = 64;
const MAGIC: &[u8; 4] = b"HVMM";
const HELLO_MAGIC: &[u8; 4] = b"HVMI";
const VERSION: u16 = 2;
const FLAG_LAST: u16 = 1;
const HEADER_LEN: usize = 16;
const KIND_FD: u8 = 0;
const KIND_TOKEN: u8 = 1;
/// Largest payload a receiver accepts (keys are short; this bounds a hostile peer).
const MAX_PAYLOAD: usize = 1 << 20;
const MAX_KEY: usize = 4096;

/// One shared chunk as described on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkManifest {
    /// The sender's name for the chunk.
    pub key: String,
    /// Its size in bytes.
    pub size: usize,
    /// The device it lives on.
    pub device: DeviceId,
}

/// A chunk received from another process.
#[derive(Debug)]
pub struct SharedChunk<B: Backend> {
    /// What the sender said about it.
    pub manifest: ChunkManifest,
    /// The imported chunk, ready to map.
    pub chunk: PhysChunk<B>,
}

/// Sends `chunks` (each under a key) over `sock`: a manifest plus their shareable handles.
///
/// For a backend whose handles name their importers (ACL), this first waits for the receiver's
/// [`announce_importer`] (which [`recv_chunks`] sends) and exports to that process.
pub fn send_chunks<B: Backend>(
    sock: &UnixStream,
    chunks: &[(String, PhysChunk<B>)],
) -> Result<(), VmmError> {
    // Check everything first, so that a bad key or a non-exportable chunk fails before anything
    // is sent (or waited for).
    for (key, chunk) in chunks {
        if key.len() > MAX_KEY {
            return Err(VmmError::Protocol(format!(
                "key of {} bytes is longer than {MAX_KEY}",
                key.len()
            )));
        }
        if !chunk.is_exportable() {
            return Err(VmmError::NotExportable);
        }
    }
    let importers = if B::ShareableHandle::NAMES_IMPORTER {
        vec![await_importer(sock)?]
    } else {
        Vec::new()
    };
    let mut exported = Vec::with_capacity(chunks.len());
    for (key, chunk) in chunks {
        let manifest = ChunkManifest {
            key: key.clone(),
            size: chunk.size(),
            device: chunk.device(),
        };
        exported.push((manifest, chunk.export_to(&importers)?.into_wire()));
    }
    send_handles(sock, &exported)
}

/// Receives chunks sent with [`send_chunks`] and imports each on the device its manifest names.
///
/// For a backend whose handles name their importers (ACL), this first announces this process
/// ([`Backend::process_id`]) to the sender.
pub fn recv_chunks<B: Backend>(
    sock: &UnixStream,
    vmm: &Vmm<B>,
) -> Result<Vec<SharedChunk<B>>, VmmError> {
    if B::ShareableHandle::NAMES_IMPORTER {
        announce_importer(sock, vmm.backend().process_id()?)?;
    }
    recv_handles(sock)?
        .into_iter()
        .map(|(manifest, wire)| {
            let handle = B::ShareableHandle::from_wire(wire)?;
            let chunk = vmm.import_chunk(manifest.device, handle, manifest.size)?;
            Ok(SharedChunk { manifest, chunk })
        })
        .collect()
}

/// Tells the sender which process will import (the first step for token handles).
pub fn announce_importer(sock: &UnixStream, me: ProcessId) -> Result<(), VmmError> {
    let mut hello = [0u8; HEADER_LEN];
    hello[..4].copy_from_slice(HELLO_MAGIC);
    hello[4..6].copy_from_slice(&VERSION.to_le_bytes());
    hello[8..12].copy_from_slice(&me.0.to_le_bytes());
    let mut writer: &UnixStream = sock;
    writer
        .write_all(&hello)
        .map_err(|e| VmmError::io("write", &e))
}

/// Waits for the receiver's [`announce_importer`] and returns the process it names.
pub fn await_importer(sock: &UnixStream) -> Result<ProcessId, VmmError> {
    let mut hello = [0u8; HEADER_LEN];
    let mut reader: &UnixStream = sock;
    read_exact(&mut reader, &mut hello)?;
    if &hello[..4] != HELLO_MAGIC {
        return Err(VmmError::Protocol(
            "expected the importer's announcement (bad magic)".into(),
        ));
    }
    let version = u16::from_le_bytes([hello[4], hello[5]]);
    if version != VERSION {
        return Err(VmmError::Protocol(format!(
            "version {version}, expected {VERSION}"
        )));
    }
    let pid = i32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]);
    if pid <= 0 {
        return Err(VmmError::Protocol(format!(
            "the importer announced process id {pid}"
        )));
    }
    Ok(ProcessId(pid))
}

/// A handle to send, borrowed.
#[derive(Clone, Copy)]
enum WireRef<'a> {
    Fd(BorrowedFd<'a>),
    Token(u64),
}

impl WireHandle {
    fn borrowed(&self) -> WireRef<'_> {
        match self {
            WireHandle::Fd(fd) => WireRef::Fd(fd.as_fd()),
            WireHandle::Token(t) => WireRef::Token(*t),
        }
    }
}

/// Sends already exported chunks: a manifest entry and a handle (fd or token) each.
pub fn send_handles(
    sock: &UnixStream,
    entries: &[(ChunkManifest, WireHandle)],
) -> Result<(), VmmError> {
    let refs: Vec<(&ChunkManifest, WireRef<'_>)> =
        entries.iter().map(|(m, h)| (m, h.borrowed())).collect();
    send_entries(sock, &refs)
}

/// Sends already exported fds: a manifest entry and an fd each.
pub fn send_fds(sock: &UnixStream, entries: &[(ChunkManifest, OwnedFd)]) -> Result<(), VmmError> {
    let refs: Vec<(&ChunkManifest, WireRef<'_>)> = entries
        .iter()
        .map(|(m, fd)| (m, WireRef::Fd(fd.as_fd())))
        .collect();
    send_entries(sock, &refs)
}

fn send_entries(
    sock: &UnixStream,
    entries: &[(&ChunkManifest, WireRef<'_>)],
) -> Result<(), VmmError> {
    let mut batches = entries.chunks(MAX_FDS_PER_MESSAGE).peekable();
    if batches.peek().is_none() {
        return send_batch(sock, &[], true);
    }
    while let Some(batch) = batches.next() {
        send_batch(sock, batch, batches.peek().is_none())?;
    }
    Ok(())
}

fn send_batch(
    sock: &UnixStream,
    batch: &[(&ChunkManifest, WireRef<'_>)],
    last: bool,
) -> Result<(), VmmError> {
    let mut payload = Vec::new();
    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
    for (m, h) in batch {
        payload.extend_from_slice(&(m.key.len() as u32).to_le_bytes());
        payload.extend_from_slice(m.key.as_bytes());
        payload.extend_from_slice(&(m.size as u64).to_le_bytes());
        payload.extend_from_slice(&m.device.0.to_le_bytes());
        match *h {
            WireRef::Fd(fd) => {
                payload.push(KIND_FD);
                fds.push(fd);
            }
            WireRef::Token(t) => {
                payload.push(KIND_TOKEN);
                payload.extend_from_slice(&t.to_le_bytes());
            }
        }
    }
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4..6].copy_from_slice(&VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&(if last { FLAG_LAST } else { 0 }).to_le_bytes());
    header[8..12].copy_from_slice(&(batch.len() as u32).to_le_bytes());
    header[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());

    let mut space =
        [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(VmmError::Protocol("too many fds for one message".into()));
    }
    // The fds travel with the first byte; the rest of the bytes may need more calls.
    let iov = [IoSlice::new(&header), IoSlice::new(&payload)];
    let mut sent = rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL)
        .map_err(|e| VmmError::os("sendmsg", e))?;
    let total = HEADER_LEN + payload.len();
    while sent < total {
        let rest: Vec<u8> = header
            .iter()
            .chain(payload.iter())
            .skip(sent)
            .copied()
            .collect();
        let n = rustix::net::send(sock, &rest, SendFlags::NOSIGNAL)
            .map_err(|e| VmmError::os("send", e))?;
        sent += n;
    }
    Ok(())
}

/// Receives manifests and handles (fds or tokens) without importing them.
pub fn recv_handles(sock: &UnixStream) -> Result<Vec<(ChunkManifest, WireHandle)>, VmmError> {
    let mut out = Vec::new();
    loop {
        let last = recv_batch(sock, &mut out)?;
        if last {
            return Ok(out);
        }
    }
}

/// Receives manifests and fds without importing them; a token is a [`VmmError::Protocol`] error.
pub fn recv_fds(sock: &UnixStream) -> Result<Vec<(ChunkManifest, OwnedFd)>, VmmError> {
    recv_handles(sock)?
        .into_iter()
        .map(|(m, h)| match h {
            WireHandle::Fd(fd) => Ok((m, fd)),
            other => Err(VmmError::Protocol(format!(
                "chunk {}: expected an fd, got a {}",
                m.key,
                other.kind()
            ))),
        })
        .collect()
}

fn recv_batch(
    sock: &UnixStream,
    out: &mut Vec<(ChunkManifest, WireHandle)>,
) -> Result<bool, VmmError> {
    let mut header = [0u8; HEADER_LEN];
    let mut space =
        [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = {
        let mut iov = [IoSliceMut::new(&mut header)];
        rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
            .map_err(|e| VmmError::os("recvmsg", e))?
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.bytes == 0 {
        return Err(VmmError::Protocol(
            "the peer closed the socket before the last batch".into(),
        ));
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(VmmError::Protocol(format!(
            "more than {MAX_FDS_PER_MESSAGE} fds in one message"
        )));
    }
    let mut reader: &UnixStream = sock;
    if msg.bytes < HEADER_LEN {
        read_exact(&mut reader, &mut header[msg.bytes..])?;
    }
    if &header[..4] != MAGIC {
        return Err(VmmError::Protocol(
            "not an hbm-vmm chunk message (bad magic)".into(),
        ));
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != VERSION {
        return Err(VmmError::Protocol(format!(
            "version {version}, expected {VERSION}"
        )));
    }
    let flags = u16::from_le_bytes([header[6], header[7]]);
    let count = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    let len = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
    if count > MAX_FDS_PER_MESSAGE || len > MAX_PAYLOAD {
        return Err(VmmError::Protocol(format!(
            "batch of {count} entries / {len} bytes is too big"
        )));
    }
    if fds.len() > count {
        return Err(VmmError::Protocol(format!(
            "the manifest lists {count} chunks but {} fds arrived",
            fds.len()
        )));
    }
    let fds_arrived = fds.len();
    let mut fds = fds.into_iter();
    let mut payload = vec![0u8; len];
    read_exact(&mut reader, &mut payload)?;
    let mut p = Payload { bytes: &payload };
    for _ in 0..count {
        let key_len = p.u32()? as usize;
        if key_len > MAX_KEY {
            return Err(VmmError::Protocol(format!("key of {key_len} bytes")));
        }
        let key = String::from_utf8(p.take(key_len)?.to_vec())
            .map_err(|_| VmmError::Protocol("key is not UTF-8".into()))?;
        let size = usize::try_from(p.u64()?)
            .map_err(|_| VmmError::Protocol("size does not fit in usize".into()))?;
        let device = DeviceId(p.u32()?);
        let handle = match p.u8()? {
            KIND_FD => WireHandle::Fd(fds.next().ok_or_else(|| {
                VmmError::Protocol(format!(
                    "the manifest lists more fd handles than the {fds_arrived} fds that arrived"
                ))
            })?),
            KIND_TOKEN => WireHandle::Token(p.u64()?),
            other => {
                return Err(VmmError::Protocol(format!("unknown handle kind {other}")));
            }
        };
        out.push((ChunkManifest { key, size, device }, handle));
    }
    if fds.next().is_some() {
        return Err(VmmError::Protocol(format!(
            "{fds_arrived} fds arrived for fewer fd handles in the manifest"
        )));
    }
    if !p.bytes.is_empty() {
        return Err(VmmError::Protocol(format!(
            "{} stray payload bytes",
            p.bytes.len()
        )));
    }
    Ok(flags & FLAG_LAST != 0)
}

fn read_exact(reader: &mut &UnixStream, buf: &mut [u8]) -> Result<(), VmmError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            VmmError::Protocol("the peer closed the socket mid-message".into())
        }
        _ => VmmError::io("read", &e),
    })
}

struct Payload<'a> {
    bytes: &'a [u8],
}

impl<'a> Payload<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], VmmError> {
        if self.bytes.len() < n {
            return Err(VmmError::Protocol("manifest entry cut short".into()));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, VmmError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, VmmError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, VmmError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}
