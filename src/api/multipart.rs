//! Reading a `multipart/form-data` body without letting its framing cost memory.
//!
//! multer buffers whatever precedes the first boundary and each part's headers until it finds
//! their end, bounded only by the body limit (a gigabyte on a batch). [`FramingGuard`] walks
//! the same framing as the bytes pass through and cuts the body off once the preamble, one
//! part's headers or the number of parts goes over its bound, so hostile framing costs a few
//! kilobytes and gets `INVALID_MULTIPART`.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

/// Bytes accepted before the first boundary (clients send none).
pub const MAX_PREAMBLE: usize = 8 * 1024;
/// Bytes of one part's headers (a `Content-Disposition` with a 255-byte name and a
/// `Content-Type` take a few hundred).
pub const MAX_PART_HEADERS: usize = 16 * 1024;
/// Parts a form may hold beyond the files it is allowed (text fields, say).
pub const EXTRA_PARTS: usize = 16;

/// The bounds of one form.
#[derive(Debug, Clone, Copy)]
pub struct FormLimits {
    /// The whole body, in bytes.
    pub body: u64,
    /// Parts, files or not.
    pub parts: usize,
}

/// Why a body was cut off: sent to the client as `INVALID_MULTIPART`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FramingError(String);

/// Opens the form, or `None` when the request is not `multipart/form-data` with a boundary.
/// Its [`PartOffsets`] tell where each part's content begins as the form is read.
pub fn open_form(
    headers: &HeaderMap,
    body: Body,
    limits: FormLimits,
) -> Option<(multer::Multipart<'static>, PartOffsets)> {
    let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let boundary = multer::parse_boundary(content_type).ok()?;
    let guarded = FramingGuard::new(body.into_data_stream(), &boundary, limits.parts);
    let offsets = guarded.offsets.clone();
    let constraints = multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(limits.body));
    Some((multer::Multipart::with_constraints(guarded, boundary, constraints), offsets))
}

/// Where the content of each part of a form begins, in bytes from the start of the body, as
/// [`FramingGuard`] finds them (a part's entry appears once its headers have been read, so
/// by the time multer yields the part).
#[derive(Debug, Clone)]
pub struct PartOffsets {
    starts: Arc<Mutex<Vec<u64>>>,
    /// `CRLF--boundary--CRLF`, which closes the form after its last part.
    closing_len: u64,
}

impl PartOffsets {
    /// The length of part `index` (0 for the first) if it is the form's last and the form
    /// ends right after it, as every common client sends it, in a body of `body_len` bytes.
    /// A prediction: a reader must check it against the bytes that arrive.
    pub fn last_part_len(&self, index: usize, body_len: u64) -> Option<u64> {
        let start = *self.starts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(index)?;
        body_len.checked_sub(start)?.checked_sub(self.closing_len)
    }

    fn record(&self, start: u64) {
        self.starts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(start);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before the first delimiter.
    Preamble,
    /// Just past a delimiter: `--` closes the form, anything else opens a part.
    AfterDelimiter,
    /// A part's headers, up to the blank line.
    Headers,
    /// A part's content, up to the next delimiter.
    Content,
    /// After the closing delimiter: ignored.
    Epilogue,
}

/// Passes a body through unchanged while checking its multipart framing (RFC 2046 §5.1.1).
pub struct FramingGuard<S> {
    inner: S,
    /// `CRLF--boundary`: the body is scanned as if it began with CRLF, so the first delimiter
    /// looks like every other one.
    delimiter: Vec<u8>,
    stage: Stage,
    /// The unscanned end of the previous chunk (a delimiter or a blank line may straddle two).
    carry: BytesMut,
    /// Bytes of the current preamble or headers seen so far.
    counted: usize,
    parts: usize,
    max_parts: usize,
    failed: bool,
    /// Bytes of the scanned stream (the body after a virtual leading CRLF) before the next chunk.
    seen: u64,
    /// Where the buffer being scanned begins in that stream.
    base: u64,
    offsets: PartOffsets,
}

impl<S> FramingGuard<S> {
    pub fn new(inner: S, boundary: &str, max_parts: usize) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        Self {
            inner,
            delimiter,
            stage: Stage::Preamble,
            carry: BytesMut::from(&b"\r\n"[..]),
            counted: 0,
            parts: 0,
            max_parts,
            failed: false,
            seen: 2,
            base: 0,
            offsets: PartOffsets { starts: Arc::default(), closing_len: (boundary.len() + 8) as u64 },
        }
    }

    /// Scans one more chunk of the body.
    ///
    /// Only the carried tail of the previous chunk and the first few bytes of this one are
    /// copied (where a delimiter or a blank line may straddle the two); the rest is scanned in
    /// place. Copying whole chunks cost a memcpy of every uploaded byte and, under concurrent
    /// large uploads, a chunk-sized buffer each.
    fn scan_chunk(&mut self, chunk: &[u8]) -> Result<(), FramingError> {
        let chunk_start = self.seen;
        self.seen += chunk.len() as u64;
        let mut rest = chunk;
        if !self.carry.is_empty() {
            // Long enough for anything the scan looks for to end inside it.
            let window = rest.len().min(self.delimiter.len() + 4);
            let mut joined = std::mem::take(&mut self.carry);
            self.base = chunk_start - joined.len() as u64;
            joined.extend_from_slice(&rest[..window]);
            let at = self.scan(&joined)?;
            let unscanned = joined.len() - at;
            if window == rest.len() {
                self.carry = joined.split_off(at);
                return Ok(());
            }
            if unscanned > window {
                // Never: the scan leaves fewer bytes unscanned than a delimiter's length. Were
                // it to, the tail would reach back into the carry; scan on from it, copying.
                joined.extend_from_slice(&rest[window..]);
                self.base += at as u64;
                let more = self.scan(&joined[at..])?;
                self.carry = joined.split_off(at + more);
                return Ok(());
            }
            rest = &rest[window - unscanned..];
        }
        self.base = self.seen - rest.len() as u64;
        let at = self.scan(rest)?;
        self.carry = BytesMut::from(&rest[at..]);
        Ok(())
    }

    /// Walks the framing through `data`; returns where the unscanned tail begins (bytes that
    /// may start a delimiter or a blank line, scanned again with the next chunk).
    fn scan(&mut self, data: &[u8]) -> Result<usize, FramingError> {
        let mut at = 0;
        loop {
            match self.stage {
                Stage::Preamble | Stage::Content => match memchr::memmem::find(&data[at..], &self.delimiter) {
                    Some(found) => {
                        self.count_preamble(found)?;
                        at += found + self.delimiter.len();
                        self.stage = Stage::AfterDelimiter;
                    }
                    None => {
                        let keep = (data.len() - at).min(self.delimiter.len() - 1);
                        self.count_preamble(data.len() - at - keep)?;
                        at = data.len() - keep;
                        break;
                    }
                },
                Stage::AfterDelimiter => {
                    if data.len() - at < 2 {
                        break;
                    }
                    if &data[at..at + 2] == b"--" {
                        self.stage = Stage::Epilogue;
                        continue;
                    }
                    self.parts += 1;
                    if self.parts > self.max_parts {
                        return Err(FramingError(format!("the form has more than {} parts", self.max_parts)));
                    }
                    (self.stage, self.counted) = (Stage::Headers, 0);
                }
                Stage::Headers => {
                    let (seen, end) = match memchr::memmem::find(&data[at..], b"\r\n\r\n") {
                        Some(found) => (found, Some(at + found + 4)),
                        None => ((data.len() - at).saturating_sub(3), None),
                    };
                    self.counted += seen;
                    if self.counted > MAX_PART_HEADERS {
                        return Err(FramingError(format!("a part's headers exceed {MAX_PART_HEADERS} bytes")));
                    }
                    match end {
                        Some(end) => {
                            // Less the virtual CRLF the scan started with.
                            self.offsets.record(self.base + end as u64 - 2);
                            (at, self.stage) = (end, Stage::Content);
                        }
                        None => {
                            at += seen;
                            break;
                        }
                    }
                }
                Stage::Epilogue => {
                    at = data.len();
                    break;
                }
            }
        }
        Ok(at)
    }

    fn count_preamble(&mut self, bytes: usize) -> Result<(), FramingError> {
        if self.stage == Stage::Preamble {
            self.counted += bytes;
            if self.counted > MAX_PREAMBLE {
                return Err(FramingError(format!("more than {MAX_PREAMBLE} bytes precede the first boundary")));
            }
        }
        Ok(())
    }
}

impl<S, E> Stream for FramingGuard<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    type Item = Result<Bytes, Box<dyn std::error::Error + Send + Sync>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(chunk))) => match self.scan_chunk(&chunk) {
                Ok(()) => Poll::Ready(Some(Ok(chunk))),
                Err(error) => {
                    self.failed = true;
                    Poll::Ready(Some(Err(Box::new(error))))
                }
            },
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    /// Runs `body`, cut into `chunk`-byte pieces, through a guard; the error, if any.
    fn check(body: &[u8], chunk: usize, max_parts: usize) -> Result<(), String> {
        let mut guard = FramingGuard::new(futures::stream::empty::<Result<Bytes, Infallible>>(), "XyZ", max_parts);
        body.chunks(chunk).try_for_each(|piece| guard.scan_chunk(piece)).map_err(|error| error.to_string())
    }

    fn form(parts: usize, headers: &str, content: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        for i in 0..parts {
            body.extend_from_slice(format!("--XyZ\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n").as_bytes());
            body.extend_from_slice(headers.as_bytes());
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(content);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--XyZ--\r\n");
        body
    }

    #[test]
    fn passes_well_formed_forms_whatever_the_chunking() {
        let content = b"\r\n--XyNot a delimiter\r\n\r\n--X".repeat(1000);
        let body = form(3, "Content-Type: image/png\r\n", &content);
        // 10 to 13 put the end of the straddle window ("\r\n--XyZ" and four bytes) at every
        // offset of a delimiter.
        for chunk in [1, 2, 3, 7, 10, 11, 12, 13, 64, 4096, body.len()] {
            assert_eq!(check(&body, chunk, 3), Ok(()), "chunks of {chunk}");
        }
    }

    #[test]
    fn cuts_off_endless_part_headers() {
        let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\nX-Pad: ".to_vec();
        body.resize(body.len() + MAX_PART_HEADERS + 10, b'a');
        for chunk in [1, 1000, body.len()] {
            assert!(check(&body, chunk, 5).unwrap_err().contains("headers exceed"), "chunks of {chunk}");
        }
        let at_limit = "X-Pad: ".to_owned() + &"a".repeat(MAX_PART_HEADERS - 100) + "\r\n";
        assert_eq!(check(&form(1, &at_limit, b"x"), 100, 1), Ok(()));
    }

    #[test]
    fn cuts_off_a_long_preamble() {
        let mut body = vec![b'p'; MAX_PREAMBLE + 1];
        body.extend_from_slice(&form(1, "", b"x"));
        assert!(check(&body, 512, 5).unwrap_err().contains("precede the first boundary"));
        let mut short = vec![b'p'; 100];
        short.extend_from_slice(&form(1, "", b"x"));
        assert_eq!(check(&short, 512, 5), Ok(()));
    }

    #[test]
    fn cuts_off_too_many_parts() {
        // Counting parts finds every delimiter, wherever the chunks cut it.
        let content = b"\r\n--XyNot a delimiter".repeat(50);
        for chunk in [1, 7, 10, 11, 12, 13, 64] {
            let error = check(&form(6, "", &content), chunk, 5).unwrap_err();
            assert!(error.contains("more than 5 parts"), "chunks of {chunk}: {error}");
            assert_eq!(check(&form(5, "", &content), chunk, 5), Ok(()), "chunks of {chunk}");
        }
    }

    #[test]
    fn finds_where_each_part_begins_and_predicts_the_last_ones_length_whatever_the_chunking() {
        let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"visibility\"\r\n\r\nprivate".to_vec();
        body.extend_from_slice(b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n");
        body.extend_from_slice(b"Content-Type: image/png\r\n\r\n");
        let file_start = body.len() as u64;
        let file = b"\r\n--XyNot a delimiter\r\n\r\n".repeat(40);
        body.extend_from_slice(&file);
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        let visibility_start = body.windows(7).position(|w| w == b"private").unwrap() as u64;
        for chunk in [1, 2, 3, 7, 10, 11, 12, 13, 64, 4096, body.len()] {
            let mut guard = FramingGuard::new(futures::stream::empty::<Result<Bytes, Infallible>>(), "XyZ", 2);
            body.chunks(chunk).try_for_each(|piece| guard.scan_chunk(piece)).unwrap();
            let starts = guard.offsets.starts.lock().unwrap().clone();
            assert_eq!(starts, [visibility_start, file_start], "chunks of {chunk}");
            let predicted = guard.offsets.last_part_len(1, body.len() as u64);
            assert_eq!(predicted, Some(file.len() as u64), "chunks of {chunk}");
        }
    }

    #[test]
    fn ignores_the_epilogue() {
        let mut body = form(1, "", b"x");
        body.extend_from_slice(&vec![b'e'; MAX_PART_HEADERS * 2]);
        assert_eq!(check(&body, 1000, 1), Ok(()));
    }
}
