//! A circuit breaker per shard: closed, open, half-open.
//!
//! A shard that fails `failure_threshold` calls in a row (failures that mean it is down:
//! unreachable, refusing us, or not answering within the call's deadline — a shard that keeps
//! answering late is as good as down) opens its circuit. While open, calls fail at once
//! without touching the network, so a dead shard costs nothing per request. After `cooldown`
//! one call is let through as a trial (half-open): success closes the circuit, failure opens it
//! for another cooldown. So a dead shard costs at most one timeout per cooldown.
//!
//! A read abandoned because it was slower than usual and another holder answered first (a lost
//! hedge) is not a failure on its own — a healthy shard loses a few at its p95 — but
//! [`LOST_HEDGES_TO_OPEN`] of them in a row, with no call succeeding in between, open the
//! circuit: a shard whose reads are always overtaken is as good as down.
//!
//! Answers that prove the shard is up — "not found", an unexpected error status — count as
//! successes: the circuit tracks reachability, not the outcome of each operation.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{StorageError, StorageResult, deadline};

/// Lost hedges in a row, with no success in between, that open the circuit. A healthy shard
/// loses about one read in twenty at its p95, so ten in a row (about 1e-13) means it is stuck.
pub const LOST_HEDGES_TO_OPEN: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// How long an open circuit rejects calls before letting one trial through.
    pub cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self { failure_threshold: 3, cooldown: Duration::from_secs(10) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    Open,
    /// The cooldown has passed: the next call is a trial.
    HalfOpen,
}

/// A snapshot for health and admin output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitStatus {
    pub state: CircuitState,
    pub consecutive_failures: u32,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    consecutive_failures: u32,
    /// When the circuit opened; `None` while closed.
    opened_at: Option<Instant>,
    /// A half-open trial is running: other calls are still rejected.
    trial_running: bool,
    /// Reads overtaken by another holder's answer since the last success.
    lost_hedges: u32,
}

/// Permission to make one call. Dropping it unreported (a cancelled call) ends a trial
/// without judging the shard.
struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    trial: bool,
    reported: bool,
}

impl CircuitBreaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self { settings, inner: Mutex::new(Inner::default()) }
    }

    /// Runs `call` unless the circuit is open, and records how it went.
    pub async fn call<T>(&self, call: impl Future<Output = StorageResult<T>>) -> StorageResult<T> {
        let mut permit = self.admit()?;
        let result = call.await;
        permit.report(result.as_ref().err().is_none_or(|error| !error.is_unavailable()));
        result
    }

    /// Runs `call` unless the circuit is open, bounded by `deadline`: a call that runs out of
    /// time is cancelled, fails with [`StorageError::DeadlineExceeded`] and counts as a failure.
    pub async fn call_within<T>(
        &self,
        operation: &'static str,
        deadline: Duration,
        call: impl Future<Output = StorageResult<T>>,
    ) -> StorageResult<T> {
        self.call(deadline::within(operation, deadline, call)).await
    }

    pub fn status(&self) -> CircuitStatus {
        let inner = self.inner.lock().expect("breaker lock");
        let state = match inner.opened_at {
            None => CircuitState::Closed,
            Some(opened) if opened.elapsed() >= self.settings.cooldown => CircuitState::HalfOpen,
            Some(_) => CircuitState::Open,
        };
        CircuitStatus { state, consecutive_failures: inner.consecutive_failures }
    }

    fn admit(&self) -> StorageResult<Permit<'_>> {
        let mut inner = self.inner.lock().expect("breaker lock");
        let Some(opened) = inner.opened_at else {
            return Ok(Permit { breaker: self, trial: false, reported: false });
        };
        let waited = opened.elapsed();
        if waited >= self.settings.cooldown && !inner.trial_running {
            inner.trial_running = true;
            return Ok(Permit { breaker: self, trial: true, reported: false });
        }
        let retry_in = self.settings.cooldown.saturating_sub(waited);
        Err(StorageError::Unavailable {
            reason: format!(
                "circuit open after {} consecutive failures; next trial in {} ms",
                inner.consecutive_failures,
                retry_in.as_millis()
            ),
            source: None,
        })
    }

    /// A read of this shard was cancelled after its hedge delay because another holder answered
    /// first. Opens the circuit after [`LOST_HEDGES_TO_OPEN`] in a row; a lost trial reopens it.
    pub fn record_lost_hedge(&self) {
        let mut inner = self.inner.lock().expect("breaker lock");
        inner.lost_hedges = inner.lost_hedges.saturating_add(1);
        let trial_lost = inner.opened_at.is_some_and(|opened| opened.elapsed() >= self.settings.cooldown);
        if trial_lost || (inner.opened_at.is_none() && inner.lost_hedges >= LOST_HEDGES_TO_OPEN) {
            if inner.opened_at.is_none() {
                tracing::warn!(
                    lost_hedges = inner.lost_hedges,
                    "circuit opened: the shard's reads are always overtaken"
                );
            }
            inner.opened_at = Some(Instant::now());
        }
    }

    fn record(&self, trial: bool, success: bool) {
        let mut inner = self.inner.lock().expect("breaker lock");
        if trial {
            inner.trial_running = false;
        }
        if success {
            if inner.opened_at.is_some() {
                tracing::info!("circuit closed: the shard answers again");
            }
            *inner = Inner::default();
            return;
        }
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        let reopen =
            trial || (inner.opened_at.is_none() && inner.consecutive_failures >= self.settings.failure_threshold);
        if reopen {
            if inner.opened_at.is_none() {
                tracing::warn!(
                    failures = inner.consecutive_failures,
                    "circuit opened: the shard is skipped for a cooldown"
                );
            }
            inner.opened_at = Some(Instant::now());
        }
    }
}

impl Permit<'_> {
    fn report(&mut self, success: bool) {
        self.reported = true;
        self.breaker.record(self.trial, success);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported && self.trial {
            self.breaker.inner.lock().expect("breaker lock").trial_running = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::BlobKey;

    fn down() -> StorageResult<()> {
        Err(StorageError::Unavailable { reason: "refused".into(), source: None })
    }

    fn breaker(cooldown_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(BreakerSettings { failure_threshold: 2, cooldown: Duration::from_millis(cooldown_ms) })
    }

    #[tokio::test]
    async fn opens_after_the_threshold_and_rejects_without_calling() {
        let breaker = breaker(60_000);
        assert!(breaker.call(async { down() }).await.is_err());
        assert_eq!(breaker.status().state, CircuitState::Closed);
        assert!(breaker.call(async { down() }).await.is_err());
        assert_eq!(breaker.status().state, CircuitState::Open);
        let mut called = false;
        let rejected = breaker
            .call(async {
                called = true;
                Ok(())
            })
            .await;
        assert!(rejected.unwrap_err().to_string().contains("circuit open"));
        assert!(!called, "an open circuit makes no call");
    }

    #[tokio::test]
    async fn a_successful_trial_closes_and_a_failed_one_reopens() {
        let breaker = breaker(20);
        for _ in 0..2 {
            let _ = breaker.call(async { down() }).await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(breaker.status().state, CircuitState::HalfOpen);
        assert!(breaker.call(async { down() }).await.is_err());
        assert_eq!(breaker.status().state, CircuitState::Open, "a failed trial reopens at once");
        tokio::time::sleep(Duration::from_millis(30)).await;
        breaker.call(async { Ok(()) }).await.unwrap();
        assert_eq!(breaker.status(), CircuitStatus { state: CircuitState::Closed, consecutive_failures: 0 });
    }

    #[tokio::test]
    async fn calls_past_their_deadline_are_failures_and_open_the_circuit() {
        let breaker = breaker(60_000);
        let late = || async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            Ok(())
        };
        let started = Instant::now();
        let error = breaker.call_within("write", Duration::from_millis(20), late()).await.unwrap_err();
        assert!(error.is_deadline_exceeded(), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5), "the call was cut at its deadline");
        assert_eq!(breaker.status(), CircuitStatus { state: CircuitState::Closed, consecutive_failures: 1 });
        let _ = breaker.call_within("write", Duration::from_millis(20), late()).await;
        assert_eq!(breaker.status().state, CircuitState::Open, "a shard that keeps answering late opens");
        // While open, a call fails at once instead of waiting out another deadline.
        let started = Instant::now();
        let rejected = breaker.call_within("write", Duration::from_secs(10), late()).await.unwrap_err();
        assert!(rejected.to_string().contains("circuit open"), "{rejected}");
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_late_trial_reopens_and_a_prompt_answer_resets_the_count() {
        let breaker = breaker(20);
        let _ =
            breaker.call_within("head", Duration::from_millis(10), std::future::pending::<StorageResult<()>>()).await;
        breaker.call_within("head", Duration::from_millis(10), async { Ok(()) }).await.unwrap();
        assert_eq!(breaker.status().consecutive_failures, 0, "an answer in time resets the count");
        for _ in 0..2 {
            let _ = breaker
                .call_within("head", Duration::from_millis(10), std::future::pending::<StorageResult<()>>())
                .await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(breaker.status().state, CircuitState::HalfOpen);
        let _ =
            breaker.call_within("head", Duration::from_millis(10), std::future::pending::<StorageResult<()>>()).await;
        assert_eq!(breaker.status().state, CircuitState::Open, "a trial that runs out of time reopens");
    }

    #[tokio::test]
    async fn a_shard_that_keeps_losing_hedges_opens_and_a_success_resets_the_count() {
        let breaker = breaker(60_000);
        for _ in 0..LOST_HEDGES_TO_OPEN - 1 {
            breaker.record_lost_hedge();
        }
        breaker.call(async { Ok(()) }).await.unwrap();
        for _ in 0..LOST_HEDGES_TO_OPEN - 1 {
            breaker.record_lost_hedge();
        }
        assert_eq!(breaker.status().state, CircuitState::Closed, "a success in between resets the count");
        breaker.record_lost_hedge();
        assert_eq!(breaker.status().state, CircuitState::Open);
    }

    #[tokio::test]
    async fn a_cancelled_call_judges_nothing() {
        // A hedged read whose other holder answered first is dropped, not failed.
        let breaker = breaker(60_000);
        for _ in 0..5 {
            let call = breaker.call(std::future::pending::<StorageResult<()>>());
            let _ = tokio::time::timeout(Duration::from_millis(5), call).await;
        }
        assert_eq!(breaker.status(), CircuitStatus { state: CircuitState::Closed, consecutive_failures: 0 });
    }

    #[tokio::test]
    async fn not_found_proves_the_shard_is_up() {
        let breaker = breaker(60_000);
        for _ in 0..5 {
            let _ = breaker.call(async { Err::<(), _>(StorageError::NotFound(BlobKey::from_digest(&[0; 32]))) }).await;
        }
        assert_eq!(breaker.status().state, CircuitState::Closed);
    }
}
