//! The run's tables in PostgreSQL and ClickHouse and its topic: created
//! before the attack, read to judge the run, dropped after it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_pg::deadpool_postgres::Pool;
use outbox_pg::{migrate, OutboxConfig, PgConfig, ValidOutboxConfig};
use uuid::Uuid;

use crate::verify::Landed;
use crate::{Cli, CLAIM_TIMEOUT_SECS};

/// The WAL source of run `name`, as its relays are configured
/// (`fleet::relay_command`): slot, publication and prefix `name`, the
/// captured table `<name>_rows` to topic `<name>_rows`.
pub(crate) fn wal_config(name: &str) -> outbox_pg::wal::WalConfig {
    outbox_pg::wal::WalConfig {
        slot: name.to_string(),
        publication: name.to_string(),
        message_prefix: name.to_string(),
        tables: vec![
            outbox_pg::wal::CaptureTable::new(format!("public.{name}_rows"))
                .with_topic(format!("{name}_rows")),
        ],
        ..outbox_pg::wal::WalConfig::default()
    }
}

/// Drops run `name`'s slot and publication, if any, on the server at
/// `host:port` (a run interrupted before its end).
pub(crate) async fn drop_slot_of(host: &str, port: u16, name: &str) {
    let pg = PgConfig {
        host: host.to_string(),
        port,
        ..PgConfig::default()
    };
    match pg.create_pool() {
        Ok(pool) => drop_slot_in(&pool, name).await,
        Err(err) => println!("chaos: could not drop the replication slot {name}: {err}"),
    }
}

async fn drop_slot_in(pool: &Pool, name: &str) {
    let dropped = async {
        let client = pool.get().await?;
        test_support::drop_slot(&client, name).await?;
        client
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS {name};"))
            .await?;
        anyhow::Ok(())
    };
    if let Err(err) = dropped.await {
        println!("chaos: could not drop the replication slot {name}: {err:#}");
    }
}

/// Where a run's events are, at each stage.
pub(crate) struct Stores {
    /// The run's name: its outbox table, topic and ClickHouse table.
    pub(crate) name: String,
    pub(crate) pool: Pool,
    pub(crate) ch: clickhouse::Client,
    pub(crate) outbox: ValidOutboxConfig,
    /// The ids of the events whose transaction committed.
    pub(crate) ledger: String,
}

impl Stores {
    /// Creates the outbox tables, the ledger and the topic of run `name`.
    pub(crate) async fn create(cli: &Cli, name: &str, table_rows: i32) -> anyhow::Result<Self> {
        let pg = PgConfig {
            host: cli.pg_host.clone(),
            port: cli.pg_port,
            ..PgConfig::default()
        };
        let pool = pg.create_pool()?;
        let outbox = OutboxConfig {
            table: name.to_string(),
            dead_letter_table: format!("{name}_dead"),
            claim_timeout: Duration::from_secs(CLAIM_TIMEOUT_SECS),
            ..OutboxConfig::default()
        }
        .validate()?;
        let ledger = format!("{name}_ledger");
        let client = pool.get().await?;
        migrate(&client, &outbox).await?;
        client
            .batch_execute(&format!(
                "CREATE TABLE {ledger} (event_id uuid PRIMARY KEY);
                 CREATE TABLE {ledger}_seq (key int PRIMARY KEY, seq bigint NOT NULL);
                 INSERT INTO {ledger}_seq SELECT k, -1 FROM generate_series(0, {}) k;",
                crate::KEYS - 1
            ))
            .await?;
        if cli.source == crate::Source::Wal {
            // A captured table the writers update, full before the slot
            // exists: the relays load it under attack.
            client
                .batch_execute(&format!(
                    "CREATE TABLE {name}_rows (id int PRIMARY KEY, n bigint NOT NULL);
                     INSERT INTO {name}_rows SELECT g, 0 FROM generate_series(1, {table_rows}) g;"
                ))
                .await?;
            // Before the writers emit: a message written before its slot
            // exists is in no slot.
            outbox_pg::wal::create_slot(&client, &wal_config(name)).await?;
        }
        let kafka = outbox_kafka::KafkaConfig {
            brokers: cli.kafka_brokers.clone(),
            topic_partitions: 4,
            idempotence: cli.kafka_idempotence,
            ..outbox_kafka::KafkaConfig::default()
        };
        outbox_kafka::ensure_topics(&kafka, &[name, &format!("{name}_rows")]).await?;
        let ch = sink_clickhouse::client_for(&sink_clickhouse::ClickHouseConfig {
            url: cli.clickhouse_url.clone(),
            ..sink_clickhouse::ClickHouseConfig::default()
        })?;
        Ok(Self {
            name: name.to_string(),
            pool,
            ch,
            outbox,
            ledger,
        })
    }

    /// The captured table's rows: id → n.
    pub(crate) async fn table_rows(&self) -> anyhow::Result<HashMap<i64, i64>> {
        Ok(self
            .pool
            .get()
            .await?
            .query(&format!("SELECT id::int8, n FROM {}_rows", self.name), &[])
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect())
    }

    /// Whether the slot's initial load was published whole.
    /// Transactions the server streamed to the run's slot while they ran
    /// (`pg_stat_replication_slots`, kept across server restarts).
    pub(crate) async fn streamed_in_progress(&self) -> anyhow::Result<i64> {
        let config = wal_config(&self.name);
        Ok(self
            .pool
            .get()
            .await?
            .query_one(
                "SELECT coalesce(max(stream_txns), 0) FROM pg_stat_replication_slots WHERE slot_name = $1",
                &[&config.slot],
            )
            .await?
            .get(0))
    }

    pub(crate) async fn load_published(&self) -> anyhow::Result<bool> {
        let config = wal_config(&self.name);
        Ok(self
            .pool
            .get()
            .await?
            .query_opt(
                &format!(
                    "SELECT loaded FROM {} WHERE slot = $1",
                    config.progress_table
                ),
                &[&config.slot],
            )
            .await?
            .is_some_and(|row| row.get::<_, bool>(0)))
    }

    async fn ids(&self, table: &str) -> anyhow::Result<HashSet<Uuid>> {
        Ok(self
            .pool
            .get()
            .await?
            .query(&format!("SELECT event_id FROM {table}"), &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }

    /// The events whose transaction committed.
    pub(crate) async fn committed(&self) -> anyhow::Result<HashSet<Uuid>> {
        self.ids(&self.ledger).await
    }

    /// The events still in the outbox (undelivered, not lost).
    pub(crate) async fn still_pending(&self) -> anyhow::Result<HashSet<Uuid>> {
        self.ids(&self.name).await
    }

    async fn pg_count(&self, table: &str) -> anyhow::Result<i64> {
        Ok(self
            .pool
            .get()
            .await?
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await?
            .get(0))
    }

    /// Rows of a ClickHouse table; 0 while it cannot be read (not created
    /// yet, or the server is restarting).
    async fn ch_count(&self, table: &str) -> u64 {
        self.ch
            .query(&format!("SELECT count() FROM `{table}`"))
            .fetch_one::<u64>()
            .await
            .unwrap_or(0)
    }

    /// Events in the outbox, and rows in ClickHouse.
    pub(crate) async fn progress(&self) -> anyhow::Result<(i64, u64)> {
        Ok((
            self.pg_count(&self.name).await?,
            self.ch_count(&self.name).await,
        ))
    }

    /// Every row in ClickHouse, by partition and offset.
    pub(crate) async fn landed(&self) -> anyhow::Result<Vec<Landed>> {
        let mut rows = self
            .ch
            .query(&format!(
                "SELECT event_id, payload, kafka_partition, kafka_offset FROM `{}`",
                self.name
            ))
            .fetch_all::<Landed>()
            .await?;
        rows.sort_by_key(|r| (r.kafka_partition, r.kafka_offset));
        Ok(rows)
    }

    /// Dead letters on both sides.
    pub(crate) async fn dead_letters(&self) -> anyhow::Result<i64> {
        let dead = format!("{}_dead", self.name);
        let in_pg = self.pg_count(&dead).await?;
        let in_ch = self.ch_count(&dead).await;
        Ok(in_pg + i64::try_from(in_ch).unwrap_or(i64::MAX))
    }

    /// Drops the WAL run's slot (its relays are stopped) and publication,
    /// kept or not: a slot left behind would pin the server's WAL forever.
    pub(crate) async fn drop_slot(&self) {
        drop_slot_in(&self.pool, &self.name).await;
    }

    /// Drops what the run wrote: its PostgreSQL and ClickHouse tables. Best
    /// effort: a failure is printed, the verdict stands.
    ///
    /// Its topic is left on the broker: tansu 0.6 deletes *every* topic on
    /// any DeleteTopics request, so deleting this one would make every other
    /// topic on the shared broker (the demo's `user_events` among them) start
    /// over at offset 0, which their consumers rightly refuse (an offset
    /// regression).
    pub(crate) async fn drop_tables(&self) {
        let name = &self.name;
        let pg = async {
            let client = self.pool.get().await?;
            client
                .batch_execute(&format!(
                    "DROP TABLE IF EXISTS {name}, {name}_dead, {name}_schema_version, {name}_ledger, {name}_ledger_seq, {name}_rows;
                     DELETE FROM outbox_wal_progress WHERE slot = '{name}';"
                ))
                .await?;

            anyhow::Ok(())
        };
        if let Err(err) = pg.await {
            println!("chaos: could not drop the PostgreSQL tables of {name}: {err:#}");
        }
        for table in [name.to_string(), format!("{name}_dead")] {
            if let Err(err) = self
                .ch
                .query(&format!("DROP TABLE IF EXISTS `{table}`"))
                .execute()
                .await
            {
                println!("chaos: could not drop the ClickHouse table {table}: {err}");
            }
        }
    }
}
