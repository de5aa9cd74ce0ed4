//! The circuit breaker: after `failures` outage-type failures in a row the circuit opens and requests fail at
//! once (`circuit_open`) instead of waiting on a dead link; after `open_for` one trial request is let through
//! (half-open), and its outcome closes the circuit or opens it again. Pure: the clock is passed in.

use std::time::{Duration, Instant};

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial is out; everything else is refused until it ends.
    HalfOpen,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    state: BreakerState,
}

impl Breaker {
    /// Opens after `threshold` (at least 1) failures in a row, for `open_for`.
    pub fn new(threshold: u32, open_for: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            open_for,
            state: BreakerState::Closed { failures: 0 },
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// True while requests are refused (open, or half-open with the trial out).
    pub fn is_open(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { .. } => false,
            BreakerState::Open { until } => now < until,
            BreakerState::HalfOpen => true,
        }
    }

    /// May a request go now? `Err(wait)` says how long the circuit stays open. When the open time is over,
    /// the first caller gets the trial and the circuit turns half-open.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        match self.state {
            BreakerState::Closed { .. } => Ok(()),
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen;
                Ok(())
            }
            BreakerState::Open { until } => Err(until - now),
            BreakerState::HalfOpen => Err(self.open_for),
        }
    }

    /// A request succeeded (or failed for a reason that is not an outage): the circuit closes.
    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    /// A request failed with an outage. Returns true when this opened the circuit.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { failures } if failures + 1 < self.threshold => {
                self.state = BreakerState::Closed {
                    failures: failures + 1,
                };
                false
            }
            BreakerState::Open { .. } => false,
            _ => {
                self.state = BreakerState::Open {
                    until: now + self.open_for,
                };
                true
            }
        }
    }

    /// A request that was let through ended without telling anything (cancelled): a half-open trial is given
    /// back, so the next request becomes the trial.
    pub fn on_abandoned(&mut self, now: Instant) {
        if self.state == BreakerState::HalfOpen {
            self.state = BreakerState::Open { until: now };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: Duration = Duration::from_secs(30);

    #[test]
    fn opens_after_the_threshold_of_failures_in_a_row() {
        let t = Instant::now();
        let mut b = Breaker::new(3, OPEN);
        assert!(!b.on_failure(t));
        assert!(!b.on_failure(t));
        assert!(b.try_acquire(t).is_ok());
        assert!(b.on_failure(t), "the third failure opens it");
        assert_eq!(
            b.try_acquire(t + Duration::from_secs(10)),
            Err(Duration::from_secs(20))
        );
        assert!(b.is_open(t));
    }

    #[test]
    fn a_success_resets_the_count() {
        let t = Instant::now();
        let mut b = Breaker::new(2, OPEN);
        b.on_failure(t);
        b.on_success();
        assert!(!b.on_failure(t));
        assert!(!b.is_open(t));
    }

    #[test]
    fn half_opens_after_the_open_time_with_one_trial() {
        let t = Instant::now();
        let mut b = Breaker::new(1, OPEN);
        b.on_failure(t);
        let later = t + OPEN;
        assert!(b.try_acquire(later).is_ok(), "the trial");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire(later).is_err(), "only one trial at a time");
    }

    #[test]
    fn the_trial_closes_or_reopens_the_circuit() {
        let t = Instant::now();
        let mut b = Breaker::new(1, OPEN);
        b.on_failure(t);
        b.try_acquire(t + OPEN).unwrap();
        assert!(b.on_failure(t + OPEN), "a failed trial opens it again");
        assert!(b.is_open(t + OPEN + Duration::from_secs(1)));
        b.try_acquire(t + OPEN * 2).unwrap();
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn an_abandoned_trial_is_given_back() {
        let t = Instant::now();
        let mut b = Breaker::new(1, OPEN);
        b.on_failure(t);
        b.try_acquire(t + OPEN).unwrap();
        b.on_abandoned(t + OPEN);
        assert!(b.try_acquire(t + OPEN).is_ok());
    }
}
