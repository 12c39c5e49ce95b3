//! Validation of event data against the schema registry (feature
//! `validation`): [`ValidatingPublisher`] on the producer side and
//! [`ValidateLayer`] on the consumer side, both getting compiled schemas
//! from a [`SchemaSource`]: the in-process
//! [`schemas::Registry`] or a remote one through [`schemas::RegistryClient`].
//!
//! The subject of an event is its `type` unless a [`SubjectFn`] says
//! otherwise; data is read as JSON (an event without data is checked as
//! `null`).
//!
//! - Publishing: the data is checked against the subject's latest schema;
//!   a valid event gets `dataschema` set to the schema's registry URL
//!   (`{registry}/schemas/ids/{id}`) and is published; an invalid one is
//!   not sent, and `publish` fails with [`ErrorKind::InvalidEvent`]
//!   listing each failure with its JSON path. A subject with no schema, or
//!   a registry that cannot be reached, fails with
//!   [`ErrorKind::SchemaRegistry`] (retryable when the registry said so).
//! - Consuming: an event whose `dataschema` is a schema URL of this
//!   registry is checked against that schema (the one it was written
//!   with), any other against its subject's latest schema. Invalid data is
//!   a [permanent](HandlerError::permanent) failure, so a
//!   [`DeadLetterLayer`](super::DeadLetterLayer) outside this layer
//!   dead-letters it with the reason; a registry failure is retryable.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> broker_adapters::Result<()> {
//! use std::sync::Arc;
//!
//! use broker_adapters::middleware::validation::ValidatingPublisher;
//! use broker_adapters::prelude::*;
//! use broker_adapters::ErrorKind;
//! use futures_util::StreamExt;
//!
//! let registry = schemas::Registry::in_memory();
//! let contract = r#"{"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}"#;
//! registry.register("com.example.order.placed", contract).await.expect("registered");
//!
//! let broker = MemoryBroker::new();
//! let orders = Topic::from_static("orders");
//! let mut sub = broker.subscribe(&orders, SubscribeOptions::new("billing")?).await?;
//! let publisher = ValidatingPublisher::new(broker.clone(), Arc::new(registry));
//!
//! let ok = serde_json::json!({"total": 12.5});
//! publisher.publish_json(&orders, "com.example.order.placed", "/shop", &ok).await?;
//! let delivery = sub.next().await.expect("open")?;
//! let schema = delivery.event().dataschema().map(ToString::to_string);
//! assert_eq!(schema.as_deref(), Some("http://127.0.0.1:8081/schemas/ids/1"));
//!
//! let bad = serde_json::json!({"total": "twelve"});
//! let error = publisher.publish_json(&orders, "com.example.order.placed", "/shop", &bad).await.expect_err("fails");
//! assert!(matches!(error.kind(), ErrorKind::InvalidEvent { .. }));
//! assert!(error.to_string().contains("/total"));
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use async_trait::async_trait;
use cloudevents::event::Data;
use cloudevents::{AttributesReader, AttributesWriter, Event};
use futures_util::future::BoxFuture;
use schemas::{CompiledSchema, SchemaSource};
use serde_json::Value;
use tower::{Layer, Service};
use url::Url;

use crate::error::{Error, ErrorKind, Result};
use crate::publisher::Publisher;
use crate::router::HandlerError;
use crate::subscriber::Received;
use crate::topic::Topic;

/// Names the registry subject of an event.
pub type SubjectFn = Arc<dyn Fn(&Event) -> String + Send + Sync>;

/// The default subject: the event `type`.
pub fn subject_from_type() -> SubjectFn {
    Arc::new(|event: &Event| event.ty().to_owned())
}

#[derive(Clone)]
struct Config {
    source: Arc<dyn SchemaSource>,
    subject: SubjectFn,
    /// Parsed schema URLs by schema id: ids never change meaning.
    urls: Arc<RwLock<HashMap<u32, Url>>>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Config {
    fn new(source: Arc<dyn SchemaSource>) -> Self {
        Self {
            source,
            subject: subject_from_type(),
            urls: Arc::default(),
        }
    }

    /// The URL of `schema`, parsed once per schema id.
    fn url(&self, schema: &CompiledSchema) -> Result<Url> {
        if let Ok(urls) = self.urls.read()
            && let Some(url) = urls.get(&schema.id())
        {
            return Ok(url.clone());
        }
        let url = Url::parse(schema.url()).map_err(|e| {
            Error::with_source(
                ErrorKind::Config {
                    key: "schema registry base URL".into(),
                    reason: format!("`{}` is not a URL", schema.url()),
                },
                e,
            )
        })?;
        if let Ok(mut urls) = self.urls.write() {
            urls.insert(schema.id(), url.clone());
        }
        Ok(url)
    }

    /// The schema to check `event` against when consuming it.
    async fn consumed_schema(&self, event: &Event) -> Result<Arc<CompiledSchema>> {
        let subject = (self.subject)(event);
        let by_id = event
            .dataschema()
            .and_then(|url| self.source.id_from_url(url.as_str()));
        let found = match by_id {
            Some(id) => self.source.by_id(id).await,
            None => self.source.latest(&subject).await,
        };
        found.map_err(|e| registry_error(subject, e))
    }

    async fn published_schema(&self, event: &Event) -> Result<Arc<CompiledSchema>> {
        let subject = (self.subject)(event);
        self.source
            .latest(&subject)
            .await
            .map_err(|e| registry_error(subject, e))
    }
}

fn registry_error(subject: String, error: schemas::Error) -> Error {
    let retryable = error.is_retryable();
    Error::with_source(ErrorKind::SchemaRegistry { subject, retryable }, error)
}

/// Checks the data of `event` against `schema`.
///
/// # Errors
///
/// [`ErrorKind::InvalidEvent`] with each failure, or [`ErrorKind::Decode`]
/// when the data is not JSON.
pub fn validate_event(event: &Event, schema: &CompiledSchema) -> Result<()> {
    let checked = match event.data() {
        None => schema.validate(&Value::Null),
        Some(Data::Json(value)) => schema.validate(value),
        Some(Data::String(text)) => {
            let value: Value = serde_json::from_str(text).map_err(|e| {
                Error::with_source(
                    ErrorKind::Decode {
                        what: "event data as JSON",
                    },
                    e,
                )
            })?;
            schema.validate(&value)
        }
        Some(Data::Binary(bytes)) => {
            let value: Value = serde_json::from_slice(bytes).map_err(|e| {
                Error::with_source(
                    ErrorKind::Decode {
                        what: "event data as JSON",
                    },
                    e,
                )
            })?;
            schema.validate(&value)
        }
    };
    checked.map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidEvent {
                reason: "data does not match its schema".into(),
            },
            e,
        )
    })
}

/// A [`Publisher`] that publishes only events whose data matches their
/// subject's schema, with `dataschema` set; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ValidatingPublisher<P> {
    inner: P,
    config: Config,
}

impl<P> ValidatingPublisher<P> {
    /// Wraps `inner`, taking schemas from `source`.
    pub fn new(inner: P, source: Arc<dyn SchemaSource>) -> Self {
        Self {
            inner,
            config: Config::new(source),
        }
    }

    /// Names subjects with `subject` instead of the event type.
    #[must_use]
    pub fn with_subject(mut self, subject: SubjectFn) -> Self {
        self.config.subject = subject;
        self
    }

    /// The wrapped publisher.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Unwraps the publisher.
    pub fn into_inner(self) -> P {
        self.inner
    }

    async fn check(&self, event: &mut Event) -> Result<()> {
        let schema = self.config.published_schema(event).await?;
        validate_event(event, &schema)?;
        let url = self.config.url(&schema)?;
        event.set_dataschema(Some(url));
        Ok(())
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl<P: Publisher> Publisher for ValidatingPublisher<P> {
    async fn publish(&self, topic: &Topic, mut event: Event) -> Result<()> {
        self.check(&mut event).await?;
        self.inner.publish(topic, event).await
    }

    async fn publish_batch(&self, topic: &Topic, mut events: Vec<Event>) -> Result<()> {
        // All or nothing: one invalid event keeps the whole batch back.
        for event in &mut events {
            self.check(event).await?;
        }
        self.inner.publish_batch(topic, events).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// Applies [`Validate`] to a handler; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ValidateLayer {
    config: Config,
}

impl ValidateLayer {
    /// Validates against schemas from `source`, subjects being event types.
    pub fn new(source: Arc<dyn SchemaSource>) -> Self {
        Self {
            config: Config::new(source),
        }
    }

    /// Names subjects with `subject` instead of the event type.
    #[must_use]
    pub fn with_subject(mut self, subject: SubjectFn) -> Self {
        self.config.subject = subject;
        self
    }
}

impl<S> Layer<S> for ValidateLayer {
    type Service = Validate<S>;

    fn layer(&self, inner: S) -> Validate<S> {
        Validate {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Hands the handler only events whose data matches their schema; see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct Validate<S> {
    inner: S,
    config: Config,
}

impl<S> Service<Received> for Validate<S>
where
    S: Service<Received, Response = ()> + Clone + Send + 'static,
    S::Error: Into<HandlerError>,
    S::Future: Send,
{
    type Response = ();
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<(), HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, received: Received) -> Self::Future {
        // The ready service handles this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        Box::pin(async move {
            let schema = config.consumed_schema(&received.event).await.map_err(|e| {
                if e.is_retryable() {
                    HandlerError::retryable(e)
                } else {
                    HandlerError::permanent(e)
                }
            })?;
            validate_event(&received.event, &schema).map_err(HandlerError::permanent)?;
            inner.call(received).await.map_err(Into::into)
        })
    }
}
