//! Variants (thumbnails and previews), end to end: generated on demand (once) and by the
//! durable queue, stored as replicated blobs, served with caching headers, deleted with their
//! image; each test over fs and S3 shards on SQLite and Postgres.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chitram::blob::BlobKey;
use chitram::metadata::{ReplicaState, VariantState};
use chitram::replication::backoff::RetryPolicy;
use chitram::variants::worker::{VariantStep, VariantWorker, VariantWorkerSettings};
use common::database::{TaskQueue, claimed_tasks, slow_down_claim_commits};
use common::images::{png, png_of_depth};
use common::{Backends, TestApp, TestOptions, assert_error, eventually, spawn_app, spawn_app_with};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{DynamicImage, GenericImageView, ImageEncoder, Rgb, RgbImage, Rgba, RgbaImage};
use reqwest::StatusCode;
use reqwest::header;
use serde_json::Value;

behaviours!(
    an_exif_rotated_jpeg_comes_out_upright_without_its_metadata,
    cover_fills_and_contain_fits_without_upscaling,
    alpha_is_preserved,
    a_decompression_bomb_is_refused_without_a_large_allocation,
    a_corrupt_image_is_marked_failed_and_its_original_still_served,
    a_variant_too_large_for_the_pixel_limit_is_made_once_the_limit_is_raised,
    concurrent_first_requests_generate_once,
    serving_has_caching_headers_and_clear_errors,
    a_variant_survives_the_loss_of_one_shard,
    deleting_images_releases_their_variant_blobs,
    the_durable_queue_makes_variants_without_requests,
    backfill_makes_missing_and_stale_variants_and_resumes,
);

/// The largest single allocation the test process has asked for: a decompression bomb that
/// got past the header check would ask for gigabytes at once.
struct LargestAllocation;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

const RED: Rgb<u8> = Rgb([220, 20, 20]);
const BLUE: Rgb<u8> = Rgb([20, 20, 220]);
const GPS_SECRET: &[u8] = b"SECRET-GPS-DATUM";

/// A JPEG of `width × height`, left half red and right half blue.
fn halves_jpeg(width: u32, height: u32) -> Vec<u8> {
    let image = RgbImage::from_fn(width, height, |x, _| if x < width / 2 { RED } else { BLUE });
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&image).unwrap();
    bytes
}

/// A PNG of `width × height`, every pixel `fill` (RGB) and unique by `seed` in its red.
fn solid_png(width: u32, height: u32, seed: u8) -> Vec<u8> {
    let image = RgbImage::from_pixel(width, height, Rgb([seed, 120, 40]));
    let mut bytes = Vec::new();
    PngEncoder::new(&mut bytes).write_image(image.as_raw(), width, height, image::ExtendedColorType::Rgb8).unwrap();
    bytes
}

/// An RGBA PNG whose left half is fully transparent and right half opaque green.
fn half_transparent_png(width: u32, height: u32) -> Vec<u8> {
    let image =
        RgbaImage::from_fn(
            width,
            height,
            |x, _| if x < width / 2 { Rgba([0, 0, 0, 0]) } else { Rgba([0, 200, 0, 255]) },
        );
    let mut bytes = Vec::new();
    PngEncoder::new(&mut bytes).write_image(image.as_raw(), width, height, image::ExtendedColorType::Rgba8).unwrap();
    bytes
}

/// An APP1 Exif segment: orientation 6 (stored turned: display rotated 90° clockwise), and a
/// GPS IFD holding a GPSMapDatum that must never reach a variant. Offsets count from the TIFF
/// header, big-endian.
fn exif_app1() -> Vec<u8> {
    fn entry(tiff: &mut Vec<u8>, tag: u16, kind: u16, count: u32, value: [u8; 4]) {
        tiff.extend_from_slice(&tag.to_be_bytes());
        tiff.extend_from_slice(&kind.to_be_bytes());
        tiff.extend_from_slice(&count.to_be_bytes());
        tiff.extend_from_slice(&value);
    }
    const GPS_IFD: u32 = 8 + 2 + 2 * 12 + 4;
    const DATUM: u32 = GPS_IFD + 2 + 12 + 4;
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    tiff.extend_from_slice(&2u16.to_be_bytes());
    entry(&mut tiff, 0x0112, 3, 1, [0, 6, 0, 0]); // Orientation, SHORT
    entry(&mut tiff, 0x8825, 4, 1, GPS_IFD.to_be_bytes()); // GPS IFD pointer, LONG
    tiff.extend_from_slice(&0u32.to_be_bytes());
    tiff.extend_from_slice(&1u16.to_be_bytes());
    let datum = [GPS_SECRET, b"\0"].concat();
    entry(&mut tiff, 0x0012, 2, datum.len() as u32, DATUM.to_be_bytes()); // GPSMapDatum, ASCII
    tiff.extend_from_slice(&0u32.to_be_bytes());
    tiff.extend_from_slice(&datum);
    let payload = [b"Exif\0\0".as_slice(), &tiff].concat();
    let mut segment = vec![0xFF, 0xE1];
    segment.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    segment.extend_from_slice(&payload);
    segment
}

/// `halves_jpeg` with the Exif segment right after the SOI marker.
fn rotated_jpeg(width: u32, height: u32) -> Vec<u8> {
    let plain = halves_jpeg(width, height);
    [&plain[..2], &exif_app1(), &plain[2..]].concat()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

fn is_reddish(pixel: Rgba<u8>) -> bool {
    pixel.0[0] > 150 && pixel.0[2] < 100
}

fn is_bluish(pixel: Rgba<u8>) -> bool {
    pixel.0[2] > 150 && pixel.0[0] < 100
}

fn variant_path(image: &Value, name: &str) -> String {
    format!("/api/v1/images/{}/variants/{name}", image["id"].as_str().unwrap())
}

/// Fetches a variant, expecting it served, and returns its bytes and content type.
async fn fetch_variant(app: &TestApp, image: &Value, name: &str) -> (Vec<u8>, String) {
    let response = app.get(&variant_path(image, name)).await;
    assert_eq!(response.status(), StatusCode::OK, "{name}: {}", response.text().await.unwrap());
    let content_type = response.headers()[header::CONTENT_TYPE].to_str().unwrap().to_owned();
    (response.bytes().await.unwrap().to_vec(), content_type)
}

fn decode(bytes: &[u8]) -> DynamicImage {
    image::load_from_memory(bytes).expect("a variant decodes")
}

async fn an_exif_rotated_jpeg_comes_out_upright_without_its_metadata(b: Backends) {
    let app = spawn_app(b).await;
    let original = rotated_jpeg(800, 400);
    let image = app.upload_ok("turned.jpg", original.clone()).await;
    let stored = app.download(image["id"].as_str().unwrap()).await.bytes().await.unwrap();
    assert!(contains(&stored, GPS_SECRET), "the fixture carries its GPS tag, and the original keeps it");

    // Shown upright, the photo is 400 wide and 800 tall: red on top, blue below.
    let (bytes, content_type) = fetch_variant(&app, &image, "preview").await;
    assert_eq!(content_type, "image/jpeg");
    let preview = decode(&bytes);
    assert_eq!(preview.dimensions(), (400, 800), "contain never upscales, and turns the photo upright");
    assert!(is_reddish(preview.get_pixel(200, 100)), "{:?}", preview.get_pixel(200, 100));
    assert!(is_bluish(preview.get_pixel(200, 700)), "{:?}", preview.get_pixel(200, 700));

    let (bytes, _) = fetch_variant(&app, &image, "thumb").await;
    let thumb = decode(&bytes);
    assert_eq!(thumb.dimensions(), (256, 256));
    assert!(is_reddish(thumb.get_pixel(128, 20)) && is_bluish(thumb.get_pixel(128, 236)));

    for variant in [&bytes, &fetch_variant(&app, &image, "preview").await.0] {
        assert!(!contains(variant, GPS_SECRET), "GPS data is stripped");
        assert!(!contains(variant, b"Exif"), "no Exif segment at all");
    }
}

async fn cover_fills_and_contain_fits_without_upscaling(b: Backends) {
    let app = spawn_app(b).await;
    let wide = app.upload_ok("wide.png", solid_png(2000, 1000, 1)).await;
    assert_eq!(wide["variants"]["thumb"]["state"], "pending");
    assert_eq!(wide["variants"]["thumb"]["width"], 256);
    assert_eq!(wide["variants"]["preview"]["width"], 1280);
    assert_eq!(wide["variants"]["preview"]["height"], 640);
    let url = wide["variants"]["thumb"]["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{}?v=", variant_path(&wide, "thumb"))), "{url}");

    let (bytes, content_type) = fetch_variant(&app, &wide, "thumb").await;
    assert_eq!(content_type, "image/jpeg", "an opaque source gives a JPEG");
    assert_eq!(decode(&bytes).dimensions(), (256, 256), "cover fills the box");
    assert_eq!(decode(&fetch_variant(&app, &wide, "preview").await.0).dimensions(), (1280, 640), "contain fits");

    let shown = app.image(wide["id"].as_str().unwrap()).await;
    assert_eq!(shown["variants"]["thumb"]["state"], "ready");
    assert_eq!(shown["variants"]["preview"]["state"], "ready");
    assert_eq!(shown["variants"]["preview"]["height"], 640);

    let small = app.upload_ok("small.png", solid_png(100, 50, 2)).await;
    assert_eq!(decode(&fetch_variant(&app, &small, "thumb").await.0).dimensions(), (100, 50));
    assert_eq!(decode(&fetch_variant(&app, &small, "preview").await.0).dimensions(), (100, 50));
}

async fn alpha_is_preserved(b: Backends) {
    let app = spawn_app(b).await;
    let image = app.upload_ok("cutout.png", half_transparent_png(600, 400)).await;
    let (bytes, content_type) = fetch_variant(&app, &image, "thumb").await;
    assert_eq!(content_type, "image/png");
    let thumb = decode(&bytes);
    assert!(thumb.color().has_alpha());
    assert_eq!(thumb.get_pixel(10, 128).0[3], 0, "the transparent half stays transparent");
    assert_eq!(thumb.get_pixel(245, 128).0[3], 255);
}

async fn a_decompression_bomb_is_refused_without_a_large_allocation(b: Backends) {
    // The upload's own limit is lifted so that the bomb is stored, and only variants meet it.
    let app = spawn_app_with(b, TestOptions { max_pixels: u64::MAX, ..TestOptions::default() }).await;
    let bomb = png(100_000, 100_000, 7);
    assert!(bomb.len() < 50 * 1024);
    let image = app.upload_ok("bomb.png", bomb.clone()).await;

    let response = app.get(&variant_path(&image, "thumb")).await;
    assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "VARIANT_FAILED").await;
    let shown = app.image(image["id"].as_str().unwrap()).await;
    assert_eq!(shown["variants"]["thumb"]["state"], "failed");
    let reason = shown["variants"]["thumb"]["reason"].as_str().unwrap();
    assert!(reason.contains("100000x100000") && reason.contains("limit"), "{reason}");
    assert!(
        LARGEST.load(Ordering::Relaxed) < 256 << 20,
        "a decode allocated {} bytes",
        LARGEST.load(Ordering::Relaxed)
    );
    assert_eq!(app.download(image["id"].as_str().unwrap()).await.bytes().await.unwrap().to_vec(), bomb);

    // Within the pixel limit (100 MP), but 16 bits a channel: 800 MB to decode, twice what the
    // limit allows for. Refused before its buffer is allocated.
    let deep = png_of_depth(10_000, 10_000, 16, 8);
    let image = app.upload_ok("deep.png", deep).await;
    let response = app.get(&variant_path(&image, "thumb")).await;
    assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "VARIANT_FAILED").await;
    let shown = app.image(image["id"].as_str().unwrap()).await;
    let reason = shown["variants"]["thumb"]["reason"].as_str().unwrap();
    assert!(reason.to_lowercase().contains("limit"), "{reason}");
    assert!(
        LARGEST.load(Ordering::Relaxed) < 256 << 20,
        "a decode allocated {} bytes",
        LARGEST.load(Ordering::Relaxed)
    );
}

async fn a_corrupt_image_is_marked_failed_and_its_original_still_served(b: Backends) {
    let app = spawn_app(b).await;
    // Complete and well-formed to the upload's checks, but its pixel data is one byte.
    let corrupt = png(64, 64, 9);
    let image = app.upload_ok("corrupt.png", corrupt.clone()).await;
    for name in ["thumb", "preview"] {
        assert_error(app.get(&variant_path(&image, name)).await, StatusCode::UNPROCESSABLE_ENTITY, "VARIANT_FAILED")
            .await;
    }
    let shown = app.image(image["id"].as_str().unwrap()).await;
    assert_eq!(shown["variants"]["preview"]["state"], "failed");
    assert!(shown["variants"]["preview"]["reason"].as_str().is_some_and(|r| !r.is_empty()));
    let original = app.download(image["id"].as_str().unwrap()).await;
    assert_eq!(original.status(), StatusCode::OK);
    assert_eq!(original.bytes().await.unwrap().to_vec(), corrupt);
    let renders = app.variants.renders();
    app.get(&variant_path(&image, "thumb")).await;
    assert_eq!(app.variants.renders(), renders, "a failure is recorded, not retried on every request");
}

/// A failure records the pixel limit it failed under: an instance with a higher limit makes
/// the variant (before, it stayed `failed` until a backfill was run by hand).
async fn a_variant_too_large_for_the_pixel_limit_is_made_once_the_limit_is_raised(b: Backends) {
    let low_limit = |settings: &mut chitram::config::Settings| settings.variants.max_pixels = 100_000;
    let mut app = spawn_app_with(b, TestOptions { adjust: Some(low_limit), ..TestOptions::default() }).await;
    let image = app.upload_ok("photo.jpg", halves_jpeg(640, 480)).await;
    let path = variant_path(&image, "thumb");
    assert_error(app.get(&path).await, StatusCode::UNPROCESSABLE_ENTITY, "VARIANT_FAILED").await;
    let renders = app.variants.renders();
    assert_error(app.get(&path).await, StatusCode::UNPROCESSABLE_ENTITY, "VARIANT_FAILED").await;
    assert_eq!(app.variants.renders(), renders, "under the same limit the failure stands");

    // The instance restarted with a higher limit (one `serve` per SQLite file at a time).
    app.stop_serving().await;
    let raised = app.spawn_sibling_adjusted(0, |settings| settings.variants.max_pixels = 1_000_000).await;
    let response = raised.get(&path).await;
    assert_eq!(response.status(), StatusCode::OK);
    let thumb = decode(&response.bytes().await.unwrap());
    assert_eq!(thumb.dimensions(), (256, 256));
    let shown: Value =
        raised.get(&format!("/api/v1/images/{}", image["id"].as_str().unwrap())).await.json().await.unwrap();
    assert_eq!(shown["variants"]["thumb"]["state"], "ready");
}

async fn concurrent_first_requests_generate_once(b: Backends) {
    let app = spawn_app(b).await;
    let image = app.upload_ok("photo.jpg", halves_jpeg(1600, 1200)).await;
    let path = variant_path(&image, "thumb");
    let requests = (0..8).map(|_| async {
        let response = app.get(&path).await;
        assert_eq!(response.status(), StatusCode::OK);
        let etag = response.headers()[header::ETAG].to_str().unwrap().to_owned();
        (etag, response.bytes().await.unwrap())
    });
    let answers = futures::future::join_all(requests).await;
    assert!(answers.windows(2).all(|pair| pair[0] == pair[1]), "every request gets the same variant");
    assert_eq!(app.variants.renders(), 1, "eight concurrent first requests, one generation");
    app.get(&path).await;
    assert_eq!(app.variants.renders(), 1, "a ready variant is served, not made again");
}

async fn serving_has_caching_headers_and_clear_errors(b: Backends) {
    let app = spawn_app(b).await;
    let image = app.upload_ok("photo.jpg", halves_jpeg(640, 480)).await;
    // The URL the image's JSON gives carries the spec's version: cached for good under it.
    let path = image["variants"]["thumb"]["url"].as_str().unwrap().to_owned();
    assert!(path.starts_with(&format!("{}?v=", variant_path(&image, "thumb"))), "{path}");
    let head = app.client.head(app.url(&path)).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    let etag = head.headers()[header::ETAG].to_str().unwrap().to_owned();
    let length: usize = head.headers()[header::CONTENT_LENGTH].to_str().unwrap().parse().unwrap();
    assert!(head.headers()[header::CACHE_CONTROL].to_str().unwrap().contains("immutable"));
    assert_eq!(head.headers()[header::CONTENT_SECURITY_POLICY], "sandbox");
    // Without it, or with another spec's version, the same bytes are revalidated each time: a
    // changed spec (size, quality) is not served stale from a cache.
    for stale in [variant_path(&image, "thumb"), format!("{}?v=0123456789abcdef", variant_path(&image, "thumb"))] {
        let response = app.get(&stale).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CACHE_CONTROL], "public, no-cache", "{stale}");
        assert_eq!(response.headers()[header::ETAG].to_str().unwrap(), etag);
    }

    let got = app.get(&path).await;
    assert_eq!(got.headers()[header::ETAG].to_str().unwrap(), etag);
    assert_eq!(got.bytes().await.unwrap().len(), length);
    let cached = app.client.get(app.url(&path)).header(header::IF_NONE_MATCH, &etag).send().await.unwrap();
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(cached.headers()[header::ETAG].to_str().unwrap(), etag);

    assert_error(app.get(&variant_path(&image, "huge")).await, StatusCode::NOT_FOUND, "VARIANT_NOT_FOUND").await;
    let unknown = "/api/v1/images/0190c0de-0000-7000-8000-000000000000/variants/thumb";
    assert_error(app.get(unknown).await, StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND").await;
    assert_error(app.get("/api/v1/images/nope/variants/thumb").await, StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND").await;
}

/// The variant's blob as recorded.
async fn recorded_variant_blob(app: &TestApp, image: &Value, name: &str) -> BlobKey {
    let id = uuid::Uuid::parse_str(image["id"].as_str().unwrap()).unwrap();
    let variant = app.metadata.find_variant(id, name).await.unwrap().expect("the variant is recorded");
    assert_eq!(variant.state, VariantState::Ready);
    variant.blob.unwrap()
}

async fn a_variant_survives_the_loss_of_one_shard(b: Backends) {
    let app = spawn_app(b).await;
    let image = app.upload_ok("photo.jpg", halves_jpeg(640, 480)).await;
    let (bytes, _) = fetch_variant(&app, &image, "thumb").await;
    let blob = recorded_variant_blob(&app, &image, "thumb").await;
    app.replicate_until_idle().await;
    let copies = app.metadata.find_blob_copies(&blob).await.unwrap().unwrap();
    let stored: Vec<&str> =
        copies.replicas.iter().filter(|r| r.state == ReplicaState::Stored).map(|r| r.shard.as_str()).collect();
    assert_eq!(stored.len(), 2, "the variant is replicated like any blob: {copies:?}");

    app.take_shard_offline(stored[0]).await;
    let (after, _) = fetch_variant(&app, &image, "thumb").await;
    assert_eq!(after, bytes, "served from the other copy");
    assert_eq!(app.variants.renders(), 1, "not made again");
}

async fn deleting_images_releases_their_variant_blobs(b: Backends) {
    let app = spawn_app(b).await;
    let bytes = halves_jpeg(640, 480);
    let first = app.upload_ok("one.jpg", bytes.clone()).await;
    let second = app.upload_ok("two.jpg", bytes).await;
    let (thumb, _) = fetch_variant(&app, &first, "thumb").await;
    assert_eq!(fetch_variant(&app, &second, "thumb").await.0, thumb);
    let blob = recorded_variant_blob(&app, &first, "thumb").await;
    assert_eq!(recorded_variant_blob(&app, &second, "thumb").await, blob);
    let copies = app.metadata.find_blob_copies(&blob).await.unwrap().unwrap();
    assert_eq!(copies.ref_count, 2, "identical originals share one variant blob");
    assert_eq!(app.all_objects().len(), 2, "one original and one thumbnail, each stored once");

    assert_eq!(app.delete(first["id"].as_str().unwrap()).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.metadata.find_blob_copies(&blob).await.unwrap().unwrap().ref_count, 1);
    assert_eq!(app.all_objects().len(), 2);
    assert_eq!(fetch_variant(&app, &second, "thumb").await.0, thumb);

    assert_eq!(app.delete(second["id"].as_str().unwrap()).await.status(), StatusCode::NO_CONTENT);
    assert!(app.all_objects().is_empty(), "the last delete removes the variant's copies too");
    assert!(app.metadata.find_blob_copies(&blob).await.unwrap().is_none());
    assert_eq!(app.metadata.variant_queue_depth().await.unwrap(), 0, "the images' tasks went with them");
}

fn test_worker(app: &TestApp) -> VariantWorker {
    let settings = VariantWorkerSettings {
        lease: Duration::from_secs(30),
        retry: RetryPolicy { min: Duration::from_millis(50), max: Duration::from_secs(1) },
        idle_poll: Duration::from_millis(50),
    };
    VariantWorker::new(app.variants.clone(), settings, "test-variant-worker".into())
}

async fn the_durable_queue_makes_variants_without_requests(b: Backends) {
    let app = spawn_app(b).await;
    let first = app.upload_ok("a.png", solid_png(300, 200, 3)).await;
    let _dedup = app.upload_ok("b.png", solid_png(300, 200, 3)).await;
    assert_eq!(app.metadata.variant_queue_depth().await.unwrap(), 4, "both paths queue one task per variant");

    // The tasks are rows, committed with the uploads: a worker started now finds them.
    let worker = test_worker(&app);
    let mut steps = Vec::new();
    loop {
        match worker.try_run_next().await.unwrap() {
            VariantStep::Idle => break,
            step => steps.push(step),
        }
    }
    assert_eq!(steps, vec![VariantStep::Done; 4]);
    let shown = app.image(first["id"].as_str().unwrap()).await;
    assert_eq!(shown["variants"]["thumb"]["state"], "ready");
    assert_eq!(shown["variants"]["preview"]["state"], "ready");
    assert_eq!(app.metadata.variant_queue_depth().await.unwrap(), 0);

    // And the background workers of `serve` do the same.
    let app = spawn_app_with(b, TestOptions { variant_workers: 1, ..TestOptions::default() }).await;
    let image = app.upload_ok("c.png", solid_png(300, 200, 4)).await;
    let id = image["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(30), "the worker makes both variants", || {
        let (app, id) = (&app, id.clone());
        async move {
            let shown = app.image(&id).await;
            shown["variants"]["thumb"]["state"] == "ready" && shown["variants"]["preview"]["state"] == "ready"
        }
    })
    .await;
}

/// A stop that comes while a variant worker's claim is committing leaves no task claimed: the
/// worker finishes the claim, gives the task up and releases it (Postgres, whose triggers can
/// hold a `COMMIT` in flight; the replication suite has the same test for its workers).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_stop_during_a_variant_workers_claim_leaves_the_task_unclaimed() {
    let mut app =
        spawn_app_with(Backends::POSTGRES_S3, TestOptions { variant_workers: 1, ..TestOptions::default() }).await;
    let url = app.database.url.clone();
    slow_down_claim_commits(&url, TaskQueue::Variants).await;
    app.upload_ok("claimed.png", solid_png(300, 200, 21)).await;
    app.shut_down_while_a_claim_commits().await;
    assert_eq!(claimed_tasks(&url, TaskQueue::Variants).await, 0, "no claim outlives the instance");
    assert_eq!(app.metadata.variant_queue_depth().await.unwrap(), 2, "both variants are still to make");
}

async fn backfill_makes_missing_and_stale_variants_and_resumes(b: Backends) {
    use chitram::maintenance::progress::Silent;
    use chitram::variants::backfill::backfill;
    use tokio_util::sync::CancellationToken;

    let app = spawn_app(b).await;
    for seed in 0..3 {
        app.upload_ok("p.png", solid_png(300, 200, 10 + seed)).await;
    }
    let stop = CancellationToken::new();
    let summary = backfill(&app.variants, &Silent, &stop).await.unwrap();
    assert_eq!((summary.images, summary.generated, summary.already_current), (3, 6, 0), "{summary:?}");
    let again = backfill(&app.variants, &Silent, &stop).await.unwrap();
    assert_eq!((again.generated, again.already_current), (0, 6), "{again:?}");

    // The config changes `thumb` and adds `tiny`: existing images get the new ones made.
    let mut settings = app.settings.clone();
    let set = |width, height, fit| chitram::config::VariantSettings { width, height, fit };
    use chitram::variants::spec::Fit;
    settings.variants.sets.insert("thumb".into(), set(128, 128, Fit::Cover));
    settings.variants.sets.insert("preview".into(), set(1280, 1280, Fit::Contain));
    settings.variants.sets.insert("tiny".into(), set(32, 32, Fit::Cover));
    let (images, changed) = chitram::app::image_services(&settings, &app.metadata, &app.router).unwrap();
    let listed = images.list(None, None, None).await.unwrap();
    assert!(
        listed
            .items
            .iter()
            .all(|image| image.variants.iter().any(|v| v.name == "tiny" && v.state == VariantState::Pending))
    );
    let ids: Vec<uuid::Uuid> = app.metadata.image_ids_after(None, 10).await.unwrap();

    // Resumes after the saved position: only the last image is left.
    app.metadata.save_backfill_cursor(Some(ids[1])).await.unwrap();
    let resumed = backfill(&changed, &Silent, &stop).await.unwrap();
    assert_eq!((resumed.images, resumed.generated, resumed.already_current), (1, 2, 1), "{resumed:?}");
    let rest = backfill(&changed, &Silent, &stop).await.unwrap();
    assert_eq!((rest.images, rest.generated, rest.already_current), (3, 4, 5), "{rest:?}");
    assert_eq!(app.metadata.load_backfill_cursor().await.unwrap(), None, "a finished run leaves no position");
    let first = images.find(&ids[0].to_string()).await.unwrap();
    let thumb = first.variants.iter().find(|v| v.name == "thumb").unwrap();
    assert_eq!((thumb.state, thumb.width, thumb.height), (VariantState::Ready, 128, 128));
}
