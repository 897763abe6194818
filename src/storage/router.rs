//! The storage router: where a blob is written, and which copy a read uses.
//!
//! Vocabulary (after Garage):
//! - *preference list*: every weighted shard, in the ring's order for the blob's key;
//! - *write set*: the first `replication_factor` shards of the preference list, where the
//!   blob's copies belong;
//! - *read order*: the shards recorded as holding a copy, sorted by their position in the
//!   preference list (holders outside it, such as draining shards, come last).
//!
//! Every call to a shard goes through its circuit breaker (but a cut-through upload's fed write,
//! see [`StorageRouter::write_feed_on`]), so a dead shard is skipped at once
//! instead of costing a timeout per request, and calls made on the request path or under a
//! lock have a deadline ([`super::deadline`]), so a shard that answers late is skipped like a
//! dead one. Every body read has an idle timeout, and reads hedge ([`super::hedge`]). The router never consults metadata: callers pass
//! the recorded holders in and record what the router reports back (DESIGN, "storage/ knows
//! nothing of metadata").

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::task::TaskTracker;

use super::breaker::{BreakerSettings, CircuitBreaker, CircuitState, CircuitStatus};
use super::deadline::{self, Deadlines};
use super::hedge::{HedgeSettings, HedgedReads, LatencyWindow};
use super::{BlobBody, BlobReader, BlobStore, BodyFeed, StorageError, StorageResult, StoredObject};
use crate::blob::BlobKey;
use crate::placement::ring::{Ring, key_hash};

/// A shard: its stable name, the backend that holds its objects, and its circuit breaker.
#[derive(Debug, Clone)]
pub struct Shard {
    pub name: String,
    pub store: Arc<dyn BlobStore>,
    breaker: Arc<CircuitBreaker>,
    /// How long its recent reads took to answer: when to hedge a read of it.
    latency: Arc<LatencyWindow>,
}

impl Shard {
    pub fn new(name: String, store: Arc<dyn BlobStore>, breaker: BreakerSettings) -> Self {
        Self {
            name,
            store,
            breaker: Arc::new(CircuitBreaker::new(breaker)),
            latency: Arc::new(LatencyWindow::default()),
        }
    }

    pub fn circuit(&self) -> CircuitStatus {
        self.breaker.status()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Every shard that was tried failed. Each attempt is listed with its cause.
    #[error("no shard could {operation} blob {key}: {}", describe_attempts(.attempts))]
    NoShardAvailable { operation: &'static str, key: BlobKey, attempts: Vec<(String, StorageError)> },
    /// Fewer shards than asked took the write; `written` names those that did, whose copies
    /// nothing records (the caller removes them).
    #[error("only {} of {wanted} shards could store blob {key}: {}", .written.len(), describe_attempts(.attempts))]
    QuorumNotReached { key: BlobKey, wanted: usize, written: Vec<String>, attempts: Vec<(String, StorageError)> },
    /// The metadata names a shard the config does not have.
    #[error("shard {0:?} is recorded in the metadata but missing from the config")]
    UnknownShard(String),
    #[error("shard {shard} failed")]
    Shard {
        shard: String,
        #[source]
        source: StorageError,
    },
}

impl RouterError {
    /// True when the shard answered that it lacks the blob.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RouterError::Shard { source, .. } if source.is_not_found())
    }

    /// The shard did not answer within its deadline: the call's outcome is unknown.
    pub fn is_deadline_exceeded(&self) -> bool {
        matches!(self, RouterError::Shard { source, .. } if source.is_deadline_exceeded())
    }

    /// A failed write of the copies a quorum of `wanted` still lacked, with the copies
    /// `earlier` written first counted in (so that the caller removes them too).
    pub fn with_earlier_copies(self, earlier: &[String], wanted: usize) -> Self {
        match self {
            RouterError::NoShardAvailable { key, attempts, .. } if !earlier.is_empty() => {
                RouterError::QuorumNotReached { key, wanted, written: earlier.to_vec(), attempts }
            }
            RouterError::QuorumNotReached { key, written, attempts, .. } => {
                let written = earlier.iter().chain(&written).cloned().collect();
                RouterError::QuorumNotReached { key, wanted, written, attempts }
            }
            other => other,
        }
    }
}

fn describe_attempts(attempts: &[(String, StorageError)]) -> String {
    if attempts.is_empty() {
        return "no shard holds a copy".to_owned();
    }
    let parts: Vec<String> = attempts.iter().map(|(shard, error)| format!("{shard}: {error}")).collect();
    parts.join("; ")
}

/// Where a write landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReceipt {
    /// The shards that stored the bytes, in preference order.
    pub stored: Vec<String>,
    /// The write set: the shards the blob's copies belong on (it may not include every shard
    /// in `stored` when part of the write set was down).
    pub write_set: Vec<String>,
}

/// How one shard answered a health check.
#[derive(Debug)]
pub struct ShardHealth {
    pub name: String,
    pub backend: String,
    pub latency: Duration,
    pub circuit: CircuitStatus,
    pub result: Result<(), StorageError>,
}

#[derive(Debug)]
pub struct StorageRouter {
    ring: Ring,
    /// Indexed like `ring.members()`.
    shards: Vec<Shard>,
    replication_factor: usize,
    deadlines: Deadlines,
    hedge: HedgeSettings,
    /// Work on the shards that runs to its end even when its caller goes away: a deletion,
    /// whose DELETE must end answered or fenced (`maintenance/deletion.rs`). `serve` waits for
    /// it before the process exits ([`StorageRouter::wait_for_detached`]).
    detached: TaskTracker,
}

impl StorageRouter {
    /// `shards` must be in the same order as the ring's members.
    pub fn new(ring: Ring, shards: Vec<Shard>, replication_factor: usize) -> Self {
        assert_eq!(ring.members().len(), shards.len(), "one backend per ring member");
        for (member, shard) in ring.members().iter().zip(&shards) {
            assert_eq!(member.name, shard.name, "backends in ring order");
        }
        Self {
            ring,
            shards,
            replication_factor,
            deadlines: Deadlines::default(),
            hedge: HedgeSettings::default(),
            detached: TaskTracker::new(),
        }
    }

    /// Runs `work` in a task of its own that the caller's cancellation cannot cut short, and
    /// that [`StorageRouter::wait_for_detached`] waits for.
    pub fn spawn_detached<F>(&self, work: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.detached.spawn(work)
    }

    /// Waits, for at most `limit`, until the detached work still running has ended: the
    /// process must not exit under a DELETE that is neither answered nor fenced yet.
    pub async fn wait_for_detached(&self, limit: Duration) {
        self.detached.close();
        if tokio::time::timeout(limit, self.detached.wait()).await.is_err() {
            tracing::warn!(running = self.detached.len(), "detached deletions still running at exit");
        }
    }

    /// Sets how long calls may wait on a shard, and when reads hedge.
    pub fn with_latency_limits(mut self, deadlines: Deadlines, hedge: HedgeSettings) -> Self {
        self.deadlines = deadlines;
        self.hedge = hedge;
        self
    }

    pub fn deadlines(&self) -> &Deadlines {
        &self.deadlines
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    pub fn replication_factor(&self) -> usize {
        self.replication_factor
    }

    /// The blob's preference list, as shard indices.
    fn preference_list(&self, key: &BlobKey) -> impl Iterator<Item = usize> + '_ {
        self.ring.preference_list(key_hash(key.as_str().as_bytes()))
    }

    /// The shards the blob's copies belong on.
    pub fn write_set(&self, key: &BlobKey) -> Vec<String> {
        self.preference_list(key).take(self.replication_factor).map(|i| self.shards[i].name.clone()).collect()
    }

    /// The shards that stored a blob, named in read order, as a [`WriteReceipt`] lists them.
    pub fn stored_in_read_order(&self, key: &BlobKey, stored: &[&str]) -> Vec<String> {
        self.read_order(key, stored).into_iter().map(str::to_owned).collect()
    }

    /// Recorded holders sorted into read order; holders the config does not know are dropped.
    pub fn read_order<'a>(&self, key: &BlobKey, holders: &[&'a str]) -> Vec<&'a str> {
        let mut ordered: Vec<&'a str> = Vec::with_capacity(holders.len());
        for index in self.preference_list(key) {
            if let Some(holder) = holders.iter().find(|holder| **holder == self.shards[index].name) {
                ordered.push(holder);
            }
        }
        for holder in holders {
            if !ordered.contains(holder) && self.shard(holder).is_ok() {
                ordered.push(holder);
            }
        }
        ordered
    }

    pub fn shard(&self, name: &str) -> Result<&Shard, RouterError> {
        self.shards.iter().find(|shard| shard.name == name).ok_or_else(|| RouterError::UnknownShard(name.to_owned()))
    }

    /// Writes the blob to the first `copies` shards of its preference list that take it (DESIGN
    /// invariant 4): a shard that is down, or has not finished within the write deadline, does
    /// not fail the write while others can take it. Shards named in `avoid` are skipped (they
    /// took an earlier attempt that could not be confirmed, or a deletion of these bytes may
    /// still land there). Fails only when fewer than `copies` shards could; copies written by
    /// then are orphans that scrub collects, and so is a write abandoned at its deadline that
    /// the shard completes later.
    ///
    /// The `copies` writes run at once (a write quorum of two costs one PUT's time, not two);
    /// each one that fails hands its place to the next shard of the preference list.
    pub async fn write_copies(
        &self,
        key: &BlobKey,
        body: &BlobBody,
        copies: usize,
        avoid: &[String],
    ) -> Result<WriteReceipt, RouterError> {
        let deadline = self.deadlines.write_for(body.len());
        let mut candidates = self.preference_list(key).filter(|&index| !avoid.contains(&self.shards[index].name));
        let write = |index: usize| {
            let shard = &self.shards[index];
            async move { (shard, shard.breaker.call_within("write", deadline, shard.store.write_blob(key, body)).await) }
        };
        let mut in_flight: FuturesUnordered<_> = candidates.by_ref().take(copies).map(write).collect();
        let mut attempts = Vec::new();
        let mut stored = Vec::with_capacity(copies);
        while let Some((shard, result)) = in_flight.next().await {
            match result {
                Ok(()) => stored.push(shard.name.as_str()),
                Err(error) => {
                    tracing::warn!(shard = %shard.name, %key, %error, "write failed; trying the next shard");
                    attempts.push((shard.name.clone(), error));
                    in_flight.extend(candidates.next().map(write));
                }
            }
        }
        let stored = self.stored_in_read_order(key, &stored);
        if stored.len() == copies {
            return Ok(WriteReceipt { stored, write_set: self.write_set(key) });
        }
        if stored.is_empty() {
            return Err(RouterError::NoShardAvailable { operation: "store", key: key.clone(), attempts });
        }
        Err(RouterError::QuorumNotReached { key: key.clone(), wanted: copies, written: stored, attempts })
    }

    /// Where a cut-through upload may stream the blob: the first `copies` shards of its
    /// preference list, when all their circuits are closed. `None` otherwise, and the upload
    /// stores and forwards as usual (its write then fails over along the preference list,
    /// DESIGN invariant 4).
    pub fn feed_targets(&self, key: &BlobKey, copies: usize) -> Option<Vec<&Shard>> {
        let targets: Vec<&Shard> = self.preference_list(key).take(copies).map(|index| &self.shards[index]).collect();
        let all_closed = targets.iter().all(|shard| shard.circuit().state == CircuitState::Closed);
        (targets.len() == copies && all_closed).then_some(targets)
    }

    /// Streams a blob to one shard as it arrives (see [`BodyFeed`]). Not through the shard's
    /// circuit breaker: an upload gives a feed up for reasons of its own (bytes that do not
    /// match, a client gone), and the shard must not be blamed. A shard that does fail here
    /// meets its breaker again in the store-and-forward write that follows.
    pub async fn write_feed_on(&self, shard: &str, key: &BlobKey, feed: BodyFeed) -> Result<(), RouterError> {
        let shard = self.shard(shard)?;
        shard
            .store
            .write_blob_feed(key, feed)
            .await
            .map_err(|source| RouterError::Shard { shard: shard.name.clone(), source })
    }

    pub async fn write_on(&self, shard: &str, key: &BlobKey, body: &BlobBody) -> Result<(), RouterError> {
        // Bounded like an upload's write: a worker's copy onto a hung shard (an fs mount that
        // stopped answering) would otherwise hold its task, renewing the claim, for ever.
        let deadline = self.deadlines.write_for(body.len());
        self.on_shard(shard, |store| deadline::within("write", deadline, store.write_blob(key, body))).await
    }

    /// Opens the blob on one shard. Its body fails with `TimedOut` if the shard stops sending
    /// for `deadlines.body_idle`, so no reader (a client, a replication worker, a scrub) waits
    /// on a stalled body forever.
    pub async fn open_on(&self, shard: &str, key: &BlobKey) -> Result<BlobReader, RouterError> {
        let reader = self.on_shard(shard, |store| store.read_blob(key)).await?;
        Ok(BlobReader { len: reader.len, stream: deadline::idle_timeout(reader.stream, self.deadlines.body_idle) })
    }

    /// The blob's length on one shard, within `deadlines.control`: callers run this under the
    /// blob's lock, which must not wait on a late shard.
    pub async fn fetch_len_on(&self, shard: &str, key: &BlobKey) -> Result<u64, RouterError> {
        let deadline = self.deadlines.control;
        self.on_shard(shard, |store| deadline::within("head", deadline, store.fetch_blob_len(key))).await
    }

    /// Deletes the blob on one shard, within `deadlines.control` (deletions hold the blob's lock).
    pub async fn delete_on(&self, shard: &str, key: &BlobKey) -> Result<(), RouterError> {
        let deadline = self.deadlines.control;
        self.on_shard(shard, |store| deadline::within("delete", deadline, store.delete_blob(key))).await
    }

    /// Reads a blob from `order` (holders in read order, see [`StorageRouter::read_order`]),
    /// hedged: `attempt` opens (and checks) one holder's copy; when a holder is slower than its
    /// usual latency the next one is asked too. See [`HedgedReads`].
    pub fn hedged_reads<'a, T, E, F, Fut>(&'a self, order: Vec<&'a str>, attempt: F) -> HedgedReads<'a, T, E, F>
    where
        F: FnMut(&'a str) -> Fut + Send,
        Fut: Future<Output = Result<T, E>> + Send + 'a,
        T: Send + 'a,
        E: Send + 'a,
    {
        let hedge = self.hedge;
        HedgedReads::new(
            order,
            attempt,
            move |name| self.shard(name).ok().and_then(|shard| hedge.delay(&shard.latency)),
            move |name, took| {
                if let Ok(shard) = self.shard(name) {
                    shard.latency.observe(took);
                }
            },
            move |name| {
                if let Ok(shard) = self.shard(name) {
                    shard.breaker.record_lost_hedge();
                }
            },
        )
    }

    pub async fn list_on(
        &self,
        shard: &str,
        after: Option<&BlobKey>,
        limit: usize,
    ) -> Result<Vec<StoredObject>, RouterError> {
        self.on_shard(shard, |store| store.list_blobs(after, limit)).await
    }

    /// Runs one operation on a named shard, through its circuit breaker.
    async fn on_shard<'a, T, F>(
        &'a self,
        name: &str,
        operation: impl FnOnce(&'a dyn BlobStore) -> F,
    ) -> Result<T, RouterError>
    where
        F: std::future::Future<Output = StorageResult<T>>,
    {
        let shard = self.shard(name)?;
        shard
            .breaker
            .call(operation(shard.store.as_ref()))
            .await
            .map_err(|source| RouterError::Shard { shard: shard.name.clone(), source })
    }

    /// Checks every shard concurrently, each bounded by `timeout`. An open circuit answers
    /// for its shard until its cooldown ends; the check after that is the circuit's trial.
    pub async fn check_health(&self, timeout: Duration) -> Vec<ShardHealth> {
        let checks = self.shards.iter().map(|shard| async move {
            let started = Instant::now();
            let bounded = async {
                tokio::time::timeout(timeout, shard.store.check_health()).await.unwrap_or_else(|_| {
                    Err(StorageError::Unavailable {
                        reason: format!("no answer within {} ms", timeout.as_millis()),
                        source: None,
                    })
                })
            };
            let result = shard.breaker.call(bounded).await;
            ShardHealth {
                name: shard.name.clone(),
                backend: shard.store.describe(),
                latency: started.elapsed(),
                circuit: shard.circuit(),
                result,
            }
        });
        futures::future::join_all(checks).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> BlobKey {
        BlobKey::parse(&"ab".repeat(32)).unwrap()
    }

    fn failure(shard: &str) -> (String, StorageError) {
        (shard.to_owned(), StorageError::other("down", std::io::Error::other("refused")))
    }

    #[test]
    fn a_failed_top_up_counts_the_copies_written_before_it() {
        let none_left = RouterError::NoShardAvailable { operation: "store", key: key(), attempts: vec![failure("b")] };
        let RouterError::QuorumNotReached { wanted, written, attempts, .. } =
            none_left.with_earlier_copies(&["a".into()], 2)
        else {
            panic!("a quorum not reached")
        };
        assert_eq!((wanted, written, attempts.len()), (2, vec!["a".to_owned()], 1));

        let short = RouterError::QuorumNotReached {
            key: key(),
            wanted: 2,
            written: vec!["c".into()],
            attempts: vec![failure("d")],
        };
        let RouterError::QuorumNotReached { wanted, written, .. } = short.with_earlier_copies(&["a".into()], 3) else {
            panic!("a quorum not reached")
        };
        assert_eq!((wanted, written), (3, vec!["a".to_owned(), "c".to_owned()]));
    }

    #[test]
    fn a_store_that_wrote_nothing_before_stays_unavailable() {
        let none_left = RouterError::NoShardAvailable { operation: "store", key: key(), attempts: vec![failure("b")] };
        assert!(matches!(none_left.with_earlier_copies(&[], 1), RouterError::NoShardAvailable { .. }));
    }
}
