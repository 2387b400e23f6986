//! Session mode: one server connection per client for the whole session. The session
//! here logs in, relays (the bytes: [`pipe`]), moves to the shard's next primary at a
//! transaction boundary after a revocation, and is handed to a takeover's successor
//! with its server connection ([`moved`]).

use handoff_protocol::error::ProxyError;
use handoff_protocol::sqlstate;
use tokio::io::AsyncReadExt;

use std::sync::Arc;

use crate::backend::cancel::ServerKey;
use crate::backend::login::{self as backend_login, ServerConn};
use crate::clients::ClientInfo;
use crate::config::HostPort;
use crate::error::{send_error, ServerError};
use crate::metrics::{self as m, GaugeGuard};
use crate::net::stream::Conn;
use crate::relay::common::hello;
use crate::relay::common::{reach, End};
use crate::relay::session_move;
use crate::relay::Ctx;
use crate::shard::control::{self, Admitted};
use crate::shard::failure::{Report, RetryReason};
use crate::shard::health;
use crate::shard::{Entered, Shard};
use crate::shutdown::{Phase, Signal};

/// Who a session-mode client is on the server.
#[derive(Debug)]
pub(crate) struct ServerLogin {
    pub user: String,
    /// The database on the server (after `HANDOFF_DATABASES` routing).
    pub database: String,
    /// The client's other startup parameters, passed on.
    pub params: Vec<(String, String)>,
    /// What handoff logs in to the server with.
    pub credentials: crate::backend::login::Credentials,
    /// The protocol 3 minor version agreed with the client (its cancel key's length).
    pub minor: u16,
    /// The client's entry (`SHOW CLIENTS`, `SHOW STATS`).
    pub client: Arc<ClientInfo>,
}

/// Session mode's gate: waits in the failover buffer while the shard has no primary,
/// then registers the session on the serving generation while it has a server
/// connection there (lameduck waits for it to move). The buffer's release is not kept:
/// a session is not a held request once it runs.
async fn gate(ctx: &Ctx, shard: &Shard, bytes: usize) -> Result<Entered, ProxyError> {
    let mut gen = shard.current();
    control::admit(&ctx.shard, shard, &mut gen, bytes)
        .await
        .map(Admitted::into_entered)
        .map_err(|e| e.to_client_fatal(&shard.name))
}

/// Session mode: one server connection per client, moved to the new primary at a
/// transaction boundary when the shard's primary changes.
pub(crate) async fn serve(
    mut client: Conn,
    ctx: &Ctx,
    shard: &Arc<Shard>,
    login: ServerLogin,
    shutdown: Signal,
) {
    let name = shard.name.as_str();
    let (entered, server) = match attach(ctx, shard, &login).await {
        Ok(attached) => attached,
        Err(err) => {
            send_error(&mut client.stream, &err).await;
            return;
        }
    };
    let server_gauge = GaugeGuard::new(m::SERVER_CONNECTIONS);
    // After the session moves to another primary the backend is another: the id the
    // client knows stays the first one's.
    let Some(registration) = greet(&mut client, ctx, &server, login.minor).await else {
        return;
    };
    tracing::debug!(shard = name, server = %server.peer, "session relaying");
    relay(
        client,
        ctx,
        shard,
        &login,
        shutdown,
        Attached {
            entered,
            server,
            server_gauge,
            registration,
        },
    )
    .await
}

/// What a session-mode session holds while it relays.
pub(crate) struct Attached {
    pub entered: Entered,
    pub server: ServerConn,
    pub server_gauge: GaugeGuard,
    pub registration: crate::backend::cancel::Registration,
}

/// Relays a logged-in session until it ends: moved to the next primary when its own is
/// revoked, handed to a takeover's successor when one asks.
pub(crate) async fn relay(
    mut client: Conn,
    ctx: &Ctx,
    shard: &Arc<Shard>,
    login: &ServerLogin,
    shutdown: Signal,
    attached: Attached,
) {
    let name = shard.name.as_str();
    let Attached {
        mut entered,
        mut server,
        mut server_gauge,
        registration,
    } = attached;
    let mut stayed = 0;
    loop {
        let movable = (matches!(client.stream, crate::net::stream::Stream::Plain(_))
            && matches!(server.conn.stream, crate::net::stream::Stream::Plain(_)))
        .then_some((&ctx.outbox, stayed));
        let end = run(
            &mut client,
            &mut server.conn,
            name,
            shutdown.clone(),
            pipe::Leave::Primary(entered.generation()),
            &login.client,
            &ctx.meters,
            movable,
        )
        .await;
        if end == End::HandOver {
            let attempt = ctx.outbox.attempt();
            if moved::hand_over(ctx, &client, &server, name, login, &registration, false).await {
                tracing::debug!("session handed over to the successor");
                return;
            }
            stayed = attempt;
            continue;
        }
        if end != End::Revoked {
            tracing::debug!(?end, "session ended");
            if end == End::ServerGone {
                health::report(shard, Report::ConnectionLost);
            }
            return;
        }
        // Between transactions on a revoked primary: take the session's state off it,
        // let it go, and follow the shard to its next primary.
        let captured = session_move::capture(&mut server.conn).await;
        drop(server);
        drop(server_gauge);
        drop(entered);
        registration.set_server(None);
        let moved = match captured {
            Ok(state) => follow(&mut client, ctx, shard, login, &state, shutdown.clone()).await,
            Err(e) => Err(cannot_move(
                name,
                format!("the session's state could not be read: {e}"),
            )),
        };
        (entered, server) = match moved {
            Ok(Some(attached)) => attached,
            Ok(None) => return,
            Err(err) => {
                send_error(&mut client.stream, &err).await;
                return;
            }
        };
        server_gauge = GaugeGuard::new(m::SERVER_CONNECTIONS);
        registration.set_server(Some(std::sync::Arc::new(server_key(&server))));
        tracing::info!(shard = name, server = %server.peer, "session moved to the new primary");
    }
}

/// Registers the session's cancel key and tells the client it is logged in: its
/// backend's real process id (`pg_backend_pid()`, `pg_terminate_backend()` mean what it
/// expects) with a secret key of handoff's own, so cancel requests still come through
/// handoff. `None` if the client is gone.
async fn greet(
    client: &mut Conn,
    ctx: &Ctx,
    server: &ServerConn,
    minor: u16,
) -> Option<crate::backend::cancel::Registration> {
    let key = server_key(server);
    let registration =
        ctx.cancels
            .register_as(key.pid, Some(key), crate::backend::cancel::key_len(minor));
    let greeting = hello(
        server.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        registration.pid,
        registration.key(),
    );
    client.send_raw(&greeting).await.ok()?;
    Some(registration)
}

fn server_key(server: &ServerConn) -> ServerKey {
    ServerKey {
        addr: server.peer,
        pid: server.pid,
        key: server.key.clone(),
        // The connection closes with the session: no other client can be reached.
        in_flight: Default::default(),
    }
}

/// Logs in to `addr` as the session's user.
async fn connect(
    ctx: &Ctx,
    login: &ServerLogin,
    addr: &HostPort,
) -> Result<ServerConn, ServerError> {
    let l = backend_login::Login {
        addr,
        user: &login.user,
        database: &login.database,
        params: &login.params,
        credentials: &login.credentials,
        timeout: ctx.settings.connect_timeout,
        tls: &ctx.server_tls,
    };
    Box::pin(backend_login::connect(l)).await
}

/// The session's first server connection: through the gate, then a login to the
/// serving primary. A login the primary's loss refused (nothing was sent yet) waits
/// for the next primary instead of failing the client.
async fn attach(
    ctx: &Ctx,
    shard: &Shard,
    login: &ServerLogin,
) -> Result<(Entered, ServerConn), ProxyError> {
    let name = shard.name.as_str();
    let _waiting = login.client.waiting();
    loop {
        let entered = gate(ctx, shard, 0).await?;
        let err = match connect(ctx, login, &entered.generation().primary).await {
            Ok(server) => return Ok((entered, server)),
            Err(err) => err,
        };
        let gen = Arc::clone(entered.generation());
        drop(entered);
        metrics::counter!(m::SERVER_CONNECT_ERRORS_TOTAL).increment(1);
        if err.primary_may_be_gone()
            && health::suspect(&ctx.shard, shard, &gen, Report::ConnectFailed).await
        {
            RetryReason::ConnectFailed.count(name);
            continue;
        }
        tracing::warn!(shard = name, error = %err, "server login failed");
        return Err(err.to_client(name));
    }
}

/// Moves a session whose primary was revoked to the shard's next primary: waits for
/// the client's next request (an idle session is not a request, so it takes no slot in
/// the buffer until then), passes the gate, logs in and re-creates the session's
/// state. `None` when the client left while waiting.
async fn follow(
    client: &mut Conn,
    ctx: &Ctx,
    shard: &Shard,
    login: &ServerLogin,
    state: &session_move::SessionState,
    shutdown: Signal,
) -> Result<Option<(Entered, ServerConn)>, ProxyError> {
    let name = shard.name.as_str();
    if !state.blockers.is_empty() {
        tracing::info!(shard = name, blockers = ?state.blockers, "session cannot move");
        return Err(cannot_move(
            name,
            format!(
                "this session holds state that cannot move to the new primary ({})",
                state.blockers.join(", ")
            ),
        )
        .hint("release advisory locks, drop temporary tables, UNLISTEN and close held cursors between transactions, or use transaction mode"));
    }
    if client.rbuf.is_empty() {
        tokio::select! {
            r = client.stream.read_buf(&mut client.rbuf) => {
                if matches!(r, Ok(0) | Err(_)) {
                    return Ok(None);
                }
            }
            _ = reach(shutdown, Phase::Draining) => {
                return Err(crate::error::shutting_down());
            }
        }
    }
    let entered = gate(ctx, shard, client.rbuf.len()).await?;
    let mut server = connect(ctx, login, &entered.generation().primary)
        .await
        .map_err(|err| err.to_client(name))?;
    if let Err(e) = session_move::restore(&mut server.conn, state).await {
        return Err(cannot_move(
            name,
            format!("the session could not be re-created on the new primary: {e}"),
        ));
    }
    Ok(Some((entered, server)))
}

/// The FATAL a session-mode client gets when it cannot follow its shard's new primary.
fn cannot_move(shard: &str, why: String) -> ProxyError {
    ProxyError::fatal(
        sqlstate::ADMIN_SHUTDOWN,
        format!(
            "terminating connection: the primary of shard \"{shard}\" is being replaced and {why}"
        ),
    )
}

mod moved;
mod pipe;
mod reads;
pub(crate) use moved::adopt;
pub use pipe::{run, Leave};
pub(crate) use reads::adopt as adopt_reads;
pub(crate) use reads::serve as serve_reads;

#[cfg(test)]
mod tests;
