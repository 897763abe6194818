//! The opaque cursor of the image list: a [`ListPosition`] that clients pass back unchanged.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Datelike, Utc};
use uuid::Uuid;

use crate::metadata::ListPosition;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the cursor is not one this server issued")]
pub struct InvalidCursor;

/// Encodes a position as `base64url("<created_at µs>.<id>")`.
pub fn encode(position: &ListPosition) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{}", position.created_at.timestamp_micros(), position.id.simple()))
}

/// Years a cursor may name. Rows are stamped with the server's clock, so no issued cursor is
/// outside them, and both databases hold every instant inside them (Postgres refuses
/// timestamps past year 294276, chrono's range is wider still).
const YEARS: std::ops::RangeInclusive<i32> = 1970..=9999;

pub fn decode(cursor: &str) -> Result<ListPosition, InvalidCursor> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| InvalidCursor)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| InvalidCursor)?;
    let (micros, id) = text.split_once('.').ok_or(InvalidCursor)?;
    let micros: i64 = micros.parse().map_err(|_| InvalidCursor)?;
    let created_at: DateTime<Utc> = DateTime::from_timestamp_micros(micros).ok_or(InvalidCursor)?;
    if !YEARS.contains(&created_at.year()) {
        return Err(InvalidCursor);
    }
    Ok(ListPosition { created_at, id: Uuid::try_parse(id).map_err(|_| InvalidCursor)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let position = ListPosition {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(decode(&encode(&position)), Ok(position));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "!!!", "bm90LWEtY3Vyc29y", &URL_SAFE_NO_PAD.encode("12.not-a-uuid")] {
            assert_eq!(decode(bad), Err(InvalidCursor), "{bad:?}");
        }
    }

    #[test]
    fn rejects_instants_no_database_holds() {
        let id = Uuid::now_v7().simple();
        for micros in [i64::MIN, -62_135_596_800_000_001, -1, 253_402_300_800_000_000, i64::MAX] {
            let cursor = URL_SAFE_NO_PAD.encode(format!("{micros}.{id}"));
            assert_eq!(decode(&cursor), Err(InvalidCursor), "{micros}");
        }
    }
}
