//! Where resumable maintenance jobs (rebalance, scrub) stopped.

use async_trait::async_trait;

use super::MetaResult;
use crate::blob::BlobKey;

#[async_trait]
pub trait JobCursors: Send + Sync {
    /// Where a resumable job (`"rebalance"`, `"scrub"`) stopped; `None` if it has not started
    /// or finished.
    async fn load_job_cursor(&self, job: &str) -> MetaResult<Option<BlobKey>>;

    /// Saves (or, with `None`, clears) a job's position.
    async fn save_job_cursor(&self, job: &str, cursor: Option<&BlobKey>) -> MetaResult<()>;
}
