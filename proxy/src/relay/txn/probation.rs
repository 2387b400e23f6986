//! The retry rules for a transaction's first request: kept as the client sent it, with
//! the server's side-effect-free answers held back, until it is known whether anything of
//! it ran — or whether its first statement was refused by a primary being replaced, in
//! which case it goes again to the next primary (docs/switchover.md, "Retry rules").

use std::sync::Arc;

use bytes::BytesMut;
use handoff_protocol::backend::tag as btag;

use super::Txn;
use crate::net::stream::Conn;
use crate::relay::common::{write_client, End};
use crate::shard::failure::RetryReason;
use crate::shard::health;

/// How often one request may be re-sent after a retriable refusal.
pub(super) const MAX_RETRIES: u8 = 3;

/// A request kept for retry larger than this is not kept (it is relayed as usual).
const MAX_RETRY_BYTES: usize = 256 * 1024;
/// Largest held-back buffer kept for the next transaction.
const KEEP_HELD: usize = 16 * 1024;

/// Retry rules: the first request of a transaction, while it is not known
/// whether anything of it ran. Its bytes are kept as the client sent them, and the
/// server's side-effect-free answers (ParseComplete, BindComplete, RowDescription, …)
/// are held back until a CommandComplete, DataRow, COPY response or any other answer
/// shows that the request ran — or until a `25006`/`57P03` error shows that its first
/// statement was refused, in which case it may go to the next primary.
#[derive(Debug, Default)]
pub(super) struct Probation {
    /// Holding: the outcome is not known yet.
    pub(super) active: bool,
    /// The request's last message (Query, Sync) has been sent: no more client bytes are
    /// read until the outcome is known.
    pub(super) complete: bool,
    /// The first statement was refused with this retriable reason.
    pub(super) refused: Option<RetryReason>,
    /// A statement the proxy believed the connection held was refused as stale (its
    /// cached plan unusable, or gone) before anything ran: it is prepared afresh and the
    /// request goes again.
    pub(super) stale: bool,
    /// ReadyForQuery arrived after the refusal: the request may be re-sent.
    pub(super) ready: bool,
    /// What is kept of the request: made by the client's first transaction and kept
    /// while it is busy, so a transaction does not allocate it afresh; a parked client
    /// frees it (see `Txn::park`).
    kept: Option<Box<Kept>>,
}

#[derive(Debug, Default)]
struct Kept {
    /// The request's bytes, as the client sent them.
    raw: BytesMut,
    /// Server bytes held back from the client.
    held: BytesMut,
    /// Statement names the request defined (a Parse before the refused message): a
    /// request sent again defines them again.
    defined: Vec<bytes::Bytes>,
}

impl Probation {
    fn kept(&mut self) -> &mut Kept {
        self.kept.get_or_insert_with(Box::default)
    }

    pub(super) fn begin(&mut self) {
        self.active = true;
        if let Some(k) = self.kept.as_mut() {
            k.raw.clear();
            k.held.clear();
            k.defined.clear();
        }
        self.complete = false;
        self.refused = None;
        self.stale = false;
        self.ready = false;
    }

    /// Sending the request, message by message (or part by part, up to the end of its
    /// last message).
    pub(super) fn record(&mut self, bytes: &[u8]) {
        if self.active {
            let raw = &mut self.kept().raw;
            if raw.len() + bytes.len() > MAX_RETRY_BYTES {
                self.active = false;
            } else {
                raw.extend_from_slice(bytes);
            }
        }
    }

    /// Server bytes held back from the client until the outcome is known.
    pub(super) fn hold(&mut self, bytes: &[u8]) {
        self.kept().held.extend_from_slice(bytes);
    }

    /// The request defined statement `name`.
    pub(super) fn defined(&mut self, name: bytes::Bytes) {
        self.kept().defined.push(name);
    }

    /// The request's bytes and the names it defined, to send it again.
    fn take_request(&mut self) -> (BytesMut, Vec<bytes::Bytes>) {
        match self.kept.as_mut() {
            Some(k) => (std::mem::take(&mut k.raw), std::mem::take(&mut k.defined)),
            None => Default::default(),
        }
    }

    /// The held bytes [`Probation::release`] returned, once written: their room is
    /// kept for the next transaction instead of being allocated again.
    pub(super) fn give_back(&mut self, mut held: BytesMut) {
        if let Some(k) = self.kept.as_mut() {
            if k.held.capacity() == 0 && held.capacity() <= KEEP_HELD {
                held.clear();
                k.held = held;
            }
        }
    }

    /// Waiting for the outcome once the request's last message is through
    /// (`at_boundary`): the client's further bytes stay unread.
    pub(super) fn waiting(&self, at_boundary: bool) -> bool {
        self.active && self.complete && at_boundary
    }

    /// Stops holding; returns what was held (to go to the client first).
    pub(super) fn release(&mut self) -> BytesMut {
        self.active = false;
        self.refused = None;
        self.stale = false;
        self.ready = false;
        self.kept
            .as_mut()
            .map(|k| std::mem::take(&mut k.held))
            .unwrap_or_default()
    }
}

/// Server messages that show a request ran (or began to).
pub(super) fn shows_execution(tag: u8) -> bool {
    matches!(
        tag,
        btag::COMMAND_COMPLETE
            | btag::DATA_ROW
            | btag::COPY_IN_RESPONSE
            | btag::COPY_OUT_RESPONSE
            | btag::COPY_BOTH_RESPONSE
            | btag::EMPTY_QUERY_RESPONSE
            | btag::PORTAL_SUSPENDED
            | btag::FUNCTION_CALL_RESPONSE
            | btag::NOTIFICATION_RESPONSE
    )
}

impl Txn {
    /// The first statement of the transaction's first request was refused with
    /// `25006`/`57P03` and nothing of it ran. If the primary is indeed being replaced,
    /// the request goes again, through the buffer, to the next primary; otherwise the
    /// client gets the server's answer. A request refused because a statement the proxy
    /// had cached on the connection was stale goes again at once (the statement is
    /// prepared afresh): the client, which prepared it, never sees that error.
    pub(super) async fn settle_refusal(
        &mut self,
        client: &mut Conn,
        stream_clean: bool,
    ) -> Result<(), End> {
        let stale = self.probe.stale;
        let reason = self.probe.refused.unwrap_or(RetryReason::ReadOnly);
        let again = if stale {
            true
        } else if self.standby().is_some() {
            // A standby refuses writes (25006) as it always does: the client's answer.
            // One shutting down or starting (57P03) leaves the rotation, and the
            // request goes to another.
            let going = reason == RetryReason::CannotConnectNow;
            if going {
                self.standby_failed("it refused a request (57P03: shutting down or starting)");
            }
            going
        } else {
            let gen = Arc::clone(&self.gen);
            health::suspect(&self.ctx.shard, &self.state, &gen, reason.report()).await
        };
        if again && self.clean() && stream_clean && self.retries_left > 0 {
            self.retries_left -= 1;
            if stale {
                metrics::counter!(crate::metrics::RETRIES, "shard" => self.shard().to_string(), "reason" => "stale_statement")
                    .increment(1);
                tracing::debug!(
                    shard = self.shard(),
                    "a cached statement was stale: prepared afresh, the request goes again"
                );
            } else {
                reason.count(self.shard());
                client_log!(info, self.meter.client(), shard = self.shard(), reason = reason.as_str(), "first statement refused by a primary being replaced: sending the request to the next one");
            }
            let (mut again, defined) = self.probe.take_request();
            for name in defined {
                self.forget(&name);
            }
            self.probe.release();
            self.detach(false, true);
            again.extend_from_slice(&client.rbuf);
            client.rbuf = again;
            return Ok(());
        }
        let held = self.end_probe();
        write_client(client, &held).await?;
        self.probe.give_back(held);
        Ok(())
    }
}
