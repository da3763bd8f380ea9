//! Events remember the trace they were created in (feature `otel`, on in
//! `make test`): `enqueue` and `emit` write the caller's W3C trace context
//! into the headers of each event without one.

use opentelemetry::trace::{
    FutureExt as _, SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use outbox_core::Event;
use outbox_pg::Outbox;

use super::setup;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

fn in_a_request() -> opentelemetry::Context {
    let span = SpanContext::new(
        TraceId::from_hex(TRACE).unwrap(),
        SpanId::from_hex(SPAN).unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    opentelemetry::Context::new().with_remote_span_context(span)
}

/// Invariant: inside a span, the stored headers (outbox table) and the
/// emitted messages (WAL) carry `traceparent` of that span; an event that
/// brings its own keeps it; outside any span nothing is added.
#[tokio::test]
async fn enqueue_and_emit_record_the_callers_trace_context() {
    let (pool, config) = setup("otel").await;
    let outbox = Outbox::new(&config);
    let mut client = pool.get().await.unwrap();
    let expected = format!("00-{TRACE}-{SPAN}-01");
    let own = "00-11111111111111111111111111111111-2222222222222222-01";
    let traced = Event::new("t", "{}");
    let brought = Event::new("t", "{}").with_header("traceparent", own);
    let untraced = Event::new("t", "{}");
    outbox
        .enqueue(&client, &[traced.clone(), brought.clone()])
        .with_context(in_a_request())
        .await
        .unwrap();
    outbox
        .enqueue(&client, std::slice::from_ref(&untraced))
        .await
        .unwrap();
    let header = |id: uuid::Uuid| {
        let client = &client;
        let table = config.table.clone();
        async move {
            client
                .query_one(
                    &format!("SELECT headers->>'traceparent' FROM {table} WHERE event_id = $1"),
                    &[&id],
                )
                .await
                .unwrap()
                .get::<_, Option<String>>(0)
        }
    };
    let stored = (
        header(traced.id).await,
        header(brought.id).await,
        header(untraced.id).await,
    );
    println!("stored traceparents: {stored:?}");
    assert_eq!(
        stored,
        (Some(expected.clone()), Some(own.to_string()), None)
    );

    // The table-free outbox: the message in the WAL carries the header.
    let slot = "t_otel_slot";
    client
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}';
             SELECT pg_create_logical_replication_slot('{slot}', 'test_decoding');"
        ))
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    outbox
        .emit(&tx, &[Event::new("t", "{}")])
        .with_context(in_a_request())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let changes: Vec<Vec<u8>> = client
        .query(
            "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL)",
            &[&slot],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    test_support::drop_slot(&client, slot).await.unwrap();
    let message = changes
        .iter()
        .find(|data| data.starts_with(b"message: transactional: 1"))
        .expect("the emitted message");
    let contains = |needle: &[u8]| message.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"traceparent") && contains(expected.as_bytes()));
}

/// Invariant: the sqlx form records the caller's trace context as the
/// tokio-postgres form does.
#[cfg(feature = "sqlx")]
#[tokio::test]
async fn enqueue_sqlx_records_the_callers_trace_context() {
    let (pool, config) = setup("otel_sqlx").await;
    let pg = super::pg_config();
    let url = format!(
        "postgres://{}:{}@{}:{}/{}?sslmode=disable",
        pg.user, pg.password, pg.host, pg.port, pg.dbname
    );
    let sqlx_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let outbox = Outbox::new(&config);
    let event = Event::new("t", "{}");
    let mut tx = sqlx_pool.begin().await.unwrap();
    outbox
        .enqueue_sqlx(&mut tx, std::slice::from_ref(&event))
        .with_context(in_a_request())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let client = pool.get().await.unwrap();
    let stored: Option<String> = client
        .query_one(
            &format!(
                "SELECT headers->>'traceparent' FROM {} WHERE event_id = $1",
                config.table
            ),
            &[&event.id],
        )
        .await
        .unwrap()
        .get(0);
    println!("stored by sqlx: {stored:?}");
    assert_eq!(stored, Some(format!("00-{TRACE}-{SPAN}-01")));
}
