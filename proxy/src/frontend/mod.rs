//! The client side: accepting connections, the startup and login of each client, and
//! client authentication. A logged-in session is handed to a relay.

pub(crate) mod client_auth;
pub(crate) mod clients;
pub(crate) mod listener;
pub(crate) mod session;
pub mod users;
