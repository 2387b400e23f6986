//! SQL-level statements (`PREPARE`, `EXECUTE`, `DEALLOCATE`, `DISCARD ALL`) and the
//! database a transaction uses, translated to the server's names.

use bytes::{Bytes, BytesMut};
use handoff_protocol::frontend::FrontendMessage;
use handoff_protocol::sql::PreparedSql;
use handoff_protocol::{sql, sqlstate};

use super::{query, raise, Reply, StmtDef};
use crate::relay::txn::Txn;

impl Txn {
    /// `EXECUTE name …` of a statement the client prepared (either level), rewritten to
    /// run the statement's server name; `None` to send the SQL as it is.
    pub(super) fn execute_by_server_name(&self, sql: &[u8]) -> Option<Bytes> {
        if !sql::may_concern_statements_or_databases(sql) {
            return None;
        }
        let Some(PreparedSql::Execute { name, rest }) = sql::prepared_sql(sql) else {
            return None;
        };
        let server_name = self.server_name_of(&name)?;
        let mut out = Vec::with_capacity(sql.len() + server_name.len());
        out.extend_from_slice(b"EXECUTE ");
        out.extend_from_slice(&server_name);
        out.extend_from_slice(rest);
        Some(Bytes::from(out))
    }

    /// The server name a client statement runs under on this connection: a SQL-level
    /// one always (the connection was given it when the transaction attached, or earlier
    /// in it); a protocol-level one only when the connection holds it.
    pub(super) fn server_name_of(&self, name: &str) -> Option<Bytes> {
        if let Some(def) = self.named().sql_stmts.get(name) {
            return Some(def.server_name.clone());
        }
        let def = self.lookup(&Bytes::copy_from_slice(name.as_bytes()))?;
        let b = self.link.backend.as_ref()?;
        b.prepared
            .contains(&def.server_name)
            .then_some(def.server_name)
    }

    /// A whole simple Query, looked at for SQL-level prepared statements: the query to
    /// send instead, if any. Called before the Query's ReadyForQuery is owed.
    pub(in crate::relay::txn) fn translate_query(&mut self, body: &[u8]) -> Option<BytesMut> {
        let text = body.strip_suffix(&[0]).unwrap_or(body);
        if !sql::may_concern_statements_or_databases(text) {
            return None;
        }
        if let Some(db) = sql::database_in_use(text) {
            self.database_in_use(db);
            return None;
        }
        let command = sql::prepared_sql(text)?;
        self.close_unused();
        match command {
            PreparedSql::Prepare { name, rest } => {
                if self.defined(&Bytes::copy_from_slice(name.as_bytes())) {
                    return raise(
                        sqlstate::DUPLICATE_PREPARED_STATEMENT,
                        &format!("prepared statement \"{name}\" already exists"),
                    );
                }
                let def = StmtDef::prepare_sql(rest);
                let b = self.link.backend.as_mut().expect("attached");
                if b.prepared.get(&def.server_name).is_some() {
                    self.ctx.prepared.hit.increment(1);
                    self.named_mut().sql_stmts.insert(name, def);
                    self.ex.replies.push_back(Reply::Substitute("PREPARE"));
                    return Some(query(""));
                }
                self.ctx.prepared.miss.increment(1);
                self.evict_for_one();
                let mut out = BytesMut::new();
                FrontendMessage::Query {
                    sql: def.prepare_query(),
                }
                .encode(&mut out);
                self.ex.replies.push_back(Reply::Prepared { name, def });
                Some(out)
            }
            PreparedSql::Execute { .. } => {
                let sql = self.execute_by_server_name(text)?;
                let mut out = BytesMut::new();
                FrontendMessage::Query { sql }.encode(&mut out);
                Some(out)
            }
            PreparedSql::Deallocate { name } => {
                let key = Bytes::copy_from_slice(name.as_bytes());
                if !self.defined(&key) {
                    // The server's own 26000 names the client's statement.
                    return None;
                }
                if let Some(names) = self.named.as_deref_mut() {
                    names.sql_stmts.remove(&name);
                    names.stmts.remove(&key);
                    names.defining.remove(&key);
                }
                self.ex.replies.push_back(Reply::Substitute("DEALLOCATE"));
                Some(query(""))
            }
        }
    }

    /// The client is about to drop, rename or copy a database: the pools' idle
    /// connections to it go first, or PostgreSQL would refuse with `55006` (being
    /// accessed by other users). A database that will be gone is forgotten once the
    /// server confirms.
    pub(super) fn database_in_use(&mut self, db: sql::DatabaseInUse) {
        let pools = &self.ctx.shard.pools;
        let closed = pools.close_idle(&self.gen.primary, &db.name);
        tracing::debug!(database = %db.name, closed, "closed idle server connections to a database about to be dropped, renamed or copied");
        if db.gone {
            self.dropping = Some(db.name.into_boxed_str());
        }
    }

    /// A `DROP DATABASE` or `ALTER DATABASE` completed: a database the client was
    /// dropping or renaming has no pool any more.
    pub(in crate::relay::txn) fn database_changed(&mut self) {
        if let Some(name) = self.dropping.take() {
            self.ctx
                .shard
                .pools
                .forget_database(&self.gen.primary, &name);
        }
    }

    /// The server dropped every prepared statement of the connection (`DEALLOCATE ALL`,
    /// `DISCARD ALL` ran, however it was sent): the connection's cache empties, and so
    /// do the client's names, as they would on a direct connection.
    pub(in crate::relay::txn) fn statements_dropped(&mut self) {
        if let Some(b) = self.link.backend.as_mut() {
            b.prepared.clear();
            b.to_close.clear();
        }
        if let Some(n) = self.named.as_mut() {
            n.stmts.clear();
            n.sql_stmts.clear();
        }
    }

    /// The server refused a statement the connection was believed to hold (its cached
    /// plan is unusable, or it is gone): the statements this segment used are prepared
    /// afresh on this connection next time (closed first, in case they exist). True
    /// when any was: the error may be the cache's doing, not the client's.
    pub(in crate::relay::txn) fn statements_stale(&mut self) -> bool {
        let used = match self.named.as_mut() {
            Some(n) => std::mem::take(&mut n.used),
            None => return false,
        };
        let Some(b) = self.link.backend.as_mut() else {
            return false;
        };
        let mut any = false;
        for name in used {
            if b.prepared.pop(&name).is_some() {
                b.to_close.push(name);
                any = true;
            }
        }
        any
    }
}
