//! What an operator sees of a running instance besides its answers: Prometheus metrics
//! (`names` lists every family, `recorder` installs the exporter, `refresher` keeps the figures
//! read from the metadata fresh, `stages` times each stage of storing bytes), and the request
//! id that ties a request's log lines, and the background tasks it queued, together
//! (`request_id`).

pub mod names;
pub mod recorder;
pub mod refresher;
pub mod request_id;
pub mod stages;
pub mod traces;
