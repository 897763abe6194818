//! How long-running operator jobs report progress: a trait the jobs call, a terminal progress
//! bar for the CLI, and a silent one for tests and background runs.

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

pub trait Progress: Send + Sync {
    /// The job is about to do `total` units of work (blobs, copies) of `bytes` bytes.
    fn start(&self, what: &str, total: u64, bytes: u64);
    /// `units` more units and `bytes` more bytes are done.
    fn advance(&self, units: u64, bytes: u64);
    fn finish(&self);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: u64, _: u64) {}
    fn advance(&self, _: u64, _: u64) {}
    fn finish(&self) {}
}

/// A progress bar on stderr, with bytes, rate and ETA. Hidden when stderr is not a terminal
/// (indicatif's default), so logs and CI output stay clean.
pub struct TerminalProgress {
    bar: ProgressBar,
    /// Whether the bar counts bytes (a job that copies data) or units.
    by_bytes: AtomicBool,
}

impl TerminalProgress {
    pub fn new() -> Self {
        Self { bar: ProgressBar::hidden(), by_bytes: AtomicBool::new(false) }
    }
}

impl Default for TerminalProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for TerminalProgress {
    fn start(&self, what: &str, total: u64, bytes: u64) {
        self.bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        // Bytes drive the bar (and its ETA) when the job copies data; units otherwise.
        let (length, template) = if bytes > 0 {
            (bytes, "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}")
        } else {
            (total, "{msg} [{bar:40}] {pos}/{len} ({per_sec}) ETA {eta}")
        };
        self.by_bytes.store(bytes > 0, Ordering::Relaxed);
        self.bar.set_length(length);
        self.bar.set_style(ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> "));
        self.bar.set_message(format!("{what} ({total})"));
    }

    fn advance(&self, units: u64, bytes: u64) {
        self.bar.inc(if self.by_bytes.load(Ordering::Relaxed) { bytes } else { units });
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
