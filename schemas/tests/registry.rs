//! The registry's semantics, in memory and on SQLite.

use schemas::{CompatibilityLevel, ErrorKind, Registry, RegistryOptions, Store, VersionSpec};

const V1: &str =
    r#"{"type":"object","properties":{"order":{"type":"string"}},"required":["order"]}"#;
const V1_REORDERED: &str = r#"{ "required": ["order"], "properties": { "order": { "type": "string" } }, "type": "object" }"#;
const V2: &str = r#"{"type":"object","properties":{"order":{"type":"string"},"total":{"type":"number"}},"required":["order"]}"#;
const V3_BREAKING: &str = r#"{"type":"object","properties":{"order":{"type":"string"},"total":{"type":"number"}},"required":["order","total"]}"#;

fn kind(result: schemas::Result<impl std::fmt::Debug>) -> ErrorKind {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.kind().clone(),
    }
}

async fn semantics(registry: &Registry) -> schemas::Result<()> {
    let s = "com.example.order.placed";
    let a = registry.register(s, V1).await?;
    assert_eq!((a.id, a.version), (1, 1));
    // Same text, differently written: same id, same version.
    let again = registry.register(s, V1_REORDERED).await?;
    assert_eq!((again.id, again.version), (1, 1));
    // Same schema under another subject: same id, its own version 1.
    let other = registry.register("other", V1_REORDERED).await?;
    assert_eq!((other.id, other.version), (1, 1));
    let b = registry.register(s, V2).await?;
    assert_eq!((b.id, b.version), (2, 2));
    assert_eq!(registry.versions(s, false)?, vec![1, 2]);
    assert_eq!(registry.version(s, VersionSpec::Latest)?.id, 2);
    assert_eq!(registry.lookup(s, V1_REORDERED)?.version, 1);
    assert_eq!(
        registry.schema_versions(1)?,
        vec![("com.example.order.placed".into(), 1), ("other".into(), 1)]
    );

    // Incompatible under BACKWARD; fine under NONE for this subject only.
    assert!(matches!(
        kind(registry.register(s, V3_BREAKING).await),
        ErrorKind::Incompatible { .. }
    ));
    registry
        .set_compatibility(Some(s), CompatibilityLevel::None)
        .await?;
    assert_eq!(registry.compatibility(s)?, CompatibilityLevel::None);
    assert_eq!(
        registry.compatibility("other")?,
        CompatibilityLevel::Backward
    );
    let c = registry.register(s, V3_BREAKING).await?;
    assert_eq!((c.id, c.version), (3, 3));
    assert_eq!(
        registry.delete_compatibility(s).await?,
        CompatibilityLevel::None
    );
    registry
        .set_compatibility(None, CompatibilityLevel::Full)
        .await?;
    assert_eq!(registry.compatibility(s)?, CompatibilityLevel::Full);

    // Errors.
    assert!(matches!(
        kind(registry.version("nope", VersionSpec::Latest)),
        ErrorKind::SubjectNotFound { .. }
    ));
    assert!(matches!(
        kind(registry.version(s, VersionSpec::Number(9))),
        ErrorKind::VersionNotFound { .. }
    ));
    assert!(matches!(
        kind(registry.schema(99)),
        ErrorKind::SchemaNotFound { .. }
    ));
    assert!(matches!(
        kind(registry.lookup(s, r#"{"type":"null"}"#)),
        ErrorKind::SchemaNotFound { .. }
    ));
    assert!(matches!(
        kind(registry.register(s, "{not json").await),
        ErrorKind::InvalidSchema { .. }
    ));
    assert!(matches!(
        kind(registry.register(s, r#"{"type": 12}"#).await),
        ErrorKind::InvalidSchema { .. }
    ));
    assert!(matches!(
        kind(
            registry
                .register(s, r#"{"$ref": "https://example.invalid/s.json"}"#)
                .await
        ),
        ErrorKind::InvalidSchema { .. }
    ));
    assert!(matches!(
        kind("0".parse::<VersionSpec>()),
        ErrorKind::InvalidVersion { .. }
    ));

    // Deletes: a version, softly then for good.
    assert!(matches!(
        kind(
            registry
                .delete_version(s, VersionSpec::Number(3), true)
                .await
        ),
        ErrorKind::VersionNotSoftDeleted { .. }
    ));
    assert_eq!(
        registry
            .delete_version(s, VersionSpec::Number(3), false)
            .await?,
        3
    );
    assert_eq!(registry.versions(s, false)?, vec![1, 2]);
    assert_eq!(registry.versions(s, true)?, vec![1, 2, 3]);
    // Validation follows the latest live version.
    assert_eq!(registry.latest_compiled(s)?.version(), Some(2));
    assert!(matches!(
        kind(registry.version(s, VersionSpec::Number(3))),
        ErrorKind::VersionNotFound { .. }
    ));
    assert_eq!(
        registry
            .delete_version(s, VersionSpec::Number(3), true)
            .await?,
        3
    );
    assert_eq!(registry.versions(s, true)?, vec![1, 2]);
    // The schema itself stays reachable by id.
    assert_eq!(registry.schema(3)?.id(), 3);

    // A subject: hard delete only after a soft one.
    assert!(matches!(
        kind(registry.delete_subject(s, true).await),
        ErrorKind::SubjectNotSoftDeleted { .. }
    ));
    assert_eq!(registry.delete_subject(s, false).await?, vec![1, 2]);
    assert!(matches!(
        kind(registry.delete_subject(s, false).await),
        ErrorKind::SubjectSoftDeleted { .. }
    ));
    assert!(matches!(
        kind(registry.version(s, VersionSpec::Latest)),
        ErrorKind::SubjectNotFound { .. }
    ));
    assert!(matches!(
        kind(registry.latest_compiled(s)),
        ErrorKind::SubjectNotFound { .. }
    ));
    assert_eq!(registry.subjects(false)?, vec!["other".to_owned()]);
    assert_eq!(registry.subjects(true)?.len(), 2);
    assert_eq!(registry.delete_subject(s, true).await?, vec![1, 2]);
    assert_eq!(registry.subjects(true)?, vec!["other".to_owned()]);
    // Registering again starts over at version 1, with the old id.
    let fresh = registry.register(s, V2).await?;
    assert_eq!((fresh.id, fresh.version), (2, 1));
    Ok(())
}

#[tokio::test]
async fn in_memory() -> schemas::Result<()> {
    semantics(&Registry::in_memory()).await
}

#[tokio::test]
async fn on_sqlite_and_reopened() -> schemas::Result<()> {
    let dir = std::env::temp_dir().join(format!("registry-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| schemas::Error::with_source(ErrorKind::Store { operation: "mkdir" }, e))?;
    let url = format!("sqlite:{}", dir.join("registry.db").display());
    let store = Store::connect(&url).await?;
    let registry = Registry::open(store.clone(), RegistryOptions::default()).await?;
    semantics(&registry).await?;
    store.close().await;

    // Everything is back after a restart (migrations applied once).
    let store = Store::connect(&url).await?;
    let reopened = Registry::open(store.clone(), RegistryOptions::default()).await?;
    assert_eq!(reopened.subjects(true)?, registry.subjects(true)?);
    assert_eq!(
        reopened.versions("com.example.order.placed", true)?,
        vec![1]
    );
    assert_eq!(reopened.versions("other", false)?, vec![1]);
    assert_eq!(reopened.global_compatibility()?, CompatibilityLevel::Full);
    assert_eq!(reopened.schema_text(3)?, registry.schema_text(3)?);
    // New ids continue after the stored ones.
    let next = reopened.register("third", r#"{"type":"string"}"#).await?;
    assert_eq!(next.id, 4);
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn size_limit() -> schemas::Result<()> {
    let registry = Registry::with_options(RegistryOptions {
        max_schema_bytes: 64,
        ..RegistryOptions::default()
    });
    let big = format!(r#"{{"type":"string","description":"{}"}}"#, "x".repeat(100));
    let error = registry.register("s", &big).await.expect_err("fails");
    assert!(matches!(
        error.kind(),
        ErrorKind::SchemaTooLarge { limit: 64, .. }
    ));
    assert_eq!((error.error_code(), error.http_status()), (42201, 413));
    Ok(())
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
#[allow(dead_code)]
struct OrderPlaced {
    order: String,
    total: f64,
    lines: Vec<Line>,
}

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
#[allow(dead_code)]
struct Line {
    sku: String,
    quantity: u32,
}

#[tokio::test]
async fn contracts_from_rust_types() -> schemas::Result<()> {
    let registry = Registry::in_memory();
    let registered = registry
        .register_type::<OrderPlaced>("com.example.order.placed")
        .await?;
    let schema = registry.schema(registered.id)?;
    let good = serde_json::to_value(OrderPlaced {
        order: "o-1".into(),
        total: 12.5,
        lines: vec![Line {
            sku: "a".into(),
            quantity: 2,
        }],
    })
    .map_err(|e| schemas::Error::with_source(ErrorKind::Store { operation: "json" }, e))?;
    schema.validate(&good)?;
    let bad =
        serde_json::json!({"order": "o-1", "total": 1, "lines": [{"sku": "a", "quantity": -1}]});
    let error = schema.validate(&bad).expect_err("fails");
    assert!(error.to_string().contains("/lines/0/quantity"), "{error}");
    // Registering the same type again is a no-op.
    assert_eq!(
        registry
            .register_type::<OrderPlaced>("com.example.order.placed")
            .await?
            .version,
        1
    );
    Ok(())
}
