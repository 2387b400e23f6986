//! What can be done to a shard from outside — a switchover, a hold, the two-step API
//! of external orchestrators — independent of how it was asked: the admin HTTP API
//! answers with the [`Answer`]'s status and JSON body, the admin console with rows or
//! an error carrying the same message.

use std::sync::Arc;

use hyper::StatusCode;

use crate::api;
use crate::shard::control;
use crate::shard::switchover::{self, Outcome};
use crate::shard::{Ctx as ShardCtx, Shard};

/// What the actions work with: every shard, the shard layer's handle, and coordination
/// with the other proxies when configured. The HTTP API and the console both hold one.
#[derive(Debug)]
pub(crate) struct Ctx {
    /// Each shard's state machine, in `HANDOFF_SHARDS` order.
    pub shards: Vec<Arc<Shard>>,
    pub shard: Arc<ShardCtx>,
    pub coord: Option<Arc<crate::coord::Coord>>,
}

impl Ctx {
    /// The shard named `name`.
    pub fn find(&self, name: &str) -> Option<&Arc<Shard>> {
        self.shards.iter().find(|s| s.name == name)
    }
}

/// An action's result: an HTTP status (200 done; 400 a malformed request; 404 no such
/// shard; 409 refused in this state; 502/503 a failure elsewhere) and a JSON body,
/// `{"error": "..."}` unless it succeeded.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Answer {
    pub fn is_ok(&self) -> bool {
        self.status == 200
    }

    /// The error message, when it is one.
    pub fn error(&self) -> Option<&str> {
        self.body.get("error").and_then(|e| e.as_str())
    }
}

fn answer(status: StatusCode, body: serde_json::Value) -> Answer {
    Answer {
        status: status.as_u16(),
        body,
    }
}

fn error(status: StatusCode, message: &str) -> Answer {
    answer(
        status,
        api::to_value(&api::ErrorAnswer {
            error: message.to_string(),
        }),
    )
}

fn changed(c: &api::ShardChange) -> Answer {
    answer(StatusCode::OK, api::to_value(c))
}

/// What can be done to a shard through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
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
    /// The HA manager says something changed (repmgr's `event_notification_command`):
    /// read it, and check the primary, now.
    Recheck,
}

impl Action {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "switchover" => Some(Action::Switchover),
            "buffer" => Some(Action::Buffer),
            "primary" => Some(Action::Primary),
            "resume" => Some(Action::Resume),
            "hold" => Some(Action::Hold),
            "recheck" => Some(Action::Recheck),
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
            Action::Recheck => &["event"],
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

pub(crate) type Fields = serde_json::Map<String, serde_json::Value>;

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

fn bad_request(e: FieldError) -> Answer {
    error(StatusCode::BAD_REQUEST, &e.to_string())
}

fn event_error(e: &crate::shard::EventError) -> Answer {
    error(StatusCode::CONFLICT, &e.to_string())
}

fn busy() -> Answer {
    error(
        StatusCode::CONFLICT,
        "a switchover of this shard is in progress",
    )
}

pub(crate) async fn shard_action(
    actions: &Ctx,
    name: &str,
    action: Action,
    body: Fields,
) -> Answer {
    let Some(shard) = actions.find(name).cloned() else {
        return error(
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
    let ctx = Arc::clone(&actions.shard);
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
                return changed(&api::ShardChange {
                    shard: shard.name.clone(),
                    held: Some(false),
                    not_primary: true,
                    primary: Some(primary.to_string()),
                    ..Default::default()
                });
            }
        }
        return hold(actions, &shard, &reason).await;
    }
    if action == Action::Recheck {
        return recheck(&ctx, &shard, &body);
    }
    if let Some(coord) = &actions.coord {
        return coordinated(Arc::clone(coord), shard, action, to, &body).await;
    }
    match action {
        Action::Switchover => switchover(ctx, shard, to.expect("resolved above")).await,
        Action::Buffer => buffer(&ctx, &shard, &body).await,
        Action::Primary => primary(&ctx, &shard, &body).await,
        Action::Resume => resume(&ctx, &shard, &body),
        Action::Hold | Action::Recheck => unreachable!("answered above"),
    }
}

/// A switchover's target: `host:port`, or on a managed shard a member's name too.
async fn target(
    ctx: &crate::shard::Ctx,
    shard: &Shard,
    body: &Fields,
) -> Result<crate::config::HostPort, Answer> {
    let Some(manager) = ctx.manager(&shard.name) else {
        return field_addr(body, "to").map_err(bad_request);
    };
    let to = match field_str(body, "to") {
        Ok(Some(t)) => t,
        Ok(None) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "missing \"to\": a {} member's name or \"host:port\"",
                    manager.kind().title()
                ),
            ))
        }
        Err(e) => return Err(bad_request(e)),
    };
    crate::shard::managed::resolve(manager.as_ref(), to)
        .await
        .map_err(|(status, message)| {
            error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                &message,
            )
        })
}

/// `POST /v1/shards/{s}/recheck {"event"?}`: the shard's HA manager is read and its
/// primary probed at once (on this proxy; each proxy follows the manager itself).
fn recheck(ctx: &crate::shard::Ctx, shard: &Arc<Shard>, body: &Fields) -> Answer {
    let event = match field_str(body, "event") {
        Ok(e) => e.unwrap_or("").to_string(),
        Err(e) => return bad_request(e),
    };
    let Some(manager) = ctx.manager(&shard.name) else {
        return error(
            StatusCode::CONFLICT,
            &format!("shard \"{}\" has no HA manager to read", shard.name),
        );
    };
    tracing::info!(shard = %shard.name, manager = manager.kind().title(), %event, "the HA manager announced a change: reading it now");
    manager.poke();
    shard.health.wake.notify_one();
    changed(&api::ShardChange {
        shard: shard.name.clone(),
        ..Default::default()
    })
}

/// A hold the follower of an HA manager starts (the manager told the primary to stop
/// taking writes): like `POST /v1/shards/{s}/hold`, on every proxy with coordination.
pub(crate) async fn hold_for_manager(actions: &Ctx, shard: &Arc<Shard>, reason: &str) {
    let answer = hold(actions, shard, reason).await;
    if answer.status != 200 {
        tracing::warn!(shard = %shard.name, answer = %answer.body, "the hold the HA manager's stop asked for was refused");
    }
}

/// `POST /v1/shards/{s}/hold`: on every proxy with coordination.
async fn hold(actions: &Ctx, shard: &Arc<Shard>, reason: &str) -> Answer {
    if let Some(coord) = &actions.coord {
        return match coord.hold(shard, reason).await {
            Ok(v) => changed(&v),
            Err(r) => refused(r),
        };
    }
    match crate::shard::hold::hold(&actions.shard, shard, reason).await {
        Ok(h) => changed(&h.answer(&shard.name)),
        Err(e) => {
            metrics::counter!(crate::metrics::HOLDS, "shard" => shard.name.clone(), "result" => "refused").increment(1);
            event_error(&e)
        }
    }
}

fn refused(r: crate::coord::Refusal) -> Answer {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::CONFLICT);
    error(status, &r.message)
}

/// The actions with coordination: each applies to every proxy of the cluster.
async fn coordinated(
    coord: Arc<crate::coord::Coord>,
    shard: Arc<Shard>,
    action: Action,
    to: Option<crate::config::HostPort>,
    body: &Fields,
) -> Answer {
    match action {
        Action::Hold | Action::Recheck => unreachable!("answered before"),
        Action::Switchover => {
            let to = to.expect("resolved before");
            // Its own task: it completes (or rolls back) even if the caller goes away.
            match tokio::spawn(async move { coord.switchover(shard, to).await }).await {
                Ok(Ok((outcome, report))) => {
                    answer(switchover_status(outcome), api::to_value(&report))
                }
                Ok(Err(r)) => refused(r),
                Err(e) => error(
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
                Ok(v) => changed(&v),
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
                Ok(v) => changed(&v),
                Err(r) => refused(r),
            }
        }
        Action::Resume => {
            let epoch = match field_epoch(body) {
                Ok(e) => e,
                Err(e) => return bad_request(e),
            };
            match coord.resume(&shard, epoch).await {
                Ok(v) => changed(&v),
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

fn watched_refusal(shard: &Shard, addr: &crate::config::HostPort) -> Answer {
    error(
        StatusCode::CONFLICT,
        &format!(
            "{addr} is a replaced primary of shard \"{}\" watched for split brain (GET /v1/shards shows why); it serves again only once it has rejoined as a standby",
            shard.name
        ),
    )
}

async fn switchover(ctx: Arc<ShardCtx>, shard: Arc<Shard>, to: crate::config::HostPort) -> Answer {
    // Its own task: it completes (or rolls back) even if the caller goes away.
    match tokio::spawn(switchover::run(ctx, shard, to)).await {
        Ok(report) => answer(
            switchover_status(report.outcome),
            api::to_value(&report.to_report()),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the switchover task failed: {e}"),
        ),
    }
}

async fn buffer(ctx: &ShardCtx, shard: &Shard, body: &Fields) -> Answer {
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
    changed(&ld.buffering(&shard.name, &revoked.gen))
}

async fn primary(ctx: &ShardCtx, shard: &Shard, body: &Fields) -> Answer {
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
        Ok(est) => changed(&api::ShardChange {
            shard: shard.name.clone(),
            state: Some("draining".into()),
            epoch: Some(est.epoch),
            primary: Some(addr.to_string()),
            prewarmed_connections: Some(est.prewarmed),
            prewarm_error: est.prewarm_error,
            ..Default::default()
        }),
        Err(e) => event_error(&e),
    }
}

fn resume(ctx: &ShardCtx, shard: &Shard, body: &Fields) -> Answer {
    let epoch = match field_epoch(body) {
        Ok(e) => e,
        Err(e) => return bad_request(e),
    };
    let Ok(_op) = shard.op.try_lock() else {
        return busy();
    };
    match control::abort(ctx, shard, epoch) {
        Ok(epoch) => changed(&api::ShardChange {
            shard: shard.name.clone(),
            state: Some("draining".into()),
            epoch: Some(epoch),
            primary: Some(shard.current().primary.to_string()),
            ..Default::default()
        }),
        Err(e) => event_error(&e),
    }
}

/// Every shard's state (`GET /v1/shards`, `SHOW SHARDS`, `handoff status`).
pub(crate) fn shards(actions: &Ctx) -> api::Shards {
    let shards = actions
        .shards
        .iter()
        .map(|s| {
            let snap = s.snapshot(actions.shard.buffer_idle(&s.name));
            let buffer_state = match actions.shard.buffer.state(&s.name) {
                Some(handoff_buffer::State::Idle) | None => "idle",
                Some(handoff_buffer::State::Buffering) => "buffering",
                Some(handoff_buffer::State::Draining) => "draining",
            };
            let watched = s.watch.view();
            api::ShardState {
                name: s.name.clone(),
                state: snap.state.as_str().to_string(),
                epoch: snap.epoch,
                primary: snap.primary.to_string(),
                hosts: s.hosts.iter().map(|h| h.to_string()).collect(),
                source: actions
                    .shard
                    .source(&s.name, actions.coord.is_some())
                    .to_string(),
                patroni: actions
                    .shard
                    .manager(&s.name)
                    .filter(|m| m.kind() == crate::manager::Kind::Patroni)
                    .map(|m| patroni_view(m.as_ref())),
                manager: actions
                    .shard
                    .manager(&s.name)
                    .map(|m| manager_view(m.as_ref(), &snap.primary)),
                in_flight: snap.inflight,
                buffer: api::BufferState {
                    state: buffer_state.to_string(),
                    depth: actions.shard.buffer.depth(&s.name),
                },
                since_ms: snap.since.elapsed().as_millis() as u64,
                reason: snap.reason,
                split_brain: watched
                    .iter()
                    .filter(|v| v.split_brain.is_some())
                    .map(|v| v.host.to_string())
                    .collect(),
                watched: watched.iter().map(watched_view).collect(),
                standbys: s
                    .replicas
                    .all()
                    .iter()
                    .map(|r| {
                        let seen = r.seen();
                        api::Standby {
                            host: r.host.to_string(),
                            in_rotation: r.in_rotation(),
                            state: seen.standing.as_str().to_string(),
                            lag_bytes: seen.lag_bytes,
                            lag_seconds: seen.lag.map(|d| d.as_secs_f64()),
                            upstream: seen.upstream,
                            transactions: r.outstanding(),
                            chosen: r.chosen(),
                            detail: seen.detail,
                        }
                    })
                    .collect(),
                coordination: actions
                    .coord
                    .as_ref()
                    .and_then(|c| c.shard_records(&s.name)),
            }
        })
        .collect();
    api::Shards {
        shards,
        coordination: match &actions.coord {
            Some(c) => c.status(),
            None => api::Coordination::default(),
        },
    }
}

/// Patroni's last answer for a shard: its members, their roles, the leader.
fn patroni_view(p: &dyn crate::manager::Manager) -> api::PatroniView {
    let view = p.last();
    api::PatroniView {
        endpoints: p.endpoints(),
        scope: view.as_ref().map(|c| c.name.clone()),
        paused: view.as_ref().map(|c| c.paused.is_some()),
        leader: view
            .as_ref()
            .and_then(|c| c.leader().map(|l| l.name.clone())),
        members: view.as_ref().map(|c| {
            c.members
                .iter()
                .map(|m| api::PatroniMember {
                    name: m.name.clone(),
                    addr: m.addr.to_string(),
                    role: m.role.clone(),
                    state: m.state.clone(),
                    timeline: m.timeline,
                })
                .collect()
        }),
    }
}

/// A shard's HA manager: where it is, its last view, and whether its leader is the
/// primary handoff serves.
fn manager_view(
    m: &dyn crate::manager::Manager,
    serving: &crate::config::HostPort,
) -> api::ManagerView {
    let view = m.last();
    let leader = view.as_ref().and_then(|v| v.leader().cloned());
    api::ManagerView {
        kind: m.kind().as_str().to_string(),
        endpoints: m.endpoints(),
        cluster: view.as_ref().map(|v| v.name.clone()),
        paused: view.as_ref().and_then(|v| v.paused.clone()),
        leader: leader.as_ref().map(|l| l.name.clone()),
        stopping: view
            .as_ref()
            .and_then(|v| v.stopping.as_ref().map(|s| s.to_string())),
        agrees: view
            .as_ref()
            .map(|_| leader.as_ref().is_some_and(|l| &l.addr == serving)),
        members: view.as_ref().map(|v| {
            v.members
                .iter()
                .map(|m| api::ManagerMember {
                    name: m.name.clone(),
                    addr: m.addr.to_string(),
                    leader: m.leader,
                    role: m.role.clone(),
                    state: m.state.clone(),
                    timeline: m.timeline,
                    not_candidate: m.not_candidate.clone(),
                })
                .collect()
        }),
        error: m.last_error(),
    }
}

fn watched_view(v: &crate::shard::watch::View) -> api::Watched {
    api::Watched {
        host: v.host.to_string(),
        why: v.why.as_str().to_string(),
        replaced_at_epoch: v.epoch,
        since_unix: v
            .since
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        state: v.seen.as_str().to_string(),
        fenced_by_handoff: v.fenced_by_handoff,
        fence_lsn: v.fence_lsn.clone(),
        wal_bytes_past_fence: v.wal_past_fence,
        split_brain: v.split_brain.clone(),
        detail: v.detail.clone(),
    }
}
