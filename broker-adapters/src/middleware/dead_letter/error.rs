use std::error::Error as StdError;
use std::fmt;

use crate::error::Error;
use crate::topic::Topic;

/// The dead-letter event could not be published, so the original is not
/// acked: the [`DeadLetter`](super::DeadLetter) service returns this as a
/// [retryable](crate::HandlerError::retryable) error and the event is
/// delivered again.
#[derive(Debug)]
pub struct DeadLetterFailed {
    dlq_topic: Topic,
    reason: String,
    source: Error,
}

impl DeadLetterFailed {
    pub(super) fn new(dlq_topic: Topic, reason: String, source: Error) -> Self {
        Self {
            dlq_topic,
            reason,
            source,
        }
    }

    /// The dead-letter topic that could not be published to.
    pub fn dlq_topic(&self) -> &Topic {
        &self.dlq_topic
    }

    /// Why the event was to be dead-lettered: the handler's error.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The publisher's error.
    pub fn publish_error(&self) -> &Error {
        &self.source
    }
}

impl fmt::Display for DeadLetterFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "could not dead-letter the event to `{}` ({}) after: {}",
            self.dlq_topic, self.source, self.reason
        )
    }
}

impl StdError for DeadLetterFailed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.source)
    }
}
