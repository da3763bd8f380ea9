//! Shared wiring of the example binaries: command-line options (each also
//! read from an environment variable and from an optional TOML file) of the
//! services (`args`), of the relay (`relay_args`) and of the consumer
//! (`consumer_args`); the runtime (logging, signals, task tracking, start-up
//! checks, exit codes); the `/metrics` endpoint (`ops`), the trace export
//! (`otel`), the operator's
//! command (`admin`) and the demo's ClickHouse row.

/// The code of the repository's README, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

pub mod admin;
mod args;
mod config_file;
mod consumer_args;
mod demo;
mod ops;
mod otel;
pub mod progress;
mod relay_args;
pub mod routes;
mod runtime;

pub use admin::AdminCli;
pub use args::{secret, ClickHouseArgs, GroupArgs, KafkaArgs, OutboxTableArgs, PgArgs};
pub use config_file::{
    parse_cli, parse_cli_with_sections, try_parse_from, try_parse_with_sections,
};
pub use consumer_args::{AssignmentArg, ConsumerArgs, RowFormat};
pub use demo::{UserLoginMapper, UserLoginRow};
pub use ops::{Ops, OpsArgs};
pub use otel::{OtelArgs, Tracing};
pub use relay_args::{FlagTableArgs, RelayArgs, SourceKind, WalArgs};
pub use runtime::{
    check_config, exit_with, finish, init_tracing, millis, render_error, retry_startup,
    shutdown_on_signals, spawn_background, spawn_critical, LogArgs, Retryable,
    EXIT_DRAIN_TIMED_OUT,
};
