//! rdkafka errors in this crate's terms.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::error::{Error, ErrorKind};

pub(crate) const SYSTEM: &str = "kafka";

/// Error codes after which the same operation can succeed: the broker is
/// unreachable, busy, electing a leader, or the request timed out.
pub(crate) const TRANSIENT_CODES: [RDKafkaErrorCode; 18] = [
    RDKafkaErrorCode::BrokerTransportFailure,
    RDKafkaErrorCode::AllBrokersDown,
    RDKafkaErrorCode::MessageTimedOut,
    RDKafkaErrorCode::OperationTimedOut,
    RDKafkaErrorCode::QueueFull,
    RDKafkaErrorCode::UnknownPartition,
    RDKafkaErrorCode::UnknownTopicOrPartition,
    RDKafkaErrorCode::LeaderNotAvailable,
    RDKafkaErrorCode::NotLeaderForPartition,
    RDKafkaErrorCode::RequestTimedOut,
    RDKafkaErrorCode::BrokerNotAvailable,
    RDKafkaErrorCode::NetworkException,
    RDKafkaErrorCode::CoordinatorLoadInProgress,
    RDKafkaErrorCode::CoordinatorNotAvailable,
    RDKafkaErrorCode::NotCoordinator,
    RDKafkaErrorCode::NotEnoughReplicas,
    RDKafkaErrorCode::NotEnoughReplicasAfterAppend,
    RDKafkaErrorCode::RebalanceInProgress,
];

/// Maps an rdkafka error of `operation`, keeping it as the source.
pub(crate) fn map(error: KafkaError, operation: &'static str) -> Error {
    let code = error.rdkafka_error_code();
    let kind = match code {
        Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure) => {
            ErrorKind::Connection { system: SYSTEM }
        }
        Some(code) => ErrorKind::Broker {
            system: SYSTEM,
            operation,
            retryable: TRANSIENT_CODES.contains(&code),
        },
        None => ErrorKind::Broker {
            system: SYSTEM,
            operation,
            retryable: matches!(error, KafkaError::Canceled),
        },
    };
    Error::with_source(kind, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let down = map(
            KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown),
            "publish",
        );
        assert!(matches!(down.kind(), ErrorKind::Connection { .. }));
        assert!(down.is_retryable());
        let full = map(
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
            "publish",
        );
        assert!(full.is_retryable());
        let too_big = map(
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            "publish",
        );
        assert!(!too_big.is_retryable());
        assert!(too_big.to_string().contains("publish"), "{too_big}");
    }
}
