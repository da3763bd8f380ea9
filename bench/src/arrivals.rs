//! When each record was written to ClickHouse, from the consumer's own log
//! instead of polling the table: the consumer logs each batch once the sink
//! wrote it (`sink batch acknowledged`, with the time and the positions it
//! covers). Polling the table every 5 ms to time each row cost ClickHouse
//! about half a core on this two-core machine (`docs/performance.md`), CPU
//! that the pipeline being timed then did not have. The table is still
//! polled, rarely, to check this probe: a row seen in ClickHouse before the
//! log says it was written means the probe is wrong, and the run fails.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// For each partition, the first time each offset was written, as
/// non-overlapping `(first, last, at)` intervals in offset order.
#[derive(Debug, Default, PartialEq)]
pub struct FirstWritten {
    partitions: BTreeMap<i32, Vec<(i64, i64, SystemTime)>>,
}

impl FirstWritten {
    /// Reads the batches of `topic` from the consumer's JSON log, in the
    /// order they were logged. A record written again (a redelivery) keeps
    /// the time of its first write. Lines that are not a batch, or not
    /// JSON, are skipped.
    pub fn from_log(text: &str, topic: &str) -> anyhow::Result<Self> {
        let mut written = FirstWritten::default();
        let mut covered: BTreeMap<i32, i64> = BTreeMap::new();
        for (line, value) in batch_lines(text) {
            let (Some(at), Some(positions)) = (
                value["timestamp"].as_str(),
                value["fields"]["positions"].as_str(),
            ) else {
                anyhow::bail!("a consumer batch line without its time or positions: {line}");
            };
            let at = parse_time(at)?;
            for range in positions.split(',').filter(|r| !r.is_empty()) {
                let (range_topic, partition, first, last) = parse_range(range)?;
                if range_topic != topic {
                    continue;
                }
                // Only offsets no earlier batch covered are new.
                let done = covered.entry(partition).or_insert(-1);
                let from = first.max(*done + 1);
                if from <= last {
                    written
                        .partitions
                        .entry(partition)
                        .or_default()
                        .push((from, last, at));
                    *done = last;
                }
            }
        }
        Ok(written)
    }

    /// When the record at `offset` of `partition` was first written.
    pub fn at(&self, partition: i32, offset: i64) -> Option<SystemTime> {
        let intervals = self.partitions.get(&partition)?;
        let index = intervals.partition_point(|(_, last, _)| *last < offset);
        intervals
            .get(index)
            .filter(|(first, _, _)| *first <= offset)
            .map(|(_, _, at)| *at)
    }
}

/// The consumer's rate over a drain, from its own log: the records of
/// every batch after the first over the time from the first batch's write
/// to the last's (timed as the raw consumer is, from its first message,
/// which it does not count). Polling the table every 50 ms timed it
/// unfairly: tansu hands a drain over in bursts (about 25,000 records of
/// one partition every half second here), and a first sample taken just
/// after the first burst left that burst's records out but kept the wait
/// for the next (`docs/performance.md`). `None` with fewer than two
/// batches.
pub fn drain_rate(text: &str) -> anyhow::Result<Option<f64>> {
    let mut first: Option<SystemTime> = None;
    let mut last = None;
    let mut after_first = 0u64;
    for (line, value) in batch_lines(text) {
        let (Some(at), Some(len)) = (
            value["timestamp"].as_str(),
            value["fields"]["batch_len"].as_u64(),
        ) else {
            anyhow::bail!("a consumer batch line without its time or length: {line}");
        };
        let at = parse_time(at)?;
        if first.is_none() {
            first = Some(at);
        } else {
            after_first += len;
            last = Some(at);
        }
    }
    let (Some(first), Some(last)) = (first, last) else {
        return Ok(None);
    };
    let seconds = last.duration_since(first).unwrap_or_default().as_secs_f64();
    Ok((seconds > 0.0).then(|| after_first as f64 / seconds))
}

/// The consumer's batch lines (`sink batch acknowledged`) of a JSON log,
/// each with its text; lines that are not a batch, or not JSON, are
/// skipped.
fn batch_lines(text: &str) -> impl Iterator<Item = (&str, Value)> {
    text.lines().filter_map(|line| {
        let value = serde_json::from_str::<Value>(line).ok()?;
        (value["fields"]["message"] == "sink batch acknowledged").then_some((line, value))
    })
}

/// `topic:partition:first-last`.
fn parse_range(range: &str) -> anyhow::Result<(&str, i32, i64, i64)> {
    let bad = || anyhow::anyhow!("a position range is topic:partition:first-last, got {range:?}");
    let (rest, span) = range.rsplit_once(':').ok_or_else(bad)?;
    let (topic, partition) = rest.rsplit_once(':').ok_or_else(bad)?;
    let (first, last) = span.split_once('-').ok_or_else(bad)?;
    Ok((
        topic,
        partition.parse().map_err(|_| bad())?,
        first.parse().map_err(|_| bad())?,
        last.parse().map_err(|_| bad())?,
    ))
}

/// An RFC 3339 time as the JSON log writes it (`2026-12-04T20:39:32.397359Z`).
fn parse_time(text: &str) -> anyhow::Result<SystemTime> {
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| anyhow::anyhow!("log time {text:?}: {e}"))?;
    let nanos = u64::try_from(parsed.unix_timestamp_nanos())
        .map_err(|_| anyhow::anyhow!("log time {text:?} is before 1970"))?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(at: &str, positions: &str) -> String {
        format!(
            r#"{{"timestamp":"{at}","level":"DEBUG","fields":{{"message":"sink batch acknowledged","positions":"{positions}"}}}}"#
        )
    }

    #[test]
    fn each_offset_keeps_the_time_of_its_first_write() -> anyhow::Result<()> {
        let log = [
            line("2026-12-04T20:00:00.100Z", "t:0:0-9,t:1:0-4,other:0:0-99"),
            "not json".to_string(),
            line("2026-12-04T20:00:00.200Z", "t:0:5-14"),
            line("2026-12-04T20:00:00.300Z", "t:1:2-3"),
        ]
        .join("\n");
        let written = FirstWritten::from_log(&log, "t")?;
        let at =
            |ms: u64| parse_time("2026-12-04T20:00:00Z").map(|t| t + Duration::from_millis(ms));
        assert_eq!(written.at(0, 0), Some(at(100)?));
        assert_eq!(written.at(0, 9), Some(at(100)?));
        assert_eq!(written.at(0, 10), Some(at(200)?), "past the first batch");
        assert_eq!(written.at(0, 14), Some(at(200)?));
        assert_eq!(
            written.at(1, 3),
            Some(at(100)?),
            "a redelivery keeps the first time"
        );
        assert_eq!(written.at(0, 15), None);
        assert_eq!(written.at(2, 0), None);
        Ok(())
    }

    fn batch(at: &str, len: u64) -> String {
        format!(
            r#"{{"timestamp":"{at}","level":"DEBUG","fields":{{"message":"sink batch acknowledged","batch_len":{len}}}}}"#
        )
    }

    #[test]
    fn the_drain_rate_counts_the_batches_after_the_first() -> anyhow::Result<()> {
        let log = [
            batch("2026-12-04T20:00:00.000Z", 10_000),
            r#"{"fields":{"message":"consumer stopped"}}"#.to_string(),
            batch("2026-12-04T20:00:00.500Z", 10_000),
            batch("2026-12-04T20:00:01.000Z", 5_000),
        ]
        .join("\n");
        assert_eq!(drain_rate(&log)?, Some(15_000.0));
        assert_eq!(drain_rate(&batch("2026-12-04T20:00:00Z", 5))?, None);
        assert!(drain_rate(
            r#"{"timestamp":"2026-12-04T20:00:00Z","fields":{"message":"sink batch acknowledged"}}"#
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn a_batch_line_without_positions_is_an_error() {
        let log = r#"{"timestamp":"2026-12-04T20:00:00Z","fields":{"message":"sink batch acknowledged"}}"#;
        assert!(FirstWritten::from_log(log, "t").is_err());
        assert!(parse_range("t:0:5").is_err());
        assert_eq!(parse_range("a.b-c:2:5-9").ok(), Some(("a.b-c", 2, 5, 9)));
    }
}
