#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod admin;
mod claim;
mod config;
mod connect;
mod enqueue;
#[cfg(feature = "sqlx")]
mod enqueue_sqlx;
mod error;
mod flag;
mod ident;
mod leases;
mod message;
mod notify;
mod schema;
mod source;
mod tls;
#[cfg(feature = "wal")]
pub mod wal;

pub use admin::{Backlog, BacklogProbe, DeadLetter, LaneOwner, LaneStatus, OutboxAdmin, Selection};
pub use claim::PgClaim;
pub use config::{FlagTableConfig, OutboxConfig, ValidFlagTableConfig, ValidOutboxConfig};
pub use connect::{check_connection, connection, PgConfig};
pub use enqueue::Outbox;
pub use error::{describe, is_retryable_pg, PgError};
pub use flag::{
    flag_notify_installed, flag_notify_sql, flag_row_event_id, install_flag_notify,
    FlagTableSource, FLAG_ROW_NAMESPACE,
};
pub use ident::{SqlIdent, SqlName};
pub use leases::{PartitionLeaseConfig, PartitionLeases};
pub use message::{decode_message, encode_message, MessageError, DEFAULT_MESSAGE_PREFIX};
pub use schema::{migrate, schema_sql, schema_version, SCHEMA_VERSION};
pub use source::PgOutboxSource;
pub use tls::SslMode;

/// A stable 32-bit hash (FNV-1a) of `text`: advisory-lock namespaces must be
/// the same in every process and every release, which std's hasher is not.
pub(crate) fn stable_hash(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5, |hash: u32, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// Re-exported so users name the same pool type as this crate.
pub use deadpool_postgres;
