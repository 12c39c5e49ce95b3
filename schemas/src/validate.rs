//! Validation of event data: [`CompiledSchema`] and the [`SchemaSource`]
//! trait the broker middleware uses, implemented by the in-process
//! [`Registry`](crate::Registry) and the HTTP [`RegistryClient`](crate::RegistryClient).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};

/// At most this many failures are listed in a validation error.
pub const MAX_REPORTED_ERRORS: usize = 10;

/// A registered schema with its compiled validator.
pub struct CompiledSchema {
    id: u32,
    subject: Option<String>,
    version: Option<u32>,
    schema: Arc<Value>,
    url: String,
    validator: Arc<jsonschema::Validator>,
}

impl fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledSchema")
            .field("id", &self.id)
            .field("subject", &self.subject)
            .field("version", &self.version)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Compiles `schema`, refusing anything that is not a valid JSON Schema
/// (remote `$ref`s included: nothing is fetched).
///
/// # Errors
///
/// [`ErrorKind::InvalidSchema`].
pub fn compile(schema: &Value) -> Result<jsonschema::Validator> {
    jsonschema::validator_for(schema).map_err(|e| Error::invalid_schema(e.to_string()))
}

impl CompiledSchema {
    /// Compiles `schema`, registered as `id`, whose URL is `url`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidSchema`].
    pub fn new(id: u32, schema: Arc<Value>, url: String) -> Result<Self> {
        let validator = Arc::new(compile(&schema)?);
        Ok(Self {
            id,
            subject: None,
            version: None,
            schema,
            url,
            validator,
        })
    }

    /// The same schema, as version `version` of `subject`.
    #[must_use]
    pub fn for_subject(&self, subject: &str, version: u32) -> Self {
        Self {
            id: self.id,
            subject: Some(subject.to_owned()),
            version: Some(version),
            schema: Arc::clone(&self.schema),
            url: self.url.clone(),
            validator: Arc::clone(&self.validator),
        }
    }

    /// The registry's global id of the schema.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The subject it was looked up under, if any.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// The version under that subject, if any.
    pub fn version(&self) -> Option<u32> {
        self.version
    }

    /// The schema document.
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// Where the registry serves it: `{registry}/schemas/ids/{id}`, the
    /// value written into a CloudEvent's `dataschema`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether `data` is valid.
    pub fn is_valid(&self, data: &Value) -> bool {
        self.validator.is_valid(data)
    }

    /// Checks `data`, listing (up to [`MAX_REPORTED_ERRORS`]) failures with
    /// their JSON path in the data, e.g. `/total: "x" is not of type "number"`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Validation`].
    pub fn validate(&self, data: &Value) -> Result<()> {
        if self.validator.is_valid(data) {
            return Ok(());
        }
        let errors = self
            .validator
            .iter_errors(data)
            .take(MAX_REPORTED_ERRORS)
            .map(|e| {
                let path = e.instance_path().as_str().to_owned();
                format!("{}: {e}", if path.is_empty() { "/" } else { &path })
            })
            .collect();
        Err(Error::new(ErrorKind::Validation {
            subject: self.subject.clone().unwrap_or_default(),
            id: self.id,
            errors,
        }))
    }
}

/// Where validating middleware gets schemas from: the in-process
/// [`Registry`](crate::Registry) or a remote one through
/// [`RegistryClient`](crate::RegistryClient).
#[async_trait]
pub trait SchemaSource: fmt::Debug + Send + Sync + 'static {
    /// The latest version registered under `subject`, compiled.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SubjectNotFound`], or the registry could not be reached.
    async fn latest(&self, subject: &str) -> Result<Arc<CompiledSchema>>;

    /// The schema with global id `id`, compiled.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::SchemaNotFound`], or the registry could not be reached.
    async fn by_id(&self, id: u32) -> Result<Arc<CompiledSchema>>;

    /// The registry's base URL: a schema's URL is `{base}/schemas/ids/{id}`.
    fn base_url(&self) -> &str;

    /// The schema id in `url` when it is a schema URL of this registry.
    fn id_from_url(&self, url: &str) -> Option<u32> {
        url.strip_prefix(self.base_url())?
            .strip_prefix("/schemas/ids/")?
            .parse()
            .ok()
    }
}

#[async_trait]
impl<S: SchemaSource + ?Sized> SchemaSource for Arc<S> {
    async fn latest(&self, subject: &str) -> Result<Arc<CompiledSchema>> {
        (**self).latest(subject).await
    }

    async fn by_id(&self, id: u32) -> Result<Arc<CompiledSchema>> {
        (**self).by_id(id).await
    }

    fn base_url(&self) -> &str {
        (**self).base_url()
    }

    fn id_from_url(&self, url: &str) -> Option<u32> {
        (**self).id_from_url(url)
    }
}
