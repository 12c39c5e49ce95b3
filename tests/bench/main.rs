//! Benchmarks: our adapters beside the raw clients, measured in the same run.
//!
//! ```sh
//! source tests/harness/up.sh
//! cargo run --release -p e2e --bin bench              # everything
//! cargo run --release -p e2e --bin bench -- --only kafka --events 200000
//! ```
//!
//! Every figure is printed as one JSON line at the end:
//! `{"bench":…,"ours":…,"baseline":…,"ratio":…,"unit":…}` where `ratio` is
//! ours / baseline. For rates (`events/s`) higher is better, so a ratio of
//! 0.9 means 90 % of the raw client's throughput; for costs (`ns/event`)
//! lower is better.
//!
//! - publish: 1 KiB events, acknowledged by the broker (Kafka `acks=all` +
//!   idempotence; JetStream publish acks), pipelined by both sides.
//! - consume: the same events read back by a fresh consumer group and acked
//!   (offsets committed / JetStream acks); timed from the first event to the
//!   last, so the group join is not counted.
//! - outbox: raw PostgreSQL/SQLite insert rates (batched and one row per
//!   commit), relay throughput to NATS and Kafka beside the raw batched
//!   insert rate, and commit-to-broker-ack latency at half load beside the
//!   25 ms target (see `outbox.rs`).
//! - codec: encode + decode of one 1 KiB event in the CloudEvents Kafka
//!   binary binding, against the SDK's structured JSON round trip; and
//!   decoding the JSON event format with the crate's one-pass decoder,
//!   against the SDK's.

mod codec;
mod kafka;
mod memory;
mod nats;
mod outbox;
mod raw_relay;
mod raw_sql;
mod registry;
mod saga;

use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Services usually run on a production allocator; glibc's malloc is
/// pathological for many small frees followed by 1 KiB allocations. Both
/// sides of every comparison run on it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use serde_json::json;

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "Throughput of the adapters beside the raw clients")]
struct Args {
    /// Which benchmarks to run (all by default).
    #[arg(long, value_enum)]
    only: Vec<Which>,
    /// Events per broker benchmark.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Bytes of data per event.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Rounds per figure; the best round is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Sagas per saga benchmark run.
    #[arg(long, default_value_t = 2_000)]
    sagas: usize,
    /// Which saga set-ups to run (all by default).
    #[arg(long, value_enum)]
    saga_on: Vec<saga::SagaOn>,
    /// Which databases the outbox benchmark runs on (all by default).
    #[arg(long, value_enum)]
    outbox_on: Vec<outbox::OutboxOn>,
    /// Distinct partition keys the events cycle through (Kafka, NATS,
    /// memory and outbox benchmarks). Events of one key are kept in order,
    /// so few keys limit how many a broker without per-key sequencing
    /// (NATS) may have in flight.
    #[arg(long, default_value_t = 64)]
    keys: usize,
}

/// The partition-key count of this run (`--keys`).
static KEYS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// The partition key of the benchmark's `i`th event.
fn key(i: usize) -> String {
    format!("k{}", i % KEYS.get().copied().unwrap_or(64).max(1))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Codec,
    Memory,
    Kafka,
    Nats,
    Outbox,
    Saga,
    Registry,
}

/// One measured figure.
#[derive(Debug)]
struct Figure {
    bench: String,
    ours: f64,
    baseline: f64,
    unit: &'static str,
}

impl Figure {
    fn rate(bench: impl Into<String>, events: usize, ours: Duration, baseline: Duration) -> Self {
        Self {
            bench: bench.into(),
            ours: events as f64 / ours.as_secs_f64(),
            baseline: events as f64 / baseline.as_secs_f64(),
            unit: "events/s",
        }
    }

    /// A rate measured directly, in events/s.
    fn rates(bench: impl Into<String>, ours: f64, baseline: f64) -> Self {
        Self {
            bench: bench.into(),
            ours,
            baseline,
            unit: "events/s",
        }
    }

    /// A latency in milliseconds beside its target (lower is better).
    fn millis(bench: impl Into<String>, ours: f64, target: f64) -> Self {
        Self {
            bench: bench.into(),
            ours,
            baseline: target,
            unit: "ms",
        }
    }

    fn print(&self) {
        let ratio = self.ours / self.baseline;
        println!(
            "{}",
            json!({
                "bench": self.bench,
                "ours": round(self.ours),
                "baseline": round(self.baseline),
                "ratio": (ratio * 1000.0).round() / 1000.0,
                "unit": self.unit,
            })
        );
    }
}

fn round(x: f64) -> f64 {
    if x >= 100.0 {
        x.round()
    } else {
        (x * 100.0).round() / 100.0
    }
}

/// The best (shortest) of `rounds` timings.
fn best(durations: impl IntoIterator<Item = Duration>) -> Duration {
    durations.into_iter().min().unwrap_or(Duration::MAX)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = KEYS.set(args.keys);
    let run = |w: Which| args.only.is_empty() || args.only.contains(&w);
    let rounds = args.rounds.max(1);
    let mut figures = Vec::new();
    if run(Which::Codec) {
        figures.extend(codec::run(args.size));
    }
    if run(Which::Memory) {
        figures.extend(memory::run(args.events, args.size, rounds).await?);
    }
    if run(Which::Kafka) {
        figures.extend(kafka::run(args.events, args.size, rounds).await?);
    }
    if run(Which::Nats) {
        figures.extend(nats::run(args.events, args.size, rounds).await?);
    }
    if run(Which::Outbox) {
        figures.extend(outbox::run(args.events, args.size, rounds, &args.outbox_on).await?);
    }
    if run(Which::Saga) {
        figures.extend(saga::run(args.sagas, &args.saga_on).await?);
    }
    if run(Which::Registry) {
        figures.extend(registry::run(args.size, rounds).await?);
    }
    eprintln!();
    eprintln!(
        "{:<28} {:>14} {:>14} {:>7}  unit",
        "bench", "ours", "baseline", "ratio"
    );
    for f in &figures {
        eprintln!(
            "{:<28} {:>14.0} {:>14.0} {:>7.3}  {}",
            f.bench,
            f.ours,
            f.baseline,
            f.ours / f.baseline,
            f.unit
        );
    }
    for f in &figures {
        f.print();
    }
    Ok(())
}

/// Prints this process's CPU time per event since `since` (a
/// [`cpu_time`] reading): what a figure cost here, beside its rate.
fn report_cpu(what: &str, since: Duration, events: usize) {
    eprintln!(
        "{what}: {:.2} µs CPU per event in this process",
        (cpu_time().saturating_sub(since)).as_secs_f64() * 1e6 / events.max(1) as f64
    );
}

/// CPU time (user + system) this process has used so far, from
/// `/proc/self/stat`; zero where that is unavailable.
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// `n` events of `size` bytes of JSON data, cycling through the keys, as
/// the broker benchmarks publish them.
fn events(n: usize, size: usize) -> anyhow::Result<Vec<broker_adapters::Event>> {
    (0..n)
        .map(|i| {
            broker_adapters::CloudEventBuilder::new("com.example.order.placed", "/bench")
                .partition_key(key(i))
                .json_data(&payload(size))
                .build()
                .map_err(Into::into)
        })
        .collect()
}

/// Publishes `n` events of `size` bytes through `broker` as one batch
/// (pipelined, every event acknowledged); returns how long it took and
/// prints its CPU per event as `what`.
async fn publish_timed(
    what: &str,
    broker: &dyn broker_adapters::Publisher,
    topic: &broker_adapters::Topic,
    n: usize,
    size: usize,
) -> anyhow::Result<Duration> {
    let batch = events(n, size)?;
    let cpu = cpu_time();
    let start = std::time::Instant::now();
    broker.publish_batch(topic, batch).await?;
    let took = start.elapsed();
    report_cpu(what, cpu, n);
    Ok(took)
}

/// Runs our side and the raw side of a figure one after the other, ours
/// first when `ours_first`; returns (ours, raw). Whichever goes second finds
/// the allocator's and the broker's memory already grown, so the broker
/// benchmarks alternate the order by round (the best round of each side is
/// reported).
async fn in_turn<A, B>(
    ours_first: bool,
    ours: futures_util::future::LocalBoxFuture<'_, anyhow::Result<A>>,
    raw: futures_util::future::LocalBoxFuture<'_, anyhow::Result<B>>,
) -> anyhow::Result<(A, B)> {
    if ours_first {
        let ours = ours.await?;
        Ok((ours, raw.await?))
    } else {
        let raw = raw.await?;
        Ok((ours.await?, raw))
    }
}

/// A 1 KiB-ish JSON document of `size` bytes.
fn payload(size: usize) -> serde_json::Value {
    json!({ "order": "o-1", "blob": "x".repeat(size.saturating_sub(30)) })
}
