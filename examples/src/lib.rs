//! Shared wiring of the example binaries: command-line options (each also
//! read from an environment variable and from an optional TOML file),
//! logging, signals, start-up checks, the `/metrics` endpoint and the demo's
//! ClickHouse row.

/// The code of the repository's README, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

mod args;
mod config_file;
mod demo;
mod ops;
mod runtime;

pub use args::{secret, ClickHouseArgs, GroupArgs, KafkaArgs, OutboxTableArgs, PgArgs};
pub use config_file::{parse_cli, try_parse_from};
pub use demo::{UserLoginMapper, UserLoginRow};
pub use ops::{Ops, OpsArgs};
pub use runtime::{
    exit_with, finish, init_tracing, millis, render_error, retry_startup, shutdown_on_signals,
    spawn_background, spawn_critical, LogArgs, Retryable, EXIT_DRAIN_TIMED_OUT,
};
