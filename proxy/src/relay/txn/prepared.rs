//! Named prepared statements in transaction mode.
//!
//! A client's statement names are its own; on the server every statement is stored under
//! a proxy-chosen name derived from its SQL and parameter types, so two clients may use
//! the same name for different SQL and the same SQL is prepared once per server
//! connection. The relay rewrites Parse/Bind/Describe/Close names, prepares statements
//! on whichever connection a transaction lands on, and keeps [`Reply`] entries so that
//! it knows what to do with each ParseComplete/CloseComplete the server sends back.

use bytes::{Bytes, BytesMut};
use handoff_protocol::backend::tag as btag;
use handoff_protocol::frontend::{FrontendMessage, Target};
use handoff_protocol::{sql, Frame};
use sha2::{Digest, Sha256};

use super::Txn;

/// Name used for a Close that stands in for a skipped Parse or a client's Close of its
/// own statement: closing a statement that does not exist is not an error, and the
/// server answers CloseComplete in order.
pub const NOOP_NAME: &[u8] = b"handoff_noop";

/// A client's statement.
#[derive(Debug, Clone)]
pub struct StmtDef {
    pub sql: Bytes,
    pub param_types: Vec<u32>,
    /// The name the statement has on every server connection.
    pub server_name: Bytes,
}

impl StmtDef {
    pub fn new(sql: Bytes, param_types: Vec<u32>) -> Self {
        let mut h = Sha256::new();
        h.update((param_types.len() as u32).to_be_bytes());
        for t in &param_types {
            h.update(t.to_be_bytes());
        }
        h.update(&sql);
        let digest = h.finalize();
        let mut name = String::from("handoff_");
        for b in &digest[..12] {
            name.push_str(&format!("{b:02x}"));
        }
        Self {
            sql,
            param_types,
            server_name: Bytes::from(name),
        }
    }
}

/// What to do with the server's reply to one Parse or Close the proxy sent, or the end
/// of one Sync/Query/FunctionCall segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Forward the reply; on ParseComplete, record `register` as prepared on the server
    /// and `define` (a client statement name) as defined for the client.
    Pass {
        register: Option<Bytes>,
        define: Option<Bytes>,
    },
    /// Drop the reply (the proxy's own Parse or Close); record `register` on success.
    Swallow { register: Option<Bytes> },
    /// A no-op Close stood in for a Parse the connection already had: turn its
    /// CloseComplete into the ParseComplete the client expects, and define the name.
    AsParseComplete { define: Bytes },
    /// ReadyForQuery ends this segment.
    SyncMark,
}

impl Txn<'_> {
    fn ensure_prepared(&mut self, def: &StmtDef) {
        let b = self.backend.as_mut().expect("attached");
        if b.prepared.get(&def.server_name).is_some() {
            self.shared.prepared.hit.increment(1);
            return;
        }
        if self.preparing.contains(&def.server_name) {
            return;
        }
        self.send_parse(
            def,
            Reply::Swallow {
                register: Some(def.server_name.clone()),
            },
        );
    }

    /// Prepares `def` on the connection under its server name (a cache miss), making
    /// room first; `reply` says what to do with the ParseComplete.
    fn send_parse(&mut self, def: &StmtDef, reply: Reply) {
        self.shared.prepared.miss.increment(1);
        self.evict_for_one();
        FrontendMessage::Parse {
            name: def.server_name.clone(),
            sql: def.sql.clone(),
            param_types: def.param_types.clone(),
        }
        .encode(&mut self.out);
        self.preparing.insert(def.server_name.clone());
        self.replies.push_back(reply);
    }

    /// Makes room in the connection's statement cache for one more statement.
    fn evict_for_one(&mut self) {
        let b = self.backend.as_mut().expect("attached");
        let cap = b.prepared.cap().get();
        while b.prepared.len() + self.preparing.len() >= cap {
            let Some((victim, ())) = b.prepared.pop_lru() else {
                break;
            };
            self.shared.prepared.eviction.increment(1);
            FrontendMessage::Close {
                target: Target::Statement,
                name: victim,
            }
            .encode(&mut self.out);
            self.replies.push_back(Reply::Swallow { register: None });
        }
    }

    /// Translates one whole inspected client message (Parse, Bind, Describe, Close).
    pub(super) fn translate(&mut self, frame: Frame) -> Result<(), handoff_protocol::FrameError> {
        self.in_extended = true;
        let raw = frame.clone();
        match FrontendMessage::parse(frame)? {
            FrontendMessage::Parse {
                name,
                sql,
                param_types,
            } if !name.is_empty() => {
                self.ending |= sql::ends_transaction(&sql).is_some();
                let def = StmtDef::new(sql, param_types);
                let b = self.backend.as_mut().expect("attached");
                if b.prepared.get(&def.server_name).is_some() {
                    self.shared.prepared.hit.increment(1);
                    noop_close(&mut self.out);
                    self.replies.push_back(Reply::AsParseComplete {
                        define: name.clone(),
                    });
                } else if self.preparing.contains(&def.server_name) {
                    noop_close(&mut self.out);
                    self.replies.push_back(Reply::AsParseComplete {
                        define: name.clone(),
                    });
                } else {
                    let reply = Reply::Pass {
                        register: Some(def.server_name.clone()),
                        define: Some(name.clone()),
                    };
                    self.send_parse(&def, reply);
                }
                self.defining.insert(name, def);
            }
            FrontendMessage::Parse { sql, .. } => {
                self.ending |= sql::ends_transaction(&sql).is_some();
                raw.encode(&mut self.out);
                self.replies.push_back(Reply::Pass {
                    register: None,
                    define: None,
                });
            }
            FrontendMessage::Bind {
                portal,
                statement,
                rest,
            } => match self.lookup(&statement) {
                Some(def) => {
                    self.ending |= sql::ends_transaction(&def.sql).is_some();
                    self.ensure_prepared(&def);
                    FrontendMessage::Bind {
                        portal,
                        statement: def.server_name,
                        rest,
                    }
                    .encode(&mut self.out);
                }
                None => raw.encode(&mut self.out),
            },
            FrontendMessage::Describe {
                target: Target::Statement,
                name,
            } if !name.is_empty() => match self.lookup(&name) {
                Some(def) => {
                    self.ensure_prepared(&def);
                    FrontendMessage::Describe {
                        target: Target::Statement,
                        name: def.server_name,
                    }
                    .encode(&mut self.out);
                }
                None => raw.encode(&mut self.out),
            },
            FrontendMessage::Close {
                target: Target::Statement,
                name,
            } if !name.is_empty() => {
                // The server copy stays cached for other clients; the client's name goes.
                self.stmts.remove(&name);
                self.defining.remove(&name);
                noop_close(&mut self.out);
                self.replies.push_back(Reply::Pass {
                    register: None,
                    define: None,
                });
            }
            FrontendMessage::Close { .. } => {
                raw.encode(&mut self.out);
                self.replies.push_back(Reply::Pass {
                    register: None,
                    define: None,
                });
            }
            _ => raw.encode(&mut self.out),
        }
        Ok(())
    }

    /// The client's statement by name: one being defined in flight wins.
    pub(super) fn lookup(&self, name: &Bytes) -> Option<StmtDef> {
        self.defining
            .get(name)
            .or_else(|| self.stmts.get(name))
            .cloned()
    }

    /// A client Parse succeeded: its name is now defined.
    fn define(&mut self, name: Bytes) {
        if let Some(def) = self.defining.remove(&name) {
            self.stmts.insert(name, def);
        }
    }

    /// After an ErrorResponse the server skips to the next Sync: the replies promised
    /// for the skipped messages will never come.
    pub(super) fn on_error(&mut self) {
        while let Some(r) = self.replies.front() {
            match r {
                Reply::SyncMark => break,
                Reply::Pass { register, define } => {
                    if let Some(n) = register {
                        self.preparing.remove(n);
                    }
                    if let Some(d) = define {
                        self.defining.remove(d);
                    }
                    self.replies.pop_front();
                }
                Reply::Swallow { register } => {
                    if let Some(n) = register {
                        self.preparing.remove(n);
                    }
                    self.replies.pop_front();
                }
                Reply::AsParseComplete { define } => {
                    self.defining.remove(define);
                    self.replies.pop_front();
                }
            }
        }
    }

    /// What to do with a ParseComplete/CloseComplete: `Some(tag)` to forward it with
    /// that tag, `None` to drop it.
    pub(super) fn on_complete(&mut self, tag: u8) -> Option<u8> {
        let reply = match self.replies.front() {
            Some(Reply::SyncMark) | None => return Some(tag),
            Some(_) => self.replies.pop_front().expect("front exists"),
        };
        let confirm = |this: &mut Self, name: Option<Bytes>| {
            if let Some(n) = name {
                this.preparing.remove(&n);
                if tag == btag::PARSE_COMPLETE {
                    if let Some(b) = this.backend.as_mut() {
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
            Reply::SyncMark => unreachable!("handled above"),
        }
    }
}

fn noop_close(out: &mut BytesMut) {
    FrontendMessage::Close {
        target: Target::Statement,
        name: Bytes::from_static(NOOP_NAME),
    }
    .encode(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_depend_on_sql_and_types_only() {
        let a = StmtDef::new(Bytes::from_static(b"select $1"), vec![23]);
        let b = StmtDef::new(Bytes::from_static(b"select $1"), vec![23]);
        let c = StmtDef::new(Bytes::from_static(b"select $1"), vec![25]);
        let d = StmtDef::new(Bytes::from_static(b"select $2"), vec![23]);
        assert_eq!(a.server_name, b.server_name);
        assert_ne!(a.server_name, c.server_name);
        assert_ne!(a.server_name, d.server_name);
        assert!(a.server_name.len() < 64, "fits NAMEDATALEN");
        assert_ne!(&a.server_name[..], NOOP_NAME);
    }
}
