//! The table-driven encoder (`TableRows`) against the typed mapper of the
//! demo (`UserLoginMapper`), on the same records into the same table shape
//! on the real ClickHouse, through the sink in this process: rows/s, and
//! this process's CPU per 1,000 rows (the mapping, the encoding and the
//! HTTP client; ClickHouse's own work is the same for both).

use std::collections::BTreeMap;

use bytes::Bytes;
use examples::UserLoginMapper;
use outbox_core::{Position, Record, Sink, HEADER_EVENT_ID};
use sink_clickhouse::{ClickHouseConfig, ClickHouseSink, Mapping, TableRows, TableRowsConfig};
use uuid::Uuid;

use crate::Env;

/// Rows/s and CPU per 1,000 rows of one mapping, best of its rounds.
#[derive(Debug, Clone, Copy)]
pub struct Encoded {
    pub rows_per_s: f64,
    pub cpu_s_per_1k: f64,
}

/// The figures of both mappings, measured in alternating rounds so that
/// neither gets the warmer machine.
pub async fn compare(env: &Env, rows: usize) -> anyhow::Result<(Encoded, Encoded)> {
    let records = records(rows);
    let columns = sink_clickhouse::RowMapper::columns_ddl(&UserLoginMapper);
    let (mut typed, mut table) = (Vec::new(), Vec::new());
    for round in 0..3 {
        typed.push(
            run(
                env,
                &format!("enc_typed_{round}"),
                UserLoginMapper,
                &records,
            )
            .await?,
        );
        let rows = TableRows::new(TableRowsConfig {
            create_columns: Some(columns.clone()),
            ..TableRowsConfig::default()
        });
        table.push(run(env, &format!("enc_table_{round}"), rows, &records).await?);
    }
    Ok((best(&typed), best(&table)))
}

fn best(runs: &[Encoded]) -> Encoded {
    runs.iter()
        .copied()
        .max_by(|a, b| a.rows_per_s.total_cmp(&b.rows_per_s))
        .unwrap_or(Encoded {
            rows_per_s: f64::NAN,
            cpu_s_per_1k: f64::NAN,
        })
}

/// The demo's payloads, as the flag-table relay publishes them.
fn records(rows: usize) -> Vec<Record> {
    (0..rows)
        .map(|i| Record {
            topic: "bench_encoder".into(),
            position: Position {
                partition: 0,
                offset: i as i64,
            },
            key: Some(Bytes::from(format!("user{}", i % 100))),
            payload: Some(Bytes::from(format!(
                r#"{{"id":{i},"username":"user{}","event_type":"login","event_time":"2026-12-05T10:{:02}:{:02}Z"}}"#,
                i % 100,
                (i / 60) % 60,
                i % 60
            ))),
            headers: BTreeMap::from([(HEADER_EVENT_ID.to_string(), Uuid::now_v7().to_string())]),
            timestamp_ms: Some(1_764_928_800_000),
        })
        .collect()
}

async fn run<M: Mapping>(
    env: &Env,
    what: &str,
    mapping: M,
    records: &[Record],
) -> anyhow::Result<Encoded> {
    let config = ClickHouseConfig {
        table: env.name(what),
        dead_letter_table: env.name(&format!("{what}_dead")),
        ..(*env.ch).clone()
    }
    .validate()?;
    let mut sink = ClickHouseSink::new(config.clone(), mapping).await?;
    // The consumer's default batch size.
    let batch = outbox_core::ConsumeConfig::default().batch_size;
    let cpu = test_support::cpu::own_seconds();
    let started = std::time::Instant::now();
    for chunk in records.chunks(batch) {
        let report = sink.write(chunk).await?;
        anyhow::ensure!(
            report.written == chunk.len(),
            "{what}: wrote {} of {} rows ({:?})",
            report.written,
            chunk.len(),
            report.dead_lettered.first()
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = test_support::cpu::own_seconds() - cpu;
    if !env.keep {
        for table in [&config.table, &config.dead_letter_table] {
            sink.client()
                .query(&format!("DROP TABLE IF EXISTS `{table}`"))
                .execute()
                .await?;
        }
    }
    Ok(Encoded {
        rows_per_s: records.len() as f64 / seconds,
        cpu_s_per_1k: crate::cpu::per_1k(cpu, records.len()),
    })
}
