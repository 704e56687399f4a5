//! [`Hmm`], the HBM manager: a per-device registry of chunks under opaque keys, with refcounts,
//! usage and peak accounting, and deferred release by epochs.

use crate::loom::{Arc, Mutex};
use crate::{Backend, DeviceId, PhysChunk, Vmm, VmmError};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;

/// The HBM manager.
///
/// - **Registry.** Chunks are registered under a key of the caller's choosing (this crate never
///   interprets it). [`Hmm::insert`] registers a chunk with one reference; [`Hmm::acquire`] adds
///   one and [`Hmm::release`] drops one. When the count reaches zero the entry is removed; the
///   chunk itself is released by the backend once no handle or mapping of it is left.
/// - **Accounting.** [`Hmm::usage`] is the bytes of registered chunks per device and
///   [`Hmm::peak`] its high-water mark.
/// - **Deferred release.** A reader (one engine iteration) holds an [`EpochGuard`] from
///   [`Hmm::enter`]. A view that must go away (an old deployment) is handed to
///   [`Hmm::retire`]; it is dropped by [`Hmm::collect`] only once every guard that was alive at
///   retire time has been dropped. Guards taken after the retire do not hold it back.
///
/// Cheap to clone (an `Arc` inside).
pub struct Hmm<B: Backend, K> {
    inner: Arc<HmmInner<B, K>>,
}

struct HmmInner<B: Backend, K> {
    vmm: Vmm<B>,
    registry: Mutex<Registry<B, K>>,
    epochs: Arc<Mutex<Epochs>>,
}

struct Registry<B: Backend, K> {
    entries: HashMap<K, Entry<B>>,
    acct: Vec<Acct>,
}

struct Entry<B: Backend> {
    chunk: PhysChunk<B>,
    refs: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct Acct {
    usage: usize,
    peak: usize,
}

/// Values retired but not yet dropped, and the epochs of live guards.
#[derive(Default)]
struct Epochs {
    /// The epoch new guards join; each retire closes it and opens the next.
    current: u64,
    /// Live guards per epoch (no zero entries).
    active: BTreeMap<u64, usize>,
    /// Retired values, by the epoch in which they were retired (ascending).
    retired: VecDeque<(u64, Box<dyn Send>)>,
}

impl fmt::Debug for Epochs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Epochs")
            .field("current", &self.current)
            .field("active", &self.active)
            .field("retired", &self.retired.len())
            .finish()
    }
}

impl<B: Backend, K> Clone for Hmm<B, K> {
    fn clone(&self) -> Self {
        Hmm {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: Backend, K> fmt::Debug for Hmm<B, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reg = self.inner.registry.lock();
        f.debug_struct("Hmm")
            .field("entries", &reg.entries.len())
            .field(
                "usage",
                &reg.acct.iter().map(|a| a.usage).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn key_error<K: fmt::Debug>(key: &K, problem: &'static str) -> VmmError {
    VmmError::Key {
        key: format!("{key:?}"),
        problem,
    }
}

impl<B, K> Hmm<B, K>
where
    B: Backend,
    K: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
{
    /// A manager over `vmm`'s devices, with an empty registry.
    pub fn new(vmm: &Vmm<B>) -> Self {
        let acct = vec![Acct::default(); vmm.device_count()];
        Hmm {
            inner: Arc::new(HmmInner {
                vmm: vmm.clone(),
                registry: Mutex::new(Registry {
                    entries: HashMap::new(),
                    acct,
                }),
                epochs: Arc::new(Mutex::new(Epochs::default())),
            }),
        }
    }

    /// The virtual-memory manager under it.
    pub fn vmm(&self) -> &Vmm<B> {
        &self.inner.vmm
    }

    /// Registers `chunk` under `key` with one reference.
    pub fn insert(&self, key: K, chunk: PhysChunk<B>) -> Result<(), VmmError> {
        if !self.inner.vmm.same(chunk.vmm()) {
            return Err(VmmError::BadHandle(
                "the chunk belongs to another Vmm".into(),
            ));
        }
        let mut reg = self.inner.registry.lock();
        let dev = chunk.device().index();
        if dev >= reg.acct.len() {
            return Err(VmmError::NoSuchDevice(chunk.device()));
        }
        if reg.entries.contains_key(&key) {
            return Err(key_error(&key, "already registered"));
        }
        let a = &mut reg.acct[dev];
        a.usage += chunk.size();
        a.peak = a.peak.max(a.usage);
        reg.entries.insert(key, Entry { chunk, refs: 1 });
        Ok(())
    }

    /// Creates a chunk on `dev` and registers it under `key` with one reference.
    pub fn create(
        &self,
        key: K,
        dev: DeviceId,
        size: usize,
        exportable: bool,
    ) -> Result<PhysChunk<B>, VmmError> {
        if self.contains(&key) {
            return Err(key_error(&key, "already registered"));
        }
        let chunk = self.inner.vmm.create_chunk(dev, size, exportable)?;
        self.insert(key, chunk.clone())?;
        Ok(chunk)
    }

    /// The chunk under `key`, without taking a reference.
    pub fn get(&self, key: &K) -> Option<PhysChunk<B>> {
        self.inner
            .registry
            .lock()
            .entries
            .get(key)
            .map(|e| e.chunk.clone())
    }

    /// Whether `key` is registered.
    pub fn contains(&self, key: &K) -> bool {
        self.inner.registry.lock().entries.contains_key(key)
    }

    /// The reference count of `key`, if registered.
    pub fn refcount(&self, key: &K) -> Option<usize> {
        self.inner.registry.lock().entries.get(key).map(|e| e.refs)
    }

    /// Takes one more reference on `key` and returns its chunk.
    pub fn acquire(&self, key: &K) -> Result<PhysChunk<B>, VmmError> {
        let mut reg = self.inner.registry.lock();
        let e = reg
            .entries
            .get_mut(key)
            .ok_or_else(|| key_error(key, "not registered"))?;
        e.refs += 1;
        Ok(e.chunk.clone())
    }

    /// Drops one reference on `key` and returns how many are left. At zero the entry is
    /// removed from the registry and its bytes leave [`Hmm::usage`].
    pub fn release(&self, key: &K) -> Result<usize, VmmError> {
        let removed;
        let left;
        {
            let mut reg = self.inner.registry.lock();
            let e = reg
                .entries
                .get_mut(key)
                .ok_or_else(|| key_error(key, "not registered"))?;
            e.refs -= 1;
            left = e.refs;
            removed = if left == 0 {
                Self::take(&mut reg, key)
            } else {
                None
            };
        }
        // The chunk handle is dropped here, outside the lock: releasing device memory can be slow.
        drop(removed);
        Ok(left)
    }

    /// Removes `key` whatever its reference count and returns its chunk.
    pub fn remove(&self, key: &K) -> Result<PhysChunk<B>, VmmError> {
        let mut reg = self.inner.registry.lock();
        Self::take(&mut reg, key).ok_or_else(|| key_error(key, "not registered"))
    }

    fn take(reg: &mut Registry<B, K>, key: &K) -> Option<PhysChunk<B>> {
        let e = reg.entries.remove(key)?;
        let a = &mut reg.acct[e.chunk.device().index()];
        a.usage = a.usage.saturating_sub(e.chunk.size());
        Some(e.chunk)
    }

    /// Number of registered keys.
    pub fn len(&self) -> usize {
        self.inner.registry.lock().entries.len()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The registered keys (in no particular order).
    pub fn keys(&self) -> Vec<K> {
        self.inner.registry.lock().entries.keys().cloned().collect()
    }

    /// The registered keys whose chunk is on `dev` (in no particular order).
    pub fn keys_on(&self, dev: DeviceId) -> Vec<K> {
        let reg = self.inner.registry.lock();
        reg.entries
            .iter()
            .filter(|(_, e)| e.chunk.device() == dev)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Bytes of registered chunks on `dev` (0 for an unknown device).
    pub fn usage(&self, dev: DeviceId) -> usize {
        self.inner
            .registry
            .lock()
            .acct
            .get(dev.index())
            .map_or(0, |a| a.usage)
    }

    /// The highest [`Hmm::usage`] of `dev` since creation or the last [`Hmm::reset_peak`].
    pub fn peak(&self, dev: DeviceId) -> usize {
        self.inner
            .registry
            .lock()
            .acct
            .get(dev.index())
            .map_or(0, |a| a.peak)
    }

    /// Resets the peak of `dev` to its current usage.
    pub fn reset_peak(&self, dev: DeviceId) {
        if let Some(a) = self.inner.registry.lock().acct.get_mut(dev.index()) {
            a.peak = a.usage;
        }
    }

    /// Enters the current epoch: whatever is retired from now on stays alive until the guard
    /// drops. An engine holds one per iteration.
    pub fn enter(&self) -> EpochGuard {
        let mut ep = self.inner.epochs.lock();
        let epoch = ep.current;
        *ep.active.entry(epoch).or_insert(0) += 1;
        EpochGuard {
            epochs: Arc::clone(&self.inner.epochs),
            epoch,
        }
    }

    /// Hands over `value` (a view, a deployment, a mapping) to be dropped once every
    /// [`EpochGuard`] alive now has dropped. Call [`Hmm::collect`] to drop what is ready.
    pub fn retire<T: Send + 'static>(&self, value: T) {
        let mut ep = self.inner.epochs.lock();
        let epoch = ep.current;
        ep.current += 1;
        ep.retired.push_back((epoch, Box::new(value)));
    }

    /// Drops every retired value that no live guard can still see and returns how many were
    /// dropped. The values are dropped outside the manager's locks.
    pub fn collect(&self) -> usize {
        let ready: Vec<Box<dyn Send>> = {
            let mut ep = self.inner.epochs.lock();
            let oldest_live = ep.active.keys().next().copied().unwrap_or(u64::MAX);
            let mut ready = Vec::new();
            while ep.retired.front().is_some_and(|(e, _)| *e < oldest_live) {
                if let Some((_, v)) = ep.retired.pop_front() {
                    ready.push(v);
                }
            }
            ready
        };
        let n = ready.len();
        drop(ready);
        n
    }

    /// How many retired values are waiting to be dropped.
    pub fn pending(&self) -> usize {
        self.inner.epochs.lock().retired.len()
    }

    /// How many epoch guards are alive.
    pub fn active_guards(&self) -> usize {
        self.inner.epochs.lock().active.values().sum()
    }
}

/// Membership in an epoch of an [`Hmm`]: while it lives, nothing retired after it was taken is
/// dropped. Dropping it never drops retired values itself (that is [`Hmm::collect`]'s job, off
/// the serving path).
pub struct EpochGuard {
    epochs: Arc<Mutex<Epochs>>,
    epoch: u64,
}

impl EpochGuard {
    /// The epoch this guard belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl fmt::Debug for EpochGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochGuard")
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Drop for EpochGuard {
    fn drop(&mut self) {
        let mut ep = self.epochs.lock();
        if let Some(n) = ep.active.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                ep.active.remove(&self.epoch);
            }
        }
    }
}

/// Model checks of the refcounts and the deferred release (run with `RUSTFLAGS="--cfg loom"`).
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::sync::atomic::{AtomicBool, Ordering};
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};

    /// A device-free backend that only counts, so the models explore our code and not syscalls.
    #[derive(Debug, Default)]
    struct CountingBackend {
        created: AtomicUsize,
        released: AtomicUsize,
    }

    impl Backend for CountingBackend {
        type Chunk = usize;
        type Reservation = usize;
        type ShareableHandle = OwnedFd;
        fn device_count(&self) -> usize {
            1
        }
        fn granularity(&self, _: DeviceId) -> Result<usize, VmmError> {
            Ok(4096)
        }
        fn create(&self, _: DeviceId, size: usize, _: bool) -> Result<usize, VmmError> {
            self.created.fetch_add(1, StdOrdering::SeqCst);
            Ok(size)
        }
        fn release(&self, _: usize) -> Result<(), VmmError> {
            self.released.fetch_add(1, StdOrdering::SeqCst);
            Ok(())
        }
        fn reserve(&self, _: DeviceId, size: usize) -> Result<usize, VmmError> {
            Ok(size)
        }
        fn free(&self, _: usize) -> Result<(), VmmError> {
            Ok(())
        }
        fn map(&self, _: &usize, _: usize, _: &usize, _: usize, _: usize) -> Result<(), VmmError> {
            Ok(())
        }
        fn unmap(&self, _: &usize, _: usize, _: usize) -> Result<(), VmmError> {
            Ok(())
        }
        fn set_access(
            &self,
            _: &usize,
            _: usize,
            _: usize,
            _: &[DeviceId],
        ) -> Result<(), VmmError> {
            Ok(())
        }
        fn export(&self, _: &usize, _: &[crate::ProcessId]) -> Result<OwnedFd, VmmError> {
            Err(VmmError::NotExportable)
        }
        fn import(&self, _: DeviceId, _: OwnedFd, _: usize) -> Result<usize, VmmError> {
            Err(VmmError::BadHandle("counting backend".into()))
        }
        fn base(&self, _: &usize) -> u64 {
            0x1000
        }
        fn mem_info(&self, _: DeviceId) -> Result<(usize, usize), VmmError> {
            Ok((0, 0))
        }
    }

    const D0: DeviceId = DeviceId(0);

    /// A racing acquire and the last release: the entry goes exactly once, the accounting returns
    /// to zero, and the backend releases the chunk exactly once, after the last handle.
    #[test]
    fn loom_refcount_acquire_races_last_release() {
        loom::model(|| {
            let vmm = Vmm::new(CountingBackend::default());
            let hmm: Hmm<CountingBackend, u32> = Hmm::new(&vmm);
            hmm.create(7, D0, 4096, false).unwrap();
            let h2 = hmm.clone();
            let t = loom::thread::spawn(move || {
                if let Ok(chunk) = h2.acquire(&7) {
                    assert_eq!(chunk.size(), 4096);
                    // Our reference keeps the entry alive: nobody can remove it under us.
                    assert!(h2.refcount(&7).is_some_and(|n| n >= 1));
                    h2.release(&7).unwrap();
                }
            });
            hmm.release(&7).unwrap();
            t.join().unwrap();
            assert!(!hmm.contains(&7));
            assert_eq!(hmm.usage(D0), 0);
            assert_eq!(hmm.peak(D0), 4096);
            assert_eq!(vmm.backend().created.load(StdOrdering::SeqCst), 1);
            assert_eq!(vmm.backend().released.load(StdOrdering::SeqCst), 1);
        });
    }

    /// Two holders release concurrently: exactly one of them sees the count reach zero.
    #[test]
    fn loom_refcount_concurrent_releases() {
        loom::model(|| {
            let vmm = Vmm::new(CountingBackend::default());
            let hmm: Hmm<CountingBackend, u32> = Hmm::new(&vmm);
            hmm.create(1, D0, 8192, false).unwrap();
            hmm.acquire(&1).unwrap();
            let h2 = hmm.clone();
            let t = loom::thread::spawn(move || h2.release(&1).unwrap());
            let here = hmm.release(&1).unwrap();
            let there = t.join().unwrap();
            let mut counts = [here, there];
            counts.sort();
            assert_eq!(counts, [0, 1]);
            assert!(hmm.is_empty());
            assert_eq!(hmm.usage(D0), 0);
            assert_eq!(vmm.backend().released.load(StdOrdering::SeqCst), 1);
        });
    }

    struct View {
        dropped: loom::sync::Arc<AtomicBool>,
    }

    impl Drop for View {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    /// An engine iteration that saw the published view keeps it alive until its guard drops,
    /// while the scaler unpublishes, retires and collects concurrently. In the end the view is
    /// dropped exactly when nothing can see it.
    #[test]
    fn loom_deferred_release_waits_for_readers() {
        loom::model(|| {
            let vmm = Vmm::new(CountingBackend::default());
            let hmm: Hmm<CountingBackend, u32> = Hmm::new(&vmm);
            let published = loom::sync::Arc::new(AtomicBool::new(true));
            let dropped = loom::sync::Arc::new(AtomicBool::new(false));

            let (h, p, d) = (hmm.clone(), published.clone(), dropped.clone());
            let engine = loom::thread::spawn(move || {
                let guard = h.enter();
                if p.load(Ordering::SeqCst) {
                    // We use the view: it must still be alive, now and until the guard drops.
                    assert!(!d.load(Ordering::SeqCst));
                    loom::thread::yield_now();
                    assert!(!d.load(Ordering::SeqCst));
                }
                drop(guard);
            });

            let view = View {
                dropped: dropped.clone(),
            };
            published.store(false, Ordering::SeqCst);
            hmm.retire(view);
            hmm.collect();
            engine.join().unwrap();
            hmm.collect();
            assert!(
                dropped.load(Ordering::SeqCst),
                "nothing holds the view any more"
            );
            assert_eq!(hmm.pending(), 0);
        });
    }

    /// Retires from two threads while a guard comes and goes: every value is dropped once.
    #[test]
    fn loom_concurrent_retires_all_collected() {
        loom::model(|| {
            let vmm = Vmm::new(CountingBackend::default());
            let hmm: Hmm<CountingBackend, u32> = Hmm::new(&vmm);
            let drops = loom::sync::Arc::new(loom::sync::atomic::AtomicUsize::new(0));
            struct Counted(loom::sync::Arc<loom::sync::atomic::AtomicUsize>);
            impl Drop for Counted {
                fn drop(&mut self) {
                    self.0.fetch_add(1, Ordering::SeqCst);
                }
            }
            let guard = hmm.enter();
            let (h, c) = (hmm.clone(), drops.clone());
            let t = loom::thread::spawn(move || {
                h.retire(Counted(c));
                h.collect();
            });
            hmm.retire(Counted(drops.clone()));
            // The guard predates both retires, so nothing may be dropped while it lives.
            assert_eq!(drops.load(Ordering::SeqCst), 0);
            drop(guard);
            hmm.collect();
            t.join().unwrap();
            hmm.collect();
            assert_eq!(drops.load(Ordering::SeqCst), 2);
        });
    }
}
