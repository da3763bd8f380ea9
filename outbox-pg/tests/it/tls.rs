//! TLS to a real PostgreSQL: the stack's server offers TLS with a
//! certificate for `localhost` signed by the stack's own CA
//! (`.stack/tls/ca.crt`; `OUTBOX_TLS_DIR` to use another folder).

use std::path::PathBuf;
use std::time::Duration;

use outbox_core::{Event, Source};
use outbox_pg::{check_connection, PgConfig, PgError, SslMode};

fn tls_file(name: &str) -> PathBuf {
    test_support::tls_file(name)
}

fn tls_config(host: &str, ssl_mode: SslMode, root: Option<&str>) -> PgConfig {
    PgConfig {
        host: host.into(),
        ssl_mode,
        ssl_root_cert: root.map(tls_file),
        ..super::pg_config()
    }
}

/// Whether the session of a connection from this config runs over TLS.
async fn session_uses_tls(config: &PgConfig) -> Result<bool, PgError> {
    let pool = config.create_pool()?;
    let client = outbox_pg::connection(&pool, &config.target()).await?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| PgError::Config(e.to_string()))?;
    Ok(row.get(0))
}

fn assert_tls_refused(result: Result<(), PgError>, case: &str) {
    let err = result.expect_err(case);
    let text = err.to_string();
    println!("{case}: {text}");
    assert!(matches!(err, PgError::Connect { .. }), "{case}: {text}");
    assert!(
        !err.is_retryable(),
        "{case}: a refused certificate is permanent: {text}"
    );
    assert!(
        text.contains("TLS settings"),
        "{case}: the message says what to check: {text}"
    );
}

/// verify-full: the connection is encrypted, the outbox works over it (a
/// pool for enqueue and claims, a dedicated session for NOTIFY), and the
/// certificate is checked against the CA and the host name.
#[tokio::test]
async fn verify_full_encrypts_and_checks_ca_and_host() {
    let config = tls_config("localhost", SslMode::VerifyFull, Some("ca.crt"));
    assert!(
        session_uses_tls(&config).await.unwrap(),
        "verify-full must encrypt"
    );

    let pool = config.create_pool().unwrap();
    let outbox_config = super::outbox_config("tls_full").validate().unwrap();
    {
        let client = pool.get().await.unwrap();
        client
            .batch_execute("DROP TABLE IF EXISTS t_tls_full; DROP TABLE IF EXISTS t_tls_full_dead;")
            .await
            .unwrap();
        outbox_pg::migrate(&client, &outbox_config).await.unwrap();
    }
    let outbox = outbox_pg::Outbox::new(&outbox_config);
    let source = outbox_pg::PgOutboxSource::new(pool.clone(), "tls", outbox_config)
        .listen_for_events(config.clone());
    // The listener wakes once when its own session has connected and
    // LISTENs (over verify-full like the pool); then once per commit.
    let connected = std::time::Instant::now();
    source
        .wait_for_events(Duration::from_secs(10))
        .await
        .unwrap();
    let listening_after = connected.elapsed();
    let mut client = pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    outbox
        .enqueue(&tx, &[Event::new("t", "over tls").with_key("k")])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let waited = std::time::Instant::now();
    source
        .wait_for_events(Duration::from_secs(10))
        .await
        .unwrap();
    let woken_after = waited.elapsed();
    let claimed = source
        .claim(10)
        .await
        .unwrap()
        .expect("the event is pending");
    println!(
        "verify-full: claimed={} listening_after={listening_after:?} notified_after={woken_after:?}",
        claimed.events.len()
    );
    assert_eq!(claimed.events.len(), 1);
    assert!(
        listening_after < Duration::from_secs(5) && woken_after < Duration::from_secs(5),
        "the LISTEN session must connect over verify-full and be notified of the commit"
    );
    drop(claimed);

    // The certificate names localhost, not 127.0.0.1.
    let by_address = tls_config("127.0.0.1", SslMode::VerifyFull, Some("ca.crt"));
    assert_tls_refused(
        check_connection(&by_address.create_pool().unwrap(), &by_address.target()).await,
        "verify-full to a host the certificate does not name",
    );
    // A CA that did not sign the server's certificate.
    let other = tls_config("localhost", SslMode::VerifyFull, Some("other-ca.crt"));
    assert_tls_refused(
        check_connection(&other.create_pool().unwrap(), &other.target()).await,
        "verify-full with an unrelated CA",
    );
    // A bundle is read whole: the signing CA may come after another one.
    let bundle = std::env::temp_dir().join(format!("outbox-ca-bundle-{}.pem", std::process::id()));
    let mut pem = std::fs::read(tls_file("other-ca.crt")).unwrap();
    pem.extend(std::fs::read(tls_file("ca.crt")).unwrap());
    std::fs::write(&bundle, pem).unwrap();
    let bundled = PgConfig {
        ssl_root_cert: Some(bundle.clone()),
        ..tls_config("localhost", SslMode::VerifyFull, None)
    };
    let bundle_result = session_uses_tls(&bundled).await;
    let _ = std::fs::remove_file(&bundle);
    assert!(bundle_result.unwrap(), "verify-full with a two-CA bundle");
    // Without a CA file only the system's CAs are trusted: not the stack's.
    let system = tls_config("localhost", SslMode::VerifyFull, None);
    assert_tls_refused(
        check_connection(&system.create_pool().unwrap(), &system.target()).await,
        "verify-full with the system CAs only",
    );
}

/// verify-ca checks the chain but not the host name; require and prefer
/// encrypt without checking; disable does not encrypt.
#[tokio::test]
async fn weaker_modes_do_what_libpq_does() {
    let ca = tls_config("127.0.0.1", SslMode::VerifyCa, Some("ca.crt"));
    assert!(session_uses_tls(&ca).await.unwrap(), "verify-ca by address");
    let other = tls_config("127.0.0.1", SslMode::VerifyCa, Some("other-ca.crt"));
    assert_tls_refused(
        check_connection(&other.create_pool().unwrap(), &other.target()).await,
        "verify-ca with an unrelated CA",
    );
    for (mode, encrypted) in [
        (SslMode::Require, true),
        (SslMode::Prefer, true),
        (SslMode::Disable, false),
    ] {
        let config = tls_config("127.0.0.1", mode, None);
        let got = session_uses_tls(&config).await.unwrap();
        println!("sslmode={mode} encrypted={got}");
        assert_eq!(got, encrypted, "sslmode={mode}");
    }
}

#[tokio::test]
async fn unreadable_ca_file_is_a_configuration_error_naming_it() {
    let config = PgConfig {
        ssl_mode: SslMode::VerifyFull,
        ssl_root_cert: Some("/nonexistent/ca.pem".into()),
        ..super::pg_config()
    };
    let err = config.create_pool().expect_err("no such file");
    let text = err.to_string();
    assert!(matches!(err, PgError::Config(_)), "{text}");
    assert!(text.contains("/nonexistent/ca.pem"), "{text}");
    assert!(!err.is_retryable());
}
