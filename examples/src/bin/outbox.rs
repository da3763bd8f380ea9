//! `outbox`: the operator's command. Creates and upgrades the schema, shows
//! what is pending, who works it and what was dead-lettered, and puts dead
//! letters back on the normal path.
//!
//! ```text
//! outbox migrate [--print]
//! outbox status
//! outbox dead-letter list  [--side postgres|clickhouse] [--limit N]
//! outbox dead-letter show  ID                 (postgres: row id; clickhouse: topic:partition:offset)
//! outbox dead-letter replay ID... | --all
//! outbox dead-letter purge  ID... | --all
//! ```

use std::process::ExitCode;

use examples::{init_tracing, AdminCli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli: AdminCli = examples::parse_cli();
    init_tracing(&cli.log);
    examples::exit_with(examples::admin::run(cli).await)
}
