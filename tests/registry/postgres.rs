//! The schema registry's store on PostgreSQL: migrations, every kind of
//! write, and the state read back by a second registry on the same database.
//!
//! Never skips: without PostgreSQL (`DATABASE_URL`) the test fails.

use anyhow::Context as _;
use e2e::Server;
use schemas::{CompatibilityLevel, Registry, RegistryOptions, Store, VersionSpec};

#[tokio::test]
async fn registry_on_postgres() -> anyhow::Result<()> {
    let url = e2e::require(Server::Postgres)?;
    let schema = e2e::unique_name("registry");
    let admin = sqlx::PgPool::connect(&url)
        .await
        .map_err(|e| Server::Postgres.unreachable(e))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await?;
    let separator = if url.contains('?') { '&' } else { '?' };
    let scoped = format!("{url}{separator}options=-c%20search_path%3D{schema}");

    let store = Store::connect(&scoped)
        .await
        .context("connecting the registry store")?;
    let registry = Registry::open(store.clone(), RegistryOptions::default()).await?;
    let v1 = r#"{"type":"object","properties":{"a":{"type":"string"}}}"#;
    let v2 = r#"{"type":"object","properties":{"a":{"type":"string"},"b":{"type":"integer"}}}"#;
    assert_eq!(registry.register("s", v1).await?.id, 1);
    assert_eq!(registry.register("s", v2).await?.version, 2);
    assert_eq!(registry.register("t", v2).await?.id, 2);
    registry
        .set_compatibility(None, CompatibilityLevel::Full)
        .await?;
    registry
        .set_compatibility(Some("t"), CompatibilityLevel::None)
        .await?;
    registry
        .delete_version("s", VersionSpec::Number(1), false)
        .await?;
    registry.delete_subject("t", false).await?;
    registry.delete_subject("t", true).await?;

    // A second registry (another process, say) on the same database sees it all.
    let store2 = Store::connect(&scoped).await?;
    let reopened = Registry::open(store2.clone(), RegistryOptions::default()).await?;
    assert_eq!(reopened.subjects(true)?, vec!["s".to_owned()]);
    assert_eq!(reopened.versions("s", false)?, vec![2]);
    assert_eq!(reopened.versions("s", true)?, vec![1, 2]);
    assert_eq!(reopened.global_compatibility()?, CompatibilityLevel::Full);
    assert_eq!(reopened.subject_compatibility("t")?, None);
    assert_eq!(reopened.schema_text(1)?, registry.schema_text(1)?);
    assert_eq!(reopened.register("u", r#"{"type":"null"}"#).await?.id, 3);
    // Migrations are applied once: connecting again is fine.
    Store::connect(&scoped).await?.close().await;

    store.close().await;
    store2.close().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&admin)
        .await?;
    Ok(())
}
