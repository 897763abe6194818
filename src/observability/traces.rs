//! Trace export: with `[telemetry] otlp_endpoint`, every span (a request, the metadata calls
//! and shard operations it makes, a replication task) goes to an OpenTelemetry collector over
//! OTLP/HTTP (protobuf). Without it no exporter exists and spans cost what logging costs.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

#[derive(Debug, thiserror::Error)]
pub enum TraceExportError {
    /// `endpoint` with any password masked.
    #[error("cannot set up the OTLP exporter for {endpoint}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The exporter's provider (flush it with `shutdown` before the process exits) and the tracer
/// the tracing layer records into.
pub struct TraceExport {
    pub provider: SdkTracerProvider,
    pub tracer: SdkTracer,
}

/// Spans go to `{endpoint}/v1/traces` (OTLP/HTTP's path), in batches from a thread of their own.
pub fn start(endpoint: &str) -> Result<TraceExport, TraceExportError> {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter =
        SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .build()
            .map_err(|source| TraceExportError::Exporter { endpoint: crate::redact::redact_url(endpoint), source })?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("chitram").build())
        .build();
    let tracer = provider.tracer("chitram");
    Ok(TraceExport { provider, tracer })
}
