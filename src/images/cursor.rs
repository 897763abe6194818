//! The opaque cursor of the image list: a [`ListPosition`] that clients pass back unchanged.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::DateTime;
use uuid::Uuid;

use crate::metadata::ListPosition;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the cursor is not one this server issued")]
pub struct InvalidCursor;

/// Encodes a position as `base64url("<created_at µs>.<id>")`.
pub fn encode(position: &ListPosition) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{}", position.created_at.timestamp_micros(), position.id.simple()))
}

pub fn decode(cursor: &str) -> Result<ListPosition, InvalidCursor> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| InvalidCursor)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| InvalidCursor)?;
    let (micros, id) = text.split_once('.').ok_or(InvalidCursor)?;
    let micros: i64 = micros.parse().map_err(|_| InvalidCursor)?;
    Ok(ListPosition {
        created_at: DateTime::from_timestamp_micros(micros).ok_or(InvalidCursor)?,
        id: Uuid::try_parse(id).map_err(|_| InvalidCursor)?,
    })
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
}
