//! A requests-per-minute limiter: a token bucket holding up to `per_minute` tokens, refilled continuously, so
//! that short bursts pass and the long-run rate stays under the account's tier (Moonshot's tier 0 allows 3
//! RPM). Pure: the clock is passed in, so tokio's paused time drives it in tests.

use std::time::{Duration, Instant};

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `per_minute` at least 1.
    pub fn new(per_minute: u32, now: Instant) -> RateLimiter {
        let capacity = per_minute.max(1) as f64;
        RateLimiter {
            capacity,
            per_sec: capacity / 60.0,
            tokens: capacity,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.capacity);
        self.at = now;
    }

    /// True when the bucket is full again at `now`: the limiter remembers nothing a fresh one would not.
    pub fn is_full(&self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + dt * self.per_sec >= self.capacity
    }

    /// Takes a token if one is there; else `Err(wait)` until the next one (nothing is taken).
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_up_to_the_rate_passes_then_waits() {
        let t = Instant::now();
        let mut l = RateLimiter::new(3, t);
        for _ in 0..3 {
            l.try_take(t).unwrap();
        }
        let wait = l.try_take(t).unwrap_err();
        assert_eq!(wait, Duration::from_secs(20));
        assert!(l.try_take(t + Duration::from_secs(19)).is_err());
        assert!(l.try_take(t + Duration::from_secs(20)).is_ok());
    }

    #[test]
    fn tokens_do_not_pile_up_beyond_the_capacity() {
        let t = Instant::now();
        let mut l = RateLimiter::new(2, t);
        let later = t + Duration::from_secs(3600);
        l.try_take(later).unwrap();
        l.try_take(later).unwrap();
        assert!(l.try_take(later).is_err());
    }
}
