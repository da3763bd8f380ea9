//! The config file parser: any bytes in the file give options or a clear
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// Every option group the binaries share.
#[derive(Debug, clap::Parser)]
struct Cli {
    #[command(flatten)]
    log: examples::LogArgs,
    #[command(flatten)]
    pg: examples::PgArgs,
    #[command(flatten)]
    kafka: examples::KafkaArgs,
    #[command(flatten)]
    clickhouse: examples::ClickHouseArgs,
    #[command(flatten)]
    group: examples::GroupArgs,
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
}

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("outbox-fuzz-config-{}.toml", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let parsed =
        examples::try_parse_from::<Cli, _, _>(["fuzz", "--config", &path.to_string_lossy()]);
    if let Ok(cli) = parsed {
        let _ = cli.clickhouse.config();
        let _ = cli.kafka.config("fuzz");
    }
});
