//! Decoding of `pgoutput`'s row messages (protocol version 1): relations,
//! inserts, updates, deletes and truncates. The replication client decodes
//! transaction boundaries and logical messages itself; these are the rest.
//!
//! Reference: PostgreSQL's "Logical Replication Message Formats".

use bytes::Bytes;

/// A column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the primary key, by default).
    pub key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
}

/// A table, as announced before its first change in a session (and again
/// after its definition changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Its OID, which the change messages refer to.
    pub oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// `REPLICA IDENTITY`: `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns, in the table's order.
    pub columns: Vec<Column>,
}

/// One column's value in a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// SQL NULL.
    Null,
    /// A TOASTed value the update did not change: not sent.
    UnchangedToast,
    /// The value in the type's text output.
    Text(Bytes),
}

/// A decoded row message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowMessage {
    /// A table's description.
    Relation(Relation),
    /// A row inserted.
    Insert {
        /// The table's OID.
        relation: u32,
        /// The new row.
        new: Vec<Datum>,
    },
    /// A row updated.
    Update {
        /// The table's OID.
        relation: u32,
        /// The old row: its key columns (`K`) or the whole row (`O`, with
        /// `REPLICA IDENTITY FULL`); absent when the key did not change.
        old: Option<Vec<Datum>>,
        /// Whether `old` is the whole row.
        old_is_full: bool,
        /// The new row.
        new: Vec<Datum>,
    },
    /// A row deleted.
    Delete {
        /// The table's OID.
        relation: u32,
        /// The old row's key columns, or the whole row (`REPLICA IDENTITY FULL`).
        old: Vec<Datum>,
        /// Whether `old` is the whole row.
        old_is_full: bool,
    },
    /// Tables truncated.
    Truncate {
        /// Their OIDs.
        relations: Vec<u32>,
    },
    /// Something the source does not turn into events (type and origin
    /// announcements, and any message kind newer than protocol 1).
    Other(u8),
}

/// Why a message could not be decoded: the stream is not what protocol 1
/// says, a permanent error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput message '{kind}': {reason}")]
pub struct DecodeError {
    /// The message kind.
    pub kind: char,
    /// What was wrong.
    pub reason: String,
}

struct Cursor<'a> {
    data: &'a Bytes,
    at: usize,
    kind: u8,
}

impl Cursor<'_> {
    fn fail(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError {
            kind: char::from(self.kind),
            reason: reason.into(),
        }
    }

    fn take(&mut self, len: usize) -> Result<&[u8], DecodeError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.data.len())
            .ok_or_else(|| self.fail(format!("truncated at byte {}", self.at)))?;
        let slice = &self.data[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(self.i32()? as u32)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    fn cstring(&mut self) -> Result<String, DecodeError> {
        let rest = &self.data[self.at.min(self.data.len())..];
        let len = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| self.fail("unterminated string"))?;
        let text =
            String::from_utf8(rest[..len].to_vec()).map_err(|_| self.fail("string not UTF-8"))?;
        self.at += len + 1;
        Ok(text)
    }

    fn tuple(&mut self) -> Result<Vec<Datum>, DecodeError> {
        let count = self.i16()?;
        let count = usize::try_from(count).map_err(|_| self.fail(format!("{count} columns")))?;
        let mut datums = Vec::with_capacity(count);
        for _ in 0..count {
            datums.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => {
                    let len = self.i32()?;
                    let len = usize::try_from(len)
                        .map_err(|_| self.fail(format!("value of length {len}")))?;
                    let start = self.at;
                    self.take(len)?;
                    Datum::Text(self.data.slice(start..self.at))
                }
                b'b' => return Err(self.fail("a binary value: the source asks for text values")),
                other => return Err(self.fail(format!("unknown column kind {other:#04x}"))),
            });
        }
        Ok(datums)
    }
}

/// A transaction's boundary or a logical message: what the reader handles
/// itself; everything else goes to [`decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boundary {
    /// `B`: a transaction begins (`final_lsn` is its commit's position).
    Begin {
        /// Position of the commit record.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_time_micros: i64,
        /// Top-level transaction id.
        xid: u32,
    },
    /// `C`: it committed; the stream is complete up to `end_lsn`.
    Commit {
        /// End of the commit record.
        end_lsn: u64,
    },
    /// `M`: a logical message (`pg_logical_emit_message`).
    Message {
        /// Emitted inside its transaction (else at once).
        transactional: bool,
        /// Position of the message record.
        lsn: u64,
        /// The prefix it was emitted under.
        prefix: String,
        /// Its content.
        content: Bytes,
    },
    /// Any other message.
    Other,
}

/// Reads a boundary or logical message (protocol 1 form).
pub fn boundary(data: &Bytes) -> Result<Boundary, DecodeError> {
    let kind = *data.first().ok_or(DecodeError {
        kind: '?',
        reason: "empty message".into(),
    })?;
    let mut c = Cursor { data, at: 1, kind };
    Ok(match kind {
        b'B' => Boundary::Begin {
            final_lsn: c.u64()?,
            commit_time_micros: c.u64()? as i64,
            xid: c.u32()?,
        },
        b'C' => {
            let _flags = c.u8()?;
            let _commit_lsn = c.u64()?;
            Boundary::Commit { end_lsn: c.u64()? }
        }
        b'M' => {
            let transactional = c.u8()? & 1 == 1;
            let lsn = c.u64()?;
            let prefix = c.cstring()?;
            let len = c.i32()?;
            let len =
                usize::try_from(len).map_err(|_| c.fail(format!("content of length {len}")))?;
            let start = c.at;
            c.take(len)?;
            Boundary::Message {
                transactional,
                lsn,
                prefix,
                content: data.slice(start..c.at),
            }
        }
        _ => Boundary::Other,
    })
}

/// Decodes one row message (the payload of an `XLogData` that is not a
/// transaction boundary or a logical message).
pub fn decode(data: &Bytes) -> Result<RowMessage, DecodeError> {
    let kind = *data.first().ok_or(DecodeError {
        kind: '?',
        reason: "empty message".into(),
    })?;
    let mut c = Cursor { data, at: 1, kind };
    let message = match kind {
        b'R' => {
            let oid = c.u32()?;
            let schema = c.cstring()?;
            let table = c.cstring()?;
            let replica_identity = c.u8()?;
            let count = c.i16()?;
            let count = usize::try_from(count).map_err(|_| c.fail(format!("{count} columns")))?;
            let mut columns = Vec::with_capacity(count);
            for _ in 0..count {
                let flags = c.u8()?;
                let name = c.cstring()?;
                let type_oid = c.u32()?;
                let type_modifier = c.i32()?;
                columns.push(Column {
                    key: flags & 1 == 1,
                    name,
                    type_oid,
                    type_modifier,
                });
            }
            RowMessage::Relation(Relation {
                oid,
                schema,
                table,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let relation = c.u32()?;
            match c.u8()? {
                b'N' => RowMessage::Insert {
                    relation,
                    new: c.tuple()?,
                },
                other => return Err(c.fail(format!("expected 'N', got {other:#04x}"))),
            }
        }
        b'U' => {
            let relation = c.u32()?;
            let (old, old_is_full) = match c.u8()? {
                b'K' => (Some(c.tuple()?), false),
                b'O' => (Some(c.tuple()?), true),
                b'N' => {
                    c.at -= 1;
                    (None, false)
                }
                other => return Err(c.fail(format!("expected 'K', 'O' or 'N', got {other:#04x}"))),
            };
            match c.u8()? {
                b'N' => RowMessage::Update {
                    relation,
                    old,
                    old_is_full,
                    new: c.tuple()?,
                },
                other => return Err(c.fail(format!("expected 'N', got {other:#04x}"))),
            }
        }
        b'D' => {
            let relation = c.u32()?;
            let old_is_full = match c.u8()? {
                b'K' => false,
                b'O' => true,
                other => return Err(c.fail(format!("expected 'K' or 'O', got {other:#04x}"))),
            };
            RowMessage::Delete {
                relation,
                old: c.tuple()?,
                old_is_full,
            }
        }
        b'T' => {
            let count = c.i32()?;
            let _options = c.u8()?;
            let count = usize::try_from(count).map_err(|_| c.fail(format!("{count} relations")))?;
            let mut relations = Vec::with_capacity(count.min(4096));
            for _ in 0..count {
                relations.push(c.u32()?);
            }
            RowMessage::Truncate { relations }
        }
        other => RowMessage::Other(other),
    };
    Ok(message)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A row message as the server writes it, for tests.
    pub(crate) struct Frame(pub Vec<u8>);

    impl Frame {
        pub(crate) fn new(kind: u8) -> Self {
            Self(vec![kind])
        }
        pub(crate) fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub(crate) fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn cstr(mut self, v: &str) -> Self {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        pub(crate) fn text(self, v: &str) -> Self {
            let mut s = self.u8(b't').i32(v.len() as i32);
            s.0.extend_from_slice(v.as_bytes());
            s
        }
        pub(crate) fn bytes(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    pub(crate) fn users_relation() -> Bytes {
        Frame::new(b'R')
            .i32(16384)
            .cstr("public")
            .cstr("users")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .cstr("id")
            .i32(23)
            .i32(-1)
            .u8(0)
            .cstr("name")
            .i32(25)
            .i32(-1)
            .bytes()
    }

    #[test]
    fn a_relation_names_its_key_columns() -> Result<(), DecodeError> {
        let RowMessage::Relation(relation) = decode(&users_relation())? else {
            panic!("not a relation");
        };
        assert_eq!(
            (relation.schema.as_str(), relation.table.as_str()),
            ("public", "users")
        );
        assert_eq!(relation.columns.len(), 2);
        assert!(relation.columns[0].key && !relation.columns[1].key);
        assert_eq!(relation.columns[1].type_oid, 25);
        Ok(())
    }

    #[test]
    fn updates_with_and_without_an_old_row() -> Result<(), DecodeError> {
        let plain = Frame::new(b'U')
            .i32(7)
            .u8(b'N')
            .i16(2)
            .text("1")
            .u8(b'u')
            .bytes();
        assert_eq!(
            decode(&plain)?,
            RowMessage::Update {
                relation: 7,
                old: None,
                old_is_full: false,
                new: vec![Datum::Text(Bytes::from_static(b"1")), Datum::UnchangedToast],
            }
        );
        let full = Frame::new(b'U')
            .i32(7)
            .u8(b'O')
            .i16(1)
            .u8(b'n')
            .u8(b'N')
            .i16(1)
            .text("x")
            .bytes();
        let RowMessage::Update {
            old, old_is_full, ..
        } = decode(&full)?
        else {
            panic!("not an update");
        };
        assert_eq!((old, old_is_full), (Some(vec![Datum::Null]), true));
        Ok(())
    }

    #[test]
    fn inserts_deletes_and_truncates() -> Result<(), DecodeError> {
        let insert = Frame::new(b'I')
            .i32(7)
            .u8(b'N')
            .i16(1)
            .text("héllo")
            .bytes();
        assert_eq!(
            decode(&insert)?,
            RowMessage::Insert {
                relation: 7,
                new: vec![Datum::Text(Bytes::from("héllo"))]
            }
        );
        let delete = Frame::new(b'D').i32(7).u8(b'K').i16(1).text("1").bytes();
        assert!(matches!(
            decode(&delete)?,
            RowMessage::Delete {
                relation: 7,
                old_is_full: false,
                ..
            }
        ));
        let truncate = Frame::new(b'T').i32(2).u8(0).i32(7).i32(8).bytes();
        assert_eq!(
            decode(&truncate)?,
            RowMessage::Truncate {
                relations: vec![7, 8]
            }
        );
        assert_eq!(decode(&Frame::new(b'Y').bytes())?, RowMessage::Other(b'Y'));
        Ok(())
    }

    #[test]
    fn every_truncated_message_is_an_error() {
        for message in [
            users_relation(),
            Frame::new(b'I')
                .i32(7)
                .u8(b'N')
                .i16(1)
                .text("hello")
                .bytes(),
            Frame::new(b'D').i32(7).u8(b'O').i16(1).text("1").bytes(),
        ] {
            for cut in 1..message.len() {
                assert!(
                    decode(&message.slice(..cut)).is_err(),
                    "cut at {cut} decoded"
                );
            }
        }
        assert!(decode(&Bytes::new()).is_err());
    }
}
