//! The consumer's routes: which topic goes into which ClickHouse table, and
//! how its records become rows. Several routes run in one process; the
//! flags make one route when the configuration file lists none.
//!
//! ```toml
//! [[route]]
//! topic = "page_views"
//! table = "analytics.page_views"              # or just the table, in --clickhouse-database
//! fields = { user = "username", city = "/address/city" }
//! missing = "dead-letter"                     # default: the column's default
//! unknown = "ignore"                          # default
//! batch_size = 5000
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Deserialize;
use sink_clickhouse::{
    Changes, MissingField, TableRowsConfig, UnknownField, ValidClickHouseConfig,
};

use crate::{ConsumerArgs, RowFormat};

/// The key of the configuration file that lists the routes.
pub const ROUTE_KEY: &str = "route";

/// What a payload field without a value becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MissingArg {
    /// The column's default.
    #[default]
    Default,
    /// A dead letter naming the column.
    DeadLetter,
}

/// What a payload field without a column becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownArg {
    /// Ignored.
    #[default]
    Ignore,
    /// A dead letter naming the fields.
    DeadLetter,
}

/// Whether payloads are rows or change envelopes (`--changes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ChangesArg {
    /// Each payload is a row.
    #[default]
    Off,
    /// Change envelopes of the WAL source, one row per change.
    Log,
    /// Change envelopes into a state table (ReplacingMergeTree by `_version`).
    State,
}

impl From<ChangesArg> for Changes {
    fn from(arg: ChangesArg) -> Self {
        match arg {
            ChangesArg::Off => Changes::Off,
            ChangesArg::Log => Changes::Log,
            ChangesArg::State => Changes::State,
        }
    }
}

/// One `[[route]]` of the configuration file. Options it leaves out come
/// from the flags (and their defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The Kafka topic read.
    pub topic: String,
    /// `table` or `database.table`.
    pub table: String,
    /// How records become rows. Default: `table` (by the table's columns).
    pub format: Option<RowFormat>,
    /// Column → payload field, or JSON pointer (`/a/b`) for a nested one.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// A payload without a value for a column.
    pub missing: Option<MissingArg>,
    /// A payload field no column reads.
    pub unknown: Option<UnknownArg>,
    /// Payloads are rows (`off`), or change envelopes written one row per
    /// change (`log`) or as the latest state per key (`state`).
    pub changes: Option<ChangesArg>,
    /// With `changes = "state"` and `create_columns`: the primary key.
    pub order_by: Option<String>,
    /// Columns to create the table with when it does not exist.
    pub create_columns: Option<String>,
    /// A String column that gets each record's trace id (W3C `traceparent`).
    pub trace_id_column: Option<String>,
    /// The route's dead-letter table. Default: the flag's.
    pub dead_letter_table: Option<String>,
    /// The route's consumer group. Default: `<group-id>-<topic>`.
    pub group_id: Option<String>,
    /// Most records per insert.
    pub batch_size: Option<usize>,
    /// How long to keep collecting a batch after its first record (ms).
    pub batch_linger_ms: Option<u64>,
    /// Least time between two inserts of the route (ms).
    pub min_insert_interval_ms: Option<u64>,
    /// Event ids remembered per partition to skip a relay's second copy.
    pub dedup_window: Option<usize>,
}

/// A route with every option decided.
#[derive(Debug, Clone)]
pub struct Route {
    /// Its name in logs: `topic → database.table`.
    pub name: String,
    /// The consumer's options for this route (topic, group, batching).
    pub consumer: ConsumerArgs,
    /// Where it writes.
    pub clickhouse: ValidClickHouseConfig,
    /// How records become rows.
    pub format: RowFormat,
    /// With [`RowFormat::Table`]: how payload fields map to columns.
    pub rows: TableRowsConfig,
}

/// The routes of the file at `path` (none when it has no `[[route]]`).
pub fn routes_in_file(path: &Path) -> anyhow::Result<Vec<RouteSpec>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("config file {}: cannot read it", path.display()))?;
    let mut table: toml::Table = text
        .parse()
        .with_context(|| format!("config file {}: not valid TOML", path.display()))?;
    let Some(routes) = table.remove(ROUTE_KEY) else {
        return Ok(Vec::new());
    };
    let routes: Vec<RouteSpec> = routes.try_into().with_context(|| {
        format!(
            "config file {}: [[{ROUTE_KEY}]] must be tables with topic, table and the route's options",
            path.display()
        )
    })?;
    Ok(routes)
}

/// The routes to run: `specs` completed from the flags, or the flags' one
/// route (`--topic` into `--clickhouse-table`) when there are none. Two
/// routes into one table are refused: the sink finds written rows by
/// partition and offset, which only one topic may own.
pub fn resolve(
    specs: &[RouteSpec],
    consumer: &ConsumerArgs,
    clickhouse: &ValidClickHouseConfig,
) -> anyhow::Result<Vec<Route>> {
    let flags_route = || Route {
        name: format!(
            "{} → {}.{}",
            consumer.group.topic, clickhouse.database, clickhouse.table
        ),
        consumer: consumer.clone(),
        clickhouse: clickhouse.clone(),
        format: consumer.format,
        rows: consumer.table_rows(),
    };
    if specs.is_empty() {
        return Ok(vec![flags_route()]);
    }
    let mut routes: Vec<Route> = Vec::with_capacity(specs.len());
    for spec in specs {
        let (database, table) = match spec.table.split_once('.') {
            Some((db, table)) => (db.to_string(), table.to_string()),
            None => (clickhouse.database.clone(), spec.table.clone()),
        };
        let mut ch = (**clickhouse).clone();
        ch.database = database;
        ch.table = table;
        if let Some(dead) = &spec.dead_letter_table {
            ch.dead_letter_table = dead.clone();
        }
        if let Some(window) = spec.dedup_window {
            ch.dedup_window = window;
        }
        let name = format!("{} → {}.{}", spec.topic, ch.database, ch.table);
        let ch = ch
            .validate()
            .with_context(|| format!("route {name}: invalid table"))?;
        if let Some(other) = routes
            .iter()
            .find(|r| r.clickhouse.database == ch.database && r.clickhouse.table == ch.table)
        {
            bail!(
                "routes {} and {name} write the same table: each table takes one topic (rows are found by partition and offset)",
                other.name
            );
        }
        let mut args = consumer.clone();
        args.group.topic = spec.topic.clone();
        args.group.group_id = spec
            .group_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", consumer.group.group_id, spec.topic));
        if let Some(size) = spec.batch_size {
            args.batch_size = size;
        }
        if let Some(linger) = spec.batch_linger_ms {
            args.batch_linger_ms = linger;
        }
        if let Some(floor) = spec.min_insert_interval_ms {
            args.min_insert_interval_ms = floor;
        }
        let mut rows = consumer.table_rows();
        rows.fields = spec.fields.clone();
        if let Some(missing) = spec.missing {
            rows.missing = missing.into();
        }
        if let Some(unknown) = spec.unknown {
            rows.unknown = unknown.into();
        }
        if spec.create_columns.is_some() {
            rows.create_columns = spec.create_columns.clone();
        }
        if let Some(changes) = spec.changes {
            rows.changes = changes.into();
        }
        if spec.order_by.is_some() {
            rows.order_by = spec.order_by.clone();
        }
        if spec.trace_id_column.is_some() {
            rows.trace_id_column = spec.trace_id_column.clone();
        }
        routes.push(Route {
            name,
            consumer: args,
            clickhouse: ch,
            format: spec.format.unwrap_or(RowFormat::Table),
            rows,
        });
    }
    Ok(routes)
}

impl From<MissingArg> for MissingField {
    fn from(arg: MissingArg) -> Self {
        match arg {
            MissingArg::Default => MissingField::Default,
            MissingArg::DeadLetter => MissingField::DeadLetter,
        }
    }
}

impl From<UnknownArg> for UnknownField {
    fn from(arg: UnknownArg) -> Self {
        match arg {
            UnknownArg::Ignore => UnknownField::Ignore,
            UnknownArg::DeadLetter => UnknownField::DeadLetter,
        }
    }
}

/// Parses `column=field` (or `column=/json/pointer`) of `--field`.
pub fn parse_field(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((column, field)) if !column.is_empty() && !field.is_empty() => {
            Ok((column.to_string(), field.to_string()))
        }
        _ => Err(format!(
            "{text:?}: expected column=field or column=/json/pointer"
        )),
    }
}

/// How often a route reads its table's columns again, from the flag.
pub fn refresh(secs: u64) -> Duration {
    Duration::from_secs(secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        consumer: ConsumerArgs,
    }

    fn flags(args: &[&str]) -> anyhow::Result<ConsumerArgs> {
        Ok(Cli::try_parse_from(std::iter::once("bin").chain(args.iter().copied()))?.consumer)
    }

    fn clickhouse() -> anyhow::Result<ValidClickHouseConfig> {
        Ok(sink_clickhouse::ClickHouseConfig::default().validate()?)
    }

    fn specs(text: &str) -> anyhow::Result<Vec<RouteSpec>> {
        let mut table: toml::Table = text.parse()?;
        Ok(table
            .remove(ROUTE_KEY)
            .map(|v| v.try_into())
            .transpose()?
            .unwrap_or_default())
    }

    #[test]
    fn without_routes_the_flags_make_the_demos_one() -> anyhow::Result<()> {
        let routes = resolve(&[], &flags(&[])?, &clickhouse()?)?;
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].name, "user_events → default.user_logins");
        assert_eq!(routes[0].format, RowFormat::UserLogins);
        assert_eq!(
            routes[0].consumer.group.group_id,
            flags(&[])?.group.group_id
        );
        Ok(())
    }

    #[test]
    fn routes_take_their_own_options_and_the_flags_for_the_rest() -> anyhow::Result<()> {
        let specs = specs(
            r#"
            [[route]]
            topic = "views"
            table = "analytics.page_views"
            fields = { user = "username", city = "/address/city" }
            missing = "dead-letter"
            batch_size = 7
            min_insert_interval_ms = 1000
            changes = "state"
            order_by = "id"

            [[route]]
            topic = "user_events"
            table = "user_logins"
            format = "user-logins"
            group_id = "own"
            "#,
        )?;
        let routes = resolve(&specs, &flags(&["--batch-size", "99"])?, &clickhouse()?)?;
        assert_eq!(routes[0].name, "views → analytics.page_views");
        assert_eq!(routes[0].format, RowFormat::Table);
        assert_eq!(routes[0].consumer.batch_size, 7);
        assert_eq!(routes[0].consumer.min_insert_interval_ms, 1000);
        assert_eq!(routes[1].consumer.min_insert_interval_ms, 200);
        assert_eq!(routes[0].rows.missing, MissingField::DeadLetter);
        assert_eq!(routes[0].rows.fields["city"], "/address/city");
        assert_eq!(routes[0].rows.changes, Changes::State);
        assert_eq!(routes[0].rows.order_by.as_deref(), Some("id"));
        assert_eq!(routes[1].rows.changes, Changes::Off);
        assert_eq!(routes[0].consumer.group.topic, "views");
        assert!(routes[0].consumer.group.group_id.ends_with("-views"));
        assert_eq!(routes[1].consumer.batch_size, 99);
        assert_eq!(routes[1].consumer.group.group_id, "own");
        assert_eq!(routes[1].clickhouse.database, "default");
        assert_eq!(routes[1].format, RowFormat::UserLogins);
        Ok(())
    }

    #[test]
    fn bad_routes_are_refused_with_their_name() -> anyhow::Result<()> {
        let two = specs(
            "[[route]]\ntopic = \"a\"\ntable = \"t\"\n[[route]]\ntopic = \"b\"\ntable = \"default.t\"\n",
        )?;
        let err = resolve(&two, &flags(&[])?, &clickhouse()?)
            .unwrap_err()
            .to_string();
        assert!(err.contains("write the same table"), "{err}");
        let bad = specs("[[route]]\ntopic = \"a\"\ntable = \"no-dashes\"\n")?;
        let err = format!(
            "{:#}",
            resolve(&bad, &flags(&[])?, &clickhouse()?).unwrap_err()
        );
        assert!(err.contains("route a → default.no-dashes"), "{err}");
        assert!(specs("[[route]]\ntopic = \"a\"\ntable = \"t\"\nbatch = 1\n").is_err());
        assert_eq!(
            parse_field("a=/b/c").ok(),
            Some(("a".into(), "/b/c".into()))
        );
        assert!(parse_field("a").is_err());
        Ok(())
    }
}
