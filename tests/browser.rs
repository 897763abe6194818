//! The web pages in a real browser (Debian's Chromium through chromedriver) and over HTTP: the
//! gallery (sign up, upload three files of which one is refused, the grid, the detail view,
//! keyboard, delete, infinite scroll, a phone-sized window, a hostile filename shown as text)
//! and the operator dashboard (a shard's S3 server stops; its circuit turns open on the page).
//!
//! Screenshots of the last run are kept under `target/browser-screenshots/`.

mod common;
#[path = "common/webdriver.rs"]
mod webdriver;

use std::path::{Path, PathBuf};
use std::time::Duration;

use chitram::config::Settings;
use common::database::DbKind;
use common::images::png;
use common::{Backends, StorageKind, TestApp, TestOptions, assert_error, client_with_key, spawn_app_with};
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use webdriver::{Browser, Driver, keys, screenshot_dir};

const WAIT: Duration = Duration::from_secs(30);
const HOSTILE_NAME: &str = "<img src=x onerror=alert(1)>.png";

fn open_registration(settings: &mut Settings) {
    settings.auth.open_registration = true;
}

/// A real, decodable PNG (a small landscape whose colours depend on `seed`), so that
/// thumbnails are made and the screenshots show pictures.
fn picture(width: u32, height: u32, seed: u32) -> Vec<u8> {
    let palettes = [
        ([38, 70, 120], [244, 162, 97], [42, 110, 80]),
        ([20, 40, 80], [230, 111, 81], [64, 80, 60]),
        ([120, 180, 230], [255, 240, 200], [70, 140, 70]),
        ([60, 30, 90], [250, 200, 120], [40, 60, 90]),
        ([150, 200, 220], [255, 255, 230], [180, 150, 90]),
    ];
    let (sky, glow, land) = palettes[seed as usize % palettes.len()];
    let (w, h) = (width as f32, height as f32);
    let sun = (w * (0.2 + 0.15 * (seed % 5) as f32), h * (0.25 + 0.05 * (seed % 3) as f32));
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let ridge = h * (0.62 + 0.08 * ((fx / w) * 6.3 + seed as f32).sin() + 0.03 * ((fx / w) * 17.0).sin());
        if fy > ridge {
            let shade = 1.0 - 0.35 * ((fy - ridge) / (h - ridge + 1.0));
            return image::Rgb(land.map(|c| (c as f32 * shade) as u8));
        }
        let distance = ((fx - sun.0).powi(2) + (fy - sun.1).powi(2)).sqrt();
        if distance < h * 0.08 {
            return image::Rgb([255, 236, 170]);
        }
        let t = fy / ridge;
        let mix = |a: u8, b: u8| (a as f32 * (1.0 - t) + b as f32 * t) as u8;
        image::Rgb([mix(sky[0], glow[0]), mix(sky[1], glow[1]), mix(sky[2], glow[2])])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn screenshot_path(name: &str) -> PathBuf {
    screenshot_dir().join(format!("{name}.png"))
}

/// A browser on the app's pages; the driver and the profile live as long as it does.
struct Session {
    browser: Browser,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

async fn open_browser() -> Session {
    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = driver.session(profile.path()).await;
    Session { browser, _driver: driver, _profile: profile }
}

async fn type_into(browser: &Browser, css: &str, text: &str) {
    let element = browser.wait_for(css, WAIT).await;
    browser.send_keys(&element, text).await;
}

/// Signs in with an API key through the form's "Use an API key instead".
async fn sign_in_with_key(browser: &Browser, key: &str) {
    browser.click_css("#key-signin summary").await;
    type_into(browser, "#api-key", key).await;
    browser.click_css("#use-key").await;
}

async fn tiles(browser: &Browser) -> u64 {
    browser.eval("document.querySelectorAll('#grid .tile').length").await.as_u64().unwrap()
}

/// Waits until every thumbnail in the grid has loaded.
async fn thumbnails_loaded(browser: &Browser) {
    browser
        .wait_until(
            "[...document.querySelectorAll('#grid .tile img')].every(i => i.complete && i.naturalWidth > 0)",
            WAIT,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gallery_uploads_shows_and_deletes_images() {
    let options = TestOptions { adjust: Some(open_registration), ..TestOptions::default() };
    let app = spawn_app_with(Backends::SQLITE_FS, options).await;
    let session = open_browser().await;
    let browser = &session.browser;

    // Accounts are on and registration is open: the page asks who you are.
    browser.goto(&app.url("/")).await;
    browser.wait_for("#signin #register", WAIT).await;
    assert!(browser.find("#gallery:not([hidden])").await.is_none(), "no gallery before signing in");
    type_into(browser, "#username", "alice").await;
    type_into(browser, "#password", "a good password").await;
    browser.click_css("#register").await;
    browser.wait_for("#gallery:not([hidden])", WAIT).await;
    assert_eq!(browser.text(&browser.wait_for("#who", WAIT).await).await, "alice");

    // Three files by the file input: one is not an image.
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: Vec<u8>| {
        let path = files.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    };
    let paths = [
        write("sunrise.png", picture(640, 420, 0)),
        write(HOSTILE_NAME, picture(360, 480, 1)),
        write("notes.png", b"these are my notes, not a picture".to_vec()),
    ];
    let input = browser.wait_for("#file-input", WAIT).await;
    browser.send_keys(&input, &paths.join("\n")).await;
    browser.wait_until("document.querySelectorAll('#uploads .upload.ok').length === 2", WAIT).await;
    let refused = browser.wait_for("#uploads .upload.failed .result", WAIT).await;
    let refusal = browser.text(&refused).await;
    assert!(refusal.starts_with("INVALID_FILE_FORMAT: "), "the API's error shows: {refusal}");
    let refused_name = browser.eval("document.querySelector('#uploads .upload.failed .name').textContent").await;
    assert_eq!(refused_name, "notes.png");
    browser.wait_until("document.querySelectorAll('#grid .tile').length === 2", WAIT).await;

    // The hostile filename is text: no element was made from it and nothing ran.
    let captions = browser.eval("[...document.querySelectorAll('#grid .caption')].map(c => c.textContent)").await;
    assert!(captions.as_array().unwrap().contains(&json!(HOSTILE_NAME)), "{captions}");
    assert_eq!(browser.eval("document.querySelectorAll('img[src=\"x\"]').length").await, 0);
    assert!(!browser.alert_open().await, "no script ran");

    // Thumbnails are the `thumb` variant.
    thumbnails_loaded(browser).await;
    let sources = browser.eval("[...document.querySelectorAll('#grid .tile img')].map(i => i.currentSrc)").await;
    for source in sources.as_array().unwrap() {
        assert!(source.as_str().unwrap().contains("/variants/thumb"), "{source}");
    }
    browser.screenshot(&screenshot_path("gallery-uploads")).await;

    // The detail view, opened from the keyboard: the facts and the replicas; arrows move,
    // Escape closes.
    browser.execute("document.querySelector('#grid .tile').focus()", vec![]).await;
    browser.press(keys::ENTER).await;
    browser.wait_until("document.getElementById('detail').open", WAIT).await;
    let first = browser.eval("document.getElementById('detail-name').textContent").await;
    let tile_name = browser.eval("document.querySelector('#grid .tile .caption').textContent").await;
    assert_eq!(first, tile_name);
    browser.wait_until("document.querySelectorAll('#detail-replicas li').length === 2", WAIT).await;
    let replicas =
        browser.eval("[...document.querySelectorAll('#detail-replicas li')].map(li => li.textContent)").await;
    let replicas: Vec<String> = replicas.as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect();
    assert!(replicas.iter().any(|r| r.ends_with("stored")), "{replicas:?}");
    assert!(replicas.iter().all(|r| r.starts_with('s')), "shard names shown: {replicas:?}");
    let facts = browser.eval("document.getElementById('detail-facts').textContent").await;
    assert!(facts.as_str().unwrap().contains("image/png"), "{facts}");
    assert!(browser.find("#delete:not([hidden])").await.is_some(), "the owner may delete");
    browser.wait_until("document.getElementById('detail-image').naturalWidth > 0", WAIT).await;
    browser.screenshot(&screenshot_path("gallery-detail")).await;
    browser.press(keys::ARROW_RIGHT).await;
    browser.wait_until(&format!("document.getElementById('detail-name').textContent !== {first}"), WAIT).await;
    browser.press(keys::ARROW_LEFT).await;
    browser.wait_until(&format!("document.getElementById('detail-name').textContent === {first}"), WAIT).await;
    browser.press(keys::ESCAPE).await;
    browser.wait_until("!document.getElementById('detail').open", WAIT).await;

    // Make sunrise.png private: its thumbnail is then fetched with the credentials and shown
    // from an object URL. Its link is a signed URL.
    browser
        .execute("[...document.querySelectorAll('#grid .tile')].find(t => t.title === 'sunrise.png').click()", vec![])
        .await;
    browser.wait_until("document.getElementById('detail-name').textContent === 'sunrise.png'", WAIT).await;
    browser.click_css("#visibility").await;
    browser.wait_until("document.getElementById('detail-message').textContent === 'Now private'", WAIT).await;
    browser.click_css("#copy-link").await;
    let copied = browser
        .wait_until("document.getElementById('detail-message').textContent.match(/copied|signature=/)", WAIT)
        .await;
    assert!(!copied.is_null());
    browser.press(keys::ESCAPE).await;
    browser.wait_until("!document.getElementById('detail').open", WAIT).await;
    let private = "[...document.querySelectorAll('#grid .tile')].find(t => t.title === 'sunrise.png')";
    browser.wait_until(&format!("{private}.querySelector('.badge.private') !== null"), WAIT).await;
    browser
        .wait_until(&format!("{private}.querySelector('img').src.startsWith('blob:') && {private}.querySelector('img').naturalWidth > 0"), WAIT)
        .await;
    let image: Value = app.client.get(app.url("/api/v1/images?owner=*")).send().await.unwrap().json().await.unwrap();
    let sunrise = image["items"].as_array().unwrap().iter().find(|i| i["filename"] == "sunrise.png").unwrap();
    assert_eq!(sunrise["visibility"], "private");
    browser.screenshot(&screenshot_path("gallery-private")).await;

    // Delete the hostile one, after a confirmation.
    browser
        .execute("[...document.querySelectorAll('#grid .tile')].find(t => t.title.startsWith('<img')).click()", vec![])
        .await;
    browser.wait_until("document.getElementById('detail').open", WAIT).await;
    assert_eq!(browser.eval("document.getElementById('detail-name').textContent").await, HOSTILE_NAME);
    browser.click_css("#delete").await;
    browser.wait_for("#confirm:not([hidden])", WAIT).await;
    assert_eq!(app.image_count().await, 2, "nothing is deleted before the confirmation");
    browser.click_css("#confirm-delete").await;
    browser.wait_until("!document.getElementById('detail').open", WAIT).await;
    assert_eq!(tiles(browser).await, 1);
    assert_eq!(app.image_count().await, 1);
    browser.screenshot(&screenshot_path("gallery-after-delete")).await;

    // The dashboard is not for alice: she is told so, and gets no figures.
    browser.goto(&app.url("/admin")).await;
    let notice = browser.wait_for("#forbidden:not([hidden])", WAIT).await;
    assert!(browser.text(&notice).await.contains("Admins only"));
    assert!(browser.find("#dashboard:not([hidden])").await.is_none());
    session.browser.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grid_scrolls_into_the_next_page_without_shifting() {
    let app = spawn_app_with(Backends::SQLITE_FS, TestOptions::default()).await;
    // 30 pictures of several shapes, in two batches (20 files at most each): more than one
    // page (24).
    for seeds in [0..15u32, 15..30] {
        let mut form = Form::new();
        for seed in seeds {
            let (width, height) = [(640, 420), (420, 560), (800, 400), (500, 500), (600, 450)][seed as usize % 5];
            let part = Part::bytes(picture(width, height, seed)).file_name(format!("landscape-{seed:02}.png"));
            form = form.part("files", part);
        }
        let batch = app.client.post(app.url("/api/v1/images/batch")).multipart(form).send().await.unwrap();
        let batch: Value = batch.json().await.unwrap();
        assert_eq!(batch["succeeded"], 15, "{batch}");
    }

    let session = open_browser().await;
    let browser = &session.browser;
    browser.goto(&app.url("/")).await;
    browser.wait_for("#signin", WAIT).await;
    sign_in_with_key(browser, app.admin_key.as_deref().unwrap()).await;
    browser.wait_until("document.querySelectorAll('#grid .tile').length >= 24", WAIT).await;
    // Each tile has its image's shape before the image arrives: record the boxes now.
    let boxes = "[...document.querySelectorAll('#grid .tile')].slice(0, 12).map(t => { const r = t.getBoundingClientRect(); return [Math.round(r.x), Math.round(r.y), Math.round(r.width), Math.round(r.height)]; })";
    let before = browser.eval(boxes).await;
    thumbnails_loaded(browser).await;
    assert_eq!(browser.eval(boxes).await, before, "no layout shift while thumbnails load");
    let shapes = browser
        .eval("[...document.querySelectorAll('#grid .tile')].map(t => { const r = t.getBoundingClientRect(); const i = t.querySelector('img'); return Math.abs(r.width / r.height - i.width / i.height) < 0.05; })")
        .await;
    assert!(shapes.as_array().unwrap().iter().all(|fits| fits == &json!(true)), "{shapes}");
    browser.screenshot(&screenshot_path("gallery")).await;
    assert_eq!(tiles(browser).await, 24, "one page until the page scrolls");

    browser.execute("window.scrollTo(0, document.body.scrollHeight)", vec![]).await;
    browser.wait_until("document.querySelectorAll('#grid .tile').length === 30", WAIT).await;
    let names = browser.eval("[...document.querySelectorAll('#grid .caption')].map(c => c.textContent)").await;
    let mut names: Vec<String> = names.as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_owned()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 30, "every image once");

    // A phone-sized window: one column of content, nothing wider than the screen.
    browser.set_window_size(390, 844).await;
    browser.execute("window.scrollTo(0, 0)", vec![]).await;
    browser.wait_until("window.innerWidth <= 420", WAIT).await;
    assert_eq!(browser.eval("document.documentElement.scrollWidth <= window.innerWidth").await, true);
    browser.screenshot(&screenshot_path("gallery-phone")).await;
    browser.click_css("#grid .tile").await;
    browser.wait_until("document.getElementById('detail').open", WAIT).await;
    browser.wait_until("document.getElementById('detail-image').naturalWidth > 0", WAIT).await;
    assert_eq!(
        browser.eval("document.getElementById('detail').getBoundingClientRect().width <= window.innerWidth").await,
        true
    );
    browser.screenshot(&screenshot_path("gallery-phone-detail")).await;
    session.browser.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_shard_going_down() {
    let backends = Backends { db: DbKind::Sqlite, storage: StorageKind::S3 };
    let app = spawn_app_with(backends, TestOptions::default()).await;
    for seed in 0..12 {
        app.upload_ok(&format!("p{seed}.png"), png(8, 8, seed)).await;
    }
    app.replicate_until_idle().await;
    for seed in 12..16 {
        app.upload_ok(&format!("p{seed}.png"), png(8, 8, seed)).await;
    }

    let session = open_browser().await;
    let browser = &session.browser;
    browser.goto(&app.url("/admin")).await;
    browser.wait_for("#signin", WAIT).await;
    sign_in_with_key(browser, app.admin_key.as_deref().unwrap()).await;
    browser.wait_for("#dashboard:not([hidden])", WAIT).await;
    browser.wait_until("document.querySelectorAll('#shards tbody tr').length === 3", WAIT).await;
    let circuits = "[...document.querySelectorAll('#shards tbody tr')].map(r => r.dataset.shard + ':' + r.querySelector('.circuit').textContent)";
    assert_eq!(browser.eval(circuits).await, json!(["s0:closed", "s1:closed", "s2:closed"]));
    let objects: u64 = browser
        .eval("[...document.querySelectorAll('#shards .objects')].reduce((n, c) => n + Number(c.textContent), 0)")
        .await
        .as_u64()
        .unwrap();
    assert_eq!(objects, 12 * 2 + 4, "every stored copy is counted");
    assert_eq!(browser.eval("document.querySelector('#queue-depth .value').textContent").await, "4");
    assert_eq!(browser.eval("document.querySelector('#copies-pending strong').textContent").await, "4");
    let ring = browser.eval("document.getElementById('ring').textContent").await;
    assert!(ring.as_str().unwrap().contains("Peak-to-mean"), "{ring}");
    browser.screenshot(&screenshot_path("dashboard-healthy")).await;

    // s1's S3 server stops: the page's own refreshes (health checks) open its circuit.
    app.take_shard_offline("s1").await;
    browser
        .wait_until(
            "document.querySelector('#shards tr[data-shard=\"s1\"] .circuit').textContent === 'open'",
            Duration::from_secs(60),
        )
        .await;
    let health = browser.eval("document.querySelector('#shards tr[data-shard=\"s1\"] .health').textContent").await;
    assert!(health.as_str().unwrap().starts_with("down"), "{health}");
    assert_eq!(browser.eval("document.querySelector('#open-circuits .value').textContent").await, "1");
    assert_eq!(
        browser
            .eval(circuits)
            .await
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c.as_str().unwrap().ends_with(":closed"))
            .count(),
        2
    );

    // Replication towards s1 fails: the failing tasks and their last error show.
    app.replicate_until_idle().await;
    browser.wait_for("#failing:not([hidden]) tbody tr", WAIT).await;
    let last_error = browser.eval("document.querySelector('#failing tbody tr .error-text').textContent").await;
    assert!(!last_error.as_str().unwrap().is_empty(), "the last error shows");
    browser.screenshot_full_page(&screenshot_path("dashboard")).await;

    // On a phone the tables scroll sideways inside their frames; the page itself does not.
    browser.set_window_size(390, 844).await;
    browser.wait_until("window.innerWidth <= 420", WAIT).await;
    assert_eq!(browser.eval("document.documentElement.scrollWidth <= window.innerWidth").await, true);
    browser.screenshot(&screenshot_path("dashboard-phone")).await;
    session.browser.quit().await;
}

// ---- over HTTP: what the pages are served with, and who may call what they call ----------

async fn text_of(response: reqwest::Response) -> String {
    response.text().await.unwrap()
}

/// The versioned asset paths an HTML page names.
fn asset_paths(html: &str) -> Vec<String> {
    html.split('"').filter(|part| part.starts_with("/assets/")).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_assets_are_served_with_a_strict_policy() {
    let app = spawn_app_with(Backends::SQLITE_FS, TestOptions::default()).await;
    let anonymous = reqwest::Client::new();
    for page in ["/", "/admin"] {
        // The shells hold no data: anyone gets them.
        let response = anonymous.get(app.url(page)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{page}");
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        let policy = headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "object-src 'none'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ] {
            assert!(policy.contains(directive), "{page}: {policy}");
        }
        assert!(!policy.contains("unsafe-inline") && !policy.contains("unsafe-eval"), "{policy}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let html = text_of(response).await;
        assert!(!html.contains("style=\"") && !html.contains("<script>"), "no inline style or script");
        let etag = headers["etag"].clone();
        let again = anonymous.get(app.url(page)).header("if-none-match", etag).send().await.unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);

        let assets = asset_paths(&html);
        assert!(assets.len() >= 3, "{assets:?}");
        for asset in assets {
            let response = anonymous.get(app.url(&asset)).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{asset}");
            let expected = match asset.rsplit('.').next().unwrap() {
                "js" => "text/javascript; charset=utf-8",
                "css" => "text/css; charset=utf-8",
                "svg" => "image/svg+xml",
                other => panic!("unexpected asset type {other}"),
            };
            assert_eq!(response.headers()["content-type"], expected, "{asset}");
            assert_eq!(response.headers()["cache-control"], "public, max-age=31536000, immutable", "{asset}");
            let etag = response.headers()["etag"].clone();
            let again = anonymous.get(app.url(&asset)).header("if-none-match", etag).send().await.unwrap();
            assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{asset}");
        }
    }
    // An older version's path gets today's bytes, without the promise to keep them a year.
    let stale = anonymous.get(app.url("/assets/0000000000000000/api.js")).send().await.unwrap();
    assert_eq!(stale.status(), StatusCode::OK);
    assert_eq!(stale.headers()["cache-control"], "no-cache");
    assert_error(
        anonymous.get(app.url("/assets/0000000000000000/nothing.js")).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    )
    .await;
}

mod the_storage_overview_is_for_admins_only {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        storage_overview(DbKind::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        storage_overview(DbKind::Postgres).await;
    }
}

async fn storage_overview(db: DbKind) {
    let options = TestOptions { adjust: Some(open_registration), ..TestOptions::default() };
    let app = spawn_app_with(Backends { db, storage: StorageKind::Fs }, options).await;
    let anonymous = reqwest::Client::new();
    let credentials = json!({"username": "bob", "password": "a good password"});
    let registered = anonymous.post(app.url("/api/v1/auth/register")).json(&credentials).send().await.unwrap();
    assert_eq!(registered.status(), StatusCode::CREATED);
    let login: Value =
        anonymous.post(app.url("/api/v1/auth/login")).json(&credentials).send().await.unwrap().json().await.unwrap();
    let bob = client_with_key(login["access_token"].as_str());
    for seed in 0..3 {
        app.upload_ok(&format!("p{seed}.png"), png(8, 8, seed)).await;
    }

    let overview = app.url("/api/v1/admin/storage");
    assert_error(anonymous.get(&overview).send().await.unwrap(), StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    assert_error(bob.get(&overview).send().await.unwrap(), StatusCode::FORBIDDEN, "FORBIDDEN").await;
    let response = app.get("/api/v1/admin/storage").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let shards = body["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 3);
    for shard in shards {
        assert_eq!(shard["status"], "ok", "{shard}");
        assert_eq!(shard["circuit"], "closed", "{shard}");
        assert_eq!(shard["weight"], 1);
        assert_eq!(shard["vnodes"], app.settings.placement.vnodes_per_weight);
        assert!((shard["weight_share"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9);
        assert!(shard["latency_ms"].as_f64().unwrap() >= 0.0);
    }
    // Three uploads, one stored copy each so far (no workers): 3 objects, 3 pending copies.
    let objects: u64 = shards.iter().map(|s| s["objects"].as_u64().unwrap()).sum();
    assert_eq!(objects, 3, "{body}");
    let shares: f64 = shards.iter().map(|s| s["data_share"].as_f64().unwrap()).sum();
    assert!((shares - 1.0).abs() < 1e-9, "{body}");
    assert_eq!(body["replicas"], json!({"pending": 3, "stored": 3, "missing": 0, "deleting": 0}));
    assert_eq!(body["ring"]["tokens"], 3 * app.settings.placement.vnodes_per_weight);
    assert_eq!(body["ring"]["replication_factor"], 2);
    let peak = body["ring"]["peak_to_mean"].as_f64().unwrap();
    assert!((1.0..1.2).contains(&peak), "{peak}");

    // The page learns from /health whether accounts are on and registration is open.
    let health: Value = anonymous.get(app.url("/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["accounts"], json!({"enabled": true, "open_registration": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_accounts_off_the_pages_work_anonymously() {
    let app: TestApp = spawn_app_with(Backends::SQLITE_FS, TestOptions { auth: false, ..TestOptions::default() }).await;
    let anonymous = reqwest::Client::new();
    let health: Value = anonymous.get(app.url("/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["accounts"], json!({"enabled": false, "open_registration": false}));
    assert_eq!(anonymous.get(app.url("/api/v1/admin/storage")).send().await.unwrap().status(), StatusCode::OK);

    // No sign-in: the gallery takes a file at once, and the dashboard shows its figures.
    let session = open_browser().await;
    let browser = &session.browser;
    browser.goto(&app.url("/")).await;
    browser.wait_for("#gallery:not([hidden])", WAIT).await;
    assert!(browser.find("#signin").await.is_none());
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("meadow.png");
    let meadow = picture(480, 320, 2);
    std::fs::write(&path, &meadow).unwrap();
    // The page declares each file's SHA-256 with its upload (the server checks it).
    let record_headers = "window.sentHeaders = []; const set = XMLHttpRequest.prototype.setRequestHeader; \
        XMLHttpRequest.prototype.setRequestHeader = function (name, value) { \
        window.sentHeaders.push([name, value]); return set.call(this, name, value); };";
    browser.execute(record_headers, vec![]).await;
    let input = browser.wait_for("#file-input", WAIT).await;
    browser.send_keys(&input, &path.display().to_string()).await;
    browser.wait_until("document.querySelectorAll('#grid .tile').length === 1", WAIT).await;
    assert_eq!(app.image_count().await, 1);
    let declared = browser.eval("window.sentHeaders.filter(([name]) => name === 'X-Checksum-SHA256')").await;
    assert_eq!(declared, json!([["X-Checksum-SHA256", common::images::sha256_hex(&meadow)]]));
    // A file dropped on the drop zone (made in the page: a drop cannot come from outside the
    // browser under WebDriver) is uploaded the same way.
    let drop = "const canvas = document.createElement('canvas'); canvas.width = 300; canvas.height = 200; \
        const g = canvas.getContext('2d'); g.fillStyle = '#3a7'; g.fillRect(0, 0, 300, 200); \
        canvas.toBlob(blob => { const dt = new DataTransfer(); \
        dt.items.add(new File([blob], 'dropped.png', { type: 'image/png' })); \
        document.getElementById('dropzone').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true })); \
        }, 'image/png');";
    browser.execute(drop, vec![]).await;
    browser.wait_until("document.querySelectorAll('#grid .tile').length === 2", WAIT).await;
    assert_eq!(browser.eval("document.querySelector('#grid .tile .caption').textContent").await, "dropped.png");
    assert_eq!(app.image_count().await, 2);
    browser.goto(&app.url("/admin")).await;
    browser.wait_until("document.querySelectorAll('#shards tbody tr').length === 3", WAIT).await;
    let objects = "[...document.querySelectorAll('#shards .objects')].reduce((n, c) => n + Number(c.textContent), 0)";
    // The image's first copy, and its thumbnail's once the grid asked for it.
    browser.wait_until(&format!("{objects} >= 1"), WAIT).await;
    session.browser.quit().await;
}

/// The screenshots are where the README says they are.
#[test]
fn the_readme_shows_the_committed_screenshots() {
    let readme = include_str!("../README.md");
    for image in ["docs/images/gallery.png", "docs/images/dashboard.png"] {
        assert!(readme.contains(image), "README shows {image}");
        assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(image).exists(), "{image} is committed");
    }
}
