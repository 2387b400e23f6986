//! Where a transaction's exchange with its server connection stands: what the server
//! still owes the client, whether an extended-protocol batch is open, the transaction
//! status the server last reported, and whether the server said FATAL. One place for
//! what was reset by hand in several: a connection goes back to the pool only when
//! [`Exchange::clean`] says so.

use std::collections::VecDeque;

use handoff_protocol::backend::TransactionStatus;

use super::prepared::Reply;

#[derive(Debug)]
pub(super) struct Exchange {
    /// How each expected server answer is handled, in order; a [`Reply::SyncMark`] for
    /// each ReadyForQuery owed.
    pub replies: VecDeque<Reply>,
    /// ReadyForQuery messages the server still owes.
    pending: usize,
    /// Extended-protocol messages sent since the last Sync.
    in_extended: bool,
    /// The transaction status of the server's last ReadyForQuery.
    status: TransactionStatus,
    /// The server said FATAL: the connection is going away.
    server_fatal: bool,
    /// The FATAL of a server going away (SQLSTATE, message), kept from the client until
    /// the connection is gone.
    fatal: Option<Box<(String, String)>>,
}

impl Default for Exchange {
    fn default() -> Self {
        Self {
            replies: VecDeque::new(),
            pending: 0,
            in_extended: false,
            status: TransactionStatus::Idle,
            server_fatal: false,
            fatal: None,
        }
    }
}

impl Exchange {
    /// Nothing is owed, no batch is open, the transaction is over and the server said
    /// no FATAL: the connection can serve another client.
    pub fn clean(&self) -> bool {
        self.status == TransactionStatus::Idle
            && self.pending == 0
            && !self.in_extended
            && self.replies.is_empty()
            && !self.server_fatal
    }

    /// A Query or FunctionCall was sent: one more ReadyForQuery is owed.
    pub fn query_sent(&mut self) {
        self.pending += 1;
        self.replies.push_back(Reply::SyncMark);
    }

    /// A Sync was sent: it closes the batch, and one more ReadyForQuery is owed.
    pub fn sync_sent(&mut self) {
        self.pending += 1;
        self.in_extended = false;
        self.replies.push_back(Reply::SyncMark);
    }

    /// An extended-protocol message that leaves a batch open (Parse, Bind, Execute,
    /// Flush) was sent.
    pub fn batch_opened(&mut self) {
        self.in_extended = true;
    }

    /// The server sent ReadyForQuery with `status`. True when nothing more is owed.
    pub fn ready(&mut self, status: TransactionStatus) -> bool {
        self.pending = self.pending.saturating_sub(1);
        self.status = status;
        self.pending == 0
    }

    /// The server said FATAL; `going_away` is its SQLSTATE and message when it is the
    /// FATAL of a server shutting down, crashing or terminating the backend.
    pub fn server_said_fatal(&mut self, going_away: Option<(String, String)>) {
        self.server_fatal = true;
        if let Some(f) = going_away {
            self.fatal = Some(Box::new(f));
        }
    }

    /// The server said FATAL (for any reason).
    pub fn server_fatal(&self) -> bool {
        self.server_fatal
    }

    /// The going-away FATAL the server sent, if any.
    pub fn fatal(&self) -> Option<&(String, String)> {
        self.fatal.as_deref()
    }

    /// Takes the going-away FATAL, to report it to the client once.
    pub fn take_fatal(&mut self) -> Option<(String, String)> {
        self.fatal.take().map(|f| *f)
    }

    /// Idle inside a transaction: nothing owed, no batch open, but the transaction is
    /// not over.
    pub fn idle_in_transaction(&self) -> bool {
        self.pending == 0 && !self.in_extended && self.status != TransactionStatus::Idle
    }

    /// The connection is given back or closed: a new exchange starts from nothing
    /// (the FATAL, if any, stays for the client to hear of).
    pub fn reset(&mut self) {
        self.replies.clear();
        self.pending = 0;
        self.in_extended = false;
        self.status = TransactionStatus::Idle;
    }

    /// The connection was lost: everything is reset, and what was owed is returned — how
    /// many ReadyForQuery the client still expects, and the last status it saw.
    pub fn lost(&mut self) -> (usize, TransactionStatus) {
        let owed = (self.pending, self.status);
        self.reset();
        self.server_fatal = false;
        self.fatal = None;
        owed
    }

    /// As a new exchange is: nothing owed, nothing kept (the lot keeps a quiet session
    /// without its exchange, and makes a new one when it wakes).
    pub fn at_rest(&self) -> bool {
        self.replies.is_empty()
            && self.pending == 0
            && !self.in_extended
            && self.status == TransactionStatus::Idle
            && !self.server_fatal
            && self.fatal.is_none()
    }

    /// Frees the reply queue's memory (the client is parked with nothing held).
    pub fn release(&mut self) {
        debug_assert!(self.replies.is_empty());
        self.replies = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_only_when_nothing_is_owed_and_the_transaction_is_over() {
        let mut x = Exchange::default();
        assert!(x.clean());
        x.query_sent();
        assert!(!x.clean());
        x.replies.pop_front();
        assert!(x.ready(TransactionStatus::InTransaction));
        assert!(!x.clean() && x.idle_in_transaction());
        x.batch_opened();
        assert!(!x.idle_in_transaction());
        x.sync_sent();
        x.replies.pop_front();
        assert!(x.ready(TransactionStatus::Idle));
        assert!(x.clean());
        x.server_said_fatal(Some(("57P01".into(), "terminating".into())));
        assert!(!x.clean());
        assert_eq!(x.fatal().map(|f| f.0.as_str()), Some("57P01"));
        x.query_sent();
        let (owed, status) = x.lost();
        assert_eq!((owed, status), (1, TransactionStatus::Idle));
        assert!(x.clean() && x.fatal().is_none());
    }
}
