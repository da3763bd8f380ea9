//! The event envelope that travels from the outbox table to the sink.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use uuid::Uuid;

/// Header carrying the event id (UUID, hyphenated text) on the bus.
pub const HEADER_EVENT_ID: &str = "outbox-event-id";
/// Header carrying the creation time of the event (milliseconds since the Unix epoch, decimal text).
pub const HEADER_CREATED_AT_MS: &str = "outbox-created-at-ms";

/// The CloudEvents id of a record in the Kafka protocol binding (binary
/// mode): the event id of a record without [`HEADER_EVENT_ID`] (see
/// [`crate::Record::event_id`]).
pub const HEADER_CE_ID: &str = "ce_id";
/// The CloudEvents source: with [`HEADER_CE_ID`], what identifies an event.
pub const HEADER_CE_SOURCE: &str = "ce_source";

/// Namespace of the event ids made from CloudEvents `(source, id)` pairs
/// whose id is not a UUID.
pub const CLOUDEVENTS_ID_NAMESPACE: Uuid =
    Uuid::from_u128(0x6f0c_2b61_3c1e_4f4e_9a77_3e1b_5d2c_ce01);

/// Header naming the payload's format (set by [`Event::json`]).
pub const HEADER_CONTENT_TYPE: &str = "content-type";

/// [`HEADER_CONTENT_TYPE`] of JSON payloads.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// One event: what a service enqueues, what the relay publishes and what the sink receives.
///
/// The `id` is the identity of the event for its whole life. The relay publishes it in the
/// [`HEADER_EVENT_ID`] header, and sinks use it to recognise a redelivered event.
///
/// ```
/// use outbox_core::Event;
///
/// let event = Event::new("user_events", br#"{"user":"alice"}"#.to_vec())
///     .with_key("alice")
///     .with_header("content-type", "application/json");
/// assert_eq!(event.topic, "user_events");
/// assert_eq!(event.key.as_deref(), Some(&b"alice"[..]));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Unique id of the event. [`Event::new`] uses a time-ordered UUIDv7.
    pub id: Uuid,
    /// Destination topic.
    pub topic: String,
    /// Partitioning key: events with the same key keep their order.
    pub key: Option<Bytes>,
    /// Opaque payload.
    pub payload: Bytes,
    /// Application headers (text). Keys starting with `outbox-` are reserved.
    pub headers: BTreeMap<String, String>,
    /// When the event was created (enqueued).
    pub created_at: SystemTime,
}

impl Event {
    /// A new event with a fresh UUIDv7 id, no key, no headers, created now.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            id: Uuid::now_v7(),
            topic: topic.into(),
            key: None,
            payload: payload.into(),
            headers: BTreeMap::new(),
            created_at: SystemTime::now(),
        }
    }

    /// An event whose payload is `value` as JSON, with the header
    /// `content-type: application/json`; the consumer side reads it back with
    /// [`crate::Record::json`].
    ///
    /// ```
    /// #[derive(serde::Serialize)]
    /// struct Login<'a> { user: &'a str, ok: bool }
    ///
    /// let event = outbox_core::Event::json("logins", &Login { user: "alice", ok: true })?
    ///     .with_key("alice");
    /// assert_eq!(&event.payload[..], br#"{"user":"alice","ok":true}"#);
    /// assert_eq!(event.headers["content-type"], "application/json");
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn json<T: serde::Serialize + ?Sized>(
        topic: impl Into<String>,
        value: &T,
    ) -> Result<Self, serde_json::Error> {
        let payload = serde_json::to_vec(value)?;
        Ok(Self::new(topic, payload).with_header(HEADER_CONTENT_TYPE, CONTENT_TYPE_JSON))
    }

    /// Sets the id, for events whose identity is derived from business data.
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Sets the partitioning key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds one header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the creation time.
    pub fn with_created_at(mut self, created_at: SystemTime) -> Self {
        self.created_at = created_at;
        self
    }

    /// How long ago the event was created, in whole milliseconds (0 for a
    /// creation time in the future): the age the relay's trace lines give.
    pub(crate) fn age_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(self.created_at)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    /// Creation time in milliseconds since the Unix epoch (0 for times before it).
    pub fn created_at_ms(&self) -> i64 {
        system_time_to_ms(self.created_at)
    }
}

/// Milliseconds since the Unix epoch, saturating at 0 and `i64::MAX`.
pub fn system_time_to_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`system_time_to_ms`]; negative values map to the epoch.
pub fn ms_to_system_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_trip() {
        let t = ms_to_system_time(1_700_000_000_123);
        assert_eq!(system_time_to_ms(t), 1_700_000_000_123);
        assert_eq!(system_time_to_ms(ms_to_system_time(-5)), 0);
    }

    #[test]
    fn new_events_have_distinct_ids() {
        let a = Event::new("t", "x");
        let b = Event::new("t", "x");
        assert_ne!(a.id, b.id);
    }
}
