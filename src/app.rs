//! Assembles the application from settings. `main` and the tests both go through here, so the
//! tests run exactly what production runs.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::accounts::Accounts;
use crate::accounts::bootstrap::{self, BootstrapError};
use crate::accounts::service::AccountsStartError;
use crate::api::{self, AppState, UploadLimits};
use crate::config::{BackendSettings, MaintenanceSettings, Settings, sqlite_path};
use crate::images::eager::{EagerReplicator, EagerSettings};
use crate::images::service::ImageService;
use crate::images::spool::{self, MemoryBudget, SpoolLimits};
use crate::instance_lock::{InstanceLock, InstanceLockError, lock_sqlite_database};
use crate::maintenance::leader;
use crate::maintenance::scrub::{self, ScrubOptions};
use crate::metadata::cache::{CacheConfigError, CachedMetadata};
use crate::metadata::{self, MetadataError, MetadataStore};
use crate::observability::recorder::{self, RecorderError};
use crate::observability::{names, refresher};
use crate::placement::ring::{Ring, RingError};
use crate::ratelimit::RateLimiter;
use crate::ratelimit::shared::RedisConfigError;
use crate::redact::redact_url;
use crate::replication::backoff::RetryPolicy;
use crate::replication::worker::{Replicator, Scaling, WorkerPool, WorkerSettings, run_workers};
use crate::storage::breaker::BreakerSettings;
use crate::storage::fs::FsStore;
use crate::storage::identity::LabelledStore;
use crate::storage::metered::MeteredStore;
use crate::storage::router::{Shard, StorageRouter};
use crate::storage::s3::{S3Settings, S3Store};
use crate::storage::{BlobStore, ShardLabel};
use crate::variants::pool::DecodePool;
use crate::variants::service::VariantService;
use crate::variants::worker::{self as variant_worker, VariantWorker, VariantWorkerSettings};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "the metadata database {url} does not exist{detail}: operator commands never create one. Run \
         `chitram migrate` (or `chitram serve`) with this config to create it, or point --config or \
         database.url at the existing database"
    )]
    NoDatabase { url: String, detail: String },
    #[error(
        "the metadata database {url} has no Chitram tables (it was never migrated): run `chitram migrate` \
         with this config first, or point --config or database.url at the existing database"
    )]
    NotInitialised { url: String },
    #[error("cannot open the metadata database {url}")]
    Database {
        url: String,
        #[source]
        source: MetadataError,
    },
    #[error("cannot open shard {name:?} ({location})")]
    Shard {
        name: String,
        location: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot build the placement ring")]
    Ring(#[from] RingError),
    #[error(
        "{count} blobs have their only stored copies on shards missing from the config ({shards}): put those \
         shards back with `draining = true`, run `chitram rebalance` until they are empty, then remove them"
    )]
    StrandedBlobs { count: u64, shards: String },
    #[error("cannot check the metadata before starting")]
    Metadata(#[from] MetadataError),
    #[error("cannot set up accounts")]
    Accounts(#[from] AccountsStartError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error(transparent)]
    Redis(#[from] RedisConfigError),
    #[error(transparent)]
    MetadataCache(#[from] CacheConfigError),
    #[error(transparent)]
    InstanceLock(#[from] InstanceLockError),
    #[error(transparent)]
    Metrics(#[from] RecorderError),
    #[error("cannot listen on {addr} (is another process using it?)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A built application, bound to its port and ready to serve.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    workers: WorkerPool,
    variant_workers: Vec<VariantWorker>,
    shutdown_grace: Duration,
    shutdown_drain: Duration,
    maintenance: MaintenanceSettings,
    spool_dir: Option<PathBuf>,
    /// `[metrics] bind`: the internal listener that serves `/metrics` alone.
    metrics_listener: Option<TcpListener>,
    /// How often the metadata figures are refreshed; `None` when metrics are off.
    metrics_refresh: Option<Duration>,
    /// On SQLite: this process's claim on the database file, held while it serves.
    instance_lock: Option<InstanceLock>,
}

impl Application {
    /// Connects and migrates the database, opens every shard, and binds the listener.
    pub async fn build(settings: &Settings) -> Result<Self, StartError> {
        let instance_lock = lock_sqlite_database(&settings.database.url)?;
        let metrics = settings.metrics.enabled.then(recorder::install).transpose()?;
        let metadata = open_metadata(&settings.database.url).await?;
        refuse_stranded_blobs(metadata.as_ref(), settings).await?;
        let metadata = with_metadata_cache(settings, metadata).await?;
        let router = Arc::new(open_storage(settings, metadata.as_ref()).await?);
        let (images, variants) = image_services(settings, &metadata, &router)?;
        remove_spool_leftovers(settings.server.spool_dir.as_deref());
        let limits = Arc::new(UploadLimits {
            spool: SpoolLimits {
                max_bytes: settings.server.max_upload_bytes,
                dir: settings.server.spool_dir.clone(),
                memory: MemoryBudget::new(settings.server.upload_memory_bytes),
            },
            max_batch_files: settings.server.max_batch_files,
        });
        let workers = replicators(settings, &metadata, &router);
        let variant_workers = variant_workers(settings, &variants);
        let accounts = Arc::new(Accounts::new(&settings.auth, metadata.clone()).await?);
        if settings.auth.enabled {
            bootstrap::ensure_first_admin(&accounts, metadata.as_ref(), &settings.auth.admin_token_file).await?;
        }
        let limiter = Arc::new(RateLimiter::new(&settings.rate_limits, settings.redis.url.as_deref())?);
        let listener = bind(settings.server.bind).await?;
        let metrics_listener = match settings.metrics.bind {
            Some(addr) if metrics.is_some() => Some(bind(addr).await?),
            _ => None,
        };
        for shard in &settings.shards {
            metrics::gauge!(names::SHARD_WEIGHT, "shard" => shard.name.clone()).set(shard.effective_weight());
        }
        let state = AppState {
            images,
            variants,
            metadata,
            router,
            limits,
            replication_workers: workers.scaling.always,
            replica_counts: Arc::default(),
            component_checks: Arc::default(),
            pending_overdue: Duration::from_secs(settings.replication.pending_overdue_secs),
            accounts,
            limiter,
            trust_forwarded_for: settings.rate_limits.trust_forwarded_for,
            local_only: !settings.auth.enabled && !settings.auth.allow_anonymous_network,
            readiness: Arc::new(api::health::Readiness::new(settings.placement.write_quorum)),
            metrics,
        };
        Ok(Self {
            listener,
            workers,
            variant_workers,
            shutdown_grace: Duration::from_secs(settings.server.shutdown_grace_secs),
            shutdown_drain: Duration::from_secs(settings.server.shutdown_drain_secs),
            maintenance: settings.maintenance.clone(),
            spool_dir: settings.server.spool_dir.clone(),
            metrics_refresh: state.metrics.is_some().then(|| Duration::from_secs(settings.metrics.refresh_secs)),
            state,
            metrics_listener,
            instance_lock,
        })
    }

    /// The internal metrics listener's address, when `[metrics] bind` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|listener| listener.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn metadata(&self) -> Arc<dyn MetadataStore> {
        self.state.metadata.clone()
    }

    pub fn router(&self) -> Arc<StorageRouter> {
        self.state.router.clone()
    }

    pub fn variants(&self) -> Arc<VariantService> {
        self.state.variants.clone()
    }

    /// Starts the replication workers and serves until `shutdown` resolves. Then it stops
    /// accepting, lets requests in flight finish (for up to `server.shutdown_grace_secs`), and
    /// stops the workers and the uploads' eager copies (within the same grace), whose
    /// unfinished tasks stay in the queue.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let stopping = CancellationToken::new();
        let scrubber = self.periodic_scrub(stopping.clone());
        let refresher = self.metrics_refresher(stopping.clone());
        let internal = self.metrics_listener.map(|listener| serve_metrics(listener, &self.state, stopping.clone()));
        // Held until serving ends: another `serve` of a SQLite file may start only then.
        let _instance_lock = self.instance_lock;
        let workers = tokio::spawn(run_workers(self.workers, stopping.clone()));
        let variant_workers = tokio::spawn(variant_worker::run_workers(self.variant_workers, stopping.clone()));
        let signalled = stopping.clone();
        let readiness = self.state.readiness.clone();
        let drain = self.shutdown_drain;
        let shutdown = async move {
            shutdown.await;
            // Load balancers see `/health/ready` fail from now on and stop sending requests.
            readiness.stop_accepting();
            if !drain.is_zero() {
                tracing::info!(
                    drain_secs = drain.as_secs(),
                    "shutting down: draining (readiness fails, requests still served)"
                );
                tokio::time::sleep(drain).await;
            }
            tracing::info!("shutting down: no new connections; finishing requests in flight");
            signalled.cancel();
        };
        tracing::info!(addr = %self.listener.local_addr()?, "serving");
        // Small responses (metadata, 304s) must not wait on the client's delayed ACK.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY");
            }
        });
        let eager = self.state.images.eager_replication().cloned();
        let (router, metadata) = (self.state.router.clone(), self.state.metadata.clone());
        // The peer's address keys anonymous rate limits.
        let service = api::app(self.state).into_make_service_with_connect_info::<SocketAddr>();
        let serve = axum::serve(listener, service).with_graceful_shutdown(shutdown);
        let grace = self.shutdown_grace;
        let served = tokio::select! {
            served = serve => served,
            () = async { stopping.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_secs = grace.as_secs(), "requests still in flight after the grace period; stopping anyway");
                Ok(())
            }
        };
        stopping.cancel();
        if let Some(eager) = eager {
            eager.stop(grace).await;
        }
        let _ = workers.await;
        let _ = variant_workers.await;
        for task in [scrubber, refresher, internal].into_iter().flatten() {
            let _ = task.await;
        }
        // A deletion whose caller stopped (a worker, a request) ends answered or fenced, each
        // DELETE within the control deadline: the process stays for them, up to the grace (a
        // request's deletion may have several copies to remove, one after another).
        router.wait_for_detached(grace.max(router.deadlines().control + Duration::from_secs(1))).await;
        metadata.before_exit().await;
        served
    }

    /// Keeps the metrics read from the metadata fresh (`[metrics] refresh_secs`),
    /// and the exporter's histograms folded (`observability/recorder.rs`).
    fn metrics_refresher(&self, stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.metrics_refresh?;
        let handle = self.state.metrics.clone()?;
        let shards = self.state.router.shards().iter().map(|shard| shard.name.clone()).collect();
        let metadata = self.state.metadata.clone();
        Some(tokio::spawn(async move {
            tokio::join!(refresher::run(metadata, shards, every, stop.clone()), recorder::run_upkeep(handle, stop));
        }))
    }

    /// The background scrub, paced so it does not starve traffic (`maintenance.*`), in the one
    /// instance that holds the maintenance lock (`maintenance/leader.rs`).
    fn periodic_scrub(&self, stop: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let settings = &self.maintenance;
        if settings.scrub_interval_secs == 0 {
            return None;
        }
        let options = ScrubOptions {
            repair: true,
            verify_checksums: false,
            orphan_grace: Duration::from_secs(settings.orphan_grace_secs),
            copies_per_sec: Some(settings.scrub_copies_per_sec),
            spool_dir: self.spool_dir.clone(),
            resume: true,
            stop: stop.clone(),
        };
        let interval = Duration::from_secs(settings.scrub_interval_secs);
        let (metadata, router) = (self.state.metadata.clone(), self.state.router.clone());
        let jobs = move |term: CancellationToken| {
            let options = ScrubOptions { stop: term, ..options.clone() };
            scrub::run_periodic(metadata.clone(), router.clone(), interval, options)
        };
        Some(tokio::spawn(leader::run_as_leader(self.state.metadata.clone(), stop, jobs)))
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })
}

/// Serves `/metrics` alone on the internal listener until `stop`.
fn serve_metrics(listener: TcpListener, state: &AppState, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let app = api::metrics::internal_app(state.clone());
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        if let Err(error) = served {
            tracing::warn!(%error, "the metrics listener stopped");
        }
    })
}

/// Refuses to start when the config dropped a shard that holds the only stored copies of some
/// blobs: serving would answer 503 for them, and nothing would ever copy them back.
pub async fn refuse_stranded_blobs(metadata: &dyn MetadataStore, settings: &Settings) -> Result<(), StartError> {
    let known = settings.shard_names();
    let count = metadata.count_stranded_blobs(&known).await?;
    if count == 0 {
        return Ok(());
    }
    let mut missing: Vec<String> = metadata
        .shard_usage()
        .await?
        .into_iter()
        .map(|usage| usage.shard)
        .filter(|shard| !known.contains(shard))
        .collect();
    missing.dedup();
    Err(StartError::StrandedBlobs { count, shards: missing.join(", ") })
}

/// The image use cases and the variants use case over them, sharing the configured set.
pub fn image_services(
    settings: &Settings,
    metadata: &Arc<dyn MetadataStore>,
    router: &Arc<StorageRouter>,
) -> Result<(Arc<ImageService>, Arc<VariantService>), StartError> {
    let catalog = Arc::new(settings.variants.catalog()?);
    let mut images = ImageService::new(metadata.clone(), router.clone(), settings.placement.write_quorum)
        .with_max_pixels(settings.server.max_pixels)
        .with_variants(catalog.clone());
    if settings.replication.eager_copies > 0 && settings.placement.replication_factor > settings.placement.write_quorum
    {
        let eager = EagerSettings {
            max_in_flight: settings.replication.eager_copies,
            lease: Duration::from_secs(settings.replication.lease_secs),
            retry_after: Duration::from_millis(settings.replication.retry_min_ms),
        };
        images = images.with_eager_replication(Arc::new(EagerReplicator::new(metadata.clone(), router.clone(), eager)));
    }
    let images = Arc::new(images);
    let pool = DecodePool::start(settings.variants.decode_threads);
    let variants = Arc::new(VariantService::new(metadata.clone(), images.clone(), catalog, pool));
    Ok((images, variants))
}

/// Variant workers share the replication queue's lease, backoff and polling settings.
fn variant_workers(settings: &Settings, variants: &Arc<VariantService>) -> Vec<VariantWorker> {
    let replication = &settings.replication;
    let worker_settings = VariantWorkerSettings {
        lease: Duration::from_secs(replication.lease_secs),
        retry: RetryPolicy {
            min: Duration::from_millis(replication.retry_min_ms),
            max: Duration::from_secs(replication.retry_max_secs),
        },
        idle_poll: Duration::from_millis(replication.idle_poll_ms.max(1)),
    };
    let instance = uuid::Uuid::new_v4().simple().to_string();
    (0..settings.variants.workers)
        .map(|n| {
            VariantWorker::new(variants.clone(), worker_settings.clone(), format!("variants-{}-{n}", &instance[..8]))
        })
        .collect()
}

/// The replication workers: `workers` always, up to `max_workers` while the queue is deep; none
/// at all when `workers` is 0 (another instance does the work).
fn replicators(settings: &Settings, metadata: &Arc<dyn MetadataStore>, router: &Arc<StorageRouter>) -> WorkerPool {
    let replication = &settings.replication;
    let worker_settings = WorkerSettings {
        lease: Duration::from_secs(replication.lease_secs),
        retry: RetryPolicy {
            min: Duration::from_millis(replication.retry_min_ms),
            max: Duration::from_secs(replication.retry_max_secs),
        },
        idle_poll: Duration::from_millis(replication.idle_poll_ms.max(1)),
        spool_dir: settings.server.spool_dir.clone(),
    };
    let instance = uuid::Uuid::new_v4().simple().to_string();
    let most = if replication.workers == 0 { 0 } else { replication.max_workers.max(replication.workers) };
    let replicators = (0..most)
        .map(|n| {
            let id = format!("{}-{}-{n}", std::process::id(), &instance[..8]);
            Replicator::new(metadata.clone(), router.clone(), worker_settings.clone(), id)
        })
        .collect();
    let scaling = Scaling {
        always: replication.workers,
        most,
        tasks_per_worker: replication.tasks_per_worker,
        sample_every: Duration::from_secs(1),
    };
    WorkerPool { replicators, scaling }
}

impl StartError {
    /// The database is not there to work on (an operator command refuses it rather than create it).
    pub fn is_absent_database(&self) -> bool {
        matches!(self, StartError::NoDatabase { .. } | StartError::NotInitialised { .. })
    }
}

/// Connects to the metadata database, creating it if needed, and applies its migrations
/// (`serve`, `migrate`).
pub async fn open_metadata(url: &str) -> Result<Arc<dyn MetadataStore>, StartError> {
    let error = |source| StartError::Database { url: redact_url(url), source };
    let metadata = metadata::connect(url).await.map_err(error)?;
    metadata.migrate().await.map_err(error)?;
    Ok(metadata)
}

/// The store wrapped in the Redis cache of image records when `[redis] metadata_cache` is on
/// (`metadata/cache.rs`); every writer must go through the wrapper, so that it invalidates.
pub async fn with_metadata_cache(
    settings: &Settings,
    metadata: Arc<dyn MetadataStore>,
) -> Result<Arc<dyn MetadataStore>, StartError> {
    match &settings.redis.url {
        Some(url) if settings.redis.metadata_cache => {
            let ttl = Duration::from_secs(settings.redis.metadata_cache_ttl_secs);
            let store_id = metadata.store_id().await?;
            Ok(Arc::new(CachedMetadata::new(metadata, url, &store_id, ttl)?))
        }
        _ => Ok(metadata),
    }
}

/// Connects to a metadata database that must already exist and hold Chitram's tables, for
/// the operator commands: a wrong path or URL must fail, not answer "all clear" about a new
/// empty database. A SQLite file is looked for before connecting (connecting creates it).
/// Migrations still pending on an initialised database are applied.
pub async fn open_existing_metadata(url: &str) -> Result<Arc<dyn MetadataStore>, StartError> {
    let shown = redact_url(url);
    if let Some(path) = sqlite_path(url)
        && !path.is_file()
    {
        let path = std::path::absolute(&path).unwrap_or(path);
        return Err(StartError::NoDatabase { url: shown, detail: format!(" (no file at {})", path.display()) });
    }
    let error = |source| StartError::Database { url: shown.clone(), source };
    let metadata = metadata::connect(url).await.map_err(error)?;
    if !metadata.is_initialised().await.map_err(error)? {
        return Err(StartError::NotInitialised { url: shown });
    }
    metadata.migrate().await.map_err(error)?;
    Ok(metadata)
}

/// Builds the ring and opens every shard's backend, each behind its label check
/// (`storage/identity.rs`), creating the directory of an `fs` shard that has none (`serve`).
/// An S3 shard that cannot be reached is opened anyway (with a warning): it may come back,
/// and `/health` names it meanwhile.
pub async fn open_storage(settings: &Settings, metadata: &dyn MetadataStore) -> Result<StorageRouter, StartError> {
    open_storage_with(settings, metadata, true).await
}

/// Like [`open_storage`], but an `fs` shard whose directory does not exist is opened as a
/// shard that is down, and nothing is created (the operator commands).
pub async fn open_existing_storage(
    settings: &Settings,
    metadata: &dyn MetadataStore,
) -> Result<StorageRouter, StartError> {
    open_storage_with(settings, metadata, false).await
}

async fn open_storage_with(
    settings: &Settings,
    metadata: &dyn MetadataStore,
    create_fs_roots: bool,
) -> Result<StorageRouter, StartError> {
    let ring = Ring::new(settings.ring_members(), settings.placement.vnodes_per_weight)?;
    let breaker = BreakerSettings {
        failure_threshold: settings.replication.breaker_failures,
        cooldown: Duration::from_millis(settings.replication.breaker_cooldown_ms),
    };
    let store_id = metadata.store_id().await?;
    let usage = metadata.shard_usage().await?;
    let mut shards = Vec::with_capacity(settings.shards.len());
    for (index, shard) in settings.shards.iter().enumerate() {
        let backend: Box<dyn BlobStore> = match shard.backend(index)? {
            BackendSettings::Fs { path } if !create_fs_roots => Box::new(FsStore::open_existing(path)),
            BackendSettings::Fs { path } => Box::new(FsStore::open(&path).map_err(|source| StartError::Shard {
                name: shard.name.clone(),
                location: path.display().to_string(),
                source,
            })?),
            BackendSettings::S3(s3) => Box::new(open_s3_shard(&shard.name, &s3).await),
        };
        let label = ShardLabel { store_id: store_id.clone(), shard: shard.name.clone() };
        let recorded_copies = usage.iter().any(|u| u.shard == shard.name && u.copies > 0);
        let store = LabelledStore::open(backend, label, recorded_copies).await;
        let store = MeteredStore::new(shard.name.clone(), Box::new(store));
        shards.push(Shard::new(shard.name.clone(), Arc::new(store), breaker));
    }
    Ok(StorageRouter::new(ring, shards, settings.placement.replication_factor)
        .with_latency_limits(settings.latency.deadlines(), settings.latency.hedge()))
}

async fn open_s3_shard(name: &str, settings: &S3Settings) -> S3Store {
    let store = S3Store::connect(settings).await;
    if let Err(error) = store.prepare_bucket(settings.create_bucket).await {
        tracing::warn!(shard = name, error = %crate::telemetry::error_chain(&error), "shard is not ready");
    }
    store
}

/// Removes the spool files that a process killed mid-request left behind (see
/// [`spool::remove_leftovers`]). A directory that cannot be read is the first upload's error
/// to report, not the start's.
fn remove_spool_leftovers(dir: Option<&std::path::Path>) {
    match spool::remove_leftovers(dir, spool::LEFTOVER_AGE) {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "removed spool files left by a process stopped mid-request"),
        Err(error) => tracing::warn!(%error, "could not look for spool files left by an earlier process"),
    }
}

#[cfg(test)]
mod tests {
    use crate::telemetry::error_chain;

    /// A mistyped or unreachable database URL stops start-up with a message that names the
    /// URL, never its password.
    #[tokio::test]
    async fn passwords_stay_out_of_start_up_errors() {
        for url in [
            "postgress://u:s3cret@127.0.0.1:1/db",
            "postgres//u:s3cret@127.0.0.1:1/db",
            "postgres://u:s3cret@127.0.0.1:1/db",
            "postgres://u:s3cret@127.0.0.1:notaport/db",
            "postgres://127.0.0.1:1/db?user=u&password=s3cret",
        ] {
            let Err(error) = super::open_metadata(url).await else { panic!("{url} opened") };
            let shown = format!("{} | {error:?}", error_chain(&error));
            assert!(!shown.contains("s3cret"), "{url}: {shown}");
            assert!(shown.contains("***"), "{url}: {shown}");
        }
    }
}
