//! A pool of worker threads draining per-key FIFO lanes, at most one job per lane at a time.
//!
//! The host transport keys lanes by [`Link`](crate::Link): like a copy stream per device pair, the
//! parts on one link run in order, one after another, while different links run in parallel (up to
//! the number of workers). Workers pick lanes round-robin, so one busy link cannot starve another.

use crate::loom::{lock, thread, wait, Arc, Condvar, Mutex};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;

struct Lane<J> {
    queue: VecDeque<J>,
    busy: bool,
}

struct Sched<K, J> {
    index: BTreeMap<K, usize>,
    lanes: Vec<Lane<J>>,
    /// Where the next search for work starts (round-robin over lanes).
    next: usize,
    shutdown: bool,
}

struct Shared<K, J> {
    sched: Mutex<Sched<K, J>>,
    work: Condvar,
}

/// The worker pool. Dropping it without [`shutdown`](Lanes::shutdown) shuts it down and drops the
/// jobs still queued.
pub(crate) struct Lanes<K, J> {
    shared: Arc<Shared<K, J>>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl<K, J> fmt::Debug for Lanes<K, J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lanes")
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl<K, J> Lanes<K, J>
where
    K: Ord + Copy + Send + 'static,
    J: Send + 'static,
{
    /// Start `workers` threads (at least one) that run `exec` on each job.
    pub(crate) fn new<F>(workers: usize, exec: F) -> Self
    where
        F: Fn(J) + Send + Sync + 'static,
    {
        let shared = Arc::new(Shared {
            sched: Mutex::new(Sched {
                index: BTreeMap::new(),
                lanes: Vec::new(),
                next: 0,
                shutdown: false,
            }),
            work: Condvar::new(),
        });
        let exec = Arc::new(exec);
        let workers = (0..workers.max(1))
            .map(|_| {
                let shared = shared.clone();
                let exec = exec.clone();
                thread::spawn(move || worker(&shared, &*exec))
            })
            .collect();
        Self { shared, workers }
    }

    /// Queue `jobs` at the back of `key`'s lane, in order. Gives the jobs back if shut down.
    pub(crate) fn push(&self, key: K, jobs: Vec<J>) -> Result<(), Vec<J>> {
        let mut s = lock(&self.shared.sched);
        if s.shutdown {
            return Err(jobs);
        }
        let idx = match s.index.get(&key) {
            Some(&i) => i,
            None => {
                let i = s.lanes.len();
                s.lanes.push(Lane {
                    queue: VecDeque::new(),
                    busy: false,
                });
                s.index.insert(key, i);
                i
            }
        };
        let n = jobs.len();
        s.lanes[idx].queue.extend(jobs);
        drop(s);
        if n > 0 {
            // Only one job of this lane can start now; one worker is enough.
            self.shared.work.notify_one();
        }
        Ok(())
    }

    /// Stop the workers after the jobs they hold, join them, and return every job never started.
    pub(crate) fn shutdown(&mut self) -> Vec<J> {
        lock(&self.shared.sched).shutdown = true;
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            // A worker that panicked has already released its lane; its panic is not ours to raise.
            let _ = w.join();
        }
        let mut s = lock(&self.shared.sched);
        s.lanes.iter_mut().flat_map(|l| l.queue.drain(..)).collect()
    }
}

impl<K, J> Drop for Lanes<K, J> {
    fn drop(&mut self) {
        lock(&self.shared.sched).shutdown = true;
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker<K, J>(shared: &Shared<K, J>, exec: &dyn Fn(J)) {
    let mut s = lock(&shared.sched);
    loop {
        if s.shutdown {
            return;
        }
        let n = s.lanes.len();
        let found = (0..n)
            .map(|k| (s.next + k) % n)
            .find(|&i| !s.lanes[i].busy && !s.lanes[i].queue.is_empty());
        let Some(i) = found else {
            s = wait(&shared.work, s);
            continue;
        };
        let job = s.lanes[i]
            .queue
            .pop_front()
            .expect("lane checked non-empty");
        s.lanes[i].busy = true;
        s.next = (i + 1) % n;
        drop(s);

        // Release the lane even if `exec` panics, so the pool does not wedge.
        struct Release<'a, K, J>(&'a Shared<K, J>, usize);
        impl<K, J> Drop for Release<'_, K, J> {
            fn drop(&mut self) {
                let mut s = lock(&self.0.sched);
                s.lanes[self.1].busy = false;
                let more = !s.lanes[self.1].queue.is_empty();
                drop(s);
                if more {
                    self.0.work.notify_one();
                }
            }
        }
        {
            let _release = Release(shared, i);
            exec(job);
        }
        s = lock(&shared.sched);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn a_lane_runs_in_order_and_one_at_a_time() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let active = Arc::new(AtomicUsize::new(0));
        let (l2, a2) = (log.clone(), active.clone());
        let lanes: Lanes<u8, u32> = Lanes::new(4, move |j| {
            assert_eq!(
                a2.fetch_add(1, Ordering::SeqCst),
                0,
                "two jobs of one lane at once"
            );
            std::thread::sleep(Duration::from_millis(1));
            lock(&l2).push(j);
            a2.fetch_sub(1, Ordering::SeqCst);
        });
        lanes.push(7, (0..20).collect()).unwrap();
        lanes.push(7, (20..30).collect()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lock(&log).len() < 30 {
            assert!(std::time::Instant::now() < deadline, "lanes did not drain");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(*lock(&log), (0..30).collect::<Vec<_>>());
    }

    #[test]
    fn different_lanes_run_in_parallel() {
        let gate = Arc::new(std::sync::Barrier::new(3));
        let g2 = gate.clone();
        // Both jobs must be inside `exec` at once for the barrier (with the test thread) to open.
        let lanes: Lanes<u8, ()> = Lanes::new(2, move |()| {
            g2.wait();
        });
        lanes.push(1, vec![()]).unwrap();
        lanes.push(2, vec![()]).unwrap();
        gate.wait();
    }

    #[test]
    fn shutdown_returns_unstarted_jobs() {
        let started = Arc::new(std::sync::Barrier::new(2));
        let release = Arc::new(std::sync::Barrier::new(2));
        let (s2, r2) = (started.clone(), release.clone());
        // Only job 1 blocks: should a later job start anyway, the test fails on `left`
        // instead of hanging.
        let mut lanes: Lanes<u8, u32> = Lanes::new(1, move |j| {
            if j == 1 {
                s2.wait();
                r2.wait();
            }
        });
        lanes.push(0, vec![1, 2, 3]).unwrap();
        started.wait();
        // Job 1 is running. Let it finish only once shutdown has set its flag (an observable
        // event, not a sleep), so the worker stops before it could take job 2.
        let shared = Arc::clone(&lanes.shared);
        let h = std::thread::spawn(move || {
            while !lock(&shared.sched).shutdown {
                std::thread::yield_now();
            }
            release.wait();
        });
        let left = lanes.shutdown();
        h.join().unwrap();
        assert_eq!(left, vec![2, 3]);
        assert_eq!(lanes.push(0, vec![9]), Err(vec![9]));
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::ticket::TicketCore;

    /// Two workers, two lanes, one two-part copy and one one-part copy: every part runs exactly
    /// once, a lane never runs two parts at once, and the ticket completes.
    #[test]
    fn loom_lanes_drain_a_batch() {
        loom::model(|| {
            let core = Arc::new(TicketCore::new(&[2, 1], 0));
            let busy = Arc::new([
                crate::loom::AtomicBool::new(false),
                crate::loom::AtomicBool::new(false),
            ]);
            let b2 = busy.clone();
            let mut lanes: Lanes<usize, (Arc<TicketCore>, usize)> =
                Lanes::new(2, move |(t, copy): (Arc<TicketCore>, usize)| {
                    use crate::loom::Ordering::SeqCst;
                    assert!(!b2[copy].swap(true, SeqCst), "lane ran two parts at once");
                    b2[copy].store(false, SeqCst);
                    t.part_done(copy);
                });
            lanes
                .push(0, vec![(core.clone(), 0), (core.clone(), 0)])
                .unwrap();
            lanes.push(1, vec![(core.clone(), 1)]).unwrap();
            assert!(core.wait().is_ok());
            assert!(lanes.shutdown().is_empty());
        });
    }

    /// Shutdown racing with the workers: every job either ran or is handed back, never both,
    /// never neither.
    #[test]
    fn loom_lanes_shutdown_loses_no_job() {
        loom::model(|| {
            let ran = Arc::new(Mutex::new(Vec::new()));
            let r2 = ran.clone();
            let mut lanes: Lanes<u8, u8> = Lanes::new(1, move |j| lock(&r2).push(j));
            lanes.push(0, vec![1, 2]).unwrap();
            let mut all = lanes.shutdown();
            all.extend(lock(&ran).iter().copied());
            all.sort_unstable();
            assert_eq!(all, vec![1, 2]);
        });
    }
}
