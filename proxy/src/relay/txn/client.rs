//! The client's side of the transaction-mode relay: waiting for its bytes without
//! holding a buffer, the gate at a transaction's first message, and forwarding its
//! messages (rewriting statement names) to the server connection.

use bytes::{Buf, BytesMut};
use handoff_protocol::error::ProxyError;
use handoff_protocol::framing::HEADER_LEN;
use handoff_protocol::frontend::tag as ftag;
use handoff_protocol::scan::{Scanner, Step};
use handoff_protocol::{sql, sqlstate, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::local::Local;
use super::Txn;
use crate::error::{send_error, AttachError};
use crate::metrics as m;
use crate::net::buffers;
use crate::net::stream::Conn;
use crate::relay::common::{protocol_error, write_client, End};

fn inspect_client(t: u8) -> bool {
    matches!(t, ftag::PARSE | ftag::BIND | ftag::DESCRIBE | ftag::CLOSE)
}

/// Waits for client bytes and reads them into `client.rbuf`: `None` if the socket
/// turned out to have nothing after all. A plain socket is waited on without a buffer
/// (an idle client holds none); a TLS stream is read into a buffer directly, since
/// decrypted bytes may already wait inside the TLS session. Cancel-safe.
pub(super) async fn client_read(client: &mut Conn) -> Option<std::io::Result<usize>> {
    match &mut client.stream {
        crate::net::stream::Stream::Plain(s) => {
            if let Err(e) = s.readable().await {
                return Some(Err(e));
            }
            buffers::ready(&mut client.rbuf);
            read_now(s, &mut client.rbuf).await
        }
        other => {
            buffers::ready(&mut client.rbuf);
            Some(other.read_buf(&mut client.rbuf).await)
        }
    }
}

/// Reads what the socket has now without waiting: `None` if nothing is there after all.
/// Unlike `try_read_buf` this goes through `poll_read`, which marks the socket drained
/// after a short read, so the next wait does not start with a read that finds nothing.
///
/// A task out of the runtime's cooperative budget waits for its next turn instead: the
/// read then says `Pending` with the socket still readable, and reporting that as
/// nothing read sent the relay's loop back to a wait that is over at once (`readable`
/// does not count against the budget), round and round without handing the turn back.
async fn read_now(
    stream: &mut tokio::net::TcpStream,
    buf: &mut BytesMut,
) -> Option<std::io::Result<usize>> {
    use std::future::Future;
    use std::task::Poll;
    std::future::poll_fn(|cx| {
        let read = std::pin::pin!(stream.read_buf(buf));
        match read.poll(cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            // The read woke the task for its next turn before saying `Pending`.
            Poll::Pending if !tokio::task::coop::has_budget_remaining() => Poll::Pending,
            Poll::Pending => Poll::Ready(None),
        }
    })
    .await
}

/// Forwards the client's complete messages, attaching a server connection at the start
/// of a transaction (through the shard's gate). `Ok(false)`: the client sent Terminate.
pub(super) async fn client_bytes(
    client: &mut Conn,
    scan: &mut Scanner,
    txn: &mut Txn,
) -> Result<bool, End> {
    let now = Instant::now();
    let mut pos = 0;
    let mut keep_going = true;
    let mut answers = BytesMut::new();
    txn.out.clear();
    loop {
        // The transaction's first request is complete and may yet be re-sent: what the
        // client sends next waits until its outcome is known.
        if txn.probe.waiting(scan.at_boundary()) {
            break;
        }
        let local = !matches!(txn.local, Local::None);
        let step = match scan.step(&client.rbuf[pos..], |t| {
            if local {
                matches!(t, ftag::QUERY | ftag::PARSE | ftag::BIND)
            } else {
                // A Query is looked at whole when it fits: LISTEN at a transaction's
                // start is refused below, SQL-level prepared statements are mapped.
                inspect_client(t) || t == ftag::QUERY
            }
        }) {
            Ok(s) => s,
            Err(e) => {
                flush_to_server(txn).await?;
                write_client(client, &answers).await?;
                // Boxed here and below: error paths, kept out of the relay future.
                Box::pin(protocol_error(&mut client.stream, &e)).await;
                return Err(End::ClientProtocol);
            }
        };
        let (tag, len, whole) = match step {
            Step::NeedMore => break,
            Step::Pass { len, tag } => (tag, len, false),
            Step::Message { tag, len } => (Some(tag), len, true),
        };
        if let (Some(t), false) = (tag, whole) {
            if !local && inspect_client(t) {
                flush_to_server(txn).await?;
                write_client(client, &answers).await?;
                return Err(Box::pin(too_large(client, txn, t)).await);
            }
        }
        if tag == Some(ftag::TERMINATE) {
            pos += len;
            keep_going = false;
            break;
        }
        if tag.is_some() && txn.link.backend.is_none() && matches!(txn.local, Local::None) {
            let body = &client.rbuf[pos + HEADER_LEN.min(len)..pos + len];
            match tag.filter(|_| whole).and_then(|t| refused_here(t, body)) {
                Some(err) => txn.local = Local::Refuse(Box::new(err)),
                None => gate(client, txn, &answers, pos).await?,
            }
        }
        if !matches!(txn.local, Local::None) {
            // Answered here, never relayed.
            if let Some(t) = tag {
                let body = if whole {
                    &client.rbuf[pos + HEADER_LEN..pos + len]
                } else {
                    &[][..]
                };
                txn.answer_locally(t, body, &mut answers);
            }
            pos += len;
            continue;
        }
        if txn.out.capacity() == 0 {
            // From the thread's pool, and back to it when the client is idle again;
            // taken only now, past the gate, so a client waiting there for a server
            // connection holds no output buffer.
            buffers::ready(&mut txn.out);
        }
        txn.on_probation(tag, &client.rbuf[pos..pos + len], &mut answers);
        // Before the Query's ReadyForQuery is owed: what the rewrite expects comes first.
        let rewritten = if whole && tag == Some(ftag::QUERY) {
            txn.translate_query(&client.rbuf[pos + HEADER_LEN..pos + len])
        } else {
            None
        };
        if let Some(t) = tag {
            txn.note_request(t, &client.rbuf[pos..pos + len], now);
        }
        if let Some(q) = rewritten {
            txn.out.extend_from_slice(&q);
            pos += len;
            continue;
        }
        if whole && tag != Some(ftag::QUERY) && txn.pass_unnamed(&client.rbuf[pos..pos + len]) {
            pos += len;
            continue;
        }
        if whole && tag != Some(ftag::QUERY) {
            // Everything before it is already copied into `out`: take the message off
            // the buffer without copying it (Binds carry parameter values).
            client.rbuf.advance(pos);
            pos = 0;
            let mut msg = client.rbuf.split_to(len).freeze();
            let tag = msg[0];
            msg.advance(HEADER_LEN);
            if let Err(e) = txn.translate(Frame { tag, body: msg }) {
                flush_to_server(txn).await?;
                Box::pin(protocol_error(&mut client.stream, &e)).await;
                return Err(End::ClientProtocol);
            }
            continue;
        }
        txn.out.extend_from_slice(&client.rbuf[pos..pos + len]);
        pos += len;
    }
    client.rbuf.advance(pos);
    flush_to_server(txn).await?;
    write_client(client, &answers).await?;
    Ok(keep_going)
}

/// A request transaction mode cannot serve, refused before it reaches a server: LISTEN
/// (in a Query, or a Parse), whose notifications would go to a server connection other
/// clients share and never reach this client.
fn refused_here(tag: u8, body: &[u8]) -> Option<ProxyError> {
    let sql = match tag {
        ftag::QUERY => body.strip_suffix(&[0]).unwrap_or(body),
        ftag::PARSE => handoff_protocol::body::parse_sql(body)?,
        _ => return None,
    };
    sql::listens(sql).then(|| {
        ProxyError::error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "LISTEN is not supported in transaction pooling mode: notifications go to a server connection other clients share and would never reach this client",
        )
        .hint("listen through a handoff in session mode (HANDOFF_POOL_MODE=session), or connect to the server directly")
    })
}

/// A message the proxy must parse whole is over `HANDOFF_MAX_MESSAGE_SIZE`: the stream
/// cannot be followed past it, so the session ends.
async fn too_large(client: &mut Conn, txn: &Txn, tag: u8) -> End {
    metrics::counter!(m::MESSAGES_TOO_LARGE_TOTAL).increment(1);
    let max = txn.ctx.settings.max_message_size;
    let err = ProxyError::fatal(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        format!(
            "a '{}' message larger than HANDOFF_MAX_MESSAGE_SIZE ({max} bytes) cannot be relayed",
            tag as char
        ),
    );
    send_error(&mut client.stream, &err).await;
    End::TooLarge
}

/// The first message of a transaction: through the shard's gate to a server connection.
/// A refusal (the buffer gave up, no primary) is answered locally; any other failure
/// ends the session (the answers owed so far go first).
async fn gate(client: &mut Conn, txn: &mut Txn, answers: &[u8], pos: usize) -> Result<(), End> {
    let attached = match txn.attach_now() {
        super::Now::Attached => Ok(()),
        now => Box::pin(txn.attach_waiting(client.rbuf.len() - pos, now)).await,
    };
    match attached {
        Ok(()) => {
            if txn.retries_left > 0 {
                txn.probe.begin();
            }
            Ok(())
        }
        // Boxed: the error's state would otherwise widen every relay future.
        Err(e) => Box::pin(not_attached(client, txn, answers, e)).await,
    }
}

/// [`gate`] could not attach: a refusal is answered locally, anything else ends the
/// session.
async fn not_attached(
    client: &mut Conn,
    txn: &mut Txn,
    answers: &[u8],
    e: AttachError,
) -> Result<(), End> {
    let err = e.to_client(txn.shard());
    if e.is_refusal() {
        client_log!(info, txn.meter.client(), shard = txn.shard(), error = %err, "request refused");
        txn.local = Local::Refuse(Box::new(err));
        return Ok(());
    }
    client_log!(warn, txn.meter.client(), error = %err, "no server connection for client");
    write_client(client, answers).await?;
    send_error(&mut client.stream, &err).await;
    Err(End::ServerGone)
}

impl Txn {
    /// While the first request is on probation its bytes are kept; a message that ends
    /// it completes the request, one that cannot be re-sent (Flush, COPY data) ends the
    /// probation and lets the held answers go (into `answers`).
    fn on_probation(&mut self, tag: Option<u8>, bytes: &[u8], answers: &mut BytesMut) {
        if !self.probe.active {
            return;
        }
        self.probe.record(bytes);
        match tag {
            Some(ftag::QUERY | ftag::SYNC | ftag::FUNCTION_CALL) => self.probe.complete = true,
            // A client that flushes waits for answers before it finishes the request;
            // COPY data means the request already ran.
            Some(ftag::FLUSH | ftag::COPY_DATA | ftag::COPY_DONE | ftag::COPY_FAIL) => {
                self.probe.active = false;
            }
            _ => {}
        }
        if !self.probe.active {
            let held = self.end_probe();
            answers.extend_from_slice(&held);
            self.probe.give_back(held);
        }
    }

    /// Keeps count of what a message owes: a ReadyForQuery for each Query, Sync and
    /// FunctionCall; an open batch after Execute or Flush; whether the request ends the
    /// transaction block.
    fn note_request(&mut self, tag: u8, message: &[u8], now: Instant) {
        self.meter.on_request(now);
        if tag == ftag::QUERY {
            let head = &message[HEADER_LEN.min(message.len())..message.len().min(HEADER_LEN + 32)];
            self.ending |= sql::ends_transaction(head).is_some();
        }
        match tag {
            ftag::QUERY | ftag::FUNCTION_CALL => self.ex.query_sent(),
            ftag::SYNC => self.ex.sync_sent(),
            ftag::EXECUTE | ftag::FLUSH => self.ex.batch_opened(),
            _ => {}
        }
    }
}
/// Sends what the client's bytes made for the server. A write that fails does not end
/// the session here: the server connection is gone (reset, closed — a backend that
/// died, a standby killed), and its read, next in the relay's loop, finds that out and
/// handles it as a connection lost under a request (an error for the request, the
/// session going on where it can; the retry rules where the primary is gone), as when
/// the read side notices first. Ending the session here closed the client's socket
/// without a word.
pub(super) async fn flush_to_server(txn: &mut Txn) -> Result<(), End> {
    if txn.out.is_empty() {
        return Ok(());
    }
    let Some(b) = txn.link.backend.as_mut() else {
        txn.out.clear();
        return Ok(());
    };
    let r = b.conn.stream.write_all(&txn.out).await;
    txn.meter.add(txn.out.len() as u64, 0);
    txn.out.clear();
    if let Err(e) = r {
        tracing::debug!(error = %e, "a write to the server connection failed: its read will say how");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's bytes read by a task that has spent its cooperative budget come in its
    /// next turn; `None` (nothing there) would send the relay's loop round again without
    /// handing its turn back, for ever.
    #[tokio::test]
    async fn bytes_read_with_the_budget_spent_are_read_in_the_next_turn() {
        let (ours, mut theirs) = crate::testing::socket_pair().await;
        theirs
            .write_all(b"Q\0\0\0\rSELECT 1\0")
            .await
            .expect("the client's write");
        let mut client = Conn::new(ours);
        let read = tokio::spawn(async move {
            // The runtime has seen the bytes come: the wait below is over at once.
            if let crate::net::stream::Stream::Plain(s) = &client.stream {
                s.readable().await.expect("readable");
            }
            crate::testing::spend_budget().await;
            let r = client_read(&mut client).await;
            (r.map(|r| r.map_err(|e| e.kind())), client.rbuf.len())
        });
        let (r, held) = tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .expect("the read finished")
            .expect("the task");
        assert_eq!(r, Some(Ok(14)));
        assert_eq!(held, 14);
    }
}
