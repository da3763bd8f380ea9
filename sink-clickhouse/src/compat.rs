//! What the sink sends to ClickHouse, as text and bytes, made without a
//! server: the `make test` check runs it on a current ClickHouse engine
//! (chdb), where the stack's server is 18.16. Not a stable API.

use std::collections::HashMap;

use serde_json::Value;

use crate::client::{client_for, ServerFacts};
use crate::mapper::{Mapping, RowMeta};
use crate::{ClickHouseSink, SinkError, ValidClickHouseConfig};

/// One statement, named by what it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// What it is for (`ddl 1`, `position lookup`, …).
    pub name: String,
    /// The SQL as sent, values bound.
    pub sql: String,
}

/// The DDL a sink of `config` and `mapping` runs at start, in order, on a
/// server of `version` (`(major, minor)`).
pub fn ddl<M: Mapping>(
    config: ValidClickHouseConfig,
    mapping: M,
    version: (u32, u32),
) -> Result<Vec<String>, SinkError> {
    let mut sink = unconnected(config, mapping)?;
    sink.facts.version = version;
    Ok(sink.ddl())
}

/// The queries a sink of `config` and `mapping` runs to keep exactly-once,
/// with sample values bound.
pub fn lookups<M: Mapping>(
    config: ValidClickHouseConfig,
    mapping: M,
) -> Result<Vec<Statement>, SinkError> {
    let sink = unconnected(config, mapping)?;
    let named = |name: &str, sql: String| Statement {
        name: name.to_string(),
        sql,
    };
    Ok(vec![
        named(
            "position lookup",
            sink.position_lookup("topic'with\\quote", 3, 42)
                .sql_display()
                .to_string(),
        ),
        named(
            "event id lookup",
            sink.id_lookup(3, 100_000).sql_display().to_string(),
        ),
        named(
            "stored positions",
            sink.positions_query().sql_display().to_string(),
        ),
        named(
            "column lookup",
            crate::table::columns_query(&sink.client, &sink.config)
                .sql_display()
                .to_string(),
        ),
    ])
}

/// RowBinary rows of `payloads` for a table of `columns` (name, type) and
/// the four meta columns after them, as [`crate::TableRows`] encodes them,
/// each row with its meta.
pub fn table_rows(columns: &[(&str, &str)], rows: &[(Value, RowMeta)]) -> Result<Vec<u8>, String> {
    crate::table::encode_payloads(columns, rows)
}

/// The `insert_deduplication_token` the sink gives an insert of `records`
/// into `table`, on servers that have the setting.
pub fn dedup_token(table: &str, records: &[outbox_core::Record]) -> String {
    crate::exactly_once::dedup_token(table, records.iter())
}

pub(crate) fn unconnected<M: Mapping>(
    config: ValidClickHouseConfig,
    mapping: M,
) -> Result<ClickHouseSink<M>, SinkError> {
    Ok(ClickHouseSink {
        client: client_for(&config)?,
        config,
        mapper: mapping,
        partitions: HashMap::new(),
        facts: ServerFacts::default(),
        parts_read_at: None,
    })
}
