//! Which pooled connections may have died with the database.
//!
//! The Postgres pool hands out a connection released within the last second without pinging
//! it first (`dialect.rs`, `POSTGRES_TRUST_RECENT`): a round trip saved on most queries. The
//! price is that a database that went away fails the first query on each such connection. When
//! the database comes back, the connections that were idle while it was away are still in the
//! pool, dead, and would each fail one more request although the database answers again. So
//! every lost connection is noted here, and a connection that has been idle since before the
//! latest loss is pinged before it is handed out, however recently it was released.
//!
//! One record per process, not per pool: a loss on one pool makes the others ping a little
//! more for a moment, which costs a round trip and is never wrong.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When the latest connection was lost, in microseconds after `epoch()`; 0 for never.
static LAST_LOSS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn micros_since_epoch(at: Instant) -> u64 {
    // At least 1, so that a loss in the epoch's first microsecond is not read as "never".
    u64::try_from(at.saturating_duration_since(epoch()).as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Notes that a query lost its connection (or found it dead).
pub fn connection_lost() {
    LAST_LOSS.fetch_max(micros_since_epoch(Instant::now()), Ordering::Relaxed);
}

/// Whether a connection idle for `idle_for` was already idle when the latest connection was
/// lost, and so may be dead too.
pub fn idle_across_a_loss(idle_for: Duration) -> bool {
    let last_loss = LAST_LOSS.load(Ordering::Relaxed);
    if last_loss == 0 {
        return false;
    }
    let released = Instant::now().checked_sub(idle_for).map_or(0, micros_since_epoch);
    released <= last_loss
}

/// Whether `error` means the connection it ran on is gone (not merely that the pool was busy,
/// or that the database refused this one statement).
pub fn is_lost_connection(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => true,
        // Class 08 is "connection exception"; 57P0x are the server shutting down.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the record is process-wide, and tests of one binary run side by side.
    #[test]
    fn connections_idle_since_before_a_loss_are_suspect_and_later_ones_are_not() {
        epoch();
        std::thread::sleep(Duration::from_millis(20));
        let before_the_loss = Duration::from_millis(10);
        connection_lost();
        assert!(idle_across_a_loss(before_the_loss), "released before the loss");
        assert!(idle_across_a_loss(Duration::from_secs(3600)), "idle for longer than the process has run");
        std::thread::sleep(Duration::from_millis(20));
        assert!(!idle_across_a_loss(Duration::from_millis(5)), "released after the loss: used since, so alive");
    }
}
