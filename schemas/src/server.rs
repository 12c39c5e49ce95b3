//! The Confluent Schema Registry REST API over a [`Registry`], on axum.
//!
//! | method | path | does |
//! | --- | --- | --- |
//! | GET | `/subjects` | live subjects (`?deleted=true`: soft-deleted too) |
//! | GET, POST | `/subjects/{s}/versions` | versions; register (`{"schema": "...", "schemaType": "JSON"}`) |
//! | GET, DELETE | `/subjects/{s}/versions/{v}` | one version (`latest` too); delete it (`?permanent=true`) |
//! | GET | `/subjects/{s}/versions/{v}/schema` | the raw schema |
//! | POST, DELETE | `/subjects/{s}` | look a schema up under the subject; delete the subject |
//! | GET | `/schemas/ids/{id}` (`/schema`, `/versions`, `/subjects`) | a schema by global id |
//! | GET | `/schemas/types` | `["JSON"]` |
//! | POST | `/compatibility/subjects/{s}/versions/{v}` (and `/versions`) | `{"is_compatible": ..}`, with `messages` when `?verbose=true` |
//! | GET, PUT | `/config` | the global level |
//! | GET, PUT, DELETE | `/config/{s}` | a subject's level (`?defaultToGlobal=true` falls back) |
//! | GET | `/health` | `{"status": "UP"}` |
//!
//! Errors are `{"error_code": .., "message": ..}` with Confluent's codes
//! (see [`Error::error_code`]). Requests may be `application/json` or
//! `application/vnd.schemaregistry.v1+json`; answers are the latter. With a
//! token configured, every POST, PUT and DELETE needs
//! `Authorization: Bearer <token>`; reads stay open.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::compat::CompatibilityLevel;
use crate::error::{Error, ErrorKind};
use crate::process::bearer_allows;
use crate::registry::{Registry, SCHEMA_TYPE_JSON, VersionSpec};

/// The content type of every answer.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Settings of the HTTP server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// The bearer token writes need; `None` leaves writes open.
    pub token: Option<String>,
}

#[derive(Debug, Clone)]
struct AppState {
    registry: Registry,
    token: Option<Arc<str>>,
    body_limit: usize,
}

/// An [`Error`] as an HTTP answer.
#[derive(Debug)]
struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

impl From<ErrorKind> for ApiError {
    fn from(kind: ErrorKind) -> Self {
        Self(Error::new(kind))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = ?self.0, "request failed");
        }
        reply(
            status,
            json!({ "error_code": self.0.error_code(), "message": self.0.to_string() }),
        )
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

fn ok(body: Value) -> Result<Response, ApiError> {
    Ok(reply(StatusCode::OK, body))
}

type Params = Query<HashMap<String, String>>;

fn flag(params: &HashMap<String, String>, name: &str) -> bool {
    params
        .get(name)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

#[derive(Debug, Deserialize)]
struct SchemaRequest {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Value>,
}

fn body_error(rejection: BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ErrorKind::RequestTooLarge { limit }.into();
    }
    ErrorKind::BadRequest {
        reason: rejection.body_text(),
    }
    .into()
}

fn schema_request(
    app: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<SchemaRequest, ApiError> {
    let body = body.map_err(|r| body_error(r, app.body_limit))?;
    let request: SchemaRequest =
        serde_json::from_slice(&body).map_err(|e| ErrorKind::BadRequest {
            reason: format!("invalid request body: {e}"),
        })?;
    if let Some(t) = &request.schema_type
        && !t.eq_ignore_ascii_case(SCHEMA_TYPE_JSON)
    {
        return Err(ErrorKind::UnsupportedSchemaType {
            schema_type: t.clone(),
        }
        .into());
    }
    if request.schema_type.is_none() {
        // The registry's own default type is AVRO: a request without a type
        // is an Avro schema, which this registry does not serve.
        return Err(ErrorKind::UnsupportedSchemaType {
            schema_type: "AVRO".into(),
        }
        .into());
    }
    if !request.references.is_empty() {
        return Err(Error::invalid_schema("schema references are not supported").into());
    }
    Ok(request)
}

fn version(s: &str) -> Result<VersionSpec, ApiError> {
    Ok(s.parse::<VersionSpec>()?)
}

fn schema_id(s: &str) -> Result<u32, ApiError> {
    s.parse::<u32>()
        .map_err(|_| ErrorKind::SchemaNotFound { what: s.to_owned() }.into())
}

async fn list_subjects(
    State(app): State<AppState>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    ok(json!(app.registry.subjects(flag(&q, "deleted"))?))
}

async fn list_versions(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    ok(json!(app.registry.versions(&subject, flag(&q, "deleted"))?))
}

async fn register(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = schema_request(&app, body)?;
    let registered = app.registry.register(&subject, &request.schema).await?;
    ok(json!({
        "id": registered.id,
        "subject": registered.subject,
        "version": registered.version,
        "schemaType": SCHEMA_TYPE_JSON,
        "schema": registered.schema,
    }))
}

async fn get_version(
    State(app): State<AppState>,
    Path((subject, v)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    ok(json!(app.registry.version(&subject, version(&v)?)?))
}

async fn get_version_schema(
    State(app): State<AppState>,
    Path((subject, v)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let found = app.registry.version(&subject, version(&v)?)?;
    Ok(reply(
        StatusCode::OK,
        serde_json::from_str(&found.schema).unwrap_or(Value::Null),
    ))
}

async fn referenced_by(
    State(app): State<AppState>,
    Path((subject, v)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    app.registry.version(&subject, version(&v)?)?;
    ok(json!([]))
}

async fn delete_version(
    State(app): State<AppState>,
    Path((subject, v)): Path<(String, String)>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let deleted = app
        .registry
        .delete_version(&subject, version(&v)?, flag(&q, "permanent"))
        .await?;
    ok(json!(deleted))
}

async fn lookup(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = schema_request(&app, body)?;
    ok(json!(app.registry.lookup(&subject, &request.schema)?))
}

async fn delete_subject(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    ok(json!(
        app.registry
            .delete_subject(&subject, flag(&q, "permanent"))
            .await?
    ))
}

async fn schema_by_id(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = schema_id(&id)?;
    ok(json!({ "schema": app.registry.schema_text(id)?, "schemaType": SCHEMA_TYPE_JSON }))
}

async fn schema_by_id_raw(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let compiled = app.registry.schema(schema_id(&id)?)?;
    Ok(reply(StatusCode::OK, compiled.schema().clone()))
}

async fn schema_id_versions(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let pairs = app.registry.schema_versions(schema_id(&id)?)?;
    ok(Value::Array(
        pairs
            .into_iter()
            .map(|(subject, version)| json!({ "subject": subject, "version": version }))
            .collect(),
    ))
}

async fn schema_id_subjects(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut subjects: Vec<String> = app
        .registry
        .schema_versions(schema_id(&id)?)?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    subjects.dedup();
    ok(json!(subjects))
}

async fn schema_types() -> Result<Response, ApiError> {
    ok(json!([SCHEMA_TYPE_JSON]))
}

fn compatibility_answer(messages: Vec<String>, verbose: bool) -> Result<Response, ApiError> {
    if verbose {
        ok(json!({ "is_compatible": messages.is_empty(), "messages": messages }))
    } else {
        ok(json!({ "is_compatible": messages.is_empty() }))
    }
}

async fn check_version(
    State(app): State<AppState>,
    Path((subject, v)): Path<(String, String)>,
    Query(q): Params,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let spec = version(&v)?;
    let request = schema_request(&app, body)?;
    let messages = app
        .registry
        .check_compatibility(&subject, spec, &request.schema)?;
    compatibility_answer(messages, flag(&q, "verbose"))
}

async fn check_all(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    Query(q): Params,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = schema_request(&app, body)?;
    let value = app.registry.parse_schema(&request.schema)?;
    let messages = match app
        .registry
        .check_value(&subject, VersionSpec::Latest, &value)
    {
        // Nothing to be incompatible with.
        Err(e) if matches!(e.kind(), ErrorKind::SubjectNotFound { .. }) => Vec::new(),
        other => other?,
    };
    compatibility_answer(messages, flag(&q, "verbose"))
}

#[derive(Debug, Deserialize)]
struct ConfigRequest {
    compatibility: Option<String>,
    #[serde(rename = "compatibilityLevel")]
    compatibility_level: Option<String>,
}

fn level_request(
    app: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<CompatibilityLevel, ApiError> {
    let body = body.map_err(|r| body_error(r, app.body_limit))?;
    let request: ConfigRequest =
        serde_json::from_slice(&body).map_err(|e| ErrorKind::BadRequest {
            reason: format!("invalid request body: {e}"),
        })?;
    let level = request
        .compatibility
        .or(request.compatibility_level)
        .ok_or_else(|| ErrorKind::InvalidCompatibilityLevel {
            level: "(none)".into(),
        })?;
    Ok(level.parse()?)
}

async fn get_global_config(State(app): State<AppState>) -> Result<Response, ApiError> {
    ok(json!({ "compatibilityLevel": app.registry.global_compatibility()? }))
}

async fn put_global_config(
    State(app): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let level = level_request(&app, body)?;
    app.registry.set_compatibility(None, level).await?;
    ok(json!({ "compatibility": level }))
}

async fn get_subject_config(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let level = match app.registry.subject_compatibility(&subject)? {
        Some(level) => level,
        None if flag(&q, "defaultToGlobal") => app.registry.global_compatibility()?,
        None => return Err(ErrorKind::SubjectLevelNotConfigured { subject }.into()),
    };
    ok(json!({ "compatibilityLevel": level }))
}

async fn put_subject_config(
    State(app): State<AppState>,
    Path(subject): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let level = level_request(&app, body)?;
    app.registry
        .set_compatibility(Some(&subject), level)
        .await?;
    ok(json!({ "compatibility": level }))
}

async fn delete_subject_config(
    State(app): State<AppState>,
    Path(subject): Path<String>,
) -> Result<Response, ApiError> {
    let level = app.registry.delete_compatibility(&subject).await?;
    ok(json!({ "compatibilityLevel": level }))
}

async fn health() -> Result<Response, ApiError> {
    ok(json!({ "status": "UP" }))
}

async fn root() -> Result<Response, ApiError> {
    ok(json!({}))
}

async fn not_found() -> Response {
    reply(
        StatusCode::NOT_FOUND,
        json!({ "error_code": 404, "message": "HTTP 404 Not Found" }),
    )
}

async fn authorize(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if !bearer_allows(app.token.as_deref(), request.method(), request.headers()) {
        let mut response = ApiError(Error::new(ErrorKind::Unauthorized)).into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    next.run(request).await
}

/// The REST API over `registry`, as an axum [`Router`].
pub fn router(registry: Registry, options: ServerOptions) -> Router {
    // Room for the schema escaped inside the JSON request, plus the envelope.
    let body_limit = registry
        .options()
        .max_schema_bytes
        .saturating_mul(2)
        .saturating_add(64 * 1024);
    let state = AppState {
        registry,
        token: options.token.map(Into::into),
        body_limit,
    };
    Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route(
            "/subjects/{subject}/versions",
            get(list_versions).post(register),
        )
        .route(
            "/subjects/{subject}/versions/{version}",
            get(get_version).delete(delete_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(get_version_schema),
        )
        .route(
            "/subjects/{subject}/versions/{version}/referencedby",
            get(referenced_by),
        )
        .route("/schemas/types", get(schema_types))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(schema_by_id_raw))
        .route("/schemas/ids/{id}/versions", get(schema_id_versions))
        .route("/schemas/ids/{id}/subjects", get(schema_id_subjects))
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(check_all),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(check_version),
        )
        .route("/config", get(get_global_config).put(put_global_config))
        .route(
            "/config/{subject}",
            get(get_subject_config)
                .put(put_subject_config)
                .delete(delete_subject_config),
        )
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes.
///
/// # Errors
///
/// The listener failed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
