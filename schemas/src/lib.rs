//! Event contracts.
pub mod compat;
pub mod config;
pub mod error;
pub mod registry;
pub mod server;
pub mod store;
pub mod validate;

pub use crate::compat::CompatibilityLevel;
pub use crate::error::{Error, ErrorKind, Result};
pub use crate::registry::{
    Registry, RegistryOptions, SubjectVersion, VersionSpec, canonical_json, schema_for,
};
pub use crate::store::Store;
pub use crate::validate::{CompiledSchema, SchemaSource};
