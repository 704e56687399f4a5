//! Two real OS processes map the same host chunk and each sees the other's writes.
//!
//! The test re-executes its own binary as the child (selected by an environment variable); the
//! chunk travels over a Unix socket with `hbm_vmm::ipc`.

use hbm_vmm::host::{page_size, HostBackend, HostConfig};
use hbm_vmm::{ipc, DeviceId, Vmm};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "HBM_VMM_TWO_PROCESS_CHILD";
const TEST_NAME: &str = "two_processes_share_a_host_chunk";
const D0: DeviceId = DeviceId(0);
const TIMEOUT: Duration = Duration::from_secs(30);

fn host_vmm() -> (Vmm<HostBackend>, usize) {
    let g = page_size();
    let cfg = HostConfig::devices(1, 8 * g).with_granularity(g).unwrap();
    (Vmm::new(HostBackend::new(cfg)), g)
}

#[test]
fn two_processes_share_a_host_chunk() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(&path);
        return;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let path = std::env::temp_dir().join(format!("hbm-vmm-{}-{nanos}.sock", std::process::id()));
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .spawn()
        .unwrap();

    // Accept with a deadline, so that a child that dies early fails the test instead of hanging it.
    let start = Instant::now();
    let mut sock = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("the child exited before connecting: {status}");
                }
                assert!(start.elapsed() < TIMEOUT, "the child did not connect");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let _ = std::fs::remove_file(&path);
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();

    let (vmm, g) = host_vmm();
    let chunk = vmm.create_chunk(D0, 2 * g, true).unwrap();
    let view = vmm
        .reserve(D0, 2 * g)
        .unwrap()
        .map(0, &chunk, 0, 2 * g)
        .unwrap();
    view.as_mut_slice()[..11].copy_from_slice(b"from parent");
    ipc::send_chunks(&sock, &[("shared".to_string(), chunk.clone())]).unwrap();

    // The child has seen our bytes and written its own.
    let mut ack = [0u8; 1];
    sock.read_exact(&mut ack).unwrap();
    assert_eq!(&ack, b"1");
    assert_eq!(&view.as_slice()[g..g + 10], b"from child");

    // A second round: our later write is visible to the child too.
    view.as_mut_slice()[100..106].copy_from_slice(b"second");
    sock.write_all(b"2").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "the child failed: {status}");
}

fn child(path: &str) {
    let mut sock = UnixStream::connect(path).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (vmm, g) = host_vmm();
    let mut shared = ipc::recv_chunks(&sock, &vmm).unwrap();
    assert_eq!(shared.len(), 1);
    let s = shared.pop().unwrap();
    assert_eq!(
        s.manifest,
        ipc::ChunkManifest {
            key: "shared".into(),
            size: 2 * g,
            device: D0
        }
    );
    // Map it at a different address from the parent's and check the parent's bytes.
    let view = vmm
        .reserve(D0, 4 * g)
        .unwrap()
        .map(2 * g, &s.chunk, 0, 2 * g)
        .unwrap();
    assert_eq!(&view.as_slice()[..11], b"from parent");
    view.as_mut_slice()[g..g + 10].copy_from_slice(b"from child");
    sock.write_all(b"1").unwrap();
    let mut go = [0u8; 1];
    sock.read_exact(&mut go).unwrap();
    assert_eq!(&go, b"2");
    assert_eq!(&view.as_slice()[100..106], b"second");
    // Imported memory is the exporter's: it is not charged here.
    assert_eq!(vmm.usage(D0), 0);
}
