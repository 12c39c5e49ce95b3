#!/usr/bin/env python3
"""Drives a schema registry with Confluent's own Python client
(confluent_kafka.schema_registry.SchemaRegistryClient) and prints one JSON
line per step: {"step": ..., "ok": true|false, ...}. Exits 0 when every step
went as expected, 1 otherwise.

Usage: registry_peer.py URL TOKEN SUBJECT
"""

import json
import sys
import traceback

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

V1 = {
    "type": "object",
    "properties": {"order": {"type": "string"}},
    "required": ["order"],
}
V2 = {
    "type": "object",
    "properties": {"order": {"type": "string"}, "total": {"type": "number"}},
    "required": ["order"],
}
V3_BREAKING = {
    "type": "object",
    "properties": {"order": {"type": "string"}, "total": {"type": "number"}},
    "required": ["order", "total"],
}

failures = 0


def report(step, ok, **fields):
    global failures
    if not ok:
        failures += 1
    print(json.dumps({"step": step, "ok": bool(ok), **fields}), flush=True)


def schema(doc):
    return Schema(json.dumps(doc), schema_type="JSON")


def main():
    url, token, subject = sys.argv[1], sys.argv[2], sys.argv[3]
    client = SchemaRegistryClient({
        "url": url,
        "bearer.auth.credentials.source": "STATIC_TOKEN",
        "bearer.auth.token": token,
        "bearer.auth.logical.cluster": "local",
    })

    id1 = client.register_schema(subject, schema(V1))
    report("register", isinstance(id1, int) and id1 > 0, id=id1)

    again = client.register_schema(subject, schema(V1))
    report("register again", again == id1, id=again)

    fetched = client.get_schema(id1)
    report("get by id", json.loads(fetched.schema_str) == V1 and fetched.schema_type == "JSON",
           schema_type=fetched.schema_type)

    latest = client.get_latest_version(subject)
    report("latest", latest.schema_id == id1 and latest.version == 1 and latest.subject == subject,
           version=latest.version)

    looked_up = client.lookup_schema(subject, schema(V1))
    report("lookup", looked_up.schema_id == id1 and looked_up.version == 1)

    report("types", "JSON" in client.get_schema_types())

    ok2 = client.test_compatibility(subject, schema(V2))
    report("compatible", ok2 is True)
    ok3 = client.test_compatibility(subject, schema(V3_BREAKING))
    report("incompatible", ok3 is False)

    try:
        client.register_schema(subject, schema(V3_BREAKING))
        report("rejected", False, reason="registered an incompatible schema")
    except SchemaRegistryError as e:
        report("rejected", e.http_status_code == 409 and e.error_code == 409,
               http_status=e.http_status_code, error_code=e.error_code, message=e.error_message)

    id2 = client.register_schema(subject, schema(V2))
    report("register v2", id2 != id1, id=id2)
    report("versions", client.get_versions(subject) == [1, 2])

    report("global config", client.get_compatibility() == "BACKWARD")
    level = client.set_compatibility(subject_name=subject, level="NONE")
    report("set config", level == {"compatibility": "NONE"} or level == "NONE", answer=level)
    report("subject config", client.get_compatibility(subject) == "NONE")
    id3 = client.register_schema(subject, schema(V3_BREAKING))
    report("register under NONE", id3 not in (id1, id2), id=id3)

    try:
        client.get_version(subject, 42)
        report("missing version", False)
    except SchemaRegistryError as e:
        report("missing version", e.error_code == 40402, error_code=e.error_code)
    try:
        client.get_latest_version(subject + ".missing")
        report("missing subject", False)
    except SchemaRegistryError as e:
        report("missing subject", e.error_code == 40401, error_code=e.error_code)
    try:
        client.register_schema(subject, Schema('{"type": "record", "name": "x", "fields": []}', schema_type="AVRO"))
        report("avro refused", False)
    except SchemaRegistryError as e:
        report("avro refused", e.error_code == 42201, error_code=e.error_code)

    deleted = client.delete_version(subject, 3)
    report("delete version", deleted == 3, answer=deleted)
    soft = client.delete_subject(subject)
    report("soft delete subject", soft == [1, 2], answer=soft)
    hard = client.delete_subject(subject, permanent=True)
    report("hard delete subject", sorted(hard) == [1, 2, 3], answer=hard)
    report("subjects", subject not in client.get_subjects())


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # report, never hide
        report("crashed", False, error=repr(e), trace=traceback.format_exc())
    sys.exit(1 if failures else 0)
