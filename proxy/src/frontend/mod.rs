//! The client side: accepting connections, the startup and login of each client, and
//! client authentication. A logged-in session is handed to a relay.

use std::sync::Arc;

use handoff_protocol::auth::ScramVerifier;

use crate::clients::Clients;
use crate::config::Config;
use crate::limits::Limits;
use crate::net::tls::ClientTls;
use crate::shard::Shard;

pub(crate) mod adopt;
pub(crate) mod client_auth;
pub(crate) mod listener;
pub(crate) mod session;
pub mod users;

/// What the client side works with: the configuration, who may log in, the limits, the
/// client registry, client TLS, and the two places a logged-in client goes: a relay
/// ([`crate::relay::Ctx`]) or the admin console ([`crate::console::Ctx`]).
#[derive(Debug)]
pub(crate) struct Ctx {
    pub config: Arc<Config>,
    /// Who may log in: `HANDOFF_USERS`, the users file, the server-side lookup.
    pub users: users::Users,
    /// Verifier used for unknown users so they fail exactly like wrong passwords.
    pub decoy: ScramVerifier,
    /// Client connections per user and database.
    pub limits: Arc<Limits>,
    /// Every client connected now, and the statistics per client database.
    pub clients: Arc<Clients>,
    /// TLS towards clients (reloadable).
    pub client_tls: ClientTls,
    /// Each shard's state machine, in `config.shards` order (routing).
    pub shards: Vec<Arc<Shard>>,
    pub relay: Arc<crate::relay::Ctx>,
    pub console: Arc<crate::console::Ctx>,
    /// One per client connection (`HANDOFF_MAX_CLIENT_CONN`): the listener's clients
    /// and the ones a takeover moved here.
    pub permits: Arc<tokio::sync::Semaphore>,
}
