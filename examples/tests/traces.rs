//! One event's trace from the service's transaction to its ClickHouse row,
//! across three processes that export over OTLP/HTTP (protobuf) to a
//! receiver this test runs.

mod common;

use std::convert::Infallible;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;

/// A link as received: trace id, span id, attributes.
type ReceivedLink = (String, String, Vec<(String, String)>);

/// A span as received: service, name, kind, ids, links.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    links: Vec<ReceivedLink>,
}

fn text(attributes: &[KeyValue]) -> Vec<(String, String)> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// An OTLP/HTTP receiver on a free port, keeping every span it is sent.
async fn receiver() -> (u16, Arc<Mutex<Vec<Received>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
    let store = spans.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            use http_body_util::BodyExt as _;
                            let path = request.uri().path().to_string();
                            let body = request.into_body().collect().await.map(|b| b.to_bytes());
                            if let (Ok(body), "/v1/traces") = (body, path.as_str()) {
                                let export = ExportTraceServiceRequest::decode(body).unwrap();
                                let mut spans = store.lock().unwrap();
                                for resource in export.resource_spans {
                                    let service = resource
                                        .resource
                                        .map(|r| text(&r.attributes))
                                        .unwrap_or_default()
                                        .into_iter()
                                        .find(|(k, _)| k == "service.name")
                                        .map(|(_, v)| v)
                                        .unwrap_or_default();
                                    for scope in resource.scope_spans {
                                        for span in scope.spans {
                                            spans.push(Received {
                                                service: service.clone(),
                                                name: span.name,
                                                kind: span.kind,
                                                trace_id: hex(&span.trace_id),
                                                span_id: hex(&span.span_id),
                                                links: span
                                                    .links
                                                    .iter()
                                                    .map(|l| {
                                                        (
                                                            hex(&l.trace_id),
                                                            hex(&l.span_id),
                                                            text(&l.attributes),
                                                        )
                                                    })
                                                    .collect(),
                                            });
                                        }
                                    }
                                }
                            }
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/x-protobuf")
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Invariants: an event enqueued by `service_enqueue` inside its span is
/// followed by the trace export of all three binaries: the relay's `send`
/// span (PRODUCER) and the consumer's `process` span (CONSUMER) each link
/// to the service's span (same trace id and span id), once per event with
/// the event's id; and every ClickHouse row of the route stores the
/// service's trace id (`--trace-id-column`).
#[tokio::test]
async fn one_events_trace_is_followed_from_enqueue_to_insert() {
    let name = unique("trace");
    // service_enqueue writes the demo's business table: the schema of
    // init.sql (idempotent), which a fresh stack does not have yet.
    let pool = pg().create_pool().unwrap();
    pool.get()
        .await
        .unwrap()
        .batch_execute(include_str!("../../init.sql"))
        .await
        .unwrap();
    let (port, spans) = receiver().await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let with_traces = |binary: &str| {
        let mut cmd = command(binary);
        cmd.args(["--otlp-endpoint", &endpoint])
            // Export within a quarter of a second instead of 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "250");
        cmd
    };
    let mut relay = with_traces("producer_pg_to_kafka")
        .args(["--source", "outbox", "--outbox-table", &name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let mut consumer = with_traces("consumer_to_clickhouse")
        .args(["--topic", &name, "--clickhouse-table", &name])
        .args(["--group-id", &unique("g"), "--format", "table"])
        .args([
            "--create-columns",
            "id Int64, username String, event_type String, event_time String, trace_id String",
            "--trace-id-column",
            "trace_id",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    // Awaited, not blocking: this runtime also serves the OTLP receiver the
    // service exports to before it exits.
    let output = tokio::process::Command::from(with_traces("service_enqueue"))
        .args(["--outbox-table", &name, "--topic", &name, "--count", "3"])
        .args(["--username", "traced"])
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let trace_id = said
        .split("(trace ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no trace id in {said:?}"))
        .to_string();

    within(Duration::from_secs(60), "three rows in ClickHouse", async {
        while ch_query(&format!("EXISTS TABLE `{name}` FORMAT TabSeparated")).await != "1"
            || ch_count(&name).await < 3
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let find = |service: &str, kind: SpanKind| {
        spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| {
                s.service == service
                    && s.kind == kind as i32
                    && s.links.iter().any(|(t, _, _)| *t == trace_id)
            })
            .cloned()
    };
    let (service, send, process) = within(Duration::from_secs(30), "the exported spans", async {
        loop {
            let service = spans
                .lock()
                .unwrap()
                .iter()
                .find(|s| s.service == "service_enqueue" && s.trace_id == trace_id)
                .cloned();
            let send = find("producer_pg_to_kafka", SpanKind::Producer);
            let process = find("consumer_to_clickhouse", SpanKind::Consumer);
            if let (Some(a), Some(b), Some(c)) = (service, send, process) {
                return (a, b, c);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    println!(
        "service span: {} {} in trace {}",
        service.name, service.span_id, service.trace_id
    );
    for span in [&send, &process] {
        println!(
            "{}: {} (trace {}) links {:?}",
            span.service, span.name, span.trace_id, span.links
        );
        assert_eq!(
            span.name,
            format!(
                "{} {name}",
                if span.kind == SpanKind::Producer as i32 {
                    "send"
                } else {
                    "process"
                }
            )
        );
        let to_service: Vec<_> = span
            .links
            .iter()
            .filter(|(t, s, _)| *t == trace_id && *s == service.span_id)
            .collect();
        assert_eq!(
            to_service.len(),
            3,
            "one link per event to the service's span"
        );
        for (_, _, attributes) in to_service {
            assert!(attributes.iter().any(|(k, _)| k == "messaging.message.id"));
            assert!(attributes
                .iter()
                .any(|(k, _)| k == "messaging.kafka.offset"));
        }
    }
    let stored = ch_query(&format!(
        "SELECT groupUniqArray(trace_id), count() FROM `{name}` FORMAT TabSeparated"
    ))
    .await;
    println!("ClickHouse trace ids and rows: {stored}");
    assert_eq!(stored, format!("['{trace_id}']\t3"));

    for child in [&mut relay.0, &mut consumer.0] {
        let status = terminate(child, Duration::from_secs(15));
        assert!(matches!(status, Some(s) if s.success()), "{status:?}");
    }
    let client = pool.get().await.unwrap();
    let _ = client
        .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
        .await;
}
