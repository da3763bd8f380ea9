//! The verdict, from what the stores hold: lost, duplicated, phantom, out
//! of order, undelivered.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::bail;
use uuid::Uuid;

/// A row of the run's ClickHouse table.
#[derive(Debug, Clone, clickhouse::Row, serde::Deserialize)]
pub(crate) struct Landed {
    #[serde(with = "clickhouse::serde::uuid")]
    pub(crate) event_id: Uuid,
    pub(crate) payload: String,
    pub(crate) kafka_partition: i32,
    pub(crate) kafka_offset: i64,
}

/// The counts of a run.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Committed, and in none of the stores.
    pub(crate) lost: usize,
    /// Rows beyond the first of each event id in ClickHouse.
    pub(crate) duplicated: usize,
    /// Event ids in ClickHouse that were never committed.
    pub(crate) phantom: usize,
    /// First occurrences whose key's sequence did not increase.
    pub(crate) out_of_order: usize,
    /// Committed, not in ClickHouse, but still in the outbox or in Kafka.
    pub(crate) undelivered: usize,
}

/// Committed events neither in ClickHouse nor still pending: to look for in
/// Kafka before calling them lost.
pub(crate) fn missing(
    committed: &HashSet<Uuid>,
    rows: &[Landed],
    pending: &HashSet<Uuid>,
) -> Vec<Uuid> {
    let landed: HashSet<Uuid> = rows.iter().map(|r| r.event_id).collect();
    committed
        .iter()
        .filter(|id| !landed.contains(id) && !pending.contains(id))
        .copied()
        .collect()
}

/// Judges a run: `rows` in (partition, offset) order, the ids `pending` in
/// the outbox and those read back `in_kafka`. Order is judged on first
/// occurrences (copies are counted as duplicates), by each payload's
/// `key` and `seq`.
pub(crate) fn judge(
    committed: &HashSet<Uuid>,
    rows: &[Landed],
    pending: &HashSet<Uuid>,
    in_kafka: &HashSet<Uuid>,
) -> Counts {
    let distinct: HashSet<Uuid> = rows.iter().map(|r| r.event_id).collect();
    let missing = missing(committed, rows, pending);
    let undelivered = committed
        .iter()
        .filter(|id| !distinct.contains(id) && pending.contains(id))
        .count()
        + missing.iter().filter(|id| in_kafka.contains(id)).count();
    let lost = missing.iter().filter(|id| !in_kafka.contains(id)).count();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    let mut out_of_order = 0;
    let mut seen: HashSet<Uuid> = HashSet::new();
    for row in rows.iter().filter(|r| seen.insert(r.event_id)) {
        let value: serde_json::Value = serde_json::from_str(&row.payload).unwrap_or_default();
        let key = value["key"].as_str().unwrap_or_default().to_string();
        let seq = value["seq"].as_i64().unwrap_or(-1);
        let previous = last_seq.entry(key).or_insert(-1);
        if seq <= *previous {
            out_of_order += 1;
        }
        *previous = (*previous).max(seq);
    }
    Counts {
        lost,
        duplicated: rows.len() - distinct.len(),
        phantom: distinct.difference(committed).count(),
        out_of_order,
        undelivered,
    }
}

/// Every event id in `topic`, read from the beginning of each partition to
/// its end (explicit assignment: no group involved).
pub(crate) fn read_event_ids(brokers: &str, topic: &str) -> anyhow::Result<HashSet<Uuid>> {
    Ok(read_records(brokers, topic)?
        .into_iter()
        .filter_map(|r| r.event_id)
        .collect())
}

/// A message of a topic, as read back.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) event_id: Option<Uuid>,
    pub(crate) payload: Vec<u8>,
}

/// Every message of `topic`, from the beginning of each partition to its
/// end when the read began, in (partition, offset) order.
pub(crate) fn read_records(brokers: &str, topic: &str) -> anyhow::Result<Vec<Record>> {
    use outbox_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
    use outbox_kafka::rdkafka::message::Headers;
    use outbox_kafka::rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}_verify"))
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    let mut ends = HashMap::new();
    let mut list = TopicPartitionList::new();
    for partition in &partitions {
        let (_, high) = consumer.fetch_watermarks(topic, *partition, Duration::from_secs(30))?;
        if high > 0 {
            ends.insert(*partition, high);
            list.add_partition_offset(topic, *partition, Offset::Beginning)?;
        }
    }
    consumer.assign(&list)?;
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !ends.is_empty() && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message?;
        let event_id = message.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == outbox_core::HEADER_EVENT_ID)
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| Uuid::parse_str(v).ok())
        });
        if ends
            .get(&message.partition())
            .is_some_and(|end| message.offset() < *end)
        {
            records.push(Record {
                partition: message.partition(),
                offset: message.offset(),
                event_id,
                payload: message.payload().unwrap_or_default().to_vec(),
            });
        }
        if ends
            .get(&message.partition())
            .is_some_and(|end| message.offset() + 1 >= *end)
        {
            ends.remove(&message.partition());
        }
    }
    if !ends.is_empty() {
        bail!("reading the topic back timed out");
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    Ok(records)
}

/// What the captured table's topic says of the table (WAL runs).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct TableCounts {
    /// Rows published by the initial load (first copies).
    pub(crate) loaded: usize,
    /// Updates published (first copies).
    pub(crate) changes: usize,
    /// An update whose `n` is not the key's previous `n` plus one: a change
    /// of the key is missing before it (or came twice under two ids).
    pub(crate) gaps: usize,
    /// An event whose `n` is below the key's previous one: out of order.
    pub(crate) backwards: usize,
    /// Rows whose last published `n` is not the table's (or not published).
    pub(crate) mismatched: usize,
}

impl TableCounts {
    pub(crate) fn violations(&self) -> usize {
        self.gaps + self.backwards + self.mismatched
    }
}

/// Judges the change events of the captured table (`id` key, `n` counting
/// its updates) in `records` (partition order; one key, one partition)
/// against the table's rows at the end: the first copy of each event, per
/// key, must count up one by one from where the load found the row, and
/// end at the table's `n`.
pub(crate) fn judge_table(records: &[Record], table: &HashMap<i64, i64>) -> TableCounts {
    let mut counts = TableCounts::default();
    let mut last: HashMap<i64, i64> = HashMap::new();
    let mut seen = HashSet::new();
    for record in records {
        if record.event_id.is_some_and(|id| !seen.insert(id)) {
            continue;
        }
        let change: serde_json::Value = serde_json::from_slice(&record.payload).unwrap_or_default();
        let (Some(id), Some(n)) = (
            change["after"]["id"].as_i64(),
            change["after"]["n"].as_i64(),
        ) else {
            continue;
        };
        let op = change["op"].as_str().unwrap_or_default();
        if op == "r" {
            counts.loaded += 1;
        } else {
            counts.changes += 1;
        }
        if let Some(previous) = last.insert(id, n) {
            if n < previous {
                counts.backwards += 1;
            } else if op != "r" && n != previous + 1 {
                counts.gaps += 1;
            }
        }
    }
    counts.mismatched = table
        .iter()
        .filter(|(id, n)| last.get(id) != Some(n))
        .count();
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: Uuid, key: &str, seq: i64, offset: i64) -> Landed {
        Landed {
            event_id: id,
            payload: format!("{{\"key\":\"{key}\",\"seq\":{seq}}}"),
            kafka_partition: 0,
            kafka_offset: offset,
        }
    }

    /// Each violation the harness reports is counted from the stores, and
    /// a clean run counts none: the verdict can fail.
    #[test]
    fn every_violation_is_counted_and_a_clean_run_has_none() {
        let ids: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
        let committed: HashSet<Uuid> = ids[..5].iter().copied().collect();
        let clean = [row(ids[0], "a", 0, 0), row(ids[1], "a", 1, 1)];
        let all_there: HashSet<Uuid> = ids[2..5].iter().copied().collect();
        assert_eq!(
            judge(&committed, &clean, &all_there, &HashSet::new()),
            Counts {
                undelivered: 3,
                ..Counts::default()
            }
        );
        let broken = [
            row(ids[1], "a", 1, 0), // a's 1 before a's 0
            row(ids[0], "a", 0, 1),
            row(ids[0], "a", 0, 2), // a copy: duplicated, not judged for order
            row(ids[5], "b", 0, 3), // never committed
        ];
        let pending = HashSet::from([ids[2]]);
        let in_kafka = HashSet::from([ids[3]]);
        assert_eq!(
            judge(&committed, &broken, &pending, &in_kafka),
            Counts {
                lost: 1, // ids[4]: nowhere
                duplicated: 1,
                phantom: 1,
                out_of_order: 1,
                undelivered: 2, // ids[2] pending, ids[3] in Kafka
            }
        );
        assert_eq!(missing(&committed, &broken, &pending).len(), 2);
    }

    fn change(op: &str, id: i64, n: i64, offset: i64) -> Record {
        Record {
            partition: 0,
            offset,
            event_id: Some(Uuid::now_v7()),
            payload: format!("{{\"op\":\"{op}\",\"after\":{{\"id\":{id},\"n\":{n}}}}}")
                .into_bytes(),
        }
    }

    /// The table's history is judged per key: a load found the row at any
    /// `n`, each update counts one up, the end is the table's.
    #[test]
    fn table_changes_must_count_up_one_by_one_to_the_tables_rows() {
        let clean = [
            change("u", 1, 1, 0), // before the row's chunk
            change("r", 1, 1, 1),
            change("u", 1, 2, 2),
            change("r", 2, 5, 3),
        ];
        let table = HashMap::from([(1, 2), (2, 5)]);
        assert_eq!(
            judge_table(&clean, &table),
            TableCounts {
                loaded: 2,
                changes: 2,
                ..TableCounts::default()
            }
        );
        let mut broken = vec![
            change("r", 1, 3, 0),
            change("u", 1, 2, 1), // older than the load: backwards
            change("u", 1, 4, 2), // 3 is missing: a gap
            change("r", 3, 0, 4),
        ];
        let mut copy = broken[2].clone(); // published again: skipped
        copy.offset = 3;
        broken.insert(3, copy);
        let counts = judge_table(&broken, &HashMap::from([(1, 4), (2, 5), (3, 1)]));
        assert_eq!(
            (counts.backwards, counts.gaps, counts.mismatched),
            (1, 1, 2)
        );
        assert_eq!(counts.violations(), 4);
    }
}
