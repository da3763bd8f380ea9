#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod backoff;
mod bus;
mod consume;
mod dedup;
mod error;
mod event;
mod health;
mod key_order;
mod lease;
pub mod metrics_catalog;
#[cfg(feature = "otel")]
pub mod otel;
mod periodic;
mod relay;
mod sink;
mod source;
#[cfg(feature = "testing")]
pub mod testing;

pub use backoff::Backoff;
pub use bus::{Bus, Checkpoint, DecodeError, Delivery, Position, Record, Subscription};
pub use consume::{checkpoint_after, Consume, ConsumeConfig, ConsumeStats};
pub use dedup::RecentIds;
pub use error::{BoxError, Error, ErrorChain, Result, Stage};
pub use event::{
    ms_to_system_time, system_time_to_ms, Event, CLOUDEVENTS_ID_NAMESPACE, CONTENT_TYPE_JSON,
    HEADER_CE_ID, HEADER_CE_SOURCE, HEADER_CONTENT_TYPE, HEADER_CREATED_AT_MS, HEADER_EVENT_ID,
};
pub use health::{ComponentState, Health};
pub use key_order::{hold_back_after_failures, keys_with_order_gaps, probe_failing_keys};
pub use lease::{ownership, Granter, Lease, Ownership};
pub use periodic::every;
pub use relay::{check_claim_outlives_publish, Relay, RelayConfig, RelayStats};
pub use sink::{Sink, WriteReport};
pub use source::{AckSummary, Claimed, Source};
