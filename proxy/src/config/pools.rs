//! Client limits, the server pools, and the failover buffer's settings.

use std::time::Duration;

use super::shards::ShardConfig;
use super::values::Vars;
use super::variable::{Applies, Topic, Variable};
use super::{invalid, ConfigError};

/// Client limits and timeouts.
pub(super) const CLIENT_VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_MAX_CLIENT_CONN",
        topic: Topic::Clients,
        default: "1000",
        applies: Applies::Takeover,
        help: "most client connections at once; beyond it a client gets `53300`",
    },
    Variable {
        name: "HANDOFF_MAX_USER_CLIENT_CONN",
        topic: Topic::Clients,
        default: "0",
        applies: Applies::Takeover,
        help: "most client connections per user at once (`0`: no limit); beyond it `53300` naming the variable",
    },
    Variable {
        name: "HANDOFF_MAX_DB_CLIENT_CONN",
        topic: Topic::Clients,
        default: "0",
        applies: Applies::Takeover,
        help: "most client connections per client database at once (`0`: no limit); beyond it `53300`",
    },
    Variable {
        name: "HANDOFF_CLIENT_IDLE_TIMEOUT",
        topic: Topic::Clients,
        default: "0",
        applies: Applies::Takeover,
        help: "a client idle outside a transaction this long is disconnected with `57P05` (`0`: never)",
    },
    Variable {
        name: "HANDOFF_IDLE_TRANSACTION_TIMEOUT",
        topic: Topic::Clients,
        default: "0",
        applies: Applies::Takeover,
        help: "a client idle inside a transaction this long is disconnected with `25P03`; its server connection is closed, so the transaction rolls back (`0`: never; transaction mode)",
    },
    Variable {
        name: "HANDOFF_MAX_MESSAGE_SIZE",
        topic: Topic::Clients,
        default: "64MB",
        applies: Applies::Takeover,
        help: "largest client message handoff parses whole (Parse, Bind, Describe, Close in transaction mode); a larger one gets `54000` and the connection is closed. Other messages (Query, CopyData, …) stream through at any size up to PostgreSQL's 1 GB",
    },
    Variable {
        name: "HANDOFF_CLIENT_LOGIN_TIMEOUT",
        topic: Topic::Clients,
        default: "15s",
        applies: Applies::Takeover,
        help: "longest a client may take from connecting to being logged in",
    },
    Variable {
        name: "HANDOFF_SHUTDOWN_TIMEOUT",
        topic: Topic::Clients,
        default: "30s",
        applies: Applies::Takeover,
        help: "on SIGTERM/SIGINT, how long sessions may run to their next transaction boundary before being closed",
    },
    Variable {
        name: "HANDOFF_STATS_PERIOD",
        topic: Topic::Clients,
        default: "60s",
        applies: Applies::Takeover,
        help: "the period the console's `SHOW STATS` averages over (PgBouncer's `stats_period`)",
    },
];

/// Pools and server connections.
pub(super) const POOL_VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_POOL_MODE",
        topic: Topic::Pools,
        default: "transaction",
        applies: Applies::Takeover,
        help: "`transaction`: a pooled server connection per transaction; `session`: one server connection per client for its whole session",
    },
    Variable {
        name: "HANDOFF_POOL_SIZE",
        topic: Topic::Pools,
        default: "20",
        applies: Applies::Takeover,
        help: "most server connections per pool; a pool is one (user, server database, shard primary)",
    },
    Variable {
        name: "HANDOFF_POOL_MIN_IDLE",
        topic: Topic::Pools,
        default: "0",
        applies: Applies::Takeover,
        help: "idle server connections each pool keeps open once it exists",
    },
    Variable {
        name: "HANDOFF_QUERY_WAIT_TIMEOUT",
        topic: Topic::Pools,
        default: "120s",
        applies: Applies::Takeover,
        help: "longest a client waits for a free server connection; then `53300` and the client is disconnected",
    },
    Variable {
        name: "HANDOFF_SERVER_IDLE_TIMEOUT",
        topic: Topic::Pools,
        default: "10m",
        applies: Applies::Takeover,
        help: "idle pooled server connections are closed after this (`0`: never)",
    },
    Variable {
        name: "HANDOFF_SERVER_LIFETIME",
        topic: Topic::Pools,
        default: "1h",
        applies: Applies::Takeover,
        help: "a server connection this old is closed when it comes back to the pool (`0`: never)",
    },
    Variable {
        name: "HANDOFF_MAX_PREPARED_STATEMENTS",
        topic: Topic::Pools,
        default: "200",
        applies: Applies::Takeover,
        help: "prepared statements kept per server connection (LRU; the least recently used is closed)",
    },
    Variable {
        name: "HANDOFF_CONNECT_TIMEOUT",
        topic: Topic::Pools,
        default: "5s",
        applies: Applies::Takeover,
        help: "longest wait for a server connection to be made and logged in",
    },
    Variable {
        name: "HANDOFF_SERVER_TCP_USER_TIMEOUT",
        topic: Topic::Pools,
        default: "10s",
        applies: Applies::Takeover,
        help: "a server connection whose sent data goes unacknowledged this long (a silently cut-off server) is closed with an error (`TCP_USER_TIMEOUT`; `0`: the kernel's default)",
    },
    Variable {
        name: "HANDOFF_SERVER_TCP_KEEPALIVE",
        topic: Topic::Pools,
        default: "10s",
        applies: Applies::Takeover,
        help: "idle time before TCP keepalive probes a server connection (three probes, a third of this apart; `0`: no keepalives)",
    },
];

/// The failover buffer (read into `handoff_buffer::BufferConfig`).
pub(super) const BUFFER_VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_BUFFER_ENABLED",
        topic: Topic::Buffer,
        default: "true",
        applies: Applies::Takeover,
        help: "hold new transactions of a shard whose primary is changing (switchover or failover)",
    },
    Variable {
        name: "HANDOFF_BUFFER_DRY_RUN",
        topic: Topic::Buffer,
        default: "false",
        applies: Applies::Takeover,
        help: "run the buffer's state machine and count what would be held, but hold nothing",
    },
    Variable {
        name: "HANDOFF_BUFFER_SIZE",
        topic: Topic::Buffer,
        default: "1000",
        applies: Applies::Takeover,
        help: "requests held per shard; when full, the shard's oldest held request is evicted",
    },
    Variable {
        name: "HANDOFF_BUFFER_MAX_BYTES",
        topic: Topic::Buffer,
        default: "64MB",
        applies: Applies::Takeover,
        help: "request bytes held across all shards (sizes: `B`, `kB`, `MB`, `GB`)",
    },
    Variable {
        name: "HANDOFF_BUFFER_WINDOW",
        topic: Topic::Buffer,
        default: "10s",
        applies: Applies::Takeover,
        help: "longest one request stays held (at least 1ms, at most the max failover duration)",
    },
    Variable {
        name: "HANDOFF_BUFFER_MAX_FAILOVER_DURATION",
        topic: Topic::Buffer,
        default: "20s",
        applies: Applies::Takeover,
        help: "longest a buffering cycle lasts; then held requests fail",
    },
    Variable {
        name: "HANDOFF_BUFFER_MIN_TIME_BETWEEN_FAILOVERS",
        topic: Topic::Buffer,
        default: "0s",
        applies: Applies::Takeover,
        help: "optional throttle between a shard's buffering cycles (epochs already prevent duplicate starts)",
    },
    Variable {
        name: "HANDOFF_BUFFER_DRAIN_CONCURRENCY",
        topic: Topic::Buffer,
        default: "(HANDOFF_POOL_SIZE)",
        applies: Applies::Takeover,
        help: "held requests released to the new primary at once",
    },
    Variable {
        name: "HANDOFF_BUFFER_SHARDS",
        topic: Topic::Buffer,
        default: "(all)",
        applies: Applies::Takeover,
        help: "comma list of the shards to buffer",
    },
];

/// Limits on clients: how many may connect (in all, per user, per client database; 0:
/// no limit for the last two), how long they may sit idle (zero: forever) and the
/// largest message the proxy parses whole.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_client_conn: usize,
    pub max_user_client_conn: usize,
    pub max_db_client_conn: usize,
    pub client_idle_timeout: Duration,
    pub idle_transaction_timeout: Duration,
    pub max_message_size: usize,
}

/// How server connections are shared between clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// One server connection per client session.
    Session,
    /// A pooled server connection per transaction.
    Transaction,
}

/// Pool sizes and timeouts (transaction mode).
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub size: usize,
    pub min_idle: usize,
    pub query_wait_timeout: Duration,
    /// `ZERO`: never.
    pub idle_timeout: Duration,
    /// `ZERO`: never.
    pub lifetime: Duration,
    pub max_prepared: usize,
}

pub(super) fn parse_limits(vars: &Vars) -> Result<Limits, ConfigError> {
    let max_message_size = vars.size("HANDOFF_MAX_MESSAGE_SIZE")?;
    if !(1024..=1 << 30).contains(&max_message_size) {
        return Err(invalid(
            "HANDOFF_MAX_MESSAGE_SIZE",
            "must be between 1kB and 1GB",
        ));
    }
    Ok(Limits {
        max_client_conn: vars.count("HANDOFF_MAX_CLIENT_CONN", 1)?,
        max_user_client_conn: vars.count("HANDOFF_MAX_USER_CLIENT_CONN", 0)?,
        max_db_client_conn: vars.count("HANDOFF_MAX_DB_CLIENT_CONN", 0)?,
        client_idle_timeout: vars.duration("HANDOFF_CLIENT_IDLE_TIMEOUT")?,
        idle_transaction_timeout: vars.duration("HANDOFF_IDLE_TRANSACTION_TIMEOUT")?,
        max_message_size,
    })
}

pub(super) fn parse_pool(vars: &Vars) -> Result<(PoolMode, PoolSettings), ConfigError> {
    let mode = vars.choice(
        "HANDOFF_POOL_MODE",
        &[
            ("transaction", PoolMode::Transaction),
            ("session", PoolMode::Session),
        ],
    )?;
    let size = vars.count("HANDOFF_POOL_SIZE", 1)?;
    let min_idle = vars.count("HANDOFF_POOL_MIN_IDLE", 0)?;
    if min_idle > size {
        return Err(invalid(
            "HANDOFF_POOL_MIN_IDLE",
            format!("{min_idle} is more than HANDOFF_POOL_SIZE ({size})"),
        ));
    }
    Ok((
        mode,
        PoolSettings {
            size,
            min_idle,
            query_wait_timeout: vars.positive_duration("HANDOFF_QUERY_WAIT_TIMEOUT")?,
            idle_timeout: vars.duration("HANDOFF_SERVER_IDLE_TIMEOUT")?,
            lifetime: vars.duration("HANDOFF_SERVER_LIFETIME")?,
            max_prepared: vars.count("HANDOFF_MAX_PREPARED_STATEMENTS", 1)?,
        },
    ))
}

pub(super) fn parse_buffer(
    vars: &Vars,
    shards: &[ShardConfig],
    pool_size: usize,
) -> Result<handoff_buffer::BufferConfig, ConfigError> {
    let cfg = handoff_buffer::BufferConfig {
        enabled: vars.flag("HANDOFF_BUFFER_ENABLED")?,
        dry_run: vars.flag("HANDOFF_BUFFER_DRY_RUN")?,
        size: vars.count("HANDOFF_BUFFER_SIZE", 0)?,
        max_bytes: vars.size("HANDOFF_BUFFER_MAX_BYTES")?,
        window: vars.duration("HANDOFF_BUFFER_WINDOW")?,
        max_failover_duration: vars.duration("HANDOFF_BUFFER_MAX_FAILOVER_DURATION")?,
        min_time_between_failovers: vars.duration("HANDOFF_BUFFER_MIN_TIME_BETWEEN_FAILOVERS")?,
        drain_concurrency: match vars.get("HANDOFF_BUFFER_DRAIN_CONCURRENCY") {
            None => pool_size,
            Some(_) => vars.count("HANDOFF_BUFFER_DRAIN_CONCURRENCY", 0)?,
        },
        shards: vars.get("HANDOFF_BUFFER_SHARDS").map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        }),
    };
    let names: Vec<&str> = shards.iter().map(|s| s.name.as_str()).collect();
    cfg.validate(&names).map_err(|e| invalid(e.var, e.reason))?;
    Ok(cfg)
}
