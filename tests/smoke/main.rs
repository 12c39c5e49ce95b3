//! Smoke tests: one round trip through each real server the harness provides.
//!
//! Run with `source tests/harness/up.sh && cargo test -p e2e --test smoke`.
//! Each test fails (never skips) when its server is missing, naming the server.
//! Every wait is bounded, so a hung server fails the test instead of blocking CI.

use std::time::Duration;

mod kafka;
mod nats;
mod postgres;

/// The bound on each single step of a smoke test (connect, send, receive, ...).
const STEP: Duration = Duration::from_secs(30);
