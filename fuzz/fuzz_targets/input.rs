//! Turns fuzzer bytes into a Kafka record as the subscription hands it over:
//! any headers (UTF-8 values only, as the adapter keeps), key and payload.

use std::collections::BTreeMap;

use bytes::Bytes;
use outbox_core::{Position, Record};

/// Splits `data` at 0xFF bytes: key, payload, then header name/value pairs.
/// The first byte picks well-known names for the first two headers, so that
/// every branch of the id decoding is reached: bit 0 names the first the
/// event id header, bit 1 names it CloudEvents' `ce_id`, bit 2 names the
/// second `ce_source`.
pub fn record(data: &[u8]) -> Record {
    let mut parts = data.split(|b| *b == 0xFF);
    let key = parts.next().map(Bytes::copy_from_slice);
    let payload = parts.next().map(Bytes::copy_from_slice);
    let mut headers = BTreeMap::new();
    let flags = data.first().copied().unwrap_or(0);
    let mut index = 0;
    while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
        let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            continue;
        };
        let name = match index {
            0 if flags & 1 == 1 => outbox_core::HEADER_EVENT_ID,
            0 if flags & 2 == 2 => outbox_core::HEADER_CE_ID,
            1 if flags & 4 == 4 => outbox_core::HEADER_CE_SOURCE,
            _ => name,
        };
        index += 1;
        headers.insert(name.to_string(), value.to_string());
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
