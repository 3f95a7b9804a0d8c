//! Capped exponential backoff with jitter, and sleeping that a token can interrupt.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Delays of `base · 2ⁿ`, capped, each drawn uniformly from its upper half so that workers
/// that lost the database together do not come back in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            failures: 0,
        }
    }

    /// The delay before the next try; each call doubles the next one, up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let full = self
            .base
            .saturating_mul(1 << self.failures.min(20))
            .min(self.cap);
        self.failures = self.failures.saturating_add(1);
        let half = full / 2;
        half + half.mul_f64(unit_random())
    }

    /// Back to the base delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// How many failures in a row so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Sleeps for the next delay; `false` if `stop` fired first.
    pub(crate) async fn wait(&mut self, stop: &CancellationToken) -> bool {
        sleep_or_stop(self.next_delay(), stop).await
    }
}

/// Sleeps for `delay`; `false` if `stop` fired first.
pub(crate) async fn sleep_or_stop(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = stop.cancelled() => false,
    }
}

/// A number in [0, 1): jitter needs no strong randomness, and std's hasher keys are random.
fn unit_random() -> f64 {
    let bits = RandomState::new().build_hasher().finish() >> 11;
    // 53 bits: exactly representable.
    #[allow(
        clippy::cast_precision_loss,
        reason = "a 53-bit integer converts to f64 exactly"
    )]
    let value = bits as f64;
    value / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[1] >= Duration::from_millis(100) && delays[1] <= Duration::from_millis(200));
        for delay in &delays[4..] {
            assert!(*delay >= Duration::from_millis(500) && *delay <= Duration::from_secs(1));
        }
        assert_eq!(backoff.failures(), 8);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
