//! The server's side of the transaction-mode relay: forwarding its messages to the
//! client while settling the replies owed to the proxy's own messages, tracking
//! ReadyForQuery, errors and parameter changes, and holding answers back while a first
//! request is on probation.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use handoff_protocol::backend::tag as btag;
use handoff_protocol::backend::BackendMessage;
use handoff_protocol::error::{ErrorFields, Severity};
use handoff_protocol::framing::HEADER_LEN;
use handoff_protocol::scan::{Scanner, Step};
use handoff_protocol::{body, sqlstate};

use super::params::TRACKED_PARAMS;
use super::prepared::stale_statement;
use super::probation::shows_execution;
use super::Txn;
use crate::error::send_error;
use crate::metrics as m;
use crate::net::stream::Conn;
use crate::relay::common::{write_client, End};
use crate::shard::failure::{Report, RetryReason};
use crate::shard::health;

pub(super) fn inspect_server(t: u8) -> bool {
    matches!(
        t,
        btag::READY_FOR_QUERY
            | btag::ERROR_RESPONSE
            | btag::PARSE_COMPLETE
            | btag::CLOSE_COMPLETE
            | btag::PARAMETER_STATUS
            | btag::COMMAND_COMPLETE
            | btag::EMPTY_QUERY_RESPONSE
    )
}

/// Forwards the server's messages to the client, handling the replies to the proxy's
/// own messages and tracking ReadyForQuery, errors and parameter changes. While the
/// transaction's first request may still be re-sent ([`Probation`]) its answers are held
/// back instead.
pub(super) async fn server_bytes(
    buf: &mut BytesMut,
    scan: &mut Scanner,
    client: &mut Conn,
    txn: &mut Txn,
) -> Result<(), End> {
    let mut pos = 0;
    let mut run = 0;
    loop {
        let step = match scan.step(&buf[pos..], inspect_server) {
            Ok(s) => s,
            Err(e) => {
                client_log!(warn, txn.meter.client(), error = %e, "protocol error from server");
                let err = crate::error::server_protocol_error(&e);
                send_error(&mut client.stream, &err).await;
                txn.ex.server_said_fatal(None);
                return Err(End::ServerProtocol);
            }
        };
        let (tag, len, whole) = match step {
            Step::NeedMore => break,
            Step::Pass { len, tag } => (tag, len, false),
            Step::Message { tag, len } => (Some(tag), len, true),
        };
        let Some(tag) = tag else {
            pos += len;
            continue;
        };
        let fields = if tag == btag::ERROR_RESPONSE && whole {
            let mut b = Bytes::copy_from_slice(&buf[pos + HEADER_LEN..pos + len]);
            ErrorFields::parse(&mut b).ok()
        } else {
            None
        };
        let refusal = fields.as_ref().and_then(|f| {
            (f.level() == Some(Severity::Error))
                .then(|| f.code().and_then(RetryReason::of_refusal))
                .flatten()
        });
        // A statement the proxy cached on this connection refused as stale: prepared
        // afresh next time. One the server no longer has: a first request goes again
        // (a stale plan's error goes to the client, which must learn the new shape).
        let code = fields
            .as_ref()
            .and_then(|f| f.code().map(|c| (c, f.message())));
        let stale = code.is_some_and(|(c, m)| stale_statement(c, m)) && txn.statements_stale();
        let stale = stale
            && code
                .is_some_and(|(c, _)| c == handoff_protocol::sqlstate::INVALID_SQL_STATEMENT_NAME);
        if txn.probe_sees(tag, refusal, stale) {
            // The request ran (or nothing in it could have side effects): the held
            // answers go, in order.
            let held = txn.end_probe();
            write_client(client, &held).await?;
            txn.probe.give_back(held);
        }
        if !whole {
            pos += len;
            continue;
        }
        let body = &buf[pos + HEADER_LEN..pos + len];
        match tag {
            btag::PARSE_COMPLETE | btag::CLOSE_COMPLETE => match txn.on_complete(tag) {
                Some(t) => buf[pos] = t,
                None => {
                    emit(client, txn, &buf[run..pos]).await?;
                    run = pos + len;
                }
            },
            btag::READY_FOR_QUERY => {
                let status = handoff_protocol::backend::ready_status(body)
                    .map_err(|_| End::ServerProtocol)?;
                txn.on_ready(status);
                if txn.probe.active && (txn.probe.refused.is_some() || txn.probe.stale) {
                    txn.probe.ready = true;
                }
            }
            btag::COMMAND_COMPLETE => {
                let discard = body.starts_with(b"DISCARD ALL\0");
                if discard || body.starts_with(b"DEALLOCATE ALL\0") {
                    txn.statements_dropped();
                }
                if discard {
                    txn.discard_params();
                }
                if body.starts_with(b"DROP DATABASE\0") || body.starts_with(b"ALTER DATABASE\0") {
                    txn.database_changed();
                }
            }
            btag::EMPTY_QUERY_RESPONSE => {
                if let Some(t) = txn.on_empty_query() {
                    emit(client, txn, &buf[run..pos]).await?;
                    let mut cc = BytesMut::new();
                    BackendMessage::CommandComplete { tag: t.to_string() }.encode(&mut cc);
                    emit(client, txn, &cc).await?;
                    run = pos + len;
                }
            }
            btag::ERROR_RESPONSE => {
                if let Some(f) = &fields {
                    if txn.on_server_error(f, refusal) {
                        // Kept from the client until the connection closes.
                        emit(client, txn, &buf[run..pos]).await?;
                        run = pos + len;
                    }
                }
                txn.on_error();
            }
            btag::PARAMETER_STATUS => {
                if let Some((name, value)) = body::parameter_status(body) {
                    txn.on_parameter(name, value);
                }
            }
            _ => {}
        }
        pos += len;
    }
    emit(client, txn, &buf[run..pos]).await?;
    txn.meter.add(0, pos as u64);
    buf.advance(pos);
    Ok(())
}

impl Txn {
    /// A server message while the first request is on probation: a retriable refusal
    /// of its first statement is noted; anything that shows the request ran (or an
    /// error, or ReadyForQuery) ends the probation. True when it ends now.
    fn probe_sees(&mut self, tag: u8, refusal: Option<RetryReason>, stale: bool) -> bool {
        if !self.probe.active || self.probe.refused.is_some() || self.probe.stale {
            return false;
        }
        if stale {
            self.probe.stale = true;
            return false;
        }
        if refusal.is_some() {
            self.probe.refused = refusal;
            return false;
        }
        shows_execution(tag) || tag == btag::ERROR_RESPONSE || tag == btag::READY_FOR_QUERY
    }

    /// An ErrorResponse from the server (`refusal`: a retriable refusal of a first
    /// statement). True when it is a FATAL of a server going away (shutdown, crash,
    /// terminate): the client hears of it when the connection closes, as an error for
    /// its request, and keeps its session. Any other FATAL (e.g. the client's own
    /// protocol violation) is the client's, and ends it.
    fn on_server_error(&mut self, f: &ErrorFields, refusal: Option<RetryReason>) -> bool {
        let code = f.code().unwrap_or("?????");
        m::count_error("server", code);
        if f.ends_session() {
            if self.standby().is_some() {
                self.standby_failed("it ended a session (FATAL)");
            } else {
                health::report(&self.state, Report::ServerFatal);
            }
            if sqlstate::is_operator_intervention(code) {
                self.ex.server_said_fatal(Some((
                    code.to_string(),
                    f.message().unwrap_or("no message").to_string(),
                )));
                return true;
            }
            self.ex.server_said_fatal(None);
        } else if let Some(r) = refusal.filter(|_| !self.probe.active && self.standby().is_none()) {
            health::report(&self.state, r.report());
        }
        false
    }

    /// A ParameterStatus: the connection's parameters, and a client's own SET of a
    /// tracked parameter, which sticks to the client.
    fn on_parameter(&mut self, name: &str, value: &str) {
        if TRACKED_PARAMS.contains(&name) && !self.discarded {
            // Copied first if shared (with other sessions, or with the connection).
            if self.desired.get(name).map(String::as_str) != Some(value) {
                Arc::make_mut(&mut self.desired).insert(name.to_string(), value.to_string());
            }
            if let Some(bk) = self.link.backend.as_mut() {
                if bk.applied.get(name).map(String::as_str) != Some(value) {
                    Arc::make_mut(&mut bk.applied).insert(name.to_string(), value.to_string());
                }
            }
        }
        if let Some(bk) = self.link.backend.as_mut() {
            bk.params.insert(name.to_string(), value.to_string());
        }
    }
}

impl Txn {
    /// `DISCARD ALL` reset the connection's parameters to its defaults: the client's
    /// become what it asked for at startup, applied again at its next transaction.
    fn discard_params(&mut self) {
        self.discarded = true;
        self.desired = Arc::clone(&self.startup);
        if let Some(b) = self.link.backend.as_mut() {
            b.applied = Arc::default();
        }
    }
}

/// Server bytes on their way to the client: held back while the first request's outcome
/// is unknown.
async fn emit(client: &mut Conn, txn: &mut Txn, bytes: &[u8]) -> Result<(), End> {
    if txn.probe.active {
        txn.probe.hold(bytes);
        return Ok(());
    }
    write_client(client, bytes).await
}
