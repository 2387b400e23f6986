//! The admin HTTP API (hyper + tower): `/healthz`, `/readyz` and `/metrics`.
//!
//! The tower stack bounds concurrency and time per request; every error is a JSON body
//! with a message. When `HANDOFF_ADMIN_TOKEN` is set every endpoint but the two health
//! probes needs `Authorization: Bearer <token>`, compared in constant time.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use handoff_protocol::auth::secrets_equal;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};

use crate::shutdown::{Phase, Signal};

/// Most admin requests handled at once.
const MAX_CONCURRENT: usize = 32;
/// Longest an admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers need.
pub(crate) struct AdminState {
    pub token: Option<String>,
    pub prometheus: PrometheusHandle,
    pub shutdown: Signal,
}

type Body = Full<Bytes>;

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A JSON error body: `{"error": "..."}`.
fn json_error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, serde_json::json!({ "error": message }))
}

fn authorized(state: &AdminState, req: &Request<Incoming>) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let Some(given) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    secrets_equal(given.trim().as_bytes(), token.as_bytes())
}

/// Routes one request.
pub(crate) async fn handle(state: Arc<AdminState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let (needs_auth, allowed) = match path.as_str() {
        "/healthz" | "/readyz" => (false, Method::GET),
        "/metrics" => (true, Method::GET),
        _ => {
            return json_error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: {} {path}", req.method()),
            )
        }
    };
    if req.method() != allowed {
        let mut r = json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!(
                "method {} is not allowed on {path}; use {allowed}",
                req.method()
            ),
        );
        r.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    if needs_auth && !authorized(&state, &req) {
        let mut r = json_error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
        r.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    match path.as_str() {
        "/healthz" => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        "/readyz" => {
            if state.shutdown.phase() == Phase::Running {
                json(StatusCode::OK, serde_json::json!({"status": "ready"}))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"status": "shutting down"}),
                )
            }
        }
        _ => {
            let mut r = Response::new(Full::new(Bytes::from(state.prometheus.render())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
    }
}

/// Turns a tower error (timeout, overload) into a JSON response.
fn recover(r: Result<Response<Body>, tower::BoxError>) -> Result<Response<Body>, tower::BoxError> {
    Ok(r.unwrap_or_else(|e| {
        json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("admin request failed: {e}"),
        )
    }))
}

/// Serves the admin API until the shutdown reaches `Closing`.
pub(crate) async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let handler_state = Arc::clone(&state);
    let service = ServiceBuilder::new()
        .concurrency_limit(MAX_CONCURRENT)
        .timeout(REQUEST_TIMEOUT)
        .service_fn(move |req: Request<Incoming>| {
            let state = Arc::clone(&handler_state);
            async move { Ok::<_, Infallible>(handle(state, req).await) }
        })
        .map_result(recover);
    let mut shutdown = state.shutdown.clone();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(ok) => ok,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.reached(Phase::Closing) => break,
        };
        let svc = TowerToHyperService::new(service.clone());
        let mut conn_shutdown = state.shutdown.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "admin connection error");
                    }
                }
                _ = conn_shutdown.reached(Phase::Closing) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}
