//! The id of the request being served (`x-request-id`), for the code below the HTTP layer.
//!
//! The HTTP layer runs each request inside [`scope`]; the metadata store reads [`current`] when
//! it queues a background task, so the task records which request it came from and the worker
//! that runs it logs that id. A task-local rather than a parameter: every use case and every
//! metadata call on the request path would otherwise carry an id that only the queue records.
//! Work a request hands to `tokio::spawn` leaves the scope (and records no id).

use std::future::Future;

/// Longest request id taken from a client; a longer one is replaced by a generated id.
pub const MAX_LEN: usize = 128;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// Runs `future` as the work of request `id`.
pub async fn scope<F: Future>(id: String, future: F) -> F::Output {
    REQUEST_ID.scope(id, future).await
}

/// The id of the request this code serves, if it serves one.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Whether a client's `x-request-id` may be used as it is: short, and only characters that
/// are safe in a log line and a header (letters, digits, `-`, `_`, `.`, `:`).
pub fn is_acceptable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_id_is_seen_inside_the_scope_only() {
        assert_eq!(current(), None);
        let seen = scope("req-1".to_owned(), async { current() }).await;
        assert_eq!(seen.as_deref(), Some("req-1"));
        assert_eq!(current(), None);
    }

    #[test]
    fn only_short_plain_ids_are_taken_from_clients() {
        assert!(is_acceptable("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert!(is_acceptable("trace:abc.def_1"));
        assert!(!is_acceptable(""));
        assert!(!is_acceptable("a b"));
        assert!(!is_acceptable("line\nbreak"));
        assert!(!is_acceptable(&"x".repeat(MAX_LEN + 1)));
    }
}
