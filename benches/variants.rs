//! Variants: what a thumbnail costs, which resize library to use, how much memory one decode
//! takes, and how long a burst of uploads waits for its variants (BENCHMARKS.md, "Variants").
//!
//! Three parts, in one run so that ratios compare like with like:
//! 1. criterion: the default `thumb` (256×256 cover) and `preview` (1280×1280 contain) of a
//!    12 MP JPEG and of a 4000×3000 PNG with alpha, through Chitram's pipeline, with and
//!    without JPEG shrink-on-load, resized by `fast_image_resize` or by `image`'s own resize
//!    (the baseline: `image` alone, full decode);
//! 2. peak heap of one render against the decoded image's size, and bytes of the default
//!    thumbnail against the original (a counting allocator);
//! 3. upload to `ready`: 100 uploads at once into the real application (SQLite, three fs
//!    shards, default decode threads and workers), timed until every variant is ready.
//!
//! `CHITRAM_BENCH_PHASES` picks a subset of `speed,memory,burst` (default: all).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chitram::variants::pipeline::{Pipeline, ResizeEngine};
use chitram::variants::spec::{Encoding, VariantSpec};
use criterion::{Criterion, SamplingMode};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{ImageEncoder, Rgb, RgbImage, Rgba, RgbaImage};

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A photograph-like 4000×3000 JPEG: smooth gradients with fine noise, so that the encoder
/// and the decoder do the work a real photo costs (a flat image compresses to nothing).
fn photo_jpeg() -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let image = RgbImage::from_fn(4000, 3000, |x, y| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state % 24) as u8;
        Rgb([((x / 16) % 256) as u8 ^ noise, ((y / 12) % 256) as u8, (((x + y) / 28) % 256) as u8 ^ noise])
    });
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, 88).encode_image(&image).expect("encoding the fixture");
    bytes
}

/// A 4000×3000 RGBA PNG: a gradient with a transparent disc.
fn alpha_png() -> Vec<u8> {
    let image = RgbaImage::from_fn(4000, 3000, |x, y| {
        let (dx, dy) = (x as i64 - 2000, y as i64 - 1500);
        let alpha = if dx * dx + dy * dy < 1000 * 1000 { 0 } else { 255 };
        Rgba([(x % 256) as u8, (y % 256) as u8, ((x ^ y) % 256) as u8, alpha])
    });
    let mut bytes = Vec::new();
    PngEncoder::new(&mut bytes)
        .write_image(image.as_raw(), 4000, 3000, image::ExtendedColorType::Rgba8)
        .expect("encoding the fixture");
    bytes
}

fn pipeline(shrink_on_load: bool, engine: ResizeEngine) -> Pipeline {
    Pipeline { shrink_on_load, engine, ..Pipeline::new(100_000_000, Encoding::default()) }
}

const CASES: [(&str, bool, ResizeEngine); 4] = [
    ("image alone, full decode (baseline)", false, ResizeEngine::ImageCrate),
    ("full decode + fast_image_resize", false, ResizeEngine::Fast),
    ("shrink-on-load + image resize", true, ResizeEngine::ImageCrate),
    ("shrink-on-load + fast_image_resize (Chitram)", true, ResizeEngine::Fast),
];

fn speed(c: &mut Criterion, jpeg: &[u8], png: &[u8]) {
    let [thumb, preview] = <[VariantSpec; 2]>::try_from(VariantSpec::default_set()).expect("two defaults");
    for (source, name, bytes) in [("12 MP JPEG", "jpeg", jpeg), ("4000x3000 PNG with alpha", "png", png)] {
        for spec in [&thumb, &preview] {
            let mut group = c.benchmark_group(format!("{} of a {source}", spec.name));
            group.sampling_mode(SamplingMode::Flat).sample_size(10).measurement_time(Duration::from_secs(8));
            for (label, shrink, engine) in CASES {
                // Shrink-on-load only concerns JPEGs.
                if name == "png" && shrink {
                    continue;
                }
                let pipeline = pipeline(shrink, engine);
                group.bench_function(label, |b| b.iter(|| black_box(pipeline.render(black_box(bytes), spec).unwrap())));
            }
            group.finish();
        }
    }
}

/// Peak heap of one render, beyond what was live before it (the source bytes included).
fn peak_of(pipeline: &Pipeline, source: &[u8], spec: &VariantSpec) -> (usize, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let rendered = pipeline.render(source, spec).unwrap();
    (PEAK.load(Ordering::Relaxed) - before, rendered.bytes.len())
}

fn memory(jpeg: &[u8], png: &[u8]) {
    let thumb = &VariantSpec::default_set()[0];
    println!("\n## Peak heap of one render (the decoded image's size for comparison)\n");
    println!("| source | path | peak heap | decoded image | ratio |");
    println!("|---|---|---|---|---|");
    let full_rgb = 4000 * 3000 * 3;
    let eighth_rgb = 500 * 375 * 3;
    let rows: [(&str, &[u8], bool, usize, &str); 3] = [
        ("12 MP JPEG", jpeg, false, full_rgb, "full decode"),
        ("12 MP JPEG", jpeg, true, eighth_rgb, "shrink-on-load (1/8)"),
        ("4000x3000 PNG, alpha", png, false, 4000 * 3000 * 4, "full decode"),
    ];
    for (source, bytes, shrink, decoded, path) in rows {
        let (peak, _) = peak_of(&pipeline(shrink, ResizeEngine::Fast), bytes, thumb);
        println!(
            "| {source} | {path} | {:.1} MiB | {:.1} MiB | {:.2}x |",
            peak as f64 / 1048576.0,
            decoded as f64 / 1048576.0,
            peak as f64 / decoded as f64
        );
    }
    let (_, thumb_bytes) = peak_of(&pipeline(true, ResizeEngine::Fast), jpeg, thumb);
    println!(
        "\nDefault thumb of the 12 MP JPEG: {thumb_bytes} bytes, {:.2}% of the original's {} bytes",
        100.0 * thumb_bytes as f64 / jpeg.len() as f64,
        jpeg.len()
    );
}

/// 100 uploads at once into the real application; the time until every variant is ready.
async fn burst() {
    use chitram::app::Application;
    use chitram::config::{Settings, ShardSettings};
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut settings = Settings::default();
    settings.server.bind = "127.0.0.1:0".parse().unwrap();
    settings.database.url = format!("sqlite://{}", dir.path().join("bench.db").display());
    settings.shards = (0..3).map(|i| ShardSettings::fs(&format!("s{i}"), dir.path().join(format!("s{i}")))).collect();
    settings.replication.idle_poll_ms = 20;
    let app = Application::build(&settings).await.expect("the app builds");
    let address = format!("http://{}", app.local_addr());
    let metadata = app.metadata();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    // A 2 MP photo each, unique by one pixel.
    let base = RgbImage::from_fn(1600, 1200, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8]));
    let uploads: Vec<Vec<u8>> = (0..100u32)
        .map(|n| {
            let mut image = base.clone();
            image.put_pixel(0, 0, Rgb([n as u8, (n >> 8) as u8, 7]));
            let mut bytes = Vec::new();
            JpegEncoder::new_with_quality(&mut bytes, 85).encode_image(&image).unwrap();
            bytes
        })
        .collect();
    let client = reqwest::Client::new();
    let started = Instant::now();
    let sends = uploads.into_iter().map(|bytes| {
        let (client, address) = (client.clone(), address.clone());
        async move {
            let part = reqwest::multipart::Part::bytes(bytes).file_name("photo.jpg");
            let form = reqwest::multipart::Form::new().part("file", part);
            let response = client.post(format!("{address}/api/v1/images/upload")).multipart(form).send().await.unwrap();
            assert_eq!(response.status(), 201);
        }
    });
    futures::future::join_all(sends).await;
    let acknowledged = started.elapsed();
    loop {
        if metadata.variant_queue_depth().await.unwrap() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = started.elapsed();
    println!("\n## Burst: 100 uploads of a 2 MP JPEG at once (SQLite, 3 fs shards, default threads)\n");
    println!(
        "all acknowledged after {:.2} s; every variant (200) ready after {:.2} s",
        acknowledged.as_secs_f64(),
        ready.as_secs_f64()
    );
    let _ = stop.send(());
    let _ = server.await;
}

fn main() {
    let phases = std::env::var("CHITRAM_BENCH_PHASES").unwrap_or_else(|_| "speed,memory,burst".to_owned());
    let (jpeg, png) = (photo_jpeg(), alpha_png());
    println!("fixtures: 12 MP JPEG of {} bytes, 4000x3000 RGBA PNG of {} bytes", jpeg.len(), png.len());
    if phases.contains("speed") {
        let mut criterion = Criterion::default().configure_from_args();
        speed(&mut criterion, &jpeg, &png);
        criterion.final_summary();
    }
    if phases.contains("memory") {
        memory(&jpeg, &png);
    }
    if phases.contains("burst") {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
        runtime.block_on(burst());
    }
}
