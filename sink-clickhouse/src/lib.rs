#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod client;
#[doc(hidden)]
pub mod compat;
mod config;
mod ddl;
mod dead_letters;
mod error;
mod exactly_once;
mod mapper;
mod sink;
mod table;

pub use client::{check_connection, client_for};
#[cfg(test)]
pub(crate) use compat::unconnected as compat_sink;
pub use config::{validate_identifier, ClickHouseConfig, ClusterConfig, ValidClickHouseConfig};
pub use dead_letters::{
    BadPosition, ClickHouseDeadLetters, DeadLetterPosition, DeadLetterSelection, ReplayReport,
};
pub use error::{server_code, SinkError};
pub use mapper::{
    Mapped, Mapping, RawEventMapper, RawEventRow, RowMapper, RowMeta, META_COLUMNS_DDL,
};
pub use sink::{ClickHouseSink, DeadLetterRow};
pub use table::{Changes, MissingField, TableBatch, TableRows, TableRowsConfig, UnknownField};

/// Re-exported so users derive rows with the same client version.
pub use clickhouse;
