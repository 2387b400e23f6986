//! What each reply from the server does to the statements' bookkeeping: errors that
//! skip to the next Sync, completions that define or forget names.

use bytes::Bytes;
use handoff_protocol::backend::tag as btag;

use super::Reply;
use crate::relay::txn::Txn;

impl Txn {
    /// After an ErrorResponse the server skips to the next Sync: the replies promised
    /// for the skipped messages will never come.
    pub(in crate::relay::txn) fn on_error(&mut self) {
        let mut kept = Vec::new();
        while let Some(r) = self.ex.replies.front() {
            match r {
                Reply::SyncMark => break,
                Reply::Pass { register, define } => {
                    if let Some(n) = register {
                        if let Some(names) = self.named.as_deref_mut() {
                            names.preparing.remove(n);
                        }
                    }
                    if let Some(d) = define {
                        if let Some(names) = self.named.as_deref_mut() {
                            names.defining.remove(d);
                        }
                    }
                }
                Reply::Swallow { register } => {
                    if let Some(n) = register {
                        if let Some(names) = self.named.as_deref_mut() {
                            names.preparing.remove(n);
                        }
                    }
                }
                Reply::AsParseComplete { define } => {
                    if let Some(names) = self.named.as_deref_mut() {
                        names.defining.remove(define);
                    }
                }
                Reply::Substitute(_) | Reply::Prepared { .. } => {}
                // Settled at the segment's end, error or not.
                Reply::CloseAfter(_) => kept.push(r.clone()),
            }
            self.ex.replies.pop_front();
        }
        for r in kept.into_iter().rev() {
            self.ex.replies.push_front(r);
        }
    }

    /// An EmptyQueryResponse: `Some(tag)` when it stands for a command the proxy
    /// answered itself (the client gets CommandComplete with that tag).
    pub(in crate::relay::txn) fn on_empty_query(&mut self) -> Option<&'static str> {
        match self.ex.replies.front() {
            Some(Reply::Substitute(tag)) => {
                let tag = *tag;
                self.ex.replies.pop_front();
                Some(tag)
            }
            _ => None,
        }
    }

    /// A segment ended: what it did takes effect.
    pub(in crate::relay::txn) fn settle(&mut self, reply: Reply) {
        if let Reply::CloseAfter(name) = reply {
            if let Some(b) = self.link.backend.as_mut() {
                b.to_close.push(name);
            }
            return;
        }
        if let Reply::Prepared { name, def } = reply {
            if let Some(b) = self.link.backend.as_mut() {
                b.keep_prepared(def.server_name.clone());
            }
            self.named_mut().sql_stmts.insert(name, def);
        }
    }

    /// What to do with a ParseComplete/CloseComplete: `Some(tag)` to forward it with
    /// that tag, `None` to drop it.
    pub(in crate::relay::txn) fn on_complete(&mut self, tag: u8) -> Option<u8> {
        // The first reply owed in this segment; what a segment's end settles (a
        // substitute, a SQL-level PREPARE, a name to close) is passed over.
        let owed = self.ex.replies.iter().position(|r| {
            !matches!(
                r,
                Reply::Substitute(_) | Reply::Prepared { .. } | Reply::CloseAfter(_)
            )
        });
        let reply = match owed {
            Some(i) if self.ex.replies[i] != Reply::SyncMark => {
                self.ex.replies.remove(i).expect("index found")
            }
            _ => return Some(tag),
        };
        let confirm = |this: &mut Self, name: Option<Bytes>| {
            if let Some(n) = name {
                if let Some(names) = this.named.as_deref_mut() {
                    names.preparing.remove(&n);
                }
                if tag == btag::PARSE_COMPLETE {
                    if let Some(b) = this.link.backend.as_mut() {
                        b.prepared.put(n, ());
                    }
                }
            }
        };
        match reply {
            Reply::Pass { register, define } => {
                confirm(self, register);
                if let Some(d) = define {
                    if tag == btag::PARSE_COMPLETE {
                        self.define(d);
                    }
                }
                Some(tag)
            }
            Reply::Swallow { register } => {
                confirm(self, register);
                None
            }
            Reply::AsParseComplete { define } => {
                self.define(define);
                Some(btag::PARSE_COMPLETE)
            }
            Reply::SyncMark
            | Reply::Substitute(_)
            | Reply::Prepared { .. }
            | Reply::CloseAfter(_) => unreachable!("handled above"),
        }
    }
}
