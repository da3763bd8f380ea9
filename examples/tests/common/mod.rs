//! Helpers shared by the end-to-end tests: service addresses (env vars,
//! localhost by default), unique names, a Kafka reader, ClickHouse counts and
//! a private tansu broker that a test may stop and start.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_kafka::rdkafka::consumer::{Consumer, StreamConsumer};
use outbox_kafka::rdkafka::message::Headers;
use outbox_kafka::rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use outbox_kafka::KafkaConfig;
use uuid::Uuid;

pub use test_support::{brokers, clickhouse_url, pg};

pub fn kafka(brokers: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers.into(),
        message_timeout: Duration::from_secs(5),
        ..KafkaConfig::default()
    }
}

/// A short name unique to this run, safe as a table, topic or group name.
pub fn unique(name: &str) -> String {
    test_support::unique("e2e", name)
}

/// One message as read back from Kafka.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub event_id: Option<Uuid>,
    pub key: Option<String>,
    pub payload: String,
}

/// Reads every partition of `topic` from the beginning (explicit
/// assignment: no group coordination involved) until `expected` messages
/// arrived and then `settle` passed without more (to catch extras), or 60 s
/// passed.
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    expected: usize,
    settle: Duration,
) -> Vec<Read> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        assignment
            .add_partition_offset(topic, partition.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let wait = if out.len() >= expected {
            settle
        } else {
            Duration::from_secs(1)
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(message)) => {
                let event_id = message.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == outbox_core::HEADER_EVENT_ID)
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|v| Uuid::parse_str(v).ok())
                });
                out.push(Read {
                    partition: message.partition(),
                    offset: message.offset(),
                    event_id,
                    key: message
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                    payload: String::from_utf8_lossy(message.payload().unwrap_or_default())
                        .into_owned(),
                });
            }
            Ok(Err(err)) => panic!("reading {topic}: {err}"),
            Err(_) if out.len() >= expected => break,
            Err(_) => {}
        }
        if tokio::time::Instant::now() > deadline {
            break;
        }
    }
    out
}

/// Counts of ids: (total, distinct, ids seen more than once).
pub fn count_ids(ids: impl IntoIterator<Item = Uuid>) -> (usize, usize, usize) {
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    let mut total = 0;
    for id in ids {
        total += 1;
        *seen.entry(id).or_default() += 1;
    }
    let dup = seen.values().filter(|n| **n > 1).count();
    (total, seen.len(), dup)
}

/// A ClickHouse query returning one line of text (`FORMAT TabSeparated`).
pub async fn ch_query(sql: &str) -> String {
    let output = tokio::process::Command::new("curl")
        .args([
            "-fsS",
            "-u",
            "user:strongpassword",
            &clickhouse_url(),
            "--data-binary",
            sql,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "clickhouse query failed: {sql}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// (count(), uniqExact(event_id)) of a ClickHouse table, without FINAL.
pub async fn ch_counts(table: &str) -> (u64, u64) {
    let text = ch_query(&format!(
        "SELECT count(), uniqExact(event_id) FROM `{table}` FORMAT TabSeparated"
    ))
    .await;
    let mut parts = text.split('\t');
    let rows = parts.next().unwrap_or("0").parse().unwrap_or(0);
    let distinct = parts.next().unwrap_or("0").parse().unwrap_or(0);
    (rows, distinct)
}

/// Rows in a table, 0 while it does not exist yet.
pub async fn ch_count(table: &str) -> u64 {
    if ch_query(&format!("EXISTS TABLE `{table}` FORMAT TabSeparated")).await != "1" {
        return 0;
    }
    ch_query(&format!(
        "SELECT count() FROM `{table}` FORMAT TabSeparated"
    ))
    .await
    .parse()
    .unwrap_or(0)
}

pub fn bin(name: &str) -> PathBuf {
    match name {
        "producer_pg_to_kafka" => PathBuf::from(env!("CARGO_BIN_EXE_producer_pg_to_kafka")),
        "consumer_to_clickhouse" => PathBuf::from(env!("CARGO_BIN_EXE_consumer_to_clickhouse")),
        "service_enqueue" => PathBuf::from(env!("CARGO_BIN_EXE_service_enqueue")),
        "outbox" => PathBuf::from(env!("CARGO_BIN_EXE_outbox")),
        other => panic!("unknown binary {other}"),
    }
}

/// Environment for the binaries: the test's service addresses.
pub fn command(name: &str) -> Command {
    let mut cmd = Command::new(bin(name));
    let pg = pg();
    cmd.env("OUTBOX_PG_HOST", &pg.host)
        .env("OUTBOX_PG_PORT", pg.port.to_string())
        .env("OUTBOX_KAFKA_BROKERS", brokers())
        .env("OUTBOX_CLICKHOUSE_URL", clickhouse_url())
        .env("RUST_LOG", "warn")
        // Tests run binaries side by side: any free port for /metrics.
        .env("OUTBOX_METRICS_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null());
    cmd
}

/// A tansu broker of the test's own, on a free port, with sqlite storage in
/// a temporary folder, so the test may stop and restart it.
pub struct PrivateBroker {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

pub fn tansu_bin() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU_BIN") {
        return PathBuf::from(path);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cache =
        std::env::var("OUTBOX_CACHE").unwrap_or_else(|_| format!("{home}/.cache/outbox-stack"));
    PathBuf::from(cache).join("tansu-0.6.0/bin/tansu")
}

impl PrivateBroker {
    pub fn new() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(unique("tansu"));
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            port,
            dir,
            child: None,
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn start(&mut self) {
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu_bin())
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &listener,
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu binary (run scripts/stack.sh up, or set TANSU_BIN)");
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("private tansu did not start on port {}", self.port);
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process SIGKILLed when the test ends, however it ends (a failed
/// assertion must not leave a relay or consumer running).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends SIGTERM and waits up to `limit` for the exit status.
pub fn terminate(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    // SAFETY-free: the kill command, so no libc dependency is needed.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Awaits `future`, failing the test if it takes longer than `limit`: relays
/// retry forever by design, so a broken service would otherwise hang a test.
pub async fn within<F: std::future::Future>(limit: Duration, what: &str, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what} did not finish within {limit:?} (is the stack healthy? scripts/stack.sh status)"),
    }
}

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `url`: (HTTP status, body); status 0 when nothing answered.
pub async fn http_get(url: &str) -> (u16, String) {
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "-m", "5", "-w", "\n%{http_code}", url])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The value of an unlabelled Prometheus counter or gauge, 0 when absent.
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
            rest.trim().parse().ok()
        })
        .unwrap_or(0.0)
}
