//! Helpers shared by the middleware tests.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cloudevents::Event;
use futures_util::future::{BoxFuture, FutureExt};
use tower::Service;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Metadata, Subscriber};

use crate::event::CloudEventBuilder;
use crate::router::HandlerError;
use crate::subscriber::{ConsumerGroup, DeliveryInfo, Received};
use crate::topic::Topic;

/// `event` as delivered on `orders` to group `billing`, attempt `attempt`.
pub(crate) fn received_event(event: Event, attempt: u32) -> Received {
    Received {
        event: event.into(),
        info: DeliveryInfo {
            topic: Topic::from_static("orders"),
            group: ConsumerGroup::try_from("billing").expect("valid group"),
            attempt: NonZeroU32::new(attempt).expect("attempts count from 1"),
        },
    }
}

/// A JSON event with data `{"n": 1}`, as [`received_event`].
pub(crate) fn received(attempt: u32) -> Received {
    let event = CloudEventBuilder::new("com.example.order.placed", "/orders")
        .json_data(&serde_json::json!({"n": 1}))
        .build()
        .expect("valid event");
    received_event(event, attempt)
}

/// A handler that fails its first `failures` calls (counted in `calls`, over
/// all clones) with `make("failure <n>")`, then succeeds.
pub(crate) fn fails<F>(
    calls: Arc<AtomicU32>,
    failures: u32,
    make: F,
) -> impl Service<
    Received,
    Response = (),
    Error = HandlerError,
    Future = BoxFuture<'static, Result<(), HandlerError>>,
> + Clone
+ Send
+ 'static
where
    F: Fn(String) -> HandlerError + Clone + Send + Sync + 'static,
{
    tower::service_fn(move |_: Received| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let result = if n <= failures {
            Err(make(format!("failure {n}")))
        } else {
            Ok(())
        };
        futures_util::future::ready(result).boxed()
    })
}

/// A span as captured: its name and fields rendered as text.
#[derive(Debug, Clone)]
pub(crate) struct CapturedSpan {
    name: &'static str,
    fields: BTreeMap<String, String>,
}

impl CapturedSpan {
    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

#[derive(Debug, Default)]
struct State {
    spans: Vec<CapturedSpan>,
    /// Entered spans (indexes into `spans`), innermost last.
    stack: Vec<usize>,
    /// Each event's message and the span it was emitted in.
    events: Vec<(String, Option<usize>)>,
}

/// A minimal `tracing` subscriber that records spans, their fields and
/// which span each event was emitted in. Use with
/// `WithSubscriber::with_subscriber` so tests do not share it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Capture {
    state: Arc<Mutex<State>>,
}

impl Capture {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every captured span named `name`, in creation order.
    pub(crate) fn spans(&self, name: &str) -> Vec<CapturedSpan> {
        self.state()
            .spans
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    /// The one captured span named `name`.
    pub(crate) fn span(&self, name: &str) -> CapturedSpan {
        let mut spans = self.spans(name);
        assert_eq!(spans.len(), 1, "expected one `{name}` span");
        spans.remove(0)
    }

    /// The name of the span the event with `message` was emitted in.
    pub(crate) fn event_span(&self, message: &str) -> Option<String> {
        let state = self.state();
        let (_, span) = state.events.iter().find(|(m, _)| m == message)?;
        span.map(|i| state.spans[i].name.to_owned())
    }

    fn index(id: &Id) -> usize {
        usize::try_from(id.into_u64()).expect("fits") - 1
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attributes: &Attributes<'_>) -> Id {
        let mut fields = BTreeMap::new();
        attributes.record(&mut Fields(&mut fields));
        let mut state = self.state();
        state.spans.push(CapturedSpan {
            name: attributes.metadata().name(),
            fields,
        });
        // Ids are per subscriber: the span's index, plus one (ids are non-zero).
        Id::from_u64(u64::try_from(state.spans.len()).expect("fits"))
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut state = self.state();
        let index = Self::index(span);
        values.record(&mut Fields(&mut state.spans[index].fields));
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let mut state = self.state();
        let current = state.stack.last().copied();
        let message = fields.remove("message").unwrap_or_default();
        state.events.push((message, current));
    }

    fn enter(&self, span: &Id) {
        self.state().stack.push(Self::index(span));
    }

    fn exit(&self, span: &Id) {
        let index = Self::index(span);
        let mut state = self.state();
        if let Some(at) = state.stack.iter().rposition(|&i| i == index) {
            state.stack.remove(at);
        }
    }
}
