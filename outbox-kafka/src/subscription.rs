//! The Kafka [`Subscription`]: a consumer whose positions move only when told.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::{Checkpoint, Lease, Position, Record, Subscription};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{Assignment, BusError, ConsumerConfig, KafkaConfig};

/// Reads topics with automatic commits turned off, either every partition
/// (the default, [`crate::Assignment::AllPartitions`]) or the partitions the
/// broker's consumer group gives it.
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
    topic: Option<String>,
    fallback_offset: Offset,
    ownership: Option<Ownership>,
    generation: u64,
    /// With broker-side groups: the assignment last seen, to notice a rebalance.
    group_assignment: Option<Vec<(String, i32)>>,
    /// Made with [`Assignment::Leased`]: partitions come from an ownership.
    leased: bool,
}

/// The partitions this consumer may work, and the report of those it works.
struct Ownership {
    owned: watch::Receiver<Lease>,
    applied: watch::Sender<Vec<i32>>,
    /// The grant applied (partitions and epoch); `None` forces a re-assign.
    current: Option<(Vec<i32>, u64)>,
}

impl Ownership {
    fn worked(&self) -> &[i32] {
        self.current
            .as_ref()
            .map_or(&[], |(partitions, _)| partitions)
    }
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
            .set(
                "max.poll.interval.ms",
                config
                    .max_poll_interval
                    .max(config.session_timeout)
                    .as_millis()
                    .to_string(),
            )
            .set(
                "fetch.wait.max.ms",
                config.fetch_wait.as_millis().max(1).to_string(),
            )
            .set(
                "queued.max.messages.kbytes",
                config.prefetch_kbytes.max(1).to_string(),
            )
            // librdkafka refuses a fetch.max.bytes below message.max.bytes (1 MB).
            .set(
                "fetch.max.bytes",
                config.fetch_max_bytes.max(1_000_000).to_string(),
            )
            .set("enable.partition.eof", "false");
        kafka.apply_extra(&mut client_config);
        let consumer: StreamConsumer =
            client_config.create().map_err(|source| BusError::Config {
                brokers: kafka.brokers.clone(),
                cause: source,
            })?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        let consumer_error = |operation, source| BusError::Consumer {
            brokers: kafka.brokers.clone(),
            operation,
            cause: source,
        };
        match config.assignment {
            Assignment::Group => consumer
                .subscribe(&topics)
                .map_err(|e| consumer_error("subscribe", e))?,
            Assignment::AllPartitions => {
                let list = all_partitions_from_committed(&consumer, &topics, &config)
                    .map_err(|e| consumer_error("assign", e))?;
                consumer
                    .assign(&list)
                    .map_err(|e| consumer_error("assign", e))?;
            }
            // Nothing until follow_ownership hands partitions over.
            Assignment::Leased => {}
        }
        Ok(Self {
            consumer,
            brokers: kafka.brokers.clone(),
            batch_linger: config.batch_linger,
            topic: config.topics.first().cloned(),
            fallback_offset: fallback_offset(&config),
            ownership: None,
            generation: 0,
            group_assignment: matches!(config.assignment, Assignment::Group).then(Vec::new),
            leased: matches!(config.assignment, Assignment::Leased),
        })
    }

    /// Applies a change of ownership between batches.
    fn apply_ownership(&mut self) -> Result<(), BusError> {
        let Some(ownership) = self.ownership.as_mut() else {
            return Ok(());
        };
        let lease = ownership.owned.borrow_and_update().clone();
        let wanted = (lease.partitions, lease.epoch);
        if ownership.current.as_ref() != Some(&wanted) {
            let Some(topic) = self.topic.as_deref() else {
                return Ok(());
            };
            let consumer_error = |source| BusError::Consumer {
                brokers: self.brokers.clone(),
                operation: "assign",
                cause: source,
            };
            let mut wanted_list = TopicPartitionList::new();
            for partition in &wanted.0 {
                wanted_list.add_partition(topic, *partition);
            }
            let list = blocking(|| {
                positions_from_committed(&self.consumer, wanted_list, self.fallback_offset)
            })
            .map_err(consumer_error)?;
            self.consumer.assign(&list).map_err(consumer_error)?;
            tracing::info!(topic, partitions = ?wanted.0, epoch = wanted.1, "working partitions");
            ownership.current = Some(wanted);
            self.generation += 1;
        }
        let current = ownership.worked().to_vec();
        ownership.applied.send_if_modified(|reported| {
            if *reported == current {
                false
            } else {
                reported.clone_from(&current);
                true
            }
        });
        Ok(())
    }

    /// With a broker-side group, moves the generation when a rebalance
    /// changed the assignment (a local call, no round trip).
    fn notice_rebalance(&mut self) {
        let Some(last) = self.group_assignment.as_mut() else {
            return;
        };
        let Ok(list) = self.consumer.assignment() else {
            return;
        };
        let mut now: Vec<(String, i32)> = list
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        now.sort();
        if *last != now {
            *last = now;
            self.generation += 1;
        }
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
            cause: source,
        }
    }
}

/// Runs a blocking broker round trip off the async worker when the runtime
/// allows it (a multi-threaded one).
fn blocking<T>(call: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(call),
        _ => call(),
    }
}

/// Every partition of `topics`, each at the group's committed position (or
/// where `auto.offset.reset` says when there is none). Blocks for up to a few
/// seconds on broker round trips; called once, at start.
fn all_partitions_from_committed(
    consumer: &StreamConsumer,
    topics: &[&str],
    config: &ConsumerConfig,
) -> Result<TopicPartitionList, rdkafka::error::KafkaError> {
    let timeout = Duration::from_secs(10);
    let mut wanted = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        for topic_metadata in metadata.topics() {
            if let Some(err) = topic_metadata.error() {
                return Err(rdkafka::error::KafkaError::MetadataFetch(err.into()));
            }
            for partition in topic_metadata.partitions() {
                wanted.add_partition(topic_metadata.name(), partition.id());
            }
        }
    }
    positions_from_committed(consumer, wanted, fallback_offset(config))
}

/// Where `config` starts a partition that has no committed position.
fn fallback_offset(config: &ConsumerConfig) -> Offset {
    if config.auto_offset_reset == "latest" {
        Offset::End
    } else {
        Offset::Beginning
    }
}

/// `wanted`, each partition at the group's committed position, or at
/// `fallback` when it has none. Positions are asked explicitly: tansu 0.6 was
/// seen to stall when librdkafka fetched them itself (`Offset::Stored`).
/// Blocks for a broker round trip; called at start and when ownership changes.
fn positions_from_committed(
    consumer: &StreamConsumer,
    wanted: TopicPartitionList,
    fallback: Offset,
) -> Result<TopicPartitionList, rdkafka::error::KafkaError> {
    let committed = consumer.committed_offsets(wanted, Duration::from_secs(10))?;
    let mut list = TopicPartitionList::new();
    for element in committed.elements() {
        let offset = match element.offset() {
            Offset::Offset(n) if n >= 0 => Offset::Offset(n),
            _ => fallback,
        };
        list.add_partition_offset(element.topic(), element.partition(), offset)?;
    }
    Ok(list)
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
        self.apply_ownership()?;
        self.notice_rebalance();
        let mut records = Vec::new();
        let mut deadline = Instant::now() + max_wait;
        while records.len() < max_records {
            let received = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_elapsed) => break,
                Ok(received) => received,
            };
            match received {
                Ok(message) => {
                    if let Some(ownership) = &self.ownership {
                        // A message fetched just before a partition was dropped.
                        if !ownership.worked().contains(&message.partition()) {
                            continue;
                        }
                    }
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
        for (topic, partition, next) in checkpoint.iter() {
            list.add_partition_offset(topic, partition, Offset::Offset(next))
                .map_err(|e| self.consumer_error("commit", e))?;
        }
        self.consumer
            .commit(&list, CommitMode::Async)
            .map_err(|e| self.consumer_error("commit", e).into())
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    /// Only with [`Assignment::AllPartitions`]: a poll of a broker-side
    /// group serves its rebalances, and a leased one applies new grants,
    /// either of which could hand a partition on while its batch is still
    /// being written.
    fn polls_may_overlap_writes(&self) -> bool {
        !self.leased && self.group_assignment.is_none()
    }

    /// Works exactly the partitions (of the first configured topic) that
    /// `ownership.lease` grants, re-read at every poll, and reports on
    /// `ownership.applied` the set it works once the previous batch is done,
    /// so the granter may hand a dropped partition to another consumer. A
    /// new grant (other partitions, or a new epoch: ownership may have moved
    /// away and back) re-assigns every partition from the group's committed
    /// offsets and moves [`Subscription::generation`]. Only a subscription
    /// made with [`Assignment::Leased`] follows a grant (the others have
    /// their partitions already).
    fn follow_ownership(&mut self, ownership: outbox_core::Ownership) -> outbox_core::Result<()> {
        if !self.leased {
            return Err(outbox_core::Error::permanent(
                outbox_core::Stage::Config,
                "only a Kafka subscription made with Assignment::Leased can follow partition ownership",
            ));
        }
        self.ownership = Some(Ownership {
            owned: ownership.lease,
            applied: ownership.applied,
            current: None,
        });
        Ok(())
    }

    async fn rewind(&mut self) -> outbox_core::Result<()> {
        if let Some(ownership) = self.ownership.as_mut() {
            // Re-assigned from the committed offsets at the next poll.
            ownership.current = None;
            return Ok(());
        }
        let assigned = self
            .consumer
            .assignment()
            .map_err(|e| self.consumer_error("rewind", e))?;
        let list =
            blocking(|| positions_from_committed(&self.consumer, assigned, self.fallback_offset))
                .map_err(|e| self.consumer_error("rewind", e))?;
        self.consumer
            .assign(&list)
            .map_err(|e| self.consumer_error("rewind", e))?;
        self.generation += 1;
        Ok(())
    }
}
