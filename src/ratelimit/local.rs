//! Buckets in this process: a map from bucket key to state, pruned as it grows.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::bucket::{Bucket, Decision, Rate};

/// Buckets kept before idle ones (full again, so forgetting them changes nothing) are pruned.
const PRUNE_AT: usize = 50_000;

pub struct LocalBuckets {
    origin: Instant,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Default for LocalBuckets {
    fn default() -> Self {
        Self { origin: Instant::now(), buckets: Mutex::default() }
    }
}

impl LocalBuckets {
    pub fn take(&self, key: &str, rate: Rate) -> Decision {
        let now = self.origin.elapsed().as_secs_f64();
        let mut buckets = self.buckets.lock().expect("the rate limiter's lock is never poisoned");
        if buckets.len() >= PRUNE_AT {
            let refill = f64::from(rate.burst) / rate.per_second;
            buckets.retain(|_, bucket| now - bucket.at < refill);
        }
        buckets.entry(key.to_owned()).or_insert_with(|| Bucket::full(rate, now)).take(rate, now)
    }
}
