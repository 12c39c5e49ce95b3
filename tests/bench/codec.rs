//! Encode + decode cost of one event.

use std::hint::black_box;
use std::time::{Duration, Instant};

use broker_adapters::CloudEventBuilder;
use broker_adapters::binding::{Binding, Mode};
use broker_adapters::cloudevents::Event;

use crate::Figure;

const ITERATIONS: u32 = 50_000;

fn time_per_event(mut f: impl FnMut()) -> f64 {
    for _ in 0..ITERATIONS / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..ITERATIONS {
        f();
    }
    let elapsed: Duration = start.elapsed();
    elapsed.as_nanos() as f64 / f64::from(ITERATIONS)
}

pub(crate) fn run(size: usize) -> Vec<Figure> {
    let event: Event = match CloudEventBuilder::new("com.example.order.placed", "/bench")
        .subject("o-1")
        .partition_key("o-1")
        .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .json_data(&crate::payload(size))
        .build()
    {
        Ok(event) => event,
        Err(e) => panic!("bench event: {e}"),
    };
    let ours = time_per_event(|| {
        let Ok(message) = Binding::KAFKA.encode(black_box(&event), Mode::Binary) else {
            panic!("encode")
        };
        let headers = message
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes()));
        black_box(Binding::KAFKA.decode(headers, &message.payload).ok());
    });
    // The SDK's own round trip: the structured JSON event format.
    let baseline = time_per_event(|| {
        let Ok(bytes) = serde_json::to_vec(black_box(&event)) else {
            panic!("serialize")
        };
        black_box(serde_json::from_slice::<Event>(&bytes).ok());
    });
    // Decoding the JSON event format (structured mode, outbox and SQL
    // broker rows): the crate's one-pass decoder beside the SDK's.
    let Ok(json) = serde_json::to_vec(&event) else {
        panic!("serialize")
    };
    let decode_ours = time_per_event(|| {
        black_box(broker_adapters::event::from_json_slice(black_box(&json)).ok());
    });
    let decode_sdk = time_per_event(|| {
        black_box(serde_json::from_slice::<Event>(black_box(&json)).ok());
    });
    // Encoding it: the crate's writer beside the SDK's serializer.
    let encode_ours = time_per_event(|| {
        black_box(broker_adapters::event::to_json_vec(black_box(&event)).ok());
    });
    let encode_sdk = time_per_event(|| {
        black_box(serde_json::to_vec(black_box(&event)).ok());
    });
    vec![
        Figure {
            bench: "codec.kafka_binary_roundtrip".into(),
            ours,
            baseline,
            unit: "ns/event",
        },
        Figure {
            bench: "codec.json_decode".into(),
            ours: decode_ours,
            baseline: decode_sdk,
            unit: "ns/event",
        },
        Figure {
            bench: "codec.json_encode".into(),
            ours: encode_ours,
            baseline: encode_sdk,
            unit: "ns/event",
        },
    ]
}
