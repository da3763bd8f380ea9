//! Topic creation (tansu and many clusters do not create topics on produce).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;

use crate::context::{unreachable, Reporting};
use crate::{BusError, KafkaConfig};

/// Creates each of `topics` that does not exist yet, with the partition count
/// and replication factor of `config`. Existing topics are left as they are.
///
/// ```no_run
/// # async fn example() -> Result<(), outbox_kafka::BusError> {
/// let config = outbox_kafka::KafkaConfig::default();
/// outbox_kafka::ensure_topics(&config, &["user_events"]).await?;
/// # Ok(()) }
/// ```
pub async fn ensure_topics(config: &KafkaConfig, topics: &[&str]) -> Result<(), BusError> {
    if topics.is_empty() {
        return Ok(());
    }
    let mut client_config = config.client_config();
    config.apply_extra(&mut client_config);
    let context = Reporting::default();
    let admin: AdminClient<Reporting> = client_config
        .create_with_context(context.clone())
        .map_err(|source| BusError::Config {
            brokers: config.brokers.clone(),
            cause: source,
        })?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|topic| {
            NewTopic::new(
                topic,
                config.topic_partitions,
                TopicReplication::Fixed(config.topic_replication),
            )
        })
        .collect();
    // Bounded like a delivery: a relay waiting on a dead broker retries
    // instead of hanging.
    let limit = config
        .message_timeout
        .clamp(Duration::from_secs(1), Duration::from_secs(15));
    let options = AdminOptions::new()
        .operation_timeout(Some(limit))
        .request_timeout(Some(limit));
    let results = tokio::time::timeout(limit, admin.create_topics(&new_topics, &options))
        .await
        .map_err(|_| {
            unreachable(
                &config.brokers,
                &context,
                format!("creating topics timed out after {} ms", limit.as_millis()),
            )
        })?
        .map_err(|e| unreachable(&config.brokers, &context, e.to_string()))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(BusError::CreateTopic {
                    brokers: config.brokers.clone(),
                    retryable: !matches!(
                        code,
                        RDKafkaErrorCode::InvalidTopic
                            | RDKafkaErrorCode::TopicAuthorizationFailed
                            | RDKafkaErrorCode::ClusterAuthorizationFailed
                            | RDKafkaErrorCode::InvalidPartitions
                            | RDKafkaErrorCode::InvalidReplicationFactor
                            | RDKafkaErrorCode::PolicyViolation
                    ),
                    topic,
                    detail: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// Number of partitions of `topic`, from the brokers' metadata.
///
/// ```no_run
/// # async fn example() -> Result<(), outbox_kafka::BusError> {
/// let n = outbox_kafka::topic_partitions(&outbox_kafka::KafkaConfig::default(), "user_events").await?;
/// # Ok(()) }
/// ```
pub async fn topic_partitions(config: &KafkaConfig, topic: &str) -> Result<i32, BusError> {
    let mut client_config = config.client_config();
    config.apply_extra(&mut client_config);
    let brokers = config.brokers.clone();
    let context = Reporting::default();
    let failed = context.clone();
    let fail = move |detail: String| unreachable(&brokers, &failed, detail);
    let client: rdkafka::producer::BaseProducer<Reporting> = client_config
        .create_with_context(context)
        .map_err(|source| BusError::Config {
            brokers: config.brokers.clone(),
            cause: source,
        })?;
    let name = topic.to_string();
    let count = tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer;
        let result = client
            .client()
            .fetch_metadata(Some(&name), Duration::from_secs(10))
            .map(|m| {
                m.topics()
                    .first()
                    .map(|t| t.partitions().len())
                    .unwrap_or(0)
            });
        if result.is_err() {
            // Nothing polls this client otherwise: serve its error
            // callbacks, which say why the brokers did not answer (they may
            // arrive a moment after the failed request).
            for _ in 0..5 {
                if client.context().security_failure().is_some() {
                    break;
                }
                client.poll(Duration::from_millis(100));
            }
        }
        result
    })
    .await
    .map_err(|e| fail(e.to_string()))?
    .map_err(|e| fail(e.to_string()))?;
    let count = i32::try_from(count).unwrap_or(i32::MAX);
    if count == 0 {
        return Err(fail(format!("topic {topic:?} has no partitions")));
    }
    Ok(count)
}

/// How far a consumer group is behind on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: i32,
    /// The group's committed offset (the next record it will read), if any.
    pub committed: Option<i64>,
    /// The offset the next produced record will get.
    pub high_watermark: i64,
    /// Records produced but not yet committed by the group
    /// (`high_watermark - committed`, or every record still kept without a commit).
    pub lag: i64,
}

/// Reads a consumer group's committed offsets and the partitions' high
/// watermarks, without joining the group (so it never triggers a rebalance).
///
/// ```no_run
/// # async fn example() -> Result<(), outbox_kafka::BusError> {
/// use outbox_kafka::{KafkaConfig, LagProbe};
///
/// let probe = LagProbe::new(&KafkaConfig::default(), "user_events_clickhouse", "user_events")?;
/// for p in probe.lag().await? {
///     println!("partition {}: {} behind", p.partition, p.lag);
/// }
/// # Ok(()) }
/// ```
pub struct LagProbe {
    consumer: std::sync::Arc<rdkafka::consumer::BaseConsumer>,
    brokers: String,
    topic: String,
}

impl LagProbe {
    /// The usual `interval` of [`LagProbe::report_every`] (each round asks
    /// the broker for the committed and the latest offset of every partition).
    pub const REPORT_INTERVAL: Duration = Duration::from_secs(15);

    /// A probe of `group_id` on `topic`.
    pub fn new(config: &KafkaConfig, group_id: &str, topic: &str) -> Result<Self, BusError> {
        let mut client_config = config.client_config();
        client_config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false");
        config.apply_extra(&mut client_config);
        let consumer = client_config.create().map_err(|source| BusError::Config {
            brokers: config.brokers.clone(),
            cause: source,
        })?;
        Ok(Self {
            consumer: std::sync::Arc::new(consumer),
            brokers: config.brokers.clone(),
            topic: topic.to_string(),
        })
    }

    /// [`LagProbe::lag`], also set as the gauge
    /// `outbox_consumer_lag{topic, partition}`: records of the topic that
    /// the group has not committed yet.
    pub async fn report(&self) -> Result<Vec<PartitionLag>, BusError> {
        let lags = self.lag().await?;
        for lag in &lags {
            metrics::gauge!(
                "outbox_consumer_lag",
                "topic" => self.topic.clone(),
                "partition" => lag.partition.to_string()
            )
            .set(lag.lag as f64);
        }
        Ok(lags)
    }

    /// [`LagProbe::report`] every `interval` until `shutdown` (for a
    /// consumer that keeps its lag gauge fresh). A failed round is logged and
    /// the next one tries again: the gauge only goes stale.
    pub async fn report_every(self, interval: Duration, shutdown: CancellationToken) {
        outbox_core::every(interval, shutdown, || async {
            if let Err(err) = self.report().await {
                tracing::debug!(error = %err, "consumer lag query failed");
            }
        })
        .await;
    }

    /// The lag of every partition of the topic, in partition order.
    pub async fn lag(&self) -> Result<Vec<PartitionLag>, BusError> {
        use rdkafka::consumer::Consumer;
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let brokers = self.brokers.clone();
        let unreachable = move |detail: String| BusError::Unreachable {
            brokers: brokers.clone(),
            detail,
        };
        let fail = unreachable.clone();
        // librdkafka's calls block: keep them off the async threads.
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(10);
            let metadata = consumer
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| fail(e.to_string()))?;
            let partitions: Vec<i32> = metadata
                .topics()
                .first()
                .map(|t| t.partitions().iter().map(|p| p.id()).collect())
                .unwrap_or_default();
            let mut wanted = rdkafka::TopicPartitionList::new();
            for partition in &partitions {
                wanted.add_partition(&topic, *partition);
            }
            let committed = consumer
                .committed_offsets(wanted, timeout)
                .map_err(|e| fail(e.to_string()))?;
            let mut lags = Vec::with_capacity(partitions.len());
            for partition in partitions {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, partition, timeout)
                    .map_err(|e| fail(e.to_string()))?;
                let committed =
                    committed
                        .find_partition(&topic, partition)
                        .and_then(|e| match e.offset() {
                            rdkafka::Offset::Offset(n) if n >= 0 => Some(n),
                            _ => None,
                        });
                lags.push(PartitionLag {
                    partition,
                    committed,
                    high_watermark: high,
                    lag: (high - committed.unwrap_or(low)).max(0),
                });
            }
            Ok(lags)
        })
        .await
        .map_err(|e| unreachable(e.to_string()))?
    }
}
