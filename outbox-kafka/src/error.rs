//! Errors of the Kafka adapter and their classification.

use outbox_core::Stage;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// An error of the Kafka bus.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// A client could not be created from the configuration.
    #[error("kafka at {brokers}: invalid client configuration: {cause}")]
    Config {
        /// Bootstrap servers.
        brokers: String,
        /// The driver's error, for inspection. Not the `source()`: the
        /// message above already carries its text, and driver errors repeat
        /// their own causes, so a chain through it would say things twice.
        cause: KafkaError,
    },
    /// An option of this crate's configuration is invalid.
    #[error("kafka at {brokers}: {detail}")]
    InvalidOption {
        /// Bootstrap servers.
        brokers: String,
        /// Which option, and what it needs.
        detail: String,
    },
    /// The brokers did not answer.
    #[error("kafka at {brokers} is unreachable: {detail}; is the broker running?")]
    Unreachable {
        /// Bootstrap servers.
        brokers: String,
        /// What went wrong.
        detail: String,
    },
    /// A TLS handshake or SASL authentication with the brokers failed.
    #[error(
        "kafka at {brokers}: TLS or SASL failed: {detail}; check security.protocol, \
         ssl.ca.location (the CA that signed the broker's certificate, which must name the \
         broker's host) and the sasl.* settings"
    )]
    Security {
        /// Bootstrap servers.
        brokers: String,
        /// librdkafka's reason.
        detail: String,
    },
    /// Creating a topic failed.
    #[error("kafka at {brokers}: cannot create topic {topic:?}: {detail}")]
    CreateTopic {
        /// Bootstrap servers.
        brokers: String,
        /// The topic.
        topic: String,
        /// What went wrong.
        detail: String,
        /// Whether waiting can help.
        retryable: bool,
    },
    /// Consuming or committing failed.
    #[error("kafka at {brokers}: {operation} failed: {cause}")]
    Consumer {
        /// Bootstrap servers.
        brokers: String,
        /// What was being done.
        operation: &'static str,
        /// The driver's error, for inspection. Not the `source()`: the
        /// message above already carries its text, and driver errors repeat
        /// their own causes, so a chain through it would say things twice.
        cause: KafkaError,
    },
    /// The producer hit a fatal error and must be recreated.
    #[error("kafka at {brokers}: fatal producer error: {detail}")]
    FatalProducer {
        /// Bootstrap servers.
        brokers: String,
        /// What went wrong.
        detail: String,
    },
}

impl BusError {
    /// Whether waiting and retrying can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            BusError::Config { .. }
            | BusError::Security { .. }
            | BusError::InvalidOption { .. } => false,
            BusError::Unreachable { .. } | BusError::FatalProducer { .. } => true,
            BusError::CreateTopic { retryable, .. } => *retryable,
            BusError::Consumer { cause, .. } => !is_permanent_kafka(cause),
        }
    }
}

impl From<BusError> for outbox_core::Error {
    fn from(err: BusError) -> Self {
        if err.is_retryable() {
            outbox_core::Error::retryable(Stage::Bus, err)
        } else {
            outbox_core::Error::permanent(Stage::Bus, err)
        }
    }
}

/// Codes for which a message can never be delivered: waiting will not help,
/// the event is dead-lettered. Everything else is retried.
pub fn is_permanent_delivery_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidArgument
            | RDKafkaErrorCode::UnsupportedForMessageFormat
            | RDKafkaErrorCode::InvalidTimestamp
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::PolicyViolation
    )
}

/// Errors of the client itself that retrying will not fix (authentication,
/// authorisation, invalid configuration).
pub fn is_permanent_kafka(err: &KafkaError) -> bool {
    match err.rdkafka_error_code() {
        Some(code) => matches!(
            code,
            RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::InvalidArgument
                | RDKafkaErrorCode::InvalidGroupId
                | RDKafkaErrorCode::UnsupportedSASLMechanism
        ),
        None => matches!(
            err,
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_)
        ),
    }
}
