//! The initial load's decisions, between watermarks in the stream.
//!
//! The loader reads a captured table in chunks, in key order, each chunk in
//! a snapshot taken between two logical messages it writes: a low watermark
//! before the snapshot, a high one after. The reader, streaming the slot,
//! sees both in commit order among the changes. When it reaches the high
//! watermark it publishes the chunk's rows, except those whose key a change
//! between the two watermarks touched: the stream carries that change, newer
//! than or equal to what the chunk read. A change before the low watermark is
//! older than the chunk (the snapshot saw it), one after the high watermark
//! is newer (it did not): each key's events stay in the order of its history.
//!
//! One exception, checked rather than assumed: PostgreSQL writes a
//! transaction's commit record before the transaction becomes visible, so a
//! transaction whose commit precedes the low watermark in the WAL may still
//! be invisible to the snapshot taken after it. The snapshot names it among
//! its running transactions; when the stream showed it committing before the
//! low watermark, the chunk is read again.
//!
//! Pure: the source feeds it the stream's watermarks, changes and commits.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Prefix of the watermark messages (never the events' prefix).
pub(crate) const LOAD_PREFIX: &str = "outbox-wal-load";

/// A row's key: the text of each key column, `None` for NULL.
pub(crate) type Key = Vec<Option<String>>;

/// How far the initial load of a slot got, as the progress table keeps it:
/// the tables read whole, and where the table being read is at.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LoadState {
    /// Tables (`schema.table`) read to their end.
    pub done: Vec<String>,
    /// The table being read, if one was started.
    pub table: Option<String>,
    /// The key of the last row of `table` published; `None`: from its start.
    pub after: Option<Key>,
}

/// The content of a watermark message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Watermark {
    pub slot: String,
    /// The loading session: a watermark of an earlier one is stale.
    pub run: Uuid,
    pub chunk: u64,
    /// Low (before the chunk's snapshot) or high (after it).
    pub high: bool,
    /// `schema.table` of the chunk.
    pub table: String,
    /// Its key columns, in order.
    pub key: Vec<String>,
}

impl Watermark {
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What a snapshot says of the transactions running when it was taken
/// (`pg_current_snapshot()`), as 32-bit xids like the stream's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub xmin: u32,
    pub running: HashSet<u32>,
}

impl Snapshot {
    /// Parses `xmin:xmax:xip,xip,…` (64-bit xids; their low 32 bits are the
    /// stream's).
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.splitn(3, ':');
        let xid = |s: &str| {
            s.parse::<u64>()
                .map(|x| x as u32)
                .map_err(|_| format!("{text:?} is not a snapshot"))
        };
        let xmin = xid(parts.next().unwrap_or_default())?;
        let _xmax = xid(parts.next().unwrap_or_default())?;
        let running = match parts.next() {
            Some("") | None => HashSet::new(),
            Some(list) => list.split(',').map(xid).collect::<Result<_, _>>()?,
        };
        Ok(Self { xmin, running })
    }
}

/// `a` comes before `b` in xid order (modulo 2³²).
fn precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// What to do with a chunk at its high watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Publish the rows at these indexes (the others changed in the window).
    Publish(Vec<usize>),
    /// Read the chunk again: the reason.
    Redo(String),
}

#[derive(Debug)]
struct Window {
    chunk: u64,
    table: String,
    key: Vec<String>,
    /// Commits counted when the window opened.
    opened_at: u64,
    changed: HashSet<Key>,
    /// A change of the table whose key was not in the stream.
    unknown_key: bool,
}

/// The reader's side of one session's load.
#[derive(Debug)]
pub(crate) struct Backfill {
    slot: String,
    run: Uuid,
    commits: u64,
    /// Transactions with row changes committed in this session: their
    /// commit's count. Forgotten once older than every running transaction
    /// of the last chunk's snapshot (later snapshots cannot name them).
    committed: HashMap<u32, u64>,
    window: Option<Window>,
}

impl Backfill {
    pub(crate) fn new(slot: &str, run: Uuid) -> Self {
        Self {
            slot: slot.to_string(),
            run,
            commits: 0,
            committed: HashMap::new(),
            window: None,
        }
    }

    /// The watermark in a message under [`LOAD_PREFIX`], if it is one of
    /// this session's (another slot's, or an earlier session's, is stale).
    pub(crate) fn ours(&self, content: &[u8]) -> Option<Watermark> {
        serde_json::from_slice::<Watermark>(content)
            .ok()
            .filter(|w| w.slot == self.slot && w.run == self.run)
    }

    /// A low watermark: changes of its table are watched from here.
    pub(crate) fn open(&mut self, mark: &Watermark) {
        self.window = Some(Window {
            chunk: mark.chunk,
            table: mark.table.clone(),
            key: mark.key.clone(),
            opened_at: self.commits,
            changed: HashSet::new(),
            unknown_key: false,
        });
    }

    /// The table and key columns watched now, if a window is open.
    pub(crate) fn watched(&self) -> Option<(&str, &[String])> {
        self.window
            .as_ref()
            .map(|w| (w.table.as_str(), w.key.as_slice()))
    }

    /// Keys a change of the watched table touched (`None`: not sent).
    pub(crate) fn touched(&mut self, keys: impl IntoIterator<Item = Option<Key>>) {
        if let Some(window) = &mut self.window {
            for key in keys {
                match key {
                    Some(key) => {
                        window.changed.insert(key);
                    }
                    None => window.unknown_key = true,
                }
            }
        }
    }

    /// A transaction committed; `changed_rows` when it changed any row.
    pub(crate) fn committed(&mut self, xid: u32, changed_rows: bool) {
        self.commits += 1;
        if changed_rows {
            self.committed.insert(xid, self.commits);
        }
    }

    /// The high watermark of chunk `chunk` of `table`, whose rows have the
    /// keys `keys`, read in `snapshot`: which to publish. Closes the window.
    pub(crate) fn close(&mut self, chunk: u64, keys: &[Key], snapshot: &Snapshot) -> Decision {
        let Some(window) = self.window.take().filter(|w| w.chunk == chunk) else {
            return Decision::Redo(format!("chunk {chunk} ended without its low watermark"));
        };
        let early: Vec<u32> = snapshot
            .running
            .iter()
            .copied()
            .filter(|xid| {
                self.committed
                    .get(xid)
                    .is_some_and(|at| *at <= window.opened_at)
            })
            .collect();
        self.committed
            .retain(|xid, _| !precedes(*xid, snapshot.xmin));
        if !early.is_empty() {
            return Decision::Redo(format!(
                "transactions {early:?} committed before the chunk's low watermark but were not yet visible to its snapshot"
            ));
        }
        if window.unknown_key {
            return Decision::Redo(format!(
                "a change of {} during the chunk did not carry its key",
                window.table
            ));
        }
        Decision::Publish(
            keys.iter()
                .enumerate()
                .filter(|(_, key)| !window.changed.contains(*key))
                .map(|(i, _)| i)
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(chunk: u64, high: bool, run: Uuid) -> Watermark {
        Watermark {
            slot: "s".into(),
            run,
            chunk,
            high,
            table: "public.t".into(),
            key: vec!["id".into()],
        }
    }

    fn key(id: &str) -> Key {
        vec![Some(id.to_string())]
    }

    fn snapshot(xmin: u32, running: &[u32]) -> Snapshot {
        Snapshot {
            xmin,
            running: running.iter().copied().collect(),
        }
    }

    #[test]
    fn only_this_sessions_watermarks_count() {
        let run = Uuid::from_u128(1);
        let backfill = Backfill::new("s", run);
        let ours = mark(3, false, run);
        assert_eq!(backfill.ours(&ours.to_bytes()), Some(ours.clone()));
        let stale = mark(3, false, Uuid::from_u128(2));
        assert_eq!(backfill.ours(&stale.to_bytes()), None);
        let other_slot = Watermark {
            slot: "t".into(),
            ..ours
        };
        assert_eq!(backfill.ours(&other_slot.to_bytes()), None);
        assert_eq!(backfill.ours(b"not json"), None);
    }

    #[test]
    fn rows_changed_inside_the_window_are_left_to_the_stream() {
        let run = Uuid::from_u128(1);
        let mut backfill = Backfill::new("s", run);
        // Before the window: not watched, and older than the chunk anyway.
        assert_eq!(backfill.watched(), None);
        backfill.touched([Some(key("1"))]);
        backfill.committed(100, true);
        backfill.open(&mark(1, false, run));
        assert_eq!(
            backfill.watched(),
            Some(("public.t", &["id".to_string()][..]))
        );
        backfill.touched([Some(key("2")), Some(key("4"))]);
        backfill.committed(101, true);
        let rows = [key("1"), key("2"), key("3"), key("4")];
        assert_eq!(
            backfill.close(1, &rows, &snapshot(101, &[101])),
            Decision::Publish(vec![0, 2])
        );
        assert_eq!(backfill.watched(), None);
    }

    #[test]
    fn a_commit_before_the_low_watermark_the_snapshot_missed_reads_the_chunk_again() {
        let run = Uuid::from_u128(1);
        let mut backfill = Backfill::new("s", run);
        backfill.committed(200, true);
        backfill.open(&mark(1, false, run));
        // The snapshot still lists 200 as running: it did not see its rows.
        let decision = backfill.close(1, &[key("1")], &snapshot(199, &[199, 200]));
        assert!(
            matches!(decision, Decision::Redo(ref why) if why.contains("200")),
            "{decision:?}"
        );
        // Running transactions the stream shows committing inside the
        // window, or not yet, are fine.
        backfill.open(&mark(2, false, run));
        backfill.committed(201, true);
        assert_eq!(
            backfill.close(2, &[key("1")], &snapshot(199, &[199, 201, 202])),
            Decision::Publish(vec![0])
        );
    }

    #[test]
    fn commits_older_than_every_running_transaction_are_forgotten() {
        let run = Uuid::from_u128(1);
        let mut backfill = Backfill::new("s", run);
        for xid in [u32::MAX - 1, u32::MAX, 0, 3, 4] {
            backfill.committed(xid, true);
        }
        backfill.committed(9, false);
        backfill.open(&mark(1, false, run));
        // Across the wraparound: u32::MAX - 1 .. 3 precede 4.
        let _ = backfill.close(1, &[], &snapshot(4, &[]));
        assert_eq!(
            backfill.committed.keys().copied().collect::<Vec<_>>(),
            vec![4]
        );
    }

    #[test]
    fn a_change_without_its_key_or_a_missing_low_watermark_reads_again() {
        let run = Uuid::from_u128(1);
        let mut backfill = Backfill::new("s", run);
        backfill.open(&mark(1, false, run));
        backfill.touched([None]);
        assert!(matches!(
            backfill.close(1, &[key("1")], &snapshot(1, &[])),
            Decision::Redo(_)
        ));
        assert!(matches!(
            backfill.close(2, &[key("1")], &snapshot(1, &[])),
            Decision::Redo(_)
        ));
    }

    #[test]
    fn snapshots_parse_to_the_streams_xids() {
        let s = Snapshot::parse("4294967397:4294967400:4294967398,4294967399").unwrap_or_default();
        assert_eq!(s.xmin, 101);
        assert_eq!(s.running, [102, 103].into_iter().collect());
        assert_eq!(Snapshot::parse("7:7:").map(|s| s.running.len()), Ok(0));
        assert!(Snapshot::parse("x:1:").is_err());
    }
}
