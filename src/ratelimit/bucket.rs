//! The token bucket itself, as arithmetic: the same rule runs in process and, as a Lua
//! script, in Redis (`shared.rs`), so the answers and headers agree wherever the bucket lives.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

/// What a bucket said about one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    /// Whole tokens left after this request.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// Until one token is back (zero when allowed).
    pub retry_after: Duration,
}

/// A bucket's state: tokens held (fractional) when last seen, in seconds since some origin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub tokens: f64,
    pub at: f64,
}

impl Bucket {
    pub fn full(rate: Rate, now: f64) -> Self {
        Self { tokens: f64::from(rate.burst), at: now }
    }

    /// Refills for the time since it was last seen, then takes a token if there is one.
    pub fn take(&mut self, rate: Rate, now: f64) -> Decision {
        let elapsed = (now - self.at).max(0.0);
        self.tokens = (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        self.at = now;
        let allowed = self.tokens >= 1.0;
        if allowed {
            self.tokens -= 1.0;
        }
        decision(rate, self.tokens, allowed)
    }
}

pub fn decision(rate: Rate, tokens: f64, allowed: bool) -> Decision {
    let seconds = |tokens_missing: f64| Duration::from_secs_f64((tokens_missing / rate.per_second).max(0.0));
    Decision {
        allowed,
        limit: rate.burst,
        remaining: tokens.floor().max(0.0) as u32,
        reset: seconds(f64::from(rate.burst) - tokens),
        retry_after: if allowed { Duration::ZERO } else { seconds(1.0 - tokens) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate { per_second: 1.0, burst: 3 };

    #[test]
    fn a_burst_then_one_per_interval() {
        let mut bucket = Bucket::full(RATE, 0.0);
        let taken: Vec<bool> = (0..4).map(|_| bucket.take(RATE, 0.0).allowed).collect();
        assert_eq!(taken, [true, true, true, false]);
        let refused = bucket.take(RATE, 0.5);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        assert_eq!(refused.remaining, 0);
        assert!(bucket.take(RATE, 1.0).allowed, "a token is back after a second");
        assert!(!bucket.take(RATE, 1.0).allowed);
    }

    #[test]
    fn it_never_holds_more_than_the_burst() {
        let mut bucket = Bucket::full(RATE, 0.0);
        let decision = bucket.take(RATE, 1_000.0);
        assert_eq!(decision.remaining, 2);
        assert_eq!(decision.reset, Duration::from_secs(1));
    }
}
