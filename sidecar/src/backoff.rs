//! Pure timing decisions: capped exponential backoff with jitter, and jittered poll intervals.
//!
//! Owns: the arithmetic only; the caller supplies the random number so tests are deterministic.
//! Must never: sleep, read the clock or draw randomness itself.

use std::time::Duration;

/// Capped exponential backoff with "equal jitter" (half fixed, half random).
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `cap`.
    #[must_use]
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The delay before the next retry; `unit` is a random number in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Number of failures so far.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Forget past failures after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `interval` jittered by ±20%; `unit` is a random number in `[0, 1)`.
#[must_use]
pub fn jittered(interval: Duration, unit: f64) -> Duration {
    interval.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{jittered, Backoff};

    #[test]
    fn backoff_doubles_until_the_cap_and_stays_within_half_to_full() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let lows: Vec<_> = (0..8).map(|_| b.next_delay(0.0)).collect();
        assert_eq!(lows[0], Duration::from_millis(50));
        assert_eq!(lows[1], Duration::from_millis(100));
        assert_eq!(lows[4], Duration::from_millis(800));
        assert_eq!(lows[7], Duration::from_secs(1));
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..30 {
            assert!(b.next_delay(0.999) <= Duration::from_secs(2));
        }
        assert_eq!(b.attempts(), 30);
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
    }

    #[test]
    fn poll_interval_jitter_stays_within_twenty_percent() {
        let i = Duration::from_secs(30);
        assert_eq!(jittered(i, 0.0), Duration::from_secs(24));
        assert_eq!(jittered(i, 1.0), Duration::from_secs(36));
        assert_eq!(jittered(i, 0.5), Duration::from_secs(30));
    }
}
