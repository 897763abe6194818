//! Rate limits: token buckets per caller and kind of request (DESIGN, "Rate limits").
//!
//! Each bucket holds up to `burst` tokens and refills continuously at `per_minute`; a request
//! takes one token or is refused with the time until one is back. The buckets live in this
//! process ([`local`]) unless `[redis] url` is set, where they live in Redis ([`shared`]) so
//! that every instance draws from the same ones. When Redis does not answer, the process's own
//! buckets take over: a Redis outage never fails a request.

pub mod bucket;
pub mod local;
pub mod shared;

use std::time::Duration;

use crate::config::RateLimitSettings;
use crate::observability::names;
use bucket::{Decision, Rate};

/// The kind of request a bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Upload,
    Request,
    Login,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Upload => "upload",
            Class::Request => "request",
            Class::Login => "login",
        }
    }
}

pub struct RateLimiter {
    enabled: bool,
    upload: Rate,
    request: Rate,
    login: Rate,
    local: local::LocalBuckets,
    shared: Option<shared::RedisBuckets>,
}

impl RateLimiter {
    pub fn new(settings: &RateLimitSettings, redis_url: Option<&str>) -> Result<Self, shared::RedisConfigError> {
        let rate = |per_minute: u32, burst: u32| Rate { per_second: f64::from(per_minute) / 60.0, burst };
        Ok(Self {
            enabled: settings.enabled,
            upload: rate(settings.upload_per_minute, settings.upload_burst),
            request: rate(settings.request_per_minute, settings.request_burst),
            login: rate(settings.login_per_minute, settings.login_burst),
            local: local::LocalBuckets::default(),
            shared: redis_url.map(shared::RedisBuckets::new).transpose()?,
        })
    }

    /// Takes a token from `subject`'s bucket of this class; `None` when limits are off.
    pub async fn check(&self, class: Class, subject: &str) -> Option<Decision> {
        if !self.enabled {
            return None;
        }
        let rate = match class {
            Class::Upload => self.upload,
            Class::Request => self.request,
            Class::Login => self.login,
        };
        let key = format!("{}:{subject}", class.as_str());
        if let Some(shared) = &self.shared {
            match shared.take(&key, rate).await {
                Some(decision) => return Some(decision),
                None => metrics::counter!(names::RATE_LIMIT_FALLBACKS).increment(1),
            }
        }
        Some(self.local.take(&key, rate))
    }

    /// Whether the shared buckets answered the last time they were asked (for `/health`).
    pub fn shared_state(&self) -> Option<bool> {
        self.shared.as_ref().map(shared::RedisBuckets::is_up)
    }
}

/// Seconds, rounded up: a client told to wait 0 s would retry at once.
pub fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}
