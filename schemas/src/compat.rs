//! Compatibility of JSON Schemas: [`CompatibilityLevel`] and the checker.
//!
//! The question is always the one of Confluent's JSON Schema rules: can a
//! *reader* schema accept every document valid under a *writer* schema?
//!
//! - BACKWARD: the new schema reads data written with the old one
//!   (reader = new, writer = old);
//! - FORWARD: the old schema reads data written with the new one
//!   (reader = old, writer = new);
//! - FULL: both; the `_TRANSITIVE` variants check against every earlier
//!   version instead of only the latest; NONE checks nothing.
//!
//! The checker walks both schemas side by side and understands `type`
//! (with unions and `integer` ⊂ `number`), `enum` and `const`, `properties`,
//! `required`, `additionalProperties` (open, closed, or a schema), `items`,
//! local `$ref`s (`#/definitions/..`, `#/$defs/..`, any JSON pointer into the
//! document, recursive ones included), `anyOf`/`oneOf` and the bounds
//! `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum` (draft 4
//! booleans and later numbers), `minLength`/`maxLength` and
//! `minItems`/`maxItems`. Every incompatibility names the JSON pointer in the
//! reader schema where it is, e.g. `#/properties/order/required/1: property
//! "total" newly required`.
//!
//! Any other keyword that constrains data (`allOf`, `not`,
//! `patternProperties`, `if`/`then`/`else`, `uniqueItems`, ...) is not
//! analyzed: a reader that adds or changes one is reported as incompatible,
//! since its compatibility cannot be proven.
//!
//! One rule is lenient on purpose, as Confluent's lenient policy is: a
//! property the reader declares that an open writer did not declare is
//! accepted, on the assumption that writers did not emit undeclared fields.
//! Without it, adding an optional field would never be backward compatible
//! under an open content model.

use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;
use std::rc::Rc;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, ErrorKind};

/// A compatibility level, globally or for one subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CompatibilityLevel {
    /// The new schema reads data written with the latest one (the default).
    #[default]
    Backward,
    /// The new schema reads data written with every earlier one.
    BackwardTransitive,
    /// The latest schema reads data written with the new one.
    Forward,
    /// Every earlier schema reads data written with the new one.
    ForwardTransitive,
    /// Backward and forward against the latest schema.
    Full,
    /// Backward and forward against every earlier schema.
    FullTransitive,
    /// No check.
    None,
}

impl CompatibilityLevel {
    /// Every level.
    pub const ALL: [CompatibilityLevel; 7] = [
        Self::Backward,
        Self::BackwardTransitive,
        Self::Forward,
        Self::ForwardTransitive,
        Self::Full,
        Self::FullTransitive,
        Self::None,
    ];

    /// The name the REST API uses, e.g. `BACKWARD_TRANSITIVE`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
            Self::None => "NONE",
        }
    }

    fn backward(self) -> bool {
        matches!(
            self,
            Self::Backward | Self::BackwardTransitive | Self::Full | Self::FullTransitive
        )
    }

    fn forward(self) -> bool {
        matches!(
            self,
            Self::Forward | Self::ForwardTransitive | Self::Full | Self::FullTransitive
        )
    }

    fn transitive(self) -> bool {
        matches!(
            self,
            Self::BackwardTransitive | Self::ForwardTransitive | Self::FullTransitive
        )
    }
}

impl fmt::Display for CompatibilityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CompatibilityLevel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|l| l.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::new(ErrorKind::InvalidCompatibilityLevel {
                    level: s.to_owned(),
                })
            })
    }
}

/// One reason a reader schema cannot read what a writer schema allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatibility {
    /// JSON pointer (as a URI fragment, `#/...`) into the reader schema.
    pub path: String,
    /// What changed, e.g. `property "total" newly required`.
    pub message: String,
}

impl fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every reason `reader` cannot read all data valid under `writer`; empty
/// when it can.
///
/// ```
/// use schemas::compat::check;
/// use serde_json::json;
///
/// let old = json!({"type": "object", "properties": {"id": {"type": "string"}}});
/// let new = json!({"type": "object", "properties": {"id": {"type": "string"}},
///                  "required": ["id"]});
/// let problems = check(&new, &old);
/// assert_eq!(problems[0].to_string(), "#/required/0: property \"id\" newly required");
/// assert!(check(&old, &new).is_empty());
/// ```
pub fn check(reader: &Value, writer: &Value) -> Vec<Incompatibility> {
    let mut checker = Checker {
        reader_root: reader,
        writer_root: writer,
        seen: HashSet::new(),
        out: Vec::new(),
        budget: Rc::new(Cell::new(MAX_STEPS)),
    };
    checker.walk(reader, "#".into(), writer, "#".into(), "#".into(), 0);
    checker.out
}

/// Checks `new` against `existing` (oldest first) under `level`, returning
/// one line per incompatibility, each naming the direction, the version it
/// conflicts with (1-based position in `existing`) and the JSON path.
pub fn check_level(level: CompatibilityLevel, new: &Value, existing: &[Value]) -> Vec<String> {
    let against: Vec<(usize, &Value)> = if level.transitive() {
        existing.iter().enumerate().collect()
    } else {
        existing
            .iter()
            .enumerate()
            .next_back()
            .into_iter()
            .collect()
    };
    let mut messages = Vec::new();
    for (index, old) in against {
        let n = index + 1;
        if level.backward() {
            for i in check(new, old) {
                messages.push(format!("backward (new schema reading version {n}): {i}"));
            }
        }
        if level.forward() {
            for i in check(old, new) {
                messages.push(format!("forward (version {n} reading the new schema): {i}"));
            }
        }
    }
    messages
}

const MAX_DEPTH: usize = 64;

/// The most schema pairs one check compares.
const MAX_STEPS: usize = 200_000;

/// Keywords the checker analyzes, or that do not constrain data.
const UNDERSTOOD: &[&str] = &[
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "$ref",
    "anyOf",
    "oneOf",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "definitions",
    "$defs",
    "$schema",
    "$id",
    "id",
    "title",
    "description",
    "default",
    "examples",
    "$comment",
    "readOnly",
    "writeOnly",
    "deprecated",
    "contentMediaType",
    "contentEncoding",
];

struct Checker<'a> {
    reader_root: &'a Value,
    writer_root: &'a Value,
    /// Pairs of (reader, writer) locations already under check: meeting one
    /// again (recursive `$ref`s) adds nothing new.
    seen: HashSet<(String, String)>,
    out: Vec<Incompatibility>,
    /// Comparisons left, shared with the sub-checkers of `anyOf`/`oneOf`, so
    /// a schema crafted to explode the search is refused, not run.
    budget: Rc<Cell<usize>>,
}

/// The JSON types a schema allows; `None` when `type` is absent.
fn types(schema: &Map<String, Value>) -> Option<Vec<&str>> {
    match schema.get("type")? {
        Value::String(t) => Some(vec![t.as_str()]),
        Value::Array(ts) => Some(ts.iter().filter_map(Value::as_str).collect()),
        _ => None,
    }
}

fn allows(types: &Option<Vec<&str>>, ty: &str) -> bool {
    match types {
        None => true,
        Some(ts) => ts.contains(&ty) || (ty == "integer" && ts.contains(&"number")),
    }
}

fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Resolves a local JSON pointer reference (`#`, `#/definitions/x`, ...).
fn resolve<'v>(root: &'v Value, reference: &str) -> Option<&'v Value> {
    let pointer = reference.strip_prefix('#')?;
    if pointer.is_empty() {
        return Some(root);
    }
    let decoded = pointer.replace("%25", "%").replace("%22", "\"");
    root.pointer(&decoded)
}

enum Bound {
    None,
    At(f64, bool),
}

fn lower(schema: &Map<String, Value>) -> Bound {
    bound(schema, "minimum", "exclusiveMinimum", true)
}

fn upper(schema: &Map<String, Value>) -> Bound {
    bound(schema, "maximum", "exclusiveMaximum", false)
}

fn bound(schema: &Map<String, Value>, inclusive: &str, exclusive: &str, low: bool) -> Bound {
    let inc = schema.get(inclusive).and_then(Value::as_f64);
    match schema.get(exclusive) {
        Some(Value::Bool(true)) => inc.map_or(Bound::None, |v| Bound::At(v, true)),
        Some(Value::Number(n)) => {
            let ex = n.as_f64().unwrap_or(0.0);
            match inc {
                Some(i) if (low && i > ex) || (!low && i < ex) => Bound::At(i, false),
                _ => Bound::At(ex, true),
            }
        }
        _ => inc.map_or(Bound::None, |v| Bound::At(v, false)),
    }
}

/// Whether writer bound `w` is at least as tight as reader bound `r`.
fn within(r: &Bound, w: &Bound, low: bool) -> bool {
    match (r, w) {
        (Bound::None, _) => true,
        (Bound::At(..), Bound::None) => false,
        (Bound::At(rv, rex), Bound::At(wv, wex)) => {
            let tighter = if low { wv > rv } else { wv < rv };
            tighter || (wv == rv && (*wex || !*rex))
        }
    }
}

fn describe(b: &Bound) -> String {
    match b {
        Bound::None => "none".into(),
        Bound::At(v, true) => format!("{v} (exclusive)"),
        Bound::At(v, false) => format!("{v}"),
    }
}

impl Checker<'_> {
    fn report(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.out.push(Incompatibility {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Follows `$ref`s from `schema` at `loc`, returning the target and its location.
    fn deref<'v>(
        &mut self,
        root: &'v Value,
        mut schema: &'v Value,
        mut loc: String,
        path: &str,
    ) -> Option<(&'v Value, String)> {
        for _ in 0..MAX_DEPTH {
            let Some(reference) = schema.get("$ref").and_then(Value::as_str) else {
                return Some((schema, loc));
            };
            match resolve(root, reference) {
                Some(target) => {
                    schema = target;
                    loc = reference.to_owned();
                }
                None => {
                    self.report(path, format!("cannot resolve $ref \"{reference}\""));
                    return None;
                }
            }
        }
        self.report(path, "too many nested $refs");
        None
    }

    fn walk(
        &mut self,
        reader: &Value,
        rloc: String,
        writer: &Value,
        wloc: String,
        path: String,
        depth: usize,
    ) {
        if depth > MAX_DEPTH {
            self.report(&path, "schemas nested too deeply to compare");
            return;
        }
        let left = self.budget.get();
        if left == 0 {
            self.report(&path, "schemas too complex to compare");
            return;
        }
        self.budget.set(left - 1);
        let Some((reader, rloc)) = self.deref(self.reader_root, reader, rloc, &path) else {
            return;
        };
        let Some((writer, wloc)) = self.deref(self.writer_root, writer, wloc, &path) else {
            return;
        };
        if !self.seen.insert((rloc.clone(), wloc.clone())) {
            return;
        }
        self.compare(reader, &rloc, writer, &wloc, &path, depth);
        self.seen.remove(&(rloc, wloc));
    }

    fn compare(
        &mut self,
        reader: &Value,
        rloc: &str,
        writer: &Value,
        wloc: &str,
        path: &str,
        depth: usize,
    ) {
        // Boolean schemas: `true` accepts everything, `false` nothing.
        match (reader, writer) {
            (_, Value::Bool(false)) | (Value::Bool(true), _) => return,
            (Value::Bool(false), _) => {
                self.report(path, "schema rejects everything the writer allows");
                return;
            }
            _ => {}
        }
        let empty = Map::new();
        let r = reader.as_object().unwrap_or(&empty);
        let w = writer.as_object().unwrap_or(&empty);
        if r.is_empty() || r == w {
            return;
        }

        if self.combinators((reader, r), rloc, (writer, w), wloc, path, depth) {
            return;
        }

        // Types.
        let rt = types(r);
        let wt = types(w);
        match (&rt, &wt) {
            (Some(rts), None) => {
                self.report(
                    path,
                    format!("type narrowed from any to {}", rts.join(", ")),
                );
                return;
            }
            (Some(_), Some(wts)) => {
                let missing: Vec<&str> = wts.iter().copied().filter(|t| !allows(&rt, t)).collect();
                if !missing.is_empty() {
                    let rts = rt.as_deref().unwrap_or_default().join(", ");
                    self.report(
                        path.to_owned() + "/type",
                        format!("type {} no longer allowed (now {rts})", missing.join(", ")),
                    );
                    if missing.len() == wts.len() {
                        return;
                    }
                }
            }
            _ => {}
        }
        let both = |ty: &str| allows(&rt, ty) && allows(&wt, ty);

        // Constraints the checker does not analyze (allOf, not,
        // patternProperties, if/then/else, ...): a reader that adds or
        // changes one cannot be proven to read what the writer allows.
        for (key, value) in r {
            if !UNDERSTOOD.contains(&key.as_str()) && w.get(key) != Some(value) {
                self.report(
                    format!("{path}/{}", escape(key)),
                    format!("keyword \"{key}\" added or changed (not analyzed)"),
                );
            }
        }

        self.enums(r, w, path);

        if both("number") || both("integer") {
            let (rl, wl) = (lower(r), lower(w));
            if !within(&rl, &wl, true) {
                self.report(
                    format!("{path}/minimum"),
                    format!("minimum raised from {} to {}", describe(&wl), describe(&rl)),
                );
            }
            let (ru, wu) = (upper(r), upper(w));
            if !within(&ru, &wu, false) {
                self.report(
                    format!("{path}/maximum"),
                    format!(
                        "maximum lowered from {} to {}",
                        describe(&wu),
                        describe(&ru)
                    ),
                );
            }
            if let (Some(rm), wm) = (
                r.get("multipleOf").and_then(Value::as_f64),
                w.get("multipleOf").and_then(Value::as_f64),
            ) {
                let ok = wm.is_some_and(|wm| rm != 0.0 && (wm / rm).fract() == 0.0);
                if !ok {
                    self.report(
                        format!("{path}/multipleOf"),
                        format!("multipleOf {rm} added or changed"),
                    );
                }
            }
        }
        if both("string") {
            self.min_max(r, w, "minLength", "maxLength", path);
            if let Some(pattern) = r.get("pattern")
                && w.get("pattern") != Some(pattern)
            {
                self.report(format!("{path}/pattern"), "pattern added or changed");
            }
            if let Some(format) = r.get("format")
                && w.get("format") != Some(format)
            {
                self.report(format!("{path}/format"), "format added or changed");
            }
        }
        if both("array") {
            self.min_max(r, w, "minItems", "maxItems", path);
            self.items(r, rloc, w, wloc, path, depth);
        }
        if both("object") {
            self.min_max(r, w, "minProperties", "maxProperties", path);
            self.object(r, rloc, w, wloc, path, depth);
        }
    }

    /// `anyOf`/`oneOf`: every alternative of the writer must be read by some
    /// alternative of the reader. Returns whether the schemas were handled.
    fn combinators(
        &mut self,
        (reader, r): (&Value, &Map<String, Value>),
        rloc: &str,
        (writer, w): (&Value, &Map<String, Value>),
        wloc: &str,
        path: &str,
        depth: usize,
    ) -> bool {
        let ralt = alternatives(r);
        let walt = alternatives(w);
        if ralt.is_none() && walt.is_none() {
            return false;
        }
        // A side without alternatives is one alternative: itself (it has no
        // anyOf/oneOf, so walking it does not come back here).
        let rs: Vec<(&Value, String, String)> = match ralt {
            Some((k, a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (v, format!("{rloc}/{k}/{i}"), format!("{path}/{k}/{i}")))
                .collect(),
            None => vec![(reader, rloc.to_owned(), path.to_owned())],
        };
        let ws: Vec<(&Value, String)> = match walt {
            Some((k, a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (v, format!("{wloc}/{k}/{i}")))
                .collect(),
            None => vec![(writer, wloc.to_owned())],
        };
        for (wv, wl) in &ws {
            let mut best: Option<Vec<Incompatibility>> = None;
            for (rv, rl, rp) in &rs {
                let mut sub = Checker {
                    reader_root: self.reader_root,
                    writer_root: self.writer_root,
                    seen: self.seen.clone(),
                    out: Vec::new(),
                    budget: Rc::clone(&self.budget),
                };
                sub.walk(rv, rl.clone(), wv, wl.clone(), rp.clone(), depth + 1);
                if sub.out.is_empty() {
                    best = Some(Vec::new());
                    break;
                }
                if best.as_ref().is_none_or(|b| sub.out.len() < b.len()) {
                    best = Some(sub.out);
                }
            }
            if let Some(problems) = best
                && !problems.is_empty()
            {
                if rs.len() == 1 {
                    self.out.extend(problems);
                } else {
                    self.report(
                        path,
                        format!("no alternative reads writer alternative {wl}"),
                    );
                }
            }
        }
        true
    }

    fn enums(&mut self, r: &Map<String, Value>, w: &Map<String, Value>, path: &str) {
        let values = |m: &Map<String, Value>| -> Option<Vec<Value>> {
            if let Some(c) = m.get("const") {
                return Some(vec![c.clone()]);
            }
            m.get("enum").and_then(Value::as_array).cloned()
        };
        let Some(rv) = values(r) else { return };
        let key = if r.contains_key("const") {
            "const"
        } else {
            "enum"
        };
        match values(w) {
            None => self.report(format!("{path}/{key}"), format!("{key} added")),
            Some(wv) => {
                for v in wv.iter().filter(|v| !rv.contains(v)) {
                    self.report(
                        format!("{path}/{key}"),
                        format!("value {v} removed from {key}"),
                    );
                }
            }
        }
    }

    fn min_max(
        &mut self,
        r: &Map<String, Value>,
        w: &Map<String, Value>,
        min: &str,
        max: &str,
        path: &str,
    ) {
        let get = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_u64);
        if let Some(rmin) = get(r, min) {
            let wmin = get(w, min).unwrap_or(0);
            if wmin < rmin {
                self.report(
                    format!("{path}/{min}"),
                    format!("{min} raised from {wmin} to {rmin}"),
                );
            }
        }
        if let Some(rmax) = get(r, max) {
            match get(w, max) {
                Some(wmax) if wmax <= rmax => {}
                wmax => {
                    let from = wmax.map_or_else(|| "none".to_owned(), |v| v.to_string());
                    self.report(
                        format!("{path}/{max}"),
                        format!("{max} lowered from {from} to {rmax}"),
                    );
                }
            }
        }
    }

    fn items(
        &mut self,
        r: &Map<String, Value>,
        rloc: &str,
        w: &Map<String, Value>,
        wloc: &str,
        path: &str,
        depth: usize,
    ) {
        let Some(ri) = r.get("items") else { return };
        let any = Value::Bool(true);
        let wi = w.get("items").unwrap_or(&any);
        match (ri, wi) {
            (Value::Array(rs), Value::Array(ws)) => {
                for (i, rv) in rs.iter().enumerate() {
                    let wv = ws.get(i).unwrap_or(&any);
                    self.walk(
                        rv,
                        format!("{rloc}/items/{i}"),
                        wv,
                        format!("{wloc}/items/{i}"),
                        format!("{path}/items/{i}"),
                        depth + 1,
                    );
                }
            }
            (Value::Array(_), _) | (_, Value::Array(_)) => {
                self.report(
                    format!("{path}/items"),
                    "items changed between a tuple and a list",
                );
            }
            _ => self.walk(
                ri,
                format!("{rloc}/items"),
                wi,
                format!("{wloc}/items"),
                format!("{path}/items"),
                depth + 1,
            ),
        }
    }

    fn object(
        &mut self,
        r: &Map<String, Value>,
        rloc: &str,
        w: &Map<String, Value>,
        wloc: &str,
        path: &str,
        depth: usize,
    ) {
        let empty = Map::new();
        let rprops = r
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let wprops = w
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let required = |m: &Map<String, Value>| -> Vec<String> {
            m.get("required")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let wreq = required(w);
        for (i, name) in required(r).iter().enumerate() {
            if !wreq.contains(name) {
                self.report(
                    format!("{path}/required/{i}"),
                    format!("property \"{name}\" newly required"),
                );
            }
        }
        let any = Value::Bool(true);
        let radd = r.get("additionalProperties").unwrap_or(&any);
        let wadd = w.get("additionalProperties").unwrap_or(&any);
        for (name, rp) in rprops {
            let key = escape(name);
            if let Some(wp) = wprops.get(name) {
                self.walk(
                    rp,
                    format!("{rloc}/properties/{key}"),
                    wp,
                    format!("{wloc}/properties/{key}"),
                    format!("{path}/properties/{key}"),
                    depth + 1,
                );
            } else if wadd.is_object() {
                // The writer allowed it through its additionalProperties schema.
                self.walk(
                    rp,
                    format!("{rloc}/properties/{key}"),
                    wadd,
                    format!("{wloc}/additionalProperties"),
                    format!("{path}/properties/{key}"),
                    depth + 1,
                );
            }
            // Writer closed: it never wrote the property. Writer open: the
            // lenient rule (see the module docs).
        }
        for (name, wp) in wprops {
            if rprops.contains_key(name) {
                continue;
            }
            let key = escape(name);
            match radd {
                Value::Bool(false) => self.report(
                    format!("{path}/properties/{key}"),
                    format!("property \"{name}\" removed from a closed content model"),
                ),
                Value::Object(_) => self.walk(
                    radd,
                    format!("{rloc}/additionalProperties"),
                    wp,
                    format!("{wloc}/properties/{key}"),
                    format!("{path}/additionalProperties"),
                    depth + 1,
                ),
                _ => {}
            }
        }
        match (radd, wadd) {
            (Value::Bool(true), _) | (_, Value::Bool(false)) => {}
            (Value::Bool(false), _) => self.report(
                format!("{path}/additionalProperties"),
                "additional properties no longer allowed",
            ),
            (Value::Object(_), Value::Bool(true)) => self.walk(
                radd,
                format!("{rloc}/additionalProperties"),
                &any,
                format!("{wloc}/additionalProperties"),
                format!("{path}/additionalProperties"),
                depth + 1,
            ),
            _ => self.walk(
                radd,
                format!("{rloc}/additionalProperties"),
                wadd,
                format!("{wloc}/additionalProperties"),
                format!("{path}/additionalProperties"),
                depth + 1,
            ),
        }
    }
}

/// The `anyOf` (or else `oneOf`) alternatives of a schema.
fn alternatives(m: &Map<String, Value>) -> Option<(&'static str, &Vec<Value>)> {
    ["anyOf", "oneOf"]
        .into_iter()
        .find_map(|k| m.get(k).and_then(Value::as_array).map(|a| (k, a)))
}
