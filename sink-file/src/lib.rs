#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

/// The guide `docs/extending.md`, whose code is compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/extending.md")]
pub struct ExtendingGuide;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use outbox_core::{Position, RecentIds, Record, Sink, Stage, WriteReport};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where the lines go.
#[derive(Debug, Clone)]
pub struct FileSinkConfig {
    /// The data file (created if missing).
    pub path: PathBuf,
    /// The dead-letter file. Default: the data file's path with
    /// `.dead.jsonl` appended.
    pub dead_letter_path: PathBuf,
    /// Event ids remembered per partition to skip a relay's republished
    /// copies. Default: 100 000.
    pub dedup_window: usize,
}

impl FileSinkConfig {
    /// Lines to `path`, dead letters next to it, default window.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let mut dead = path.clone().into_os_string();
        dead.push(".dead.jsonl");
        Self {
            path,
            dead_letter_path: dead.into(),
            dedup_window: 100_000,
        }
    }
}

/// An error of the file sink. I/O errors are retryable (a full disk can be
/// freed); a file whose complete lines are not ours is permanent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileSinkError {
    /// Reading, writing or syncing failed.
    #[error("file sink {path}: {operation} failed")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        operation: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A failed write could not be undone: reopen the sink (which cuts off
    /// the partial line) before writing again.
    #[error("file sink {path}: a failed write could not be undone (restart to recover)")]
    Unrecoverable {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A record arrived at a position the file already holds for another
    /// event: the topic's offsets started over (it was deleted and created
    /// again, or the broker lost its data). Skipping it as a redelivery would
    /// lose it.
    #[error(
        "file sink {path}: topic {topic} partition {partition} offset {offset} already holds event \
         {stored:?}, but the broker now serves {arrived:?} there: the topic's offsets started over. \
         Nothing of this batch was written; move the file aside and read the new topic from its \
         beginning (GUARANTEES.md, \"A topic that starts over\")"
    )]
    OffsetRegression {
        /// The data file.
        path: PathBuf,
        /// Kafka topic.
        topic: String,
        /// Kafka partition.
        partition: i32,
        /// The offset.
        offset: i64,
        /// The event id stored there (`None`: the stored line had none).
        stored: Option<Uuid>,
        /// The event id of the arriving record.
        arrived: Option<Uuid>,
    },
    /// A complete line of the file is not a line this sink wrote.
    #[error(
        "file sink {path}: line {line} is not a record line ({reason}); is this the right file?"
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Why.
        reason: String,
    },
}

impl From<FileSinkError> for outbox_core::Error {
    fn from(err: FileSinkError) -> Self {
        match err {
            FileSinkError::Io { .. } => outbox_core::Error::retryable(Stage::Sink, err),
            FileSinkError::Foreign { .. }
            | FileSinkError::Unrecoverable { .. }
            | FileSinkError::OffsetRegression { .. } => {
                outbox_core::Error::permanent(Stage::Sink, err)
            }
        }
    }
}

/// One line of the data file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Line {
    /// Kafka topic.
    pub topic: String,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// The event id (absent when the message carried none).
    pub event_id: Option<Uuid>,
    /// The key, as UTF-8 (lossy).
    pub key: Option<String>,
    /// The payload, which must be JSON.
    pub payload: serde_json::Value,
}

/// One line of the dead-letter file.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLine {
    /// Kafka topic.
    pub topic: String,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// Why it could not be written.
    pub reason: String,
    /// The payload as UTF-8 (lossy).
    pub payload: String,
    /// The event id, when the message carried a valid one (absent in files
    /// written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<Uuid>,
}

/// What the sink knows of one partition.
#[derive(Debug)]
struct PartitionState {
    /// Highest offset written or dead-lettered.
    last_offset: i64,
    /// Latest event ids written.
    recent: RecentIds,
    /// The event id at each of the latest offsets handled (written,
    /// dead-lettered or skipped), at most `dedup_window` of them: what a
    /// redelivery at an offset already handled must carry.
    at_offset: std::collections::BTreeMap<i64, Option<Uuid>>,
}

impl PartitionState {
    fn remember(&mut self, offset: i64, id: Option<Uuid>, window: usize) {
        self.at_offset.insert(offset, id);
        while self.at_offset.len() > window.max(1) {
            self.at_offset.pop_first();
        }
    }
}

/// Appends records as JSON lines; see the crate documentation.
pub struct FileSink {
    config: FileSinkConfig,
    data: File,
    dead: File,
    partitions: HashMap<(String, i32), PartitionState>,
}

impl FileSink {
    /// Opens (or creates) both files and reads back what they hold.
    pub fn open(config: FileSinkConfig) -> Result<Self, FileSinkError> {
        let mut partitions = HashMap::new();
        let data = recover(&config.path, |line, number| {
            let parsed: Line = serde_json::from_str(line).map_err(|e| FileSinkError::Foreign {
                path: config.path.clone(),
                line: number,
                reason: e.to_string(),
            })?;
            let state = state(&mut partitions, &parsed.topic, parsed.partition, &config);
            state.last_offset = state.last_offset.max(parsed.offset);
            state.remember(parsed.offset, parsed.event_id, config.dedup_window);
            if let Some(id) = parsed.event_id {
                state.recent.insert(id);
            }
            Ok(())
        })?;
        let dead = recover(&config.dead_letter_path, |line, number| {
            let parsed: DeadLine =
                serde_json::from_str(line).map_err(|e| FileSinkError::Foreign {
                    path: config.dead_letter_path.clone(),
                    line: number,
                    reason: e.to_string(),
                })?;
            let state = state(&mut partitions, &parsed.topic, parsed.partition, &config);
            state.last_offset = state.last_offset.max(parsed.offset);
            if parsed.event_id.is_some() {
                state.remember(parsed.offset, parsed.event_id, config.dedup_window);
            }
            Ok(())
        })?;
        Ok(Self {
            config,
            data,
            dead,
            partitions,
        })
    }

    /// Highest offset handled per (topic, partition), as read back and written.
    pub fn positions(&self) -> Vec<(String, Position)> {
        let mut out: Vec<_> = self
            .partitions
            .iter()
            .map(|((topic, partition), s)| {
                (
                    topic.clone(),
                    Position {
                        partition: *partition,
                        offset: s.last_offset,
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| (&a.0, a.1.partition).cmp(&(&b.0, b.1.partition)));
        out
    }
}

fn state<'a>(
    partitions: &'a mut HashMap<(String, i32), PartitionState>,
    topic: &str,
    partition: i32,
    config: &FileSinkConfig,
) -> &'a mut PartitionState {
    partitions
        .entry((topic.to_string(), partition))
        .or_insert_with(|| PartitionState {
            last_offset: -1,
            recent: RecentIds::new(config.dedup_window),
            at_offset: Default::default(),
        })
}

/// Opens `path` for appending after feeding each complete line to `line`;
/// a last line without its newline (a write cut short) is cut off.
fn recover(
    path: &Path,
    mut line: impl FnMut(&str, usize) -> Result<(), FileSinkError>,
) -> Result<File, FileSinkError> {
    let io = |operation, source| FileSinkError::Io {
        path: path.to_path_buf(),
        operation,
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| io("open", e))?;
    let mut reader = BufReader::new(&file);
    let mut complete: u64 = 0;
    let mut buffer = String::new();
    let mut number = 0;
    loop {
        buffer.clear();
        let read = reader
            .read_line(&mut buffer)
            .map_err(|e| io("read back", e))?;
        if read == 0 || !buffer.ends_with('\n') {
            break;
        }
        number += 1;
        line(buffer.trim_end_matches('\n'), number)?;
        complete += read as u64;
    }
    let length = file.seek(SeekFrom::End(0)).map_err(|e| io("seek", e))?;
    if length > complete {
        tracing::warn!(
            path = %path.display(),
            cut = length - complete,
            "cutting off a line a crash left half written; its records will be read again"
        );
        file.set_len(complete).map_err(|e| io("truncate", e))?;
        file.sync_data().map_err(|e| io("fsync", e))?;
    }
    Ok(file)
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&mut self, records: &[Record]) -> outbox_core::Result<WriteReport> {
        let mut report = WriteReport::default();
        let (mut data, mut dead) = (Vec::new(), Vec::new());
        // Decided against a copy of the state: on error nothing changes.
        let mut seen: HashMap<(String, i32), (i64, Vec<Uuid>)> = HashMap::new();
        let mut handled: Vec<((String, i32), i64, Option<Uuid>)> = Vec::new();
        for record in records {
            let key = (record.topic.clone(), record.position.partition);
            let known = self.partitions.get(&key);
            let (last, ids) = seen
                .entry(key)
                .or_insert_with(|| (known.map_or(-1, |s| s.last_offset), Vec::new()));
            let event_id = record.event_id().ok();
            if record.position.offset <= *last {
                let stored = known.and_then(|s| s.at_offset.get(&record.position.offset));
                if let Some(stored) = stored {
                    // A dead letter of an old file has no id: nothing to compare.
                    if stored.is_some() && *stored != event_id {
                        return Err(FileSinkError::OffsetRegression {
                            path: self.config.path.clone(),
                            topic: record.topic.clone(),
                            partition: record.position.partition,
                            offset: record.position.offset,
                            stored: *stored,
                            arrived: event_id,
                        }
                        .into());
                    }
                }
            }
            if record.position.offset > *last {
                handled.push((
                    (record.topic.clone(), record.position.partition),
                    record.position.offset,
                    event_id,
                ));
            }
            let republished = event_id.is_some_and(|id| {
                ids.contains(&id) || known.is_some_and(|s| s.recent.contains(&id))
            });
            if record.position.offset <= *last || republished {
                report.duplicates += 1;
                *last = (*last).max(record.position.offset);
                continue;
            }
            *last = record.position.offset;
            let payload = record.payload.as_deref().unwrap_or_default();
            match serde_json::from_slice::<serde_json::Value>(payload) {
                Ok(value) => {
                    let line = Line {
                        topic: record.topic.clone(),
                        partition: record.position.partition,
                        offset: record.position.offset,
                        event_id,
                        key: record
                            .key
                            .as_deref()
                            .map(|k| String::from_utf8_lossy(k).into_owned()),
                        payload: value,
                    };
                    push_line(&mut data, &line)?;
                    if let Some(id) = event_id {
                        ids.push(id);
                    }
                    report.written += 1;
                }
                Err(err) => {
                    let reason = format!("payload is not JSON: {err}");
                    let line = DeadLine {
                        topic: record.topic.clone(),
                        partition: record.position.partition,
                        offset: record.position.offset,
                        reason: reason.clone(),
                        payload: String::from_utf8_lossy(payload).into_owned(),
                        event_id,
                    };
                    push_line(&mut dead, &line)?;
                    report.dead_lettered.push((record.position, reason));
                }
            }
        }
        // Both files or neither: a failed write or sync is cut off again, so
        // the retry of this batch appends to whole lines and writes its dead
        // letters once.
        let files = [
            (&mut self.dead, dead, &self.config.dead_letter_path),
            (&mut self.data, data, &self.config.path),
        ];
        append_all(files)?;
        for ((topic, partition), (last, ids)) in seen {
            let state = state(&mut self.partitions, &topic, partition, &self.config);
            state.last_offset = state.last_offset.max(last);
            for id in ids {
                state.recent.insert(id);
            }
        }
        for ((topic, partition), offset, id) in handled {
            let state = state(&mut self.partitions, &topic, partition, &self.config);
            state.remember(offset, id, self.config.dedup_window);
        }
        Ok(report)
    }
}

/// Appends and syncs each buffer to its file; on failure, truncates every
/// file back to its length before the call.
fn append_all(mut files: [(&mut File, Vec<u8>, &PathBuf); 2]) -> Result<(), FileSinkError> {
    let mut before = Vec::new();
    for (file, _, path) in &files {
        let length = file.metadata().map_err(|e| FileSinkError::Io {
            path: path.to_path_buf(),
            operation: "stat",
            source: e,
        })?;
        before.push(length.len());
    }
    let mut failure = None;
    for (file, bytes, path) in files.iter_mut() {
        if bytes.is_empty() {
            continue;
        }
        let result = file
            .write_all(bytes)
            .map_err(|e| ("write", e))
            .and_then(|()| file.sync_data().map_err(|e| ("fsync", e)));
        if let Err((operation, source)) = result {
            failure = Some(FileSinkError::Io {
                path: path.to_path_buf(),
                operation,
                source,
            });
            break;
        }
    }
    let Some(err) = failure else {
        return Ok(());
    };
    for ((file, _, path), length) in files.iter().zip(before) {
        if let Err(source) = file.set_len(length) {
            // A retry would append after a partial line: stop until reopened
            // (open cuts a partial last line).
            return Err(FileSinkError::Unrecoverable {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    Err(err)
}

fn push_line<T: Serialize>(buffer: &mut Vec<u8>, line: &T) -> Result<(), outbox_core::Error> {
    serde_json::to_writer(&mut *buffer, line)
        .map_err(|e| outbox_core::Error::permanent(Stage::Sink, e))?;
    buffer.push(b'\n');
    Ok(())
}
