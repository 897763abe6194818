//! Bad input: each gets its 4xx and code, and leaves no row, no object and no spooled file.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;

use common::images::{jpeg, png};
use common::{Backends, TestApp, TestOptions, assert_error, spawn_app, spawn_app_with};
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: u64 = 1024 * 1024;

async fn small_limit_app(b: Backends) -> TestApp {
    spawn_app_with(b, TestOptions { max_upload_bytes: LIMIT, ..TestOptions::default() }).await
}

behaviours!(
    a_file_that_is_not_an_image_is_rejected,
    a_truncated_header_is_rejected,
    an_empty_file_is_rejected,
    a_missing_file_field_is_rejected,
    a_body_that_is_not_multipart_is_rejected,
    a_file_over_the_limit_is_rejected_while_streaming,
    a_client_that_hangs_up_mid_upload_leaves_nothing,
    a_batch_file_over_the_limit_fails_alone,
    a_declared_two_gigabyte_body_is_refused_unread,
    an_endless_part_header_is_refused_early,
    a_long_preamble_and_too_many_parts_are_refused,
    dimensions_the_database_cannot_hold_are_rejected,
    images_over_the_pixel_limit_are_rejected,
    files_cut_after_an_intact_header_are_rejected,
    spooled_files_with_a_defect_past_their_first_chunks_are_rejected,
    cursors_outside_the_databases_range_are_rejected,
);

async fn a_file_that_is_not_an_image_is_rejected(b: Backends) {
    let app = spawn_app(b).await;
    // The Content-Type says PNG and the name says PNG: only the bytes count.
    let response = app.upload("evil.png", b"<script>alert(1)</script>".to_vec()).await;
    assert_error(response, StatusCode::BAD_REQUEST, "INVALID_FILE_FORMAT").await;
    let bmp = app.upload("old.bmp", b"BM\x3a\0\0\0\0\0\0\0\x36\0\0\0\x28\0\0\0".to_vec()).await;
    assert_error(bmp, StatusCode::BAD_REQUEST, "INVALID_FILE_FORMAT").await;
    app.assert_nothing_stored().await;
}

async fn a_truncated_header_is_rejected(b: Backends) {
    let app = spawn_app(b).await;
    let png = png(100, 100, 1);
    assert_error(app.upload("cut.png", png[..16].to_vec()).await, StatusCode::BAD_REQUEST, "INVALID_FILE_FORMAT").await;
    let jpeg = jpeg(100, 100, 1);
    assert_error(app.upload("cut.jpg", jpeg[..14].to_vec()).await, StatusCode::BAD_REQUEST, "INVALID_FILE_FORMAT")
        .await;
    let zero_width = common::images::png(0, 100, 1);
    assert_error(app.upload("zero.png", zero_width).await, StatusCode::BAD_REQUEST, "INVALID_FILE_FORMAT").await;
    app.assert_nothing_stored().await;
}

async fn an_empty_file_is_rejected(b: Backends) {
    let app = spawn_app(b).await;
    assert_error(app.upload("empty.png", Vec::new()).await, StatusCode::BAD_REQUEST, "EMPTY_FILE").await;
    app.assert_nothing_stored().await;
}

async fn a_missing_file_field_is_rejected(b: Backends) {
    let app = spawn_app(b).await;
    let form = Form::new().part("image", Part::bytes(png(1, 1, 2)).file_name("a.png")).text("title", "cat");
    assert_error(app.upload_form(form).await, StatusCode::UNPROCESSABLE_ENTITY, "MISSING_FILE").await;
    assert_error(app.upload_form(Form::new()).await, StatusCode::UNPROCESSABLE_ENTITY, "MISSING_FILE").await;
    app.assert_nothing_stored().await;
}

async fn a_body_that_is_not_multipart_is_rejected(b: Backends) {
    let app = spawn_app(b).await;
    let json =
        app.client.post(app.url("/api/v1/images/upload")).json(&serde_json::json!({"file": "x"})).send().await.unwrap();
    assert_error(json, StatusCode::UNPROCESSABLE_ENTITY, "MISSING_FILE").await;
    let broken = app
        .client
        .post(app.url("/api/v1/images/upload"))
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body("--XYZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nno closing boundary")
        .send()
        .await
        .unwrap();
    assert_error(broken, StatusCode::BAD_REQUEST, "INVALID_MULTIPART").await;
    app.assert_nothing_stored().await;
}

async fn a_file_over_the_limit_is_rejected_while_streaming(b: Backends) {
    let app = small_limit_app(b).await;
    // Exactly at the limit is accepted; one byte more is not.
    let at_limit = common::images::large_png(LIMIT as usize, 3);
    let accepted = app.upload_ok("at-limit.png", at_limit).await;
    assert_eq!(app.delete(accepted["id"].as_str().unwrap()).await.status(), StatusCode::NO_CONTENT);
    app.assert_nothing_stored().await;

    let over = common::images::large_png(LIMIT as usize + 1, 4);
    assert_error(app.upload("over.png", over).await, StatusCode::PAYLOAD_TOO_LARGE, "FILE_TOO_LARGE").await;
    app.assert_nothing_stored().await;

    // Without a Content-Length (chunked), the limit still holds as the bytes stream in.
    let response = send_chunked_upload(&app, 4 * LIMIT as usize).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("FILE_TOO_LARGE"), "{response}");
    app.assert_nothing_stored().await;
}

/// A client that sends half of a large body and closes the connection: nothing is recorded,
/// no copy is written, and the spooled half is removed.
async fn a_client_that_hangs_up_mid_upload_leaves_nothing(b: Backends) {
    let app = small_limit_app(b).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let file = common::images::large_png(LIMIT as usize / 2, 8);
    let head = format!(
        "POST /api/v1/images/upload HTTP/1.1\r\nHost: {address}\r\n{}Content-Type: multipart/form-data; boundary=B\r\n\
         Content-Length: {}\r\n\r\n--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cut.png\"\r\n\r\n",
        app.authorization_line(),
        file.len() + 200
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // Past the memory threshold, so the server has started a spool file.
    stream.write_all(&file[..file.len() / 2]).await.unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stream);
    common::eventually(Duration::from_secs(5), "the half-received upload is cleaned up", || async {
        app.spool_files() == 0
    })
    .await;
    app.assert_nothing_stored().await;
    // The server goes on serving.
    app.upload_ok("after.png", png(2, 2, 9)).await;
}

/// A batch's body may hold several files of up to the limit; one over it is that item's 413.
async fn a_batch_file_over_the_limit_fails_alone(b: Backends) {
    let app = small_limit_app(b).await;
    let files = vec![
        ("first.png", common::images::large_png(LIMIT as usize, 7)),
        ("over.png", common::images::large_png(LIMIT as usize + 1, 8)),
        ("last.png", png(2, 2, 9)),
    ];
    let response = app.batch(files).await;
    assert_eq!(response.status(), StatusCode::OK);
    let batch: serde_json::Value = response.json().await.unwrap();
    let statuses: Vec<_> = batch["results"].as_array().unwrap().iter().map(|item| item["status"].clone()).collect();
    assert_eq!(statuses, [201, 413, 201], "{batch}");
    assert_eq!(batch["results"][1]["error"]["code"], "FILE_TOO_LARGE", "{batch}");
    assert_eq!((batch["succeeded"].as_u64(), batch["failed"].as_u64()), (Some(2), Some(1)), "{batch}");
}

/// Streams a chunked upload of `len` bytes over a raw connection, reading the answer while
/// still sending: the server answers as soon as the limit is passed, and closes the connection.
async fn send_chunked_upload(app: &TestApp, len: usize) -> String {
    let address = app.address.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let auth = app.authorization_line();
    let sender = tokio::spawn(async move {
        let head = format!(
            "POST /api/v1/images/upload HTTP/1.1\r\nHost: {address}\r\n{auth}Content-Type: multipart/form-data; boundary=B\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        );
        writer.write_all(head.as_bytes()).await?;
        let mut part = b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.png\"\r\n\r\n".to_vec();
        part.extend_from_slice(&png(1, 1, 6));
        let mut sent = 0;
        while sent < len {
            let chunk = if sent == 0 { std::mem::take(&mut part) } else { vec![0u8; 64 * 1024] };
            sent += chunk.len();
            writer.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
            writer.write_all(&chunk).await?;
            writer.write_all(b"\r\n").await?;
        }
        writer.write_all(b"0\r\n\r\n").await
    });
    let mut response = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut response)).await.expect("answered");
    // The send may fail with a broken pipe once the server has answered and closed: expected.
    let _ = sender.await;
    assert!(read.is_ok() || !response.is_empty(), "no answer: {read:?}");
    String::from_utf8_lossy(&response).into_owned()
}

async fn a_declared_two_gigabyte_body_is_refused_unread(b: Backends) {
    let app = small_limit_app(b).await;
    let address = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let auth = app.authorization_line();
    let head = format!(
        "POST /api/v1/images/upload HTTP/1.1\r\nHost: {address}\r\n{auth}Content-Type: multipart/form-data; boundary=B\r\n\
         Content-Length: 2147483648\r\n\r\n--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"huge.png\"\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&png(1, 1, 5)).await.unwrap();
    // The answer comes without the client sending the other 2 GB.
    let mut response = vec![0u8; 4096];
    let read =
        tokio::time::timeout(Duration::from_secs(10), stream.read(&mut response)).await.expect("answered").unwrap();
    let response = String::from_utf8_lossy(&response[..read]);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("FILE_TOO_LARGE"), "{response}");
    app.assert_nothing_stored().await;
}

/// Streams `head` then `filler` bytes (in 64 KiB pieces, chunked) at `path`, reading the answer
/// while still sending. Returns the answer and how much was sent when it came.
async fn send_endless(app: &TestApp, path: &str, head: Vec<u8>, filler: u8, total: u64) -> (String, u64) {
    let address = app.address.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let path = path.to_owned();
    let auth = app.authorization_line();
    let sender = tokio::spawn(async move {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Content-Type: multipart/form-data; boundary=B\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        );
        writer.write_all(request.as_bytes()).await?;
        let mut piece = head;
        while counter.load(Ordering::Relaxed) < total {
            writer.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).await?;
            writer.write_all(&piece).await?;
            writer.write_all(b"\r\n").await?;
            counter.fetch_add(piece.len() as u64, Ordering::Relaxed);
            piece = vec![filler; 64 * 1024];
        }
        writer.write_all(b"0\r\n\r\n").await
    });
    let mut response = vec![0u8; 4096];
    let read =
        tokio::time::timeout(Duration::from_secs(20), reader.read(&mut response)).await.expect("answered").unwrap();
    let sent_when_answered = sent.load(Ordering::Relaxed);
    sender.abort();
    (String::from_utf8_lossy(&response[..read]).into_owned(), sent_when_answered)
}

async fn an_endless_part_header_is_refused_early(b: Backends) {
    let app = spawn_app(b).await;
    const TOTAL: u64 = 300 * 1024 * 1024;
    for path in ["/api/v1/images/upload", "/api/v1/images/batch"] {
        // A part whose headers never end: one header line of 300 MiB.
        let head = b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nX-Pad: ".to_vec();
        let (response, sent) = send_endless(&app, path, head, b'a', TOTAL).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{path}: {response}");
        assert!(response.contains("INVALID_MULTIPART"), "{path}: {response}");
        // Answered after kilobytes, not after the body limit: the headers were never buffered.
        assert!(sent < 16 * 1024 * 1024, "{path}: answered only after {sent} bytes");
    }
    app.assert_nothing_stored().await;
}

async fn a_long_preamble_and_too_many_parts_are_refused(b: Backends) {
    let app = spawn_app(b).await;
    let (response, sent) = send_endless(&app, "/api/v1/images/upload", b"x".to_vec(), b'x', 300 << 20).await;
    assert!(response.starts_with("HTTP/1.1 400") && response.contains("INVALID_MULTIPART"), "{response}");
    assert!(sent < 16 * 1024 * 1024, "answered only after {sent} bytes");

    // Thousands of tiny parts: refused at the first part past the bound (read over a raw
    // connection, as the server answers before the client has sent them all).
    let parts: Vec<u8> = (0..10_000)
        .flat_map(|i| format!("--B\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nx\r\n").into_bytes())
        .collect();
    let len = parts.len() as u64;
    let (response, _) = send_endless(&app, "/api/v1/images/upload", parts, b'x', len).await;
    assert!(response.starts_with("HTTP/1.1 400") && response.contains("INVALID_MULTIPART"), "{response}");
    assert!(response.contains("parts"), "{response}");
    app.assert_nothing_stored().await;
}

async fn dimensions_the_database_cannot_hold_are_rejected(b: Backends) {
    let app = spawn_app_with(b, TestOptions { max_pixels: u64::MAX, ..TestOptions::default() }).await;
    for (width, height) in [(1 << 31, 1), (1, 1 << 31), (u32::MAX, u32::MAX)] {
        let response = app.upload("wide.png", png(width, height, 41)).await;
        assert_error(response, StatusCode::BAD_REQUEST, "INVALID_FILE_FORMAT").await;
    }
    app.assert_nothing_stored().await;
}

async fn images_over_the_pixel_limit_are_rejected(b: Backends) {
    let app = spawn_app_with(b, TestOptions { max_pixels: 10_000, ..TestOptions::default() }).await;
    assert_error(app.upload("big.png", png(101, 100, 42)).await, StatusCode::PAYLOAD_TOO_LARGE, "IMAGE_TOO_LARGE")
        .await;
    let jpeg = jpeg(200, 200, 43);
    assert_error(app.upload("big.jpg", jpeg).await, StatusCode::PAYLOAD_TOO_LARGE, "IMAGE_TOO_LARGE").await;
    let batch: serde_json::Value =
        app.batch(vec![("big.gif", common::images::gif(1000, 1000, 44))]).await.json().await.unwrap();
    assert_eq!(batch["results"][0]["error"]["code"], "IMAGE_TOO_LARGE", "{batch}");
    app.assert_nothing_stored().await;
    app.upload_ok("small.png", png(100, 100, 45)).await;
}

async fn files_cut_after_an_intact_header_are_rejected(b: Backends) {
    let app = spawn_app(b).await;
    let bad = |response| assert_error(response, StatusCode::BAD_REQUEST, "INVALID_FILE_FORMAT");
    let whole = png(100, 100, 50);
    bad(app.upload("cut.png", whole[..33].to_vec()).await).await; // Right after IHDR.
    bad(app.upload("cut.png", whole[..whole.len() - 1].to_vec()).await).await;
    let mut bad_crc = whole.clone();
    let last = bad_crc.len() - 20;
    bad_crc[last] ^= 0x40;
    bad(app.upload("crc.png", bad_crc).await).await;
    let jpeg = jpeg(10, 10, 51);
    bad(app.upload("cut.jpg", jpeg[..jpeg.len() - 2].to_vec()).await).await;
    let gif = common::images::gif(10, 10, 52);
    bad(app.upload("cut.gif", gif[..gif.len() - 1].to_vec()).await).await;
    let webp = common::images::webp(10, 10, 53);
    bad(app.upload("cut.webp", webp[..webp.len() - 4].to_vec()).await).await;
    // A large file, spooled to disk, cut in its last chunk.
    let large = common::images::large_png(3 * 1024 * 1024, 54);
    bad(app.upload("cut-large.png", large[..large.len() - 100].to_vec()).await).await;
    app.assert_nothing_stored().await;

    // The same files whole are accepted.
    for (name, bytes) in [("a.png", whole), ("b.jpg", jpeg), ("c.gif", gif), ("d.webp", webp), ("e.png", large)] {
        app.upload_ok(name, bytes).await;
    }
}

/// Spooled uploads of every format are walked to their end: a defect far into the data, well
/// past what a body kept in memory would hold, is found (and the whole files pass).
async fn spooled_files_with_a_defect_past_their_first_chunks_are_rejected(b: Backends) {
    fn no_memory_budget(settings: &mut chitram::config::Settings) {
        settings.server.upload_memory_bytes = 0; // Every body over 256 KiB spools.
    }
    let app = spawn_app_with(b, TestOptions { adjust: Some(no_memory_budget), ..TestOptions::default() }).await;
    let bad = |response| assert_error(response, StatusCode::BAD_REQUEST, "INVALID_FILE_FORMAT");
    const FILLER: usize = 1024 * 1024;

    let png = common::images::large_png(2 * FILLER, 70);
    let mut bad_crc = png.clone();
    bad_crc[png.len() - 100_000] ^= 0x01;
    bad(app.upload("crc-large.png", bad_crc).await).await;

    // Entropy-coded data (no FF bytes) before the end-of-image marker.
    let mut jpeg = jpeg(64, 48, 71);
    let eoi = jpeg.len() - 2;
    jpeg.splice(eoi..eoi, std::iter::repeat_n(0x5A, FILLER));
    bad(app.upload("cut-large.jpg", jpeg[..jpeg.len() - 2].to_vec()).await).await;

    // A comment extension of 255-byte sub-blocks before the trailer.
    let mut gif = common::images::gif(64, 48, 72);
    let trailer = gif.len() - 1;
    let mut comment = vec![0x21, 0xFE];
    for _ in 0..FILLER / 256 {
        comment.push(255);
        comment.extend_from_slice(&[0x33; 255]);
    }
    comment.push(0);
    gif.splice(trailer..trailer, comment);
    bad(app.upload("cut-large.gif", gif[..gif.len() - 1].to_vec()).await).await;

    // An extra chunk after the image; the RIFF length counts it, or (bad) does not.
    let mut webp = common::images::webp(64, 48, 73);
    let riff_before = webp.len() as u32 - 8;
    webp.extend_from_slice(b"XMP ");
    webp.extend_from_slice(&(FILLER as u32).to_le_bytes());
    webp.extend(std::iter::repeat_n(0x20, FILLER));
    let mut wrong_length = webp.clone();
    wrong_length[4..8].copy_from_slice(&riff_before.to_le_bytes());
    let riff = webp.len() as u32 - 8;
    webp[4..8].copy_from_slice(&riff.to_le_bytes());
    bad(app.upload("long.webp", wrong_length).await).await;
    app.assert_nothing_stored().await;

    for (name, bytes) in [("a.png", png), ("b.jpg", jpeg), ("c.gif", gif), ("d.webp", webp)] {
        app.upload_ok(name, bytes).await;
    }
}

async fn cursors_outside_the_databases_range_are_rejected(b: Backends) {
    let app = spawn_app(b).await;
    app.upload_ok("a.png", png(2, 2, 60)).await;
    let id = uuid::Uuid::now_v7().simple();
    for micros in [i64::MIN, -210_000_000_000_000_000, -1, 253_402_300_800_000_000, 9_000_000_000_000_000_000, i64::MAX]
    {
        let cursor = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{micros}.{id}"));
        let response = app.get(&format!("/api/v1/images?cursor={cursor}")).await;
        assert_error(response, StatusCode::BAD_REQUEST, "INVALID_CURSOR").await;
    }
}
