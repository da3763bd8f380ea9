//! A table's columns as the encoder uses them, and one JSON payload encoded
//! to a RowBinary row of them. Pure: the columns come in as rows of
//! `system.columns`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use serde_json::value::RawValue;
use serde_json::Value;

use super::types::ColumnType;

mod change;

use super::{Changes, MissingField, TableRowsConfig};
use crate::mapper::RowMeta;
use change::put_version;
pub(crate) use change::ChangeFacts;

/// One row of `system.columns`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
pub(crate) struct ColumnRow {
    pub name: String,
    pub r#type: String,
    /// `DEFAULT`, `MATERIALIZED`, `ALIAS`, `EPHEMERAL` or empty.
    pub default_kind: String,
    /// 1 when the column is part of the table's `ORDER BY`: a state
    /// table's key.
    pub is_in_sorting_key: u8,
}

/// Where a column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// A top-level field of the payload.
    Field(String),
    /// A JSON pointer into the payload (`/a/b/0`).
    Pointer(String),
    EventId,
    KafkaPartition,
    KafkaOffset,
    IngestedAt,
    /// Of a change route: the change's `op`.
    ChangeOp,
    /// Of a change route: its place in commit order (commit LSN, ordinal).
    ChangeVersion,
    /// Of a change route: whether it is a delete.
    ChangeDeleted,
    /// Of a change route: the commit LSN.
    ChangeLsn,
    /// Of a change route: the change's place in its transaction.
    ChangeOrdinal,
    /// Of a change route: the commit time.
    ChangeTime,
    /// The trace id of the record's `traceparent` header.
    TraceId,
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    type_name: String,
    ty: ColumnType,
    /// Left out of the insert when the field is missing, so the server
    /// computes its `DEFAULT` expression.
    has_default_expression: bool,
    source: Source,
}

/// The columns a route writes, in the table's order.
#[derive(Debug, Clone)]
pub(crate) struct Schema {
    columns: Vec<Column>,
    /// Top-level payload fields some column reads.
    known_fields: HashSet<String>,
    missing: MissingField,
    changes: Changes,
    /// Some column reads a JSON pointer, or rows come from change
    /// envelopes: the payload is parsed into a tree. Otherwise only its
    /// top-level fields are split, each value parsed when a column reads it.
    needs_tree: bool,
    /// Some field is read by two columns: counting the fields read does
    /// not tell whether every field was read.
    shared_fields: bool,
    /// The payload fields the table's sorting key columns read: a state
    /// table's key, which an update may change.
    key_fields: Vec<String>,
}

/// A payload's top-level fields in their order, each name borrowed from
/// the payload unless it has escapes, each value still JSON text. A list,
/// not a map: payloads have few fields, and comparing a few names costs
/// less than hashing them.
#[derive(Debug, Default)]
pub(crate) struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, raw)| *raw)
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Fields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Fields<'a>, M::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<Key<'a>>()? {
                    fields.push((key.0, map.next_value::<&'a RawValue>()?));
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// A field name, borrowed from the payload unless it has escapes.
#[derive(serde::Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

/// A payload as the encoder reads it.
#[derive(Debug)]
pub(crate) enum Document<'a> {
    /// The top-level fields, each value still JSON text until a column
    /// reads it: no tree is built and no name is copied.
    Fields(Fields<'a>),
    /// The whole tree: for JSON pointers and change rows.
    Tree(Value),
}

/// The exactly-once lookup reads these; every table needs them.
pub(crate) const META_COLUMNS: [(&str, &str); 4] = [
    ("event_id", "UUID"),
    ("kafka_partition", "Int32"),
    ("kafka_offset", "Int64"),
    ("ingested_at", "DateTime"),
];

/// A row encoded, with the columns it leaves to their `DEFAULT` expression.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct EncodedRow {
    pub bytes: Vec<u8>,
    /// Indexes of columns left out (missing fields of columns with a
    /// `DEFAULT` expression): rows are inserted in groups by this.
    pub omitted: Vec<usize>,
    /// Top-level fields of the payload no column reads.
    pub unknown: Vec<String>,
}

impl Schema {
    /// The schema of `table` from its `system.columns` rows, or why no
    /// route can write it: a type the encoder does not know (named with its
    /// column), a meta column missing (with the `ALTER TABLE` that adds
    /// it), a field mapping naming no column.
    pub(crate) fn new(
        table: &str,
        rows: &[ColumnRow],
        config: &TableRowsConfig,
    ) -> Result<Self, String> {
        if rows.is_empty() {
            return Err(format!("table {table} does not exist (or has no columns)"));
        }
        let missing_meta: Vec<String> = META_COLUMNS
            .iter()
            .filter(|(name, _)| !rows.iter().any(|r| r.name == *name))
            .map(|(name, ty)| format!("ADD COLUMN {name} {ty}"))
            .collect();
        if !missing_meta.is_empty() {
            return Err(format!(
                "table {table} lacks the columns the sink finds written rows by; run: ALTER TABLE {table} {}",
                missing_meta.join(", ")
            ));
        }
        if let Some(column) = &config.trace_id_column {
            if !rows.iter().any(|r| &r.name == column) {
                return Err(format!(
                    "the route writes trace ids to column {column:?}, which table {table} does not have; \
                     run: ALTER TABLE {table} ADD COLUMN {column} String"
                ));
            }
        }
        for column in config.fields.keys() {
            if !rows.iter().any(|r| &r.name == column) {
                return Err(format!(
                    "the route maps a field to column {column:?}, which table {table} does not have"
                ));
            }
        }
        let mut columns = Vec::new();
        let mut known_fields = HashSet::new();
        for row in rows {
            let insertable = matches!(row.default_kind.as_str(), "" | "DEFAULT" | "EPHEMERAL");
            if !insertable {
                continue;
            }
            let ty = ColumnType::parse(&row.r#type).map_err(|reason| {
                format!(
                    "column {:?} of {table} has type {}: {reason}",
                    row.name, row.r#type
                )
            })?;
            // A change route fills these from the envelope, unless mapped.
            let change = config.changes != Changes::Off && !config.fields.contains_key(&row.name);
            let source = match row.name.as_str() {
                "event_id" => Source::EventId,
                "kafka_partition" => Source::KafkaPartition,
                "kafka_offset" => Source::KafkaOffset,
                "ingested_at" => Source::IngestedAt,
                "_op" if change => Source::ChangeOp,
                "_version" if change => {
                    if !matches!(
                        ty,
                        ColumnType::Int {
                            bytes: 8 | 16,
                            signed: false
                        }
                    ) {
                        return Err(format!(
                            "column \"_version\" of {table} has type {}: a change route writes the \
                             commit position there, which needs UInt64 or UInt128",
                            row.r#type
                        ));
                    }
                    Source::ChangeVersion
                }
                "_deleted" if change => Source::ChangeDeleted,
                "_lsn" if change => Source::ChangeLsn,
                "_ordinal" if change => Source::ChangeOrdinal,
                "_commit_time" if change => Source::ChangeTime,
                name if config.trace_id_column.as_deref() == Some(name) => {
                    let text = match &ty {
                        ColumnType::Nullable(inner) => inner.as_ref(),
                        other => other,
                    };
                    if !matches!(text, ColumnType::String | ColumnType::FixedString(32)) {
                        return Err(format!(
                            "trace id column {name:?} of {table} has type {}: it needs String or FixedString(32)",
                            row.r#type
                        ));
                    }
                    Source::TraceId
                }
                name => match config.fields.get(name) {
                    Some(path) if path.starts_with('/') => Source::Pointer(path.clone()),
                    Some(field) => Source::Field(field.clone()),
                    None => Source::Field(name.to_string()),
                },
            };
            match &source {
                Source::Field(field) => {
                    known_fields.insert(field.clone());
                }
                Source::Pointer(path) => {
                    let first = path[1..].split('/').next().unwrap_or_default();
                    known_fields.insert(first.replace("~1", "/").replace("~0", "~"));
                }
                _ => {}
            }
            columns.push(Column {
                name: row.name.clone(),
                type_name: row.r#type.clone(),
                ty,
                has_default_expression: row.default_kind == "DEFAULT",
                source,
            });
        }
        if config.changes == Changes::State
            && !columns.iter().any(|c| c.source == Source::ChangeVersion)
        {
            return Err(format!(
                "table {table} keeps state but has no _version column: add `_version UInt64` (or \
                 UInt128) and make it the ReplacingMergeTree's version (docs/tables.md)"
            ));
        }
        let needs_tree = config.changes != Changes::Off
            || columns
                .iter()
                .any(|c| matches!(c.source, Source::Pointer(_)));
        let field_columns = columns
            .iter()
            .filter(|c| matches!(c.source, Source::Field(_)))
            .count();
        let shared_fields = field_columns != known_fields.len();
        let key_fields = rows
            .iter()
            .filter(|r| r.is_in_sorting_key == 1)
            .filter_map(|r| columns.iter().find(|c| c.name == r.name))
            .filter_map(|c| match &c.source {
                Source::Field(field) => Some(field.clone()),
                _ => None,
            })
            .collect();
        Ok(Self {
            columns,
            known_fields,
            missing: config.missing,
            changes: config.changes,
            needs_tree,
            shared_fields,
            key_fields,
        })
    }

    /// The insert's column list, backquoted, without `omitted`.
    pub(crate) fn column_list(&self, omitted: &[usize]) -> String {
        self.columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !omitted.contains(i))
            .map(|(_, c)| format!("`{}`", c.name.replace('\\', "\\\\").replace('`', "\\`")))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether this schema's route reads change envelopes.
    pub(crate) fn has_trace_column(&self) -> bool {
        self.columns
            .iter()
            .any(|c| matches!(c.source, Source::TraceId))
    }

    pub(crate) fn reads_changes(&self) -> bool {
        self.changes != Changes::Off
    }

    /// Reads a payload (a JSON object) as this schema needs it.
    pub(crate) fn parse<'a>(&self, payload: &'a [u8]) -> Result<Document<'a>, String> {
        if !self.needs_tree {
            if let Ok(fields) = serde_json::from_slice(payload) {
                return Ok(Document::Fields(fields));
            }
        }
        // Also how a payload that is no object gets its reason.
        match serde_json::from_slice::<Value>(payload) {
            Ok(tree @ Value::Object(_)) => Ok(Document::Tree(tree)),
            Ok(other) => Err(format!(
                "the payload is not a JSON object but {}",
                short(&other)
            )),
            Err(e) => Err(format!("the payload is not JSON: {e}")),
        }
    }

    /// [`Schema::encode_into`] a row of its own.
    pub(crate) fn encode(
        &self,
        document: &Value,
        meta: &RowMeta,
        change: Option<&ChangeFacts>,
    ) -> Result<EncodedRow, String> {
        let mut bytes = Vec::new();
        let document = match document {
            Value::Object(_) => Document::Tree(document.clone()),
            other => {
                return Err(format!(
                    "the payload is not a JSON object but {}",
                    short(other)
                ))
            }
        };
        let (omitted, unknown) = self.encode_into(&document, meta, (change, None), &mut bytes)?;
        Ok(EncodedRow {
            bytes,
            omitted,
            unknown,
        })
    }

    /// Appends the row of `document` (a payload, or a change's row with
    /// `change`), `meta` and `trace` (the record's trace id, when the table
    /// has a trace id column) to `out`, or says which column refused what
    /// (then `out` may hold part of the row: the caller cuts it off).
    /// Gives the columns left to their `DEFAULT` expression and the fields
    /// no column reads.
    pub(crate) fn encode_into(
        &self,
        document: &Document<'_>,
        meta: &RowMeta,
        (change, trace): (Option<&ChangeFacts>, Option<&str>),
        out: &mut Vec<u8>,
    ) -> Result<(Vec<usize>, Vec<String>), String> {
        let mut omitted = Vec::new();
        let mut unknown = Vec::new();
        let tree = match document {
            Document::Tree(Value::Object(fields)) => {
                unknown.extend(
                    fields
                        .keys()
                        .filter(|name| !self.known_fields.contains(*name))
                        .cloned(),
                );
                Some(fields)
            }
            Document::Tree(other) => {
                return Err(format!(
                    "the payload is not a JSON object but {}",
                    short(other)
                ))
            }
            // Fields without a column are found after the columns: when
            // every field was read by one, none is looked up.
            Document::Fields(_) => None,
        };
        let mut read = 0;
        let (op, deleted, lsn, ordinal, time) = match change {
            Some(c) => (
                Value::String(c.op.clone()),
                Value::Bool(c.op == "d"),
                Value::from(c.lsn),
                Value::from(c.ordinal),
                Value::String(format!(
                    "{}.{:03}",
                    c.ts_ms.div_euclid(1000),
                    c.ts_ms.rem_euclid(1000)
                )),
            ),
            None => Default::default(),
        };
        // A delete's old row holds the key only, unless REPLICA IDENTITY FULL.
        let lenient = change.is_some_and(|c| c.op == "d");
        for (i, column) in self.columns.iter().enumerate() {
            let value: Option<Cow<'_, Value>> = match &column.source {
                Source::Field(field) => match (tree, document) {
                    (Some(fields), _) => fields.get(field).map(Cow::Borrowed),
                    (None, Document::Fields(fields)) => match fields.get(field) {
                        Some(raw) if raw.get() != "null" => {
                            read += 1;
                            column.ty.encode_raw(raw.get(), out).map_err(|reason| {
                                format!(
                                    "column {:?} ({}) from {}: {reason}",
                                    column.name,
                                    column.type_name,
                                    column.source_name()
                                )
                            })?;
                            continue;
                        }
                        Some(_) if column.ty.is_nullable() => {
                            read += 1;
                            Some(Cow::Owned(Value::Null))
                        }
                        Some(_) => {
                            read += 1;
                            None
                        }
                        _ => None,
                    },
                    (None, Document::Tree(_)) => None,
                },
                Source::Pointer(path) => match document {
                    Document::Tree(tree) => tree.pointer(path).map(Cow::Borrowed),
                    Document::Fields(_) => None,
                },
                Source::EventId
                | Source::KafkaPartition
                | Source::KafkaOffset
                | Source::IngestedAt => {
                    put_meta(column, meta, out)?;
                    continue;
                }
                Source::ChangeVersion => {
                    let c = change.ok_or("the record is not a change")?;
                    put_version(&column.ty, c, out)?;
                    continue;
                }
                Source::ChangeOp => change.map(|_| Cow::Borrowed(&op)),
                Source::ChangeDeleted => change.map(|_| Cow::Borrowed(&deleted)),
                Source::ChangeLsn => change.map(|_| Cow::Borrowed(&lsn)),
                Source::ChangeOrdinal => change.map(|_| Cow::Borrowed(&ordinal)),
                Source::ChangeTime => change.map(|_| Cow::Borrowed(&time)),
                Source::TraceId => Some(Cow::Owned(match trace {
                    Some(id) if !id.is_empty() => Value::String(id.to_string()),
                    _ if column.ty.is_nullable() => Value::Null,
                    _ => Value::String(String::new()),
                })),
            };
            let value = value.filter(|v| !v.is_null() || column.ty.is_nullable());
            match value {
                Some(value) => column.ty.encode(&value, out).map_err(|reason| {
                    format!(
                        "column {:?} ({}) from {}: {reason}",
                        column.name,
                        column.type_name,
                        column.source_name()
                    )
                })?,
                None if self.missing == MissingField::DeadLetter && !lenient => {
                    return Err(format!(
                        "column {:?} ({}): {} is missing (the route dead-letters missing fields)",
                        column.name,
                        column.type_name,
                        column.source_name()
                    ))
                }
                None if column.has_default_expression => omitted.push(i),
                None => column.ty.encode_default(out),
            }
        }
        if let Document::Fields(fields) = document {
            if read < fields.0.len() || self.shared_fields {
                unknown.extend(
                    fields
                        .0
                        .iter()
                        .filter(|(name, _)| !self.known_fields.contains(&**name))
                        .map(|(name, _)| name.to_string()),
                );
            }
        }
        Ok((omitted, unknown))
    }

    /// Whether the two schemas write the same columns the same way.
    pub(crate) fn same_columns(&self, other: &Schema) -> bool {
        self.columns.len() == other.columns.len()
            && self
                .columns
                .iter()
                .zip(&other.columns)
                .all(|(a, b)| a.name == b.name && a.type_name == b.type_name)
    }
}

/// A meta column's value: straight to bytes in the types the sink creates,
/// through JSON in any other the table chose.
fn put_meta(column: &Column, meta: &RowMeta, out: &mut Vec<u8>) -> Result<(), String> {
    let fast = match (&column.source, &column.ty) {
        (Source::EventId, ColumnType::Uuid) => {
            let (high, low) = meta.event_id.as_u64_pair();
            out.extend_from_slice(&high.to_le_bytes());
            out.extend_from_slice(&low.to_le_bytes());
            true
        }
        (
            Source::KafkaPartition,
            ColumnType::Int {
                bytes: 4,
                signed: true,
            },
        ) => {
            out.extend_from_slice(&meta.kafka_partition.to_le_bytes());
            true
        }
        (
            Source::KafkaOffset,
            ColumnType::Int {
                bytes: 8,
                signed: true,
            },
        ) => {
            out.extend_from_slice(&meta.kafka_offset.to_le_bytes());
            true
        }
        (
            Source::IngestedAt,
            ColumnType::DateTime
            | ColumnType::Int {
                bytes: 4,
                signed: false,
            },
        ) => {
            out.extend_from_slice(&meta.ingested_at.to_le_bytes());
            true
        }
        _ => false,
    };
    if fast {
        return Ok(());
    }
    let value = match column.source {
        Source::EventId => Value::String(meta.event_id.to_string()),
        Source::KafkaPartition => Value::from(meta.kafka_partition),
        Source::KafkaOffset => Value::from(meta.kafka_offset),
        _ => Value::from(meta.ingested_at),
    };
    column.ty.encode(&value, out).map_err(|reason| {
        format!(
            "column {:?} ({}) from the record's position: {reason}",
            column.name, column.type_name
        )
    })
}

impl Column {
    fn source_name(&self) -> String {
        match &self.source {
            Source::Field(field) => format!("field {field:?}"),
            Source::Pointer(path) => format!("pointer {path:?}"),
            Source::TraceId => "the traceparent header".into(),
            _ => "the record's position".into(),
        }
    }
}

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2
/// hex>`): 32 lowercase hex digits, not all zero; `None` when absent or
/// malformed.
pub(crate) fn traceparent_trace_id(headers: &BTreeMap<String, String>) -> Option<String> {
    let value = headers.get("traceparent")?;
    let mut parts = value.trim().split('-');
    let (version, trace) = (parts.next()?, parts.next()?);
    let (span, flags) = (parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0')
        && (version != "00" || parts.next().is_none());
    valid.then(|| trace.to_string())
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(60) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// Rows grouped by the columns they leave out, each group one insert.
#[derive(Debug, Default)]
pub(crate) struct Groups {
    pub groups: BTreeMap<Vec<usize>, (Vec<u8>, usize)>,
}

impl Groups {
    /// One row's bytes, leaving `omitted` to their defaults.
    pub(crate) fn push_bytes(&mut self, omitted: Vec<usize>, row: &[u8]) {
        let (bytes, count) = self.groups.entry(omitted).or_default();
        bytes.extend_from_slice(row);
        *count += 1;
    }

    pub(crate) fn rows(&self) -> usize {
        self.groups.values().map(|(_, n)| n).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    fn col(name: &str, ty: &str, default_kind: &str) -> ColumnRow {
        ColumnRow {
            name: name.into(),
            r#type: ty.into(),
            default_kind: default_kind.into(),
            is_in_sorting_key: u8::from(name == "id"),
        }
    }

    fn meta_rows() -> Vec<ColumnRow> {
        META_COLUMNS.iter().map(|(n, t)| col(n, t, "")).collect()
    }

    #[test]
    fn trace_ids_come_from_well_formed_traceparents_only() {
        let headers =
            |value: &str| BTreeMap::from([("traceparent".to_string(), value.to_string())]);
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            traceparent_trace_id(&headers(good)).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(traceparent_trace_id(&headers(bad)), None, "{bad}");
        }
        assert_eq!(traceparent_trace_id(&BTreeMap::new()), None);
    }

    #[test]
    fn a_trace_id_column_must_exist_and_hold_text() {
        let config = |column: &str| TableRowsConfig {
            trace_id_column: Some(column.into()),
            ..TableRowsConfig::default()
        };
        let mut rows = meta_rows();
        rows.push(col("trace", "FixedString(32)", ""));
        rows.push(col("n", "Int32", ""));
        let schema = Schema::new("t", &rows, &config("trace"));
        assert!(schema.is_ok_and(|schema| schema.has_trace_column()));
        let wrong = Schema::new("t", &rows, &config("n")).unwrap_err();
        assert!(wrong.contains("needs String or FixedString(32)"), "{wrong}");
        let absent = Schema::new("t", &rows, &config("tid")).unwrap_err();
        assert!(absent.contains("ADD COLUMN tid String"), "{absent}");
    }

    fn meta() -> RowMeta {
        RowMeta {
            event_id: Uuid::nil(),
            kafka_partition: 2,
            kafka_offset: 9,
            ingested_at: 7,
        }
    }

    impl Schema {
        fn encode_plain(&self, document: &Value, meta: &RowMeta) -> Result<EncodedRow, String> {
            self.encode(document, meta, None)
        }
    }

    fn schema(rows: &[ColumnRow], config: &TableRowsConfig) -> Result<Schema, String> {
        let mut all = rows.to_vec();
        all.extend(meta_rows());
        Schema::new("db.t", &all, config)
    }

    #[test]
    fn a_table_without_the_meta_columns_gets_the_alter_to_run() {
        let rows = [col("a", "String", ""), col("event_id", "UUID", "")];
        let err = Schema::new("db.t", &rows, &TableRowsConfig::default()).unwrap_err();
        assert!(err.contains(
            "ALTER TABLE db.t ADD COLUMN kafka_partition Int32, ADD COLUMN kafka_offset Int64, ADD COLUMN ingested_at DateTime"
        ), "{err}");
        assert!(Schema::new("db.t", &[], &TableRowsConfig::default())
            .unwrap_err()
            .contains("does not exist"));
    }

    #[test]
    fn an_unknown_type_is_named_with_its_column() {
        let err = schema(&[col("shape", "Polygon", "")], &TableRowsConfig::default()).unwrap_err();
        assert!(
            err.starts_with("column \"shape\" of db.t has type Polygon"),
            "{err}"
        );
        let config = TableRowsConfig {
            fields: [("nope".to_string(), "x".to_string())].into(),
            ..TableRowsConfig::default()
        };
        assert!(schema(&[], &config)
            .unwrap_err()
            .contains("column \"nope\""));
    }

    #[test]
    fn fields_map_by_name_rename_and_pointer_and_meta_comes_from_the_position() -> Result<(), String>
    {
        let config = TableRowsConfig {
            fields: [
                ("user".to_string(), "username".to_string()),
                ("city".to_string(), "/address/city".to_string()),
            ]
            .into(),
            ..TableRowsConfig::default()
        };
        let s = schema(
            &[
                col("user", "String", ""),
                col("city", "String", ""),
                col("n", "UInt8", ""),
            ],
            &config,
        )?;
        let row = s.encode_plain(
            &json!({"username": "ann", "address": {"city": "Oslo"}, "n": 3, "extra": 1}),
            &meta(),
        )?;
        let mut expected = vec![3, b'a', b'n', b'n', 4, b'O', b's', b'l', b'o', 3];
        expected.extend_from_slice(&[0; 16]); // nil event id
        expected.extend_from_slice(&2i32.to_le_bytes());
        expected.extend_from_slice(&9i64.to_le_bytes());
        expected.extend_from_slice(&7u32.to_le_bytes());
        assert_eq!(row.bytes, expected);
        assert_eq!(row.unknown, ["extra"]);
        assert!(row.omitted.is_empty());
        assert_eq!(
            s.column_list(&[]),
            "`user`, `city`, `n`, `event_id`, `kafka_partition`, `kafka_offset`, `ingested_at`"
        );
        Ok(())
    }

    #[test]
    fn missing_fields_take_the_column_default_or_dead_letter() -> Result<(), String> {
        let rows = [
            col("a", "UInt8", ""),
            col("b", "String", "DEFAULT"),
            col("c", "Nullable(Int8)", ""),
            col("m", "UInt8", "MATERIALIZED"),
        ];
        let lenient = schema(&rows, &TableRowsConfig::default())?;
        let row = lenient.encode_plain(&json!({"a": null}), &meta())?;
        assert_eq!(row.omitted, [1], "b is left to its DEFAULT expression");
        assert_eq!(&row.bytes[..2], &[0, 1], "a is 0, c is NULL");
        assert!(!lenient.column_list(&row.omitted).contains("`b`"));
        assert!(
            !lenient.column_list(&[]).contains("`m`"),
            "materialized columns are never written"
        );
        let strict = schema(
            &rows,
            &TableRowsConfig {
                missing: MissingField::DeadLetter,
                ..TableRowsConfig::default()
            },
        )?;
        let err = strict
            .encode_plain(&json!({"a": 1, "c": 2}), &meta())
            .unwrap_err();
        assert!(
            err.contains("column \"b\" (String): field \"b\" is missing"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn misfits_say_which_column_and_why_and_unknown_fields_are_named() -> Result<(), String> {
        let s = schema(&[col("age", "UInt8", "")], &TableRowsConfig::default())?;
        let err = s.encode_plain(&json!({"age": 300}), &meta()).unwrap_err();
        assert_eq!(
            err,
            "column \"age\" (UInt8) from field \"age\": 300 is out of the range of UInt8"
        );
        assert_eq!(
            s.encode_plain(&json!({"age": 1, "x": 2}), &meta())?.unknown,
            ["x"]
        );
        assert!(s
            .encode_plain(&json!([1]), &meta())
            .unwrap_err()
            .contains("not a JSON object"));
        Ok(())
    }

    fn state_schema(version_type: &str) -> Result<Schema, String> {
        schema(
            &[
                col("id", "Int64", ""),
                col("name", "String", ""),
                col("note", "String", ""),
                col("_version", version_type, ""),
                col("_deleted", "UInt8", ""),
                col("_op", "String", ""),
            ],
            &TableRowsConfig {
                changes: Changes::State,
                missing: MissingField::DeadLetter,
                ..TableRowsConfig::default()
            },
        )
    }

    fn change(op: &str, before: Value, after: Value, ordinal: u32) -> Value {
        json!({"op": op, "before": before, "after": after,
               "source": {"lsn": "1/A0", "ts_ms": 1_500, "ordinal": ordinal}})
    }

    #[test]
    fn a_change_writes_its_row_and_its_place_in_commit_order() -> Result<(), String> {
        let s = state_schema("UInt64")?;
        let (row, facts) = s.change_row(change(
            "u",
            json!(null),
            json!({"id": 7, "name": "a", "note": "n"}),
            3,
        ))?;
        assert_eq!(
            facts,
            ChangeFacts {
                op: "u".into(),
                lsn: 0x1_0000_00A0,
                ordinal: 3,
                ts_ms: 1_500
            }
        );
        let bytes = s.encode(&row, &meta(), Some(&facts))?.bytes;
        let version = (0x1_0000_00A0u64 << 16) | 3;
        let mut expected = 7i64.to_le_bytes().to_vec();
        expected.extend_from_slice(&[1, b'a', 1, b'n']);
        expected.extend_from_slice(&version.to_le_bytes());
        expected.extend_from_slice(&[0, 1, b'u']);
        assert_eq!(&bytes[..expected.len()], &expected[..]);
        // UInt128: the ordinal in the low 32 bits, exact.
        let wide = state_schema("UInt128")?;
        let bytes = wide.encode(&row, &meta(), Some(&facts))?.bytes;
        let version = (0x1_0000_00A0u128 << 32) | 3;
        assert_eq!(&bytes[12..28], &version.to_le_bytes());
        Ok(())
    }

    #[test]
    fn an_update_of_the_key_deletes_the_old_key_in_a_state_table() -> Result<(), String> {
        let s = state_schema("UInt64")?;
        let moved = s.change_rows(change(
            "u",
            json!({"id": 7}),
            json!({"id": 8, "name": "a", "note": ""}),
            2,
        ))?;
        assert_eq!(moved.len(), 2);
        assert_eq!(
            (moved[0].0["id"].as_i64(), moved[0].1.op.as_str()),
            (Some(7), "d")
        );
        assert_eq!(moved[0].1.ordinal, 2, "the same place in commit order");
        assert_eq!(
            (moved[1].0["id"].as_i64(), moved[1].1.op.as_str()),
            (Some(8), "u")
        );
        // The same key (REPLICA IDENTITY FULL gives a before every time): one row.
        let kept = s.change_rows(change(
            "u",
            json!({"id": 7, "name": "a", "note": ""}),
            json!({"id": 7, "name": "b", "note": ""}),
            0,
        ))?;
        assert_eq!(kept.len(), 1);
        let plain = s.change_rows(change(
            "u",
            json!(null),
            json!({"id": 7, "name": "b", "note": ""}),
            0,
        ))?;
        assert_eq!(plain.len(), 1);
        Ok(())
    }

    #[test]
    fn a_delete_writes_its_old_key_marked_deleted_even_on_a_strict_route() -> Result<(), String> {
        let s = state_schema("UInt64")?;
        let (row, facts) = s.change_row(change("d", json!({"id": 7}), json!(null), 0))?;
        let bytes = s.encode(&row, &meta(), Some(&facts))?.bytes;
        assert_eq!(&bytes[..8], &7i64.to_le_bytes());
        assert_eq!(&bytes[8..10], &[0, 0], "name and note: the type's default");
        assert_eq!(&bytes[18..21], &[1, 1, b'd'], "deleted, op d");
        Ok(())
    }

    #[test]
    fn unchanged_toast_comes_from_a_full_before_or_refuses_the_change() -> Result<(), String> {
        let s = state_schema("UInt64")?;
        let mut full = change(
            "u",
            json!({"id": 7, "name": "a", "note": "big"}),
            json!({"id": 7, "name": "b"}),
            0,
        );
        full["unchanged_toast"] = json!(["note"]);
        let (row, _) = s.change_row(full)?;
        assert_eq!(row["note"], "big");
        let mut partial = change("u", json!(null), json!({"id": 7, "name": "b"}), 0);
        partial["unchanged_toast"] = json!(["note"]);
        let err = s.change_row(partial).unwrap_err();
        assert!(err.contains("REPLICA IDENTITY FULL"), "{err}");
        Ok(())
    }

    #[test]
    fn a_state_route_needs_a_version_and_envelopes() -> Result<(), String> {
        let config = TableRowsConfig {
            changes: Changes::State,
            ..TableRowsConfig::default()
        };
        let err = schema(&[col("id", "Int64", "")], &config).unwrap_err();
        assert!(err.contains("no _version column"), "{err}");
        assert!(state_schema("Int64")
            .unwrap_err()
            .contains("UInt64 or UInt128"));
        let s = state_schema("UInt64")?;
        assert!(s
            .change_row(json!({"id": 1}))
            .unwrap_err()
            .contains("not a change envelope"));
        assert!(s
            .change_row(json!({"op": "c", "after": {}, "source": {"lsn": "zz"}}))
            .is_err());
        let beyond = ChangeFacts {
            op: "c".into(),
            lsn: 1 << 48,
            ordinal: 0,
            ts_ms: 0,
        };
        let err = s
            .encode(
                &json!({"id": 1, "name": "", "note": ""}),
                &meta(),
                Some(&beyond),
            )
            .unwrap_err();
        assert!(err.contains("use UInt128"), "{err}");
        Ok(())
    }

    /// The fast path (fields split, values parsed one by one) writes the
    /// same bytes, defaults and unknown fields as the tree, whatever the
    /// payload: escapes in names and values, nulls, missing and unknown
    /// fields, two columns reading one field.
    #[test]
    fn split_fields_write_what_the_tree_writes() -> Result<(), String> {
        let rows = [
            col("ab", "String", ""),
            col("n", "Nullable(Int32)", ""),
            col("z", "UInt8", ""),
            col("d", "String", "DEFAULT"),
            col("copy", "String", ""),
            col("t", "DateTime", ""),
        ];
        let payloads = [
            r#"{"ab": "x", "n": 1, "z": 2, "d": "y", "t": "2024-01-02T03:04:05Z"}"#,
            r#"{"a\u0062": "esc\"aped\n", "n": null, "z": null, "extra": [1]}"#,
            r#"{"ab": "x", "unknown": 1, "other": {"k": 2}}"#,
            r#"{}"#,
            r#"{"ab": 5, "t": 1704164645}"#,
        ];
        for shared in [false, true] {
            for missing in [MissingField::Default, MissingField::DeadLetter] {
                let mut fields = BTreeMap::new();
                if shared {
                    fields.insert("copy".to_string(), "ab".to_string());
                }
                let s = schema(
                    &rows,
                    &TableRowsConfig {
                        fields,
                        missing,
                        ..TableRowsConfig::default()
                    },
                )?;
                for payload in payloads {
                    let doc = s.parse(payload.as_bytes())?;
                    assert!(matches!(doc, Document::Fields(_)));
                    let mut fast = Vec::new();
                    let fast =
                        s.encode_into(&doc, &meta(), (None, None), &mut fast)
                            .map(|(o, mut u)| {
                                u.sort();
                                (fast, o, u)
                            });
                    let tree: Value = serde_json::from_str(payload).map_err(|e| e.to_string())?;
                    let slow = s.encode_plain(&tree, &meta()).map(|mut r| {
                        r.unknown.sort();
                        (r.bytes, r.omitted, r.unknown)
                    });
                    assert_eq!(fast, slow, "{payload} shared={shared} missing={missing:?}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn rows_group_by_what_they_leave_out() {
        let mut groups = Groups::default();
        for omitted in [vec![], vec![1], vec![]] {
            groups.push_bytes(omitted, &[1]);
        }
        assert_eq!(groups.rows(), 3);
        assert_eq!(groups.groups[&vec![]], (vec![1, 1], 2));
    }
}
