//! Exponential backoff with jitter, shared by the MQTT reconnect loop, cloud retries and connectivity probes.

use std::time::Duration;

/// The wait before attempt `attempt` (0-based): doubling from `min`, capped at `max`, then scaled by `jitter`
/// in [0, 1] to between half and all of it, so that a fleet does not retry in lockstep.
pub fn backoff(attempt: u32, min: Duration, max: Duration, jitter: f64) -> Duration {
    let base = min.saturating_mul(1u32 << attempt.min(20)).min(max);
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let (min, max) = (Duration::from_millis(250), Duration::from_secs(30));
        assert_eq!(backoff(0, min, max, 1.0), Duration::from_millis(250));
        assert_eq!(backoff(3, min, max, 1.0), Duration::from_millis(2000));
        assert_eq!(backoff(30, min, max, 1.0), max);
        assert_eq!(backoff(3, min, max, 0.0), Duration::from_millis(1000));
        assert!(backoff(3, min, max, 0.5) < Duration::from_millis(2000));
    }
}
