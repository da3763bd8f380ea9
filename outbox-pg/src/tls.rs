//! TLS to PostgreSQL, with libpq's `sslmode` semantics, on the system's
//! OpenSSL (through `native-tls`, the same library librdkafka links).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use postgres_native_tls::MakeTlsConnector;

use crate::PgError;

/// How a connection uses TLS: the values and meaning of libpq's `sslmode`.
///
/// | mode | encrypted | server certificate checked |
/// |---|---|---|
/// | `disable` | never | – |
/// | `prefer` (default) | when the server offers it | no |
/// | `require` | always | no |
/// | `verify-ca` | always | signed by a trusted CA |
/// | `verify-full` | always | signed by a trusted CA *and* issued for the host connected to |
///
/// Only `verify-full` protects against a man in the middle; the CAs trusted
/// are those of [`crate::PgConfig::ssl_root_cert`] alone (as libpq does), or
/// the system's when it is unset.
///
/// ```
/// use outbox_pg::SslMode;
/// assert_eq!("verify-full".parse::<SslMode>()?, SslMode::VerifyFull);
/// assert_eq!(SslMode::default(), SslMode::Prefer);
/// assert!("verify_full".parse::<SslMode>().is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server supports it, without checking its certificate.
    #[default]
    Prefer,
    /// TLS always, without checking the server's certificate.
    Require,
    /// TLS always; the certificate must chain to a trusted CA.
    VerifyCa,
    /// TLS always; the certificate must chain to a trusted CA and name the host.
    VerifyFull,
}

impl SslMode {
    /// The libpq name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = PgError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(PgError::Config(format!(
                "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            )))
            }
        })
    }
}

/// The driver's mode: it knows only whether to ask for TLS; checking the
/// certificate is the connector's part.
pub(crate) fn driver_mode(mode: SslMode) -> tokio_postgres::config::SslMode {
    match mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    }
}

/// The connector for `mode`, trusting only the PEM certificates of
/// `root_cert` (one or more) when given, the system's otherwise.
pub(crate) fn connector(
    mode: SslMode,
    root_cert: Option<&Path>,
) -> Result<MakeTlsConnector, PgError> {
    native_connector(mode, root_cert).map(MakeTlsConnector::new)
}

/// The OpenSSL connector behind [`connector`]: the replication connection
/// uses it directly, so it trusts exactly what the pool trusts.
pub(crate) fn native_connector(
    mode: SslMode,
    root_cert: Option<&Path>,
) -> Result<native_tls::TlsConnector, PgError> {
    let mut builder = native_tls::TlsConnector::builder();
    match mode {
        // libpq checks nothing in these modes; neither do we.
        SslMode::Disable | SslMode::Prefer | SslMode::Require => {
            builder.danger_accept_invalid_certs(true);
        }
        SslMode::VerifyCa => {
            builder.danger_accept_invalid_hostnames(true);
        }
        SslMode::VerifyFull => {}
    }
    if let Some(path) = root_cert {
        // Pinned, like libpq's sslrootcert: a certificate from any public CA
        // for the right name must not stand in for the private one.
        builder.disable_built_in_roots(true);
        for cert in read_pem_certificates(path)? {
            builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| PgError::Config(format!("cannot set up TLS: {e}")))
}

fn read_pem_certificates(path: &Path) -> Result<Vec<native_tls::Certificate>, PgError> {
    let unreadable = |reason: String| {
        PgError::Config(format!(
            "ssl_root_cert {}: {reason}",
            PathBuf::from(path).display()
        ))
    };
    let pem = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
    let certs = native_tls::Certificate::stack_from_pem(&pem)
        .map_err(|e| unreadable(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(unreadable("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// Whether a driver error is a TLS negotiation that cannot succeed by
/// waiting: a server certificate that is not trusted or not issued for this
/// host, or a server without TLS under `require` and stricter. A handshake
/// cut short by a restarting server is not one of them: it is retried.
pub(crate) fn is_tls_refusal(err: &tokio_postgres::Error) -> bool {
    // The driver's error kinds are private, and native-tls keeps OpenSSL's
    // verify result inside its message; both texts are stable.
    let text = crate::error::describe(err);
    text.contains("certificate verify failed") || text.contains("server does not support TLS")
}
