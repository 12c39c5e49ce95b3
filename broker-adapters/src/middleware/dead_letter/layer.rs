use std::num::NonZeroU32;
use std::sync::Arc;

use tower::Layer;

use super::DeadLetter;
use crate::publisher::Publisher;
use crate::topic::Topic;

/// Applies [`DeadLetter`] to a handler: events it gives up on are published
/// to a dead-letter topic instead of being lost or redelivered forever.
#[derive(Debug, Clone)]
pub struct DeadLetterLayer {
    config: Arc<Config>,
}

#[derive(Debug)]
pub(super) struct Config {
    pub(super) publisher: Arc<dyn Publisher>,
    pub(super) dlq_topic: Topic,
    pub(super) max_attempts: NonZeroU32,
}

impl DeadLetterLayer {
    /// Dead-letters to `dlq_topic` through `publisher` every event whose
    /// handler fails permanently, or retryably on delivery attempt
    /// `max_attempts` or later.
    pub fn new(publisher: Arc<dyn Publisher>, dlq_topic: Topic, max_attempts: NonZeroU32) -> Self {
        Self {
            config: Arc::new(Config {
                publisher,
                dlq_topic,
                max_attempts,
            }),
        }
    }

    /// The dead-letter topic.
    pub fn dlq_topic(&self) -> &Topic {
        &self.config.dlq_topic
    }

    /// The delivery attempt from which retryable failures are dead-lettered.
    pub fn max_attempts(&self) -> NonZeroU32 {
        self.config.max_attempts
    }
}

impl<S> Layer<S> for DeadLetterLayer {
    type Service = DeadLetter<S>;

    fn layer(&self, inner: S) -> DeadLetter<S> {
        DeadLetter {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}
