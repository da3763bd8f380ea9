//! The message bus between relay and consumer (Kafka).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use uuid::Uuid;

use crate::event::{
    ms_to_system_time, CLOUDEVENTS_ID_NAMESPACE, HEADER_CE_ID, HEADER_CE_SOURCE,
    HEADER_CREATED_AT_MS, HEADER_EVENT_ID,
};
use crate::{Event, Result};

/// Where a message sits on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    /// Partition of the topic.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
}

/// The broker's answer for one published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The broker durably acknowledged the event at this position.
    Acknowledged(Position),
    /// Not acknowledged, for a reason that may pass (timeout, broker down): keep it pending.
    Retryable(String),
    /// The broker can never take this event (too large, invalid): dead-letter it.
    Rejected(String),
}

impl Delivery {
    /// Whether the broker acknowledged the event.
    pub fn is_acknowledged(&self) -> bool {
        matches!(self, Delivery::Acknowledged(_))
    }
}

/// Publishes events and reports, per event, what the broker said.
///
/// **Cancellation.** The [`Relay`](crate::Relay) never drops a `publish`
/// it started: a shutdown waits for the broker's answers. A process that
/// dies mid-publish leaves its claim unacknowledged, so the events are
/// published again (duplicates the sink recognises, never a loss).
#[async_trait]
pub trait Bus: Send + Sync {
    /// Publishes `events` in order and waits for the broker's answer on each.
    ///
    /// The result has one [`Delivery`] per event, in the same order. Events of
    /// one key are published in the order given, and an event that is not
    /// taken (a retryable answer) leaves no later event of its key taken:
    /// the acknowledged events of a key are the first ones, apart from events
    /// rejected for good (the relay counts any other answer as a gap in the
    /// key's order, see [`keys_with_order_gaps`](crate::keys_with_order_gaps)).
    /// `Err` means the bus itself is unusable (for example a fatal producer
    /// error); no event of the batch may be considered acknowledged then.
    async fn publish(&self, events: &[Event]) -> Result<Vec<Delivery>>;

    /// Publishes a batch that grows while it is in flight: `first`, then
    /// each part received from `more`, as one ordered stream (on every
    /// partition, a later part's events follow the earlier parts'), and
    /// returns the answers for all of them, in that order, once `more` is
    /// closed and every event was answered. The same promise as
    /// [`Bus::publish`] holds over the whole stream: an event not taken
    /// leaves no later event of its key taken.
    ///
    /// The default publishes the parts one after the other: once a part
    /// is answered, every part received meanwhile goes out together as the
    /// next one, so an event waits at most for the publish in flight and
    /// its own, as a producer with one request in flight per partition
    /// makes it wait. The events of a key that failed in an earlier part
    /// are not published (they are answered [`Delivery::Retryable`]). The
    /// Kafka bus keeps this default on purpose: librdkafka's idempotent
    /// producer sends one request per partition at a time, and messages
    /// handed to it while one is in flight keep its broker thread polling in
    /// a loop until the answer (measured in `docs/performance.md`).
    async fn publish_growing(
        &self,
        first: &[Event],
        mut more: tokio::sync::mpsc::Receiver<Vec<Event>>,
    ) -> Result<Vec<Delivery>> {
        let mut deliveries = self.publish(first).await?;
        let mut failed = crate::key_order::retryable_keys(first, &deliveries);
        while let Some(mut part) = more.recv().await {
            while let Ok(next) = more.try_recv() {
                part.extend(next);
            }
            let now: Vec<usize> = (0..part.len())
                .filter(|&i| !crate::key_order::key_in(&failed, &part[i]))
                .collect();
            let to_publish: Vec<Event> = now.iter().map(|&i| part[i].clone()).collect();
            let started = std::time::Instant::now();
            let mut answers = self.publish(&to_publish).await?.into_iter();
            tracing::trace!(
                part_len = to_publish.len(),
                publish_ms = started.elapsed().as_millis() as u64,
                oldest_age_at_answer_ms = to_publish.first().map(Event::age_ms).unwrap_or(0),
                newest_age_at_answer_ms = to_publish.last().map(Event::age_ms).unwrap_or(0),
                "part of a growing batch answered"
            );
            let mut part_deliveries: Vec<Delivery> = (0..part.len())
                .map(|_| {
                    Delivery::Retryable(
                        "held back unpublished: an earlier event of the same key was not taken"
                            .into(),
                    )
                })
                .collect();
            for index in now {
                part_deliveries[index] = answers
                    .next()
                    .unwrap_or_else(|| Delivery::Retryable("the bus gave no answer".into()));
            }
            failed.extend(crate::key_order::retryable_keys(&part, &part_deliveries));
            deliveries.extend(part_deliveries);
        }
        Ok(deliveries)
    }
}

/// One message read from the bus, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Topic it was read from.
    pub topic: String,
    /// Where it sits.
    pub position: Position,
    /// Message key.
    pub key: Option<Bytes>,
    /// Message value; `None` for a tombstone.
    pub payload: Option<Bytes>,
    /// Headers whose values are valid UTF-8; others are dropped by the bus adapter.
    pub headers: BTreeMap<String, String>,
    /// Broker or producer timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
}

/// Why a [`Record`] is not a valid outbox event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The event id header is absent.
    #[error("message has neither an {HEADER_EVENT_ID} nor a {HEADER_CE_ID} header")]
    MissingEventId,
    /// The event id header is not a UUID.
    #[error("header {HEADER_EVENT_ID} is not a uuid: {0:?}")]
    InvalidEventId(String),
    /// The message has no value.
    #[error("message has no payload")]
    MissingPayload,
    /// The payload is not the JSON of the expected type.
    #[error("payload is not the expected JSON: {0}")]
    InvalidJson(String),
}

impl Record {
    /// The event id carried in the [`HEADER_EVENT_ID`] header; for a
    /// record without one, published by a CloudEvents producer (Kafka
    /// protocol binding, binary mode), its `ce_id` when that is a UUID,
    /// else a UUIDv5 of its `ce_source` and `ce_id` (which together
    /// identify a CloudEvent), so that a copy sent again has the same id.
    ///
    /// ```
    /// use outbox_core::{Position, Record};
    ///
    /// let record = |headers: &[(&str, &str)]| Record {
    ///     topic: "orders".into(),
    ///     position: Position { partition: 0, offset: 0 },
    ///     key: None,
    ///     payload: None,
    ///     headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    ///     timestamp_ms: None,
    /// };
    /// let a = record(&[("ce_source", "/shop"), ("ce_id", "A-1")]).event_id()?;
    /// assert_eq!(a, record(&[("ce_source", "/shop"), ("ce_id", "A-1")]).event_id()?);
    /// assert_ne!(a, record(&[("ce_source", "/other"), ("ce_id", "A-1")]).event_id()?);
    /// # Ok::<(), outbox_core::DecodeError>(())
    /// ```
    pub fn event_id(&self) -> std::result::Result<Uuid, DecodeError> {
        if let Some(raw) = self.headers.get(HEADER_EVENT_ID) {
            return Uuid::parse_str(raw).map_err(|_| DecodeError::InvalidEventId(raw.clone()));
        }
        let ce_id = self
            .headers
            .get(HEADER_CE_ID)
            .filter(|id| !id.is_empty())
            .ok_or(DecodeError::MissingEventId)?;
        if let Ok(id) = Uuid::parse_str(ce_id) {
            return Ok(id);
        }
        let source = self
            .headers
            .get(HEADER_CE_SOURCE)
            .map_or("", String::as_str);
        // Length-prefixed, so that no two (source, id) pairs make one name.
        let name = format!("{}:{source}{ce_id}", source.len());
        Ok(Uuid::new_v5(&CLOUDEVENTS_ID_NAMESPACE, name.as_bytes()))
    }

    /// The payload decoded from JSON (see [`crate::Event::json`]). A sink's
    /// mapper turns the error into a dead letter with this reason.
    ///
    /// ```
    /// use outbox_core::{Position, Record};
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Login { user: String }
    ///
    /// let record = Record {
    ///     topic: "logins".into(),
    ///     position: Position { partition: 0, offset: 7 },
    ///     key: None,
    ///     payload: Some(bytes::Bytes::from_static(br#"{"user":"alice"}"#)),
    ///     headers: Default::default(),
    ///     timestamp_ms: None,
    /// };
    /// let login: Login = record.json()?;
    /// assert_eq!(login.user, "alice");
    /// # Ok::<(), outbox_core::DecodeError>(())
    /// ```
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> std::result::Result<T, DecodeError> {
        let payload = self.payload.as_deref().ok_or(DecodeError::MissingPayload)?;
        serde_json::from_slice(payload).map_err(|e| DecodeError::InvalidJson(e.to_string()))
    }

    /// Rebuilds the [`Event`] the relay published.
    ///
    /// Reserved `outbox-` headers are removed from [`Event::headers`]. The
    /// creation time falls back to the message timestamp.
    pub fn to_event(&self) -> std::result::Result<Event, DecodeError> {
        let id = self.event_id()?;
        let payload = self.payload.clone().ok_or(DecodeError::MissingPayload)?;
        let created_ms = self
            .headers
            .get(HEADER_CREATED_AT_MS)
            .and_then(|v| v.parse::<i64>().ok())
            .or(self.timestamp_ms)
            .unwrap_or(0);
        let headers = self
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with("outbox-"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Event {
            id,
            topic: self.topic.clone(),
            key: self.key.clone(),
            payload,
            headers,
            created_at: ms_to_system_time(created_ms),
        })
    }
}

/// Positions to commit: for each (topic, partition), the offset of the
/// next record to read (everything before it was durably handled).
///
/// ```
/// use outbox_core::Checkpoint;
///
/// let mut checkpoint = Checkpoint::new();
/// checkpoint.advance("orders", 0, 10);
/// checkpoint.advance("orders", 0, 7); // never moves back
/// assert_eq!(checkpoint.next_offset("orders", 0), Some(10));
/// assert_eq!(checkpoint.iter().collect::<Vec<_>>(), [("orders", 0, 10)]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint(BTreeMap<(String, i32), i64>);

impl Checkpoint {
    /// No position.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything of `topic`'s `partition` before `next` was handled; a
    /// lower `next` than the one already set changes nothing.
    pub fn advance(&mut self, topic: &str, partition: i32, next: i64) {
        let entry = self.0.entry((topic.to_string(), partition)).or_insert(next);
        *entry = (*entry).max(next);
    }

    /// Where `topic`'s `partition` continues, if set.
    pub fn next_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.0.get(&(topic.to_string(), partition)).copied()
    }

    /// `(topic, partition, next offset)`, by topic then partition.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i32, i64)> + '_ {
        self.0
            .iter()
            .map(|((topic, partition), next)| (topic.as_str(), *partition, *next))
    }

    /// Whether no position is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes every position of `later` (a later commit replaces an earlier
    /// one, as a broker's committed offsets do).
    pub fn replace_with(&mut self, later: &Checkpoint) {
        self.0
            .extend(later.0.iter().map(|(key, next)| (key.clone(), *next)));
    }
}

impl<T: Into<String>> FromIterator<(T, i32, i64)> for Checkpoint {
    /// Positions `(topic, partition, next offset)`, each advanced in turn.
    fn from_iter<I: IntoIterator<Item = (T, i32, i64)>>(positions: I) -> Self {
        let mut checkpoint = Checkpoint::new();
        for (topic, partition, next) in positions {
            checkpoint.advance(&topic.into(), partition, next);
        }
        checkpoint
    }
}

/// A consumer of the bus whose positions move only when told.
///
/// **Cancellation.** [`Consume`](crate::Consume) drops the future of
/// [`Subscription::poll_batch`] at shutdown (inside `select!`) and then
/// ends without committing: a dropped poll may lose the records it had
/// taken from its buffers, but never commits or skips a position, so they
/// are read again by the next run. `commit` and `rewind` run to completion.
#[async_trait]
pub trait Subscription: Send {
    /// Waits up to `max_wait` for messages and returns at most `max_records` of
    /// them (possibly none), in partition order.
    async fn poll_batch(&mut self, max_records: usize, max_wait: Duration) -> Result<Vec<Record>>;

    /// Records that everything before these positions was durably handled.
    async fn commit(&mut self, checkpoint: &Checkpoint) -> Result<()>;

    /// A number that changes whenever the set of partitions this
    /// subscription reads changed (or may have: a new grant), so the
    /// consumer loop knows a partition may have had another writer since it
    /// last wrote it. The default, for a subscription whose partitions never
    /// move, never changes.
    fn generation(&self) -> u64 {
        0
    }

    /// Whether the consumer loop may poll the next batch while the sink is
    /// still writing the previous one ([`crate::Consume`] then overlaps the
    /// two). Only safe where a poll never moves a partition to another
    /// reader: a subscription whose poll serves a rebalance or applies a new
    /// grant would let the next owner start on a partition whose batch is
    /// still being written here. The default is `false`.
    fn polls_may_overlap_writes(&self) -> bool {
        false
    }

    /// Forgets what was read and not committed: the next poll starts each
    /// partition again from its committed position. Called after a batch
    /// was abandoned uncommitted (its write fenced off by an expired lease).
    async fn rewind(&mut self) -> Result<()>;

    /// From now on reads only the partitions `ownership` grants, and reports
    /// on it the set it switched to once the batch in hand is done (see
    /// [`crate::Ownership`]); a new grant moves [`Subscription::generation`].
    /// Usually called through [`crate::Consume::with_ownership`], which
    /// also fences the writes. The default refuses: a subscription that
    /// chooses its own partitions cannot share them.
    fn follow_ownership(&mut self, ownership: crate::Ownership) -> Result<()> {
        drop(ownership);
        Err(crate::Error::permanent(
            crate::Stage::Config,
            "this subscription cannot follow partition ownership (it chooses its partitions itself)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[(&str, &str)]) -> Record {
        Record {
            topic: "t".into(),
            position: Position {
                partition: 0,
                offset: 7,
            },
            key: Some(Bytes::from_static(b"k")),
            payload: Some(Bytes::from_static(b"{}")),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            timestamp_ms: Some(42),
        }
    }

    #[test]
    fn decodes_event_and_strips_reserved_headers() -> Result<(), DecodeError> {
        let id = Uuid::now_v7();
        let id_text = id.to_string();
        let event = record(&[
            (HEADER_EVENT_ID, &id_text),
            (HEADER_CREATED_AT_MS, "1000"),
            ("app", "x"),
        ])
        .to_event()?;
        assert_eq!(event.id, id);
        assert_eq!(event.created_ms_for_test(), 1000);
        assert_eq!(event.headers.len(), 1);
        Ok(())
    }

    #[test]
    fn a_cloudevent_is_identified_by_its_id_and_source() -> Result<(), DecodeError> {
        let id = Uuid::now_v7();
        let text = id.to_string();
        assert_eq!(record(&[(HEADER_CE_ID, &text)]).event_id()?, id);
        let ours = Uuid::now_v7().to_string();
        assert_eq!(
            record(&[(HEADER_EVENT_ID, &ours), (HEADER_CE_ID, &text)])
                .event_id()?
                .to_string(),
            ours,
            "our own header wins"
        );
        let a = record(&[(HEADER_CE_SOURCE, "ab"), (HEADER_CE_ID, "c")]).event_id()?;
        let b = record(&[(HEADER_CE_SOURCE, "a"), (HEADER_CE_ID, "bc")]).event_id()?;
        assert_ne!(a, b, "source and id do not run together");
        assert_eq!(
            record(&[(HEADER_CE_ID, "")]).event_id(),
            Err(DecodeError::MissingEventId)
        );
        Ok(())
    }

    #[test]
    fn rejects_missing_or_bad_id() {
        assert_eq!(record(&[]).event_id(), Err(DecodeError::MissingEventId));
        assert!(matches!(
            record(&[(HEADER_EVENT_ID, "nope")]).event_id(),
            Err(DecodeError::InvalidEventId(_))
        ));
    }

    impl Event {
        fn created_ms_for_test(&self) -> i64 {
            self.created_at_ms()
        }
    }
}
