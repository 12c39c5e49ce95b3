//! [`RegistryClient`]: a client for a remote registry over its REST API,
//! with a cache of schemas by id (ids never change meaning, so forever) and
//! of each subject's latest version (for a configurable time), both kept as
//! compiled validators.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{Error, ErrorKind, Result};
use crate::registry::{SCHEMA_TYPE_JSON, schema_for, schema_url};
use crate::server::CONTENT_TYPE as REGISTRY_CONTENT_TYPE;
use crate::validate::{CompiledSchema, SchemaSource};

/// How long a subject's latest version is cached by default.
pub const DEFAULT_LATEST_TTL: Duration = Duration::from_secs(30);

/// A client for a registry speaking the Confluent Schema Registry REST API.
/// Cheap to clone; clones share the cache.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    base_url: Arc<str>,
    token: Option<Arc<str>>,
    latest_ttl: Duration,
    cache_enabled: bool,
    cache: Arc<Cache>,
}

type Latest = HashMap<String, (Instant, Arc<CompiledSchema>)>;

#[derive(Debug, Default)]
struct Cache {
    by_id: RwLock<HashMap<u32, Arc<CompiledSchema>>>,
    latest: RwLock<Latest>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error_code: u32,
    message: String,
}

#[derive(Debug, Deserialize)]
struct SchemaBody {
    schema: String,
    #[serde(default)]
    id: Option<u32>,
    #[serde(default)]
    version: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct RegisteredBody {
    id: u32,
}

#[derive(Debug, Deserialize)]
struct CompatibilityBody {
    is_compatible: bool,
    #[serde(default)]
    messages: Vec<String>,
}

fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl RegistryClient {
    /// A client for the registry at `base_url` (e.g. `http://127.0.0.1:8081`).
    pub fn new(base_url: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base_url: base_url.trim_end_matches('/').into(),
            token: None,
            latest_ttl: DEFAULT_LATEST_TTL,
            cache_enabled: true,
            cache: Arc::default(),
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into().into());
        self
    }

    /// Caches each subject's latest version for `ttl` (zero: never).
    #[must_use]
    pub fn with_latest_ttl(mut self, ttl: Duration) -> Self {
        self.latest_ttl = ttl;
        self
    }

    /// Turns the cache off: every lookup is a request (and a compilation).
    #[must_use]
    pub fn without_cache(mut self) -> Self {
        self.cache_enabled = false;
        self
    }

    /// Forgets everything cached.
    pub fn clear_cache(&self) {
        if let Ok(mut m) = self.cache.by_id.write() {
            m.clear();
        }
        if let Ok(mut m) = self.cache.latest.write() {
            m.clear();
        }
    }

    fn remote(&self, reason: impl Into<String>, retryable: bool) -> Error {
        Error::new(ErrorKind::Remote {
            url: self.base_url.to_string(),
            reason: reason.into(),
            retryable,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .header(ACCEPT, REGISTRY_CONTENT_TYPE);
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, REGISTRY_CONTENT_TYPE)
                .body(body.to_string());
        }
        let response = request.send().await.map_err(|e| {
            Error::with_source(
                ErrorKind::Remote {
                    url: self.base_url.to_string(),
                    reason: "request failed".into(),
                    retryable: true,
                },
                e,
            )
        })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.remote(format!("reading the answer: {e}"), true))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| self.remote(format!("answer is not JSON: {e}"), false));
        }
        let Ok(body) = serde_json::from_slice::<ErrorBody>(&bytes) else {
            return Err(self.remote(format!("HTTP {status}"), status.is_server_error()));
        };
        let kind = match body.error_code {
            40401 => ErrorKind::SubjectNotFound {
                subject: body.message,
            },
            40402 => ErrorKind::VersionNotFound {
                version: body.message,
            },
            40403 => ErrorKind::SchemaNotFound { what: body.message },
            42201 => ErrorKind::InvalidSchema {
                reason: body.message,
            },
            42202 => ErrorKind::InvalidVersion {
                version: body.message,
            },
            42203 => ErrorKind::InvalidCompatibilityLevel {
                level: body.message,
            },
            409 => ErrorKind::Incompatible {
                subject: String::new(),
                messages: vec![body.message],
            },
            401 => ErrorKind::Unauthorized,
            code => ErrorKind::Remote {
                url: self.base_url.to_string(),
                reason: format!("error {code}: {}", body.message),
                retryable: status.is_server_error(),
            },
        };
        Err(Error::new(kind))
    }

    fn compile(&self, id: u32, text: &str) -> Result<CompiledSchema> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| self.remote(format!("schema {id} is not JSON: {e}"), false))?;
        CompiledSchema::new(id, Arc::new(value), schema_url(&self.base_url, id))
    }

    /// Registers `schema` under `subject`, returning its global id.
    ///
    /// # Errors
    ///
    /// The registry refused it ([`ErrorKind::Incompatible`],
    /// [`ErrorKind::InvalidSchema`], ...) or could not be reached.
    pub async fn register(&self, subject: &str, schema: &Value) -> Result<u32> {
        let body = json!({ "schema": schema.to_string(), "schemaType": SCHEMA_TYPE_JSON });
        let answer = self
            .call(
                reqwest::Method::POST,
                &format!("/subjects/{}/versions", encode(subject)),
                Some(body),
            )
            .await?;
        let registered: RegisteredBody =
            serde_json::from_value(answer).map_err(|e| self.remote(e.to_string(), false))?;
        if let Ok(mut latest) = self.cache.latest.write() {
            latest.remove(subject);
        }
        Ok(registered.id)
    }

    /// Registers the schema of the Rust type `T` under `subject`.
    ///
    /// # Errors
    ///
    /// As [`register`](Self::register).
    pub async fn register_type<T: schemars::JsonSchema>(&self, subject: &str) -> Result<u32> {
        self.register(subject, &schema_for::<T>()).await
    }

    /// Whether `schema` is compatible with version `version` (`latest` or a
    /// number) of `subject`; the messages say why not.
    ///
    /// # Errors
    ///
    /// The subject or version does not exist, or the registry could not be reached.
    pub async fn check_compatibility(
        &self,
        subject: &str,
        version: &str,
        schema: &Value,
    ) -> Result<Vec<String>> {
        let body = json!({ "schema": schema.to_string(), "schemaType": SCHEMA_TYPE_JSON });
        let path = format!(
            "/compatibility/subjects/{}/versions/{}?verbose=true",
            encode(subject),
            encode(version)
        );
        let answer = self.call(reqwest::Method::POST, &path, Some(body)).await?;
        let answer: CompatibilityBody =
            serde_json::from_value(answer).map_err(|e| self.remote(e.to_string(), false))?;
        if answer.is_compatible {
            Ok(Vec::new())
        } else if answer.messages.is_empty() {
            Ok(vec!["incompatible".into()])
        } else {
            Ok(answer.messages)
        }
    }
}

#[async_trait]
impl SchemaSource for RegistryClient {
    async fn latest(&self, subject: &str) -> Result<Arc<CompiledSchema>> {
        if self.cache_enabled
            && let Ok(latest) = self.cache.latest.read()
            && let Some((at, compiled)) = latest.get(subject)
            && at.elapsed() < self.latest_ttl
        {
            return Ok(Arc::clone(compiled));
        }
        let answer = self
            .call(
                reqwest::Method::GET,
                &format!("/subjects/{}/versions/latest", encode(subject)),
                None,
            )
            .await?;
        let body: SchemaBody =
            serde_json::from_value(answer).map_err(|e| self.remote(e.to_string(), false))?;
        let id = body
            .id
            .ok_or_else(|| self.remote("answer has no id", false))?;
        let version = body.version.unwrap_or_default();
        let cached = if self.cache_enabled {
            self.cache
                .by_id
                .read()
                .ok()
                .and_then(|m| m.get(&id).cloned())
        } else {
            None
        };
        let base = match cached {
            Some(c) => c,
            None => {
                let c = Arc::new(self.compile(id, &body.schema)?);
                if self.cache_enabled
                    && let Ok(mut m) = self.cache.by_id.write()
                {
                    m.insert(id, Arc::clone(&c));
                }
                c
            }
        };
        let compiled = Arc::new(base.for_subject(subject, version));
        if self.cache_enabled
            && !self.latest_ttl.is_zero()
            && let Ok(mut latest) = self.cache.latest.write()
        {
            latest.insert(subject.to_owned(), (Instant::now(), Arc::clone(&compiled)));
        }
        Ok(compiled)
    }

    async fn by_id(&self, id: u32) -> Result<Arc<CompiledSchema>> {
        if self.cache_enabled
            && let Ok(m) = self.cache.by_id.read()
            && let Some(c) = m.get(&id)
        {
            return Ok(Arc::clone(c));
        }
        let answer = self
            .call(reqwest::Method::GET, &format!("/schemas/ids/{id}"), None)
            .await?;
        let body: SchemaBody =
            serde_json::from_value(answer).map_err(|e| self.remote(e.to_string(), false))?;
        let compiled = Arc::new(self.compile(id, &body.schema)?);
        if self.cache_enabled
            && let Ok(mut m) = self.cache.by_id.write()
        {
            m.insert(id, Arc::clone(&compiled));
        }
        Ok(compiled)
    }

    fn base_url(&self) -> &str {
        &self.base_url
    }
}
