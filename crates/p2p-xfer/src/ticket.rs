//! Tickets: the handle a transport returns for a submitted batch.
//!
//! A ticket tracks every copy of its batch. A copy is split into parts (chunks) by the transport;
//! it *completes* when its last part has landed, and is *resolved* when it has completed, failed, or
//! been skipped (after [`Ticket::cancel`] or a transport shutdown). The ticket is finished when every
//! copy is resolved, and only then reports, so a report never races with bytes still in flight:
//! - `Ok(BatchReport)` when every copy completed;
//! - `Err(BatchError)` otherwise, listing exactly the copies that completed.
//!
//! Cancellation is cooperative: parts already being copied finish, parts not yet started are
//! skipped, and a copy with any part skipped does not count as completed.

use crate::error::{BatchError, CopyFault};
use crate::loom::{lock, wait, wait_timeout, Arc, AtomicBool, Condvar, Mutex, Ordering};
use std::any::Any;
use std::fmt;
use std::task::Poll;
use std::time::{Duration, Instant};

/// What a batch that completed in full did.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchReport {
    /// Copies in the batch (all completed).
    pub copies: usize,
    /// Bytes moved.
    pub bytes: u64,
    /// From submit until the ticket saw the last copy complete.
    pub elapsed: Duration,
}

impl BatchReport {
    /// Achieved rate over the whole batch, in 10⁹ bytes per second.
    pub fn gbps(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s / 1e9
        } else {
            0.0
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CopyState {
    Pending { parts_left: u32 },
    Completed,
    Skipped,
    Failed,
}

#[derive(Debug)]
struct State {
    copies: Vec<CopyState>,
    unresolved: usize,
    /// The lowest-indexed failure, if any.
    failure: Option<(usize, CopyFault)>,
    shut_down: bool,
    finished_at: Option<Instant>,
}

/// The shared state behind a [`Ticket`], updated by whatever executes the batch.
#[derive(Debug)]
pub(crate) struct TicketCore {
    cancelled: AtomicBool,
    state: Mutex<State>,
    resolved: Condvar,
    submitted: Instant,
    bytes: u64,
}

impl TicketCore {
    /// A core for a batch whose copy `i` is executed in `parts[i]` parts (each at least 1).
    pub(crate) fn new(parts: &[u32], bytes: u64) -> Self {
        let copies: Vec<CopyState> = parts
            .iter()
            .map(|&p| CopyState::Pending {
                parts_left: p.max(1),
            })
            .collect();
        let unresolved = copies.len();
        Self {
            cancelled: AtomicBool::new(false),
            state: Mutex::new(State {
                copies,
                unresolved,
                failure: None,
                shut_down: false,
                finished_at: (unresolved == 0).then(Instant::now),
            }),
            resolved: Condvar::new(),
            submitted: Instant::now(),
            bytes,
        }
    }

    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Whether a part of copy `i` should still be executed: not cancelled, and the copy neither
    /// failed nor was skipped.
    pub(crate) fn should_run(&self, i: usize) -> bool {
        !self.is_cancelled() && matches!(lock(&self.state).copies[i], CopyState::Pending { .. })
    }

    /// One part of copy `i` landed. Returns whether that completed the copy.
    pub(crate) fn part_done(&self, i: usize) -> bool {
        let mut st = lock(&self.state);
        match st.copies[i] {
            CopyState::Pending { parts_left } if parts_left > 1 => {
                st.copies[i] = CopyState::Pending {
                    parts_left: parts_left - 1,
                };
                false
            }
            CopyState::Pending { .. } => {
                st.copies[i] = CopyState::Completed;
                self.resolve_one(&mut st);
                true
            }
            // A part that ran after the copy was resolved (e.g. failed) changes nothing.
            _ => false,
        }
    }

    /// Copy `i` will not complete because the batch was cancelled.
    pub(crate) fn skip(&self, i: usize) {
        let mut st = lock(&self.state);
        if matches!(st.copies[i], CopyState::Pending { .. }) {
            st.copies[i] = CopyState::Skipped;
            self.resolve_one(&mut st);
        }
    }

    /// Copy `i` will not complete because the transport shut down.
    pub(crate) fn shut_down(&self, i: usize) {
        let mut st = lock(&self.state);
        if matches!(st.copies[i], CopyState::Pending { .. }) {
            st.copies[i] = CopyState::Skipped;
            st.shut_down = true;
            self.resolve_one(&mut st);
        }
    }

    /// Copy `i` failed.
    pub(crate) fn fail(&self, i: usize, fault: CopyFault) {
        let mut st = lock(&self.state);
        if matches!(st.copies[i], CopyState::Pending { .. }) {
            st.copies[i] = CopyState::Failed;
            if st.failure.as_ref().is_none_or(|(j, _)| i < *j) {
                st.failure = Some((i, fault));
            }
            self.resolve_one(&mut st);
        }
    }

    fn resolve_one(&self, st: &mut State) {
        st.unresolved -= 1;
        if st.unresolved == 0 {
            st.finished_at = Some(Instant::now());
            self.resolved.notify_all();
        }
    }

    fn outcome(&self, st: &State) -> Option<Result<BatchReport, BatchError>> {
        if st.unresolved > 0 {
            return None;
        }
        let total = st.copies.len();
        let completed: Vec<usize> = (0..total)
            .filter(|&i| st.copies[i] == CopyState::Completed)
            .collect();
        Some(if let Some((index, fault)) = &st.failure {
            Err(BatchError::Failed {
                index: *index,
                fault: fault.clone(),
                completed,
                total,
            })
        } else if completed.len() < total {
            if st.shut_down {
                Err(BatchError::ShutDown { completed, total })
            } else {
                Err(BatchError::Cancelled { completed, total })
            }
        } else {
            let finished = st.finished_at.unwrap_or(self.submitted);
            Ok(BatchReport {
                copies: total,
                bytes: self.bytes,
                elapsed: finished.saturating_duration_since(self.submitted),
            })
        })
    }

    pub(crate) fn poll(&self) -> Poll<Result<BatchReport, BatchError>> {
        match self.outcome(&lock(&self.state)) {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }

    pub(crate) fn wait(&self) -> Result<BatchReport, BatchError> {
        let mut st = lock(&self.state);
        loop {
            if let Some(r) = self.outcome(&st) {
                return r;
            }
            st = wait(&self.resolved, st);
        }
    }

    pub(crate) fn wait_timeout(&self, timeout: Duration) -> Poll<Result<BatchReport, BatchError>> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            if let Some(r) = self.outcome(&st) {
                return Poll::Ready(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return Poll::Pending;
            }
            st = wait_timeout(&self.resolved, st, deadline - now);
        }
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.state).copies.len()
    }
}

/// The handle of a submitted batch: poll it, wait for it, or cancel it. Cheap to clone; all clones
/// refer to the same batch.
#[derive(Clone)]
pub struct Ticket {
    core: Arc<TicketCore>,
    /// Transport-specific state (e.g. the CUDA transport's device-side fences).
    ext: Option<Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("copies", &self.core.len())
            .field("bytes", &self.core.bytes)
            .field("cancelled", &self.core.is_cancelled())
            .field("finished", &self.poll().is_ready())
            .finish()
    }
}

impl Ticket {
    pub(crate) fn new(core: Arc<TicketCore>, ext: Option<Arc<dyn Any + Send + Sync>>) -> Self {
        Self { core, ext }
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn ext(&self) -> Option<&Arc<dyn Any + Send + Sync>> {
        self.ext.as_ref()
    }

    /// The outcome if the batch is finished, without blocking.
    pub fn poll(&self) -> Poll<Result<BatchReport, BatchError>> {
        self.core.poll()
    }

    /// Block until the batch is finished and return its outcome. Can be called any number of
    /// times, from any clone.
    pub fn wait(&self) -> Result<BatchReport, BatchError> {
        self.core.wait()
    }

    /// Block for at most `timeout`; `Poll::Pending` if the batch is still running then.
    pub fn wait_timeout(&self, timeout: Duration) -> Poll<Result<BatchReport, BatchError>> {
        self.core.wait_timeout(timeout)
    }

    /// Ask the transport to stop: parts not yet started are skipped. Returns at once; [`wait`]
    /// to learn which copies completed anyway.
    ///
    /// [`wait`]: Ticket::wait
    pub fn cancel(&self) {
        self.core.cancel();
    }

    /// Whether [`cancel`](Ticket::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.core.is_cancelled()
    }

    /// Copies in the batch.
    pub fn len(&self) -> usize {
        self.core.len()
    }

    /// Whether the batch has no copies (such a ticket is finished from the start).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes in the batch.
    pub fn bytes(&self) -> u64 {
        self.core.bytes
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn fault() -> CopyFault {
        CopyFault::Driver {
            call: "cuMemcpyPeerAsync",
            code: 1,
        }
    }

    #[test]
    fn completes_when_every_part_lands() {
        let core = Arc::new(TicketCore::new(&[2, 1], 30));
        let t = Ticket::new(core.clone(), None);
        assert!(t.poll().is_pending());
        assert!(!core.part_done(0));
        assert!(core.part_done(1));
        assert!(t.poll().is_pending());
        assert!(core.part_done(0));
        let report = t.wait().unwrap();
        assert_eq!((report.copies, report.bytes), (2, 30));
    }

    #[test]
    fn empty_batch_is_finished_at_once() {
        let t = Ticket::new(Arc::new(TicketCore::new(&[], 0)), None);
        assert!(t.is_empty());
        assert_eq!(t.wait().unwrap().copies, 0);
    }

    #[test]
    fn cancel_reports_exactly_the_completed_copies() {
        let core = Arc::new(TicketCore::new(&[1, 2, 1], 0));
        let t = Ticket::new(core.clone(), None);
        core.part_done(0);
        core.part_done(1);
        t.cancel();
        assert!(!core.should_run(1));
        core.skip(1);
        core.skip(2);
        assert_eq!(
            t.wait(),
            Err(BatchError::Cancelled {
                completed: vec![0],
                total: 3
            })
        );
    }

    #[test]
    fn cancel_after_completion_changes_nothing() {
        let core = Arc::new(TicketCore::new(&[1], 8));
        let t = Ticket::new(core.clone(), None);
        core.part_done(0);
        t.cancel();
        assert!(t.wait().is_ok());
    }

    #[test]
    fn the_lowest_failure_is_reported_and_later_parts_are_ignored() {
        let core = Arc::new(TicketCore::new(&[1, 2, 1], 0));
        let t = Ticket::new(core.clone(), None);
        core.fail(2, fault());
        core.fail(1, fault());
        assert!(!core.should_run(1));
        assert!(!core.part_done(1));
        core.part_done(0);
        match t.wait() {
            Err(BatchError::Failed {
                index: 1,
                completed,
                total: 3,
                ..
            }) => assert_eq!(completed, vec![0]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn shutdown_is_distinguished_from_cancel() {
        let core = Arc::new(TicketCore::new(&[1, 1], 0));
        let t = Ticket::new(core.clone(), None);
        core.part_done(1);
        core.shut_down(0);
        assert_eq!(
            t.wait(),
            Err(BatchError::ShutDown {
                completed: vec![1],
                total: 2
            })
        );
    }

    #[test]
    fn wait_timeout_returns_pending_then_ready() {
        let core = Arc::new(TicketCore::new(&[1], 0));
        let t = Ticket::new(core.clone(), None);
        assert!(t.wait_timeout(Duration::from_millis(5)).is_pending());
        let c = core.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            c.part_done(0);
        });
        assert!(t.wait_timeout(Duration::from_secs(10)).is_ready());
        h.join().unwrap();
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;

    /// Two executors finish parts of the same copy while a third thread waits: the waiter wakes
    /// exactly once everything is resolved and sees a full report.
    #[test]
    fn loom_ticket_wait_sees_all_parts() {
        loom::model(|| {
            let core = Arc::new(TicketCore::new(&[2, 1], 3));
            let a = core.clone();
            let b = core.clone();
            let ta = crate::loom::thread::spawn(move || {
                a.part_done(0);
            });
            let tb = crate::loom::thread::spawn(move || {
                b.part_done(0);
                b.part_done(1);
            });
            let r = core.wait();
            assert_eq!(r.map(|r| r.copies), Ok(2));
            ta.join().unwrap();
            tb.join().unwrap();
        });
    }

    /// Cancel races with an executor: whatever interleaving, a copy is reported completed exactly
    /// when all of its parts ran.
    #[test]
    fn loom_ticket_cancel_reports_exactly_what_ran() {
        loom::model(|| {
            let core = Arc::new(TicketCore::new(&[2], 0));
            let exec = core.clone();
            let ran = Arc::new(crate::loom::Mutex::new(0u32));
            let ran2 = ran.clone();
            let h = crate::loom::thread::spawn(move || {
                for _ in 0..2 {
                    if exec.should_run(0) {
                        *crate::loom::lock(&ran2) += 1;
                        exec.part_done(0);
                    } else {
                        exec.skip(0);
                        return;
                    }
                }
            });
            core.cancel();
            let r = core.wait();
            h.join().unwrap();
            let ran = *crate::loom::lock(&ran);
            match r {
                Ok(_) => assert_eq!(ran, 2),
                Err(e) => {
                    assert!(ran < 2);
                    assert!(e.completed().is_empty());
                }
            }
        });
    }
}
