//! The operator's command `outbox`: creates and upgrades the schema, shows
//! what is pending, who works it and what was dead-lettered, and puts dead
//! letters back on the normal path (see `src/bin/outbox.rs` for its synopsis).

use std::time::{Duration, SystemTime};

use crate::{
    retry_startup, ClickHouseArgs, GroupArgs, KafkaArgs, LogArgs, OutboxTableArgs, PgArgs,
};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use outbox_pg::{BacklogProbe, OutboxAdmin, Selection, ValidOutboxConfig};
use sink_clickhouse::{ClickHouseDeadLetters, DeadLetterPosition, DeadLetterSelection};

/// Operate an outbox: schema, status, dead letters.
#[derive(Debug, Parser)]
#[command(name = "outbox", version)]
pub struct AdminCli {
    #[command(flatten)]
    pub pg: PgArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub tables: OutboxTableArgs,
    /// The flag table whose unsent rows `status` shows (when it exists).
    #[command(flatten)]
    pub flag: crate::FlagTableArgs,
    /// The consumer group whose lag `status` shows.
    #[command(flatten)]
    pub group: GroupArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// What `outbox` does.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the outbox tables (idempotent, versioned).
    Migrate {
        /// Print the SQL instead of running it (for a DBA to apply).
        #[arg(long)]
        print: bool,
    },
    /// Pending events, their age, lanes and who holds them, dead letters,
    /// consumer lag.
    Status,
    /// Dead letters of the relay (Postgres) or of the sink (ClickHouse).
    #[command(subcommand)]
    DeadLetter(DeadLetterCommand),
    /// Create the WAL source's slot, publication and progress record now,
    /// before any service writes with `Outbox::emit` (a message written
    /// before its slot exists is in no slot). Idempotent.
    CreateWalSlot {
        #[command(flatten)]
        wal: crate::relay_args::WalArgs,
    },
}

/// What `outbox dead-letter` does.
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// The oldest dead letters.
    List {
        #[command(flatten)]
        side: SideArg,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One dead letter in full.
    Show {
        #[command(flatten)]
        side: SideArg,
        /// Postgres: the row id; ClickHouse: `topic:partition:offset`.
        id: String,
    },
    /// Send dead letters through the normal path again: Postgres ones back
    /// into the outbox (relays publish them), ClickHouse ones back onto their
    /// Kafka topic (the consumer writes them). Fix the cause first.
    Replay {
        #[command(flatten)]
        side: SideArg,
        #[command(flatten)]
        selection: SelectionArgs,
    },
    /// Delete dead letters for good.
    Purge {
        #[command(flatten)]
        side: SideArg,
        #[command(flatten)]
        selection: SelectionArgs,
    },
}

/// Which dead letters.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Side {
    /// Events the broker refused (`outbox_dead_letter` in Postgres).
    Postgres,
    /// Records the sink could not write (dead-letter table in ClickHouse).
    Clickhouse,
}

/// `--side`.
#[derive(Debug, Args)]
pub struct SideArg {
    /// Which dead-letter table.
    #[arg(long, value_enum, default_value = "postgres")]
    pub side: Side,
}

/// Which dead letters: ids, or `--all`.
#[derive(Debug, Args)]
pub struct SelectionArgs {
    /// Ids (Postgres row ids, or ClickHouse `topic:partition:offset`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub ids: Vec<String>,
    /// Every dead letter of the table.
    #[arg(long)]
    pub all: bool,
}

/// Runs the command `cli` names, printing its report.
pub async fn run(cli: AdminCli) -> anyhow::Result<()> {
    let outbox_config = cli
        .tables
        .config()
        .validate()
        .context("invalid outbox configuration")?;
    match &cli.command {
        Command::Migrate { print: true } => {
            print!("{}", outbox_pg::schema_sql(&outbox_config));
            Ok(())
        }
        Command::Migrate { print: false } => migrate(&cli, &outbox_config).await,
        Command::Status => status(&cli, &outbox_config).await,
        Command::CreateWalSlot { wal } => create_wal_slot(&cli, wal).await,
        Command::DeadLetter(command) => match side_of(command) {
            Side::Postgres => pg_dead_letters(&cli, &outbox_config, command).await,
            Side::Clickhouse => clickhouse_dead_letters(&cli, command).await,
        },
    }
}

fn side_of(command: &DeadLetterCommand) -> Side {
    match command {
        DeadLetterCommand::List { side, .. }
        | DeadLetterCommand::Show { side, .. }
        | DeadLetterCommand::Replay { side, .. }
        | DeadLetterCommand::Purge { side, .. } => side.side,
    }
}

async fn pg_client(cli: &AdminCli) -> anyhow::Result<outbox_pg::deadpool_postgres::Object> {
    let pg = cli.pg.config("outbox admin")?;
    let target = pg.target();
    let pool = pg.create_pool()?;
    let startup = Duration::from_secs(cli.log.startup_timeout_secs);
    retry_startup("postgres", startup, || {
        outbox_pg::check_connection(&pool, &target)
    })
    .await?;
    Ok(outbox_pg::connection(&pool, &target).await?)
}

async fn create_wal_slot(cli: &AdminCli, wal: &crate::relay_args::WalArgs) -> anyhow::Result<()> {
    let client = pg_client(cli).await?;
    // The relay's default capture, the flag table (its topic does not
    // matter to the slot).
    let default = outbox_pg::wal::CaptureTable::new(cli.flag.table.clone())
        .with_key_columns(&[cli.flag.key_column.as_str()]);
    let config = wal.config(default, true)?;
    let at = outbox_pg::wal::create_slot(&client, &config).await?;
    println!("slot {} is at {at}", config.slot);
    Ok(())
}

async fn migrate(cli: &AdminCli, config: &ValidOutboxConfig) -> anyhow::Result<()> {
    let client = pg_client(cli).await?;
    let before = outbox_pg::schema_version(&client, config).await?;
    eprintln!(
        "migrating {} (schema version {} → {})…",
        config.table,
        before.map_or_else(|| "none".to_string(), |v| v.to_string()),
        outbox_pg::SCHEMA_VERSION
    );
    let spinner = crate::progress::spinner(&format!("migrating {}", config.table));
    let migrated = outbox_pg::migrate(&client, config).await;
    spinner.finish_and_clear();
    migrated?;
    let after = outbox_pg::schema_version(&client, config).await?;
    println!(
        "{} is at schema version {}",
        config.table,
        after.unwrap_or_default()
    );
    Ok(())
}

async fn status(cli: &AdminCli, config: &ValidOutboxConfig) -> anyhow::Result<()> {
    let client = pg_client(cli).await?;
    let admin = OutboxAdmin::new(config);
    let version = outbox_pg::schema_version(&client, config).await?;
    let backlog = admin.backlog(&client).await?;
    println!(
        "outbox {} (schema version {})",
        config.table,
        version.map_or_else(
            || "none: run `outbox migrate`".to_string(),
            |v| v.to_string()
        )
    );
    println!(
        "  pending: {}  oldest: {}",
        backlog.pending,
        age_text(backlog.oldest_age)
    );
    let lanes = admin.lanes(&client).await?;
    if !lanes.is_empty() {
        println!("  lanes with pending events: {}", lanes.len());
        println!("    lane  pending  oldest_s  attempts  held_by");
        for lane in &lanes {
            let owner = lane.owner.as_ref().map_or_else(
                || "-".to_string(),
                |o| format!("pid {} {} ({})", o.pid, o.application_name, o.client_addr),
            );
            println!(
                "    {:>4}  {:>7}  {:>8.1}  {:>8}  {owner}",
                lane.lane,
                lane.pending,
                lane.oldest_age.as_secs_f64(),
                lane.max_attempts
            );
        }
    }
    flag_table_status(cli, &client).await?;
    let slots = outbox_pg::wal::slot_status(
        &client,
        &outbox_pg::wal::WalConfig::default().progress_table,
    )
    .await?;
    if !slots.is_empty() {
        println!("  replication slots (WAL source):");
        println!("    slot                  streamed_by  wal_status  confirmed     retained_MB  unconfirmed_MB  recorded      loaded");
        for slot in &slots {
            let mb = |b: Option<f64>| {
                b.map_or_else(|| "-".to_string(), |b| format!("{:.1}", b / 1_048_576.0))
            };
            let text = |t: &Option<String>| t.clone().unwrap_or_else(|| "-".to_string());
            println!(
                "    {:<20}  {:>11}  {:>10}  {:<12}  {:>11}  {:>14}  {:<12}  {}",
                slot.slot,
                slot.active_pid
                    .map_or_else(|| "-".to_string(), |p| format!("pid {p}")),
                text(&slot.wal_status),
                text(&slot.confirmed),
                mb(slot.retained_bytes),
                mb(slot.unconfirmed_bytes),
                text(&slot.recorded),
                match (&slot.loaded, &slot.load_position) {
                    (Some(false), Some(at)) => format!("false: at {at}"),
                    (loaded, _) => loaded.map_or_else(|| "-".to_string(), |l| l.to_string()),
                },
            );
        }
    }
    let dead = admin.dead_letter_counts(&client, 20).await?;
    let total: i64 = dead.iter().map(|(_, n)| n).sum();
    println!("  dead letters (postgres): {total}");
    for (reason, count) in &dead {
        println!("    {count:>7}  {reason}");
    }

    // The other services are optional here: say what could not be reached.
    let ch = ClickHouseDeadLetters::new(cli.clickhouse.config()?)?;
    match ch.dead_letter_counts().await {
        Ok(counts) => {
            let total: u64 = counts.iter().map(|(_, n)| n).sum();
            println!(
                "  dead letters (clickhouse {}.{}): {total}",
                cli.clickhouse.clickhouse_database, cli.clickhouse.clickhouse_dead_letter_table
            );
            for (reason, count) in &counts {
                println!("    {count:>7}  {reason}");
            }
        }
        Err(err) => println!("  dead letters (clickhouse): unavailable: {err}"),
    }
    let kafka = cli.kafka.config("outbox admin")?;
    let lag = match outbox_kafka::LagProbe::new(&kafka, &cli.group.group_id, &cli.group.topic) {
        Ok(probe) => probe.lag().await,
        Err(err) => Err(err),
    };
    match lag {
        Ok(partitions) => {
            let total: i64 = partitions.iter().map(|p| p.lag).sum();
            println!(
                "  consumer group {} on {}: lag {total}",
                cli.group.group_id, cli.group.topic
            );
            for p in partitions {
                println!(
                    "    partition {:>3}  committed {:>10}  end {:>10}  lag {:>8}",
                    p.partition,
                    p.committed
                        .map_or_else(|| "-".to_string(), |c| c.to_string()),
                    p.high_watermark,
                    p.lag
                );
            }
        }
        Err(err) => println!("  consumer lag: unavailable: {err}"),
    }
    Ok(())
}

/// The flag table's unsent rows, when the table exists (a deployment on
/// the outbox or the WAL alone has none).
async fn flag_table_status(
    cli: &AdminCli,
    client: &deadpool_postgres::Client,
) -> anyhow::Result<()> {
    let config = cli.flag.config().validate()?;
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&config.table])
        .await
        .context("looking up the flag table")?
        .get(0);
    if !exists {
        return Ok(());
    }
    let backlog = BacklogProbe::flag_table(&config).backlog(client).await?;
    println!(
        "  flag table {} ({} = false): unsent {}  oldest: {}",
        config.table,
        config.flag_column,
        backlog.pending,
        age_text(backlog.oldest_age)
    );
    let trigger = if outbox_pg::flag_notify_installed(client, &config).await? {
        "installed".to_string()
    } else {
        format!(
            "missing: a relay finds new rows only at its next poll (--idle-wait-ms); \
             install it once with `producer_pg_to_kafka --source flag-table --table {} \
             --flag-notify-trigger`",
            config.table
        )
    };
    println!("  flag table wake-up trigger: {trigger}");
    Ok(())
}

fn age_text(age: Option<Duration>) -> String {
    age.map_or_else(
        || "-".to_string(),
        |age| format!("{:.1} s", age.as_secs_f64()),
    )
}

fn parse_pg_ids(ids: &[String]) -> anyhow::Result<Vec<i64>> {
    ids.iter()
        .map(|id| {
            id.parse::<i64>()
                .with_context(|| format!("{id:?} is not a dead-letter row id (a number)"))
        })
        .collect()
}

fn selection(args: &SelectionArgs) -> anyhow::Result<Selection> {
    Ok(if args.all {
        Selection::All
    } else {
        Selection::Ids(parse_pg_ids(&args.ids)?)
    })
}

async fn pg_dead_letters(
    cli: &AdminCli,
    config: &ValidOutboxConfig,
    command: &DeadLetterCommand,
) -> anyhow::Result<()> {
    let client = pg_client(cli).await?;
    let admin = OutboxAdmin::new(config);
    match command {
        DeadLetterCommand::List { limit, .. } => {
            let rows = admin.dead_letters(&client, i64::from(*limit)).await?;
            println!(
                "{:>6}  {:<36}  {:<20}  {:>8}  reason",
                "id", "event_id", "topic", "attempts"
            );
            for row in rows {
                println!(
                    "{:>6}  {:<36}  {:<20}  {:>8}  {}",
                    row.id, row.event_id, row.topic, row.attempts, row.reason
                );
            }
        }
        DeadLetterCommand::Show { id, .. } => {
            let id = parse_pg_ids(std::slice::from_ref(id))?[0];
            let Some(row) = admin.dead_letter(&client, id).await? else {
                bail!(
                    "no dead letter with id {id} in {}",
                    config.dead_letter_table
                );
            };
            println!("id:               {}", row.id);
            println!("event_id:         {}", row.event_id);
            println!("topic:            {}", row.topic);
            println!(
                "key:              {}",
                row.key.as_deref().map_or_else(
                    || "-".to_string(),
                    |k| String::from_utf8_lossy(k).into_owned()
                )
            );
            println!("attempts:         {}", row.attempts);
            println!("reason:           {}", row.reason);
            println!("origin:           {}", row.origin);
            println!("created_at:       {}", unix(row.created_at));
            println!("dead_lettered_at: {}", unix(row.dead_lettered_at));
            println!("headers:          {}", row.headers);
            println!(
                "payload ({} bytes): {}",
                row.payload.len(),
                String::from_utf8_lossy(&row.payload)
            );
        }
        DeadLetterCommand::Replay { selection: s, .. } => {
            let moved = match selection(s)? {
                // In batches, with progress: a large dead-letter table is
                // not moved in one long transaction.
                Selection::All => replay_all(&admin, &client).await?,
                ids => admin.replay(&client, &ids).await?,
            };
            println!("replayed {moved} dead letters into {}", config.table);
        }
        DeadLetterCommand::Purge { selection: s, .. } => {
            let deleted = admin.purge(&client, &selection(s)?).await?;
            println!("purged {deleted} dead letters");
        }
    }
    Ok(())
}

/// Rows per statement of `dead-letter replay --all`.
const REPLAY_BATCH: i64 = 1000;

/// Every dead letter there is now back into the outbox, oldest first, in
/// batches; the ones dead-lettered meanwhile (by the replay itself, if the
/// broker still refuses them) wait for the next replay.
async fn replay_all(
    admin: &OutboxAdmin,
    client: &deadpool_postgres::Client,
) -> anyhow::Result<u64> {
    let (Some(last), count) = admin.dead_letter_extent(client).await? else {
        return Ok(0);
    };
    let bar = crate::progress::bar(u64::try_from(count).unwrap_or(0), "replaying");
    let mut moved = 0;
    loop {
        let batch = admin.replay_oldest(client, last, REPLAY_BATCH).await?;
        if batch == 0 {
            break;
        }
        moved += batch;
        bar.inc(batch);
    }
    bar.finish_and_clear();
    Ok(moved)
}

fn unix(time: SystemTime) -> String {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => format!("{} (unix s)", d.as_secs()),
        Err(_) => "before 1970".into(),
    }
}

/// `topic:partition:offset` (Kafka topic names cannot hold `:`).
/// The dead letters `args` names on the ClickHouse side.
fn clickhouse_selection(args: &SelectionArgs) -> anyhow::Result<DeadLetterSelection> {
    if args.all {
        return Ok(DeadLetterSelection::All);
    }
    let positions = args
        .ids
        .iter()
        .map(|id| id.parse::<DeadLetterPosition>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DeadLetterSelection::At(positions))
}

async fn clickhouse_dead_letters(
    cli: &AdminCli,
    command: &DeadLetterCommand,
) -> anyhow::Result<()> {
    let dead = ClickHouseDeadLetters::new(cli.clickhouse.config()?)?;
    match command {
        DeadLetterCommand::List { limit, .. } => {
            let rows = dead.dead_letters(None, u64::from(*limit)).await?;
            println!(
                "{:<30}  {:<36}  reason",
                "topic:partition:offset", "event_id"
            );
            for r in rows {
                let at = DeadLetterPosition::of(&r).to_string();
                println!("{at:<30}  {:<36}  {}", r.event_id, r.reason);
            }
        }
        DeadLetterCommand::Show { id, .. } => {
            let at: DeadLetterPosition = id.parse()?;
            let rows = dead.select(&DeadLetterSelection::At(vec![at])).await?;
            let Some(r) = rows.into_iter().next() else {
                bail!("no clickhouse dead letter at {id}");
            };
            println!("position:  {}", DeadLetterPosition::of(&r));
            println!("event_id:  {}", r.event_id);
            println!("key:       {}", r.key);
            println!("reason:    {}", r.reason);
            println!("failed_at: {} (unix s)", r.failed_at);
            println!("payload ({} bytes): {}", r.payload.len(), r.payload);
        }
        DeadLetterCommand::Replay { selection, .. } => {
            let bus = outbox_kafka::KafkaBus::new(cli.kafka.config("outbox admin")?)?;
            let bar = crate::progress::bar(0, "replaying");
            let report = dead
                .replay_with_progress(&bus, &clickhouse_selection(selection)?, |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                })
                .await;
            bar.finish_and_clear();
            let report = report?;
            for (at, reason) in &report.kept {
                eprintln!("{at} not replayed: {reason}");
            }
            let total = report.replayed.len() + report.kept.len();
            if total == 0 {
                println!("nothing to replay");
            } else {
                println!("replayed {} of {total} dead letters", report.replayed.len());
            }
        }
        DeadLetterCommand::Purge { selection, .. } => {
            let selection = clickhouse_selection(selection)?;
            dead.purge(&selection).await?;
            match selection {
                DeadLetterSelection::All => {
                    println!("purging every clickhouse dead letter (applied in the background)")
                }
                DeadLetterSelection::At(positions) => println!(
                    "purging {} clickhouse dead letters (applied in the background)",
                    positions.len()
                ),
            }
        }
    }
    Ok(())
}
