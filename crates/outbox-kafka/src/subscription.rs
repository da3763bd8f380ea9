//! The Kafka [`Subscription`]: a consumer whose positions move only when told.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::{Checkpoint, Position, Record, Subscription};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::time::Instant;

use crate::{BusError, ConsumerConfig, KafkaConfig};

/// Reads topics in a consumer group with automatic commits turned off.
///
/// [`Subscription::commit`] is the only thing that moves the group's
/// positions, and the consumer loop calls it only after the sink durably
/// wrote the batch. The sink stores positions with its rows, so these
/// commits are a resume hint and a lag measure, not the truth.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_kafka::{ConsumerConfig, KafkaConfig, KafkaSubscription};
///
/// let subscription = KafkaSubscription::new(
///     &KafkaConfig::default(),
///     ConsumerConfig::new("user_events_clickhouse", ["user_events"]),
/// )?;
/// # Ok(()) }
/// ```
pub struct KafkaSubscription {
    consumer: StreamConsumer,
    brokers: String,
    batch_linger: Duration,
}

impl KafkaSubscription {
    /// Creates the consumer and subscribes to the configured topics.
    pub fn new(kafka: &KafkaConfig, config: ConsumerConfig) -> Result<Self, BusError> {
        let mut client_config = kafka.client_config();
        client_config
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", &config.auto_offset_reset)
            .set(
                "session.timeout.ms",
                config.session_timeout.as_millis().to_string(),
            )
            .set("fetch.wait.max.ms", "10")
            .set("enable.partition.eof", "false");
        kafka.apply_extra(&mut client_config);
        let consumer: StreamConsumer =
            client_config.create().map_err(|source| BusError::Config {
                brokers: kafka.brokers.clone(),
                source,
            })?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|source| BusError::Consumer {
                brokers: kafka.brokers.clone(),
                operation: "subscribe",
                source,
            })?;
        Ok(Self {
            consumer,
            brokers: kafka.brokers.clone(),
            batch_linger: config.batch_linger,
        })
    }

    /// The underlying rdkafka consumer, for inspection (assignment, lag).
    pub fn consumer(&self) -> &StreamConsumer {
        &self.consumer
    }

    fn consumer_error(
        &self,
        operation: &'static str,
        source: rdkafka::error::KafkaError,
    ) -> BusError {
        BusError::Consumer {
            brokers: self.brokers.clone(),
            operation,
            source,
        }
    }
}

fn to_record(message: &BorrowedMessage<'_>) -> Record {
    let mut headers = BTreeMap::new();
    if let Some(raw) = message.headers() {
        for header in raw.iter() {
            if let Some(value) = header.value.and_then(|v| std::str::from_utf8(v).ok()) {
                headers.insert(header.key.to_string(), value.to_string());
            }
        }
    }
    Record {
        topic: message.topic().to_string(),
        position: Position {
            partition: message.partition(),
            offset: message.offset(),
        },
        key: message.key().map(Bytes::copy_from_slice),
        payload: message.payload().map(Bytes::copy_from_slice),
        headers,
        timestamp_ms: message.timestamp().to_millis(),
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn poll_batch(
        &mut self,
        max_records: usize,
        max_wait: Duration,
    ) -> outbox_core::Result<Vec<Record>> {
        let mut records = Vec::new();
        let mut deadline = Instant::now() + max_wait;
        while records.len() < max_records {
            let received = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_elapsed) => break,
                Ok(received) => received,
            };
            match received {
                Ok(message) => {
                    if records.is_empty() {
                        // Low load: hand the batch over soon. High load: the
                        // linger fills it from messages already fetched.
                        deadline = deadline.min(Instant::now() + self.batch_linger);
                    }
                    records.push(to_record(&message));
                }
                Err(err) if records.is_empty() => {
                    return Err(self.consumer_error("receive", err).into());
                }
                // Hand over what we have; the error shows again on the next poll.
                Err(_) => break,
            }
        }
        Ok(records)
    }

    async fn commit(&mut self, checkpoint: &Checkpoint) -> outbox_core::Result<()> {
        if checkpoint.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), next) in checkpoint {
            list.add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(|e| self.consumer_error("commit", e))?;
        }
        self.consumer
            .commit(&list, CommitMode::Async)
            .map_err(|e| self.consumer_error("commit", e).into())
    }
}
