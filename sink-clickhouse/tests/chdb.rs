//! The sink on a current ClickHouse engine. The stack's server is 18.16;
//! Docker users run 24 and later. This test writes what the sink really
//! sends (every DDL variant, the lookups with values bound, RowBinary
//! batches of every type the table-driven encoder writes, inserted the way
//! the sink inserts them) to a folder, and `scripts/chdb.sh` runs it on
//! chdb (ClickHouse in-process): each DDL is accepted (cluster DDL parsed),
//! each lookup runs on the created tables, and each RowBinary batch decodes
//! to exactly the values written here as SQL literals, which ClickHouse
//! parses itself. Rows of typed `RowMapper`s are serialized by the
//! `clickhouse` crate, which its maintainers test against current servers.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use sink_clickhouse::compat;
use sink_clickhouse::{
    Changes, ClickHouseConfig, ClusterConfig, RawEventMapper, RowMeta, TableRows, TableRowsConfig,
};
use uuid::Uuid;

const META: [(&str, &str); 4] = [
    ("event_id", "UUID"),
    ("kafka_partition", "Int32"),
    ("kafka_offset", "Int64"),
    ("ingested_at", "DateTime('UTC')"),
];

fn meta() -> RowMeta {
    RowMeta {
        event_id: Uuid::parse_str("0190a5f0-1c2b-7d3e-8f40-5a6b7c8d9e0f").unwrap_or_default(),
        kafka_partition: 2,
        kafka_offset: 9_000_000_000,
        ingested_at: 1_764_900_000,
    }
}

/// The version of chdb's engine, as the sink reads it.
const CURRENT: (u32, u32) = (26, 9);

const META_VALUES: &str =
    "'0190a5f0-1c2b-7d3e-8f40-5a6b7c8d9e0f', 2, 9000000000, '2025-12-05 02:00:00'";

/// One RowBinary batch: columns, the JSON payloads and the literals they
/// must decode to.
struct Batch {
    name: &'static str,
    columns: Vec<(&'static str, &'static str)>,
    payloads: Vec<Value>,
    values: Vec<&'static str>,
}

fn batches() -> Vec<Batch> {
    vec![
        Batch {
            name: "integers and floats",
            columns: vec![
                ("i8", "Int8"),
                ("i16", "Int16"),
                ("i32", "Int32"),
                ("i64", "Int64"),
                ("i128", "Int128"),
                ("u8", "UInt8"),
                ("u16", "UInt16"),
                ("u32", "UInt32"),
                ("u64", "UInt64"),
                ("u128", "UInt128"),
                ("f32", "Float32"),
                ("f64", "Float64"),
                ("b", "Bool"),
            ],
            payloads: vec![
                json!({"i8": -128, "i16": 32767, "i32": -2147483648i64, "i64": "9223372036854775807",
                       "i128": "-170141183460469231731687303715884105728", "u8": 255, "u16": 65535,
                       "u32": 4294967295u32, "u64": "18446744073709551615",
                       "u128": "340282366920938463463374607431768211455", "f32": 1.5,
                       "f64": -2.25e-300, "b": true}),
                json!({"i8": 0, "i16": -1, "i32": 7.0, "i64": -1, "i128": 5, "u8": "8", "u16": 0,
                       "u32": 0, "u64": 1, "u128": "0", "f32": "-inf", "f64": "NaN", "b": "false"}),
            ],
            values: vec![
                "(-128, 32767, -2147483648, 9223372036854775807, '-170141183460469231731687303715884105728', \
                 255, 65535, 4294967295, 18446744073709551615, '340282366920938463463374607431768211455', \
                 1.5, -2.25e-300, true",
                "(0, -1, 7, -1, 5, 8, 0, 0, 1, 0, -inf, nan, false",
            ],
        },
        Batch {
            name: "decimals and text",
            columns: vec![
                ("d9", "Decimal(9, 2)"),
                ("d18", "Decimal(18, 4)"),
                ("d38", "Decimal(38, 10)"),
                ("s", "String"),
                ("fs", "FixedString(4)"),
                ("lc", "LowCardinality(String)"),
                ("lcn", "LowCardinality(Nullable(String))"),
                ("id", "UUID"),
                ("e8", "Enum8('a' = 1, 'b' = -2)"),
                ("e16", "Enum16('x' = 1000, 'y' = 2000)"),
            ],
            payloads: vec![
                json!({"d9": "-9999999.99", "d18": 12.5, "d38": "1234567890123456789012345678.0123456789",
                       "s": "tab\there é", "fs": "ab", "lc": "low", "lcn": null,
                       "id": "00112233-4455-6677-8899-aabbccddeeff", "e8": "b", "e16": 2000}),
                json!({"d9": 0.01, "d18": "-1e3", "d38": "-1e-10", "s": {"json": [1, 2]}, "fs": "abcd",
                       "lc": "", "lcn": "x", "id": "00000000000000000000000000000000", "e8": 1, "e16": "x"}),
            ],
            values: vec![
                "('-9999999.99', '12.5', '1234567890123456789012345678.0123456789', 'tab\\there é', 'ab', \
                 'low', NULL, '00112233-4455-6677-8899-aabbccddeeff', 'b', 'y'",
                "('0.01', '-1000', '-0.0000000001', '{\"json\":[1,2]}', 'abcd', '', 'x', \
                 '00000000-0000-0000-0000-000000000000', 'a', 'x'",
            ],
        },
        Batch {
            name: "dates and times",
            columns: vec![
                ("day", "Date"),
                ("day32", "Date32"),
                ("at", "DateTime('UTC')"),
                ("at_zone", "DateTime('Europe/Berlin')"),
                ("at3", "DateTime64(3, 'UTC')"),
                ("at6", "DateTime64(6, 'UTC')"),
            ],
            payloads: vec![
                json!({"day": "2149-06-06", "day32": "1900-01-01", "at": "2024-01-02T05:04:05+02:00",
                       "at_zone": 1704164645, "at3": 1704164645.123, "at6": "2024-01-02T03:04:05.123456Z"}),
                json!({"day": 0, "day32": "2299-12-31", "at": "2106-02-07 06:28:15", "at_zone": "1970-01-01",
                       "at3": "1969-12-31T23:59:59.5Z", "at6": "2024-01-02"}),
            ],
            values: vec![
                "('2149-06-06', '1900-01-01', '2024-01-02 03:04:05', toDateTime(1704164645, 'Europe/Berlin'), \
                 '2024-01-02 03:04:05.123', '2024-01-02 03:04:05.123456'",
                "('1970-01-01', '2299-12-31', '2106-02-07 06:28:15', toDateTime(0, 'Europe/Berlin'), \
                 toDateTime64(-0.5, 3, 'UTC'), '2024-01-02 00:00:00.000000'",
            ],
        },
        Batch {
            name: "addresses and composites",
            columns: vec![
                ("ip4", "IPv4"),
                ("ip6", "IPv6"),
                ("n", "Nullable(Int32)"),
                ("arr", "Array(Nullable(UInt8))"),
                ("nested", "Array(Array(String))"),
                ("m", "Map(String, UInt16)"),
                ("mi", "Map(UInt64, Array(String))"),
                ("t", "Tuple(UInt8, String, Nullable(Float64))"),
            ],
            payloads: vec![
                json!({"ip4": "1.2.3.4", "ip6": "::1", "n": 7, "arr": [1, null, 255],
                       "nested": [["a"], [], ["b", "c"]], "m": {"a": 1, "b": 2}, "mi": {"7": ["x"]},
                       "t": [9, "t", null]}),
                json!({"ip4": "255.255.255.255", "ip6": "10.0.0.1", "n": null, "arr": [], "nested": [],
                       "m": {}, "mi": {}, "t": [0, "", 0.5]}),
            ],
            values: vec![
                "('1.2.3.4', '::1', 7, [1, NULL, 255], [['a'], [], ['b', 'c']], map('a', 1, 'b', 2), \
                 map(7, ['x']), (9, 't', NULL)",
                "('255.255.255.255', '::ffff:10.0.0.1', NULL, [], [], map(), map(), (0, '', 0.5)",
            ],
        },
    ]
}

fn structure(columns: &[(&str, &str)]) -> String {
    columns
        .iter()
        .chain(META.iter())
        .map(|(name, ty)| format!("{name} {ty}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn write_manifest(dir: &Path) -> Result<Value, Box<dyn std::error::Error>> {
    let plain = ClickHouseConfig {
        database: "compat".into(),
        table: "raw_events".into(),
        ..ClickHouseConfig::default()
    };
    let table_rows = ClickHouseConfig {
        table: "page_views".into(),
        ..plain.clone()
    };
    let created = TableRows::new(TableRowsConfig {
        create_columns: Some("url String, user LowCardinality(String), ms UInt32".into()),
        ..TableRowsConfig::default()
    });
    let mut ddl = Vec::new();
    let mut push_ddl = |variant: &str, statements: Vec<String>, run: bool| {
        for (i, sql) in statements.into_iter().enumerate() {
            ddl.push(json!({"name": format!("{variant} {i}"), "sql": sql, "run": run}));
        }
    };
    push_ddl(
        "raw events",
        compat::ddl(plain.clone().validate()?, RawEventMapper, CURRENT)?,
        true,
    );
    push_ddl(
        "table rows with create_columns",
        compat::ddl(table_rows.clone().validate()?, created, CURRENT)?,
        true,
    );
    let state = ClickHouseConfig {
        table: "accounts_state".into(),
        ..plain.clone()
    };
    let state_rows = || {
        TableRows::new(TableRowsConfig {
            changes: Changes::State,
            order_by: Some("id".into()),
            create_columns: Some("id Int64, name String, balance Decimal(18, 2)".into()),
            ..TableRowsConfig::default()
        })
    };
    // As 18.16 gets it (a _deleted column read with FINAL … WHERE), and as
    // current servers do (is_deleted: FINAL drops deleted rows itself).
    push_ddl(
        "state table, 18.16's",
        compat::ddl(state.clone().validate()?, state_rows(), (18, 16))?,
        true,
    );
    let state_current = ClickHouseConfig {
        table: "accounts_state_current".into(),
        ..plain.clone()
    };
    push_ddl(
        "state table, current",
        compat::ddl(state_current.validate()?, state_rows(), CURRENT)?,
        true,
    );
    for (variant, cluster) in [
        ("replicated cluster", ClusterConfig::new("analytics")),
        (
            "plain cluster, not on cluster",
            ClusterConfig {
                on_cluster: false,
                replicated: false,
                ..ClusterConfig::new("analytics")
            },
        ),
    ] {
        let config = ClickHouseConfig {
            cluster: Some(cluster),
            ..plain.clone()
        };
        push_ddl(
            variant,
            compat::ddl(config.validate()?, RawEventMapper, CURRENT)?,
            false,
        );
    }

    let mut queries: Vec<Value> = Vec::new();
    for (config, label) in [
        (&plain, "raw events"),
        (&table_rows, "table rows"),
        (&state, "state table"),
    ] {
        let lookups = compat::lookups(config.clone().validate()?, RawEventMapper)?;
        for statement in lookups {
            queries.push(
                json!({"name": format!("{label}: {}", statement.name), "sql": statement.sql}),
            );
        }
    }

    let mut rowbinary = Vec::new();
    for (i, batch) in batches().into_iter().enumerate() {
        let rows: Vec<(Value, RowMeta)> = batch.payloads.into_iter().map(|p| (p, meta())).collect();
        let bytes = compat::table_rows(&batch.columns, &rows)?;
        let file = format!("batch{i}.rowbinary");
        std::fs::write(dir.join(&file), bytes)?;
        let values: Vec<String> = batch
            .values
            .iter()
            .map(|row| format!("{row}, {META_VALUES})"))
            .collect();
        rowbinary.push(json!({
            "name": batch.name,
            "file": file,
            "structure": structure(&batch.columns),
            "values": values.join(", "),
        }));
    }

    // The table-driven encoder's rows inserted into the table the sink
    // created, as its INSERT … FORMAT RowBinary does.
    let page_views = [
        ("url", "String"),
        ("user", "LowCardinality(String)"),
        ("ms", "UInt32"),
    ];
    let rows = compat::table_rows(
        &page_views,
        &[
            (json!({"url": "/", "user": "ann", "ms": 3}), meta()),
            (
                json!({"url": "/b", "user": "bo", "ms": 4}),
                RowMeta {
                    kafka_offset: meta().kafka_offset + 1,
                    ..meta()
                },
            ),
        ],
    )?;
    std::fs::write(dir.join("page_views.rowbinary"), rows)?;
    let columns: Vec<&str> = page_views
        .iter()
        .chain(META.iter())
        .map(|(n, _)| *n)
        .collect();
    let inserts = vec![json!({
        "name": "page views",
        "table": "compat.page_views",
        "columns": columns.join(", "),
        "structure": structure(&page_views),
        "file": "page_views.rowbinary",
        "rows": 2,
    })];

    // The same two rows inserted three times, as a retry after a lookup
    // that missed them would: twice under the token of those rows, once
    // under another batch's token.
    let record = |offset: i64| outbox_core::Record {
        topic: "page_views".into(),
        position: outbox_core::Position {
            partition: 2,
            offset,
        },
        key: None,
        payload: None,
        headers: [(
            outbox_core::HEADER_EVENT_ID.to_string(),
            meta().event_id.to_string(),
        )]
        .into(),
        timestamp_ms: None,
    };
    let same = compat::dedup_token("page_views", &[record(1), record(2)]);
    let other = compat::dedup_token("page_views", &[record(3), record(4)]);
    let dedup = vec![json!({
        "name": "same rows dropped",
        "ddl": format!(
            "CREATE TABLE compat.dedup ({}) ENGINE = MergeTree ORDER BY (kafka_partition, kafka_offset) \
             SETTINGS non_replicated_deduplication_window = 100",
            structure(&page_views)
        ),
        "table": "compat.dedup",
        "structure": structure(&page_views),
        "file": "page_views.rowbinary",
        "tokens": [same, same, other],
        "rows": 4,
    })];

    Ok(
        json!({"ddl": ddl, "queries": queries, "rowbinary": rowbinary, "inserts": inserts, "dedup": dedup}),
    )
}

/// Invariant: everything the sink sends is accepted by a current ClickHouse
/// and decodes there to the values it was made from.
#[test]
fn what_the_sink_sends_runs_on_a_current_clickhouse() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chdb-check");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let manifest = write_manifest(&dir)?;
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/chdb.sh");
    let output = Command::new(script).arg("check").arg(&dir).output()?;
    let report = String::from_utf8_lossy(&output.stdout);
    println!("{report}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the chdb check failed (see above)");
    assert!(report.contains("rowbinary=4"), "{report}");
    assert!(report.contains("dedup=1"), "{report}");
    Ok(())
}
