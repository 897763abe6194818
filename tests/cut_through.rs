//! Cut-through uploads (`X-Checksum-SHA256`): a large file streams to its shard while it
//! arrives, and nothing is stored unless the whole upload is accepted.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::images::{large_png, png, sha256_hex};
use common::{Backends, TestApp, TestOptions, TestShard, assert_error, replica_states, spawn_app, spawn_app_with};
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Over `CUT_THROUGH_MIN` (1 MiB), under the test apps' 8 MiB limit.
const LARGE: usize = 3 * 1024 * 1024;

behaviours!(
    a_large_upload_reaches_its_primary_before_its_last_byte,
    a_client_librarys_form_streams_too,
    a_file_that_is_not_the_declared_one_stores_nothing,
    a_checksum_that_is_not_one_is_refused,
    a_refused_image_with_a_good_checksum_stores_nothing,
    a_refused_file_whose_bytes_all_arrive_before_the_form_ends_stores_nothing,
    a_part_longer_than_announced_stores_nothing,
    a_client_that_hangs_up_mid_cut_through_leaves_nothing,
    a_body_over_the_limit_is_cut_off_with_nothing_stored,
    a_duplicate_is_deduplicated_without_a_second_object,
    a_field_after_the_file_falls_back_to_store_and_forward,
    a_primary_that_is_down_falls_back_to_the_next_shard,
    a_write_quorum_streams_to_each_of_its_shards,
    a_quorum_shard_lost_mid_stream_gets_its_copy_elsewhere,
    a_quorum_that_cannot_be_completed_stores_nothing,
);

/// The shards a blob's copies belong on.
fn write_set_of(app: &TestApp, key: &str) -> Vec<String> {
    app.router.write_set(&chitram::blob::BlobKey::parse(key).unwrap())
}

/// A write quorum of two (`placement.write_quorum = 2`).
fn quorum_of_two(shards: usize) -> TestOptions {
    TestOptions { shards, adjust: Some(|settings| settings.placement.write_quorum = 2), ..TestOptions::default() }
}

/// Uploads `file` as `name`, declaring `checksum`.
async fn upload_declaring(app: &TestApp, name: &str, file: Vec<u8>, checksum: &str) -> reqwest::Response {
    upload_form_declaring(app, Form::new().part("file", Part::bytes(file).file_name(name.to_owned())), checksum).await
}

async fn upload_form_declaring(app: &TestApp, form: Form, checksum: &str) -> reqwest::Response {
    upload_form_declaring_owned(app, form, checksum.to_owned()).await
}

/// The directories where shards keep writes in progress: a filesystem shard's `.tmp/`, an S3
/// server's root (s3s-fs writes `.tmp.*.internal.part` there before renaming into the bucket).
fn temporary_dirs(app: &TestApp) -> Vec<PathBuf> {
    let dir = |shard: &TestShard| match shard {
        TestShard::Fs(root) => root.join(".tmp"),
        TestShard::S3(server) => server.root.clone(),
    };
    app.shards.iter().map(dir).collect()
}

/// Bytes in the shards' files of writes in progress.
fn partial_write_bytes(app: &TestApp) -> u64 {
    temporary_dirs(app).iter().map(|dir| partial_write_bytes_in(dir)).sum()
}

fn partial_write_bytes_in(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_file()))
        .filter(|entry| entry.file_name().to_string_lossy().contains("tmp"))
        .map(|entry| entry.metadata().map(|meta| meta.len()).unwrap_or(0))
        .sum()
}

/// Waits until the shards' writes in progress hold at least `bytes`: the upload is streaming.
async fn wait_for_partial_write(app: &TestApp, bytes: u64) {
    common::eventually(Duration::from_secs(5), "the primary receives the first half", || async {
        partial_write_bytes(app) >= bytes
    })
    .await;
}

/// Waits until each of `shards` holds at least `bytes` of a write in progress.
async fn wait_for_partial_writes_on(app: &TestApp, shards: &[String], bytes: u64) {
    let dirs = temporary_dirs(app);
    let index = |shard: &String| app.settings.shards.iter().position(|s| &s.name == shard).unwrap();
    common::eventually(Duration::from_secs(5), "each shard of the quorum receives the first half", || async {
        shards.iter().all(|shard| partial_write_bytes_in(&dirs[index(shard)]) >= bytes)
    })
    .await;
}

/// Asserts that the shards drop what a given-up write sent them, and that nothing is stored.
async fn assert_given_up_write_left_nothing(app: &TestApp) {
    common::eventually(Duration::from_secs(5), "the given-up write is cleaned up", || async {
        app.spool_files() == 0 && partial_write_bytes(app) == 0
    })
    .await;
    app.assert_nothing_stored().await;
}

/// What ends the held uploads' form, after the file's bytes.
const FORM_END: &[u8] = b"\r\n--B--\r\n";

/// An upload sent over a raw connection: the head (declaring the file's SHA-256) and the
/// first half of the body now, the rest when the test says.
struct HeldUpload {
    stream: tokio::net::TcpStream,
    rest: Vec<u8>,
}

impl HeldUpload {
    async fn start(app: &TestApp, image: &[u8]) -> Self {
        Self::start_sending(app, image, |body| body / 2).await
    }

    /// As [`Self::start`], sending the first `first(body length)` bytes of the body now.
    async fn start_sending(app: &TestApp, image: &[u8], first: impl FnOnce(usize) -> usize) -> Self {
        let address = app.address.trim_start_matches("http://").to_owned();
        let body = [
            &b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"held.png\"\r\n\r\n"[..],
            image,
            FORM_END,
        ]
        .concat();
        let head = format!(
            "POST /api/v1/images/upload HTTP/1.1\r\nHost: {address}\r\n{}X-Checksum-SHA256: {}\r\n\
             Content-Type: multipart/form-data; boundary=B\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            app.authorization_line(),
            sha256_hex(image),
            body.len()
        );
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let (first, rest) = body.split_at(first(body.len()));
        stream.write_all(first).await.unwrap();
        stream.flush().await.unwrap();
        Self { stream, rest: rest.to_vec() }
    }

    /// Finishes an upload that must be accepted: its record.
    async fn finish_created(self) -> Value {
        let response = self.finish().await;
        assert!(response.starts_with("HTTP/1.1 201"), "{response}");
        serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    }

    /// Sends `instead` (cut to the body's announced length) in place of the body's rest.
    async fn finish_with(mut self, instead: &[u8]) -> String {
        self.rest = instead[..instead.len().min(self.rest.len())].to_vec();
        self.finish().await
    }

    async fn finish(mut self) -> String {
        self.stream.write_all(&self.rest).await.unwrap();
        let mut response = String::new();
        self.stream.read_to_string(&mut response).await.unwrap();
        response
    }
}

async fn a_large_upload_reaches_its_primary_before_its_last_byte(b: Backends) {
    let app = spawn_app(b).await;
    let image = large_png(LARGE, 1);
    let key = sha256_hex(&image);
    let held = HeldUpload::start(&app, &image).await;
    // Half the body has arrived: a store-and-forward upload would not have written a byte yet.
    wait_for_partial_write(&app, 1024 * 1024).await;
    assert!(app.all_objects().is_empty(), "no object before the upload is accepted");

    let image_json = held.finish_created().await;
    assert_eq!(image_json["checksum"], key.as_str());
    let blob = chitram::blob::BlobKey::parse(&key).unwrap();
    let write_set = app.router.write_set(&blob);
    let mut copies = replica_states(&image_json);
    copies.sort_by_key(|(_, state)| std::cmp::Reverse(state.clone()));
    assert_eq!(
        copies,
        [(write_set[0].clone(), "stored".to_owned()), (write_set[1].clone(), "pending".to_owned())],
        "the primary took the stream; the second copy is left to replication"
    );
    assert_eq!(std::fs::read(app.object_path(&write_set[0], &key)).unwrap(), image, "byte for byte");
    assert_eq!(partial_write_bytes(&app), 0, "no write in progress is left");
    let download = app.download(image_json["id"].as_str().unwrap()).await.bytes().await.unwrap();
    assert_eq!(download.as_ref(), image.as_slice());
}

/// reqwest's multipart encoding (as curl's and browsers') ends the form right after the file:
/// its length is predicted right, and the upload streams.
async fn a_client_librarys_form_streams_too(b: Backends) {
    let app = spawn_app(b).await;
    let image = large_png(LARGE, 11);
    let checksum = sha256_hex(&image);
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (first, second) = image.split_at(image.len() / 2);
    let (first, second) = (first.to_vec(), second.to_vec());
    let body =
        futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(futures::stream::once(async move {
            let _ = released.await;
            Ok(second)
        }));
    let part = Part::stream_with_length(reqwest::Body::wrap_stream(body), image.len() as u64).file_name("lib.png");
    let upload = tokio::spawn(upload_form_declaring_owned(&app, Form::new().part("file", part), checksum.clone()));
    wait_for_partial_write(&app, 1024 * 1024).await;
    release.send(()).unwrap();
    let response = upload.await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let stored: Value = response.json().await.unwrap();
    assert_eq!(stored["checksum"], checksum.as_str());
}

/// [`upload_form_declaring`] as a `'static` future, for a test that goes on while it runs.
fn upload_form_declaring_owned(
    app: &TestApp,
    form: Form,
    checksum: String,
) -> impl std::future::Future<Output = reqwest::Response> + Send + 'static {
    let request = app.client.post(app.url("/api/v1/images/upload")).header("X-Checksum-SHA256", checksum);
    async move { request.multipart(form).send().await.unwrap() }
}

async fn a_file_that_is_not_the_declared_one_stores_nothing(b: Backends) {
    let app = spawn_app(b).await;
    let declared = sha256_hex(&large_png(LARGE, 2));
    // Large (streamed, then given up) and small (stored and forwarded): the same answer.
    for file in [large_png(LARGE, 3), png(2, 2, 3)] {
        let response = upload_declaring(&app, "other.png", file, &declared).await;
        assert_error(response, StatusCode::BAD_REQUEST, "CHECKSUM_MISMATCH").await;
    }
    assert_given_up_write_left_nothing(&app).await;
}

async fn a_checksum_that_is_not_one_is_refused(b: Backends) {
    let app = spawn_app(b).await;
    let image = png(2, 2, 4);
    let upper = sha256_hex(&image).to_uppercase();
    for bad in ["abc", "", &"g".repeat(64), &format!("{upper}0"), "../../etc/passwd"] {
        let response = upload_declaring(&app, "a.png", image.clone(), bad).await;
        assert_error(response, StatusCode::BAD_REQUEST, "INVALID_CHECKSUM").await;
    }
    // A batch's files each have their own checksum: the header has no meaning there.
    let form = Form::new().part("files", Part::bytes(image.clone()).file_name("a.png"));
    let batch = app
        .client
        .post(app.url("/api/v1/images/batch"))
        .header("X-Checksum-SHA256", sha256_hex(&image))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_error(batch, StatusCode::BAD_REQUEST, "INVALID_CHECKSUM").await;
    app.assert_nothing_stored().await;
    // Hex digits in either case are accepted.
    let accepted = upload_declaring(&app, "a.png", image.clone(), &upper).await;
    assert_eq!(accepted.status(), StatusCode::CREATED);
}

async fn a_refused_image_with_a_good_checksum_stores_nothing(b: Backends) {
    let app = spawn_app(b).await;
    // A PNG whose last chunk is damaged: the format check walks to its end and refuses it
    // after every byte but the last has been streamed to the shard.
    let mut damaged = large_png(LARGE, 5);
    let at = damaged.len() - 20;
    damaged[at] ^= 0xff;
    let checksum = sha256_hex(&damaged);
    let response = upload_declaring(&app, "damaged.png", damaged, &checksum).await;
    assert_error(response, StatusCode::BAD_REQUEST, "INVALID_FILE_FORMAT").await;
    assert_given_up_write_left_nothing(&app).await;
}

/// multer ends a field with an empty chunk when the file's last bytes arrive before the
/// closing delimiter. A refused file still leaves nothing on the shards (the upload holds back
/// the last bytes of the file, not the empty chunk, and a filesystem shard stores nothing
/// without the upload's seal), and an accepted one is stored whole.
async fn a_refused_file_whose_bytes_all_arrive_before_the_form_ends_stores_nothing(b: Backends) {
    let app = spawn_app(b).await;
    let mut damaged = large_png(LARGE, 9);
    let at = damaged.len() - 20;
    damaged[at] ^= 0xff;
    let held = HeldUpload::start_sending(&app, &damaged, |body| body - FORM_END.len()).await;
    // Every byte of the file has reached the server, and what it passes on has reached the shard.
    wait_for_partial_write(&app, 1024 * 1024).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = held.finish().await;
    assert!(response.starts_with("HTTP/1.1 400") && response.contains("INVALID_FILE_FORMAT"), "{response}");
    assert_given_up_write_left_nothing(&app).await;

    let image = large_png(LARGE, 10);
    let held = HeldUpload::start_sending(&app, &image, |body| body - FORM_END.len()).await;
    wait_for_partial_write(&app, 1024 * 1024).await;
    let created = held.finish_created().await;
    let id = created["id"].as_str().unwrap();
    assert_eq!(app.download(id).await.bytes().await.unwrap().to_vec(), image, "stored whole");
}

/// The form's length announces a file of exactly the declared blob, and the file's bytes all
/// arrive; then more of the part follows. The shards must not have had those bytes whole: the
/// upload is refused (the form no longer ends where it said), and nothing is stored.
async fn a_part_longer_than_announced_stores_nothing(b: Backends) {
    let app = spawn_app(b).await;
    let image = large_png(LARGE, 11);
    let held = HeldUpload::start_sending(&app, &image, |body| body - FORM_END.len()).await;
    wait_for_partial_write(&app, 1024 * 1024).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // More of the file part, within the announced Content-Length: the form's end never comes.
    let response = held.finish_with(b"trailing bytes of a longer part").await;
    assert!(response.starts_with("HTTP/1.1 4"), "refused: {response}");
    assert_given_up_write_left_nothing(&app).await;
    common::eventually(Duration::from_secs(5), "no object is left on any shard", || async {
        app.all_objects().is_empty()
    })
    .await;
}

async fn a_client_that_hangs_up_mid_cut_through_leaves_nothing(b: Backends) {
    let app = spawn_app(b).await;
    let image = large_png(LARGE, 6);
    let held = HeldUpload::start(&app, &image).await;
    wait_for_partial_write(&app, 1).await;
    drop(held);
    assert_given_up_write_left_nothing(&app).await;
    app.upload_ok("after.png", png(2, 2, 6)).await;
}

async fn a_body_over_the_limit_is_cut_off_with_nothing_stored(b: Backends) {
    let limit = 2 * 1024 * 1024;
    let app = spawn_app_with(b, TestOptions { max_upload_bytes: limit, ..TestOptions::default() }).await;
    // The form's length is within what the limit allows for framing; the file is one byte over.
    let over = large_png(limit as usize + 1, 7);
    let checksum = sha256_hex(&over);
    let response = upload_declaring(&app, "over.png", over, &checksum).await;
    assert_error(response, StatusCode::PAYLOAD_TOO_LARGE, "FILE_TOO_LARGE").await;
    assert_given_up_write_left_nothing(&app).await;
}

async fn a_duplicate_is_deduplicated_without_a_second_object(b: Backends) {
    let app = spawn_app(b).await;
    let image = large_png(LARGE, 8);
    let checksum = sha256_hex(&image);
    let first: Value = upload_declaring(&app, "one.png", image.clone(), &checksum).await.json().await.unwrap();
    // The bytes are known: the second upload's stream is given up as soon as the lookup made
    // while it starts says so, and the shard drops what it received. (Half a new upload
    // reaches its shard at once and stays there until the last byte: see the first test.)
    let held = HeldUpload::start(&app, &image).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    common::eventually(Duration::from_secs(5), "a known blob's stream is given up", || async {
        partial_write_bytes(&app) == 0
    })
    .await;
    let second = held.finish_created().await;
    assert_ne!(first["id"], second["id"]);
    assert_eq!(first["checksum"], second["checksum"]);
    assert_eq!(app.all_objects().len(), 1, "one blob, on its primary");
    assert_eq!(app.image_count().await, 2);
}

async fn a_field_after_the_file_falls_back_to_store_and_forward(b: Backends) {
    let app = spawn_app(b).await;
    let image = large_png(LARGE, 9);
    let checksum = sha256_hex(&image);
    // The file's length cannot be told from the request's before it has all arrived: the
    // streamed write is given up, and the upload stores and forwards.
    let form = Form::new().part("file", Part::bytes(image.clone()).file_name("a.png")).text("visibility", "private");
    let response = upload_form_declaring(&app, form, &checksum).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let stored: Value = response.json().await.unwrap();
    assert_eq!(
        (stored["checksum"].as_str(), stored["visibility"].as_str()),
        (Some(checksum.as_str()), Some("private"))
    );
    let blob = chitram::blob::BlobKey::parse(&checksum).unwrap();
    let primary = app.router.write_set(&blob)[0].clone();
    assert_eq!(std::fs::read(app.object_path(&primary, &checksum)).unwrap(), image);
    assert_eq!(app.all_objects().len(), 1);
}

async fn a_primary_that_is_down_falls_back_to_the_next_shard(b: Backends) {
    let app = spawn_app_with(b, TestOptions { replication_factor: 1, ..TestOptions::default() }).await;
    let image = large_png(LARGE, 10);
    let checksum = sha256_hex(&image);
    let blob = chitram::blob::BlobKey::parse(&checksum).unwrap();
    let primary = app.router.write_set(&blob)[0].clone();
    app.take_shard_offline(&primary).await;
    let response = upload_declaring(&app, "a.png", image.clone(), &checksum).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let stored: Value = response.json().await.unwrap();
    let mut copies = replica_states(&stored);
    copies.sort_by_key(|(_, state)| state.clone());
    let [(primary_copy, pending), (holder, stored_state)] = copies.as_slice() else { panic!("two copies: {stored}") };
    assert_eq!((primary_copy, pending.as_str()), (&primary, "pending"), "the primary's copy is left to replication");
    assert_eq!(stored_state, "stored");
    assert_ne!(holder, &primary, "written to the next shard of the preference list");
    assert_eq!(std::fs::read(app.object_path(holder, &checksum)).unwrap(), image);
    app.bring_shard_online(&primary).await;
}

/// With a write quorum of two the upload streams to both shards of the quorum at once, and
/// both copies are stored before the answer.
async fn a_write_quorum_streams_to_each_of_its_shards(b: Backends) {
    let app = spawn_app_with(b, quorum_of_two(3)).await;
    let image = large_png(LARGE, 12);
    let key = sha256_hex(&image);
    let write_set = write_set_of(&app, &key);
    let held = HeldUpload::start(&app, &image).await;
    wait_for_partial_writes_on(&app, &write_set, 1024 * 1024).await;
    assert!(app.all_objects().is_empty(), "no object before the upload is accepted");

    let image_json = held.finish_created().await;
    let mut copies = replica_states(&image_json);
    copies.sort();
    let mut expected: Vec<(String, String)> = write_set.iter().map(|shard| (shard.clone(), "stored".into())).collect();
    expected.sort();
    assert_eq!(copies, expected, "both shards of the quorum took the stream");
    for shard in &write_set {
        assert_eq!(std::fs::read(app.object_path(shard, &key)).unwrap(), image, "byte for byte on {shard}");
    }
    assert_eq!(partial_write_bytes(&app), 0, "no write in progress is left");
}

/// A shard of the quorum goes down while the body streams: the other keeps its streamed copy,
/// and the missing one is written from the upload's own bytes to the next shard before the 201.
async fn a_quorum_shard_lost_mid_stream_gets_its_copy_elsewhere(b: Backends) {
    let app = spawn_app_with(b, quorum_of_two(3)).await;
    let image = large_png(LARGE, 13);
    let key = sha256_hex(&image);
    let write_set = write_set_of(&app, &key);
    let held = HeldUpload::start(&app, &image).await;
    wait_for_partial_writes_on(&app, &write_set, 1024 * 1024).await;
    app.take_shard_offline(&write_set[1]).await;

    let image_json = held.finish_created().await;
    let third = app.settings.shards.iter().map(|s| s.name.clone()).find(|s| !write_set.contains(s)).unwrap();
    let mut copies = replica_states(&image_json);
    copies.sort();
    let mut expected = vec![
        (write_set[0].clone(), "stored".to_owned()),
        (write_set[1].clone(), "pending".to_owned()),
        (third.clone(), "stored".to_owned()),
    ];
    expected.sort();
    assert_eq!(copies, expected, "the streamed copy, the lost shard's left to replication, one written elsewhere");
    for shard in [&write_set[0], &third] {
        assert_eq!(std::fs::read(app.object_path(shard, &key)).unwrap(), image, "byte for byte on {shard}");
    }
    app.bring_shard_online(&write_set[1]).await;
}

/// A shard of the quorum goes down mid-stream and no other shard can take its copy: the upload
/// is refused, and the copy streamed to the other shard is removed with it.
async fn a_quorum_that_cannot_be_completed_stores_nothing(b: Backends) {
    let app = spawn_app_with(b, quorum_of_two(2)).await;
    let image = large_png(LARGE, 14);
    let write_set = write_set_of(&app, &sha256_hex(&image));
    let held = HeldUpload::start(&app, &image).await;
    wait_for_partial_writes_on(&app, &write_set, 1024 * 1024).await;
    app.take_shard_offline(&write_set[1]).await;

    let response = held.finish().await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("STORAGE_UNAVAILABLE"), "{response}");
    app.bring_shard_online(&write_set[1]).await;
    common::eventually(Duration::from_secs(5), "the spool file is removed", || async { app.spool_files() == 0 }).await;
    app.assert_nothing_stored().await;
}
