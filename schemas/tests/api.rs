//! The REST API over HTTP on a loopback port: routes, error bodies and
//! codes, auth, content types, limits; and the HTTP client with its cache.

use std::sync::Arc;

use schemas::server::{ServerOptions, router, serve};
use schemas::{ErrorKind, Registry, RegistryClient, RegistryOptions, SchemaSource};
use serde_json::{Value, json};

const TOKEN: &str = "s3cret";
const CT: &str = "application/vnd.schemaregistry.v1+json";

struct Server {
    base: String,
    http: reqwest::Client,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

async fn start(max_schema_bytes: usize) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let base = format!("http://{addr}");
    let registry = Registry::with_options(RegistryOptions {
        max_schema_bytes,
        base_url: base.clone(),
        ..RegistryOptions::default()
    });
    let app = router(
        registry,
        ServerOptions {
            token: Some(TOKEN.into()),
        },
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, app, async move {
        let _ = rx.await;
    }));
    Server {
        base,
        http: reqwest::Client::new(),
        _shutdown: tx,
    }
}

impl Server {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
        auth: bool,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if auth {
            request = request.bearer_auth(TOKEN);
        }
        if let Some(body) = body {
            request = request.header("content-type", CT).body(body);
        }
        let response = request.send().await.expect("send");
        let status = response.status().as_u16();
        if status != 404 || !path.starts_with("/nowhere") {
            assert_eq!(
                response
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok()),
                Some(CT),
                "{path}"
            );
        }
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None, false).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body.to_string()), true)
            .await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::PUT, path, Some(body.to_string()), true)
            .await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, path, None, true).await
    }
}

fn schema(s: Value) -> Value {
    json!({ "schema": s.to_string(), "schemaType": "JSON" })
}

fn code(answer: &(u16, Value)) -> (u16, i64) {
    (answer.0, answer.1["error_code"].as_i64().unwrap_or(-1))
}

#[tokio::test]
async fn confluent_routes_and_errors() {
    let server = start(4096).await;
    let v1 = json!({"type": "object", "properties": {"order": {"type": "string"}}});
    let v2 = json!({"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]});

    assert_eq!(server.get("/health").await, (200, json!({"status": "UP"})));
    assert_eq!(server.get("/schemas/types").await, (200, json!(["JSON"])));
    let (status, body) = server
        .post("/subjects/orders/versions", schema(v1.clone()))
        .await;
    assert_eq!(
        (status, body["id"].clone(), body["version"].clone()),
        (200, json!(1), json!(1))
    );
    assert_eq!(server.get("/subjects").await, (200, json!(["orders"])));
    assert_eq!(
        server.get("/subjects/orders/versions").await,
        (200, json!([1]))
    );
    let (_, latest) = server.get("/subjects/orders/versions/latest").await;
    assert_eq!(
        (
            latest["subject"].clone(),
            latest["version"].clone(),
            latest["id"].clone()
        ),
        (json!("orders"), json!(1), json!(1))
    );
    assert_eq!(
        server.get("/subjects/orders/versions/1/schema").await,
        (200, v1.clone())
    );
    assert_eq!(
        server.get("/schemas/ids/1").await.1["schemaType"],
        json!("JSON")
    );
    assert_eq!(server.get("/schemas/ids/1/schema").await, (200, v1.clone()));
    assert_eq!(
        server.get("/schemas/ids/1/versions").await,
        (200, json!([{"subject": "orders", "version": 1}]))
    );
    assert_eq!(
        server.post("/subjects/orders", schema(v1.clone())).await.1["version"],
        json!(1)
    );

    // Compatibility, verbose and not.
    let check = server
        .post(
            "/compatibility/subjects/orders/versions/latest?verbose=true",
            schema(v2.clone()),
        )
        .await;
    assert_eq!(check.1["is_compatible"], json!(false));
    assert_eq!(
        check.1["messages"],
        json!([
            "backward (new schema reading version 1): #/required/0: property \"order\" newly required"
        ])
    );
    let check = server
        .post(
            "/compatibility/subjects/orders/versions/1",
            schema(v1.clone()),
        )
        .await;
    assert_eq!(check, (200, json!({"is_compatible": true})));
    let refused = server
        .post("/subjects/orders/versions", schema(v2.clone()))
        .await;
    assert_eq!(code(&refused), (409, 409));
    assert!(
        refused.1["message"]
            .as_str()
            .unwrap_or("")
            .contains("newly required")
    );

    // Config.
    assert_eq!(
        server.get("/config").await,
        (200, json!({"compatibilityLevel": "BACKWARD"}))
    );
    assert_eq!(code(&server.get("/config/orders").await), (404, 40408));
    assert_eq!(
        server.get("/config/orders?defaultToGlobal=true").await.1["compatibilityLevel"],
        json!("BACKWARD")
    );
    assert_eq!(
        server
            .put("/config/orders", json!({"compatibility": "NONE"}))
            .await,
        (200, json!({"compatibility": "NONE"}))
    );
    assert_eq!(
        server.get("/config/orders").await.1,
        json!({"compatibilityLevel": "NONE"})
    );
    assert_eq!(
        code(
            &server
                .put("/config", json!({"compatibility": "SIDEWAYS"}))
                .await
        ),
        (422, 42203)
    );
    assert_eq!(
        server
            .put("/config", json!({"compatibility": "FULL_TRANSITIVE"}))
            .await
            .0,
        200
    );
    assert_eq!(
        server
            .post("/subjects/orders/versions", schema(v2.clone()))
            .await
            .1["version"],
        json!(2)
    );
    assert_eq!(
        server.delete("/config/orders").await.1,
        json!({"compatibilityLevel": "NONE"})
    );

    // Errors: unknown things, bad input.
    assert_eq!(
        code(&server.get("/subjects/nope/versions").await),
        (404, 40401)
    );
    assert_eq!(
        code(&server.get("/subjects/orders/versions/7").await),
        (404, 40402)
    );
    assert_eq!(
        code(&server.get("/subjects/orders/versions/zero").await),
        (422, 42202)
    );
    assert_eq!(
        code(&server.get("/subjects/orders/versions/0").await),
        (422, 42202)
    );
    assert_eq!(code(&server.get("/schemas/ids/99").await), (404, 40403));
    assert_eq!(code(&server.get("/schemas/ids/x").await), (404, 40403));
    assert_eq!(
        code(
            &server
                .post("/subjects/orders", schema(json!({"type": "null"})))
                .await
        ),
        (404, 40403)
    );
    assert_eq!(
        code(
            &server
                .post("/subjects/orders/versions", schema(json!({"type": 5})))
                .await
        ),
        (422, 42201)
    );
    let avro = json!({"schema": "{\"type\": \"record\"}", "schemaType": "AVRO"});
    assert_eq!(
        code(&server.post("/subjects/orders/versions", avro).await),
        (422, 42201)
    );
    let no_type = json!({"schema": "\"string\""});
    assert_eq!(
        code(&server.post("/subjects/orders/versions", no_type).await),
        (422, 42201)
    );
    let not_json = json!({"schema": "{nope", "schemaType": "JSON"});
    assert_eq!(
        code(&server.post("/subjects/orders/versions", not_json).await),
        (422, 42201)
    );
    let garbage = server
        .call(
            reqwest::Method::POST,
            "/subjects/orders/versions",
            Some("}{".into()),
            true,
        )
        .await;
    assert_eq!(code(&garbage), (400, 400));
    let huge = schema(json!({"type": "string", "description": "x".repeat(5000)}));
    assert_eq!(
        code(&server.post("/subjects/orders/versions", huge).await),
        (413, 42201)
    );
    let enormous = schema(json!({"type": "string", "description": "x".repeat(200_000)}));
    assert_eq!(
        code(&server.post("/subjects/orders/versions", enormous).await),
        (413, 42201)
    );
    assert_eq!(server.get("/nowhere").await.0, 404);

    // Auth: writes need the token, reads do not.
    let anonymous = server
        .call(
            reqwest::Method::POST,
            "/subjects/x/versions",
            Some(schema(v1.clone()).to_string()),
            false,
        )
        .await;
    assert_eq!(code(&anonymous), (401, 401));
    assert_eq!(
        code(
            &server
                .call(reqwest::Method::DELETE, "/subjects/orders", None, false)
                .await
        ),
        (401, 401)
    );

    // Deletes.
    assert_eq!(
        code(&server.delete("/subjects/orders?permanent=true").await),
        (404, 40405)
    );
    assert_eq!(
        code(
            &server
                .delete("/subjects/orders/versions/2?permanent=true")
                .await
        ),
        (404, 40407)
    );
    assert_eq!(
        server.delete("/subjects/orders/versions/2").await,
        (200, json!(2))
    );
    assert_eq!(
        server
            .delete("/subjects/orders/versions/2?permanent=true")
            .await,
        (200, json!(2))
    );
    assert_eq!(server.delete("/subjects/orders").await, (200, json!([1])));
    assert_eq!(code(&server.delete("/subjects/orders").await), (404, 40404));
    assert_eq!(
        code(&server.get("/subjects/orders/versions").await),
        (404, 40401)
    );
    assert_eq!(
        server.get("/subjects?deleted=true").await.1,
        json!(["orders"])
    );
    assert_eq!(
        server.delete("/subjects/orders?permanent=true").await,
        (200, json!([1]))
    );
    assert_eq!(server.get("/subjects?deleted=true").await.1, json!([]));
}

#[tokio::test]
async fn client_and_cache() -> schemas::Result<()> {
    let server = start(1 << 20).await;
    let client = RegistryClient::new(&server.base).with_token(TOKEN);
    let v1 = json!({"type": "object", "properties": {"n": {"type": "integer"}}});
    let id = client.register("numbers", &v1).await?;
    let latest = client.latest("numbers").await?;
    assert_eq!((latest.id(), latest.version()), (id, Some(1)));
    assert_eq!(latest.url(), format!("{}/schemas/ids/{id}", server.base));
    assert_eq!(client.id_from_url(latest.url()), Some(id));
    assert!(Arc::ptr_eq(
        &client.by_id(id).await?,
        &client.by_id(id).await?
    ));
    assert!(latest.is_valid(&json!({"n": 1})) && !latest.is_valid(&json!({"n": "x"})));
    let problems = client
        .check_compatibility(
            "numbers",
            "latest",
            &json!({"type": "object", "required": ["n"]}),
        )
        .await?;
    assert_eq!(problems.len(), 1, "{problems:?}");
    let error = client
        .register("numbers", &json!({"type": "object", "required": ["n"]}))
        .await
        .expect_err("fails");
    assert!(matches!(error.kind(), ErrorKind::Incompatible { .. }));
    let error = client.latest("missing").await.expect_err("fails");
    assert!(matches!(error.kind(), ErrorKind::SubjectNotFound { .. }));
    let error = RegistryClient::new(&server.base)
        .register("x", &v1)
        .await
        .expect_err("fails");
    assert!(matches!(error.kind(), ErrorKind::Unauthorized));
    let error = RegistryClient::new("http://127.0.0.1:1")
        .latest("x")
        .await
        .expect_err("fails");
    assert!(error.is_retryable());
    Ok(())
}
