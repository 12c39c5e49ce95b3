#!/usr/bin/env python3
"""The other side of the interop tests (tests/interop/*.rs).

A CloudEvents peer built on the Python `cloudevents` SDK (pinned in
requirements.txt, with confluent-kafka and nats-py as transports). It reads
an event our adapters published, or writes one for our adapters to read,
always through the SDK's own protocol bindings, so the tests check our
bindings against another implementation rather than against themselves.

    ce_peer.py kafka-read  --topic T   --mode binary|structured --server HOST:PORT
    ce_peer.py kafka-write --topic T   --mode binary|structured --server HOST:PORT --event JSON
    ce_peer.py nats-read   --subject S --mode binary|structured --server nats://HOST:PORT
    ce_peer.py nats-write  --subject S --mode binary|structured --server nats://HOST:PORT --event JSON

Every command also takes --timeout SECONDS (default 15): how long to wait
for the broker (a message to read, or the acknowledgement of a write).

Readers take the first message (from the beginning of the topic or stream),
decode it with the SDK and print ONE JSON line:

    {"attributes": {...every attribute, extensions included; time in ISO 8601...},
     "data": <JSON data, or text>, "data_base64": <only for bytes>,
     "message": {"key": ..., "headers": {...}}, "peer": {package: version}}

Writers take the event as JSON, `{"attributes": {...}, "data": ...}` (time as
an RFC 3339 string; extension values keep their JSON type, so the SDK sees
Python ints and bools), encode it with the SDK, produce it and print ONE JSON
line with the message as sent (`key`, `headers`, `body`).

Exit status: 0 done, 1 failure, 2 usage, 3 Python packages missing, 4 timeout.
Diagnostics go to stderr.
"""

import argparse
import asyncio
import base64
import json
import sys
import time
import uuid
from datetime import datetime
from importlib import metadata

REQUIREMENTS = "tests/interop/requirements.txt"
PACKAGES = ("cloudevents", "confluent-kafka", "nats-py")

try:
    import confluent_kafka
    import nats
    from cloudevents.core.bindings import http as ce_http
    from cloudevents.core.bindings import kafka as ce_kafka
    from cloudevents.core.formats.json import JSONFormat
    from cloudevents.core.v1.event import CloudEvent
    from dateutil.parser import isoparse
    from nats.js import api as js_api
except ImportError as missing:
    sys.stderr.write(
        f"ce_peer: the Python package providing `{missing.name}` is missing "
        f"({sys.executable}: {missing}). The interop tests need "
        f"{', '.join(PACKAGES)}: install them with "
        f"`python3 -m pip install -r {REQUIREMENTS}` (tests/harness/up.sh does it).\n"
    )
    sys.exit(3)

STRUCTURED_CONTENT_TYPE = JSONFormat.CONTENT_TYPE  # application/cloudevents+json


class Failure(Exception):
    """A failure to report on stderr, with the exit status to use."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


def log(message):
    sys.stderr.write(f"ce_peer: {message}\n")
    sys.stderr.flush()


def versions():
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def emit(obj):
    # ASCII-only JSON: non-ASCII text travels as \u escapes whatever the locale.
    sys.stdout.write(json.dumps(obj, ensure_ascii=True, sort_keys=True) + "\n")
    sys.stdout.flush()


def jsonable(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return {"base64": base64.b64encode(value).decode("ascii")}
    return value


def text(raw):
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    return raw.decode("utf-8", errors="backslashreplace")


def report(event, key, headers):
    """Prints what the SDK decoded: every attribute, the data, the raw message."""
    out = {
        "attributes": {k: jsonable(v) for k, v in event.get_attributes().items()},
        "message": {"key": text(key), "headers": {k: text(v) for k, v in headers.items()}},
        "peer": versions(),
    }
    data = event.get_data()
    if isinstance(data, (bytes, bytearray)):
        out["data_base64"] = base64.b64encode(data).decode("ascii")
    else:
        out["data"] = data
    emit(out)


def event_from_spec(spec_json):
    """The SDK event for a `{"attributes": {...}, "data": ...}` spec."""
    try:
        spec = json.loads(spec_json)
    except ValueError as e:
        raise Failure(f"--event is not JSON: {e}", 2) from e
    attributes = dict(spec.get("attributes") or {})
    if isinstance(attributes.get("time"), str):
        attributes["time"] = isoparse(attributes["time"])
    if "data_base64" in spec:
        data = base64.b64decode(spec["data_base64"])
    else:
        data = spec.get("data")
    return CloudEvent(attributes, data)


def check_mode(mode, content_type, has_ce_headers):
    """Fails when the message is not in the content mode the test expects."""
    structured = (content_type or "").lower().startswith(STRUCTURED_CONTENT_TYPE)
    if mode == "structured" and not structured:
        raise Failure(
            f"expected a structured-mode message (content-type {STRUCTURED_CONTENT_TYPE}), "
            f"got content-type {content_type!r}"
        )
    if mode == "binary" and (structured or not has_ce_headers):
        raise Failure(
            f"expected a binary-mode message (ce- attribute headers), got content-type "
            f"{content_type!r} and {'some' if has_ce_headers else 'no'} attribute headers"
        )


# ---------------------------------------------------------------------- Kafka


def kafka_read(args):
    deadline = time.monotonic() + args.timeout
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": args.server,
            # Partitions are assigned, not subscribed: no group join to wait for.
            "group.id": f"ce-peer-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }
    )
    try:
        metadata_ = consumer.list_topics(args.topic, timeout=max(1.0, deadline - time.monotonic()))
        topic = metadata_.topics.get(args.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise Failure(f"topic {args.topic} not found: {topic.error if topic else 'no metadata'}")
        consumer.assign(
            [
                confluent_kafka.TopicPartition(args.topic, p, confluent_kafka.OFFSET_BEGINNING)
                for p in sorted(topic.partitions)
            ]
        )
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"no message on topic {args.topic} within {args.timeout}s", 4)
            msg = consumer.poll(min(0.5, left))
            if msg is None:
                continue
            if msg.error():
                if msg.error().fatal() or not msg.error().retriable():
                    raise Failure(f"consume from {args.topic}: {msg.error()}")
                log(f"retriable consumer error: {msg.error()}")
                continue
            # The SDK takes headers as a dict of bytes; Kafka allows null values.
            headers = {k: (v if v is not None else b"") for k, v in (msg.headers() or [])}
            message = ce_kafka.KafkaMessage(headers=headers, key=msg.key(), value=msg.value() or b"")
            content_type = next(
                (text(v) for k, v in headers.items() if k.lower() == "content-type"), None
            )
            has_ce = any(k.lower().startswith(ce_kafka.CE_PREFIX) for k in headers)
            check_mode(args.mode, content_type, has_ce)
            if args.mode == "binary":
                event = ce_kafka.from_binary(message, JSONFormat())
            else:
                event = ce_kafka.from_structured(message, JSONFormat())
            report(event, msg.key(), headers)
            return
    finally:
        consumer.close()


def kafka_write(args):
    event = event_from_spec(args.event)
    if args.mode == "binary":
        message = ce_kafka.to_binary(event, JSONFormat())
    else:
        message = ce_kafka.to_structured(event, JSONFormat())
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": args.server, "acks": "all", "enable.idempotence": True}
    )
    results = []

    def delivered(err, msg):
        results.append((err, msg))

    producer.produce(
        args.topic,
        value=message.value,
        key=message.key,
        headers=list(message.headers.items()),
        on_delivery=delivered,
    )
    if producer.flush(args.timeout) > 0 or not results:
        raise Failure(f"produce to {args.topic}: not acknowledged within {args.timeout}s", 4)
    err, msg = results[0]
    if err is not None:
        raise Failure(f"produce to {args.topic}: {err}")
    emit(
        {
            "key": text(message.key),
            "headers": {k: text(v) for k, v in message.headers.items()},
            "body": text(message.value),
            "partition": msg.partition(),
            "offset": msg.offset(),
            "peer": versions(),
        }
    )


# ----------------------------------------------------------------------- NATS


async def nats_connect(args):
    try:
        return await asyncio.wait_for(
            nats.connect(
                args.server,
                connect_timeout=min(5.0, args.timeout),
                allow_reconnect=False,
                max_reconnect_attempts=0,
            ),
            timeout=args.timeout,
        )
    except Exception as e:  # noqa: BLE001 - any failure is reported the same way
        raise Failure(f"cannot connect to NATS at {args.server}: {type(e).__name__}: {e}") from e


async def nats_read(args):
    deadline = time.monotonic() + args.timeout
    nc = await nats_connect(args)
    try:
        js = nc.jetstream()
        try:
            stream = await nc.jsm().find_stream_name_by_subject(args.subject)
        except Exception as e:  # noqa: BLE001
            raise Failure(f"no JetStream stream stores subject {args.subject}: {e}") from e
        # An ephemeral pull consumer from the start of the stream, acking
        # explicitly (work-queue streams accept nothing else).
        sub = await js.pull_subscribe(
            args.subject,
            stream=stream,
            config=js_api.ConsumerConfig(
                deliver_policy=js_api.DeliverPolicy.ALL,
                ack_policy=js_api.AckPolicy.EXPLICIT,
                inactive_threshold=30.0,
            ),
        )
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"no message on subject {args.subject} within {args.timeout}s", 4)
            try:
                msgs = await sub.fetch(1, timeout=min(1.0, left))
            except nats.errors.TimeoutError:
                continue
            msg = msgs[0]
            headers = dict(msg.headers or {})
            # The Python SDK has no NATS binding; the NATS binding's binary
            # mode is the HTTP binding's (`ce-` headers, percent-encoded
            # values, `content-type`), so its HTTP functions decode it.
            http_message = ce_http.HTTPMessage(headers=headers, body=msg.data or b"")
            content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
            has_ce = any(k.lower().startswith(ce_http.CE_PREFIX) for k in headers)
            check_mode(args.mode, content_type, has_ce)
            if args.mode == "binary":
                event = ce_http.from_binary(http_message, JSONFormat())
            else:
                event = ce_http.from_structured(http_message, JSONFormat())
            await msg.ack()
            report(event, None, headers)
            return
    finally:
        await nc.close()


async def nats_write(args):
    event = event_from_spec(args.event)
    # The HTTP binding's messages are what the NATS binding sends: see nats_read.
    if args.mode == "binary":
        message = ce_http.to_binary(event, JSONFormat())
    else:
        message = ce_http.to_structured(event, JSONFormat())
    nc = await nats_connect(args)
    try:
        js = nc.jetstream()
        try:
            ack = await js.publish(
                args.subject, message.body, timeout=args.timeout, headers=dict(message.headers)
            )
        except nats.js.errors.NoStreamResponseError as e:
            raise Failure(f"no JetStream stream stores subject {args.subject}: {e}") from e
        except nats.errors.TimeoutError as e:
            raise Failure(f"publish to {args.subject}: no ack within {args.timeout}s", 4) from e
        emit(
            {
                "key": None,
                "headers": dict(message.headers),
                "body": text(message.body),
                "stream": ack.stream,
                "seq": ack.seq,
                "peer": versions(),
            }
        )
    finally:
        await nc.close()


# ----------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, target in (
        ("kafka-read", "topic"),
        ("kafka-write", "topic"),
        ("nats-read", "subject"),
        ("nats-write", "subject"),
    ):
        sub = commands.add_parser(name)
        sub.add_argument(f"--{target}", required=True)
        sub.add_argument("--mode", choices=("binary", "structured"), required=True)
        sub.add_argument("--server", required=True, help="Kafka host:port or NATS URL")
        sub.add_argument("--timeout", type=float, default=15.0, help="seconds (default 15)")
        if name.endswith("-write"):
            sub.add_argument("--event", required=True, help="the event as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "kafka-read":
            kafka_read(args)
        elif args.command == "kafka-write":
            kafka_write(args)
        elif args.command == "nats-read":
            asyncio.run(nats_read(args))
        else:
            asyncio.run(nats_write(args))
    except Failure as e:
        log(f"{args.command}: {e}")
        return e.status
    except Exception as e:  # noqa: BLE001 - report anything the SDK or clients raise
        log(f"{args.command}: {type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
