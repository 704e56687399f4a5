//! The request queue between submitters (any thread) and the iteration loop.
//!
//! Submitters, cancellations and boundary actions only take this short lock, never the lock of
//! the iteration in progress, so intake never pauses. The run loop sleeps on the condition
//! variable when it has nothing to do; every producer changes the state under the lock and then
//! notifies, and the loop checks the state under the same lock before it sleeps, so no wake-up is
//! lost (the loom models below check exactly this).

use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::loom::{wait_timeout, AtomicBool, Condvar, Mutex, MutexGuard, Ordering};
use crate::request::{Event, Request, RequestId, RequestLimits};

/// A validated request waiting to enter the scheduler.
pub(crate) struct Submitted {
    pub(crate) id: RequestId,
    pub(crate) request: Request,
    pub(crate) tx: Sender<Event>,
    pub(crate) at: Instant,
}

pub(crate) struct IntakeState {
    pub(crate) new: Vec<Submitted>,
    pub(crate) cancels: Vec<RequestId>,
    pub(crate) limits: RequestLimits,
    pub(crate) capacity_tokens: usize,
    pub(crate) stopped: bool,
    /// A boundary action was queued.
    poked: bool,
}

impl IntakeState {
    fn has_work(&self) -> bool {
        !self.new.is_empty() || !self.cancels.is_empty() || self.poked
    }
}

/// See the module docs.
pub(crate) struct Intake {
    state: Mutex<IntakeState>,
    wake: Condvar,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake").finish_non_exhaustive()
    }
}

impl Intake {
    pub(crate) fn new(limits: RequestLimits, capacity_tokens: usize) -> Self {
        Self {
            state: Mutex::new(IntakeState {
                new: Vec::new(),
                cancels: Vec::new(),
                limits,
                capacity_tokens,
                stopped: false,
                poked: false,
            }),
            wake: Condvar::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, IntakeState> {
        self.state.lock()
    }

    /// Changes the state, then wakes the run loop.
    pub(crate) fn update<T>(&self, f: impl FnOnce(&mut IntakeState) -> T) -> T {
        let out = f(&mut self.lock());
        self.wake.notify_all();
        out
    }

    /// Wakes the run loop after the caller changed the state under [`Intake::lock`].
    pub(crate) fn notify(&self) {
        self.wake.notify_all();
    }

    pub(crate) fn cancel(&self, id: RequestId) {
        self.update(|st| st.cancels.push(id));
    }

    /// Notes that a boundary action is waiting.
    pub(crate) fn poke(&self) {
        self.update(|st| st.poked = true);
    }

    /// Whether anything is waiting.
    pub(crate) fn has_work(&self) -> bool {
        self.lock().has_work()
    }

    /// Takes the new requests and cancellations.
    pub(crate) fn take(st: &mut IntakeState) -> (Vec<Submitted>, Vec<RequestId>) {
        st.poked = false;
        (std::mem::take(&mut st.new), std::mem::take(&mut st.cancels))
    }

    /// Sleeps until work arrives, `stop` is set (followed by [`Intake::wake_all`]), or `timeout`
    /// passes.
    pub(crate) fn wait_for_work(&self, stop: &AtomicBool, timeout: Duration) {
        let st = self.lock();
        if !st.has_work() && !stop.load(Ordering::Acquire) {
            drop(wait_timeout(&self.wake, st, timeout));
        }
    }

    /// Wakes a sleeping run loop (after setting its stop flag).
    pub(crate) fn wake_all(&self) {
        // Taking the lock orders this after the loop's check, or before it.
        drop(self.lock());
        self.wake.notify_all();
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    fn intake() -> Intake {
        Intake::new(
            RequestLimits {
                vocab_size: 10,
                max_context: 10,
            },
            100,
        )
    }

    /// A cancellation (any producer) racing with the idle loop always wakes it: under loom a
    /// timed wait never times out, so a lost wake-up is a deadlock that loom reports.
    #[test]
    fn loom_a_producer_always_wakes_the_idle_loop() {
        loom::model(|| {
            let intake = Arc::new(intake());
            let stop = AtomicBool::new(false);
            let producer = {
                let intake = Arc::clone(&intake);
                loom::thread::spawn(move || intake.cancel(RequestId(7)))
            };
            loop {
                let (_, cancels) = Intake::take(&mut intake.lock());
                if !cancels.is_empty() {
                    assert_eq!(cancels, vec![RequestId(7)]);
                    break;
                }
                intake.wait_for_work(&stop, Duration::from_secs(60));
            }
            producer.join().unwrap();
        });
    }

    /// Stopping (flag, then wake) always ends the idle loop.
    #[test]
    fn loom_stop_always_ends_the_idle_loop() {
        loom::model(|| {
            let intake = Arc::new(intake());
            let stop = Arc::new(AtomicBool::new(false));
            let stopper = {
                let (intake, stop) = (Arc::clone(&intake), Arc::clone(&stop));
                loom::thread::spawn(move || {
                    stop.store(true, Ordering::Release);
                    intake.wake_all();
                })
            };
            while !stop.load(Ordering::Acquire) {
                intake.wait_for_work(&stop, Duration::from_secs(60));
            }
            stopper.join().unwrap();
        });
    }

    /// A boundary action's poke is seen and then cleared by `take`.
    #[test]
    fn loom_a_poke_wakes_the_loop_once() {
        loom::model(|| {
            let intake = Arc::new(intake());
            let stop = AtomicBool::new(false);
            let poker = {
                let intake = Arc::clone(&intake);
                loom::thread::spawn(move || intake.poke())
            };
            while !intake.has_work() {
                intake.wait_for_work(&stop, Duration::from_secs(60));
            }
            let _ = Intake::take(&mut intake.lock());
            assert!(!intake.has_work());
            poker.join().unwrap();
        });
    }
}
