//! The transaction-mode relay's loop: one client's session from login to its end,
//! waiting on the client, the server connection while a transaction holds one,
//! shutdown, lameduck's cancellation and the idle limits.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_core::future::BoxFuture;
use handoff_protocol::error::ProxyError;
use handoff_protocol::scan::Scanner;
use handoff_protocol::sqlstate;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::client::{client_bytes, client_read};
use super::local::Local;
use super::server::server_bytes;
use super::{Quiet, Txn, MAX_INSPECT};
use crate::error::send_error;
use crate::metrics::{self as m, HeldUp};
use crate::net::buffers;
use crate::net::stream::Conn;
use crate::relay::common::{reach, End, MAX_CLIENT_MESSAGE};
use crate::relay::lot::Payload;
use crate::shutdown::{Phase, Signal};
use crate::sync::OnWake;

/// How long a client that sends often stays quiet, holding nothing, before its session
/// goes to the lot.
///
/// A client between transactions needs only its socket and its session's state; the
/// relay's loop (scanners, the select over client, server, timers and signals) is kept
/// while the client is busy, so that its next request costs no allocation. A client
/// that has shown it sends again within this time (its last quiet spell was shorter, or
/// it has had none since its first request) keeps the loop for this long: in a crowd of
/// clients that each send every second or two, each request is then woken as a busy
/// client's is, with no timer firing and nothing rebuilt between two requests (the
/// lot's park and wake cost a few system calls, a task and an extra hop each time: 10 µs
/// a transaction, and the latency's tail). A quiet spell this long marks the client as
/// one that sends seldom (see [`PARK_AFTER`]). A client just logged in goes to the lot
/// before its first request: see [`start`].
const KEEP_FOR: Duration = Duration::from_secs(3);

/// How long a client whose last quiet spell was long (at least [`KEEP_FOR`]) stays
/// quiet before its session goes to the lot: what it held is freed soon, as it is
/// likely to stay quiet again. If it comes back within `KEEP_FOR` of its last request,
/// it counts as one that sends often again.
const PARK_AFTER: Duration = Duration::from_millis(500);

/// The session's relay, for its task to await: [`run`] in a box of its own while the
/// client is busy or has been quiet only a short while; once it has been quiet for long
/// enough, the session is set aside in the lot (see [`crate::relay::lot`]) and this task
/// ends — [`resume`] gives it a new one when the client sends again — or, where the lot
/// does not take it, it waits [`parked`] in this task.
/// The client and the transaction state are captured once and lent to `run` (an
/// `async fn` taking them by value would keep each twice: as its argument and as the
/// local it is moved into), and the state stays in its own box.
pub(crate) fn relay(client: Conn, txn: Box<Txn>, shutdown: Signal) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let (mut client, mut txn) = (client, txn);
        let end = loop {
            // The log context, made for each stretch of work (a parked client keeps
            // none), and only when debug lines are on (see `client_span_on`).
            let span = if super::client_span_on() {
                txn.meter.client().span()
            } else {
                tracing::Span::none()
            };
            match Box::pin(run(&mut client, &mut txn, shutdown.clone()).instrument(span)).await {
                End::Parked => {
                    if txn.lot_soon {
                        // Quiet for `PARK_AFTER` after a long spell: how long it stays
                        // in the lot tells whether this spell is a long one too.
                        txn.set_aside_at = Some(tokio::time::Instant::now());
                    } else {
                        // Quiet for `KEEP_FOR`: a long spell; its next quiet spell goes
                        // to the lot sooner.
                        txn.lot_soon = true;
                    }
                    (client, txn) = match set_aside(client, txn) {
                        None => return,
                        Some(kept) => kept,
                    };
                    // The lot did not take it: it waits here on its socket alone.
                    txn.set_aside_at = None;
                    // The shared handle, not a lookup by name.
                    let _parked = HeldUp::new(&txn.meter.series().parked);
                    parked(&client, &shutdown).await;
                }
                End::HandOver => {
                    if Box::pin(hand_over(&mut client, &mut txn)).await {
                        break End::HandOver;
                    }
                }
                end => break end,
            }
        };
        tracing::debug!(client.addr = %txn.meter.client().addr, ?end, "session ended");
    })
}

/// A session just logged in, greeted and holding nothing: to the lot at once, where its
/// first request wakes it as any other, so that its login's task and all it held are
/// freed — in a storm of logins most clients then wait, and a task each for half a
/// second added up to 2 KiB per client of memory kept after the storm. It runs here
/// where the lot does not take it (a TLS session, a proxy not simply running) and
/// where `HANDOFF_CLIENT_IDLE_TIMEOUT` is set (the limit runs in the relay's loop: a
/// client under an idle limit is never parked).
///
/// This is no quiet spell of the client's: its first one after a request keeps its
/// relay's loop for [`KEEP_FOR`], whatever this one lasted.
pub(crate) async fn start(client: Conn, txn: Box<Txn>, shutdown: Signal) {
    // Quiet outside a transaction: the relay's loop parks it only without a limit.
    let limited = IdleLimits::of(&txn).pick(true, false).is_some();
    let (client, txn) = if !limited && shutdown.phase() == Phase::Running {
        match set_aside(client, txn) {
            None => return,
            Some(kept) => kept,
        }
    } else {
        (client, txn)
    };
    relay(client, txn, shutdown).await
}

/// Hands a quiet session to the lot: `None` once the lot has it (or it ended there,
/// killed), the session back if the lot does not take it.
fn set_aside(client: Conn, txn: Box<Txn>) -> Option<(Conn, Box<Txn>)> {
    let quiet = match txn.into_quiet() {
        Ok(q) => q,
        Err(txn) => return Some((client, txn)),
    };
    let socket = match client.into_plain() {
        Ok(s) => s,
        Err(client) => return Some((client, Txn::from_quiet(*quiet))),
    };
    let ctx = Arc::clone(quiet.ctx());
    let info = Arc::clone(quiet.client());
    match ctx.lot.park(socket, quiet, &info) {
        Ok(()) => None,
        Err((socket, state)) => {
            let quiet = state
                .downcast::<Quiet>()
                .expect("the lot gives back what it was given");
            Some((Conn::new(socket), Txn::from_quiet(*quiet)))
        }
    }
}

/// A session taken out of the lot (its client sent something, closed, or the proxy's
/// phase moved): its relay runs again in a task of its own.
pub(crate) fn resume(socket: TcpStream, state: Payload) {
    let Ok(quiet) = state.downcast::<Quiet>() else {
        return;
    };
    let mut txn = Txn::from_quiet(*quiet);
    // Sent to the lot after `PARK_AFTER`: back within `KEEP_FOR` of its last request,
    // it is a client that sends every second or two, and its next quiet spell keeps its
    // relay's loop.
    if let Some(at) = txn.set_aside_at.take() {
        txn.lot_soon = at.elapsed() + PARK_AFTER >= KEEP_FOR;
    }
    let shutdown = txn.ctx.lot.signal().clone();
    let info = Arc::clone(txn.meter.client());
    let task = tokio::spawn(relay(Conn::new(socket), txn, shutdown));
    // For `KILL`: this is the session's task now.
    info.set_abort(task.abort_handle());
}

/// Gives the session to the successor of a takeover: true once it has taken it (the
/// session ends here, silently). Otherwise the session stays, and is not tried again
/// in this takeover.
async fn hand_over(client: &mut Conn, txn: &mut Txn) -> bool {
    let outbox = &txn.ctx.outbox;
    let attempt = outbox.attempt();
    let moved = crate::relay::handover::dup(client).and_then(|fd| {
        let minor = if txn.registration.key().len() >= 32 {
            2
        } else {
            0
        };
        let c = crate::relay::handover::client_part(
            txn.meter.client(),
            minor,
            (txn.registration.pid, &txn.registration.key()[..]),
            &txn.target.credentials,
            &client.rbuf,
            txn.moved_mode(),
        )?;
        Some((c, fd))
    });
    let taken = match moved {
        Some((c, fd)) => outbox.send(c, vec![fd]).await,
        None => false,
    };
    if !taken {
        tracing::debug!("session not handed over: it stays in this process");
        txn.stay(attempt);
    }
    taken
}

/// A parked client's wait in its own task (where the lot does not take it: the proxy is
/// not simply running), holding only its socket: until it sends something (or its
/// socket ends) or the proxy's phase moves. The relay then runs again and sees which.
///
/// Kept small: the socket's readiness is polled in place (no waiter of its own), and
/// the shutdown is one notification of the phase's next move.
async fn parked(client: &Conn, shutdown: &Signal) {
    let crate::net::stream::Stream::Plain(socket) = &client.stream else {
        return;
    };
    let mut moved = std::pin::pin!(shutdown.next_move());
    moved.as_mut().enable();
    if shutdown.phase() >= Phase::HandingOver {
        return;
    }
    std::future::poll_fn(|cx| {
        // Ready, or failed: either way the relay's next read finds out which.
        if socket.poll_read_ready(cx).is_ready()
            || std::future::Future::poll(moved.as_mut(), cx).is_ready()
        {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// Which idle limit applies to a quiet client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IdleKind {
    /// Outside a transaction (`HANDOFF_CLIENT_IDLE_TIMEOUT`).
    Client,
    /// Inside a transaction (`HANDOFF_IDLE_TRANSACTION_TIMEOUT`).
    Transaction,
}

/// The idle limits of a session (zero: none); off by default, so no timer runs on the
/// hot path.
#[derive(Debug, Clone, Copy)]
pub(super) struct IdleLimits {
    pub client: Duration,
    pub transaction: Duration,
}

impl IdleLimits {
    /// The limits the proxy is configured with.
    fn of(txn: &Txn) -> Self {
        IdleLimits {
            client: txn.ctx.settings.client_idle_timeout,
            transaction: txn.ctx.settings.idle_transaction_timeout,
        }
    }

    /// The limit for a client that is quiet outside a transaction (`outside`) or inside
    /// one (`inside`), if any.
    pub fn pick(&self, outside: bool, inside: bool) -> Option<(Duration, IdleKind)> {
        if outside && !self.client.is_zero() {
            Some((self.client, IdleKind::Client))
        } else if inside && !self.transaction.is_zero() {
            Some((self.transaction, IdleKind::Transaction))
        } else {
            None
        }
    }

    /// The FATAL a client gets when `kind` expires.
    pub fn error(&self, kind: IdleKind) -> ProxyError {
        match kind {
            IdleKind::Client => ProxyError::fatal(
                sqlstate::IDLE_SESSION_TIMEOUT,
                format!(
                    "terminating connection due to idle-session timeout (HANDOFF_CLIENT_IDLE_TIMEOUT is {:?})",
                    self.client
                ),
            ),
            IdleKind::Transaction => ProxyError::fatal(
                sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                format!(
                    "terminating connection due to idle-in-transaction timeout (HANDOFF_IDLE_TRANSACTION_TIMEOUT is {:?}); the transaction was rolled back",
                    self.transaction
                ),
            ),
        }
    }
}

impl IdleKind {
    fn as_str(self) -> &'static str {
        match self {
            IdleKind::Client => "client_idle",
            IdleKind::Transaction => "idle_transaction",
        }
    }
}

/// Resolves when `limit` passes; never without one. Cancel-safe (a timer).
async fn expire(limit: Option<(Duration, IdleKind)>) {
    match limit {
        Some((d, _)) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The server side of the loop: scanning where its messages are, and the buffer they
/// are read into.
struct ServerSide {
    scan: Scanner,
    buf: BytesMut,
}

impl ServerSide {
    fn new() -> Self {
        Self {
            scan: Scanner::new(MAX_INSPECT, i32::MAX as usize),
            buf: BytesMut::new(),
        }
    }

    /// No server message is half-read or half-forwarded.
    fn clean(&self) -> bool {
        self.buf.is_empty() && self.scan.at_boundary()
    }

    /// Forgets a connection that was given up: returns whether it was at a message
    /// boundary.
    fn reset(&mut self) -> bool {
        let was_clean = self.scan.at_boundary();
        self.buf.clear();
        self.scan = Scanner::new(MAX_INSPECT, i32::MAX as usize);
        was_clean
    }
}

/// What the server connection's read brought.
async fn on_server_read(
    r: std::io::Result<usize>,
    server: &mut ServerSide,
    client: &mut Conn,
    cscan: &Scanner,
    txn: &mut Txn,
) -> Result<(), End> {
    match r {
        Ok(0) | Err(_) if txn.ex.server_fatal() && txn.ex.fatal().is_none() => {
            // The server ended the connection with a FATAL the client has seen.
            Err(End::ServerGone)
        }
        Ok(0) | Err(_) => {
            // Lost under a request: the session ends if only this backend ended, or the
            // request gets an error (it may have committed) and the session goes on.
            let server_clean = server.reset();
            // Boxed here and below: rare paths, kept out of the relay future's size.
            Box::pin(txn.server_lost(client, server_clean, cscan.at_boundary())).await
        }
        Ok(_) => {
            server_bytes(&mut server.buf, &mut server.scan, client, txn).await?;
            if txn.probe.ready {
                Box::pin(txn.settle_refusal(client, server.clean())).await?;
            }
            // Only between messages in both directions: a client half-way through
            // sending a message stays on this server connection.
            if txn.clean() && server.clean() && cscan.at_boundary() {
                txn.detach(false, true);
            }
            Ok(())
        }
    }
}

/// Relays a logged-in transaction-mode client until it leaves.
async fn run(client: &mut Conn, txn: &mut Txn, shutdown: Signal) -> End {
    client.release_buffers();
    let mut cscan = Scanner::new(txn.ctx.settings.max_message_size, MAX_CLIENT_MESSAGE);
    let limits = IdleLimits::of(txn);
    let mut server = ServerSide::new();
    let mut watched = shutdown.phase().next();
    // Both signals are shared by every session: polled only when they wake the task
    // (see `OnWake`), not at every wake-up for the client or the server.
    let mut phase_change = OnWake::new(Box::pin(reach(shutdown.clone(), watched)));
    // Lameduck's cancellation of the generation this session's transaction runs on;
    // made again only when the session moves to another generation.
    let mut killed: Option<(u64, OnWake<KillFuture>)> = None;
    // Set to `KEEP_FOR` (or `PARK_AFTER`) from now each time the client becomes quiet:
    // pushing a registered timer later is an atomic update, not a new timer, so a
    // client that sends again before it is due costs no timer operation.
    let quiet_for = if txn.lot_soon { PARK_AFTER } else { KEEP_FOR };
    let mut park = std::pin::pin!(tokio::time::sleep(quiet_for));
    let end = loop {
        if !client.rbuf.is_empty() && !txn.probe.waiting(cscan.at_boundary()) {
            match client_bytes(client, &mut cscan, txn).await {
                Ok(true) => {}
                Ok(false) => break End::Terminated,
                Err(end) => break end,
            }
        }
        let phase = shutdown.phase();
        let idle = txn.link.backend.is_none() && cscan.at_boundary() && client.rbuf.is_empty();
        if phase == Phase::Closing || (phase == Phase::Draining && idle) {
            send_error(&mut client.stream, &crate::error::shutting_down()).await;
            break End::Shutdown;
        }
        // A takeover: between transactions, with nothing held or half-read, the session
        // goes to the successor (a TLS session cannot: it stays until it leaves).
        if phase == Phase::HandingOver
            && idle
            && matches!(txn.local, Local::None)
            && !txn.probe.active
            && matches!(client.stream, crate::net::stream::Stream::Plain(_))
            && txn.stayed_in() != txn.ctx.outbox.attempt()
        {
            break End::HandOver;
        }
        let attached = txn.link.backend.is_some();
        if attached {
            buffers::ready(&mut server.buf);
            if killed.as_ref().map(|k| k.0) != Some(txn.gen.id) {
                killed = Some((txn.gen.id, OnWake::new(Box::pin(txn.gen.killed()))));
            }
        } else {
            // An idle client holds no buffers: they come from the pool when bytes arrive.
            buffers::release(&mut client.rbuf);
            buffers::release(&mut server.buf);
            buffers::release(&mut txn.out);
        }
        let reading = !txn.probe.waiting(cscan.at_boundary());
        let quiet = cscan.at_boundary() && client.rbuf.is_empty();
        let in_txn_idle = quiet
            && match txn.link.backend {
                Some(_) => txn.ex.idle_in_transaction(),
                None => matches!(txn.local, Local::Aborted(_)),
            };
        let limit = limits.pick(idle && matches!(txn.local, Local::None), in_txn_idle);
        // Parked only with nothing to remember but the session: no server connection,
        // no local answer or first request pending, no idle limit running, and a plain
        // socket (a TLS session may hold decrypted bytes its socket does not show).
        let parkable = idle
            && matches!(txn.local, Local::None)
            && !txn.probe.active
            && limit.is_none()
            && matches!(client.stream, crate::net::stream::Stream::Plain(_));
        if parkable {
            park.as_mut().reset(tokio::time::Instant::now() + quiet_for);
        }
        // `readable()`, `read_buf`, timers and signals are cancel-safe: a branch that
        // loses the race has consumed nothing.
        tokio::select! {
            r = client_read(client), if reading => match r {
                Some(Ok(0)) | Some(Err(_)) => break End::ClientGone,
                Some(Ok(_)) | None => {}
            },
            r = async {
                let b = txn.link.backend.as_mut().expect("guarded by `attached`");
                b.conn.stream.read_buf(&mut server.buf).await
            }, if attached => {
                if let Err(end) = on_server_read(r, &mut server, client, &cscan, txn).await {
                    break end;
                }
            },
            _ = park.as_mut(), if parkable => {
                txn.park();
                break End::Parked;
            }
            _ = &mut phase_change, if phase < watched => {
                watched = shutdown.phase().next();
                phase_change = OnWake::new(Box::pin(reach(shutdown.clone(), watched)));
            }
            _ = expire(limit) => {
                let kind = limit.expect("a limit expired").1;
                metrics::counter!(m::CLIENT_TIMEOUTS_TOTAL, "kind" => kind.as_str()).increment(1);
                client_log!(info, txn.meter.client(), kind = kind.as_str(), "client idle timeout");
                send_error(&mut client.stream, &limits.error(kind)).await;
                break End::Timeout;
            }
            _ = async { (&mut killed.as_mut().expect("set when attached").1).await }, if attached && txn.standby().is_none() => {
                let server_clean = server.reset();
                let cancelled = txn.cancelled_by_lameduck(client, server_clean, cscan.at_boundary());
                if let Err(end) = Box::pin(cancelled).await {
                    break end;
                }
            }
        }
    };
    // A message half-forwarded in either direction makes the connection unusable.
    txn.detach(true, server.clean() && cscan.at_boundary());
    txn.meter.flush_bytes();
    end
}

type KillFuture = BoxFuture<'static, ()>;

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: IdleLimits = IdleLimits {
        client: Duration::from_secs(30),
        transaction: Duration::from_secs(5),
    };

    #[test]
    fn the_limit_follows_where_the_client_is_quiet() {
        assert_eq!(
            LIMITS.pick(true, false),
            Some((Duration::from_secs(30), IdleKind::Client))
        );
        assert_eq!(
            LIMITS.pick(false, true),
            Some((Duration::from_secs(5), IdleKind::Transaction))
        );
        assert_eq!(LIMITS.pick(false, false), None);
        let off = IdleLimits {
            client: Duration::ZERO,
            transaction: Duration::ZERO,
        };
        assert_eq!(off.pick(true, true), None, "zero means no limit");
        assert_eq!(LIMITS.error(IdleKind::Client).code, "57P05");
        assert_eq!(LIMITS.error(IdleKind::Transaction).code, "25P03");
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_expires_exactly_when_due_and_no_limit_never() {
        let started = tokio::time::Instant::now();
        expire(LIMITS.pick(false, true)).await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited <= Duration::from_millis(5002),
            "{waited:?}"
        );
        let never = tokio::time::timeout(Duration::from_secs(3600), expire(None)).await;
        assert!(never.is_err(), "no limit: the timer never fires");
    }
}
