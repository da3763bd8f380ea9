#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod admin;
mod bus;
pub mod cloudevents;
mod config;
mod context;
mod error;
mod pool;
mod subscription;

pub use admin::{ensure_topics, topic_partitions, LagProbe, PartitionLag};
pub use bus::KafkaBus;
pub use cloudevents::CloudEventsConfig;
pub use config::{Assignment, Compression, ConsumerConfig, KafkaConfig, UnknownCompression};
pub use error::{is_permanent_delivery_code, is_permanent_kafka, BusError};
pub use subscription::KafkaSubscription;

/// Re-exported so users name the same client types as this crate.
pub use rdkafka;
