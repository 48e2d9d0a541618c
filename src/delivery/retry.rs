//! When to try a failed delivery again, and when to give up: exponential
//! backoff with jitter, bounded by a number of attempts and an age, in the
//! spirit of Azure Event Grid (about 30 attempts over 24 hours).

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after which a delivery is dead-lettered.
    pub max_attempts: u32,
    /// Age after which a delivery is dead-lettered, whatever its attempts.
    pub max_age: Duration,
    /// Delay before the second attempt; it doubles with each attempt...
    pub base_delay: Duration,
    /// ...up to this.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 30,
            max_age: Duration::from_secs(24 * 60 * 60),
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60 * 60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again at this time (Unix microseconds).
    RetryAt(i64),
    /// Give up; the delivery goes to the dead letters.
    DeadLetter,
}

impl RetryPolicy {
    /// What to do after attempt number `attempts` failed, for a delivery queued
    /// at `created_at`, at time `now` (both Unix microseconds).
    pub fn after_failure(&self, attempts: u32, created_at: i64, now: i64) -> Decision {
        let age = Duration::from_micros(now.saturating_sub(created_at).max(0).unsigned_abs());
        if attempts >= self.max_attempts || age >= self.max_age {
            return Decision::DeadLetter;
        }
        let delay = self.delay(attempts);
        // Equal jitter: half the delay fixed, half random, so that retries of
        // many deliveries that failed together spread out.
        let half = delay / 2;
        let jitter = rand::rng().random_range(0..=half.as_micros().max(1)) as u64;
        let wait = half + Duration::from_micros(jitter);
        let at = crate::store::after(now, wait);
        Decision::RetryAt(at)
    }

    /// The un-jittered delay after attempt number `attempts` (1-based).
    pub fn delay(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(40);
        self.base_delay
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000;

    #[test]
    fn delays_double_up_to_the_cap_and_stay_within_jitter_bounds() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay(1), Duration::from_secs(1));
        assert_eq!(policy.delay(2), Duration::from_secs(2));
        assert_eq!(policy.delay(5), Duration::from_secs(16));
        assert_eq!(policy.delay(20), Duration::from_secs(3600));
        for attempts in 1..10 {
            let Decision::RetryAt(at) = policy.after_failure(attempts, 0, 0) else {
                panic!("retried");
            };
            let delay = policy.delay(attempts).as_micros() as i64;
            assert!(at >= delay / 2 && at <= delay, "attempt {attempts}: {at}");
        }
    }

    #[test]
    fn the_default_schedule_spans_about_a_day_in_thirty_attempts() {
        let policy = RetryPolicy::default();
        let total: Duration = (1..30).map(|a| policy.delay(a)).sum();
        assert!(
            total > Duration::from_secs(12 * 3600) && total < Duration::from_secs(36 * 3600),
            "{total:?}"
        );
        assert_eq!(policy.after_failure(30, 0, SECOND), Decision::DeadLetter);
    }

    #[test]
    fn old_deliveries_are_dead_lettered_whatever_their_attempts() {
        let policy = RetryPolicy::default();
        let day = 24 * 3600 * SECOND;
        assert_eq!(policy.after_failure(1, 0, day), Decision::DeadLetter);
        assert!(matches!(
            policy.after_failure(1, 0, day - SECOND),
            Decision::RetryAt(_)
        ));
    }
}
