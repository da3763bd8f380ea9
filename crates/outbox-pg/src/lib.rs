#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod claim;
mod config;
mod connect;
mod enqueue;
mod error;
mod flag;
mod ident;
mod leases;
mod notify;
mod schema;
mod source;

pub use claim::PgClaim;
pub use config::{FlagTableConfig, OutboxConfig};
pub use connect::{check_connection, connection, PgConfig};
pub use enqueue::Outbox;
pub use error::{describe, is_retryable_pg, PgError};
pub use flag::{flag_row_event_id, FlagTableSource, FLAG_ROW_NAMESPACE};
pub use ident::{SqlIdent, SqlName};
pub use leases::{PartitionLeaseConfig, PartitionLeases};
pub use schema::{migrate, schema_sql};
pub use source::PgOutboxSource;

/// Re-exported so users name the same pool type as this crate.
pub use deadpool_postgres;
