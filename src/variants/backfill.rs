//! `chitram variants backfill`: makes every configured variant of every image that lacks it
//! (new variant names, changed specs, images uploaded before variants existed), ahead of
//! traffic. Resumable: its position (an image id; images are walked in id order) is saved
//! after every page, and a stopped run continues from there. Failures to decode are recorded
//! as the variant's `failed` state like any generation; outages are counted and left for the
//! next run (or the first request).

use std::sync::Arc;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::service::VariantService;
use crate::maintenance::progress::Progress;
use crate::metadata::{MetadataError, VariantState};

/// Images read per page; the position is saved after each.
const PAGE: u32 = 100;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BackfillSummary {
    pub images: u64,
    /// Variants made by this run.
    pub generated: u64,
    /// Variants that were already current.
    pub already_current: u64,
    /// Variants whose image cannot be decoded (recorded `failed`).
    pub failed: u64,
    /// Variants that could not be made because of an outage: run again.
    pub errors: u64,
    /// The run was stopped before the end; the next one resumes.
    pub interrupted: bool,
}

pub async fn backfill(
    service: &Arc<VariantService>,
    progress: &dyn Progress,
    stop: &CancellationToken,
) -> Result<BackfillSummary, MetadataError> {
    let metadata = service.metadata().clone();
    let mut cursor = metadata.load_backfill_cursor().await?;
    progress.start("variants backfill", metadata.count_images().await?, 0);
    let mut summary = BackfillSummary::default();
    loop {
        if stop.is_cancelled() {
            summary.interrupted = true;
            break;
        }
        let page = metadata.image_ids_after(cursor, PAGE).await?;
        let Some(last) = page.last().copied() else { break };
        let concurrency = service_concurrency(service);
        let mut outcomes =
            futures::stream::iter(page).map(|id| backfill_image(service, id)).buffer_unordered(concurrency);
        while let Some(outcome) = outcomes.next().await {
            summary.images += 1;
            summary.generated += outcome.generated;
            summary.already_current += outcome.already_current;
            summary.failed += outcome.failed;
            summary.errors += outcome.errors;
            progress.advance(1, 0);
        }
        cursor = Some(last);
        metadata.save_backfill_cursor(cursor).await?;
    }
    if !summary.interrupted {
        metadata.save_backfill_cursor(None).await?;
    }
    progress.finish();
    Ok(summary)
}

fn service_concurrency(service: &VariantService) -> usize {
    service.pool_threads().max(1)
}

/// The counts of one image.
#[derive(Default)]
struct ImageOutcome {
    generated: u64,
    already_current: u64,
    failed: u64,
    errors: u64,
}

async fn backfill_image(service: &Arc<VariantService>, id: Uuid) -> ImageOutcome {
    let mut outcome = ImageOutcome::default();
    let image = match service.metadata().find_image(id).await {
        Ok(Some(image)) => service.catalog().present(image),
        Ok(None) => return outcome, // deleted meanwhile
        Err(error) => {
            tracing::warn!(%id, %error, "cannot read an image to backfill");
            outcome.errors += service.catalog().specs().len() as u64;
            return outcome;
        }
    };
    for spec in service.catalog().specs() {
        let before = image.variants.iter().find(|v| v.name == spec.name.as_ref()).map(|v| v.state);
        if before.is_some_and(|state| state != VariantState::Pending) {
            outcome.already_current += 1;
            continue;
        }
        match service.ensure(&image, spec).await {
            Ok(variant) if variant.state == VariantState::Failed => outcome.failed += 1,
            Ok(_) => outcome.generated += 1,
            Err(error) if !error.is_transient() => {}
            Err(error) => {
                tracing::warn!(%id, variant = %spec.name, error = %crate::telemetry::error_chain(error.as_ref()), "backfill could not make a variant");
                outcome.errors += 1;
            }
        }
    }
    outcome
}
