//! The file sink against a real file system: exactly-once across reopen,
//! a half-written last line, republished copies and poison payloads.

use bytes::Bytes;
use outbox_core::{Position, Record, Sink, HEADER_EVENT_ID};
use sink_file::{FileSink, FileSinkConfig, Line};
use uuid::Uuid;

fn record(partition: i32, offset: i64, id: Uuid, payload: &str) -> Record {
    Record {
        topic: "t".into(),
        position: Position { partition, offset },
        key: Some(Bytes::from(format!("k{partition}"))),
        payload: Some(Bytes::from(payload.to_string())),
        headers: [(HEADER_EVENT_ID.to_string(), id.to_string())].into(),
        timestamp_ms: None,
    }
}

fn dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sink-file-{name}-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn lines(path: &std::path::Path) -> Vec<Line> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Invariant (no duplicate, no loss): records redelivered after a reopen
/// (a consumer restarted before committing its positions) are skipped by
/// offset; new ones are appended, each exactly once, in order.
#[tokio::test]
async fn redelivery_after_reopen_is_skipped() {
    let dir = dir("reopen");
    let config = FileSinkConfig::new(dir.join("events.jsonl"));
    let batch: Vec<Record> = (0..10)
        .map(|o| {
            record(
                o as i32 % 2,
                o / 2,
                Uuid::new_v4(),
                &format!("{{\"n\":{o}}}"),
            )
        })
        .collect();
    let mut sink = FileSink::open(config.clone()).unwrap();
    let first = sink.write(&batch).await.unwrap();
    drop(sink);
    let mut sink = FileSink::open(config.clone()).unwrap();
    let mut more = batch.clone();
    more.push(record(0, 5, Uuid::new_v4(), "{\"n\":10}"));
    let second = sink.write(&more).await.unwrap();
    let written = lines(&config.path);
    println!(
        "first written={} second written={} duplicates={} lines={}",
        first.written,
        second.written,
        second.duplicates,
        written.len()
    );
    assert_eq!(
        (first.written, second.written, second.duplicates),
        (10, 1, 10)
    );
    assert_eq!(written.len(), 11);
    assert_eq!(sink.positions()[0].1.offset, 5);
}

/// Invariant (a batch cut short is harmless): a crash in the middle of a
/// write leaves a last line without its newline; open cuts it off, and the
/// redelivered batch is then written whole, once.
#[tokio::test]
async fn a_half_written_last_line_is_cut_off_and_rewritten_once() {
    let dir = dir("partial");
    let config = FileSinkConfig::new(dir.join("events.jsonl"));
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let batch: Vec<Record> = (0..4)
        .map(|o| record(0, o, ids[o as usize], &format!("{{\"n\":{o}}}")))
        .collect();
    let mut sink = FileSink::open(config.clone()).unwrap();
    sink.write(&batch[..2]).await.unwrap();
    drop(sink);
    // What a process killed in the middle of its write(2) leaves behind.
    let mut half = serde_json::to_string(&Line {
        topic: "t".into(),
        partition: 0,
        offset: 2,
        event_id: Some(ids[2]),
        key: None,
        payload: serde_json::json!({"n": 2}),
    })
    .unwrap();
    half.truncate(half.len() / 2);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&config.path)
        .unwrap();
    std::io::Write::write_all(&mut file, half.as_bytes()).unwrap();
    drop(file);

    let mut sink = FileSink::open(config.clone()).unwrap();
    let report = sink.write(&batch).await.unwrap();
    let written = lines(&config.path);
    let offsets: Vec<i64> = written.iter().map(|l| l.offset).collect();
    println!(
        "written={} duplicates={} offsets={offsets:?}",
        report.written, report.duplicates
    );
    assert_eq!((report.written, report.duplicates), (2, 2));
    assert_eq!(offsets, vec![0, 1, 2, 3]);
}

/// Invariant (no duplicate): a relay that died between the broker's ack and
/// its commit publishes the same event again at a new offset; the copy is
/// recognised by its event id, in the same batch and after a reopen.
#[tokio::test]
async fn republished_copies_are_skipped_by_event_id() {
    let dir = dir("republished");
    let config = FileSinkConfig::new(dir.join("events.jsonl"));
    let id = Uuid::new_v4();
    let mut sink = FileSink::open(config.clone()).unwrap();
    let report = sink
        .write(&[record(0, 0, id, "{}"), record(0, 1, id, "{}")])
        .await
        .unwrap();
    assert_eq!((report.written, report.duplicates), (1, 1));
    drop(sink);
    let mut sink = FileSink::open(config.clone()).unwrap();
    let report = sink.write(&[record(0, 7, id, "{}")]).await.unwrap();
    println!("lines={}", lines(&config.path).len());
    assert_eq!((report.written, report.duplicates), (0, 1));
    assert_eq!(lines(&config.path).len(), 1);
}

/// Invariant (poison isolated): a payload that is not JSON goes to the
/// dead-letter file with its reason; the rest of the batch is written, and
/// the poison is not dead-lettered again when redelivered.
#[tokio::test]
async fn poison_is_dead_lettered_and_the_rest_written() {
    let dir = dir("poison");
    let config = FileSinkConfig::new(dir.join("events.jsonl"));
    let batch = vec![
        record(0, 0, Uuid::new_v4(), "{\"ok\":1}"),
        record(0, 1, Uuid::new_v4(), "not json"),
        record(0, 2, Uuid::new_v4(), "{\"ok\":2}"),
    ];
    let mut sink = FileSink::open(config.clone()).unwrap();
    let report = sink.write(&batch).await.unwrap();
    drop(sink);
    let mut sink = FileSink::open(config.clone()).unwrap();
    let again = sink.write(&batch).await.unwrap();
    let dead = std::fs::read_to_string(&config.dead_letter_path).unwrap();
    println!(
        "written={} dead={:?} again_duplicates={} dead_lines={}",
        report.written,
        report.dead_lettered,
        again.duplicates,
        dead.lines().count()
    );
    assert_eq!(report.written, 2);
    assert_eq!(report.dead_lettered.len(), 1);
    assert!(report.dead_lettered[0].1.contains("not JSON"));
    assert_eq!(again.duplicates, 3);
    assert_eq!(dead.lines().count(), 1);
    assert!(dead.contains("not json"));
}

/// A file whose complete lines are not ours is refused, naming it.
#[tokio::test]
async fn a_foreign_file_is_refused() {
    let dir = dir("foreign");
    let path = dir.join("events.jsonl");
    std::fs::write(&path, "hello\n").unwrap();
    let err = FileSink::open(FileSinkConfig::new(&path))
        .err()
        .unwrap()
        .to_string();
    println!("{err}");
    assert!(err.contains("line 1 is not a record line"), "{err}");
    assert!(err.contains("events.jsonl"), "{err}");
}

/// Invariant (no silent loss): new events at offsets the file already holds
/// for other events (the topic started over) stop the sink with a permanent
/// error, in the same process and after a reopen; nothing is appended.
#[tokio::test]
async fn a_topic_that_starts_over_is_an_error_not_duplicates() {
    let dir = dir("regression");
    let config = FileSinkConfig::new(dir.join("events.jsonl"));
    let old: Vec<Record> = (0..20)
        .map(|o| record(0, o, Uuid::new_v4(), "{}"))
        .collect();
    let mut sink = FileSink::open(config.clone()).unwrap();
    sink.write(&old).await.unwrap();
    let reborn: Vec<Record> = (0..5).map(|o| record(0, o, Uuid::new_v4(), "{}")).collect();
    let same_process = sink.write(&reborn).await;
    drop(sink);
    let mut reopened = FileSink::open(config.clone()).unwrap();
    let after_reopen = reopened.write(&reborn).await;
    println!(
        "same process: {:?}; after reopen: {:?}; lines={}",
        same_process.as_ref().map(|r| (r.written, r.duplicates)),
        after_reopen.as_ref().map(|r| (r.written, r.duplicates)),
        lines(&config.path).len()
    );
    for outcome in [same_process, after_reopen] {
        let err = outcome.expect_err("new events at stored offsets must not be skipped");
        let text = outbox_core::ErrorChain(&err).to_string();
        assert!(!err.is_retryable(), "{text}");
        assert!(text.contains("started over"), "{text}");
    }
    // A true redelivery is still a duplicate.
    let again = reopened.write(&old[10..]).await.unwrap();
    assert_eq!((again.written, again.duplicates), (0, 10));
    assert_eq!(lines(&config.path).len(), 20);
}
