//! Table-driven tests of each compatibility rule, and properties over
//! generated schemas.

use proptest::prelude::*;
use schemas::compat::{CompatibilityLevel, check, check_level};
use serde_json::{Value, json};

/// (name, reader, writer, expected incompatibility lines; empty = compatible)
fn table() -> Vec<(&'static str, Value, Value, Vec<&'static str>)> {
    let obj = |props: Value, required: Value| json!({"type": "object", "properties": props, "required": required});
    vec![
        (
            "identical",
            json!({"type": "string"}),
            json!({"type": "string"}),
            vec![],
        ),
        (
            "true reads all",
            json!(true),
            json!({"type": "string"}),
            vec![],
        ),
        (
            "false writer",
            json!({"type": "string"}),
            json!(false),
            vec![],
        ),
        (
            "false reader",
            json!(false),
            json!({"type": "string"}),
            vec!["#: schema rejects everything the writer allows"],
        ),
        (
            "type changed",
            json!({"type": "string"}),
            json!({"type": "number"}),
            vec!["#/type: type number no longer allowed (now string)"],
        ),
        (
            "integer widened to number",
            json!({"type": "number"}),
            json!({"type": "integer"}),
            vec![],
        ),
        (
            "number narrowed to integer",
            json!({"type": "integer"}),
            json!({"type": "number"}),
            vec!["#/type: type number no longer allowed (now integer)"],
        ),
        (
            "union extended",
            json!({"type": ["string", "null"]}),
            json!({"type": "string"}),
            vec![],
        ),
        (
            "union narrowed",
            json!({"type": "string"}),
            json!({"type": ["string", "null"]}),
            vec!["#/type: type null no longer allowed (now string)"],
        ),
        (
            "type added",
            json!({"type": "string"}),
            json!({}),
            vec!["#: type narrowed from any to string"],
        ),
        (
            "enum extended",
            json!({"enum": ["a", "b"]}),
            json!({"enum": ["a"]}),
            vec![],
        ),
        (
            "enum narrowed",
            json!({"enum": ["a"]}),
            json!({"enum": ["a", "b"]}),
            vec!["#/enum: value \"b\" removed from enum"],
        ),
        (
            "enum added",
            json!({"type": "string", "enum": ["a"]}),
            json!({"type": "string"}),
            vec!["#/enum: enum added"],
        ),
        (
            "const to enum",
            json!({"enum": ["a", "b"]}),
            json!({"const": "a"}),
            vec![],
        ),
        (
            "optional property added, open writer",
            obj(
                json!({"a": {"type": "string"}, "b": {"type": "string"}}),
                json!([]),
            ),
            obj(json!({"a": {"type": "string"}}), json!([])),
            vec![],
        ),
        (
            "property newly required",
            obj(
                json!({"a": {"type": "string"}, "b": {"type": "string"}}),
                json!(["a", "b"]),
            ),
            obj(
                json!({"a": {"type": "string"}, "b": {"type": "string"}}),
                json!(["a"]),
            ),
            vec!["#/required/1: property \"b\" newly required"],
        ),
        (
            "required dropped",
            obj(json!({"a": {"type": "string"}}), json!([])),
            obj(json!({"a": {"type": "string"}}), json!(["a"])),
            vec![],
        ),
        (
            "nested required",
            json!({"type": "object", "properties": {"order": obj(json!({"id": {"type": "string"}, "total": {"type": "number"}}), json!(["id", "total"]))}}),
            json!({"type": "object", "properties": {"order": obj(json!({"id": {"type": "string"}, "total": {"type": "number"}}), json!(["id"]))}}),
            vec!["#/properties/order/required/1: property \"total\" newly required"],
        ),
        (
            "nested type",
            json!({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}}}),
            json!({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}}),
            vec!["#/properties/a/properties/b/type: type integer no longer allowed (now string)"],
        ),
        (
            "closed reader, writer open",
            json!({"type": "object", "additionalProperties": false}),
            json!({"type": "object"}),
            vec!["#/additionalProperties: additional properties no longer allowed"],
        ),
        (
            "closed reader drops a property",
            json!({"type": "object", "properties": {}, "additionalProperties": false}),
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}),
            vec!["#/properties/a: property \"a\" removed from a closed content model"],
        ),
        (
            "closed writer, reader adds property",
            json!({"type": "object", "properties": {"a": {"type": "string"}}}),
            json!({"type": "object", "additionalProperties": false}),
            vec![],
        ),
        (
            "reader opens",
            json!({"type": "object"}),
            json!({"type": "object", "additionalProperties": false}),
            vec![],
        ),
        (
            "additionalProperties schema narrowed",
            json!({"type": "object", "additionalProperties": {"type": "string"}}),
            json!({"type": "object", "additionalProperties": {"type": ["string", "number"]}}),
            vec!["#/additionalProperties/type: type number no longer allowed (now string)"],
        ),
        (
            "additionalProperties schema reads writer property",
            json!({"type": "object", "additionalProperties": {"type": "string"}}),
            json!({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": false}),
            vec!["#/additionalProperties/type: type integer no longer allowed (now string)"],
        ),
        (
            "writer additionalProperties schema covers reader property",
            json!({"type": "object", "properties": {"a": {"type": "integer"}}}),
            json!({"type": "object", "additionalProperties": {"type": "string"}}),
            vec!["#/properties/a/type: type string no longer allowed (now integer)"],
        ),
        (
            "items",
            json!({"type": "array", "items": {"type": "string"}}),
            json!({"type": "array", "items": {"type": "integer"}}),
            vec!["#/items/type: type integer no longer allowed (now string)"],
        ),
        (
            "items added",
            json!({"type": "array", "items": {"type": "string"}}),
            json!({"type": "array"}),
            vec!["#/items: type narrowed from any to string"],
        ),
        (
            "items removed",
            json!({"type": "array"}),
            json!({"type": "array", "items": {"type": "string"}}),
            vec![],
        ),
        (
            "minItems raised",
            json!({"type": "array", "minItems": 2}),
            json!({"type": "array", "minItems": 1}),
            vec!["#/minItems: minItems raised from 1 to 2"],
        ),
        (
            "maxItems lowered",
            json!({"type": "array", "maxItems": 2}),
            json!({"type": "array", "maxItems": 3}),
            vec!["#/maxItems: maxItems lowered from 3 to 2"],
        ),
        (
            "maxItems added",
            json!({"type": "array", "maxItems": 2}),
            json!({"type": "array"}),
            vec!["#/maxItems: maxItems lowered from none to 2"],
        ),
        (
            "minLength lowered",
            json!({"type": "string", "minLength": 1}),
            json!({"type": "string", "minLength": 2}),
            vec![],
        ),
        (
            "minLength raised",
            json!({"type": "string", "minLength": 3}),
            json!({"type": "string", "minLength": 2}),
            vec!["#/minLength: minLength raised from 2 to 3"],
        ),
        (
            "maxLength raised",
            json!({"type": "string", "maxLength": 10}),
            json!({"type": "string", "maxLength": 5}),
            vec![],
        ),
        (
            "maxLength lowered",
            json!({"type": "string", "maxLength": 5}),
            json!({"type": "string", "maxLength": 10}),
            vec!["#/maxLength: maxLength lowered from 10 to 5"],
        ),
        (
            "minimum lowered",
            json!({"type": "number", "minimum": 0}),
            json!({"type": "number", "minimum": 1}),
            vec![],
        ),
        (
            "minimum raised",
            json!({"type": "number", "minimum": 1}),
            json!({"type": "number", "minimum": 0}),
            vec!["#/minimum: minimum raised from 0 to 1"],
        ),
        (
            "minimum added",
            json!({"type": "number", "minimum": 1}),
            json!({"type": "number"}),
            vec!["#/minimum: minimum raised from none to 1"],
        ),
        (
            "maximum lowered",
            json!({"type": "number", "maximum": 1}),
            json!({"type": "number", "maximum": 2}),
            vec!["#/maximum: maximum lowered from 2 to 1"],
        ),
        (
            "exclusiveMinimum made inclusive",
            json!({"type": "number", "minimum": 0}),
            json!({"type": "number", "exclusiveMinimum": 0}),
            vec![],
        ),
        (
            "minimum made exclusive",
            json!({"type": "number", "exclusiveMinimum": 0}),
            json!({"type": "number", "minimum": 0}),
            vec!["#/minimum: minimum raised from 0 to 0 (exclusive)"],
        ),
        (
            "draft 4 exclusiveMaximum",
            json!({"type": "number", "maximum": 5, "exclusiveMaximum": true}),
            json!({"type": "number", "maximum": 5}),
            vec!["#/maximum: maximum lowered from 5 to 5 (exclusive)"],
        ),
        (
            "$ref to definitions",
            json!({"type": "object", "properties": {"a": {"$ref": "#/definitions/A"}}, "definitions": {"A": {"type": "string"}}}),
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"type": "integer"}}}),
            vec!["#/properties/a/type: type integer no longer allowed (now string)"],
        ),
        (
            "$ref equal",
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"type": "string"}}}),
            json!({"type": "object", "properties": {"a": {"type": "string"}}}),
            vec![],
        ),
        (
            "recursive $ref",
            json!({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}, "v": {"type": "number"}}}}}),
            json!({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}, "v": {"type": "integer"}}}}}),
            vec![],
        ),
        (
            "unresolvable $ref",
            json!({"$ref": "#/$defs/missing"}),
            json!({"type": "string"}),
            vec!["#: cannot resolve $ref \"#/$defs/missing\""],
        ),
        (
            "anyOf extended",
            json!({"anyOf": [{"type": "string"}, {"type": "integer"}]}),
            json!({"type": "string"}),
            vec![],
        ),
        (
            "anyOf narrowed",
            json!({"anyOf": [{"type": "string"}]}),
            json!({"anyOf": [{"type": "string"}, {"type": "integer"}]}),
            vec!["#/anyOf/0/type: type integer no longer allowed (now string)"],
        ),
    ]
}

#[test]
fn each_rule() {
    let mut failures = Vec::new();
    for (name, reader, writer, expected) in table() {
        let got: Vec<String> = check(&reader, &writer)
            .iter()
            .map(ToString::to_string)
            .collect();
        if got != expected {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn levels_pick_directions_and_versions() {
    let v1 = json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]});
    let v2 = json!({"type": "object", "properties": {"a": {"type": "string"}}});
    let v3 = json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a", "b"]});
    // v3 requires b: not backward against v2 (or v1).
    assert!(!check_level(CompatibilityLevel::Backward, &v3, &[v1.clone(), v2.clone()]).is_empty());
    // v2 drops the requirement: backward, not forward.
    assert!(check_level(CompatibilityLevel::Backward, &v2, std::slice::from_ref(&v1)).is_empty());
    let forward = check_level(CompatibilityLevel::Forward, &v2, std::slice::from_ref(&v1));
    assert_eq!(
        forward,
        vec![
            "forward (version 1 reading the new schema): #/required/0: property \"a\" newly required"
        ]
    );
    assert_eq!(
        check_level(CompatibilityLevel::Full, &v2, std::slice::from_ref(&v1)).len(),
        1
    );
    assert!(check_level(CompatibilityLevel::None, &v3, &[v1, v2]).is_empty());
    // Transitive levels look past the latest version.
    let v1b = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let v2b = json!({"type": "object", "properties": {"a": {"type": ["integer", "string"]}}});
    let v3b = json!({"type": "object", "properties": {"a": {"type": ["string", "integer"]}}});
    let v4b = json!({"type": "object", "properties": {"a": {"type": "string"}}});
    assert!(
        check_level(
            CompatibilityLevel::Forward,
            &v4b,
            &[v1b.clone(), v2b.clone(), v3b.clone()]
        )
        .is_empty()
    );
    let transitive = check_level(
        CompatibilityLevel::ForwardTransitive,
        &v4b,
        &[v1b, v2b, v3b],
    );
    assert_eq!(transitive.len(), 1, "{transitive:?}");
    assert!(transitive[0].starts_with("forward (version 1"));
}

#[test]
fn level_names() {
    for level in CompatibilityLevel::ALL {
        assert_eq!(
            level.as_str().parse::<CompatibilityLevel>().ok(),
            Some(level)
        );
        assert_eq!(
            serde_json::to_value(level).ok(),
            Some(Value::from(level.as_str()))
        );
    }
    assert!("backward_transitive".parse::<CompatibilityLevel>().is_ok());
    assert!("SIDEWAYS".parse::<CompatibilityLevel>().is_err());
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({"type": "string"})),
        Just(json!({"type": "integer"})),
        Just(json!({"type": "number", "minimum": 0})),
        Just(json!({"type": "boolean"})),
        Just(json!({"type": ["string", "null"]})),
        Just(json!({"enum": ["a", "b", "c"]})),
        Just(json!({"type": "string", "maxLength": 8})),
        Just(json!({"type": "array", "items": {"type": "string"}, "minItems": 1})),
    ]
}

fn object(inner: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    (
        prop::collection::btree_map("[a-e]{1,3}", inner, 0..5),
        prop::collection::vec(any::<bool>(), 5),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(props, pick, closed)| {
            let names: Vec<String> = props.keys().cloned().collect();
            let required: Vec<String> = names
                .iter()
                .zip(&pick)
                .filter(|(_, r)| **r)
                .map(|(n, _)| n.clone())
                .collect();
            let mut schema = json!({"type": "object", "properties": props, "required": required});
            if let Some(closed) = closed {
                schema["additionalProperties"] = json!(!closed);
            }
            schema
        })
}

fn schema() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            object(inner.clone()),
            inner.prop_map(|items| json!({"type": "array", "items": items})),
        ]
    })
}

/// An open object schema (no `additionalProperties`), with nested schemas.
fn open_object() -> impl Strategy<Value = Value> {
    object(schema()).prop_map(|mut s| {
        if let Some(m) = s.as_object_mut() {
            m.remove("additionalProperties");
        }
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_schema_is_compatible_with_itself(s in schema()) {
        for level in CompatibilityLevel::ALL {
            let problems = check_level(level, &s, &[s.clone(), s.clone()]);
            prop_assert!(problems.is_empty(), "{level}: {problems:?}");
        }
    }

    #[test]
    fn adding_an_optional_field_is_backward_compatible(old in open_object(), field in leaf()) {
        let mut new = old.clone();
        new["properties"]["zz_new"] = field;
        let problems = check_level(CompatibilityLevel::Backward, &new, &[old]);
        prop_assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn removing_a_required_field_is_not_forward_compatible(old in open_object(), field in leaf()) {
        let mut old = old;
        old["properties"]["zz_req"] = field;
        if let Some(r) = old["required"].as_array_mut() { r.push(json!("zz_req")); }
        let mut new = old.clone();
        if let Some(p) = new["properties"].as_object_mut() { p.remove("zz_req"); }
        if let Some(r) = new["required"].as_array_mut() { r.retain(|v| v != "zz_req"); }
        let problems = check_level(CompatibilityLevel::Forward, &new, &[old]);
        prop_assert!(problems.iter().any(|p| p.contains("property \"zz_req\" newly required")), "{problems:?}");
    }
}

#[test]
fn exploding_alternatives_are_refused_not_run() {
    // Nested anyOf of 8 alternatives, 5 deep (32768 leaves, under 1 MiB):
    // 8^10 pairs if searched naively.
    let mut reader = json!({"type": "string"});
    let mut writer = json!({"type": "integer"});
    for _ in 0..5 {
        let alts = |inner: &Value| {
            (0..8)
                .map(|i| json!({"type": "object", "properties": {format!("p{i}"): inner.clone()}, "required": [format!("p{i}")]}))
                .collect::<Vec<_>>()
        };
        reader = json!({"anyOf": alts(&reader)});
        writer = json!({"anyOf": alts(&writer)});
    }
    let started = std::time::Instant::now();
    let problems = check(&reader, &writer);
    assert!(!problems.is_empty());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}
