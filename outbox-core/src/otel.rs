//! Trace context across the pipeline (feature `otel`).
//!
//! An event remembers the trace it was created in: `Outbox::enqueue`,
//! `enqueue_json` and `emit` (outbox-pg, with its `otel` feature) write the
//! caller's current OpenTelemetry context into the event's headers as W3C
//! `traceparent` (and `tracestate`), unless the event carries one already.
//! The headers travel with the event to Kafka and to the consumer.
//!
//! The relay's send of a batch and the consumer's write of a batch each make
//! one span, **linked** to the creation context of every event in it, as the
//! OpenTelemetry messaging conventions prescribe for batches: a batch holds
//! events of many traces, and a span has one parent but any number of links.
//! Each link carries the event's id, partition and offset. So a service's
//! trace shows, through its links, the relay span that published its event
//! and the consumer span that wrote it.
//!
//! The spans go to the global tracer provider (`opentelemetry::global`), and
//! only when the loop is told to make them ([`RelayConfig::otel_spans`],
//! [`ConsumeConfig::otel_spans`]): off, the loops do not look at headers.
//!
//! [`RelayConfig::otel_spans`]: crate::RelayConfig::otel_spans
//! [`ConsumeConfig::otel_spans`]: crate::ConsumeConfig::otel_spans
//!
//! ```
//! use outbox_core::{otel, Event};
//! use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
//!
//! let service = SpanContext::new(
//!     TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736")?,
//!     SpanId::from_hex("00f067aa0ba902b7")?,
//!     TraceFlags::SAMPLED,
//!     true,
//!     TraceState::default(),
//! );
//! let _in_the_service = opentelemetry::Context::new().with_remote_span_context(service).attach();
//! let events = [Event::new("orders", "{}")];
//! let stamped = otel::with_current_trace(&events);
//! assert_eq!(
//!     stamped[0].headers["traceparent"],
//!     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
//! );
//! let created = otel::creation_context(&stamped[0].headers).ok_or("no trace context")?;
//! assert_eq!(created.span_id(), SpanId::from_hex("00f067aa0ba902b7")?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Link, SpanContext, SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;

use crate::{Delivery, Event, Record};

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C vendor trace state header.
pub const TRACESTATE: &str = "tracestate";
/// The instrumentation scope of the pipeline's spans.
pub const SCOPE: &str = "outbox";

/// The caller's current trace context as W3C headers; empty outside a valid
/// span.
pub fn current_trace_headers() -> Vec<(String, String)> {
    let cx = Context::current();
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    let mut headers: Vec<(String, String)> = carrier.into_iter().collect();
    headers.sort();
    headers
}

/// `events` with the caller's current trace context in the headers of each
/// that has no `traceparent` yet; borrowed unchanged outside a span.
pub fn with_current_trace(events: &[Event]) -> Cow<'_, [Event]> {
    if events.iter().all(|e| e.headers.contains_key(TRACEPARENT)) {
        return Cow::Borrowed(events);
    }
    let trace = current_trace_headers();
    if trace.is_empty() {
        return Cow::Borrowed(events);
    }
    Cow::Owned(
        events
            .iter()
            .map(|event| {
                let mut event = event.clone();
                if !event.headers.contains_key(TRACEPARENT) {
                    for (name, value) in &trace {
                        event.headers.insert(name.clone(), value.clone());
                    }
                }
                event
            })
            .collect(),
    )
}

/// The span context an event was created in, from its `traceparent` (and
/// `tracestate`); `None` when absent or malformed.
pub fn creation_context(headers: &BTreeMap<String, String>) -> Option<SpanContext> {
    let value = headers.get(TRACEPARENT)?;
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert(TRACEPARENT.to_string(), value.clone());
    if let Some(state) = headers.get(TRACESTATE) {
        carrier.insert(TRACESTATE.to_string(), state.clone());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// The trace id (32 lowercase hex digits) of an event's `traceparent`.
pub fn trace_id(headers: &BTreeMap<String, String>) -> Option<String> {
    creation_context(headers).map(|cx| cx.trace_id().to_string())
}

/// Records the relay's send of `events` (from `started`), linked to each
/// event's creation context, with the broker's answer on each.
pub(crate) fn record_send(events: &[Event], deliveries: &[Delivery], started: SystemTime) {
    let links = events
        .iter()
        .zip(deliveries)
        .filter_map(|(event, delivery)| {
            let cx = creation_context(&event.headers)?;
            let mut attributes = vec![KeyValue::new("messaging.message.id", event.id.to_string())];
            if let Delivery::Acknowledged(position) = delivery {
                attributes.push(KeyValue::new(
                    "messaging.destination.partition.id",
                    position.partition.to_string(),
                ));
                attributes.push(KeyValue::new("messaging.kafka.offset", position.offset));
            }
            Some(Link::new(cx, attributes, 0))
        })
        .collect();
    let acknowledged = deliveries.iter().filter(|d| d.is_acknowledged()).count();
    let mut attributes = vec![
        KeyValue::new("messaging.system", "kafka"),
        KeyValue::new("messaging.operation.type", "send"),
        KeyValue::new("messaging.operation.name", "send"),
        KeyValue::new("messaging.batch.message_count", events.len() as i64),
        KeyValue::new("outbox.acknowledged_count", acknowledged as i64),
    ];
    let topic = single_topic(events.iter().map(|e| e.topic.as_str()));
    if let Some(topic) = topic {
        attributes.push(KeyValue::new(
            "messaging.destination.name",
            topic.to_string(),
        ));
    }
    end_span(
        span_name("send", topic),
        SpanKind::Producer,
        started,
        attributes,
        links,
    );
}

/// Records the consumer's write of `records` into its sink (from
/// `started`), linked to each record's creation context.
pub(crate) fn record_process(records: &[Record], started: SystemTime, written: usize) {
    let links = records
        .iter()
        .filter_map(|record| {
            let cx = creation_context(&record.headers)?;
            let mut attributes = vec![
                KeyValue::new(
                    "messaging.destination.partition.id",
                    record.position.partition.to_string(),
                ),
                KeyValue::new("messaging.kafka.offset", record.position.offset),
            ];
            if let Some(id) = record.headers.get(crate::HEADER_EVENT_ID) {
                attributes.push(KeyValue::new("messaging.message.id", id.clone()));
            }
            Some(Link::new(cx, attributes, 0))
        })
        .collect();
    let mut attributes = vec![
        KeyValue::new("messaging.system", "kafka"),
        KeyValue::new("messaging.operation.type", "process"),
        KeyValue::new("messaging.operation.name", "process"),
        KeyValue::new("messaging.batch.message_count", records.len() as i64),
        KeyValue::new("outbox.rows_written", written as i64),
    ];
    let topic = single_topic(records.iter().map(|r| r.topic.as_str()));
    if let Some(topic) = topic {
        attributes.push(KeyValue::new(
            "messaging.destination.name",
            topic.to_string(),
        ));
    }
    end_span(
        span_name("process", topic),
        SpanKind::Consumer,
        started,
        attributes,
        links,
    );
}

fn single_topic<'a>(mut topics: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let first = topics.next()?;
    topics.all(|t| t == first).then_some(first)
}

fn span_name(operation: &str, topic: Option<&str>) -> String {
    match topic {
        Some(topic) => format!("{operation} {topic}"),
        None => operation.to_string(),
    }
}

fn end_span(
    name: String,
    kind: SpanKind,
    started: SystemTime,
    attributes: Vec<KeyValue>,
    links: Vec<Link>,
) {
    let tracer = opentelemetry::global::tracer(SCOPE);
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_start_time(started)
        .with_attributes(attributes)
        .with_links(links)
        // A batch span starts a trace of its own: the events' traces reach
        // it through the links.
        .start_with_context(&tracer, &Context::new());
    drop(span);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_or_absent_trace_context_is_none() {
        let mut headers = BTreeMap::new();
        assert!(creation_context(&headers).is_none());
        headers.insert(
            TRACEPARENT.to_string(),
            "00-zz-00f067aa0ba902b7-01".to_string(),
        );
        assert!(creation_context(&headers).is_none());
        headers.insert(
            TRACEPARENT.to_string(),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_string(),
        );
        assert!(
            creation_context(&headers).is_none(),
            "an all-zero trace id is invalid"
        );
    }

    #[test]
    fn outside_a_span_events_are_borrowed_unchanged() {
        let events = [Event::new("t", "{}")];
        assert!(matches!(with_current_trace(&events), Cow::Borrowed(_)));
        assert!(current_trace_headers().is_empty());
    }

    #[test]
    fn an_event_keeps_the_trace_context_it_carries() -> Result<(), Box<dyn std::error::Error>> {
        let service = SpanContext::new(
            opentelemetry::trace::TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736")?,
            opentelemetry::trace::SpanId::from_hex("00f067aa0ba902b7")?,
            opentelemetry::trace::TraceFlags::SAMPLED,
            true,
            Default::default(),
        );
        let _cx = Context::new().with_remote_span_context(service).attach();
        let own = "00-11111111111111111111111111111111-2222222222222222-01";
        let events = [
            Event::new("t", "{}").with_header(TRACEPARENT, own),
            Event::new("t", "{}"),
        ];
        let stamped = with_current_trace(&events);
        assert_eq!(stamped[0].headers[TRACEPARENT], own);
        assert_eq!(
            trace_id(&stamped[1].headers).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        Ok(())
    }
}
