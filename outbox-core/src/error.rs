//! The one error type of the pipeline, classified as retryable or permanent.

use std::fmt;

/// A boxed error from an adapter (Postgres, Kafka, ClickHouse client errors).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used across the workspace.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which part of the pipeline failed; used in messages and as a metrics label.
/// Ordered the way events flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Stage {
    /// Reading or acknowledging events in the source (Postgres).
    Source,
    /// Publishing to or consuming from the bus (Kafka).
    Bus,
    /// Writing to the sink (ClickHouse).
    Sink,
    /// Configuration rejected before anything ran.
    Config,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Source => "source",
            Stage::Bus => "bus",
            Stage::Sink => "sink",
            Stage::Config => "config",
        })
    }
}

/// An error of the pipeline.
///
/// Every adapter maps its client errors into one of two classes. A
/// [`Error::Retryable`] failure (service down, timeout, leader change) leaves
/// the work where it was and the drivers retry it with backoff, forever. A
/// [`Error::Permanent`] failure (bad credentials, missing permission, invalid
/// configuration) will not heal by waiting: drivers stop and report it.
///
/// ```
/// use outbox_core::{Error, Stage};
///
/// let err = Error::retryable(Stage::Bus, "kafka at 127.0.0.1:9092 is not answering");
/// assert!(err.is_retryable());
/// assert_eq!(err.stage(), Stage::Bus);
/// ```
///
/// Its `Display` names only the stage; what happened is its
/// [`source`](std::error::Error::source). Print the whole story with
/// [`ErrorChain`]:
///
/// ```
/// use outbox_core::{Error, ErrorChain, Stage};
///
/// let err = Error::permanent(Stage::Sink, "clickhouse at http://ch:8123: authentication failed");
/// assert_eq!(err.to_string(), "sink");
/// assert_eq!(
///     ErrorChain(&err).to_string(),
///     "sink: clickhouse at http://ch:8123: authentication failed"
/// );
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A transient failure: retry later.
    #[error("{stage}")]
    Retryable {
        /// Where it happened.
        stage: Stage,
        /// What happened.
        #[source]
        source: BoxError,
    },
    /// A failure that retrying will not fix.
    #[error("{stage}")]
    Permanent {
        /// Where it happened.
        stage: Stage,
        /// What happened.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// A retryable error.
    pub fn retryable(stage: Stage, source: impl Into<BoxError>) -> Self {
        Error::Retryable {
            stage,
            source: source.into(),
        }
    }

    /// A permanent error.
    pub fn permanent(stage: Stage, source: impl Into<BoxError>) -> Self {
        Error::Permanent {
            stage,
            source: source.into(),
        }
    }

    /// Whether waiting and retrying can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Retryable { .. })
    }

    /// Where the error happened.
    pub fn stage(&self) -> Stage {
        match self {
            Error::Retryable { stage, .. } | Error::Permanent { stage, .. } => *stage,
        }
    }
}

/// An error and its causes on one line, outermost first, separated by `": "`:
/// how logs and messages print an error.
///
/// Every error of the workspace says only its own layer in `Display` and
/// leaves the rest to its `source()`, so each cause appears once. Errors of
/// driver crates (tokio-postgres, rdkafka, clickhouse) repeat their causes in
/// their own text; the adapters summarise them in their message instead of
/// exposing them as a source, so a chain never runs through them.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(err) = cause {
            write!(f, ": {err}")?;
            cause = err.source();
        }
        Ok(())
    }
}

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A permanent configuration error unless `value` ≥ 1 (the loops' config
/// checks).
pub(crate) fn at_least_one(name: &str, value: usize) -> Result<()> {
    if value >= 1 {
        return Ok(());
    }
    Err(Error::permanent(
        Stage::Config,
        format!("{name} must be at least 1"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("clickhouse at http://ch:8123: insert failed")]
    struct Adapter {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn a_chain_names_each_layer_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let err = Error::retryable(Stage::Sink, Adapter { source: io });
        assert_eq!(
            ErrorChain(&err).to_string(),
            "sink: clickhouse at http://ch:8123: insert failed: connection refused"
        );
    }
}
