//! Logging: `RUST_LOG` filters (default `info`), output to stderr, as text in colour only where
//! colour can be seen (see [`LogColor`]), or as JSON lines (`[telemetry] log_format`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

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
/// object per line whose `spans` carry the request's id (`[telemetry] log_format`).
pub fn init(color: LogColor, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second call (tests that build several apps) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(false).with_span_list(true).try_init(),
        LogFormat::Text => {
            let no_color = std::env::var("NO_COLOR").ok();
            builder.with_ansi(color.enabled(std::io::stderr().is_terminal(), no_color.as_deref())).try_init()
        }
    };
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
