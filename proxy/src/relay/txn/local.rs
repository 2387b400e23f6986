//! Answers the proxy gives a client itself instead of relaying: a request refused at
//! the gate (the buffer gave up, or there is no primary), and a transaction lost with its
//! server connection (lameduck, or a failed primary), answered as PostgreSQL would
//! answer a failed transaction block until the client ends it.

use bytes::BytesMut;
use handoff_protocol::backend::{BackendMessage, TransactionStatus};
use handoff_protocol::error::ProxyError;
use handoff_protocol::frontend::tag as ftag;
use handoff_protocol::{body, sql, sqlstate};

use super::Txn;
use crate::backend::cancel::ServerKey;
use crate::error::send_error;
use crate::metrics as m;
use crate::net::stream::Conn;
use crate::relay::common::{write_client, End};
use crate::shard::failure::Report;
use crate::shard::health;

/// Requests the proxy answers itself instead of relaying.
#[derive(Debug, Default)]
pub(super) enum Local {
    #[default]
    None,
    /// The request that was starting a transaction is refused with this error: answer
    /// it at once (a client that sends Flush waits for it), skip the rest of the request
    /// up to its Query or Sync, and answer ReadyForQuery `I` there. (Boxed, as below:
    /// an error is rare and ~100 bytes, and every client's state holds a `Local`.)
    Refuse(Box<ProxyError>),
    /// The refusal was answered; the rest of the request is skipped up to its Sync.
    Refused,
    /// The client's transaction was lost with its server connection (lameduck, or a
    /// failed primary): answer ROLLBACK, and everything else with an error, until the
    /// transaction ends.
    Aborted(Aborted),
}

/// A transaction the proxy answers for after losing its server connection.
#[derive(Debug, Default)]
pub(super) struct Aborted {
    /// The error that ended the transaction, not yet delivered.
    first: Option<Box<ProxyError>>,
    /// This extended-protocol batch already got its error (the rest is skipped to Sync).
    errored: bool,
    /// This batch runs a transaction-control statement: `Some(true)` COMMIT/END,
    /// `Some(false)` ROLLBACK/ABORT.
    ending: Option<bool>,
    /// It ran: the Sync ends the transaction.
    ended: bool,
}

impl Aborted {
    pub(super) fn new(first: Option<ProxyError>) -> Self {
        Self {
            first: first.map(Box::new),
            ..Self::default()
        }
    }

    /// Answers a statement in the failed transaction: the cancellation the first time,
    /// then 25P02 as PostgreSQL does; once per extended-protocol batch.
    fn fail(&mut self, out: &mut BytesMut) {
        if self.errored {
            return;
        }
        let err = self.first.take().map_or_else(aborted_error, |e| *e);
        err.encode(out);
        m::count_error("proxy", err.code);
        self.errored = true;
    }
}

/// What PostgreSQL answers in a failed transaction block (25P02).
fn aborted_error() -> ProxyError {
    ProxyError::error(
        sqlstate::IN_FAILED_SQL_TRANSACTION,
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

pub(super) fn encode_ready(out: &mut BytesMut, status: TransactionStatus) {
    BackendMessage::ReadyForQuery(status).encode(out);
}

impl Txn {
    /// Answers one client message while the proxy speaks for the server ([`Local`]).
    /// `body` is the whole message for a Query, Parse or Bind, empty otherwise.
    pub(super) fn answer_locally(&mut self, tag: u8, body: &[u8], out: &mut BytesMut) {
        let ends_request = tag == ftag::QUERY || tag == ftag::SYNC;
        match std::mem::take(&mut self.local) {
            Local::None => {}
            Local::Refuse(err) => {
                err.encode(out);
                m::count_error("proxy", err.code);
                if ends_request {
                    encode_ready(out, TransactionStatus::Idle);
                } else {
                    self.local = Local::Refused;
                }
            }
            Local::Refused => {
                if ends_request {
                    encode_ready(out, TransactionStatus::Idle);
                } else {
                    self.local = Local::Refused;
                }
            }
            Local::Aborted(mut a) => {
                if tag == ftag::QUERY {
                    let verdict = sql::ends_transaction(body.strip_suffix(&[0]).unwrap_or(body));
                    match verdict {
                        // ROLLBACK, or COMMIT of a transaction that was cancelled: the
                        // transaction is over either way; COMMIT hears of the
                        // cancellation once.
                        Some(commit) => {
                            match a.first.take().filter(|_| commit) {
                                Some(err) => {
                                    err.encode(out);
                                    m::count_error("proxy", err.code);
                                }
                                None => BackendMessage::CommandComplete {
                                    tag: "ROLLBACK".into(),
                                }
                                .encode(out),
                            }
                            encode_ready(out, TransactionStatus::Idle);
                        }
                        None => {
                            a.fail(out);
                            encode_ready(out, TransactionStatus::Failed);
                            a.errored = false;
                            self.local = Local::Aborted(a);
                        }
                    }
                    return;
                }
                // The extended protocol, as PostgreSQL answers it in a failed
                // transaction: transaction control goes through, Close and Sync are
                // answered, anything else is an error (once per batch).
                match tag {
                    ftag::PARSE => match body::parse_sql(body).and_then(sql::ends_transaction) {
                        Some(commit) if !a.errored => {
                            a.ending = Some(commit);
                            BackendMessage::ParseComplete.encode(out);
                        }
                        _ => a.fail(out),
                    },
                    ftag::BIND => {
                        let named = body::bind_statement(body)
                            .filter(|n| !n.is_empty())
                            .and_then(|n| self.named().stmts.get(n))
                            .and_then(|d| sql::ends_transaction(&d.sql));
                        if let Some(commit) = named.filter(|_| !a.errored) {
                            a.ending = Some(commit);
                        }
                        if a.ending.is_some() && !a.errored {
                            BackendMessage::BindComplete.encode(out);
                        } else {
                            a.fail(out);
                        }
                    }
                    ftag::DESCRIBE if a.ending.is_some() && !a.errored => {
                        BackendMessage::NoData.encode(out)
                    }
                    ftag::EXECUTE if a.ending.is_some() && !a.errored => {
                        match a.first.take().filter(|_| a.ending == Some(true)) {
                            Some(err) => {
                                err.encode(out);
                                m::count_error("proxy", err.code);
                                a.errored = true;
                            }
                            None => BackendMessage::CommandComplete {
                                tag: "ROLLBACK".into(),
                            }
                            .encode(out),
                        }
                        a.ended = true;
                    }
                    ftag::CLOSE if !a.errored => BackendMessage::CloseComplete.encode(out),
                    ftag::CLOSE | ftag::FLUSH => {}
                    ftag::SYNC => {
                        if a.ended {
                            encode_ready(out, TransactionStatus::Idle);
                            return;
                        }
                        encode_ready(out, TransactionStatus::Failed);
                        a.errored = false;
                        a.ending = None;
                    }
                    ftag::FUNCTION_CALL => {
                        a.fail(out);
                        encode_ready(out, TransactionStatus::Failed);
                        a.errored = false;
                    }
                    _ => a.fail(out),
                }
                self.local = Local::Aborted(a);
            }
        }
    }

    /// Lameduck gave up on this transaction: cancel it on the old primary, drop that
    /// connection, and tell the client (57P01; 08006 when the primary had failed, at
    /// once when another primary was established meanwhile).
    /// `server_clean`: no server message was half-forwarded; `client_clean`: the client
    /// is between messages.
    pub(super) async fn cancelled_by_lameduck(
        &mut self,
        client: &mut Conn,
        server_clean: bool,
        client_clean: bool,
    ) -> Result<(), End> {
        metrics::counter!(crate::metrics::LAMEDUCK_CANCELLED, "shard" => self.shard().to_string())
            .increment(1);
        let timeout = self.ctx.settings.drain_timeout;
        let err = match self.gen.lost() {
            Some(why) if self.gen.superseded() => ProxyError::error(
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "lost the primary of shard \"{}\" ({why}) and another primary was established while the transaction waited on it; it may or may not have taken effect",
                    self.shard()
                ),
            )
            .hint("check whether it took effect before running it again"),
            Some(why) => ProxyError::error(
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "lost the primary of shard \"{}\" ({why}) and the transaction did not finish within HANDOFF_DRAIN_TIMEOUT ({timeout:?}); it may or may not have taken effect",
                    self.shard()
                ),
            )
            .hint("check whether it took effect before running it again"),
            None => ProxyError::error(
                sqlstate::ADMIN_SHUTDOWN,
                format!(
                    "transaction cancelled: the primary of shard \"{}\" is being replaced and the transaction did not finish within HANDOFF_DRAIN_TIMEOUT ({timeout:?})",
                    self.shard()
                ),
            )
            .hint("the transaction was rolled back; retry it"),
        };
        client_log!(
            info,
            self.meter.client(),
            shard = self.shard(),
            "lameduck cancelled a transaction"
        );
        self.abandon(client, err, true, server_clean, client_clean)
            .await
    }

    /// A server connection closed under a request. If the primary still serves (handoff
    /// checks it), only this backend ended — an administrator terminated it, or it died
    /// alone — and the session ends as it would on PostgreSQL: the server's FATAL (or a
    /// connection failure) to the client, then the connection closed. If the primary is
    /// gone, the request gets an error and the session goes on to the next primary.
    pub(super) async fn server_lost(
        &mut self,
        client: &mut Conn,
        server_clean: bool,
        client_clean: bool,
    ) -> Result<(), End> {
        if let Some(host) = self.standby().cloned() {
            // A standby: only reads ran there, and the next transaction goes to another.
            self.standby_failed("the connection to it was lost under a request");
            let code = self
                .ex
                .take_fatal()
                .and_then(|(code, _)| sqlstate::known(&code))
                .filter(|c| sqlstate::is_operator_intervention(c))
                .unwrap_or(sqlstate::CONNECTION_FAILURE);
            let err = ProxyError::error(
                code,
                format!(
                    "lost the connection to standby {host} of shard \"{}\" while a read ran",
                    self.shard()
                ),
            )
            .hint("the session goes on: its next transaction goes to another standby");
            client_log!(info, self.meter.client(), shard = self.shard(), standby = %host, "standby connection lost under a request");
            return self
                .abandon(client, err, false, server_clean, client_clean)
                .await;
        }
        let fatal = self.ex.fatal().cloned();
        let what = if fatal.is_some() {
            Report::ServerFatal
        } else {
            Report::ConnectionLost
        };
        let gen = std::sync::Arc::clone(&self.gen);
        let primary_gone = health::suspect(&self.ctx.shard, &self.state, &gen, what).await;
        if !primary_gone {
            let (code, message) = fatal.unwrap_or_else(|| {
                (
                    sqlstate::CONNECTION_FAILURE.to_string(),
                    "the server closed the connection unexpectedly".to_string(),
                )
            });
            let code = sqlstate::known(&code).unwrap_or(sqlstate::CONNECTION_FAILURE);
            client_log!(info, self.meter.client(), shard = self.shard(), %message, "a server backend ended while the primary serves: ending the client's session");
            let err = ProxyError::error(code, message);
            // Sent as FATAL, and the session ends.
            return self.abandon(client, err, false, server_clean, false).await;
        }
        let err = self.lost_error();
        client_log!(info, self.meter.client(), shard = self.shard(), error = %err.message, "server connection lost under a request");
        self.abandon(client, err, false, server_clean, client_clean)
            .await
    }

    /// The error for a server connection that closed under a request: the primary was
    /// lost, and what was running may or may not have committed.
    pub(super) fn lost_error(&mut self) -> ProxyError {
        let (code, what) = match self.ex.take_fatal() {
            Some((code, msg)) => (
                code,
                format!(
                    "the primary of shard \"{}\" ended the connection while a request ran ({msg})",
                    self.shard()
                ),
            ),
            None => {
                health::report(&self.state, Report::ConnectionLost);
                (
                    sqlstate::CONNECTION_FAILURE.to_string(),
                    format!(
                        "lost the connection to the primary of shard \"{}\" while a request ran",
                        self.shard()
                    ),
                )
            }
        };
        let code = sqlstate::known(&code)
            .filter(|c| sqlstate::is_operator_intervention(c))
            .unwrap_or(sqlstate::CONNECTION_FAILURE);
        ProxyError::error(code, format!("{what}; it may or may not have taken effect")).hint(
            "the session goes on; check whether the request took effect before running it again",
        )
    }

    /// Gives up the server connection under a running request and answers the client
    /// with `err` in its place (a CancelRequest first when `cancel`). Inside a
    /// transaction block the proxy then answers for the rolled-back transaction until
    /// the client ends it.
    pub(super) async fn abandon(
        &mut self,
        client: &mut Conn,
        err: ProxyError,
        cancel: bool,
        server_clean: bool,
        client_clean: bool,
    ) -> Result<(), End> {
        // Nothing of a held-back answer reached the client.
        let server_clean = server_clean || self.probe.active;
        if let Some(b) = self.link.backend.take() {
            if cancel {
                let key = ServerKey::clone(&b.cancel);
                let timeout = self.ctx.settings.connect_timeout;
                tokio::spawn(crate::backend::cancel::cancel_server(key, timeout));
            }
            self.link.pool.discard(b);
            self.leave();
        }
        self.reading = None;
        self.registration.set_server(None);
        drop(self.end_probe());
        let (pending, status) = self.ex.lost();
        if let Some(n) = self.named.as_mut() {
            n.preparing.clear();
            n.defining.clear();
        }
        if !server_clean {
            return Err(End::ServerGone);
        }
        if !client_clean {
            let fatal = ProxyError::fatal(err.code, err.message.clone());
            send_error(&mut client.stream, &fatal).await;
            return Err(End::ServerGone);
        }
        let mut out = BytesMut::new();
        if pending == 0 {
            // Idle in a transaction, or half-way through sending a request: the end of
            // the next request hears of it.
            self.local = if status == TransactionStatus::Idle {
                Local::Refuse(Box::new(err))
            } else {
                Local::Aborted(Aborted::new(Some(err)))
            };
            return Ok(());
        }
        let ending = std::mem::take(&mut self.ending);
        let after = if status == TransactionStatus::Idle || ending {
            TransactionStatus::Idle
        } else {
            self.local = Local::Aborted(Aborted::new(None));
            TransactionStatus::Failed
        };
        // Every request still owed an answer was lost with the connection.
        for _ in 0..pending {
            err.encode(&mut out);
            encode_ready(&mut out, after);
        }
        m::count_error("proxy", err.code);
        write_client(client, &out).await
    }
}
