//! Operating the binaries against the real stack: least-privilege roles, a
//! configuration file, `/metrics` / `/healthz` / `/readyz`, secrets kept out
//! of every output, and the `outbox` admin command.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use outbox_core::Event;
use outbox_pg::{migrate, Outbox, OutboxConfig, PgConfig};
use uuid::Uuid;

async fn admin_client() -> outbox_pg::deadpool_postgres::Object {
    pg().create_pool().unwrap().get().await.unwrap()
}

/// The GRANT block of docs/security.md, for `table`, `dead` and the roles.
fn documented_grants(table: &str, dead: &str, service: &str, relay: &str) -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md"))
        .unwrap();
    let start = text.find("<!-- BEGIN grants -->").unwrap();
    let end = text.find("<!-- END grants -->").unwrap();
    let block = &text[start..end];
    let sql = &block[block.find("```sql").unwrap() + 6..block.rfind("```").unwrap()];
    sql.replace("outbox_dead_letter_id_seq", &format!("{dead}_id_seq"))
        .replace("outbox_dead_letter", dead)
        .replace("outbox_seq_seq", &format!("{table}_seq_seq"))
        .replace("outbox_service", service)
        .replace("outbox_relay", relay)
        .replace("ON outbox ", &format!("ON {table} "))
}

/// Invariants: (least privilege) a service that may only INSERT into the
/// outbox enqueues, and a relay with the documented grants and no DDL right
/// publishes every event once; (configuration) a TOML file configures the
/// relay and the environment still wins over it; (observability) /metrics
/// counts what was published, /healthz and /readyz answer; (secrets) the
/// relay's password appears in none of its logs (at debug level), /metrics
/// or /readyz.
#[tokio::test]
async fn least_privilege_relay_with_config_file_metrics_and_no_leaked_secret() {
    let name = unique("ops");
    let dead = format!("{name}_dead");
    let topic = name.clone();
    let service_role = format!("{name}_svc");
    let relay_role = format!("{name}_relay");
    let service_password = format!("svc-{}", Uuid::new_v4().simple());
    let relay_password = format!("relay-{}", Uuid::new_v4().simple());
    let config = OutboxConfig {
        table: name.clone(),
        dead_letter_table: dead.clone(),
        ..OutboxConfig::default()
    }
    .validate()
    .unwrap();
    let admin = admin_client().await;
    migrate(&admin, &config).await.unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {service_role} LOGIN PASSWORD '{service_password}';
             CREATE ROLE {relay_role} LOGIN PASSWORD '{relay_password}';
             {}",
            documented_grants(&name, &dead, &service_role, &relay_role)
        ))
        .await
        .unwrap();
    outbox_kafka::ensure_topics(&kafka(&brokers()), &[&topic])
        .await
        .unwrap();

    // The service: INSERT only.
    let service_pool = PgConfig {
        user: service_role.clone(),
        password: service_password.clone(),
        ..pg()
    }
    .create_pool()
    .unwrap();
    let mut service = service_pool.get().await.unwrap();
    let outbox = Outbox::new(&config);
    let events: Vec<Event> = (0..40)
        .map(|i| {
            Event::new(topic.clone(), format!("{{\"i\":{i}}}")).with_key(format!("k{}", i % 7))
        })
        .collect();
    let tx = service.transaction().await.unwrap();
    outbox.enqueue(&tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let denied = service
        .query_one(&format!("SELECT count(*) FROM {name}"), &[])
        .await
        .is_err();
    assert!(
        denied,
        "the service role must not be able to read the outbox"
    );

    // The relay: configured by a file. The environment wins over the file:
    // the file's pg_port would fail, OUTBOX_PG_PORT (set by `command`) works.
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let password_file = dir.join("pg_password");
    std::fs::write(&password_file, format!("{relay_password}\n")).unwrap();
    let port = free_port();
    let config_file = dir.join("relay.toml");
    std::fs::write(
        &config_file,
        format!(
            "source = \"outbox\"\noutbox_table = \"{name}\"\ndead-letter-table = \"{dead}\"\n\
             no_migrate = true\npg_user = \"{relay_role}\"\npg_password_file = \"{}\"\n\
             metrics_addr = \"127.0.0.1:{port}\"\nbacklog_interval_secs = 1\nbatch_size = 7\n\
             pg_port = 1\n",
            password_file.display()
        ),
    )
    .unwrap();
    let log_path = dir.join("relay.log");
    let mut relay = command("producer_pg_to_kafka")
        .env_remove("OUTBOX_METRICS_ADDR")
        .env("RUST_LOG", "debug")
        .args(["--config".as_ref(), config_file.as_os_str()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();

    let base = format!("http://127.0.0.1:{port}");
    let mut metrics = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let (status, body) = http_get(&format!("{base}/metrics")).await;
        if status == 200
            && metric(&body, "outbox_relay_events_published_total") >= 40.0
            && body.contains("outbox_backlog_events 0")
        {
            metrics = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (health, health_body) = http_get(&format!("{base}/healthz")).await;
    let (ready, ready_body) = http_get(&format!("{base}/readyz")).await;
    let (missing, _) = http_get(&format!("{base}/nothing")).await;
    let status = terminate(&mut relay, Duration::from_secs(20));
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();

    let read = read_topic(&brokers(), &topic, 40, Duration::from_secs(2)).await;
    let (total, distinct, duplicated) = count_ids(read.iter().filter_map(|r| r.event_id));
    let leaks = [&log, &metrics, &ready_body]
        .iter()
        .filter(|text| text.contains(&relay_password) || text.contains(&service_password))
        .count();
    println!(
        "enqueued=40 published_metric={} in_kafka={total} distinct={distinct} duplicated={duplicated} \
         healthz={health} readyz={ready} 404={missing} secret_leaks={leaks} exit={status:?} log_lines={}",
        metric(&metrics, "outbox_relay_events_published_total"),
        log.lines().count()
    );
    assert!(
        !metrics.is_empty(),
        "/metrics never showed 40 published events:\n{log}"
    );
    assert!(metrics.contains("outbox_relay_publish_seconds_bucket"));
    assert!(metrics.contains("outbox_relay_batch_size_bucket"));
    assert_eq!((health, health_body.trim()), (200, "ok"));
    assert_eq!(ready, 200, "{ready_body}");
    assert!(ready_body.contains("source: up") && ready_body.contains("bus: up"));
    assert_eq!(missing, 404);
    assert_eq!(
        (total, distinct, duplicated),
        (40, 40, 0),
        "every event once"
    );
    assert_eq!(leaks, 0, "a password appeared in the relay's output");
    assert!(status.is_some_and(|s| s.success()));
    // At debug level the relay logs every batch: the grep above had material.
    assert!(log.contains("relay batch acknowledged"), "{log}");

    admin
        .batch_execute(&format!(
            "DROP TABLE {name}, {dead}, {name}_schema_version; \
             DROP ROLE {service_role}; DROP ROLE {relay_role};"
        ))
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

async fn outbox_command(args: &[&str]) -> (bool, String, String) {
    let mut cmd = command("outbox");
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn relay_drain(name: &str, dead: &str, extra: &[&str]) -> String {
    let mut cmd = command("producer_pg_to_kafka");
    cmd.args([
        "--source",
        "outbox",
        "--outbox-table",
        name,
        "--dead-letter-table",
        dead,
        "--drain",
    ])
    .args(extra)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let output = within(
        Duration::from_secs(90),
        "the relay",
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Invariants: `outbox migrate` is idempotent and versioned; `outbox status`
/// reports what is pending and dead-lettered; a poison event is isolated
/// (dead-lettered with its reason, the rest published), and `dead-letter
/// replay` sends it through the normal path once its cause is fixed, so it
/// ends up published exactly once under its own id (no loss, no duplicate).
#[tokio::test]
async fn outbox_command_migrates_reports_and_replays_a_dead_letter() {
    let name = unique("admin");
    let dead = format!("{name}_dead");
    let topic = name.clone();
    let tables = [
        "--outbox-table",
        name.as_str(),
        "--dead-letter-table",
        dead.as_str(),
    ];
    let with = |rest: &[&str]| -> Vec<String> {
        tables
            .iter()
            .map(|s| s.to_string())
            .chain(rest.iter().map(|s| s.to_string()))
            .collect()
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        outbox_command(&refs).await
    };

    for _ in 0..2 {
        let (ok, out, err) = run(with(&["migrate"])).await;
        assert!(ok, "{err}");
        assert!(out.contains("is at schema version 2"), "{out}");
    }
    let (ok, sql, _) = run(with(&["migrate", "--print"])).await;
    assert!(ok && sql.contains(&format!("CREATE TABLE IF NOT EXISTS \"{name}\"")));
    outbox_kafka::ensure_topics(&kafka(&brokers()), &[&topic])
        .await
        .unwrap();

    // Five small events and one too large for the relay's first run.
    let config = OutboxConfig {
        table: name.clone(),
        dead_letter_table: dead.clone(),
        ..OutboxConfig::default()
    }
    .validate()
    .unwrap();
    let mut events: Vec<Event> = (0..5)
        .map(|i| Event::new(topic.clone(), format!("small {i}")).with_key(format!("k{i}")))
        .collect();
    let poison = Event::new(topic.clone(), vec![b'x'; 2000]).with_key("poison");
    events.push(poison.clone());
    let mut admin = admin_client().await;
    let tx = admin.transaction().await.unwrap();
    Outbox::new(&config).enqueue(&tx, &events).await.unwrap();
    tx.commit().await.unwrap();

    let (ok, status, err) = run(with(&["status"])).await;
    assert!(ok, "{err}");
    assert!(status.contains("pending: 6"), "{status}");
    assert!(status.contains("lanes with pending events"), "{status}");

    relay_drain(
        &name,
        &dead,
        &["--kafka-properties", "message.max.bytes=1000"],
    )
    .await;
    let (ok, list, err) = run(with(&["dead-letter", "list"])).await;
    assert!(ok, "{err}");
    let line = list
        .lines()
        .find(|l| l.contains(&poison.id.to_string()))
        .unwrap_or_else(|| panic!("the poison event is not listed:\n{list}"));
    assert!(line.contains("too large"), "{line}");
    let dead_id = line.split_whitespace().next().unwrap().to_string();
    let (ok, shown, _) = run(with(&["dead-letter", "show", &dead_id])).await;
    assert!(ok && shown.contains("payload (2000 bytes)"), "{shown}");
    let (_, status, _) = run(with(&["status"])).await;
    assert!(status.contains("pending: 0"), "{status}");
    assert!(status.contains("dead letters (postgres): 1"), "{status}");

    // The cause is fixed (the default size limit): replay and relay again.
    let (ok, replayed, err) = run(with(&["dead-letter", "replay", &dead_id])).await;
    assert!(ok && replayed.contains("replayed 1"), "{replayed}{err}");
    relay_drain(&name, &dead, &[]).await;
    let (_, status, _) = run(with(&["status"])).await;

    let read = read_topic(&brokers(), &topic, 6, Duration::from_secs(2)).await;
    let ids: Vec<Uuid> = read.iter().filter_map(|r| r.event_id).collect();
    let (total, distinct, duplicated) = count_ids(ids.iter().copied());
    let lost = events.iter().filter(|e| !ids.contains(&e.id)).count();
    println!(
        "enqueued=6 dead_lettered=1 replayed=1 in_kafka={total} distinct={distinct} duplicated={duplicated} lost={lost}"
    );
    assert_eq!((total, distinct, duplicated, lost), (6, 6, 0, 0));
    assert!(
        status.contains("pending: 0") && status.contains("dead letters (postgres): 0"),
        "{status}"
    );

    let (ok, _, err) = run(with(&["dead-letter", "show", "not-a-number"])).await;
    assert!(!ok && err.contains("not a dead-letter row id"), "{err}");
    admin
        .batch_execute(&format!("DROP TABLE {name}, {dead}, {name}_schema_version"))
        .await
        .unwrap();
}

/// Invariant: `outbox status` says whether a flag table has its wake-up
/// trigger, and how to install it when it has not (without it a relay
/// finds new rows only at its next poll).
#[tokio::test]
async fn outbox_status_tells_whether_a_flag_table_wakes_the_relay() {
    let name = unique("flag_status");
    let admin = admin_client().await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE {name} (id bigserial PRIMARY KEY, username text NOT NULL,
               event_type text NOT NULL, event_time timestamptz NOT NULL DEFAULT now(),
               sent_to_kafka boolean NOT NULL DEFAULT false);"
        ))
        .await
        .unwrap();
    let status = || async {
        let (ok, out, err) = outbox_command(&["--table", &name, "status"]).await;
        assert!(ok, "{err}");
        out.lines()
            .find(|line| line.contains("wake-up trigger"))
            .unwrap_or_else(|| panic!("no trigger line in:\n{out}"))
            .to_string()
    };
    let before = status().await;
    let config = outbox_pg::FlagTableConfig {
        table: name.clone(),
        ..outbox_pg::FlagTableConfig::default()
    }
    .validate()
    .unwrap();
    outbox_pg::install_flag_notify(&admin, &config)
        .await
        .unwrap();
    let after = status().await;
    println!("before: {before}\nafter: {after}");
    assert!(
        before.contains("missing") && before.contains("--flag-notify-trigger"),
        "{before}"
    );
    assert!(after.ends_with("installed"), "{after}");
    admin
        .batch_execute(&format!("DROP TABLE {name}"))
        .await
        .unwrap();
}

/// `consumer_to_clickhouse` once, raw rows into `table` (dead letters into
/// `{table}_dead`), until `topic` is idle.
fn consume_raw(topic: &str, table: &str) -> String {
    let dead = format!("{table}_dead");
    let output = command("consumer_to_clickhouse")
        .args(["--topic", topic, "--group-id", table, "--format", "raw"])
        .args(["--clickhouse-table", table])
        .args(["--clickhouse-dead-letter-table", &dead])
        .args(["--exit-after-idle-secs", "3"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    text
}

/// Invariants (a poison record on the ClickHouse side is isolated and
/// comes back once): a record the sink cannot write (no event id: a
/// foreign producer) is dead-lettered with its reason while the rest is
/// written; `outbox dead-letter --side clickhouse` lists and shows it by
/// position, `replay` publishes it again and removes it from the table only
/// once the broker acknowledged it, and the consumer then writes it, so the
/// table ends with every record once and no dead letter.
#[tokio::test]
async fn clickhouse_dead_letters_are_listed_replayed_and_written_once() {
    use outbox_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
    let name = unique("chdead");
    let topic = name.clone();
    let dead_table = format!("{name}_dead");
    let kafka_config = kafka(&brokers());
    outbox_kafka::ensure_topics(&kafka_config, &[&topic])
        .await
        .unwrap();
    let good: Vec<Event> = (0..2)
        .map(|i| Event::new(topic.clone(), format!("good {i}")).with_key("k"))
        .collect();
    let bus = outbox_kafka::KafkaBus::new(kafka_config.clone()).unwrap();
    let acked = outbox_core::Bus::publish(&bus, &good).await.unwrap();
    assert!(acked.iter().all(|d| d.is_acknowledged()), "{acked:?}");
    let producer: FutureProducer = outbox_kafka::rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(&topic)
                .key("foreign")
                .payload("no id header"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    let first = consume_raw(&topic, &name);
    let admin = |rest: &[&str]| {
        let args: Vec<String> = ["--clickhouse-dead-letter-table", dead_table.as_str()]
            .iter()
            .chain(["dead-letter"].iter())
            .chain(rest.iter())
            .map(|s| s.to_string())
            .collect();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            outbox_command(&refs).await
        }
    };
    let (ok, list, err) = admin(&["list", "--side", "clickhouse"]).await;
    assert!(ok, "{err}");
    let line = list
        .lines()
        .find(|l| l.starts_with(&format!("{topic}:")))
        .unwrap_or_else(|| panic!("no dead letter listed:\n{list}\n{first}"));
    assert!(
        line.contains("outbox-event-id"),
        "the reason is kept: {line}"
    );
    let at = line.split_whitespace().next().unwrap().to_string();
    let (ok, shown, err) = admin(&["show", "--side", "clickhouse", &at]).await;
    assert!(ok && shown.contains("no id header"), "{shown}{err}");
    let (ok, _, err) = admin(&["show", "--side", "clickhouse", "not-a-position"]).await;
    assert!(!ok && err.contains("topic:partition:offset"), "{err}");
    let (ok, none, err) = admin(&[
        "replay",
        "--side",
        "clickhouse",
        &format!("{topic}:0:99999"),
    ])
    .await;
    assert!(ok && none.contains("nothing to replay"), "{none}{err}");
    let after_first = ch_counts(&name).await;

    let (ok, replayed, err) = admin(&["replay", "--side", "clickhouse", &at]).await;
    assert!(
        ok && replayed.contains("replayed 1 of 1"),
        "{replayed}{err}"
    );
    // The table's deletion is applied in the background.
    let mut left = u64::MAX;
    for _ in 0..50 {
        left = ch_count(&dead_table).await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consume_raw(&topic, &name);
    let (rows, distinct) = ch_counts(&name).await;
    println!(
        "good=2 poison=1: first pass rows={} dead=1; after replay rows={rows} distinct={distinct} dead_left={left}",
        after_first.0
    );
    assert_eq!(after_first, (2, 2));
    assert_eq!((rows, distinct, left), (3, 3, 0));
}
