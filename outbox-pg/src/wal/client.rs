//! The replication connection: PostgreSQL's streaming replication protocol
//! spoken on `postgres-protocol`'s message encoding and SCRAM.
//!
//! Ours rather than a crate's because the source must choose the pgoutput
//! protocol version (2, to receive large transactions while they run) and
//! send every standby status update itself, at positions it decides; the
//! maintained clients fix the first (see the crate README). What it does:
//! startup with `replication=database`, TLS with the very trust settings of
//! the pool ([`crate::SslMode`], on the same OpenSSL), SCRAM-SHA-256 (with
//! channel binding under TLS), MD5 and cleartext passwords,
//! `IDENTIFY_SYSTEM`, and the CopyBoth stream of `START_REPLICATION`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::change::lsn_text;
use crate::{PgConfig, SslMode};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// How long a clean stop waits for the server to end the stream.
const STOP_WAIT: Duration = Duration::from_secs(2);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why the replication connection failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// The connection broke or never opened (a server restarting, a network cut).
    #[error("replication connection: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS negotiation failed; `refused` when the trust settings refuse
    /// the server (waiting cannot help), not when it broke off.
    #[error("TLS: {detail}")]
    Tls { detail: String, refused: bool },
    /// The server answered with an error.
    #[error("{severity} {code}: {message}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
    },
    /// The password exchange cannot succeed.
    #[error("authentication: {0}")]
    Auth(String),
    /// The server sent what the protocol does not allow here.
    #[error("replication protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The SQLSTATE of a server error.
    pub(crate) fn sqlstate(&self) -> Option<&str> {
        match self {
            ClientError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Debug, Clone)]
pub(crate) struct SystemInfo {
    /// The database cluster's identifier (decimal).
    pub system_id: String,
    /// The server's current WAL flush position.
    pub xlogpos: u64,
}

/// One message of the stream.
#[derive(Debug)]
pub(crate) enum Replicated {
    /// A piece of the output plugin's output (one pgoutput message).
    XLogData { data: Bytes },
    /// The server's heartbeat: its WAL end, and whether it wants our status now.
    KeepAlive { wal_end: u64, reply: bool },
}

/// How the stream is started.
pub(crate) struct Start<'a> {
    pub slot: &'a str,
    pub publication: &'a str,
    pub from: u64,
    /// pgoutput's `streaming 'on'` with protocol 2 (PostgreSQL 14 and
    /// later): large transactions arrive while they run.
    pub stream_in_progress: bool,
}

/// A replication connection (`replication=database`).
pub(crate) struct Connection {
    io: Box<dyn Io>,
    input: BytesMut,
    output: BytesMut,
    /// `server_version_num` / 10,000: the major version.
    server_major: u32,
}

impl Connection {
    /// Connects and authenticates, within `pg.connect_timeout`.
    /// `options` are the session's `-c name=value` settings.
    pub(crate) async fn connect(
        pg: &PgConfig,
        options: &str,
        application_name: &str,
    ) -> Result<Self> {
        let timeout = pg.connect_timeout;
        tokio::time::timeout(timeout, Self::open(pg, options, application_name))
            .await
            .map_err(|_| {
                ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ))
            })?
    }

    async fn open(pg: &PgConfig, options: &str, application_name: &str) -> Result<Self> {
        let (io, binding): (Box<dyn Io>, Option<Vec<u8>>) = if pg.host.starts_with('/') {
            // A Unix socket directory, as libpq takes it; no TLS there.
            let path = format!("{}/.s.PGSQL.{}", pg.host, pg.port);
            (Box::new(tokio::net::UnixStream::connect(path).await?), None)
        } else {
            let tcp = tokio::net::TcpStream::connect((pg.host.as_str(), pg.port)).await?;
            tcp.set_nodelay(true)?;
            negotiate_tls(tcp, pg).await?
        };
        let mut conn = Connection {
            io,
            input: BytesMut::with_capacity(64 * 1024),
            output: BytesMut::with_capacity(1024),
            server_major: 0,
        };
        let params = [
            ("user", pg.user.as_str()),
            ("database", pg.dbname.as_str()),
            ("replication", "database"),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
            ("options", options),
        ];
        frontend::startup_message(params.iter().copied(), &mut conn.output)?;
        conn.flush().await?;
        conn.authenticate(pg, binding).await?;
        Ok(conn)
    }

    async fn authenticate(&mut self, pg: &PgConfig, binding: Option<Vec<u8>>) -> Result<()> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, mut body) = self.next_message().await?;
            match tag {
                b'R' => {
                    let code = get_i32(&mut body)?;
                    match code {
                        0 => {}
                        3 => {
                            frontend::password_message(pg.password.as_bytes(), &mut self.output)?;
                            self.flush().await?;
                        }
                        5 => {
                            let salt = take(&mut body, 4)?;
                            let salt = [salt[0], salt[1], salt[2], salt[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                pg.user.as_bytes(),
                                pg.password.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut self.output)?;
                            self.flush().await?;
                        }
                        10 => {
                            let mut mechanisms = Vec::new();
                            while body.first().is_some_and(|b| *b != 0) {
                                mechanisms.push(get_cstr(&mut body)?);
                            }
                            let plus = mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS);
                            let (mechanism, channel) = match (&binding, plus) {
                                (Some(cert_hash), true) => (
                                    SCRAM_SHA_256_PLUS,
                                    ChannelBinding::tls_server_end_point(cert_hash.clone()),
                                ),
                                (Some(_), false) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                                (None, _) => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                            };
                            if !plus && !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                                return Err(ClientError::Auth(format!(
                                    "the server offers only {mechanisms:?}"
                                )));
                            }
                            let exchange = ScramSha256::new(pg.password.as_bytes(), channel);
                            frontend::sasl_initial_response(mechanism, exchange.message(), &mut self.output)?;
                            self.flush().await?;
                            scram = Some(exchange);
                        }
                        11 => {
                            let exchange = scram.as_mut().ok_or_else(|| {
                                ClientError::Protocol("a SASL step before its start".into())
                            })?;
                            exchange
                                .update(&body)
                                .map_err(|e| ClientError::Auth(e.to_string()))?;
                            frontend::sasl_response(exchange.message(), &mut self.output)?;
                            self.flush().await?;
                        }
                        12 => {
                            let exchange = scram.as_mut().ok_or_else(|| {
                                ClientError::Protocol("a SASL end before its start".into())
                            })?;
                            exchange
                                .finish(&body)
                                .map_err(|e| ClientError::Auth(e.to_string()))?;
                        }
                        other => {
                            return Err(ClientError::Auth(format!(
                                "the server asks for authentication method {other} (Kerberos, GSSAPI or SSPI), \
                                 which the replication connection does not speak: admit the user with \
                                 scram-sha-256, md5 or password in pg_hba.conf"
                            )))
                        }
                    }
                }
                b'S' => {
                    let name = get_cstr(&mut body)?;
                    let value = get_cstr(&mut body)?;
                    if name == "server_version" {
                        self.server_major = major_version(&value);
                    }
                }
                b'Z' => return Ok(()),
                b'E' => return Err(server_error(body)),
                // BackendKeyData, notices: nothing to do.
                _ => {}
            }
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub(crate) async fn identify_system(&mut self) -> Result<SystemInfo> {
        frontend::query("IDENTIFY_SYSTEM", &mut self.output)?;
        self.flush().await?;
        let mut row: Option<Vec<Option<String>>> = None;
        loop {
            let (tag, mut body) = self.next_message().await?;
            match tag {
                b'D' => {
                    let count = get_i16(&mut body)?;
                    let mut fields = Vec::with_capacity(count.max(0) as usize);
                    for _ in 0..count {
                        let len = get_i32(&mut body)?;
                        fields.push(if len < 0 {
                            None
                        } else {
                            let bytes = take(&mut body, len as usize)?;
                            Some(String::from_utf8_lossy(&bytes).into_owned())
                        });
                    }
                    row = Some(fields);
                }
                b'E' => {
                    let err = server_error(body);
                    self.until_ready().await?;
                    return Err(err);
                }
                b'Z' => break,
                _ => {}
            }
        }
        let field = |i: usize| row.as_ref().and_then(|r| r.get(i).cloned().flatten());
        let system_id = field(0)
            .ok_or_else(|| ClientError::Protocol("IDENTIFY_SYSTEM returned no system id".into()))?;
        let xlogpos = field(2).and_then(|text| parse_lsn(&text)).ok_or_else(|| {
            ClientError::Protocol("IDENTIFY_SYSTEM returned no WAL position".into())
        })?;
        Ok(SystemInfo { system_id, xlogpos })
    }

    /// `START_REPLICATION`: the connection streams from here on. True when
    /// transactions in progress are streamed (asked for, and the server is
    /// 14 or later).
    pub(crate) async fn start(&mut self, start: &Start<'_>) -> Result<bool> {
        let streaming = start.stream_in_progress && self.server_major >= 14;
        let (version, stream) = if streaming {
            ("2", ", streaming 'on'")
        } else {
            ("1", "")
        };
        // Slot and publication names are checked to be [a-z0-9_] (WalConfig::validate).
        let query = format!(
            "START_REPLICATION SLOT \"{}\" LOGICAL {} (proto_version '{version}'{stream}, \
             publication_names '\"{}\"', messages 'true')",
            start.slot,
            lsn_text(start.from),
            start.publication,
        );
        frontend::query(&query, &mut self.output)?;
        self.flush().await?;
        loop {
            let (tag, body) = self.next_message().await?;
            match tag {
                b'W' => return Ok(streaming),
                b'E' => {
                    let err = server_error(body);
                    self.until_ready().await?;
                    return Err(err);
                }
                b'N' => {}
                other => {
                    return Err(ClientError::Protocol(format!(
                        "message {:?} where the stream should start",
                        other as char
                    )))
                }
            }
        }
    }

    /// The next message of the stream; `None` when the server ended it.
    /// Cancel safe: what was read stays buffered for the next call.
    pub(crate) async fn recv(&mut self) -> Result<Option<Replicated>> {
        loop {
            let (tag, mut body) = self.next_message().await?;
            match tag {
                b'd' => return parse_copy_data(&mut body).map(Some),
                b'c' => return Ok(None),
                b'E' => return Err(server_error(body)),
                b'N' => {}
                other => {
                    return Err(ClientError::Protocol(format!(
                        "message {:?} inside the replication stream",
                        other as char
                    )))
                }
            }
        }
    }

    /// Sends a standby status update: everything before `lsn` is written,
    /// flushed and applied (the slot's confirmed position moves to it).
    pub(crate) async fn send_status(&mut self, lsn: u64) -> Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
            - PG_EPOCH_MICROS;
        self.output.put_u8(b'd');
        self.output.put_i32(4 + 1 + 8 * 4 + 1);
        self.output.put_u8(b'r');
        for position in [lsn, lsn, lsn] {
            self.output.put_u64(position);
        }
        self.output.put_i64(now);
        self.output.put_u8(0);
        self.flush().await
    }

    /// Ends the stream cleanly: the server has read every status update
    /// sent before once this returns (or gave up waiting).
    pub(crate) async fn stop(mut self) {
        frontend::copy_done(&mut self.output);
        if self.flush().await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(STOP_WAIT, self.until_ready()).await;
        frontend::terminate(&mut self.output);
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }

    /// Reads up to the next ReadyForQuery, dropping what comes before.
    async fn until_ready(&mut self) -> Result<()> {
        loop {
            let (tag, _) = self.next_message().await?;
            if tag == b'Z' {
                return Ok(());
            }
        }
    }

    async fn flush(&mut self) -> Result<()> {
        self.io.write_all(&self.output).await?;
        self.output.clear();
        self.io.flush().await?;
        Ok(())
    }

    /// One backend message: its tag and body.
    async fn next_message(&mut self) -> Result<(u8, Bytes)> {
        loop {
            if let Some(message) = split_message(&mut self.input)? {
                return Ok(message);
            }
            if self.io.read_buf(&mut self.input).await? == 0 {
                return Err(ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }
}

/// Asks for TLS as `pg.ssl_mode` says, and returns the stream with the
/// server certificate's hash for SCRAM channel binding when encrypted.
async fn negotiate_tls(
    mut tcp: tokio::net::TcpStream,
    pg: &PgConfig,
) -> Result<(Box<dyn Io>, Option<Vec<u8>>)> {
    if pg.ssl_mode == SslMode::Disable {
        return Ok((Box::new(tcp), None));
    }
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    let answer = tcp.read_u8().await?;
    if answer != b'S' {
        if pg.ssl_mode == SslMode::Prefer {
            return Ok((Box::new(tcp), None));
        }
        return Err(ClientError::Tls {
            detail: format!(
                "server does not support TLS, which sslmode {} requires",
                pg.ssl_mode
            ),
            refused: true,
        });
    }
    let connector = crate::tls::native_connector(pg.ssl_mode, pg.ssl_root_cert.as_deref())
        .map_err(|e| ClientError::Tls {
            detail: e.to_string(),
            refused: true,
        })?;
    let stream = tokio_native_tls::TlsConnector::from(connector)
        .connect(&pg.host, tcp)
        .await
        .map_err(|e| {
            let detail = e.to_string();
            ClientError::Tls {
                refused: detail.contains("certificate verify failed"),
                detail,
            }
        })?;
    let binding = stream.get_ref().tls_server_end_point().ok().flatten();
    Ok((Box::new(stream), binding))
}

/// Splits one whole message off the front of `input`, if it holds one.
fn split_message(input: &mut BytesMut) -> Result<Option<(u8, Bytes)>> {
    if input.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([input[1], input[2], input[3], input[4]]);
    if len < 4 {
        return Err(ClientError::Protocol(format!("a message of length {len}")));
    }
    let total = 1 + len as usize;
    if input.len() < total {
        input.reserve(total - input.len());
        return Ok(None);
    }
    let mut frame = input.split_to(total).freeze();
    let tag = frame[0];
    frame.advance(5);
    Ok(Some((tag, frame)))
}

/// A CopyData message of the stream: XLogData or a keepalive.
fn parse_copy_data(body: &mut Bytes) -> Result<Replicated> {
    let kind = get_u8(body)?;
    match kind {
        b'w' => {
            let _start = get_u64(body)?;
            let _end = get_u64(body)?;
            let _clock = get_u64(body)?;
            Ok(Replicated::XLogData {
                data: std::mem::take(body),
            })
        }
        b'k' => {
            let wal_end = get_u64(body)?;
            let _clock = get_u64(body)?;
            let reply = get_u8(body)? == 1;
            Ok(Replicated::KeepAlive { wal_end, reply })
        }
        other => Err(ClientError::Protocol(format!(
            "CopyData of kind {:?} in the replication stream",
            other as char
        ))),
    }
}

/// An ErrorResponse's fields.
fn server_error(mut body: Bytes) -> ClientError {
    let (mut severity, mut code, mut message, mut detail, mut hint) =
        (String::new(), String::new(), String::new(), None, None);
    while let Ok(field) = get_u8(&mut body) {
        if field == 0 {
            break;
        }
        let Ok(value) = get_cstr(&mut body) else {
            break;
        };
        match field {
            b'V' => severity = value,
            b'S' if severity.is_empty() => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
    }
    let detail = match (detail, hint) {
        (Some(d), Some(h)) => Some(format!("{d}; {h}")),
        (d, h) => d.or(h),
    };
    ClientError::Server {
        severity,
        code,
        message,
        detail,
    }
}

fn major_version(server_version: &str) -> u32 {
    server_version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or(0)
}

/// Parses PostgreSQL's `X/Y` LSN text.
pub(crate) fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    (high <= u32::MAX as u64 && low <= u32::MAX as u64).then_some((high << 32) | low)
}

fn truncated() -> ClientError {
    ClientError::Protocol("a message shorter than its fields".into())
}

fn take(body: &mut Bytes, len: usize) -> Result<Bytes> {
    if body.len() < len {
        return Err(truncated());
    }
    Ok(body.split_to(len))
}

fn get_u8(body: &mut Bytes) -> Result<u8> {
    body.try_get_u8().map_err(|_| truncated())
}

fn get_i16(body: &mut Bytes) -> Result<i16> {
    body.try_get_i16().map_err(|_| truncated())
}

fn get_i32(body: &mut Bytes) -> Result<i32> {
    body.try_get_i32().map_err(|_| truncated())
}

fn get_u64(body: &mut Bytes) -> Result<u64> {
    body.try_get_u64().map_err(|_| truncated())
}

fn get_cstr(body: &mut Bytes) -> Result<String> {
    let end = body.iter().position(|b| *b == 0).ok_or_else(truncated)?;
    let text = String::from_utf8_lossy(&body[..end]).into_owned();
    body.advance(end + 1);
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_split_only_when_whole() -> Result<()> {
        let mut input = BytesMut::from(&[b'Z', 0, 0, 0, 5, b'I', b'd', 0, 0][..]);
        assert_eq!(
            split_message(&mut input)?,
            Some((b'Z', Bytes::from_static(b"I")))
        );
        assert_eq!(split_message(&mut input)?, None, "a partial header waits");
        input.extend_from_slice(&[0, 6, b'x']);
        assert_eq!(split_message(&mut input)?, None, "a partial body waits");
        input.extend_from_slice(b"y");
        assert_eq!(
            split_message(&mut input)?,
            Some((b'd', Bytes::from_static(b"xy")))
        );
        let mut bad = BytesMut::from(&[b'd', 0, 0, 0, 2][..]);
        assert!(split_message(&mut bad).is_err());
        Ok(())
    }

    #[test]
    fn copy_data_carries_wal_or_a_keepalive() -> Result<()> {
        let mut xlog = BytesMut::new();
        xlog.put_u8(b'w');
        xlog.put_u64(1);
        xlog.put_u64(2);
        xlog.put_u64(3);
        xlog.put_slice(b"B...");
        match parse_copy_data(&mut xlog.freeze())? {
            Replicated::XLogData { data } => assert_eq!(&data[..], b"B..."),
            other => panic!("{other:?}"),
        }
        let mut keepalive = BytesMut::new();
        keepalive.put_u8(b'k');
        keepalive.put_u64(0x16_0000_0028);
        keepalive.put_u64(0);
        keepalive.put_u8(1);
        match parse_copy_data(&mut keepalive.freeze())? {
            Replicated::KeepAlive { wal_end, reply } => {
                assert_eq!((wal_end, reply), (0x16_0000_0028, true))
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_copy_data(&mut Bytes::from_static(b"k\0\0")).is_err());
        Ok(())
    }

    #[test]
    fn server_errors_keep_their_sqlstate_and_detail() {
        let body = Bytes::from_static(
            b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0Dheld\0\0",
        );
        let err = server_error(body);
        assert_eq!(err.sqlstate(), Some("55006"));
        assert_eq!(
            err.to_string(),
            "ERROR 55006: replication slot \"s\" is active for PID 7 (held)"
        );
    }

    #[test]
    fn lsn_text_round_trips() {
        for lsn in [0, 0x16_B374_D848, u64::MAX] {
            assert_eq!(parse_lsn(&lsn_text(lsn)), Some(lsn));
        }
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("16B374D848"), None);
        assert_eq!(major_version("15.18 (Debian 15.18-0+deb12u1)"), 15);
        assert_eq!(major_version("17beta1"), 17);
    }
}
