//! Transactions streamed while they run (pgoutput protocol 2, `streaming
//! 'on'`), put back into protocol 1's shape: each committed transaction
//! whole, at its commit, as `B`, its messages, `C`.
//!
//! The server streams a transaction once it outgrows the walsender's
//! `logical_decoding_work_mem`, in blocks between Stream Start and Stream
//! Stop, each message prefixed with the xid of its (sub)transaction; Stream
//! Commit and Stream Abort arrive at the commit or abort's place in the WAL.
//! Holding a transaction's messages until its commit keeps everything
//! downstream as it is for protocol 1: commit order, the event ids (the
//! ordinal of each change among the kept ones, in the same order either
//! way), the initial load's watermark windows. What changes is where a
//! large transaction waits for its commit: in the relay (memory, then a
//! file of its own past [`Assembler::new`]'s bound) instead of in the
//! server's spill files, and that its decoding is done by then.
//!
//! A subtransaction's abort drops its messages and those after its first,
//! as PostgreSQL's own apply worker does: while a subtransaction is open,
//! every change of its transaction is its own or a child's, so its first
//! change's place divides what its abort takes. Relation and type
//! messages are kept across such an abort: the server sends a relation
//! once per streamed transaction, and later changes need it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Why the stream cannot be put together.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    /// The server's messages break protocol 2's rules.
    #[error("pgoutput stream: {0}")]
    Protocol(String),
    /// Transaction `xid` committed after a savepoint of it rolled back, and
    /// it holds logical messages: pgoutput tags a streamed message with the
    /// top transaction's xid, not its subtransaction's, so which of them
    /// the savepoint took cannot be told. Only a protocol-1 reading of it
    /// (decoded at its commit, without what was rolled back) can; it ends
    /// at `end_lsn`.
    #[error("streamed transaction {xid} has logical messages and a rolled back savepoint: read it again unstreamed")]
    Unattributable { xid: u32, end_lsn: u64 },
    /// A spill file cannot be written or read back.
    #[error("spill file of a large transaction in {dir}: {source}")]
    Spill {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

impl StreamError {
    /// A spill file may work again (space freed); the protocol will not.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(
            self,
            StreamError::Spill { .. } | StreamError::Unattributable { .. }
        )
    }
}

type Result<T> = std::result::Result<T, StreamError>;

/// What the assemblers of one source did, across its sessions.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Streamed transactions released at their commit.
    pub transactions: AtomicU64,
    /// Bytes written to spill files.
    pub spilled: AtomicU64,
    /// Whether the current session streams transactions in progress.
    pub active: std::sync::atomic::AtomicBool,
}

/// Puts streamed transactions back together (see the module's doc).
pub(crate) struct Assembler {
    /// The transaction whose stream block is being received.
    open: Option<u32>,
    pending: HashMap<u32, Pending>,
    /// Bytes of pending transactions held in memory.
    in_memory: usize,
    memory_limit: usize,
    spill_dir: PathBuf,
    counters: Arc<Counters>,
    /// Prefixes of the logical messages the source reads; a streamed
    /// message under another is dropped at once.
    prefixes: Vec<String>,
}

/// One streamed transaction not committed yet: a log of records (`u32`
/// length, then the message as protocol 1 has it), its start in a file
/// once spilled, its end in memory.
#[derive(Default)]
struct Pending {
    file: Option<File>,
    spilled: u64,
    log: Vec<u8>,
    /// Where each subtransaction's first message starts in the log.
    subxacts: HashMap<u32, u64>,
    /// It holds logical messages (tagged with the top xid, whatever
    /// subtransaction wrote them).
    messages: bool,
    /// A subtransaction aborted while it held messages: see
    /// [`StreamError::Unattributable`].
    unattributable: bool,
}

impl Pending {
    fn len(&self) -> u64 {
        self.spilled + self.log.len() as u64
    }

    /// The records from `offset` on (an offset where one starts).
    fn records_from(&mut self, offset: u64) -> std::io::Result<Records> {
        let file = match (&mut self.file, offset < self.spilled) {
            (Some(file), true) => {
                file.seek(SeekFrom::Start(offset))?;
                let reader = BufReader::new(file.try_clone()?).take(self.spilled - offset);
                Some(reader)
            }
            _ => None,
        };
        let in_log = offset.saturating_sub(self.spilled) as usize;
        Ok(Records {
            file,
            log: Bytes::copy_from_slice(self.log.get(in_log..).unwrap_or_default()),
        })
    }

    /// Appends the record of a message whose tag is `tag` and whose
    /// fields are `fields` (written straight into the log: a streamed
    /// message is copied once); returns the bytes it took.
    /// All its records, the log moved rather than copied (at its commit).
    fn into_records(mut self) -> std::io::Result<Records> {
        let file = self.records_from(0)?.file;
        Ok(Records {
            file,
            log: Bytes::from(std::mem::take(&mut self.log)),
        })
    }

    fn append(&mut self, tag: u8, fields: &[u8]) -> usize {
        self.log.put_u32(1 + fields.len() as u32);
        self.log.put_u8(tag);
        self.log.put_slice(fields);
        4 + 1 + fields.len()
    }

    /// Moves the in-memory records to the file; returns the bytes moved.
    fn spill(&mut self, dir: &PathBuf) -> std::io::Result<usize> {
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(tempfile::tempfile_in(dir)?),
        };
        file.seek(SeekFrom::Start(self.spilled))?;
        file.write_all(&self.log)?;
        let moved = self.log.len();
        self.spilled += moved as u64;
        // A new vector: clearing would keep the memory.
        self.log = Vec::new();
        Ok(moved)
    }

    /// Drops the records from `offset` on, but the relation and type
    /// messages among them; returns the change of the in-memory bytes.
    fn truncate(&mut self, offset: u64) -> std::io::Result<isize> {
        let before = self.log.len() as isize;
        let mut kept = Vec::new();
        let mut records = self.records_from(offset)?;
        while let Some(record) = records.next()? {
            if matches!(record.first(), Some(b'R' | b'Y')) {
                kept.push(record);
            }
        }
        if offset < self.spilled {
            if let Some(file) = &self.file {
                file.set_len(offset)?;
            }
            self.spilled = offset;
            self.log = Vec::new();
        } else {
            self.log.truncate((offset - self.spilled) as usize);
        }
        self.subxacts.retain(|_, first| *first < offset);
        for record in kept {
            self.append(record[0], &record[1..]);
        }
        Ok(self.log.len() as isize - before)
    }
}

/// Records read back from a spill file, then from memory.
struct Records {
    file: Option<std::io::Take<BufReader<File>>>,
    log: Bytes,
}

impl Records {
    fn next(&mut self) -> std::io::Result<Option<Bytes>> {
        if let Some(file) = &mut self.file {
            let mut len = [0u8; 4];
            match file.read_exact(&mut len) {
                Ok(()) => {
                    let mut record = vec![0u8; u32::from_be_bytes(len) as usize];
                    file.read_exact(&mut record)?;
                    return Ok(Some(record.into()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => self.file = None,
                Err(e) => return Err(e),
            }
        }
        if self.log.len() < 4 {
            return Ok(None);
        }
        let len = self.log.get_u32() as usize;
        if self.log.len() < len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a record cut short",
            ));
        }
        Ok(Some(self.log.split_to(len)))
    }
}

/// What one message of the stream releases, in order.
#[derive(Default)]
pub(crate) struct Released {
    first: Option<Bytes>,
    records: Option<Records>,
    last: Option<Bytes>,
}

impl Released {
    fn one(message: Bytes) -> Self {
        Released {
            first: Some(message),
            ..Released::default()
        }
    }

    /// The next message to handle, in protocol 1's form. An error is the
    /// spill file's: [`Assembler::spill_error`] names it.
    pub(crate) fn next(&mut self) -> std::io::Result<Option<Bytes>> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        if let Some(records) = &mut self.records {
            match records.next()? {
                Some(record) => return Ok(Some(record)),
                None => self.records = None,
            }
        }
        Ok(self.last.take())
    }
}

impl Assembler {
    /// Holds at most `memory_limit` bytes of uncommitted transactions in
    /// memory; beyond, the largest moves to a file in `spill_dir` (a file
    /// without a name, gone with the process).
    /// Logical messages under other `prefixes` than the given ones are
    /// not kept (they reach every slot of the database).
    pub(crate) fn new(
        memory_limit: usize,
        spill_dir: PathBuf,
        counters: Arc<Counters>,
        prefixes: Vec<String>,
    ) -> Self {
        Assembler {
            open: None,
            pending: HashMap::new(),
            in_memory: 0,
            memory_limit,
            spill_dir,
            counters,
            prefixes,
        }
    }

    /// Bytes of uncommitted transactions held in memory.
    pub(crate) fn in_memory(&self) -> usize {
        self.in_memory
    }

    /// A spill file's failure, naming where it is.
    pub(crate) fn spill_error(&self, source: std::io::Error) -> StreamError {
        StreamError::Spill {
            dir: self.spill_dir.display().to_string(),
            source,
        }
    }

    /// Takes the next pgoutput message of the stream and returns what it
    /// releases: itself (outside stream blocks), a committed streamed
    /// transaction, or nothing.
    pub(crate) fn feed(&mut self, message: Bytes) -> Result<Released> {
        let Some(&tag) = message.first() else {
            return Err(StreamError::Protocol("an empty message".into()));
        };
        let mut body = message.slice(1..);
        match tag {
            b'S' => {
                let xid = get_u32(&mut body)?;
                let first_segment = get_u8(&mut body)? == 1;
                if let Some(open) = self.open {
                    return Err(StreamError::Protocol(format!(
                        "stream start of transaction {xid} inside the block of {open}"
                    )));
                }
                if first_segment {
                    if let Some(stale) = self.pending.insert(xid, Pending::default()) {
                        self.in_memory -= stale.log.len();
                    }
                } else if !self.pending.contains_key(&xid) {
                    return Err(StreamError::Protocol(format!(
                        "a later stream block of transaction {xid}, whose first this session did not receive"
                    )));
                }
                self.open = Some(xid);
                Ok(Released::default())
            }
            b'E' => {
                self.open = None;
                Ok(Released::default())
            }
            b'c' => {
                let xid = get_u32(&mut body)?;
                let _flags = get_u8(&mut body)?;
                let commit_lsn = get_u64(&mut body)?;
                let end_lsn = get_u64(&mut body)?;
                let time = get_u64(&mut body)?;
                if self.open.is_some() {
                    return Err(StreamError::Protocol(format!(
                        "stream commit of transaction {xid} inside a stream block"
                    )));
                }
                let pending = self.pending.remove(&xid).ok_or_else(|| {
                    StreamError::Protocol(format!(
                        "stream commit of transaction {xid}, which was never streamed"
                    ))
                })?;
                self.in_memory -= pending.log.len();
                if pending.unattributable {
                    return Err(StreamError::Unattributable { xid, end_lsn });
                }
                let held = pending.len();
                let records = pending.into_records().map_err(|e| self.spill_error(e))?;
                let mut begin = BytesMut::with_capacity(21);
                begin.put_u8(b'B');
                begin.put_u64(commit_lsn);
                begin.put_u64(time);
                begin.put_u32(xid);
                let mut commit = BytesMut::with_capacity(26);
                commit.put_u8(b'C');
                commit.put_u8(0);
                commit.put_u64(commit_lsn);
                commit.put_u64(end_lsn);
                commit.put_u64(time);
                if held > 0 {
                    // Not the empty ones: every slot of the database gets
                    // each large transaction, whatever tables it wrote.
                    self.counters.transactions.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Released {
                    first: Some(begin.freeze()),
                    records: Some(records),
                    last: Some(commit.freeze()),
                })
            }
            b'A' => {
                let xid = get_u32(&mut body)?;
                let subxid = get_u32(&mut body)?;
                if subxid == xid {
                    if let Some(pending) = self.pending.remove(&xid) {
                        self.in_memory -= pending.log.len();
                    }
                } else if let Some(pending) = self.pending.get_mut(&xid) {
                    pending.unattributable |= pending.messages;
                    if let Some(&first) = pending.subxacts.get(&subxid) {
                        let change = match pending.truncate(first) {
                            Ok(change) => change,
                            Err(e) => return Err(self.spill_error(e)),
                        };
                        self.in_memory = self.in_memory.saturating_add_signed(change);
                    }
                }
                Ok(Released::default())
            }
            _ => {
                let Some(xid) = self.open else {
                    return Ok(Released::one(message));
                };
                // Inside a block, every message has its (sub)transaction's
                // xid after the tag: kept as protocol 1 has it, without.
                let subxid = get_u32(&mut body)?;
                if tag == b'M' && !self.wanted(&body) {
                    return Ok(Released::default());
                }
                let pending = self.pending.get_mut(&xid).ok_or_else(|| {
                    StreamError::Protocol(format!(
                        "a message of unknown streamed transaction {xid}"
                    ))
                })?;
                if subxid != xid {
                    let at = pending.len();
                    pending.subxacts.entry(subxid).or_insert(at);
                }
                pending.messages |= tag == b'M';
                self.in_memory += pending.append(tag, &body);
                if self.in_memory > self.memory_limit {
                    self.spill_largest()?;
                }
                Ok(Released::default())
            }
        }
    }

    /// Whether a message body (flags, position, prefix, …) is under one
    /// of the prefixes read.
    fn wanted(&self, body: &[u8]) -> bool {
        let Some(rest) = body.get(9..) else {
            // Cut short: kept, for the decoder to report.
            return true;
        };
        let prefix = rest.split(|b| *b == 0).next().unwrap_or_default();
        self.prefixes.iter().any(|p| p.as_bytes() == prefix)
    }

    fn spill_largest(&mut self) -> Result<()> {
        let Some(largest) = self
            .pending
            .values_mut()
            .max_by_key(|pending| pending.log.len())
        else {
            return Ok(());
        };
        let moved = match largest.spill(&self.spill_dir) {
            Ok(moved) => moved,
            Err(e) => return Err(self.spill_error(e)),
        };
        self.in_memory -= moved;
        self.counters
            .spilled
            .fetch_add(moved as u64, Ordering::Relaxed);
        Ok(())
    }
}

fn cut_short() -> StreamError {
    StreamError::Protocol("a message shorter than its fields".into())
}

fn get_u8(body: &mut Bytes) -> Result<u8> {
    body.try_get_u8().map_err(|_| cut_short())
}

fn get_u32(body: &mut Bytes) -> Result<u32> {
    body.try_get_u32().map_err(|_| cut_short())
}

fn get_u64(body: &mut Bytes) -> Result<u64> {
    body.try_get_u64().map_err(|_| cut_short())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(xid: u32, first: bool) -> Bytes {
        let mut m = BytesMut::new();
        m.put_u8(b'S');
        m.put_u32(xid);
        m.put_u8(first as u8);
        m.freeze()
    }

    fn stop() -> Bytes {
        Bytes::from_static(b"E")
    }

    /// A streamed change: tag, the (sub)transaction's xid, a body naming it.
    fn change(tag: u8, subxid: u32, name: &str) -> Bytes {
        let mut m = BytesMut::new();
        m.put_u8(tag);
        m.put_u32(subxid);
        m.put_slice(name.as_bytes());
        m.freeze()
    }

    fn commit(xid: u32, lsn: u64) -> Bytes {
        let mut m = BytesMut::new();
        m.put_u8(b'c');
        m.put_u32(xid);
        m.put_u8(0);
        m.put_u64(lsn);
        m.put_u64(lsn + 8);
        m.put_u64(77);
        m.freeze()
    }

    /// A streamed logical message under `prefix`.
    fn message(xid: u32, prefix: &str, content: &str) -> Bytes {
        let mut m = BytesMut::new();
        m.put_u8(b'M');
        m.put_u32(xid);
        m.put_u8(1);
        m.put_u64(5);
        m.put_slice(prefix.as_bytes());
        m.put_u8(0);
        m.put_u32(content.len() as u32);
        m.put_slice(content.as_bytes());
        m.freeze()
    }

    fn abort(xid: u32, subxid: u32) -> Bytes {
        let mut m = BytesMut::new();
        m.put_u8(b'A');
        m.put_u32(xid);
        m.put_u32(subxid);
        m.freeze()
    }

    /// Feeds all, returns what came out, each as tag + readable body.
    fn run(assembler: &mut Assembler, messages: &[Bytes]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for message in messages {
            let mut released = assembler.feed(message.clone())?;
            while let Some(m) = released.next().map_err(|e| assembler.spill_error(e))? {
                out.push(match m[0] {
                    b'B' => {
                        let mut b = m.slice(1..);
                        format!("B lsn={} xid={}", b.get_u64(), {
                            b.get_u64();
                            b.get_u32()
                        })
                    }
                    b'C' => {
                        let mut b = m.slice(2..);
                        format!("C lsn={} end={}", b.get_u64(), b.get_u64())
                    }
                    tag => format!("{}{}", tag as char, String::from_utf8_lossy(&m[1..])),
                });
            }
        }
        Ok(out)
    }

    fn assembler(limit: usize) -> Assembler {
        Assembler::new(
            limit,
            std::env::temp_dir(),
            Arc::default(),
            vec!["ours".into()],
        )
    }

    #[test]
    fn messages_outside_stream_blocks_pass_as_they_are() -> Result<()> {
        let mut a = assembler(1 << 20);
        let out = run(
            &mut a,
            &[Bytes::from_static(b"Ione"), Bytes::from_static(b"Mtwo")],
        )?;
        assert_eq!(out, ["Ione", "Mtwo"]);
        Ok(())
    }

    #[test]
    fn a_streamed_transaction_comes_whole_at_its_commit_without_xids() -> Result<()> {
        let mut a = assembler(1 << 20);
        let out = run(
            &mut a,
            &[
                start(7, true),
                change(b'R', 7, "rel"),
                change(b'I', 7, "a"),
                stop(),
                // Another transaction commits between two blocks: first.
                Bytes::from_static(b"Iother"),
                start(7, false),
                change(b'I', 7, "b"),
                stop(),
                commit(7, 100),
            ],
        )?;
        assert_eq!(
            out,
            [
                "Iother",
                "B lsn=100 xid=7",
                "Rrel",
                "Ia",
                "Ib",
                "C lsn=100 end=108"
            ]
        );
        assert_eq!(a.in_memory(), 0);
        Ok(())
    }

    #[test]
    fn an_aborted_transaction_and_a_rolled_back_savepoint_leave_nothing() -> Result<()> {
        let mut a = assembler(1 << 20);
        let out = run(
            &mut a,
            &[
                start(7, true),
                change(b'I', 7, "top1"),
                change(b'I', 8, "sub8"), // SAVEPOINT a; RELEASE a
                change(b'R', 9, "rel"),  // SAVEPOINT b (a relation first seen in it)
                change(b'I', 9, "sub9"),
                change(b'I', 10, "sub10"), // SAVEPOINT c inside b
                stop(),
                start(11, true),
                change(b'I', 11, "doomed"),
                stop(),
                abort(7, 9), // ROLLBACK TO b: b and c go
                abort(11, 11),
                start(7, false),
                change(b'I', 7, "top2"),
                stop(),
                commit(7, 200),
            ],
        )?;
        assert_eq!(
            out,
            [
                "B lsn=200 xid=7",
                "Itop1",
                "Isub8",
                "Rrel",
                "Itop2",
                "C lsn=200 end=208"
            ]
        );
        assert_eq!(a.in_memory(), 0);
        Ok(())
    }

    #[test]
    fn spilled_transactions_read_back_the_same() -> Result<()> {
        let messages = |n: usize| {
            let mut all = vec![start(5, true)];
            for i in 0..n {
                all.push(change(b'I', 5, &format!("row{i}")));
                if i == n / 2 {
                    // SAVEPOINT; two rows; ROLLBACK TO: its abort follows.
                    all.push(change(b'I', 6, "rolled-back"));
                    all.push(change(b'I', 6, "rolled-back too"));
                    all.extend([stop(), abort(5, 6), start(5, false)]);
                }
            }
            all.push(change(b'I', 5, "last"));
            all.push(stop());
            all.push(commit(5, 300));
            all
        };
        let in_memory = run(&mut assembler(1 << 30), &messages(1000))?;
        let mut small = assembler(100);
        let spilled = run(&mut small, &messages(1000))?;
        let spilled_bytes = small.counters.spilled.load(Ordering::Relaxed);
        assert!(spilled_bytes > 10_000, "spilled {spilled_bytes}");
        assert_eq!(small.counters.transactions.load(Ordering::Relaxed), 1);
        assert_eq!(spilled, in_memory);
        assert_eq!(in_memory.len(), 1000 + 3);
        assert!(!in_memory.iter().any(|m| m.contains("rolled-back")));
        Ok(())
    }

    #[test]
    fn a_rollback_reaching_into_the_spilled_part_truncates_the_file() -> Result<()> {
        let mut a = assembler(64);
        let mut messages = vec![start(5, true), change(b'I', 5, "kept")];
        messages.extend((0..50).map(|i| change(b'I', 6, &format!("gone{i}"))));
        messages.extend([
            stop(),
            abort(5, 6),
            start(5, false),
            change(b'I', 5, "after"),
            stop(),
            commit(5, 9),
        ]);
        let out = run(&mut a, &messages)?;
        assert_eq!(out, ["B lsn=9 xid=5", "Ikept", "Iafter", "C lsn=9 end=17"]);
        Ok(())
    }

    #[test]
    fn messages_under_a_rolled_back_savepoint_cannot_be_attributed() -> Result<()> {
        // pgoutput tags a streamed message with the top xid (7), even when
        // subtransaction 8 wrote it: after 8's abort, no cut is right.
        let mut a = assembler(1 << 20);
        let messages = [
            start(7, true),
            message(7, "ours", "emitted by 7"),
            message(7, "ours", "emitted by 8"),
            stop(),
            abort(7, 8),
        ];
        assert!(run(&mut a, &messages)?.is_empty());
        match a.feed(commit(7, 40)) {
            Err(StreamError::Unattributable {
                xid: 7,
                end_lsn: 48,
            }) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        // Aborted whole, the same transaction is simply dropped.
        let mut a = assembler(1 << 20);
        assert!(run(&mut a, &messages)?.is_empty());
        assert!(run(&mut a, &[abort(7, 7)])?.is_empty());
        // Row changes alone are attributed by their own xids.
        let mut a = assembler(1 << 20);
        let out = run(
            &mut a,
            &[
                start(7, true),
                change(b'I', 7, "top"),
                change(b'I', 8, "sub"),
                stop(),
                abort(7, 8),
                commit(7, 40),
            ],
        )?;
        assert_eq!(out, ["B lsn=40 xid=7", "Itop", "C lsn=40 end=48"]);
        Ok(())
    }

    #[test]
    fn blocks_out_of_order_are_refused() {
        let mut a = assembler(1 << 20);
        assert!(a.feed(start(3, false)).is_err(), "a later block first");
        let mut a = assembler(1 << 20);
        assert!(a.feed(commit(3, 1)).is_err(), "a commit never streamed");
        let mut a = assembler(1 << 20);
        assert!(a.feed(start(3, true)).is_ok());
        assert!(a.feed(start(4, true)).is_err(), "a block inside a block");
        assert!(
            a.feed(Bytes::from_static(b"I\0")).is_err(),
            "a change without its xid"
        );
    }
}
