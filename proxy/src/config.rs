//! Configuration from `HANDOFF_*` environment variables, parsed into typed structs.
//!
//! Every variable is listed in [`VARIABLES`] with its default and meaning; `handoff
//! --help` prints that table and the README repeats it. An unknown `HANDOFF_*` variable or
//! a bad value is a startup error that names the variable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use handoff_protocol::auth::ScramVerifier;

/// One documented variable: name, default (as written in the environment), meaning.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every variable handoff reads. Anything else starting with `HANDOFF_` is refused.
pub const VARIABLES: &[Variable] = &[
    Variable {
        name: "HANDOFF_LISTEN",
        default: "127.0.0.1:6432",
        help: "address clients connect to",
    },
    Variable {
        name: "HANDOFF_ADMIN_LISTEN",
        default: "127.0.0.1:6480",
        help: "address of the admin HTTP API (/healthz, /readyz, /metrics)",
    },
    Variable {
        name: "HANDOFF_ADMIN_TOKEN",
        default: "(unset)",
        help: "bearer token for the admin API; required when HANDOFF_ADMIN_LISTEN is not loopback",
    },
    Variable {
        name: "HANDOFF_SHARDS",
        default: "main=127.0.0.1:5432",
        help: "name=host:port[,host:port...][;name=...]: every host that may be the shard's primary; at startup the writable one on the highest timeline is chosen (the first listed wins ties). A shard named in HANDOFF_PATRONI may list no hosts (just name): Patroni's members are used",
    },
    Variable {
        name: "HANDOFF_DATABASES",
        default: "(every database to the only shard)",
        help: "clientdb=shard[/serverdb][;...]; '*' matches any other database",
    },
    Variable {
        name: "HANDOFF_USERS",
        default: "(unset: no client password, loopback listen only)",
        help: "user=password or user=SCRAM-SHA-256$... verifier, comma separated",
    },
    Variable {
        name: "HANDOFF_USERS_FILE",
        default: "(unset)",
        help: "a users file as PgBouncer's userlist.txt: \"user\" \"password, SCRAM-SHA-256$... or md5...\" per line; read again on SIGHUP",
    },
    Variable {
        name: "HANDOFF_AUTH_USER",
        default: "(unset: no lookup)",
        help: "server role that looks up users HANDOFF_USERS and the file do not list, with HANDOFF_AUTH_QUERY on the shard's primary (PgBouncer's auth_user); its password, if the server asks, from HANDOFF_USERS or the file",
    },
    Variable {
        name: "HANDOFF_AUTH_QUERY",
        default: "SELECT usename, passwd FROM pg_shadow WHERE usename=$1",
        help: "the lookup: $1 is the user; answers (name, SCRAM verifier or MD5 secret), no row for an unknown user",
    },
    Variable {
        name: "HANDOFF_AUTH_CACHE_TTL",
        default: "60s",
        help: "how long a looked-up secret is kept (a failed login with it asks the server again)",
    },
    Variable {
        name: "HANDOFF_MAX_CLIENT_CONN",
        default: "1000",
        help: "most client connections at once; beyond it clients get SQLSTATE 53300",
    },
    Variable {
        name: "HANDOFF_TLS_MODE",
        default: "disable",
        help: "TLS for clients: disable (SSLRequest answered N), allow (TLS when asked), require (plaintext clients refused with 28000)",
    },
    Variable {
        name: "HANDOFF_TLS_CERT",
        default: "(unset)",
        help: "PEM certificate chain for client TLS (read again on SIGHUP)",
    },
    Variable {
        name: "HANDOFF_TLS_KEY",
        default: "(unset)",
        help: "PEM private key for client TLS (read again on SIGHUP)",
    },
    Variable {
        name: "HANDOFF_SERVER_TLS",
        default: "disable",
        help: "TLS to PostgreSQL servers, as libpq's sslmode: disable, prefer, require, verify-ca, verify-full",
    },
    Variable {
        name: "HANDOFF_SERVER_TLS_CA",
        default: "(unset)",
        help: "PEM CA certificates that server certificates must chain to (verify-ca, verify-full)",
    },
    Variable {
        name: "HANDOFF_MAX_USER_CLIENT_CONN",
        default: "0",
        help: "most client connections per user at once (0: no limit); beyond it 53300",
    },
    Variable {
        name: "HANDOFF_MAX_DB_CLIENT_CONN",
        default: "0",
        help: "most client connections per client database at once (0: no limit); beyond it 53300",
    },
    Variable {
        name: "HANDOFF_CLIENT_IDLE_TIMEOUT",
        default: "0",
        help: "a client idle outside a transaction this long is disconnected with 57P05 (0: never)",
    },
    Variable {
        name: "HANDOFF_IDLE_TRANSACTION_TIMEOUT",
        default: "0",
        help: "a client idle inside a transaction this long is disconnected with 25P03 and its transaction rolled back (0: never)",
    },
    Variable {
        name: "HANDOFF_MAX_MESSAGE_SIZE",
        default: "64MB",
        help: "largest client message handoff must parse whole (Parse, Bind, Describe, Close); larger ones get 54000 and the connection is closed",
    },
    Variable {
        name: "HANDOFF_POOL_MODE",
        default: "transaction",
        help: "'transaction' (server connection per transaction) or 'session' (per client)",
    },
    Variable {
        name: "HANDOFF_POOL_SIZE",
        default: "20",
        help: "most server connections per pool (user, database, shard primary)",
    },
    Variable {
        name: "HANDOFF_POOL_MIN_IDLE",
        default: "0",
        help: "idle server connections each pool keeps open once it exists",
    },
    Variable {
        name: "HANDOFF_QUERY_WAIT_TIMEOUT",
        default: "120s",
        help: "longest a client waits for a free server connection before an error (53300)",
    },
    Variable {
        name: "HANDOFF_SERVER_IDLE_TIMEOUT",
        default: "10m",
        help: "idle server connections older than this in the pool are closed (0: never)",
    },
    Variable {
        name: "HANDOFF_SERVER_LIFETIME",
        default: "1h",
        help: "server connections are closed at checkin once this old (0: never)",
    },
    Variable {
        name: "HANDOFF_MAX_PREPARED_STATEMENTS",
        default: "200",
        help: "prepared statements cached per server connection (LRU) in transaction mode",
    },
    Variable {
        name: "HANDOFF_CONNECT_TIMEOUT",
        default: "5s",
        help: "longest wait for a server connection to be established and authenticated",
    },
    Variable {
        name: "HANDOFF_CLIENT_LOGIN_TIMEOUT",
        default: "15s",
        help: "longest a client may take from connecting to being authenticated",
    },
    Variable {
        name: "HANDOFF_SHUTDOWN_TIMEOUT",
        default: "30s",
        help: "on SIGTERM/SIGINT, longest wait for sessions to finish before closing them",
    },
    Variable {
        name: "HANDOFF_BUFFER_ENABLED",
        default: "true",
        help: "hold new transactions of a shard whose primary is changing",
    },
    Variable {
        name: "HANDOFF_BUFFER_DRY_RUN",
        default: "false",
        help: "run the buffer's state machine and count, but hold nothing",
    },
    Variable {
        name: "HANDOFF_BUFFER_SIZE",
        default: "1000",
        help: "requests held per shard; a full shard evicts its oldest",
    },
    Variable {
        name: "HANDOFF_BUFFER_MAX_BYTES",
        default: "64MB",
        help: "request bytes held across all shards",
    },
    Variable {
        name: "HANDOFF_BUFFER_WINDOW",
        default: "10s",
        help: "longest one request stays held",
    },
    Variable {
        name: "HANDOFF_BUFFER_MAX_FAILOVER_DURATION",
        default: "20s",
        help: "longest a buffering cycle lasts",
    },
    Variable {
        name: "HANDOFF_BUFFER_MIN_TIME_BETWEEN_FAILOVERS",
        default: "0s",
        help: "optional throttle between buffering cycles of a shard",
    },
    Variable {
        name: "HANDOFF_BUFFER_DRAIN_CONCURRENCY",
        default: "(HANDOFF_POOL_SIZE)",
        help: "held requests released to the new primary at once",
    },
    Variable {
        name: "HANDOFF_BUFFER_SHARDS",
        default: "(all)",
        help: "comma list of the shards to buffer",
    },
    Variable {
        name: "HANDOFF_DRAIN_TIMEOUT",
        default: "5s",
        help: "lameduck: how long transactions on a revoked primary may run before they are cancelled (57P01)",
    },
    Variable {
        name: "HANDOFF_HEALTH_CHECK_INTERVAL",
        default: "1s",
        help: "how often each shard's primary is probed (connect, not in recovery, writable)",
    },
    Variable {
        name: "HANDOFF_HEALTH_CHECK_TIMEOUT",
        default: "2s",
        help: "longest a health check or discovery probe may take before the host counts as unreachable",
    },
    Variable {
        name: "HANDOFF_DISCOVERY_INTERVAL",
        default: "100ms",
        help: "while a failed primary is being replaced, how often every host of the shard is probed",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_MAX_LAG",
        default: "16MB",
        help: "a switchover is refused when the target's replay lag is above this",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_TIMEOUT",
        default: "10s",
        help: "longest the target may take to catch up to the fence LSN, and then to promote",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_SYNC_TARGET",
        default: "true",
        help: "before revoking, make the target the old primary's synchronous standby with synchronous_commit=remote_apply (ALTER SYSTEM, put back afterwards), so the pause does not grow with replication lag",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_TERMINATE",
        default: "true",
        help: "fence: terminate the old primary's remaining sessions (false: wait up to HANDOFF_SWITCHOVER_TIMEOUT for them to leave, else roll back)",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_DEMOTE_COMMAND",
        default: "(unset)",
        help: "shell command run after a completed switchover to stop or rejoin the old primary (env: HANDOFF_SHARD, HANDOFF_OLD_PRIMARY, HANDOFF_NEW_PRIMARY, ...)",
    },
    Variable {
        name: "HANDOFF_SWITCHOVER_DEMOTE_TIMEOUT",
        default: "60s",
        help: "longest the demote command may run before it is killed",
    },
    Variable {
        name: "HANDOFF_WATCHDOG_INTERVAL",
        default: "250ms",
        help: "how often every replaced primary is checked for split brain (fenced, down, or back as a standby)",
    },
    Variable {
        name: "HANDOFF_ADMIN_USERS",
        default: "(unset: nobody)",
        help: "users (comma separated) who may use the admin console: psql -p 6432 -U <user> handoff (or dbname pgbouncer); they log in like any client",
    },
    Variable {
        name: "HANDOFF_STATS_PERIOD",
        default: "60s",
        help: "the period SHOW STATS averages over (PgBouncer's stats_period)",
    },
    Variable {
        name: "HANDOFF_ADMIN_DB_USER",
        default: "(the first user of HANDOFF_USERS with a password, else postgres)",
        help: "server role handoff uses to run switchovers (superuser, or the grants in README)",
    },
    Variable {
        name: "HANDOFF_ADMIN_DB_PASSWORD",
        default: "(that user's password, if any)",
        help: "password of HANDOFF_ADMIN_DB_USER",
    },
    Variable {
        name: "HANDOFF_ADMIN_DB_NAME",
        default: "postgres",
        help: "database handoff connects to for switchover SQL",
    },
    Variable {
        name: "HANDOFF_ETCD_ENDPOINTS",
        default: "(unset: this proxy works alone)",
        help: "http(s)://host:port of etcd, comma separated: coordinate switchovers and each shard's primary with every proxy of HANDOFF_ETCD_PREFIX",
    },
    Variable {
        name: "HANDOFF_ETCD_PREFIX",
        default: "/handoff",
        help: "etcd key prefix: one cluster of proxies per prefix",
    },
    Variable {
        name: "HANDOFF_PROXY_ID",
        default: "(host name:HANDOFF_LISTEN port)",
        help: "this proxy's name in its cluster (letters, digits, '.', '_', ':', '-')",
    },
    Variable {
        name: "HANDOFF_ETCD_LEASE_TTL",
        default: "5s",
        help: "membership lease (whole seconds, at least 2s): a proxy that stops renewing it (dead, or cut off from etcd) leaves the cluster this long after",
    },
    Variable {
        name: "HANDOFF_ETCD_TIMEOUT",
        default: "2s",
        help: "longest one etcd request may take; a failed request marks coordination down until one succeeds",
    },
    Variable {
        name: "HANDOFF_ETCD_CA_FILE",
        default: "(unset)",
        help: "PEM CA certificate(s) to verify https etcd endpoints; required with https",
    },
    Variable {
        name: "HANDOFF_PATRONI",
        default: "(unset: no shard is managed by Patroni)",
        help: "shard=http://host:port[,http://host:port...][;shard=...]: the Patroni REST API of a shard's members; Patroni then names the primary (confirmed by handoff's own check) and runs promotions",
    },
    Variable {
        name: "HANDOFF_PATRONI_INTERVAL",
        default: "1s",
        help: "how often handoff reads Patroni's GET /cluster while a shard serves",
    },
    Variable {
        name: "HANDOFF_PATRONI_HELD_INTERVAL",
        default: "50ms",
        help: "how often handoff reads GET /cluster and checks Patroni's leader while a shard is held",
    },
    Variable {
        name: "HANDOFF_PATRONI_TIMEOUT",
        default: "2s",
        help: "longest one read of Patroni's REST API may take",
    },
    Variable {
        name: "HANDOFF_PATRONI_HOOK",
        default: "false",
        help: "true when every Patroni member's before_stop runs handoff hold against this proxy: a switchover through handoff then holds when Patroni calls the hook (right before it stops the leader) instead of before asking Patroni; ignored with HANDOFF_ETCD_ENDPOINTS",
    },
    Variable {
        name: "HANDOFF_HOLD_TIMEOUT",
        default: "5s",
        help: "after POST /v1/shards/{s}/hold (handoff hold, e.g. from Patroni's before_stop): how long only a new primary may end the hold; after it the old primary is taken back if it is writable (and still Patroni's leader)",
    },
    Variable {
        name: "HANDOFF_FAILPOINT",
        default: "(unset)",
        help: "testing only: point:duration pauses a coordinated switchover after a point (holding, held, fencing, fenced, promoting, promoted)",
    },
    Variable {
        name: "HANDOFF_LOG",
        default: "info",
        help: "log filter (tracing EnvFilter syntax, e.g. 'info,handoff=debug')",
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

    /// The help text listing every variable.
    pub fn help() -> String {
        let mut s = String::from(
            "handoff: a failover-safe PostgreSQL proxy.\n\n\
             Usage: handoff            run the proxy (configured by the environment)\n       \
             handoff healthcheck  exit 0 if the admin API answers GET /healthz\n       \
             handoff switchover --shard NAME --to HOST:PORT|MEMBER   run a planned switchover\n       \
             handoff hold --shard NAME [--primary HOST:PORT] [--timeout 10s]   hold new transactions before an HA manager stops the primary (Patroni's before_stop)\n       \
             handoff status     print every shard's state\n       \
             handoff --help     print this help\n       \
             handoff --version  print the version\n\n\
             Environment variables:\n",
        );
        for v in VARIABLES {
            s.push_str(&format!(
                "  {:<30} default {}\n      {}\n",
                v.name, v.default, v.help
            ));
        }
        s.push_str("\nDurations are written 250ms, 10s, 1m, 1h.\n");
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
