//! `hbm_vmm::ipc` within one process (over a socket pair): batches, manifests and bad input.

use hbm_vmm::host::{page_size, HostBackend, HostConfig};
use hbm_vmm::{ipc, DeviceId, Vmm, VmmError, WireHandle};
use std::io::Write;
use std::os::unix::net::UnixStream;

fn host_vmm(devices: usize, pages: usize) -> (Vmm<HostBackend>, usize) {
    let g = page_size();
    let cfg = HostConfig::devices(devices, pages * g)
        .with_granularity(g)
        .unwrap();
    (Vmm::new(HostBackend::new(cfg)), g)
}

#[test]
fn many_chunks_cross_in_batches_with_their_bytes() {
    let (vmm, g) = host_vmm(2, 200);
    let n = ipc::MAX_FDS_PER_MESSAGE + 6;
    let mut sent = Vec::new();
    for i in 0..n {
        let dev = DeviceId((i % 2) as u32);
        let chunk = vmm.create_chunk(dev, g, true).unwrap();
        let view = vmm.reserve(dev, g).unwrap().map(0, &chunk, 0, g).unwrap();
        view.as_mut_slice()[..8].copy_from_slice(&(i as u64).to_le_bytes());
        sent.push((format!("chunk-{i}"), chunk));
    }
    let (a, b) = UnixStream::pair().unwrap();
    // The sender may block once the socket buffer is full, so it runs on its own thread.
    let sender = std::thread::spawn(move || ipc::send_chunks(&a, &sent));
    let got = ipc::recv_chunks(&b, &vmm).unwrap();
    sender.join().unwrap().unwrap();
    assert_eq!(got.len(), n);
    for (i, s) in got.iter().enumerate() {
        assert_eq!(s.manifest.key, format!("chunk-{i}"));
        assert_eq!(s.manifest.device, DeviceId((i % 2) as u32));
        assert_eq!(s.chunk.size(), g);
        let view = vmm
            .reserve(s.manifest.device, g)
            .unwrap()
            .map(0, &s.chunk, 0, g)
            .unwrap();
        assert_eq!(&view.as_slice()[..8], &(i as u64).to_le_bytes());
    }
}

#[test]
fn an_empty_list_is_a_valid_message() {
    let (vmm, _) = host_vmm(1, 4);
    let (a, b) = UnixStream::pair().unwrap();
    ipc::send_chunks::<HostBackend>(&a, &[]).unwrap();
    assert!(ipc::recv_chunks(&b, &vmm).unwrap().is_empty());
}

#[test]
fn non_exportable_chunks_are_refused_before_sending() {
    let (vmm, g) = host_vmm(1, 4);
    let (a, _b) = UnixStream::pair().unwrap();
    let chunk = vmm.create_chunk(DeviceId(0), g, false).unwrap();
    assert_eq!(
        ipc::send_chunks(&a, &[("x".into(), chunk)]).unwrap_err(),
        VmmError::NotExportable
    );
}

#[test]
fn garbage_and_hangups_are_protocol_errors() {
    let (vmm, _) = host_vmm(1, 4);
    let (mut a, b) = UnixStream::pair().unwrap();
    a.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(matches!(
        ipc::recv_chunks(&b, &vmm),
        Err(VmmError::Protocol(_))
    ));

    let (a, b) = UnixStream::pair().unwrap();
    drop(a);
    assert!(matches!(
        ipc::recv_chunks(&b, &vmm),
        Err(VmmError::Protocol(_))
    ));

    // A well-formed manifest that promises an fd handle but carries no fd.
    let (mut a, b) = UnixStream::pair().unwrap();
    let mut entry = Vec::new();
    entry.extend_from_slice(&1u32.to_le_bytes());
    entry.push(b'k');
    entry.extend_from_slice(&4096u64.to_le_bytes());
    entry.extend_from_slice(&0u32.to_le_bytes());
    entry.push(0); // handle kind: fd
    let mut msg = Vec::from(*b"HVMM");
    msg.extend_from_slice(&2u16.to_le_bytes());
    msg.extend_from_slice(&1u16.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&(entry.len() as u32).to_le_bytes());
    msg.extend_from_slice(&entry);
    a.write_all(&msg).unwrap();
    let err = ipc::recv_chunks(&b, &vmm).unwrap_err();
    assert!(
        matches!(&err, VmmError::Protocol(m) if m.contains("fd handles")),
        "{err}"
    );

    // The same message from an older peer (wire version 1) is refused by version.
    let (mut a, b) = UnixStream::pair().unwrap();
    msg[4..6].copy_from_slice(&1u16.to_le_bytes());
    a.write_all(&msg).unwrap();
    let err = ipc::recv_chunks(&b, &vmm).unwrap_err();
    assert!(
        matches!(&err, VmmError::Protocol(m) if m.contains("version 1")),
        "{err}"
    );
}

/// Fds and tokens can share a batch: each fd goes to its entry, in order, and tokens keep their
/// values.
#[test]
fn fd_and_token_handles_share_a_batch_in_order() {
    let (vmm, g) = host_vmm(1, 8);
    let chunks: Vec<_> = (0..2)
        .map(|i| {
            let c = vmm.create_chunk(DeviceId(0), g, true).unwrap();
            let m = vmm
                .reserve(DeviceId(0), g)
                .unwrap()
                .map(0, &c, 0, g)
                .unwrap();
            m.as_mut_slice()[0] = 50 + i;
            c
        })
        .collect();
    let manifest = |key: &str| ipc::ChunkManifest {
        key: key.into(),
        size: g,
        device: DeviceId(0),
    };
    let entries = vec![
        (manifest("t0"), WireHandle::Token(7)),
        (manifest("f0"), WireHandle::Fd(chunks[0].export().unwrap())),
        (manifest("t1"), WireHandle::Token(u64::MAX)),
        (manifest("f1"), WireHandle::Fd(chunks[1].export().unwrap())),
    ];
    let (a, b) = UnixStream::pair().unwrap();
    ipc::send_handles(&a, &entries).unwrap();
    let got = ipc::recv_handles(&b).unwrap();
    let keys: Vec<_> = got.iter().map(|(m, _)| m.key.as_str()).collect();
    assert_eq!(keys, ["t0", "f0", "t1", "f1"]);
    let mut fds = Vec::new();
    for (m, h) in got {
        match (m.key.as_str(), h) {
            ("t0", WireHandle::Token(t)) => assert_eq!(t, 7),
            ("t1", WireHandle::Token(t)) => assert_eq!(t, u64::MAX),
            (_, WireHandle::Fd(fd)) => fds.push(fd),
            (k, h) => panic!("{k}: unexpected {h:?}"),
        }
    }
    for (i, fd) in fds.into_iter().enumerate() {
        let c = vmm.import_chunk(DeviceId(0), fd, g).unwrap();
        let m = vmm
            .reserve(DeviceId(0), g)
            .unwrap()
            .map(0, &c, 0, g)
            .unwrap();
        assert_eq!(m.as_slice()[0], 50 + i as u8);
    }

    // `recv_fds` is for fd-only peers: a token is a protocol error there.
    ipc::send_handles(&a, &entries[..1]).unwrap();
    assert!(matches!(ipc::recv_fds(&b), Err(VmmError::Protocol(_))));
}

#[test]
fn a_manifest_naming_a_missing_device_is_refused() {
    let (vmm2, g) = host_vmm(2, 4);
    let (vmm1, _) = host_vmm(1, 4);
    let chunk = vmm2.create_chunk(DeviceId(1), g, true).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    ipc::send_chunks(&a, &[("on-dev1".into(), chunk)]).unwrap();
    assert_eq!(
        ipc::recv_chunks(&b, &vmm1).unwrap_err(),
        VmmError::NoSuchDevice(DeviceId(1))
    );
}
