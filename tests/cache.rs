//! The Redis metadata cache (`[redis] metadata_cache`, `src/metadata/cache.rs`): two
//! instances on one Postgres database, one private `redis-server` and the same shards. What
//! one instance changes (a delete, a visibility change, a copy's state) the other shows at
//! once; a repeated GET is a hit; Redis killed mid-test leaves the database answering. And the
//! stale-set race of cache-aside, step by step on the Redis side.

mod common;

use std::time::{Duration, Instant};

use chitram::blob::BlobKey;
use chitram::config::Settings;
use chitram::metadata::cache::{Lookup, MAX_FILL_AGE, RedisCache, TOMBSTONE_TTL};
use chitram::metadata::{CopyRef, ImageRecord, Replica, ReplicaState, Visibility};
use common::database::DbKind;
use common::exposition::{self, sum};
use common::images::png;
use common::private_redis::PrivateRedis;
use common::{Backends, SiblingApp, StorageKind, TestApp, TestOptions, replica_states, spawn_app_with};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

const POSTGRES_FS: Backends = Backends { db: DbKind::Postgres, storage: StorageKind::Fs };

fn cache_on(settings: &mut Settings) {
    settings.redis.metadata_cache = true;
}

/// Instance A (the test app) and instance B (a sibling), both caching in `redis`.
async fn two_instances(redis: &PrivateRedis) -> (TestApp, SiblingApp) {
    let options = TestOptions { redis_url: Some(redis.url.clone()), adjust: Some(cache_on), ..TestOptions::default() };
    let app = spawn_app_with(POSTGRES_FS, options).await;
    let sibling = app.spawn_sibling(0).await;
    (app, sibling)
}

/// Waits out the tombstone an upload leaves on its blob's copies, so that reads fill again.
async fn settle() {
    tokio::time::sleep(TOMBSTONE_TTL + Duration::from_millis(200)).await;
}

/// Whether Redis holds a live entry for the image (looked up as the instances do).
async fn cached(app: &TestApp, redis: &PrivateRedis, id: &str) -> bool {
    let store_id = app.metadata.store_id().await.unwrap();
    let probe = RedisCache::new(&redis.url, &store_id, Duration::from_secs(30)).unwrap();
    matches!(probe.lookup_image(Uuid::parse_str(id).unwrap()).await, Lookup::Hit(_))
}

async fn get(client: &reqwest::Client, base: &str, path: &str) -> reqwest::Response {
    client.get(format!("{base}{path}")).send().await.unwrap()
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    sum(&exposition::parse(&text), name, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_through_one_instance_is_a_404_through_the_other_at_once() {
    let redis = PrivateRedis::start();
    let (a, b) = two_instances(&redis).await;
    let image = a.upload_ok("a.png", png(4, 4, 1)).await;
    let id = image["id"].as_str().unwrap();
    let path = format!("/api/v1/images/{id}");
    settle().await;
    // B reads it twice: the first fills the cache, the second is answered from it.
    for _ in 0..2 {
        assert_eq!(get(&b.client, &b.address, &path).await.status(), StatusCode::OK);
        assert_eq!(get(&b.client, &b.address, &format!("{path}/file")).await.status(), StatusCode::OK);
    }
    assert!(cached(&a, &redis, id).await, "B's read filled the cache");
    assert_eq!(a.delete(id).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(get(&b.client, &b.address, &path).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(get(&b.client, &b.address, &format!("{path}/file")).await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visibility_change_through_one_instance_is_seen_through_the_other_at_once() {
    let redis = PrivateRedis::start();
    let (a, b) = two_instances(&redis).await;
    let image = a.upload_ok("a.png", png(4, 4, 2)).await;
    let id = image["id"].as_str().unwrap();
    let path = format!("/api/v1/images/{id}");
    let anonymous = reqwest::Client::new();
    settle().await;
    for _ in 0..2 {
        assert_eq!(get(&anonymous, &b.address, &path).await.status(), StatusCode::OK);
    }
    assert!(cached(&a, &redis, id).await, "B's read filled the cache");
    let private = a.client.patch(a.url(&path)).json(&json!({"visibility": "private"})).send().await.unwrap();
    assert_eq!(private.status(), StatusCode::OK);
    assert_eq!(get(&anonymous, &b.address, &path).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(get(&anonymous, &b.address, &format!("{path}/file")).await.status(), StatusCode::NOT_FOUND);
    let owner: Value = get(&b.client, &b.address, &path).await.json().await.unwrap();
    assert_eq!(owner["visibility"], "private", "the admin still sees it, as it is now");

    let public = a.client.patch(a.url(&path)).json(&json!({"visibility": "public"})).send().await.unwrap();
    assert_eq!(public.status(), StatusCode::OK);
    assert_eq!(get(&anonymous, &b.address, &path).await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_changing_state_is_seen_in_the_other_instances_answer_at_once() {
    let redis = PrivateRedis::start();
    let (a, b) = two_instances(&redis).await;
    // No replication workers: the second copy stays pending until the test runs the queue.
    let image = a.upload_ok("a.png", png(4, 4, 3)).await;
    let id = image["id"].as_str().unwrap();
    let path = format!("/api/v1/images/{id}");
    let states = |image: &Value| replica_states(image).into_iter().map(|(_, state)| state).collect::<Vec<_>>();
    settle().await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let image: Value = get(&b.client, &b.address, &path).await.json().await.unwrap();
        seen = states(&image);
    }
    seen.sort();
    assert_eq!(seen, ["pending", "stored"]);
    assert!(cached(&a, &redis, id).await, "B's read filled the cache");

    // Replication (through A's store) records the copy stored.
    assert!(!a.replicate_until_idle().await.is_empty());
    let image: Value = get(&b.client, &b.address, &path).await.json().await.unwrap();
    assert_eq!(states(&image), ["stored", "stored"]);
    // Read from the database while the tombstone lives; cached again after it.
    settle().await;
    get(&b.client, &b.address, &path).await;
    assert!(cached(&a, &redis, id).await, "B's read filled the cache again");

    // Read repair marks a copy missing.
    let (shard, _) = replica_states(&image).remove(0);
    let blob = BlobKey::parse(image["checksum"].as_str().unwrap()).unwrap();
    a.metadata.record_missing_copy(&CopyRef { blob, shard: shard.clone() }).await.unwrap();
    let image: Value = get(&b.client, &b.address, &path).await.json().await.unwrap();
    let now = replica_states(&image);
    assert!(now.contains(&(shard, "missing".to_owned())), "{now:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_get_is_a_hit() {
    let redis = PrivateRedis::start();
    let (a, _b) = two_instances(&redis).await;
    let image = a.upload_ok("a.png", png(4, 4, 4)).await;
    let path = format!("/api/v1/images/{}", image["id"].as_str().unwrap());
    settle().await;
    assert_eq!(a.get(&path).await.status(), StatusCode::OK);
    // The recorder is the process's: other tests move it too, so look for a rise, not a value.
    let before = metric(&a, "chitram_metadata_cache_hits_total").await;
    assert_eq!(a.get(&path).await.status(), StatusCode::OK);
    assert_eq!(a.get(&format!("{path}/file")).await.status(), StatusCode::OK);
    let after = metric(&a, "chitram_metadata_cache_hits_total").await;
    assert!(after >= before + 2.0, "hits {before} -> {after}");
    assert!(metric(&a, "chitram_metadata_cache_misses_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_killed_the_database_answers_and_the_fallback_is_counted() {
    let mut redis = PrivateRedis::start();
    let (a, b) = two_instances(&redis).await;
    let image = a.upload_ok("a.png", png(4, 4, 5)).await;
    let kept = a.upload_ok("b.png", png(4, 4, 6)).await;
    let id = image["id"].as_str().unwrap();
    let path = format!("/api/v1/images/{id}");
    let kept_path = format!("/api/v1/images/{}", kept["id"].as_str().unwrap());
    settle().await;
    for _ in 0..2 {
        assert_eq!(get(&b.client, &b.address, &path).await.status(), StatusCode::OK);
    }
    assert!(cached(&a, &redis, id).await, "B's read filled the cache");
    let before = metric(&a, "chitram_metadata_cache_fallbacks_total").await;
    redis.stop();
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(get(&b.client, &b.address, &kept_path).await.status(), StatusCode::OK);
        assert_eq!(get(&b.client, &b.address, &format!("{kept_path}/file")).await.status(), StatusCode::OK);
    }
    assert!(started.elapsed() < Duration::from_secs(5), "an outage costs at most one slow call per period");
    assert!(metric(&a, "chitram_metadata_cache_fallbacks_total").await > before);
    // A change made while Redis is down is acknowledged, and its maker never serves the old record.
    assert_eq!(a.delete(id).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(a.get(&path).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(get(&b.client, &b.address, &path).await.status(), StatusCode::NOT_FOUND);
}

fn record(blob: &BlobKey, state: ReplicaState) -> ImageRecord {
    ImageRecord {
        id: Uuid::now_v7(),
        filename: "a.png".into(),
        content_type: "image/png".into(),
        file_size: 10,
        width: 1,
        height: 1,
        blob: blob.clone(),
        created_at: chrono::Utc::now(),
        replicas: vec![Replica { shard: "s0".into(), state }],
        owner: None,
        visibility: Visibility::Public,
        variants: Vec::new(),
    }
}

/// The stale-set race: a reader reads the old record, a writer commits and invalidates, then
/// the reader fills. The tombstone refuses that fill; a fill before the invalidation is
/// overwritten by it; a read older than `MAX_FILL_AGE` is never filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_refuses_a_late_fill_of_the_old_record() {
    let redis = PrivateRedis::start();
    let cache = RedisCache::new(&redis.url, "race", Duration::from_secs(30)).unwrap();
    let blob = BlobKey::from_digest(&[9; 32]);

    // Unhindered: a fill is then a hit.
    let fresh = record(&blob, ReplicaState::Stored);
    cache.fill_image(&fresh, Instant::now()).await;
    assert!(matches!(cache.lookup_image(fresh.id).await, Lookup::Hit(found) if found == fresh));

    // The reader began before the writer's invalidation and fills after it: refused.
    let old = record(&blob, ReplicaState::Stored);
    let read_started = Instant::now();
    cache.invalidate(vec![cache.image_key(old.id), cache.blob_key(&blob)]).await;
    cache.fill_image(&old, read_started).await;
    assert!(matches!(cache.lookup_image(old.id).await, Lookup::Miss));
    // The blob's copies were invalidated too: the image filled earlier is a miss now.
    assert!(matches!(cache.lookup_image(fresh.id).await, Lookup::Miss));

    // The reader filled before the invalidation: the invalidation removes it.
    let other = record(&BlobKey::from_digest(&[8; 32]), ReplicaState::Pending);
    cache.fill_image(&other, Instant::now()).await;
    assert!(matches!(cache.lookup_image(other.id).await, Lookup::Hit(_)));
    cache.invalidate(vec![cache.blob_key(&other.blob)]).await;
    assert!(matches!(cache.lookup_image(other.id).await, Lookup::Miss));

    // A read that took longer than MAX_FILL_AGE is not filled (a tombstone may have expired).
    let slow = record(&BlobKey::from_digest(&[7; 32]), ReplicaState::Stored);
    let long_ago = Instant::now().checked_sub(MAX_FILL_AGE + Duration::from_secs(1)).unwrap();
    cache.fill_image(&slow, long_ago).await;
    assert!(matches!(cache.lookup_image(slow.id).await, Lookup::Miss));
    assert!(!cache.has_pending_invalidations());
}

/// An invalidation made while Redis does not answer is remembered: meanwhile this instance
/// reads only from the database, and the invalidation is delivered when Redis answers again
/// (here a frozen Redis that kept the old entry), so the old entry is not served after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undelivered_invalidation_is_delivered_when_redis_answers_again() {
    let redis = PrivateRedis::start();
    let reader = RedisCache::new(&redis.url, "outage", Duration::from_secs(30)).unwrap();
    let image = record(&BlobKey::from_digest(&[6; 32]), ReplicaState::Stored);
    reader.fill_image(&image, Instant::now()).await;
    assert!(matches!(reader.lookup_image(image.id).await, Lookup::Hit(_)));

    // The writer's first call finds Redis frozen (a command sent on an open connection would
    // wait in the socket and land when Redis resumes; this one cannot even connect).
    let cache = RedisCache::new(&redis.url, "outage", Duration::from_secs(30)).unwrap();
    redis.pause();
    let started = Instant::now();
    cache.invalidate(vec![cache.image_key(image.id)]).await;
    assert!(started.elapsed() < Duration::from_secs(1), "a call to Redis is bounded (250 ms)");
    assert!(cache.has_pending_invalidations());
    assert!(matches!(cache.lookup_image(image.id).await, Lookup::Unavailable));

    redis.resume();
    // Another instance that reaches Redis still sees the old entry: the TTL bounds that.
    assert!(matches!(reader.lookup_image(image.id).await, Lookup::Hit(_)));
    // The writer tries Redis again 5 s after it stopped answering, delivering first.
    tokio::time::sleep(Duration::from_millis(5_300)).await;
    assert!(matches!(cache.lookup_image(image.id).await, Lookup::Miss));
    assert!(!cache.has_pending_invalidations());
    assert!(matches!(reader.lookup_image(image.id).await, Lookup::Miss));
}

/// A process that exits holding undelivered invalidations (an operator command that moved
/// copies, a `serve` stopping) delivers them first, even within the 5 s Redis is otherwise
/// left alone after a failure: nothing else would, and other instances would serve the old
/// entries until their TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exiting_process_delivers_its_invalidations_first() {
    let redis = PrivateRedis::start();
    let reader = RedisCache::new(&redis.url, "exit", Duration::from_secs(30)).unwrap();
    let image = record(&BlobKey::from_digest(&[7; 32]), ReplicaState::Stored);
    reader.fill_image(&image, Instant::now()).await;

    let cache = RedisCache::new(&redis.url, "exit", Duration::from_secs(30)).unwrap();
    redis.pause();
    cache.invalidate(vec![cache.image_key(image.id)]).await;
    assert!(cache.has_pending_invalidations());
    redis.resume();
    assert!(matches!(cache.lookup_image(image.id).await, Lookup::Unavailable), "still leaving Redis alone");

    assert!(cache.deliver_before_exit(Duration::from_secs(2)).await);
    assert!(!cache.has_pending_invalidations());
    assert!(matches!(reader.lookup_image(image.id).await, Lookup::Miss));
}
