//! Configuration: a TOML file (`--config FILE`), then `CHITRAM__SECTION__KEY` environment
//! overrides, over the embedded default (SQLite and three filesystem shards under `./data`).
//!
//! Raw input is parsed once into [`Settings`]; anything wrong stops start-up with a message
//! that names the offending key, e.g. `shards[1].name: "a" is already the name of shards[0]`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::placement::ring::{MAX_SHARDS, RingMember};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub placement: PlacementSettings,
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
    /// Where uploads larger than a few hundred KiB spool while they are checked (the system
    /// temporary directory when unset).
    pub spool_dir: Option<PathBuf>,
    /// Seconds between passes of the sweep that deletes copies of unreferenced blobs.
    pub deletion_sweep_secs: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
            max_upload_bytes: 50 * 1024 * 1024,
            max_batch_files: 20,
            spool_dir: None,
            deletion_sweep_secs: 30,
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
    /// Ring tokens per unit of shard weight.
    pub vnodes_per_weight: u32,
}

impl Default for PlacementSettings {
    fn default() -> Self {
        Self { replication_factor: 2, vnodes_per_weight: 256 }
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
    pub kind: ShardKind,
    /// `fs`: the directory that holds the shard's objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ShardKind {
    Fs,
}

/// Where a shard keeps its objects.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendSettings {
    /// A directory on a local filesystem.
    Fs { path: PathBuf },
}

impl ShardSettings {
    /// The backend this entry describes; `index` is its position, for error messages.
    pub fn backend(&self, index: usize) -> Result<BackendSettings, ConfigError> {
        match self.kind {
            ShardKind::Fs => match &self.path {
                Some(path) if !path.as_os_str().is_empty() => Ok(BackendSettings::Fs { path: path.clone() }),
                _ => Err(invalid(
                    format!("shards[{index}].path"),
                    "an fs shard needs the directory it stores objects in",
                )),
            },
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
        let shard = |name: &str| ShardSettings {
            name: name.to_owned(),
            weight: 1,
            kind: ShardKind::Fs,
            path: Some(PathBuf::from("data/shards").join(name)),
        };
        Self {
            server: ServerSettings::default(),
            database: DatabaseSettings::default(),
            placement: PlacementSettings::default(),
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
        if self.shards.iter().all(|shard| shard.weight == 0) {
            return Err(invalid("shards.weight", "every shard has weight 0: at least one must take data"));
        }
        let rf = self.placement.replication_factor;
        let weighted = self.shards.iter().filter(|shard| shard.weight > 0).count();
        if rf == 0 || rf > weighted {
            return Err(invalid(
                "placement.replication_factor",
                format!("{rf} must be between 1 and the number of shards with weight above 0 ({weighted})"),
            ));
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
        Ok(())
    }

    pub fn ring_members(&self) -> Vec<RingMember> {
        self.shards.iter().map(|shard| RingMember { name: shard.name.clone(), weight: shard.weight }).collect()
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
