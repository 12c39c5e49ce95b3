//! Saga definitions: an ordered list of steps, written with the typed
//! builder or loaded from YAML/JSON, validated at load.
//!
//! ```
//! use std::time::Duration;
//! use orchestrator::saga::{Action, RetryPolicy, SagaDefinition, Step};
//!
//! let yaml = r#"
//! name: order
//! version: 1
//! steps:
//!   - name: reserve
//!     command:
//!       type: com.example.inventory.reserve
//!       topic: inventory.commands
//!       input: { sku: /sku, quantity: /quantity }
//!       success: [com.example.inventory.reserved]
//!       failure: [com.example.inventory.rejected]
//!       timeout_ms: 5000
//!       retry: { max_attempts: 3, initial_backoff_ms: 100, max_backoff_ms: 2000 }
//!     compensation:
//!       type: com.example.inventory.release
//!       topic: inventory.commands
//!       success: [com.example.inventory.released]
//! "#;
//! let from_file = SagaDefinition::from_yaml(yaml)?;
//!
//! let typed = SagaDefinition::builder("order", 1)
//!     .step(
//!         Step::new(
//!             "reserve",
//!             Action::new("com.example.inventory.reserve", "inventory.commands")
//!                 .input("sku", "/sku")
//!                 .input("quantity", "/quantity")
//!                 .on_success("com.example.inventory.reserved")
//!                 .on_failure("com.example.inventory.rejected")
//!                 .timeout(Duration::from_secs(5))
//!                 .retry(RetryPolicy::new(3, Duration::from_millis(100), Duration::from_secs(2))),
//!         )
//!         .compensation(
//!             Action::new("com.example.inventory.release", "inventory.commands")
//!                 .on_success("com.example.inventory.released"),
//!         ),
//!     )
//!     .build()?;
//! assert_eq!(from_file, typed);
//! # Ok::<(), orchestrator::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// A versioned saga definition: its steps run in order; on failure the
/// compensations of the completed steps run in reverse order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaDefinition {
    /// The saga type, e.g. `order`.
    pub name: String,
    /// The version (≥ 1); a running saga keeps the version it started with.
    pub version: u32,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// One step: a command and, optionally, the command that undoes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The step name, unique in the saga (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// The forward command.
    pub command: Action,
    /// The compensating command; a step without one needs no undoing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Action>,
}

/// A command sent to a participant and the replies it expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// The CloudEvent type of the command.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The destination topic.
    pub topic: String,
    /// How the command's data is built: field name → JSON pointer into the
    /// saga data (`""` is the whole data). Empty: the whole saga data. A
    /// pointer that finds nothing gives `null`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input: BTreeMap<String, String>,
    /// Reply types that mean success.
    pub success: Vec<String>,
    /// Reply types that mean failure (their data carries the error shape).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failure: Vec<String>,
    /// How long to wait for a reply to one attempt, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How often to try, and the backoff between tries.
    #[serde(default)]
    pub retry: RetryPolicy,
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// Attempts and exponential backoff (doubling, capped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all (≥ 1): a timeout or a retryable failure reply
    /// leads to another attempt until this many were made.
    pub max_attempts: u32,
    /// The wait before the second attempt after a retryable failure, ms.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// The longest wait between attempts, ms.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_initial_backoff_ms() -> u64 {
    100
}
fn default_max_backoff_ms() -> u64 {
    10_000
}

impl Default for RetryPolicy {
    /// Three attempts, backoff 100 ms doubling up to 10 s.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

impl RetryPolicy {
    /// `max_attempts` in all, backoff from `initial` doubling up to `max`.
    pub fn new(max_attempts: u32, initial: Duration, max: Duration) -> Self {
        Self {
            max_attempts,
            initial_backoff_ms: millis(initial),
            max_backoff_ms: millis(max),
        }
    }

    /// The wait after the failure of attempt `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(30);
        let ms = self
            .initial_backoff_ms
            .saturating_mul(1u64 << shift)
            .min(self.max_backoff_ms);
        Duration::from_millis(ms)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Action {
    /// A command of type `event_type` sent to `topic`, with the defaults:
    /// the whole saga data as input, 30 s timeout, [`RetryPolicy::default`].
    pub fn new(event_type: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            event_type: event_type.into(),
            topic: topic.into(),
            input: BTreeMap::new(),
            success: Vec::new(),
            failure: Vec::new(),
            timeout_ms: default_timeout_ms(),
            retry: RetryPolicy::default(),
        }
    }

    /// Adds the input field `field` taken from the saga data at `pointer`.
    #[must_use]
    pub fn input(mut self, field: impl Into<String>, pointer: impl Into<String>) -> Self {
        self.input.insert(field.into(), pointer.into());
        self
    }

    /// Adds a reply type meaning success.
    #[must_use]
    pub fn on_success(mut self, reply_type: impl Into<String>) -> Self {
        self.success.push(reply_type.into());
        self
    }

    /// Adds a reply type meaning failure.
    #[must_use]
    pub fn on_failure(mut self, reply_type: impl Into<String>) -> Self {
        self.failure.push(reply_type.into());
        self
    }

    /// Sets the reply timeout of one attempt.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = millis(timeout);
        self
    }

    /// Sets the retry policy.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The reply timeout of one attempt.
    pub fn timeout_duration(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Builds the command data from the saga data.
    pub fn build_input(&self, data: &serde_json::Value) -> serde_json::Value {
        if self.input.is_empty() {
            return data.clone();
        }
        let map = self
            .input
            .iter()
            .map(|(field, pointer)| {
                let value = data
                    .pointer(pointer)
                    .cloned()
                    .unwrap_or(serde_json::Value::Null);
                (field.clone(), value)
            })
            .collect();
        serde_json::Value::Object(map)
    }

    fn validate(&self, saga: &str, step: &str, which: &str) -> Result<()> {
        let fail = |field: &str, reason: String| {
            Err(invalid(
                saga,
                Some(step),
                format!("{which}.{field}"),
                reason,
            ))
        };
        if self.event_type.trim().is_empty() {
            return fail("type", "must not be empty".into());
        }
        if let Err(e) = broker_adapters::Topic::try_from(self.topic.as_str()) {
            return fail(
                "topic",
                format!("`{}` is not a valid topic: {e}", self.topic),
            );
        }
        for (field, pointer) in &self.input {
            if field.is_empty() {
                return fail("input", "field names must not be empty".into());
            }
            if !(pointer.is_empty() || pointer.starts_with('/')) {
                return fail(
                    &format!("input.{field}"),
                    format!("`{pointer}` is not a JSON pointer (it must start with `/`)"),
                );
            }
        }
        if self.success.is_empty() {
            return fail(
                "success",
                "at least one success reply type is required".into(),
            );
        }
        for ty in self.success.iter().chain(&self.failure) {
            if ty.trim().is_empty() {
                return fail("success", "reply types must not be empty".into());
            }
        }
        if let Some(both) = self.success.iter().find(|t| self.failure.contains(t)) {
            return fail(
                "failure",
                format!("`{both}` is listed both as success and as failure"),
            );
        }
        if self.timeout_ms == 0 {
            return fail("timeout_ms", "must be positive".into());
        }
        if self.retry.max_attempts == 0 {
            return fail("retry.max_attempts", "must be at least 1".into());
        }
        if self.retry.initial_backoff_ms > self.retry.max_backoff_ms {
            return fail(
                "retry.initial_backoff_ms",
                "must not exceed retry.max_backoff_ms".into(),
            );
        }
        Ok(())
    }
}

impl Step {
    /// A step `name` issuing `command`, with no compensation.
    pub fn new(name: impl Into<String>, command: Action) -> Self {
        Self {
            name: name.into(),
            command,
            compensation: None,
        }
    }

    /// Sets the compensating command.
    #[must_use]
    pub fn compensation(mut self, compensation: Action) -> Self {
        self.compensation = Some(compensation);
        self
    }
}

/// Builds a [`SagaDefinition`]; see the module docs.
#[derive(Debug, Clone)]
pub struct SagaBuilder {
    definition: SagaDefinition,
}

impl SagaBuilder {
    /// Appends a step.
    #[must_use]
    pub fn step(mut self, step: Step) -> Self {
        self.definition.steps.push(step);
        self
    }

    /// Validates and returns the definition.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidDefinition`] naming the step and field.
    pub fn build(self) -> Result<SagaDefinition> {
        self.definition.validate()?;
        Ok(self.definition)
    }
}

fn invalid(saga: &str, step: Option<&str>, field: String, reason: String) -> Error {
    Error::new(ErrorKind::InvalidDefinition {
        saga: saga.to_owned(),
        step: step.map(str::to_owned),
        field,
        reason,
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl SagaDefinition {
    /// Starts a definition of saga type `name`, version `version`.
    pub fn builder(name: impl Into<String>, version: u32) -> SagaBuilder {
        SagaBuilder {
            definition: Self {
                name: name.into(),
                version,
                steps: Vec::new(),
            },
        }
    }

    /// Parses and validates a YAML definition.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidDefinition`]: unparsable, or a step's field is invalid.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let def: Self = serde_yaml::from_str(text).map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidDefinition {
                    saga: String::new(),
                    step: None,
                    field: String::new(),
                    reason: "not a valid YAML saga definition".into(),
                },
                e,
            )
        })?;
        def.validate()?;
        Ok(def)
    }

    /// Parses and validates a JSON definition.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidDefinition`]: unparsable, or a step's field is invalid.
    pub fn from_json(text: &str) -> Result<Self> {
        let def: Self = serde_json::from_str(text).map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidDefinition {
                    saga: String::new(),
                    step: None,
                    field: String::new(),
                    reason: "not a valid JSON saga definition".into(),
                },
                e,
            )
        })?;
        def.validate()?;
        Ok(def)
    }

    /// Checks every rule a loaded definition must satisfy.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidDefinition`] naming the step and field.
    pub fn validate(&self) -> Result<()> {
        if !valid_name(&self.name) {
            return Err(invalid(
                &self.name,
                None,
                "name".into(),
                "must be 1-100 letters, digits, `-`, `_` or `.`".into(),
            ));
        }
        if self.version == 0 {
            return Err(invalid(
                &self.name,
                None,
                "version".into(),
                "must be at least 1".into(),
            ));
        }
        if self.steps.is_empty() {
            return Err(invalid(
                &self.name,
                None,
                "steps".into(),
                "at least one step is required".into(),
            ));
        }
        let mut seen = HashSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            if !valid_name(&step.name) {
                return Err(invalid(
                    &self.name,
                    Some(&format!("#{}", i + 1)),
                    "name".into(),
                    format!(
                        "`{}` must be 1-100 letters, digits, `-`, `_` or `.`",
                        step.name
                    ),
                ));
            }
            if !seen.insert(step.name.as_str()) {
                return Err(invalid(
                    &self.name,
                    Some(&step.name),
                    "name".into(),
                    "another step has the same name".into(),
                ));
            }
            step.command.validate(&self.name, &step.name, "command")?;
            if let Some(c) = &step.compensation {
                c.validate(&self.name, &step.name, "compensation")?;
            }
        }
        Ok(())
    }

    /// The index of the step named `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}

/// The definitions a coordinator knows, by saga type and version.
#[derive(Debug, Clone, Default)]
pub struct Definitions {
    by_key: HashMap<(String, u32), Arc<SagaDefinition>>,
    latest: HashMap<String, u32>,
}

impl Definitions {
    /// No definitions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a definition (validated again).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidDefinition`], also when this type and version is
    /// already registered with different content.
    pub fn register(&mut self, definition: SagaDefinition) -> Result<&mut Self> {
        definition.validate()?;
        let key = (definition.name.clone(), definition.version);
        if let Some(existing) = self.by_key.get(&key) {
            if **existing != definition {
                return Err(invalid(
                    &definition.name,
                    None,
                    "version".into(),
                    format!(
                        "version {} is already registered with different steps; publish a new version",
                        definition.version
                    ),
                ));
            }
            return Ok(self);
        }
        let latest = self.latest.entry(definition.name.clone()).or_insert(0);
        *latest = (*latest).max(definition.version);
        self.by_key.insert(key, Arc::new(definition));
        Ok(self)
    }

    /// Adds a definition; see [`register`](Self::register).
    ///
    /// # Errors
    ///
    /// As `register`.
    pub fn with(mut self, definition: SagaDefinition) -> Result<Self> {
        self.register(definition)?;
        Ok(self)
    }

    /// The definition of `name` at `version`.
    pub fn get(&self, name: &str, version: u32) -> Option<&Arc<SagaDefinition>> {
        self.by_key.get(&(name.to_owned(), version))
    }

    /// The newest version of `name`.
    pub fn latest(&self, name: &str) -> Option<&Arc<SagaDefinition>> {
        let v = self.latest.get(name)?;
        self.get(name, *v)
    }

    /// Every registered definition, by name, then version.
    pub fn all(&self) -> Vec<&Arc<SagaDefinition>> {
        let mut all: Vec<_> = self.by_key.values().collect();
        all.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
        all
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action() -> Action {
        Action::new("com.example.do", "things").on_success("com.example.done")
    }

    #[test]
    fn invalid_definitions_name_the_step_and_field() {
        let err = SagaDefinition::builder("s", 1)
            .step(Step::new("a", action()))
            .step(Step::new("b", action().timeout(Duration::ZERO)))
            .build()
            .expect_err("zero timeout");
        match err.kind() {
            ErrorKind::InvalidDefinition { step, field, .. } => {
                assert_eq!(step.as_deref(), Some("b"));
                assert_eq!(field, "command.timeout_ms");
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("step `b`"), "{err}");

        let yaml = "name: s\nversion: 1\nsteps:\n  - name: a\n    command: { type: t, topic: x, success: [] }\n";
        let err = SagaDefinition::from_yaml(yaml).expect_err("no success type");
        assert!(err.to_string().contains("command.success"), "{err}");

        let dup = SagaDefinition::builder("s", 1)
            .step(Step::new("a", action()))
            .step(Step::new("a", action()))
            .build();
        assert!(dup.is_err());
        let bad_pointer = SagaDefinition::builder("s", 1)
            .step(Step::new("a", action().input("x", "nope")))
            .build()
            .expect_err("bad pointer");
        assert!(
            bad_pointer.to_string().contains("command.input.x"),
            "{bad_pointer}"
        );
        assert!(SagaDefinition::from_json("{\"name\": \"s\"}").is_err());
        assert!(SagaDefinition::from_yaml("name: s\nversion: 1\nsteps: []\nextra: 1\n").is_err());
    }

    #[test]
    fn input_is_mapped_from_the_saga_data() {
        let a = action()
            .input("sku", "/order/sku")
            .input("missing", "/nope");
        let data = serde_json::json!({"order": {"sku": "x-1"}});
        assert_eq!(
            a.build_input(&data),
            serde_json::json!({"sku": "x-1", "missing": null})
        );
        assert_eq!(action().build_input(&data), data);
    }

    #[test]
    fn versions_are_kept_apart() {
        let v1 = SagaDefinition::builder("s", 1)
            .step(Step::new("a", action()))
            .build()
            .expect("v1");
        let v2 = SagaDefinition::builder("s", 2)
            .step(Step::new("a", action()))
            .step(Step::new("b", action()))
            .build()
            .expect("v2");
        let defs = Definitions::new()
            .with(v1)
            .expect("v1")
            .with(v2)
            .expect("v2");
        assert_eq!(defs.latest("s").map(|d| d.version), Some(2));
        assert_eq!(defs.get("s", 1).map(|d| d.steps.len()), Some(1));
        let changed = SagaDefinition::builder("s", 1)
            .step(Step::new("z", action()))
            .build()
            .expect("z");
        assert!(defs.with(changed).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::new(5, Duration::from_millis(10), Duration::from_millis(35));
        assert_eq!(p.backoff(1), Duration::from_millis(10));
        assert_eq!(p.backoff(2), Duration::from_millis(20));
        assert_eq!(p.backoff(3), Duration::from_millis(35));
    }
}
