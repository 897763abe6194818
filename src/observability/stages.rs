//! Where the time of storing bytes goes: each upload (and each variant) records how long it
//! spent in each stage into `chitram_store_stage_seconds`, so an operator can tell a slow
//! shard (`write`, `confirm`) from a slow database (`lookup`, `lock`, `commit`) or slow
//! clients (`receive`) without a profiler, and the e2e bench reports the same breakdown.

use std::time::Instant;

use super::names;

/// What is being stored: the `for` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Upload,
    Variant,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Purpose::Upload => "upload",
            Purpose::Variant => "variant",
        }
    }
}

/// The stages, in the order an upload of new bytes passes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The request body read, hashed and held (in memory or spooled).
    Receive,
    /// The format, dimensions and completeness checked.
    Check,
    /// The quota and the deduplication queries, before anything is written.
    Lookup,
    /// The copies written to their shards.
    Write,
    /// The blob's lock taken in the database.
    Lock,
    /// The copies just written confirmed under the lock (a HEAD each).
    Confirm,
    /// The records committed.
    Commit,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::Receive => "receive",
            Stage::Check => "check",
            Stage::Lookup => "lookup",
            Stage::Write => "write",
            Stage::Lock => "lock",
            Stage::Confirm => "confirm",
            Stage::Commit => "commit",
        }
    }
}

/// Times consecutive stages: each [`StageClock::finish`] records the time since the previous
/// one (or since the clock started).
#[derive(Debug)]
pub struct StageClock {
    purpose: Purpose,
    since: Instant,
}

impl StageClock {
    pub fn start(purpose: Purpose) -> Self {
        Self { purpose, since: Instant::now() }
    }

    pub fn finish(&mut self, stage: Stage) {
        let now = Instant::now();
        let took = now.duration_since(self.since);
        metrics::histogram!(names::STORE_STAGE, "for" => self.purpose.label(), "stage" => stage.label()).record(took);
        self.since = now;
    }
}
