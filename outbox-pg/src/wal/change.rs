//! From replication messages to events: the change envelope, the event's
//! topic, key and deterministic id. Pure: the source feeds it what the
//! server sent, in order.

use std::collections::HashMap;

use bytes::Bytes;
use outbox_core::{ms_to_system_time, Event, CONTENT_TYPE_JSON, HEADER_CONTENT_TYPE};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::pgoutput::{self, Datum, Relation, RowMessage};
use super::value::to_json;
use super::CaptureTable;

/// Namespace of the UUIDv5 ids of captured changes.
pub const WAL_CHANGE_NAMESPACE: Uuid = Uuid::from_u128(0x6f75_7462_6f78_2d77_616c_2d63_6861_6e67);

/// Header carrying the commit LSN of a captured change (`0/16B3748` form).
/// Not under the reserved `outbox-` prefix, which the Kafka bus keeps for
/// its own headers and does not publish from an event.
pub const HEADER_WAL_LSN: &str = "wal-lsn";

/// PostgreSQL's epoch (2000-01-01) in Unix milliseconds.
const PG_EPOCH_MS: i64 = 946_684_800_000;

/// The id of the `ordinal`-th change of the transaction that committed at
/// `commit_lsn` on the server `system_id`: the same every time the change
/// is read again, so the sink recognises a change published twice.
pub fn change_event_id(system_id: &str, commit_lsn: u64, ordinal: u32) -> Uuid {
    Uuid::new_v5(
        &WAL_CHANGE_NAMESPACE,
        format!("{system_id}/{commit_lsn:X}/{ordinal}").as_bytes(),
    )
}

/// `0/16B3748`, as PostgreSQL writes an LSN.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Why a replication message could not become an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// The row message does not decode.
    #[error(transparent)]
    Decode(#[from] pgoutput::DecodeError),
    /// A change refers to a table the stream never described.
    #[error("a change of relation {0} arrived before its description")]
    UnknownRelation(u32),
    /// A row message arrived outside a transaction.
    #[error("a row change arrived outside a transaction")]
    OutsideTransaction,
}

/// How captured tables become topics and keys.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `{schema}` and `{table}` are replaced.
    pub topic_template: String,
    /// Per table (`schema.table`): topic and key columns.
    pub tables: HashMap<String, CaptureTable>,
    /// Prefix of the logical messages that carry events.
    pub message_prefix: String,
    /// Outbox tables (`schema.table`) whose inserts are events as they are.
    pub outbox_tables: Vec<String>,
}

/// What the decoder made of one replication message.
#[derive(Debug)]
pub enum Decoded {
    /// Nothing to publish (a table description, a message of another prefix).
    Nothing,
    /// An event to publish.
    Event(Event),
    /// A message under our prefix whose content is not an event: kept aside
    /// with its reason (the event id is deterministic like a change's).
    Poison {
        /// A deterministic id for the dead letter.
        id: Uuid,
        /// The raw content.
        content: Bytes,
        /// Why it is not an event.
        reason: String,
    },
    /// Tables were truncated: not an event (see `docs/wal.md`), logged.
    Truncated(Vec<String>),
}

struct Transaction {
    commit_lsn: u64,
    commit_time_ms: i64,
    xid: u32,
    ordinal: u32,
    /// Row changes (of any published table) so far.
    rows: u32,
}

/// The rows one table's changes touch, by their key: what the initial
/// load's window needs to know (`super::backfill`).
#[derive(Debug, Default)]
struct Watch {
    table: String,
    key: Vec<String>,
    /// The key of each row touched (`None`: a key column was not sent).
    touched: Vec<Option<Vec<Option<String>>>>,
}

/// Turns one session's replication messages into events.
pub struct Decoder {
    system_id: String,
    routing: Routing,
    relations: HashMap<u32, Relation>,
    transaction: Option<Transaction>,
    watch: Option<Watch>,
}

impl Decoder {
    /// A decoder for a session on the server `system_id` (from `IDENTIFY_SYSTEM`).
    pub fn new(system_id: impl Into<String>, routing: Routing) -> Self {
        Self {
            system_id: system_id.into(),
            routing,
            relations: HashMap::new(),
            transaction: None,
            watch: None,
        }
    }

    /// From now on, notes the key (the `key` columns, by name) of every row
    /// a change of `table` (`schema.table`) touches, old and new; `None`
    /// stops. [`Decoder::take_touched`] hands them over.
    pub fn watch(&mut self, watch: Option<(&str, &[String])>) {
        self.watch = watch.map(|(table, key)| Watch {
            table: table.to_string(),
            key: key.to_vec(),
            touched: Vec::new(),
        });
    }

    /// The keys noted since the last call (see [`Decoder::watch`]).
    pub fn take_touched(&mut self) -> Vec<Option<Vec<Option<String>>>> {
        self.watch
            .as_mut()
            .map(|w| std::mem::take(&mut w.touched))
            .unwrap_or_default()
    }

    /// The open transaction's xid and whether it changed any row so far.
    pub fn transaction(&self) -> Option<(u32, bool)> {
        self.transaction.as_ref().map(|tx| (tx.xid, tx.rows > 0))
    }

    /// Where the open transaction commits.
    pub fn commit_lsn(&self) -> Option<u64> {
        self.transaction.as_ref().map(|tx| tx.commit_lsn)
    }

    /// A transaction begins; it commits at `final_lsn`.
    pub fn begin(&mut self, final_lsn: u64, commit_time_micros: i64, xid: u32) {
        self.transaction = Some(Transaction {
            commit_lsn: final_lsn,
            commit_time_ms: PG_EPOCH_MS.saturating_add(commit_time_micros / 1000),
            xid,
            ordinal: 0,
            rows: 0,
        });
    }

    /// The transaction committed.
    pub fn commit(&mut self) {
        self.transaction = None;
    }

    /// Whether a transaction is open (begun, not committed).
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }

    /// A logical decoding message. Transactional messages take an ordinal
    /// in their transaction; a non-transactional one (never written by
    /// `Outbox::emit`) is keyed by its own LSN.
    pub fn message(&mut self, prefix: &str, content: &Bytes, lsn: u64) -> Decoded {
        let (commit_lsn, ordinal) = match self.transaction.as_mut() {
            Some(tx) => {
                let ordinal = tx.ordinal;
                tx.ordinal += 1;
                (tx.commit_lsn, ordinal)
            }
            None => (lsn, 0),
        };
        if prefix != self.routing.message_prefix {
            return Decoded::Nothing;
        }
        match crate::message::decode_message(content) {
            Ok(event) => Decoded::Event(event),
            Err(err) => Decoded::Poison {
                id: change_event_id(&self.system_id, commit_lsn, ordinal),
                content: content.clone(),
                reason: err.to_string(),
            },
        }
    }

    /// A row message (`XLogData` that is not a boundary or a message).
    pub fn row(&mut self, data: &Bytes) -> Result<Decoded, ChangeError> {
        let (op, relation, before, before_full, after) = match pgoutput::decode(data)? {
            RowMessage::Relation(relation) => {
                self.relations.insert(relation.oid, relation);
                return Ok(Decoded::Nothing);
            }
            RowMessage::Other(_) => return Ok(Decoded::Nothing),
            RowMessage::Truncate { relations } => {
                return Ok(Decoded::Truncated(
                    relations
                        .iter()
                        .map(|oid| match self.relations.get(oid) {
                            Some(r) => format!("{}.{}", r.schema, r.table),
                            None => format!("relation {oid}"),
                        })
                        .collect(),
                ))
            }
            RowMessage::Insert { relation, new } => ("c", relation, None, false, Some(new)),
            RowMessage::Update {
                relation,
                old,
                old_is_full,
                new,
            } => ("u", relation, old, old_is_full, Some(new)),
            RowMessage::Delete {
                relation,
                old,
                old_is_full,
            } => ("d", relation, Some(old), old_is_full, None),
        };
        let tx = self
            .transaction
            .as_mut()
            .ok_or(ChangeError::OutsideTransaction)?;
        let ordinal = tx.ordinal;
        tx.ordinal += 1;
        tx.rows += 1;
        let (commit_lsn, commit_time_ms, xid) = (tx.commit_lsn, tx.commit_time_ms, tx.xid);
        let rel = self
            .relations
            .get(&relation)
            .ok_or(ChangeError::UnknownRelation(relation))?;
        let name = format!("{}.{}", rel.schema, rel.table);
        if let Some(watch) = self.watch.as_mut().filter(|w| w.table == name) {
            // The old row only when sent (a delete, or an update of the key).
            for row in [before.as_deref(), after.as_deref()].into_iter().flatten() {
                watch.touched.push(key_text(rel, row, &watch.key));
            }
        }
        if self.routing.outbox_tables.contains(&name) {
            // An outbox row is its event; its update or delete (the row
            // retired) is not one.
            let Some(row) = after.as_deref().filter(|_| op == "c") else {
                return Ok(Decoded::Nothing);
            };
            return Ok(match outbox_row_event(rel, row, commit_time_ms) {
                Ok(event) => Decoded::Event(event),
                Err(reason) => Decoded::Poison {
                    id: change_event_id(&self.system_id, commit_lsn, ordinal),
                    content: Bytes::from(row_json(rel, row, true, &mut Vec::new()).to_string()),
                    reason: format!("a row of the outbox table {name} is not an event: {reason}"),
                },
            });
        }
        let source = serde_json::json!({
            "schema": rel.schema,
            "table": rel.table,
            "lsn": lsn_text(commit_lsn),
            "ts_ms": commit_time_ms,
            "xid": xid,
            "ordinal": ordinal,
        });
        let change = Change {
            op,
            before: before.as_deref(),
            before_full,
            after: after.as_deref(),
            source,
        };
        let id = change_event_id(&self.system_id, commit_lsn, ordinal);
        let event = envelope_event(
            &self.routing,
            rel,
            change,
            |_| id,
            commit_time_ms,
            commit_lsn,
        );
        Ok(Decoded::Event(event))
    }

    /// A row of the initial load (`op` `r`), published at `at` (the commit
    /// position of its chunk's high watermark). Its id is derived from the
    /// row itself, so a chunk read again gives an unchanged row the same id.
    pub fn snapshot_row(&self, rel: &Relation, row: &[Datum], at: u64, now_ms: i64) -> Event {
        let source = serde_json::json!({
            "schema": rel.schema,
            "table": rel.table,
            "lsn": lsn_text(at),
            "ts_ms": now_ms,
            "snapshot": true,
        });
        let change = Change {
            op: "r",
            before: None,
            before_full: false,
            after: Some(row),
            source,
        };
        let system_id = self.system_id.clone();
        let table = format!("{}.{}", rel.schema, rel.table);
        envelope_event(
            &self.routing,
            rel,
            change,
            move |after: &Value| {
                Uuid::new_v5(
                    &WAL_CHANGE_NAMESPACE,
                    format!("{system_id}/r/{table}/{after}").as_bytes(),
                )
            },
            now_ms,
            at,
        )
    }
}

/// The text of `columns` in `row`, each `None` when NULL; `None` when one
/// is not in the row (unknown column, or a TOASTed value not sent).
fn key_text(rel: &Relation, row: &[Datum], columns: &[String]) -> Option<Vec<Option<String>>> {
    columns
        .iter()
        .map(|name| {
            let at = rel.columns.iter().position(|c| &c.name == name)?;
            match row.get(at)? {
                Datum::Null => Some(None),
                Datum::UnchangedToast => None,
                Datum::Text(raw) => Some(Some(String::from_utf8_lossy(raw).into_owned())),
            }
        })
        .collect()
}

/// The event an outbox table's row holds (the columns `Outbox::enqueue`
/// writes: `event_id`, `topic`, `key`, `payload`, `headers`); it was
/// created when its transaction committed.
fn outbox_row_event(rel: &Relation, row: &[Datum], commit_time_ms: i64) -> Result<Event, String> {
    let column = |name: &str| -> Option<&Datum> {
        rel.columns
            .iter()
            .position(|c| c.name == name)
            .and_then(|i| row.get(i))
    };
    let text = |name: &str| -> Result<Option<String>, String> {
        match column(name) {
            None => Err(format!("it has no column {name}")),
            Some(Datum::Null) => Ok(None),
            Some(Datum::UnchangedToast) => Err(format!("its {name} was not sent")),
            Some(Datum::Text(raw)) => std::str::from_utf8(raw)
                .map(|t| Some(t.to_string()))
                .map_err(|_| format!("its {name} is not UTF-8")),
        }
    };
    let bytes = |name: &str| -> Result<Option<Bytes>, String> {
        text(name)?
            .map(|hex| {
                hex.strip_prefix("\\x")
                    .and_then(super::value::hex_decode)
                    .map(Bytes::from)
                    .ok_or_else(|| format!("its {name} is not bytea in hex"))
            })
            .transpose()
    };
    let id = text("event_id")?.ok_or("its event_id is null")?;
    let id = uuid::Uuid::parse_str(&id).map_err(|e| format!("its event_id {id:?}: {e}"))?;
    let topic = text("topic")?.ok_or("its topic is null")?;
    let payload = bytes("payload")?.unwrap_or_default();
    let mut event = Event::new(topic, payload)
        .with_id(id)
        .with_created_at(ms_to_system_time(commit_time_ms));
    if let Some(key) = bytes("key")? {
        event = event.with_key(key);
    }
    if let Some(headers) = text("headers")? {
        let headers: std::collections::BTreeMap<String, String> = serde_json::from_str(&headers)
            .map_err(|e| format!("its headers are not a JSON object of strings: {e}"))?;
        event.headers = headers;
    }
    Ok(event)
}

/// One change, before it is an event.
struct Change<'a> {
    op: &'static str,
    before: Option<&'a [Datum]>,
    before_full: bool,
    after: Option<&'a [Datum]>,
    source: Value,
}

/// The event of `change` to `rel`: topic and key by `routing`, the
/// envelope as payload, the id from `id` (given the `after` object).
fn envelope_event(
    routing: &Routing,
    rel: &Relation,
    change: Change<'_>,
    id: impl FnOnce(&Value) -> Uuid,
    created_ms: i64,
    lsn: u64,
) -> Event {
    let name = format!("{}.{}", rel.schema, rel.table);
    let route = routing.tables.get(&name);
    let topic = route.and_then(|r| r.topic.clone()).unwrap_or_else(|| {
        routing
            .topic_template
            .replace("{schema}", &rel.schema)
            .replace("{table}", &rel.table)
    });
    let mut unchanged = Vec::new();
    let after_json = change
        .after
        .map(|row| row_json(rel, row, true, &mut unchanged))
        .unwrap_or(Value::Null);
    let before_json = change
        .before
        .map(|row| row_json(rel, row, change.before_full, &mut Vec::new()))
        .unwrap_or(Value::Null);
    let key_columns: Vec<&str> = match route.map(|r| &r.key_columns) {
        Some(columns) if !columns.is_empty() => columns.iter().map(String::as_str).collect(),
        _ => rel
            .columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.as_str())
            .collect(),
    };
    // The key of a delete is in the old row; of the rest, in the new.
    let key = change
        .after
        .or(change.before)
        .and_then(|row| key_of(rel, row, &key_columns));
    let id = id(&after_json);
    let mut envelope = Map::new();
    envelope.insert("op".into(), Value::String(change.op.into()));
    envelope.insert("before".into(), before_json);
    envelope.insert("after".into(), after_json);
    if !unchanged.is_empty() {
        envelope.insert(
            "unchanged_toast".into(),
            Value::Array(unchanged.into_iter().map(Value::String).collect()),
        );
    }
    envelope.insert("source".into(), change.source);
    let payload = serde_json::to_vec(&Value::Object(envelope)).unwrap_or_default();
    let mut event = Event::new(topic, payload)
        .with_id(id)
        .with_created_at(ms_to_system_time(created_ms))
        .with_header(HEADER_CONTENT_TYPE, CONTENT_TYPE_JSON)
        .with_header(HEADER_WAL_LSN, lsn_text(lsn));
    if let Some(key) = key {
        event = event.with_key(key);
    }
    event
}

/// A row as a JSON object: every column of a full row, or the key columns
/// of a key-only old row. Unchanged TOASTed values are left out and named
/// in `unchanged`.
fn row_json(rel: &Relation, row: &[Datum], full: bool, unchanged: &mut Vec<String>) -> Value {
    let mut object = Map::new();
    for (column, datum) in rel.columns.iter().zip(row) {
        if !full && !column.key {
            continue;
        }
        match datum {
            Datum::Null => {
                object.insert(column.name.clone(), Value::Null);
            }
            Datum::UnchangedToast => unchanged.push(column.name.clone()),
            Datum::Text(raw) => {
                let text = String::from_utf8_lossy(raw);
                object.insert(column.name.clone(), to_json(column.type_oid, &text));
            }
        }
    }
    Value::Object(object)
}

/// The key: one column's text as it is, several as a JSON array of their
/// texts; `None` when the table has no key columns.
fn key_of(rel: &Relation, row: &[Datum], columns: &[&str]) -> Option<Bytes> {
    let texts: Vec<Option<String>> = columns
        .iter()
        .map(|name| {
            rel.columns
                .iter()
                .position(|c| c.name == *name)
                .and_then(|i| match row.get(i) {
                    Some(Datum::Text(raw)) => Some(String::from_utf8_lossy(raw).into_owned()),
                    _ => None,
                })
        })
        .collect();
    match texts.as_slice() {
        [] => None,
        [one] => Some(Bytes::from(one.clone().unwrap_or_default())),
        many => Some(Bytes::from(serde_json::to_vec(many).unwrap_or_default())),
    }
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::tests::{users_relation, Frame};
    use super::*;
    use serde_json::json;

    fn decoder() -> Decoder {
        let mut tables = HashMap::new();
        tables.insert(
            "public.users".to_string(),
            CaptureTable {
                table: "public.users".into(),
                topic: Some("user_events".into()),
                key_columns: vec![],
            },
        );
        let mut d = Decoder::new(
            "7300000000000000001",
            Routing {
                topic_template: "{schema}.{table}".into(),
                tables,
                message_prefix: "outbox".into(),
                outbox_tables: vec![],
            },
        );
        assert!(matches!(d.row(&users_relation()), Ok(Decoded::Nothing)));
        d
    }

    fn payload(decoded: Decoded) -> (Event, serde_json::Value) {
        let Decoded::Event(event) = decoded else {
            panic!("not an event: {decoded:?}");
        };
        let value = serde_json::from_slice(&event.payload).unwrap_or(Value::Null);
        (event, value)
    }

    #[test]
    fn an_insert_becomes_a_keyed_event_with_a_deterministic_id() -> Result<(), ChangeError> {
        let mut d = decoder();
        d.begin(0x1_0000_0010, 1_000_000, 42);
        let insert = Frame::new(b'I')
            .i32(16384)
            .u8(b'N')
            .i16(2)
            .text("7")
            .text("alice")
            .bytes();
        let (event, body) = payload(d.row(&insert)?);
        assert_eq!(event.topic, "user_events");
        assert_eq!(event.key.as_deref(), Some(&b"7"[..]));
        assert_eq!(
            event.id,
            change_event_id("7300000000000000001", 0x1_0000_0010, 0)
        );
        assert_eq!(body["op"], "c");
        assert_eq!(body["after"], json!({"id": 7, "name": "alice"}));
        assert_eq!(body["before"], Value::Null);
        assert_eq!(body["source"]["lsn"], "1/10");
        assert_eq!(body["source"]["ts_ms"], json!(946_684_801_000i64));
        // The second change of the transaction has the next ordinal.
        let (second, _) = payload(d.row(&insert)?);
        assert_eq!(
            second.id,
            change_event_id("7300000000000000001", 0x1_0000_0010, 1)
        );
        Ok(())
    }

    #[test]
    fn a_delete_is_keyed_by_its_old_row_and_toast_is_not_null() -> Result<(), ChangeError> {
        let mut d = decoder();
        d.begin(16, 0, 1);
        let delete = Frame::new(b'D')
            .i32(16384)
            .u8(b'K')
            .i16(2)
            .text("9")
            .u8(b'n')
            .bytes();
        let (event, body) = payload(d.row(&delete)?);
        assert_eq!(event.key.as_deref(), Some(&b"9"[..]));
        assert_eq!(body["op"], "d");
        assert_eq!(body["before"], json!({"id": 9}));
        assert_eq!(body["after"], Value::Null);
        let update = Frame::new(b'U')
            .i32(16384)
            .u8(b'N')
            .i16(2)
            .text("9")
            .u8(b'u')
            .bytes();
        let (_, body) = payload(d.row(&update)?);
        assert_eq!(body["after"], json!({"id": 9}));
        assert_eq!(body["unchanged_toast"], json!(["name"]));
        let null_name = Frame::new(b'U')
            .i32(16384)
            .u8(b'N')
            .i16(2)
            .text("9")
            .u8(b'n')
            .bytes();
        let (_, body) = payload(d.row(&null_name)?);
        assert_eq!(body["after"], json!({"id": 9, "name": null}));
        assert!(body.get("unchanged_toast").is_none());
        Ok(())
    }

    #[test]
    fn unknown_tables_and_changes_outside_transactions_are_errors() {
        let mut d = decoder();
        let insert = Frame::new(b'I')
            .i32(16384)
            .u8(b'N')
            .i16(1)
            .text("1")
            .bytes();
        assert_eq!(d.row(&insert).err(), Some(ChangeError::OutsideTransaction));
        d.begin(16, 0, 1);
        let other = Frame::new(b'I').i32(99).u8(b'N').i16(1).text("1").bytes();
        assert_eq!(d.row(&other).err(), Some(ChangeError::UnknownRelation(99)));
    }

    #[test]
    fn messages_under_the_prefix_are_events_and_bad_ones_poison() -> Result<(), crate::MessageError>
    {
        let mut d = decoder();
        d.begin(32, 0, 1);
        let event = Event::new("orders", "x")
            .with_key("k")
            .with_created_at(ms_to_system_time(7));
        let content = Bytes::from(crate::message::encode_message(&event)?);
        assert!(matches!(d.message("outbox", &content, 40), Decoded::Event(e) if e == event));
        assert!(matches!(
            d.message("someone-else", &content, 41),
            Decoded::Nothing
        ));
        let Decoded::Poison { id, reason, .. } =
            d.message("outbox", &Bytes::from_static(b"\x01"), 42)
        else {
            panic!("a bad frame was not poison");
        };
        assert_eq!(id, change_event_id("7300000000000000001", 32, 2));
        assert!(reason.contains("truncated"), "{reason}");
        Ok(())
    }
}
