//! The outbox schema and its migration.

use deadpool_postgres::GenericClient;

use crate::{PgError, ValidOutboxConfig};

/// The SQL that creates the outbox and dead-letter tables named in `config`.
///
/// Every statement is idempotent (`IF NOT EXISTS`). `init.sql` at the root of
/// the repository holds the same SQL for the default names.
///
/// ```
/// let sql = outbox_pg::schema_sql(&outbox_pg::OutboxConfig::default().validate()?);
/// assert!(sql.contains(r#"CREATE TABLE IF NOT EXISTS "outbox""#));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn schema_sql(config: &ValidOutboxConfig) -> String {
    let table = config.table();
    let dead = config.dead_letter_table();
    let names = &config.derived;
    let version_table = &names.version_table;
    let lane_expr = format!(
        "((hashtextextended(encode(coalesce(key, uuid_send(event_id)), 'hex'), 0) % {lanes}) + {lanes}) % {lanes}",
        lanes = config.lanes
    );
    format!(
        r#"-- Pending events. A row lives from the service's commit until the broker
-- acknowledged it; the relay then deletes it in its claim transaction.
CREATE TABLE IF NOT EXISTS {table} (
    seq        bigserial   PRIMARY KEY,
    event_id   uuid        NOT NULL,
    topic      text        NOT NULL,
    key        bytea,
    payload    bytea       NOT NULL,
    headers    jsonb       NOT NULL DEFAULT '{{}}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts   integer     NOT NULL DEFAULT 0,
    last_error text,
    -- The lane of the key (of the event id when there is no key): one claim
    -- at a time works a lane, which keeps the order of each key.
    lane       integer     GENERATED ALWAYS AS ({lane_expr}) STORED,
    CONSTRAINT "{event_id_key_name}" UNIQUE (event_id)
);
-- Upgrade of tables created before lanes existed.
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS lane integer GENERATED ALWAYS AS ({lane_expr}) STORED;
CREATE INDEX IF NOT EXISTS "{lane_idx_name}" ON {table} (lane, seq);
-- A queue table: every row is deleted soon after its insert. Vacuum it after
-- every 10,000 dead rows instead of after 20% of the table, so claims do not
-- step over a growing heap of deleted rows under sustained load.
ALTER TABLE {table} SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 10000);

-- Events the broker can never take (too large, invalid), kept with the reason.
CREATE TABLE IF NOT EXISTS {dead} (
    id               bigserial   PRIMARY KEY,
    event_id         uuid        NOT NULL,
    topic            text        NOT NULL,
    key              bytea,
    payload          bytea       NOT NULL,
    headers          jsonb       NOT NULL DEFAULT '{{}}'::jsonb,
    created_at       timestamptz NOT NULL,
    attempts         integer     NOT NULL,
    reason           text        NOT NULL,
    origin           text        NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS "{dead_event_idx_name}" ON {dead} (event_id);

-- Which version of this schema the tables are at (one row); a binary
-- refuses to migrate tables of a newer version than it knows.
CREATE TABLE IF NOT EXISTS {version_table} (
    version    integer     NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO {version_table} (version)
    SELECT {SCHEMA_VERSION} WHERE NOT EXISTS (SELECT 1 FROM {version_table} WHERE version >= {SCHEMA_VERSION});
"#,
        event_id_key_name = names.event_id_key.name(),
        dead_event_idx_name = names.dead_letter_event_index.name(),
        lane_idx_name = names.lane_index.name(),
    )
}

/// Version of the schema [`schema_sql`] creates: 1 was the outbox without
/// lanes, 2 added lanes and this version record.
pub const SCHEMA_VERSION: i32 = 2;

/// The newest schema version recorded for the tables of `config`; `None`
/// when they were never migrated (or predate version records).
pub async fn schema_version<C: GenericClient + Sync>(
    client: &C,
    config: &ValidOutboxConfig,
) -> Result<Option<i32>, PgError> {
    let table = &config.derived.version_table;
    let exists = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.to_string()])
        .await
        .map_err(|e| PgError::query("schema version", e))?
        .try_get::<_, bool>(0)
        .map_err(|e| PgError::query("schema version", e))?;
    if !exists {
        return Ok(None);
    }
    client
        .query_one(&format!("SELECT max(version) FROM {table}"), &[])
        .await
        .map_err(|e| PgError::query("schema version", e))?
        .try_get(0)
        .map_err(|e| PgError::query("schema version", e))
}

/// Advisory lock key taken while migrating (arbitrary, fixed).
const MIGRATION_LOCK_KEY: i64 = 7_243_019_812;

/// Creates the outbox tables if they do not exist and upgrades older ones.
/// Safe to run at every start and from several processes at once.
pub async fn migrate<C: GenericClient + Sync>(
    client: &C,
    config: &ValidOutboxConfig,
) -> Result<(), PgError> {
    let sql = schema_sql(config);
    if let Some(found) = schema_version(client, config).await? {
        if found > SCHEMA_VERSION {
            return Err(PgError::Config(format!(
                "the outbox tables are at schema version {found}, newer than this build knows ({SCHEMA_VERSION}); upgrade the binary"
            )));
        }
    }
    // Concurrent CREATE ... IF NOT EXISTS can still race on the catalog, so
    // migrations are serialised by an advisory lock. Statements sent in one
    // simple query run as one transaction, so the transaction-scoped lock is
    // released at its end even if a statement fails.
    let wrapped = format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY});\n{sql}");
    client
        .batch_execute(&wrapped)
        .await
        .map_err(|e| PgError::query("migration", e))
}
