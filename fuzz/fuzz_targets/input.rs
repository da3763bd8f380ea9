//! Turns fuzzer bytes into a Kafka record as the subscription hands it over:
//! any headers (UTF-8 values only, as the adapter keeps), key and payload.

use std::collections::BTreeMap;

use bytes::Bytes;
use outbox_core::{Position, Record};

/// Splits `data` at 0xFF bytes: key, payload, then header name/value pairs;
/// the first header value is the event id header when the first byte is odd.
pub fn record(data: &[u8]) -> Record {
    let mut parts = data.split(|b| *b == 0xFF);
    let key = parts.next().map(Bytes::copy_from_slice);
    let payload = parts.next().map(Bytes::copy_from_slice);
    let mut headers = BTreeMap::new();
    let with_id = data.first().is_some_and(|b| b % 2 == 1);
    let mut first = true;
    while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            continue;
        };
        let name = if first && with_id {
            outbox_core::HEADER_EVENT_ID.to_string()
        } else {
            name.to_string()
        };
        first = false;
        headers.insert(name, value.to_string());
    }
    Record {
        topic: "fuzz".into(),
        position: Position {
            partition: i32::from(data.len() as u8 % 4),
            offset: data.len() as i64,
        },
        key,
        payload,
        headers,
        timestamp_ms: data.get(1).map(|b| i64::from(*b) * 1_000_000_000),
    }
}
