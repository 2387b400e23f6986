//! Named prepared statements in transaction mode.
//!
//! A client's statement names are its own; on the server every statement is stored under
//! a proxy-chosen name derived from its SQL and parameter types, so two clients may use
//! the same name for different SQL and the same SQL is prepared once per server
//! connection. The relay rewrites Parse/Bind/Describe/Close names, prepares statements
//! on whichever connection a transaction lands on, and keeps [`Reply`] entries so that
//! it knows what to do with each ParseComplete/CloseComplete the server sends back.

use bytes::Bytes;
use sha2::{Digest, Sha256};

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
