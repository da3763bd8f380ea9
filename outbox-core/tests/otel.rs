//! One event's trace through the loops, in memory: the service span it was
//! created in, the relay's send span and the consumer's process span, linked
//! as `outbox_core::otel` documents, exported by the SDK's in-memory
//! exporter.

use std::time::Duration;

use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use outbox_core::testing::{MemoryBus, MemoryOutbox, MemorySink};
use outbox_core::{otel, Consume, ConsumeConfig, Event, Relay, RelayConfig};
use tokio_util::sync::CancellationToken;

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

async fn run_pipeline(events: Vec<Event>, spans: bool) {
    let outbox = MemoryOutbox::new();
    outbox.push(events);
    let bus = MemoryBus::new(2);
    let relay = Relay::new(
        outbox.clone(),
        bus.clone(),
        RelayConfig {
            stop_when_idle: true,
            otel_spans: spans,
            ..RelayConfig::default()
        },
    );
    relay.run(CancellationToken::new()).await.unwrap();
    let sink = MemorySink::new();
    let mut consume = Consume::new(
        bus.subscribe("orders"),
        sink.clone(),
        ConsumeConfig {
            max_wait: Duration::from_millis(5),
            stop_after_idle: Some(Duration::from_millis(100)),
            otel_spans: spans,
            ..ConsumeConfig::default()
        },
    );
    consume.run(CancellationToken::new()).await.unwrap();
    assert_eq!(sink.rows().len(), 3);
}

/// Invariant: with spans on, the relay's `send orders` span (PRODUCER) and
/// the consumer's `process orders` span (CONSUMER) each link to the span the
/// service created its event in, the link naming the event, its partition
/// and its offset; an event created outside any trace adds no link; with
/// spans off, the loops make none.
#[tokio::test]
async fn an_events_trace_links_the_service_the_relay_and_the_consumer() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());

    // The service: an order placed inside its request's span.
    let service = provider.tracer("service").start("place order");
    let cx = Context::current_with_span(service);
    let traced = {
        let _in_request = cx.clone().attach();
        otel::with_current_trace(&[Event::new("orders", "{\"n\":1}").with_key("a")]).into_owned()
    };
    let service_span = cx.span().span_context().clone();
    cx.span().end();
    let event_id = traced[0].id;
    let mut events = traced;
    events.push(Event::new("orders", "{\"n\":2}").with_key("b"));
    events.push(Event::new("orders", "{\"n\":3}").with_key("a"));

    run_pipeline(events.clone(), false).await;
    provider.force_flush().unwrap();
    let without: Vec<String> = exporter
        .get_finished_spans()
        .unwrap()
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(
        without,
        vec!["place order"],
        "spans off: only the service's"
    );
    exporter.reset();

    run_pipeline(events, true).await;
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let find = |name: &str| -> &SpanData {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no span {name}: {spans:?}"))
    };
    for (name, kind) in [
        ("send orders", SpanKind::Producer),
        ("process orders", SpanKind::Consumer),
    ] {
        let span = find(name);
        assert_eq!(span.span_kind, kind, "{name}");
        assert_eq!(
            attribute(&span.attributes, "messaging.system"),
            Some(&Value::from("kafka"))
        );
        assert_eq!(
            attribute(&span.attributes, "messaging.batch.message_count"),
            Some(&Value::I64(3))
        );
        assert_ne!(
            span.span_context.trace_id(),
            service_span.trace_id(),
            "{name} starts its own trace"
        );
        let links = &span.links.links;
        println!(
            "{name}: trace {} links {:?}",
            span.span_context.trace_id(),
            links
                .iter()
                .map(|l| (l.span_context.trace_id(), l.span_context.span_id()))
                .collect::<Vec<_>>()
        );
        assert_eq!(links.len(), 1, "{name}: one traced event, one link");
        let link = &links[0];
        assert_eq!(link.span_context.trace_id(), service_span.trace_id());
        assert_eq!(link.span_context.span_id(), service_span.span_id());
        assert_eq!(
            attribute(&link.attributes, "messaging.message.id"),
            Some(&Value::from(event_id.to_string()))
        );
        assert!(attribute(&link.attributes, "messaging.destination.partition.id").is_some());
        assert!(attribute(&link.attributes, "messaging.kafka.offset").is_some());
    }
}
