//! The sink's dead-letter table, for operators: list, count, select by
//! position, replay onto the bus, purge.

use std::fmt;
use std::str::FromStr;

use clickhouse::{Client, Row};
use outbox_core::{Bus, Delivery, Event};
use serde::Deserialize;

use crate::client::{bounded, client_for};
use crate::sink::DeadLetterRow;
use crate::{SinkError, ValidClickHouseConfig};

/// Where a dead letter was read from: its topic, partition and offset
/// (written and parsed as `topic:partition:offset`; the topic may contain
/// colons).
///
/// ```
/// use sink_clickhouse::DeadLetterPosition;
///
/// let at: DeadLetterPosition = "orders:v2:3:1200".parse()?;
/// assert_eq!((at.topic.as_str(), at.partition, at.offset), ("orders:v2", 3, 1200));
/// assert_eq!(at.to_string(), "orders:v2:3:1200");
/// assert!("orders:3".parse::<DeadLetterPosition>().is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeadLetterPosition {
    /// Topic the record was read from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

impl DeadLetterPosition {
    /// The position of `row`.
    pub fn of(row: &DeadLetterRow) -> Self {
        Self {
            topic: row.topic.clone(),
            partition: row.kafka_partition,
            offset: row.kafka_offset,
        }
    }
}

impl fmt::Display for DeadLetterPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.topic, self.partition, self.offset)
    }
}

/// Why a text is not a [`DeadLetterPosition`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not topic:partition:offset ({why})")]
pub struct BadPosition {
    text: String,
    why: &'static str,
}

impl FromStr for DeadLetterPosition {
    type Err = BadPosition;

    fn from_str(text: &str) -> Result<Self, BadPosition> {
        let bad = |why| BadPosition {
            text: text.to_string(),
            why,
        };
        let mut parts = text.rsplitn(3, ':');
        let (Some(offset), Some(partition), Some(topic)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("three parts separated by colons"));
        };
        if topic.is_empty() {
            return Err(bad("the topic is empty"));
        }
        Ok(Self {
            topic: topic.to_string(),
            partition: partition
                .parse()
                .map_err(|_| bad("the partition is not a number"))?,
            offset: offset
                .parse()
                .map_err(|_| bad("the offset is not a number"))?,
        })
    }
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterSelection {
    /// Every dead letter of the table.
    All,
    /// The dead letters at these positions.
    At(Vec<DeadLetterPosition>),
}

/// What [`ClickHouseDeadLetters::replay`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead letters the bus acknowledged again, then removed from the table.
    pub replayed: Vec<DeadLetterPosition>,
    /// Dead letters left in the table, with the bus's reason.
    pub kept: Vec<(DeadLetterPosition, String)>,
}

/// The sink's dead-letter table, for operators. Needs no row mapper, so it
/// never creates or touches the data table.
///
/// ```no_run
/// # async fn example() -> Result<(), sink_clickhouse::SinkError> {
/// use sink_clickhouse::{ClickHouseConfig, ClickHouseDeadLetters};
///
/// let dead = ClickHouseDeadLetters::new(ClickHouseConfig::default().validate()?)?;
/// for row in dead.dead_letters(None, 20).await? {
///     println!("{}:{}:{} {}", row.topic, row.kafka_partition, row.kafka_offset, row.reason);
/// }
/// # Ok(()) }
/// ```
pub struct ClickHouseDeadLetters {
    client: Client,
    config: ValidClickHouseConfig,
}

impl ClickHouseDeadLetters {
    /// The dead-letter table named in `config` (fails as [`client_for`] does).
    pub fn new(config: ValidClickHouseConfig) -> Result<Self, SinkError> {
        Ok(Self {
            client: client_for(&config)?,
            config,
        })
    }

    fn table_ref(&self) -> String {
        format!(
            "`{}`.`{}`",
            self.config.database, self.config.dead_letter_table
        )
    }

    /// The oldest `limit` dead letters of `topic` (all topics when `None`).
    pub async fn dead_letters(
        &self,
        topic: Option<&str>,
        limit: u64,
    ) -> Result<Vec<DeadLetterRow>, SinkError> {
        let sql = format!(
            "SELECT ?fields FROM {} WHERE (? = '' OR topic = ?) \
             ORDER BY failed_at, topic, kafka_partition, kafka_offset LIMIT ?",
            self.table_ref()
        );
        let topic = topic.unwrap_or_default();
        let query = self
            .client
            .query(&sql)
            .bind(topic)
            .bind(topic)
            .bind(limit)
            .fetch_all::<DeadLetterRow>();
        bounded(&self.config, "dead-letter list", query).await
    }

    /// The selected dead letters, oldest first, read with a WHERE clause on
    /// their positions (a position that holds none is simply absent).
    pub async fn select(
        &self,
        selection: &DeadLetterSelection,
    ) -> Result<Vec<DeadLetterRow>, SinkError> {
        let positions = match selection {
            DeadLetterSelection::All => return self.dead_letters(None, u64::MAX).await,
            DeadLetterSelection::At(positions) if positions.is_empty() => return Ok(Vec::new()),
            DeadLetterSelection::At(positions) => positions,
        };
        let query = self.at_positions(
            &format!("SELECT ?fields FROM {} WHERE", self.table_ref()),
            positions,
            "ORDER BY failed_at, topic, kafka_partition, kafka_offset",
        );
        bounded(
            &self.config,
            "dead-letter select",
            query.fetch_all::<DeadLetterRow>(),
        )
        .await
    }

    /// Dead letters counted by reason, most frequent first.
    pub async fn dead_letter_counts(&self) -> Result<Vec<(String, u64)>, SinkError> {
        #[derive(Row, Deserialize)]
        struct Count {
            reason: String,
            n: u64,
        }
        let sql = format!(
            "SELECT reason, count() AS n FROM {} GROUP BY reason ORDER BY n DESC, reason LIMIT 20",
            self.table_ref()
        );
        let query = self.client.query(&sql).fetch_all::<Count>();
        let rows = bounded(&self.config, "dead-letter counts", query).await?;
        Ok(rows.into_iter().map(|c| (c.reason, c.n)).collect())
    }

    /// Deletes the selected dead letters. ClickHouse applies a deletion in
    /// the background, within seconds.
    pub async fn purge(&self, selection: &DeadLetterSelection) -> Result<(), SinkError> {
        let positions = match selection {
            DeadLetterSelection::All => {
                let sql = format!("ALTER TABLE {} DELETE WHERE 1", self.table_ref());
                let query = self.client.query(&sql).execute();
                return bounded(&self.config, "dead-letter delete", query).await;
            }
            DeadLetterSelection::At(positions) if positions.is_empty() => return Ok(()),
            DeadLetterSelection::At(positions) => positions,
        };
        let query = self.at_positions(
            &format!("ALTER TABLE {} DELETE WHERE", self.table_ref()),
            positions,
            "",
        );
        bounded(&self.config, "dead-letter delete", query.execute()).await
    }

    /// `{head} <the positions' filter> {tail}`, the positions bound.
    fn at_positions(
        &self,
        head: &str,
        positions: &[DeadLetterPosition],
        tail: &str,
    ) -> clickhouse::query::Query {
        let sql = format!("{head} {} {tail}", position_filter(positions.len()));
        positions.iter().fold(self.client.query(&sql), |query, at| {
            query
                .bind(at.topic.as_str())
                .bind(at.partition)
                .bind(at.offset)
        })
    }

    /// Sends the selected dead letters through the normal path again: each
    /// is published on its topic with its event id (a consumer that wrote
    /// it after all skips it), key and payload, and removed from the table
    /// only once `bus` acknowledged it; the others stay, with the bus's
    /// reason. Fix the cause first, or they come back.
    pub async fn replay<B: Bus>(
        &self,
        bus: &B,
        selection: &DeadLetterSelection,
    ) -> outbox_core::Result<ReplayReport> {
        self.replay_with_progress(bus, selection, |_, _| {}).await
    }

    /// [`ClickHouseDeadLetters::replay`] in batches of
    /// [`REPLAY_BATCH`](Self::REPLAY_BATCH) dead letters, each published,
    /// then removed once acknowledged, before the next; `progress` hears
    /// (done, total) after each.
    pub async fn replay_with_progress<B: Bus>(
        &self,
        bus: &B,
        selection: &DeadLetterSelection,
        mut progress: impl FnMut(usize, usize),
    ) -> outbox_core::Result<ReplayReport> {
        let rows = self.select(selection).await?;
        let mut report = ReplayReport::default();
        let mut done = 0;
        for batch in rows.chunks(Self::REPLAY_BATCH) {
            let events: Vec<Event> = batch.iter().map(event_of).collect();
            let deliveries = bus.publish(&events).await?;
            let mut replayed = Vec::new();
            for (row, delivery) in batch.iter().zip(deliveries) {
                let at = DeadLetterPosition::of(row);
                match delivery {
                    Delivery::Acknowledged(_) => replayed.push(at),
                    Delivery::Retryable(reason) | Delivery::Rejected(reason) => {
                        report.kept.push((at, reason))
                    }
                }
            }
            if !replayed.is_empty() {
                self.purge(&DeadLetterSelection::At(replayed.clone()))
                    .await?;
            }
            report.replayed.extend(replayed);
            done += batch.len();
            progress(done, rows.len());
        }
        Ok(report)
    }

    /// Dead letters published (and then removed) at once by a replay.
    pub const REPLAY_BATCH: usize = 1000;
}

/// The event a dead letter came from, as far as the table keeps it.
fn event_of(row: &DeadLetterRow) -> Event {
    let mut event = Event::new(row.topic.clone(), row.payload.clone().into_bytes());
    if let Ok(id) = row.event_id.parse() {
        event = event.with_id(id);
    }
    if !row.key.is_empty() {
        event = event.with_key(row.key.clone().into_bytes());
    }
    event
}

/// `(topic = ? AND kafka_partition = ? AND kafka_offset = ?) OR …`, `n` times.
fn position_filter(n: usize) -> String {
    vec!["(topic = ? AND kafka_partition = ? AND kafka_offset = ?)"; n].join(" OR ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_has_one_clause_per_position() {
        assert_eq!(position_filter(2).matches('?').count(), 6);
        assert_eq!(position_filter(2).matches(" OR ").count(), 1);
    }

    #[test]
    fn an_event_keeps_the_dead_letters_id_key_and_payload() {
        let id = uuid::Uuid::now_v7();
        let row = DeadLetterRow {
            topic: "t".into(),
            kafka_partition: 1,
            kafka_offset: 2,
            event_id: id.to_string(),
            key: "k".into(),
            payload: "{}".into(),
            reason: "bad".into(),
            failed_at: 0,
        };
        let event = event_of(&row);
        assert_eq!(
            (event.id, event.key.as_deref(), &event.payload[..]),
            (id, Some(&b"k"[..]), &b"{}"[..])
        );
        let keyless = event_of(&DeadLetterRow {
            key: String::new(),
            event_id: "not a uuid".into(),
            ..row
        });
        assert!(keyless.key.is_none());
        assert_ne!(keyless.id, id, "a fresh id when the stored one is unusable");
    }
}
