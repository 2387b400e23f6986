//! Configuration from `HANDOFF_*` environment variables, parsed into typed structs.
//!
//! Every variable is declared once, in its topic's file, with its default and meaning
//! (joined in [`VARIABLES`]); `handoff --help` prints that table and
//! `docs/configuration.md` is generated from it. An unknown `HANDOFF_*` variable or a
//! bad value is a startup error that names the variable.
//!
//! One file per topic, each holding its variables, its settings types and its parser:
//! `listen` (addresses, TLS, log), `shards` (hosts and routes), `auth` (users, the
//! admin role), `pools` (client limits, pools, the buffer), `switchover` (switchovers,
//! failure detection), `coordination` (etcd), `patroni`. `values` reads one value;
//! `variable` says what the table records, `reference` joins the topics' tables and
//! makes `--help`, the reference and `SHOW CONFIG` from them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

mod auth;
mod coordination;
mod listen;
mod patroni;
mod pg_auto_failover;
mod pools;
mod reference;
mod replicas;
mod repmgr;
mod shards;
mod switchover;
mod values;
mod variable;

pub use auth::{AdminDbSettings, UserSecret};
pub use coordination::{EtcdSettings, Failpoint, FAILPOINTS};
pub use listen::{ClientTlsMode, ServerTlsMode, TlsSettings};
pub use patroni::{PatroniSettings, PatroniShard};
pub use pg_auto_failover::{PgAutoFailoverSettings, PgAutoFailoverShard};
pub use pools::{Limits, PoolMode, PoolSettings};
pub use reference::VARIABLES;
pub use replicas::{ReplicaLag, ReplicaSettings};
pub use repmgr::{RepmgrSettings, RepmgrShard};
pub use shards::{DatabaseRoute, HostPort, ShardConfig, Target};
pub use switchover::{HealthSettings, SwitchoverSettings};
pub use values::{parse_duration, parse_size, InvalidValue};
pub use variable::{Applies, Topic, Variable};

use values::Vars;

/// Why the configuration was refused. The message always names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not a known variable (see `handoff --help` for the list)")]
    Unknown(String),
    #[error("{var}: {reason}")]
    Invalid { var: &'static str, reason: String },
}

fn invalid(var: &'static str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        var,
        reason: reason.to_string(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<String>,
    /// `HANDOFF_TAKEOVER_SOCKET` (`None`: off).
    pub takeover_socket: Option<std::path::PathBuf>,
    pub shards: Vec<ShardConfig>,
    /// Explicit routes by client database name.
    pub databases: HashMap<String, DatabaseRoute>,
    /// The route for any database not listed (the only shard by default, or `*=`).
    pub default_route: Option<DatabaseRoute>,
    /// `None`: clients are not asked for a password (loopback listen only).
    pub users: Option<HashMap<String, UserSecret>>,
    /// Client connection limits, idle timeouts and the largest message.
    pub limits: Limits,
    pub tls: TlsSettings,
    pub pool_mode: PoolMode,
    pub pool: PoolSettings,
    /// Reads on standbys (`HANDOFF_REPLICA_*`).
    pub replicas: ReplicaSettings,
    /// The failover buffer's settings (`HANDOFF_BUFFER_*`).
    pub buffer: handoff_buffer::BufferConfig,
    pub connect_timeout: Duration,
    /// TCP options on server sockets (`HANDOFF_SERVER_TCP_*`).
    pub server_tcp: ServerTcp,
    pub client_login_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Planned switchovers and lameduck.
    pub switchover: SwitchoverSettings,
    pub drain_timeout: Duration,
    /// The role for switchover SQL, health checks and discovery.
    pub admin_db: AdminDbSettings,
    /// Who may use the admin console (`HANDOFF_ADMIN_USERS`).
    pub admin_users: Vec<String>,
    /// `HANDOFF_USERS_FILE`.
    pub users_file: Option<std::path::PathBuf>,
    /// `HANDOFF_AUTH_USER`, `HANDOFF_AUTH_QUERY`, `HANDOFF_AUTH_CACHE_TTL`.
    pub auth_user: Option<String>,
    pub auth_query: String,
    pub auth_cache_ttl: Duration,
    /// Every variable as `SHOW CONFIG` shows it: name, value (secrets hidden), default.
    pub shown: Vec<(&'static str, String, &'static str)>,
    /// The period `SHOW STATS` averages over.
    pub stats_period: Duration,
    /// Health checks and discovery (unplanned failover).
    pub health: HealthSettings,
    /// How often the split-brain watchdog looks at replaced primaries.
    pub watchdog_interval: Duration,
    /// Coordination with the other proxies over etcd (`HANDOFF_ETCD_*`); `None`: alone.
    pub etcd: Option<EtcdSettings>,
    /// Shards managed by Patroni (`HANDOFF_PATRONI*`).
    pub patroni: PatroniSettings,
    /// Shards managed by pg_auto_failover (`HANDOFF_PG_AUTO_FAILOVER*`).
    pub pg_auto_failover: PgAutoFailoverSettings,
    /// Shards managed by repmgr (`HANDOFF_REPMGR*`).
    pub repmgr: RepmgrSettings,
    /// How long a hold (`POST /v1/shards/{s}/hold`) waits for a new primary only.
    pub hold_timeout: Duration,
    pub log: String,
    /// `HANDOFF_WORKER_THREADS` (`0`: one per CPU, the runtime's default).
    pub worker_threads: usize,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars = std::env::vars_os().filter_map(|(k, v)| {
            let k = k.into_string().ok()?;
            k.starts_with("HANDOFF_")
                .then(|| (k, v.to_string_lossy().into_owned()))
        });
        Self::from_vars(vars)
    }

    /// Parses the given `HANDOFF_*` variables (others are ignored); missing ones take
    /// the defaults declared in [`VARIABLES`].
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars = Vars::collect(vars, VARIABLES)?;
        let listeners = listen::parse_listeners(&vars)?;
        // Set but empty is a mistake (an unexpanded variable in a deployment file, say),
        // not a request for the default shard: refuse it.
        if vars
            .env
            .get("HANDOFF_SHARDS")
            .is_some_and(|v| v.trim().is_empty())
        {
            return Err(invalid(
                "HANDOFF_SHARDS",
                "is set but empty: name at least one shard (e.g. main=127.0.0.1:5432), or unset it for the default",
            ));
        }
        let shards = shards::parse_shards(vars.get("HANDOFF_SHARDS").unwrap_or_default())?;
        let patroni = patroni::parse(&vars, &shards)?;
        let pg_auto_failover = pg_auto_failover::parse(&vars, &shards)?;
        let repmgr = repmgr::parse(&vars, &shards)?;
        managed_shards(&shards, &patroni, &pg_auto_failover, &repmgr)?;
        let (databases, default_route) =
            shards::parse_databases(vars.get("HANDOFF_DATABASES"), &shards)?;
        let users = auth::parse_client_users(&vars, listeners.listen)?;
        let limits = pools::parse_limits(&vars)?;
        let tls = listen::parse_tls(&vars)?;
        let (pool_mode, pool) = pools::parse_pool(&vars)?;
        let buffer = pools::parse_buffer(&vars, &shards, pool.size)?;
        let replicas = replicas::parse(&vars, pool.size)?;
        let (switchover, drain_timeout) = switchover::parse_switchover(&vars)?;
        let (health, watchdog_interval) = switchover::parse_health(&vars)?;
        Ok(Self {
            listen: listeners.listen,
            admin_listen: listeners.admin_listen,
            admin_token: listeners.admin_token,
            takeover_socket: listeners.takeover_socket,
            shards,
            databases,
            default_route,
            admin_db: auth::parse_admin_db(&vars, users.as_ref()),
            admin_users: auth::parse_admin_users(&vars)?,
            users_file: vars
                .given("HANDOFF_USERS_FILE")
                .map(std::path::PathBuf::from),
            auth_user: vars.given("HANDOFF_AUTH_USER").map(str::to_string),
            auth_query: vars
                .get("HANDOFF_AUTH_QUERY")
                .unwrap_or_default()
                .to_string(),
            auth_cache_ttl: vars.duration("HANDOFF_AUTH_CACHE_TTL")?,
            shown: reference::shown_settings(&vars),
            stats_period: vars.positive_duration("HANDOFF_STATS_PERIOD")?,
            users,
            limits,
            tls,
            pool_mode,
            pool,
            replicas,
            buffer,
            connect_timeout: vars.positive_duration("HANDOFF_CONNECT_TIMEOUT")?,
            server_tcp: ServerTcp {
                user_timeout: vars.optional_duration("HANDOFF_SERVER_TCP_USER_TIMEOUT")?,
                keepalive: vars.optional_duration("HANDOFF_SERVER_TCP_KEEPALIVE")?,
            },
            client_login_timeout: vars.positive_duration("HANDOFF_CLIENT_LOGIN_TIMEOUT")?,
            shutdown_timeout: vars.duration("HANDOFF_SHUTDOWN_TIMEOUT")?,
            switchover,
            drain_timeout,
            health,
            watchdog_interval,
            etcd: coordination::parse_etcd(&vars, listeners.listen)?,
            patroni,
            pg_auto_failover,
            repmgr,
            hold_timeout: vars.positive_duration("HANDOFF_HOLD_TIMEOUT")?,
            log: vars.get("HANDOFF_LOG").unwrap_or_default().to_string(),
            worker_threads: vars.count("HANDOFF_WORKER_THREADS", 0)?,
        })
    }

    /// The route for a client database, if any.
    pub fn route(&self, database: &str) -> Option<&DatabaseRoute> {
        self.databases.get(database).or(self.default_route.as_ref())
    }
}

/// The `shard=value` entries of an HA manager's variable (`;` between them): every
/// shard named is in `HANDOFF_SHARDS`, none twice. `shape` says what an entry looks
/// like, `shown` how an entry is quoted in a message (passwords hidden).
fn shard_entries<'a>(
    var: &'static str,
    value: &'a str,
    shards: &[ShardConfig],
    shape: &str,
    shown: fn(&str) -> String,
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for entry in value.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, rest) = entry
            .split_once('=')
            .ok_or_else(|| invalid(var, format!("'{}' is not {shape}", shown(entry))))?;
        let name = name.trim();
        if !shards.iter().any(|s| s.name == name) {
            return Err(invalid(
                var,
                format!("shard '{name}' is not in HANDOFF_SHARDS"),
            ));
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(invalid(var, format!("shard '{name}' is listed twice")));
        }
        out.push((name, rest.trim()));
    }
    Ok(out)
}

/// Every shard has one HA manager at most, and a shard configured without hosts has
/// one (its members are its hosts).
fn managed_shards(
    shards: &[ShardConfig],
    patroni: &PatroniSettings,
    pg_auto_failover: &PgAutoFailoverSettings,
    repmgr: &RepmgrSettings,
) -> Result<(), ConfigError> {
    for s in shards {
        let mut m = Vec::new();
        if patroni.shard(&s.name).is_some() {
            m.push("HANDOFF_PATRONI");
        }
        if pg_auto_failover.shards.iter().any(|p| p.shard == s.name) {
            m.push("HANDOFF_PG_AUTO_FAILOVER");
        }
        if repmgr.shards.iter().any(|r| r.shard == s.name) {
            m.push("HANDOFF_REPMGR");
        }
        if m.len() > 1 {
            return Err(invalid(
                m[1],
                format!(
                    "shard '{}' is also in {}: a shard has one HA manager",
                    s.name, m[0]
                ),
            ));
        }
        if s.hosts.is_empty() && m.is_empty() {
            return Err(invalid(
                "HANDOFF_SHARDS",
                format!(
                    "shard '{}' has no hosts (list them, or name its HA manager in HANDOFF_PATRONI, HANDOFF_PG_AUTO_FAILOVER or HANDOFF_REPMGR)",
                    s.name
                ),
            ));
        }
    }
    Ok(())
}

/// TCP options on every socket to a PostgreSQL server (`HANDOFF_SERVER_TCP_*`); `None`
/// leaves the kernel's default. Applied by `net::keepalive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerTcp {
    pub user_timeout: Option<Duration>,
    pub keepalive: Option<Duration>,
}

impl Default for ServerTcp {
    /// The defaults of `HANDOFF_SERVER_TCP_USER_TIMEOUT` and
    /// `HANDOFF_SERVER_TCP_KEEPALIVE`.
    fn default() -> Self {
        Self {
            user_timeout: Some(Duration::from_secs(10)),
            keepalive: Some(Duration::from_secs(10)),
        }
    }
}

impl ServerTcp {
    /// No options: the kernel's defaults (unit tests, embedders).
    pub const NONE: ServerTcp = ServerTcp {
        user_timeout: None,
        keepalive: None,
    };
}

#[cfg(test)]
mod tests;
