//! Session mode on a standby (`appdb@replica`, `appdb@any`): one standby serves the
//! whole session, chosen as a transaction's would be (the least busy in the shard's read
//! rotation; one that cannot be reached leaves it and the next is tried). Nothing
//! revokes a standby, so the session stays on it until either side ends; its server
//! session starts with `default_transaction_read_only` on, so it stays a reader even if
//! that standby is promoted under it. `@any` with no standby in the rotation is served
//! by the primary, as any session-mode session is (read-only by default all the same).
//! A takeover moves the session with its standby connection, as it moves a primary's
//! session: the successor relays it on ([`adopt`]).

use std::sync::Arc;

use crate::backend::cancel::Registration;
use crate::backend::login::ServerConn;
use crate::config::{HostPort, Target};
use crate::error::{send_error, AttachError};
use crate::metrics::{self as m, GaugeGuard};
use crate::net::stream::{Conn, Stream};
use crate::relay::common::End;
use crate::relay::session_move;
use crate::relay::Ctx;
use crate::shard::failure::RetryReason;
use crate::shard::replicas::{Reading, Standby};
use crate::shard::Shard;
use crate::shutdown::Signal;
use handoff_protocol::error::ProxyError;
use handoff_protocol::sqlstate;

use super::{connect, greet, run, Leave, ServerLogin};

/// Serves a session-mode client of `appdb@replica` or `appdb@any` until it ends.
pub(crate) async fn serve(
    mut client: Conn,
    ctx: &Ctx,
    shard: &Arc<Shard>,
    login: ServerLogin,
    target: Target,
    shutdown: Signal,
) {
    let name = shard.name.as_str();
    let mut params = login.params.clone();
    if !params
        .iter()
        .any(|(k, _)| k == "default_transaction_read_only")
    {
        params.push(("default_transaction_read_only".into(), "on".into()));
    }
    let login = ServerLogin { params, ..login };
    let picked = {
        let _waiting = login.client.waiting();
        pick_and_connect(ctx, shard, &login, target, None).await
    };
    let (reading, server) = match picked {
        Ok(Some(found)) => found,
        // `@any`, no standby: the primary's session.
        Ok(None) => return super::serve(client, ctx, shard, login, shutdown).await,
        Err(err) => {
            send_error(&mut client.stream, &err.to_client_fatal(name)).await;
            return;
        }
    };
    let Some(registration) = greet(&mut client, ctx, &server, login.minor).await else {
        return;
    };
    tracing::debug!(shard = name, standby = %reading.host(), "session relaying on a standby");
    relay(
        client,
        ctx,
        shard,
        &login,
        server,
        registration,
        On::picked(reading),
        shutdown,
    )
    .await;
}

/// The standby a session relays on: the rotation's entry (none for a session adopted
/// from a standby the rotation does not list) and, for one this process chose, the
/// pick that counts the session as busy there.
struct On {
    standby: Option<Arc<Standby>>,
    _reading: Option<Reading>,
}

impl On {
    /// A standby this process picked from the rotation.
    fn picked(reading: Reading) -> Self {
        Self {
            standby: Some(Arc::clone(reading.standby())),
            _reading: Some(reading),
        }
    }
}

/// Takes over a session on a standby that another process handed over: the relay goes
/// on where that process left it, on the same standby backend.
pub(crate) async fn adopt(
    client: Conn,
    ctx: &Ctx,
    shard: &Arc<Shard>,
    login: ServerLogin,
    server: ServerConn,
    cancel: (i32, bytes::Bytes),
    shutdown: Signal,
) {
    let registration = super::moved::adopt_cancel_key(ctx, &server, cancel, login.minor);
    let on = On {
        standby: shard.replicas.find_addr(&server.peer),
        _reading: None,
    };
    tracing::debug!(shard = %shard.name, standby = %server.peer, "adopted a session on a standby");
    relay(
        client,
        ctx,
        shard,
        &login,
        server,
        registration,
        on,
        shutdown,
    )
    .await;
}

/// Relays a session on a standby until it ends or is handed to a takeover's successor
/// (a plain-TCP session only: TLS state cannot move). When its standby leaves for good
/// — a switchover's target, or found promoted — the session moves to another standby
/// at its next transaction boundary, its state re-created there as a primary's session
/// is on the next primary; the one it was on is taken out of the rotation if the
/// connection to it is lost.
#[allow(clippy::too_many_arguments)]
async fn relay(
    mut client: Conn,
    ctx: &Ctx,
    shard: &Arc<Shard>,
    login: &ServerLogin,
    mut server: ServerConn,
    registration: Registration,
    mut on: On,
    shutdown: Signal,
) {
    let name = shard.name.as_str();
    let _server_gauge = GaugeGuard::new(m::SERVER_CONNECTIONS);
    let mut stayed = 0;
    let end = loop {
        let movable = (matches!(client.stream, Stream::Plain(_))
            && matches!(server.conn.stream, Stream::Plain(_)))
        .then_some((&ctx.outbox, stayed));
        let leave = match &on.standby {
            Some(s) => Leave::Standby(Box::pin(s.leaving())),
            None => Leave::Never,
        };
        let end = run(
            &mut client,
            &mut server.conn,
            name,
            shutdown.clone(),
            leave,
            &login.client,
            &ctx.meters,
            movable,
        )
        .await;
        match end {
            End::HandOver => {
                let attempt = ctx.outbox.attempt();
                if super::moved::hand_over(ctx, &client, &server, name, login, &registration, true)
                    .await
                {
                    tracing::debug!("session on a standby handed over to the successor");
                    return;
                }
                stayed = attempt;
            }
            End::Revoked => {
                let from = on.standby.as_ref().map(|s| s.host.clone());
                match move_on(ctx, shard, login, &mut server, from.as_ref()).await {
                    Ok((reading, next)) => {
                        server = next;
                        registration
                            .set_server(Some(std::sync::Arc::new(super::server_key(&server))));
                        tracing::info!(shard = name, from = ?from.map(|h| h.to_string()), to = %reading.host(), "session moved to another standby");
                        on = On::picked(reading);
                    }
                    Err(err) => {
                        // Its standby is fine, only leaving: it stays in the rotation
                        // as its checks find it.
                        send_error(&mut client.stream, &err).await;
                        tracing::debug!("session on a standby ended: it could not move");
                        return;
                    }
                }
            }
            end => break end,
        }
    };
    if let (End::ServerGone, Some(s)) = (&end, &on.standby) {
        shard
            .replicas
            .set_down(&s.host, "a session's connection to it was lost");
    }
    tracing::debug!(?end, "session on a standby ended");
}

/// Moves a session off a standby that is leaving: its state is read, another standby
/// is chosen and logged in to, and the state re-created there.
async fn move_on(
    ctx: &Ctx,
    shard: &Shard,
    login: &ServerLogin,
    server: &mut ServerConn,
    from: Option<&HostPort>,
) -> Result<(Reading, ServerConn), ProxyError> {
    let name = shard.name.as_str();
    let cannot = |why: String| {
        ProxyError::fatal(
            sqlstate::ADMIN_SHUTDOWN,
            format!("terminating connection: the standby this session read from in shard \"{name}\" is being promoted and {why}"),
        )
    };
    let state = session_move::capture(&mut server.conn)
        .await
        .map_err(|e| cannot(format!("the session's state could not be read: {e}")))?;
    if !state.blockers.is_empty() {
        return Err(cannot(format!(
            "this session holds state that cannot move to another standby ({})",
            state.blockers.join(", ")
        )));
    }
    let (reading, mut next) =
        match pick_and_connect(ctx, shard, login, Target::Replica, from.cloned()).await {
            Ok(Some(found)) => found,
            Ok(None) => return Err(cannot("no other standby is in the read rotation".into())),
            Err(err) => return Err(err.to_client_fatal(name)),
        };
    session_move::restore(&mut next.conn, &state)
        .await
        .map_err(|e| {
            cannot(format!(
                "the session could not be re-created on another standby: {e}"
            ))
        })?;
    Ok((reading, next))
}

/// A standby and a login on it; `Ok(None)` for `@any` when no standby is in the
/// rotation. `@replica` waits up to the buffer's window for one.
async fn pick_and_connect(
    ctx: &Ctx,
    shard: &Shard,
    login: &ServerLogin,
    target: Target,
    mut except: Option<HostPort>,
) -> Result<Option<(Reading, crate::backend::login::ServerConn)>, AttachError> {
    let replicas = &shard.replicas;
    loop {
        let picked = match replicas.pick(except.as_ref()) {
            Some(r) => r,
            None if target == Target::Any => return Ok(None),
            None => {
                let wait = ctx.shard.settings.read_wait;
                match replicas.pick_within(wait).await {
                    Some(r) => r,
                    None => return Err(AttachError::NoStandby(wait)),
                }
            }
        };
        match connect(ctx, login, picked.host()).await {
            Ok(server) => {
                picked.served();
                return Ok(Some((picked, server)));
            }
            Err(e) if e.standby_unusable() => {
                metrics::counter!(m::SERVER_CONNECT_ERRORS_TOTAL).increment(1);
                replicas.set_down(picked.host(), &e.to_string());
                RetryReason::ConnectFailed.count(&shard.name);
                except = Some(picked.host().clone());
            }
            Err(e) => {
                return Err(AttachError::Pool(crate::error::PoolError::Connect(e)));
            }
        }
    }
}
