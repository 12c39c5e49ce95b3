//! The order saga used by the saga tests and the `saga-proc` coordinator.

use std::time::Duration;

use orchestrator::saga::{Action, RetryPolicy, SagaDefinition, Step};

/// A three-step order saga: reserve (inventory), charge (payment), ship
/// (shipping); reserve and charge have compensations.
pub(crate) fn order_saga(
    prefix: &str,
    version: u32,
    timeout: Duration,
    attempts: u32,
) -> anyhow::Result<SagaDefinition> {
    let action = |ty: &str, topic: &str| {
        Action::new(ty, format!("{prefix}{topic}"))
            .on_success(format!("{ty}.done"))
            .on_failure(format!("{ty}.failed"))
            .timeout(timeout)
            .retry(RetryPolicy::new(
                attempts,
                Duration::from_millis(20),
                Duration::from_millis(200),
            ))
    };
    Ok(SagaDefinition::builder("order", version)
        .step(
            Step::new(
                "reserve",
                action("inventory.reserve", "inventory").input("sku", "/sku"),
            )
            .compensation(action("inventory.release", "inventory").retry(
                RetryPolicy::new(20, Duration::from_millis(20), Duration::from_millis(100)),
            )),
        )
        .step(
            Step::new(
                "charge",
                action("payment.charge", "payment").input("amount", "/amount"),
            )
            .compensation(action("payment.refund", "payment").retry(RetryPolicy::new(
                20,
                Duration::from_millis(20),
                Duration::from_millis(100),
            ))),
        )
        .step(Step::new("ship", action("shipping.ship", "shipping")))
        .build()?)
}
