//! The schema registry: the cost of validating a 1 KiB event through the
//! validating publisher against calling `jsonschema` directly with a
//! precompiled validator, and schema lookups through the HTTP client with
//! its cache against without it, and without it against a raw HTTP GET.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker_adapters::cloudevents::Event;
use broker_adapters::cloudevents::event::Data;
use broker_adapters::middleware::validation::ValidatingPublisher;
use broker_adapters::{CloudEventBuilder, Publisher, Topic};
use schemas::server::{ServerOptions, router, serve};
use schemas::{Registry, RegistryClient, RegistryOptions, SchemaSource};
use serde_json::{Value, json};

use crate::{Figure, best};

const SUBJECT: &str = "com.example.order.placed";
const EVENTS: usize = 20_000;
const CACHED_LOOKUPS: u32 = 200_000;
const HTTP_LOOKUPS: u32 = 2_000;

/// A publisher that sends nothing but keeps the events (dropped after the
/// timing, as the baseline's documents are), so only the middleware is measured.
#[derive(Debug)]
struct Discard {
    kept: std::sync::Mutex<Vec<Event>>,
}

impl Default for Discard {
    fn default() -> Self {
        Self {
            kept: std::sync::Mutex::new(Vec::with_capacity(EVENTS)),
        }
    }
}

#[async_trait]
impl Publisher for Discard {
    async fn publish(&self, _topic: &Topic, event: Event) -> broker_adapters::Result<()> {
        if let Ok(mut kept) = self.kept.lock() {
            kept.push(event);
        }
        Ok(())
    }
}

fn contract() -> Value {
    json!({
        "type": "object",
        "properties": {
            "order": {"type": "string", "maxLength": 64},
            "customer": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "email": {"type": "string", "maxLength": 254},
                    "tier": {"enum": ["basic", "gold", "platinum"]}
                },
                "required": ["id", "email"]
            },
            "lines": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string"},
                        "quantity": {"type": "integer", "minimum": 1},
                        "price": {"type": "number", "minimum": 0}
                    },
                    "required": ["sku", "quantity", "price"],
                    "additionalProperties": false
                }
            },
            "total": {"type": "number", "minimum": 0},
            "note": {"type": ["string", "null"]}
        },
        "required": ["order", "customer", "lines", "total"]
    })
}

/// An order of about `size` bytes of JSON.
fn order(size: usize) -> Value {
    let line =
        |i: usize| json!({"sku": format!("sku-{i:04}"), "quantity": 1 + i % 3, "price": 9.99});
    let mut doc = json!({
        "order": "o-4711",
        "customer": {"id": "c-42", "email": "ada@example.com", "tier": "gold"},
        "lines": (0..4).map(line).collect::<Vec<_>>(),
        "total": 39.96,
        "note": ""
    });
    let mut lines = 4;
    while doc.to_string().len() + 60 < size {
        lines += 1;
        doc["lines"] = (0..lines).map(line).collect();
    }
    let pad = size.saturating_sub(doc.to_string().len());
    doc["note"] = json!("n".repeat(pad));
    doc
}

async fn validation(size: usize, rounds: usize) -> anyhow::Result<Figure> {
    let registry = Registry::in_memory();
    registry.register_value(SUBJECT, contract()).await?;
    let data = order(size);
    eprintln!(
        "registry: validating {}-byte events",
        data.to_string().len()
    );
    let publisher = ValidatingPublisher::new(Discard::default(), Arc::new(registry));
    let topic = Topic::from_static("orders");
    let mut ours = Vec::new();
    for _ in 0..rounds {
        let events: Vec<Event> = (0..EVENTS)
            .map(|_| {
                CloudEventBuilder::new(SUBJECT, "/bench")
                    .json_data(&data)
                    .build()
            })
            .collect::<Result<_, _>>()?;
        let start = Instant::now();
        for event in events {
            publisher.publish(&topic, event).await?;
        }
        ours.push(start.elapsed());
        if let Ok(mut kept) = publisher.inner().kept.lock() {
            anyhow::ensure!(kept.len() == EVENTS, "events went missing");
            kept.clear();
        }
    }
    // The baseline validates the data of the same events, built the same
    // way, with a validator compiled once: only the middleware differs.
    let validator = jsonschema::validator_for(&contract()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut baseline = Vec::new();
    for _ in 0..rounds {
        let events: Vec<Event> = (0..EVENTS)
            .map(|_| {
                CloudEventBuilder::new(SUBJECT, "/bench")
                    .json_data(&data)
                    .build()
            })
            .collect::<Result<_, _>>()?;
        let start = Instant::now();
        for event in &events {
            let Some(Data::Json(doc)) = event.data() else {
                anyhow::bail!("the bench event has no JSON data");
            };
            anyhow::ensure!(
                validator.is_valid(black_box(doc)),
                "the bench order is invalid"
            );
        }
        baseline.push(start.elapsed());
        drop(events);
    }
    let per_event = |d: Duration| d.as_nanos() as f64 / EVENTS as f64;
    Ok(Figure {
        bench: "registry.validate_1kib".into(),
        ours: per_event(best(ours)),
        baseline: per_event(best(baseline)),
        unit: "ns/event",
    })
}

async fn lookups(rounds: usize) -> anyhow::Result<Vec<Figure>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let registry = Registry::with_options(RegistryOptions {
        base_url: base.clone(),
        ..RegistryOptions::default()
    });
    registry.register_value(SUBJECT, contract()).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        router(registry, ServerOptions::default()),
        async move {
            let _ = stopped.await;
        },
    ));

    let cached = RegistryClient::new(&base);
    let uncached = RegistryClient::new(&base).without_cache();
    let http = reqwest::Client::new();
    let latest_url = format!("{base}/subjects/{SUBJECT}/versions/latest");
    cached.latest(SUBJECT).await?;
    let rate = |n: u32, d: Duration| f64::from(n) / d.as_secs_f64();
    let (mut with_cache, mut without_cache, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..CACHED_LOOKUPS {
            black_box(cached.latest(SUBJECT).await?);
        }
        with_cache.push(start.elapsed());
        let start = Instant::now();
        for _ in 0..HTTP_LOOKUPS {
            black_box(uncached.latest(SUBJECT).await?);
        }
        without_cache.push(start.elapsed());
        let start = Instant::now();
        for _ in 0..HTTP_LOOKUPS {
            let body = http.get(&latest_url).send().await?.bytes().await?;
            black_box(body);
        }
        raw.push(start.elapsed());
    }
    let _ = stop.send(());
    server.await??;
    let uncached_rate = rate(HTTP_LOOKUPS, best(without_cache));
    Ok(vec![
        Figure {
            bench: "registry.lookup_cached_vs_uncached".into(),
            ours: rate(CACHED_LOOKUPS, best(with_cache)),
            baseline: uncached_rate,
            unit: "lookups/s",
        },
        Figure {
            bench: "registry.lookup_uncached_vs_raw_get".into(),
            ours: uncached_rate,
            baseline: rate(HTTP_LOOKUPS, best(raw)),
            unit: "lookups/s",
        },
    ])
}

pub(crate) async fn run(size: usize, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    let mut figures = vec![validation(size, rounds).await?];
    figures.extend(lookups(rounds).await?);
    Ok(figures)
}
