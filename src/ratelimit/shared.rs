//! Buckets in Redis, shared by every instance: one Lua script per check, so the refill and the
//! take are one atomic step whatever the number of instances. Redis's own clock is used, so
//! instances with skewed clocks still agree.
//!
//! When Redis does not answer within [`CALL_TIMEOUT`](crate::redis_link::CALL_TIMEOUT), the
//! check returns `None` (the caller falls back to its own buckets) and Redis is left alone for
//! [`RETRY_AFTER`](crate::redis_link::RETRY_AFTER), so an outage
//! costs one slow request per period rather than every request.

use super::bucket::{Decision, Rate, decision};
use crate::redact::redact_url;
use crate::redis_link::RedisLink;

/// Keys are namespaced, so a Redis shared with other programs is safe to use.
const KEY_PREFIX: &str = "chitram:ratelimit:";

/// The bucket rule of `bucket.rs`, in Lua. Returns `{allowed, tokens}` (tokens as a string:
/// Redis turns Lua numbers into integers). The key expires once the bucket would be full.
const TAKE: &str = r"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, tostring(tokens)}
";

#[derive(Debug, thiserror::Error)]
#[error("redis.url {url} is not a Redis URL: {reason}")]
pub struct RedisConfigError {
    url: String,
    reason: String,
}

pub struct RedisBuckets {
    link: RedisLink,
    script: redis::Script,
}

impl RedisBuckets {
    pub fn new(url: &str) -> Result<Self, RedisConfigError> {
        let client =
            redis::Client::open(url).map_err(|e| RedisConfigError { url: redact_url(url), reason: e.to_string() })?;
        let link = RedisLink::new(
            client,
            "rate limits are shared through Redis",
            "Redis is unavailable: rate limits fall back to this instance's own until it answers",
        );
        Ok(Self { link, script: redis::Script::new(TAKE) })
    }

    /// Takes a token in Redis; `None` when Redis does not answer (the caller uses its own).
    pub async fn take(&self, key: &str, rate: Rate) -> Option<Decision> {
        let mut connection = self.link.connection().await?;
        let mut invocation = self.script.prepare_invoke();
        invocation.key(format!("{KEY_PREFIX}{key}")).arg(rate.per_second).arg(rate.burst);
        let (allowed, tokens) = self.link.call(invocation.invoke_async::<(i64, String)>(&mut connection)).await.ok()?;
        let tokens: f64 = tokens.parse().unwrap_or(0.0);
        Some(decision(rate, tokens, allowed == 1))
    }

    pub fn is_up(&self) -> bool {
        self.link.is_up()
    }
}
