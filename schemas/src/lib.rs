//! Event contracts for the event backbone: a schema registry for the JSON
//! Schemas of CloudEvent data.
//!
//! - **Subjects and versions.** A subject (by default the CloudEvent `type`)
//!   holds numbered versions of a schema. Every distinct schema gets a
//!   global id; the same schema text (after [canonicalization](canonical_json):
//!   keys sorted, whitespace dropped) always gets the same id, under any
//!   subject. Deletes follow Confluent's rules: a soft delete hides a
//!   version or subject, and only a soft-deleted one can be deleted for good.
//! - **Compatibility.** A new version must be compatible with the earlier
//!   ones under the subject's [`CompatibilityLevel`] (the global one unless
//!   the subject has its own; BACKWARD by default). The [`compat`] checker
//!   explains each incompatibility with its JSON path.
//! - **Validation.** [`CompiledSchema`] validates event data; the
//!   [`SchemaSource`] trait serves compiled schemas to validating middleware
//!   (`broker-adapters`' `validation` feature), from the in-process
//!   [`Registry`] or a remote one through [`RegistryClient`].
//! - **Storage and API.** A [`Registry`] lives in memory or on a [`Store`]
//!   (SQLite or PostgreSQL, migrations embedded); [`server`] serves it with
//!   the Confluent Schema Registry REST API, and the `schema-registry`
//!   binary runs that server (see [`config`]).
//!
//! This crate depends on no other crate of the workspace.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> schemas::Result<()> {
//! use schemas::{ErrorKind, Registry, VersionSpec};
//! use serde_json::json;
//!
//! let registry = Registry::in_memory();
//! let v1 = r#"{"type": "object",
//!              "properties": {"order": {"type": "string"}},
//!              "required": ["order"]}"#;
//! let registered = registry.register("com.example.order.placed", v1).await?;
//! assert_eq!((registered.id, registered.version), (1, 1));
//!
//! // Adding an optional field is backward compatible...
//! let v2 = r#"{"type": "object",
//!              "properties": {"order": {"type": "string"}, "total": {"type": "number"}},
//!              "required": ["order"]}"#;
//! let subject = "com.example.order.placed";
//! assert!(registry.check_compatibility(subject, VersionSpec::Latest, v2)?.is_empty());
//!
//! // ...making it required is not: old events have no total.
//! let v3 = v2.replace(r#"["order"]"#, r#"["order", "total"]"#);
//! let problems = registry.check_compatibility(subject, VersionSpec::Latest, &v3)?;
//! assert!(problems[0].contains(r#"#/required/1: property "total" newly required"#));
//! let refused = registry.register(subject, &v3).await.expect_err("fails");
//! assert!(matches!(refused.kind(), ErrorKind::Incompatible { .. }));
//!
//! // Event data is validated against the latest version.
//! let schema = registry.latest_compiled(subject)?;
//! schema.validate(&json!({"order": "o-1"}))?;
//! let error = schema.validate(&json!({"order": 7})).expect_err("fails");
//! assert!(error.to_string().contains("/order"));
//! # Ok(())
//! # }
//! ```

pub mod client;
pub mod compat;
pub mod config;
pub mod error;
pub mod process;
pub mod registry;
pub mod server;
pub mod store;
pub mod validate;

pub use crate::client::RegistryClient;
pub use crate::compat::{CompatibilityLevel, Incompatibility};
pub use crate::error::{Error, ErrorKind, Result};
pub use crate::registry::{
    Registry, RegistryOptions, SubjectVersion, VersionSpec, canonical_json, schema_for, schema_url,
};
pub use crate::store::Store;
pub use crate::validate::{CompiledSchema, SchemaSource};
