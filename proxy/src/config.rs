//! Configuration from `HANDOFF_*` environment variables, parsed into typed structs.
//!
//! Every variable is listed in [`VARIABLES`] with its default and meaning; `handoff
//! --help` prints that table and `docs/configuration.md` is generated from it. An
//! unknown `HANDOFF_*` variable or a bad value is a startup error that names the
//! variable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use handoff_protocol::auth::ScramVerifier;

/// Which part of handoff a variable configures: the sections of the configuration
/// reference (`docs/configuration.md`), in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Listen,
    Shards,
    Auth,
    Clients,
    Pools,
    Buffer,
    Failover,
    Coordination,
    Patroni,
}

impl Topic {
    pub const ALL: [Topic; 9] = [
        Topic::Listen,
        Topic::Shards,
        Topic::Auth,
        Topic::Clients,
        Topic::Pools,
        Topic::Buffer,
        Topic::Failover,
        Topic::Coordination,
        Topic::Patroni,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Topic::Listen => "Listening, TLS, the admin API and logs",
            Topic::Shards => "Shards and routing",
            Topic::Auth => "Users and authentication",
            Topic::Clients => "Client limits and timeouts",
            Topic::Pools => "Pools and server connections",
            Topic::Buffer => "The failover buffer",
            Topic::Failover => "Switchovers, failure detection and the fence",
            Topic::Coordination => "Coordination over etcd",
            Topic::Patroni => "Patroni",
        }
    }
}

/// When a running proxy takes a new value of a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    /// Read once at startup: restart to change.
    AtStart,
    /// Read again on SIGHUP.
    OnSighup,
}

/// One documented variable: its name, topic, default (as written in the environment),
/// when a change applies, and its meaning (Markdown: `code` in backquotes).
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    pub topic: Topic,
    pub default: &'static str,
    pub applies: Applies,
    pub help: &'static str,
}

/// Every variable handoff reads — the one source of their names, defaults and
/// meanings: `handoff --help`, the console's `SHOW CONFIG` and `docs/configuration.md`
/// are made from it. Anything else starting with `HANDOFF_` is refused.
pub const VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_LISTEN",
        topic: Topic::Listen,
        default: "127.0.0.1:6432",
        applies: Applies::AtStart,
        help: "address clients connect to",
    },
    Variable {
        name: "HANDOFF_ADMIN_LISTEN",
        topic: Topic::Listen,
        default: "127.0.0.1:6480",
        applies: Applies::AtStart,
        help: "admin HTTP API (`/healthz`, `/readyz`, `/metrics`)",
    },
    Variable {
        name: "HANDOFF_ADMIN_TOKEN",
        topic: Topic::Listen,
        default: "(unset)",
        applies: Applies::AtStart,
        help: "bearer token for the admin API (all but the two health probes); required when `HANDOFF_ADMIN_LISTEN` is not loopback",
    },
    Variable {
        name: "HANDOFF_SHARDS",
        topic: Topic::Shards,
        default: "main=127.0.0.1:5432",
        applies: Applies::AtStart,
        help: "`name=host:port[,host:port...][;name=...]`: every host that may be the shard's primary; at startup the writable one on the highest timeline is chosen (the first listed wins ties). A shard in `HANDOFF_PATRONI` may be a bare `name`: Patroni's members are its hosts",
    },
    Variable {
        name: "HANDOFF_DATABASES",
        topic: Topic::Shards,
        default: "(every database to the only shard)",
        applies: Applies::AtStart,
        help: "`clientdb=shard[/serverdb][;...]`; `*=shard` routes any other database; required with more than one shard",
    },
    Variable {
        name: "HANDOFF_USERS",
        topic: Topic::Auth,
        default: "(unset: no client password, loopback listen only)",
        applies: Applies::AtStart,
        help: "`user=password` or `user=SCRAM-SHA-256$iter:salt$StoredKey:ServerKey`, comma separated; required when `HANDOFF_LISTEN` is not loopback",
    },
    Variable {
        name: "HANDOFF_USERS_FILE",
        topic: Topic::Auth,
        default: "(unset)",
        applies: Applies::OnSighup,
        help: "a users file as PgBouncer's `userlist.txt`: `\"user\" \"secret\"` per line, the secret a password, a `SCRAM-SHA-256$…` verifier or an `md5…` secret; read again on SIGHUP (a broken file is refused and the old list stays)",
    },
    Variable {
        name: "HANDOFF_AUTH_USER",
        topic: Topic::Auth,
        default: "(unset: no lookup)",
        applies: Applies::AtStart,
        help: "server role that looks up a user `HANDOFF_USERS` and the file do not list, on the primary of the shard the client's database routes to (PgBouncer's `auth_user`); its password, if the server asks, comes from `HANDOFF_USERS` or the file",
    },
    Variable {
        name: "HANDOFF_AUTH_QUERY",
        topic: Topic::Auth,
        default: "SELECT usename, passwd FROM pg_shadow WHERE usename=$1",
        applies: Applies::AtStart,
        help: "the lookup: `$1` is the user; one row (name, secret) or none",
    },
    Variable {
        name: "HANDOFF_AUTH_CACHE_TTL",
        topic: Topic::Auth,
        default: "60s",
        applies: Applies::AtStart,
        help: "how long a looked-up secret is kept; a failed login with a cached one asks the server again next time",
    },
    Variable {
        name: "HANDOFF_MAX_CLIENT_CONN",
        topic: Topic::Clients,
        default: "1000",
        applies: Applies::AtStart,
        help: "most client connections at once; beyond it a client gets `53300`",
    },
    Variable {
        name: "HANDOFF_TLS_MODE",
        topic: Topic::Listen,
        default: "disable",
        applies: Applies::AtStart,
        help: "TLS for clients: `disable` (SSLRequest answered `N`), `allow` (TLS for clients that ask), `require` (plaintext clients get `28000`)",
    },
    Variable {
        name: "HANDOFF_TLS_CERT",
        topic: Topic::Listen,
        default: "(unset)",
        applies: Applies::OnSighup,
        help: "PEM certificate chain for client TLS; read again on SIGHUP",
    },
    Variable {
        name: "HANDOFF_TLS_KEY",
        topic: Topic::Listen,
        default: "(unset)",
        applies: Applies::OnSighup,
        help: "PEM private key for client TLS; read again on SIGHUP",
    },
    Variable {
        name: "HANDOFF_SERVER_TLS",
        topic: Topic::Listen,
        default: "disable",
        applies: Applies::AtStart,
        help: "TLS to PostgreSQL, as libpq's `sslmode`: `disable`, `prefer`, `require` (encrypt, no verification), `verify-ca` (chain), `verify-full` (chain and host name)",
    },
    Variable {
        name: "HANDOFF_SERVER_TLS_CA",
        topic: Topic::Listen,
        default: "(unset)",
        applies: Applies::AtStart,
        help: "PEM CA certificates server certificates must chain to (`verify-ca`, `verify-full`)",
    },
    Variable {
        name: "HANDOFF_MAX_USER_CLIENT_CONN",
        topic: Topic::Clients,
        default: "0",
        applies: Applies::AtStart,
        help: "most client connections per user at once (`0`: no limit); beyond it `53300` naming the variable",
    },
    Variable {
        name: "HANDOFF_MAX_DB_CLIENT_CONN",
        topic: Topic::Clients,
        default: "0",
        applies: Applies::AtStart,
        help: "most client connections per client database at once (`0`: no limit); beyond it `53300`",
    },
    Variable {
        name: "HANDOFF_CLIENT_IDLE_TIMEOUT",
        topic: Topic::Clients,
        default: "0",
        applies: Applies::AtStart,
        help: "a client idle outside a transaction this long is disconnected with `57P05` (`0`: never)",
    },
    Variable {
        name: "HANDOFF_IDLE_TRANSACTION_TIMEOUT",
        topic: Topic::Clients,
        default: "0",
        applies: Applies::AtStart,
        help: "a client idle inside a transaction this long is disconnected with `25P03`; its server connection is closed, so the transaction rolls back (`0`: never; transaction mode)",
    },
    Variable {
        name: "HANDOFF_MAX_MESSAGE_SIZE",
        topic: Topic::Clients,
        default: "64MB",
        applies: Applies::AtStart,
        help: "largest client message handoff parses whole (Parse, Bind, Describe, Close in transaction mode); a larger one gets `54000` and the connection is closed. Other messages (Query, CopyData, …) stream through at any size up to PostgreSQL's 1 GB",
    },
    Variable {
        name: "HANDOFF_POOL_MODE",
        topic: Topic::Pools,
        default: "transaction",
        applies: Applies::AtStart,
        help: "`transaction`: a pooled server connection per transaction; `session`: one server connection per client for its whole session",
    },
    Variable {
        name: "HANDOFF_POOL_SIZE",
        topic: Topic::Pools,
        default: "20",
        applies: Applies::AtStart,
        help: "most server connections per pool; a pool is one (user, server database, shard primary)",
    },
    Variable {
        name: "HANDOFF_POOL_MIN_IDLE",
        topic: Topic::Pools,
        default: "0",
        applies: Applies::AtStart,
        help: "idle server connections each pool keeps open once it exists",
    },
    Variable {
        name: "HANDOFF_QUERY_WAIT_TIMEOUT",
        topic: Topic::Pools,
        default: "120s",
        applies: Applies::AtStart,
        help: "longest a client waits for a free server connection; then `53300` and the client is disconnected",
    },
    Variable {
        name: "HANDOFF_SERVER_IDLE_TIMEOUT",
        topic: Topic::Pools,
        default: "10m",
        applies: Applies::AtStart,
        help: "idle pooled server connections are closed after this (`0`: never)",
    },
    Variable {
        name: "HANDOFF_SERVER_LIFETIME",
        topic: Topic::Pools,
        default: "1h",
        applies: Applies::AtStart,
        help: "a server connection this old is closed when it comes back to the pool (`0`: never)",
    },
    Variable {
        name: "HANDOFF_MAX_PREPARED_STATEMENTS",
        topic: Topic::Pools,
        default: "200",
        applies: Applies::AtStart,
        help: "prepared statements kept per server connection (LRU; the least recently used is closed)",
    },
    Variable {
        name: "HANDOFF_CONNECT_TIMEOUT",
        topic: Topic::Pools,
        default: "5s",
        applies: Applies::AtStart,
        help: "longest wait for a server connection to be made and logged in",
    },
    Variable {
        name: "HANDOFF_CLIENT_LOGIN_TIMEOUT",
        topic: Topic::Clients,
        default: "15s",
        applies: Applies::AtStart,
        help: "longest a client may take from connecting to being logged in",
    },
    Variable {
        name: "HANDOFF_SHUTDOWN_TIMEOUT",
        topic: Topic::Clients,
        default: "30s",
        applies: Applies::AtStart,
        help: "on SIGTERM/SIGINT, how long sessions may run to their next transaction boundary before being closed",
    },
    Variable {
        name: "HANDOFF_BUFFER_ENABLED",
        topic: Topic::Buffer,
        default: "true",
        applies: Applies::AtStart,
        help: "hold new transactions of a shard whose primary is changing (switchover or failover)",
    },
    Variable {
        name: "HANDOFF_BUFFER_DRY_RUN",
        topic: Topic::Buffer,
        default: "false",
        applies: Applies::AtStart,
        help: "run the buffer's state machine and count what would be held, but hold nothing",
    },
    Variable {
        name: "HANDOFF_BUFFER_SIZE",
        topic: Topic::Buffer,
        default: "1000",
        applies: Applies::AtStart,
        help: "requests held per shard; when full, the shard's oldest held request is evicted",
    },
    Variable {
        name: "HANDOFF_BUFFER_MAX_BYTES",
        topic: Topic::Buffer,
        default: "64MB",
        applies: Applies::AtStart,
        help: "request bytes held across all shards (sizes: `B`, `kB`, `MB`, `GB`)",
    },
    Variable {
        name: "HANDOFF_BUFFER_WINDOW",
        topic: Topic::Buffer,
        default: "10s",
        applies: Applies::AtStart,
        help: "longest one request stays held (at least 1ms, at most the max failover duration)",
    },
    Variable {
        name: "HANDOFF_BUFFER_MAX_FAILOVER_DURATION",
        topic: Topic::Buffer,
        default: "20s",
        applies: Applies::AtStart,
        help: "longest a buffering cycle lasts; then held requests fail",
    },
    Variable {
        name: "HANDOFF_BUFFER_MIN_TIME_BETWEEN_FAILOVERS",
        topic: Topic::Buffer,
        default: "0s",
        applies: Applies::AtStart,
        help: "optional throttle between a shard's buffering cycles (epochs already prevent duplicate starts)",
    },
    Variable {
        name: "HANDOFF_BUFFER_DRAIN_CONCURRENCY",
        topic: Topic::Buffer,
        default: "(HANDOFF_POOL_SIZE)",
        applies: Applies::AtStart,
        help: "held requests released to the new primary at once",
    },
    Variable {
        name: "HANDOFF_BUFFER_SHARDS",
        topic: Topic::Buffer,
        default: "(all)",
        applies: Applies::AtStart,
        help: "comma list of the shards to buffer",
    },
    Variable {
        name: "HANDOFF_DRAIN_TIMEOUT",
        topic: Topic::Failover,
        default: "5s",
        applies: Applies::AtStart,
        help: "lameduck: how long transactions on a revoked primary may run before they are cancelled (`57P01`; `08006` when the primary failed)",
    },
    Variable {
        name: "HANDOFF_HEALTH_CHECK_INTERVAL",
        topic: Topic::Failover,
        default: "1s",
        applies: Applies::AtStart,
        help: "how often each shard's primary is probed (connect, not in recovery, writable)",
    },
    Variable {
        name: "HANDOFF_HEALTH_CHECK_TIMEOUT",
        topic: Topic::Failover,
        default: "2s",
        applies: Applies::AtStart,
        help: "longest a health check or discovery probe may take before the host counts as unreachable",
    },
    Variable {
        name: "HANDOFF_DISCOVERY_INTERVAL",
        topic: Topic::Failover,
        default: "100ms",
        applies: Applies::AtStart,
        help: "while a failed primary is being replaced, how often every host of the shard is probed",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_MAX_LAG",
        topic: Topic::Failover,
        default: "16MB",
        applies: Applies::AtStart,
        help: "a switchover is refused when the target replays further behind than this",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_TIMEOUT",
        topic: Topic::Failover,
        default: "10s",
        applies: Applies::AtStart,
        help: "longest the target may take to replay up to the fence LSN, and then to promote",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_SYNC_TARGET",
        topic: Topic::Failover,
        default: "true",
        applies: Applies::AtStart,
        help: "before revoking, make the target the old primary's synchronous standby with `synchronous_commit = remote_apply` (`ALTER SYSTEM`, put back when the switchover ends), so the pause does not grow with replication lag",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_TERMINATE",
        topic: Topic::Failover,
        default: "true",
        applies: Applies::AtStart,
        help: "the fence terminates the old primary's remaining sessions; `false`: it waits up to `HANDOFF_SWITCHOVER_TIMEOUT` for them to leave, else the switchover rolls back",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_DEMOTE_COMMAND",
        topic: Topic::Failover,
        default: "(unset)",
        applies: Applies::AtStart,
        help: "shell command run after a completed switchover to stop or rejoin the old primary; its environment names the shard and both servers",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_DEMOTE_TIMEOUT",
        topic: Topic::Failover,
        default: "60s",
        applies: Applies::AtStart,
        help: "longest the demote command may run; then it is killed with everything it started",
    },
    Variable {
        name: "HANDOFF_WATCHDOG_INTERVAL",
        topic: Topic::Failover,
        default: "250ms",
        applies: Applies::AtStart,
        help: "how often every replaced primary is checked for split brain (fenced, down, back as a standby, or accepting logins)",
    },
    Variable {
        name: "HANDOFF_ADMIN_USERS",
        topic: Topic::Auth,
        default: "(unset: nobody)",
        applies: Applies::AtStart,
        help: "users, comma separated, who may use the admin console (`psql -U <user> handoff`, or the database name `pgbouncer`); they authenticate like any client",
    },
    Variable {
        name: "HANDOFF_STATS_PERIOD",
        topic: Topic::Clients,
        default: "60s",
        applies: Applies::AtStart,
        help: "the period the console's `SHOW STATS` averages over (PgBouncer's `stats_period`)",
    },
    Variable {
        name: "HANDOFF_ADMIN_DB_USER",
        topic: Topic::Auth,
        default: "(the first user of HANDOFF_USERS with a password, else postgres)",
        applies: Applies::AtStart,
        help: "server role handoff runs switchover SQL, health checks and discovery probes as",
    },
    Variable {
        name: "HANDOFF_ADMIN_DB_PASSWORD",
        topic: Topic::Auth,
        default: "(that user's password, if any)",
        applies: Applies::AtStart,
        help: "its password",
    },
    Variable {
        name: "HANDOFF_ADMIN_DB_NAME",
        topic: Topic::Auth,
        default: "postgres",
        applies: Applies::AtStart,
        help: "database handoff connects to for switchover SQL",
    },
    Variable {
        name: "HANDOFF_ETCD_ENDPOINTS",
        topic: Topic::Coordination,
        default: "(unset: this proxy works alone)",
        applies: Applies::AtStart,
        help: "`http(s)://host:port` of etcd, comma separated: coordinate every switchover and each shard's primary with the other proxies of `HANDOFF_ETCD_PREFIX`",
    },
    Variable {
        name: "HANDOFF_ETCD_PREFIX",
        topic: Topic::Coordination,
        default: "/handoff",
        applies: Applies::AtStart,
        help: "etcd key prefix: one cluster of proxies per prefix",
    },
    Variable {
        name: "HANDOFF_PROXY_ID",
        topic: Topic::Coordination,
        default: "(host name:HANDOFF_LISTEN port)",
        applies: Applies::AtStart,
        help: "this proxy's name in its cluster (letters, digits, `.` `_` `:` `-`); must be unique",
    },
    Variable {
        name: "HANDOFF_ETCD_LEASE_TTL",
        topic: Topic::Coordination,
        default: "5s",
        applies: Applies::AtStart,
        help: "membership lease, whole seconds, at least `2s`: a proxy that stops renewing it (dead, or cut off from etcd) leaves the cluster, and loses any lock it held, this long after",
    },
    Variable {
        name: "HANDOFF_ETCD_TIMEOUT",
        topic: Topic::Coordination,
        default: "2s",
        applies: Applies::AtStart,
        help: "longest one etcd request may take; a failed request marks coordination down until one succeeds",
    },
    Variable {
        name: "HANDOFF_ETCD_CA_FILE",
        topic: Topic::Coordination,
        default: "(unset)",
        applies: Applies::AtStart,
        help: "PEM CA certificate(s) to verify `https` etcd endpoints (required with `https`)",
    },
    Variable {
        name: "HANDOFF_PATRONI",
        topic: Topic::Patroni,
        default: "(unset: no shard is managed by Patroni)",
        applies: Applies::AtStart,
        help: "`shard=http://host:port[,http://host:port...][;shard=...]`: the Patroni REST API of a shard's members; Patroni then names the primary (confirmed by handoff's probe) and runs promotions",
    },
    Variable {
        name: "HANDOFF_PATRONI_INTERVAL",
        topic: Topic::Patroni,
        default: "1s",
        applies: Applies::AtStart,
        help: "how often handoff reads Patroni's `GET /cluster` while a shard serves",
    },
    Variable {
        name: "HANDOFF_PATRONI_HELD_INTERVAL",
        topic: Topic::Patroni,
        default: "50ms",
        applies: Applies::AtStart,
        help: "how often handoff reads `GET /cluster` and probes Patroni's leader while a shard is held",
    },
    Variable {
        name: "HANDOFF_PATRONI_TIMEOUT",
        topic: Topic::Patroni,
        default: "2s",
        applies: Applies::AtStart,
        help: "longest one read of Patroni's REST API may take",
    },
    Variable {
        name: "HANDOFF_PATRONI_HOOK",
        topic: Topic::Patroni,
        default: "false",
        applies: Applies::AtStart,
        help: "`true` when every Patroni member's `before_stop` runs `handoff hold` against this proxy: a switchover through handoff then holds when Patroni calls the hook (right before it stops the leader) instead of before asking Patroni; ignored with `HANDOFF_ETCD_ENDPOINTS`",
    },
    Variable {
        name: "HANDOFF_HOLD_TIMEOUT",
        topic: Topic::Failover,
        default: "5s",
        applies: Applies::AtStart,
        help: "after a hold (`handoff hold`, e.g. from Patroni's `before_stop`): how long only a new primary may end it; after that the old primary is taken back if it is writable (and still Patroni's leader)",
    },
    Variable {
        name: "HANDOFF_FAILPOINT",
        topic: Topic::Coordination,
        default: "(unset)",
        applies: Applies::AtStart,
        help: "**testing only**: `point:duration` pauses a coordinated switchover this proxy coordinates after `point` (`holding`, `held`, `fencing`, `fenced`, `promoting`, `promoted`), so tests can kill it there",
    },
    Variable {
        name: "HANDOFF_LOG",
        topic: Topic::Listen,
        default: "info",
        applies: Applies::AtStart,
        help: "log filter in `tracing` EnvFilter syntax, e.g. `info,handoff=debug`",
    },
];

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

/// A server address as configured (host names are resolved when connecting).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// As `host:port` text (etcd records, the admin API's answers).
impl serde::Serialize for HostPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for HostPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HostPort::parse_any(&text).map_err(serde::de::Error::custom)
    }
}

/// A value that does not parse (the caller names the variable or field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

impl HostPort {
    /// Parses `host:port` (`[v6]:port`), outside of the configuration.
    pub fn parse_any(s: &str) -> Result<Self, InvalidValue> {
        Self::parse("address", s).map_err(|e| match e {
            ConfigError::Invalid { reason, .. } => InvalidValue(reason),
            other => InvalidValue(other.to_string()),
        })
    }

    fn parse(var: &'static str, s: &str) -> Result<Self, ConfigError> {
        let s = s.trim();
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| invalid(var, format!("'{s}' is not host:port")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(invalid(var, format!("'{s}' has an empty host")));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid(var, format!("'{s}' has an invalid port")))?;
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

/// One shard: its name and the hosts that may be its primary (at startup the writable
/// one on the highest timeline is chosen; the first listed wins ties).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardConfig {
    pub name: String,
    pub hosts: Vec<HostPort>,
}

/// Where one client database goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseRoute {
    /// Index into [`Config::shards`].
    pub shard: usize,
    /// The database name on the server; `None` keeps the client's name.
    pub server_db: Option<String>,
}

/// A client user's credentials.
#[derive(Debug, Clone)]
pub struct UserSecret {
    /// What the client must prove knowledge of.
    pub verifier: ScramVerifier,
    /// The plain password, when configured as one: also used to log in to servers.
    pub password: Option<String>,
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<String>,
    pub shards: Vec<ShardConfig>,
    /// Explicit routes by client database name.
    pub databases: HashMap<String, DatabaseRoute>,
    /// The route for any database not listed (the only shard by default, or `*=`).
    pub default_route: Option<DatabaseRoute>,
    /// `None`: clients are not asked for a password (loopback listen only).
    pub users: Option<HashMap<String, UserSecret>>,
    pub max_client_conn: usize,
    /// Client connections per user and per client database (0: no limit).
    pub max_user_client_conn: usize,
    pub max_db_client_conn: usize,
    /// Idle limits for clients (zero: none).
    pub client_idle_timeout: Duration,
    pub idle_transaction_timeout: Duration,
    /// Largest client message the proxy parses whole.
    pub max_message_size: usize,
    pub tls: TlsSettings,
    pub pool_mode: PoolMode,
    pub pool: PoolSettings,
    /// The failover buffer's settings (`HANDOFF_BUFFER_*`).
    pub buffer: handoff_buffer::BufferConfig,
    pub connect_timeout: Duration,
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
    /// How long a hold (`POST /v1/shards/{s}/hold`) waits for a new primary only.
    pub hold_timeout: Duration,
    pub log: String,
}

/// Coordination over etcd.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    /// Without a trailing `/`.
    pub prefix: String,
    pub proxy_id: String,
    pub lease_ttl: Duration,
    pub timeout: Duration,
    pub ca_file: Option<std::path::PathBuf>,
    /// A pause injected into coordinated switchovers (tests).
    pub failpoint: Option<Failpoint>,
}

/// `HANDOFF_FAILPOINT`: where a coordinated switchover pauses, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failpoint {
    pub point: String,
    pub pause: Duration,
}

/// The points `HANDOFF_FAILPOINT` accepts.
pub const FAILPOINTS: &[&str] = &[
    "holding",
    "held",
    "fencing",
    "fenced",
    "promoting",
    "promoted",
];

/// TLS towards clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTlsMode {
    Disable,
    Allow,
    Require,
}

/// TLS towards servers (libpq's `sslmode` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerTlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl ServerTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
            ServerTlsMode::VerifyCa => "verify-ca",
            ServerTlsMode::VerifyFull => "verify-full",
        }
    }
}

/// TLS settings (files are read at startup and, for clients, on SIGHUP).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub client_mode: ClientTlsMode,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    pub server_mode: ServerTlsMode,
    pub server_ca: Option<std::path::PathBuf>,
}

/// How handoff runs a switchover itself.
#[derive(Debug, Clone)]
pub struct SwitchoverSettings {
    pub max_lag: u64,
    pub timeout: Duration,
    /// Make the target synchronous before revoking (`HANDOFF_SWITCHOVER_SYNC_TARGET`).
    pub sync_target: bool,
    pub terminate: bool,
    /// Run after a completed switchover (`HANDOFF_SWITCHOVER_DEMOTE_COMMAND`).
    pub demote_command: Option<String>,
    pub demote_timeout: Duration,
}

/// The admin role handoff logs in to servers as, for switchovers, the fence, health
/// checks, discovery and the watchdog (`HANDOFF_ADMIN_DB_*`).
#[derive(Debug, Clone)]
pub struct AdminDbSettings {
    pub user: String,
    pub password: Option<String>,
    pub database: String,
}

/// The failure detector's settings.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub discovery_interval: Duration,
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
        let vars = Vars::collect(vars)?;
        let listeners = parse_listeners(&vars)?;
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
        let shards = parse_shards(vars.get("HANDOFF_SHARDS").unwrap_or_default())?;
        let patroni = patroni::parse(&vars, &shards)?;
        let (databases, default_route) = parse_databases(vars.get("HANDOFF_DATABASES"), &shards)?;
        let users = parse_client_users(&vars, listeners.listen)?;
        let limits = parse_limits(&vars)?;
        let tls = parse_tls(&vars)?;
        let (pool_mode, pool) = parse_pool(&vars)?;
        let buffer = parse_buffer(&vars, &shards, pool.size)?;
        let (switchover, drain_timeout) = parse_switchover(&vars)?;
        let (health, watchdog_interval) = parse_health(&vars)?;
        Ok(Self {
            listen: listeners.listen,
            admin_listen: listeners.admin_listen,
            admin_token: listeners.admin_token,
            shards,
            databases,
            default_route,
            admin_db: parse_admin_db(&vars, users.as_ref()),
            admin_users: parse_admin_users(&vars)?,
            users_file: vars
                .given("HANDOFF_USERS_FILE")
                .map(std::path::PathBuf::from),
            auth_user: vars.given("HANDOFF_AUTH_USER").map(str::to_string),
            auth_query: vars
                .get("HANDOFF_AUTH_QUERY")
                .unwrap_or_default()
                .to_string(),
            auth_cache_ttl: vars.duration("HANDOFF_AUTH_CACHE_TTL")?,
            shown: shown_settings(&vars),
            stats_period: vars.positive_duration("HANDOFF_STATS_PERIOD")?,
            users,
            max_client_conn: limits.max_client_conn,
            max_user_client_conn: limits.max_user_client_conn,
            max_db_client_conn: limits.max_db_client_conn,
            client_idle_timeout: limits.client_idle_timeout,
            idle_transaction_timeout: limits.idle_transaction_timeout,
            max_message_size: limits.max_message_size,
            tls,
            pool_mode,
            pool,
            buffer,
            connect_timeout: vars.positive_duration("HANDOFF_CONNECT_TIMEOUT")?,
            client_login_timeout: vars.positive_duration("HANDOFF_CLIENT_LOGIN_TIMEOUT")?,
            shutdown_timeout: vars.duration("HANDOFF_SHUTDOWN_TIMEOUT")?,
            switchover,
            drain_timeout,
            health,
            watchdog_interval,
            etcd: parse_etcd(&vars, listeners.listen)?,
            patroni,
            hold_timeout: vars.positive_duration("HANDOFF_HOLD_TIMEOUT")?,
            log: vars.get("HANDOFF_LOG").unwrap_or_default().to_string(),
        })
    }
    /// The route for a client database, if any.
    pub fn route(&self, database: &str) -> Option<&DatabaseRoute> {
        self.databases.get(database).or(self.default_route.as_ref())
    }

    /// Every variable with its default and meaning, as `handoff --help` shows them
    /// after the usage.
    pub fn help() -> String {
        let mut s = String::from("Environment variables:\n");
        for v in VARIABLES {
            let plain = v.help.replace('`', "").replace("**", "");
            s.push_str(&format!(
                "  {:<30} default {}\n      {plain}\n",
                v.name, v.default
            ));
        }
        s.push_str("\nDurations are written 250ms, 10s, 1m, 1h.\n");
        s
    }

    /// The configuration reference in Markdown, one table per [`Topic`]: what
    /// `docs/configuration.md` holds between its generated-section markers (a test
    /// checks that it does).
    pub fn reference_markdown() -> String {
        let mut s = String::new();
        for topic in Topic::ALL {
            s.push_str(&format!(
                "### {}\n\n| variable | default | a change applies | meaning |\n|---|---|---|---|\n",
                topic.title()
            ));
            for v in VARIABLES.iter().filter(|v| v.topic == topic) {
                let default = match v.default.strip_prefix('(') {
                    Some(text) => text.trim_end_matches(')').to_string(),
                    None => format!("`{}`", v.default),
                };
                let applies = match v.applies {
                    Applies::AtStart => "at restart",
                    Applies::OnSighup => "on SIGHUP",
                };
                s.push_str(&format!(
                    "| `{}` | {} | {applies} | {} |\n",
                    v.name,
                    default.replace('|', "\\|"),
                    v.help.replace('|', "\\|")
                ));
            }
            s.push('\n');
        }
        s
    }
}

fn parse_addr(var: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        invalid(
            var,
            format!("'{s}' is not an IP address and port, e.g. 127.0.0.1:6432"),
        )
    })
}

fn parse_bool(var: &'static str, s: &str) -> Result<bool, ConfigError> {
    match s {
        "true" | "on" | "1" | "yes" => Ok(true),
        "false" | "off" | "0" | "no" => Ok(false),
        _ => Err(invalid(var, format!("'{s}' is not true or false"))),
    }
}

/// Parses sizes: `65536`, `64kB`, `64MB`, `1GB` (powers of 1024).
pub fn parse_size(s: &str) -> Result<usize, InvalidValue> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| InvalidValue(format!("'{s}' is not a size like 64MB")))?;
    let mult = match unit {
        "" | "B" => 1,
        "kB" | "KB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => {
            return Err(InvalidValue(format!(
                "'{s}': the unit must be B, kB, MB or GB"
            )))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| InvalidValue(format!("'{s}' is too large")))
}

/// The `HANDOFF_*` variables given, and the declared defaults of the others: the one
/// place a default is read, so `--help` and the parser cannot disagree.
struct Vars {
    env: HashMap<String, String>,
}

impl Vars {
    /// Keeps the `HANDOFF_*` variables, refusing any not in [`VARIABLES`].
    fn collect<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut env = HashMap::new();
        for (k, v) in vars {
            let k = k.into();
            if !k.starts_with("HANDOFF_") {
                continue;
            }
            if !VARIABLES.iter().any(|var| var.name == k) {
                return Err(ConfigError::Unknown(k));
            }
            env.insert(k, v.into());
        }
        Ok(Self { env })
    }

    /// The value given (trimmed, empty counts as not given).
    fn given(&self, name: &'static str) -> Option<&str> {
        self.env
            .get(name)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
    }

    /// The value given, else the declared default; `None` for a variable left unset
    /// whose default is a description (written in parentheses).
    fn get(&self, name: &'static str) -> Option<&str> {
        if let Some(v) = self.given(name) {
            return Some(v);
        }
        let var = VARIABLES
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("{name} is read but not declared in VARIABLES"));
        (!var.default.starts_with('(')).then_some(var.default)
    }

    fn duration(&self, name: &'static str) -> Result<Duration, ConfigError> {
        parse_duration(self.get(name).unwrap_or("0")).map_err(|r| invalid(name, r))
    }

    fn positive_duration(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let d = self.duration(name)?;
        if d.is_zero() {
            return Err(invalid(name, "must be greater than zero"));
        }
        Ok(d)
    }

    fn at_least_1ms(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let d = self.duration(name)?;
        if d < Duration::from_millis(1) {
            return Err(invalid(name, "must be at least 1ms"));
        }
        Ok(d)
    }

    /// A whole number of at least `min`.
    fn count(&self, name: &'static str, min: usize) -> Result<usize, ConfigError> {
        let s = self.get(name).unwrap_or("0");
        s.parse::<usize>()
            .ok()
            .filter(|n| *n >= min)
            .ok_or_else(|| invalid(name, format!("'{s}' is not an integer of at least {min}")))
    }

    fn size(&self, name: &'static str) -> Result<usize, ConfigError> {
        parse_size(self.get(name).unwrap_or("0")).map_err(|r| invalid(name, r))
    }

    fn flag(&self, name: &'static str) -> Result<bool, ConfigError> {
        parse_bool(name, self.get(name).unwrap_or("false"))
    }

    /// One of `choices` (by name).
    fn choice<T: Copy>(&self, name: &'static str, choices: &[(&str, T)]) -> Result<T, ConfigError> {
        let s = self.get(name).unwrap_or_default();
        choices
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                invalid(name, format!("'{s}' is not one of {}", names.join(", ")))
            })
    }
}

struct Listeners {
    listen: SocketAddr,
    admin_listen: SocketAddr,
    admin_token: Option<String>,
}

fn parse_listeners(vars: &Vars) -> Result<Listeners, ConfigError> {
    let listen = parse_addr(
        "HANDOFF_LISTEN",
        vars.get("HANDOFF_LISTEN").unwrap_or_default(),
    )?;
    let admin_listen = parse_addr(
        "HANDOFF_ADMIN_LISTEN",
        vars.get("HANDOFF_ADMIN_LISTEN").unwrap_or_default(),
    )?;
    let admin_token = vars.get("HANDOFF_ADMIN_TOKEN").map(str::to_string);
    if !admin_listen.ip().is_loopback() && admin_token.is_none() {
        return Err(invalid(
            "HANDOFF_ADMIN_TOKEN",
            format!(
                "must be set because HANDOFF_ADMIN_LISTEN={admin_listen} is not a loopback address"
            ),
        ));
    }
    Ok(Listeners {
        listen,
        admin_listen,
        admin_token,
    })
}

fn parse_client_users(
    vars: &Vars,
    listen: SocketAddr,
) -> Result<Option<HashMap<String, UserSecret>>, ConfigError> {
    let users = vars.get("HANDOFF_USERS").map(parse_users).transpose()?;
    let other_source =
        vars.given("HANDOFF_USERS_FILE").is_some() || vars.given("HANDOFF_AUTH_USER").is_some();
    if users.is_none() && !other_source && !listen.ip().is_loopback() {
        return Err(invalid(
            "HANDOFF_USERS",
            format!(
                "must be set (or HANDOFF_USERS_FILE, or HANDOFF_AUTH_USER) because \
                 HANDOFF_LISTEN={listen} is not a loopback address (clients without a \
                 password are allowed on loopback only)"
            ),
        ));
    }
    Ok(users)
}

struct Limits {
    max_client_conn: usize,
    max_user_client_conn: usize,
    max_db_client_conn: usize,
    client_idle_timeout: Duration,
    idle_transaction_timeout: Duration,
    max_message_size: usize,
}

fn parse_limits(vars: &Vars) -> Result<Limits, ConfigError> {
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

fn parse_tls(vars: &Vars) -> Result<TlsSettings, ConfigError> {
    let client_mode = vars.choice(
        "HANDOFF_TLS_MODE",
        &[
            ("disable", ClientTlsMode::Disable),
            ("allow", ClientTlsMode::Allow),
            ("require", ClientTlsMode::Require),
        ],
    )?;
    let server_mode = vars.choice(
        "HANDOFF_SERVER_TLS",
        &[
            ("disable", ServerTlsMode::Disable),
            ("prefer", ServerTlsMode::Prefer),
            ("require", ServerTlsMode::Require),
            ("verify-ca", ServerTlsMode::VerifyCa),
            ("verify-full", ServerTlsMode::VerifyFull),
        ],
    )?;
    let path = |name: &'static str| vars.get(name).map(std::path::PathBuf::from);
    let tls = TlsSettings {
        client_mode,
        cert: path("HANDOFF_TLS_CERT"),
        key: path("HANDOFF_TLS_KEY"),
        server_mode,
        server_ca: path("HANDOFF_SERVER_TLS_CA"),
    };
    if client_mode != ClientTlsMode::Disable {
        for (name, v) in [
            ("HANDOFF_TLS_CERT", &tls.cert),
            ("HANDOFF_TLS_KEY", &tls.key),
        ] {
            if v.is_none() {
                return Err(invalid(
                    name,
                    "required when HANDOFF_TLS_MODE is not disable",
                ));
            }
        }
    }
    if matches!(
        server_mode,
        ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull
    ) && tls.server_ca.is_none()
    {
        return Err(invalid(
            "HANDOFF_SERVER_TLS_CA",
            "required with HANDOFF_SERVER_TLS=verify-ca or verify-full",
        ));
    }
    Ok(tls)
}

fn parse_pool(vars: &Vars) -> Result<(PoolMode, PoolSettings), ConfigError> {
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

fn parse_buffer(
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

/// Planned switchovers, and lameduck's drain timeout.
fn parse_switchover(vars: &Vars) -> Result<(SwitchoverSettings, Duration), ConfigError> {
    let settings = SwitchoverSettings {
        max_lag: vars.size("HANDOFF_SWITCHOVER_MAX_LAG")? as u64,
        timeout: vars.positive_duration("HANDOFF_SWITCHOVER_TIMEOUT")?,
        sync_target: vars.flag("HANDOFF_SWITCHOVER_SYNC_TARGET")?,
        terminate: vars.flag("HANDOFF_SWITCHOVER_TERMINATE")?,
        demote_command: vars
            .get("HANDOFF_SWITCHOVER_DEMOTE_COMMAND")
            .map(str::to_string),
        demote_timeout: vars.positive_duration("HANDOFF_SWITCHOVER_DEMOTE_TIMEOUT")?,
    };
    Ok((settings, vars.duration("HANDOFF_DRAIN_TIMEOUT")?))
}

/// The failure detector's settings, and the watchdog's interval.
fn parse_health(vars: &Vars) -> Result<(HealthSettings, Duration), ConfigError> {
    let health = HealthSettings {
        interval: vars.at_least_1ms("HANDOFF_HEALTH_CHECK_INTERVAL")?,
        timeout: vars.at_least_1ms("HANDOFF_HEALTH_CHECK_TIMEOUT")?,
        discovery_interval: vars.at_least_1ms("HANDOFF_DISCOVERY_INTERVAL")?,
    };
    Ok((health, vars.at_least_1ms("HANDOFF_WATCHDOG_INTERVAL")?))
}

/// Coordination over etcd, when `HANDOFF_ETCD_ENDPOINTS` is set.
fn parse_etcd(vars: &Vars, listen: SocketAddr) -> Result<Option<EtcdSettings>, ConfigError> {
    let failpoint = match vars.get("HANDOFF_FAILPOINT") {
        None => None,
        Some(s) => Some(parse_failpoint(s).map_err(|r| invalid("HANDOFF_FAILPOINT", r))?),
    };
    let Some(list) = vars.get("HANDOFF_ETCD_ENDPOINTS") else {
        if failpoint.is_some() {
            return Err(invalid(
                "HANDOFF_FAILPOINT",
                "only applies with HANDOFF_ETCD_ENDPOINTS",
            ));
        }
        return Ok(None);
    };
    const VAR: &str = "HANDOFF_ETCD_ENDPOINTS";
    let mut endpoints = Vec::new();
    for e in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let rest = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
            .ok_or_else(|| invalid(VAR, format!("'{e}' must start with http:// or https://")))?;
        HostPort::parse(VAR, rest.trim_end_matches('/'))?;
        endpoints.push(e.trim_end_matches('/').to_string());
    }
    if endpoints.is_empty() {
        return Err(invalid(VAR, "no endpoint given"));
    }
    let ca_file = vars
        .get("HANDOFF_ETCD_CA_FILE")
        .map(std::path::PathBuf::from);
    if ca_file.is_none() && endpoints.iter().any(|e| e.starts_with("https://")) {
        return Err(invalid(
            "HANDOFF_ETCD_CA_FILE",
            "must be set to verify the https endpoints of HANDOFF_ETCD_ENDPOINTS",
        ));
    }
    let prefix = vars.get("HANDOFF_ETCD_PREFIX").unwrap_or_default();
    let prefix = prefix.trim_end_matches('/');
    if !prefix.starts_with('/') || prefix.len() < 2 {
        return Err(invalid(
            "HANDOFF_ETCD_PREFIX",
            format!("'{prefix}' must start with '/' and name something"),
        ));
    }
    let proxy_id = match vars.get("HANDOFF_PROXY_ID") {
        Some(id) => id.to_string(),
        None => format!("{}:{}", host_name(), listen.port()),
    };
    if !proxy_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
    {
        return Err(invalid(
            "HANDOFF_PROXY_ID",
            format!("'{proxy_id}' may hold only letters, digits, '.', '_', ':' and '-'"),
        ));
    }
    let lease_ttl = vars.duration("HANDOFF_ETCD_LEASE_TTL")?;
    if lease_ttl < Duration::from_secs(2) || lease_ttl.subsec_nanos() != 0 {
        return Err(invalid(
            "HANDOFF_ETCD_LEASE_TTL",
            "must be a whole number of seconds, at least 2s",
        ));
    }
    Ok(Some(EtcdSettings {
        endpoints,
        prefix: prefix.to_string(),
        proxy_id,
        lease_ttl,
        timeout: vars.positive_duration("HANDOFF_ETCD_TIMEOUT")?,
        ca_file,
        failpoint,
    }))
}

/// `point:duration`, the point one of [`FAILPOINTS`].
fn parse_failpoint(s: &str) -> Result<Failpoint, String> {
    let (point, pause) = s
        .split_once(':')
        .ok_or_else(|| format!("'{s}' is not point:duration"))?;
    if !FAILPOINTS.contains(&point) {
        return Err(format!("'{point}' is not one of {}", FAILPOINTS.join(", ")));
    }
    let pause = parse_duration(pause).map_err(|e| e.0)?;
    Ok(Failpoint {
        point: point.to_string(),
        pause,
    })
}

/// This machine's host name (for the default proxy id).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "handoff".to_string())
}

/// The admin role: `HANDOFF_ADMIN_DB_USER`, else the first client user (by name) with a
/// password, else `postgres`.
/// The settings as the admin console's `SHOW CONFIG` lists them: what was given, else
/// the default; passwords, tokens and the users' secrets are not shown.
fn shown_settings(vars: &Vars) -> Vec<(&'static str, String, &'static str)> {
    VARIABLES
        .iter()
        .map(|v| {
            let secret = v.name.contains("PASSWORD")
                || v.name.contains("TOKEN")
                || v.name == "HANDOFF_USERS";
            let value = match vars.given(v.name) {
                Some(_) if secret => "(set, hidden)".to_string(),
                Some(given) => given.to_string(),
                None => v.default.to_string(),
            };
            (v.name, value, v.default)
        })
        .collect()
}

fn parse_admin_users(vars: &Vars) -> Result<Vec<String>, ConfigError> {
    const VAR: &str = "HANDOFF_ADMIN_USERS";
    let mut users = Vec::new();
    for u in vars
        .given(VAR)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
    {
        if u.is_empty() {
            continue;
        }
        if u.contains(char::is_whitespace) || u.contains('=') {
            return Err(invalid(
                VAR,
                format!("'{u}' is not a user name (list names, comma separated; passwords go in HANDOFF_USERS)"),
            ));
        }
        users.push(u.to_string());
    }
    Ok(users)
}

fn parse_admin_db(vars: &Vars, users: Option<&HashMap<String, UserSecret>>) -> AdminDbSettings {
    let fallback = users.and_then(|u| {
        let mut names: Vec<&String> = u.keys().filter(|n| u[*n].password.is_some()).collect();
        names.sort();
        names
            .first()
            .map(|n| (n.to_string(), u[*n].password.clone()))
    });
    let (user, password) = match vars.given("HANDOFF_ADMIN_DB_USER") {
        Some(u) => (u.to_string(), None),
        None => fallback.unwrap_or_else(|| ("postgres".to_string(), None)),
    };
    AdminDbSettings {
        user,
        password: vars
            .given("HANDOFF_ADMIN_DB_PASSWORD")
            .map(str::to_string)
            .or(password),
        database: vars
            .get("HANDOFF_ADMIN_DB_NAME")
            .unwrap_or_default()
            .to_string(),
    }
}
/// Parses `250ms`, `10s`, `1m`, `1h` (and `0`).
pub fn parse_duration(s: &str) -> Result<Duration, InvalidValue> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| InvalidValue(format!("'{s}' is not a duration like 250ms, 10s, 1m")))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(InvalidValue(format!(
                "'{s}' has no unit: write e.g. 250ms, 10s, 1m, 1h"
            )))
        }
    };
    Ok(d)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_shards(s: &str) -> Result<Vec<ShardConfig>, ConfigError> {
    const VAR: &str = "HANDOFF_SHARDS";
    let mut shards: Vec<ShardConfig> = Vec::new();
    for entry in s.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        // A bare name: the shard's hosts come from Patroni (checked with HANDOFF_PATRONI).
        let (name, hosts) = entry.split_once('=').unwrap_or((entry, ""));
        let name = name.trim();
        if !valid_name(name) {
            return Err(invalid(VAR, format!("'{name}' is not a valid shard name")));
        }
        if shards.iter().any(|s| s.name == name) {
            return Err(invalid(VAR, format!("shard '{name}' is listed twice")));
        }
        let hosts = hosts
            .split(',')
            .filter(|h| !h.trim().is_empty())
            .map(|h| HostPort::parse(VAR, h))
            .collect::<Result<Vec<_>, _>>()?;
        shards.push(ShardConfig {
            name: name.to_string(),
            hosts,
        });
    }
    if shards.is_empty() {
        return Err(invalid(VAR, "no shard is configured"));
    }
    Ok(shards)
}

type Routes = (HashMap<String, DatabaseRoute>, Option<DatabaseRoute>);

fn parse_databases(s: Option<&str>, shards: &[ShardConfig]) -> Result<Routes, ConfigError> {
    const VAR: &str = "HANDOFF_DATABASES";
    let Some(s) = s else {
        if shards.len() > 1 {
            return Err(invalid(
                VAR,
                "must be set when HANDOFF_SHARDS lists more than one shard",
            ));
        }
        let only = DatabaseRoute {
            shard: 0,
            server_db: None,
        };
        return Ok((HashMap::new(), Some(only)));
    };
    let mut routes = HashMap::new();
    let mut default = None;
    for entry in s.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (db, target) = entry
            .split_once('=')
            .ok_or_else(|| invalid(VAR, format!("'{entry}' is not clientdb=shard[/serverdb]")))?;
        let (shard, server_db) = match target.split_once('/') {
            Some((sh, sdb)) if !sdb.trim().is_empty() => (sh.trim(), Some(sdb.trim().to_string())),
            Some(_) => {
                return Err(invalid(
                    VAR,
                    format!("'{entry}' has an empty server database"),
                ))
            }
            None => (target.trim(), None),
        };
        let shard = shards
            .iter()
            .position(|s| s.name == shard)
            .ok_or_else(|| invalid(VAR, format!("'{entry}' names unknown shard '{shard}'")))?;
        let route = DatabaseRoute { shard, server_db };
        let db = db.trim();
        if db == "*" {
            default = Some(route);
        } else if db.is_empty() || routes.insert(db.to_string(), route).is_some() {
            return Err(invalid(
                VAR,
                format!("database '{db}' is empty or listed twice"),
            ));
        }
    }
    Ok((routes, default))
}

fn parse_users(s: &str) -> Result<HashMap<String, UserSecret>, ConfigError> {
    const VAR: &str = "HANDOFF_USERS";
    let mut users = HashMap::new();
    for entry in s.split(',').filter(|e| !e.trim().is_empty()) {
        let (user, secret) = entry.split_once('=').ok_or_else(|| {
            invalid(
                VAR,
                "entries must be user=password or user=SCRAM-SHA-256$...",
            )
        })?;
        let user = user.trim();
        if user.is_empty() {
            return Err(invalid(VAR, "an entry has an empty user name"));
        }
        let secret = if secret.starts_with("SCRAM-SHA-256$") {
            let verifier = ScramVerifier::parse(secret)
                .map_err(|e| invalid(VAR, format!("user '{user}': {e}")))?;
            UserSecret {
                verifier,
                password: None,
            }
        } else {
            let verifier = ScramVerifier::from_password(secret)
                .map_err(|e| invalid(VAR, format!("user '{user}': {e}")))?;
            UserSecret {
                verifier,
                password: Some(secret.to_string()),
            }
        };
        if users.insert(user.to_string(), secret).is_some() {
            return Err(invalid(VAR, format!("user '{user}' is listed twice")));
        }
    }
    Ok(users)
}

mod patroni;
pub use patroni::{PatroniSettings, PatroniShard};

#[cfg(test)]
mod tests;
