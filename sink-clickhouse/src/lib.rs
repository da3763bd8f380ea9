#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod error;
mod mapper;
mod sink;

pub use config::{validate_identifier, ClickHouseConfig, ClusterConfig};
pub use error::{server_code, SinkError};
pub use mapper::{RawEventMapper, RawEventRow, RowMapper, RowMeta, META_COLUMNS_DDL};
pub use sink::{
    check_connection, client_for, ClickHouseDeadLetters, ClickHouseSink, DeadLetterRow,
};

/// Re-exported so users derive rows with the same client version.
pub use clickhouse;
