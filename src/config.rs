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
use crate::storage::s3::S3Settings;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub placement: PlacementSettings,
    pub replication: ReplicationSettings,
    pub maintenance: MaintenanceSettings,
    pub shards: Vec<ShardSettings>,
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
    /// On shutdown, how long requests in flight may take to finish.
    pub shutdown_grace_secs: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            max_upload_bytes: 50 * 1024 * 1024,
            max_batch_files: 20,
            max_pixels: 100_000_000,
            spool_dir: None,
            shutdown_grace_secs: 30,
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
    /// Concurrent replication workers in this instance (0 runs none: another instance on the
    /// same Postgres does the work).
    pub workers: usize,
    /// How long a claimed task stays reserved for its worker; a worker renews it while it
    /// works, so this bounds how long a crashed worker's task waits.
    pub lease_secs: u64,
    /// First retry delay of a failed task; doubles per failure (with jitter) up to the max.
    pub retry_min_ms: u64,
    pub retry_max_secs: u64,
    /// How often an idle worker looks for due tasks.
    pub idle_poll_ms: u64,
    /// Consecutive failures that open a shard's circuit.
    pub breaker_failures: u32,
    /// How long an open circuit skips its shard before one trial call, in milliseconds.
    pub breaker_cooldown_ms: u64,
}

impl Default for ReplicationSettings {
    fn default() -> Self {
        Self {
            workers: 2,
            lease_secs: 60,
            retry_min_ms: 500,
            retry_max_secs: 300,
            idle_poll_ms: 500,
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
                    ("access_key_id", self.access_key_id.is_some()),
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
            return Err(invalid(key("endpoint"), format!("{endpoint:?} must start with http:// or https://")));
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

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    #[error("invalid configuration: {key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
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
            shards: vec![shard("a"), shard("b"), shard("c")],
        }
    }
}

impl Settings {
    /// Loads the default, then `file` if given, then the environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, Env::prefixed("CHITRAM__").split("__"))
    }

    fn load_with_env(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::MissingFile(file.to_path_buf()));
            }
            figment = figment.merge(Toml::file(file));
        }
        let settings: Settings = figment.merge(env).extract().map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Parses TOML text alone (no environment), for tests and `ring --compare`.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
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
        if self.server.max_pixels == 0 {
            return Err(invalid("server.max_pixels", "must be above 0"));
        }
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
