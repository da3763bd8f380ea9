//! Capped exponential backoff with full jitter.

use std::time::Duration;

/// Backoff parameters for retryable failures.
///
/// The n-th retry waits a random time in `[0, min(max, initial * 2^n)]` ("full
/// jitter"), so many relays restarting together do not hammer a recovering
/// service in lockstep.
///
/// ```
/// use std::time::Duration;
/// use outbox_core::Backoff;
///
/// let mut backoff = Backoff::default();
/// let first = backoff.next_delay();
/// assert!(first <= Duration::from_millis(100));
/// backoff.reset();
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

/// A permanent configuration error unless retries wait at all: a zero
/// first delay would retry a failing service in a busy loop.
pub(crate) fn check_backoff(initial: Duration, max: Duration) -> crate::Result<()> {
    if !initial.is_zero() && max >= initial {
        return Ok(());
    }
    Err(crate::Error::permanent(
        crate::Stage::Config,
        format!(
            "backoff_initial ({initial:?}) must be above zero and at most backoff_max ({max:?})"
        ),
    ))
}

impl Default for Backoff {
    /// 100 ms initial, capped at 10 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    /// Backoff starting at `initial` and never waiting longer than `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; grows with each call.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fastrand::f64())
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_capped_and_grow() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500));
        for _ in 0..100 {
            assert!(backoff.next_delay() <= Duration::from_millis(500));
        }
        assert_eq!(backoff.attempts(), 100);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(10));
    }
}
