//! Per-link counters: bytes moved, copies completed, and the time each link was busy, so that
//! achieved bandwidth is bytes over busy time (idle gaps between batches do not dilute it).

use crate::copy::Link;
use crate::loom::{lock, Mutex};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What one link has carried since the transport was created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkStats {
    /// The link.
    pub link: Link,
    /// Bytes that landed.
    pub bytes: u64,
    /// Copies that completed on this link.
    pub copies: u64,
    /// Time the link had work in flight.
    pub busy: Duration,
}

impl LinkStats {
    /// Achieved bandwidth while busy, in 10⁹ bytes per second (0 if never busy).
    pub fn gbps(&self) -> f64 {
        let s = self.busy.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s / 1e9
        } else {
            0.0
        }
    }
}

#[derive(Debug, Default)]
struct Counter {
    bytes: u64,
    copies: u64,
    in_flight: u32,
    since: Option<Instant>,
    busy: Duration,
}

/// Thread-safe per-link counters.
#[derive(Debug, Default)]
pub(crate) struct StatsRecorder {
    links: Mutex<BTreeMap<Link, Counter>>,
}

impl StatsRecorder {
    /// A part starts moving on `link`.
    pub(crate) fn begin(&self, link: Link) {
        let mut links = lock(&self.links);
        let c = links.entry(link).or_default();
        if c.in_flight == 0 {
            c.since = Some(Instant::now());
        }
        c.in_flight += 1;
    }

    /// A part that [`begin`](Self::begin) announced is over: `bytes` landed and `copies` copies
    /// completed with it (0 or 1).
    pub(crate) fn end(&self, link: Link, bytes: u64, copies: u64) {
        let mut links = lock(&self.links);
        let c = links.entry(link).or_default();
        c.bytes += bytes;
        c.copies += copies;
        c.in_flight = c.in_flight.saturating_sub(1);
        if c.in_flight == 0 {
            if let Some(since) = c.since.take() {
                c.busy += since.elapsed();
            }
        }
    }

    /// Add a measured interval directly (for transports that time links on the device).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn add(&self, link: Link, bytes: u64, copies: u64, busy: Duration) {
        let mut links = lock(&self.links);
        let c = links.entry(link).or_default();
        c.bytes += bytes;
        c.copies += copies;
        c.busy += busy;
    }

    /// A snapshot, ordered by link; busy time includes work still in flight.
    pub(crate) fn snapshot(&self) -> Vec<LinkStats> {
        let links = lock(&self.links);
        links
            .iter()
            .map(|(link, c)| LinkStats {
                link: *link,
                bytes: c.bytes,
                copies: c.copies,
                busy: c.busy + c.since.map_or(Duration::ZERO, |s| s.elapsed()),
            })
            .collect()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use hbm_vmm::DeviceId;

    #[test]
    fn overlapping_parts_count_busy_time_once() {
        let r = StatsRecorder::default();
        let l = Link::new(DeviceId(0), DeviceId(1));
        let wall = std::time::Instant::now();
        r.begin(l);
        r.begin(l);
        std::thread::sleep(Duration::from_millis(20));
        r.end(l, 100, 0);
        r.end(l, 100, 1);
        let wall = wall.elapsed();
        let s = r.snapshot();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].bytes, s[0].copies), (200, 1));
        // Busy for the 20 ms the parts overlapped, counted once: never more than the wall time
        // around both (twice would be), whatever the scheduler did meanwhile.
        assert!(s[0].busy >= Duration::from_millis(20));
        assert!(s[0].busy <= wall, "{:?} > {wall:?}", s[0].busy);
        // Idle time afterwards does not count.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(r.snapshot()[0].busy, s[0].busy);
    }

    #[test]
    fn gbps_is_bytes_over_busy_time() {
        let s = LinkStats {
            link: Link::new(DeviceId(0), DeviceId(1)),
            bytes: 2_000_000_000,
            copies: 1,
            busy: Duration::from_millis(10),
        };
        assert!((s.gbps() - 200.0).abs() < 1e-9);
        assert_eq!(
            LinkStats {
                busy: Duration::ZERO,
                ..s
            }
            .gbps(),
            0.0
        );
    }
}
