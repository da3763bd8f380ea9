//! Events published in the CloudEvents Kafka protocol binding, binary mode
//! (CloudEvents 1.0): the payload stays the record's value, the context
//! attributes travel as `ce_`-prefixed headers.
//!
//! | header | value |
//! |---|---|
//! | `ce_specversion` | `1.0` |
//! | `ce_id` | the event id |
//! | `ce_source` | the event's `ce_source` header, else [`CloudEventsConfig::source`] |
//! | `ce_type` | the event's `ce_type` header, else the topic |
//! | `ce_time` | the event's creation time (the commit time for the WAL source), RFC 3339 in UTC |
//! | `content-type` | the event's `content-type` header (`application/json` for [`outbox_core::Event::json`]), when it has one |
//!
//! Other attributes (`ce_subject`, extensions) are headers the event
//! carries itself. The relay's own `outbox-event-id` and
//! `outbox-created-at-ms` headers stay: CloudEvents consumers ignore headers
//! without the `ce_` prefix.
//!
//! Written by hand rather than with the `cloudevents-sdk` crate: its Kafka
//! binding is built on an older `rdkafka` (0.38, where this crate uses
//! 0.39), which would compile librdkafka twice, and its core alone would
//! add a second event model to fill six headers.

use std::collections::BTreeSet;

use outbox_core::Event;

/// The binding's version header.
pub const CE_SPECVERSION: &str = "ce_specversion";
/// The event id header.
pub const CE_ID: &str = outbox_core::HEADER_CE_ID;
/// The event source header.
pub const CE_SOURCE: &str = outbox_core::HEADER_CE_SOURCE;
/// The event type header.
pub const CE_TYPE: &str = "ce_type";
/// The event time header.
pub const CE_TIME: &str = "ce_time";

/// Which events are published as CloudEvents, and their source.
///
/// ```
/// use outbox_kafka::CloudEventsConfig;
///
/// let config = CloudEventsConfig {
///     source: "/orders-service".into(),
///     ..CloudEventsConfig::default()
/// };
/// assert!(config.applies_to("orders"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloudEventsConfig {
    /// `ce_source` of events that do not carry their own: a URI reference
    /// naming the producer (`/orders-service`, `urn:example:orders`).
    pub source: String,
    /// Topics whose events are published as CloudEvents; empty: every topic.
    pub topics: BTreeSet<String>,
}

impl CloudEventsConfig {
    /// Whether events of `topic` are published as CloudEvents.
    pub fn applies_to(&self, topic: &str) -> bool {
        self.topics.is_empty() || self.topics.contains(topic)
    }

    /// Checks the source: CloudEvents requires a non-empty one.
    pub fn validate(&self) -> Result<(), String> {
        if self.source.trim().is_empty() {
            return Err("the CloudEvents source must not be empty (a URI reference such as /orders-service)".into());
        }
        Ok(())
    }

    /// The `ce_` headers of `event` that it does not carry itself, in the
    /// order they are sent.
    pub fn headers(&self, event: &Event) -> Vec<(&'static str, String)> {
        let mut headers = vec![(CE_SPECVERSION, "1.0".to_string())];
        headers.push((CE_ID, event.id.to_string()));
        if !event.headers.contains_key(CE_SOURCE) {
            headers.push((CE_SOURCE, self.source.clone()));
        }
        if !event.headers.contains_key(CE_TYPE) {
            headers.push((CE_TYPE, event.topic.clone()));
        }
        if !event.headers.contains_key(CE_TIME) {
            headers.push((CE_TIME, rfc3339_utc(event.created_at_ms())));
        }
        headers
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 in UTC
/// (`2024-05-01T09:00:00.123Z`).
fn rfc3339_utc(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60);
    let (s, milli) = (ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(1_714_554_000_123), "2024-05-01T09:00:00.123Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_utc(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn an_events_own_attributes_win() {
        let config = CloudEventsConfig {
            source: "/svc".into(),
            topics: BTreeSet::from(["orders".to_string()]),
        };
        let plain = Event::new("orders", "{}");
        let headers = config.headers(&plain);
        let names: Vec<&str> = headers.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, [CE_SPECVERSION, CE_ID, CE_SOURCE, CE_TYPE, CE_TIME]);
        assert_eq!(headers[1].1, plain.id.to_string());
        assert_eq!(headers[3].1, "orders");
        let own = Event::new("orders", "{}")
            .with_header(CE_TYPE, "com.example.order.placed")
            .with_header(CE_SOURCE, "/checkout");
        let names: Vec<&str> = config.headers(&own).iter().map(|(k, _)| *k).collect();
        assert_eq!(names, [CE_SPECVERSION, CE_ID, CE_TIME]);
        assert!(!config.applies_to("payments"));
        assert!(config.validate().is_ok());
        assert!(CloudEventsConfig::default().validate().is_err());
    }
}
