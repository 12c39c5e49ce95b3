//! [`Inbox`]: an idempotent consumer. A handler's effects and the record of
//! the handled event id (per consumer name) commit in one transaction, so a
//! redelivered event is skipped.
//!
//! The backend-specific methods (`Inbox::postgres`, `Inbox::sqlite`,
//! `process`, `contains`) live in the [`postgres`](crate::postgres) and
//! [`sqlite`](crate::sqlite) modules. In a subscriber loop, process first and
//! settle the delivery after the transaction committed, with [`settle`]:
//!
//! ```ignore
//! while let Some(delivery) = subscription.next().await {
//!     let mut delivery = delivery?;
//!     let outcome = inbox
//!         .process(&"billing", delivery.event(), |tx| Box::pin(async move { /* effects on tx */ Ok(()) }))
//!         .await;
//!     orchestrator::inbox::settle(&mut delivery, &outcome).await?;
//! }
//! ```

use std::fmt;

use broker_adapters::Delivery;

use crate::error::{Error, ErrorKind, Result};

/// What [`Inbox`] `process` did with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Processed<T> {
    /// The handler ran and its effects committed; its return value.
    Handled(T),
    /// The consumer had already handled this event id: nothing ran.
    Duplicate,
}

impl<T> Processed<T> {
    /// Whether the event was a duplicate.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Self::Duplicate)
    }
}

/// Records handled event ids per consumer; see the module docs.
pub struct Inbox<DB: sqlx::Database> {
    pub(crate) pool: sqlx::Pool<DB>,
}

impl<DB: sqlx::Database> Clone for Inbox<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
        }
    }
}

impl<DB: sqlx::Database> fmt::Debug for Inbox<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("backend", &DB::NAME)
            .finish_non_exhaustive()
    }
}

/// Settles `delivery` after the inbox transaction: acks it when the event was
/// handled or a duplicate (the effects are committed), nacks it for
/// redelivery when processing failed.
///
/// # Errors
///
/// The broker's failure to settle (the event will be redelivered, and the
/// inbox will skip it if it was handled).
pub async fn settle<T>(delivery: &mut Delivery, outcome: &Result<Processed<T>>) -> Result<()> {
    let settled = match outcome {
        Ok(_) => delivery.ack().await,
        Err(_) => delivery.nack(None).await,
    };
    settled.map(|_| ()).map_err(|e| {
        let retryable = e.is_retryable();
        Error::with_source(
            ErrorKind::Broker {
                operation: "settle a delivery",
                topic: String::new(),
                retryable,
            },
            e,
        )
    })
}
