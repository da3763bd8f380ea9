//! A table's columns as the encoder uses them, and one JSON payload encoded
//! to a RowBinary row of them. Pure: the columns come in as rows of
//! `system.columns`.

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

use super::types::ColumnType;
use super::{MissingField, TableRowsConfig};
use crate::mapper::RowMeta;

/// One row of `system.columns`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
pub(crate) struct ColumnRow {
    pub name: String,
    pub r#type: String,
    /// `DEFAULT`, `MATERIALIZED`, `ALIAS`, `EPHEMERAL` or empty.
    pub default_kind: String,
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
            let source = match row.name.as_str() {
                "event_id" => Source::EventId,
                "kafka_partition" => Source::KafkaPartition,
                "kafka_offset" => Source::KafkaOffset,
                "ingested_at" => Source::IngestedAt,
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
        Ok(Self {
            columns,
            known_fields,
            missing: config.missing,
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

    /// Encodes `document` (the payload's JSON object) and `meta` into one
    /// row, or says which column refused what.
    pub(crate) fn encode(&self, document: &Value, meta: &RowMeta) -> Result<EncodedRow, String> {
        let Value::Object(fields) = document else {
            return Err(format!(
                "the payload is not a JSON object but {}",
                short(document)
            ));
        };
        let mut row = EncodedRow::default();
        for name in fields.keys() {
            if !self.known_fields.contains(name) {
                row.unknown.push(name.clone());
            }
        }
        let event_id = Value::String(meta.event_id.to_string());
        let partition = Value::from(meta.kafka_partition);
        let offset = Value::from(meta.kafka_offset);
        let ingested = Value::from(meta.ingested_at);
        for (i, column) in self.columns.iter().enumerate() {
            let value = match &column.source {
                Source::Field(field) => fields.get(field),
                Source::Pointer(path) => document.pointer(path),
                Source::EventId => Some(&event_id),
                Source::KafkaPartition => Some(&partition),
                Source::KafkaOffset => Some(&offset),
                Source::IngestedAt => Some(&ingested),
            };
            let value = value.filter(|v| !v.is_null() || column.ty.is_nullable());
            match value {
                Some(value) => column.ty.encode(value, &mut row.bytes).map_err(|reason| {
                    format!(
                        "column {:?} ({}) from {}: {reason}",
                        column.name,
                        column.type_name,
                        column.source_name()
                    )
                })?,
                None if self.missing == MissingField::DeadLetter => {
                    return Err(format!(
                        "column {:?} ({}): {} is missing (the route dead-letters missing fields)",
                        column.name,
                        column.type_name,
                        column.source_name()
                    ))
                }
                None if column.has_default_expression => row.omitted.push(i),
                None => column.ty.encode_default(&mut row.bytes),
            }
        }
        Ok(row)
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

impl Column {
    fn source_name(&self) -> String {
        match &self.source {
            Source::Field(field) => format!("field {field:?}"),
            Source::Pointer(path) => format!("pointer {path:?}"),
            _ => "the record's position".into(),
        }
    }
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
    pub(crate) fn push(&mut self, row: EncodedRow) {
        let (bytes, count) = self.groups.entry(row.omitted).or_default();
        bytes.extend_from_slice(&row.bytes);
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
        }
    }

    fn meta_rows() -> Vec<ColumnRow> {
        META_COLUMNS.iter().map(|(n, t)| col(n, t, "")).collect()
    }

    fn meta() -> RowMeta {
        RowMeta {
            event_id: Uuid::nil(),
            kafka_partition: 2,
            kafka_offset: 9,
            ingested_at: 7,
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
        let row = s.encode(
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
        let row = lenient.encode(&json!({"a": null}), &meta())?;
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
            .encode(&json!({"a": 1, "c": 2}), &meta())
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
        let err = s.encode(&json!({"age": 300}), &meta()).unwrap_err();
        assert_eq!(
            err,
            "column \"age\" (UInt8) from field \"age\": 300 is out of the range of UInt8"
        );
        assert_eq!(
            s.encode(&json!({"age": 1, "x": 2}), &meta())?.unknown,
            ["x"]
        );
        assert!(s
            .encode(&json!([1]), &meta())
            .unwrap_err()
            .contains("not a JSON object"));
        Ok(())
    }

    #[test]
    fn rows_group_by_what_they_leave_out() {
        let mut groups = Groups::default();
        for omitted in [vec![], vec![1], vec![]] {
            groups.push(EncodedRow {
                bytes: vec![1],
                omitted,
                unknown: vec![],
            });
        }
        assert_eq!(groups.rows(), 3);
        assert_eq!(groups.groups[&vec![]], (vec![1, 1], 2));
    }
}
