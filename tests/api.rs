//! The HTTP contract, end to end: the real app over real shards and a real database, each test
//! on SQLite and on Postgres.

mod common;

use std::time::Duration;

use common::images::{jpeg, large_png, png, sha256_hex};
use common::{Backends, TestOptions, assert_error, spawn_app, spawn_app_with};
use reqwest::StatusCode;
use reqwest::header;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

behaviours!(
    upload_round_trips_byte_for_byte,
    large_uploads_spool_and_round_trip,
    download_headers_and_revalidation,
    identical_uploads_share_one_blob_until_the_last_delete,
    deleted_images_are_gone,
    unknown_ids_are_not_found,
    list_pages_newest_first_without_repeats,
    list_rejects_bad_cursors_and_limits,
    paging_while_uploads_happen_neither_repeats_nor_skips,
    batch_reports_each_file,
    batch_without_files_is_rejected,
    filenames_are_sanitised,
);

async fn upload_round_trips_byte_for_byte(b: Backends) {
    let app = spawn_app(b).await;
    let bytes = png(640, 480, 1);
    let response = app.upload("cat.png", bytes.clone()).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()[header::LOCATION].to_str().unwrap().to_owned();
    let image: Value = response.json().await.unwrap();

    let id = image["id"].as_str().unwrap();
    assert_eq!(location, format!("/api/v1/images/{id}"));
    assert_eq!(image["filename"], "cat.png");
    assert_eq!(image["content_type"], "image/png");
    assert_eq!(image["file_size"], bytes.len());
    assert_eq!((image["width"].as_u64(), image["height"].as_u64()), (Some(640), Some(480)));
    assert_eq!(image["checksum"], sha256_hex(&bytes));
    assert_eq!(image["storage_key"], sha256_hex(&bytes));
    assert_eq!(image["url"], format!("/api/v1/images/{id}/file"));
    assert!(chrono::DateTime::parse_from_rfc3339(image["created_at"].as_str().unwrap()).is_ok());
    let states: Vec<&str> =
        image["replicas"].as_array().unwrap().iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(states.iter().filter(|s| **s == "stored").count(), 1, "{image}");
    assert_eq!(states.iter().filter(|s| **s == "pending").count(), 1, "RF 2 leaves one copy for replication: {image}");

    let fetched: Value = app.get(&location).await.json().await.unwrap();
    assert_eq!(fetched, image);
    let download = app.download(id).await;
    assert_eq!(download.status(), StatusCode::OK);
    assert_eq!(download.bytes().await.unwrap().to_vec(), bytes);
}

async fn large_uploads_spool_and_round_trip(b: Backends) {
    let app = spawn_app(b).await;
    let bytes = large_png(5 * 1024 * 1024 + 17, 2);
    let image = app.upload_ok("big.png", bytes.clone()).await;
    assert_eq!(image["width"], 4000);
    let download = app.download(image["id"].as_str().unwrap()).await;
    assert_eq!(download.bytes().await.unwrap().to_vec(), bytes);
    assert_eq!(app.spool_files(), 0, "the spooled upload is removed");
}

async fn download_headers_and_revalidation(b: Backends) {
    let app = spawn_app(b).await;
    let bytes = jpeg(30, 20, 3);
    let image = app.upload_ok("photo.jpg", bytes.clone()).await;
    let path = format!("/api/v1/images/{}/file", image["id"].as_str().unwrap());
    let etag = format!("\"{}\"", sha256_hex(&bytes));

    let response = app.get(&path).await;
    let headers = response.headers().clone();
    assert_eq!(headers[header::CONTENT_TYPE], "image/jpeg");
    assert_eq!(headers[header::CONTENT_LENGTH], bytes.len().to_string().as_str());
    assert_eq!(headers[header::ETAG], etag.as_str());
    assert!(headers[header::CACHE_CONTROL].to_str().unwrap().contains("max-age=31536000"));
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(headers[header::CONTENT_SECURITY_POLICY], "sandbox", "opened as a page, it runs nothing");

    let head = app.client.head(app.url(&path)).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()[header::CONTENT_LENGTH], bytes.len().to_string().as_str());
    assert_eq!(head.headers()[header::ETAG], etag.as_str());
    assert!(head.bytes().await.unwrap().is_empty());

    for if_none_match in [etag.clone(), format!("W/{etag}"), format!("\"other\", {etag}"), "*".to_owned()] {
        let cached = app.client.get(app.url(&path)).header(header::IF_NONE_MATCH, &if_none_match).send().await.unwrap();
        assert_eq!(cached.status(), StatusCode::NOT_MODIFIED, "{if_none_match}");
        assert_eq!(cached.headers()[header::ETAG], etag.as_str());
    }
    let stale = app.client.get(app.url(&path)).header(header::IF_NONE_MATCH, "\"other\"").send().await.unwrap();
    assert_eq!(stale.status(), StatusCode::OK);
}

async fn identical_uploads_share_one_blob_until_the_last_delete(b: Backends) {
    let app = spawn_app(b).await;
    let bytes = png(10, 10, 4);
    let first = app.upload_ok("one.png", bytes.clone()).await;
    let second = app.upload_ok("two.png", bytes.clone()).await;
    assert_ne!(first["id"], second["id"]);
    assert_eq!(first["storage_key"], second["storage_key"]);
    assert_eq!(app.all_objects().len(), 1, "the bytes are stored once");

    assert_eq!(app.delete(first["id"].as_str().unwrap()).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.all_objects().len(), 1, "the blob still has a reference");
    let still = app.download(second["id"].as_str().unwrap()).await;
    assert_eq!(still.bytes().await.unwrap().to_vec(), bytes);

    assert_eq!(app.delete(second["id"].as_str().unwrap()).await.status(), StatusCode::NO_CONTENT);
    assert!(app.all_objects().is_empty(), "the last delete removes every copy");
    let counts = app.metadata.count_replicas_by_state().await.unwrap();
    assert_eq!((counts.stored, counts.pending, counts.deleting), (0, 0, 0));

    // Uploading the bytes again after the delete stores them afresh.
    let third = app.upload_ok("three.png", bytes.clone()).await;
    assert_eq!(app.download(third["id"].as_str().unwrap()).await.bytes().await.unwrap().to_vec(), bytes);
}

async fn deleted_images_are_gone(b: Backends) {
    let app = spawn_app(b).await;
    let image = app.upload_ok("x.png", png(5, 5, 5)).await;
    let id = image["id"].as_str().unwrap();
    assert_eq!(app.delete(id).await.status(), StatusCode::NO_CONTENT);
    assert_error(app.get(&format!("/api/v1/images/{id}")).await, StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND").await;
    assert_error(app.download(id).await, StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND").await;
    assert_error(app.delete(id).await, StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND").await;
    let list: Value = app.get("/api/v1/images").await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
}

async fn unknown_ids_are_not_found(b: Backends) {
    let app = spawn_app(b).await;
    for id in ["not-a-uuid", "00000000-0000-0000-0000-000000000000", "12345"] {
        assert_error(app.get(&format!("/api/v1/images/{id}")).await, StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND").await;
        assert_error(app.download(id).await, StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND").await;
        assert_error(app.delete(id).await, StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND").await;
    }
    assert_error(app.get("/api/v1/nothing-here").await, StatusCode::NOT_FOUND, "NOT_FOUND").await;
}

async fn list_pages_newest_first_without_repeats(b: Backends) {
    let app = spawn_app(b).await;
    let mut uploaded = Vec::new();
    for seed in 0..7 {
        uploaded.push(app.upload_ok("p.png", png(2, 2, 100 + seed)).await["id"].as_str().unwrap().to_owned());
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(cursor) => format!("/api/v1/images?limit=3&cursor={cursor}"),
            None => "/api/v1/images?limit=3".to_owned(),
        };
        let page: Value = app.get(&query).await.json().await.unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(items.iter().map(|item| item["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    uploaded.reverse();
    assert_eq!(seen, uploaded, "every image once, newest first");
    let default: Value = app.get("/api/v1/images").await.json().await.unwrap();
    assert_eq!(default["items"].as_array().unwrap().len(), 7);
    assert!(default["next_cursor"].is_null());
}

async fn list_rejects_bad_cursors_and_limits(b: Backends) {
    let app = spawn_app(b).await;
    for bad in ["garbage", "AAAA", "bm90LWEtY3Vyc29y"] {
        assert_error(app.get(&format!("/api/v1/images?cursor={bad}")).await, StatusCode::BAD_REQUEST, "INVALID_CURSOR")
            .await;
    }
    for bad in ["0", "101", "-3", "many"] {
        assert_error(app.get(&format!("/api/v1/images?limit={bad}")).await, StatusCode::BAD_REQUEST, "INVALID_LIMIT")
            .await;
    }
}

async fn batch_reports_each_file(b: Backends) {
    let app = spawn_app(b).await;
    let files = vec![
        ("a.png", png(3, 3, 7)),
        ("notes.png", b"just some text, named like an image".to_vec()),
        ("b.jpg", jpeg(4, 4, 8)),
        ("empty.png", Vec::new()),
        ("../../x\u{202E}gpj.png", png(3, 3, 9)),
    ];
    let response = app.batch(files).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!((body["succeeded"].as_u64(), body["failed"].as_u64()), (Some(3), Some(2)), "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results[0]["status"], 201);
    assert_eq!(results[0]["image"]["filename"], "a.png");
    assert_eq!(results[1]["status"], 400);
    assert_eq!(results[1]["error"]["code"], "INVALID_FILE_FORMAT");
    assert_eq!(results[2]["image"]["content_type"], "image/jpeg");
    assert_eq!(results[3]["error"]["code"], "EMPTY_FILE");
    // Each result names the file as it is stored: no path, no control or format characters.
    assert_eq!(results[4]["filename"], results[4]["image"]["filename"], "{body}");
    assert!(!results[4]["filename"].as_str().unwrap().contains(['/', '\u{202E}']), "{body}");
    assert_eq!(app.image_count().await, 3);
}

async fn batch_without_files_is_rejected(b: Backends) {
    let app = spawn_app(b).await;
    let form = Form::new().part("file", Part::bytes(png(1, 1, 9)).file_name("a.png"));
    let response = app.client.post(app.url("/api/v1/images/batch")).multipart(form).send().await.unwrap();
    assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "MISSING_FILE").await;
    app.assert_nothing_stored().await;
}

async fn filenames_are_sanitised(b: Backends) {
    let app = spawn_app(b).await;
    let image = app.upload_ok("../../etc/pass\twd.png", png(1, 1, 10)).await;
    assert_eq!(image["filename"], "passwd.png");
    let long = format!("{}.png", "x".repeat(1000));
    let image = app.upload_ok(&long, png(1, 1, 11)).await;
    assert!(image["filename"].as_str().unwrap().len() <= 255);
    assert!(image["filename"].as_str().unwrap().ends_with(".png"));
}

#[tokio::test]
async fn openapi_and_docs_are_served_offline() {
    let app = spawn_app(Backends::SQLITE_FS).await;
    let spec: Value = app.get("/openapi.json").await.json().await.unwrap();
    for path in [
        "/api/v1/images/upload",
        "/api/v1/images/batch",
        "/api/v1/images",
        "/api/v1/images/{id}",
        "/api/v1/images/{id}/file",
        "/health",
    ] {
        assert!(spec["paths"][path].is_object(), "{path} is documented");
    }
    let docs = app.get("/docs/").await;
    assert_eq!(docs.status(), StatusCode::OK);
    assert_eq!(docs.headers()[header::X_FRAME_OPTIONS], "DENY", "the page beside the token may not be framed");
    assert_eq!(docs.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert!(docs.text().await.unwrap().contains("swagger"), "the interactive page is served");
    let asset = app.get("/docs/swagger-ui-bundle.js").await;
    assert_eq!(asset.status(), StatusCode::OK, "the UI's assets come from the binary");
}

/// Every upload's second copy is pending for a moment; `/health` calls that `degraded` only
/// once a copy has stayed pending for `replication.pending_overdue_secs`.
#[tokio::test]
async fn health_calls_a_pending_copy_degraded_once_it_is_overdue() {
    let options = TestOptions {
        adjust: Some(|settings| settings.replication.pending_overdue_secs = 1),
        ..TestOptions::default()
    };
    let app = spawn_app_with(Backends::POSTGRES_S3, options).await;
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "ok", "{health}");

    // No workers and no eager copies: the second copy stays pending.
    let image = app.upload_ok("x.png", png(4, 4, 71)).await;
    let mut states: Vec<&str> =
        image["replicas"].as_array().unwrap().iter().filter_map(|r| r["state"].as_str()).collect();
    states.sort_unstable();
    assert_eq!(states, ["pending", "stored"], "{image}");
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "ok", "a copy pending for less than the grace: {health}");

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), StatusCode::OK);
    let health: Value = response.json().await.unwrap();
    assert_eq!(health["status"], "degraded", "a copy pending for longer than the grace: {health}");

    app.replicate_until_idle().await;
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "ok", "replicated: {health}");
}

#[tokio::test]
async fn health_reports_each_component() {
    let app =
        spawn_app_with(Backends::SQLITE_FS, TestOptions { replication_factor: 1, ..TestOptions::default() }).await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), StatusCode::OK);
    let health: Value = response.json().await.unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["database"]["status"], "ok");
    assert_eq!(health["shards"].as_array().unwrap().len(), 3);
    assert!(health["shards"][0]["latency_ms"].as_f64().is_some());

    app.take_shard_offline("s1").await;
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["status"], "degraded");
    let down = &health["shards"][1];
    assert_eq!((down["name"].as_str(), down["status"].as_str()), (Some("s1"), Some("down")));
    assert!(down["error"].as_str().unwrap().contains("does not exist (an unmounted disk"), "{down}");

    app.take_shard_offline("s0").await;
    app.take_shard_offline("s2").await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.json::<Value>().await.unwrap()["status"], "unavailable");
}

async fn paging_while_uploads_happen_neither_repeats_nor_skips(b: Backends) {
    let app = std::sync::Arc::new(spawn_app(b).await);
    let mut existing = std::collections::HashSet::new();
    for seed in 0..12 {
        existing.insert(app.upload_ok("e.png", png(2, 2, 500 + seed)).await["id"].as_str().unwrap().to_owned());
    }
    let writer = {
        let app = app.clone();
        tokio::spawn(async move {
            for seed in 0..12 {
                app.upload_ok("n.png", png(2, 2, 600 + seed)).await;
            }
        })
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = cursor
            .as_ref()
            .map_or("/api/v1/images?limit=2".to_owned(), |c| format!("/api/v1/images?limit=2&cursor={c}"));
        let page: Value = app.get(&query).await.json().await.unwrap();
        seen.extend(page["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    let unique: std::collections::HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no image appears twice");
    assert!(existing.is_subset(&unique), "every image that existed before the listing began appears");
}

/// Routing is the same over every backend: once, on SQLite and filesystem shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_wrong_methods_answer_in_the_error_format() {
    let app = spawn_app(Backends::SQLITE_FS).await;
    for path in ["/nothing", "/api/v1/images/x/y/z", "/api/v2/images"] {
        assert_error(app.get(path).await, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    }
    let wrong = [
        (reqwest::Method::PUT, "/api/v1/images/upload", "POST"),
        (reqwest::Method::GET, "/api/v1/images/batch", "POST"),
        (reqwest::Method::POST, "/api/v1/images/abc", "GET,HEAD,DELETE,PATCH"),
        (reqwest::Method::PATCH, "/api/v1/images", "GET,HEAD"),
        (reqwest::Method::DELETE, "/health", "GET,HEAD"),
    ];
    for (method, path, allowed) in wrong {
        let response = app.client.request(method.clone(), app.url(path)).send().await.unwrap();
        let allow = response.headers().get(header::ALLOW).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(allow.as_deref(), Some(allowed), "{method} {path}");
        assert_error(response, StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED").await;
    }
}

/// The OpenAPI document names what the server really sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_names_file_types_and_error_codes() {
    let app = spawn_app(Backends::SQLITE_FS).await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    let file = &doc["paths"]["/api/v1/images/{id}/file"]["get"]["responses"];
    let types: Vec<&str> = file["200"]["content"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(types, ["image/gif", "image/jpeg", "image/png", "image/webp"]);
    let upload = &doc["paths"]["/api/v1/images/upload"]["post"]["responses"];
    for (status, code) in [("400", "INVALID_FILE_FORMAT"), ("413", "IMAGE_TOO_LARGE"), ("422", "MISSING_FILE")] {
        assert!(upload[status]["description"].as_str().unwrap().contains(code), "{status}: {}", upload[status]);
    }
}

/// Anonymous probes share one check of the components a second (they are unlimited, and each
/// check is a request to every shard); an admin's is fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_probes_share_one_check_a_second() {
    let app = spawn_app_with(Backends::POSTGRES_S3, TestOptions::default()).await;
    let anonymous = reqwest::Client::new();
    let ready = |client: reqwest::Client| {
        let url = app.url("/health/ready");
        async move { client.get(url).send().await.unwrap().status() }
    };
    let checked_at = std::time::Instant::now();
    assert_eq!(ready(anonymous.clone()).await, StatusCode::OK);
    for shard in ["s0", "s1", "s2"] {
        app.take_shard_offline(shard).await;
    }
    let answers = futures::future::join_all((0..20).map(|_| ready(anonymous.clone()))).await;
    // (Only if the machine was not so slow that the shared check aged out meanwhile.)
    if checked_at.elapsed() < Duration::from_millis(900) {
        assert!(answers.iter().all(|status| *status == StatusCode::OK), "the shared check: {answers:?}");
    }
    assert_eq!(ready(app.client.clone()).await, StatusCode::SERVICE_UNAVAILABLE, "an admin's check is fresh");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(ready(anonymous).await, StatusCode::SERVICE_UNAVAILABLE, "and the shared one a second old at most");
}
