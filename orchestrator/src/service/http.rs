//! The coordinator's HTTP API (JSON).
//!
//! | method and path | does | answers |
//! | --- | --- | --- |
//! | `POST /sagas` `{"type", "id"?, "data"}` | starts a saga of the newest version of `type` (`id` defaults to a new UUID v7) | 201 `{"saga_id", "type", "version"}`; 409 when the id is taken; 422 for an unknown type or data that is not an object |
//! | `GET /sagas?status=&after=&limit=` | lists sagas in id order, a page at a time (`limit` ≤ 1000, default 100) | 200 `{"sagas": [...], "next"}`; pass `next` as `after` for the next page |
//! | `GET /sagas/{id}` | the saga: type, version, state (status, data, completed steps, failure) | 200, or 404 |
//! | `GET /sagas/{id}/history` | every transition, oldest first | 200, or 404 |
//! | `POST /sagas/{id}/cancel` `{"reason"}`? | compensates what took effect (see [`Coordinator::cancel`]) | 200 `{"saga_id", "note"}`; 404; 409 with the reason when it is not running |
//! | `POST /sagas/{id}/retry` | sends a failed compensation once more ([`Coordinator::retry`]) | as cancel; 409 unless `compensation_failed` |
//! | `GET /definitions` | the loaded definitions: name, version, steps | 200 |
//! | `GET /healthz` | the process answers | 200 |
//! | `GET /readyz` | the database answers | 200, or 503 |
//! | `GET /metrics` | Prometheus text format | 200 |
//!
//! With a token configured ([`App::with_token`]), every `POST` needs
//! `Authorization: Bearer <token>` (401 otherwise); reads stay open.
//!
//! Errors are `{"error": "<message>", "code": "<code>"}`: 400 for a body
//! that is not the JSON asked for, 503 (`unavailable`) when the database
//! fails, so a client may retry.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use schemas::process::bearer_allows;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Database;
use crate::error::{Error, ErrorKind};
use crate::saga::{Coordinator, Handled};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct App {
    coordinator: Coordinator,
    database: Database,
    metrics: Option<PrometheusHandle>,
    token: Option<Arc<str>>,
}

impl App {
    /// The API over `coordinator`, answering readiness from `database`,
    /// and `/metrics` from `metrics` (the installed Prometheus recorder's
    /// handle; without one `/metrics` answers 404).
    pub fn new(
        coordinator: Coordinator,
        database: Database,
        metrics: Option<PrometheusHandle>,
    ) -> Self {
        Self {
            coordinator,
            database,
            metrics,
            token: None,
        }
    }

    /// Requires `Authorization: Bearer <token>` on every write (`POST`).
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into().into());
        self
    }
}

async fn authorize(State(app): Shared, request: Request, next: Next) -> Response {
    if !bearer_allows(app.token.as_deref(), request.method(), request.headers()) {
        let mut response = problem(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this request needs `Authorization: Bearer <token>`",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    next.run(request).await
}

/// The API's routes.
pub fn router(app: App) -> Router {
    let app = Arc::new(app);
    Router::new()
        .route("/sagas", post(start).get(list))
        .route("/sagas/{id}", get(show))
        .route("/sagas/{id}/history", get(history))
        .route("/sagas/{id}/cancel", post(cancel))
        .route("/sagas/{id}/retry", post(retry))
        .route("/definitions", get(definitions))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(app.clone(), authorize))
        .with_state(app)
}

use axum::Json;

type Shared = State<Arc<App>>;

fn problem(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Response {
    (
        status,
        Json(json!({ "error": message.to_string(), "code": code })),
    )
        .into_response()
}

/// An engine error as an HTTP answer.
fn failed(e: &Error) -> Response {
    match e.kind() {
        ErrorKind::UnknownSaga { .. } => {
            problem(StatusCode::UNPROCESSABLE_ENTITY, "unknown_saga_type", e)
        }
        ErrorKind::SagaExists { .. } => problem(StatusCode::CONFLICT, "saga_exists", e),
        ErrorKind::InvalidEvent { .. } => problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e),
        ErrorKind::Database { .. } => {
            tracing::warn!(error = %e, "database failure");
            problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e)
        }
        _ => {
            tracing::error!(error = %e, "request failed");
            problem(StatusCode::INTERNAL_SERVER_ERROR, "internal", e)
        }
    }
}

/// The body as `T`, or the 400 answer saying why not.
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(bytes).map_err(|e| {
        Box::new(problem(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the body is not the JSON expected: {e}"),
        ))
    })
}

fn not_found(id: &str) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no saga `{id}`"),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    #[serde(rename = "type")]
    saga_type: String,
    id: Option<String>,
    #[serde(default = "empty_object")]
    data: Value,
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

async fn start(State(app): Shared, bytes: Bytes) -> Response {
    let request: StartRequest = match body(&bytes) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    let id = request
        .id
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    match app
        .coordinator
        .start(&request.saga_type, &id, request.data)
        .await
    {
        Ok(()) => {
            let version = app
                .coordinator
                .definitions()
                .latest(&request.saga_type)
                .map(|d| d.version);
            (
                StatusCode::CREATED,
                Json(json!({ "saga_id": id, "type": request.saga_type, "version": version })),
            )
                .into_response()
        }
        Err(e) => failed(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(app): Shared,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "query parameters are status, after and limit (a number)",
        );
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match app
        .coordinator
        .list(q.status.as_deref(), q.after.as_deref().unwrap_or(""), limit)
        .await
    {
        Ok(sagas) => {
            let next = (sagas.len() == limit)
                .then(|| sagas.last().map(|s| s.saga_id.clone()))
                .flatten();
            Json(json!({ "sagas": sagas, "next": next })).into_response()
        }
        Err(e) => failed(&e),
    }
}

async fn show(State(app): Shared, Path(id): Path<String>) -> Response {
    match app.coordinator.saga(&id).await {
        Ok(Some(saga)) => Json(saga).into_response(),
        Ok(None) => not_found(&id),
        Err(e) => failed(&e),
    }
}

async fn history(State(app): Shared, Path(id): Path<String>) -> Response {
    match app.coordinator.history(&id).await {
        Ok(h) if h.is_empty() => not_found(&id),
        Ok(h) => Json(json!({ "saga_id": id, "history": h })).into_response(),
        Err(e) => failed(&e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelRequest {
    reason: Option<String>,
}

/// The answer to a cancel or retry: 404 when nothing changed because
/// there is no such saga.
async fn settled(app: &App, id: &str, handled: Result<Handled, Error>) -> Response {
    match handled {
        Ok(Handled::Applied(note)) => Json(json!({ "saga_id": id, "note": note })).into_response(),
        Ok(Handled::Ignored(why)) => match app.coordinator.saga(id).await {
            Ok(None) => not_found(id),
            Ok(Some(_)) => problem(StatusCode::CONFLICT, "not_applicable", why),
            Err(e) => failed(&e),
        },
        Ok(Handled::Duplicate) => problem(StatusCode::CONFLICT, "not_applicable", "already done"),
        Err(e) => failed(&e),
    }
}

async fn cancel(State(app): Shared, Path(id): Path<String>, bytes: Bytes) -> Response {
    let request: CancelRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        CancelRequest::default()
    } else {
        match body(&bytes) {
            Ok(r) => r,
            Err(answer) => return *answer,
        }
    };
    let reason = request
        .reason
        .unwrap_or_else(|| "cancelled through the API".into());
    settled(&app, &id, app.coordinator.cancel(&id, &reason).await).await
}

async fn retry(State(app): Shared, Path(id): Path<String>) -> Response {
    settled(&app, &id, app.coordinator.retry(&id).await).await
}

async fn definitions(State(app): Shared) -> Response {
    let all: Vec<Value> = app
        .coordinator
        .definitions()
        .all()
        .into_iter()
        .map(|d| {
            json!({
                "name": d.name,
                "version": d.version,
                "steps": d.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({ "definitions": all })).into_response()
}

async fn ready(State(app): Shared) -> Response {
    match app.database.ping().await {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    }
}

async fn metrics(State(app): Shared) -> Response {
    match &app.metrics {
        Some(handle) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            handle.render(),
        )
            .into_response(),
        None => problem(StatusCode::NOT_FOUND, "not_found", "no metrics recorder"),
    }
}
