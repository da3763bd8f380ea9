//! The pipeline under attack: three relays and two leased consumers, each
//! with paths of its own to the services, so one process at a time can be
//! cut off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::procs::{kafka_port, Proc, ServicePath, CONSUMER_GID, RELAY_GID};
use crate::{Cli, Tally, CLAIM_TIMEOUT_SECS, LEASE_TIMEOUT_MS};

/// The processes and the environment they start with.
pub(crate) struct Fleet {
    pub(crate) relays: Vec<Proc>,
    pub(crate) consumers: Vec<Proc>,
    pub(crate) env: Vec<(String, String)>,
}

/// The environment every process starts with.
fn environment(cli: &Cli) -> Vec<(String, String)> {
    [
        ("OUTBOX_PG_HOST", cli.pg_host.clone()),
        ("OUTBOX_PG_PORT", cli.pg_port.to_string()),
        ("OUTBOX_KAFKA_BROKERS", cli.kafka_brokers.clone()),
        ("OUTBOX_CLICKHOUSE_URL", cli.clickhouse_url.clone()),
        // A binary restarted while a service is down waits for it instead of
        // exiting at its start-up check.
        ("OUTBOX_STARTUP_TIMEOUT_SECS", "300".to_string()),
        (
            "OUTBOX_KAFKA_IDEMPOTENCE",
            cli.kafka_idempotence.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The relay's program and arguments for run `name`.
fn relay_command(cli: &Cli, bin_dir: &Path, name: &str) -> (PathBuf, Vec<String>) {
    if cli.unsafe_relay {
        let args = ["--outbox-table", name, "--batch-size", "200"];
        return (
            bin_dir.join("unsafe_relay"),
            args.map(String::from).to_vec(),
        );
    }
    if cli.source == crate::Source::Wal {
        // One slot: one relay streams it, the others wait to take over.
        // As `stores::wal_config`.
        let table = format!("public.{name}_rows={name}_rows");
        let args = [
            "--source",
            "wal",
            "--wal-slot",
            name,
            "--wal-publication",
            name,
            "--wal-message-prefix",
            name,
            "--wal-table",
            &table,
            "--outbox-table",
            name,
            "--dead-letter-table",
            &format!("{name}_dead"),
            "--kafka-message-timeout-ms",
            &(CLAIM_TIMEOUT_SECS * 1000 * 4 / 5).to_string(),
            "--batch-size",
            "200",
            // The writers' large transactions are streamed while they run,
            // and spill past 64 KiB in the relay.
            "--wal-decoding-work-mem-kb",
            "64",
            "--wal-in-progress-memory",
            "65536",
        ];
        return (
            bin_dir.join("producer_pg_to_kafka"),
            args.map(String::from).to_vec(),
        );
    }
    let args = [
        "--source",
        "outbox",
        "--outbox-table",
        name,
        "--dead-letter-table",
        &format!("{name}_dead"),
        "--claim-timeout-secs",
        &CLAIM_TIMEOUT_SECS.to_string(),
        // Below the claim timeout: a stalled relay's publish ends before
        // another relay may take its events (see GUARANTEES.md).
        "--kafka-message-timeout-ms",
        &(CLAIM_TIMEOUT_SECS * 1000 * 4 / 5).to_string(),
        "--batch-size",
        "200",
    ];
    (
        bin_dir.join("producer_pg_to_kafka"),
        args.map(String::from).to_vec(),
    )
}

/// The consumer's arguments for run `name`.
fn consumer_args(cli: &Cli, name: &str) -> Vec<String> {
    [
        "--topic",
        name,
        "--clickhouse-table",
        name,
        "--clickhouse-dead-letter-table",
        &format!("{name}_dead"),
        "--group-id",
        name,
        "--format",
        "raw",
        "--assignment",
        "leased",
        "--lease-timeout-ms",
        &LEASE_TIMEOUT_MS.to_string(),
        "--batch-size",
        "500",
        "--dedup-window",
        &cli.dedup_window.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

impl Fleet {
    /// Builds the processes of run `name` (not started), logging to `logs`.
    ///
    /// PostgreSQL and ClickHouse are reached through a proxy of each
    /// process's own. Kafka is reached directly (a client reconnects to the
    /// broker's advertised address, so a proxy would not sit on its data
    /// path): each process runs with a group id of its own, by which the
    /// packet filter cuts it.
    pub(crate) async fn build(
        cli: &Cli,
        name: &str,
        bin_dir: &Path,
        logs: &Path,
    ) -> anyhow::Result<Self> {
        let (relay_program, relay_args) = relay_command(cli, bin_dir, name);
        let consumer_program = bin_dir.join("consumer_to_clickhouse");
        for program in [&relay_program, &consumer_program] {
            if !program.exists() {
                bail!(
                    "{} is not built: run `cargo build -p examples -p chaos --bins` first",
                    program.display()
                );
            }
        }
        let filter = Arc::new(
            netfault::PacketFilter::install("OUTBOX_CHAOS", kafka_port(&cli.kafka_brokers)?)
                .context("the harness cuts Kafka paths in the packet filter")?,
        );
        let pg_upstream = format!("{}:{}", cli.pg_host, cli.pg_port);
        let ch_upstream = cli
            .clickhouse_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let proc = |label: String, program: &PathBuf, args: &[String], paths, gid| Proc {
            log: logs.join(format!("{label}.log")),
            label,
            program: program.clone(),
            args: args.to_vec(),
            child: None,
            stopped: false,
            restart_at: None,
            paths,
            gid,
        };
        let mut relays = Vec::new();
        for i in 0..3 {
            let paths = vec![
                ServicePath::to("postgres", &pg_upstream).await?,
                ServicePath::kafka(&filter, RELAY_GID + i)?,
            ];
            let label = format!("relay{i}");
            // Two of the three relays keep their claims open for a window
            // (off by default): both claim paths, and their mix on shared
            // lanes, stay under attack.
            let mut args = relay_args.clone();
            if i > 0 && !cli.unsafe_relay {
                args.extend(["--claim-window-ms".to_string(), "200".to_string()]);
            }
            relays.push(proc(label, &relay_program, &args, paths, RELAY_GID + i));
        }
        let consumer_args = consumer_args(cli, name);
        let mut consumers = Vec::new();
        for i in 0..2 {
            let paths = vec![
                ServicePath::to("postgres", &pg_upstream).await?,
                ServicePath::to("clickhouse", &ch_upstream).await?,
                ServicePath::kafka(&filter, CONSUMER_GID + i)?,
            ];
            let label = format!("consumer{i}");
            let gid = CONSUMER_GID + i;
            consumers.push(proc(label, &consumer_program, &consumer_args, paths, gid));
        }
        Ok(Self {
            relays,
            consumers,
            env: environment(cli),
        })
    }

    fn all(&mut self) -> impl Iterator<Item = &mut Proc> {
        self.relays.iter_mut().chain(self.consumers.iter_mut())
    }

    /// Starts every process.
    pub(crate) fn start(&mut self) -> anyhow::Result<()> {
        let env = self.env.clone();
        self.all().try_for_each(|proc| proc.start(&env))
    }

    /// Ends the attack: every path heals, every process runs again.
    pub(crate) fn heal(&mut self) -> anyhow::Result<()> {
        let env = self.env.clone();
        for proc in self.all() {
            for path in &mut proc.paths {
                path.set(netfault::Fault::Pass)?;
                path.heal_at = None;
            }
            if proc.stopped {
                proc.signal("-CONT");
                proc.stopped = false;
            }
            if !proc.running() {
                proc.start(&env)?;
            }
        }
        Ok(())
    }

    /// Starts again what exited on its own (a supervisor's job), counting it.
    pub(crate) fn restart_exited(&mut self, tally: &mut Tally) -> anyhow::Result<()> {
        let env = self.env.clone();
        for proc in self.all() {
            if proc.exited() {
                tally.unexpected_exits += 1;
                proc.start(&env)?;
            }
        }
        Ok(())
    }

    /// Asks every process to stop, then kills what is left.
    pub(crate) async fn stop(&mut self) {
        for proc in self.all() {
            proc.signal("-TERM");
        }
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        for proc in self.all() {
            proc.kill();
        }
    }
}
