//! The client listener: a permit per connection (`HANDOFF_MAX_CLIENT_CONN`), back-off on
//! accept errors; each session's log lines name its client (`client.addr`), from a
//! tracing span when it runs in one (see [`crate::clients::ClientInfo::span`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use handoff_protocol::error::ProxyError;
use handoff_protocol::framing::{StartupPacket, ENCRYPTION_DECLINED};
use handoff_protocol::sqlstate;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use crate::frontend::session;
use crate::frontend::Ctx;
use crate::metrics as m;
use crate::net::stream::Conn;
use crate::shutdown::{Phase, Signal};

/// Most over-limit connections being answered at once; beyond that they are just closed.
const MAX_REJECTING: usize = 256;
/// How long an over-limit client has to send its startup packet before we answer anyway.
const REJECT_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts clients until shutdown starts. Each session holds a clone of `tracker`, so
/// the proxy knows when the last one ended.
pub(crate) async fn run(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    shutdown: Signal,
    tracker: mpsc::Sender<()>,
) {
    let permits = Arc::clone(&ctx.permits);
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    let mut backoff = Duration::from_millis(5);
    let mut tracker = Some(tracker);
    loop {
        // While draining, new clients are still answered (57P01), not left to time out
        // in the backlog; the listener itself does not keep the drain waiting.
        let draining = tracker.is_none();
        let next = if draining {
            Phase::Closing
        } else {
            Phase::Draining
        };
        // While a successor takes over, it accepts on the same socket and this
        // process does not; if the successor is lost, this one accepts again.
        let handing_over = shutdown.phase() == Phase::HandingOver;
        let accepted = tokio::select! {
            r = listener.accept(), if !handing_over => r,
            _ = shutdown.left(Phase::HandingOver), if handing_over => continue,
            _ = shutdown.reached(next), if !handing_over => {
                if draining {
                    break;
                }
                tracing::info!("listener refusing new clients: shutting down");
                tracker = None;
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(ok) => {
                backoff = Duration::from_millis(5);
                ok
            }
            Err(e) => {
                // Usually EMFILE/ENFILE: wait for connections to close instead of spinning.
                tracing::warn!(error = %e, backoff = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if draining {
            metrics::counter!(m::CLIENT_REJECTED_TOTAL, "reason" => "shutdown").increment(1);
            if let Ok(slot) = Arc::clone(&rejecting).try_acquire_owned() {
                tokio::spawn(async move {
                    let err = ProxyError::fatal(
                        sqlstate::ADMIN_SHUTDOWN,
                        "handoff is shutting down: connect to another instance",
                    );
                    refuse(stream, peer, err).await;
                    drop(slot);
                });
            }
            continue;
        }
        let Some(tracker) = tracker.as_ref() else {
            continue;
        };
        match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => {
                let info = ctx.clients.register(peer, stream.local_addr().ok());
                let ctx = Arc::clone(&ctx);
                let signal = shutdown.clone();
                let tracker = tracker.clone();
                let entry = Arc::clone(&info);
                // The permit and the tracker go into the session's own future (one
                // future per task, kept for the session's whole life: no wrapper
                // around it).
                let task =
                    tokio::spawn(session::run(stream, ctx, signal, entry, (permit, tracker)));
                // For the admin console's KILL (a session that already ended is no
                // longer listed).
                info.set_abort(task.abort_handle());
            }
            Err(_) => {
                metrics::counter!(m::CLIENT_REJECTED_TOTAL, "reason" => "max_client_conn")
                    .increment(1);
                if let Ok(slot) = Arc::clone(&rejecting).try_acquire_owned() {
                    let limit = ctx.config.limits.max_client_conn;
                    tokio::spawn(async move {
                        tracing::info!(client.addr = %peer, limit, "client refused: too many connections");
                        let err = ProxyError::fatal(
                            sqlstate::TOO_MANY_CONNECTIONS,
                            format!(
                                "sorry, too many clients already (HANDOFF_MAX_CLIENT_CONN={limit})"
                            ),
                        );
                        refuse(stream, peer, err).await;
                        drop(slot);
                    });
                }
            }
        }
    }
    tracing::info!("listener stopped accepting");
}

/// Tells a client why it is refused (over the limit, or shutting down). The startup
/// packet is read first (with a short timeout) so the client is reading when the error
/// arrives.
async fn refuse(stream: TcpStream, peer: SocketAddr, err: ProxyError) {
    let mut conn = Conn::new(stream);
    let read = async {
        loop {
            match conn.read_startup().await {
                Ok(Some(StartupPacket::SslRequest | StartupPacket::GssEncRequest)) => {
                    if conn.send_raw(&[ENCRYPTION_DECLINED]).await.is_err() {
                        return false;
                    }
                }
                Ok(Some(StartupPacket::Startup { .. })) => return true,
                _ => return false,
            }
        }
    };
    if !matches!(
        tokio::time::timeout(REJECT_READ_TIMEOUT, read).await,
        Ok(true)
    ) {
        return;
    }
    tracing::debug!(client.addr = %peer, code = err.code, "client refused");
    crate::error::send_error(&mut conn.stream, &err).await;
}
