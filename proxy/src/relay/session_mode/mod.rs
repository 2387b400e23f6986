//! The relay phase of a session: bytes flow both ways through reusable buffers, and the
//! proxy looks only at what it must — message boundaries from the client, ReadyForQuery
//! and ErrorResponse from the server. DataRow and CopyData payloads are neither copied
//! nor parsed, so a message of any size streams through in bounded memory.

use tokio::time::Instant;

use bytes::{Buf, BytesMut};
use handoff_protocol::backend::{ready_status, tag as btag, TransactionStatus};
use handoff_protocol::error::{ErrorFields, ProxyError};
use handoff_protocol::framing::HEADER_LEN;
use handoff_protocol::frontend::tag as ftag;
use handoff_protocol::scan::{Scanner, Step};
use handoff_protocol::{sqlstate, FrameError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use std::sync::Arc;

use crate::backend::cancel::ServerKey;
use crate::backend::login::{self as backend_login, ServerConn};
use crate::clients::ClientInfo;
use crate::config::HostPort;
use crate::error::{send_error, ServerError};
use crate::metrics::{self as m, GaugeGuard, RelayMeters};
use crate::net::metered::Metered;
use crate::net::stream::Conn;
use crate::relay::common::hello;
use crate::relay::common::{
    protocol_error, reach, End, Meter, MAX_CLIENT_MESSAGE, MAX_INSPECT, MAX_SERVER_MESSAGE,
    READ_CHUNK,
};
use crate::relay::handover::Outbox;
use crate::relay::session_move;
use crate::relay::Ctx;
use crate::shard::control::{self, Admitted};
use crate::shard::failure::{Report, RetryReason};
use crate::shard::health;
use crate::shard::{Entered, Shard};
use crate::shutdown::{Phase, Signal};

struct Txn {
    /// Status from the last ReadyForQuery.
    status: TransactionStatus,
    /// A FATAL error came from the server: its closing is expected.
    server_fatal: bool,
    /// The client sent Terminate.
    terminated: bool,
    meter: Meter,
}

impl Txn {
    /// Between transactions, with nothing outstanding: a session may end here.
    fn at_boundary(&self, client_scan: &Scanner) -> bool {
        self.status == TransactionStatus::Idle
            && !self.meter.request_pending()
            && client_scan.at_boundary()
    }

    fn on_ready(&mut self, status: TransactionStatus, now: Instant) {
        self.status = status;
        self.meter
            .on_ready(now, true, status == TransactionStatus::Idle);
    }
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// Relays between a logged-in client and its server until one side ends, or (with
/// `gen`) until that generation is revoked and the session is between transactions,
/// or (`movable`: the outbox, and the takeover it last failed to move in) until a
/// takeover may take it between transactions.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: &mut Conn,
    server: &mut Conn,
    shard: &str,
    shutdown: Signal,
    gen: &crate::shard::Generation,
    info: &Arc<ClientInfo>,
    meters: &Arc<RelayMeters>,
    movable: Option<(&Outbox, u64)>,
) -> End {
    use crate::net::stream::Stream;
    let bufs = (&mut client.rbuf, &mut server.rbuf);
    match (&mut client.stream, &mut server.stream) {
        // Plain TCP on both sides: the sockets' own borrowed halves, no locking.
        (Stream::Plain(c), Stream::Plain(s)) => {
            let (cr, cw) = c.split();
            let (sr, sw) = s.split();
            relay_loop(
                cr, cw, sr, sw, bufs, shard, shutdown, gen, info, meters, movable,
            )
            .await
        }
        (c, s) => {
            let (cr, cw) = tokio::io::split(c);
            let (sr, sw) = tokio::io::split(s);
            relay_loop(
                cr, cw, sr, sw, bufs, shard, shutdown, gen, info, meters, movable,
            )
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay_loop<CR, CW, SR, SW>(
    mut cr: CR,
    cw: CW,
    mut sr: SR,
    sw: SW,
    (cbuf, sbuf): (&mut BytesMut, &mut BytesMut),
    shard: &str,
    shutdown: Signal,
    gen: &crate::shard::Generation,
    info: &Arc<ClientInfo>,
    meters: &Arc<RelayMeters>,
    movable: Option<(&Outbox, u64)>,
) -> End
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let mut revoked = false;
    let mut revocation = Box::pin(gen.revoked());
    let mut killed = Box::pin(gen.killed());
    let mut cscan = Scanner::new(0, MAX_CLIENT_MESSAGE);
    let mut sscan = Scanner::new(MAX_INSPECT, MAX_SERVER_MESSAGE);
    let mut txn = Txn {
        status: TransactionStatus::Idle,
        server_fatal: false,
        terminated: false,
        meter: Meter::new(Arc::clone(meters), Arc::clone(info)),
    };
    // The byte counts of both directions, taken into the meter after each batch.
    let mut cw = Metered::new(cw);
    let mut sw = Metered::new(sw);

    // One long-lived future per phase to wait for, rather than a new one (and a new
    // waiter registration) on every pass through the loop.
    let mut watched = shutdown.phase().next();
    let mut phase_change = Box::pin(reach(shutdown.clone(), watched));
    let end = loop {
        // Bytes the client sent right behind its startup, or left from the last read.
        if !cbuf.is_empty() {
            if let Err(end) = client_bytes(cbuf, &mut cscan, &mut sw, &mut cw, &mut txn).await {
                break end;
            }
            if txn.terminated {
                break End::Terminated;
            }
        }
        let phase = shutdown.phase();
        if phase == Phase::Closing || (phase == Phase::Draining && txn.at_boundary(&cscan)) {
            let err = crate::error::shutting_down();
            crate::error::send_error(&mut cw, &err).await;
            break End::Shutdown;
        }
        if revoked && txn.at_boundary(&cscan) && cbuf.is_empty() {
            break End::Revoked;
        }
        // A takeover: between transactions, with nothing half-read from either side,
        // the session and its server connection go to the successor.
        if phase == Phase::HandingOver
            && movable.is_some_and(|(outbox, stayed)| outbox.attempt() != stayed)
            && txn.at_boundary(&cscan)
            && cbuf.is_empty()
            && sbuf.is_empty()
            && sscan.at_boundary()
        {
            break End::HandOver;
        }
        reserve(cbuf);
        reserve(sbuf);
        // Both reads are `read_buf` into our own buffers, which is cancel-safe: a read that
        // loses the race has consumed nothing.
        tokio::select! {
            r = cr.read_buf(cbuf) => match r {
                Ok(0) | Err(_) => break End::ClientGone,
                Ok(_) => {}
            },
            r = sr.read_buf(sbuf) => match r {
                Ok(0) | Err(_) => {
                    if !txn.server_fatal {
                        let err = crate::error::lost_connection(shard);
                        crate::error::send_error(&mut cw, &err).await;
                    }
                    break End::ServerGone;
                }
                Ok(_) => {
                    let r = server_bytes(sbuf, &mut sscan, &mut cw, &mut txn).await;
                    txn.meter.add(sw.take(), cw.take());
                    if let Err(end) = r {
                        break end;
                    }
                }
            },
            _ = &mut phase_change, if phase < watched => {
                // Watch for the next phase with a new long-lived future.
                watched = shutdown.phase().next();
                phase_change = Box::pin(reach(shutdown.clone(), watched));
            }
            _ = &mut revocation, if !revoked => revoked = true,
            _ = &mut killed => {
                metrics::counter!(crate::metrics::LAMEDUCK_CANCELLED, "shard" => shard.to_string())
                    .increment(1);
                let err = ProxyError::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    format!(
                        "terminating connection: the primary of shard \"{shard}\" is being replaced and the transaction did not finish within HANDOFF_DRAIN_TIMEOUT"
                    ),
                );
                crate::error::send_error(&mut cw, &err).await;
                break End::ServerGone;
            }
        }
    };
    txn.meter.add(sw.take(), cw.take());
    txn.meter.flush_bytes();
    end
}

/// Forwards every complete run of client bytes in `buf` to the server.
async fn client_bytes(
    buf: &mut BytesMut,
    scan: &mut Scanner,
    server: &mut (impl AsyncWrite + Unpin),
    client: &mut (impl AsyncWrite + Unpin),
    txn: &mut Txn,
) -> Result<(), End> {
    let now = Instant::now();
    let mut pos = 0;
    loop {
        match scan.step(&buf[pos..], |_| false) {
            Ok(Step::Pass { len, tag }) => {
                match tag {
                    Some(ftag::TERMINATE) => txn.terminated = true,
                    Some(_) => txn.meter.on_request(now),
                    None => {}
                }
                pos += len;
            }
            Ok(Step::Message { len, .. }) => pos += len,
            Ok(Step::NeedMore) => break,
            Err(e) => {
                forward(server, buf, pos).await?;
                protocol_error(client, &e).await;
                return Err(End::ClientProtocol);
            }
        }
    }
    forward(server, buf, pos).await
}

/// Forwards every complete run of server bytes in `buf` to the client, inspecting
/// ReadyForQuery and ErrorResponse on the way.
async fn server_bytes(
    buf: &mut BytesMut,
    scan: &mut Scanner,
    client: &mut (impl AsyncWrite + Unpin),
    txn: &mut Txn,
) -> Result<(), End> {
    let mut pos = 0;
    let inspect = |t: u8| t == btag::READY_FOR_QUERY || t == btag::ERROR_RESPONSE;
    loop {
        match scan.step(&buf[pos..], inspect) {
            Ok(Step::Pass { len, .. }) => pos += len,
            Ok(Step::Message { tag, len }) => {
                let body = &buf[pos + HEADER_LEN..pos + len];
                if tag == btag::READY_FOR_QUERY {
                    match ready_status(body) {
                        Ok(s) => txn.on_ready(s, Instant::now()),
                        Err(e) => return server_protocol_error(client, &e).await,
                    }
                } else {
                    let mut b = bytes::Bytes::copy_from_slice(body);
                    match ErrorFields::parse(&mut b) {
                        Ok(fields) => {
                            let code = fields.code().unwrap_or("?????");
                            m::count_error("server", code);
                            if fields.ends_session() {
                                txn.server_fatal = true;
                            }
                        }
                        Err(e) => return server_protocol_error(client, &e).await,
                    }
                }
                pos += len;
            }
            Ok(Step::NeedMore) => break,
            Err(e) => return server_protocol_error(client, &e).await,
        }
    }
    forward(client, buf, pos).await
}

async fn server_protocol_error(
    client: &mut (impl AsyncWrite + Unpin),
    e: &FrameError,
) -> Result<(), End> {
    tracing::warn!(error = %e, "protocol error from server");
    let err = crate::error::server_protocol_error(e);
    crate::error::send_error(client, &err).await;
    Err(End::ServerProtocol)
}

/// Writes `buf[..len]` to `to` and drops it from the buffer.
async fn forward(
    to: &mut (impl AsyncWrite + Unpin),
    buf: &mut BytesMut,
    len: usize,
) -> Result<(), End> {
    if len == 0 {
        return Ok(());
    }
    // Either side failing ends the session; which one does not matter to the caller.
    to.write_all(&buf[..len])
        .await
        .map_err(|_| End::ClientGone)?;
    buf.advance(len);
    Ok(())
}

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
    // The client is told its backend's real process id (`pg_backend_pid()`,
    // `pg_terminate_backend()` mean what it expects) with a secret key of handoff's own,
    // so cancel requests still come through handoff. After the session moves to another
    // primary the backend is another: the id the client knows stays the first one's.
    let key = server_key(&server);
    let registration = ctx.cancels.register_as(
        key.pid,
        Some(key),
        crate::backend::cancel::key_len(login.minor),
    );

    let greeting = hello(server.params.clone(), registration.pid, &registration.key);
    if client.send_raw(&greeting).await.is_err() {
        return;
    }
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
            entered.generation(),
            &login.client,
            &ctx.meters,
            movable,
        )
        .await;
        if end == End::HandOver {
            let attempt = ctx.outbox.attempt();
            if moved::hand_over(ctx, &client, &server, name, login, &registration).await {
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
        registration.set_server(Some(server_key(&server)));
        tracing::info!(shard = name, server = %server.peer, "session moved to the new primary");
    }
}

fn server_key(server: &ServerConn) -> ServerKey {
    ServerKey {
        addr: server.peer,
        pid: server.pid,
        key: server.key.clone(),
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
pub(crate) use moved::adopt;

#[cfg(test)]
mod tests;
