//! Configuration: a TOML file (`--config FILE`), then `CHITRAM__SECTION__KEY` environment
//! overrides, over the embedded default (SQLite and three filesystem shards under `./data`).
//!
//! Raw input is parsed once into [`Settings`]; anything wrong stops start-up with a message
//! that names the offending key, e.g. `shards[1].name: "a" is already the name of shards[0]`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::placement::ring::{MAX_SHARDS, RingMember};
use crate::redact::{MASK, redact_url};
use crate::storage::s3::S3Settings;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub placement: PlacementSettings,
    pub replication: ReplicationSettings,
    pub maintenance: MaintenanceSettings,
    pub latency: LatencySettings,
    #[serde(default)]
    pub auth: AuthSettings,
    #[serde(default)]
    pub rate_limits: RateLimitSettings,
    #[serde(default)]
    pub redis: RedisSettings,
    pub metrics: MetricsSettings,
    pub telemetry: TelemetrySettings,
    pub shards: Vec<ShardSettings>,
    pub variants: VariantsSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub bind: SocketAddr,
    /// Largest accepted image, in bytes.
    pub max_upload_bytes: u64,
    /// Most files in one batch upload.
    pub max_batch_files: usize,
    /// Most pixels (width × height, from the header) an accepted image may claim.
    pub max_pixels: u64,
    /// Where uploads larger than a few hundred KiB spool while they are checked (the system
    /// temporary directory when unset).
    pub spool_dir: Option<PathBuf>,
    /// Memory, shared by all requests, in which uploads of up to 8 MiB with a declared length
    /// stay instead of a spool file (0: every upload over 256 KiB spools).
    pub upload_memory_bytes: u64,
    /// On shutdown, how long requests in flight may take to finish.
    pub shutdown_grace_secs: u64,
    /// On shutdown, how long the instance keeps serving while `/health/ready` answers 503, so
    /// that load balancers stop sending it requests before its listener closes.
    pub shutdown_drain_secs: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            max_upload_bytes: 50 * 1024 * 1024,
            max_batch_files: 20,
            max_pixels: 100_000_000,
            spool_dir: None,
            upload_memory_bytes: 32 * 1024 * 1024,
            shutdown_grace_secs: 30,
            shutdown_drain_secs: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `sqlite://PATH` or `postgres://USER:PASS@HOST:PORT/DB`.
    pub url: String,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self { url: "sqlite://data/chitram.db".to_owned() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementSettings {
    /// Copies of each blob, the primary included.
    pub replication_factor: usize,
    /// Ring tokens per unit of shard weight. 4096 keeps every shard within about 5% of its
    /// share for 4 to 16 shards (BENCHMARKS.md); changing it on a running store moves data.
    pub vnodes_per_weight: u32,
    /// Copies that must be stored before an upload is acknowledged (1 to
    /// `replication_factor`). 1 is asynchronous replication; more is synchronous durability.
    pub write_quorum: usize,
}

impl Default for PlacementSettings {
    fn default() -> Self {
        Self { replication_factor: 2, vnodes_per_weight: 4096, write_quorum: 1 }
    }
}

/// The background workers that create, restore and delete copies, and the circuit breakers
/// that keep a dead shard from costing a timeout per request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSettings {
    /// Replication workers that always run in this instance (0 runs none: another instance on
    /// the same Postgres does the work).
    pub workers: usize,
    /// Most workers while the queue is deep: one more per `tasks_per_worker` due tasks, up to
    /// this many (never fewer than `workers`).
    pub max_workers: usize,
    /// Due tasks that justify one more worker.
    pub tasks_per_worker: u64,
    /// Uploads that may copy their bytes to the rest of their write set at once, right after
    /// their commit (0: leave every copy to the workers).
    pub eager_copies: usize,
    /// How long a claimed task stays reserved for its worker; a worker renews it while it
    /// works, so this bounds how long a crashed worker's task waits.
    pub lease_secs: u64,
    /// First retry delay of a failed task; doubles per failure (with jitter) up to the max.
    pub retry_min_ms: u64,
    pub retry_max_secs: u64,
    /// How often an idle worker looks for due tasks.
    pub idle_poll_ms: u64,
    /// How long a copy may stay `pending` before `/health` calls the store `degraded`: every
    /// upload's second copy is pending for a moment, so only one left longer than replication
    /// normally takes is a sign of trouble (0: any pending copy).
    pub pending_overdue_secs: u64,
    /// Consecutive failures that open a shard's circuit.
    pub breaker_failures: u32,
    /// How long an open circuit skips its shard before one trial call, in milliseconds.
    pub breaker_cooldown_ms: u64,
}

impl Default for ReplicationSettings {
    fn default() -> Self {
        Self {
            workers: 2,
            max_workers: 8,
            tasks_per_worker: 16,
            eager_copies: 64,
            lease_secs: 60,
            retry_min_ms: 500,
            retry_max_secs: 300,
            idle_poll_ms: 500,
            pending_overdue_secs: 60,
            breaker_failures: 3,
            breaker_cooldown_ms: 10_000,
        }
    }
}

/// Operator jobs: rebalance's limits and the periodic scrub.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceSettings {
    /// Blobs `chitram rebalance` moves at once.
    pub rebalance_concurrency: usize,
    /// Bandwidth cap of a rebalance, in MiB/s of copied bytes (0: none).
    pub rebalance_mib_per_sec: u64,
    /// Seconds between the background scrubs that `serve` runs (0: never).
    pub scrub_interval_secs: u64,
    /// Copies the background scrub checks per second, so it never starves traffic.
    pub scrub_copies_per_sec: u32,
    /// Objects that no row references are orphans only once this old (younger ones may be
    /// uploads between their write and their commit).
    pub orphan_grace_secs: u64,
}

impl Default for MaintenanceSettings {
    fn default() -> Self {
        Self {
            rebalance_concurrency: 4,
            rebalance_mib_per_sec: 0,
            scrub_interval_secs: 86_400,
            scrub_copies_per_sec: 20,
            orphan_grace_secs: 3_600,
        }
    }
}

/// `[latency]`: how a shard that answers, but late, is treated (README, "Slow shards"): deadlines
/// on its calls, an idle timeout on the bodies it sends, and hedged reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LatencySettings {
    /// A write on the upload path not finished after this (plus the size allowance) goes to the
    /// next shard of the preference list, as if the shard were down.
    pub write_deadline_ms: u64,
    /// The size allowance: a body of N MiB gets N / this many more seconds (0: none).
    pub write_min_mib_per_sec: u64,
    /// Bound on a HEAD or DELETE (they run under the blob's lock, i.e. SQLite's write lock).
    pub control_deadline_ms: u64,
    /// A body being read that sends nothing for this long fails (and its task retries).
    pub body_idle_ms: u64,
    /// Hedged reads: a holder slower than its p95 (within the bounds) gets a second read sent
    /// to the next holder, and the first answer wins.
    pub hedge_reads: bool,
    pub hedge_min_ms: u64,
    pub hedge_max_ms: u64,
}

impl Default for LatencySettings {
    fn default() -> Self {
        Self {
            write_deadline_ms: 5_000,
            write_min_mib_per_sec: 10,
            control_deadline_ms: 1_000,
            body_idle_ms: 10_000,
            hedge_reads: true,
            hedge_min_ms: 20,
            hedge_max_ms: 500,
        }
    }
}

impl LatencySettings {
    pub fn deadlines(&self) -> crate::storage::deadline::Deadlines {
        crate::storage::deadline::Deadlines {
            write: Duration::from_millis(self.write_deadline_ms),
            write_min_bytes_per_sec: (self.write_min_mib_per_sec > 0).then(|| self.write_min_mib_per_sec * 1024 * 1024),
            control: Duration::from_millis(self.control_deadline_ms),
            body_idle: Duration::from_millis(self.body_idle_ms),
        }
    }

    pub fn hedge(&self) -> crate::storage::hedge::HedgeSettings {
        crate::storage::hedge::HedgeSettings {
            enabled: self.hedge_reads,
            min_delay: Duration::from_millis(self.hedge_min_ms),
            max_delay: Duration::from_millis(self.hedge_max_ms),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("latency.write_deadline_ms", self.write_deadline_ms),
            ("latency.control_deadline_ms", self.control_deadline_ms),
            ("latency.body_idle_ms", self.body_idle_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be above 0"));
            }
        }
        if self.hedge_min_ms > self.hedge_max_ms {
            return Err(invalid("latency.hedge_min_ms", "must be at most hedge_max_ms"));
        }
        Ok(())
    }
}

/// `[auth]`: accounts, credentials and quotas (README, "Accounts and API keys").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Off: every route is open to anyone, as before accounts existed (a local deployment, or
    /// one behind a gateway that authenticates).
    pub enabled: bool,
    /// Allows `enabled = false` on an address other than loopback.
    pub allow_anonymous_network: bool,
    /// Lets anyone create an account with `POST /api/v1/auth/register`.
    pub open_registration: bool,
    /// Lifetime of the access tokens `POST /api/v1/auth/login` issues.
    pub token_ttl_secs: u64,
    /// Signs access tokens and signed URLs. Unset: a random secret kept in the database, shared
    /// by every instance on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
    /// Each user's limits unless an admin set their own (`chitram users set-quota`); 0 is
    /// unlimited. Admins have none.
    pub default_quota_bytes: u64,
    pub default_quota_images: u64,
    /// Where the first start writes the first admin's API key (mode 0600).
    pub admin_token_file: PathBuf,
    /// How long a checked credential is trusted before the database is asked again. A key
    /// revoked through this instance stops at once; through another instance or the CLI,
    /// within this many seconds.
    pub credential_cache_secs: u64,
    /// Longest lifetime of a signed URL.
    pub signed_url_max_secs: u64,
    /// Accept access tokens from an external issuer (a Supabase-style provider).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalIssuerSettings>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            allow_anonymous_network: false,
            open_registration: false,
            token_ttl_secs: 900,
            token_secret: None,
            default_quota_bytes: 10 * 1024 * 1024 * 1024,
            default_quota_images: 100_000,
            admin_token_file: PathBuf::from("data/admin-token"),
            credential_cache_secs: 5,
            signed_url_max_secs: 7 * 24 * 3600,
            external: None,
        }
    }
}

impl AuthSettings {
    fn validate(&self, bind: SocketAddr) -> Result<(), ConfigError> {
        if !self.enabled && !bind.ip().is_loopback() && !self.allow_anonymous_network {
            return Err(invalid(
                "auth.enabled",
                format!(
                    "false on {bind} would let anyone on the network delete every image: bind to 127.0.0.1, \
                     turn accounts on, or set auth.allow_anonymous_network = true"
                ),
            ));
        }
        if self.token_ttl_secs == 0 {
            return Err(invalid("auth.token_ttl_secs", "must be above 0"));
        }
        if self.signed_url_max_secs == 0 {
            return Err(invalid("auth.signed_url_max_secs", "must be above 0"));
        }
        if self.token_secret.as_ref().is_some_and(|secret| secret.len() < 32) {
            return Err(invalid("auth.token_secret", "must be at least 32 characters"));
        }
        if let Some(external) = &self.external {
            external.validate()?;
        }
        Ok(())
    }
}

/// `[auth.external]`: an issuer whose HS256-signed tokens (`hs256_secret`) or JWKS-signed tokens
/// (`jwks_file`, RS256/ES256) sign users in. Its users are created on first sight, as `user`s.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExternalIssuerSettings {
    /// The `iss` its tokens carry, exactly.
    pub issuer: String,
    /// The `aud` its tokens must carry (Supabase: `authenticated`).
    pub audience: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// The claim that names the user (default `sub`; `email` is friendlier where present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_claim: Option<String>,
}

impl ExternalIssuerSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.issuer.is_empty() {
            return Err(invalid("auth.external.issuer", "must not be empty"));
        }
        if self.audience.is_empty() {
            return Err(invalid("auth.external.audience", "must not be empty"));
        }
        match (&self.hs256_secret, &self.jwks_file) {
            (Some(_), Some(_)) => Err(invalid("auth.external", "set hs256_secret or jwks_file, not both")),
            (None, None) => Err(invalid("auth.external", "needs hs256_secret or jwks_file")),
            (Some(secret), None) if secret.len() < 32 => {
                Err(invalid("auth.external.hs256_secret", "must be at least 32 characters"))
            }
            _ => Ok(()),
        }
    }
}

/// `[rate_limits]`: token buckets per caller (its key or user; its address when anonymous),
/// refilled continuously at `*_per_minute` up to `*_burst`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    pub enabled: bool,
    /// Uploads (`/upload`, and `/batch` per request).
    pub upload_per_minute: u32,
    pub upload_burst: u32,
    /// Every other request.
    pub request_per_minute: u32,
    pub request_burst: u32,
    /// Login attempts per username and address.
    pub login_per_minute: u32,
    pub login_burst: u32,
    /// Take the client's address from the last `X-Forwarded-For` entry (set only behind a
    /// proxy you run, which must overwrite the header; otherwise clients choose their address).
    pub trust_forwarded_for: bool,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            upload_per_minute: 300,
            upload_burst: 60,
            request_per_minute: 3_000,
            request_burst: 300,
            login_per_minute: 10,
            login_burst: 5,
            trust_forwarded_for: false,
        }
    }
}

impl RateLimitSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("rate_limits.upload_per_minute", self.upload_per_minute),
            ("rate_limits.upload_burst", self.upload_burst),
            ("rate_limits.request_per_minute", self.request_per_minute),
            ("rate_limits.request_burst", self.request_burst),
            ("rate_limits.login_per_minute", self.login_per_minute),
            ("rate_limits.login_burst", self.login_burst),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be above 0 (turn limits off with rate_limits.enabled = false)"));
            }
        }
        Ok(())
    }
}

/// `[redis]`: optional. With a URL, rate limits are shared by every instance through it; when
/// it is down, each instance falls back to its own limits. With `metadata_cache` as well,
/// image records are cached there too (`metadata/cache.rs`); when it is down, the database
/// answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Cache image records (the metadata GET and file GET path) in Redis. Off by default:
    /// BENCHMARKS.md, "Redis metadata cache", shows what it saves and what it costs.
    pub metadata_cache: bool,
    /// How long a cached record may live: the bound on staleness when an invalidation could
    /// not reach Redis.
    pub metadata_cache_ttl_secs: u64,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self { url: None, metadata_cache: false, metadata_cache_ttl_secs: 30 }
    }
}

impl RedisSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.metadata_cache && self.url.is_none() {
            return Err(invalid("redis.metadata_cache", "needs redis.url (the Redis that holds the cache)"));
        }
        if self.metadata_cache_ttl_secs == 0 {
            return Err(invalid("redis.metadata_cache_ttl_secs", "must be above 0"));
        }
        Ok(())
    }
}

/// One `[[shards]]` entry, as written. [`ShardSettings::backend`] checks that the fields its
/// `kind` needs are there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShardSettings {
    /// Stable identity: the shard's ring tokens derive from it, so renaming a shard moves data.
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// A draining shard takes no new data and `chitram rebalance` moves its copies away; once
    /// it is empty it can leave the config.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    pub kind: ShardKind,
    /// `fs`: the directory that holds the shard's objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// `s3`: the server, `http://host:9000` or `https://…` (AWS itself when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `s3`: the bucket that holds the shard's objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// `s3`: the region to sign for (`us-east-1` by default; MinIO accepts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `s3`: static credentials. Without them the standard AWS chain applies
    /// (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, then the shared profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<String>,
    /// `s3`: create the bucket at start-up when it is missing (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_bucket: Option<bool>,
    /// `s3`: how long to wait for a connection, in milliseconds (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// `s3`: bound on one request, in seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ShardKind {
    Fs,
    S3,
}

/// Where a shard keeps its objects.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendSettings {
    /// A directory on a local filesystem.
    Fs { path: PathBuf },
    /// A bucket on an S3-compatible server.
    S3(S3Settings),
}

impl ShardSettings {
    /// The weight the ring uses: 0 while draining.
    pub fn effective_weight(&self) -> u32 {
        if self.draining { 0 } else { self.weight }
    }

    /// The backend this entry describes; `index` is its position, for error messages.
    pub fn backend(&self, index: usize) -> Result<BackendSettings, ConfigError> {
        let key = |field: &str| format!("shards[{index}].{field}");
        match self.kind {
            ShardKind::Fs => {
                let s3_field = [
                    ("endpoint", self.endpoint.is_some()),
                    ("bucket", self.bucket.is_some()),
                    ("region", self.region.is_some()),
                    ("access_key_id", self.access_key_id.is_some()),
                    ("secret_access_key", self.secret_access_key.is_some()),
                    ("create_bucket", self.create_bucket.is_some()),
                    ("connect_timeout_ms", self.connect_timeout_ms.is_some()),
                    ("timeout_secs", self.timeout_secs.is_some()),
                ]
                .into_iter()
                .find(|(_, set)| *set);
                if let Some((field, _)) = s3_field {
                    return Err(invalid(key(field), "only s3 shards take this key (this one has kind = \"fs\")"));
                }
                match &self.path {
                    Some(path) if !path.as_os_str().is_empty() => Ok(BackendSettings::Fs { path: path.clone() }),
                    _ => Err(invalid(key("path"), "an fs shard needs the directory it stores objects in")),
                }
            }
            ShardKind::S3 => self.s3_settings(&key).map(BackendSettings::S3),
        }
    }

    fn s3_settings(&self, key: &dyn Fn(&str) -> String) -> Result<S3Settings, ConfigError> {
        if self.path.is_some() {
            return Err(invalid(key("path"), "only fs shards take a path (this one has kind = \"s3\")"));
        }
        let bucket = match &self.bucket {
            Some(bucket) if !bucket.is_empty() => bucket.clone(),
            _ => return Err(invalid(key("bucket"), "an s3 shard needs the bucket it stores objects in")),
        };
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            let shown = redact_url(endpoint);
            return Err(invalid(key("endpoint"), format!("{shown:?} must start with http:// or https://")));
        }
        let credentials = match (&self.access_key_id, &self.secret_access_key) {
            (Some(id), Some(secret)) => Some((id.clone(), secret.clone())),
            (None, None) => None,
            (Some(_), None) => return Err(invalid(key("secret_access_key"), "is required with access_key_id")),
            (None, Some(_)) => return Err(invalid(key("access_key_id"), "is required with secret_access_key")),
        };
        Ok(S3Settings {
            endpoint: self.endpoint.clone(),
            bucket,
            region: self.region.clone().unwrap_or_else(|| "us-east-1".to_owned()),
            credentials,
            create_bucket: self.create_bucket.unwrap_or(true),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms.unwrap_or(1000).max(1)),
            operation_timeout: Duration::from_secs(self.timeout_secs.unwrap_or(60).max(1)),
        })
    }

    /// An `fs` shard at `path`.
    pub fn fs(name: &str, path: impl Into<PathBuf>) -> Self {
        Self { path: Some(path.into()), ..Self::empty(name, ShardKind::Fs) }
    }

    /// An `s3` shard from its settings.
    pub fn s3(name: &str, s3: &S3Settings) -> Self {
        Self {
            endpoint: s3.endpoint.clone(),
            bucket: Some(s3.bucket.clone()),
            region: Some(s3.region.clone()),
            access_key_id: s3.credentials.as_ref().map(|(id, _)| id.clone()),
            secret_access_key: s3.credentials.as_ref().map(|(_, secret)| secret.clone()),
            create_bucket: Some(s3.create_bucket),
            connect_timeout_ms: Some(s3.connect_timeout.as_millis() as u64),
            timeout_secs: Some(s3.operation_timeout.as_secs()),
            ..Self::empty(name, ShardKind::S3)
        }
    }

    fn empty(name: &str, kind: ShardKind) -> Self {
        Self {
            name: name.to_owned(),
            weight: 1,
            draining: false,
            kind,
            path: None,
            endpoint: None,
            bucket: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            create_bucket: None,
            connect_timeout_ms: None,
            timeout_secs: None,
        }
    }
}

/// Variants (thumbnails, previews): `[variants]` holds the settings below and one table per
/// variant, `[variants.NAME]` with `width`, `height` and `fit` (`cover` or `contain`). With no
/// variant named, the default set applies (`thumb` 256×256 cover, `preview` 1280×1280 contain).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct VariantsSettings {
    /// Most pixels (width × height, from the header) an original may claim to be decoded.
    pub max_pixels: u64,
    /// Decodes that run at once (threads of the decode pool, off the async threads).
    pub decode_threads: usize,
    /// Generation workers in this instance (0: none; another instance, or the first request
    /// for a variant, makes them).
    pub workers: usize,
    /// JPEG quality of variants of opaque images, 1 to 100.
    pub jpeg_quality: u8,
    /// Format of variants of images with transparency: `png` or `webp` (lossless).
    pub alpha_format: crate::variants::spec::AlphaFormat,
    /// The variants, by name. (Flattened: the table's other keys are the settings above.)
    #[serde(flatten)]
    pub sets: std::collections::BTreeMap<String, VariantSettings>,
}

/// One `[variants.NAME]` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VariantSettings {
    pub width: u32,
    pub height: u32,
    pub fit: crate::variants::spec::Fit,
}

impl Default for VariantsSettings {
    fn default() -> Self {
        Self {
            max_pixels: 100_000_000,
            decode_threads: 2,
            workers: 2,
            jpeg_quality: 82,
            alpha_format: crate::variants::spec::AlphaFormat::Png,
            sets: std::collections::BTreeMap::new(),
        }
    }
}

impl VariantsSettings {
    /// The configured variants, or the default set when none is named.
    pub fn specs(&self) -> Result<Vec<crate::variants::spec::VariantSpec>, ConfigError> {
        use crate::variants::spec::VariantSpec;
        if self.sets.is_empty() {
            return Ok(VariantSpec::default_set());
        }
        self.sets
            .iter()
            .map(|(name, set)| {
                VariantSpec::new(name, set.width, set.height, set.fit)
                    .map_err(|problem| invalid(format!("variants.{name}"), problem.to_string()))
            })
            .collect()
    }

    pub fn encoding(&self) -> crate::variants::spec::Encoding {
        crate::variants::spec::Encoding { jpeg_quality: self.jpeg_quality, alpha_format: self.alpha_format }
    }

    /// The catalog the service runs with.
    pub fn catalog(&self) -> Result<crate::variants::Catalog, ConfigError> {
        Ok(crate::variants::Catalog::new(self.specs()?, self.encoding(), self.max_pixels))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_pixels == 0 {
            return Err(invalid("variants.max_pixels", "must be above 0"));
        }
        if self.decode_threads == 0 {
            return Err(invalid("variants.decode_threads", "must be above 0"));
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return Err(invalid("variants.jpeg_quality", "must be between 1 and 100"));
        }
        self.specs().map(drop)
    }
}

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {key}: {problem}")]
    Invalid { key: String, problem: String },
    #[error("cannot write the configuration as TOML")]
    Print(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
}

/// The prefix of environment overrides, and the separator between their keys.
const ENV_PREFIX: &str = "CHITRAM__";
const ENV_SEPARATOR: &str = "__";

/// Names the key of a figment error as the user wrote it: `server.max_upload_bytes` or
/// `shards[1].kind` in a file, `CHITRAM__SERVER__MAX_UPLOAD_BYTES` in the environment.
fn from_figment(error: figment::Error) -> ConfigError {
    use figment::error::{Kind, OneOf};
    let mut path = error.path.clone();
    // A value given to a secret key is not repeated, even to say its type was wrong.
    let secret = path.last().is_some_and(|key| is_secret_key(key));
    let found = |found: &dyn std::fmt::Display| {
        if secret { "a value not shown (the key holds a secret)".to_owned() } else { redact_url(&found.to_string()) }
    };
    // Unknown keys come with their own name at the end of the path; missing ones without it.
    let mut name_key = |field: &str| {
        if path.last().is_none_or(|last| last != field) {
            path.push(field.to_owned());
        }
    };
    let problem = match &error.kind {
        Kind::InvalidType(actual, expected) => format!("expected {expected}, found {}", found(actual)),
        Kind::InvalidValue(actual, expected) => format!("expected {expected}, found {}", found(actual)),
        Kind::UnknownField(field, expected) => {
            name_key(field);
            format!("unknown key (expected {})", OneOf(expected))
        }
        Kind::UnknownVariant(found, expected) => format!("unknown value {found:?} (expected {})", OneOf(expected)),
        Kind::MissingField(field) => {
            name_key(field);
            "is required".to_owned()
        }
        other => hide_quoted_values(&other.to_string()),
    };
    let source = error.metadata.as_ref().and_then(|metadata| metadata.source.as_ref());
    let from_env = error.metadata.as_ref().is_some_and(|metadata| metadata.name.contains(ENV_PREFIX));
    let (key, place) = match source {
        // A syntax error has no key: the file is what to look at.
        Some(figment::Source::File(file)) if path.is_empty() => (file.display().to_string(), String::new()),
        Some(figment::Source::File(file)) => (dotted_key(&path), format!(" (in {})", file.display())),
        _ if from_env => (env_key(&path), " (from the environment)".to_owned()),
        _ if path.is_empty() => {
            (error.metadata.as_ref().map_or("configuration".into(), |m| m.name.to_string()), String::new())
        }
        _ => (dotted_key(&path), String::new()),
    };
    invalid(key, format!("{problem}{place}"))
}

/// A TOML syntax error quotes the line it failed on (`3 | url = postgres://u:hunter2@db/x`), and
/// the commonest syntax error is a value left unquoted, which may be a password or a URL that
/// holds one: the quoted line keeps its key and loses its value.
fn hide_quoted_values(message: &str) -> String {
    let hide = |line: &str| {
        let Some((number, quoted)) = line.split_once(" | ") else { return line.to_owned() };
        if number.trim().is_empty() || !number.trim().bytes().all(|b| b.is_ascii_digit()) {
            return line.to_owned(); // The caret line under the quote, or not a quote at all.
        }
        match quoted.split_once('=') {
            Some((key, _)) => format!("{number} | {key}= {MASK}"),
            None => format!("{number} | {MASK}"),
        }
    };
    message.lines().map(hide).collect::<Vec<_>>().join("\n")
}

/// `shards[1].name` from `["shards", "1", "name"]`.
fn dotted_key(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.bytes().all(|b| b.is_ascii_digit()) && !part.is_empty() {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

/// `CHITRAM__SERVER__BIND` from `["server", "bind"]`; inside a list set as a whole,
/// `CHITRAM__SHARDS[1].kind`.
fn env_key(path: &[String]) -> String {
    let index = path.iter().position(|part| part.bytes().all(|b| b.is_ascii_digit())).unwrap_or(path.len());
    let variable = path[..index].iter().map(|part| part.to_ascii_uppercase()).collect::<Vec<_>>().join(ENV_SEPARATOR);
    format!("{ENV_PREFIX}{variable}{}", dotted_key(&path[index..]))
}

/// The file a `sqlite:` URL names, or `None` for another database or an in-memory one.
pub fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, params) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = path.is_empty() || path == ":memory:" || params.split('&').any(|param| param == "mode=memory");
    (!in_memory).then(|| PathBuf::from(path))
}

/// A `sqlite:` URL whose relative path is made relative to `base`; `None` when there is
/// nothing to resolve (another database, an in-memory one, an absolute path).
fn resolve_sqlite_url(url: &str, base: &Path) -> Option<String> {
    let path = sqlite_path(url).filter(|path| path.is_relative())?;
    let params = url.split_once('?').map(|(_, params)| format!("?{params}")).unwrap_or_default();
    Some(format!("sqlite://{}{params}", base.join(path).display()))
}

impl Default for Settings {
    fn default() -> Self {
        let shard = |name: &str| ShardSettings::fs(name, PathBuf::from("data/shards").join(name));
        Self {
            server: ServerSettings::default(),
            database: DatabaseSettings::default(),
            placement: PlacementSettings::default(),
            replication: ReplicationSettings::default(),
            maintenance: MaintenanceSettings::default(),
            latency: LatencySettings::default(),
            auth: AuthSettings::default(),
            rate_limits: RateLimitSettings::default(),
            redis: RedisSettings::default(),
            metrics: MetricsSettings::default(),
            telemetry: TelemetrySettings::default(),
            shards: vec![shard("a"), shard("b"), shard("c")],
            variants: VariantsSettings::default(),
        }
    }
}

impl Settings {
    /// Loads the default, then `file` if given, then the environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, Env::prefixed(ENV_PREFIX).split(ENV_SEPARATOR))
    }

    fn load_with_env(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        let mut base = None;
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::MissingFile(file.to_path_buf()));
            }
            let file = std::path::absolute(file).map_err(|_| ConfigError::MissingFile(file.to_path_buf()))?;
            base = file.parent().map(Path::to_path_buf);
            figment = figment.merge(Toml::file_exact(&file));
        }
        let figment = figment.merge(env);
        let mut settings: Settings = figment.extract().map_err(from_figment)?;
        if let Some(base) = base {
            settings.resolve_paths_from_file(&figment, &base);
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Parses TOML text alone (no environment), for tests. Relative paths stay as written.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(from_figment)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Makes the relative paths that the config file wrote (the SQLite database, `fs` shard
    /// directories, the spool directory) relative to the file's directory `base`, so a config
    /// means the same from any working directory. Values from the default or the environment
    /// stay relative to the working directory.
    fn resolve_paths_from_file(&mut self, figment: &Figment, base: &Path) {
        let from_file = |key: &str| {
            figment
                .find_value(key)
                .ok()
                .and_then(|value| figment.get_metadata(value.tag()))
                .is_some_and(|metadata| matches!(metadata.source, Some(figment::Source::File(_))))
        };
        if from_file("database.url")
            && let Some(resolved) = resolve_sqlite_url(&self.database.url, base)
        {
            self.database.url = resolved;
        }
        if from_file("server.spool_dir")
            && let Some(dir) = &mut self.server.spool_dir
        {
            *dir = base.join(&*dir);
        }
        if from_file("auth.admin_token_file") {
            self.auth.admin_token_file = base.join(&self.auth.admin_token_file);
        }
        if from_file("auth.external.jwks_file")
            && let Some(file) = self.auth.external.as_mut().and_then(|external| external.jwks_file.as_mut())
        {
            *file = base.join(&*file);
        }
        if from_file("shards") {
            for path in self.shards.iter_mut().filter_map(|shard| shard.path.as_mut()) {
                *path = base.join(&*path);
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.shards.is_empty() {
            return Err(invalid("shards", "at least one [[shards]] entry is required"));
        }
        if self.shards.len() > MAX_SHARDS {
            return Err(invalid("shards", format!("at most {MAX_SHARDS} shards are supported")));
        }
        for (i, shard) in self.shards.iter().enumerate() {
            validate_shard(i, shard, &self.shards[..i])?;
        }
        if self.shards.iter().all(|shard| shard.effective_weight() == 0) {
            return Err(invalid(
                "shards.weight",
                "every shard has weight 0 or is draining: at least one must take data",
            ));
        }
        let rf = self.placement.replication_factor;
        let weighted = self.shards.iter().filter(|shard| shard.effective_weight() > 0).count();
        if rf == 0 || rf > weighted {
            return Err(invalid(
                "placement.replication_factor",
                format!(
                    "{rf} must be between 1 and the number of shards taking data (weight above 0, not draining: {weighted})"
                ),
            ));
        }
        let quorum = self.placement.write_quorum;
        if quorum == 0 || quorum > rf {
            return Err(invalid(
                "placement.write_quorum",
                format!("{quorum} must be between 1 and replication_factor ({rf})"),
            ));
        }
        if self.replication.tasks_per_worker == 0 {
            return Err(invalid("replication.tasks_per_worker", "must be above 0"));
        }
        if self.replication.lease_secs == 0 {
            return Err(invalid("replication.lease_secs", "must be above 0"));
        }
        if self.replication.breaker_failures == 0 {
            return Err(invalid("replication.breaker_failures", "must be above 0"));
        }
        if self.replication.retry_min_ms == 0 || self.replication.retry_min_ms > self.replication.retry_max_secs * 1000
        {
            return Err(invalid("replication.retry_min_ms", "must be above 0 and at most retry_max_secs"));
        }
        if self.maintenance.rebalance_concurrency == 0 {
            return Err(invalid("maintenance.rebalance_concurrency", "must be above 0"));
        }
        if self.maintenance.scrub_copies_per_sec == 0 {
            return Err(invalid("maintenance.scrub_copies_per_sec", "must be above 0"));
        }
        if self.placement.vnodes_per_weight == 0 || self.placement.vnodes_per_weight > 65_536 {
            return Err(invalid("placement.vnodes_per_weight", "must be between 1 and 65536"));
        }
        if self.server.max_upload_bytes == 0 {
            return Err(invalid("server.max_upload_bytes", "must be above 0"));
        }
        if self.server.max_batch_files == 0 {
            return Err(invalid("server.max_batch_files", "must be above 0"));
        }
        self.latency.validate()?;
        self.metrics.validate()?;
        if self.server.max_pixels == 0 {
            return Err(invalid("server.max_pixels", "must be above 0"));
        }
        self.auth.validate(self.server.bind)?;
        self.rate_limits.validate()?;
        self.redis.validate()?;
        self.variants.validate()?;
        Ok(())
    }

    /// The ring's members: a draining shard is a member of weight 0, so it holds copies but
    /// gets none.
    pub fn ring_members(&self) -> Vec<RingMember> {
        self.shards
            .iter()
            .map(|shard| RingMember { name: shard.name.clone(), weight: shard.effective_weight() })
            .collect()
    }

    pub fn shard_names(&self) -> Vec<String> {
        self.shards.iter().map(|shard| shard.name.clone()).collect()
    }

    /// These settings with every secret replaced by [`MASK`]: the value of any key whose name
    /// says it is secret ([`is_secret_key`]), and the password of any URL.
    pub fn masked(&self) -> Result<Settings, ConfigError> {
        let print_error = |error: Box<dyn std::error::Error + Send + Sync>| ConfigError::Print(error);
        let mut value = toml::Value::try_from(self).map_err(|e| print_error(e.into()))?;
        mask_secrets(&mut value);
        value.try_into().map_err(|e: toml::de::Error| print_error(e.into()))
    }

    /// The effective settings as a TOML file that loads back to the same settings, secrets
    /// masked (`chitram config`).
    pub fn to_masked_toml(&self) -> Result<String, ConfigError> {
        let body = toml::to_string(&self.masked()?).map_err(|e| ConfigError::Print(e.into()))?;
        Ok(format!(
            "# Chitram's effective configuration: the default, then the config file, then CHITRAM__*\n\
             # environment overrides. Secrets are masked as \"{MASK}\": put them back (or set them in the\n\
             # environment) before serving with this file; `chitram ring --compare` needs none.\n\n{body}"
        ))
    }
}

/// Whether a key holds a secret, by its name: `secret_access_key`, and any future `password`,
/// `token`, `*_secret` or `private_key`.
pub fn is_secret_key(key: &str) -> bool {
    // A key naming a file (`admin_token_file`) holds a path, not the secret in the file.
    !key.ends_with("_file")
        && ["secret", "password", "passwd", "token", "private_key", "credential"].iter().any(|word| key.contains(word))
}

fn mask_secrets(value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table.iter_mut() {
                if is_secret_key(key) && value.is_str() {
                    *value = toml::Value::String(MASK.to_owned());
                } else {
                    mask_secrets(value);
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(mask_secrets),
        toml::Value::String(text) => *text = redact_url(text),
        _ => {}
    }
}

/// `[metrics]`: the Prometheus endpoint (README, "Operating many instances and observability").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Record metrics and serve `/metrics` (false: nothing is recorded, `/metrics` answers 404).
    pub enabled: bool,
    /// An internal address that serves `/metrics` alone, without credentials (none when unset:
    /// `/metrics` is then only on the main listener).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<SocketAddr>,
    /// How often the figures read from the metadata (objects and bytes per shard, the queue,
    /// copies by state) are refreshed, in seconds: a scrape never queries the database.
    pub refresh_secs: u64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self { enabled: true, bind: None, refresh_secs: 15 }
    }
}

impl MetricsSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.refresh_secs == 0 {
            return Err(invalid("metrics.refresh_secs", "must be above 0"));
        }
        Ok(())
    }
}

/// `[telemetry]`: the log format and where traces go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `text` (for people) or `json` (one object per line, for a log pipeline).
    pub log_format: LogFormat,
    /// An OpenTelemetry collector's OTLP/HTTP endpoint, e.g. `http://otel-collector:4318`;
    /// spans are exported only when it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self { log_format: LogFormat::Text, otlp_endpoint: None }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

fn validate_shard(i: usize, shard: &ShardSettings, earlier: &[ShardSettings]) -> Result<(), ConfigError> {
    let name_is_valid = !shard.name.is_empty()
        && shard.name.len() <= 64
        && shard.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !name_is_valid {
        return Err(invalid(
            format!("shards[{i}].name"),
            format!("{:?} must be 1-64 letters, digits, '-' or '_'", shard.name),
        ));
    }
    if let Some(first) = earlier.iter().position(|other| other.name == shard.name) {
        return Err(invalid(
            format!("shards[{i}].name"),
            format!("{:?} is already the name of shards[{first}]", shard.name),
        ));
    }
    if shard.weight > 1000 {
        return Err(invalid(format!("shards[{i}].weight"), "must be at most 1000"));
    }
    shard.backend(i).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(toml: &str) -> String {
        Settings::from_toml(toml).unwrap_err().to_string()
    }

    #[test]
    fn the_default_is_three_fs_shards_with_two_copies() {
        let settings = Settings::from_toml("").unwrap();
        assert_eq!(settings.shards.len(), 3);
        assert_eq!(settings.placement.replication_factor, 2);
        assert!(settings.database.url.starts_with("sqlite://"));
    }

    #[test]
    fn a_file_replaces_the_default_shards() {
        let settings = Settings::from_toml(
            "[placement]\nreplication_factor = 1\n[[shards]]\nname = \"x\"\nweight = 3\nkind = \"fs\"\npath = \"/srv/x\"\n",
        )
        .unwrap();
        assert_eq!(settings.shards.len(), 1);
        assert_eq!(settings.shards[0].weight, 3);
    }

    #[test]
    fn errors_name_the_offending_key() {
        let two = "[[shards]]\nname = \"a\"\nkind = \"fs\"\npath = \"a\"\n[[shards]]\nname = \"a\"\nkind = \"fs\"\npath = \"b\"\n";
        assert!(error_of(two).contains("shards[1].name"), "{}", error_of(two));
        let rf = "[placement]\nreplication_factor = 4\n";
        assert!(error_of(rf).contains("placement.replication_factor"), "{}", error_of(rf));
        let kind = "[[shards]]\nname = \"a\"\nkind = \"ftp\"\npath = \"a\"\n";
        assert!(error_of(kind).contains("ftp") && error_of(kind).contains("shards"), "{}", error_of(kind));
        let zero =
            "[placement]\nreplication_factor = 1\n[[shards]]\nname = \"a\"\nweight = 0\nkind = \"fs\"\npath = \"a\"\n";
        assert!(error_of(zero).contains("weight"), "{}", error_of(zero));
        let no_bucket = "[placement]\nreplication_factor = 1\n[[shards]]\nname = \"m\"\nkind = \"s3\"\n";
        assert!(error_of(no_bucket).contains("shards[0].bucket"), "{}", error_of(no_bucket));
        let half_keys = "[placement]\nreplication_factor = 1\n[[shards]]\nname = \"m\"\nkind = \"s3\"\nbucket = \"b\"\naccess_key_id = \"k\"\n";
        assert!(error_of(half_keys).contains("shards[0].secret_access_key"), "{}", error_of(half_keys));
        let bad_endpoint = "[placement]\nreplication_factor = 1\n[[shards]]\nname = \"m\"\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"minio:9000\"\n";
        assert!(error_of(bad_endpoint).contains("shards[0].endpoint"), "{}", error_of(bad_endpoint));
        let all_draining = "[placement]\nreplication_factor = 1\n[[shards]]\nname = \"a\"\ndraining = true\nkind = \"fs\"\npath = \"a\"\n";
        assert!(error_of(all_draining).contains("draining"), "{}", error_of(all_draining));
        let quorum = "[placement]\nwrite_quorum = 3\n";
        assert!(error_of(quorum).contains("placement.write_quorum"), "{}", error_of(quorum));
        let typo = "[server]\nmax_upload_byte = 1\n";
        assert!(error_of(typo).contains("max_upload_byte"), "{}", error_of(typo));
        let fs_region = "[placement]\nreplication_factor = 1\n[[shards]]\nname = \"a\"\nkind = \"fs\"\npath = \"a\"\nregion = \"eu\"\n";
        assert_eq!(
            error_of(fs_region),
            "invalid configuration: shards[0].region: only s3 shards take this key (this one has kind = \"fs\")"
        );
        let fs_secret = "[placement]\nreplication_factor = 1\n[[shards]]\nname = \"a\"\nkind = \"fs\"\npath = \"a\"\nsecret_access_key = \"s\"\n";
        assert!(error_of(fs_secret).contains("shards[0].secret_access_key: only s3 shards"), "{}", error_of(fs_secret));
    }

    #[test]
    fn a_wrong_type_names_its_key_once() {
        assert_eq!(
            error_of("[server]\nmax_upload_bytes = \"big\"\n"),
            "invalid configuration: server.max_upload_bytes: expected u64, found string \"big\""
        );
        let in_a_shard = error_of("[[shards]]\nname = \"a\"\nkind = \"fs\"\npath = \"a\"\nweight = \"x\"\n");
        assert_eq!(in_a_shard, "invalid configuration: shards[0].weight: expected u32, found string \"x\"");
    }

    #[test]
    fn a_mistyped_secret_is_not_repeated_in_the_error() {
        let unquoted_url = "[database]\nurl = postgres://chitram:hunter2@db/chitram\n";
        let message = error_of(unquoted_url);
        assert!(message.contains("url = ***") && !message.contains("hunter2"), "{message}");
        let unquoted_secret = "[[shards]]\nname = \"a\"\nkind = \"s3\"\nsecret_access_key = minio-secret\n";
        let message = error_of(unquoted_secret);
        assert!(message.contains("secret_access_key = ***") && !message.contains("minio-secret"), "{message}");
        let number = "[[shards]]\nname = \"a\"\nkind = \"s3\"\nbucket = \"b\"\nsecret_access_key = 12345678\n";
        let message = error_of(number);
        assert!(
            message.contains("shards[0].secret_access_key: expected") && !message.contains("12345678"),
            "{message}"
        );
        let url_in_the_wrong_key = "[server]\nmax_upload_bytes = \"postgres://chitram:hunter2@db/chitram\"\n";
        let message = error_of(url_in_the_wrong_key);
        assert!(message.contains("postgres://chitram:***@db") && !message.contains("hunter2"), "{message}");
    }

    #[test]
    fn an_unknown_key_is_named_once_with_the_keys_that_exist() {
        let missing = error_of("[[shards]]\nname = \"a\"\npath = \"a\"\n");
        assert_eq!(missing, "invalid configuration: shards[0].kind: is required");
        let message = error_of("[server]\nmax_upload_byte = 1\n");
        assert!(
            message.starts_with("invalid configuration: server.max_upload_byte: unknown key (expected one of `bind`,"),
            "{message}"
        );
        assert_eq!(message.matches("max_upload_byte").count(), 2, "the key once, then `max_upload_bytes`: {message}");
        assert!(!message.contains("default."), "{message}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type.
    fn file_errors_name_the_file_and_environment_errors_the_variable() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("chitram.toml", "[placement]\nreplication_factor = \"two\"\n")?;
            let message = Settings::load(Some(Path::new("chitram.toml"))).unwrap_err().to_string();
            assert!(message.starts_with("invalid configuration: placement.replication_factor: expected"), "{message}");
            assert!(message.ends_with("chitram.toml)"), "{message}");
            assert!(!message.contains("default."), "{message}");

            jail.set_env("CHITRAM__SERVER__MAX_BATCH_FILES", "many");
            let message = Settings::load(None).unwrap_err().to_string();
            assert_eq!(
                message,
                "invalid configuration: CHITRAM__SERVER__MAX_BATCH_FILES: expected usize, found string \"many\" \
                 (from the environment)"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type.
    fn shards_can_be_set_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "CHITRAM__SHARDS",
                r#"[{name="x", kind="fs", path="/srv/x"}, {name="y", kind="fs", path="/srv/y", weight=2}]"#,
            );
            let settings = Settings::load(None).expect("loads");
            assert_eq!(settings.shard_names(), ["x", "y"]);
            assert_eq!(settings.shards[1].weight, 2);
            assert_eq!(settings.shards[0].path.as_deref(), Some(Path::new("/srv/x")));
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type.
    fn relative_paths_in_a_file_resolve_against_its_directory() {
        figment::Jail::expect_with(|jail| {
            std::fs::create_dir("etc").expect("a directory for the config");
            jail.create_file(
                "etc/chitram.toml",
                "[server]\nspool_dir = \"spool\"\n[database]\nurl = \"sqlite://db/c.db?mode=rwc\"\n\
                 [[shards]]\nname = \"a\"\nkind = \"fs\"\npath = \"shards/a\"\n\
                 [[shards]]\nname = \"b\"\nkind = \"fs\"\npath = \"/srv/b\"\n",
            )?;
            let etc = std::path::absolute("etc").unwrap();
            let settings = Settings::load(Some(Path::new("etc/chitram.toml"))).expect("loads");
            assert_eq!(settings.database.url, format!("sqlite://{}/db/c.db?mode=rwc", etc.display()));
            assert_eq!(settings.server.spool_dir, Some(etc.join("spool")));
            assert_eq!(settings.shards[0].path, Some(etc.join("shards/a")));
            assert_eq!(settings.shards[1].path.as_deref(), Some(Path::new("/srv/b")), "absolute paths stay");

            // Values from the environment are relative to the working directory.
            jail.set_env("CHITRAM__DATABASE__URL", "sqlite://here.db");
            let settings = Settings::load(Some(Path::new("etc/chitram.toml"))).expect("loads");
            assert_eq!(settings.database.url, "sqlite://here.db");
            assert_eq!(settings.shards[0].path, Some(etc.join("shards/a")));
            Ok(())
        });
    }

    #[test]
    fn the_printed_configuration_loads_back_with_its_secrets_masked() {
        let settings = Settings::from_toml(
            "[database]\nurl = \"postgres://chitram:pg-pass-123@db:5432/chitram\"\n\
             [server]\nspool_dir = \"/var/tmp/chitram\"\n\
             [[shards]]\nname = \"a\"\nkind = \"fs\"\npath = \"/srv/a\"\ndraining = true\n\
             [[shards]]\nname = \"m\"\nweight = 2\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://m:9000\"\n\
             access_key_id = \"AKIDEXAMPLE\"\nsecret_access_key = \"s3-secret-456\"\n\
             [[shards]]\nname = \"n\"\nkind = \"s3\"\nbucket = \"b\"\n",
        )
        .unwrap();
        let printed = settings.to_masked_toml().unwrap();
        assert!(!printed.contains("pg-pass-123") && !printed.contains("s3-secret-456"), "{printed}");
        assert!(printed.contains("postgres://chitram:***@db:5432/chitram"), "{printed}");
        let loaded = Settings::from_toml(&printed).expect("the output is a valid config");
        let mut expected = settings.clone();
        expected.database.url = "postgres://chitram:***@db:5432/chitram".to_owned();
        expected.shards[1].secret_access_key = Some(MASK.to_owned());
        assert_eq!(loaded, expected);
        assert_eq!(loaded, settings.masked().unwrap());

        let default = Settings::from_toml(&Settings::default().to_masked_toml().unwrap()).unwrap();
        assert_eq!(default, Settings::default(), "the embedded default prints as itself");
    }

    /// The README's config example names every key and shows every default.
    #[test]
    fn the_readme_example_loads_and_shows_the_defaults() {
        let readme = include_str!("../README.md");
        let start = readme.find("```toml\n[server]").expect("the README has its config example") + "```toml\n".len();
        let example = &readme[start..start + readme[start..].find("```").unwrap()];
        let settings = Settings::from_toml(example).expect("the README's example is a valid config");
        let default = Settings::default();
        assert_eq!(settings.server, default.server);
        assert_eq!(settings.database, default.database);
        assert_eq!(settings.placement, default.placement);
        assert_eq!(settings.replication, default.replication);
        assert_eq!(settings.maintenance, default.maintenance);
        assert_eq!(settings.latency, default.latency);
        assert_eq!(settings.auth, default.auth);
        assert_eq!(settings.rate_limits, default.rate_limits);
        assert_eq!(settings.redis, default.redis);
        assert_eq!(settings.metrics, default.metrics);
        assert_eq!(settings.telemetry, default.telemetry);
        assert_eq!(settings.variants, default.variants);
        let s3 = settings.shards[1].backend(1).unwrap();
        let BackendSettings::S3(s3) = s3 else { panic!("the second shard is s3") };
        assert_eq!((s3.region.as_str(), s3.create_bucket), ("us-east-1", true), "the defaults it names");
        assert_eq!((s3.connect_timeout, s3.operation_timeout), (Duration::from_millis(1000), Duration::from_secs(60)));
        // Every key of every section appears in the example, commented out or not.
        let value = toml::Value::try_from(Settings {
            shards: vec![ShardSettings {
                draining: true,
                ..ShardSettings::s3("x", &S3Settings { endpoint: Some("http://e".into()), ..s3.clone() })
            }],
            server: ServerSettings { spool_dir: Some("/tmp".into()), ..default.server.clone() },
            metrics: MetricsSettings {
                bind: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
                ..default.metrics.clone()
            },
            telemetry: TelemetrySettings {
                otlp_endpoint: Some("http://collector:4318".into()),
                ..default.telemetry.clone()
            },
            ..default.clone()
        })
        .unwrap();
        let mut keys: Vec<String> = Vec::new();
        for (section, table) in value.as_table().unwrap() {
            let tables = match table {
                toml::Value::Array(items) => items.iter().filter_map(|item| item.as_table()).collect::<Vec<_>>(),
                other => other.as_table().into_iter().collect(),
            };
            keys.extend(tables.iter().flat_map(|t| t.keys()).map(|key| format!("{section}.{key}")));
        }
        keys.push("shards.path".to_owned());
        for key in keys {
            let name = key.split('.').nth(1).unwrap();
            assert!(
                example.lines().any(|line| line.trim_start_matches(['#', ' ']).starts_with(&format!("{name} = "))),
                "the README's example shows {key}"
            );
        }
    }

    #[test]
    fn variants_are_named_tables_beside_their_settings() {
        use crate::variants::spec::Fit;
        let default = Settings::from_toml("").unwrap();
        let names: Vec<String> = default.variants.specs().unwrap().iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, ["thumb", "preview"], "the default set when none is named");

        let settings = Settings::from_toml(
            "[variants]\njpeg_quality = 90\n[variants.og]\nwidth = 1200\nheight = 630\nfit = \"cover\"\n",
        )
        .unwrap();
        let specs = settings.variants.specs().unwrap();
        assert_eq!(specs.len(), 1, "naming a variant replaces the default set");
        assert_eq!((specs[0].width, specs[0].height, specs[0].fit), (1200, 630, Fit::Cover));
        assert_eq!(settings.variants.jpeg_quality, 90);
        let printed = settings.to_masked_toml().unwrap();
        assert_eq!(Settings::from_toml(&printed).unwrap(), settings, "prints as itself");

        for (text, key) in [
            ("[variants.Big]\nwidth = 1\nheight = 1\nfit = \"cover\"", "variants.Big"),
            ("[variants.t]\nwidth = 0\nheight = 1\nfit = \"cover\"", "variants.t"),
            // Inside the flattened table serde loses the path: the value names itself.
            ("[variants.t]\nwidth = 1\nheight = 1\nfit = \"stretch\"", "unknown value \"stretch\""),
            ("[variants]\njpeg_quality = 0", "variants.jpeg_quality"),
            ("[variants]\ndecode_threads = 0", "variants.decode_threads"),
        ] {
            let error = Settings::from_toml(text).unwrap_err().to_string();
            assert!(error.contains(key), "{text}: {error}");
        }
    }

    /// Accounts off on a public address would let anyone delete everything: refused unless
    /// asked for in so many words.
    #[test]
    fn accounts_off_is_refused_off_loopback_unless_allowed() {
        let off = |bind: &str, allow: bool| {
            Settings::from_toml(&format!(
                "[server]\nbind = \"{bind}\"\n[auth]\nenabled = false\nallow_anonymous_network = {allow}\n"
            ))
        };
        let Err(error) = off("0.0.0.0:8000", false) else { panic!("accounts off on 0.0.0.0 was accepted") };
        assert!(error.to_string().contains("auth.enabled"), "{error}");
        assert!(off("0.0.0.0:8000", true).is_ok());
        assert!(off("127.0.0.1:8000", false).is_ok());
        assert!(off("[::1]:8000", false).is_ok());
        let short = Settings::from_toml("[auth]\ntoken_secret = \"too short\"\n").unwrap_err();
        assert!(short.to_string().contains("auth.token_secret"), "{short}");
    }

    #[test]
    fn the_metadata_cache_is_off_by_default_and_needs_a_redis_url() {
        let default = Settings::from_toml("").unwrap();
        assert!(!default.redis.metadata_cache);
        assert_eq!(default.redis.metadata_cache_ttl_secs, 30);
        let on = Settings::from_toml("[redis]\nurl = \"redis://r:6379\"\nmetadata_cache = true\n").unwrap();
        assert!(on.redis.metadata_cache);
        let error = Settings::from_toml("[redis]\nmetadata_cache = true\n").unwrap_err().to_string();
        assert!(error.contains("redis.metadata_cache"), "{error}");
        let error = Settings::from_toml("[redis]\nmetadata_cache_ttl_secs = 0\n").unwrap_err().to_string();
        assert!(error.contains("redis.metadata_cache_ttl_secs"), "{error}");
    }

    #[test]
    fn keys_named_as_secrets_are_masked() {
        assert!(is_secret_key("secret_access_key") && is_secret_key("password") && is_secret_key("jwt_secret"));
        assert!(!is_secret_key("access_key_id") && !is_secret_key("url") && !is_secret_key("admin_token_file"));
        assert!(is_secret_key("token_secret") && is_secret_key("hs256_secret"));
        let mut value: toml::Value =
            toml::from_str("[auth]\njwt_secret = \"x1\"\nissuer = \"me\"\n[redis]\nurl = \"redis://:pw@r:6379\"\n")
                .unwrap();
        mask_secrets(&mut value);
        assert_eq!(value["auth"]["jwt_secret"].as_str(), Some(MASK));
        assert_eq!(value["auth"]["issuer"].as_str(), Some("me"));
        assert_eq!(value["redis"]["url"].as_str(), Some("redis://:***@r:6379"));
    }

    #[test]
    fn sqlite_urls_name_their_file() {
        assert_eq!(sqlite_path("sqlite://data/c.db"), Some(PathBuf::from("data/c.db")));
        assert_eq!(sqlite_path("sqlite:data/c.db?mode=rwc"), Some(PathBuf::from("data/c.db")));
        assert_eq!(sqlite_path("sqlite:///var/c.db"), Some(PathBuf::from("/var/c.db")));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("sqlite://c.db?mode=memory"), None);
        assert_eq!(sqlite_path("postgres://u@h/db"), None);
        let base = Path::new("/etc/chitram");
        assert_eq!(resolve_sqlite_url("sqlite:c.db", base).as_deref(), Some("sqlite:///etc/chitram/c.db"));
        assert_eq!(resolve_sqlite_url("sqlite:///var/c.db", base), None);
        assert_eq!(resolve_sqlite_url("postgres://u:p@h/db", base), None);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type.
    fn the_environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("chitram.toml", "[database]\nurl = \"sqlite://from-file.db\"\n")?;
            jail.set_env("CHITRAM__DATABASE__URL", "postgres://u@h/db");
            jail.set_env("CHITRAM__SERVER__MAX_UPLOAD_BYTES", "1024");
            let settings = Settings::load(Some(Path::new("chitram.toml"))).expect("loads");
            assert_eq!(settings.database.url, "postgres://u@h/db");
            assert_eq!(settings.server.max_upload_bytes, 1024);
            Ok(())
        });
    }
}
