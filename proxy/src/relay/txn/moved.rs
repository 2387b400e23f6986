//! A transaction-mode session between transactions, as a takeover moves it: its
//! parameters and named statements out of [`Txn`], and back into a new one.

use bytes::Bytes;

use super::prepared::StmtDef;
use super::Txn;
use crate::api::takeover::{Mode, Statement};

impl Txn {
    /// What moves of this session (it holds no server connection: between transactions).
    pub(crate) fn moved_mode(&self) -> Mode {
        let sorted = |m: &std::collections::HashMap<String, String>| {
            let mut v: Vec<(String, String)> =
                m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort();
            v
        };
        let named = self.named();
        let statement = |name: &[u8], d: &StmtDef| Statement {
            name: name.to_vec(),
            sql: d.sql.to_vec(),
            param_types: d.param_types.clone(),
        };
        Mode::Transaction {
            desired: sorted(&self.desired),
            startup: sorted(&self.startup),
            statements: named.stmts.iter().map(|(n, d)| statement(n, d)).collect(),
            sql_statements: named
                .sql_stmts
                .iter()
                .map(|(n, d)| statement(n.as_bytes(), d))
                .collect(),
        }
    }

    /// Gives a session made afresh the state a moved one had. `false` when a
    /// statement's name is not text where PostgreSQL requires it (a SQL-level one).
    pub(crate) fn restore(
        &mut self,
        desired: &[(String, String)],
        startup: &[(String, String)],
        statements: &[Statement],
        sql_statements: &[Statement],
    ) -> bool {
        let shared = &self.ctx.shared;
        self.desired = shared.params(desired.iter().cloned().collect());
        self.startup = shared.params(startup.iter().cloned().collect());
        for s in statements {
            let def = StmtDef::new(Bytes::from(s.sql.clone()), s.param_types.clone());
            self.named_mut()
                .stmts
                .insert(Bytes::from(s.name.clone()), def);
        }
        for s in sql_statements {
            let Ok(name) = String::from_utf8(s.name.clone()) else {
                return false;
            };
            let def = StmtDef::prepare_sql(&s.sql);
            self.named_mut().sql_stmts.insert(name, def);
        }
        true
    }

    /// Which takeover this session last failed to move in (0: none).
    pub(crate) fn stayed_in(&self) -> u64 {
        self.stayed
    }

    pub(crate) fn stay(&mut self, attempt: u64) {
        self.stayed = attempt;
    }
}
