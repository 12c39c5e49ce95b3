//! The crate's error type: one [`Error`] struct carrying an [`ErrorKind`] and
//! the underlying cause, with [`Error::is_retryable`] telling whether trying
//! again can help.

use std::error::Error as StdError;
use std::fmt;

/// A `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed error, the error type of inbox handlers.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong, with structured context.
///
/// New kinds may be added in minor releases, so match with a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A database statement failed.
    #[error("the database failed to {operation}")]
    Database {
        /// What was being done, e.g. `enqueue an outbox row`.
        operation: &'static str,
        /// Whether the failure looks transient (connection lost, pool
        /// exhausted, database busy).
        retryable: bool,
    },
    /// The embedded schema migrations could not be applied.
    #[error("could not apply the {backend} migrations")]
    Migrate {
        /// `postgres` or `sqlite`.
        backend: &'static str,
    },
    /// An event's encoded size exceeds the outbox limit.
    #[error("event `{event_id}` of {size} bytes exceeds the outbox limit of {limit} bytes")]
    EventTooLarge {
        /// The event id.
        event_id: String,
        /// The encoded size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// An event is malformed or misses a required attribute.
    #[error("invalid event: {reason}")]
    InvalidEvent {
        /// What is wrong with it.
        reason: String,
    },
    /// A stored row or event could not be encoded or decoded.
    #[error("could not {operation}")]
    Codec {
        /// What was being encoded or decoded.
        operation: &'static str,
    },
    /// The configuration is invalid.
    #[error("invalid configuration `{key}`: {reason}")]
    Config {
        /// The offending setting.
        key: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// The broker failed an operation (publish, ack).
    #[error("the broker failed to {operation} on `{topic}`")]
    Broker {
        /// What was being done, e.g. `publish a batch`.
        operation: &'static str,
        /// The topic.
        topic: String,
        /// Whether the broker said a retry can help.
        retryable: bool,
    },
    /// A relay's task ended abnormally (it panicked or was aborted).
    #[error("the relay `{relay}` task did not finish normally")]
    RelayTask {
        /// The relay id.
        relay: String,
    },
    /// An inbox handler returned an error; its effects were rolled back.
    #[error("the `{consumer}` handler failed for event `{event_id}`")]
    Handler {
        /// The consumer name.
        consumer: String,
        /// The event id.
        event_id: String,
    },
    /// A saga definition is invalid; names the step and field at fault.
    #[error("invalid saga definition `{saga}`{}: {field}{}{reason}", step_label(step), if field.is_empty() { "" } else { ": " })]
    InvalidDefinition {
        /// The saga type (empty when the file could not be parsed).
        saga: String,
        /// The step name (or `#n` for an unnamed step), if the fault is in a step.
        step: Option<String>,
        /// The field, e.g. `command.timeout_ms`.
        field: String,
        /// Why it is invalid.
        reason: String,
    },
    /// No definition is registered for this saga type (and version).
    #[error("unknown saga type `{saga_type}`{}", version.map(|v| format!(" version {v}")).unwrap_or_default())]
    UnknownSaga {
        /// The saga type.
        saga_type: String,
        /// The version asked for, if any.
        version: Option<u32>,
    },
    /// A saga with this id already exists.
    #[error("saga `{saga_id}` already exists")]
    SagaExists {
        /// The saga id.
        saga_id: String,
    },
    /// A saga command or reply event does not follow the participant protocol.
    #[error("not a valid saga {what}: {reason}")]
    Protocol {
        /// `command` or `reply`.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn step_label(step: &Option<String>) -> String {
    step.as_ref()
        .map(|s| format!(", step `{s}`"))
        .unwrap_or_default()
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
    /// Transient database failures and broker failures the broker calls
    /// transient are retryable; oversized or invalid events, bad
    /// configuration and handler failures are not.
    pub fn is_retryable(&self) -> bool {
        match &self.kind {
            ErrorKind::Database { retryable, .. } | ErrorKind::Broker { retryable, .. } => {
                *retryable
            }
            _ => false,
        }
    }

    pub(crate) fn db(operation: &'static str, source: sqlx::Error) -> Self {
        let retryable = match &source {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(e) => {
                // SQLITE_BUSY / SQLITE_LOCKED, and PostgreSQL serialization
                // failures, deadlocks and connection exceptions.
                let code = e.code().map(|c| c.into_owned()).unwrap_or_default();
                matches!(code.as_str(), "5" | "6" | "517" | "40001" | "40P01")
                    || code.starts_with("08")
                    || code.starts_with("57P")
            }
            _ => false,
        };
        Self::with_source(
            ErrorKind::Database {
                operation,
                retryable,
            },
            source,
        )
    }

    pub(crate) fn broker(
        operation: &'static str,
        topic: &str,
        source: broker_adapters::Error,
    ) -> Self {
        let retryable = source.is_retryable();
        Self::with_source(
            ErrorKind::Broker {
                operation,
                topic: topic.to_owned(),
                retryable,
            },
            source,
        )
    }

    pub(crate) fn config(key: &'static str, reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config {
            key,
            reason: reason.into(),
        })
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
            Error::new(ErrorKind::Broker {
                operation: "publish a batch",
                topic: "t".into(),
                retryable: true
            })
            .is_retryable()
        );
        assert!(
            !Error::new(ErrorKind::EventTooLarge {
                event_id: "e".into(),
                size: 2,
                limit: 1
            })
            .is_retryable()
        );
        assert!(Error::db("read", sqlx::Error::PoolTimedOut).is_retryable());
        assert!(!Error::db("read", sqlx::Error::RowNotFound).is_retryable());
        assert!(!Error::config("batch_size", "must be positive").is_retryable());
    }

    #[test]
    fn display_is_a_sentence_with_its_cause() {
        let err = Error::db("enqueue an outbox row", sqlx::Error::PoolTimedOut);
        assert!(
            err.to_string()
                .starts_with("the database failed to enqueue an outbox row: "),
            "{err}"
        );
    }
}
