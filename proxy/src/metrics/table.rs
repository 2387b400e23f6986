//! The table of the proxy's metrics, and the reference made from it.

#[allow(clippy::wildcard_imports)]
use super::*;

use handoff_buffer::metric::Kind::{Counter, Gauge, Histogram};
pub use handoff_buffer::metric::{Def, Kind};

/// Every metric of the proxy — the one source of their names, kinds, labels and help:
/// [`install`] registers their descriptions from it, and `docs/metrics.md` is made from
/// it (with the buffer's, [`handoff_buffer::metric::METRICS`]; see [`all`]). Labels are
/// bounded: no client address, user or query ever becomes one.
pub const METRICS: &[Def] = &[
    Def {
        name: CLIENT_CONNECTIONS,
        kind: Gauge,
        labels: &[],
        help: "Client connections open now",
    },
    Def {
        name: CLIENTS_PARKED,
        kind: Gauge,
        labels: &[],
        help: "Transaction-mode clients parked now: quiet for a while with nothing held, their relay's state set aside until they send again",
    },
    Def {
        name: CLIENT_CONNECTIONS_TOTAL,
        kind: Counter,
        labels: &[],
        help: "Client connections accepted",
    },
    Def {
        name: TAKEOVERS_TOTAL,
        kind: Counter,
        labels: &["result"],
        help: "Takeovers of this process by a successor (`handoff --takeover`), by `result`: `done` (its clients handed over), `refused` (a format it does not speak, a shard not serving), `failed` (the successor went away; this process serves on)",
    },
    Def {
        name: TAKEOVER_CLIENTS_MOVED_TOTAL,
        kind: Counter,
        labels: &[],
        help: "Clients this process handed over to a successor",
    },
    Def {
        name: TAKEOVER_SECONDS,
        kind: Histogram,
        labels: &[],
        help: "From a successor's connection to the last client handed over",
    },
    Def {
        name: CLIENT_REJECTED_TOTAL,
        kind: Counter,
        labels: &["reason"],
        help: "Client connections refused, by `reason` (`max_client_conn`, `max_user_client_conn`, `max_db_client_conn`, `tls_required`, `shutdown`)",
    },
    Def {
        name: AUTH_FAILURES_TOTAL,
        kind: Counter,
        labels: &[],
        help: "Failed client logins",
    },
    Def {
        name: CLIENT_TIMEOUTS_TOTAL,
        kind: Counter,
        labels: &["kind"],
        help: "Clients disconnected by an idle timeout, by `kind` (`client_idle`, `idle_transaction`)",
    },
    Def {
        name: TLS_HANDSHAKE_FAILURES_TOTAL,
        kind: Counter,
        labels: &[],
        help: "Client TLS handshakes that failed",
    },
    Def {
        name: MESSAGES_TOO_LARGE_TOTAL,
        kind: Counter,
        labels: &[],
        help: "Client messages refused for exceeding `HANDOFF_MAX_MESSAGE_SIZE`",
    },
    Def {
        name: SERVER_CONNECTIONS,
        kind: Gauge,
        labels: &[],
        help: "Server connections open now",
    },
    Def {
        name: TASKS,
        kind: Gauge,
        labels: &[],
        help: "Tokio tasks alive in the process when `/metrics` was scraped (sessions, pools, probes, timers)",
    },
    Def {
        name: WORKER_THREADS,
        kind: Gauge,
        labels: &[],
        help: "The runtime's worker threads (`HANDOFF_WORKER_THREADS`, or one per CPU)",
    },
    Def {
        name: SERVER_CONNECT_ERRORS_TOTAL,
        kind: Counter,
        labels: &[],
        help: "Server connection attempts that failed",
    },
    Def {
        name: BYTES_TOTAL,
        kind: Counter,
        labels: &["direction"],
        help: "Bytes relayed, by `direction` (`client_to_server`, `server_to_client`)",
    },
    Def {
        name: QUERY_DURATION,
        kind: Histogram,
        labels: &[],
        help: "From a client's request to the server's ReadyForQuery",
    },
    Def {
        name: TRANSACTION_DURATION,
        kind: Histogram,
        labels: &[],
        help: "From the first request after ReadyForQuery `I` to the next `I`",
    },
    Def {
        name: ERRORS_TOTAL,
        kind: Counter,
        labels: &["source", "class"],
        help: "ErrorResponses sent to clients, by `source` (`server`, `proxy`) and SQLSTATE `class`",
    },
    Def {
        name: CANCEL_REQUESTS_TOTAL,
        kind: Counter,
        labels: &["result"],
        help: "Cancel requests, by `result` (`forwarded`, `unknown`)",
    },
    Def {
        name: REPLICA_IN_ROTATION,
        kind: Gauge,
        labels: &["shard", "host"],
        help: "1 while a standby is in its shard's read rotation (`@replica`, `@any`), else 0",
    },
    Def {
        name: REPLICA_LAG_BYTES,
        kind: Gauge,
        labels: &["shard", "host"],
        help: "A standby's replay lag behind the primary in bytes of WAL, as handoff last measured it",
    },
    Def {
        name: REPLICA_LAG_SECONDS,
        kind: Gauge,
        labels: &["shard", "host"],
        help: "A standby's replay lag in time (0 when caught up), as handoff last measured it",
    },
    Def {
        name: REPLICA_TRANSACTIONS,
        kind: Counter,
        labels: &["shard", "host"],
        help: "Read transactions given to a standby",
    },
    Def {
        name: POOL_ACTIVE,
        kind: Gauge,
        labels: &["pool"],
        help: "Server connections in use by clients, per `pool` (`user@database/shard`); the pool gauges are read at the scrape",
    },
    Def {
        name: POOL_IDLE,
        kind: Gauge,
        labels: &["pool"],
        help: "Idle server connections, per `pool`",
    },
    Def {
        name: POOL_WAITING,
        kind: Gauge,
        labels: &["pool"],
        help: "Clients waiting for a server connection, per `pool`",
    },
    Def {
        name: POOL_WAIT,
        kind: Histogram,
        labels: &["pool"],
        help: "Time to get a server connection from the pool",
    },
    Def {
        name: PREPARED_TOTAL,
        kind: Counter,
        labels: &["result"],
        help: "Prepared-statement cache outcomes, by `result` (`hit`, `miss`, `eviction`)",
    },
    Def {
        name: SHARD_STATE,
        kind: Gauge,
        labels: &["shard"],
        help: "The shard's state: 0 serving, 1 buffering, 2 draining, 3 unavailable",
    },
    Def {
        name: SHARD_EPOCH,
        kind: Gauge,
        labels: &["shard"],
        help: "The shard's leadership epoch",
    },
    Def {
        name: SHARD_EVENTS,
        kind: Counter,
        labels: &["shard", "event", "result"],
        help: "State machine events (`revoke`, `establish`, `abort`) by `result` (`applied`, `ignored`, `stale`)",
    },
    Def {
        name: LAMEDUCK_CANCELLED,
        kind: Counter,
        labels: &["shard"],
        help: "Transactions cancelled because they outlived `HANDOFF_DRAIN_TIMEOUT`",
    },
    Def {
        name: SWITCHOVERS,
        kind: Counter,
        labels: &["shard", "outcome"],
        help: "Switchovers run by handoff, by `outcome` (`completed`, `refused`, `rolled_back`, `failed`)",
    },
    Def {
        name: SWITCHOVER_STEP,
        kind: Histogram,
        labels: &["shard", "step"],
        help: "Duration of each switchover `step`",
    },
    Def {
        name: FAILURE_SIGNALS,
        kind: Counter,
        labels: &["shard", "signal"],
        help: "Failure reports about a primary, by `signal` (`connect_failed`, `connection_lost`, `server_fatal`, `read_only`, `cannot_connect_now`)",
    },
    Def {
        name: HEALTH_CHECKS,
        kind: Counter,
        labels: &["shard", "result"],
        help: "Probes of the serving primary, by `result` (`primary`, `read_only`, `in_recovery`, `fenced`, `unreachable`, `refused`)",
    },
    Def {
        name: DISCOVERY_PROBES,
        kind: Counter,
        labels: &["shard", "result"],
        help: "Discovery probes of a shard's hosts, by `result` (as the health checks')",
    },
    Def {
        name: RETRIES,
        kind: Counter,
        labels: &["shard", "reason"],
        help: "Requests sent again to a new primary because they provably did not run, by `reason` (`connect_failed`, `read_only`, `cannot_connect_now`, `stale_statement`)",
    },
    Def {
        name: FAILOVER_SECONDS,
        kind: Histogram,
        labels: &["shard"],
        help: "From the revocation of a failed primary to the establishment of the next one",
    },
    Def {
        name: FAILOVERS,
        kind: Counter,
        labels: &["shard", "result"],
        help: "Unplanned failovers, by `result` (`established`)",
    },
    Def {
        name: SPLIT_BRAIN,
        kind: Gauge,
        labels: &["shard", "host"],
        help: "1 while a watched (replaced) primary `host` was found accepting connections outside recovery",
    },
    Def {
        name: WATCHED_HOSTS,
        kind: Gauge,
        labels: &["shard"],
        help: "Replaced primaries being watched for split brain",
    },
    Def {
        name: FENCES,
        kind: Counter,
        labels: &["shard", "source", "result"],
        help: "Fences applied, by `source` (`switchover`, `watchdog`) and `result` (`ok`, `error`)",
    },
    Def {
        name: COORD_UP,
        kind: Gauge,
        labels: &[],
        help: "1 while etcd answers this proxy, 0 while it does not",
    },
    Def {
        name: COORD_MEMBERS,
        kind: Gauge,
        labels: &[],
        help: "Live proxies of the cluster, this one included",
    },
    Def {
        name: COORD_ERRORS,
        kind: Counter,
        labels: &[],
        help: "etcd requests that failed",
    },
    Def {
        name: COORD_OPS,
        kind: Counter,
        labels: &["shard", "kind", "outcome"],
        help: "Coordinated operations this proxy ran, by `kind` and `outcome`",
    },
    Def {
        name: COORD_ACK_SECONDS,
        kind: Histogram,
        labels: &["shard"],
        help: "From an operation's publication to a proxy's acknowledgement (recorded by the coordinator for each proxy)",
    },
    Def {
        name: COORD_ACK_MISSING,
        kind: Counter,
        labels: &["shard"],
        help: "Proxies that did not acknowledge before the lameduck deadline",
    },
    Def {
        name: COORD_FOLLOWED,
        kind: Counter,
        labels: &["shard", "what"],
        help: "What this proxy took from the cluster, by `what` (`hold`, `primary`, `rollback`)",
    },
    Def {
        name: COORD_PUBLISHED,
        kind: Counter,
        labels: &["shard"],
        help: "Primaries this proxy published after finding them itself",
    },
    Def {
        name: COORD_RECOVERIES,
        kind: Counter,
        labels: &["shard", "result"],
        help: "Abandoned operations this proxy finished, by `result` (`rolled_back`, `rolled_forward`, `failed`)",
    },
    Def {
        name: PATRONI_REQUESTS,
        kind: Counter,
        labels: &["shard", "request", "result"],
        help: "Requests to Patroni's REST API, by `request` (`cluster`, `switchover`) and `result` (`ok`, `refused`, `error`, `unreachable`)",
    },
    Def {
        name: MANAGER_REQUESTS,
        kind: Counter,
        labels: &["shard", "manager", "request", "result"],
        help: "Requests to a shard's HA manager (`patroni`, `pg_auto_failover`, `repmgr`), by `request` (`view`, `switchover`) and `result` (`ok`, `refused`, `error`, `unreachable`)",
    },
    Def {
        name: MANAGER_HOLDS,
        kind: Counter,
        labels: &["shard", "manager"],
        help: "Holds handoff started itself because the HA manager told the primary it serves to stop taking writes (pg_auto_failover's goal states)",
    },
    Def {
        name: PRIMARY_SOURCE,
        kind: Gauge,
        labels: &["shard", "source"],
        help: "1 for the `source` that names the shard's primary: `patroni`, `pg_auto_failover` or `repmgr` (the HA manager's leader, confirmed by handoff's probe), `etcd` (the proxies' shared record) or `probe` (handoff's own discovery)",
    },
    Def {
        name: HOLDS,
        kind: Counter,
        labels: &["shard", "result"],
        help: "Holds asked for with `POST /v1/shards/{s}/hold`, by `result` (`held`, `already_held`, `refused`, `not_primary`)",
    },
];

/// The proxy's metrics and the buffer's, in the order the reference lists them.
pub fn all() -> impl Iterator<Item = &'static Def> {
    METRICS.iter().chain(handoff_buffer::metric::METRICS)
}

/// The metrics reference in Markdown: what `docs/metrics.md` holds between its
/// generated-section markers (a test checks that it does).
pub fn reference_markdown() -> String {
    let mut s = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
    for m in all() {
        let labels = m
            .labels
            .iter()
            .map(|l| format!("`{l}`"))
            .collect::<Vec<_>>()
            .join(", ");
        s.push_str(&format!(
            "| `{}` | {} | {labels} | {} |\n",
            m.name,
            m.kind.as_str(),
            m.help.replace('|', "\\|")
        ));
    }
    s
}
