//! The warm pool: pre-initialised device workers, least recently used first out.
//!
//! Bringing a device into a deployment is fast only if its worker is already initialised: on
//! CUDA a context, streams, library handles and compiled kernels; on host a thread and its
//! pools. [`WarmPool`] keeps idle workers per device, made by a [`WorkerFactory`]. A `take` of a
//! device with an idle worker is a hit (no initialisation); otherwise the factory initialises
//! one on the caller's thread (a miss). Returned workers go back to the pool; beyond its
//! capacity the least recently used idle worker is evicted and dropped.
//!
//! Initialisation and the drop of evicted workers happen outside the pool's lock, so a slow
//! `init` or a slow destructor never blocks another device's `take`.
//!
//! ```
//! use scaler::{DeviceId, WarmPool, WarmPoolConfig, WorkerFactory};
//!
//! struct HostWorkers;
//! impl WorkerFactory for HostWorkers {
//!     type Worker = String; // stands in for a thread handle or a CUDA context
//!     type Error = std::convert::Infallible;
//!     fn init(&self, device: DeviceId) -> Result<String, Self::Error> {
//!         Ok(format!("worker for {device}"))
//!     }
//! }
//!
//! let pool = WarmPool::new(HostWorkers, WarmPoolConfig { capacity: 2 });
//! pool.prewarm(&[DeviceId(2), DeviceId(3)]).unwrap();
//! let taken = pool.take(DeviceId(2)).unwrap(); // scale-up: instant
//! assert!(taken.warm);
//! pool.give_back(DeviceId(2), taken.worker); // scale-down: back to the pool
//! assert_eq!(pool.stats().hits, 1);
//! ```

use crate::device::DeviceId;
use crate::loom::Mutex;
use std::fmt;

/// Makes a worker for a device.
pub trait WorkerFactory {
    /// The worker (a thread handle, a CUDA context with its streams and kernels, ...).
    type Worker;
    /// Why initialisation failed.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Initialises a worker for `device`. May be slow; called without any pool lock held.
    fn init(&self, device: DeviceId) -> Result<Self::Worker, Self::Error>;
}

/// How big the pool is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct WarmPoolConfig {
    /// Most idle workers kept; beyond it the least recently used is evicted. 0 keeps none
    /// (every take initialises cold).
    pub capacity: usize,
}

/// A pool failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError<E: std::error::Error + 'static> {
    /// The factory could not initialise a worker.
    #[error("initialising a worker for {device} failed: {source}")]
    Init {
        /// The device.
        device: DeviceId,
        /// The factory's error.
        #[source]
        source: E,
    },
    /// A prewarm asked for more workers than the pool keeps.
    #[error("cannot pre-warm {requested} workers in a pool that keeps at most {capacity}")]
    OverCapacity {
        /// Workers asked for.
        requested: usize,
        /// The capacity.
        capacity: usize,
    },
}

/// Counters since the pool was made.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PoolStats {
    /// Takes served by an idle worker.
    pub hits: u64,
    /// Takes that initialised a worker.
    pub misses: u64,
    /// Workers initialised by `prewarm`.
    pub prewarmed: u64,
    /// Idle workers dropped to stay within capacity.
    pub evicted: u64,
    /// Idle workers dropped by `discard`.
    pub discarded: u64,
}

/// A worker taken from the pool.
#[derive(Debug)]
pub struct Taken<W> {
    /// The worker.
    pub worker: W,
    /// Whether it came warm from the pool (`false`: initialised by this take).
    pub warm: bool,
}

#[derive(Debug)]
struct Idle<W> {
    device: DeviceId,
    worker: W,
    last_used: u64,
}

#[derive(Debug)]
struct PoolState<W> {
    idle: Vec<Idle<W>>,
    clock: u64,
    stats: PoolStats,
}

impl<W> PoolState<W> {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Adds an idle worker and moves the least recently used ones beyond `capacity` to `out`.
    fn insert(&mut self, device: DeviceId, worker: W, capacity: usize, out: &mut Vec<W>) {
        let last_used = self.tick();
        self.idle.push(Idle {
            device,
            worker,
            last_used,
        });
        while self.idle.len() > capacity {
            let lru = self
                .idle
                .iter()
                .enumerate()
                .min_by_key(|(_, i)| i.last_used)
                .map(|(index, _)| index);
            let Some(index) = lru else { break };
            out.push(self.idle.swap_remove(index).worker);
            self.stats.evicted += 1;
        }
    }
}

/// Pre-initialised workers per device. Shareable between threads (`&self` methods).
pub struct WarmPool<F: WorkerFactory> {
    factory: F,
    capacity: usize,
    state: Mutex<PoolState<F::Worker>>,
}

impl<F: WorkerFactory> fmt::Debug for WarmPool<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WarmPool")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<F: WorkerFactory> WarmPool<F> {
    /// An empty pool.
    pub fn new(factory: F, config: WarmPoolConfig) -> WarmPool<F> {
        WarmPool {
            factory,
            capacity: config.capacity,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                clock: 0,
                stats: PoolStats::default(),
            }),
        }
    }

    fn lock(&self) -> crate::loom::MutexGuard<'_, PoolState<F::Worker>> {
        // A panic inside the critical sections below cannot leave the state inconsistent (each
        // is a single push, remove or counter update), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The factory (for a cold initialisation that bypasses the pool).
    pub fn factory(&self) -> &F {
        &self.factory
    }

    /// The most idle workers kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Idle workers.
    pub fn idle(&self) -> usize {
        self.lock().idle.len()
    }

    /// Idle workers for `device`.
    pub fn idle_for(&self, device: DeviceId) -> usize {
        self.lock()
            .idle
            .iter()
            .filter(|i| i.device == device)
            .count()
    }

    /// Counters.
    pub fn stats(&self) -> PoolStats {
        self.lock().stats
    }

    /// Makes sure each of `devices` has an idle worker, initialising the missing ones. Returns
    /// how many it initialised. Devices listed twice count once.
    pub fn prewarm(&self, devices: &[DeviceId]) -> Result<usize, PoolError<F::Error>> {
        let mut wanted: Vec<DeviceId> = devices.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.len() > self.capacity {
            return Err(PoolError::OverCapacity {
                requested: wanted.len(),
                capacity: self.capacity,
            });
        }
        let missing: Vec<DeviceId> = {
            let state = self.lock();
            wanted
                .into_iter()
                .filter(|d| !state.idle.iter().any(|i| i.device == *d))
                .collect()
        };
        let mut made = 0;
        let mut evicted = Vec::new();
        for device in missing {
            let worker = self
                .factory
                .init(device)
                .map_err(|source| PoolError::Init { device, source })?;
            let mut state = self.lock();
            state.stats.prewarmed += 1;
            state.insert(device, worker, self.capacity, &mut evicted);
            made += 1;
        }
        drop(evicted);
        Ok(made)
    }

    /// A worker for `device`: the most recently used idle one, or a new one.
    pub fn take(&self, device: DeviceId) -> Result<Taken<F::Worker>, PoolError<F::Error>> {
        let hit = {
            let mut state = self.lock();
            let mru = state
                .idle
                .iter()
                .enumerate()
                .filter(|(_, i)| i.device == device)
                .max_by_key(|(_, i)| i.last_used)
                .map(|(index, _)| index);
            match mru {
                Some(index) => {
                    state.stats.hits += 1;
                    Some(state.idle.swap_remove(index).worker)
                }
                None => {
                    state.stats.misses += 1;
                    None
                }
            }
        };
        match hit {
            Some(worker) => Ok(Taken { worker, warm: true }),
            None => {
                let worker = self
                    .factory
                    .init(device)
                    .map_err(|source| PoolError::Init { device, source })?;
                Ok(Taken {
                    worker,
                    warm: false,
                })
            }
        }
    }

    /// Returns a worker of `device` to the pool. Returns how many idle workers were evicted
    /// (dropped, outside the lock) to stay within capacity.
    pub fn give_back(&self, device: DeviceId, worker: F::Worker) -> usize {
        let mut evicted = Vec::new();
        self.lock()
            .insert(device, worker, self.capacity, &mut evicted);
        evicted.len()
    }

    /// Drops every idle worker of `device` (it failed). Returns how many.
    pub fn discard(&self, device: DeviceId) -> usize {
        let dropped: Vec<F::Worker> = {
            let mut state = self.lock();
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut state.idle)
                .into_iter()
                .partition(|i| i.device == device);
            state.idle = kept;
            state.stats.discarded += gone.len() as u64;
            gone.into_iter().map(|i| i.worker).collect()
        };
        dropped.len()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[derive(Debug, thiserror::Error)]
    #[error("device {0} is broken")]
    struct Broken(u32);

    /// Workers that count how many exist.
    struct Counting {
        live: Arc<AtomicUsize>,
        inits: AtomicUsize,
        broken: Option<u32>,
    }

    #[derive(Debug)]
    struct Worker {
        device: DeviceId,
        serial: usize,
        live: Arc<AtomicUsize>,
    }

    impl Drop for Worker {
        fn drop(&mut self) {
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl WorkerFactory for Counting {
        type Worker = Worker;
        type Error = Broken;
        fn init(&self, device: DeviceId) -> Result<Worker, Broken> {
            if self.broken == Some(device.0) {
                return Err(Broken(device.0));
            }
            self.live.fetch_add(1, Ordering::SeqCst);
            let serial = self.inits.fetch_add(1, Ordering::SeqCst);
            Ok(Worker {
                device,
                serial,
                live: self.live.clone(),
            })
        }
    }

    fn pool(capacity: usize) -> (WarmPool<Counting>, Arc<AtomicUsize>) {
        let live = Arc::new(AtomicUsize::new(0));
        let factory = Counting {
            live: live.clone(),
            inits: AtomicUsize::new(0),
            broken: Some(9),
        };
        (WarmPool::new(factory, WarmPoolConfig { capacity }), live)
    }

    #[test]
    fn prewarmed_take_is_a_hit_and_unknown_device_is_a_miss() {
        let (pool, live) = pool(4);
        assert_eq!(
            pool.prewarm(&[DeviceId(1), DeviceId(2), DeviceId(1)])
                .unwrap(),
            2
        );
        assert_eq!(pool.prewarm(&[DeviceId(1)]).unwrap(), 0, "already warm");
        let t = pool.take(DeviceId(2)).unwrap();
        assert!(t.warm);
        assert_eq!(t.worker.device, DeviceId(2));
        let cold = pool.take(DeviceId(3)).unwrap();
        assert!(!cold.warm);
        assert_eq!(
            pool.stats(),
            PoolStats {
                hits: 1,
                misses: 1,
                prewarmed: 2,
                evicted: 0,
                discarded: 0
            }
        );
        assert_eq!(live.load(Ordering::SeqCst), 3);
        drop((t, cold));
        assert_eq!(
            live.load(Ordering::SeqCst),
            1,
            "only the idle worker of device 1 is left"
        );
    }

    #[test]
    fn lru_evicts_the_least_recently_returned_worker() {
        let (pool, live) = pool(2);
        let a = pool.take(DeviceId(0)).unwrap().worker;
        let b = pool.take(DeviceId(1)).unwrap().worker;
        let c = pool.take(DeviceId(2)).unwrap().worker;
        assert_eq!(pool.give_back(DeviceId(0), a), 0);
        assert_eq!(pool.give_back(DeviceId(1), b), 0);
        // Device 0 is least recently used: it goes.
        assert_eq!(pool.give_back(DeviceId(2), c), 1);
        assert_eq!(pool.idle_for(DeviceId(0)), 0);
        assert_eq!(pool.idle_for(DeviceId(1)), 1);
        assert_eq!(pool.idle_for(DeviceId(2)), 1);
        assert_eq!(live.load(Ordering::SeqCst), 2);
        assert_eq!(pool.stats().evicted, 1);
    }

    #[test]
    fn take_reuses_the_most_recent_worker_of_the_device() {
        let (pool, _) = pool(4);
        let first = pool.take(DeviceId(0)).unwrap().worker;
        let second = pool.take(DeviceId(0)).unwrap().worker;
        let (s1, s2) = (first.serial, second.serial);
        pool.give_back(DeviceId(0), first);
        pool.give_back(DeviceId(0), second);
        assert_eq!(pool.take(DeviceId(0)).unwrap().worker.serial, s2);
        assert_eq!(pool.take(DeviceId(0)).unwrap().worker.serial, s1);
    }

    #[test]
    fn errors_are_typed_and_leave_the_pool_intact() {
        let (pool, live) = pool(2);
        pool.prewarm(&[DeviceId(0)]).unwrap();
        let err = pool.take(DeviceId(9)).unwrap_err();
        assert!(
            matches!(
                err,
                PoolError::Init {
                    device: DeviceId(9),
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "initialising a worker for dev9 failed: device 9 is broken"
        );
        let err = pool
            .prewarm(&[DeviceId(0), DeviceId(1), DeviceId(2)])
            .unwrap_err();
        assert!(matches!(
            err,
            PoolError::OverCapacity {
                requested: 3,
                capacity: 2
            }
        ));
        assert!(matches!(
            pool.prewarm(&[DeviceId(9)]),
            Err(PoolError::Init { .. })
        ));
        assert_eq!(pool.idle(), 1);
        assert_eq!(live.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn discard_drops_only_that_device_and_capacity_zero_keeps_nothing() {
        let (pool, live) = pool(3);
        pool.prewarm(&[DeviceId(0), DeviceId(1)]).unwrap();
        let extra = pool.take(DeviceId(5)).unwrap().worker;
        pool.give_back(DeviceId(1), extra);
        assert_eq!(pool.discard(DeviceId(1)), 2);
        assert_eq!(pool.idle(), 1);
        assert_eq!(live.load(Ordering::SeqCst), 1);
        assert_eq!(pool.stats().discarded, 2);

        let (none, live) = self::pool(0);
        let w = none.take(DeviceId(0)).unwrap();
        assert!(!w.warm);
        assert_eq!(none.give_back(DeviceId(0), w.worker), 1);
        assert_eq!(live.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn threads_share_a_pool_without_losing_workers() {
        let (pool, live) = pool(4);
        let pool = Arc::new(pool);
        pool.prewarm(&[DeviceId(0), DeviceId(1), DeviceId(2), DeviceId(3)])
            .unwrap();
        let handles: Vec<_> = (0..4u32)
            .map(|t| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for i in 0..200u32 {
                        let d = DeviceId((t + i) % 4);
                        let w = pool.take(d).unwrap();
                        assert_eq!(w.worker.device, d);
                        pool.give_back(d, w.worker);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let s = pool.stats();
        assert_eq!(s.hits + s.misses, 800);
        assert!(pool.idle() <= 4);
        // Every worker ever made is idle or was evicted.
        assert_eq!(live.load(Ordering::SeqCst), pool.idle());
        assert_eq!(
            (s.prewarmed + s.misses) as usize,
            pool.idle() + s.evicted as usize
        );
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use loom::sync::Arc;

    #[derive(Debug, thiserror::Error)]
    #[error("never fails")]
    struct Never;

    struct Factory {
        live: Arc<AtomicUsize>,
    }

    #[derive(Debug)]
    struct Worker {
        live: Arc<AtomicUsize>,
    }

    impl Drop for Worker {
        fn drop(&mut self) {
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl WorkerFactory for Factory {
        type Worker = Worker;
        type Error = Never;
        fn init(&self, _device: DeviceId) -> Result<Worker, Never> {
            self.live.fetch_add(1, Ordering::SeqCst);
            Ok(Worker {
                live: self.live.clone(),
            })
        }
    }

    /// Two threads take the single warm worker of one device: exactly one gets it warm, the
    /// other initialises its own; after both give theirs back to a pool of capacity 1, exactly
    /// one worker is alive and the counters add up.
    #[test]
    fn loom_concurrent_take_of_one_warm_worker() {
        loom::model(|| {
            let live = Arc::new(AtomicUsize::new(0));
            let pool = Arc::new(WarmPool::new(
                Factory { live: live.clone() },
                WarmPoolConfig { capacity: 1 },
            ));
            pool.prewarm(&[DeviceId(0)]).unwrap();
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let pool = pool.clone();
                    loom::thread::spawn(move || {
                        let taken = pool.take(DeviceId(0)).unwrap();
                        let warm = taken.warm;
                        pool.give_back(DeviceId(0), taken.worker);
                        warm
                    })
                })
                .collect();
            let warm: Vec<bool> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let s = pool.stats();
            assert_eq!(s.hits + s.misses, 2);
            assert!(
                warm.iter().any(|&w| w),
                "the prewarmed worker was taken by someone"
            );
            assert_eq!(pool.idle(), 1);
            assert_eq!(live.load(Ordering::SeqCst), 1);
            assert_eq!(s.prewarmed + s.misses, 1 + s.evicted);
        });
    }

    /// A take of one device races a give-back (with eviction) of another: no worker is lost or
    /// duplicated, and the pool stays within capacity.
    #[test]
    fn loom_take_races_give_back_with_eviction() {
        loom::model(|| {
            let live = Arc::new(AtomicUsize::new(0));
            let pool = Arc::new(WarmPool::new(
                Factory { live: live.clone() },
                WarmPoolConfig { capacity: 1 },
            ));
            pool.prewarm(&[DeviceId(0)]).unwrap();
            let spare = pool.take(DeviceId(1)).unwrap().worker;
            let p1 = pool.clone();
            let taker = loom::thread::spawn(move || p1.take(DeviceId(0)).unwrap());
            let p2 = pool.clone();
            let giver = loom::thread::spawn(move || p2.give_back(DeviceId(1), spare));
            let taken = taker.join().unwrap();
            let evicted = giver.join().unwrap();
            assert!(pool.idle() <= 1);
            // If the give-back came first, it evicted device 0's worker and the take was cold.
            assert_eq!(taken.warm, evicted == 0);
            assert_eq!(live.load(Ordering::SeqCst), 1 + pool.idle());
            drop(taken);
            assert_eq!(live.load(Ordering::SeqCst), pool.idle());
        });
    }
}
