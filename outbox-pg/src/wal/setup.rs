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

/// Checks the server and the slot; returns the position to stream from
/// (the slot's confirmed position).
pub(crate) async fn prepare<C: GenericClient + Sync>(
    db: &C,
    config: &WalConfig,
) -> Result<u64, PgError> {
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
    if config.create {
        db.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {progress} (\n\
                 slot          text        PRIMARY KEY,\n\
                 confirmed_lsn pg_lsn      NOT NULL,\n\
                 created_at    timestamptz NOT NULL DEFAULT now(),\n\
                 updated_at    timestamptz NOT NULL DEFAULT now())"
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
    let recorded: Option<String> = db
        .query_opt(
            &format!("SELECT confirmed_lsn::text FROM {progress} WHERE slot = $1"),
            &[&config.slot],
        )
        .await
        .map_err(query("read the WAL progress"))?
        .map(|row| row.get(0));
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
        record(db, &progress, &config.slot, &created).await?;
        tracing::info!(slot = %config.slot, at = %created, "created the replication slot");
        return parse_lsn(&created);
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
        None => record(db, &progress, &config.slot, &confirmed).await?,
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
    Ok(at)
}

async fn record<C: GenericClient + Sync>(
    db: &C,
    progress: &SqlName,
    slot: &str,
    lsn: &str,
) -> Result<(), PgError> {
    db.execute(
        &format!(
            "INSERT INTO {progress} (slot, confirmed_lsn) VALUES ($1, $2::text::pg_lsn) ON CONFLICT (slot) DO NOTHING"
        ),
        &[&slot, &lsn],
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
    for table in &config.tables {
        if !published.contains(&table.qualified()) {
            missing.push(SqlName::parse(&table.qualified())?.to_string());
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
