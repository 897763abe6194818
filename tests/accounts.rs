//! Accounts, keys and ownership (DESIGN, "Accounts, keys and ownership"): every rule of the
//! ownership table over HTTP, credentials that must be refused, quotas under concurrent
//! uploads, the first admin, and the account commands of the real binary. Each test runs on
//! SQLite and on Postgres.

mod common;

use std::time::{Duration, Instant};

use chitram::config::Settings;
use common::database::DbKind;
use common::images::{large_png, png};
use common::{Backends, StorageKind, TestApp, TestOptions, assert_error, client_with_key, spawn_app_with};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::multipart::{Form, Part};
use reqwest::{StatusCode, header};
use serde_json::{Value, json};

/// The token secret the tests set, so that they can sign tokens of their own.
const TOKEN_SECRET: &str = "a token secret for the tests, 32+ bytes";
const EXTERNAL_SECRET: &str = "the external issuer's secret, 32+ bytes";

macro_rules! on_both_databases {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() { super::$name(Backends { db: DbKind::Sqlite, storage: StorageKind::Fs }).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() { super::$name(Backends { db: DbKind::Postgres, storage: StorageKind::Fs }).await }
        }
    )+};
}

on_both_databases!(
    the_ownership_table_holds_on_every_route,
    variants_follow_their_images_visibility,
    lists_show_the_callers_own_images,
    signed_urls_open_private_images_until_they_expire,
    api_keys_are_shown_once_listed_and_revoked,
    wrong_passwords_and_unknown_users_look_the_same,
    bad_tokens_are_refused,
    external_issuer_tokens_sign_users_in,
    jwks_issuer_tokens_sign_users_in,
    quotas_hold_under_concurrent_uploads,
    a_duplicate_counts_for_its_uploader_and_deletion_gives_room_back,
    operator_routes_need_an_admin,
    registration_is_closed_unless_opened,
    bad_account_input_is_refused_and_changes_nothing,
    disabled_users_are_refused,
);

fn open_registration(settings: &mut Settings) {
    settings.auth.open_registration = true;
    settings.auth.token_secret = Some(TOKEN_SECRET.into());
}

async fn spawn(b: Backends) -> TestApp {
    spawn_app_with(b, TestOptions { adjust: Some(open_registration), ..TestOptions::default() }).await
}

/// A signed-up user with their own client.
struct Person {
    name: String,
    id: String,
    token: String,
    client: reqwest::Client,
}

async fn sign_up(app: &TestApp, name: &str) -> Person {
    let anonymous = reqwest::Client::new();
    let credentials = json!({"username": name, "password": "a good password"});
    let registered = anonymous.post(app.url("/api/v1/auth/register")).json(&credentials).send().await.unwrap();
    assert_eq!(registered.status(), StatusCode::CREATED);
    let user: Value = registered.json().await.unwrap();
    assert_eq!(user["username"], name);
    assert_eq!(user["role"], "user");
    let token = log_in(app, name, "a good password").await;
    Person {
        name: name.to_owned(),
        id: user["id"].as_str().unwrap().to_owned(),
        client: client_with_key(Some(&token)),
        token,
    }
}

async fn log_in(app: &TestApp, name: &str, password: &str) -> String {
    let response = reqwest::Client::new()
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"username": name, "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "bearer");
    assert!(body["expires_in"].as_u64().unwrap() > 0);
    body["access_token"].as_str().unwrap().to_owned()
}

async fn upload_as(app: &TestApp, client: &reqwest::Client, seed: u64, visibility: Option<&str>) -> Value {
    let mut form = Form::new();
    if let Some(visibility) = visibility {
        form = form.text("visibility", visibility.to_owned());
    }
    form = form.part("file", Part::bytes(png(8, 8, seed)).file_name("p.png"));
    let response = client.post(app.url("/api/v1/images/upload")).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED, "{}", response.text().await.unwrap());
    response.json().await.unwrap()
}

async fn status(request: reqwest::RequestBuilder) -> StatusCode {
    request.send().await.unwrap().status()
}

async fn the_ownership_table_holds_on_every_route(b: Backends) {
    let app = spawn(b).await;
    let alice = sign_up(&app, "alice").await;
    let bob = sign_up(&app, "bob").await;
    let admin = &app.client;
    let anonymous = reqwest::Client::new();

    let public = upload_as(&app, &alice.client, 1, None).await;
    let private = upload_as(&app, &alice.client, 2, Some("private")).await;
    assert_eq!(public["owner"], alice.id.as_str());
    assert_eq!(public["visibility"], "public");
    assert_eq!(private["visibility"], "private");
    let (public_id, private_id) = (public["id"].as_str().unwrap(), private["id"].as_str().unwrap());
    let etag = format!("\"{}\"", private["checksum"].as_str().unwrap());

    // Metadata, file, HEAD and revalidation: a public image to anyone; a private one to its
    // owner and an admin, and 404 to anyone else, whatever they send.
    for (who, client, sees_private) in [
        ("owner", &alice.client, true),
        ("admin", admin, true),
        ("other", &bob.client, false),
        ("anonymous", &anonymous, false),
    ] {
        for path in ["", "/file"] {
            let public_answer = status(client.get(app.url(&format!("/api/v1/images/{public_id}{path}")))).await;
            assert_eq!(public_answer, StatusCode::OK, "{who} GET public{path}");
            let url = app.url(&format!("/api/v1/images/{private_id}{path}"));
            let response = client.get(&url).send().await.unwrap();
            if sees_private {
                assert_eq!(response.status(), StatusCode::OK, "{who} GET private{path}");
            } else {
                assert_error(response, StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND").await;
            }
        }
        let file = app.url(&format!("/api/v1/images/{private_id}/file"));
        let head = status(client.head(&file)).await;
        let revalidated = client.get(&file).header(header::IF_NONE_MATCH, &etag).send().await.unwrap();
        if sees_private {
            assert_eq!(head, StatusCode::OK, "{who} HEAD private");
            assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED, "{who} revalidates");
            assert_eq!(revalidated.headers()[header::CACHE_CONTROL], "private, no-cache");
        } else {
            assert_eq!(head, StatusCode::NOT_FOUND, "{who} HEAD private");
            assert_eq!(revalidated.status(), StatusCode::NOT_FOUND, "{who}: a 304 would confirm the image exists");
        }
    }
    let public_file = anonymous.get(app.url(&format!("/api/v1/images/{public_id}/file"))).send().await.unwrap();
    assert!(public_file.headers()[header::CACHE_CONTROL].to_str().unwrap().starts_with("public"));

    // Changing visibility and deleting: the owner or an admin; someone else is told no (403)
    // about a public image, and learns nothing (404) of a private one.
    let patch = |client: &reqwest::Client, id: &str, visibility: &str| {
        client.patch(app.url(&format!("/api/v1/images/{id}"))).json(&json!({"visibility": visibility}))
    };
    assert_error(patch(&bob.client, public_id, "private").send().await.unwrap(), StatusCode::FORBIDDEN, "FORBIDDEN")
        .await;
    assert_error(
        patch(&bob.client, private_id, "public").send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "IMAGE_NOT_FOUND",
    )
    .await;
    assert_error(
        patch(&anonymous, public_id, "private").send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
    )
    .await;
    let delete = |client: &reqwest::Client, id: &str| client.delete(app.url(&format!("/api/v1/images/{id}")));
    assert_error(delete(&bob.client, public_id).send().await.unwrap(), StatusCode::FORBIDDEN, "FORBIDDEN").await;
    assert_error(delete(&bob.client, private_id).send().await.unwrap(), StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND").await;
    let refused = delete(&anonymous, public_id).send().await.unwrap();
    assert_eq!(refused.headers()[header::WWW_AUTHENTICATE], "Bearer");
    assert_error(refused, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    assert_eq!(app.image_count().await, 2, "nothing was changed by the refused calls");

    let changed: Value = patch(&alice.client, public_id, "private").send().await.unwrap().json().await.unwrap();
    assert_eq!(changed["visibility"], "private");
    assert_eq!(status(anonymous.get(app.url(&format!("/api/v1/images/{public_id}")))).await, StatusCode::NOT_FOUND);
    assert_eq!(status(patch(admin, public_id, "public")).await, StatusCode::OK);
    assert_eq!(status(anonymous.get(app.url(&format!("/api/v1/images/{public_id}")))).await, StatusCode::OK);

    assert_eq!(status(delete(&alice.client, public_id)).await, StatusCode::NO_CONTENT);
    assert_eq!(status(delete(admin, private_id)).await, StatusCode::NO_CONTENT);
    assert_eq!(app.image_count().await, 0);

    // Uploads need someone to own them, on both upload routes.
    let form = Form::new().part("file", Part::bytes(png(4, 4, 9)).file_name("a.png"));
    let anonymous_upload = anonymous.post(app.url("/api/v1/images/upload")).multipart(form).send().await.unwrap();
    assert_error(anonymous_upload, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    let form = Form::new().part("files", Part::bytes(png(4, 4, 9)).file_name("a.png"));
    let anonymous_batch = anonymous.post(app.url("/api/v1/images/batch")).multipart(form).send().await.unwrap();
    assert_error(anonymous_batch, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    let form = Form::new()
        .text("visibility", "private")
        .part("files", Part::bytes(png(4, 4, 10)).file_name("a.png"))
        .part("files", Part::bytes(png(4, 4, 11)).file_name("b.png"));
    let batch: Value =
        bob.client.post(app.url("/api/v1/images/batch")).multipart(form).send().await.unwrap().json().await.unwrap();
    assert_eq!(batch["succeeded"], 2, "{batch}");
    for item in batch["results"].as_array().unwrap() {
        assert_eq!(item["image"]["owner"], bob.id.as_str());
        assert_eq!(item["image"]["visibility"], "private");
    }
    assert_eq!(app.image_count().await, 2);
}

/// A PNG the variant pipeline can decode (the fixtures' PNGs are valid containers around
/// pixels no decoder is asked for).
fn decodable_png(seed: u8) -> Vec<u8> {
    let pixels = image::RgbImage::from_pixel(40, 30, image::Rgb([seed, 100, 200]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    pixels.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    bytes.into_inner()
}

/// A private image's thumbnail is as private as the image: 404 to others, and served to its
/// owner, an admin and the image's signed URL, never kept by a shared cache.
async fn variants_follow_their_images_visibility(b: Backends) {
    let app = spawn(b).await;
    let alice = sign_up(&app, "alice").await;
    let bob = sign_up(&app, "bob").await;
    let upload = |bytes: Vec<u8>, visibility: &str| {
        let form = Form::new()
            .text("visibility", visibility.to_owned())
            .part("file", Part::bytes(bytes).file_name("photo.png"));
        alice.client.post(app.url("/api/v1/images/upload")).multipart(form).send()
    };
    let public: Value = upload(decodable_png(1), "public").await.unwrap().json().await.unwrap();
    let private: Value = upload(decodable_png(2), "private").await.unwrap().json().await.unwrap();
    let thumb = |image: &Value| app.url(&format!("/api/v1/images/{}/variants/thumb", image["id"].as_str().unwrap()));
    let anonymous = reqwest::Client::new();

    let served = anonymous.get(thumb(&public)).send().await.unwrap();
    assert_eq!(served.status(), StatusCode::OK);
    assert!(served.headers()[header::CACHE_CONTROL].to_str().unwrap().starts_with("public"));
    for (who, client) in [("anonymous", &anonymous), ("other user", &bob.client)] {
        let refused = client.get(thumb(&private)).send().await.unwrap();
        assert_error(refused, StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND").await;
        assert_eq!(status(client.head(thumb(&private))).await, StatusCode::NOT_FOUND, "{who} HEAD");
    }
    for client in [&alice.client, &app.client] {
        let served = client.get(thumb(&private)).send().await.unwrap();
        assert_eq!(served.status(), StatusCode::OK);
        assert_eq!(served.headers()[header::CACHE_CONTROL], "private, no-cache");
    }
    let id = private["id"].as_str().unwrap();
    let signed: Value = alice
        .client
        .post(app.url(&format!("/api/v1/images/{id}/signed-url")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let query = signed["url"].as_str().unwrap().split_once('?').unwrap().1.to_owned();
    let by_link = anonymous.get(format!("{}?{query}", thumb(&private))).send().await.unwrap();
    assert_eq!(by_link.status(), StatusCode::OK, "the image's signed URL opens its variants");
}

async fn lists_show_the_callers_own_images(b: Backends) {
    let app = spawn(b).await;
    let alice = sign_up(&app, "alice").await;
    let bob = sign_up(&app, "bob").await;
    for seed in 0..3 {
        upload_as(&app, &alice.client, seed, None).await;
    }
    upload_as(&app, &bob.client, 10, Some("private")).await;
    let ids = |page: &Value| page["items"].as_array().unwrap().len();
    let list = |client: &reqwest::Client, query: &str| client.get(app.url(&format!("/api/v1/images{query}"))).send();

    let alices: Value = list(&alice.client, "?limit=2").await.unwrap().json().await.unwrap();
    assert_eq!(ids(&alices), 2);
    assert!(alices["items"].as_array().unwrap().iter().all(|image| image["owner"] == alice.id.as_str()));
    let cursor = alices["next_cursor"].as_str().unwrap();
    let rest: Value = list(&alice.client, &format!("?limit=2&cursor={cursor}")).await.unwrap().json().await.unwrap();
    assert_eq!(ids(&rest), 1);
    assert!(rest["next_cursor"].is_null());
    let bobs: Value = list(&bob.client, "").await.unwrap().json().await.unwrap();
    assert_eq!(ids(&bobs), 1);
    let own_by_name: Value = list(&bob.client, "?owner=bob").await.unwrap().json().await.unwrap();
    assert_eq!(ids(&own_by_name), 1);

    assert_error(list(&bob.client, "?owner=alice").await.unwrap(), StatusCode::FORBIDDEN, "FORBIDDEN").await;
    assert_error(list(&reqwest::Client::new(), "").await.unwrap(), StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    let admins_own: Value = list(&app.client, "").await.unwrap().json().await.unwrap();
    assert_eq!(ids(&admins_own), 0, "an admin's own list is their own images");
    let of_alice: Value = list(&app.client, "?owner=alice").await.unwrap().json().await.unwrap();
    assert_eq!(ids(&of_alice), 3);
    let everyone: Value = list(&app.client, "?owner=*").await.unwrap().json().await.unwrap();
    assert_eq!(ids(&everyone), 4);
    assert_error(list(&app.client, "?owner=nobody").await.unwrap(), StatusCode::NOT_FOUND, "USER_NOT_FOUND").await;
    // A name no user can have (a NUL: Postgres refuses it in text) is nobody too, not a 500.
    assert_error(list(&app.client, "?owner=%00").await.unwrap(), StatusCode::NOT_FOUND, "USER_NOT_FOUND").await;
}

async fn signed_urls_open_private_images_until_they_expire(b: Backends) {
    let app = spawn(b).await;
    let alice = sign_up(&app, "alice").await;
    let bob = sign_up(&app, "bob").await;
    let image = upload_as(&app, &alice.client, 1, Some("private")).await;
    let id = image["id"].as_str().unwrap();
    let sign = |client: &reqwest::Client, body: Value| {
        client.post(app.url(&format!("/api/v1/images/{id}/signed-url"))).json(&body).send()
    };
    assert_error(sign(&bob.client, json!({})).await.unwrap(), StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND").await;
    assert_error(
        sign(&alice.client, json!({"expires_in": 0})).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "INVALID_EXPIRY",
    )
    .await;
    let too_long = json!({"expires_in": 8 * 24 * 3600});
    assert_error(sign(&alice.client, too_long).await.unwrap(), StatusCode::BAD_REQUEST, "INVALID_EXPIRY").await;

    let signed: Value = sign(&alice.client, json!({"expires_in": 60})).await.unwrap().json().await.unwrap();
    let url = signed["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("/api/v1/images/{id}/file?expires=")));
    let anonymous = reqwest::Client::new();
    let file = anonymous.get(app.url(url)).send().await.unwrap();
    assert_eq!(file.status(), StatusCode::OK);
    assert_eq!(file.headers()[header::CACHE_CONTROL], "private, no-cache");
    assert_eq!(file.bytes().await.unwrap().len() as u64, image["file_size"].as_u64().unwrap());
    let query = url.split_once('?').unwrap().1;
    let metadata = anonymous.get(app.url(&format!("/api/v1/images/{id}?{query}"))).send().await.unwrap();
    assert_eq!(metadata.status(), StatusCode::OK);

    // A signature for another image, a changed expiry or a changed signature: as if absent.
    let other = upload_as(&app, &alice.client, 2, Some("private")).await;
    let other_id = other["id"].as_str().unwrap();
    let expires: i64 = query.split('&').next().unwrap().trim_start_matches("expires=").parse().unwrap();
    let signature = query.rsplit_once("signature=").unwrap().1;
    for forged in [
        format!("/api/v1/images/{other_id}/file?{query}"),
        format!("/api/v1/images/{id}/file?expires={}&signature={signature}", expires + 3600),
        format!("/api/v1/images/{id}/file?expires={expires}&signature={}", "0".repeat(64)),
    ] {
        assert_error(anonymous.get(app.url(&forged)).send().await.unwrap(), StatusCode::NOT_FOUND, "IMAGE_NOT_FOUND")
            .await;
    }

    let short: Value = sign(&alice.client, json!({"expires_in": 1})).await.unwrap().json().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let expired = anonymous.get(app.url(short["url"].as_str().unwrap())).send().await.unwrap();
    assert_error(expired, StatusCode::FORBIDDEN, "SIGNED_URL_EXPIRED").await;
}

async fn api_keys_are_shown_once_listed_and_revoked(b: Backends) {
    let app = spawn(b).await;
    let alice = sign_up(&app, "alice").await;
    let created =
        alice.client.post(app.url("/api/v1/auth/keys")).json(&json!({"name": "laptop"})).send().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("chm_") && key.len() == 47, "{key}");
    assert!(key.starts_with(created["prefix"].as_str().unwrap()));

    let with_key = client_with_key(Some(&key));
    let me: Value = with_key.get(app.url("/api/v1/auth/me")).send().await.unwrap().json().await.unwrap();
    assert_eq!(me["username"], "alice");
    let uploaded = upload_as(&app, &with_key, 1, None).await;
    assert_eq!(uploaded["owner"], alice.id.as_str());

    let listed: Value = alice.client.get(app.url("/api/v1/auth/keys")).send().await.unwrap().json().await.unwrap();
    let listed = listed["items"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["name"], "laptop");
    assert!(listed[0].get("key").is_none(), "a key is shown once, at creation");
    assert!(!listed.iter().any(|item| item.to_string().contains(&key[4..])));
    assert!(listed[0]["last_used_at"].is_string(), "its use was recorded");

    // Someone else cannot revoke it; its owner can, and it stops at the next request.
    let key_id = created["id"].as_str().unwrap();
    let bob = sign_up(&app, "bob").await;
    let revoke = |client: &reqwest::Client| client.delete(app.url(&format!("/api/v1/auth/keys/{key_id}"))).send();
    assert_error(revoke(&bob.client).await.unwrap(), StatusCode::NOT_FOUND, "KEY_NOT_FOUND").await;
    assert_eq!(status(with_key.get(app.url("/api/v1/auth/me"))).await, StatusCode::OK);
    assert_eq!(revoke(&alice.client).await.unwrap().status(), StatusCode::NO_CONTENT);
    let refused = with_key.get(app.url("/api/v1/auth/me")).send().await.unwrap();
    assert_eq!(refused.headers()[header::WWW_AUTHENTICATE], "Bearer error=\"invalid_token\"");
    assert_error(refused, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    assert_error(revoke(&alice.client).await.unwrap(), StatusCode::NOT_FOUND, "KEY_NOT_FOUND").await;
    let listed: Value = alice.client.get(app.url("/api/v1/auth/keys")).send().await.unwrap().json().await.unwrap();
    assert!(listed["items"][0]["revoked_at"].is_string());
}

async fn wrong_passwords_and_unknown_users_look_the_same(b: Backends) {
    let app = spawn(b).await;
    sign_up(&app, "alice").await;
    let attempt = |username: &str, password: &str| {
        let body = json!({"username": username, "password": password});
        let request = reqwest::Client::new().post(app.url("/api/v1/auth/login")).json(&body);
        async move {
            let started = Instant::now();
            let response = request.send().await.unwrap();
            let elapsed = started.elapsed();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body, elapsed)
        }
    };
    let (wrong_status, wrong_body, _) = attempt("alice", "not her password").await;
    let (unknown_status, unknown_body, _) = attempt("nobody", "not her password").await;
    assert_eq!(wrong_status, StatusCode::UNAUTHORIZED);
    assert_eq!((wrong_status, &wrong_body), (unknown_status, &unknown_body), "one answer for both");
    assert_eq!(wrong_body["detail"]["code"], "INVALID_CREDENTIALS");

    // Both cost one Argon2 verification. Without the decoy, an unknown user would answer in
    // a database lookup's time: a small fraction of a password check.
    let mut wrong = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..3 {
        wrong.push(attempt("alice", "still not it").await.2);
        unknown.push(attempt("nobody", "still not it").await.2);
    }
    wrong.sort();
    unknown.sort();
    assert!(unknown[1] * 3 > wrong[1], "unknown user {:?} against wrong password {:?}", unknown[1], wrong[1]);
}

fn sign(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

async fn bad_tokens_are_refused(b: Backends) {
    let app = spawn(b).await;
    let alice = sign_up(&app, "alice").await;
    let now = chrono::Utc::now().timestamp();
    let claims = |exp: i64, iss: &str, aud: &str| json!({"sub": alice.id, "role": "admin", "iss": iss, "aud": aud, "iat": now, "exp": exp});
    let good = sign(&claims(now + 600, "chitram", "chitram-api"), TOKEN_SECRET);
    let me = |token: String| {
        reqwest::Client::new()
            .get(app.url("/api/v1/auth/me"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .send()
    };
    let answer: Value = me(good.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(answer["role"], "user", "the role comes from the database, not from the token");

    let (header_part, payload_part) = {
        let mut parts = good.split('.');
        (parts.next().unwrap().to_owned(), parts.next().unwrap().to_owned())
    };
    use base64::Engine;
    let none_header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let refused = [
        ("alg none", format!("{none_header}.{payload_part}.")),
        ("wrong signature", sign(&claims(now + 600, "chitram", "chitram-api"), "another secret, also 32+ bytes long")),
        ("wrong issuer", sign(&claims(now + 600, "someone-else", "chitram-api"), TOKEN_SECRET)),
        ("wrong audience", sign(&claims(now + 600, "chitram", "another-api"), TOKEN_SECRET)),
        ("expired", sign(&claims(now - 60, "chitram", "chitram-api"), TOKEN_SECRET)),
        (
            "no expiry",
            sign(&json!({"sub": alice.id, "role": "user", "iss": "chitram", "aud": "chitram-api"}), TOKEN_SECRET),
        ),
        ("truncated", format!("{header_part}.{payload_part}")),
        ("garbage", "not a token at all".to_owned()),
        ("unknown key", "chm_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_owned()),
    ];
    for (what, token) in refused {
        let response = me(token).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_error(response, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    }
    for header_value in ["Basic YWxpY2U6cGFzcw==", "Bearer", "Bearer    ", "token-without-scheme"] {
        let response = reqwest::Client::new()
            .get(app.url("/api/v1/images"))
            .header(header::AUTHORIZATION, header_value)
            .send()
            .await
            .unwrap();
        assert_error(response, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    }
    let _ = alice.token;
}

fn with_external_issuer(settings: &mut Settings) {
    open_registration(settings);
    settings.auth.external = Some(chitram::config::ExternalIssuerSettings {
        issuer: "https://auth.example.org".into(),
        audience: "authenticated".into(),
        hs256_secret: Some(EXTERNAL_SECRET.into()),
        jwks_file: None,
        username_claim: Some("email".into()),
    });
}

async fn external_issuer_tokens_sign_users_in(b: Backends) {
    let app = spawn_app_with(b, TestOptions { adjust: Some(with_external_issuer), ..TestOptions::default() }).await;
    let now = chrono::Utc::now().timestamp();
    let token = |sub: &str, aud: &str, secret: &str| {
        let claims = json!({"sub": sub, "email": format!("{sub}@example.org"), "role": "authenticated",
            "iss": "https://auth.example.org", "aud": aud, "iat": now, "exp": now + 600});
        client_with_key(Some(&sign(&claims, secret)))
    };
    let carol = token("carol", "authenticated", EXTERNAL_SECRET);
    let me: Value = carol.get(app.url("/api/v1/auth/me")).send().await.unwrap().json().await.unwrap();
    assert_eq!(me["username"], "carol@example.org");
    assert_eq!(me["role"], "user", "an external issuer never makes admins");
    let image = upload_as(&app, &carol, 1, None).await;
    assert_eq!(image["owner"], me["id"]);
    let again: Value = carol.get(app.url("/api/v1/auth/me")).send().await.unwrap().json().await.unwrap();
    assert_eq!(again["id"], me["id"], "the same user the next time");
    // A claimed name no local user could have (here a newline) is not taken as the username.
    let claims = json!({"sub": "dave", "email": "dave\nadmin@example.org", "role": "authenticated",
        "iss": "https://auth.example.org", "aud": "authenticated", "iat": now, "exp": now + 600});
    let dave = client_with_key(Some(&sign(&claims, EXTERNAL_SECRET)));
    let me: Value = dave.get(app.url("/api/v1/auth/me")).send().await.unwrap().json().await.unwrap();
    assert!(me["username"].as_str().unwrap().starts_with("ext-"), "{me}");

    for (what, client) in [
        ("wrong audience", token("carol", "someone-else", EXTERNAL_SECRET)),
        ("signed with our own secret", token("carol", "authenticated", TOKEN_SECRET)),
    ] {
        let response = client.get(app.url("/api/v1/auth/me")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
    }
}

/// An ES256 key pair of the test's own, as the JWKS file the config names and a signing key.
struct JwksIssuer {
    encoding: EncodingKey,
    jwks: Value,
}

fn jwks_issuer() -> JwksIssuer {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let pkcs8 = pair.to_pkcs8v1().unwrap();
    // The public key is the uncompressed point: 0x04, then x and y, 32 bytes each.
    let point = pair.public_key().as_ref().to_vec();
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "test-key", "alg": "ES256", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])}]});
    JwksIssuer { encoding: EncodingKey::from_ec_der(pkcs8.as_ref()), jwks }
}

static JWKS: std::sync::OnceLock<(JwksIssuer, tempfile::TempDir)> = std::sync::OnceLock::new();

fn with_jwks_issuer(settings: &mut Settings) {
    let (issuer, dir) = JWKS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let issuer = jwks_issuer();
        std::fs::write(dir.path().join("jwks.json"), issuer.jwks.to_string()).unwrap();
        (issuer, dir)
    });
    let _ = issuer;
    settings.auth.external = Some(chitram::config::ExternalIssuerSettings {
        issuer: "https://idp.example.org".into(),
        audience: "chitram".into(),
        hs256_secret: None,
        jwks_file: Some(dir.path().join("jwks.json")),
        username_claim: None,
    });
}

async fn jwks_issuer_tokens_sign_users_in(b: Backends) {
    let app = spawn_app_with(b, TestOptions { adjust: Some(with_jwks_issuer), ..TestOptions::default() }).await;
    let (issuer, _) = JWKS.get().unwrap();
    let now = chrono::Utc::now().timestamp();
    let claims =
        json!({"sub": "dave", "iss": "https://idp.example.org", "aud": "chitram", "iat": now, "exp": now + 600});
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("test-key".into());
    let token = jsonwebtoken::encode(&header, &claims, &issuer.encoding).unwrap();
    let dave = client_with_key(Some(&token));
    let me: Value = dave.get(app.url("/api/v1/auth/me")).send().await.unwrap().json().await.unwrap();
    assert_eq!(me["username"], "dave", "{me}");

    // The same claims under HS256 with the public key's bytes as the secret, or under another
    // key id, are refused: a JWKS key never verifies an HMAC.
    let x = issuer.jwks["keys"][0]["x"].as_str().unwrap();
    let confused = sign(&claims, &format!("{x}{x}"));
    let mut other = Header::new(Algorithm::ES256);
    other.kid = Some("another-key".into());
    let unknown_kid = jsonwebtoken::encode(&other, &claims, &issuer.encoding).unwrap();
    for (what, token) in [("HS256", confused), ("unknown kid", unknown_kid)] {
        let response = client_with_key(Some(&token)).get(app.url("/api/v1/auth/me")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
    }
}

fn small_quota(settings: &mut Settings) {
    open_registration(settings);
    settings.auth.default_quota_images = 3;
}

async fn quotas_hold_under_concurrent_uploads(b: Backends) {
    let app = spawn_app_with(b, TestOptions { adjust: Some(small_quota), ..TestOptions::default() }).await;
    let alice = sign_up(&app, "alice").await;
    let uploads = (0..8).map(|seed| {
        let form = Form::new().part("file", Part::bytes(png(16, 16, 100 + seed)).file_name("q.png"));
        alice.client.post(app.url("/api/v1/images/upload")).multipart(form).send()
    });
    let responses = futures::future::join_all(uploads).await;
    let mut created = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status() {
            StatusCode::CREATED => created += 1,
            _ => assert_error(response, StatusCode::FORBIDDEN, "QUOTA_EXCEEDED").await,
        }
    }
    assert_eq!(created, 3, "exactly the quota, however the uploads interleave");
    assert_eq!(app.image_count().await, 3);
    let me: Value = alice.client.get(app.url("/api/v1/auth/me")).send().await.unwrap().json().await.unwrap();
    assert_eq!(me["usage"]["images"], 3);
    assert_eq!(me["quota"]["images"], 3);
    assert_eq!(me["quota"]["bytes"], 10u64 * 1024 * 1024 * 1024);
    // Refused uploads leave no object behind: every object on the shards is a recorded copy.
    common::eventually(Duration::from_secs(10), "refused uploads' copies are removed", || objects_are_recorded(&app))
        .await;
}

/// Whether every object on the shards belongs to a recorded image.
async fn objects_are_recorded(app: &TestApp) -> bool {
    let page: Value = app.get("/api/v1/images?owner=*&limit=100").await.json().await.unwrap();
    let keys: Vec<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|image| image["storage_key"].as_str().unwrap().to_owned())
        .collect();
    app.all_objects().iter().all(|path| keys.iter().any(|key| path.to_string_lossy().contains(key.as_str())))
}

fn byte_quota(settings: &mut Settings) {
    open_registration(settings);
    settings.auth.default_quota_bytes = 5_000;
}

async fn a_duplicate_counts_for_its_uploader_and_deletion_gives_room_back(b: Backends) {
    let app = spawn_app_with(b, TestOptions { adjust: Some(byte_quota), ..TestOptions::default() }).await;
    let alice = sign_up(&app, "alice").await;
    let bob = sign_up(&app, "bob").await;
    let bytes = large_png(2_000, 7);
    let size = bytes.len() as u64;
    let upload = |client: &reqwest::Client, bytes: Vec<u8>| {
        let form = Form::new().part("file", Part::bytes(bytes).file_name("d.png"));
        client.post(app.url("/api/v1/images/upload")).multipart(form).send()
    };
    let first: Value = upload(&alice.client, bytes.clone()).await.unwrap().json().await.unwrap();
    let second: Value = upload(&bob.client, bytes.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(first["storage_key"], second["storage_key"], "one blob");
    assert_ne!(first["owner"], second["owner"], "two images, two owners");
    let usage = |person: &Person| {
        let client = person.client.clone();
        let url = app.url("/api/v1/auth/me");
        async move {
            let me: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            me["usage"]["bytes"].as_u64().unwrap()
        }
    };
    assert_eq!(usage(&alice).await, size);
    assert_eq!(usage(&bob).await, size, "a duplicate counts for its uploader");

    // Over the byte quota: refused before anything is written.
    let objects_before = app.all_objects().len();
    let big = large_png(3_500, 8);
    assert_error(upload(&alice.client, big.clone()).await.unwrap(), StatusCode::FORBIDDEN, "QUOTA_EXCEEDED").await;
    assert_eq!(app.all_objects().len(), objects_before, "nothing written for a refused upload");
    let deleted = alice.client.delete(app.url(&format!("/api/v1/images/{}", first["id"].as_str().unwrap())));
    assert_eq!(status(deleted).await, StatusCode::NO_CONTENT);
    assert_eq!(usage(&alice).await, 0, "deleting gives the room back");
    assert_eq!(upload(&alice.client, big).await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(usage(&alice).await, 3_500);
}

async fn operator_routes_need_an_admin(b: Backends) {
    let app = spawn(b).await;
    let alice = sign_up(&app, "alice").await;
    let anonymous = reqwest::Client::new();
    let replication = "/api/v1/admin/replication";
    assert_error(anonymous.get(app.url(replication)).send().await.unwrap(), StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
        .await;
    assert_error(alice.client.get(app.url(replication)).send().await.unwrap(), StatusCode::FORBIDDEN, "FORBIDDEN")
        .await;
    assert_eq!(app.get(replication).await.status(), StatusCode::OK);
    assert_error(anonymous.get(app.url("/metrics")).send().await.unwrap(), StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
        .await;
    assert_error(alice.client.get(app.url("/metrics")).send().await.unwrap(), StatusCode::FORBIDDEN, "FORBIDDEN").await;
    assert_eq!(app.get("/metrics").await.status(), StatusCode::OK);
    // Load balancers' probes need no credentials.
    for probe in ["/health/live", "/health/ready"] {
        assert_eq!(status(anonymous.get(app.url(probe))).await, StatusCode::OK, "{probe}");
    }

    // /health answers everyone (load balancers), but names the internals to admins only.
    for (who, client) in [("anonymous", &anonymous), ("user", &alice.client)] {
        let health: Value = client.get(app.url("/health")).send().await.unwrap().json().await.unwrap();
        assert_eq!(health["status"], "ok", "{who}");
        assert!(health.get("shards").is_none() && health.get("database").is_none(), "{who}: {health}");
    }
    let health: Value = app.get("/health").await.json().await.unwrap();
    assert_eq!(health["shards"].as_array().unwrap().len(), 3);
    // The docs are public; a user's own account and keys are for that user.
    assert_eq!(status(anonymous.get(app.url("/openapi.json"))).await, StatusCode::OK);
    let keys = app.url("/api/v1/auth/keys");
    let some_key = app.url(&format!("/api/v1/auth/keys/{}", uuid::Uuid::now_v7()));
    for request in [
        anonymous.get(app.url("/api/v1/auth/me")),
        anonymous.get(&keys),
        anonymous.post(&keys).json(&json!({"name": "mine"})),
        anonymous.delete(&some_key),
    ] {
        assert_error(request.send().await.unwrap(), StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    }
}

async fn registration_is_closed_unless_opened(b: Backends) {
    let app = common::spawn_app(b).await;
    let body = json!({"username": "mallory", "password": "a good password"});
    let response = reqwest::Client::new().post(app.url("/api/v1/auth/register")).json(&body).send().await.unwrap();
    assert_error(response, StatusCode::FORBIDDEN, "REGISTRATION_CLOSED").await;
    let users = app.metadata.list_users().await.unwrap();
    assert_eq!(users.len(), 1, "only the first admin: {users:?}");
}

async fn bad_account_input_is_refused_and_changes_nothing(b: Backends) {
    let app = spawn(b).await;
    let alice = sign_up(&app, "alice").await;
    let anonymous = reqwest::Client::new();
    let register = |body: Value| anonymous.post(app.url("/api/v1/auth/register")).json(&body).send();
    let cases = [
        (json!({"username": "alice", "password": "a good password"}), StatusCode::CONFLICT, "USERNAME_TAKEN"),
        (json!({"username": "a", "password": "a good password"}), StatusCode::BAD_REQUEST, "INVALID_USERNAME"),
        (json!({"username": "has space", "password": "a good password"}), StatusCode::BAD_REQUEST, "INVALID_USERNAME"),
        (json!({"username": "carol", "password": "short"}), StatusCode::BAD_REQUEST, "INVALID_PASSWORD"),
        (json!({"username": "carol"}), StatusCode::BAD_REQUEST, "INVALID_BODY"),
        (
            json!({"username": "carol", "password": "a good password", "role": "admin"}),
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
        ),
    ];
    for (body, expected, code) in cases {
        assert_error(register(body).await.unwrap(), expected, code).await;
    }
    let not_json = anonymous.post(app.url("/api/v1/auth/login")).body("username=alice").send().await.unwrap();
    assert_error(not_json, StatusCode::BAD_REQUEST, "INVALID_BODY").await;
    // A name no account can have (Postgres refuses a NUL in text): refused like any other.
    for username in ["a\u{0}b", "tab\there", &"x".repeat(10_000)] {
        let login = json!({"username": username, "password": "a good password"});
        let response = anonymous.post(app.url("/api/v1/auth/login")).json(&login).send().await.unwrap();
        assert_error(response, StatusCode::UNAUTHORIZED, "INVALID_CREDENTIALS").await;
    }
    let keys = app.url("/api/v1/auth/keys");
    for name in ["", "   ", "line\nbreak"] {
        let response = alice.client.post(&keys).json(&json!({"name": name})).send().await.unwrap();
        assert_error(response, StatusCode::BAD_REQUEST, "INVALID_KEY_NAME").await;
    }
    let bad_id = alice.client.delete(app.url("/api/v1/auth/keys/not-a-uuid")).send().await.unwrap();
    assert_error(bad_id, StatusCode::NOT_FOUND, "KEY_NOT_FOUND").await;
    let image = upload_as(&app, &alice.client, 1, None).await;
    let id = image["id"].as_str().unwrap();
    let patch = alice.client.patch(app.url(&format!("/api/v1/images/{id}"))).json(&json!({"visibility": "secret"}));
    assert_error(patch.send().await.unwrap(), StatusCode::BAD_REQUEST, "INVALID_BODY").await;
    let upload = alice
        .client
        .post(app.url("/api/v1/images/upload?visibility=hidden"))
        .multipart(Form::new().part("file", Part::bytes(png(4, 4, 3)).file_name("x.png")))
        .send()
        .await
        .unwrap();
    assert_error(upload, StatusCode::BAD_REQUEST, "INVALID_VISIBILITY").await;
    let form = Form::new().text("visibility", "hidden").part("file", Part::bytes(png(4, 4, 4)).file_name("x.png"));
    let upload = alice.client.post(app.url("/api/v1/images/upload")).multipart(form).send().await.unwrap();
    assert_error(upload, StatusCode::BAD_REQUEST, "INVALID_VISIBILITY").await;

    assert_eq!(app.metadata.list_users().await.unwrap().len(), 2, "admin and alice only");
    assert_eq!(app.image_count().await, 1);
    let listed: Value = alice.client.get(&keys).send().await.unwrap().json().await.unwrap();
    assert!(listed["items"].as_array().unwrap().is_empty());
}

fn no_credential_cache(settings: &mut Settings) {
    open_registration(settings);
    settings.auth.credential_cache_secs = 0;
}

async fn disabled_users_are_refused(b: Backends) {
    let app = spawn_app_with(b, TestOptions { adjust: Some(no_credential_cache), ..TestOptions::default() }).await;
    let alice = sign_up(&app, "alice").await;
    assert_eq!(status(alice.client.get(app.url("/api/v1/auth/me"))).await, StatusCode::OK);
    assert!(app.metadata.set_disabled("alice", true).await.unwrap());
    assert_error(
        alice.client.get(app.url("/api/v1/auth/me")).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
    )
    .await;
    let login = reqwest::Client::new()
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"username": alice.name, "password": "a good password"}))
        .send()
        .await
        .unwrap();
    assert_error(login, StatusCode::UNAUTHORIZED, "INVALID_CREDENTIALS").await;
}

/// The first start with accounts on: one admin, one key in a file only its owner reads, and
/// the images uploaded with accounts off given to that admin. A second start creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_start_creates_one_admin_key_and_adopts_older_images() {
    let mut app = spawn_app_with(Backends::SQLITE_FS, TestOptions { auth: false, ..TestOptions::default() }).await;
    assert!(app.admin_key.is_none());
    for seed in 0..2 {
        let image = app.upload_ok("old.png", png(8, 8, seed)).await;
        assert!(image["owner"].is_null(), "accounts off: no owner");
    }
    let token_file = app.settings.auth.admin_token_file.clone();
    assert!(!token_file.exists(), "accounts off: no admin is made");

    // The same store started again with accounts on (one `serve` per SQLite file at a time).
    app.stop_serving().await;
    let mut settings = app.settings.clone();
    settings.auth.enabled = true;
    settings.server.bind = "127.0.0.1:0".parse().unwrap();
    let first = chitram::app::Application::build(&settings).await.unwrap();
    let key = std::fs::read_to_string(&token_file).unwrap();
    assert!(key.trim().starts_with("chm_"), "{key}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    let admin = app.metadata.first_admin().await.unwrap().expect("an admin");
    assert_eq!(admin.username, "admin");
    assert_eq!(admin.usage.images, 2, "the older images are the admin's now");
    let page = app.metadata.list_images(10, None, Some(admin.id)).await.unwrap();
    assert_eq!(page.len(), 2);
    drop(first);

    let _second = chitram::app::Application::build(&settings).await.unwrap();
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), key, "the key is written once");
    assert_eq!(app.metadata.list_users().await.unwrap().len(), 1);
    let keys = app.metadata.list_api_keys(admin.id).await.unwrap();
    assert_eq!(keys.len(), 1);
}

/// With accounts off, every route is open, as before accounts existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_off_keeps_every_route_open() {
    let app = spawn_app_with(Backends::SQLITE_FS, TestOptions { auth: false, ..TestOptions::default() }).await;
    let image = app.upload_ok("open.png", png(8, 8, 1)).await;
    let id = image["id"].as_str().unwrap();
    let anonymous = reqwest::Client::new();
    assert_eq!(status(anonymous.get(app.url("/api/v1/images"))).await, StatusCode::OK);
    assert_eq!(status(anonymous.get(app.url("/api/v1/admin/replication"))).await, StatusCode::OK);
    let health: Value = anonymous.get(app.url("/health")).send().await.unwrap().json().await.unwrap();
    assert!(health["shards"].is_array(), "everyone is admin with accounts off");
    let private = anonymous.patch(app.url(&format!("/api/v1/images/{id}"))).json(&json!({"visibility": "private"}));
    assert_eq!(status(private).await, StatusCode::OK);
    assert_eq!(status(anonymous.get(app.url(&format!("/api/v1/images/{id}/file")))).await, StatusCode::OK);
    assert_eq!(status(anonymous.delete(app.url(&format!("/api/v1/images/{id}")))).await, StatusCode::NO_CONTENT);
    // No accounts to speak of.
    assert_error(
        anonymous.get(app.url("/api/v1/auth/me")).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
    )
    .await;
    let register = anonymous
        .post(app.url("/api/v1/auth/register"))
        .json(&json!({"username": "eve", "password": "a good password"}));
    assert_error(register.send().await.unwrap(), StatusCode::FORBIDDEN, "REGISTRATION_CLOSED").await;
}

/// With accounts off, the open routes are open to this machine only: a request for another
/// host name (DNS rebinding) and a write from another site's page (a forged form) are refused
/// with nothing changed; its own pages and clients that are not browsers pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_off_serves_this_machine_and_its_own_pages_only() {
    let app = spawn_app_with(Backends::SQLITE_FS, TestOptions { auth: false, ..TestOptions::default() }).await;
    let image = app.upload_ok("local.png", png(8, 8, 2)).await;
    let id = image["id"].as_str().unwrap();
    let anonymous = reqwest::Client::new();
    let rebound = anonymous.get(app.url("/api/v1/images")).header(reqwest::header::HOST, "attacker.example:8000");
    assert_error(rebound.send().await.unwrap(), StatusCode::FORBIDDEN, "LOCAL_ONLY").await;
    let rebound_delete =
        anonymous.delete(app.url(&format!("/api/v1/images/{id}"))).header(reqwest::header::HOST, "attacker.example");
    assert_error(rebound_delete.send().await.unwrap(), StatusCode::FORBIDDEN, "LOCAL_ONLY").await;
    let forged = anonymous
        .delete(app.url(&format!("/api/v1/images/{id}")))
        .header(reqwest::header::ORIGIN, "https://attacker.example");
    assert_error(forged.send().await.unwrap(), StatusCode::FORBIDDEN, "LOCAL_ONLY").await;
    let part = reqwest::multipart::Part::bytes(png(8, 8, 3)).file_name("forged.png");
    let forged_upload = anonymous
        .post(app.url("/api/v1/images/upload"))
        .header(reqwest::header::ORIGIN, "https://attacker.example")
        .multipart(reqwest::multipart::Form::new().part("file", part));
    assert_error(forged_upload.send().await.unwrap(), StatusCode::FORBIDDEN, "LOCAL_ONLY").await;
    assert_eq!(app.image_count().await, 1, "nothing changed");

    let own_origin = app.url("").trim_end_matches('/').to_owned();
    let from_own_page =
        anonymous.get(app.url(&format!("/api/v1/images/{id}"))).header(reqwest::header::ORIGIN, own_origin);
    assert_eq!(status(from_own_page).await, StatusCode::OK);
    let by_name = anonymous.get(app.url("/api/v1/images")).header(reqwest::header::HOST, "localhost");
    assert_eq!(status(by_name).await, StatusCode::OK);
    assert_eq!(status(anonymous.delete(app.url(&format!("/api/v1/images/{id}")))).await, StatusCode::NO_CONTENT);
}

mod cli {
    use std::io::Write;
    use std::process::{Command, Stdio};

    use super::*;
    use common::database::TestDatabase;

    /// Runs the real binary; returns whether it succeeded and what it printed.
    fn chitram(config: &std::path::Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chitram"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let output = child.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    }

    fn key_in(output: &str) -> String {
        output.split_whitespace().find(|word| word.starts_with("chm_")).expect("a key is printed").to_owned()
    }

    async fn commands_work_end_to_end(db: DbKind) {
        let database = TestDatabase::create(db).await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("chitram.toml");
        std::fs::write(
            &config,
            format!(
                "[database]\nurl = \"{}\"\n[auth]\nadmin_token_file = \"admin-token\"\n\
                 [[shards]]\nname = \"a\"\nkind = \"fs\"\npath = \"shards/a\"\n[placement]\nreplication_factor = 1\nwrite_quorum = 1\n",
                database.url
            ),
        )
        .unwrap();
        let (ok, output) = chitram(&config, &["users", "list"], None);
        assert!(!ok && output.contains("chitram migrate"), "an unmigrated database is refused: {output}");
        assert!(chitram(&config, &["migrate"], None).0);

        let (ok, output) =
            chitram(&config, &["users", "create", "alice", "--password-stdin"], Some("a good password\n"));
        assert!(ok, "{output}");
        let first_key = key_in(&output);
        let (ok, output) = chitram(&config, &["users", "create", "root", "--admin"], None);
        assert!(ok && output.contains("created admin"), "{output}");
        let (ok, output) = chitram(&config, &["users", "create", "alice"], None);
        assert!(!ok && output.contains("taken"), "{output}");
        let (ok, output) = chitram(&config, &["users", "set-quota", "alice", "--bytes", "1MiB", "--images", "5"], None);
        assert!(ok && output.contains("1048576 bytes and 5 images"), "{output}");
        let (ok, output) = chitram(&config, &["users", "set-quota", "nobody", "--bytes", "1"], None);
        assert!(!ok && output.contains("no user"), "{output}");
        let (ok, output) = chitram(&config, &["users", "set-quota", "alice"], None);
        assert!(!ok && output.contains("--bytes") && output.contains("--images"), "a change is required: {output}");
        let (ok, output) = chitram(&config, &["users", "set-quota", "alice", "--bytes", "lots"], None);
        assert!(!ok && output.contains("lots"), "{output}");

        let (ok, output) = chitram(&config, &["keys", "create", "--user", "alice", "--name", "ci"], None);
        assert!(ok, "{output}");
        let second_key = key_in(&output);
        let (ok, listing) = chitram(&config, &["keys", "list", "--user", "alice"], None);
        assert!(ok && listing.contains(" ci") && listing.matches("live").count() == 2, "{listing}");
        assert!(!listing.contains(&first_key) && !listing.contains(&second_key), "keys are never listed");

        // The keys work against the same database, as a server sees them.
        let mut settings = Settings::load(Some(&config)).unwrap();
        settings.auth.credential_cache_secs = 0;
        let metadata = chitram::app::open_existing_metadata(&settings.database.url).await.unwrap();
        let accounts = chitram::accounts::Accounts::new(&settings.auth, metadata.clone()).await.unwrap();
        let caller = accounts.authenticate(Some(&second_key)).await.unwrap();
        assert_eq!(caller.user().unwrap().username, "alice");
        let alice = metadata.find_user_by_name("alice").await.unwrap().unwrap();
        assert!(alice.password_hash.as_deref().is_some_and(|hash| hash.starts_with("$argon2id$")));
        assert_eq!(accounts.account_of(alice.user.clone()).quota.images, Some(5));

        let key_id = caller.user().unwrap().key.unwrap().to_string();
        assert!(chitram(&config, &["keys", "revoke", &key_id], None).0);
        assert!(accounts.authenticate(Some(&second_key)).await.is_err(), "a revoked key stops working");
        let (ok, output) = chitram(&config, &["keys", "revoke", &key_id], None);
        assert!(!ok && output.contains("no live API key"), "{output}");

        assert!(chitram(&config, &["users", "disable", "alice"], None).0);
        assert!(accounts.authenticate(Some(&first_key)).await.is_err(), "a disabled user's keys stop working");
        let (ok, listing) = chitram(&config, &["users", "list"], None);
        assert!(ok && listing.contains("disabled") && listing.contains("root"), "{listing}");
        assert!(chitram(&config, &["users", "enable", "alice"], None).0);
        assert!(accounts.authenticate(Some(&first_key)).await.is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        commands_work_end_to_end(DbKind::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        commands_work_end_to_end(DbKind::Postgres).await
    }
}
