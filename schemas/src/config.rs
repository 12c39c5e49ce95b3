//! Configuration of the `schema-registry` binary: a TOML file, then
//! `SCHEMA_REGISTRY_*` environment variables and command-line flags over it.
//!
//! ```toml
//! listen = "127.0.0.1:8081"            # SCHEMA_REGISTRY_LISTEN
//! database_url = "sqlite:registry.db"  # SCHEMA_REGISTRY_DATABASE_URL (or postgres://...)
//! base_url = "http://127.0.0.1:8081"   # SCHEMA_REGISTRY_BASE_URL: put into schema URLs
//! max_schema_bytes = 1048576           # SCHEMA_REGISTRY_MAX_SCHEMA_BYTES
//! compatibility = "BACKWARD"           # SCHEMA_REGISTRY_COMPATIBILITY: global default
//! token = "secret"                     # SCHEMA_REGISTRY_TOKEN: bearer token for writes
//! ```

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use crate::compat::CompatibilityLevel;
use crate::error::{Error, ErrorKind, Result};
use crate::registry::{DEFAULT_MAX_SCHEMA_BYTES, RegistryOptions};

/// Where the registry listens when nothing else is configured: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";

/// The database when nothing else is configured.
pub const DEFAULT_DATABASE_URL: &str = "sqlite:schema-registry.db";

/// The settings of a registry server; every field is optional in a file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The address to listen on.
    pub listen: Option<String>,
    /// `sqlite:path`, `sqlite::memory:` or `postgres://...`.
    pub database_url: Option<String>,
    /// The URL clients reach the registry at.
    pub base_url: Option<String>,
    /// The largest schema accepted, in bytes.
    pub max_schema_bytes: Option<usize>,
    /// The global compatibility level until one is set through the API.
    pub compatibility: Option<String>,
    /// The bearer token writes need; writes are open without one.
    pub token: Option<String>,
}

fn config_error(key: &str, reason: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config {
        key: key.to_owned(),
        reason: reason.into(),
    })
}

impl Config {
    /// Parses a TOML document.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] when it is not valid TOML or has unknown keys.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| config_error("file", e.to_string()))
    }

    /// Reads a TOML file.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] when it cannot be read or parsed.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| config_error("file", format!("{}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// `SCHEMA_REGISTRY_*` variables, through `get` (e.g. `std::env::var`).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] when `SCHEMA_REGISTRY_MAX_SCHEMA_BYTES` is not a number.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |name: &str| get(&format!("SCHEMA_REGISTRY_{name}")).filter(|v| !v.is_empty());
        let max_schema_bytes = var("MAX_SCHEMA_BYTES")
            .map(|v| {
                v.parse()
                    .map_err(|_| config_error("SCHEMA_REGISTRY_MAX_SCHEMA_BYTES", "not a number"))
            })
            .transpose()?;
        Ok(Self {
            listen: var("LISTEN"),
            database_url: var("DATABASE_URL"),
            base_url: var("BASE_URL"),
            max_schema_bytes,
            compatibility: var("COMPATIBILITY"),
            token: var("TOKEN"),
        })
    }

    /// `self`, with every setting `over` has replacing it.
    #[must_use]
    pub fn overlay(self, over: Config) -> Config {
        Config {
            listen: over.listen.or(self.listen),
            database_url: over.database_url.or(self.database_url),
            base_url: over.base_url.or(self.base_url),
            max_schema_bytes: over.max_schema_bytes.or(self.max_schema_bytes),
            compatibility: over.compatibility.or(self.compatibility),
            token: over.token.or(self.token),
        }
    }

    /// The address to listen on.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] when it is not `ip:port`.
    pub fn listen_addr(&self) -> Result<SocketAddr> {
        let listen = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        listen
            .parse()
            .map_err(|_| config_error("listen", format!("`{listen}` is not ip:port")))
    }

    /// The database URL.
    pub fn database_url(&self) -> &str {
        self.database_url.as_deref().unwrap_or(DEFAULT_DATABASE_URL)
    }

    /// The registry options this configuration asks for, `listen` being
    /// the address actually bound (for the default base URL).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for an unknown compatibility level or a zero size limit.
    pub fn registry_options(&self, listen: SocketAddr) -> Result<RegistryOptions> {
        let default_level = match &self.compatibility {
            Some(level) => level
                .parse::<CompatibilityLevel>()
                .map_err(|e| config_error("compatibility", e.to_string()))?,
            None => CompatibilityLevel::Backward,
        };
        let max_schema_bytes = self.max_schema_bytes.unwrap_or(DEFAULT_MAX_SCHEMA_BYTES);
        if max_schema_bytes == 0 {
            return Err(config_error("max_schema_bytes", "must be positive"));
        }
        Ok(RegistryOptions {
            max_schema_bytes,
            base_url: self
                .base_url
                .clone()
                .unwrap_or_else(|| format!("http://{listen}")),
            default_level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_then_flags() -> Result<()> {
        let file = Config::from_toml(
            "listen = \"127.0.0.1:9000\"\ntoken = \"a\"\nmax_schema_bytes = 10\n",
        )?;
        let env = Config::from_env(|k| (k == "SCHEMA_REGISTRY_TOKEN").then(|| "b".to_owned()))?;
        let config = file.overlay(env);
        assert_eq!(config.token.as_deref(), Some("b"));
        assert_eq!(config.listen_addr()?.port(), 9000);
        let options = config.registry_options(config.listen_addr()?)?;
        assert_eq!(options.max_schema_bytes, 10);
        assert_eq!(options.base_url, "http://127.0.0.1:9000");
        assert!(Config::from_toml("nope = 1").is_err());
        assert!(Config::default().listen_addr()?.ip().is_loopback());
        let bad = Config {
            compatibility: Some("SIDEWAYS".into()),
            ..Config::default()
        };
        assert!(bad.registry_options(bad.listen_addr()?).is_err());
        Ok(())
    }
}
