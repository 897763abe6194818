//! Rate limits (DESIGN, "Rate limits"): token buckets per caller, uploads apart from other
//! requests and logins per username and address; in process, and shared through a real Redis
//! (a private `redis-server` per test) that is then stopped to see the fallback.

mod common;

use chitram::config::Settings;
use common::images::png;
use common::private_redis::PrivateRedis;
use common::{Backends, TestApp, TestOptions, assert_error, client_with_key, spawn_app_with};
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

fn tight_limits(settings: &mut Settings) {
    let limits = &mut settings.rate_limits;
    (limits.request_per_minute, limits.request_burst) = (6, 3);
    (limits.upload_per_minute, limits.upload_burst) = (6, 2);
    (limits.login_per_minute, limits.login_burst) = (6, 2);
    settings.auth.open_registration = true;
}

async fn limited_app(backends: Backends, redis: Option<&str>) -> TestApp {
    let options = TestOptions {
        rate_limits: true,
        adjust: Some(tight_limits),
        redis_url: redis.map(str::to_owned),
        ..TestOptions::default()
    };
    spawn_app_with(backends, options).await
}

async fn get(client: &reqwest::Client, app: &TestApp, path: &str) -> reqwest::Response {
    client.get(app.url(path)).send().await.unwrap()
}

/// Asserts a 429 with its headers, and returns its Retry-After.
async fn assert_limited(response: reqwest::Response) -> u64 {
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    assert_eq!(response.headers()["ratelimit-remaining"], "0");
    assert!(response.headers().contains_key("ratelimit-limit"));
    assert!(response.headers().contains_key("ratelimit-reset"));
    assert_error(response, StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED").await;
    retry_after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_has_its_own_buckets() {
    let app = limited_app(Backends::SQLITE_FS, None).await;
    let admin = &app.client;
    for remaining in ["2", "1", "0"] {
        let response = get(admin, &app, "/api/v1/images").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["ratelimit-limit"], "3");
        assert_eq!(response.headers()["ratelimit-remaining"], remaining);
    }
    assert_limited(get(admin, &app, "/api/v1/images").await).await;

    // Uploads draw from their own bucket; another caller (anonymous, by address) from theirs.
    let form = Form::new().part("file", Part::bytes(png(4, 4, 1)).file_name("a.png"));
    let upload = admin.post(app.url("/api/v1/images/upload")).multipart(form).send().await.unwrap();
    assert_eq!(upload.status(), StatusCode::CREATED);
    let anonymous = reqwest::Client::new();
    assert_eq!(get(&anonymous, &app, "/openapi.json").await.status(), StatusCode::OK);
    // Health checks are never limited.
    for _ in 0..5 {
        assert_eq!(get(admin, &app, "/health").await.status(), StatusCode::OK);
    }
    // A token comes back after 60 / 6 = 10 s; the limit says so.
    let response = get(admin, &app, "/api/v1/images").await;
    let retry_after = assert_limited(response).await;
    assert!(retry_after <= 10);
}

/// Refused credentials are charged to the address, as anonymous requests are: a client
/// sending bad keys meets the same limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_count_against_the_address() {
    let app = limited_app(Backends::SQLITE_FS, None).await;
    let bogus = client_with_key(Some("chm_not_a_key_of_anyone"));
    for _ in 0..3 {
        let response = get(&bogus, &app, "/api/v1/images").await;
        assert_error(response, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    }
    assert_limited(get(&bogus, &app, "/api/v1/images").await).await;
    assert_limited(get(&reqwest::Client::new(), &app, "/api/v1/images").await).await;
    // Health checks stay unlimited, even with bad credentials.
    assert_eq!(get(&bogus, &app, "/health/live").await.status(), StatusCode::UNAUTHORIZED);
    // Another caller's key has its own bucket.
    assert_eq!(get(&app.client, &app, "/api/v1/images").await.status(), StatusCode::OK);
}

fn tight_limits_behind_a_proxy(settings: &mut Settings) {
    tight_limits(settings);
    settings.rate_limits.trust_forwarded_for = true;
}

/// Behind a trusted proxy the client is the last `X-Forwarded-For` entry of the last header
/// line: a proxy that adds a line of its own (HAProxy's `option forwardfor`) leaves the
/// client's line first, and the client must not choose its bucket with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_forwarded_for_line_names_the_client() {
    let options =
        TestOptions { rate_limits: true, adjust: Some(tight_limits_behind_a_proxy), ..TestOptions::default() };
    let app = spawn_app_with(Backends::SQLITE_FS, options).await;
    let anonymous = reqwest::Client::new();
    let from = |claimed: &str, proxy_says: &str| {
        anonymous
            .get(app.url("/openapi.json"))
            .header("x-forwarded-for", claimed)
            .header("x-forwarded-for", format!("10.9.9.9, {proxy_says}"))
            .send()
    };
    for seed in 0..3 {
        assert_eq!(from(&format!("10.0.0.{seed}"), "192.0.2.1").await.unwrap().status(), StatusCode::OK);
    }
    assert_limited(from("10.0.0.77", "192.0.2.1").await.unwrap()).await;
    assert_eq!(from("10.0.0.77", "192.0.2.2").await.unwrap().status(), StatusCode::OK, "another client");
}

fn tight_login_limits(settings: &mut Settings) {
    tight_limits(settings);
    settings.rate_limits.request_burst = 10;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_limited_per_username_and_address() {
    let options = TestOptions { rate_limits: true, adjust: Some(tight_login_limits), ..TestOptions::default() };
    let app = spawn_app_with(Backends::SQLITE_FS, options).await;
    let client = reqwest::Client::new();
    let login = |username: &str| {
        client
            .post(app.url("/api/v1/auth/login"))
            .json(&json!({"username": username, "password": "guess guess"}))
            .send()
    };
    for _ in 0..2 {
        assert_error(login("admin").await.unwrap(), StatusCode::UNAUTHORIZED, "INVALID_CREDENTIALS").await;
    }
    assert_limited(login("admin").await.unwrap()).await;
    // Another username from the same address has its own attempts.
    assert_error(login("root").await.unwrap(), StatusCode::UNAUTHORIZED, "INVALID_CREDENTIALS").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_shares_the_buckets_between_instances_and_its_outage_falls_back() {
    let mut redis = PrivateRedis::start();
    // Two instances on one database: Postgres (a SQLite file takes one `serve` at a time).
    let postgres = Backends { db: common::database::DbKind::Postgres, storage: common::StorageKind::Fs };
    let app = limited_app(postgres, Some(&redis.url)).await;
    let sibling = app.spawn_sibling(0).await;
    let key = app.admin_key.clone().unwrap();
    let client = client_with_key(Some(&key));

    // One bucket of three for both instances.
    assert_eq!(get(&client, &app, "/api/v1/images").await.status(), StatusCode::OK);
    let on_sibling = client.get(format!("{}/api/v1/images", sibling.address)).send().await.unwrap();
    assert_eq!(on_sibling.status(), StatusCode::OK);
    assert_eq!(on_sibling.headers()["ratelimit-remaining"], "1", "the sibling saw the first instance's request");
    assert_eq!(get(&client, &app, "/api/v1/images").await.status(), StatusCode::OK);
    assert_limited(client.get(format!("{}/api/v1/images", sibling.address)).send().await.unwrap()).await;

    // Redis stops: requests are served, limited by each instance's own buckets, never failed.
    redis.stop();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(get(&client, &app, "/api/v1/images").await.status());
    }
    assert!(statuses.iter().all(|s| *s == StatusCode::OK || *s == StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 3, "the local bucket: {statuses:?}");
    let health: Value = get(&client, &app, "/health").await.json().await.unwrap();
    assert_ne!(health["status"], "unavailable");
}
