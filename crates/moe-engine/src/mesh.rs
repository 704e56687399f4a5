//! The all-to-all exchange between device workers.
//!
//! Every device has one inbox per [`Lane`]. In each exchange round (identified by a tag: iteration
//! and layer) every device sends exactly one envelope to every device, itself included, possibly
//! with an empty body, and then gathers one envelope from every device. A device that failed sends
//! error bodies instead, so the others still complete the round and report the error rather than
//! wait forever. A round that does not complete within the timeout (a worker thread died) is an
//! error too.
//!
//! On the host backend the envelopes carry owned row buffers between the worker threads of one
//! process (the devices' memory is all host memory there).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::loom::{wait_timeout, Condvar, Mutex};

/// Which inbox a message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Token rows on their way to the devices holding their experts.
    Dispatch = 0,
    /// Expert outputs on their way back to the tokens' ranks.
    Results = 1,
}

const LANES: usize = 2;

/// Why an exchange round failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// A device reported an error in this round.
    #[error("device {device} failed: {message}")]
    Peer {
        /// The device's index in the mesh.
        device: usize,
        /// Its error.
        message: String,
    },
    /// A round did not complete in time (a worker stopped answering).
    #[error("the exchange round timed out after {0:?}: a device worker stopped answering")]
    Timeout(Duration),
    /// The mesh was shut down.
    #[error("the exchange was shut down")]
    Closed,
    /// A send to a device outside the mesh.
    #[error("device {0} is not in the mesh")]
    NoSuchDevice(usize),
}

#[derive(Debug)]
struct Envelope<T> {
    from: usize,
    tag: u64,
    body: Result<T, String>,
}

#[derive(Debug)]
struct Inbox<T> {
    queue: VecDeque<Envelope<T>>,
    closed: bool,
}

#[derive(Debug)]
struct Mailbox<T> {
    state: Mutex<Inbox<T>>,
    ready: Condvar,
}

/// The inboxes of `n` devices.
#[derive(Debug)]
pub struct Mesh<T> {
    n: usize,
    /// `[lane * n + device]`.
    boxes: Vec<Mailbox<T>>,
}

impl<T> Mesh<T> {
    /// A mesh of `n` devices.
    pub fn new(n: usize) -> Self {
        let boxes = (0..n * LANES)
            .map(|_| Mailbox {
                state: Mutex::new(Inbox {
                    queue: VecDeque::new(),
                    closed: false,
                }),
                ready: Condvar::new(),
            })
            .collect();
        Self { n, boxes }
    }

    fn inbox(&self, lane: Lane, device: usize) -> Result<&Mailbox<T>, MeshError> {
        if device >= self.n {
            return Err(MeshError::NoSuchDevice(device));
        }
        Ok(&self.boxes[lane as usize * self.n + device])
    }

    /// Sends `body` from `from` to `to` for round `tag`.
    pub fn send(
        &self,
        lane: Lane,
        from: usize,
        to: usize,
        tag: u64,
        body: Result<T, String>,
    ) -> Result<(), MeshError> {
        let b = self.inbox(lane, to)?;
        let mut st = b.state.lock();
        if st.closed {
            return Err(MeshError::Closed);
        }
        st.queue.push_back(Envelope { from, tag, body });
        drop(st);
        b.ready.notify_all();
        Ok(())
    }

    /// Waits for one envelope of round `tag` from every device; returns their bodies by sender.
    /// If any sender reported an error, the whole round is consumed and the first error returned.
    pub fn gather(
        &self,
        lane: Lane,
        me: usize,
        tag: u64,
        timeout: Duration,
    ) -> Result<Vec<T>, MeshError> {
        let b = self.inbox(lane, me)?;
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Option<Result<T, String>>> = (0..self.n).map(|_| None).collect();
        let mut have = 0;
        let mut st = b.state.lock();
        loop {
            let mut i = 0;
            while i < st.queue.len() {
                let e = &st.queue[i];
                if e.tag == tag && e.from < self.n && got[e.from].is_none() {
                    let e = st.queue.remove(i).expect("index checked");
                    got[e.from] = Some(e.body);
                    have += 1;
                } else {
                    i += 1;
                }
            }
            if have == self.n {
                break;
            }
            if st.closed {
                return Err(MeshError::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MeshError::Timeout(timeout));
            }
            st = wait_timeout(&b.ready, st, deadline - now);
        }
        drop(st);
        let mut out = Vec::with_capacity(self.n);
        let mut first_err = None;
        for (device, body) in got.into_iter().enumerate() {
            match body.expect("every sender delivered") {
                Ok(v) => out.push(v),
                Err(message) => {
                    first_err.get_or_insert(MeshError::Peer { device, message });
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Shuts every inbox: waiting and later gathers and sends fail with [`MeshError::Closed`].
    pub fn close(&self) {
        for b in &self.boxes {
            b.state.lock().closed = true;
            b.ready.notify_all();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn a_round_delivers_one_body_per_sender_in_sender_order() {
        let mesh = Arc::new(Mesh::<Vec<u32>>::new(3));
        let threads: Vec<_> = (0..3)
            .map(|me| {
                let mesh = Arc::clone(&mesh);
                std::thread::spawn(move || {
                    for round in 0..20u64 {
                        for to in 0..3 {
                            mesh.send(
                                Lane::Dispatch,
                                me,
                                to,
                                round,
                                Ok(vec![me as u32, to as u32, round as u32]),
                            )
                            .unwrap();
                        }
                        let got = mesh.gather(Lane::Dispatch, me, round, T).unwrap();
                        let want: Vec<Vec<u32>> = (0..3)
                            .map(|from| vec![from, me as u32, round as u32])
                            .collect();
                        assert_eq!(got, want);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn an_error_reaches_everyone_and_the_round_still_completes() {
        let mesh = Mesh::<u8>::new(2);
        mesh.send(Lane::Results, 0, 1, 5, Ok(1)).unwrap();
        mesh.send(Lane::Results, 1, 1, 5, Err("boom".into()))
            .unwrap();
        // A message of the next round waits its turn.
        mesh.send(Lane::Results, 0, 1, 6, Ok(2)).unwrap();
        let err = mesh.gather(Lane::Results, 1, 5, T).unwrap_err();
        assert_eq!(
            err,
            MeshError::Peer {
                device: 1,
                message: "boom".into()
            }
        );
        mesh.send(Lane::Results, 1, 1, 6, Ok(3)).unwrap();
        assert_eq!(mesh.gather(Lane::Results, 1, 6, T).unwrap(), vec![2, 3]);
    }

    #[test]
    fn a_missing_sender_times_out_and_close_wakes_waiters() {
        let mesh = Arc::new(Mesh::<u8>::new(2));
        mesh.send(Lane::Dispatch, 0, 0, 1, Ok(1)).unwrap();
        let err = mesh
            .gather(Lane::Dispatch, 0, 1, Duration::from_millis(20))
            .unwrap_err();
        assert!(matches!(err, MeshError::Timeout(_)));
        let m = Arc::clone(&mesh);
        let waiter = std::thread::spawn(move || m.gather(Lane::Dispatch, 1, 9, T));
        std::thread::sleep(Duration::from_millis(20));
        mesh.close();
        assert_eq!(waiter.join().unwrap(), Err(MeshError::Closed));
        assert_eq!(
            mesh.send(Lane::Dispatch, 0, 1, 9, Ok(0)),
            Err(MeshError::Closed)
        );
        assert_eq!(
            mesh.send(Lane::Dispatch, 0, 7, 9, Ok(0)),
            Err(MeshError::NoSuchDevice(7))
        );
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    /// Two devices run a dispatch round and a results round concurrently: every body arrives once,
    /// in sender order, and no interleaving loses a wake-up (loom reports a deadlock otherwise).
    #[test]
    fn loom_two_devices_complete_two_rounds() {
        loom::model(|| {
            let mesh = Arc::new(Mesh::<usize>::new(2));
            let peer = {
                let mesh = Arc::clone(&mesh);
                loom::thread::spawn(move || {
                    for to in 0..2 {
                        mesh.send(Lane::Dispatch, 1, to, 0, Ok(10 + to)).unwrap();
                    }
                    let d = mesh
                        .gather(Lane::Dispatch, 1, 0, Duration::from_secs(1))
                        .unwrap();
                    for to in 0..2 {
                        mesh.send(Lane::Results, 1, to, 0, Ok(d[to] * 2)).unwrap();
                    }
                    mesh.gather(Lane::Results, 1, 0, Duration::from_secs(1))
                        .unwrap()
                })
            };
            for to in 0..2 {
                mesh.send(Lane::Dispatch, 0, to, 0, Ok(to)).unwrap();
            }
            let d = mesh
                .gather(Lane::Dispatch, 0, 0, Duration::from_secs(1))
                .unwrap();
            assert_eq!(d, vec![0, 10]);
            for to in 0..2 {
                mesh.send(Lane::Results, 0, to, 0, Ok(d[to] * 2)).unwrap();
            }
            let r = mesh
                .gather(Lane::Results, 0, 0, Duration::from_secs(1))
                .unwrap();
            assert_eq!(r, vec![0, 2]);
            assert_eq!(peer.join().unwrap(), vec![20, 22]);
        });
    }

    /// Closing the mesh wakes a device waiting for a round that will never complete.
    #[test]
    fn loom_close_wakes_a_waiting_gather() {
        loom::model(|| {
            let mesh = Arc::new(Mesh::<usize>::new(2));
            let waiter = {
                let mesh = Arc::clone(&mesh);
                loom::thread::spawn(move || {
                    mesh.gather(Lane::Results, 0, 3, Duration::from_secs(1))
                })
            };
            mesh.close();
            assert_eq!(waiter.join().unwrap(), Err(MeshError::Closed));
        });
    }
}
