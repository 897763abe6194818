//! Figures that come from the metadata (objects and bytes per shard, the replication queue,
//! copies by state) are read on an interval, not per scrape: a scrape must cost the database
//! nothing, however many Prometheus servers ask, however often.

use std::sync::Arc;
use std::time::Duration;

use metrics::gauge;
use tokio_util::sync::CancellationToken;

use super::names;
use crate::metadata::{MetaResult, MetadataStore, ReplicaState};

/// Reads the figures every `every` until `stop`; a failed read keeps the last figures (the
/// refresh timestamp shows their age) and is logged.
pub async fn run(metadata: Arc<dyn MetadataStore>, shards: Vec<String>, every: Duration, stop: CancellationToken) {
    loop {
        if let Err(error) = refresh(metadata.as_ref(), &shards).await {
            tracing::warn!(error = %crate::telemetry::error_chain(&error), "could not refresh the metadata metrics");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Reads the figures once and sets their gauges.
pub async fn refresh(metadata: &dyn MetadataStore, shards: &[String]) -> MetaResult<()> {
    let usage = metadata.shard_usage().await?;
    for shard in shards {
        let stored = usage.iter().filter(|u| &u.shard == shard && u.state == ReplicaState::Stored);
        let (objects, bytes) = stored.fold((0, 0), |(objects, bytes), u| (objects + u.copies, bytes + u.bytes));
        gauge!(names::SHARD_OBJECTS, "shard" => shard.clone()).set(objects as f64);
        gauge!(names::SHARD_BYTES, "shard" => shard.clone()).set(bytes as f64);
    }
    let queue = metadata.queue_stats().await?;
    gauge!(names::QUEUE_DEPTH, "kind" => "copy").set(queue.copy_tasks as f64);
    gauge!(names::QUEUE_DEPTH, "kind" => "delete").set(queue.delete_tasks as f64);
    gauge!(names::QUEUE_OLDEST_AGE).set(queue.oldest_task_age.unwrap_or_default().as_secs_f64());
    let replicas = metadata.count_replicas_by_state().await?;
    for (state, count) in [
        ("pending", replicas.pending),
        ("stored", replicas.stored),
        ("missing", replicas.missing),
        ("deleting", replicas.deleting),
    ] {
        gauge!(names::REPLICAS, "state" => state).set(count as f64);
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    gauge!(names::METADATA_REFRESHED).set(now.as_secs_f64());
    Ok(())
}
