//! A shard that is a bucket on an S3-compatible server (MinIO in production).
//!
//! Objects are stored flat under their blob key. Uploads send a known length from memory or
//! from the spooled file; downloads stream the response body without buffering it.
//!
//! Retry policy: **the SDK does not retry.** The router already fails over to the next shard
//! and, from the replication issue on, background work retries with backoff; SDK retries on top
//! would multiply the attempts and turn a dead shard into seconds of delay per request. A shard
//! that refuses connections is skipped at once; one that does not answer costs at most the
//! connect timeout (1 s by default).

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_runtime::auth::PayloadSigningOverride;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    RuntimeComponents, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use futures::StreamExt;

use super::{
    BlobBody, BlobReader, BlobStore, BodyFeed, LABEL_NAME, ShardLabel, StorageError, StorageResult, StoredObject,
};
use crate::blob::BlobKey;
use crate::redact::redact_url;

/// How to reach one bucket. Its `Debug` masks the secret key (see below).
#[derive(Clone, PartialEq)]
pub struct S3Settings {
    /// `http://host:9000` or `https://…`; `None` for AWS itself.
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    /// Static credentials; `None` uses the standard AWS chain (environment, profile).
    pub credentials: Option<(String, String)>,
    /// Create the bucket at start-up when it is missing.
    pub create_bucket: bool,
    pub connect_timeout: Duration,
    /// Bound on one whole operation (up to the response headers for a download).
    pub operation_timeout: Duration,
}

/// Written out so that no `{:?}` of a shard, in a log line or an error, can show the secret key
/// (or a password in the endpoint).
impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint.as_deref().map(redact_url))
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.credentials.as_ref().map(|(id, _)| id))
            .field("secret_access_key", &self.credentials.as_ref().map(|_| crate::redact::MASK))
            .field("create_bucket", &self.create_bucket)
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    endpoint: String,
}

impl S3Store {
    /// Builds the client. No request is made; see [`S3Store::prepare_bucket`].
    pub async fn connect(settings: &S3Settings) -> Self {
        let mut config = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            // MinIO and most S3-compatible servers address buckets by path, not by host name.
            .force_path_style(true)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(settings.connect_timeout)
                    .operation_timeout(settings.operation_timeout)
                    .build(),
            )
            // The SDK's default CRC checksums on every request are rejected or mis-stored by
            // many S3-compatible servers; Chitram verifies SHA-256 itself.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // A download is paced by the HTTP client reading it; a slow reader is not a stall.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        config = match &settings.credentials {
            Some((key_id, secret)) => {
                config.credentials_provider(Credentials::new(key_id, secret, None, None, "chitram-config"))
            }
            None => {
                let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                    .region(Region::new(settings.region.clone()))
                    .build()
                    .await;
                config.credentials_provider(chain)
            }
        };
        Self {
            client: Client::from_conf(config.build()),
            bucket: settings.bucket.clone(),
            // Shown in logs, errors and /health: an endpoint may carry credentials.
            endpoint: settings.endpoint.as_deref().map_or_else(|| "aws".to_owned(), redact_url),
        }
    }

    /// Checks the bucket and creates it if it is missing and `create` allows. A shard that
    /// cannot be reached is not an error here: the service starts, and health reports it.
    pub async fn prepare_bucket(&self, create: bool) -> StorageResult<()> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(error) if create && error.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                self.create_bucket().await
            }
            Err(error) => Err(self.classify(error, None, "checking the bucket")),
        }
    }

    async fn create_bucket(&self) -> StorageResult<()> {
        let mut request = self.client.create_bucket().bucket(&self.bucket);
        let region = self.client.config().region().map(|r| r.as_ref().to_owned()).unwrap_or_default();
        // us-east-1 is the one region that must not be named as a location constraint.
        if region != "us-east-1" && !region.is_empty() {
            let location = CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(region.as_str()))
                .build();
            request = request.create_bucket_configuration(location);
        }
        match request.send().await {
            Ok(_) => {
                tracing::info!(bucket = %self.bucket, endpoint = %self.endpoint, "created the bucket");
                Ok(())
            }
            Err(error) if error.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err(error) => Err(self.classify(error, None, "creating the bucket")),
        }
    }

    /// Sorts an SDK error for the router (see [`StorageError`]).
    fn classify<E>(
        &self,
        error: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
        key: Option<&BlobKey>,
        doing: &str,
    ) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let place = format!("{doing} in bucket {} at {}", self.bucket, self.endpoint);
        let status = error.raw_response().map(|response| response.status().as_u16());
        let code = error.code().map(str::to_owned);
        match (&error, status) {
            (SdkError::TimeoutError(_) | SdkError::DispatchFailure(_), _) => {
                StorageError::unavailable(format!("{place}: no connection"), error)
            }
            (_, Some(404)) if code.as_deref() == Some("NoSuchBucket") => StorageError::Unavailable {
                reason: format!("{place}: the bucket does not exist (create it, or set create_bucket = true)"),
                source: Some(Box::new(error)),
            },
            (_, Some(404)) if key.is_some() => StorageError::NotFound(key.cloned().expect("checked")),
            (_, Some(401 | 403)) => StorageError::AccessDenied(format!(
                "{place}: {} (check the shard's credentials)",
                code.unwrap_or_else(|| "AccessDenied".to_owned())
            )),
            (_, Some(status)) if status >= 500 => {
                StorageError::unavailable(format!("{place}: server error {status}"), error)
            }
            _ => StorageError::other(place, error),
        }
    }
}

/// Signs a PUT with the body's SHA-256, which is the blob's key: the SDK need not hash a body
/// held in memory a second time (it would), and the server checks every byte it receives
/// against the hash (a spooled body would otherwise go as `UNSIGNED-PAYLOAD`, unchecked).
/// An interceptor, because it is the SDK's public way to reach the signer's settings.
#[derive(Debug)]
struct PayloadHash(String);

impl Intercept for PayloadHash {
    fn name(&self) -> &'static str {
        "ChitramPayloadHash"
    }

    fn modify_before_signing(
        &self,
        _request: &mut BeforeTransmitInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        settings: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        settings.interceptor_state().store_put(PayloadSigningOverride::Precomputed(self.0.clone()));
        Ok(())
    }
}

/// A [`BodyFeed`] as an HTTP request body. A feed that fails or ends early fails the body, and
/// hyper then drops the connection with the `Content-Length` unmet: the server stores nothing.
struct FeedBody {
    feed: BodyFeed,
    /// Bytes not yet passed on, for the size hint.
    remaining: u64,
}

impl http_body::Body for FeedBody {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = self.feed.poll_next_chunk(cx);
        if let std::task::Poll::Ready(Some(Ok(chunk))) = &polled {
            self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
        }
        polled.map(|chunk| chunk.map(|chunk| chunk.map(http_body::Frame::data)))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

impl S3Store {
    /// PUTs `len` bytes under the key, signed with the key (the body's SHA-256).
    async fn put(&self, key: &BlobKey, len: u64, body: ByteStream) -> StorageResult<()> {
        let length = i64::try_from(len).expect("bodies are far below 2^63 bytes");
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .content_length(length)
            .body(body)
            .customize()
            .interceptor(PayloadHash(key.as_str().to_owned()))
            .send()
            .await
            .map_err(|error| self.classify(error, Some(key), "writing an object"))?;
        Ok(())
    }
}

#[async_trait]
impl BlobStore for S3Store {
    fn describe(&self) -> String {
        format!("s3:{}/{}", self.endpoint, self.bucket)
    }

    async fn write_blob(&self, key: &BlobKey, body: &BlobBody) -> StorageResult<()> {
        let stream = match body {
            BlobBody::Bytes(bytes) => ByteStream::from(bytes.clone()),
            BlobBody::File { path, len } => ByteStream::read_from()
                .path(path)
                .length(Length::Exact(*len))
                .build()
                .await
                .map_err(|error| StorageError::other(format!("reading the spooled body of {key}"), error))?,
        };
        self.put(key, body.len(), stream).await
    }

    async fn write_blob_feed(&self, key: &BlobKey, feed: BodyFeed) -> StorageResult<()> {
        // Not retried by the SDK (a feed cannot be replayed), which is our policy anyway.
        let len = feed.len;
        self.put(key, len, ByteStream::from_body_1_x(FeedBody { feed, remaining: len })).await
    }

    async fn read_blob(&self, key: &BlobKey) -> StorageResult<BlobReader> {
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .send()
            .await
            .map_err(|error| self.classify(error, Some(key), "reading an object"))?;
        let len = output.content_length().and_then(|len| u64::try_from(len).ok()).unwrap_or_default();
        let stream = futures::stream::unfold(output.body, |mut body| async move {
            match body.try_next().await {
                Ok(Some(chunk)) => Some((Ok(chunk), body)),
                Ok(None) => None,
                Err(error) => Some((Err(std::io::Error::other(error)), body)),
            }
        });
        Ok(BlobReader { len, stream: stream.boxed() })
    }

    async fn fetch_blob_len(&self, key: &BlobKey) -> StorageResult<u64> {
        let output = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .send()
            .await
            .map_err(|error| self.classify(error, Some(key), "inspecting an object"))?;
        Ok(output.content_length().and_then(|len| u64::try_from(len).ok()).unwrap_or_default())
    }

    async fn delete_blob(&self, key: &BlobKey) -> StorageResult<()> {
        // S3 answers 204 whether or not the object existed.
        match self.client.delete_object().bucket(&self.bucket).key(key.as_str()).send().await {
            Ok(_) => Ok(()),
            Err(error) => match self.classify(error, Some(key), "deleting an object") {
                StorageError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn list_blobs(&self, after: Option<&BlobKey>, limit: usize) -> StorageResult<Vec<StoredObject>> {
        let mut found = Vec::new();
        let mut start_after = after.map(|key| key.as_str().to_owned());
        // A page may hold objects that are not blobs; keep asking until `limit` or the end.
        while found.len() < limit {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .set_start_after(start_after.clone())
                .max_keys(i32::try_from(limit - found.len()).unwrap_or(1000).min(1000))
                .send()
                .await
                .map_err(|error| self.classify(error, None, "listing objects"))?;
            let objects = page.contents();
            for object in objects {
                let Some(Ok(key)) = object.key().map(BlobKey::parse) else { continue };
                let len = object.size().and_then(|size| u64::try_from(size).ok()).unwrap_or_default();
                let modified = object
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                found.push(StoredObject { key, len, modified });
            }
            match (page.is_truncated(), objects.last().and_then(|object| object.key())) {
                (Some(true), Some(last)) => start_after = Some(last.to_owned()),
                _ => break,
            }
        }
        found.truncate(limit);
        Ok(found)
    }

    async fn read_label(&self) -> StorageResult<Option<ShardLabel>> {
        let output = match self.client.get_object().bucket(&self.bucket).key(LABEL_NAME).send().await {
            Ok(output) => output,
            Err(error) => {
                // A missing key answers 404 NoSuchKey; a missing bucket is classified apart.
                let status = error.raw_response().map(|response| response.status().as_u16());
                if status == Some(404) && error.code() != Some("NoSuchBucket") {
                    return Ok(None);
                }
                return Err(self.classify(error, None, "reading the shard label"));
            }
        };
        let bytes = output
            .body
            .collect()
            .await
            .map_err(|error| StorageError::other(format!("reading the shard label of bucket {}", self.bucket), error))?
            .into_bytes();
        serde_json::from_slice(&bytes).map(Some).map_err(|error| {
            StorageError::other(format!("the shard label of bucket {} is not valid", self.bucket), error)
        })
    }

    async fn write_label(&self, label: &ShardLabel) -> StorageResult<()> {
        let text =
            serde_json::to_vec_pretty(label).map_err(|error| StorageError::other("encoding a shard label", error))?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(LABEL_NAME)
            .content_type("application/json")
            .body(ByteStream::from(text))
            .send()
            .await
            .map_err(|error| self.classify(error, None, "writing the shard label"))?;
        Ok(())
    }

    async fn check_health(&self) -> StorageResult<()> {
        self.client.head_bucket().bucket(&self.bucket).send().await.map(drop).map_err(|error| {
            match error.raw_response().map(|r| r.status().as_u16()) {
                // HEAD responses carry no error code: a 404 here means the bucket is missing.
                Some(404) => StorageError::Unavailable {
                    reason: format!(
                        "bucket {} does not exist at {} (create it, or set create_bucket = true)",
                        self.bucket, self.endpoint
                    ),
                    source: None,
                },
                _ => self.classify(error, None, "checking the bucket"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_neither_the_secret_key_nor_an_endpoint_password() {
        let settings = S3Settings {
            endpoint: Some("http://minio:hunter2@minio:9000".into()),
            bucket: "chitram".into(),
            region: "us-east-1".into(),
            credentials: Some(("chitram".into(), "minio-secret-key".into())),
            create_bucket: true,
            connect_timeout: Duration::from_secs(1),
            operation_timeout: Duration::from_secs(60),
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("minio-secret-key") && !shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("chitram") && shown.contains("***"), "{shown}");
    }
}
