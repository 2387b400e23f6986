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

use crate::shard::control;
use crate::shard::switchover::{self, Outcome};
use crate::shard::{Ctx, Shard};
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
    pub shared: Arc<crate::shared::Shared>,
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
        ["healthz"] => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        ["readyz"] => {
            if state.shutdown.phase() == Phase::Running {
                json(StatusCode::OK, serde_json::json!({"status": "ready"}))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"status": "shutting down"}),
                )
            }
        }
        ["metrics"] => {
            let mut r = Response::new(Full::new(Bytes::from(state.prometheus.render())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        ["v1", "shards"] => json(StatusCode::OK, shards_json(&state.shared)),
        ["v1", "shards", name, action] => {
            let name = name.to_string();
            let action = Action::parse(action).expect("routed above");
            let body = match read_json(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            shard_action(&state, &name, action, body).await
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

/// Every shard's state.
pub(crate) fn shards_json(shared: &crate::shared::Shared) -> serde_json::Value {
    let list: Vec<serde_json::Value> = shared
        .shards
        .iter()
        .map(|s| {
            let snap = s.snapshot(shared.ctx.buffer_idle(&s.name));
            let buffer_state = match shared.ctx.buffer.state(&s.name) {
                Some(handoff_buffer::State::Idle) | None => "idle",
                Some(handoff_buffer::State::Buffering) => "buffering",
                Some(handoff_buffer::State::Draining) => "draining",
            };
            serde_json::json!({
                "name": s.name,
                "state": snap.state.as_str(),
                "epoch": snap.epoch,
                "primary": snap.primary.to_string(),
                "hosts": s.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                "source": shared.ctx.source(&s.name, shared.coord.is_some()),
                "patroni": shared.ctx.patroni(&s.name).map(|p| patroni_json(p)),
                "in_flight": snap.inflight,
                "buffer": {
                    "state": buffer_state,
                    "depth": shared.ctx.buffer.depth(&s.name),
                },
                "since_ms": snap.since.elapsed().as_millis() as u64,
                "reason": snap.reason,
                "split_brain": s.watch.view().iter().filter(|v| v.split_brain.is_some()).map(|v| v.host.to_string()).collect::<Vec<_>>(),
                "watched": s.watch.view().iter().map(watched_json).collect::<Vec<_>>(),
                "coordination": shared.coord.as_ref().map(|c| c.shard_json(&s.name)),
            })
        })
        .collect();
    let coordination = match &shared.coord {
        Some(c) => c.status_json(),
        None => serde_json::json!({"enabled": false}),
    };
    serde_json::json!({ "shards": list, "coordination": coordination })
}

/// Patroni's last answer for a shard: its members, their roles, the leader.
fn patroni_json(p: &crate::patroni::Source) -> serde_json::Value {
    let view = p.view.borrow().clone();
    serde_json::json!({
        "endpoints": p.endpoints().iter().map(|e| format!("http://{e}")).collect::<Vec<_>>(),
        "scope": view.as_ref().map(|c| c.scope.clone()),
        "paused": view.as_ref().map(|c| c.paused),
        "leader": view.as_ref().and_then(|c| c.leader().map(|l| l.name.clone())),
        "members": view.as_ref().map(|c| c.members.iter().map(|m| serde_json::json!({
            "name": m.name,
            "addr": m.addr.to_string(),
            "role": m.role,
            "state": m.state,
            "timeline": m.timeline,
        })).collect::<Vec<_>>()),
    })
}

fn watched_json(v: &crate::shard::watch::View) -> serde_json::Value {
    let since = v
        .since
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    serde_json::json!({
        "host": v.host.to_string(),
        "why": v.why.as_str(),
        "replaced_at_epoch": v.epoch,
        "since_unix": since,
        "state": v.seen.as_str(),
        "fenced_by_handoff": v.fenced_by_handoff,
        "fence_lsn": v.fence_lsn,
        "wal_bytes_past_fence": v.wal_past_fence,
        "split_brain": v.split_brain,
        "detail": v.detail,
    })
}

/// What can be done to a shard through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// A switchover run by handoff.
    Switchover,
    /// Revoke: hold new transactions, lameduck.
    Buffer,
    /// Establish a primary and release held transactions to it.
    Primary,
    /// Abort: release held transactions to the revoked primary.
    Resume,
    /// An outside hold (Patroni's `before_stop`): revoke, lameduck, and let discovery
    /// end it with the next primary.
    Hold,
}

impl Action {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "switchover" => Some(Action::Switchover),
            "buffer" => Some(Action::Buffer),
            "primary" => Some(Action::Primary),
            "resume" => Some(Action::Resume),
            "hold" => Some(Action::Hold),
            _ => None,
        }
    }

    /// The body fields the action accepts; any other is refused.
    fn fields(self) -> &'static [&'static str] {
        match self {
            Action::Switchover => &["to"],
            Action::Buffer => &["epoch", "reason"],
            Action::Primary => &["addr", "epoch"],
            Action::Resume => &["epoch"],
            Action::Hold => &["reason", "primary"],
        }
    }
}

/// A request body that does not say what its action needs (400).
#[derive(Debug, thiserror::Error)]
enum FieldError {
    #[error("\"{0}\" must be a string")]
    NotString(&'static str),
    #[error("missing \"{0}\": the target as \"host:port\"")]
    MissingAddr(&'static str),
    #[error("\"{name}\": {reason}")]
    BadAddr {
        name: &'static str,
        reason: crate::config::InvalidValue,
    },
    #[error("\"epoch\" must be a non-negative integer")]
    BadEpoch,
    #[error("unknown field \"{field}\" (expected: {expected})")]
    Unknown { field: String, expected: String },
}

type Fields = serde_json::Map<String, serde_json::Value>;

fn field_str<'a>(body: &'a Fields, name: &'static str) -> Result<Option<&'a str>, FieldError> {
    match body.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(FieldError::NotString(name)),
    }
}

fn field_addr(body: &Fields, name: &'static str) -> Result<crate::config::HostPort, FieldError> {
    let s = field_str(body, name)?.ok_or(FieldError::MissingAddr(name))?;
    crate::config::HostPort::parse_any(s).map_err(|reason| FieldError::BadAddr { name, reason })
}

fn field_epoch(body: &Fields) -> Result<Option<u64>, FieldError> {
    match body.get("epoch") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(FieldError::BadEpoch),
    }
}

fn bad_request(e: FieldError) -> Response<Body> {
    json_error(StatusCode::BAD_REQUEST, &e.to_string())
}

fn event_error(e: &crate::shard::EventError) -> Response<Body> {
    json_error(StatusCode::CONFLICT, &e.to_string())
}

fn busy() -> Response<Body> {
    json_error(
        StatusCode::CONFLICT,
        "a switchover of this shard is in progress",
    )
}

async fn shard_action(
    state: &Arc<AdminState>,
    name: &str,
    action: Action,
    body: Fields,
) -> Response<Body> {
    let shared = Arc::clone(&state.shared);
    let Some(shard) = shared.shard(name).cloned() else {
        return json_error(
            StatusCode::NOT_FOUND,
            &format!("no shard named \"{name}\" (see GET /v1/shards)"),
        );
    };
    let allowed = action.fields();
    if let Some(k) = body.keys().find(|k| !allowed.contains(&k.as_str())) {
        return bad_request(FieldError::Unknown {
            field: k.clone(),
            expected: allowed.join(", "),
        });
    }
    let ctx = Arc::clone(&shared.ctx);
    let to = match action {
        Action::Switchover => match target(&ctx, &shard, &body).await {
            Ok(to) => Some(to),
            Err(r) => return r,
        },
        _ => None,
    };
    if action == Action::Hold {
        let reason = match field_str(&body, "reason") {
            Ok(r) => r.unwrap_or("hold (admin API)").to_string(),
            Err(e) => return bad_request(e),
        };
        // The server about to stop, when the caller knows it (Patroni runs its hook
        // on replicas too): only the primary's stop is held.
        if body.contains_key("primary") {
            let stopping = match field_addr(&body, "primary") {
                Ok(a) => a,
                Err(e) => return bad_request(e),
            };
            let primary = shard.current().primary.clone();
            if stopping != primary {
                metrics::counter!(crate::metrics::HOLDS, "shard" => shard.name.clone(), "result" => "not_primary").increment(1);
                return json(
                    StatusCode::OK,
                    serde_json::json!({
                        "shard": shard.name,
                        "held": false,
                        "not_primary": true,
                        "primary": primary.to_string(),
                    }),
                );
            }
        }
        return hold(&shared, &shard, &reason).await;
    }
    if let Some(coord) = &shared.coord {
        return coordinated(Arc::clone(coord), shard, action, to, &body).await;
    }
    match action {
        Action::Switchover => switchover(ctx, shard, to.expect("resolved above")).await,
        Action::Buffer => buffer(&ctx, &shard, &body).await,
        Action::Primary => primary(&ctx, &shard, &body).await,
        Action::Resume => resume(&ctx, &shard, &body),
        Action::Hold => unreachable!("answered above"),
    }
}

/// A switchover's target: `host:port`, or on a Patroni shard a member's name too.
async fn target(
    ctx: &crate::shard::Ctx,
    shard: &Shard,
    body: &Fields,
) -> Result<crate::config::HostPort, Response<Body>> {
    let Some(source) = ctx.patroni(&shard.name) else {
        return field_addr(body, "to").map_err(bad_request);
    };
    let to = match field_str(body, "to") {
        Ok(Some(t)) => t,
        Ok(None) => {
            return Err(json_error(
                StatusCode::BAD_REQUEST,
                "missing \"to\": a Patroni member's name or \"host:port\"",
            ))
        }
        Err(e) => return Err(bad_request(e)),
    };
    crate::shard::patroni::resolve(source, to)
        .await
        .map_err(|(status, message)| {
            json_error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                &message,
            )
        })
}

/// `POST /v1/shards/{s}/hold`: on every proxy with coordination.
async fn hold(shared: &crate::shared::Shared, shard: &Arc<Shard>, reason: &str) -> Response<Body> {
    if let Some(coord) = &shared.coord {
        return match coord.hold(shard, reason).await {
            Ok(v) => json(StatusCode::OK, v),
            Err(r) => refused(r),
        };
    }
    match crate::shard::hold::hold(&shared.ctx, shard, reason).await {
        Ok(h) => json(StatusCode::OK, h.to_json(&shard.name)),
        Err(e) => {
            metrics::counter!(crate::metrics::HOLDS, "shard" => shard.name.clone(), "result" => "refused").increment(1);
            event_error(&e)
        }
    }
}

fn refused(r: crate::coord::Refusal) -> Response<Body> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::CONFLICT);
    json_error(status, &r.message)
}

/// The actions with coordination: each applies to every proxy of the cluster.
async fn coordinated(
    coord: Arc<crate::coord::Coord>,
    shard: Arc<Shard>,
    action: Action,
    to: Option<crate::config::HostPort>,
    body: &Fields,
) -> Response<Body> {
    match action {
        Action::Hold => unreachable!("answered before"),
        Action::Switchover => {
            let to = to.expect("resolved before");
            // Its own task: it completes (or rolls back) even if the caller goes away.
            match tokio::spawn(async move { coord.switchover(shard, to).await }).await {
                Ok(Ok((outcome, report))) => json(switchover_status(outcome), report),
                Ok(Err(r)) => refused(r),
                Err(e) => json_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("the switchover task failed: {e}"),
                ),
            }
        }
        Action::Buffer => {
            let (epoch, reason) = match (field_epoch(body), field_str(body, "reason")) {
                (Ok(e), Ok(r)) => (e, r.unwrap_or("admin API").to_string()),
                (Err(e), _) | (_, Err(e)) => return bad_request(e),
            };
            match coord.buffer(&shard, epoch, &reason).await {
                Ok(v) => json(StatusCode::OK, v),
                Err(r) => refused(r),
            }
        }
        Action::Primary => {
            let (addr, epoch) = match (field_addr(body, "addr"), field_epoch(body)) {
                (Ok(a), Ok(e)) => (a, e),
                (Err(e), _) | (_, Err(e)) => return bad_request(e),
            };
            if shard.watch.is_watched(&addr) {
                return watched_refusal(&shard, &addr);
            }
            match coord.primary(&shard, addr, epoch).await {
                Ok(v) => json(StatusCode::OK, v),
                Err(r) => refused(r),
            }
        }
        Action::Resume => {
            let epoch = match field_epoch(body) {
                Ok(e) => e,
                Err(e) => return bad_request(e),
            };
            match coord.resume(&shard, epoch).await {
                Ok(v) => json(StatusCode::OK, v),
                Err(r) => refused(r),
            }
        }
    }
}

fn switchover_status(outcome: Outcome) -> StatusCode {
    match outcome {
        Outcome::Completed => StatusCode::OK,
        Outcome::Refused | Outcome::RolledBack => StatusCode::CONFLICT,
        Outcome::Failed => StatusCode::BAD_GATEWAY,
    }
}

fn watched_refusal(shard: &Shard, addr: &crate::config::HostPort) -> Response<Body> {
    json_error(
        StatusCode::CONFLICT,
        &format!(
            "{addr} is a replaced primary of shard \"{}\" watched for split brain (GET /v1/shards shows why); it serves again only once it has rejoined as a standby",
            shard.name
        ),
    )
}

async fn switchover(
    ctx: Arc<Ctx>,
    shard: Arc<Shard>,
    to: crate::config::HostPort,
) -> Response<Body> {
    // Its own task: it completes (or rolls back) even if the caller goes away.
    match tokio::spawn(switchover::run(ctx, shard, to)).await {
        Ok(report) => json(switchover_status(report.outcome), report.to_json()),
        Err(e) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the switchover task failed: {e}"),
        ),
    }
}

async fn buffer(ctx: &Ctx, shard: &Shard, body: &Fields) -> Response<Body> {
    let (epoch, reason) = match (field_epoch(body), field_str(body, "reason")) {
        (Ok(e), Ok(r)) => (e, r.unwrap_or("admin API").to_string()),
        (Err(e), _) | (_, Err(e)) => return bad_request(e),
    };
    let Ok(_op) = shard.op.try_lock() else {
        return busy();
    };
    let revoked = match control::revoke(ctx, shard, epoch, &reason) {
        Ok(r) => r,
        Err(e) => return event_error(&e),
    };
    let ld = control::lameduck(&revoked.gen, ctx.settings.drain_timeout).await;
    json(
        StatusCode::OK,
        serde_json::json!({
            "shard": shard.name,
            "state": "buffering",
            "epoch": revoked.gen.epoch,
            "old_primary": revoked.gen.primary.to_string(),
            "lameduck_ms": ld.waited.as_millis() as u64,
            "lameduck_cancelled": ld.cancelled,
        }),
    )
}

async fn primary(ctx: &Ctx, shard: &Shard, body: &Fields) -> Response<Body> {
    let (addr, epoch) = match (field_addr(body, "addr"), field_epoch(body)) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(e), _) | (_, Err(e)) => return bad_request(e),
    };
    let Ok(_op) = shard.op.try_lock() else {
        return busy();
    };
    if shard.watch.is_watched(&addr) {
        return watched_refusal(shard, &addr);
    }
    match control::establish(ctx, shard, epoch, addr.clone()).await {
        Ok(est) => json(
            StatusCode::OK,
            serde_json::json!({
                "shard": shard.name,
                "state": "draining",
                "epoch": est.epoch,
                "primary": addr.to_string(),
                "prewarmed_connections": est.prewarmed,
                "prewarm_error": est.prewarm_error,
            }),
        ),
        Err(e) => event_error(&e),
    }
}

fn resume(ctx: &Ctx, shard: &Shard, body: &Fields) -> Response<Body> {
    let epoch = match field_epoch(body) {
        Ok(e) => e,
        Err(e) => return bad_request(e),
    };
    let Ok(_op) = shard.op.try_lock() else {
        return busy();
    };
    match control::abort(ctx, shard, epoch) {
        Ok(epoch) => json(
            StatusCode::OK,
            serde_json::json!({
                "shard": shard.name,
                "state": "draining",
                "epoch": epoch,
                "primary": shard.current().primary.to_string(),
            }),
        ),
        Err(e) => event_error(&e),
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
