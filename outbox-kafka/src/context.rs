//! A client context that remembers librdkafka's last connection-level
//! failure, so an error can say *why* the brokers did not answer.

use std::sync::{Arc, Mutex};

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::ProducerContext;

/// librdkafka reports a failed TLS handshake or SASL exchange only through
/// its error callback; the call that then times out says "timed out" or
/// "transport failure". This context keeps the callback's reason for TLS
/// and SASL failures.
#[derive(Clone, Default)]
pub(crate) struct Reporting {
    security_failure: Arc<Mutex<Option<String>>>,
}

impl Reporting {
    /// The reason of the last TLS or SASL failure, if there was one.
    pub(crate) fn security_failure(&self) -> Option<String> {
        self.security_failure
            .lock()
            .map(|guard| guard.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }
}

fn is_security_failure(error: &KafkaError, reason: &str) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::SSL
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
        )
    ) || reason.contains("SSL handshake failed")
        || reason.contains("certificate verify failed")
        || reason.contains("SASL authentication")
}

impl ClientContext for Reporting {
    fn error(&self, error: KafkaError, reason: &str) {
        if is_security_failure(&error, reason) {
            if let Ok(mut guard) = self.security_failure.lock() {
                *guard = Some(reason.to_string());
            }
        }
        tracing::debug!(%error, reason, "librdkafka reported an error");
    }
}

/// For the metadata-only `BaseProducer` of [`crate::topic_partitions`]: it
/// never produces.
impl ProducerContext for Reporting {
    type DeliveryOpaque = ();

    fn delivery(
        &self,
        _result: &rdkafka::message::DeliveryResult<'_>,
        _opaque: Self::DeliveryOpaque,
    ) {
    }
}

/// `Unreachable`, or `Security` when librdkafka reported a TLS or SASL
/// failure meanwhile: a wrong CA or password looks like a dead broker
/// otherwise.
pub(crate) fn unreachable(brokers: &str, context: &Reporting, detail: String) -> crate::BusError {
    match context.security_failure() {
        Some(reason) => crate::BusError::Security {
            brokers: brokers.to_string(),
            detail: reason,
        },
        None => crate::BusError::Unreachable {
            brokers: brokers.to_string(),
            detail,
        },
    }
}
