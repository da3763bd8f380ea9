//! Rows of the WAL source's change envelopes (`op`, `before`, `after`,
//! `source`): which row a change writes, and its place in commit order.

use serde_json::Value;

use super::{short, Changes, Schema};
use crate::table::types::ColumnType;

/// What a change envelope says besides the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChangeFacts {
    /// `c`, `u`, `d` or `r`.
    pub op: String,
    pub lsn: u64,
    pub ordinal: u32,
    pub ts_ms: i64,
}

impl Schema {
    /// The row of a change envelope and what the envelope says of it: the
    /// new row (`after`) of an insert, update or loaded row, the old one
    /// (`before`) of a delete. An update's unchanged TOAST values are taken
    /// from `before` when it has them (`REPLICA IDENTITY FULL`); one a
    /// column needs and the change lacks refuses the record.
    pub(crate) fn change_row(&self, envelope: Value) -> Result<(Value, ChangeFacts), String> {
        let Value::Object(mut envelope) = envelope else {
            return Err(format!(
                "the change is not a JSON object but {}",
                short(&envelope)
            ));
        };
        let op = match envelope.get("op").and_then(Value::as_str) {
            Some(op @ ("c" | "u" | "d" | "r")) => op.to_string(),
            _ => return Err("not a change envelope: no op of c, u, d or r".into()),
        };
        let source = envelope.get("source").cloned().unwrap_or(Value::Null);
        let lsn = source
            .get("lsn")
            .and_then(Value::as_str)
            .and_then(parse_lsn)
            .ok_or("not a change envelope: no source.lsn of the form X/Y")?;
        let ordinal = source
            .get("ordinal")
            .and_then(Value::as_u64)
            .map_or(Ok(0), u32::try_from)
            .map_err(|_| "source.ordinal is out of range".to_string())?;
        let ts_ms = source.get("ts_ms").and_then(Value::as_i64).unwrap_or(0);
        let side = if op == "d" { "before" } else { "after" };
        let mut row = match envelope.remove(side) {
            Some(row @ Value::Object(_)) => row,
            _ => return Err(format!("the {op} change has no {side} row")),
        };
        if let Some(Value::Array(unchanged)) = envelope.get("unchanged_toast") {
            let before = envelope.get("before").and_then(Value::as_object);
            for name in unchanged.iter().filter_map(Value::as_str) {
                match (before.and_then(|b| b.get(name)), &mut row) {
                    (Some(value), Value::Object(fields)) => {
                        fields.insert(name.to_string(), value.clone());
                    }
                    _ if self.known_fields.contains(name) => {
                        return Err(format!(
                            "field {name:?} did not come with the update (an unchanged TOAST \
                             value): set REPLICA IDENTITY FULL on the PostgreSQL table so updates \
                             carry it"
                        ))
                    }
                    _ => {}
                }
            }
        }
        Ok((
            row,
            ChangeFacts {
                op,
                lsn,
                ordinal,
                ts_ms,
            },
        ))
    }

    /// The rows a change writes: its row, and before it, on a state table,
    /// a deleted row for the old key of an update that changed the key
    /// (PostgreSQL sends that as one update, whose `before` holds the old
    /// key), which would otherwise stay in the table.
    pub(crate) fn change_rows(&self, envelope: Value) -> Result<Vec<(Value, ChangeFacts)>, String> {
        let old = match (&envelope["op"], &envelope["before"]) {
            (Value::String(op), before @ Value::Object(_)) if op == "u" => Some(before.clone()),
            _ => None,
        };
        let (row, facts) = self.change_row(envelope)?;
        let moved = self.changes == Changes::State
            && old.as_ref().is_some_and(|old| {
                self.key_fields.iter().any(|key| {
                    old.get(key)
                        .is_some_and(|value| row.get(key) != Some(value))
                })
            });
        let mut rows = Vec::with_capacity(2);
        if let (true, Some(old)) = (moved, old) {
            let deleted = ChangeFacts {
                op: "d".into(),
                ..facts.clone()
            };
            rows.push((old, deleted));
        }
        rows.push((row, facts));
        Ok(rows)
    }
}

/// A change's place in commit order as the `_version` column holds it.
/// UInt128: (commit LSN, ordinal), exact. UInt64: the commit LSN in the high
/// 48 bits and the ordinal in the low 16, exact up to 256 TiB of WAL and
/// 65,535 changes into a transaction (later changes of one transaction
/// share the last version: docs/tables.md).
pub(super) fn put_version(
    ty: &ColumnType,
    change: &ChangeFacts,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    if let ColumnType::Int { bytes: 16, .. } = ty {
        let version = (u128::from(change.lsn) << 32) | u128::from(change.ordinal);
        out.extend_from_slice(&version.to_le_bytes());
        return Ok(());
    }
    if change.lsn >> 48 != 0 {
        return Err(format!(
            "column \"_version\" (UInt64): commit position {:X}/{:X} is beyond what a UInt64 \
             version holds with the ordinal (256 TiB of WAL); use UInt128",
            change.lsn >> 32,
            change.lsn & 0xFFFF_FFFF
        ));
    }
    let version = (change.lsn << 16) | u64::from(change.ordinal.min(0xFFFF));
    out.extend_from_slice(&version.to_le_bytes());
    Ok(())
}

/// `X/Y`, PostgreSQL's text of an LSN.
fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}
