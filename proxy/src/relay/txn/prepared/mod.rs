//! Named prepared statements in transaction mode.
//!
//! A client's statement names are its own; on the server every statement is stored under
//! a proxy-chosen name derived from its SQL and parameter types, so two clients may use
//! the same name for different SQL and the same SQL is prepared once per server
//! connection. The relay rewrites Parse/Bind/Describe/Close names, prepares statements
//! on whichever connection a transaction lands on, and keeps [`Reply`] entries so that
//! it knows what to do with each ParseComplete/CloseComplete the server sends back.
//!
//! SQL-level statements follow the same mapping: `PREPARE name AS …` runs on the
//! server as `PREPARE handoff_p… AS …` (a name derived from what follows the client's
//! name), `EXECUTE name` (in a Query or a Parse) runs the server name, `DEALLOCATE name`
//! of a name the client defined (either way) is answered by the proxy (the server copy
//! stays cached), and a client's SQL-level statements are prepared on each connection
//! its later transactions land on. `DEALLOCATE ALL` and `DISCARD ALL`, however sent, run
//! on the server: the connection's cache and the client's names are emptied when their
//! CommandComplete comes back. A client's Parse always prepares the statement afresh
//! on the connection (its copy there may predate a change of the tables or types it
//! uses); a statement whose cached plan the server refuses (`cached plan must not change
//! result type`, a dropped type) is re-prepared the next time it is used, and the client
//! sees the error, as it would on a direct connection; one the server no longer has
//! (`26000`) is prepared again and a transaction's first request re-sent, unseen.

use bytes::{Bytes, BytesMut};
use handoff_protocol::body::{self, Unnamed};
use handoff_protocol::framing::HEADER_LEN;
use handoff_protocol::frontend::{FrontendMessage, Target};
use handoff_protocol::{sql, sqlstate, Frame};
use sha2::{Digest, Sha256};

use super::Txn;

/// Name used for a Close that stands in for a skipped Parse or a client's Close of its
/// own statement: closing a statement that does not exist is not an error, and the
/// server answers CloseComplete in order.
pub const NOOP_NAME: &[u8] = b"handoff_noop";

/// A client's statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StmtDef {
    pub sql: Bytes,
    pub param_types: Vec<u32>,
    /// The name the statement has on every server connection.
    pub server_name: Bytes,
}

impl StmtDef {
    pub fn new(sql: Bytes, param_types: Vec<u32>) -> Self {
        Self::named("handoff_", b"", sql, param_types)
    }

    /// A SQL-level statement: `rest` is what followed the client's name in its PREPARE.
    pub fn prepare_sql(rest: &[u8]) -> Self {
        Self::named(
            "handoff_p",
            b"PREPARE",
            Bytes::copy_from_slice(rest),
            Vec::new(),
        )
    }

    /// A SQL-level statement's `PREPARE` under its server name, byte for byte as the
    /// client wrote the rest (whatever its encoding).
    pub fn prepare_query(&self) -> Bytes {
        let mut sql = Vec::with_capacity(self.server_name.len() + self.sql.len() + 8);
        sql.extend_from_slice(b"PREPARE ");
        sql.extend_from_slice(&self.server_name);
        sql.extend_from_slice(&self.sql);
        Bytes::from(sql)
    }

    fn named(prefix: &str, kind: &[u8], sql: Bytes, param_types: Vec<u32>) -> Self {
        let mut h = Sha256::new();
        h.update(kind);
        h.update((param_types.len() as u32).to_be_bytes());
        for t in &param_types {
            h.update(t.to_be_bytes());
        }
        h.update(&sql);
        let digest = h.finalize();
        let mut name = String::from(prefix);
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
    /// The server answers EmptyQueryResponse for a query the proxy emptied: the client
    /// gets CommandComplete with this tag instead (a `DEALLOCATE` or `PREPARE` the proxy
    /// answered from its own statement mapping).
    Substitute(&'static str),
    /// A SQL-level `PREPARE` ran under the server name: when its segment ends without
    /// an error, the connection holds the statement and the client's name is defined.
    Prepared { name: String, def: StmtDef },
    /// A name the proxy prepared only to have the server refuse a duplicate: closed
    /// when the segment ends.
    CloseAfter(Bytes),
    /// ReadyForQuery ends this segment.
    SyncMark,
}

/// What a server error says about a statement the connection was believed to hold: its
/// cached plan is unusable (`0A000` cached plan must not change result type, `XX000`
/// cache lookup failed, after a table or type changed) or it is gone (`26000`).
pub fn stale_statement(code: &str, message: Option<&str>) -> bool {
    let says = |m: &str| message.is_some_and(|msg| msg.starts_with(m));
    match code {
        sqlstate::INVALID_SQL_STATEMENT_NAME => true,
        sqlstate::FEATURE_NOT_SUPPORTED => says("cached plan must not change result type"),
        sqlstate::INTERNAL_ERROR => says("cache lookup failed"),
        _ => false,
    }
}

/// A Query message carrying `sql`.
pub(super) fn query(sql: &str) -> BytesMut {
    let mut out = BytesMut::new();
    FrontendMessage::Query {
        sql: Bytes::copy_from_slice(sql.as_bytes()),
    }
    .encode(&mut out);
    out
}

impl Txn {
    fn ensure_prepared(&mut self, def: &StmtDef) {
        let b = self.link.backend.as_mut().expect("attached");
        if b.prepared.get(&def.server_name).is_some() {
            self.ctx.prepared.hit.increment(1);
            return;
        }
        if self.named().preparing.contains(&def.server_name) {
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
        self.ctx.prepared.miss.increment(1);
        self.evict_for_one();
        FrontendMessage::Parse {
            name: def.server_name.clone(),
            sql: def.sql.clone(),
            param_types: def.param_types.clone(),
        }
        .encode(&mut self.out);
        self.named_mut().preparing.insert(def.server_name.clone());
        self.ex.replies.push_back(reply);
    }

    /// Makes room in the connection's statement cache for one more statement, and
    /// closes the statements the connection holds but must not use again.
    fn evict_for_one(&mut self) {
        let b = self.link.backend.as_mut().expect("attached");
        let cap = b.prepared.cap().get();
        let preparing = self.named.as_ref().map_or(0, |n| n.preparing.len());
        while b.prepared.len() + preparing >= cap {
            let Some((victim, ())) = b.prepared.pop_lru() else {
                break;
            };
            self.ctx.prepared.eviction.increment(1);
            FrontendMessage::Close {
                target: Target::Statement,
                name: victim,
            }
            .encode(&mut self.out);
            self.ex.replies.push_back(Reply::Swallow { register: None });
        }
    }

    /// Translates one whole inspected client message (Parse, Bind, Describe, Close).
    pub(super) fn translate(&mut self, frame: Frame) -> Result<(), handoff_protocol::FrameError> {
        self.close_unused();
        self.ex.batch_opened();
        let raw = frame.clone();
        match FrontendMessage::parse(frame)? {
            FrontendMessage::Parse {
                name,
                sql,
                param_types,
            } if !name.is_empty() => {
                self.ending |= sql::ends_transaction(&sql).is_some();
                if self.defined(&name) {
                    self.duplicate_parse(name);
                    return Ok(());
                }
                let sql = self.execute_by_server_name(&sql).unwrap_or(sql);
                let def = StmtDef::new(sql, param_types);
                let b = self.link.backend.as_mut().expect("attached");
                if b.prepared.pop(&def.server_name).is_some() {
                    // The client asks for a fresh statement: the connection's copy may
                    // predate a change of the tables or types it uses (its plan would
                    // be refused, or describe the old shape). It is prepared again.
                    FrontendMessage::Close {
                        target: Target::Statement,
                        name: def.server_name.clone(),
                    }
                    .encode(&mut self.out);
                    self.ex.replies.push_back(Reply::Swallow { register: None });
                    let reply = Reply::Pass {
                        register: Some(def.server_name.clone()),
                        define: Some(name.clone()),
                    };
                    self.send_parse(&def, reply);
                } else if self.named().preparing.contains(&def.server_name) {
                    noop_close(&mut self.out);
                    self.ex.replies.push_back(Reply::AsParseComplete {
                        define: name.clone(),
                    });
                } else {
                    let reply = Reply::Pass {
                        register: Some(def.server_name.clone()),
                        define: Some(name.clone()),
                    };
                    self.send_parse(&def, reply);
                }
                self.named_mut().defining.insert(name, def);
            }
            FrontendMessage::Parse {
                name,
                sql,
                param_types,
            } => {
                self.ending |= sql::ends_transaction(&sql).is_some();
                match self.execute_by_server_name(&sql) {
                    Some(sql) => FrontendMessage::Parse {
                        name,
                        sql,
                        param_types,
                    }
                    .encode(&mut self.out),
                    None => raw.encode(&mut self.out),
                }
                self.ex.replies.push_back(Reply::Pass {
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
                    self.named_mut().used.push(def.server_name.clone());
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
                    self.named_mut().used.push(def.server_name.clone());
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
                if let Some(names) = self.named.as_deref_mut() {
                    names.stmts.remove(&name);
                    names.defining.remove(&name);
                    if let Ok(n) = std::str::from_utf8(&name) {
                        names.sql_stmts.remove(n);
                    }
                }
                noop_close(&mut self.out);
                self.ex.replies.push_back(Reply::Pass {
                    register: None,
                    define: None,
                });
            }
            FrontendMessage::Close { .. } => {
                raw.encode(&mut self.out);
                self.ex.replies.push_back(Reply::Pass {
                    register: None,
                    define: None,
                });
            }
            _ => raw.encode(&mut self.out),
        }
        Ok(())
    }

    /// The hot path of the extended protocol: a whole Parse, Bind or Describe of the
    /// unnamed statement and portal that needs no rewriting goes to `out` as it is,
    /// without being parsed into a message (no copy into owned fields, no allocation).
    /// False when `msg` is not one of those; [`Txn::translate`] then handles it.
    pub(super) fn pass_unnamed(&mut self, msg: &[u8]) -> bool {
        let Some(body) = msg.get(HEADER_LEN..) else {
            return false;
        };
        let parse_sql = match body::unnamed(msg[0], body) {
            // `EXECUTE` of a client's statement, and whatever else the rewrite looks
            // at, takes the long way.
            Some(Unnamed::Parse(sql)) if sql::may_concern_statements_or_databases(sql) => {
                return false
            }
            Some(Unnamed::Parse(sql)) => Some(sql),
            Some(Unnamed::Other) => None,
            None => return false,
        };
        // As `translate` does, in the same order.
        self.close_unused();
        self.ex.batch_opened();
        if let Some(sql) = parse_sql {
            self.ending |= sql::ends_transaction(sql).is_some();
            self.ex.replies.push_back(Reply::Pass {
                register: None,
                define: None,
            });
        }
        self.out.extend_from_slice(msg);
        true
    }

    /// True when the client has a statement of this name (either level).
    fn defined(&self, name: &Bytes) -> bool {
        self.named().defining.contains_key(name)
            || self.named().stmts.contains_key(name)
            || std::str::from_utf8(name).is_ok_and(|n| self.named().sql_stmts.contains_key(n))
    }

    /// A Parse of a name the client already has: PostgreSQL answers `42P05` and keeps
    /// the first. The server is made to say so itself, in order: the name is prepared
    /// twice (the first answer swallowed, the second fails), and closed again later.
    fn duplicate_parse(&mut self, name: Bytes) {
        let parse = FrontendMessage::Parse {
            name: name.clone(),
            sql: Bytes::from_static(b"SELECT 1"),
            param_types: Vec::new(),
        };
        parse.encode(&mut self.out);
        self.ex.replies.push_back(Reply::Swallow { register: None });
        parse.encode(&mut self.out);
        self.ex.replies.push_back(Reply::Pass {
            register: None,
            define: None,
        });
        // Closed once the segment is over (the server skips anything sent before the
        // client's Sync).
        self.link
            .backend
            .as_mut()
            .expect("attached")
            .prepared
            .pop(&name);
        self.ex.replies.push_back(Reply::CloseAfter(name));
    }

    /// Closes what the connection holds but must not use again, ahead of what the
    /// client sent next.
    fn close_unused(&mut self) {
        let Some(b) = self.link.backend.as_mut() else {
            return;
        };
        for name in std::mem::take(&mut b.to_close) {
            FrontendMessage::Close {
                target: Target::Statement,
                name,
            }
            .encode(&mut self.out);
            self.ex.replies.push_back(Reply::Swallow { register: None });
        }
    }

    /// The client's statement by name: one being defined in flight wins.
    pub(super) fn lookup(&self, name: &Bytes) -> Option<StmtDef> {
        self.named()
            .defining
            .get(name)
            .or_else(|| self.named().stmts.get(name))
            .cloned()
    }

    /// A client Parse succeeded: its name is now defined.
    fn define(&mut self, name: Bytes) {
        if let Some(def) = self
            .named
            .as_deref_mut()
            .and_then(|n| n.defining.remove(&name))
        {
            if self.probe.active {
                self.probe.defined(name.clone());
            }
            self.named_mut().stmts.insert(name, def);
        }
    }

    /// A protocol-level name the client no longer has.
    pub(super) fn forget(&mut self, name: &Bytes) {
        if let Some(names) = self.named.as_deref_mut() {
            names.stmts.remove(name);
            names.defining.remove(name);
        }
    }
}

/// A query that makes the server raise `code` with `message` itself, so the error comes
/// in order and aborts a transaction block as the real one would. `None` when the message
/// would not fit in the dollar quote (the request then goes as the client sent it).
pub(super) fn raise(code: &str, message: &str) -> Option<BytesMut> {
    let quoted = sql::quote_literal(message);
    if quoted.contains("$handoff$") {
        return None;
    }
    Some(query(&format!(
        "DO $handoff$BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = {quoted}; END $handoff$"
    )))
}

pub(super) fn noop_close(out: &mut BytesMut) {
    FrontendMessage::Close {
        target: Target::Statement,
        name: Bytes::from_static(NOOP_NAME),
    }
    .encode(out);
}

mod replies;
mod sql_level;

#[cfg(test)]
mod tests;
