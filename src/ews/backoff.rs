//! Capped exponential back-off with jitter, and a sleep that ends early when
//! the adapter stops. Reconnect loops use it so that a broken server or network
//! never turns into a tight loop, and so that many mailboxes failing together
//! do not retry in lockstep. [`Repeats`] paces a recovery that is normally
//! immediate but must not spin when it keeps failing.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::RetryConfig;

#[derive(Debug, Clone)]
pub struct Backoff {
    config: RetryConfig,
    attempt: u32,
}

impl Backoff {
    pub fn new(config: RetryConfig) -> Self {
        Self { config, attempt: 0 }
    }

    /// The next wait: initial × 2^attempt, capped, then between half and all
    /// of it at random.
    pub fn next_wait(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let base = self
            .config
            .initial
            .saturating_mul(factor)
            .min(self.config.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }

    /// Failures since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A failure after which the adapter normally recovers at once (resubscribe,
/// reopen), repeating long after the last recovery counts as a first one.
const REPEAT_WINDOW: Duration = Duration::from_secs(10 * 60);

/// Paces a recovery that is immediate the first time, but backs off (capped,
/// with jitter) while the failure keeps coming back with no progress (an
/// event) in between, so that a server that keeps failing the same way never
/// turns the recovery into a tight loop.
#[derive(Debug, Clone)]
pub struct Repeats {
    backoff: Backoff,
    /// When the last recovery started; None after progress.
    recovered_at: Option<Instant>,
}

impl Repeats {
    pub fn new(config: RetryConfig) -> Self {
        Self {
            backoff: Backoff::new(config),
            recovered_at: None,
        }
    }

    /// The failure happened (again): how long to wait before recovering.
    pub fn occurred(&mut self) -> Duration {
        let now = Instant::now();
        let wait = match self.recovered_at {
            Some(at) if now.saturating_duration_since(at) < REPEAT_WINDOW => {
                self.backoff.next_wait()
            }
            _ => {
                self.backoff.reset();
                Duration::ZERO
            }
        };
        self.recovered_at = Some(now + wait);
        wait
    }

    /// Progress: the next failure is a first one again.
    pub fn progress(&mut self) {
        self.recovered_at = None;
        self.backoff.reset();
    }
}

/// Sleeps for `wait`; false if the adapter is stopping.
pub async fn sleep(wait: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = cancel.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let mut backoff = Backoff::new(RetryConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        });
        let waits: Vec<_> = (0..8).map(|_| backoff.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits[3] >= Duration::from_millis(400));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(1)));
        assert!(waits[7] >= Duration::from_millis(500));
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn repeats_back_off_until_progress_or_a_long_quiet() {
        let mut repeats = Repeats::new(RetryConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        });
        assert_eq!(repeats.occurred(), Duration::ZERO);
        let second = repeats.occurred();
        assert!(second >= Duration::from_millis(50) && second <= Duration::from_millis(100));
        assert!(repeats.occurred() >= Duration::from_millis(100));
        repeats.progress();
        assert_eq!(repeats.occurred(), Duration::ZERO);
        assert!(repeats.occurred() > Duration::ZERO);
        tokio::time::advance(REPEAT_WINDOW + Duration::from_secs(1)).await;
        assert_eq!(repeats.occurred(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_ends_on_cancel() {
        let cancel = CancellationToken::new();
        assert!(sleep(Duration::from_secs(5), &cancel).await);
        cancel.cancel();
        assert!(!sleep(Duration::from_secs(5), &cancel).await);
    }
}
