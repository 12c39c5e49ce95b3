//! async-nats errors mapped into the crate's [`ErrorKind`]s, keeping the
//! original as the source.
//!
//! Connection losses and timeouts are retryable; authentication failures,
//! bad configuration and requests JetStream rejects as invalid are not.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::{
    CreateStreamErrorKind, GetStreamByNameErrorKind, PublishErrorKind,
};
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::{ConnectError, ConnectErrorKind};

use crate::error::{Error, ErrorKind};

/// The `messaging.system` of this adapter.
pub(crate) const SYSTEM: &str = "nats";

/// How a failure is classified before it becomes an [`ErrorKind`].
#[derive(Debug)]
pub(crate) enum Class {
    /// The operation took longer than the request timeout.
    Timeout,
    /// The connection is down or the server did not answer at all.
    Connection,
    /// JetStream answered with an API error.
    Api(jetstream::Error),
    /// Something that will fail again the same way.
    Permanent,
    /// Something the server or client says may pass.
    Transient,
}

/// Maps a classified failure of `operation`.
pub(crate) fn classify(
    operation: &'static str,
    class: Class,
    timeout: Duration,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> Error {
    let kind = match class {
        Class::Timeout => ErrorKind::Timeout {
            operation,
            after: timeout,
        },
        Class::Connection => ErrorKind::Connection { system: SYSTEM },
        // 5xx: JetStream is temporarily unavailable (leader election,
        // restart); 4xx: the request itself is wrong.
        Class::Api(api) => ErrorKind::Broker {
            system: SYSTEM,
            operation,
            retryable: api.code() >= 500,
        },
        Class::Permanent => ErrorKind::Broker {
            system: SYSTEM,
            operation,
            retryable: false,
        },
        Class::Transient => ErrorKind::Broker {
            system: SYSTEM,
            operation,
            retryable: true,
        },
    };
    Error::with_source(kind, source)
}

/// Whether a JetStream API error says "no such stream" or "no such consumer".
pub(crate) fn is_not_found(api: &jetstream::Error) -> bool {
    api.code() == 404
        || api.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
        || api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
}

/// A failed initial connection.
pub(crate) fn connect(error: ConnectError, timeout: Duration) -> Error {
    if let Some(tls) = tls_failure(&error) {
        let reason = format!("the TLS handshake with the NATS server failed: {tls}");
        return Error::with_source(
            ErrorKind::Config {
                key: "tls".into(),
                reason,
            },
            error,
        );
    }
    match error.kind() {
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            Error::with_source(
                ErrorKind::Config {
                    key: "credentials".into(),
                    reason: "the NATS server rejected them".into(),
                },
                error,
            )
        }
        ConnectErrorKind::ServerParse => Error::with_source(
            ErrorKind::Config {
                key: "url".into(),
                reason: "it is not a NATS server address".into(),
            },
            error,
        ),
        ConnectErrorKind::Tls => Error::with_source(
            ErrorKind::Config {
                key: "tls".into(),
                reason: "the TLS handshake with the NATS server failed".into(),
            },
            error,
        ),
        ConnectErrorKind::TimedOut => classify("connect", Class::Timeout, timeout, error),
        ConnectErrorKind::Dns | ConnectErrorKind::Io | ConnectErrorKind::MaxReconnects => {
            classify("connect", Class::Connection, timeout, error)
        }
    }
}

/// The TLS library's error behind a failed connection, if TLS is what
/// failed: async-nats reports a failed handshake (a certificate that does
/// not check out, a server without TLS, a client certificate refused) as an
/// I/O error wrapping it.
fn tls_failure(error: &ConnectError) -> Option<&async_nats::rustls::Error> {
    let mut next = std::error::Error::source(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<async_nats::rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<async_nats::rustls::Error>())
        {
            return Some(tls);
        }
        next = e.source();
    }
    None
}

/// A failed JetStream publish or publish acknowledgement.
pub(crate) fn publish(
    error: jetstream::context::PublishError,
    topic: &str,
    event_limit: usize,
    size: usize,
    timeout: Duration,
) -> Error {
    let class = match error.kind() {
        PublishErrorKind::TimedOut => Class::Timeout,
        PublishErrorKind::BrokenPipe => Class::Connection,
        PublishErrorKind::MaxAckPending => {
            return Error::with_source(
                ErrorKind::Backpressure {
                    topic: topic.to_owned(),
                    limit: super::MAX_PENDING_ACKS,
                },
                error,
            );
        }
        PublishErrorKind::MaxPayloadExceeded => {
            return Error::with_source(
                ErrorKind::EventTooLarge {
                    size,
                    limit: event_limit,
                },
                error,
            );
        }
        // The stream vanished (deleted by an operator): provisioning again helps.
        PublishErrorKind::StreamNotFound => Class::Transient,
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            Class::Permanent
        }
        // Other covers JetStream's own rejections (limits reached with the
        // `new` discard policy, storage full, no quorum): they can clear.
        _ => Class::Transient,
    };
    classify("publish", class, timeout, error)
}

/// A failed stream lookup by subject.
pub(crate) fn lookup_stream(
    error: jetstream::context::GetStreamByNameError,
    timeout: Duration,
) -> Error {
    let class = match error.kind() {
        GetStreamByNameErrorKind::JetStream(api) => Class::Api(api),
        GetStreamByNameErrorKind::InvalidSubject => Class::Permanent,
        GetStreamByNameErrorKind::Request | GetStreamByNameErrorKind::NotFound => Class::Transient,
    };
    classify("stream lookup", class, timeout, error)
}

/// A failed stream creation.
pub(crate) fn create_stream(
    error: jetstream::context::CreateStreamError,
    timeout: Duration,
) -> Error {
    let class = match error.kind() {
        CreateStreamErrorKind::TimedOut => Class::Timeout,
        CreateStreamErrorKind::JetStreamUnavailable => Class::Transient,
        CreateStreamErrorKind::JetStream(api) => Class::Api(api),
        CreateStreamErrorKind::Response | CreateStreamErrorKind::NotFound => Class::Transient,
        _ => Class::Permanent,
    };
    classify("stream creation", class, timeout, error)
}

/// Classifies a failed consumer lookup or creation.
pub(crate) fn consumer_class(error: &jetstream::stream::ConsumerError) -> Class {
    match error.kind() {
        ConsumerErrorKind::TimedOut => Class::Timeout,
        ConsumerErrorKind::Request => Class::Transient,
        ConsumerErrorKind::JetStream(api) => Class::Api(api),
        _ => Class::Permanent,
    }
}

/// A failed consumer lookup or creation.
pub(crate) fn consumer(
    operation: &'static str,
    error: jetstream::stream::ConsumerError,
    timeout: Duration,
) -> Error {
    classify(operation, consumer_class(&error), timeout, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authentication_failures_are_not_retryable_connection_losses_are() {
        let auth = connect(
            ConnectError::new(ConnectErrorKind::AuthorizationViolation),
            Duration::from_secs(1),
        );
        assert!(matches!(auth.kind(), ErrorKind::Config { .. }), "{auth}");
        assert!(!auth.is_retryable());
        let io = connect(
            ConnectError::new(ConnectErrorKind::Io),
            Duration::from_secs(1),
        );
        assert!(matches!(
            io.kind(),
            ErrorKind::Connection { system: "nats" }
        ));
        assert!(io.is_retryable());
        let slow = connect(
            ConnectError::new(ConnectErrorKind::TimedOut),
            Duration::from_secs(1),
        );
        assert!(matches!(slow.kind(), ErrorKind::Timeout { .. }));
        assert!(slow.is_retryable());
        assert!(
            std::error::Error::source(&slow).is_some(),
            "the cause is kept"
        );
    }

    #[test]
    fn publish_errors_keep_their_meaning() {
        let t = Duration::from_secs(1);
        let big = publish(
            jetstream::context::PublishError::new(PublishErrorKind::MaxPayloadExceeded),
            "t",
            10,
            11,
            t,
        );
        assert_eq!(
            big.kind(),
            &ErrorKind::EventTooLarge {
                size: 11,
                limit: 10
            }
        );
        assert!(!big.is_retryable());
        let slow = publish(
            jetstream::context::PublishError::new(PublishErrorKind::TimedOut),
            "t",
            10,
            1,
            t,
        );
        assert!(slow.is_retryable());
        let full = publish(
            jetstream::context::PublishError::new(PublishErrorKind::MaxAckPending),
            "t",
            10,
            1,
            t,
        );
        assert!(matches!(full.kind(), ErrorKind::Backpressure { .. }));
        assert!(full.is_retryable());
    }
}
