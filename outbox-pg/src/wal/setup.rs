//! What the WAL source needs on the server, checked (and created where
//! allowed) before each session: `wal_level`, the publication, the slot and
//! the record of the last confirmed position.

use deadpool_postgres::GenericClient;
use pgwire_replication::Lsn;

use super::change::lsn_text;
use super::WalConfig;
use crate::{PgError, SqlName};

fn query(operation: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |e| PgError::query(operation, e)
}

fn permanent(detail: String) -> PgError {
    PgError::Replication {
        detail,
        retryable: false,
    }
}

fn parse_lsn(text: &str) -> Result<u64, PgError> {
    Lsn::parse(text)
        .map(Lsn::as_u64)
        .map_err(|e| permanent(format!("the server gave the position {text:?}: {e}")))
}

/// What a session does after [`prepare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prepared {
    /// Stream the existing slot from its confirmed position.
    Stream(u64),
    /// Create the slot with an exported snapshot, load the captured tables'
    /// rows in it, then stream from the slot's consistent point.
    CreateAndLoad,
}

/// The advisory lock a relay holds while it loads a slot's tables, so
/// another one does not take its half-loaded slot for abandoned.
pub(crate) fn load_lock(slot: &str) -> i64 {
    i64::from(crate::stable_hash(&format!("outbox-wal-load/{slot}")))
}

/// Checks the server and the slot, creating what is missing when allowed.
pub(crate) async fn prepare<C: GenericClient + Sync>(
    db: &C,
    config: &WalConfig,
) -> Result<Prepared, PgError> {
    let level: String = db
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(query("check wal_level"))?
        .get(0);
    if level != "logical" {
        return Err(permanent(format!(
            "the server runs with wal_level = {level}; the WAL source needs logical: \
             ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL"
        )));
    }
    let progress = SqlName::parse(&config.progress_table)?;
    let exists = db
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&progress.to_string()],
        )
        .await
        .map_err(query("look for the WAL progress table"))?
        .get::<_, bool>(0);
    if config.create && !exists {
        db.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {progress} (\n\
                 slot          text        PRIMARY KEY,\n\
                 confirmed_lsn pg_lsn      NOT NULL,\n\
                 created_at    timestamptz NOT NULL DEFAULT now(),\n\
                 updated_at    timestamptz NOT NULL DEFAULT now());\n\
             ALTER TABLE {progress} ADD COLUMN IF NOT EXISTS loaded boolean NOT NULL DEFAULT true;"
        ))
        .await
        .map_err(query("create the WAL progress table"))?;
    }
    publication(db, config).await?;
    let slot = db
        .query_opt(
            "SELECT confirmed_flush_lsn::text, wal_status, plugin FROM pg_replication_slots \
             WHERE slot_name = $1 AND database = current_database()",
            &[&config.slot],
        )
        .await
        .map_err(query("read the replication slot"))?;
    let progress_row = db
        .query_opt(
            &format!("SELECT confirmed_lsn::text, loaded FROM {progress} WHERE slot = $1"),
            &[&config.slot],
        )
        .await
        .map_err(query("read the WAL progress"))?;
    let loaded = progress_row.as_ref().map(|row| row.get::<_, bool>(1));
    let recorded: Option<String> = progress_row.map(|row| row.get(0));
    let recorded = recorded.as_deref().map(parse_lsn).transpose()?;
    if loaded == Some(false) {
        // A load that did not finish: its snapshot died with its session.
        // Unless its relay is still at it, start it over with a new slot
        // (rows that did not change get the same ids, and the sink skips them).
        let free: bool = db
            .query_one(
                "SELECT pg_try_advisory_lock($1)",
                &[&load_lock(&config.slot)],
            )
            .await
            .map_err(query("check the initial load"))?
            .get(0);
        if !free {
            return Err(PgError::Replication {
                detail: format!(
                    "another relay is loading the tables of slot {}",
                    config.slot
                ),
                retryable: true,
            });
        }
        let dropped = async {
            if slot.is_some() {
                db.execute("SELECT pg_drop_replication_slot($1)", &[&config.slot])
                    .await?;
            }
            db.execute(
                &format!("DELETE FROM {progress} WHERE slot = $1"),
                &[&config.slot],
            )
            .await
        }
        .await;
        let _ = db
            .execute("SELECT pg_advisory_unlock($1)", &[&load_lock(&config.slot)])
            .await;
        // A slot still held by a relay that lost its load lock, or dropped
        // meanwhile by another: try again later.
        dropped.map_err(|e| PgError::Replication {
            detail: format!(
                "starting an unfinished initial load over: {}",
                crate::describe(&e)
            ),
            retryable: true,
        })?;
        tracing::warn!(slot = %config.slot, "an initial load did not finish: loading again");
        return Ok(Prepared::CreateAndLoad);
    }
    let Some(slot) = slot else {
        if let Some(last) = recorded {
            return Err(permanent(format!(
                "the replication slot {} was dropped; this pipeline had confirmed up to {}. Changes committed \
                 after that and before a new slot would be created are not in the WAL stream any more. To go on \
                 anyway, accept that gap: DELETE FROM {progress} WHERE slot = '{}' (the relay then creates a new slot)",
                config.slot,
                lsn_text(last),
                config.slot
            )));
        }
        if !config.create {
            return Err(permanent(format!(
                "the replication slot {} does not exist: create it with \
                 SELECT pg_create_logical_replication_slot('{}', 'pgoutput'), or let the relay create it",
                config.slot, config.slot
            )));
        }
        if config.initial_load && !config.tables.is_empty() {
            return Ok(Prepared::CreateAndLoad);
        }
        let created: String = db
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&config.slot],
            )
            .await
            .map_err(query("create the replication slot"))?
            .get(0);
        record(db, &progress, &config.slot, &created, true).await?;
        tracing::info!(slot = %config.slot, at = %created, "created the replication slot");
        return parse_lsn(&created).map(Prepared::Stream);
    };
    let confirmed: Option<String> = slot.get(0);
    let status: Option<String> = slot.get(1);
    let plugin: Option<String> = slot.get(2);
    if plugin.as_deref() != Some("pgoutput") {
        return Err(permanent(format!(
            "the replication slot {} uses the plugin {:?}; the WAL source reads pgoutput: use another slot name",
            config.slot, plugin
        )));
    }
    if status.as_deref() == Some("lost") {
        return Err(permanent(format!(
            "the replication slot {} was invalidated (wal_status = lost: the server removed WAL it still \
             needed, see max_slot_wal_keep_size); changes after {} may be missing. Drop the slot, and \
             DELETE FROM {progress} WHERE slot = '{}' to accept the gap",
            config.slot,
            recorded.map(lsn_text).unwrap_or_else(|| "its last position".into()),
            config.slot
        )));
    }
    let confirmed = confirmed.ok_or_else(|| {
        permanent(format!(
            "the replication slot {} has no position",
            config.slot
        ))
    })?;
    let at = parse_lsn(&confirmed)?;
    match recorded {
        None => record(db, &progress, &config.slot, &confirmed, true).await?,
        Some(last) if at > last => {
            return Err(permanent(format!(
                "the replication slot {} is at {} but this pipeline confirmed only up to {}: the slot was \
                 created again, or advanced by something else, and changes in between may be missing from \
                 Kafka. To go on anyway, accept that gap: UPDATE {progress} SET confirmed_lsn = '{}' WHERE slot = '{}'",
                config.slot,
                confirmed,
                lsn_text(last),
                confirmed,
                config.slot
            )))
        }
        Some(_) => {}
    }
    Ok(Prepared::Stream(at))
}

/// Records a slot's first position; `loaded` false while its initial load runs.
pub(crate) async fn record<C: GenericClient + Sync>(
    db: &C,
    progress: &SqlName,
    slot: &str,
    lsn: &str,
    loaded: bool,
) -> Result<(), PgError> {
    db.execute(
        &format!(
            "INSERT INTO {progress} (slot, confirmed_lsn, loaded) VALUES ($1, $2::text::pg_lsn, $3) \
             ON CONFLICT (slot) DO NOTHING"
        ),
        &[&slot, &lsn, &loaded],
    )
    .await
    .map_err(query("record the WAL position"))?;
    Ok(())
}

/// The publication exists and names every captured table.
async fn publication<C: GenericClient + Sync>(db: &C, config: &WalConfig) -> Result<(), PgError> {
    let exists = db
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&config.publication],
        )
        .await
        .map_err(query("read the publication"))?
        .is_some();
    let published: Vec<String> = if exists {
        db.query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
            &[&config.publication],
        )
        .await
        .map_err(query("read the publication's tables"))?
        .iter()
        .map(|row| row.get(0))
        .collect()
    } else {
        Vec::new()
    };
    let mut missing = Vec::new();
    let wanted = config
        .tables
        .iter()
        .map(|t| t.qualified())
        .chain(config.outbox_tables.iter().map(|t| super::qualified(t)));
    for table in wanted {
        if !published.contains(&table) {
            missing.push(SqlName::parse(&table)?.to_string());
        }
    }
    if exists && missing.is_empty() {
        return Ok(());
    }
    if !config.create {
        return Err(permanent(format!(
            "the publication {} {}: {}",
            config.publication,
            if exists {
                "lacks tables"
            } else {
                "does not exist"
            },
            if exists {
                format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    config.publication,
                    missing.join(", ")
                )
            } else if missing.is_empty() {
                format!("CREATE PUBLICATION {}", config.publication)
            } else {
                format!(
                    "CREATE PUBLICATION {} FOR TABLE {}",
                    config.publication,
                    missing.join(", ")
                )
            }
        )));
    }
    let sql = if exists {
        format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            config.publication,
            missing.join(", ")
        )
    } else if missing.is_empty() {
        format!("CREATE PUBLICATION {}", config.publication)
    } else {
        format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            config.publication,
            missing.join(", ")
        )
    };
    db.batch_execute(&sql)
        .await
        .map_err(query("create the publication"))?;
    tracing::info!(publication = %config.publication, tables = ?missing, "publication ready");
    Ok(())
}

/// Creates what a WAL source needs (the publication, the progress table
/// and the slot) without streaming, and returns the slot's position: for a
/// deployment step such as a migration, so that the slot exists before any
/// service writes with `Outbox::emit`. A logical decoding message written
/// before its slot exists is in no slot, and no relay can ever publish it.
///
/// A slot whose tables get an initial load is created by the relay instead,
/// which exports the load's snapshot with it: with tables and
/// [`WalConfig::initial_load`] this is a configuration error.
pub async fn create_slot<C: GenericClient + Sync>(
    db: &C,
    config: &WalConfig,
) -> Result<String, PgError> {
    config.validate()?;
    if config.initial_load && !config.tables.is_empty() {
        return Err(PgError::Config(
            "a slot whose tables get an initial load is created by the relay, with the load's snapshot: \
             start the relay first, or set initial_load to false"
                .into(),
        ));
    }
    let config = WalConfig {
        create: true,
        ..config.clone()
    };
    match prepare(db, &config).await? {
        Prepared::Stream(at) => Ok(lsn_text(at)),
        Prepared::CreateAndLoad => Err(PgError::Replication {
            detail: format!(
                "the initial load of slot {} did not finish: start a relay to load again",
                config.slot
            ),
            retryable: false,
        }),
    }
}

/// A logical replication slot of the database, as `outbox status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotStatus {
    /// The slot's name.
    pub slot: String,
    /// The backend streaming it, if one does.
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost` (`max_slot_wal_keep_size`).
    pub wal_status: Option<String>,
    /// The position the server has as confirmed.
    pub confirmed: Option<String>,
    /// Bytes of WAL the server keeps for the slot.
    pub retained_bytes: Option<f64>,
    /// Bytes of WAL written since its confirmed position.
    pub unconfirmed_bytes: Option<f64>,
    /// The position the pipeline recorded (`progress_table`), if any.
    pub recorded: Option<String>,
    /// Whether its initial load is done, if recorded.
    pub loaded: Option<bool>,
}

/// The pgoutput slots of the current database, with what `progress_table`
/// records of them (when the table exists).
pub async fn slot_status<C: GenericClient + Sync>(
    db: &C,
    progress_table: &str,
) -> Result<Vec<SlotStatus>, PgError> {
    let progress = SqlName::parse(progress_table)?;
    let exists = db
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&progress.to_string()],
        )
        .await
        .map_err(query("look for the WAL progress table"))?
        .get::<_, bool>(0);
    let (recorded, join) = if exists {
        (
            "p.confirmed_lsn::text, p.loaded",
            format!("LEFT JOIN {progress} p ON p.slot = s.slot_name"),
        )
    } else {
        ("NULL::text, NULL::boolean", String::new())
    };
    let rows = db
        .query(
            &format!(
                "SELECT s.slot_name::text, s.active_pid, s.wal_status, s.confirmed_flush_lsn::text, \
                        pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::float8, \
                        pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::float8, {recorded} \
                 FROM pg_replication_slots s {join} \
                 WHERE s.plugin = 'pgoutput' AND s.database = current_database() ORDER BY 1"
            ),
            &[],
        )
        .await
        .map_err(query("read the replication slots"))?;
    Ok(rows
        .iter()
        .map(|row| SlotStatus {
            slot: row.get(0),
            active_pid: row.get(1),
            wal_status: row.get(2),
            confirmed: row.get(3),
            retained_bytes: row.get(4),
            unconfirmed_bytes: row.get(5),
            recorded: row.get(6),
            loaded: row.get(7),
        })
        .collect())
}
