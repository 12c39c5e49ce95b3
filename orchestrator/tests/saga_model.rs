//! Property test of the pure saga state machine against a model of the
//! participants and an unreliable network: random step outcomes, lost,
//! duplicated and reordered commands and replies, timeouts racing replies,
//! stale timers.
//!
//! Every saga must end completed or fully compensated in reverse order,
//! with no compensation issued before its forward command, and no effect
//! applied twice.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use orchestrator::saga::machine::{
    self, Command, Input, Outcome, Phase, ReplyError, SagaState, SagaStatus,
};
use orchestrator::saga::{Action, RetryPolicy, SagaDefinition, Step};
use proptest::prelude::*;

/// A small deterministic generator driven by the proptest seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n as u64)).unwrap_or(0)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn definition(steps: &[(u32, bool)]) -> SagaDefinition {
    let mut b = SagaDefinition::builder("model", 1);
    for (i, (attempts, compensable)) in steps.iter().enumerate() {
        let mut step = Step::new(
            format!("s{i}"),
            Action::new(format!("do.s{i}"), "commands")
                .on_success("ok")
                .on_failure("failed")
                .timeout(Duration::from_secs(1))
                .retry(RetryPolicy::new(
                    *attempts,
                    Duration::from_millis(1),
                    Duration::from_millis(4),
                )),
        );
        if *compensable {
            step = step.compensation(
                Action::new(format!("undo.s{i}"), "commands")
                    .on_success("ok")
                    .on_failure("failed")
                    .retry(RetryPolicy::new(
                        60,
                        Duration::from_millis(1),
                        Duration::from_millis(4),
                    )),
            );
        }
        b = b.step(step);
    }
    b.build().expect("valid model definition")
}

#[derive(Debug, Clone)]
enum Msg {
    Command(Command),
    Reply(Input),
}

#[derive(Debug, Default)]
struct Participants {
    /// Command ids handled (the inbox).
    handled: HashSet<(Phase, usize, u32)>,
    /// Final forward decision per step: true = success (effect applied).
    decided: HashMap<usize, bool>,
    applied: HashSet<usize>,
    effects: HashMap<usize, u32>,
    undone: Vec<usize>,
    tombstones: HashSet<usize>,
}

impl Participants {
    fn handle(&mut self, cmd: &Command, rng: &mut Rng) -> Option<Input> {
        if !self.handled.insert((cmd.phase, cmd.step, cmd.attempt)) {
            return None; // duplicate delivery: skipped by the inbox
        }
        let outcome = match cmd.phase {
            Phase::Forward => {
                if self.tombstones.contains(&cmd.step) {
                    failure(false)
                } else if let Some(&ok) = self.decided.get(&cmd.step) {
                    if ok {
                        Outcome::Success(serde_json::json!({}))
                    } else {
                        failure(false)
                    }
                } else {
                    match rng.below(10) {
                        0..=6 => {
                            self.decided.insert(cmd.step, true);
                            self.applied.insert(cmd.step);
                            *self.effects.entry(cmd.step).or_default() += 1;
                            Outcome::Success(serde_json::json!({"step": cmd.step}))
                        }
                        7 | 8 => failure(true),
                        _ => {
                            self.decided.insert(cmd.step, false);
                            failure(false)
                        }
                    }
                }
            }
            Phase::Compensate => {
                if rng.chance(25) {
                    failure(true)
                } else {
                    self.tombstones.insert(cmd.step);
                    if self.applied.remove(&cmd.step) {
                        self.undone.push(cmd.step);
                    }
                    Outcome::Success(serde_json::Value::Null)
                }
            }
        };
        Some(Input::Reply {
            phase: cmd.phase,
            step: cmd.step,
            attempt: cmd.attempt,
            outcome,
        })
    }
}

fn failure(retryable: bool) -> Outcome {
    Outcome::Failure(ReplyError {
        code: if retryable { "busy" } else { "refused" }.into(),
        message: String::new(),
        retryable,
    })
}

fn run(steps: &[(u32, bool)], seed: u64) -> Result<(), TestCaseError> {
    let def = definition(steps);
    let mut rng = Rng(seed | 1);
    let mut world = Participants::default();
    let mut net: Vec<Msg> = Vec::new();
    let mut timers: Vec<(Phase, usize, u32)> = Vec::new();
    let mut issued_forward: HashSet<usize> = HashSet::new();
    let mut compensations_issued: Vec<usize> = Vec::new();

    let mut record = |t: &machine::Transition,
                      net: &mut Vec<Msg>,
                      timers: &mut Vec<(Phase, usize, u32)>|
     -> Result<(), TestCaseError> {
        for c in &t.commands {
            match c.phase {
                Phase::Forward => {
                    issued_forward.insert(c.step);
                }
                Phase::Compensate => {
                    prop_assert!(
                        issued_forward.contains(&c.step),
                        "compensation of step {} before its forward command",
                        c.step
                    );
                    if c.attempt == 1 {
                        compensations_issued.push(c.step);
                    }
                }
            }
            net.push(Msg::Command(c.clone()));
        }
        if let (Some(_), Some(live)) = (t.timer, t.state.timer()) {
            timers.push(live);
        }
        Ok(())
    };

    let first = machine::start(&def, serde_json::json!({"order": 1}));
    record(&first, &mut net, &mut timers)?;
    let mut state: SagaState = first.state;

    for _ in 0..50_000 {
        if state.status.is_terminal() && net.is_empty() {
            break;
        }
        let input = if !net.is_empty() && (state.status.is_terminal() || rng.chance(85)) {
            let i = rng.below(net.len());
            let msg = net.swap_remove(i);
            if rng.chance(10) {
                net.push(msg.clone()); // duplicated
            }
            if rng.chance(5) {
                continue; // lost
            }
            match msg {
                Msg::Command(c) => match world.handle(&c, &mut rng) {
                    Some(reply) => {
                        net.push(Msg::Reply(reply));
                        continue;
                    }
                    None => continue,
                },
                Msg::Reply(r) => r,
            }
        } else if rng.chance(1) {
            // Someone cancels the saga, at any point.
            Input::Cancel {
                reason: "asked".into(),
            }
        } else if !timers.is_empty() && rng.chance(20) {
            let (phase, step, attempt) = timers[rng.below(timers.len())];
            Input::Timer {
                phase,
                step,
                attempt,
            } // possibly stale
        } else if let Some((phase, step, attempt)) = state.timer() {
            Input::Timer {
                phase,
                step,
                attempt,
            }
        } else {
            continue;
        };
        let before = state.clone();
        let t = machine::apply(&def, &state, input);
        if !t.applied {
            prop_assert_eq!(&t.state, &before, "an ignored input changed the state");
            prop_assert!(t.commands.is_empty());
            continue;
        }
        record(&t, &mut net, &mut timers)?;
        state = t.state;
    }

    prop_assert!(
        state.status.is_terminal(),
        "saga did not finish: {:?}",
        state.status
    );
    for (step, n) in &world.effects {
        prop_assert!(*n <= 1, "step {} took effect {} times", step, n);
    }
    for w in compensations_issued.windows(2) {
        prop_assert!(
            w[0] > w[1],
            "compensations out of reverse order: {:?}",
            compensations_issued
        );
    }
    for w in world.undone.windows(2) {
        prop_assert!(
            w[0] > w[1],
            "effects undone out of reverse order: {:?}",
            world.undone
        );
    }
    match state.status {
        SagaStatus::Completed => {
            prop_assert_eq!(world.applied.len(), def.steps.len());
            prop_assert!(world.undone.is_empty());
            prop_assert!(compensations_issued.is_empty());
        }
        SagaStatus::Compensated => {
            for step in &world.applied {
                prop_assert!(
                    def.steps[*step].compensation.is_none(),
                    "step {} still in effect after compensation",
                    step
                );
            }
        }
        ref other => prop_assert!(false, "ended {:?}", other),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_saga_completes_or_is_fully_compensated_in_reverse(
        steps in prop::collection::vec((1u32..=3, prop::bool::weighted(0.8)), 1..=5),
        seed in any::<u64>(),
    ) {
        run(&steps, seed)?;
    }
}

#[test]
fn compensation_that_cannot_succeed_is_visible() {
    let def = SagaDefinition::builder("s", 1)
        .step(
            Step::new("a", Action::new("a", "t").on_success("ok")).compensation(
                Action::new("undo", "t")
                    .on_success("ok")
                    .on_failure("no")
                    .retry(RetryPolicy::new(
                        2,
                        Duration::from_millis(1),
                        Duration::from_millis(1),
                    )),
            ),
        )
        .step(Step::new(
            "b",
            Action::new("b", "t").on_success("ok").on_failure("no"),
        ))
        .build()
        .expect("valid");
    let t = machine::start(&def, serde_json::json!({}));
    let ok = |phase, step, attempt| Input::Reply {
        phase,
        step,
        attempt,
        outcome: Outcome::Success(serde_json::json!({})),
    };
    let t = machine::apply(&def, &t.state, ok(Phase::Forward, 0, 1));
    let t = machine::apply(
        &def,
        &t.state,
        Input::Reply {
            phase: Phase::Forward,
            step: 1,
            attempt: 1,
            outcome: failure(false),
        },
    );
    assert_eq!(t.state.status.name(), "compensating");
    assert_eq!(t.commands.len(), 1);
    // The first compensation attempt fails retryably, the second times out.
    let t = machine::apply(
        &def,
        &t.state,
        Input::Reply {
            phase: Phase::Compensate,
            step: 0,
            attempt: 1,
            outcome: failure(true),
        },
    );
    let t = machine::apply(
        &def,
        &t.state,
        Input::Timer {
            phase: Phase::Compensate,
            step: 0,
            attempt: 1,
        },
    );
    assert_eq!(t.commands.len(), 1, "retried after the backoff");
    let t = machine::apply(
        &def,
        &t.state,
        Input::Timer {
            phase: Phase::Compensate,
            step: 0,
            attempt: 2,
        },
    );
    assert_eq!(
        t.state.status,
        SagaStatus::CompensationFailed {
            step: 0,
            attempt: 2
        }
    );
    assert!(t.timer.is_none());
    // Anything after the end is ignored.
    let late = machine::apply(&def, &t.state, ok(Phase::Compensate, 0, 2));
    assert!(!late.applied);
    assert!(!machine::apply(&def, &t.state, cancel()).applied);

    // A retry by request sends the compensation once more, with an attempt
    // no earlier one used; failing again ends it as before.
    let failed = t.state;
    let t = machine::apply(&def, &failed, Input::Retry);
    assert!(t.applied, "{}", t.note);
    assert_eq!(t.commands.len(), 1);
    assert_eq!(
        (t.commands[0].phase, t.commands[0].attempt),
        (Phase::Compensate, 3)
    );
    assert_eq!(t.state.status.name(), "compensating");
    assert!(t.timer.is_some());
    let again = machine::apply(
        &def,
        &t.state,
        Input::Reply {
            phase: Phase::Compensate,
            step: 0,
            attempt: 3,
            outcome: failure(true),
        },
    );
    assert_eq!(
        again.state.status,
        SagaStatus::CompensationFailed {
            step: 0,
            attempt: 3
        }
    );
    assert_eq!(
        machine::apply(&def, &again.state, Input::Retry).commands[0].attempt,
        4
    );
    // This time it succeeds: the saga ends compensated.
    let t = machine::apply(&def, &t.state, ok(Phase::Compensate, 0, 3));
    assert_eq!(t.state.status, SagaStatus::Compensated);
    assert!(!machine::apply(&def, &t.state, Input::Retry).applied);
}

fn cancel() -> Input {
    Input::Cancel {
        reason: "customer withdrew".into(),
    }
}

#[test]
fn a_cancelled_saga_compensates_what_took_effect_and_the_step_in_flight() {
    let def = definition(&[(1, true), (1, false), (1, true), (1, true)]);
    let t = machine::start(&def, serde_json::json!({}));
    let ok = |t: &machine::Transition, step| {
        machine::apply(
            &def,
            &t.state,
            Input::Reply {
                phase: Phase::Forward,
                step,
                attempt: 1,
                outcome: Outcome::Success(serde_json::json!({})),
            },
        )
    };
    let t = ok(&t, 0);
    let t = ok(&t, 1);
    // Step 2's command is out, its reply not in.
    let t = machine::apply(&def, &t.state, cancel());
    assert!(t.applied, "{}", t.note);
    assert_eq!(
        t.state.failure.as_ref().map(|f| f.code.as_str()),
        Some("cancelled")
    );
    // Step 2 first (its outcome is unknown), then 0; step 1 has no compensation.
    assert_eq!(t.commands.len(), 1);
    assert_eq!(
        (t.commands[0].phase, t.commands[0].step),
        (Phase::Compensate, 2)
    );
    assert!(
        !machine::apply(&def, &t.state, cancel()).applied,
        "already compensating"
    );
    let undo = |t: &machine::Transition, step| {
        machine::apply(
            &def,
            &t.state,
            Input::Reply {
                phase: Phase::Compensate,
                step,
                attempt: 1,
                outcome: Outcome::Success(serde_json::Value::Null),
            },
        )
    };
    let t = undo(&t, 2);
    assert_eq!(
        (t.commands[0].phase, t.commands[0].step),
        (Phase::Compensate, 0)
    );
    let t = undo(&t, 0);
    assert_eq!(t.state.status, SagaStatus::Compensated);
    assert!(!machine::apply(&def, &t.state, cancel()).applied, "over");
    // The late reply of the cancelled step changes nothing.
    assert!(!ok(&t, 2).applied);
}

#[test]
fn results_are_kept_in_the_saga_data_for_later_steps() {
    let def = SagaDefinition::builder("s", 1)
        .step(Step::new("reserve", Action::new("a", "t").on_success("ok")))
        .step(Step::new(
            "pay",
            Action::new("b", "t")
                .on_success("ok")
                .input("hold", "/results/reserve/hold"),
        ))
        .build()
        .expect("valid");
    let t = machine::start(&def, serde_json::json!({"order": 7}));
    let t = machine::apply(
        &def,
        &t.state,
        Input::Reply {
            phase: Phase::Forward,
            step: 0,
            attempt: 1,
            outcome: Outcome::Success(serde_json::json!({"hold": "h-1"})),
        },
    );
    assert_eq!(t.commands[0].data, serde_json::json!({"hold": "h-1"}));
    // An early reply (for an attempt not sent yet) is ignored.
    let early = machine::apply(
        &def,
        &t.state,
        Input::Reply {
            phase: Phase::Forward,
            step: 1,
            attempt: 2,
            outcome: Outcome::Success(serde_json::Value::Null),
        },
    );
    assert!(!early.applied);
}
