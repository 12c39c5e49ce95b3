//! The in-process [`Registry`]: subjects, versions, global ids, deletes,
//! compatibility levels and compiled validators, optionally persisted to a
//! [`Store`].

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;

use crate::compat::{self, CompatibilityLevel};
use crate::error::{Error, ErrorKind, Result};
use crate::store::{Store, VersionRow};
use crate::validate::{CompiledSchema, SchemaSource, compile};

/// The default limit on the size of one schema: 1 MiB.
pub const DEFAULT_MAX_SCHEMA_BYTES: usize = 1024 * 1024;

/// The base URL schema URLs are built on when none is configured.
pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:8081";

/// The only schema type served.
pub const SCHEMA_TYPE_JSON: &str = "JSON";

/// The text of a schema in canonical form: object keys sorted, no
/// insignificant whitespace. Two texts with the same canonical form are
/// the same schema and get the same id.
///
/// ```
/// let a = schemas::canonical_json(&serde_json::from_str(r#"{"b": 1, "a": [true]}"#).unwrap());
/// let b = schemas::canonical_json(&serde_json::from_str(r#"{ "a":[ true ],"b":1 }"#).unwrap());
/// assert_eq!(a, b);
/// assert_eq!(a, r#"{"a":[true],"b":1}"#);
/// ```
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(k) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A version as a request names it: a number or `latest` (`-1` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSpec {
    /// The latest live version.
    Latest,
    /// A version number (from 1).
    Number(u32),
}

impl FromStr for VersionSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "latest" || s == "-1" {
            return Ok(Self::Latest);
        }
        match s.parse::<u32>() {
            Ok(n) if n >= 1 && n <= i32::MAX as u32 => Ok(Self::Number(n)),
            _ => Err(Error::new(ErrorKind::InvalidVersion {
                version: s.to_owned(),
            })),
        }
    }
}

/// One version of a subject, as the REST API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubjectVersion {
    /// The subject.
    pub subject: String,
    /// The version under the subject.
    pub version: u32,
    /// The schema's global id.
    pub id: u32,
    /// The schema text (canonical form).
    pub schema: String,
    /// Always `JSON`.
    #[serde(rename = "schemaType")]
    pub schema_type: &'static str,
}

/// Settings of a [`Registry`].
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// The largest schema accepted, in bytes of text.
    pub max_schema_bytes: usize,
    /// The URL clients reach this registry at; schema URLs are
    /// `{base_url}/schemas/ids/{id}`.
    pub base_url: String,
    /// The global compatibility level until one is set.
    pub default_level: CompatibilityLevel,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            max_schema_bytes: DEFAULT_MAX_SCHEMA_BYTES,
            base_url: DEFAULT_BASE_URL.to_owned(),
            default_level: CompatibilityLevel::Backward,
        }
    }
}

#[derive(Debug, Clone)]
struct SchemaEntry {
    canonical: Arc<str>,
    compiled: Arc<CompiledSchema>,
}

#[derive(Debug, Clone, Copy)]
struct VersionEntry {
    version: u32,
    id: u32,
    deleted: bool,
}

#[derive(Debug, Default)]
struct State {
    schemas: BTreeMap<u32, SchemaEntry>,
    ids: HashMap<Arc<str>, u32>,
    subjects: BTreeMap<String, Vec<VersionEntry>>,
    global: Option<CompatibilityLevel>,
    levels: HashMap<String, CompatibilityLevel>,
    /// The latest live version of each subject, compiled, kept up to date
    /// by every write so the validation path only reads.
    latest: HashMap<String, Arc<CompiledSchema>>,
}

impl State {
    fn refresh_latest(&mut self, subject: &str) {
        let latest = self
            .live(subject)
            .and_then(|mut live| live.next_back().copied())
            .and_then(|v| {
                self.schemas
                    .get(&v.id)
                    .map(|e| Arc::new(e.compiled.for_subject(subject, v.version)))
            });
        match latest {
            Some(compiled) => {
                self.latest.insert(subject.to_owned(), compiled);
            }
            None => {
                self.latest.remove(subject);
            }
        }
    }

    fn live(&self, subject: &str) -> Option<impl DoubleEndedIterator<Item = &VersionEntry>> {
        let versions = self.subjects.get(subject)?;
        if versions.iter().all(|v| v.deleted) {
            return None;
        }
        Some(versions.iter().filter(|v| !v.deleted))
    }

    fn subject_not_found(subject: &str) -> Error {
        Error::new(ErrorKind::SubjectNotFound {
            subject: subject.to_owned(),
        })
    }

    fn entry(&self, subject: &str, spec: VersionSpec) -> Result<VersionEntry> {
        let mut live = self
            .live(subject)
            .ok_or_else(|| Self::subject_not_found(subject))?;
        let found = match spec {
            VersionSpec::Latest => live.last().copied(),
            VersionSpec::Number(n) => live.find(|v| v.version == n).copied(),
        };
        found.ok_or_else(|| {
            Error::new(ErrorKind::VersionNotFound {
                version: match spec {
                    VersionSpec::Latest => "latest".into(),
                    VersionSpec::Number(n) => n.to_string(),
                },
            })
        })
    }

    fn view(&self, subject: &str, v: VersionEntry) -> Result<SubjectVersion> {
        let entry = self.schemas.get(&v.id).ok_or_else(|| {
            Error::new(ErrorKind::SchemaNotFound {
                what: v.id.to_string(),
            })
        })?;
        Ok(SubjectVersion {
            subject: subject.to_owned(),
            version: v.version,
            id: v.id,
            schema: entry.canonical.to_string(),
            schema_type: SCHEMA_TYPE_JSON,
        })
    }

    fn level(&self, subject: &str, default: CompatibilityLevel) -> CompatibilityLevel {
        self.levels
            .get(subject)
            .copied()
            .or(self.global)
            .unwrap_or(default)
    }
}

/// A schema registry in this process: register and look up JSON Schemas
/// under subjects, check compatibility, validate data. Cheap to clone (the
/// clones share state); every change is written through to the [`Store`]
/// (when there is one) before it is visible.
///
/// Writes are serialized within one registry; a database is meant to be
/// written by one registry process at a time (run replicas read-only, or
/// behind one writer, as with Confluent's primary).
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: RwLock<State>,
    write: tokio::sync::Mutex<()>,
    store: Option<Store>,
    options: RegistryOptions,
}

fn poisoned() -> Error {
    Error::new(ErrorKind::Store { operation: "lock" })
}

impl Registry {
    /// A registry in memory only, with default options.
    pub fn in_memory() -> Self {
        Self::with_options(RegistryOptions::default())
    }

    /// A registry in memory only.
    pub fn with_options(options: RegistryOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: RwLock::new(State::default()),
                write: tokio::sync::Mutex::new(()),
                store: None,
                options,
            }),
        }
    }

    /// A registry persisted in `store`, loading what it already holds.
    ///
    /// # Errors
    ///
    /// The store could not be read, or holds a schema that no longer compiles.
    pub async fn open(store: Store, options: RegistryOptions) -> Result<Self> {
        let snapshot = store.load().await?;
        let mut state = State::default();
        for (id, canonical) in snapshot.schemas {
            let value: Value =
                serde_json::from_str(&canonical).map_err(|e| Error::store("load", e))?;
            let compiled =
                CompiledSchema::new(id, Arc::new(value), schema_url(&options.base_url, id))?;
            let canonical: Arc<str> = canonical.into();
            state.ids.insert(Arc::clone(&canonical), id);
            state.schemas.insert(
                id,
                SchemaEntry {
                    canonical,
                    compiled: Arc::new(compiled),
                },
            );
        }
        for row in snapshot.versions {
            state
                .subjects
                .entry(row.subject)
                .or_default()
                .push(VersionEntry {
                    version: row.version,
                    id: row.schema_id,
                    deleted: row.deleted,
                });
        }
        for (subject, level) in snapshot.config {
            let level = CompatibilityLevel::from_str(&level)?;
            if subject.is_empty() {
                state.global = Some(level);
            } else {
                state.levels.insert(subject, level);
            }
        }
        let subjects: Vec<String> = state.subjects.keys().cloned().collect();
        for subject in subjects {
            state.refresh_latest(&subject);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                state: RwLock::new(state),
                write: tokio::sync::Mutex::new(()),
                store: Some(store),
                options,
            }),
        })
    }

    /// The options it runs with.
    pub fn options(&self) -> &RegistryOptions {
        &self.inner.options
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> Result<T>) -> Result<T> {
        let state = self.inner.state.read().map_err(|_| poisoned())?;
        f(&state)
    }

    fn apply(&self, f: impl FnOnce(&mut State)) -> Result<()> {
        let mut state = self.inner.state.write().map_err(|_| poisoned())?;
        f(&mut state);
        Ok(())
    }

    /// Parses and checks schema text: size, JSON, a valid JSON Schema.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SchemaTooLarge`] or [`ErrorKind::InvalidSchema`].
    pub fn parse_schema(&self, text: &str) -> Result<Value> {
        let limit = self.inner.options.max_schema_bytes;
        if text.len() > limit {
            return Err(Error::new(ErrorKind::SchemaTooLarge {
                size: text.len(),
                limit,
            }));
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::invalid_schema(format!("not valid JSON: {e}")))?;
        if !(value.is_object() || value.is_boolean()) {
            return Err(Error::invalid_schema(
                "a JSON Schema is an object or a boolean",
            ));
        }
        compile(&value)?;
        Ok(value)
    }

    /// Registers `schema` under `subject` and returns its version (an
    /// existing one when the same schema is already live there).
    ///
    /// The schema must be compatible with the subject's earlier versions
    /// under its [level](Self::compatibility).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidSchema`], [`ErrorKind::SchemaTooLarge`],
    /// [`ErrorKind::Incompatible`], or a store error.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<SubjectVersion> {
        let value = self.parse_schema(schema)?;
        self.register_value(subject, value).await
    }

    /// [`register`](Self::register) for a parsed schema.
    ///
    /// # Errors
    ///
    /// As [`register`](Self::register).
    pub async fn register_value(&self, subject: &str, value: Value) -> Result<SubjectVersion> {
        if subject.is_empty() {
            return Err(Error::new(ErrorKind::BadRequest {
                reason: "empty subject".into(),
            }));
        }
        let canonical = canonical_json(&value);
        if canonical.len() > self.inner.options.max_schema_bytes {
            let limit = self.inner.options.max_schema_bytes;
            return Err(Error::new(ErrorKind::SchemaTooLarge {
                size: canonical.len(),
                limit,
            }));
        }
        let _write = self.inner.write.lock().await;
        let default = self.inner.options.default_level;
        // Decide under the read lock.
        let decision = self.read(|state| {
            let known = state.ids.get(canonical.as_str()).copied();
            if let Some(id) = known
                && let Some(mut live) = state.live(subject)
                && let Some(v) = live.find(|v| v.id == id)
            {
                return Ok(Err(state.view(subject, *v)?));
            }
            let level = state.level(subject, default);
            let existing: Vec<Value> = state
                .live(subject)
                .into_iter()
                .flatten()
                .filter_map(|v| state.schemas.get(&v.id))
                .map(|e| e.compiled.schema().clone())
                .collect();
            let messages = compat::check_level(level, &value, &existing);
            if !messages.is_empty() {
                return Err(Error::new(ErrorKind::Incompatible {
                    subject: subject.to_owned(),
                    messages,
                }));
            }
            let next_id = state.schemas.keys().next_back().map_or(1, |id| id + 1);
            let version = state
                .subjects
                .get(subject)
                .and_then(|vs| vs.iter().map(|v| v.version).max())
                .map_or(1, |v| v + 1);
            Ok(Ok((known, known.unwrap_or(next_id), version)))
        })?;
        let (known, id, version) = match decision {
            Err(existing) => return Ok(existing),
            Ok(d) => d,
        };
        let new_entry = if known.is_none() {
            let compiled = CompiledSchema::new(
                id,
                Arc::new(value),
                schema_url(&self.inner.options.base_url, id),
            )?;
            Some(SchemaEntry {
                canonical: canonical.clone().into(),
                compiled: Arc::new(compiled),
            })
        } else {
            None
        };
        if let Some(store) = &self.inner.store {
            let row = VersionRow {
                subject: subject.to_owned(),
                version,
                schema_id: id,
                deleted: false,
            };
            store
                .insert_version(&row, new_entry.as_ref().map(|_| canonical.as_str()))
                .await?;
        }
        self.apply(|state| {
            if let Some(entry) = new_entry {
                state.ids.insert(Arc::clone(&entry.canonical), id);
                state.schemas.insert(id, entry);
            }
            state
                .subjects
                .entry(subject.to_owned())
                .or_default()
                .push(VersionEntry {
                    version,
                    id,
                    deleted: false,
                });
            state.refresh_latest(subject);
        })?;
        tracing::info!(subject, version, id, "schema registered");
        Ok(SubjectVersion {
            subject: subject.to_owned(),
            version,
            id,
            schema: canonical,
            schema_type: SCHEMA_TYPE_JSON,
        })
    }

    /// Registers the JSON Schema of the Rust type `T` (derived with
    /// [`schemars`]) under `subject`.
    ///
    /// # Errors
    ///
    /// As [`register`](Self::register).
    pub async fn register_type<T: schemars::JsonSchema>(
        &self,
        subject: &str,
    ) -> Result<SubjectVersion> {
        self.register_value(subject, schema_for::<T>()).await
    }

    /// The live version of `subject` whose schema is `schema`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SubjectNotFound`], [`ErrorKind::SchemaNotFound`], or the
    /// schema is invalid.
    pub fn lookup(&self, subject: &str, schema: &str) -> Result<SubjectVersion> {
        let value = self.parse_schema(schema)?;
        let canonical = canonical_json(&value);
        self.read(|state| {
            let mut live = state
                .live(subject)
                .ok_or_else(|| State::subject_not_found(subject))?;
            let id = state.ids.get(canonical.as_str()).copied();
            let found = id.and_then(|id| live.find(|v| v.id == id).copied());
            match found {
                Some(v) => state.view(subject, v),
                None => Err(Error::new(ErrorKind::SchemaNotFound {
                    what: format!("under subject '{subject}'"),
                })),
            }
        })
    }

    /// Subjects with at least one live version (or any version, with `deleted`).
    pub fn subjects(&self, deleted: bool) -> Result<Vec<String>> {
        self.read(|state| {
            Ok(state
                .subjects
                .iter()
                .filter(|(_, vs)| !vs.is_empty() && (deleted || vs.iter().any(|v| !v.deleted)))
                .map(|(s, _)| s.clone())
                .collect())
        })
    }

    /// The live version numbers of `subject` (or all, with `deleted`).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SubjectNotFound`].
    pub fn versions(&self, subject: &str, deleted: bool) -> Result<Vec<u32>> {
        self.read(|state| {
            let versions = state
                .subjects
                .get(subject)
                .filter(|vs| !vs.is_empty() && (deleted || vs.iter().any(|v| !v.deleted)))
                .ok_or_else(|| State::subject_not_found(subject))?;
            Ok(versions
                .iter()
                .filter(|v| deleted || !v.deleted)
                .map(|v| v.version)
                .collect())
        })
    }

    /// One version of `subject`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SubjectNotFound`] or [`ErrorKind::VersionNotFound`].
    pub fn version(&self, subject: &str, spec: VersionSpec) -> Result<SubjectVersion> {
        self.read(|state| {
            let v = state.entry(subject, spec)?;
            state.view(subject, v)
        })
    }

    /// The schema with global id `id`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SchemaNotFound`].
    pub fn schema(&self, id: u32) -> Result<Arc<CompiledSchema>> {
        self.read(|state| {
            state
                .schemas
                .get(&id)
                .map(|e| Arc::clone(&e.compiled))
                .ok_or_else(|| {
                    Error::new(ErrorKind::SchemaNotFound {
                        what: id.to_string(),
                    })
                })
        })
    }

    /// The schema text (canonical form) with global id `id`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SchemaNotFound`].
    pub fn schema_text(&self, id: u32) -> Result<String> {
        self.read(|state| {
            state
                .schemas
                .get(&id)
                .map(|e| e.canonical.to_string())
                .ok_or_else(|| {
                    Error::new(ErrorKind::SchemaNotFound {
                        what: id.to_string(),
                    })
                })
        })
    }

    /// The live (subject, version) pairs that use schema `id`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SchemaNotFound`].
    pub fn schema_versions(&self, id: u32) -> Result<Vec<(String, u32)>> {
        self.read(|state| {
            if !state.schemas.contains_key(&id) {
                return Err(Error::new(ErrorKind::SchemaNotFound {
                    what: id.to_string(),
                }));
            }
            Ok(state
                .subjects
                .iter()
                .flat_map(|(s, vs)| {
                    vs.iter()
                        .filter(move |v| v.id == id && !v.deleted)
                        .map(move |v| (s.clone(), v.version))
                })
                .collect())
        })
    }

    /// The latest live version of `subject`, compiled.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SubjectNotFound`].
    pub fn latest_compiled(&self, subject: &str) -> Result<Arc<CompiledSchema>> {
        self.read(|state| {
            let v = state.entry(subject, VersionSpec::Latest)?;
            let entry = state.schemas.get(&v.id).ok_or_else(|| {
                Error::new(ErrorKind::SchemaNotFound {
                    what: v.id.to_string(),
                })
            })?;
            Ok(Arc::new(entry.compiled.for_subject(subject, v.version)))
        })
    }

    /// Deletes one version: softly, or (`permanent`, only after a soft
    /// delete) for good. Returns the version number.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SubjectNotFound`], [`ErrorKind::VersionNotFound`],
    /// [`ErrorKind::VersionNotSoftDeleted`], or a store error.
    pub async fn delete_version(
        &self,
        subject: &str,
        spec: VersionSpec,
        permanent: bool,
    ) -> Result<u32> {
        let _write = self.inner.write.lock().await;
        let version = self.read(|state| {
            let versions = state
                .subjects
                .get(subject)
                .filter(|vs| !vs.is_empty())
                .ok_or_else(|| State::subject_not_found(subject))?;
            let not_found = || {
                Error::new(ErrorKind::VersionNotFound {
                    version: match spec {
                        VersionSpec::Latest => "latest".into(),
                        VersionSpec::Number(n) => n.to_string(),
                    },
                })
            };
            let entry = match spec {
                VersionSpec::Latest if permanent => versions.last(),
                VersionSpec::Latest => versions.iter().rfind(|v| !v.deleted),
                VersionSpec::Number(n) => versions.iter().find(|v| v.version == n),
            }
            .ok_or_else(not_found)?;
            if permanent && !entry.deleted {
                return Err(Error::new(ErrorKind::VersionNotSoftDeleted {
                    subject: subject.to_owned(),
                    version: entry.version,
                }));
            }
            if !permanent && entry.deleted {
                return Err(not_found());
            }
            Ok(entry.version)
        })?;
        if let Some(store) = &self.inner.store {
            if permanent {
                store.hard_delete(subject, &[version]).await?;
            } else {
                store.soft_delete(subject, &[version]).await?;
            }
        }
        self.apply(|state| {
            if let Some(vs) = state.subjects.get_mut(subject) {
                if permanent {
                    vs.retain(|v| v.version != version);
                    if vs.is_empty() {
                        state.subjects.remove(subject);
                    }
                } else if let Some(v) = vs.iter_mut().find(|v| v.version == version) {
                    v.deleted = true;
                }
            }
            state.refresh_latest(subject);
        })?;
        Ok(version)
    }

    /// Deletes a subject: softly (its versions are hidden, the subject
    /// reads as not found), or (`permanent`, only after a soft delete) for
    /// good. Returns the versions deleted.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SubjectNotFound`], [`ErrorKind::SubjectSoftDeleted`]
    /// (soft delete twice), [`ErrorKind::SubjectNotSoftDeleted`], or a store error.
    pub async fn delete_subject(&self, subject: &str, permanent: bool) -> Result<Vec<u32>> {
        let _write = self.inner.write.lock().await;
        let versions = self.read(|state| {
            let versions = state
                .subjects
                .get(subject)
                .filter(|vs| !vs.is_empty())
                .ok_or_else(|| State::subject_not_found(subject))?;
            let all_deleted = versions.iter().all(|v| v.deleted);
            if permanent {
                if !all_deleted {
                    return Err(Error::new(ErrorKind::SubjectNotSoftDeleted {
                        subject: subject.to_owned(),
                    }));
                }
                Ok(versions.iter().map(|v| v.version).collect::<Vec<_>>())
            } else {
                if all_deleted {
                    return Err(Error::new(ErrorKind::SubjectSoftDeleted {
                        subject: subject.to_owned(),
                    }));
                }
                Ok(versions
                    .iter()
                    .filter(|v| !v.deleted)
                    .map(|v| v.version)
                    .collect())
            }
        })?;
        if let Some(store) = &self.inner.store {
            if permanent {
                store.hard_delete(subject, &versions).await?;
                store.delete_config(subject).await?;
            } else {
                store.soft_delete(subject, &versions).await?;
            }
        }
        self.apply(|state| {
            if permanent {
                state.subjects.remove(subject);
                state.levels.remove(subject);
            } else if let Some(vs) = state.subjects.get_mut(subject) {
                for v in vs.iter_mut() {
                    v.deleted = true;
                }
            }
            state.refresh_latest(subject);
        })?;
        Ok(versions)
    }

    /// Checks `schema` against version `spec` of `subject` under the
    /// subject's level; for `latest`, against everything the level covers
    /// (all earlier versions for transitive levels), as registering would.
    /// Returns the incompatibilities, empty when compatible.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SubjectNotFound`], [`ErrorKind::VersionNotFound`], or
    /// the schema is invalid.
    pub fn check_compatibility(
        &self,
        subject: &str,
        spec: VersionSpec,
        schema: &str,
    ) -> Result<Vec<String>> {
        let value = self.parse_schema(schema)?;
        self.check_value(subject, spec, &value)
    }

    /// [`check_compatibility`](Self::check_compatibility) for a parsed schema.
    ///
    /// # Errors
    ///
    /// As [`check_compatibility`](Self::check_compatibility).
    pub fn check_value(
        &self,
        subject: &str,
        spec: VersionSpec,
        value: &Value,
    ) -> Result<Vec<String>> {
        let default = self.inner.options.default_level;
        self.read(|state| {
            let level = state.level(subject, default);
            let target = state.entry(subject, spec)?;
            let existing: Vec<Value> = match spec {
                VersionSpec::Latest => state
                    .live(subject)
                    .into_iter()
                    .flatten()
                    .filter_map(|v| state.schemas.get(&v.id))
                    .map(|e| e.compiled.schema().clone())
                    .collect(),
                VersionSpec::Number(_) => state
                    .schemas
                    .get(&target.id)
                    .map(|e| e.compiled.schema().clone())
                    .into_iter()
                    .collect(),
            };
            Ok(compat::check_level(level, value, &existing))
        })
    }

    /// The global compatibility level.
    pub fn global_compatibility(&self) -> Result<CompatibilityLevel> {
        let default = self.inner.options.default_level;
        self.read(|state| Ok(state.global.unwrap_or(default)))
    }

    /// The level set for `subject`, if one is.
    pub fn subject_compatibility(&self, subject: &str) -> Result<Option<CompatibilityLevel>> {
        self.read(|state| Ok(state.levels.get(subject).copied()))
    }

    /// The level in force for `subject`: its own, else the global one.
    pub fn compatibility(&self, subject: &str) -> Result<CompatibilityLevel> {
        let default = self.inner.options.default_level;
        self.read(|state| Ok(state.level(subject, default)))
    }

    /// Sets the level of `subject`, or the global level for `None`.
    ///
    /// # Errors
    ///
    /// A store error.
    pub async fn set_compatibility(
        &self,
        subject: Option<&str>,
        level: CompatibilityLevel,
    ) -> Result<()> {
        let _write = self.inner.write.lock().await;
        if let Some(store) = &self.inner.store {
            store
                .set_config(subject.unwrap_or(""), level.as_str())
                .await?;
        }
        self.apply(|state| match subject {
            Some(s) => {
                state.levels.insert(s.to_owned(), level);
            }
            None => state.global = Some(level),
        })
    }

    /// Removes the level of `subject` (it falls back to the global one),
    /// returning the level it had.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SubjectNotFound`] when it had none, or a store error.
    pub async fn delete_compatibility(&self, subject: &str) -> Result<CompatibilityLevel> {
        let _write = self.inner.write.lock().await;
        let level = self
            .subject_compatibility(subject)?
            .ok_or_else(|| State::subject_not_found(subject))?;
        if let Some(store) = &self.inner.store {
            store.delete_config(subject).await?;
        }
        self.apply(|state| {
            state.levels.remove(subject);
        })?;
        Ok(level)
    }
}

/// The JSON Schema of the Rust type `T`, as [`schemars`] derives it.
pub fn schema_for<T: schemars::JsonSchema>() -> Value {
    schemars::schema_for!(T).to_value()
}

/// The URL of schema `id` on the registry at `base`.
pub fn schema_url(base: &str, id: u32) -> String {
    format!("{}/schemas/ids/{id}", base.trim_end_matches('/'))
}

#[async_trait]
impl SchemaSource for Registry {
    async fn latest(&self, subject: &str) -> Result<Arc<CompiledSchema>> {
        self.latest_compiled(subject)
    }

    async fn by_id(&self, id: u32) -> Result<Arc<CompiledSchema>> {
        self.schema(id)
    }

    fn base_url(&self) -> &str {
        self.inner.options.base_url.trim_end_matches('/')
    }
}
