use tower::Layer;

use super::Trace;

/// Applies [`Trace`] to a handler.
#[derive(Debug, Clone, Copy)]
pub struct TraceLayer {
    system: &'static str,
}

impl TraceLayer {
    /// Traces handler calls, naming `system` (e.g. `kafka`, `memory`) as
    /// their `messaging.system`.
    pub fn new(system: &'static str) -> Self {
        Self { system }
    }

    /// The messaging system named in the spans.
    pub fn system(&self) -> &'static str {
        self.system
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace::new(inner, self.system)
    }
}
