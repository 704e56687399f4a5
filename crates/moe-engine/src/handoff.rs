//! The lock around the engine's iteration state. The run loop takes it for every iteration and
//! takes it again at once; std's mutex is not fair, so a plain `lock` from another thread
//! ([`super::Engine::with_runner`]) could wait for as long as the loop stays busy (minutes were
//! seen). [`Handoff`] lets such callers in first: they announce themselves before they lock, and
//! the loop, before each iteration, waits until no caller is announced. A caller therefore waits
//! for at most the iteration in progress and one that started as it announced itself.

use super::loom::{yield_now, AtomicUsize, Mutex, MutexGuard, Ordering};

#[derive(Debug)]
pub(crate) struct Handoff<T> {
    inner: Mutex<T>,
    /// Callers between their announcement and their lock.
    announced: AtomicUsize,
}

impl<T> Handoff<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            inner: Mutex::new(value),
            announced: AtomicUsize::new(0),
        }
    }

    /// Locks ahead of the run loop's next iteration.
    pub(crate) fn lock_first(&self) -> MutexGuard<'_, T> {
        self.announced.fetch_add(1, Ordering::SeqCst);
        let guard = self.inner.lock();
        self.announced.fetch_sub(1, Ordering::SeqCst);
        guard
    }

    /// Locks for an iteration, after every announced caller has had its turn.
    pub(crate) fn lock_after_others(&self) -> MutexGuard<'_, T> {
        while self.announced.load(Ordering::SeqCst) > 0 {
            yield_now();
        }
        self.inner.lock()
    }
}

#[cfg(all(test, loom))]
mod tests {
    use super::*;
    use loom::sync::atomic::AtomicUsize as Counter;
    use loom::sync::Arc;

    /// A caller racing with a loop that iterates back to back is overtaken by at most one
    /// iteration (one that checked just before the caller announced itself), and both always
    /// finish. An iteration overtakes when it holds the lock while a caller is announced.
    #[test]
    fn loom_a_caller_is_overtaken_by_at_most_one_iteration_of_a_busy_loop() {
        loom::model(|| {
            let state = Arc::new(Handoff::new(0usize));
            let overtakes = Arc::new(Counter::new(0));
            let looper = {
                let (state, overtakes) = (Arc::clone(&state), Arc::clone(&overtakes));
                loom::thread::spawn(move || {
                    for _ in 0..3 {
                        let mut g = state.lock_after_others();
                        if state.announced.load(Ordering::SeqCst) > 0 {
                            overtakes.fetch_add(1, Ordering::SeqCst);
                        }
                        *g += 1;
                    }
                })
            };
            drop(state.lock_first());
            looper.join().unwrap();
            let n = overtakes.load(Ordering::SeqCst);
            assert!(n <= 1, "overtaken by {n} iterations");
            assert_eq!(*state.lock_first(), 3);
        });
    }
}
