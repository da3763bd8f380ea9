//! Rows driven by the table ([`TableRows`]) against the real ClickHouse:
//! every type the server has, in and out with the same value; every misfit
//! dead-lettered with its column and reason while the rest flows; a column
//! added while the sink runs; tables the sink cannot write refused at start.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use outbox_core::{Position, Record, Sink, HEADER_EVENT_ID};
use sink_clickhouse::{
    ClickHouseConfig, ClickHouseSink, MissingField, SinkError, TableRows, TableRowsConfig,
    UnknownField,
};
use uuid::Uuid;

const META: &str = "event_id UUID, kafka_partition Int32, kafka_offset Int64, ingested_at DateTime";

fn config(name: &str) -> ClickHouseConfig {
    super::config(&format!("rows_{name}"))
}

/// Drops the test's tables and creates its data table with `columns`.
async fn table(name: &str, columns: &str) -> clickhouse::Client {
    let config = config(name);
    let client = super::drop_tables(&config).await;
    if !columns.is_empty() {
        client
            .query(&format!(
                "CREATE TABLE `{}` ({columns}) ENGINE = MergeTree() ORDER BY (kafka_partition, kafka_offset)",
                config.table
            ))
            .with_setting("allow_experimental_low_cardinality_type", "1")
            .execute()
            .await
            .unwrap();
    }
    client
}

async fn sink(name: &str, rows: TableRowsConfig) -> Result<ClickHouseSink<TableRows>, SinkError> {
    ClickHouseSink::new(config(name).validate()?, TableRows::new(rows)).await
}

fn record(offset: i64, payload: &str) -> Record {
    let mut headers = BTreeMap::new();
    headers.insert(HEADER_EVENT_ID.to_string(), Uuid::now_v7().to_string());
    Record {
        topic: "rows".into(),
        position: Position {
            partition: 0,
            offset,
        },
        key: None,
        payload: Some(Bytes::from(payload.to_string())),
        headers,
        timestamp_ms: Some(1_700_000_000_000),
    }
}

async fn tsv(client: &clickhouse::Client, sql: &str) -> String {
    let mut cursor = client.query(sql).fetch_bytes("TSV").unwrap();
    let bytes = cursor.collect().await.unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Invariant: each value written through the table-driven encoder reads
/// back from ClickHouse as the same value, for every type ClickHouse 18.16
/// has (newer types are checked on chdb), at both ends of their ranges and
/// as NULL.
#[tokio::test]
async fn every_type_round_trips_with_its_value() {
    let columns = format!(
        "i8 Int8, i16 Int16, i32 Int32, i64 Int64, u8 UInt8, u16 UInt16, u32 UInt32, u64 UInt64, \
         f32 Float32, f64 Float64, d32 Decimal(9, 2), d64 Decimal(18, 4), d128 Decimal(38, 10), \
         s String, fs FixedString(4), id UUID, day Date, at DateTime, \
         e8 Enum8('a' = 1, 'b' = -2), e16 Enum16('x' = 1000, 'y' = 2000), \
         n Nullable(Int32), ns Nullable(String), lc LowCardinality(String), \
         arr Array(Nullable(UInt8)), nested Array(Array(String)), tup Tuple(UInt8, String), {META}"
    );
    let client = table("types", &columns).await;
    let mut sink = sink("types", TableRowsConfig::default()).await.unwrap();
    let high = r#"{"i8": -128, "i16": 32767, "i32": -2147483648, "i64": "9223372036854775807",
        "u8": 255, "u16": 65535, "u32": 4294967295, "u64": "18446744073709551615",
        "f32": 1.5, "f64": -2.25e-300, "d32": "-9999999.99", "d64": 12.5,
        "d128": "1234567890123456789012345678.0123456789", "s": "tab\there é",
        "fs": "ab", "id": "00112233-4455-6677-8899-aabbccddeeff", "day": "2149-06-06",
        "at": "2024-01-02T05:04:05+02:00", "e8": "b", "e16": "y", "n": 7, "ns": "x",
        "lc": "low", "arr": [1, null, 255], "nested": [["a"], [], ["b", "c"]], "tup": [9, "t"]}"#;
    let low = r#"{"i8": 127, "i64": -1, "f32": "-inf", "f64": 0.1, "d32": 0.01, "d128": "-1e-10",
        "s": {"json": [1, 2]}, "fs": "abcd", "day": "1970-01-01", "at": 0, "e8": 1,
        "n": null, "ns": null, "arr": [], "nested": [], "tup": [0, ""]}"#;
    let report = sink
        .write(&[record(0, high), record(1, low)])
        .await
        .unwrap();
    assert_eq!(
        (report.written, report.dead_lettered.len()),
        (2, 0),
        "{report:?}"
    );
    let got = tsv(
        &client,
        "SELECT i8, i16, i32, i64, u8, u16, u32, u64, f32, hex(reinterpretAsString(f64)), d32, d64, d128, s, \
           hex(fs), id, toUInt16(day), toUnixTimestamp(at), e8, e16, n, ns, lc, \
           arr, nested, tup \
         FROM it_rows_types ORDER BY kafka_offset",
    )
    .await;
    // A float by its bytes and dates by their day number: ClickHouse 18.16
    // prints (and parses) some floats and the ends of Date's range its own way.
    let f64_bytes =
        |f: f64| -> String { f.to_le_bytes().iter().map(|b| format!("{b:02X}")).collect() };
    let expected = [
        &*format!("-128\t32767\t-2147483648\t9223372036854775807\t255\t65535\t4294967295\t18446744073709551615\t\
         1.5\t{}\t-9999999.99\t12.5000\t1234567890123456789012345678.0123456789\ttab\\there é\t\
         61620000\t00112233-4455-6677-8899-aabbccddeeff\t65535\t1704164645\tb\ty\t7\tx\tlow\t\
         [1,NULL,255]\t[['a'],[],['b','c']]\t(9,'t')", f64_bytes(-2.25e-300)),
        &*format!("127\t0\t0\t-1\t0\t0\t0\t0\t-inf\t{}\t0.01\t0.0000\t-0.0000000001\t{{\"json\":[1,2]}}\t\
         61626364\t00000000-0000-0000-0000-000000000000\t0\t0\ta\tx\t\\N\t\\N\t\t\
         []\t[]\t(0,'')", f64_bytes(0.1)),
    ];
    let lines: Vec<&str> = got.lines().collect();
    println!("{got}");
    assert_eq!(lines, expected);
}

/// Invariant (poison isolated): a value that does not fit its column, a
/// payload that is not a JSON object, and (on a strict route) a missing or
/// unknown field dead-letter their one record with the column and the
/// reason; every other record of the batch is written, once.
#[tokio::test]
async fn misfits_are_dead_lettered_with_their_column_and_the_rest_flows() {
    let client = table(
        "misfits",
        &format!("n UInt8, day Date, tags Array(String), {META}"),
    )
    .await;
    let strict = TableRowsConfig {
        missing: MissingField::DeadLetter,
        unknown: UnknownField::DeadLetter,
        ..TableRowsConfig::default()
    };
    let mut sink = sink("misfits", strict).await.unwrap();
    let good = r#"{"n": 1, "day": "2024-01-02", "tags": ["a"]}"#;
    let records = [
        record(0, good),
        record(1, r#"{"n": 256, "day": "2024-01-02", "tags": []}"#),
        record(2, r#"{"n": 1, "day": "2024-02-30", "tags": []}"#),
        record(3, r#"{"n": 1, "day": "2024-01-02", "tags": "a"}"#),
        record(4, r#"{"n": 1, "tags": []}"#),
        record(
            5,
            r#"{"n": 1, "day": "2024-01-02", "tags": [], "extra": true}"#,
        ),
        record(6, "[1, 2]"),
        record(7, "not json"),
        record(8, good),
    ];
    let report = sink.write(&records).await.unwrap();
    let reasons: BTreeMap<i64, String> = report
        .dead_lettered
        .iter()
        .map(|(p, r)| (p.offset, r.clone()))
        .collect();
    println!("written={} dead_lettered={reasons:#?}", report.written);
    assert_eq!(report.written, 2);
    assert_eq!(
        reasons.keys().copied().collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6, 7]
    );
    assert!(
        reasons[&1].contains("column \"n\" (UInt8)") && reasons[&1].contains("out of the range")
    );
    assert!(reasons[&2].contains("column \"day\" (Date)") && reasons[&2].contains("not a date"));
    assert!(reasons[&3].contains("column \"tags\"") && reasons[&3].contains("expected an array"));
    assert!(reasons[&4].contains("column \"day\"") && reasons[&4].contains("missing"));
    assert!(reasons[&5].contains("fields without a column: extra"));
    assert!(reasons[&6].contains("not a JSON object"));
    assert!(reasons[&7].contains("not JSON"));
    let stored = tsv(
        &client,
        "SELECT (SELECT count() FROM it_rows_misfits), (SELECT count() FROM it_rows_misfits_dead)",
    )
    .await;
    assert_eq!(stored.trim(), "2\t7");
    // Redelivered: every record is recognised, nothing written twice.
    let mut restarted = sink_restarted("misfits").await;
    let again = restarted.write(&records).await.unwrap();
    assert_eq!((again.written, again.duplicates), (0, 9));
}

async fn sink_restarted(name: &str) -> ClickHouseSink<TableRows> {
    sink(
        name,
        TableRowsConfig {
            missing: MissingField::DeadLetter,
            unknown: UnknownField::DeadLetter,
            ..TableRowsConfig::default()
        },
    )
    .await
    .unwrap()
}

/// A missing field takes the column's DEFAULT expression (computed by the
/// server) when it has one, else the type's zero value.
#[tokio::test]
async fn missing_fields_take_the_columns_default() {
    let client = table(
        "defaults",
        &format!(
            "a UInt32, b String DEFAULT concat('b-', toString(a)), c Nullable(String), {META}"
        ),
    )
    .await;
    let mut sink = sink("defaults", TableRowsConfig::default()).await.unwrap();
    let report = sink
        .write(&[
            record(0, r#"{"a": 1}"#),
            record(1, r#"{"a": 2, "b": "given"}"#),
            record(2, r#"{"c": "c"}"#),
        ])
        .await
        .unwrap();
    assert_eq!(report.written, 3);
    let got = tsv(
        &client,
        "SELECT a, b, c FROM it_rows_defaults ORDER BY kafka_offset",
    )
    .await;
    assert_eq!(got, "1\tb-1\t\\N\n2\tgiven\t\\N\n0\tb-0\tc\n");
}

/// Invariant: a column added while the sink runs is written without a
/// restart, and no row is lost or doubled around the change.
#[tokio::test]
async fn a_column_added_while_running_is_picked_up() {
    let client = table("added", &format!("a UInt32, {META}")).await;
    let rows = TableRowsConfig {
        refresh_interval: Duration::from_secs(3600),
        ..TableRowsConfig::default()
    };
    let mut sink = sink("added", rows).await.unwrap();
    let before: Vec<Record> = (0..100)
        .map(|i| record(i, &format!(r#"{{"a": {i}, "b": "b{i}"}}"#)))
        .collect();
    assert_eq!(sink.write(&before).await.unwrap().written, 100);
    client
        .query("ALTER TABLE it_rows_added ADD COLUMN b String")
        .execute()
        .await
        .unwrap();
    // Past the recheck delay of a field already seen without a column.
    tokio::time::sleep(TableRowsConfig::default().recheck_unknown + Duration::from_millis(100))
        .await;
    let after: Vec<Record> = (100..200)
        .map(|i| record(i, &format!(r#"{{"a": {i}, "b": "b{i}"}}"#)))
        .collect();
    assert_eq!(sink.write(&after).await.unwrap().written, 100);
    let got = tsv(
        &client,
        "SELECT count(), uniqExact(event_id), countIf(b = concat('b', toString(a))), countIf(b = '') \
         FROM it_rows_added",
    )
    .await;
    println!("rows, distinct, with b, without b: {got}");
    assert_eq!(got.trim(), "200\t200\t100\t100");
}

/// Invariant: a column dropped while the sink runs fails one insert, which
/// is retryable and, retried, writes every row once with the columns left.
#[tokio::test]
async fn a_column_dropped_while_running_fails_one_insert_then_flows() {
    let client = table("dropped", &format!("a UInt32, b String, {META}")).await;
    let mut sink = sink("dropped", TableRowsConfig::default()).await.unwrap();
    let batch = |from: i64| -> Vec<Record> {
        (from..from + 50)
            .map(|i| record(i, &format!(r#"{{"a": {i}, "b": "b{i}"}}"#)))
            .collect()
    };
    assert_eq!(sink.write(&batch(0)).await.unwrap().written, 50);
    client
        .query("ALTER TABLE it_rows_dropped DROP COLUMN b")
        .execute()
        .await
        .unwrap();
    let next = batch(50);
    let failed = sink.write(&next).await;
    let retryable = match &failed {
        Err(e) => e.is_retryable(),
        Ok(_) => true,
    };
    println!("first write after the drop: {failed:?}");
    assert!(
        retryable,
        "the columns changed: the failure must be retryable"
    );
    if failed.is_err() {
        assert_eq!(sink.write(&next).await.unwrap().written, 50);
    }
    let got = tsv(
        &client,
        "SELECT count(), uniqExact(event_id) FROM it_rows_dropped",
    )
    .await;
    assert_eq!(got.trim(), "100\t100");
}

/// Tables no route can write are refused at start with what to do.
#[tokio::test]
async fn tables_the_sink_cannot_write_are_refused_at_start() {
    let client = table("no_meta", "").await;
    client
        .query("CREATE TABLE it_rows_no_meta (a UInt32) ENGINE = MergeTree() ORDER BY a")
        .execute()
        .await
        .unwrap();
    let err = sink("no_meta", TableRowsConfig::default())
        .await
        .err()
        .unwrap();
    println!("{err}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains(
        "ALTER TABLE default.it_rows_no_meta ADD COLUMN event_id UUID, ADD COLUMN kafka_partition Int32"
    ), "{err}");

    table(
        "odd_type",
        &format!("u AggregateFunction(uniq, String), {META}"),
    )
    .await;
    let err = sink("odd_type", TableRowsConfig::default())
        .await
        .err()
        .unwrap();
    println!("{err}");
    assert!(err.to_string().contains("column \"u\""), "{err}");

    table("missing", "").await;
    let err = sink("missing", TableRowsConfig::default())
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("does not exist"), "{err}");

    // With its columns in the route, a missing table is created.
    let created = TableRowsConfig {
        create_columns: Some("url String, n UInt16".into()),
        ..TableRowsConfig::default()
    };
    let mut sink = sink("missing", created).await.unwrap();
    assert_eq!(
        sink.write(&[record(0, r#"{"url": "/", "n": 3}"#)])
            .await
            .unwrap()
            .written,
        1
    );
}

/// The deduplication token is sent only to servers that have the setting:
/// opted in on 18.16, inserts go without it (an unknown setting would fail
/// every insert). Its effect on a current server is checked on chdb.
#[tokio::test]
async fn the_dedup_token_is_sent_only_where_the_server_has_it() {
    let client = table("token", &format!("a UInt32, {META}")).await;
    let config = ClickHouseConfig {
        insert_dedup_token: true,
        ..config("token")
    };
    let mut sink = ClickHouseSink::new(
        config.validate().unwrap(),
        TableRows::new(TableRowsConfig::default()),
    )
    .await
    .unwrap();
    let has_setting = tsv(
        &client,
        "SELECT count() FROM system.settings WHERE name = 'insert_deduplication_token'",
    )
    .await;
    let report = sink.write(&[record(0, r#"{"a": 1}"#)]).await.unwrap();
    println!(
        "server has the setting: {}; written: {}",
        has_setting.trim(),
        report.written
    );
    assert_eq!(report.written, 1);
}
