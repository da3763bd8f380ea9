//! The exactly-once decision, without I/O: given what the sink knows of
//! each partition (where it left off, which positions the table already
//! holds and the ids of its latest rows), which records of a batch to
//! write and which to skip. The sink looks up what [`lookups_needed`]
//! names, asks [`plan`], writes, then calls [`advance`].

use std::collections::{BTreeMap, HashMap, HashSet};

use outbox_core::{RecentIds, Record, HEADER_EVENT_ID};
use uuid::Uuid;

/// A partition of a topic.
pub(crate) type PartitionKey = (String, i32);

/// What the sink knows of one partition since it last looked it up.
#[derive(Debug)]
pub(crate) struct PartitionState {
    /// The offset after the last record this sink wrote or skipped.
    pub next_expected: i64,
    /// Offsets at or after `next_expected` found already stored, with the
    /// event id stored there.
    pub stored: BTreeMap<i64, String>,
    /// Ids of the latest rows written to this partition.
    pub recent: RecentIds,
    /// `recent.overruns()` already reported.
    pub overruns_reported: u64,
}

/// The partitions of `records` whose first record does not continue where
/// the sink left off (or that it never saw), with that first offset: what
/// is stored there must be looked up before deciding.
pub(crate) fn lookups_needed(
    partitions: &HashMap<PartitionKey, PartitionState>,
    records: &[Record],
) -> Vec<(PartitionKey, i64)> {
    let mut firsts: Vec<(PartitionKey, i64)> = Vec::new();
    for record in records {
        let key = (record.topic.clone(), record.position.partition);
        if !firsts.iter().any(|(k, _)| *k == key) {
            firsts.push((key, record.position.offset));
        }
    }
    firsts.retain(|(key, first)| {
        !partitions
            .get(key)
            .is_some_and(|state| state.next_expected == *first)
    });
    firsts
}

/// Whether the event id stored at a position (a UUID from the table, the raw
/// header from the dead-letter table, "" for none) is the one `record`
/// carries there now. UUIDs compare by value, so spelling does not matter.
pub(crate) fn same_event(stored: &str, record: Option<&str>) -> bool {
    let record = record.unwrap_or_default();
    match (Uuid::parse_str(stored), Uuid::parse_str(record)) {
        (Ok(a), Ok(b)) => a == b,
        _ => stored == record,
    }
}

/// A stored position that holds another event than the record the broker
/// serves there now: the topic started over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Regression {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub stored_event_id: String,
    pub record_event_id: String,
}

/// The decision for one batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Per record: write it (map it to a row or dead-letter it).
    pub write: Vec<bool>,
    /// Records at a stored position (written before, by anyone).
    pub duplicates: usize,
    /// Records whose event id was written recently at another position (a
    /// relay's republished copy), or twice in this batch.
    pub copies: usize,
    /// Ids of the records to write, with their producer timestamp, grouped
    /// by partition in the batch's order (a group per run of records of one
    /// partition), to remember once they are written.
    pub new_ids: Vec<(PartitionKey, Vec<(Uuid, i64)>)>,
}

/// Whether `record` is of the partition `key` names (without building a key:
/// a batch comes in runs of one partition, and a key per record cost the
/// sink an allocation and a hash each).
fn of_partition(record: &Record, key: &PartitionKey) -> bool {
    record.position.partition == key.1 && record.topic == key.0
}

/// Decides each record of `records`. `dedup` off (a window of 0) skips only
/// stored positions, never by id.
pub(crate) fn plan(
    partitions: &HashMap<PartitionKey, PartitionState>,
    records: &[Record],
    dedup: bool,
) -> Result<Plan, Regression> {
    let mut plan = Plan::default();
    let mut batch_ids: HashSet<Uuid> = HashSet::new();
    let mut current: Option<(PartitionKey, Option<&PartitionState>)> = None;
    for record in records {
        let state = match &current {
            Some((key, state)) if of_partition(record, key) => *state,
            _ => {
                let key = (record.topic.clone(), record.position.partition);
                let state = partitions.get(&key);
                current = Some((key, state));
                state
            }
        };
        let carried = record.headers.get(HEADER_EVENT_ID);
        if let Some(stored) = state.and_then(|state| state.stored.get(&record.position.offset)) {
            if !same_event(stored, carried.map(String::as_str)) {
                return Err(Regression {
                    topic: record.topic.clone(),
                    partition: record.position.partition,
                    offset: record.position.offset,
                    stored_event_id: stored.clone(),
                    record_event_id: carried.cloned().unwrap_or_default(),
                });
            }
            plan.duplicates += 1;
            plan.write.push(false);
            continue;
        }
        if let Ok(id) = record.event_id() {
            let copy = state.is_some_and(|state| state.recent.contains(&id))
                || (dedup && !batch_ids.insert(id));
            if copy {
                plan.copies += 1;
                plan.write.push(false);
                continue;
            }
            let published_ms = record.timestamp_ms.unwrap_or(i64::MIN);
            match plan.new_ids.last_mut() {
                Some((key, ids)) if of_partition(record, key) => ids.push((id, published_ms)),
                _ => plan.new_ids.push((
                    (record.topic.clone(), record.position.partition),
                    vec![(id, published_ms)],
                )),
            }
        }
        plan.write.push(true);
    }
    Ok(plan)
}

/// After the batch was written: each partition continues after its last
/// record, remembers the new ids, and forgets stored positions it passed.
pub(crate) fn advance(
    partitions: &mut HashMap<PartitionKey, PartitionState>,
    records: &[Record],
    new_ids: Vec<(PartitionKey, Vec<(Uuid, i64)>)>,
) {
    let mut run_start = 0;
    while let Some(first) = records.get(run_start) {
        let key = (first.topic.clone(), first.position.partition);
        let run = records[run_start..]
            .iter()
            .take_while(|record| of_partition(record, &key));
        let (count, last_offset) = run.fold((0, i64::MIN), |(count, last), record| {
            (count + 1, last.max(record.position.offset))
        });
        if let Some(state) = partitions.get_mut(&key) {
            state.next_expected = state.next_expected.max(last_offset + 1);
        }
        run_start += count;
    }
    for (key, ids) in new_ids {
        if let Some(state) = partitions.get_mut(&key) {
            for (id, published_ms) in ids {
                state.recent.insert_at(id, published_ms);
            }
        }
    }
    for state in partitions.values_mut() {
        let next = state.next_expected;
        state.stored.retain(|offset, _| *offset >= next);
    }
}

/// The `insert_deduplication_token` of an insert into `table` of the rows
/// of `records`, in order: the same rows (positions and event ids) give the
/// same token, any other rows another, so the server drops an insert only
/// when it holds exactly rows it already took.
pub(crate) fn dedup_token<'a>(table: &str, records: impl Iterator<Item = &'a Record>) -> String {
    let mut text = String::from(table);
    for record in records {
        text.push_str(&format!(
            "/{}:{}:{}:{}",
            record.topic,
            record.position.partition,
            record.position.offset,
            record
                .headers
                .get(HEADER_EVENT_ID)
                .map_or("", String::as_str)
        ));
    }
    Uuid::new_v5(&Uuid::NAMESPACE_OID, text.as_bytes())
        .simple()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_core::Position;

    fn record(partition: i32, offset: i64, id: Uuid) -> Record {
        Record {
            topic: "t".into(),
            position: Position { partition, offset },
            key: None,
            payload: Some("{}".into()),
            headers: [(HEADER_EVENT_ID.to_string(), id.to_string())].into(),
            timestamp_ms: Some(1),
        }
    }

    fn state(next_expected: i64, stored: &[(i64, Uuid)], recent: &[Uuid]) -> PartitionState {
        let mut ids = RecentIds::new(16);
        for id in recent {
            ids.insert(*id);
        }
        PartitionState {
            next_expected,
            stored: stored.iter().map(|(o, id)| (*o, id.to_string())).collect(),
            recent: ids,
            overruns_reported: 0,
        }
    }

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::now_v7()).collect()
    }

    #[test]
    fn only_partitions_that_do_not_continue_are_looked_up() {
        let id = ids(4);
        let partitions = HashMap::from([(("t".to_string(), 0), state(10, &[], &[]))]);
        let records = [
            record(0, 10, id[0]),
            record(0, 11, id[1]),
            record(1, 5, id[2]),
            record(2, 0, id[3]),
        ];
        assert_eq!(
            lookups_needed(&partitions, &records),
            [(("t".to_string(), 1), 5), (("t".to_string(), 2), 0)]
        );
        let after_a_gap = [record(0, 12, id[0])];
        assert_eq!(
            lookups_needed(&partitions, &after_a_gap),
            [(("t".to_string(), 0), 12)]
        );
    }

    /// A redelivery: stored positions are skipped, the rest written.
    #[test]
    fn stored_positions_are_duplicates_and_the_rest_is_written() -> Result<(), Regression> {
        let id = ids(3);
        let partitions = HashMap::from([(
            ("t".to_string(), 0),
            state(0, &[(0, id[0]), (1, id[1])], &[]),
        )]);
        let records = [
            record(0, 0, id[0]),
            record(0, 1, id[1]),
            record(0, 2, id[2]),
        ];
        let plan = plan(&partitions, &records, true)?;
        assert_eq!(plan.write, [false, false, true]);
        assert_eq!((plan.duplicates, plan.copies), (2, 0));
        assert_eq!(plan.new_ids.len(), 1);
        Ok(())
    }

    /// A topic that started over: the stored position holds another event.
    #[test]
    fn another_event_at_a_stored_position_is_a_regression() {
        let id = ids(2);
        let partitions = HashMap::from([(("t".to_string(), 0), state(0, &[(0, id[0])], &[]))]);
        let regression = plan(&partitions, &[record(0, 0, id[1])], true).unwrap_err();
        assert_eq!((regression.partition, regression.offset), (0, 0));
        assert_eq!(regression.stored_event_id, id[0].to_string());
        assert_eq!(regression.record_event_id, id[1].to_string());
    }

    /// A relay's republished copy at a new offset, and a copy inside one
    /// batch, are skipped by id; with dedup off only positions count.
    #[test]
    fn copies_are_skipped_by_id_unless_dedup_is_off() -> Result<(), Regression> {
        let id = ids(2);
        let partitions = HashMap::from([(("t".to_string(), 0), state(5, &[], &[id[0]]))]);
        let records = [
            record(0, 5, id[0]),
            record(0, 6, id[1]),
            record(0, 7, id[1]),
        ];
        let on = plan(&partitions, &records, true)?;
        assert_eq!(on.write, [false, true, false]);
        assert_eq!((on.duplicates, on.copies), (0, 2));
        let off_state = HashMap::from([(("t".to_string(), 0), state(5, &[], &[]))]);
        let off = plan(&off_state, &records, false)?;
        assert_eq!(off.write, [true, true, true]);
        Ok(())
    }

    /// A batch whose partitions alternate: each record is judged by its
    /// own partition's state, and each partition advances past its own
    /// last record and remembers its own ids.
    #[test]
    fn alternating_partitions_are_each_judged_and_advanced_on_their_own() -> Result<(), Regression>
    {
        let id = ids(5);
        let mut partitions = HashMap::from([
            (("t".to_string(), 0), state(0, &[(0, id[0])], &[])),
            (("t".to_string(), 1), state(3, &[], &[id[4]])),
        ]);
        let records = [
            record(0, 0, id[0]),
            record(1, 3, id[1]),
            record(1, 4, id[4]),
            record(0, 1, id[2]),
            record(1, 5, id[3]),
        ];
        let planned = plan(&partitions, &records, true)?;
        assert_eq!(planned.write, [false, true, false, true, true]);
        assert_eq!((planned.duplicates, planned.copies), (1, 1));
        let groups: Vec<(i32, usize)> = planned
            .new_ids
            .iter()
            .map(|((_, partition), ids)| (*partition, ids.len()))
            .collect();
        assert_eq!(groups, [(1, 1), (0, 1), (1, 1)]);
        advance(&mut partitions, &records, planned.new_ids);
        let (p0, p1) = (
            &partitions[&("t".to_string(), 0)],
            &partitions[&("t".to_string(), 1)],
        );
        assert_eq!((p0.next_expected, p1.next_expected), (2, 6));
        assert!(p0.stored.is_empty());
        assert!(p0.recent.contains(&id[2]) && !p0.recent.contains(&id[1]));
        assert!(p1.recent.contains(&id[1]) && p1.recent.contains(&id[3]));
        Ok(())
    }

    #[test]
    fn advancing_continues_after_the_batch_and_forgets_passed_positions() -> Result<(), Regression>
    {
        let id = ids(3);
        let mut partitions = HashMap::from([(
            ("t".to_string(), 0),
            state(0, &[(0, id[0]), (9, id[2])], &[]),
        )]);
        let records = [record(0, 0, id[0]), record(0, 1, id[1])];
        let planned = plan(&partitions, &records, true)?;
        advance(&mut partitions, &records, planned.new_ids);
        let state = &partitions[&("t".to_string(), 0)];
        assert_eq!(state.next_expected, 2);
        assert_eq!(state.stored.keys().collect::<Vec<_>>(), [&9]);
        assert!(state.recent.contains(&id[1]));
        assert!(lookups_needed(&partitions, &[record(0, 2, id[2])]).is_empty());
        Ok(())
    }

    #[test]
    fn the_token_names_exactly_the_rows_of_an_insert() {
        let id = ids(3);
        let rows = [record(0, 5, id[0]), record(1, 2, id[1])];
        let token = dedup_token("t", rows.iter());
        assert_eq!(
            token,
            dedup_token("t", rows.iter()),
            "the same rows, the same token"
        );
        assert_eq!(token.len(), 32);
        for other in [
            dedup_token("t", rows[..1].iter()),
            dedup_token("u", rows.iter()),
            dedup_token("t", [record(0, 5, id[0]), record(1, 3, id[1])].iter()),
            // A topic that started over: same positions, other events.
            dedup_token("t", [record(0, 5, id[2]), record(1, 2, id[1])].iter()),
        ] {
            assert_ne!(token, other);
        }
    }

    #[test]
    fn ids_compare_by_value_and_absent_ids_match_only_empty() {
        let id = "0190a5f0-1c2b-7d3e-8f40-5a6b7c8d9e0f";
        assert!(same_event(id, Some(&id.to_uppercase())));
        assert!(same_event(id, Some("0190a5f01c2b7d3e8f405a6b7c8d9e0f")));
        assert!(!same_event(
            id,
            Some("0190a5f0-1c2b-7d3e-8f40-5a6b7c8d9e00")
        ));
        assert!(!same_event(id, None));
        assert!(same_event("", None));
        assert!(same_event("not-a-uuid", Some("not-a-uuid")));
        assert!(!same_event("", Some(id)));
    }
}
