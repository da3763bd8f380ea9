//! Settings of the Kafka producer and consumer.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rdkafka::ClientConfig;

/// Where the brokers are and how the producer behaves.
///
/// ```
/// let config = outbox_kafka::KafkaConfig::default();
/// assert_eq!(config.brokers, "127.0.0.1:9092");
/// ```
#[derive(Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated. Default: `127.0.0.1:9092`.
    pub brokers: String,
    /// `client.id` reported to the brokers. Default: `outbox`.
    pub client_id: String,
    /// How long the producer tries to deliver one message before it reports
    /// failure (`message.timeout.ms`). The relay holds its claim that long at
    /// most, so keep it below the source's claim timeout (20 s by default).
    /// Default: 10 s.
    pub message_timeout: Duration,
    /// How long the producer waits to fill a request (`linger.ms`). Default: 5 ms.
    pub linger: Duration,
    /// `linger.ms` of the one producer of a [`crate::KafkaBus`] that
    /// publishes small batches (see [`KafkaConfig::small_batch_events`]).
    /// A producer carries one batch at a time, and the bus hands it the
    /// whole batch at once, so its linger only has to outlast handing over
    /// the batch: the rest is an event's wait for nothing (measured in
    /// `docs/performance.md`: 5 ms of it twice in a caught-up event's path,
    /// behind the batch in flight and in its own). Too short for the batch
    /// and the producer sends it in several requests, which a broker such
    /// as tansu pays for per request. Default: 1 ms.
    pub small_batch_linger: Duration,
    /// Batches of at most this many events go through the small-batch
    /// producer (when it is not busy with another), larger ones through the
    /// [`KafkaConfig::producers`] with [`KafkaConfig::linger`]: a backlog's
    /// full batches take longer to hand over than a short linger, a caught-up
    /// relay's few events do not. 0: no small-batch producer. Default: 256.
    pub small_batch_events: usize,
    /// Use librdkafka's idempotent producer (`enable.idempotence`, up to 5
    /// requests in flight). Default: true.
    ///
    /// With `false` the producer keeps one request in flight so that a retry
    /// can never overtake a later request, and a retry that the broker had in
    /// fact written shows up as a second copy, which the ClickHouse sink drops
    /// by event id: the pipeline's guarantees hold either way. Turn it off for
    /// brokers that break on the idempotent producer's epoch bump after a
    /// message timeout (tansu 0.6 panics; see `GUARANTEES.md`).
    pub idempotence: bool,
    /// How the producer compresses record batches (`compression.type`).
    /// Default: [`Compression::None`], as in librdkafka and the Java client.
    pub compression: Compression,
    /// Producers of a [`crate::KafkaBus`], one per publish in flight:
    /// librdkafka's idempotent producer keeps one produce request per
    /// partition in flight, so two batches published at once (the relay's
    /// `max_in_flight_batches`) would otherwise travel one after the other.
    /// More publishes at once than producers wait for a free one. Made with
    /// the bus, so that none connects while a batch waits; 0 counts as 1.
    /// Default: 2.
    pub producers: usize,
    /// Create a topic the first time an event is published to it. Default: true.
    pub create_topics: bool,
    /// Partitions of topics this crate creates. Default: 3.
    pub topic_partitions: i32,
    /// Replication factor of topics this crate creates. Default: 1.
    pub topic_replication: i32,
    /// Further librdkafka properties (e.g. `security.protocol`, `sasl.*`),
    /// applied last. Values are never logged.
    pub extra: BTreeMap<String, String>,
    /// Publish (some topics') events in the CloudEvents Kafka protocol
    /// binding, binary mode: see [`crate::cloudevents`]. Default: none.
    pub cloudevents: Option<crate::CloudEventsConfig>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            client_id: "outbox".into(),
            message_timeout: Duration::from_secs(10),
            linger: Duration::from_millis(5),
            small_batch_linger: Duration::from_millis(1),
            small_batch_events: 256,
            idempotence: true,
            compression: Compression::None,
            producers: 2,
            create_topics: true,
            topic_partitions: 3,
            topic_replication: 1,
            extra: BTreeMap::new(),
            cloudevents: None,
        }
    }
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("message_timeout", &self.message_timeout)
            .field("linger", &self.linger)
            .field("small_batch_linger", &self.small_batch_linger)
            .field("small_batch_events", &self.small_batch_events)
            .field("idempotence", &self.idempotence)
            .field("compression", &self.compression)
            .field("producers", &self.producers)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("extra_keys", &self.extra.keys().collect::<Vec<_>>())
            .field("cloudevents", &self.cloudevents)
            .finish()
    }
}

impl KafkaConfig {
    /// The common librdkafka properties.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            // Small requests (a few events, an offset commit) must not wait
            // for the broker's delayed ACK behind Nagle's algorithm.
            .set("socket.nagle.disable", "true")
            // Connection problems are reported through errors we classify;
            // librdkafka's own log lines would repeat them every few ms.
            .set("log_level", "3");
        config
    }

    pub(crate) fn apply_extra(&self, config: &mut ClientConfig) {
        for (key, value) in &self.extra {
            config.set(key, value);
        }
    }

    /// The librdkafka properties of [`crate::KafkaBus`]'s producer, `extra`
    /// applied last: for a producer of one's own that must behave like the
    /// bus's (the benchmark's raw limit does).
    ///
    /// ```
    /// let config = outbox_kafka::KafkaConfig::default();
    /// let properties = config.producer_config();
    /// assert_eq!(properties.get("acks"), Some("all"));
    /// assert_eq!(properties.get("compression.type"), Some("none"));
    /// assert_eq!(properties.get("linger.ms"), Some("5"));
    /// ```
    pub fn producer_config(&self) -> ClientConfig {
        self.producer_config_with_linger(self.linger)
    }

    /// [`KafkaConfig::producer_config`] with another `linger.ms` (the
    /// small-batch producer's).
    pub(crate) fn producer_config_with_linger(&self, linger: Duration) -> ClientConfig {
        let mut config = self.client_config();
        let in_flight = if self.idempotence { "5" } else { "1" };
        config
            .set("enable.idempotence", self.idempotence.to_string())
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", in_flight)
            .set(
                "message.timeout.ms",
                self.message_timeout.as_millis().to_string(),
            )
            // librdkafka takes fractions of a millisecond.
            .set(
                "linger.ms",
                (linger.as_micros() as f64 / 1000.0).to_string(),
            )
            // Same key → same partition as the Java client computes.
            .set("partitioner", "murmur2_random")
            .set("compression.type", self.compression.as_str());
        self.apply_extra(&mut config);
        config
    }
}

/// Compression of the record batches the producer sends
/// (`compression.type`).
///
/// Compression trades the producer's and consumer's CPU for network and
/// broker disk, and what it is worth depends on the broker. On tansu 0.6,
/// which stores every record uncompressed, lz4 cost a fifth of the relay's
/// and more than half of the consumer's throughput, and more than doubled
/// the consumer's memory while it caught up a backlog (`docs/performance.md`):
/// hence the default [`Compression::None`]. On Apache Kafka with a slow
/// network, [`Compression::Lz4`] or [`Compression::Zstd`] usually pays.
///
/// ```
/// use outbox_kafka::Compression;
/// let lz4: Compression = "lz4".parse()?;
/// assert_eq!(lz4, Compression::Lz4);
/// assert_eq!(lz4.to_string(), "lz4");
/// assert!("brotli".parse::<Compression>().is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Batches are sent as they are. Default.
    #[default]
    None,
    /// LZ4: fast, moderate ratio.
    Lz4,
    /// Zstandard: better ratio for more CPU.
    Zstd,
    /// gzip: the most widely supported, the slowest.
    Gzip,
    /// Snappy. Broken in tansu 0.6.0 (its records cannot be read back).
    Snappy,
}

impl Compression {
    /// The value of librdkafka's `compression.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A compression name that is not one of `none`, `lz4`, `zstd`, `gzip`, `snappy`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown compression {0:?}: expected none, lz4, zstd, gzip or snappy")]
pub struct UnknownCompression(pub String);

impl FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            "gzip" => Ok(Compression::Gzip),
            "snappy" => Ok(Compression::Snappy),
            _ => Err(UnknownCompression(text.to_string())),
        }
    }
}

/// How a [`crate::KafkaSubscription`] gets its partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Assignment {
    /// This consumer reads every partition of its topics (`assign`), from the
    /// group's committed positions. No broker-side rebalancing: a restarted
    /// consumer resumes at once, and no partition is ever left with a dead
    /// owner. One consumer per topic. Default.
    #[default]
    AllPartitions,
    /// The broker's consumer group splits partitions among members
    /// (`subscribe`). Scales out, but a partition may briefly have two
    /// writers during a rebalance, and some brokers (tansu 0.6) do not hand a
    /// dead member's partitions to the survivors.
    Group,
    /// Partitions are given by an `outbox_core::Ownership` that the
    /// subscription follows (`outbox_core::Consume::with_ownership`), for
    /// example from `outbox_pg::PartitionLeases`: several consumers
    /// share a topic, each partition with exactly one writer, and a dead
    /// consumer's partitions are taken over by the others.
    Leased,
}

/// Settings of a [`crate::KafkaSubscription`].
///
/// ```
/// let config = outbox_kafka::ConsumerConfig::new("user_events_clickhouse", ["user_events"]);
/// assert_eq!(config.topics, vec!["user_events".to_string()]);
/// ```
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Consumer group.
    pub group_id: String,
    /// Topics to read.
    pub topics: Vec<String>,
    /// `session.timeout.ms`. Default: 10 s.
    pub session_timeout: Duration,
    /// `max.poll.interval.ms`, also the time a rejoining group waits for a
    /// member that died without leaving. Must be at least the session
    /// timeout. Default: 60 s.
    pub max_poll_interval: Duration,
    /// After the first message of a batch arrived, how long to keep
    /// collecting more before handing the batch over. Batches also grow by
    /// themselves under load, since records pile up while the sink writes
    /// the previous batch; zero takes only what was already fetched.
    /// Default: 5 ms.
    pub batch_linger: Duration,
    /// `fetch.wait.max.ms`: how long the broker may hold a fetch that finds
    /// nothing new. Apache Kafka answers as soon as data arrives, so this only
    /// bounds idle polling; tansu 0.6 always waits it out, data or not, so
    /// there it adds to every event's latency. Default: 5 ms.
    pub fetch_wait: Duration,
    /// Most messages librdkafka prefetches ahead of the loop, in KiB
    /// (`queued.max.messages.kbytes`). Bounds the consumer's memory when it
    /// starts far behind; 16 MiB still holds tens of thousands of typical
    /// events. Default: 16384.
    pub prefetch_kbytes: u32,
    /// `fetch.max.bytes`: the most a fetch response may carry. librdkafka
    /// keeps a response's decompressed batches until their last message is
    /// consumed, so this bounds the consumer's memory while it catches up a
    /// backlog, against catch-up speed (more, smaller fetches). It matters
    /// most for compressed topics: tansu 0.6 caps a response by its
    /// *compressed* size, which decompresses to several times that in
    /// memory (measured in `docs/performance.md`). Default: 50 MiB
    /// (librdkafka's).
    pub fetch_max_bytes: u32,
    /// `auto.offset.reset` for partitions without a committed position. Default: `earliest`.
    pub auto_offset_reset: String,
    /// How partitions are obtained. Default: [`Assignment::AllPartitions`].
    pub assignment: Assignment,
}

impl ConsumerConfig {
    /// A consumer of `topics` in group `group_id`, with the defaults.
    pub fn new<I, S>(group_id: impl Into<String>, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            group_id: group_id.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            session_timeout: Duration::from_secs(10),
            max_poll_interval: Duration::from_secs(60),
            batch_linger: Duration::from_millis(5),
            fetch_wait: Duration::from_millis(5),
            prefetch_kbytes: 16 * 1024,
            fetch_max_bytes: 52_428_800,
            auto_offset_reset: "earliest".into(),
            assignment: Assignment::default(),
        }
    }
}
