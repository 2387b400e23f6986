//! The relays: bytes between a logged-in client and its server connection, in session
//! mode (one server connection for the whole session, moved to a new primary at a
//! transaction boundary) and in transaction mode (a pooled connection per transaction).

pub(crate) mod common;
pub(crate) mod session_mode;
pub(crate) mod session_move;
pub(crate) mod txn;
