//! The Kafka adapter against the shared conformance suite, on the real
//! Kafka-protocol broker the harness runs (Tansu by default).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_adapters::conformance::{Capabilities, Target};
use broker_adapters::kafka::{KafkaBroker, KafkaConfig};
use broker_adapters::{Publisher, Result, Subscriber, Topic};
use e2e::Server;

/// Consumer-group joins on Tansu wait about half the session timeout.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

#[derive(Debug)]
struct Kafka {
    publisher: KafkaBroker,
}

fn config() -> KafkaConfig {
    KafkaConfig::builder(e2e::kafka_bootstrap_servers().split(','))
        .session_timeout(SESSION_TIMEOUT)
        .commit_interval(Duration::from_millis(20))
}

async fn target() -> Kafka {
    if let Err(e) = e2e::require(Server::Kafka) {
        panic!("{e:#}");
    }
    let publisher = KafkaBroker::connect(config())
        .await
        .unwrap_or_else(|e| panic!("{:#}", Server::Kafka.unreachable(e)));
    Kafka { publisher }
}

#[async_trait]
impl Target for Kafka {
    fn capabilities(&self) -> Capabilities {
        // Joins and rebalances take seconds on a real group coordinator.
        Capabilities::default().receive_timeout(Duration::from_secs(30))
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(self.publisher.clone()))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        // A client of its own, so dropping it behaves like a crashed process.
        Ok(Arc::new(KafkaBroker::connect(config()).await?))
    }

    async fn topic(&self, name: &str) -> Result<Topic> {
        let topic = Topic::try_from(name)?;
        self.publisher.create_topic(&topic, 2).await?;
        Ok(topic)
    }
}

broker_adapters::conformance_suite!(target());
