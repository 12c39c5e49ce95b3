//! What this workspace's service binaries share: the schema registry's and
//! the saga coordinator's (`orchestrator`, feature `service`). Each is a
//! small piece every HTTP service of the backbone needs the same way: how a
//! database URL is logged, when the process stops, and which requests a
//! bearer token lets through.

use axum::http::{HeaderMap, Method, header};

/// `url` with any user and password in it replaced by `***`, for logs.
///
/// ```
/// use schemas::process::redact_url;
///
/// assert_eq!(redact_url("postgres://app:secret@db:5432/app"), "postgres://***@db:5432/app");
/// assert_eq!(redact_url("sqlite:data.db"), "sqlite:data.db");
/// ```
#[must_use]
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Completes on Ctrl-C or, on Unix, SIGTERM: a service's cue to stop
/// taking requests and finish what it holds.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        // Without a handler only SIGTERM ends the wait.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

/// Whether a request may pass a service's write guard: reads (`GET`,
/// `HEAD`, `OPTIONS`) always, and anything when no token is set; other
/// requests only with `Authorization: Bearer <token>`, compared in
/// constant time.
///
/// ```
/// use axum::http::{HeaderMap, HeaderValue, Method, header};
/// use schemas::process::bearer_allows;
///
/// let mut headers = HeaderMap::new();
/// assert!(bearer_allows(Some("s3cret"), &Method::GET, &headers));
/// assert!(!bearer_allows(Some("s3cret"), &Method::POST, &headers));
/// headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
/// assert!(bearer_allows(Some("s3cret"), &Method::POST, &headers));
/// assert!(bearer_allows(None, &Method::DELETE, &HeaderMap::new()));
/// ```
#[must_use]
pub fn bearer_allows(token: Option<&str>, method: &Method, headers: &HeaderMap) -> bool {
    let Some(token) = token else {
        return true;
    };
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return true;
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn a_wrong_or_malformed_token_is_refused() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            headers
        };
        for refused in [
            "Bearer s3cre",
            "Bearer s3cretx",
            "Basic s3cret",
            "s3cret",
            "Bearer ",
        ] {
            assert!(
                !bearer_allows(Some("s3cret"), &Method::PUT, &with(refused)),
                "{refused}"
            );
        }
        assert!(bearer_allows(
            Some("s3cret"),
            &Method::PUT,
            &with("Bearer  s3cret ")
        ));
    }

    #[test]
    fn urls_without_credentials_are_kept() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://***@h/db");
        assert_eq!(redact_url("user@host"), "user@host");
    }
}
