//! When a failed task is tried again.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Retry delays: `min` doubling per failed attempt up to `max`, each with random jitter so the
/// tasks of a shard that comes back do not all retry in the same instant.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub min: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// The delay after the `attempts`-th failure (1 for the first).
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_jitter()
            .without_max_times()
            .build();
        // The 32nd doubling is far past any sensible maximum: stop counting there.
        delays.nth(attempts.clamp(1, 32) as usize - 1).unwrap_or(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_within_twice_the_cap() {
        let policy = RetryPolicy { min: Duration::from_millis(100), max: Duration::from_secs(10) };
        let first = policy.delay_after(1);
        assert!(first >= Duration::from_millis(100) && first < Duration::from_millis(200), "{first:?}");
        let fourth = policy.delay_after(4);
        assert!(fourth >= Duration::from_millis(800), "{fourth:?}");
        // backon's jitter adds up to one more delay on top of the capped one.
        assert!(policy.delay_after(1000) <= Duration::from_secs(20));
    }
}
