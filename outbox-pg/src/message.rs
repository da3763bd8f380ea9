//! The table-free outbox: an event written into the WAL as a logical
//! decoding message (`pg_logical_emit_message`) in the caller's transaction,
//! read back by the WAL source.
//!
//! The message's content is a small binary frame, version 1, all integers
//! big-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version (1) |
//! | 16 | event id (UUID) |
//! | 8 | created at, ms since the Unix epoch (i64) |
//! | 4 + n | topic (u32 length, UTF-8) |
//! | 4 + n | key (i32 length, -1 for none) |
//! | 2 | header count (u16) |
//! | (4 + n, 4 + n) × count | header name and value (u32 length, UTF-8 each) |
//! | rest | payload |
//!
//! Binary rather than JSON so a payload travels as it is, without base64.

use std::collections::BTreeMap;

use bytes::Bytes;
use outbox_core::{ms_to_system_time, Event};
use uuid::Uuid;

/// The prefix [`Outbox::emit`](crate::Outbox::emit) writes its messages
/// under, and the WAL source reads by default. Messages under other
/// prefixes are not events of this pipeline and are skipped.
pub const DEFAULT_MESSAGE_PREFIX: &str = "outbox";

const VERSION: u8 = 1;

/// Why a message's content is not an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("outbox message at {at}: {reason}")]
pub struct MessageError {
    /// Which part was being read.
    pub at: &'static str,
    /// What was wrong with it.
    pub reason: String,
}

fn bad(at: &'static str, reason: impl Into<String>) -> MessageError {
    MessageError {
        at,
        reason: reason.into(),
    }
}

/// The content of the logical decoding message that carries `event`.
pub fn encode_message(event: &Event) -> Result<Vec<u8>, MessageError> {
    let mut out = Vec::with_capacity(64 + event.topic.len() + event.payload.len());
    out.push(VERSION);
    out.extend_from_slice(event.id.as_bytes());
    out.extend_from_slice(&event.created_at_ms().to_be_bytes());
    put_text(&mut out, "topic", event.topic.as_bytes())?;
    match &event.key {
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(key) => {
            let len = i32::try_from(key.len()).map_err(|_| bad("key", "longer than 2 GiB"))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(key);
        }
    }
    let count = u16::try_from(event.headers.len())
        .map_err(|_| bad("headers", "more than 65,535 headers"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in &event.headers {
        put_text(&mut out, "header name", name.as_bytes())?;
        put_text(&mut out, "header value", value.as_bytes())?;
    }
    out.extend_from_slice(&event.payload);
    Ok(out)
}

fn put_text(out: &mut Vec<u8>, at: &'static str, text: &[u8]) -> Result<(), MessageError> {
    let len = u32::try_from(text.len()).map_err(|_| bad(at, "longer than 4 GiB"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text);
    Ok(())
}

/// The event a message's content carries (the inverse of [`encode_message`]).
pub fn decode_message(content: &Bytes) -> Result<Event, MessageError> {
    let mut reader = Reader {
        data: content,
        at: 0,
    };
    let version = reader.take("version", 1)?[0];
    if version != VERSION {
        return Err(bad(
            "version",
            format!("version {version} is not known to this relay (it reads {VERSION}): upgrade the relay"),
        ));
    }
    let id = Uuid::from_slice(reader.take("event id", 16)?)
        .map_err(|e| bad("event id", e.to_string()))?;
    let created_ms = i64::from_be_bytes(reader.array("created at")?);
    let topic = reader.text("topic")?;
    let key_len = i32::from_be_bytes(reader.array("key")?);
    let key = match usize::try_from(key_len) {
        Ok(len) => Some(reader.bytes("key", len)?),
        Err(_) if key_len == -1 => None,
        Err(_) => return Err(bad("key", format!("length {key_len}"))),
    };
    let count = u16::from_be_bytes(reader.array("header count")?);
    let mut headers = BTreeMap::new();
    for _ in 0..count {
        let name = reader.text("header name")?;
        let value = reader.text("header value")?;
        headers.insert(name, value);
    }
    let payload = content.slice(reader.at..);
    Ok(Event {
        id,
        topic,
        key,
        payload,
        headers,
        created_at: ms_to_system_time(created_ms),
    })
}

struct Reader<'a> {
    data: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, at: &'static str, len: usize) -> Result<&[u8], MessageError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.data.len())
            .ok_or_else(|| {
                bad(
                    at,
                    format!(
                        "truncated: {len} bytes announced, {} left",
                        self.data.len() - self.at
                    ),
                )
            })?;
        let slice = &self.data[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, at: &'static str) -> Result<[u8; N], MessageError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(at, N)?);
        Ok(out)
    }

    fn bytes(&mut self, at: &'static str, len: usize) -> Result<Bytes, MessageError> {
        let start = self.at;
        self.take(at, len)?;
        Ok(self.data.slice(start..self.at))
    }

    fn text(&mut self, at: &'static str) -> Result<String, MessageError> {
        let len = u32::from_be_bytes(self.array(at)?) as usize;
        let raw = self.take(at, len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| bad(at, "not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        Event::new("orders", &b"{\"n\":1}"[..])
            .with_key("alice")
            .with_header("content-type", "application/json")
            .with_header("trace", "")
            .with_created_at(ms_to_system_time(1_700_000_000_123))
    }

    #[test]
    fn an_event_survives_the_round_trip() -> Result<(), MessageError> {
        let event = sample();
        let back = decode_message(&Bytes::from(encode_message(&event)?))?;
        assert_eq!(back, event);
        let keyless = Event::new("t", Bytes::new()).with_created_at(ms_to_system_time(5));
        assert_eq!(
            decode_message(&Bytes::from(encode_message(&keyless)?))?,
            keyless
        );
        Ok(())
    }

    #[test]
    fn an_empty_key_is_not_a_missing_key() -> Result<(), MessageError> {
        let event = sample().with_key("");
        let back = decode_message(&Bytes::from(encode_message(&event)?))?;
        assert_eq!(back.key.as_deref(), Some(&b""[..]));
        Ok(())
    }

    #[test]
    fn every_truncation_is_an_error_that_names_the_field() -> Result<(), MessageError> {
        let full = encode_message(&sample().with_key("k"))?;
        let payload_start = full.len() - 7;
        for cut in 0..payload_start {
            let err = decode_message(&Bytes::copy_from_slice(&full[..cut]));
            assert!(err.is_err(), "a frame cut at byte {cut} decoded");
        }
        Ok(())
    }

    #[test]
    fn an_unknown_version_says_to_upgrade() -> Result<(), MessageError> {
        let mut frame = encode_message(&sample())?;
        frame[0] = 9;
        let err = decode_message(&Bytes::from(frame))
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("upgrade the relay")));
        Ok(())
    }
}
