//! Durable storage of the registry on sqlx: SQLite (the default) or
//! PostgreSQL, with embedded migrations.
//!
//! The registry keeps its whole state in memory and writes every change
//! through to the store before it becomes visible; on start it loads the
//! state back. Three tables: `registry_schemas` (id, canonical text),
//! `registry_versions` (subject, version, schema id, soft-deleted flag) and
//! `registry_config` (subject, or the empty string for the global level).

use std::borrow::Cow;
use std::str::FromStr;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{Row, SqlSafeStr as _};

use crate::error::{Error, Result};

/// The table sqlx records applied migrations in.
pub const MIGRATIONS_TABLE: &str = "registry_migrations";

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "registry",
    include_str!("../migrations/sqlite/0001_registry.sql"),
)];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "registry",
    include_str!("../migrations/postgres/0001_registry.sql"),
)];

fn migrator(files: &[(i64, &'static str, &'static str)]) -> Migrator {
    let migrations = files
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(
                *version,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

/// A connection pool to the registry's database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// One stored subject version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VersionRow {
    pub(crate) subject: String,
    pub(crate) version: u32,
    pub(crate) schema_id: u32,
    pub(crate) deleted: bool,
}

/// Everything the store holds.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) schemas: Vec<(u32, String)>,
    pub(crate) versions: Vec<VersionRow>,
    pub(crate) config: Vec<(String, String)>,
}

/// A value bound to a statement.
enum Arg<'a> {
    Int(i64),
    Text(&'a str),
}

impl Store {
    /// Connects to `url` (`sqlite:path`, `sqlite::memory:`, `postgres://...`)
    /// and applies the migrations. A SQLite file is created when missing.
    ///
    /// # Errors
    ///
    /// The URL is not understood, the database cannot be reached, or a
    /// migration fails.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .connect(url)
                .await
                .map_err(|e| Error::store("connect", e))?;
            migrator(POSTGRES_MIGRATIONS)
                .run(&pool)
                .await
                .map_err(|e| Error::store("migrate", e))?;
            Pool::Postgres(pool)
        } else if url.starts_with("sqlite:") {
            let memory = url.contains(":memory:");
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| Error::store("connect", e))?
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .busy_timeout(std::time::Duration::from_secs(5));
            let pool = SqlitePoolOptions::new()
                // No ping when a connection is taken (it lives in this
                // process); nor can a cancelled acquire then drop the one
                // connection of an in-memory database.
                .test_before_acquire(false)
                // One connection keeps an in-memory database alive and shared.
                .max_connections(if memory { 1 } else { 4 })
                .connect_with(options)
                .await
                .map_err(|e| Error::store("connect", e))?;
            migrator(SQLITE_MIGRATIONS)
                .run(&pool)
                .await
                .map_err(|e| Error::store("migrate", e))?;
            Pool::Sqlite(pool)
        } else {
            return Err(Error::new(crate::error::ErrorKind::Config {
                key: "database_url".into(),
                reason: format!("`{url}` is neither a sqlite: nor a postgres:// URL"),
            }));
        };
        Ok(Self { pool })
    }

    /// Closes the pool.
    pub async fn close(&self) {
        match &self.pool {
            Pool::Sqlite(p) => p.close().await,
            Pool::Postgres(p) => p.close().await,
        }
    }

    async fn exec(
        &self,
        operation: &'static str,
        statements: &[(&str, Vec<Arg<'_>>)],
    ) -> Result<()> {
        match &self.pool {
            Pool::Sqlite(pool) => {
                let mut tx = pool.begin().await.map_err(|e| Error::store(operation, e))?;
                for (sql, args) in statements {
                    let sql = sql.replace('$', "?");
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                    for a in args {
                        q = match a {
                            Arg::Int(i) => q.bind(*i),
                            Arg::Text(t) => q.bind(t.to_string()),
                        };
                    }
                    q.execute(&mut *tx)
                        .await
                        .map_err(|e| Error::store(operation, e))?;
                }
                tx.commit().await.map_err(|e| Error::store(operation, e))
            }
            Pool::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(|e| Error::store(operation, e))?;
                for (sql, args) in statements {
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()));
                    for a in args {
                        q = match a {
                            Arg::Int(i) => q.bind(*i),
                            Arg::Text(t) => q.bind(t.to_string()),
                        };
                    }
                    q.execute(&mut *tx)
                        .await
                        .map_err(|e| Error::store(operation, e))?;
                }
                tx.commit().await.map_err(|e| Error::store(operation, e))
            }
        }
    }

    /// Loads everything.
    pub(crate) async fn load(&self) -> Result<Snapshot> {
        const SCHEMAS: &str = "SELECT id, canonical FROM registry_schemas ORDER BY id";
        const VERSIONS: &str = "SELECT subject, version, schema_id, deleted FROM registry_versions ORDER BY subject, version";
        const CONFIG: &str = "SELECT subject, level FROM registry_config";
        let e = |e| Error::store("load", e);
        let mut snapshot = Snapshot::default();
        macro_rules! read {
            ($pool:expr) => {{
                for row in sqlx::query(SCHEMAS).fetch_all($pool).await.map_err(e)? {
                    let id: i64 = row.try_get(0).map_err(e)?;
                    snapshot
                        .schemas
                        .push((to_u32(id)?, row.try_get(1).map_err(e)?));
                }
                for row in sqlx::query(VERSIONS).fetch_all($pool).await.map_err(e)? {
                    let version: i64 = row.try_get(1).map_err(e)?;
                    let id: i64 = row.try_get(2).map_err(e)?;
                    let deleted: i64 = row.try_get(3).map_err(e)?;
                    snapshot.versions.push(VersionRow {
                        subject: row.try_get(0).map_err(e)?,
                        version: to_u32(version)?,
                        schema_id: to_u32(id)?,
                        deleted: deleted != 0,
                    });
                }
                for row in sqlx::query(CONFIG).fetch_all($pool).await.map_err(e)? {
                    snapshot
                        .config
                        .push((row.try_get(0).map_err(e)?, row.try_get(1).map_err(e)?));
                }
            }};
        }
        match &self.pool {
            Pool::Sqlite(pool) => read!(pool),
            Pool::Postgres(pool) => read!(pool),
        }
        Ok(snapshot)
    }

    /// Records a new version, and its schema when `new_schema` is set.
    pub(crate) async fn insert_version(
        &self,
        row: &VersionRow,
        new_schema: Option<&str>,
    ) -> Result<()> {
        let mut statements = Vec::new();
        if let Some(canonical) = new_schema {
            statements.push((
                "INSERT INTO registry_schemas (id, canonical) VALUES ($1, $2)",
                vec![Arg::Int(row.schema_id.into()), Arg::Text(canonical)],
            ));
        }
        statements.push((
            "INSERT INTO registry_versions (subject, version, schema_id, deleted) VALUES ($1, $2, $3, 0)",
            vec![
                Arg::Text(&row.subject),
                Arg::Int(row.version.into()),
                Arg::Int(row.schema_id.into()),
            ],
        ));
        self.exec("register", &statements).await
    }

    /// Soft-deletes versions of a subject.
    pub(crate) async fn soft_delete(&self, subject: &str, versions: &[u32]) -> Result<()> {
        let statements: Vec<_> = versions
            .iter()
            .map(|v| {
                (
                    "UPDATE registry_versions SET deleted = 1 WHERE subject = $1 AND version = $2",
                    vec![Arg::Text(subject), Arg::Int((*v).into())],
                )
            })
            .collect();
        self.exec("soft delete", &statements).await
    }

    /// Removes versions of a subject for good.
    pub(crate) async fn hard_delete(&self, subject: &str, versions: &[u32]) -> Result<()> {
        let statements: Vec<_> = versions
            .iter()
            .map(|v| {
                (
                    "DELETE FROM registry_versions WHERE subject = $1 AND version = $2",
                    vec![Arg::Text(subject), Arg::Int((*v).into())],
                )
            })
            .collect();
        self.exec("hard delete", &statements).await
    }

    /// Sets the level of a subject, or the global one for `""`.
    pub(crate) async fn set_config(&self, subject: &str, level: &str) -> Result<()> {
        self.exec(
            "set config",
            &[
                (
                    "DELETE FROM registry_config WHERE subject = $1",
                    vec![Arg::Text(subject)],
                ),
                (
                    "INSERT INTO registry_config (subject, level) VALUES ($1, $2)",
                    vec![Arg::Text(subject), Arg::Text(level)],
                ),
            ],
        )
        .await
    }

    /// Removes the level of a subject.
    pub(crate) async fn delete_config(&self, subject: &str) -> Result<()> {
        self.exec(
            "delete config",
            &[(
                "DELETE FROM registry_config WHERE subject = $1",
                vec![Arg::Text(subject)],
            )],
        )
        .await
    }
}

fn to_u32(v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|e| Error::store("load", e))
}
