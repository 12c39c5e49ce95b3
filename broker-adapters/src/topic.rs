//! [`Topic`]: a validated destination name.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};

/// The longest topic name accepted: Kafka's limit, which NATS subjects also fit.
pub const MAX_TOPIC_LEN: usize = 249;

/// A topic (Kafka), subject (NATS) or table partition (SQL broker) name.
///
/// Valid names are 1 to [`MAX_TOPIC_LEN`] characters from `[A-Za-z0-9._-]`,
/// and neither start nor end with `.` nor contain `..`: the intersection of
/// what Kafka topics and NATS subjects accept, so a name works on every broker.
///
/// ```
/// use broker_adapters::Topic;
/// let orders = Topic::try_from("orders.created").unwrap();
/// assert_eq!(orders.as_str(), "orders.created");
/// assert!(Topic::try_from("orders created").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Creates a topic from a name known at compile time.
    ///
    /// # Panics
    ///
    /// Panics if the name is invalid; use [`Topic::try_from`] for names from
    /// outside the program.
    pub fn from_static(name: &'static str) -> Self {
        match Self::validate(name) {
            Ok(()) => Self(Arc::from(name)),
            Err(reason) => panic!("invalid static topic name `{name}`: {reason}"),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn validate(name: &str) -> std::result::Result<(), &'static str> {
        if name.is_empty() {
            return Err("it is empty");
        }
        if name.len() > MAX_TOPIC_LEN {
            return Err("it is longer than 249 characters");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err("only ASCII letters, digits, '.', '_' and '-' are allowed");
        }
        if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
            return Err("'.' separates non-empty tokens");
        }
        Ok(())
    }
}

impl TryFrom<&str> for Topic {
    type Error = Error;

    fn try_from(name: &str) -> Result<Self> {
        Self::validate(name).map_err(|reason| {
            Error::new(ErrorKind::InvalidTopic {
                name: name.chars().take(MAX_TOPIC_LEN + 1).collect(),
                reason,
            })
        })?;
        Ok(Self(Arc::from(name)))
    }
}

impl TryFrom<String> for Topic {
    type Error = Error;

    fn try_from(name: String) -> Result<Self> {
        Self::try_from(name.as_str())
    }
}

impl std::str::FromStr for Topic {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Self::try_from(name)
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", &*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_every_broker_accepts() {
        for ok in [
            "orders",
            "orders.created",
            "a-b_c.9",
            &"x".repeat(MAX_TOPIC_LEN),
        ] {
            assert!(Topic::try_from(ok).is_ok(), "{ok} should be valid");
        }
    }

    #[test]
    fn rejects_names_some_broker_rejects_with_a_reason() {
        for bad in [
            "",
            "has space",
            "wild.*",
            "wild.>",
            ".lead",
            "trail.",
            "a..b",
            "é",
            &"x".repeat(MAX_TOPIC_LEN + 1),
        ] {
            let err = Topic::try_from(bad).expect_err(bad);
            assert!(
                matches!(err.kind(), ErrorKind::InvalidTopic { .. }),
                "{bad}: {err}"
            );
            assert!(!err.is_retryable());
        }
    }

    #[test]
    #[should_panic(expected = "invalid static topic name")]
    fn from_static_panics_on_programmer_error() {
        let _ = Topic::from_static("no spaces");
    }
}
