//! TLS to a real broker. tansu 0.6 has no TLS listener, so the test puts a
//! TLS terminator of its own (the stack's certificate for `localhost`,
//! signed by the stack's CA in `.stack/tls`) in front of a tansu broker it
//! starts for itself, which advertises the TLS port: every byte librdkafka
//! exchanges, bootstrap and produce and fetch alike, goes over TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox_core::{Bus, Delivery, Event};
use outbox_kafka::{ConsumerConfig, KafkaBus, KafkaConfig, KafkaSubscription};
use tokio::net::{TcpListener, TcpStream};

fn tls_file(name: &str) -> PathBuf {
    test_support::tls_file(name)
}

fn tansu_bin() -> PathBuf {
    std::env::var("OUTBOX_TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
            PathBuf::from(home).join(".cache/outbox-stack/tansu-0.6.0/bin/tansu")
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// A tansu broker of the test's own, killed when dropped.
struct Broker {
    child: Child,
    dir: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_broker(listen: u16, advertised: &str) -> Broker {
    let dir = std::env::temp_dir().join(format!("outbox-tls-broker-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = tansu_bin();
    let child = Command::new(&bin)
        .args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{listen}"),
            "--advertised-listener-url",
            &format!("tcp://{advertised}"),
            "--storage-engine",
            "sqlite://tansu.db",
        ])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} (scripts/stack.sh up builds it): {e}",
                bin.display()
            )
        });
    Broker { child, dir }
}

/// Accepts TLS on `listener` and forwards the plaintext to `upstream`.
async fn tls_terminator(listener: TcpListener, upstream: SocketAddr) {
    let cert = std::fs::read(tls_file("server.crt")).unwrap();
    let key = std::fs::read(tls_file("server.key")).unwrap();
    let identity = native_tls::Identity::from_pkcs8(&cert, &key).unwrap();
    let acceptor: tokio_native_tls::TlsAcceptor =
        native_tls::TlsAcceptor::new(identity).unwrap().into();
    while let Ok((inbound, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            // A client that does not trust the certificate aborts here.
            let Ok(mut tls) = acceptor.accept(inbound).await else {
                return;
            };
            let Ok(mut plain) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        });
    }
}

fn tls_kafka(port: u16, ca: &str) -> KafkaConfig {
    let mut config = KafkaConfig {
        brokers: format!("localhost:{port}"),
        message_timeout: Duration::from_secs(5),
        ..KafkaConfig::default()
    };
    for (key, value) in [
        ("security.protocol", "ssl".to_string()),
        ("ssl.ca.location", tls_file(ca).display().to_string()),
        // The terminator listens on IPv4 only.
        ("broker.address.family", "v4".to_string()),
    ] {
        config.extra.insert(key.into(), value);
    }
    config
}

/// Invariant (TLS end to end): with `security.protocol=ssl` and the CA that
/// signed the broker's certificate (host name checked, librdkafka's
/// default), topic creation, every publish acknowledgement and the read
/// back all go over TLS and nothing is lost; with an unrelated CA nothing is
/// acknowledged.
// Multi-threaded: the subscription's start-up metadata lookup blocks its
// thread while the terminator, a task of this runtime, must answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_over_tls_and_an_untrusted_broker_gets_nothing() {
    let (inner, outer) = (free_port(), free_port());
    let _broker = start_broker(inner, &format!("localhost:{outer}"));
    let listener = TcpListener::bind(("127.0.0.1", outer)).await.unwrap();
    tokio::spawn(tls_terminator(
        listener,
        SocketAddr::from(([127, 0, 0, 1], inner)),
    ));
    // tansu is ready in well under a second; wait for its port anyway.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", inner)).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tansu did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let config = tls_kafka(outer, "ca.crt");
    let topic = format!("tls_{}", uuid::Uuid::now_v7().simple());
    outbox_kafka::ensure_topics(&config, &[topic.as_str()])
        .await
        .unwrap();
    let bus = KafkaBus::new(config.clone()).unwrap();
    let events: Vec<Event> = (0..50)
        .map(|i| Event::new(topic.clone(), format!("tls {i}")).with_key(format!("k{}", i % 5)))
        .collect();
    let deliveries = bus.publish(&events).await.unwrap();
    let acknowledged = deliveries.iter().filter(|d| d.is_acknowledged()).count();

    let mut consumer = ConsumerConfig::new(format!("g_{topic}"), [topic.as_str()]);
    consumer.session_timeout = Duration::from_secs(6);
    consumer.max_poll_interval = Duration::from_secs(7);
    let mut sub = KafkaSubscription::new(&config, consumer).unwrap();
    let mut read = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while read.len() < events.len() && tokio::time::Instant::now() < deadline {
        use outbox_core::Subscription;
        read.extend(
            sub.poll_batch(1000, Duration::from_millis(500))
                .await
                .unwrap(),
        );
    }
    let mut ids: Vec<_> = read.iter().filter_map(|r| r.event_id().ok()).collect();
    ids.sort();
    ids.dedup();

    let untrusted_config = tls_kafka(outer, "other-ca.crt");
    let untrusted = KafkaBus::new(untrusted_config.clone()).unwrap();
    let refused = untrusted
        .publish(&[Event::new(topic.clone(), "must not arrive")])
        .await;
    // The start-up checks of the binaries say why, and do not retry.
    let check = untrusted
        .check_connection()
        .await
        .expect_err("untrusted broker");
    let lookup = outbox_kafka::topic_partitions(&untrusted_config, &topic)
        .await
        .expect_err("untrusted broker");
    for err in [&check, &lookup] {
        println!("untrusted CA: {err}");
        assert!(
            matches!(err, outbox_kafka::BusError::Security { .. }),
            "{err}"
        );
        assert!(!err.is_retryable(), "{err}");
        assert!(err.to_string().contains("ssl.ca.location"), "{err}");
    }
    let refused_acks = match &refused {
        Ok(deliveries) => deliveries.iter().filter(|d| d.is_acknowledged()).count(),
        Err(_) => 0,
    };
    println!(
        "tls: published={} acknowledged={acknowledged} read={} distinct={} untrusted_ca_acknowledged={refused_acks} untrusted_outcome={:?}",
        events.len(),
        read.len(),
        ids.len(),
        refused.as_ref().map(|d| d.iter().map(|d| match d {
            Delivery::Acknowledged(_) => "acknowledged".to_string(),
            Delivery::Rejected(r) | Delivery::Retryable(r) => r.clone(),
        }).collect::<Vec<_>>()).map_err(|e| e.to_string()),
    );
    assert_eq!(acknowledged, events.len());
    assert_eq!((read.len(), ids.len()), (events.len(), events.len()));
    assert_eq!(
        refused_acks, 0,
        "a broker whose certificate is not trusted must get nothing"
    );
}
