//! The HBM manager: registry, refcounts, accounting and deferred release.

use hbm_vmm::host::{page_size, HostBackend, HostConfig};
use hbm_vmm::{DeviceId, Hmm, Vmm, VmmError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const D0: DeviceId = DeviceId(0);
const D1: DeviceId = DeviceId(1);

fn setup() -> (Vmm<HostBackend>, Hmm<HostBackend, String>, usize) {
    let g = page_size();
    let cfg = HostConfig::devices(2, 16 * g).with_granularity(g).unwrap();
    let vmm = Vmm::new(HostBackend::new(cfg));
    let hmm = Hmm::new(&vmm);
    (vmm, hmm, g)
}

#[test]
fn refcounts_remove_the_entry_at_zero() {
    let (vmm, hmm, g) = setup();
    let chunk = hmm.create("w".to_string(), D0, 2 * g, false).unwrap();
    assert_eq!(hmm.refcount(&"w".into()), Some(1));
    let again = hmm.acquire(&"w".into()).unwrap();
    assert!(again.same(&chunk));
    assert_eq!(hmm.release(&"w".into()).unwrap(), 1);
    assert_eq!(hmm.usage(D0), 2 * g);
    assert_eq!(hmm.release(&"w".into()).unwrap(), 0);
    assert!(!hmm.contains(&"w".into()));
    assert_eq!(hmm.usage(D0), 0);
    assert_eq!(hmm.peak(D0), 2 * g);
    // Our handles still keep the memory; it is released when they go.
    assert_eq!(vmm.usage(D0), 2 * g);
    drop((chunk, again));
    assert_eq!(vmm.usage(D0), 0);
    assert!(matches!(
        hmm.release(&"w".into()),
        Err(VmmError::Key {
            problem: "not registered",
            ..
        })
    ));
    assert!(matches!(
        hmm.acquire(&"w".into()),
        Err(VmmError::Key { .. })
    ));
}

#[test]
fn duplicate_keys_and_per_device_usage() {
    let (vmm, hmm, g) = setup();
    hmm.create("a".into(), D0, g, false).unwrap();
    hmm.create("b".into(), D1, 3 * g, false).unwrap();
    assert!(matches!(
        hmm.create("a".into(), D1, g, false),
        Err(VmmError::Key {
            problem: "already registered",
            ..
        })
    ));
    assert!(matches!(
        hmm.insert("a".into(), vmm.create_chunk(D1, g, false).unwrap()),
        Err(VmmError::Key { .. })
    ));
    assert_eq!((hmm.usage(D0), hmm.usage(D1)), (g, 3 * g));
    assert_eq!(hmm.keys_on(D1), vec!["b".to_string()]);
    let removed = hmm.remove(&"b".into()).unwrap();
    assert_eq!(removed.size(), 3 * g);
    assert_eq!(hmm.usage(D1), 0);
    assert_eq!(hmm.len(), 1);
}

struct DropCounter(Arc<AtomicUsize>);
impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn retired_views_wait_for_older_guards_only() {
    let (vmm, hmm, g) = setup();
    let drops = Arc::new(AtomicUsize::new(0));
    let chunk = hmm.create("kv".into(), D0, g, false).unwrap();
    let view = vmm.reserve(D0, g).unwrap().map(0, &chunk, 0, g).unwrap();
    let addr = view.addr();

    let old_iteration = hmm.enter();
    hmm.retire((view, DropCounter(drops.clone())));
    let new_iteration = hmm.enter();
    assert!(new_iteration.epoch() > old_iteration.epoch());
    assert_eq!(hmm.collect(), 0, "the old iteration may still use the view");
    vmm.check_range(D0, addr, g).unwrap();
    drop(old_iteration);
    // The newer guard does not hold the view back.
    assert_eq!(hmm.collect(), 1);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    assert!(vmm.check_range(D0, addr, g).is_err());
    assert_eq!(hmm.pending(), 0);
    drop(new_iteration);
    assert_eq!(hmm.active_guards(), 0);
}
