//! The server side: logging in to PostgreSQL servers, the connection pools of
//! transaction mode, forwarding cancel requests, and the admin role's own connections.

pub mod admin;
pub(crate) mod cancel;
pub(crate) mod login;
pub mod pool;

pub use login::Credentials;
