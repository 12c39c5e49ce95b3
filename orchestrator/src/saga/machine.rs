//! The saga state machine: pure functions from (definition, state, input)
//! to (new state, commands, timer), with no I/O.
//!
//! A saga waits for one thing at a time: the reply to the current attempt
//! of the current step (forward or compensation), or the end of a backoff
//! before the next attempt. Its single timer is therefore part of the state:
//! [`SagaState::timer`] says which timer input is the live one; every other
//! timer or reply is stale and ignored.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::definition::{Action, SagaDefinition};

/// Forward command or compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The step's command.
    Forward,
    /// The step's compensating command.
    Compensate,
}

impl Phase {
    /// `forward` or `compensate`, the value of the `sagaphase` extension.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Compensate => "compensate",
        }
    }

    /// Parses the `sagaphase` extension value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "forward" => Some(Self::Forward),
            "compensate" => Some(Self::Compensate),
            _ => None,
        }
    }
}

/// What the saga is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Waiting {
    /// The reply to the current attempt (the timer is its timeout).
    Reply,
    /// The end of the backoff before the next attempt.
    Backoff,
}

/// Where a saga is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SagaStatus {
    /// Running step `step` (index), attempt `attempt` (1-based).
    Running {
        /// The step index.
        step: usize,
        /// The attempt.
        attempt: u32,
        /// Reply or backoff.
        waiting: Waiting,
    },
    /// Running the compensation of step `step`.
    Compensating {
        /// The step index being compensated.
        step: usize,
        /// The attempt.
        attempt: u32,
        /// Reply or backoff.
        waiting: Waiting,
    },
    /// Every step succeeded.
    Completed,
    /// A step failed and every completed step was compensated.
    Compensated,
    /// The compensation of `step` could not succeed (retry budget spent or
    /// a permanent failure reply); needs a person.
    CompensationFailed {
        /// The step whose compensation failed.
        step: usize,
        /// Its last attempt (0 in states stored before it was kept).
        #[serde(default)]
        attempt: u32,
    },
}

impl SagaStatus {
    /// Whether the saga is over.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Compensated | Self::CompensationFailed { .. }
        )
    }

    /// The status name stored in its own column: `running`,
    /// `compensating`, `completed`, `compensated`, `compensation_failed`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Running { .. } => "running",
            Self::Compensating { .. } => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::CompensationFailed { .. } => "compensation_failed",
        }
    }
}

/// The error shape of a failure reply (`data.error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyError {
    /// A stable, machine-readable code, e.g. `out_of_stock`.
    pub code: String,
    /// A sentence for people.
    #[serde(default)]
    pub message: String,
    /// Whether trying the same command again can succeed.
    #[serde(default)]
    pub retryable: bool,
}

/// A participant's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Success, with the reply data (stored under `/results/<step>`).
    Success(Value),
    /// Failure.
    Failure(ReplyError),
}

/// What happens to a saga.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A reply to attempt `attempt` of `step` in `phase`.
    Reply {
        /// Forward or compensation.
        phase: Phase,
        /// The step index.
        step: usize,
        /// The attempt it answers.
        attempt: u32,
        /// The answer.
        outcome: Outcome,
    },
    /// A timer came due: the one of (`phase`, `step`, `attempt`).
    Timer {
        /// Forward or compensation.
        phase: Phase,
        /// The step index.
        step: usize,
        /// The attempt.
        attempt: u32,
    },
    /// Someone asked to abandon the saga: the steps that took effect, and
    /// the one in flight (its outcome is unknown), are compensated in
    /// reverse order. Ignored once the saga compensates or is over.
    Cancel {
        /// Why, kept as the saga's failure (`code` `cancelled`).
        reason: String,
    },
    /// Someone asked to try a failed compensation again: a saga in
    /// `compensation_failed` sends the compensation of its step once more
    /// (a new attempt, so participants see a new command id) and goes on
    /// compensating if it succeeds; if it fails again it is back in
    /// `compensation_failed`. Ignored in any other state.
    Retry,
}

/// The persisted state of one saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    /// Where it is.
    pub status: SagaStatus,
    /// The saga data: the start data plus `results.<step>` per success.
    pub data: Value,
    /// Steps whose forward command took effect (success, or unknown after
    /// its last attempt timed out), in order; compensation pops from the end.
    pub done: Vec<usize>,
    /// Why the saga is compensating, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<ReplyError>,
}

/// A command to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// Forward or compensation.
    pub phase: Phase,
    /// The step index.
    pub step: usize,
    /// The attempt (1-based).
    pub attempt: u32,
    /// The command data.
    pub data: Value,
}

/// What [`apply`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The new state.
    pub state: SagaState,
    /// Commands to send, in order.
    pub commands: Vec<Command>,
    /// When the (single) timer is due from now; `None` clears it.
    pub timer: Option<Duration>,
    /// A short description for the history, or why the input was ignored.
    pub note: String,
    /// Whether the input changed anything; an ignored input leaves the
    /// state, commands and timer as they were.
    pub applied: bool,
}

impl SagaState {
    /// The live timer: (phase, step, attempt), if the saga is not over.
    pub fn timer(&self) -> Option<(Phase, usize, u32)> {
        match self.status {
            SagaStatus::Running { step, attempt, .. } => Some((Phase::Forward, step, attempt)),
            SagaStatus::Compensating { step, attempt, .. } => {
                Some((Phase::Compensate, step, attempt))
            }
            _ => None,
        }
    }
}

fn action(def: &SagaDefinition, phase: Phase, step: usize) -> Option<&Action> {
    let s = def.steps.get(step)?;
    match phase {
        Phase::Forward => Some(&s.command),
        Phase::Compensate => s.compensation.as_ref(),
    }
}

struct Builder<'d> {
    def: &'d SagaDefinition,
    state: SagaState,
    commands: Vec<Command>,
    timer: Option<Duration>,
    note: String,
}

impl<'d> Builder<'d> {
    fn send(&mut self, phase: Phase, step: usize, attempt: u32) {
        let Some(a) = action(self.def, phase, step) else {
            return;
        };
        self.commands.push(Command {
            phase,
            step,
            attempt,
            data: a.build_input(&self.state.data),
        });
        self.timer = Some(a.timeout_duration());
        self.state.status = match phase {
            Phase::Forward => SagaStatus::Running {
                step,
                attempt,
                waiting: Waiting::Reply,
            },
            Phase::Compensate => SagaStatus::Compensating {
                step,
                attempt,
                waiting: Waiting::Reply,
            },
        };
    }

    /// Compensates the last completed step that has a compensation, or ends.
    fn next_compensation(&mut self) {
        while let Some(&last) = self.state.done.last() {
            if action(self.def, Phase::Compensate, last).is_some() {
                self.send(Phase::Compensate, last, 1);
                return;
            }
            self.state.done.pop();
        }
        self.state.status = SagaStatus::Compensated;
        self.timer = None;
    }

    fn done(self, applied: bool) -> Transition {
        Transition {
            state: self.state,
            commands: self.commands,
            timer: self.timer,
            note: self.note,
            applied,
        }
    }
}

/// Starts a saga of `def` with `data` (a JSON object): its first command.
pub fn start(def: &SagaDefinition, data: Value) -> Transition {
    let mut b = Builder {
        def,
        state: SagaState {
            status: SagaStatus::Completed,
            data,
            done: Vec::new(),
            failure: None,
        },
        commands: Vec::new(),
        timer: None,
        note: "started".into(),
    };
    if def.steps.is_empty() {
        return b.done(true);
    }
    b.send(Phase::Forward, 0, 1);
    b.done(true)
}

/// Applies `input` to `state` under `def`.
///
/// Stale, duplicate, early and unknown inputs (another step or phase, an
/// older attempt's failure, a timer that is not the live one, anything after
/// the end) are ignored: `applied` is false and the state is unchanged. A
/// success reply from an older attempt of the current step is accepted.
pub fn apply(def: &SagaDefinition, state: &SagaState, input: Input) -> Transition {
    let mut b = Builder {
        def,
        state: state.clone(),
        commands: Vec::new(),
        timer: None,
        note: String::new(),
    };
    let ignore = |why: &str| Transition {
        state: state.clone(),
        commands: Vec::new(),
        timer: None,
        note: why.to_owned(),
        applied: false,
    };
    match input {
        Input::Cancel { reason } => {
            let (step, name) = match state.status {
                SagaStatus::Running { step, .. } => (step, def.steps.get(step).map(|s| &s.name)),
                SagaStatus::Compensating { .. } => {
                    return ignore("the saga is already compensating");
                }
                _ => return ignore("the saga is over"),
            };
            let Some(name) = name else {
                return ignore("the state names a step the definition lacks");
            };
            // Whether the step in flight took effect is unknown (its
            // command was sent): it is compensated too, as after a timeout.
            b.note = format!("cancelled at step `{name}`: {reason}");
            b.state.done.push(step);
            b.state.failure = Some(ReplyError {
                code: "cancelled".into(),
                message: reason,
                retryable: false,
            });
            b.next_compensation();
            return b.done(true);
        }
        Input::Retry => {
            let SagaStatus::CompensationFailed { step, attempt } = state.status else {
                return ignore("only a saga whose compensation failed can be retried");
            };
            let Some(action) = action(def, Phase::Compensate, step) else {
                return ignore("the state names a step the definition lacks");
            };
            // An attempt number no earlier attempt used: past the policy's
            // last one and every attempt a retry sent before.
            let attempt = attempt.max(action.retry.max_attempts).saturating_add(1);
            b.note = format!(
                "compensation of step `{}` retried by request (attempt {attempt})",
                def.steps[step].name
            );
            b.send(Phase::Compensate, step, attempt);
            return b.done(true);
        }
        Input::Reply { .. } | Input::Timer { .. } => {}
    }
    let Some((cur_phase, cur_step, cur_attempt)) = state.timer() else {
        return ignore("the saga is over");
    };
    let waiting = match state.status {
        SagaStatus::Running { waiting, .. } | SagaStatus::Compensating { waiting, .. } => waiting,
        _ => return ignore("the saga is over"),
    };
    let Some(cur_action) = action(def, cur_phase, cur_step) else {
        return ignore("the state names a step the definition lacks");
    };
    let max = cur_action.retry.max_attempts;
    match input {
        Input::Reply {
            phase,
            step,
            attempt,
            outcome,
        } => {
            if phase != cur_phase || step != cur_step {
                return ignore("reply for a step that is not waiting");
            }
            if attempt == 0 || attempt > cur_attempt {
                return ignore("reply for an attempt not yet sent");
            }
            let name = def.steps[step].name.clone();
            match outcome {
                Outcome::Success(value) => match phase {
                    Phase::Forward => {
                        if let Value::Object(map) = &mut b.state.data {
                            let results = map
                                .entry("results")
                                .or_insert_with(|| Value::Object(Default::default()));
                            if let Value::Object(r) = results {
                                r.insert(name.clone(), value);
                            }
                        }
                        b.state.done.push(step);
                        b.note = format!("step `{name}` succeeded (attempt {attempt})");
                        if step + 1 < def.steps.len() {
                            b.send(Phase::Forward, step + 1, 1);
                        } else {
                            b.state.status = SagaStatus::Completed;
                            b.timer = None;
                        }
                    }
                    Phase::Compensate => {
                        b.state.done.pop();
                        b.note = format!("step `{name}` compensated (attempt {attempt})");
                        b.next_compensation();
                    }
                },
                Outcome::Failure(error) => {
                    if attempt != cur_attempt || waiting != Waiting::Reply {
                        return ignore("failure reply of an earlier attempt");
                    }
                    if error.retryable && attempt < max {
                        b.note = format!(
                            "{} of step `{name}` failed (attempt {attempt}, retryable): {}",
                            phase.as_str(),
                            error.code
                        );
                        b.timer = Some(cur_action.retry.backoff(attempt));
                        b.state.status = match phase {
                            Phase::Forward => SagaStatus::Running {
                                step,
                                attempt,
                                waiting: Waiting::Backoff,
                            },
                            Phase::Compensate => SagaStatus::Compensating {
                                step,
                                attempt,
                                waiting: Waiting::Backoff,
                            },
                        };
                    } else {
                        match phase {
                            Phase::Forward => {
                                b.note = format!(
                                    "step `{name}` failed (attempt {attempt}): {}",
                                    error.code
                                );
                                // A retryable failure on the last attempt says
                                // nothing of earlier attempts still on their
                                // way: the outcome is unknown, so the step is
                                // compensated too. A permanent failure is final.
                                if error.retryable {
                                    b.state.done.push(step);
                                }
                                b.state.failure = Some(error);
                                b.next_compensation();
                            }
                            Phase::Compensate => {
                                b.note = format!(
                                    "compensation of step `{name}` failed for good: {}",
                                    error.code
                                );
                                b.state.failure = Some(error);
                                b.state.status = SagaStatus::CompensationFailed { step, attempt };
                                b.timer = None;
                            }
                        }
                    }
                }
            }
        }
        Input::Timer {
            phase,
            step,
            attempt,
        } => {
            if (phase, step, attempt) != (cur_phase, cur_step, cur_attempt) {
                return ignore("a timer that is no longer live");
            }
            let name = def.steps[step].name.clone();
            match waiting {
                Waiting::Backoff => {
                    b.note = format!("retrying {} of step `{name}`", phase.as_str());
                    b.send(phase, step, attempt + 1);
                }
                Waiting::Reply if attempt < max => {
                    b.note = format!(
                        "{} of step `{name}` timed out (attempt {attempt}); retrying",
                        phase.as_str()
                    );
                    b.send(phase, step, attempt + 1);
                }
                Waiting::Reply => {
                    let error = ReplyError {
                        code: "timeout".into(),
                        message: format!("no reply after {attempt} attempts"),
                        retryable: false,
                    };
                    match phase {
                        Phase::Forward => {
                            // The outcome is unknown: the participant may have
                            // acted, so the step is compensated too.
                            b.note = format!("step `{name}` timed out after {attempt} attempts");
                            b.state.done.push(step);
                            b.state.failure = Some(error);
                            b.next_compensation();
                        }
                        Phase::Compensate => {
                            b.note = format!(
                                "compensation of step `{name}` timed out after {attempt} attempts"
                            );
                            b.state.failure = Some(error);
                            b.state.status = SagaStatus::CompensationFailed { step, attempt };
                            b.timer = None;
                        }
                    }
                }
            }
        }
        Input::Cancel { .. } | Input::Retry => return ignore("handled above"),
    }
    b.done(true)
}
