//! Every metric Chitram exports, in one place: its name, its labels, and its description.
//!
//! Labels take bounded values only: route templates (`/api/v1/images/{id}`), never raw paths
//! or ids; shard names from the config; a fixed set of operations, outcomes and states.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Requests answered. Labels: `method`, `route` (the template, or `unmatched`), `status`.
pub const HTTP_REQUESTS: &str = "chitram_http_requests_total";
/// Error answers (4xx and 5xx). Labels: `method`, `route`, `status`, `code` (the API error code).
pub const HTTP_ERRORS: &str = "chitram_http_errors_total";
/// Time to the response's head (a streamed body may go on after). Labels: `method`, `route`.
pub const HTTP_DURATION: &str = "chitram_http_request_duration_seconds";

/// Calls made to a shard's backend. Labels: `shard`, `operation` (`write`, `read`, `head`,
/// `delete`, `list`, `health`), `outcome` (`ok`, `not_found`, `error`, `cancelled`: abandoned at
/// a deadline or by a hedged read that another holder won).
pub const SHARD_OPERATIONS: &str = "chitram_shard_operations_total";
/// Failed calls to a shard. Labels: `shard`, `operation`, `kind` (`unavailable`, `deadline`,
/// `access_denied`, `other`).
pub const SHARD_ERRORS: &str = "chitram_shard_errors_total";
/// How long a call to a shard took (a read: until its stream opened). Labels: `shard`, `operation`.
pub const SHARD_DURATION: &str = "chitram_shard_operation_duration_seconds";
/// The shard's circuit: 0 closed, 1 half-open, 2 open. Label: `shard`.
pub const SHARD_CIRCUIT: &str = "chitram_shard_circuit_state";
/// Stored copies recorded on a shard, from the metadata. Label: `shard`.
pub const SHARD_OBJECTS: &str = "chitram_shard_objects";
/// Bytes of the stored copies recorded on a shard, from the metadata. Label: `shard`.
pub const SHARD_BYTES: &str = "chitram_shard_bytes";
/// The shard's weight in the config (its intended share is weight / sum of weights). Label: `shard`.
pub const SHARD_WEIGHT: &str = "chitram_shard_weight";

/// Tasks in the replication queue. Label: `kind` (`copy`, `delete`).
pub const QUEUE_DEPTH: &str = "chitram_replication_queue_depth";
/// Age of the oldest task in the queue (0 when empty).
pub const QUEUE_OLDEST_AGE: &str = "chitram_replication_queue_oldest_age_seconds";
/// Copies by state, from the metadata. Label: `state` (`pending`, `stored`, `missing`, `deleting`).
pub const REPLICAS: &str = "chitram_replicas";
/// Replication tasks this instance ran. Labels: `kind`, `outcome` (`done`, `failed`, `lost_claim`).
pub const REPLICATION_TASKS: &str = "chitram_replication_tasks_total";
/// Copies an upload made from its own bytes right after its commit. Label: `outcome`
/// (`stored`, `taken_by_worker`, `left_to_queue`, `lost_claim`, `failed`).
pub const EAGER_COPIES: &str = "chitram_eager_copies_total";
/// Replication workers running in this instance (they follow the queue's depth).
pub const REPLICATION_WORKERS: &str = "chitram_replication_workers";
/// From an upload's acknowledgement to its last eager copy stored.
pub const EAGER_COPY_LAG: &str = "chitram_eager_copy_seconds";
/// Time spent in each stage of storing bytes, by what is stored (`upload`, `variant`) and stage
/// (see [`crate::observability::stages`]).
pub const STORE_STAGE: &str = "chitram_store_stage_seconds";

/// Uploads whose bytes were already stored (a reference added, nothing written).
pub const DEDUP_HITS: &str = "chitram_dedup_hits_total";
/// Uploads that stored new bytes.
pub const NEW_BLOBS: &str = "chitram_new_blobs_total";

/// Bytes of upload bodies held in memory instead of a spool file (at most
/// `server.upload_memory_bytes`).
pub const UPLOAD_MEMORY: &str = "chitram_upload_memory_bytes";
/// Uploads that could have been held in memory but spooled because the budget was full.
pub const UPLOAD_MEMORY_FULL: &str = "chitram_upload_memory_full_total";
/// Cut-through uploads (`images/cut_through.rs`). Label: `outcome` (`stored`: the streamed PUT
/// was the write; `fallback`: it failed or stalled, and the upload stored and forwarded;
/// `abandoned`: the upload ended without a write, refused or deduplicated or cut off).
pub const CUT_THROUGH: &str = "chitram_upload_cut_through_total";

/// Requests refused for an empty rate-limit bucket. Label: `class` (`upload`, `request`, `login`).
pub const RATE_LIMITED: &str = "chitram_rate_limited_total";
/// Rate-limit checks that fell back to this instance's own buckets because Redis did not answer.
pub const RATE_LIMIT_FALLBACKS: &str = "chitram_rate_limit_redis_fallbacks_total";

/// Image lookups the Redis metadata cache answered (`[redis] metadata_cache`). The hit ratio
/// is `hits / (hits + misses)`.
pub const METADATA_CACHE_HITS: &str = "chitram_metadata_cache_hits_total";
/// Image lookups the cache could not answer (absent, expired or just invalidated): the
/// database answered, and the record was cached.
pub const METADATA_CACHE_MISSES: &str = "chitram_metadata_cache_misses_total";
/// Image lookups that went to the database because Redis did not answer (or this instance
/// still had invalidations to deliver).
pub const METADATA_CACHE_FALLBACKS: &str = "chitram_metadata_cache_fallbacks_total";
/// Cache keys whose invalidation could not reach Redis when the change was made (retried
/// when it answers again; until then the TTL bounds their staleness on other instances).
pub const METADATA_CACHE_INVALIDATION_FAILURES: &str = "chitram_metadata_cache_invalidation_failures_total";

/// 1 while this instance runs the singleton maintenance jobs (scrub), else 0.
pub const MAINTENANCE_LEADER: &str = "chitram_maintenance_leader";
/// Background scrubs this instance finished.
pub const SCRUB_RUNS: &str = "chitram_scrub_runs_total";
/// When the figures read from the metadata were last refreshed (Unix seconds).
pub const METADATA_REFRESHED: &str = "chitram_metadata_stats_refreshed_timestamp_seconds";

/// Every family above, for checks that dashboards and alerts name real metrics.
pub const ALL: &[&str] = &[
    HTTP_REQUESTS,
    HTTP_ERRORS,
    HTTP_DURATION,
    SHARD_OPERATIONS,
    SHARD_ERRORS,
    SHARD_DURATION,
    SHARD_CIRCUIT,
    SHARD_OBJECTS,
    SHARD_BYTES,
    SHARD_WEIGHT,
    QUEUE_DEPTH,
    QUEUE_OLDEST_AGE,
    REPLICAS,
    REPLICATION_TASKS,
    EAGER_COPIES,
    REPLICATION_WORKERS,
    EAGER_COPY_LAG,
    STORE_STAGE,
    DEDUP_HITS,
    NEW_BLOBS,
    UPLOAD_MEMORY,
    UPLOAD_MEMORY_FULL,
    CUT_THROUGH,
    RATE_LIMITED,
    RATE_LIMIT_FALLBACKS,
    METADATA_CACHE_HITS,
    METADATA_CACHE_MISSES,
    METADATA_CACHE_FALLBACKS,
    METADATA_CACHE_INVALIDATION_FAILURES,
    MAINTENANCE_LEADER,
    SCRUB_RUNS,
    METADATA_REFRESHED,
];

/// Histogram buckets for latencies, in seconds: 1 ms to 60 s, which covers a metadata
/// lookup as well as a large upload to a slow shard.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Buckets for the stages of a store: from 100 µs, since most stages of a small upload
/// (a database round trip, a HEAD) take well under the 1 ms of [`LATENCY_BUCKETS`].
pub const STAGE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Registers each family's description and unit with the installed recorder.
pub fn describe() {
    describe_counter!(HTTP_REQUESTS, "Requests answered, by route template and status");
    describe_counter!(HTTP_ERRORS, "Error answers (4xx, 5xx), by route template and API error code");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "Time to the response head, by route template");
    describe_counter!(SHARD_OPERATIONS, "Calls to a shard's backend, by operation and outcome");
    describe_counter!(SHARD_ERRORS, "Failed calls to a shard's backend, by operation and kind");
    describe_histogram!(SHARD_DURATION, Unit::Seconds, "Duration of calls to a shard's backend");
    describe_gauge!(SHARD_CIRCUIT, "Circuit breaker state: 0 closed, 1 half-open, 2 open");
    describe_gauge!(SHARD_OBJECTS, "Stored copies recorded on the shard (from the metadata)");
    describe_gauge!(SHARD_BYTES, Unit::Bytes, "Bytes of the stored copies recorded on the shard");
    describe_gauge!(SHARD_WEIGHT, "The shard's configured weight (0 while draining)");
    describe_gauge!(QUEUE_DEPTH, "Tasks in the replication queue, by kind");
    describe_gauge!(QUEUE_OLDEST_AGE, Unit::Seconds, "Age of the oldest replication task");
    describe_gauge!(REPLICAS, "Copies by state (from the metadata)");
    describe_counter!(REPLICATION_TASKS, "Replication tasks run by this instance, by kind and outcome");
    describe_counter!(EAGER_COPIES, "Copies uploads made from their own bytes after the commit, by outcome");
    describe_gauge!(REPLICATION_WORKERS, "Replication workers running (they follow the queue's depth)");
    describe_histogram!(EAGER_COPY_LAG, Unit::Seconds, "From an upload's commit to its eager copies stored");
    describe_histogram!(STORE_STAGE, Unit::Seconds, "Time spent in each stage of storing bytes, by purpose and stage");
    describe_counter!(DEDUP_HITS, "Uploads stored as a reference to bytes already stored");
    describe_counter!(NEW_BLOBS, "Uploads that stored new bytes");
    describe_gauge!(UPLOAD_MEMORY, Unit::Bytes, "Upload bodies held in memory instead of a spool file");
    describe_counter!(UPLOAD_MEMORY_FULL, "Uploads spooled because the upload memory budget was full");
    describe_counter!(CUT_THROUGH, "Uploads streamed to their shard as they arrived, by outcome");
    describe_counter!(RATE_LIMITED, "Requests refused with 429, by bucket class");
    describe_counter!(RATE_LIMIT_FALLBACKS, "Rate-limit checks made in process because Redis did not answer");
    describe_counter!(METADATA_CACHE_HITS, "Image lookups answered by the Redis metadata cache");
    describe_counter!(METADATA_CACHE_MISSES, "Image lookups the Redis metadata cache sent to the database");
    describe_counter!(METADATA_CACHE_FALLBACKS, "Image lookups sent to the database because Redis did not answer");
    describe_counter!(
        METADATA_CACHE_INVALIDATION_FAILURES,
        "Metadata cache invalidations that could not reach Redis (retried later)"
    );
    describe_gauge!(MAINTENANCE_LEADER, "1 while this instance runs the singleton maintenance jobs");
    describe_counter!(SCRUB_RUNS, "Background scrubs finished by this instance");
    describe_gauge!(METADATA_REFRESHED, Unit::Seconds, "When the metadata figures were last read");
}
