//! The crate's error type: one [`Error`] struct carrying an [`ErrorKind`] and
//! the underlying cause, with [`Error::is_retryable`] telling whether trying
//! again can help and [`Error::error_code`] giving the Confluent Schema
//! Registry error code the REST API answers with.

use std::error::Error as StdError;
use std::fmt;

/// A `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong, with structured context.
///
/// New kinds may be added in minor releases, so match with a wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No such subject (or every version of it is deleted).
    #[error("Subject '{subject}' not found.")]
    SubjectNotFound {
        /// The subject asked for.
        subject: String,
    },
    /// The subject exists but has no such version.
    #[error("Version {version} not found.")]
    VersionNotFound {
        /// The version asked for, as given.
        version: String,
    },
    /// No schema with that id, or the schema is not registered under the subject.
    #[error("Schema {what} not found")]
    SchemaNotFound {
        /// The id or description of what was looked up.
        what: String,
    },
    /// The schema text is not valid JSON or not a valid JSON Schema.
    #[error("Invalid schema: {reason}")]
    InvalidSchema {
        /// What is wrong with it.
        reason: String,
    },
    /// The schema type is not supported (only `JSON` is).
    #[error("Invalid schema type {schema_type}: only JSON is supported")]
    UnsupportedSchemaType {
        /// The type that was asked for, e.g. `AVRO`.
        schema_type: String,
    },
    /// A schema exceeds the configured size limit.
    #[error("Schema of {size} bytes exceeds the limit of {limit} bytes")]
    SchemaTooLarge {
        /// The size of the schema text.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A request body exceeds the server's limit.
    #[error("Request body exceeds the limit of {limit} bytes")]
    RequestTooLarge {
        /// The limit.
        limit: usize,
    },
    /// A version is neither a positive integer nor `latest`.
    #[error(
        "The specified version '{version}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
    )]
    InvalidVersion {
        /// The rejected version.
        version: String,
    },
    /// A compatibility level name is not one of the known levels.
    #[error("Invalid compatibility level {level}")]
    InvalidCompatibilityLevel {
        /// The rejected name.
        level: String,
    },
    /// A schema is incompatible with earlier versions under the subject's level.
    #[error("Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{}]", messages.join(", "))]
    Incompatible {
        /// The subject.
        subject: String,
        /// One line per incompatibility, each starting with its JSON path.
        messages: Vec<String>,
    },
    /// The subject was soft-deleted; a hard delete is the only operation left.
    #[error("Subject '{subject}' was soft deleted. Set permanent=true to delete permanently")]
    SubjectSoftDeleted {
        /// The subject.
        subject: String,
    },
    /// A hard delete of a subject that was not soft-deleted first.
    #[error("Subject '{subject}' was not deleted first before being permanently deleted")]
    SubjectNotSoftDeleted {
        /// The subject.
        subject: String,
    },
    /// A hard delete of a version that was not soft-deleted first.
    #[error(
        "Subject '{subject}' Version {version} was not deleted first before being permanently deleted"
    )]
    VersionNotSoftDeleted {
        /// The subject.
        subject: String,
        /// The version.
        version: u32,
    },
    /// The request body is not what the endpoint takes.
    #[error("Unprocessable request: {reason}")]
    BadRequest {
        /// What is wrong with it.
        reason: String,
    },
    /// No compatibility level is set for the subject itself.
    #[error("Subject '{subject}' does not have subject-level compatibility configured")]
    SubjectLevelNotConfigured {
        /// The subject.
        subject: String,
    },
    /// A write without a valid bearer token.
    #[error("Unauthorized")]
    Unauthorized,
    /// Event data does not match its schema.
    #[error("data of subject `{subject}` does not match schema {id}: {}", errors.join("; "))]
    Validation {
        /// The subject.
        subject: String,
        /// The registry id of the schema it was checked against.
        id: u32,
        /// One line per failure, each starting with the JSON path in the data.
        errors: Vec<String>,
    },
    /// The backing store failed.
    #[error("Error in the backend data store: {operation}")]
    Store {
        /// The operation that failed.
        operation: &'static str,
    },
    /// A remote registry could not be reached or answered unexpectedly.
    #[error("the schema registry at {url} failed: {reason}")]
    Remote {
        /// The registry's base URL.
        url: String,
        /// What happened.
        reason: String,
        /// Whether the failure looks transient (connection, 5xx).
        retryable: bool,
    },
    /// The configuration is invalid.
    #[error("invalid configuration `{key}`: {reason}")]
    Config {
        /// The offending setting.
        key: String,
        /// Why it is invalid.
        reason: String,
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

    /// Whether repeating the same operation later can succeed: store
    /// failures and transient remote failures are; bad input is not.
    pub fn is_retryable(&self) -> bool {
        match &self.kind {
            ErrorKind::Store { .. } => true,
            ErrorKind::Remote { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// The Confluent Schema Registry error code for this error
    /// (e.g. 40401 subject not found, 409 incompatible, 50001 store error).
    pub fn error_code(&self) -> u32 {
        match &self.kind {
            ErrorKind::SubjectNotFound { .. } => 40401,
            ErrorKind::VersionNotFound { .. } => 40402,
            ErrorKind::SchemaNotFound { .. } => 40403,
            ErrorKind::SubjectSoftDeleted { .. } => 40404,
            ErrorKind::SubjectNotSoftDeleted { .. } => 40405,
            ErrorKind::VersionNotSoftDeleted { .. } => 40407,
            ErrorKind::SubjectLevelNotConfigured { .. } => 40408,
            ErrorKind::InvalidSchema { .. }
            | ErrorKind::UnsupportedSchemaType { .. }
            | ErrorKind::SchemaTooLarge { .. }
            | ErrorKind::RequestTooLarge { .. } => 42201,
            ErrorKind::InvalidVersion { .. } => 42202,
            ErrorKind::InvalidCompatibilityLevel { .. } => 42203,
            ErrorKind::BadRequest { .. } => 400,
            ErrorKind::Validation { .. } => 422,
            ErrorKind::Incompatible { .. } => 409,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Store { .. } | ErrorKind::Config { .. } => 50001,
            ErrorKind::Remote { .. } => 50002,
        }
    }

    /// The HTTP status the REST API answers this error with.
    pub fn http_status(&self) -> u16 {
        match &self.kind {
            ErrorKind::SchemaTooLarge { .. } | ErrorKind::RequestTooLarge { .. } => 413,
            _ => {
                let code = self.error_code();
                if code < 1000 {
                    u16::try_from(code).unwrap_or(500)
                } else {
                    u16::try_from(code / 100).unwrap_or(500)
                }
            }
        }
    }

    pub(crate) fn store(operation: &'static str, source: impl Into<BoxError>) -> Self {
        Self::with_source(ErrorKind::Store { operation }, source)
    }

    pub(crate) fn invalid_schema(reason: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidSchema {
            reason: reason.into(),
        })
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Self::new(kind)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.kind, f)
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
    fn codes_and_statuses_follow_the_registry() {
        let e = Error::new(ErrorKind::SubjectNotFound {
            subject: "s".into(),
        });
        assert_eq!((e.error_code(), e.http_status()), (40401, 404));
        let e = Error::new(ErrorKind::Incompatible {
            subject: "s".into(),
            messages: vec![],
        });
        assert_eq!((e.error_code(), e.http_status()), (409, 409));
        let e = Error::new(ErrorKind::SchemaTooLarge { size: 2, limit: 1 });
        assert_eq!((e.error_code(), e.http_status()), (42201, 413));
        let e = Error::store("insert", "disk full");
        assert_eq!((e.error_code(), e.http_status()), (50001, 500));
        assert!(e.is_retryable());
    }
}
