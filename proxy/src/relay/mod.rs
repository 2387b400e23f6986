//! The relays: bytes between a logged-in client and its server connection, in session
//! mode (one server connection for the whole session, moved to a new primary at a
//! transaction boundary) and in transaction mode (a pooled connection per transaction).
//!
//! A relay sees only [`Ctx`]: the settings it uses, the shard layer's handle, its
//! metrics, server TLS and the cancel registry.

use std::sync::Arc;
use std::time::Duration;

use crate::backend::cancel;
use crate::config::Config;
use crate::metrics::{PreparedCounters, RelayMeters};
use crate::net::tls::ServerTls;

pub(crate) mod common;
pub(crate) mod handover;
pub(crate) mod lot;
pub(crate) mod session_mode;
pub(crate) mod session_move;
pub(crate) mod shared;
pub(crate) mod txn;

/// The settings a relay reads (from `HANDOFF_*`).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Largest client message parsed whole (`HANDOFF_MAX_MESSAGE_SIZE`).
    pub max_message_size: usize,
    pub connect_timeout: Duration,
    /// Idle limits for clients (zero: none).
    pub client_idle_timeout: Duration,
    pub idle_transaction_timeout: Duration,
    /// Lameduck: how long a transaction on a revoked primary may run.
    pub drain_timeout: Duration,
}

impl Settings {
    pub fn from_config(c: &Config) -> Self {
        Self {
            max_message_size: c.limits.max_message_size,
            connect_timeout: c.connect_timeout,
            client_idle_timeout: c.limits.client_idle_timeout,
            idle_transaction_timeout: c.limits.idle_transaction_timeout,
            drain_timeout: c.drain_timeout,
        }
    }
}

/// What every relay shares: built once by the proxy's wiring (`lib.rs`).
#[derive(Debug)]
pub(crate) struct Ctx {
    pub settings: Settings,
    /// The buffer, the pools, the admin role: the shard layer's handle.
    pub shard: Arc<crate::shard::Ctx>,
    /// The request, transaction and byte series, shared by every session.
    pub meters: Arc<RelayMeters>,
    /// Prepared-statement cache outcomes.
    pub prepared: PreparedCounters,
    pub server_tls: ServerTls,
    /// Where a client's cancel key leads.
    pub cancels: Arc<cancel::Registry>,
    /// Where sessions go during a takeover.
    pub outbox: handover::Outbox,
    /// Pool targets and startup parameters, one copy for every session with equal ones.
    pub shared: shared::Shared,
    /// Quiet transaction-mode sessions, kept without a task of their own.
    pub lot: lot::Lot,
}
