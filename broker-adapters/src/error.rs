//! The crate's error type: one [`Error`] struct carrying an [`ErrorKind`] and
//! the underlying cause, with [`Error::is_retryable`] telling whether trying
//! again can help.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// A `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong, with structured context.
///
/// New kinds may be added in minor releases, so match with a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The broker could not be reached or the connection dropped.
    #[error("could not reach the {system} broker")]
    Connection {
        /// The messaging system, e.g. `kafka`.
        system: &'static str,
    },
    /// An operation did not complete in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation that timed out.
        operation: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// The broker is temporarily full; publishing again later can succeed.
    #[error("topic `{topic}` is full ({limit} unacknowledged events)")]
    Backpressure {
        /// The topic that is full.
        topic: String,
        /// The configured limit.
        limit: usize,
    },
    /// A topic name is not valid.
    #[error("invalid topic name `{name}`: {reason}")]
    InvalidTopic {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// An event is malformed or misses a required attribute.
    #[error("invalid event: {reason}")]
    InvalidEvent {
        /// What is wrong with it.
        reason: String,
    },
    /// An extension attribute holds a value of the wrong type or format.
    #[error("extension `{name}` is invalid: {reason}")]
    InvalidExtension {
        /// The extension name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An encoded event exceeds the configured size limit.
    #[error("event of {size} bytes exceeds the limit of {limit} bytes")]
    EventTooLarge {
        /// The encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Event data could not be serialized into the event.
    #[error("could not encode the event data")]
    Encode,
    /// Event data or a received message could not be decoded.
    #[error("could not decode {what}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
    },
    /// The publisher, subscriber or broker was closed.
    #[error("the {what} is closed")]
    Closed {
        /// What was closed.
        what: &'static str,
    },
    /// The configuration is invalid.
    #[error("invalid configuration `{key}`: {reason}")]
    Config {
        /// The offending setting.
        key: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The adapter was compiled out.
    #[error("the `{feature}` feature is not enabled")]
    FeatureNotEnabled {
        /// The Cargo feature that would enable it.
        feature: &'static str,
    },
    /// The schema of an event's data could not be had from the schema
    /// registry (unknown subject, registry unreachable).
    #[error("no schema for subject `{subject}` from the schema registry")]
    SchemaRegistry {
        /// The subject looked up.
        subject: String,
        /// Whether the registry reported the failure as transient.
        retryable: bool,
    },
    /// The broker rejected or failed an operation.
    #[error("the {system} broker failed the {operation}")]
    Broker {
        /// The messaging system.
        system: &'static str,
        /// The operation that failed.
        operation: &'static str,
        /// Whether the broker reported the failure as transient.
        retryable: bool,
    },
}

/// The error of every fallible operation in this crate.
///
/// `Display` is a sentence for people; the cause, if any, is [`source`](StdError::source).
pub struct Error {
    kind: ErrorKind,
    source: Option<BoxError>,
}

impl Error {
    /// Creates an error of the given kind with no underlying cause.
    pub fn new(kind: ErrorKind) -> Self {
        Self { kind, source: None }
    }

    /// Creates an error of the given kind caused by `source`.
    pub fn with_source(kind: ErrorKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: Some(source.into()),
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// Whether repeating the same operation later can succeed.
    ///
    /// Connection losses, timeouts, back-pressure and broker errors the broker
    /// calls transient are retryable; bad input, bad configuration and closed
    /// handles are not.
    pub fn is_retryable(&self) -> bool {
        match &self.kind {
            ErrorKind::Connection { .. }
            | ErrorKind::Timeout { .. }
            | ErrorKind::Backpressure { .. } => true,
            ErrorKind::Broker { retryable, .. } | ErrorKind::SchemaRegistry { retryable, .. } => {
                *retryable
            }
            _ => false,
        }
    }

    pub(crate) fn invalid_event(reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidEvent {
            reason: reason.into(),
        })
    }

    pub(crate) fn closed(what: &'static str) -> Self {
        Self::new(ErrorKind::Closed { what })
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Self::new(kind)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.kind, f)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability_is_a_property_of_the_kind() {
        assert!(
            Error::new(ErrorKind::Connection { system: "kafka" }).is_retryable(),
            "a lost connection can recover"
        );
        assert!(
            Error::new(ErrorKind::Backpressure {
                topic: "t".into(),
                limit: 1
            })
            .is_retryable()
        );
        assert!(!Error::invalid_event("no type").is_retryable());
        assert!(
            !Error::new(ErrorKind::EventTooLarge { size: 2, limit: 1 }).is_retryable(),
            "a too-large event stays too large"
        );
        assert!(
            Error::new(ErrorKind::Broker {
                system: "nats",
                operation: "publish",
                retryable: true
            })
            .is_retryable()
        );
    }

    #[test]
    fn display_is_a_sentence_with_its_cause() {
        let cause = std::io::Error::other("connection refused");
        let err = Error::with_source(ErrorKind::Connection { system: "nats" }, cause);
        assert_eq!(
            err.to_string(),
            "could not reach the nats broker: connection refused"
        );
        assert!(err.source().is_some());
    }
}
