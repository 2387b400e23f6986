//! The admin HTTP API (hyper + tower): `/healthz`, `/readyz`, `/metrics`, and the shard
//! endpoints under `/v1/shards`: state, switchover run by handoff, and the two-step API
//! for external orchestrators (`buffer` = revoke, `primary` = establish, `resume` =
//! abort).
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

use crate::actions::Action;
use crate::api;
use crate::shutdown::{Phase, Signal};

/// Most admin requests handled at once.
const MAX_CONCURRENT: usize = 32;
/// Longest an admin request may take. A switchover is bounded by its own settings and
/// runs in its own task, so it finishes even if its caller goes away.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// What the handlers need.
pub(crate) struct AdminState {
    pub token: Option<String>,
    pub prometheus: PrometheusHandle,
    pub shutdown: Signal,
    /// The shard actions and state the API serves.
    pub actions: Arc<crate::actions::Ctx>,
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
    json(
        status,
        api::to_value(&api::ErrorAnswer {
            error: message.to_string(),
        }),
    )
}

fn health(status: StatusCode, text: &str) -> Response<Body> {
    json(
        status,
        api::to_value(&api::Health {
            status: text.to_string(),
        }),
    )
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

fn method_not_allowed(method: &Method, path: &str, allowed: &'static str) -> Response<Body> {
    let mut r = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method {method} is not allowed on {path}; use {allowed}"),
    );
    r.headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allowed));
    r
}

/// Routes one request.
pub(crate) async fn handle(state: Arc<AdminState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (needs_auth, allowed) = match segments.as_slice() {
        ["healthz"] | ["readyz"] => (false, Method::GET),
        ["metrics"] | ["v1", "shards"] => (true, Method::GET),
        ["v1", "shards", _, a] if Action::parse(a).is_some() => (true, Method::POST),
        _ => {
            return json_error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: {method} {path}"),
            )
        }
    };
    if method != allowed {
        let name = if allowed == Method::GET {
            "GET"
        } else {
            "POST"
        };
        return method_not_allowed(&method, &path, name);
    }
    if needs_auth && !authorized(&state, &req) {
        let mut r = json_error(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
        r.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    match segments.as_slice() {
        ["healthz"] => health(StatusCode::OK, "ok"),
        ["readyz"] => {
            if state.shutdown.phase() == Phase::Running {
                health(StatusCode::OK, "ready")
            } else {
                health(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            }
        }
        ["metrics"] => {
            // Read at the scrape: the runtime's tasks alive now (sessions, pools, probes,
            // timers), so a leak shows as a number that keeps growing.
            let runtime = tokio::runtime::Handle::current().metrics();
            metrics::gauge!(crate::metrics::TASKS).set(runtime.num_alive_tasks() as f64);
            metrics::gauge!(crate::metrics::WORKER_THREADS).set(runtime.num_workers() as f64);
            // The pools' gauges too (see `Pool::publish_now`).
            let shard = &state.actions.shard;
            for pool in shard.pools.list().iter().chain(&shard.read_pools.list()) {
                pool.publish_now();
            }
            let mut r = Response::new(Full::new(Bytes::from(crate::metrics::render(
                &state.prometheus,
            ))));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        ["v1", "shards"] => json(
            StatusCode::OK,
            api::to_value(&crate::actions::shards(&state.actions)),
        ),
        ["v1", "shards", name, action] => {
            let name = name.to_string();
            let action = Action::parse(action).expect("routed above");
            let body = match read_json(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let a = crate::actions::shard_action(&state.actions, &name, action, body).await;
            json(
                StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                a.body,
            )
        }
        _ => json_error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

/// Reads a JSON object body (an empty body is `{}`).
async fn read_json(
    req: Request<Incoming>,
) -> Result<serde_json::Map<String, serde_json::Value>, Response<Body>> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return Err(json_error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body (at most {MAX_BODY} bytes): {e}"),
            ))
        }
    };
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(json_error(
            StatusCode::BAD_REQUEST,
            "the request body must be a JSON object",
        )),
        Err(e) => Err(json_error(
            StatusCode::BAD_REQUEST,
            &format!("the request body is not valid JSON: {e}"),
        )),
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
    let shutdown = state.shutdown.clone();
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
        let conn_shutdown = state.shutdown.clone();
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
