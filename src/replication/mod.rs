//! Durable asynchronous replication (DESIGN invariant 3).
//!
//! An upload is acknowledged once its primary copy (or `write_quorum` copies) is stored; the
//! rest of its write set is recorded `Pending`, with a task per copy committed in the same
//! transaction as the image row. Workers — in this instance and in any other sharing the same
//! Postgres — claim tasks one at a time, copy the blob from a stored holder to the target,
//! verify it, and record the copy `Stored`. Deletions of copies, and repairs of copies found
//! missing or corrupt on read, go through the same queue. A failed task is retried with
//! exponential backoff and jitter, its attempts and last error recorded; it is never dropped.

pub mod backoff;
pub mod copy;
pub mod worker;
