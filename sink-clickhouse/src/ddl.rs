//! The sink's tables: their DDL on one server or on a cluster, and their
//! creation.

use crate::client::client_for;
use crate::mapper::{Mapping, META_COLUMNS_DDL};
use crate::{ClickHouseConfig, ClickHouseSink, SinkError};

impl<M: Mapping> ClickHouseSink<M> {
    /// The DDL of the data table: the whole table on one server; with
    /// [`ClickHouseConfig::cluster`], the shards' local table (see
    /// [`ClickHouseSink::ddl`] for every statement). `None` when the
    /// mapping has no columns to create it with (a [`crate::TableRows`]
    /// without [`crate::TableRowsConfig::create_columns`]): the table must exist.
    pub fn table_ddl(&self) -> Option<String> {
        let columns = format!("{}, {META_COLUMNS_DDL}", self.mapper.columns_ddl()?);
        // A state table's deleted rows are the engine's to drop under FINAL
        // where it can (`is_deleted`, ClickHouse 23.2 and later).
        let version = match self.mapper.replacing_columns() {
            Some((version, deleted)) if self.facts.version >= (23, 2) => {
                format!("{version}, {deleted}")
            }
            Some((version, _)) => version.to_string(),
            None => String::new(),
        };
        Some(self.local_ddl(
            &self.config.table,
            &columns,
            "Replacing",
            &version,
            &self.mapper.order_by(),
        ))
    }

    /// The DDL of the dead-letter table (its shards' local table with a cluster).
    pub fn dead_letter_ddl(&self) -> String {
        self.local_ddl(
            &self.config.dead_letter_table,
            "topic String, kafka_partition Int32, kafka_offset Int64, event_id String, \
             key String, payload String, reason String, failed_at DateTime",
            "",
            "",
            "(topic, kafka_partition, kafka_offset)",
        )
    }

    /// Every statement that creates the sink's tables, in order: the
    /// database, then for each table the table itself or, with a cluster,
    /// its local table and the `Distributed` table over it (sharded by
    /// `kafka_partition`, so that a partition's rows, and the lookups that
    /// keep exactly-once, stay on one shard).
    pub fn ddl(&self) -> Vec<String> {
        let on_cluster = self.on_cluster();
        let mut statements = vec![format!(
            "CREATE DATABASE IF NOT EXISTS `{}`{on_cluster}",
            self.config.database
        )];
        let tables = [
            (&self.config.table, self.table_ddl()),
            (&self.config.dead_letter_table, Some(self.dead_letter_ddl())),
        ];
        for (table, local) in tables {
            let Some(local) = local else { continue };
            statements.push(local);
            if let Some(cluster) = &self.config.cluster {
                let db = &self.config.database;
                let suffix = &cluster.local_suffix;
                statements.push(format!(
                    "CREATE TABLE IF NOT EXISTS `{db}`.`{table}`{on_cluster} AS `{db}`.`{table}{suffix}` \
                     ENGINE = Distributed(`{name}`, `{db}`, `{table}{suffix}`, kafka_partition)",
                    name = cluster.name
                ));
            }
        }
        statements
    }

    pub(crate) fn on_cluster(&self) -> String {
        match &self.config.cluster {
            Some(cluster) if cluster.on_cluster => format!(" ON CLUSTER `{}`", cluster.name),
            _ => String::new(),
        }
    }

    /// `CREATE TABLE` of a table of the sink (or of its shards' local table),
    /// on a `{variant}MergeTree` engine, replicated if so configured.
    fn local_ddl(
        &self,
        table: &str,
        columns: &str,
        variant: &str,
        version: &str,
        order_by: &str,
    ) -> String {
        let version = if version.is_empty() {
            String::new()
        } else {
            format!(", {version}")
        };
        let db = &self.config.database;
        let on_cluster = self.on_cluster();
        let (name, engine) = match &self.config.cluster {
            None => (
                table.to_string(),
                format!("{variant}MergeTree({})", version.trim_start_matches(", ")),
            ),
            Some(cluster) => {
                let local = format!("{table}{}", cluster.local_suffix);
                let engine = if cluster.replicated {
                    // The {shard} and {replica} macros come from each server's config.
                    format!(
                        "Replicated{variant}MergeTree('/clickhouse/tables/{{shard}}/{db}/{local}', '{{replica}}'{version})"
                    )
                } else {
                    format!("{variant}MergeTree({})", version.trim_start_matches(", "))
                };
                (local, engine)
            }
        };
        format!(
            "CREATE TABLE IF NOT EXISTS `{db}`.`{name}`{on_cluster} ({columns}) ENGINE = {engine} ORDER BY {order_by}"
        )
    }

    pub(crate) async fn create_tables(&self) -> Result<(), SinkError> {
        // The configured database may not exist yet.
        let root = client_for(&ClickHouseConfig {
            database: "default".into(),
            ..(*self.config).clone()
        })?;
        for ddl in self.ddl() {
            root.query(&ddl)
                .execute()
                .await
                .map_err(|e| SinkError::request(&self.config.url, "create tables", e))?;
        }
        Ok(())
    }

    pub(crate) fn table_ref(&self) -> String {
        format!("`{}`.`{}`", self.config.database, self.config.table)
    }

    pub(crate) fn dead_letter_ref(&self) -> String {
        format!(
            "`{}`.`{}`",
            self.config.database, self.config.dead_letter_table
        )
    }
}

#[cfg(test)]
mod ddl_tests {
    use super::*;
    use crate::client::ServerFacts;
    use crate::{ClusterConfig, RawEventMapper};
    use std::collections::HashMap;

    fn sink(cluster: Option<ClusterConfig>) -> Result<ClickHouseSink<RawEventMapper>, SinkError> {
        let config = ClickHouseConfig {
            database: "db".into(),
            table: "events".into(),
            cluster,
            ..ClickHouseConfig::default()
        }
        .validate()?;
        Ok(ClickHouseSink {
            client: client_for(&config)?,
            config,
            mapper: RawEventMapper,
            partitions: HashMap::new(),
            facts: ServerFacts::default(),
            parts_read_at: None,
        })
    }

    #[test]
    fn one_server_gets_plain_tables() -> Result<(), SinkError> {
        let ddl = sink(None)?.ddl();
        assert_eq!(ddl.len(), 3, "{ddl:#?}");
        assert_eq!(ddl[0], "CREATE DATABASE IF NOT EXISTS `db`");
        assert!(ddl[1].starts_with("CREATE TABLE IF NOT EXISTS `db`.`events` ("));
        assert!(ddl[1].contains("ENGINE = ReplacingMergeTree() ORDER BY"));
        assert!(ddl[2].contains("`db`.`outbox_dead_letter`"));
        Ok(())
    }

    #[test]
    fn a_replicated_cluster_gets_local_replicated_and_distributed_tables_on_cluster(
    ) -> Result<(), SinkError> {
        let ddl = sink(Some(ClusterConfig::new("c1")))?.ddl();
        assert_eq!(ddl.len(), 5, "{ddl:#?}");
        assert_eq!(ddl[0], "CREATE DATABASE IF NOT EXISTS `db` ON CLUSTER `c1`");
        assert!(
            ddl[1].starts_with("CREATE TABLE IF NOT EXISTS `db`.`events_local` ON CLUSTER `c1` (")
        );
        assert!(ddl[1].contains(
            "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/db/events_local', '{replica}')"
        ));
        assert_eq!(
            ddl[2],
            "CREATE TABLE IF NOT EXISTS `db`.`events` ON CLUSTER `c1` AS `db`.`events_local` \
             ENGINE = Distributed(`c1`, `db`, `events_local`, kafka_partition)"
        );
        assert!(ddl[3].contains(
            "ReplicatedMergeTree('/clickhouse/tables/{shard}/db/outbox_dead_letter_local', '{replica}')"
        ));
        assert!(
            ddl[4].contains("Distributed(`c1`, `db`, `outbox_dead_letter_local`, kafka_partition)")
        );
        Ok(())
    }

    #[test]
    fn a_state_table_drops_its_deleted_rows_itself_where_the_server_can() -> Result<(), SinkError> {
        let state = |version| -> Result<Option<String>, SinkError> {
            let mut sink = crate::compat_sink(
                ClickHouseConfig::default().validate()?,
                crate::TableRows::new(crate::TableRowsConfig {
                    changes: crate::Changes::State,
                    order_by: Some("id".into()),
                    create_columns: Some("id Int64".into()),
                    ..crate::TableRowsConfig::default()
                }),
            )?;
            sink.facts.version = version;
            Ok(sink.table_ddl())
        };
        let old = state((18, 16))?.unwrap_or_default();
        assert!(
            old.contains("ENGINE = ReplacingMergeTree(_version) ORDER BY id"),
            "{old}"
        );
        assert!(old.contains("_version UInt64, _deleted UInt8"), "{old}");
        let current = state((23, 2))?.unwrap_or_default();
        assert!(
            current.contains("ReplacingMergeTree(_version, _deleted) ORDER BY id"),
            "{current}"
        );
        Ok(())
    }

    #[test]
    fn hostile_cluster_names_are_refused() {
        for name in ["c1`; DROP TABLE x", "bad-name", ""] {
            let config = ClickHouseConfig {
                cluster: Some(ClusterConfig::new(name)),
                ..ClickHouseConfig::default()
            };
            assert!(config.validate().is_err(), "{name:?}");
        }
        let config = ClickHouseConfig {
            cluster: Some(ClusterConfig {
                local_suffix: "_l; --".into(),
                ..ClusterConfig::new("c")
            }),
            ..ClickHouseConfig::default()
        };
        assert!(config.validate().is_err());
    }
}
