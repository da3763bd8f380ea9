//! The Kafka [`Bus`]: an idempotent producer that publishes whole batches.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use outbox_core::{Bus, Delivery, Event, Position, HEADER_CREATED_AT_MS, HEADER_EVENT_ID};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tracing::{info, warn};

use crate::context::{unreachable, Reporting};
use crate::error::is_permanent_delivery_code;
use crate::pool::Pool;
use crate::{ensure_topics, BusError, KafkaConfig};

/// Publishes batches of events with an idempotent producer
/// (`enable.idempotence=true`, `acks=all`) and reports, per event, whether
/// the broker acknowledged it.
///
/// The event id travels in the `outbox-event-id` header and the creation time
/// in `outbox-created-at-ms`; the key selects the partition (murmur2, as the
/// Java client), and an event without a key goes to a partition chosen by
/// its id, so a copy published again always lands beside the first one. Topics are created on first use when
/// [`KafkaConfig::create_topics`] is set. Publishes in flight at the same
/// time each use a producer of their own (up to [`KafkaConfig::producers`]),
/// so one batch never waits behind another's produce request; a small batch
/// goes through a producer of its own with a shorter linger
/// ([`KafkaConfig::small_batch_events`]) when that one is free. After a fatal
/// producer error (for example a broker that lost the producer's id) that
/// producer is replaced and the events it did not deliver are reported as
/// retryable.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_core::{Bus, Event};
/// use outbox_kafka::{KafkaBus, KafkaConfig};
///
/// let bus = KafkaBus::new(KafkaConfig::default())?;
/// let deliveries = bus.publish(&[Event::new("user_events", "{}").with_key("alice")]).await?;
/// assert!(deliveries[0].is_acknowledged());
/// # Ok(()) }
/// ```
pub struct KafkaBus {
    config: KafkaConfig,
    context: Reporting,
    producers: Producers,
    /// The small-batch producer ([`KafkaConfig::small_batch_linger`]); none
    /// when [`KafkaConfig::small_batch_events`] is 0.
    small: Option<Producers>,
    known_topics: Mutex<HashSet<String>>,
    partition_counts: Mutex<HashMap<String, i32>>,
    /// Events refused together with others: their refusal may be the whole
    /// request's, so the next publish sends each alone before believing it.
    suspects: Mutex<HashSet<uuid::Uuid>>,
}

impl KafkaBus {
    /// A bus with [`KafkaConfig::producers`] new producers; they connect in
    /// the background.
    pub fn new(config: KafkaConfig) -> Result<Self, BusError> {
        if let Some(ce) = &config.cloudevents {
            ce.validate().map_err(|detail| BusError::InvalidOption {
                brokers: config.brokers.clone(),
                detail,
            })?;
        }
        let context = Reporting::default();
        let producers = (0..config.producers.max(1))
            .map(|_| create_producer(&config, config.linger, &context))
            .collect::<Result<Vec<_>, _>>()?;
        let small = match config.small_batch_events {
            0 => None,
            _ => Some(Pool::new(vec![create_producer(
                &config,
                config.small_batch_linger,
                &context,
            )?])),
        };
        Ok(Self {
            producers: Pool::new(producers),
            small,
            config,
            context,
            known_topics: Mutex::new(HashSet::new()),
            partition_counts: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashSet::new()),
        })
    }

    /// Asks the brokers for their metadata: the start-up check of the binaries.
    pub async fn check_connection(&self) -> Result<(), BusError> {
        let taken = self.take_producer().await?;
        let producer = taken.producer.clone();
        self.producers.give_back(taken);
        let brokers = self.config.brokers.clone();
        let context = self.context.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Timeout::After(Duration::from_secs(10)))
                .map(|_| ())
                .map_err(|e| unreachable(&brokers, &context, e.to_string()))
        })
        .await
        .map_err(|e| BusError::Unreachable {
            brokers: self.config.brokers.clone(),
            detail: e.to_string(),
        })?
    }

    /// Waits until every message handed to a producer was delivered or
    /// failed (publishes in flight finish first).
    pub async fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        let mut producers = self.producers.with_all(<[_]>::to_vec).await;
        if let Some(small) = &self.small {
            producers.extend(small.with_all(<[_]>::to_vec).await);
        }
        let brokers = self.config.brokers.clone();
        tokio::task::spawn_blocking(move || {
            producers
                .iter()
                .try_for_each(|producer| producer.flush(Timeout::After(timeout)))
        })
        .await
        .map_err(|e| BusError::Unreachable {
            brokers: brokers.clone(),
            detail: e.to_string(),
        })?
        .map_err(|e| BusError::Unreachable {
            brokers,
            detail: e.to_string(),
        })
    }

    /// A producer for one publish: an idle one, or a new one in place of
    /// one dropped after a fatal error.
    async fn take_producer(&self) -> Result<Taken<'_>, BusError> {
        self.producers
            .take(|| {
                info!("creating a kafka producer in place of the one that failed");
                create_producer(&self.config, self.config.linger, &self.context)
            })
            .await
    }

    /// The producer for a publish of `events`, with the pool to give it
    /// back to: the small-batch one if the batch is small and that producer
    /// free, else one of the pool.
    async fn producer_for(&self, events: &[Event]) -> Result<(Taken<'_>, &Producers), BusError> {
        if let Some(small) = &self.small {
            if is_small_batch(events.len(), self.config.small_batch_events) {
                let taken = small.try_take(|| {
                    info!("creating a kafka producer in place of the one that failed");
                    create_producer(&self.config, self.config.small_batch_linger, &self.context)
                })?;
                if let Some(taken) = taken {
                    return Ok((taken, small));
                }
            }
        }
        Ok((self.take_producer().await?, &self.producers))
    }

    async fn ensure_known_topics(&self, events: &[Event]) -> Result<(), BusError> {
        if !self.config.create_topics {
            return Ok(());
        }
        let missing: Vec<String> = {
            let known = self
                .known_topics
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut missing: Vec<String> = events
                .iter()
                .filter(|e| !known.contains(&e.topic))
                .map(|e| e.topic.clone())
                .collect();
            missing.sort();
            missing.dedup();
            missing
        };
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = missing.iter().map(String::as_str).collect();
        ensure_topics(&self.config, &names).await?;
        let mut known = self
            .known_topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        known.extend(missing);
        Ok(())
    }

    /// Partitions of `topic`, from the brokers' metadata (cached).
    async fn partition_count(&self, topic: &str) -> Result<i32, BusError> {
        if let Some(count) = self
            .partition_counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(topic)
        {
            return Ok(*count);
        }
        let count = crate::topic_partitions(&self.config, topic).await?;
        self.partition_counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(topic.to_string(), count);
        Ok(count)
    }
}

type Producers = Pool<FutureProducer<Reporting>>;
type Taken<'a> = crate::pool::Taken<'a, FutureProducer<Reporting>>;

/// Whether a batch of `len` events goes through the small-batch producer
/// ([`KafkaConfig::small_batch_events`]; 0 means never).
fn is_small_batch(len: usize, small_batch_events: usize) -> bool {
    small_batch_events > 0 && len <= small_batch_events
}

fn create_producer(
    config: &KafkaConfig,
    linger: Duration,
    context: &Reporting,
) -> Result<FutureProducer<Reporting>, BusError> {
    config
        .producer_config_with_linger(linger)
        .create_with_context(context.clone())
        .map_err(|source| BusError::Config {
            brokers: config.brokers.clone(),
            cause: source,
        })
}

fn headers_for(
    event: &Event,
    event_id: &str,
    created_ms: &str,
    cloudevents: &[(&'static str, String)],
) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(event.headers.len() + 2 + cloudevents.len())
        .insert(Header {
            key: HEADER_EVENT_ID,
            value: Some(event_id),
        })
        .insert(Header {
            key: HEADER_CREATED_AT_MS,
            value: Some(created_ms),
        });
    for (name, value) in &event.headers {
        if name.starts_with("outbox-") {
            continue;
        }
        headers = headers.insert(Header {
            key: name,
            value: Some(value),
        });
    }
    for (name, value) in cloudevents {
        headers = headers.insert(Header {
            key: name,
            value: Some(value),
        });
    }
    headers
}

/// A stable partition for an event id (FNV-1a over its bytes).
fn partition_for_id(id: uuid::Uuid, partitions: i32) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in id.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let partitions = u32::try_from(partitions.max(1)).unwrap_or(1);
    i32::try_from(hash % partitions).unwrap_or(0)
}

fn classify(err: &KafkaError) -> Delivery {
    match err.rdkafka_error_code() {
        Some(code) if is_permanent_delivery_code(code) => {
            Delivery::Rejected(format!("kafka rejected the event: {err}"))
        }
        _ => Delivery::Retryable(format!("kafka did not acknowledge the event: {err}")),
    }
}

/// A permanent refusal shared by several events of one publish may be the
/// broker refusing the whole request they travelled in (MESSAGE_TOO_LARGE
/// counts a batch, not a record): it is believed only for an event that was
/// sent alone. The others become retryable; their indexes are returned, to
/// be sent alone next time. A refusal of a single event among accepted ones
/// is its own.
fn isolate_shared_rejections(deliveries: &mut [Delivery], alone: &[bool]) -> Vec<usize> {
    let shared: Vec<usize> = deliveries
        .iter()
        .zip(alone)
        .enumerate()
        .filter(|(_, (delivery, alone))| matches!(delivery, Delivery::Rejected(_)) && !**alone)
        .map(|(index, _)| index)
        .collect();
    if shared.len() < 2 {
        return Vec::new();
    }
    for &index in &shared {
        if let Delivery::Rejected(reason) = &deliveries[index] {
            deliveries[index] = Delivery::Retryable(format!(
                "{reason}; refused together with {} other events, so possibly for the request \
                 they shared: each is sent alone next",
                shared.len() - 1
            ));
        }
    }
    shared
}

impl KafkaBus {
    /// Hands `event` to the producer; waits while its local queue is full.
    async fn send(
        &self,
        producer: &FutureProducer<Reporting>,
        event: &Event,
    ) -> outbox_core::Result<Result<rdkafka::producer::DeliveryFuture, KafkaError>> {
        let event_id = event.id.to_string();
        let created_ms = event.created_at_ms().to_string();
        let cloudevents = match &self.config.cloudevents {
            Some(ce) if ce.applies_to(&event.topic) => ce.headers(event),
            _ => Vec::new(),
        };
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&event.topic)
            .payload(&event.payload[..])
            .timestamp(event.created_at_ms())
            .headers(headers_for(event, &event_id, &created_ms, &cloudevents));
        match &event.key {
            Some(key) => record = record.key(&key[..]),
            // No key: a partition chosen by the event id, so a republished
            // event lands where its first copy did and sinks can tell.
            None => {
                let count = self.partition_count(&event.topic).await?;
                record = record.partition(partition_for_id(event.id, count));
            }
        }
        // Enqueue in order; a full local queue drains as deliveries complete.
        loop {
            match producer.send_result(record) {
                Ok(future) => return Ok(Ok(future)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((err, _)) => return Ok(Err(err)),
            }
        }
    }
}

fn answer(
    result: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> (Delivery, bool) {
    match result {
        Ok(Ok(delivery)) => (
            Delivery::Acknowledged(Position {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            false,
        ),
        Ok(Err((err, _message))) => {
            let lost_topic = matches!(
                err.rdkafka_error_code(),
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
            );
            (classify(&err), lost_topic)
        }
        Err(_canceled) => (
            Delivery::Retryable("kafka producer was dropped".into()),
            false,
        ),
    }
}

#[async_trait]
impl Bus for KafkaBus {
    async fn publish(&self, events: &[Event]) -> outbox_core::Result<Vec<Delivery>> {
        self.ensure_known_topics(events).await?;
        let (taken, pool) = self.producer_for(events).await?;
        let published = self.publish_with(&taken.producer, events).await;
        match taken.producer.client().fatal_error() {
            // Messages acknowledged before the fatal error stay acknowledged;
            // the rest are retried with a new producer, which the next
            // publish makes since this one is not given back.
            Some((code, reason)) => {
                warn!(%code, reason, "kafka producer reported a fatal error: replacing it");
                drop(taken);
            }
            None => pool.give_back(taken),
        }
        published
    }
}

impl KafkaBus {
    async fn publish_with(
        &self,
        producer: &FutureProducer<Reporting>,
        events: &[Event],
    ) -> outbox_core::Result<Vec<Delivery>> {
        let alone: Vec<bool> = {
            let suspects = self
                .suspects
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            events.iter().map(|e| suspects.contains(&e.id)).collect()
        };
        let mut deliveries: Vec<Delivery> = (0..events.len())
            .map(|_| Delivery::Retryable(String::new()))
            .collect();
        let mut lost_topic = vec![false; events.len()];
        // Suspects first, each in a request of its own: sent, then awaited.
        for (index, event) in events.iter().enumerate().filter(|(i, _)| alone[*i]) {
            (deliveries[index], lost_topic[index]) = match self.send(producer, event).await? {
                Ok(future) => answer(future.await),
                Err(err) => (classify(&err), false),
            };
        }
        let mut futures = Vec::new();
        let mut slots = Vec::new();
        for (index, event) in events.iter().enumerate().filter(|(i, _)| !alone[*i]) {
            match self.send(producer, event).await? {
                Ok(future) => {
                    slots.push(index);
                    futures.push(future);
                }
                Err(err) => deliveries[index] = classify(&err),
            }
        }
        for (index, result) in slots.into_iter().zip(join_all(futures).await) {
            (deliveries[index], lost_topic[index]) = answer(result);
        }
        let isolated = isolate_shared_rejections(&mut deliveries, &alone);
        {
            let mut suspects = self
                .suspects
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (event, alone) in events.iter().zip(&alone) {
                if *alone {
                    suspects.remove(&event.id);
                }
            }
            for index in isolated {
                suspects.insert(events[index].id);
            }
        }
        let lost_topics: Vec<&str> = events
            .iter()
            .zip(&lost_topic)
            .filter(|(_, lost)| **lost)
            .map(|(event, _)| event.topic.as_str())
            .collect();
        // A broker that lost a topic (restarted without its data) makes us
        // create it again on the next attempt.
        if !lost_topics.is_empty() {
            let mut known = self
                .known_topics
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut counts = self
                .partition_counts
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for topic in lost_topics {
                known.remove(topic);
                counts.remove(topic);
            }
        }
        Ok(deliveries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_batches_up_to_the_bound_are_small() {
        assert!(is_small_batch(1, 256));
        assert!(is_small_batch(256, 256));
        assert!(!is_small_batch(257, 256));
        assert!(
            !is_small_batch(1, 0),
            "0 turns the small-batch producer off"
        );
    }

    fn rejected() -> Delivery {
        Delivery::Rejected("MESSAGE_TOO_LARGE".into())
    }

    fn acked() -> Delivery {
        Delivery::Acknowledged(Position {
            partition: 0,
            offset: 1,
        })
    }

    #[test]
    fn shared_refusals_are_tried_alone_and_lone_ones_are_believed() {
        let mut shared = vec![rejected(), acked(), rejected(), rejected()];
        let isolated = isolate_shared_rejections(&mut shared, &[false; 4]);
        assert_eq!(isolated, vec![0, 2, 3]);
        assert!(matches!(shared[0], Delivery::Retryable(_)));
        assert_eq!(shared[1], acked());

        let mut lone = vec![rejected(), acked(), acked()];
        assert!(isolate_shared_rejections(&mut lone, &[false; 3]).is_empty());
        assert_eq!(lone[0], rejected());

        let mut sent_alone = vec![rejected(), rejected()];
        assert!(isolate_shared_rejections(&mut sent_alone, &[true, true]).is_empty());
        assert_eq!(sent_alone, vec![rejected(), rejected()]);
    }
}
