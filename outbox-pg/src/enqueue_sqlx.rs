//! Enqueue and emit for services on sqlx (cargo feature `sqlx`): the same
//! statements as [`Outbox::enqueue`] and [`Outbox::emit`], on the caller's
//! sqlx transaction.

use outbox_core::Event;

use crate::{Outbox, PgError};

impl Outbox {
    /// Writes `events` with one statement on `conn`, which should be inside a
    /// transaction the caller commits: pass `&mut *tx` for a
    /// `sqlx::Transaction<'_, sqlx::Postgres>`. Same SQL and same guarantees
    /// as [`Outbox::enqueue`]: the events become visible exactly when the
    /// caller's transaction commits, and idle relays are woken then.
    ///
    /// ```no_run
    /// # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// use outbox_core::Event;
    /// use outbox_pg::{Outbox, OutboxConfig};
    ///
    /// let outbox = Outbox::new(&OutboxConfig::default().validate()?);
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("INSERT INTO accounts (name) VALUES ($1)")
    ///     .bind("alice")
    ///     .execute(&mut *tx)
    ///     .await?;
    /// outbox
    ///     .enqueue_sqlx(&mut tx, &[Event::new("accounts", r#"{"name":"alice"}"#).with_key("alice")])
    ///     .await?;
    /// tx.commit().await?; // the row and its event, atomically
    /// # Ok(()) }
    /// ```
    pub async fn enqueue_sqlx(
        &self,
        conn: &mut sqlx::PgConnection,
        events: &[Event],
    ) -> Result<u64, PgError> {
        if events.is_empty() {
            return Ok(0);
        }
        let events = crate::enqueue::traced(events);
        let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.id).collect();
        let topics: Vec<&str> = events.iter().map(|e| e.topic.as_str()).collect();
        let keys: Vec<Option<&[u8]>> = events.iter().map(|e| e.key.as_deref()).collect();
        let payloads: Vec<&[u8]> = events.iter().map(|e| &e.payload[..]).collect();
        let headers: Vec<serde_json::Value> =
            events.iter().map(crate::enqueue::headers_json).collect();
        let created: Vec<time::OffsetDateTime> = events
            .iter()
            .map(|e| time::OffsetDateTime::from(e.created_at))
            .collect();
        let written = sqlx::query(&self.insert_sql)
            .bind(ids)
            .bind(topics)
            .bind(keys)
            .bind(payloads)
            .bind(headers)
            .bind(created)
            .execute(&mut *conn)
            .await
            .map_err(|e| sqlx_error("enqueue", e))?
            .rows_affected();
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.channel)
            .execute(&mut *conn)
            .await
            .map_err(|e| sqlx_error("enqueue (notify)", e))?;
        Ok(written)
    }
}

impl Outbox {
    /// [`Outbox::emit`] on a sqlx connection (pass `&mut *tx` for a
    /// `sqlx::Transaction<'_, sqlx::Postgres>`): the events go into the
    /// transaction's write-ahead log for the WAL source, with the same
    /// frames, prefix and order. Returns the number written.
    ///
    /// ```no_run
    /// # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// use outbox_core::Event;
    /// use outbox_pg::{Outbox, OutboxConfig};
    ///
    /// let outbox = Outbox::new(&OutboxConfig::default().validate()?);
    /// let mut tx = pool.begin().await?;
    /// outbox.emit_sqlx(&mut tx, &[Event::new("accounts", "{}").with_key("alice")]).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn emit_sqlx(
        &self,
        conn: &mut sqlx::PgConnection,
        events: &[Event],
    ) -> Result<u64, PgError> {
        if events.is_empty() {
            return Ok(0);
        }
        let frames = crate::enqueue::emit_frames(&crate::enqueue::traced(events))?;
        let written: i64 = sqlx::query_scalar(crate::enqueue::EMIT_SQL)
            .bind(&self.message_prefix)
            .bind(frames)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| sqlx_error("emit", e))?;
        Ok(u64::try_from(written).unwrap_or(0))
    }
}

/// Classified like the tokio-postgres path: by SQLSTATE class when the
/// server answered, retryable for I/O and pool failures.
fn sqlx_error(operation: &'static str, err: sqlx::Error) -> PgError {
    let (detail, retryable) = match &err {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let mut detail = format!("{} (SQLSTATE {code})", db.message());
            let state = tokio_postgres::error::SqlState::from_code(&code);
            if let Some(hint) = crate::error::hint_for(&state) {
                detail.push_str("; ");
                detail.push_str(hint);
            }
            (detail, crate::error::is_retryable_sqlstate(&state))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => (err.to_string(), true),
        other => (other.to_string(), false),
    };
    PgError::Driver {
        operation,
        detail,
        retryable,
    }
}
