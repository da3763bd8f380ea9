//! Errors of the Postgres adapter and their classification.

use outbox_core::Stage;
use tokio_postgres::error::SqlState;

/// An error of the Postgres outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// A table or column name from configuration is not a safe identifier.
    #[error("invalid identifier {value:?}: {reason}")]
    InvalidIdentifier {
        /// The rejected text.
        value: String,
        /// Why.
        reason: String,
    },
    /// Configuration that cannot work.
    #[error("invalid postgres configuration: {0}")]
    Config(String),
    /// No connection could be had from the pool.
    #[error("postgres at {target}: cannot connect: {detail}")]
    Connect {
        /// host:port/database.
        target: String,
        /// What went wrong, with a hint.
        detail: String,
        /// Whether waiting can help.
        retryable: bool,
    },
    /// A statement failed.
    #[error("postgres {operation} failed: {detail}")]
    Query {
        /// What was being done.
        operation: &'static str,
        /// What went wrong.
        detail: String,
        /// The driver's error, for inspection. Not the `source()`: the
        /// message above already carries its text, and driver errors repeat
        /// their own causes, so a chain through it would say things twice.
        cause: tokio_postgres::Error,
    },
    /// A statement failed on a connection of another driver (sqlx, see
    /// `Outbox::enqueue_sqlx`).
    #[error("postgres {operation} failed: {detail}")]
    Driver {
        /// What was being done.
        operation: &'static str,
        /// What went wrong, with the server's message and SQLSTATE when there is one.
        detail: String,
        /// Whether waiting can help.
        retryable: bool,
    },
    /// A value given to [`crate::Outbox::enqueue_json`] cannot be serialised.
    #[error("event for topic {topic:?} cannot be serialised as JSON: {reason}")]
    Serialize {
        /// The event's topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// An acknowledgement did not find all the claimed rows it was given
    /// where the claim had read them, though the claim holds their locks:
    /// something else changed the outbox table. The claim is rolled back,
    /// so its events stay pending and are published again.
    #[error(
        "postgres {operation}: found {found} of the {expected} claimed rows; the claim is rolled back \
         and its events will be published again (is something else updating or moving outbox rows?)"
    )]
    RowsMoved {
        /// What was being done.
        operation: &'static str,
        /// Rows the statement changed.
        found: u64,
        /// Rows it was given.
        expected: usize,
    },
    /// A statement got no answer within its client-side limit (the server
    /// or the network path to it stopped answering); the session is dropped.
    #[error(
        "postgres {operation}: no answer within {after:?}; the session is given up \
         (is the server reachable and responsive?)"
    )]
    TimedOut {
        /// What was being done.
        operation: &'static str,
        /// The limit.
        after: std::time::Duration,
    },
    /// The replication connection of the WAL source failed, or the server,
    /// slot or publication is not what it needs (the detail says which, and
    /// what to do).
    #[error("postgres replication: {detail}")]
    Replication {
        /// What went wrong, with the fix where one is known.
        detail: String,
        /// Whether waiting can help.
        retryable: bool,
    },
    /// An event read from the outbox cannot be decoded.
    #[error("outbox row {seq} is malformed: {reason}")]
    MalformedRow {
        /// The row's sequence number.
        seq: i64,
        /// Why.
        reason: String,
    },
}

impl PgError {
    pub(crate) fn query(operation: &'static str, source: tokio_postgres::Error) -> Self {
        PgError::Query {
            operation,
            detail: describe(&source),
            cause: source,
        }
    }

    /// Whether waiting and retrying can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            PgError::InvalidIdentifier { .. }
            | PgError::Config(_)
            | PgError::Serialize { .. }
            | PgError::MalformedRow { .. } => false,
            PgError::Connect { retryable, .. }
            | PgError::Driver { retryable, .. }
            | PgError::Replication { retryable, .. } => *retryable,
            PgError::RowsMoved { .. } | PgError::TimedOut { .. } => true,
            PgError::Query { cause, .. } => is_retryable_pg(cause),
        }
    }
}

impl From<PgError> for outbox_core::Error {
    fn from(err: PgError) -> Self {
        if err.is_retryable() {
            outbox_core::Error::retryable(Stage::Source, err)
        } else {
            outbox_core::Error::permanent(Stage::Source, err)
        }
    }
}

/// Whether a driver error can heal by itself: lost connections, server
/// restarts, overload, serialization conflicts and timeouts.
pub fn is_retryable_pg(err: &tokio_postgres::Error) -> bool {
    let Some(code) = err.code() else {
        // No SQLSTATE: I/O error, closed connection, timeout.
        return true;
    };
    is_retryable_sqlstate(code)
}

/// Whether a server error of this SQLSTATE can heal by itself.
pub(crate) fn is_retryable_sqlstate(code: &SqlState) -> bool {
    if *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
        || *code == SqlState::LOCK_NOT_AVAILABLE
        || *code == SqlState::QUERY_CANCELED
    {
        return true;
    }
    // 08 connection, 40 rollback (serialization, deadlock), 53 resources,
    // 57 operator intervention (shutdown), 58 system error.
    matches!(&code.code()[..2], "08" | "40" | "53" | "57" | "58")
}

/// One line describing a driver error, with the server's message and code when there is one.
pub fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(hint) = hint_for(db.code()) {
            text.push_str("; ");
            text.push_str(hint);
        }
        return text;
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        // TLS errors repeat their cause in their own message.
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

pub(crate) fn hint_for(code: &SqlState) -> Option<&'static str> {
    Some(match code.code() {
        "28P01" | "28000" => "check the postgres user and password",
        "3D000" => "the database does not exist: create it or fix the database name",
        "42P01" => {
            "the table does not exist: run the outbox migration (init.sql or outbox_pg::migrate)"
        }
        "42703" => "a configured column does not exist in the table",
        "42501" => "the postgres user lacks a privilege on the outbox tables",
        "53300" => {
            "postgres has no free connection slots: lower the pool size or raise max_connections"
        }
        _ => return None,
    })
}
