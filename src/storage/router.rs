//! The storage router: where a blob is written, and which copy a read uses.
//!
//! Vocabulary (after Garage):
//! - *preference list*: every weighted shard, in the ring's order for the blob's key;
//! - *write set*: the first `replication_factor` shards of the preference list, where the
//!   blob's copies belong;
//! - *read order*: the shards recorded as holding a copy, sorted by their position in the
//!   preference list (holders outside it, such as draining shards, come last).
//!
//! The router never consults metadata: callers pass the recorded holders in and record what the
//! router reports back (DESIGN, "storage/ knows nothing of metadata").

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{BlobBody, BlobReader, BlobStore, StorageError};
use crate::blob::BlobKey;
use crate::placement::ring::{Ring, key_hash};

/// A shard: its stable name and the backend that holds its objects.
#[derive(Debug, Clone)]
pub struct Shard {
    pub name: String,
    pub store: Arc<dyn BlobStore>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Every shard that was tried failed. Each attempt is listed with its cause.
    #[error("no shard could {operation} blob {key}: {}", describe_attempts(.attempts))]
    NoShardAvailable { operation: &'static str, key: BlobKey, attempts: Vec<(String, StorageError)> },
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
    /// The shard that stored the bytes.
    pub shard: String,
    /// The write set: the shards the blob's copies belong on (may not include `shard` when the
    /// whole write set was down).
    pub write_set: Vec<String>,
}

/// A blob opened for reading.
#[derive(Debug)]
pub struct OpenedBlob {
    pub shard: String,
    pub reader: BlobReader,
    /// Holders tried first that answered that they do not have the blob.
    pub lacking: Vec<String>,
}

/// How one shard answered a health check.
#[derive(Debug)]
pub struct ShardHealth {
    pub name: String,
    pub backend: String,
    pub latency: Duration,
    pub result: Result<(), StorageError>,
}

#[derive(Debug)]
pub struct StorageRouter {
    ring: Ring,
    /// Indexed like `ring.members()`.
    shards: Vec<Shard>,
    replication_factor: usize,
}

impl StorageRouter {
    /// `shards` must be in the same order as the ring's members.
    pub fn new(ring: Ring, shards: Vec<Shard>, replication_factor: usize) -> Self {
        assert_eq!(ring.members().len(), shards.len(), "one backend per ring member");
        for (member, shard) in ring.members().iter().zip(&shards) {
            assert_eq!(member.name, shard.name, "backends in ring order");
        }
        Self { ring, shards, replication_factor }
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

    /// Writes the blob to the first shard of its preference list that takes it (DESIGN
    /// invariant 4): a shard that is down does not fail the write while another can take it.
    pub async fn write_to_first_available(&self, key: &BlobKey, body: &BlobBody) -> Result<WriteReceipt, RouterError> {
        let mut attempts = Vec::new();
        for index in self.preference_list(key) {
            let shard = &self.shards[index];
            match shard.store.write_blob(key, body).await {
                Ok(()) => return Ok(WriteReceipt { shard: shard.name.clone(), write_set: self.write_set(key) }),
                Err(error) => {
                    tracing::warn!(shard = %shard.name, %key, %error, "write failed; trying the next shard");
                    attempts.push((shard.name.clone(), error));
                }
            }
        }
        Err(RouterError::NoShardAvailable { operation: "store", key: key.clone(), attempts })
    }

    /// Opens the blob from the first holder, in read order, that serves it (invariant 5).
    pub async fn open_from_holders(&self, key: &BlobKey, holders: &[&str]) -> Result<OpenedBlob, RouterError> {
        let mut attempts = Vec::new();
        let mut lacking = Vec::new();
        for name in self.read_order(key, holders) {
            let shard = self.shard(name)?;
            match shard.store.read_blob(key).await {
                Ok(reader) => return Ok(OpenedBlob { shard: shard.name.clone(), reader, lacking }),
                Err(error) => {
                    tracing::warn!(shard = %name, %key, %error, "read failed; trying the next holder");
                    if error.is_not_found() {
                        lacking.push(name.to_owned());
                    }
                    attempts.push((name.to_owned(), error));
                }
            }
        }
        Err(RouterError::NoShardAvailable { operation: "read", key: key.clone(), attempts })
    }

    pub async fn fetch_len_on(&self, shard: &str, key: &BlobKey) -> Result<u64, RouterError> {
        let shard = self.shard(shard)?;
        shard.store.fetch_blob_len(key).await.map_err(|source| RouterError::Shard { shard: shard.name.clone(), source })
    }

    pub async fn delete_on(&self, shard: &str, key: &BlobKey) -> Result<(), RouterError> {
        let shard = self.shard(shard)?;
        shard.store.delete_blob(key).await.map_err(|source| RouterError::Shard { shard: shard.name.clone(), source })
    }

    /// Checks every shard concurrently, each bounded by `timeout`.
    pub async fn check_health(&self, timeout: Duration) -> Vec<ShardHealth> {
        let checks = self.shards.iter().map(|shard| async move {
            let started = Instant::now();
            let result = match tokio::time::timeout(timeout, shard.store.check_health()).await {
                Ok(result) => result,
                Err(_) => Err(StorageError::Unavailable {
                    reason: format!("no answer within {} ms", timeout.as_millis()),
                    source: None,
                }),
            };
            ShardHealth {
                name: shard.name.clone(),
                backend: shard.store.describe(),
                latency: started.elapsed(),
                result,
            }
        });
        futures::future::join_all(checks).await
    }
}
