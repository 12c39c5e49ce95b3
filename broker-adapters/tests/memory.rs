//! The in-memory adapter against the shared conformance suite.

use std::sync::Arc;

use async_trait::async_trait;
use broker_adapters::conformance::{Capabilities, Target};
use broker_adapters::{MemoryBroker, Publisher, Result, Subscriber, Topic};

/// One broker per test; every subscriber shares it, as processes would share
/// a networked broker.
#[derive(Debug, Default)]
struct Memory {
    broker: MemoryBroker,
}

#[async_trait]
impl Target for Memory {
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(self.broker.clone()))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(self.broker.clone()))
    }

    async fn topic(&self, name: &str) -> Result<Topic> {
        Topic::try_from(name)
    }
}

broker_adapters::conformance_suite!(std::future::ready(Memory::default()));
