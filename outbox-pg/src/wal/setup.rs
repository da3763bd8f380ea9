//! What the WAL source needs on the server, checked (and created where
//! allowed) before each session: `wal_level`, the publication, the slot and
//! the record of the last confirmed position.

use deadpool_postgres::GenericClient;

use super::backfill::LoadState;
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
    super::client::parse_lsn(text)
        .ok_or_else(|| permanent(format!("the server gave the position {text:?}, not X/Y")))
}

/// What a session does after [`prepare`]: stream the slot from its
/// confirmed position `at`, and load the captured tables beside the stream
/// when `load` says how far an unfinished load got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Prepared {
    pub at: u64,
    pub load: Option<LoadState>,
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
    let (_, current) = progress_columns(db, &progress).await?;
    if config.create && !current {
        db.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {progress} (\n\
                 slot          text        PRIMARY KEY,\n\
                 confirmed_lsn pg_lsn      NOT NULL,\n\
                 created_at    timestamptz NOT NULL DEFAULT now(),\n\
                 updated_at    timestamptz NOT NULL DEFAULT now());\n\
             ALTER TABLE {progress} ADD COLUMN IF NOT EXISTS loaded boolean NOT NULL DEFAULT true;\n\
             ALTER TABLE {progress} ADD COLUMN IF NOT EXISTS load_state jsonb;"
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
            &format!(
                "SELECT confirmed_lsn::text, loaded, load_state::text FROM {progress} WHERE slot = $1"
            ),
            &[&config.slot],
        )
        .await
        .map_err(query("read the WAL progress"))?;
    // An unfinished initial load goes on where its last published chunk
    // ended (an unreadable state: from the start; the sink skips rows it
    // has).
    let load = match &progress_row {
        Some(row) if !row.get::<_, bool>(1) => Some(
            row.get::<_, Option<String>>(2)
                .and_then(|text| serde_json::from_str::<LoadState>(&text).ok())
                .unwrap_or_default(),
        ),
        _ => None,
    };
    let recorded: Option<String> = progress_row.map(|row| row.get(0));
    let recorded = recorded.as_deref().map(parse_lsn).transpose()?;
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
        let created: String = db
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&config.slot],
            )
            .await
            .map_err(query("create the replication slot"))?
            .get(0);
        let load = config.initial_load && !config.tables.is_empty();
        record(db, &progress, &config.slot, &created, !load).await?;
        tracing::info!(slot = %config.slot, at = %created, initial_load = load, "created the replication slot");
        return Ok(Prepared {
            at: parse_lsn(&created)?,
            load: load.then(LoadState::default),
        });
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
    Ok(Prepared { at, load })
}

/// Whether the progress table exists, and whether it has this version's
/// columns (`load_state`, added after `loaded`).
async fn progress_columns<C: GenericClient + Sync>(
    db: &C,
    progress: &SqlName,
) -> Result<(bool, bool), PgError> {
    db.query_one(
        "SELECT to_regclass($1) IS NOT NULL, EXISTS (SELECT 1 FROM pg_attribute \
         WHERE attrelid = to_regclass($1) AND attname = 'load_state' AND NOT attisdropped)",
        &[&progress.to_string()],
    )
    .await
    .map(|row| (row.get::<_, bool>(0), row.get::<_, bool>(1)))
    .map_err(query("look for the WAL progress table"))
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
/// With tables and [`WalConfig::initial_load`], the first relay that
/// streams the slot loads them.
pub async fn create_slot<C: GenericClient + Sync>(
    db: &C,
    config: &WalConfig,
) -> Result<String, PgError> {
    config.validate()?;
    let config = WalConfig {
        create: true,
        ..config.clone()
    };
    prepare(db, &config).await.map(|p| lsn_text(p.at))
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
    /// How far an unfinished initial load got (`public.t after ["1200"]`),
    /// once a chunk of it was published.
    pub load_position: Option<String>,
}

impl LoadState {
    /// `public.t after ["1200"]`: where the load goes on.
    fn describe(&self) -> String {
        let done = match self.done.len() {
            0 => String::new(),
            n => format!(" ({n} table(s) done)"),
        };
        match (&self.table, &self.after) {
            (Some(table), Some(after)) => format!(
                "{table} after {}{done}",
                serde_json::to_string(after).unwrap_or_default()
            ),
            (Some(table), None) => format!("{table} from its start{done}"),
            _ => format!("the next table{done}"),
        }
    }
}

/// The pgoutput slots of the current database, with what `progress_table`
/// records of them (when the table exists).
pub async fn slot_status<C: GenericClient + Sync>(
    db: &C,
    progress_table: &str,
) -> Result<Vec<SlotStatus>, PgError> {
    let progress = SqlName::parse(progress_table)?;
    // A table of a version before the resumable load has no load_state
    // until a relay starts on it.
    let (exists, with_state) = progress_columns(db, &progress).await?;
    let (recorded, join) = if exists {
        (
            if with_state {
                "p.confirmed_lsn::text, p.loaded, p.load_state::text"
            } else {
                "p.confirmed_lsn::text, p.loaded, NULL::text"
            },
            format!("LEFT JOIN {progress} p ON p.slot = s.slot_name"),
        )
    } else {
        ("NULL::text, NULL::boolean, NULL::text", String::new())
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
            load_position: row
                .get::<_, Option<String>>(8)
                .filter(|_| row.get::<_, Option<bool>>(7) == Some(false))
                .and_then(|text| serde_json::from_str::<LoadState>(&text).ok())
                .map(|state| state.describe()),
        })
        .collect())
}
