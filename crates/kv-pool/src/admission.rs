//! Watermarks: when to admit a new sequence, and when the pool is short of (or long on) blocks.

use crate::error::KvError;

/// Fractions of a pool's capacity that drive admission and scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Watermarks {
    /// Fraction of capacity kept free when admitting a new sequence, so that the running ones can
    /// keep decoding without preemption. `can_admit(t)` holds when the blocks for `t` tokens plus
    /// this reserve are free.
    pub admit_reserve: f64,
    /// Used fraction at or above which the pool reports [`Pressure::High`]: grow it, or scale up.
    pub high: f64,
    /// Used fraction at or below which the pool reports [`Pressure::Low`]: it could shrink.
    pub low: f64,
}

impl Default for Watermarks {
    fn default() -> Self {
        Self {
            admit_reserve: 0.02,
            high: 0.9,
            low: 0.3,
        }
    }
}

impl Watermarks {
    /// Checks that every fraction is in `0.0..=1.0` and `low < high`.
    pub fn validate(&self) -> Result<(), KvError> {
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        if !unit(self.admit_reserve) {
            return Err(KvError::BadWatermarks("admit_reserve must be in 0.0..=1.0"));
        }
        if !unit(self.high) || !unit(self.low) {
            return Err(KvError::BadWatermarks("high and low must be in 0.0..=1.0"));
        }
        if self.low >= self.high {
            return Err(KvError::BadWatermarks("low must be below high"));
        }
        Ok(())
    }

    /// Blocks kept back from admission in a pool of `capacity` blocks.
    pub fn reserve_blocks(&self, capacity: usize) -> usize {
        (self.admit_reserve * capacity as f64).ceil() as usize
    }

    /// Whether a new sequence needing `blocks` blocks may start in a pool of `capacity` blocks
    /// with `free` free.
    pub fn admits(&self, capacity: usize, free: usize, blocks: usize) -> bool {
        blocks
            .checked_add(self.reserve_blocks(capacity))
            .is_some_and(|need| need <= free)
    }

    /// The pressure a pool of `capacity` blocks with `used` in use is under.
    pub fn pressure(&self, capacity: usize, used: usize) -> Pressure {
        if capacity == 0 {
            return Pressure::High;
        }
        let used = used as f64 / capacity as f64;
        if used >= self.high {
            Pressure::High
        } else if used <= self.low {
            Pressure::Low
        } else {
            Pressure::Normal
        }
    }
}

/// How full a pool is, against its [`Watermarks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    /// At or under the low watermark: chunks could be released.
    Low,
    /// Between the watermarks.
    Normal,
    /// At or over the high watermark (or no capacity at all): more blocks are needed.
    High,
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn admission_keeps_the_reserve_free() {
        let w = Watermarks {
            admit_reserve: 0.1,
            high: 0.9,
            low: 0.3,
        };
        // 100 blocks, 20 free, 10 kept in reserve.
        assert!(w.admits(100, 20, 10));
        assert!(!w.admits(100, 20, 11));
        assert!(!w.admits(100, 20, usize::MAX));
    }

    #[test]
    fn pressure_follows_the_watermarks() {
        let w = Watermarks::default();
        assert_eq!(w.pressure(10, 9), Pressure::High);
        assert_eq!(w.pressure(10, 5), Pressure::Normal);
        assert_eq!(w.pressure(10, 3), Pressure::Low);
        assert_eq!(w.pressure(0, 0), Pressure::High);
    }

    #[test]
    fn bad_watermarks_are_refused() {
        let bad = Watermarks {
            low: 0.9,
            high: 0.5,
            ..Watermarks::default()
        };
        assert_eq!(
            bad.validate(),
            Err(KvError::BadWatermarks("low must be below high"))
        );
        let bad = Watermarks {
            admit_reserve: -0.1,
            ..Watermarks::default()
        };
        assert!(bad.validate().is_err());
        let bad = Watermarks {
            high: f64::NAN,
            ..Watermarks::default()
        };
        assert!(bad.validate().is_err());
        Watermarks::default().validate().unwrap();
    }
}
