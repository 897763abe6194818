//! Logging: `RUST_LOG` filters (default `info`), output to stderr, as text in colour only where
//! colour can be seen (see [`LogColor`]), or as JSON lines (`[telemetry] log_format`); spans
//! exported over OTLP when `[telemetry] otlp_endpoint` is set (`observability/traces.rs`).

use std::io::IsTerminal;

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

use crate::config::LogFormat;
use crate::observability::traces::{self, TraceExportError};

/// When log lines carry ANSI colour codes (`--log-color`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogColor {
    /// Only when stderr is a terminal and `NO_COLOR` is unset or empty (<https://no-color.org>).
    #[default]
    Auto,
    /// Always, even into a file or a pipe, and despite `NO_COLOR`.
    Always,
    /// Never.
    Never,
}

impl LogColor {
    /// Whether to colour, given whether stderr is a terminal and the value of `NO_COLOR`.
    pub fn enabled(self, stderr_is_terminal: bool, no_color: Option<&str>) -> bool {
        match self {
            LogColor::Always => true,
            LogColor::Never => false,
            LogColor::Auto => stderr_is_terminal && no_color.is_none_or(str::is_empty),
        }
    }
}

/// Installs the log output: text (coloured per `color`) or, with `LogFormat::Json`, one JSON
/// object per line whose `spans` carry the request's id (`[telemetry] log_format`); and, with
/// an OTLP endpoint, the export of every span to it. The returned provider flushes the spans
/// still buffered when it is shut down (at the end of `main`).
pub fn init(
    color: LogColor,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
) -> Result<Option<SdkTracerProvider>, TraceExportError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let output = match format {
        LogFormat::Json => {
            fmt::layer().json().with_current_span(false).with_span_list(true).with_writer(std::io::stderr).boxed()
        }
        LogFormat::Text => {
            let no_color = std::env::var("NO_COLOR").ok();
            let ansi = color.enabled(std::io::stderr().is_terminal(), no_color.as_deref());
            fmt::layer().with_ansi(ansi).with_writer(std::io::stderr).boxed()
        }
    };
    let export = otlp_endpoint.map(traces::start).transpose()?;
    let (provider, otel) = match export {
        Some(export) => (Some(export.provider), Some(tracing_opentelemetry::layer().with_tracer(export.tracer))),
        None => (None, None),
    };
    // A second call (tests that build several apps) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(filter).with(output).with(otel).try_init();
    Ok(provider)
}

/// `error: cause: cause of cause`, for logs and operator-facing messages.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::LogColor;

    #[test]
    fn colour_only_on_a_terminal_and_without_no_color() {
        assert!(LogColor::Auto.enabled(true, None));
        assert!(LogColor::Auto.enabled(true, Some("")), "an empty NO_COLOR does not count");
        assert!(!LogColor::Auto.enabled(true, Some("1")));
        assert!(!LogColor::Auto.enabled(false, None), "a file or a pipe gets no colour");
        assert!(LogColor::Always.enabled(false, Some("1")));
        assert!(!LogColor::Never.enabled(true, None));
    }
}
