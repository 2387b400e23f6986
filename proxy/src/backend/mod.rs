//! The server side: logging in to PostgreSQL servers, the connection pools of
//! transaction mode, and forwarding cancel requests.

pub(crate) mod cancel;
pub(crate) mod login;
pub mod pool;
