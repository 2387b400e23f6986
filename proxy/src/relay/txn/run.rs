//! The transaction-mode relay's loop: one client's session from login to its end,
//! waiting on the client, the server connection while a transaction holds one,
//! shutdown, lameduck's cancellation and the idle limits.

use bytes::BytesMut;
use handoff_protocol::backend::TransactionStatus;
use handoff_protocol::error::ProxyError;
use handoff_protocol::scan::Scanner;
use handoff_protocol::sqlstate;
use tokio::io::AsyncReadExt;

use super::client::{client_bytes, client_read};
use super::local::Local;
use super::server::server_bytes;
use super::{Txn, MAX_INSPECT};
use crate::error::send_error;
use crate::metrics as m;
use crate::net::buffers;
use crate::net::stream::Conn;
use crate::relay::common::{reach, End, MAX_CLIENT_MESSAGE};
use crate::shutdown::{Phase, Signal};

/// [`run`], boxed from a plain function so the caller's future holds only a pointer.
pub(crate) fn run_boxed<'a>(
    client: Conn,
    txn: Box<Txn<'a>>,
    shutdown: Signal,
) -> std::pin::Pin<Box<impl std::future::Future<Output = End> + 'a>> {
    Box::pin(run(client, *txn, shutdown))
}

/// Relays a logged-in transaction-mode client until it leaves.
pub(crate) async fn run(mut client: Conn, mut txn: Txn<'_>, shutdown: Signal) -> End {
    client.release_buffers();
    let mut cscan = Scanner::new(txn.shared.config.max_message_size, MAX_CLIENT_MESSAGE);
    let (client_idle_timeout, idle_transaction_timeout) = (
        txn.shared.config.client_idle_timeout,
        txn.shared.config.idle_transaction_timeout,
    );
    let mut sscan = Scanner::new(MAX_INSPECT, i32::MAX as usize);
    let mut sbuf = BytesMut::new();
    let mut watched = Phase::Draining;
    let mut phase_change = Box::pin(reach(shutdown.clone(), Phase::Draining));
    // Lameduck's cancellation of the generation this session's transaction runs on;
    // made again only when the session moves to another generation.
    let mut killed: Option<(u64, KillFuture)> = None;
    let end = loop {
        if !client.rbuf.is_empty() && !txn.probe.waiting(cscan.at_boundary()) {
            match client_bytes(&mut client, &mut cscan, &mut txn).await {
                Ok(true) => {}
                Ok(false) => break End::Terminated,
                Err(end) => break end,
            }
        }
        let phase = shutdown.phase();
        let idle = txn.backend.is_none() && cscan.at_boundary() && client.rbuf.is_empty();
        if phase == Phase::Closing || (phase == Phase::Draining && idle) {
            let err = crate::error::shutting_down();
            send_error(&mut client.stream, &err).await;
            break End::Shutdown;
        }
        let attached = txn.backend.is_some();
        if attached {
            buffers::ready(&mut sbuf);
            if killed.as_ref().map(|k| k.0) != Some(txn.gen.id) {
                killed = Some((txn.gen.id, Box::pin(txn.gen.killed())));
            }
        } else {
            // An idle client holds no buffers: they come from the pool when bytes arrive.
            buffers::release(&mut client.rbuf);
            buffers::release(&mut sbuf);
            buffers::release(&mut txn.out);
        }
        // `readable()` and `read_buf` are cancel-safe: a branch that loses the race has
        // consumed nothing.
        let reading = !txn.probe.waiting(cscan.at_boundary());
        // Idle limits (off by default: no timer on the hot path then).
        let quiet = cscan.at_boundary() && client.rbuf.is_empty();
        let in_txn_idle = quiet
            && match txn.backend {
                Some(_) => {
                    txn.pending == 0 && !txn.in_extended && txn.status != TransactionStatus::Idle
                }
                None => matches!(txn.local, Local::Aborted(_)),
            };
        let limit = if idle && matches!(txn.local, Local::None) && !client_idle_timeout.is_zero() {
            Some((client_idle_timeout, "client_idle"))
        } else if in_txn_idle && !idle_transaction_timeout.is_zero() {
            Some((idle_transaction_timeout, "idle_transaction"))
        } else {
            None
        };
        let idle_timer = async move {
            match limit {
                Some((d, _)) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = client_read(&mut client), if reading => match r {
                Some(Ok(0)) | Some(Err(_)) => break End::ClientGone,
                Some(Ok(_)) | None => {}
            },
            r = async {
                let b = txn.backend.as_mut().expect("guarded by `attached`");
                b.conn.stream.read_buf(&mut sbuf).await
            }, if attached => match r {
                Ok(0) | Err(_) if txn.server_fatal && txn.fatal.is_none() => {
                    // The server ended the connection with a FATAL the client has seen.
                    break End::ServerGone;
                }
                Ok(0) | Err(_) => {
                    // The primary went away under a request: an error for that request
                    // (it may have committed), and the session goes on.
                    let server_clean = sscan.at_boundary();
                    sbuf.clear();
                    sscan = Scanner::new(MAX_INSPECT, i32::MAX as usize);
                    let err = txn.lost_error();
                    tracing::info!(shard = txn.shard, error = %err.message, "server connection lost under a request");
                    if let Err(end) = txn.abandon(&mut client, err, false, server_clean, cscan.at_boundary()).await {
                        break end;
                    }
                }
                Ok(_) => {
                    if let Err(end) = server_bytes(&mut sbuf, &mut sscan, &mut client, &mut txn).await {
                        break end;
                    }
                    if txn.probe.ready {
                        let stream_clean = sbuf.is_empty() && sscan.at_boundary();
                        if let Err(end) = txn.settle_refusal(&mut client, stream_clean).await {
                            break end;
                        }
                    }
                    // Only between messages in both directions: a client half-way
                    // through sending a message stays on this server connection.
                    if txn.clean() && sscan.at_boundary() && sbuf.is_empty() && cscan.at_boundary() {
                        txn.detach(false, true);
                    }
                }
            },
            _ = &mut phase_change, if phase < watched => {
                watched = Phase::Closing;
                phase_change = Box::pin(reach(shutdown.clone(), Phase::Closing));
            }
            _ = idle_timer => {
                let kind = limit.map_or("", |l| l.1);
                metrics::counter!(m::CLIENT_TIMEOUTS_TOTAL, "kind" => kind).increment(1);
                let err = if kind == "client_idle" {
                    ProxyError::fatal(
                        sqlstate::IDLE_SESSION_TIMEOUT,
                        format!("terminating connection due to idle-session timeout (HANDOFF_CLIENT_IDLE_TIMEOUT is {client_idle_timeout:?})"),
                    )
                } else {
                    ProxyError::fatal(
                        sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                        format!("terminating connection due to idle-in-transaction timeout (HANDOFF_IDLE_TRANSACTION_TIMEOUT is {idle_transaction_timeout:?}); the transaction was rolled back"),
                    )
                };
                tracing::info!(kind, "client idle timeout");
                send_error(&mut client.stream, &err).await;
                break End::Timeout;
            }
            _ = async { killed.as_mut().expect("set when attached").1.as_mut().await }, if attached => {
                let server_clean = sscan.at_boundary();
                sbuf.clear();
                sscan = Scanner::new(MAX_INSPECT, i32::MAX as usize);
                if let Err(end) = txn.cancelled_by_lameduck(&mut client, server_clean, cscan.at_boundary()).await {
                    break end;
                }
            }
        }
    };
    // A message half-forwarded in either direction makes the connection unusable.
    txn.detach(
        true,
        sbuf.is_empty() && sscan.at_boundary() && cscan.at_boundary(),
    );
    txn.meter.flush_bytes();
    end
}

type KillFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
