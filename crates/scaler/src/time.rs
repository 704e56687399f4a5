//! The injected clock.
//!
//! Nothing in this crate reads a clock. Every method that needs the time takes a [`Time`]: a
//! point on a monotonic timeline measured from an epoch the caller chooses (for example the
//! `Instant` at which the engine started). Tests drive it by hand, so every behaviour that
//! depends on time is deterministic.

use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// A point in time: the duration since an epoch chosen by the caller.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
pub struct Time(Duration);

impl Time {
    /// The epoch.
    pub const ZERO: Time = Time(Duration::ZERO);

    /// The time `since_epoch` after the epoch.
    pub const fn from_duration(since_epoch: Duration) -> Time {
        Time(since_epoch)
    }

    /// The time `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: u64) -> Time {
        Time(Duration::from_millis(ms))
    }

    /// The duration since the epoch.
    pub const fn since_epoch(self) -> Duration {
        self.0
    }

    /// How long after `earlier` this is; zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Time) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// This time moved `by` later (saturating at the far future).
    pub fn after(self, by: Duration) -> Time {
        Time(self.0.saturating_add(by))
    }

    /// This time moved `by` earlier (saturating at the epoch).
    pub fn before(self, by: Duration) -> Time {
        Time(self.0.saturating_sub(by))
    }
}

impl fmt::Debug for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t+{:.3}ms", millis(self.0))
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A duration in (fractional) milliseconds, the unit of every report.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_panicking() {
        let t = Time::from_millis(10);
        assert_eq!(t.saturating_since(Time::from_millis(25)), Duration::ZERO);
        assert_eq!(
            t.saturating_since(Time::from_millis(4)),
            Duration::from_millis(6)
        );
        assert_eq!(t.before(Duration::from_secs(1)), Time::ZERO);
        assert_eq!(
            Time::from_duration(Duration::MAX)
                .after(Duration::from_secs(1))
                .since_epoch(),
            Duration::MAX
        );
        assert!((millis(Duration::from_micros(1500)) - 1.5).abs() < 1e-12);
    }
}
