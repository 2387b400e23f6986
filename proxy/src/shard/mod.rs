//! Shards: which server is each shard's primary, and everything that changes it — the
//! state machine and its generations, the events that move it (revoke, lameduck,
//! establish, abort), failure detection and discovery, switchovers, the fence on an old
//! primary, the split-brain watchdog and the demote command.

pub(crate) mod control;
pub(crate) mod demote;
pub(crate) mod failure;
pub(crate) mod fence;
pub(crate) mod health;
pub(crate) mod hold;
pub(crate) mod managed;
pub(crate) mod managed_switch;
pub(crate) mod monitor;
pub(crate) mod replay;
pub(crate) mod replica_check;
pub(crate) mod replicas;
mod state;
pub(crate) mod switchover;
pub(crate) mod sync_target;
pub(crate) mod watch;
pub(crate) mod watchdog;

pub use state::*;

use std::sync::Arc;
use std::time::Duration;

use crate::backend::admin::AdminDb;
use crate::backend::pool::Pools;
use crate::config::{HealthSettings, SwitchoverSettings};

/// What the shard layer needs from the rest of the proxy, and nothing more: the failover
/// buffer, the pools (retired, pre-warmed and activated as primaries change), the admin
/// role's connections, and its settings. Every shard operation takes this instead of the
/// proxy's whole shared state.
#[derive(Debug)]
pub struct Ctx {
    pub buffer: handoff_buffer::Buffer,
    pub pools: Arc<Pools>,
    /// The read pools, one per (user, database, standby): apart from the primaries'
    /// pools, so retiring a primary's pools never touches a standby's.
    pub read_pools: Arc<Pools>,
    pub admin: AdminDb,
    pub settings: Settings,
    /// The HA manager of each shard that has one (`HANDOFF_PATRONI`,
    /// `HANDOFF_PG_AUTO_FAILOVER`).
    pub managers: crate::manager::Managers,
}

/// The settings of the shard layer.
#[derive(Debug, Clone)]
pub struct Settings {
    pub switchover: SwitchoverSettings,
    pub health: HealthSettings,
    /// Lameduck: how long transactions on a revoked primary may run.
    pub drain_timeout: Duration,
    pub watchdog_interval: Duration,
    /// Connections opened per pool on a new primary before held requests are released:
    /// `min(HANDOFF_POOL_SIZE, HANDOFF_BUFFER_DRAIN_CONCURRENCY)`.
    pub prewarm: usize,
    /// How long a hold waits for a new primary only (`HANDOFF_HOLD_TIMEOUT`).
    pub hold_timeout: Duration,
    /// Reads on standbys.
    pub replicas: crate::config::ReplicaSettings,
    /// How long a read waits for a standby to join the rotation when there is none:
    /// the failover buffer's window (`HANDOFF_BUFFER_WINDOW`).
    pub read_wait: Duration,
}

impl Ctx {
    /// The shard layer's part of the configuration, with the server TLS settings.
    pub fn new(
        config: &crate::config::Config,
        server_tls: crate::net::tls::ServerTls,
    ) -> Result<Self, handoff_buffer::ConfigError> {
        let names: Vec<&str> = config.shards.iter().map(|s| s.name.as_str()).collect();
        Ok(Self {
            buffer: handoff_buffer::Buffer::new(config.buffer.clone(), &names)?,
            pools: Arc::new(Pools::new(
                config.pool.clone(),
                config.connect_timeout,
                server_tls.clone(),
            )),
            read_pools: Arc::new(Pools::for_reads(
                crate::config::PoolSettings {
                    size: config.replicas.pool_size,
                    min_idle: config.pool.min_idle.min(config.replicas.pool_size),
                    ..config.pool.clone()
                },
                config.connect_timeout,
                server_tls.clone(),
            )),
            admin: AdminDb::new(config.admin_db.clone(), server_tls),
            settings: Settings {
                switchover: config.switchover.clone(),
                health: config.health.clone(),
                drain_timeout: config.drain_timeout,
                watchdog_interval: config.watchdog_interval,
                prewarm: config.pool.size.min(config.buffer.drain_concurrency.max(1)),
                hold_timeout: config.hold_timeout,
                replicas: config.replicas.clone(),
                read_wait: config.buffer.window,
            },
            managers: crate::manager::Managers::new(config),
        })
    }

    /// The HA manager of `shard`, if it has one.
    pub fn manager(&self, shard: &str) -> Option<&Arc<dyn crate::manager::Manager>> {
        self.managers.get(shard)
    }

    /// What names `shard`'s primary: its HA manager (`patroni`, `pg_auto_failover`),
    /// `etcd` (coordination) or `probe`.
    pub fn source(&self, shard: &str, coordinated: bool) -> &'static str {
        if let Some(m) = self.managers.get(shard) {
            m.kind().as_str()
        } else if coordinated {
            "etcd"
        } else {
            "probe"
        }
    }

    /// True when `shard`'s buffer holds nothing and no cycle runs.
    pub fn buffer_idle(&self, shard: &str) -> bool {
        matches!(
            self.buffer.state(shard),
            None | Some(handoff_buffer::State::Idle)
        )
    }
}
