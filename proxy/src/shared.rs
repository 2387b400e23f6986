//! The state every client session shares, passed by `Arc`: there is no global mutable
//! state. The shard layer sees only its own narrow part of it ([`crate::shard::Ctx`]).

use std::sync::Arc;

use handoff_protocol::auth::ScramVerifier;

use crate::backend::cancel;
use crate::config::Config;
use crate::limits::Limits;
use crate::metrics::PreparedCounters;
use crate::net::tls::{ClientTls, ServerTls};
use crate::shard::{Ctx, Shard};

#[derive(Debug)]
pub(crate) struct Shared {
    pub config: Arc<Config>,
    pub cancels: Arc<cancel::Registry>,
    pub prepared: PreparedCounters,
    /// The relay's request, transaction and byte series, shared by every session.
    pub relay_meters: Arc<crate::metrics::RelayMeters>,
    /// Verifier used for unknown users so they fail exactly like wrong passwords.
    pub decoy: ScramVerifier,
    /// Each shard's state machine, in `config.shards` order.
    pub shards: Vec<Arc<Shard>>,
    /// The buffer, the pools, the admin role and the settings the shard layer works with.
    pub ctx: Arc<Ctx>,
    /// Coordination with the other proxies over etcd, when configured.
    pub coord: Option<Arc<crate::coord::Coord>>,
    /// Client connections per user and database.
    pub limits: Limits,
    /// Who may log in: `HANDOFF_USERS`, the users file, the server-side lookup.
    pub users: crate::frontend::users::Users,
    /// Every client connected now, and the statistics per client database.
    pub clients: crate::frontend::clients::Clients,
    /// The admin console's `SHUTDOWN` asked the process to stop (see
    /// [`crate::Proxy::shutdown_requested`]).
    pub shutdown_requested: tokio::sync::Notify,
    /// TLS towards clients (reloadable) and towards servers.
    pub client_tls: ClientTls,
    pub server_tls: ServerTls,
}

impl Shared {
    /// The shard named `name`.
    pub fn shard(&self, name: &str) -> Option<&Arc<Shard>> {
        self.shards.iter().find(|s| s.name == name)
    }
}
