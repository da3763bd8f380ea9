//! Errors of the ClickHouse sink and their classification.

use outbox_core::Stage;

/// An error of the ClickHouse sink.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// A database or table name is not a safe identifier.
    #[error("invalid clickhouse {field} {value:?}: only letters, digits and '_' are allowed, not starting with a digit")]
    InvalidIdentifier {
        /// Which setting.
        field: String,
        /// The rejected value.
        value: String,
    },
    /// Configuration that cannot work.
    #[error("invalid clickhouse configuration: {0}")]
    Config(String),
    /// The bus serves, at a position the table already holds, a different
    /// event than the one stored there: the topic started over (deleted and
    /// created again, or its broker lost its data). Skipping the record as a
    /// redelivery would lose it, so the sink stops.
    #[error(
        "topic {topic} partition {partition} offset {offset}: table {table} already holds event \
         {stored_event_id:?} at this position, but the broker now serves event {record_event_id:?} \
         there. The topic's offsets started over (it was deleted and created again, or the \
         broker lost its data), so positions no longer identify events; nothing of this batch \
         was written or skipped. Recover by pointing the consumer at a new table (or moving \
         this table's rows of the old topic aside) and reading the new topic from its beginning; \
         see GUARANTEES.md, \"A topic that starts over\""
    )]
    OffsetRegression {
        /// Kafka topic.
        topic: String,
        /// Kafka partition.
        partition: i32,
        /// The first offset found holding another event.
        offset: i64,
        /// `database.table` holding the stored row.
        table: String,
        /// The event id stored at that position ("" when the dead letter had none).
        stored_event_id: String,
        /// The event id the broker now serves there ("" when the record has none).
        record_event_id: String,
    },
    /// A request to the server failed.
    #[error("clickhouse at {url}: {operation} failed: {detail}")]
    Request {
        /// Endpoint.
        url: String,
        /// What was being done.
        operation: &'static str,
        /// What went wrong, with a hint.
        detail: String,
        /// Whether waiting can help.
        retryable: bool,
        /// The driver's error, for inspection. Not the `source()`: the
        /// message above already carries its text, and driver errors repeat
        /// their own causes, so a chain through it would say things twice.
        cause: clickhouse::error::Error,
    },
}

impl SinkError {
    pub(crate) fn request(
        url: &str,
        operation: &'static str,
        source: clickhouse::error::Error,
    ) -> Self {
        let (retryable, hint) = classify(&source);
        let mut detail = source.to_string();
        // Server messages can be long multi-line stack traces: keep the first line.
        if let Some(first) = detail.lines().next() {
            detail = first.to_string();
        }
        // A network error says what failed only in its causes ("client error
        // (Connect)" alone names neither the refused port nor the certificate).
        if let clickhouse::error::Error::Network(inner) = &source {
            let mut cause = inner.source();
            while let Some(e) = cause {
                // TLS errors repeat their cause in their own message.
                let text = e.to_string();
                if !detail.contains(&text) {
                    detail.push_str(": ");
                    detail.push_str(&text);
                }
                cause = e.source();
            }
        }
        if let Some(hint) = hint {
            detail.push_str("; ");
            detail.push_str(hint);
        }
        SinkError::Request {
            url: url.to_string(),
            operation,
            detail,
            retryable,
            cause: source,
        }
    }

    /// Whether waiting and retrying can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::InvalidIdentifier { .. }
            | SinkError::Config(_)
            | SinkError::OffsetRegression { .. } => false,
            SinkError::Request { retryable, .. } => *retryable,
        }
    }
}

impl From<SinkError> for outbox_core::Error {
    fn from(err: SinkError) -> Self {
        if err.is_retryable() {
            outbox_core::Error::retryable(Stage::Sink, err)
        } else {
            outbox_core::Error::permanent(Stage::Sink, err)
        }
    }
}

/// The ClickHouse error code in a server response (`Code: 60. ...`).
pub fn server_code(err: &clickhouse::error::Error) -> Option<u32> {
    let clickhouse::error::Error::BadResponse(text) = err else {
        return None;
    };
    let start = text.find("Code: ")? + "Code: ".len();
    let digits: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Which failures are permanent: the named server codes below (auth, missing
/// objects, bad SQL or data) and client-side encoding errors. Network
/// failures, timeouts and every other server code are retried.
fn classify(err: &clickhouse::error::Error) -> (bool, Option<&'static str>) {
    use clickhouse::error::Error as E;
    match err {
        E::Network(inner) if is_tls_refusal(inner.as_ref()) => (
            false,
            Some(
                "check the TLS settings: ca_file must hold the CA that signed ClickHouse's \
                 certificate, and the URL's host must be a name the certificate is issued for",
            ),
        ),
        E::Network(_) | E::TimedOut => (true, Some("is ClickHouse running and reachable there?")),
        E::BadResponse(_) => match server_code(err) {
            Some(192 | 193 | 516 | 194) => (false, Some("check the clickhouse user and password")),
            Some(497) => (false, Some("the clickhouse user lacks a privilege")),
            Some(81) => (false, Some("the database does not exist")),
            Some(60) => (false, Some("the table does not exist")),
            Some(16 | 47) => (false, Some("the table lacks a column the sink writes")),
            Some(62) => (false, None),
            Some(27 | 53 | 117 | 70 | 72 | 69) => (false, Some("a value does not fit the table")),
            _ => (true, None),
        },
        E::InvalidParams(_) | E::SchemaMismatch(_) | E::Unsupported(_) => (false, None),
        _ => (true, None),
    }
}

/// A certificate the client does not trust: waiting does not fix it.
fn is_tls_refusal(err: &(dyn std::error::Error + 'static)) -> bool {
    // OpenSSL's verify result is only in the messages of the chain.
    let mut current = Some(err);
    while let Some(e) = current {
        if e.to_string().contains("certificate verify failed") {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_codes() {
        let err = clickhouse::error::Error::BadResponse(
            "Code: 193, e.displayText() = DB::Exception: Wrong password for user user".into(),
        );
        assert_eq!(server_code(&err), Some(193));
        assert!(!SinkError::request("u", "insert", err).is_retryable());
        let other = clickhouse::error::Error::BadResponse("Code: 999. whatever".into());
        assert!(SinkError::request("u", "insert", other).is_retryable());
    }
}
