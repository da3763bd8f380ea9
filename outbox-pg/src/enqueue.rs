//! Writing events into the outbox inside the caller's transaction.

use std::time::SystemTime;

use deadpool_postgres::GenericClient;
use outbox_core::Event;
use uuid::Uuid;

use crate::{PgError, ValidOutboxConfig};

/// A handle on one outbox table, for services that enqueue events.
///
/// [`Outbox::enqueue`] writes on the connection it is given, so the events
/// become visible exactly when the caller's transaction commits, together
/// with the business rows, and vanish if it rolls back.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use outbox_core::Event;
/// use outbox_pg::{Outbox, OutboxConfig, PgConfig};
///
/// let pool = PgConfig::default().create_pool()?;
/// let outbox = Outbox::new(&OutboxConfig::default().validate()?);
///
/// let mut client = pool.get().await?;
/// let tx = client.transaction().await?;
/// tx.execute("INSERT INTO accounts (name) VALUES ($1)", &[&"alice"]).await?;
/// outbox
///     .enqueue(&tx, &[Event::new("accounts", r#"{"name":"alice"}"#).with_key("alice")])
///     .await?;
/// tx.commit().await?; // the row and its event, atomically
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Outbox {
    pub(crate) insert_sql: String,
    pub(crate) delete_sql: String,
    pub(crate) channel: String,
    pub(crate) message_prefix: String,
}

/// Writes each frame of $2 as a transactional logical decoding message
/// under the prefix $1. A function scan returns the array in order and the
/// aggregate consumes it in that order: the messages enter the WAL as given.
pub(crate) const EMIT_SQL: &str =
    "SELECT count(pg_logical_emit_message(true, $1, frame)) FROM unnest($2::bytea[]) AS frame";

/// The frames of [`Outbox::emit`]'s messages.
pub(crate) fn emit_frames(events: &[Event]) -> Result<Vec<Vec<u8>>, PgError> {
    events
        .iter()
        .map(crate::message::encode_message)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PgError::Serialize {
            topic: events.first().map(|e| e.topic.clone()).unwrap_or_default(),
            reason: e.to_string(),
        })
}

/// The event of `enqueue_json` and `emit_json`.
fn json_event<T: serde::Serialize + ?Sized>(
    topic: &str,
    key: Option<&str>,
    value: &T,
    headers: &[(&str, &str)],
) -> Result<Event, PgError> {
    let mut event = Event::json(topic, value).map_err(|e| PgError::Serialize {
        topic: topic.to_string(),
        reason: e.to_string(),
    })?;
    if let Some(key) = key {
        event = event.with_key(key.to_string());
    }
    for (name, value) in headers {
        event = event.with_header(*name, *value);
    }
    Ok(event)
}

/// `events` with the caller's trace context in their headers (feature
/// `otel`; see `outbox_core::otel`), else unchanged.
pub(crate) fn traced(events: &[Event]) -> std::borrow::Cow<'_, [Event]> {
    #[cfg(feature = "otel")]
    return outbox_core::otel::with_current_trace(events);
    #[cfg(not(feature = "otel"))]
    std::borrow::Cow::Borrowed(events)
}

/// An event's headers as the JSON object stored in the `headers` column.
pub(crate) fn headers_json(event: &Event) -> serde_json::Value {
    serde_json::Value::Object(
        event
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

impl Outbox {
    /// A handle on the outbox table named in `config`.
    pub fn new(config: &ValidOutboxConfig) -> Self {
        let table = config.table();
        Self {
            message_prefix: crate::DEFAULT_MESSAGE_PREFIX.to_string(),
            delete_sql: format!("DELETE FROM {table} WHERE event_id = ANY($1)"),
            channel: crate::notify::channel_for(table),
            insert_sql: format!(
                "INSERT INTO {table} (event_id, topic, key, payload, headers, created_at) \
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bytea[], $5::jsonb[], $6::timestamptz[])"
            ),
        }
    }

    /// Writes [`Outbox::emit`]'s messages under `prefix` instead of
    /// [`DEFAULT_MESSAGE_PREFIX`](crate::DEFAULT_MESSAGE_PREFIX); the WAL
    /// source must read the same prefix.
    pub fn with_message_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.message_prefix = prefix.into();
        self
    }

    /// Writes `events` into the write-ahead log of the caller's transaction
    /// (`pg_logical_emit_message`, transactional), for the WAL source to
    /// publish: the table-free outbox. Like [`Outbox::enqueue`] the events
    /// exist exactly when the transaction commits, but nothing is stored,
    /// so there is nothing to delete or vacuum. Each event keeps its id and
    /// the order given. Returns the number of events written.
    ///
    /// ```no_run
    /// # async fn example(pool: outbox_pg::deadpool_postgres::Pool) -> Result<(), Box<dyn std::error::Error>> {
    /// use outbox_core::Event;
    ///
    /// let outbox = outbox_pg::Outbox::new(&outbox_pg::OutboxConfig::default().validate()?);
    /// let mut client = pool.get().await?;
    /// let tx = client.transaction().await?;
    /// tx.execute("INSERT INTO accounts (name) VALUES ($1)", &[&"alice"]).await?;
    /// outbox.emit(&tx, &[Event::new("accounts", r#"{"name":"alice"}"#).with_key("alice")]).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn emit<C>(&self, client: &C, events: &[Event]) -> Result<u64, PgError>
    where
        C: GenericClient + Sync,
    {
        if events.is_empty() {
            return Ok(0);
        }
        let frames = emit_frames(&traced(events))?;
        let statement = client
            .prepare_cached(EMIT_SQL)
            .await
            .map_err(|e| PgError::query("emit (prepare)", e))?;
        let row = client
            .query_one(&statement, &[&self.message_prefix, &frames])
            .await
            .map_err(|e| PgError::query("emit", e))?;
        let written: i64 = row.get(0);
        Ok(u64::try_from(written).unwrap_or(0))
    }

    /// Writes `events` into the outbox table and deletes them again, both
    /// in the caller's transaction: for an outbox table that relays read
    /// from the WAL (`WalConfig::outbox_tables`), where the insert is the
    /// event and the row has no further use. The table stays empty (the
    /// pattern Debezium's outbox router recommends); a relay claiming the
    /// table never sees these events. Returns the number written.
    pub async fn enqueue_and_delete<C>(&self, client: &C, events: &[Event]) -> Result<u64, PgError>
    where
        C: GenericClient + Sync,
    {
        if events.is_empty() {
            return Ok(0);
        }
        let written = self.insert(client, events).await?;
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let delete = client
            .prepare_cached(&self.delete_sql)
            .await
            .map_err(|e| PgError::query("enqueue and delete (prepare)", e))?;
        client
            .execute(&delete, &[&ids])
            .await
            .map_err(|e| PgError::query("enqueue and delete", e))?;
        Ok(written)
    }

    /// Writes one event whose payload is `value` as JSON, with `key` and
    /// `headers`, on `client` (inside the caller's transaction, like
    /// [`Outbox::enqueue`]). Returns the event's id.
    ///
    /// ```no_run
    /// # async fn example(outbox: outbox_pg::Outbox, pool: outbox_pg::deadpool_postgres::Pool) -> Result<(), Box<dyn std::error::Error>> {
    /// #[derive(serde::Serialize)]
    /// struct AccountOpened { name: String }
    ///
    /// let mut client = pool.get().await?;
    /// let tx = client.transaction().await?;
    /// tx.execute("INSERT INTO accounts (name) VALUES ($1)", &[&"alice"]).await?;
    /// let id = outbox
    ///     .enqueue_json(&tx, "accounts", Some("alice"), &AccountOpened { name: "alice".into() }, &[("source", "signup")])
    ///     .await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn enqueue_json<C, T>(
        &self,
        client: &C,
        topic: &str,
        key: Option<&str>,
        value: &T,
        headers: &[(&str, &str)],
    ) -> Result<Uuid, PgError>
    where
        C: GenericClient + Sync,
        T: serde::Serialize + ?Sized,
    {
        let event = json_event(topic, key, value, headers)?;
        self.enqueue(client, std::slice::from_ref(&event)).await?;
        Ok(event.id)
    }

    /// [`Outbox::enqueue_json`] for the table-free outbox: one event whose
    /// payload is `value` as JSON, written with [`Outbox::emit`] into the
    /// caller's transaction. Returns the event's id.
    ///
    /// ```no_run
    /// # async fn example(outbox: outbox_pg::Outbox, pool: outbox_pg::deadpool_postgres::Pool) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut client = pool.get().await?;
    /// let tx = client.transaction().await?;
    /// let id = outbox
    ///     .emit_json(&tx, "accounts", Some("alice"), &serde_json::json!({"name": "alice"}), &[])
    ///     .await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn emit_json<C, T>(
        &self,
        client: &C,
        topic: &str,
        key: Option<&str>,
        value: &T,
        headers: &[(&str, &str)],
    ) -> Result<Uuid, PgError>
    where
        C: GenericClient + Sync,
        T: serde::Serialize + ?Sized,
    {
        let event = json_event(topic, key, value, headers)?;
        self.emit(client, std::slice::from_ref(&event)).await?;
        Ok(event.id)
    }

    /// Writes `events` with one statement on `client`, which should be inside
    /// a transaction the caller commits (a `tokio_postgres::Transaction`, a
    /// deadpool `Transaction`, or a client on which the caller ran `BEGIN`).
    ///
    /// Returns the number of rows written. An event id that is already in the
    /// outbox fails the statement (and so the caller's transaction).
    pub async fn enqueue<C>(&self, client: &C, events: &[Event]) -> Result<u64, PgError>
    where
        C: GenericClient + Sync,
    {
        if events.is_empty() {
            return Ok(0);
        }
        let written = self.insert(client, events).await?;
        // Delivered by Postgres when (and only if) the caller commits: wakes
        // idle relays at once instead of at their next poll.
        let notify = client
            .prepare_cached("SELECT pg_notify($1, '')")
            .await
            .map_err(|e| PgError::query("enqueue (notify)", e))?;
        client
            .execute(&notify, &[&self.channel])
            .await
            .map_err(|e| PgError::query("enqueue (notify)", e))?;
        Ok(written)
    }

    /// The insert of [`Outbox::enqueue`], alone.
    async fn insert<C>(&self, client: &C, events: &[Event]) -> Result<u64, PgError>
    where
        C: GenericClient + Sync,
    {
        let events = traced(events);
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let topics: Vec<&str> = events.iter().map(|e| e.topic.as_str()).collect();
        let keys: Vec<Option<&[u8]>> = events.iter().map(|e| e.key.as_deref()).collect();
        let payloads: Vec<&[u8]> = events.iter().map(|e| &e.payload[..]).collect();
        let headers: Vec<serde_json::Value> = events.iter().map(headers_json).collect();
        let created: Vec<SystemTime> = events.iter().map(|e| e.created_at).collect();
        let statement = client
            .prepare_cached(&self.insert_sql)
            .await
            .map_err(|e| PgError::query("enqueue (prepare)", e))?;
        let written = client
            .execute(
                &statement,
                &[&ids, &topics, &keys, &payloads, &headers, &created],
            )
            .await
            .map_err(|e| PgError::query("enqueue", e))?;
        Ok(written)
    }
}
