//! The bytes of a session-mode session: both directions through reusable buffers,
//! looking only at what the proxy must — message boundaries from the client,
//! ReadyForQuery and ErrorResponse from the server. DataRow and CopyData payloads are
//! neither copied nor parsed, so a message of any size streams through in bounded
//! memory. [`run`] returns at the points the session around it acts on: a revocation
//! or a takeover between transactions, or the end.

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

use crate::clients::ClientInfo;
use crate::metrics::{self as m, RelayMeters};
use crate::net::metered::Metered;
use crate::net::stream::Conn;
use crate::relay::common::{
    protocol_error, reach, End, Meter, MAX_CLIENT_MESSAGE, MAX_INSPECT, MAX_SERVER_MESSAGE,
    READ_CHUNK,
};
use crate::relay::handover::Outbox;
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

/// A future that resolves when something happens to a session's server.
pub type Event = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// What moves a session off its server at its next transaction boundary.
pub enum Leave<'a> {
    /// Nothing.
    Never,
    /// A primary's generation: its revocation (and lameduck cancels what outlives it).
    Primary(&'a crate::shard::Generation),
    /// A standby leaving for good (promoted, or a switchover's target).
    Standby(Event),
}

/// Relays between a logged-in client and its server until one side ends, or until
/// `leave` says so and the session is between transactions (`End::Revoked`), or
/// (`movable`: the outbox, and the takeover it last failed to move in) until a
/// takeover may take it between transactions.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: &mut Conn,
    server: &mut Conn,
    shard: &str,
    shutdown: Signal,
    leave: Leave<'_>,
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
                cr, cw, sr, sw, bufs, shard, shutdown, leave, info, meters, movable,
            )
            .await
        }
        (c, s) => {
            let (cr, cw) = tokio::io::split(c);
            let (sr, sw) = tokio::io::split(s);
            relay_loop(
                cr, cw, sr, sw, bufs, shard, shutdown, leave, info, meters, movable,
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
    leave: Leave<'_>,
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
    // Only a primary's sessions are ever cancelled by lameduck.
    let (gen, mut revocation, mut killed): (_, Event, Event) = match leave {
        Leave::Primary(g) => (Some(g), Box::pin(g.revoked()), Box::pin(g.killed())),
        Leave::Standby(leaving) => (None, leaving, Box::pin(std::future::pending())),
        Leave::Never => (
            None,
            Box::pin(std::future::pending()),
            Box::pin(std::future::pending()),
        ),
    };
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
                let err = match gen.filter(|g| g.superseded()).and_then(|g| g.lost()) {
                    Some(why) => ProxyError::fatal(
                        sqlstate::CONNECTION_FAILURE,
                        format!(
                            "terminating connection: lost the primary of shard \"{shard}\" ({why}) and another primary was established; a transaction in progress may or may not have taken effect"
                        ),
                    ),
                    None => ProxyError::fatal(
                        sqlstate::ADMIN_SHUTDOWN,
                        format!(
                            "terminating connection: the primary of shard \"{shard}\" is being replaced and the transaction did not finish within HANDOFF_DRAIN_TIMEOUT"
                        ),
                    ),
                };
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
