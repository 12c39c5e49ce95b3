//! The saga engine: definitions, a persisted state machine with
//! compensation, durable timers, several coordinators on one database, and
//! the participant helper.
//!
//! # How it fits together
//!
//! - A [`SagaDefinition`] (typed builder or YAML/JSON) lists the steps: per
//!   step a command (CloudEvent type, topic, input mapping), the reply types
//!   meaning success or failure, a timeout, a [`RetryPolicy`] and an optional
//!   compensating command. Definitions are versioned ([`Definitions`]); a
//!   saga keeps the version it started with.
//! - The [`machine`] is pure: [`machine::apply`] maps (definition, state,
//!   input) to (new state, commands, timer) with no I/O.
//! - The [`Coordinator`] persists it: each transition is **one database
//!   transaction** — the reply's inbox record, the saga row (state, data,
//!   status, the single timer's due time), a history row, and the next
//!   command in the [`Outbox`](crate::Outbox). A crash at any point resumes
//!   from the last commit; command ids are UUID v5 of (saga, step, phase,
//!   attempt) ([`protocol::command_id`]), so a re-sent command keeps its id.
//! - Timers (reply timeouts, backoff ends) are the `wake_ms` column,
//!   polled by every coordinator; a due timer is claimed under a lease on
//!   the database clock, so coordinators divide the due work and the timers
//!   a dead coordinator claimed come due again after the lease. Replies are
//!   applied by whichever coordinator receives them (the saga row is locked
//!   for the transition).
//! - On failure (a failure reply that is not retryable or out of attempts,
//!   a timeout after the last attempt) the compensations of the completed
//!   steps run in reverse order, each retried per its policy; a step whose
//!   last attempt timed out or failed retryably counts as completed (its
//!   outcome is unknown: an earlier attempt may still arrive), so it is
//!   compensated too; only a permanent failure reply is final. A
//!   compensation that cannot succeed ends the saga in
//!   [`SagaStatus::CompensationFailed`].
//! - People step in through [`Coordinator::cancel`] (a running saga
//!   compensates what took effect, and the step in flight, in reverse
//!   order) and [`Coordinator::retry`] (a saga whose compensation failed
//!   sends it once more, as a new attempt), each one transition like a
//!   reply; the `saga-coordinator` binary serves them over HTTP.
//! - [`Participant`] handles a command once (inbox) and replies through its
//!   outbox. The wire contract is in `schemas/contracts/saga/`.

/// The database clock in ms since the epoch, as SQL, for the saga tables
/// (used by the store and participant macros, so declared before them).
#[cfg(feature = "postgres")]
macro_rules! pg_now {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

#[cfg(feature = "sqlite")]
macro_rules! lite_now {
    () => {
        "cast((julianday('now') - 2440587.5) * 86400000.0 as integer)"
    };
}

pub mod coordinator;
pub mod definition;
pub mod machine;
pub mod participant;
pub mod protocol;
mod store;

pub use self::coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorHandle, HistoryEntry, SagaRecord, SagaSummary,
};
pub use self::definition::{Action, Definitions, RetryPolicy, SagaBuilder, SagaDefinition, Step};
pub use self::machine::{Outcome, Phase, ReplyError, SagaState, SagaStatus};
pub use self::participant::Participant;
pub use self::protocol::{SagaCommand, SagaRef, StepReply};
pub use self::store::Handled;
