//! Connection settings and the connection pool.

use std::path::PathBuf;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};

use crate::error::{describe, hint_for};
use crate::{PgError, SslMode};

/// How to reach PostgreSQL. Defaults are the demo's: `admin`/`admin` on
/// 127.0.0.1:5432, database `test_db`.
///
/// ```
/// let config = outbox_pg::PgConfig::default();
/// assert_eq!(config.port, 5432);
/// assert_eq!(config.target(), "127.0.0.1:5432/test_db");
/// ```
#[derive(Clone)]
pub struct PgConfig {
    /// Host name or address. Default: `127.0.0.1`.
    pub host: String,
    /// Port. Default: 5432.
    pub port: u16,
    /// User. Default: `admin`.
    pub user: String,
    /// Password. Default: `admin`. Never printed.
    pub password: String,
    /// Database. Default: `test_db`.
    pub dbname: String,
    /// Most connections in the pool. Default: 8.
    pub pool_size: usize,
    /// Timeout for establishing one connection. Default: 5 s.
    pub connect_timeout: Duration,
    /// `application_name` reported to the server. Default: `outbox`.
    pub application_name: String,
    /// TLS, as libpq's `sslmode` (see [`SslMode`]). Default: `prefer`.
    pub ssl_mode: SslMode,
    /// PEM file of the CA certificates that sign the server's certificate,
    /// as libpq's `sslrootcert`: under `verify-ca` and `verify-full` only
    /// these CAs are trusted (the system's when unset). Default: none.
    pub ssl_root_cert: Option<PathBuf>,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "admin".into(),
            password: "admin".into(),
            dbname: "test_db".into(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            application_name: "outbox".into(),
            ssl_mode: SslMode::default(),
            ssl_root_cert: None,
        }
    }
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("dbname", &self.dbname)
            .field("pool_size", &self.pool_size)
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .finish()
    }
}

impl PgConfig {
    /// `host:port/dbname`, for messages.
    pub fn target(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }

    /// The driver settings of one connection, for the pool and for the
    /// dedicated sessions (lease heartbeat, event listener).
    pub(crate) fn client_config(&self) -> tokio_postgres::Config {
        let mut pg = tokio_postgres::Config::new();
        pg.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .connect_timeout(self.connect_timeout)
            .keepalives_idle(Duration::from_secs(30))
            .ssl_mode(crate::tls::driver_mode(self.ssl_mode));
        pg
    }

    /// The TLS connector for [`PgConfig::ssl_mode`]; fails when the CA file
    /// cannot be read.
    pub(crate) fn tls(&self) -> Result<postgres_native_tls::MakeTlsConnector, PgError> {
        crate::tls::connector(self.ssl_mode, self.ssl_root_cert.as_deref())
    }

    /// Opens one connection outside any pool (a dedicated session), with a
    /// [`PgError::Connect`] naming the server on failure. The caller drives
    /// the returned connection.
    pub(crate) async fn connect_session(
        &self,
        pg: &tokio_postgres::Config,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<
                tokio_postgres::Socket,
                postgres_native_tls::TlsStream<tokio_postgres::Socket>,
            >,
        ),
        PgError,
    > {
        pg.connect(self.tls()?)
            .await
            .map_err(|e| connect_error(&e, &self.target()))
    }

    /// Builds a connection pool. No connection is opened yet: see [`check_connection`].
    pub fn create_pool(&self) -> Result<Pool, PgError> {
        if self.pool_size == 0 {
            return Err(PgError::Config("pool_size must be at least 1".into()));
        }
        let manager = Manager::from_config(
            self.client_config(),
            self.tls()?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(self.connect_timeout))
            .wait_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(|e| PgError::Config(e.to_string()))
    }
}

/// Takes a connection from `pool`, mapping failures to a [`PgError::Connect`]
/// that names the server and says what to check.
pub async fn connection(pool: &Pool, target: &str) -> Result<deadpool_postgres::Object, PgError> {
    pool.get().await.map_err(|err| pool_error(err, target))
}

/// Opens one connection and runs `SELECT 1`: the start-up check of the binaries.
pub async fn check_connection(pool: &Pool, target: &str) -> Result<(), PgError> {
    let client = connection(pool, target).await?;
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|e| PgError::query("connection check", e))?;
    Ok(())
}

/// A failed connection attempt as a [`PgError::Connect`], with a hint.
pub(crate) fn connect_error(e: &tokio_postgres::Error, target: &str) -> PgError {
    let (detail, retryable) = connect_detail(e);
    PgError::Connect {
        target: target.to_string(),
        detail,
        retryable,
    }
}

fn connect_detail(e: &tokio_postgres::Error) -> (String, bool) {
    let mut detail = describe(e);
    if crate::tls::is_tls_refusal(e) {
        detail.push_str(
            "; check the TLS settings (sslmode, and sslrootcert: the CA that signed the \
             server's certificate; verify-full also needs the host name the certificate names)",
        );
        return (detail, false);
    }
    let retryable = crate::error::is_retryable_pg(e);
    if e.as_db_error().is_none() {
        detail.push_str("; is PostgreSQL running and reachable there?");
    } else if let Some(code) = e.code() {
        if hint_for(code).is_none() && !retryable {
            detail.push_str("; check the connection settings");
        }
    }
    (detail, retryable)
}

pub(crate) fn pool_error(err: PoolError, target: &str) -> PgError {
    let (detail, retryable) = match &err {
        PoolError::Backend(e) => connect_detail(e),
        PoolError::Timeout(_) => (
            "timed out waiting for a connection; is PostgreSQL running and reachable there?".into(),
            true,
        ),
        other => (other.to_string(), false),
    };
    PgError::Connect {
        target: target.to_string(),
        detail,
        retryable,
    }
}
