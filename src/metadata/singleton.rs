//! Singleton locks: background jobs that must run in one instance at a time (the scrub, and
//! any other sweep over the whole store) run while their instance holds the job's lock.
//!
//! On Postgres the lock is a session advisory lock on a connection of its own: it lives as
//! long as that session, so an instance that dies (SIGKILL, a lost host) loses it as soon as
//! Postgres sees the session end, and another instance takes it on its next try. On SQLite
//! there is one instance per database file (`serve` holds an exclusive lock on the file, see
//! `app.rs`), so the lock is always granted.

use async_trait::async_trait;

use super::MetaResult;

#[async_trait]
pub trait SingletonLocks: Send + Sync {
    /// Takes the lock named `job` for this instance, or `None` when another instance holds it.
    async fn try_lock_singleton(&self, job: &str) -> MetaResult<Option<Box<dyn SingletonLock>>>;
}

/// A held singleton lock; dropping it releases it (on Postgres, by closing its session).
#[async_trait]
pub trait SingletonLock: Send {
    /// Whether the lock is still held: its session still answers. False means another
    /// instance may hold it now, so the job must stop.
    async fn still_held(&mut self) -> bool;

    /// Releases the lock at once, for the next instance.
    async fn release(self: Box<Self>);
}
