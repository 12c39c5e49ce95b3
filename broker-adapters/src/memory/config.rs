//! [`MemoryConfig`]: limits of the in-process broker.

use std::num::NonZeroUsize;

use crate::error::{Error, ErrorKind, Result};

/// Limits of a [`MemoryBroker`](super::MemoryBroker).
///
/// | setting | default | environment variable |
/// | --- | --- | --- |
/// | [`max_event_bytes`](Self::max_event_bytes) | 1 MiB | `MEMORY_BROKER_MAX_EVENT_BYTES` |
/// | [`max_events_per_topic`](Self::max_events_per_topic) | 1,000,000 | `MEMORY_BROKER_MAX_EVENTS_PER_TOPIC` |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    max_event_bytes: NonZeroUsize,
    max_events_per_topic: NonZeroUsize,
}

const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;
const DEFAULT_MAX_EVENTS_PER_TOPIC: usize = 1_000_000;

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_event_bytes: NonZeroUsize::new(DEFAULT_MAX_EVENT_BYTES)
                .unwrap_or(NonZeroUsize::MIN),
            max_events_per_topic: NonZeroUsize::new(DEFAULT_MAX_EVENTS_PER_TOPIC)
                .unwrap_or(NonZeroUsize::MIN),
        }
    }
}

impl MemoryConfig {
    /// The defaults.
    pub fn builder() -> Self {
        Self::default()
    }

    /// Reads the settings from the environment variables in the table above;
    /// unset ones keep their defaults.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] naming the variable if a value is not a positive integer.
    pub fn from_env() -> Result<Self> {
        let mut config = Self::default();
        if let Some(n) = env_usize("MEMORY_BROKER_MAX_EVENT_BYTES")? {
            config.max_event_bytes = n;
        }
        if let Some(n) = env_usize("MEMORY_BROKER_MAX_EVENTS_PER_TOPIC")? {
            config.max_events_per_topic = n;
        }
        Ok(config)
    }

    /// The largest event accepted, as measured by
    /// [`EventExt::encoded_size`](crate::EventExt::encoded_size).
    #[must_use]
    pub fn max_event_bytes(mut self, limit: NonZeroUsize) -> Self {
        self.max_event_bytes = limit;
        self
    }

    /// How many events a topic holds at most. Events every consumer group has
    /// settled make room for new ones; when the oldest is still unsettled,
    /// publishing fails with the retryable
    /// [`ErrorKind::Backpressure`] rather than dropping anything.
    #[must_use]
    pub fn max_events_per_topic(mut self, limit: NonZeroUsize) -> Self {
        self.max_events_per_topic = limit;
        self
    }

    pub(crate) fn event_limit(&self) -> usize {
        self.max_event_bytes.get()
    }

    pub(crate) fn topic_limit(&self) -> usize {
        self.max_events_per_topic.get()
    }
}

fn env_usize(key: &str) -> Result<Option<NonZeroUsize>> {
    match std::env::var(key) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::new(ErrorKind::Config {
            key: key.into(),
            reason: "it is not valid UTF-8".into(),
        })),
        Ok(value) => value.trim().parse::<NonZeroUsize>().map(Some).map_err(|e| {
            Error::with_source(
                ErrorKind::Config {
                    key: key.into(),
                    reason: format!("`{value}` is not a positive integer"),
                },
                e,
            )
        }),
    }
}
