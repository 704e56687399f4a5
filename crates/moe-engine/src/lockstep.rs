//! [`Lockstep`]: the host threads of one multi-GPU step (one per rank) meeting at fixed points,
//! where a failure on any thread stops every thread's work without leaving one waiting.
//!
//! The CUDA runner's expert-parallel step drives each rank from a thread of its own; within an
//! MoE layer a GPU may queue its wait for another rank's event only after that rank recorded it,
//! so the threads meet twice per layer. Every thread meets the others the same number of times
//! whatever happens; after a failure anywhere, a thread skips its remaining work (but still
//! meets), so no thread waits at a barrier for one that returned early.

use super::loom::{AtomicBool, Condvar, Mutex, Ordering};

/// Threads in lock step (see the module docs).
#[derive(Debug)]
pub struct Lockstep {
    threads: usize,
    /// Threads arrived at the current meeting, and how many meetings have completed.
    meeting: Mutex<(usize, u64)>,
    all_there: Condvar,
    failed: AtomicBool,
}

impl Lockstep {
    /// For `threads` threads, each of which calls [`Lockstep::meet`] the same number of times.
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
            meeting: Mutex::new((0, 0)),
            all_there: Condvar::new(),
            failed: AtomicBool::new(false),
        }
    }

    /// Runs `work` unless some thread has failed; on failure marks the step failed and keeps
    /// the thread's first error in `first`. Returns whether `work` ran.
    pub fn run<E>(&self, first: &mut Option<E>, work: impl FnOnce() -> Result<(), E>) -> bool {
        if self.failed.load(Ordering::Acquire) {
            return false;
        }
        if let Err(e) = work() {
            self.failed.store(true, Ordering::Release);
            first.get_or_insert(e);
        }
        true
    }

    /// Waits until every thread has reached its matching call. A failure marked before any
    /// thread's call is seen by every thread's [`Lockstep::run`] after it.
    pub fn meet(&self) {
        let mut m = self.meeting.lock();
        let this = m.1;
        m.0 += 1;
        if m.0 == self.threads {
            *m = (0, this + 1);
            self.all_there.notify_all();
            return;
        }
        while m.1 == this {
            m = self
                .all_there
                .wait(m)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::{Arc, Mutex};

    /// Two threads, three phases split by two meetings; `fail` = (thread, phase) whose work
    /// fails. Returns each thread's (phases run, error).
    fn model(fail: (usize, usize)) {
        loom::model(move || {
            let step = Arc::new(Lockstep::new(2));
            let ran = Arc::new(Mutex::new(Vec::new()));
            let handles: Vec<_> = (0..2)
                .map(|t| {
                    let (step, ran) = (Arc::clone(&step), Arc::clone(&ran));
                    loom::thread::spawn(move || {
                        let mut first = None;
                        for phase in 0..3 {
                            if phase > 0 {
                                step.meet();
                            }
                            step.run(&mut first, || {
                                ran.lock().unwrap().push((t, phase));
                                if (t, phase) == fail {
                                    Err(phase)
                                } else {
                                    Ok(())
                                }
                            });
                        }
                        first
                    })
                })
                .collect();
            // Both threads return (loom reports a deadlock otherwise).
            let errs: Vec<Option<usize>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            // The failing thread reports its own error; the other reports none.
            assert_eq!(errs[fail.0], Some(fail.1));
            assert_eq!(errs[1 - fail.0], None);
            // No work of a phase after the meeting that follows the failure runs anywhere.
            let ran = ran.lock().unwrap();
            assert!(
                ran.iter().all(|&(_, p)| p <= fail.1),
                "phases after the failure ran: {ran:?}"
            );
            // Every phase before the failure ran on both threads.
            for p in 0..fail.1 {
                assert!(ran.contains(&(0, p)) && ran.contains(&(1, p)));
            }
        });
    }

    #[test]
    fn loom_a_failure_in_the_first_phase_stops_both_threads_without_a_deadlock() {
        model((0, 0));
    }

    #[test]
    fn loom_a_failure_after_a_meeting_stops_the_later_phases_everywhere() {
        model((1, 1));
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn every_thread_finishes_and_only_the_failing_one_reports_its_error() {
        let step = Arc::new(Lockstep::new(4));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let step = Arc::clone(&step);
                std::thread::spawn(move || {
                    let mut first = None;
                    let mut ran = 0;
                    for phase in 0..6 {
                        step.meet();
                        ran += usize::from(step.run(&mut first, || {
                            if (t, phase) == (2, 3) {
                                Err("boom")
                            } else {
                                Ok(())
                            }
                        }));
                    }
                    (first, ran)
                })
            })
            .collect();
        let out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (t, (err, ran)) in out.iter().enumerate() {
            assert_eq!(*err, (t == 2).then_some("boom"));
            // Phases 0..=2 ran everywhere and phase 3 on the failing thread; the others may have
            // run phase 3 too (the failure came during it); from phase 4 on, none.
            let want = if t == 2 { 4..=4 } else { 3..=4 };
            assert!(want.contains(ran), "thread {t} ran {ran} phases");
        }
    }
}
