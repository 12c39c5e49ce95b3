//! The participant protocol: command and reply events, their extensions,
//! deterministic command ids and the error shape. The same contract is
//! published as JSON Schemas under `schemas/contracts/saga/`.

use broker_adapters::cloudevents::{AttributesReader, Event};
use broker_adapters::event::ext;
use broker_adapters::{CloudEventBuilder, EventExt, Topic};
use serde_json::Value;
use uuid::Uuid;

use super::definition::SagaDefinition;
use super::machine::{Command, Input, Outcome, Phase, ReplyError};
use crate::error::{Error, ErrorKind, Result};

/// Extension: `forward` or `compensate`.
pub const SAGA_PHASE: &str = "sagaphase";
/// Extension on commands: the topic replies go to.
pub const SAGA_REPLY_TO: &str = "sagareplyto";
/// Extension on commands: the saga type and version, `order@1`.
pub const SAGA_TYPE: &str = "sagatype";

/// The namespace of command ids (UUID v5).
pub const COMMAND_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_2b7c_5a3e_4c59_9b0e_8d3f_a1c2_e4b5);

/// The id of attempt `attempt` of `step` in `phase` of saga `saga_id`:
/// UUID v5 of `"{saga_id}/{step}/{phase}/{attempt}"`, the same every time
/// the command is (re)issued, so participants recognise a re-sent command.
pub fn command_id(saga_id: &str, step: &str, phase: Phase, attempt: u32) -> Uuid {
    let name = format!("{saga_id}/{step}/{}/{attempt}", phase.as_str());
    Uuid::new_v5(&COMMAND_ID_NAMESPACE, name.as_bytes())
}

fn protocol(what: &'static str, reason: impl Into<String>) -> Error {
    Error::new(ErrorKind::Protocol {
        what,
        reason: reason.into(),
    })
}

/// Builds the command event for `cmd` and its destination topic.
pub(crate) fn command_event(
    def: &SagaDefinition,
    saga_id: &str,
    cmd: &Command,
    reply_to: &Topic,
) -> Result<(Topic, Event)> {
    let step = &def.steps[cmd.step];
    let action = match cmd.phase {
        Phase::Forward => &step.command,
        Phase::Compensate => step
            .compensation
            .as_ref()
            .ok_or_else(|| protocol("command", "compensation without definition"))?,
    };
    let topic = Topic::try_from(action.topic.as_str()).map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidEvent {
                reason: "bad topic".into(),
            },
            e,
        )
    })?;
    let event = CloudEventBuilder::new(action.event_type.clone(), format!("/sagas/{}", def.name))
        .id(command_id(saga_id, &step.name, cmd.phase, cmd.attempt).to_string())
        .subject(saga_id)
        .partition_key(saga_id)
        .correlation_id(saga_id)
        .saga(saga_id, step.name.clone(), cmd.attempt)
        .extension(SAGA_PHASE, cmd.phase.as_str())
        .extension(SAGA_REPLY_TO, reply_to.as_str())
        .extension(SAGA_TYPE, format!("{}@{}", def.name, def.version))
        .json_data(&cmd.data)
        .build()
        .map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidEvent {
                    reason: "could not build a saga command".into(),
                },
                e,
            )
        })?;
    Ok((topic, event))
}

fn string_ext(event: &Event, name: &str) -> Option<String> {
    event.extension(name).map(|v| v.to_string())
}

/// The saga attributes every command and reply carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaRef {
    /// The saga id.
    pub saga_id: String,
    /// The step name.
    pub step: String,
    /// Forward or compensation.
    pub phase: Phase,
    /// The attempt (1-based).
    pub attempt: u32,
}

impl SagaRef {
    fn read(event: &Event, what: &'static str) -> Result<Self> {
        let saga_id = event
            .saga_id()
            .ok_or_else(|| {
                protocol(
                    what,
                    format!("event `{}` has no `{}`", event.id(), ext::SAGA_ID),
                )
            })?
            .to_owned();
        let step = event
            .saga_step()
            .ok_or_else(|| {
                protocol(
                    what,
                    format!("event `{}` has no `{}`", event.id(), ext::SAGA_STEP),
                )
            })?
            .to_owned();
        let phase = string_ext(event, SAGA_PHASE)
            .and_then(|p| Phase::parse(&p))
            .ok_or_else(|| {
                protocol(
                    what,
                    format!(
                        "event `{}` has no valid `{SAGA_PHASE}` (forward|compensate)",
                        event.id()
                    ),
                )
            })?;
        let attempt = event
            .saga_attempt()
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Protocol {
                        what,
                        reason: format!("event `{}` has a bad `{}`", event.id(), ext::SAGA_ATTEMPT),
                    },
                    e,
                )
            })?
            .filter(|a| *a >= 1)
            .ok_or_else(|| {
                protocol(
                    what,
                    format!("event `{}` has no `{}` ≥ 1", event.id(), ext::SAGA_ATTEMPT),
                )
            })?;
        Ok(Self {
            saga_id,
            step,
            phase,
            attempt,
        })
    }
}

/// A command as a participant receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaCommand {
    /// The command event id (deterministic per saga, step, phase, attempt).
    pub command_id: String,
    /// The command type.
    pub command_type: String,
    /// Saga id, step, phase and attempt.
    pub saga: SagaRef,
    /// Where the reply goes.
    pub reply_to: Topic,
    /// The command data.
    pub data: Value,
    /// Set by [`Participant::handle`](super::Participant::handle) on a
    /// forward command whose step was already compensated (it arrived
    /// late): answer with a failure and no effect.
    pub compensated: bool,
}

/// A participant's answer to a command.
#[derive(Debug, Clone, PartialEq)]
pub enum StepReply {
    /// Success: reply type (one of the step's success types) and data.
    Success {
        /// The reply type.
        reply_type: String,
        /// The result, stored in the saga data under `results.<step>`.
        data: Value,
    },
    /// Failure: reply type (one of the step's failure types) and error.
    Failure {
        /// The reply type.
        reply_type: String,
        /// The error (`data.error` of the reply).
        error: ReplyError,
    },
}

impl SagaCommand {
    /// Reads a command event.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Protocol`] when a saga extension is missing or invalid.
    pub fn from_event(event: &Event) -> Result<Self> {
        let saga = SagaRef::read(event, "command")?;
        let reply_to = string_ext(event, SAGA_REPLY_TO).ok_or_else(|| {
            protocol(
                "command",
                format!("event `{}` has no `{SAGA_REPLY_TO}`", event.id()),
            )
        })?;
        let reply_to = Topic::try_from(reply_to.as_str()).map_err(|e| {
            Error::with_source(
                ErrorKind::Protocol {
                    what: "command",
                    reason: format!("bad `{SAGA_REPLY_TO}` `{reply_to}`"),
                },
                e,
            )
        })?;
        let data = if event.data().is_some() {
            event.data_as::<Value>().map_err(|e| {
                Error::with_source(
                    ErrorKind::Protocol {
                        what: "command",
                        reason: "data is not JSON".into(),
                    },
                    e,
                )
            })?
        } else {
            Value::Null
        };
        Ok(Self {
            command_id: event.id().to_owned(),
            command_type: event.ty().to_owned(),
            saga,
            reply_to,
            data,
            compensated: false,
        })
    }

    /// The reply event for this command, sent from `source`.
    ///
    /// # Errors
    ///
    /// An empty reply type or source.
    pub fn reply_event(&self, reply: &StepReply, source: &str) -> Result<Event> {
        let (ty, data) = match reply {
            StepReply::Success { reply_type, data } => (reply_type, data.clone()),
            StepReply::Failure { reply_type, error } => {
                (reply_type, serde_json::json!({ "error": error }))
            }
        };
        CloudEventBuilder::new(ty.clone(), source)
            .subject(self.saga.saga_id.clone())
            .partition_key(self.saga.saga_id.clone())
            .correlation_id(self.saga.saga_id.clone())
            .causation_id(self.command_id.clone())
            .saga(
                self.saga.saga_id.clone(),
                self.saga.step.clone(),
                self.saga.attempt,
            )
            .extension(SAGA_PHASE, self.saga.phase.as_str())
            .json_data(&data)
            .build()
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::InvalidEvent {
                        reason: "could not build a saga reply".into(),
                    },
                    e,
                )
            })
    }
}

/// Reads the saga attributes of a reply event.
///
/// # Errors
///
/// [`ErrorKind::Protocol`] when a saga extension is missing or invalid.
pub fn reply_ref(event: &Event) -> Result<SagaRef> {
    SagaRef::read(event, "reply")
}

/// Interprets a reply under `def`; `Err(reason)` when it does not belong
/// (unknown step, a type the step does not expect).
pub(crate) fn reply_input(
    def: &SagaDefinition,
    r: &SagaRef,
    event: &Event,
) -> std::result::Result<Input, String> {
    let step = def
        .step_index(&r.step)
        .ok_or_else(|| format!("reply for unknown step `{}`", r.step))?;
    let action = match r.phase {
        Phase::Forward => &def.steps[step].command,
        Phase::Compensate => def.steps[step]
            .compensation
            .as_ref()
            .ok_or_else(|| format!("compensation reply for step `{}` which has none", r.step))?,
    };
    let ty = event.ty();
    let data = || -> Value {
        if event.data().is_some() {
            event.data_as::<Value>().unwrap_or(Value::Null)
        } else {
            Value::Null
        }
    };
    let outcome = if action.success.iter().any(|t| t == ty) {
        Outcome::Success(data())
    } else if action.failure.iter().any(|t| t == ty) {
        let error = data()
            .get("error")
            .cloned()
            .and_then(|e| serde_json::from_value::<ReplyError>(e).ok())
            .unwrap_or_else(|| ReplyError {
                code: "unspecified".into(),
                message: "the failure reply carried no error object".into(),
                retryable: false,
            });
        Outcome::Failure(error)
    } else {
        return Err(format!(
            "reply type `{ty}` is not expected by step `{}`",
            r.step
        ));
    };
    Ok(Input::Reply {
        phase: r.phase,
        step,
        attempt: r.attempt,
        outcome,
    })
}
