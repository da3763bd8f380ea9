//! The HTTP(S) client, the settings every write runs with, and bounded
//! requests.

use clickhouse::Client;

use crate::{ClickHouseConfig, SinkError};

/// A client for `config`. Validation of row types against the schema is off:
/// ClickHouse 18.16 lacks the `RowBinaryWithNamesAndTypes` format it needs.
/// Speaks HTTP and HTTPS (the system's OpenSSL, verifying the server's
/// certificate and host name); fails when [`ClickHouseConfig::ca_file`]
/// cannot be read.
pub fn client_for(config: &ClickHouseConfig) -> Result<Client, SinkError> {
    // The crate's default client leaves Nagle's algorithm on: the last small
    // chunk of an insert body then waits for the server's delayed ACK, about
    // 40 ms on Linux, which tripled the cost of a small insert. Same pool
    // and keepalive settings as the default otherwise.
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(std::time::Duration::from_secs(60)));
    connector.enforce_http(false);
    let builder = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(2))
        .clone();
    // A plain `http://` server needs no TLS: building OpenSSL's connector
    // loads the system's CA bundle, a start-up cost paid for each client.
    let client = if config.url.starts_with("http://") && config.ca_file.is_none() {
        Client::with_http_client(builder.build(connector))
    } else {
        Client::with_http_client(builder.build(hyper_tls::HttpsConnector::from((
            connector,
            tls_connector(config)?.into(),
        ))))
    };
    let mut client = client
        .with_url(&config.url)
        .with_user(&config.user)
        .with_password(&config.password)
        .with_database(&config.database)
        .with_validation(false);
    for (name, value) in write_settings(config, &ServerFacts::default()) {
        client = client.with_setting(name, value);
    }
    Ok(client)
}

/// OpenSSL's connector for `config`: the system's roots, or only the CAs
/// of [`ClickHouseConfig::ca_file`] when set.
fn tls_connector(config: &ClickHouseConfig) -> Result<native_tls::TlsConnector, SinkError> {
    let mut tls = native_tls::TlsConnector::builder();
    if let Some(path) = &config.ca_file {
        let unreadable =
            |reason: String| SinkError::Config(format!("ca_file {}: {reason}", path.display()));
        let pem = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
        let certs = native_tls::Certificate::stack_from_pem(&pem)
            .map_err(|e| unreadable(format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(unreadable("holds no PEM certificate".into()));
        }
        // Pinned, as curl's --cacert: only the given CAs are trusted.
        tls.disable_built_in_roots(true);
        for cert in certs {
            tls.add_root_certificate(cert);
        }
    }
    tls.build()
        .map_err(|e| SinkError::Config(format!("cannot set up TLS: {e}")))
}

/// What the sink learns of its server and table at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ServerFacts {
    /// `(major, minor)` of `SELECT version()`; `(0, 0)` unknown.
    pub version: (u32, u32),
    /// Whether the data table is a `Distributed` table.
    pub distributed_table: bool,
    /// Replicas of each shard of the configured cluster (`system.clusters`).
    pub replicas_per_shard: Vec<u32>,
    /// Whether the server knows `insert_deduplication_token` (22.2 and
    /// later; read from `system.settings`, not guessed from the version).
    pub dedup_token: bool,
}

/// The settings every write and lookup of the sink runs with: what keeps an
/// acknowledged insert durable where the lookups see it.
///
/// - An insert into a `Distributed` table (configured as a cluster, or found
///   to be one) is acknowledged only once every shard wrote its rows
///   (`insert_distributed_sync`); otherwise the server acknowledges rows it
///   has only queued, and a lookup right after would miss them.
/// - With `insert_quorum`, reads are sequentially consistent, so a lookup
///   never reads a replica behind the last quorum insert; servers that can
///   run quorum inserts in parallel (20.10 and later) are told not to, since
///   sequential consistency only holds for sequential quorum inserts.
pub(crate) fn write_settings(
    config: &ClickHouseConfig,
    facts: &ServerFacts,
) -> Vec<(&'static str, String)> {
    let mut settings = Vec::new();
    if config.cluster.is_some() || facts.distributed_table {
        settings.push(("insert_distributed_sync", "1".to_string()));
    }
    if let Some(cluster) = &config.cluster {
        let quorum = match cluster.insert_quorum {
            Some(quorum) => quorum,
            None if cluster.replicated => {
                facts.replicas_per_shard.iter().copied().min().unwrap_or(0)
            }
            None => 0,
        };
        // ClickHouse treats a quorum below 2 as no quorum.
        if quorum >= 2 {
            settings.push(("insert_quorum", quorum.to_string()));
            settings.push(("select_sequential_consistency", "1".to_string()));
            if facts.version >= (20, 10) {
                settings.push(("insert_quorum_parallel", "0".to_string()));
            }
        }
    }
    settings
}

/// `(major, minor)` of a ClickHouse version string such as `18.16.1`.
pub(crate) fn parse_version(text: &str) -> (u32, u32) {
    let mut parts = text
        .trim()
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Runs `SELECT 1` on the server of `config`, with a classified error
/// (retryable when the server is down, permanent for bad credentials): the
/// start-up check of the binaries.
pub async fn check_connection(config: &ClickHouseConfig) -> Result<(), SinkError> {
    // A client without a database: the configured one may not exist yet.
    let probe = client_for(&ClickHouseConfig {
        database: "default".into(),
        ..config.clone()
    })?;
    probe
        .query("SELECT 1")
        .execute()
        .await
        .map_err(|e| SinkError::request(&config.url, "connection check", e))
}

/// Runs a query with the insert timeout as its limit: a server that stopped
/// answering must not hang the caller.
pub(crate) async fn bounded<T>(
    config: &ClickHouseConfig,
    operation: &'static str,
    query: impl std::future::Future<Output = clickhouse::error::Result<T>>,
) -> Result<T, SinkError> {
    match tokio::time::timeout(config.insert_timeout, query).await {
        Ok(result) => result.map_err(|e| SinkError::request(&config.url, operation, e)),
        Err(_) => Err(SinkError::request(
            &config.url,
            operation,
            clickhouse::error::Error::TimedOut,
        )),
    }
}

#[cfg(test)]
mod settings_tests {
    use super::*;
    use crate::ClusterConfig;

    fn names(config: &ClickHouseConfig, facts: &ServerFacts) -> Vec<String> {
        write_settings(config, facts)
            .into_iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect()
    }

    #[test]
    fn distributed_inserts_wait_for_the_shards_and_quorum_reads_are_sequential() {
        let one_server = ClickHouseConfig::default();
        assert!(names(&one_server, &ServerFacts::default()).is_empty());
        let found_distributed = ServerFacts {
            version: (18, 16),
            distributed_table: true,
            ..ServerFacts::default()
        };
        assert_eq!(
            names(&one_server, &found_distributed),
            ["insert_distributed_sync=1"]
        );
        let quorum = ClickHouseConfig {
            cluster: Some(ClusterConfig {
                insert_quorum: Some(2),
                ..ClusterConfig::new("c")
            }),
            ..ClickHouseConfig::default()
        };
        let old = ServerFacts {
            version: (18, 16),
            distributed_table: true,
            ..ServerFacts::default()
        };
        assert_eq!(
            names(&quorum, &old),
            [
                "insert_distributed_sync=1",
                "insert_quorum=2",
                "select_sequential_consistency=1"
            ]
        );
        let current = ServerFacts {
            version: (26, 9),
            distributed_table: true,
            ..ServerFacts::default()
        };
        assert!(names(&quorum, &current).contains(&"insert_quorum_parallel=0".to_string()));
        // Found from the cluster: the fewest replicas of any shard; 1 is no quorum.
        let auto = ClickHouseConfig {
            cluster: Some(ClusterConfig::new("c")),
            ..ClickHouseConfig::default()
        };
        let two_replicas = ServerFacts {
            version: (18, 16),
            replicas_per_shard: vec![2, 2],
            ..ServerFacts::default()
        };
        assert!(names(&auto, &two_replicas).contains(&"insert_quorum=2".to_string()));
        let uneven = ServerFacts {
            replicas_per_shard: vec![2, 1],
            ..two_replicas.clone()
        };
        assert!(!names(&auto, &uneven)
            .iter()
            .any(|s| s.starts_with("insert_quorum")));
        assert_eq!(parse_version("18.16.1"), (18, 16));
        assert_eq!(parse_version("26.9.2.1"), (26, 9));
        assert_eq!(parse_version("garbage"), (0, 0));
    }
}
