//! Every metric of the proxy in one table ([`METRICS`]: name, kind, labels, help), the
//! Prometheus recorder behind `GET /metrics`, and the series created at zero. (The
//! failover buffer's own series are in `handoff-buffer`'s table.) Labels are bounded:
//! direction, SQLSTATE class, reason, source.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CLIENT_CONNECTIONS: &str = "handoff_client_connections";
pub const CLIENTS_PARKED: &str = "handoff_clients_parked";
pub const CLIENT_CONNECTIONS_TOTAL: &str = "handoff_client_connections_total";
pub const TAKEOVERS_TOTAL: &str = "handoff_takeovers_total";
pub const TAKEOVER_CLIENTS_MOVED_TOTAL: &str = "handoff_takeover_clients_moved_total";
pub const TAKEOVER_SECONDS: &str = "handoff_takeover_duration_seconds";
pub const CLIENT_REJECTED_TOTAL: &str = "handoff_client_connections_rejected_total";
pub const AUTH_FAILURES_TOTAL: &str = "handoff_auth_failures_total";
pub const CLIENT_TIMEOUTS_TOTAL: &str = "handoff_client_timeouts_total";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "handoff_tls_handshake_failures_total";
pub const MESSAGES_TOO_LARGE_TOTAL: &str = "handoff_messages_too_large_total";
pub const SERVER_CONNECTIONS: &str = "handoff_server_connections";
pub const TASKS: &str = "handoff_tasks";
pub const WORKER_THREADS: &str = "handoff_worker_threads";
pub const SERVER_CONNECT_ERRORS_TOTAL: &str = "handoff_server_connect_errors_total";
pub const BYTES_TOTAL: &str = "handoff_bytes_total";
pub const QUERY_DURATION: &str = "handoff_query_duration_seconds";
pub const TRANSACTION_DURATION: &str = "handoff_transaction_duration_seconds";
pub const ERRORS_TOTAL: &str = "handoff_errors_total";
pub const CANCEL_REQUESTS_TOTAL: &str = "handoff_cancel_requests_total";

// Reads on standbys.
pub const REPLICA_IN_ROTATION: &str = "handoff_replica_in_rotation";
pub const REPLICA_LAG_BYTES: &str = "handoff_replica_lag_bytes";
pub const REPLICA_LAG_SECONDS: &str = "handoff_replica_lag_seconds";
pub const REPLICA_TRANSACTIONS: &str = "handoff_replica_transactions_total";

pub const POOL_ACTIVE: &str = "handoff_pool_active_connections";
pub const POOL_IDLE: &str = "handoff_pool_idle_connections";
pub const POOL_WAITING: &str = "handoff_pool_waiting_clients";
pub const POOL_WAIT: &str = "handoff_pool_checkout_wait_seconds";
pub const PREPARED_TOTAL: &str = "handoff_prepared_statements_total";

// The shard state machine and switchovers.
pub const SHARD_STATE: &str = "handoff_shard_state";
pub const SHARD_EPOCH: &str = "handoff_shard_epoch";
pub const SHARD_EVENTS: &str = "handoff_shard_events_total";
pub const LAMEDUCK_CANCELLED: &str = "handoff_lameduck_cancelled_total";
pub const SWITCHOVERS: &str = "handoff_switchovers_total";
pub const SWITCHOVER_STEP: &str = "handoff_switchover_step_seconds";

// Failure detection, discovery and retries.
pub const FAILURE_SIGNALS: &str = "handoff_failure_signals_total";
pub const HEALTH_CHECKS: &str = "handoff_health_checks_total";
pub const DISCOVERY_PROBES: &str = "handoff_discovery_probes_total";
pub const RETRIES: &str = "handoff_retries_total";
pub const FAILOVER_SECONDS: &str = "handoff_failover_seconds";
pub const FAILOVERS: &str = "handoff_failovers_total";

// The fence and the split-brain watchdog.
pub const SPLIT_BRAIN: &str = "handoff_split_brain";
pub const WATCHED_HOSTS: &str = "handoff_watched_hosts";
pub const FENCES: &str = "handoff_fences_total";

// Coordination with the other proxies over etcd.
pub const COORD_UP: &str = "handoff_coordination_up";
pub const COORD_MEMBERS: &str = "handoff_coordination_members";
pub const COORD_ERRORS: &str = "handoff_coordination_errors_total";
pub const COORD_OPS: &str = "handoff_coordination_operations_total";
pub const COORD_ACK_SECONDS: &str = "handoff_coordination_ack_seconds";
pub const COORD_ACK_MISSING: &str = "handoff_coordination_ack_missing_total";
pub const COORD_FOLLOWED: &str = "handoff_coordination_followed_total";
pub const COORD_PUBLISHED: &str = "handoff_coordination_published_total";
pub const COORD_RECOVERIES: &str = "handoff_coordination_recoveries_total";

// HA managers (`HANDOFF_PATRONI`, `HANDOFF_PG_AUTO_FAILOVER`) and holds.
pub const PATRONI_REQUESTS: &str = "handoff_patroni_requests_total";
pub const MANAGER_REQUESTS: &str = "handoff_manager_requests_total";
pub const MANAGER_HOLDS: &str = "handoff_manager_holds_total";
pub const PRIMARY_SOURCE: &str = "handoff_primary_source";
pub const HOLDS: &str = "handoff_holds_total";

mod counted;
mod table;
pub use counted::Counted;
pub use table::{all, reference_markdown, Def, Kind, METRICS};

/// The text of `GET /metrics`: the recorder's series, then the histograms the relay
/// counts itself (see [`Counted`]).
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    counted::render(&mut text);
    text
}

/// The replay lag a replica check of `host` measured (what it could).
pub fn replica_lag(
    shard: &str,
    host: &crate::config::HostPort,
    bytes: Option<u64>,
    time: Option<Duration>,
) {
    let labels = [("shard", shard.to_string()), ("host", host.to_string())];
    if let Some(b) = bytes {
        metrics::gauge!(REPLICA_LAG_BYTES, &labels).set(b as f64);
    }
    if let Some(t) = time {
        metrics::gauge!(REPLICA_LAG_SECONDS, &labels).set(t.as_secs_f64());
    }
}

/// Whether `host` is in `shard`'s read rotation.
pub fn replica_in_rotation(shard: &str, host: &crate::config::HostPort, now: bool) {
    let labels = [("shard", shard.to_string()), ("host", host.to_string())];
    metrics::gauge!(REPLICA_IN_ROTATION, &labels).set(if now { 1.0 } else { 0.0 });
}

/// Read transactions (and sessions) given to standby `host` so far: the rotation
/// counts them, the replica check publishes the count (no metric call per
/// transaction).
pub fn replica_transactions(shard: &str, host: &crate::config::HostPort, total: u64) {
    let labels = [("shard", shard.to_string()), ("host", host.to_string())];
    metrics::counter!(REPLICA_TRANSACTIONS, &labels).absolute(total);
}

/// Marks `source` as what names `shard`'s primary (see [`PRIMARY_SOURCE`]).
pub fn set_source(shard: &str, source: &'static str) {
    for s in ["patroni", "pg_auto_failover", "etcd", "probe"] {
        let v = if s == source { 1.0 } else { 0.0 };
        metrics::gauge!(PRIMARY_SOURCE, "shard" => shard.to_string(), "source" => s).set(v);
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Installs the global Prometheus recorder once per process and returns its handle.
///
/// Later calls (several proxies in one test process) share the same recorder.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by an embedding program); we
            // then render what ours saw, which is nothing, rather than fail.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            start_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Upkeep runs completed since the process started.
static UPKEEPS: AtomicU64 = AtomicU64::new(0);

/// Folds the histograms' recorded samples into their buckets every [`UPKEEP_EVERY`].
///
/// The recorder keeps every sample (8 bytes) until it is folded in, which otherwise
/// happens only when `/metrics` is scraped: a proxy nobody scraped grew by ~50 bytes per
/// transaction, for ever, when the relay's per-request histograms were the recorder's
/// (they are [`Counted`] now; the switchover's, the buffer's and the others still are).
/// A thread of its own, so it runs whether or not a runtime is there, and never
/// competes with the relay's tasks.
fn start_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("handoff-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
            UPKEEPS.fetch_add(1, Ordering::Relaxed);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the metrics upkeep thread: histogram samples are folded in only when /metrics is scraped");
    }
}

/// How many times the histograms' samples have been folded in by the upkeep thread.
pub fn upkeeps() -> u64 {
    UPKEEPS.load(Ordering::Relaxed)
}

fn describe() {
    for m in all() {
        m.describe();
    }
    for result in ["hit", "miss", "eviction"] {
        metrics::counter!(PREPARED_TOTAL, "result" => result).absolute(0);
    }
    // Series that should exist at zero from startup.
    metrics::gauge!(CLIENT_CONNECTIONS).set(0.0);
    metrics::gauge!(CLIENTS_PARKED).set(0.0);
    metrics::gauge!(SERVER_CONNECTIONS).set(0.0);
    metrics::counter!(CLIENT_CONNECTIONS_TOTAL).absolute(0);
    for result in ["done", "refused", "failed"] {
        metrics::counter!(TAKEOVERS_TOTAL, "result" => result).absolute(0);
    }
    metrics::counter!(TAKEOVER_CLIENTS_MOVED_TOTAL).absolute(0);
    metrics::counter!(AUTH_FAILURES_TOTAL).absolute(0);
    metrics::counter!(TLS_HANDSHAKE_FAILURES_TOTAL).absolute(0);
    metrics::counter!(MESSAGES_TOO_LARGE_TOTAL).absolute(0);
    metrics::counter!(SERVER_CONNECT_ERRORS_TOTAL).absolute(0);
    for reason in [
        "max_client_conn",
        "max_user_client_conn",
        "max_db_client_conn",
        "tls_required",
        "shutdown",
    ] {
        metrics::counter!(CLIENT_REJECTED_TOTAL, "reason" => reason).absolute(0);
    }
    for kind in ["client_idle", "idle_transaction"] {
        metrics::counter!(CLIENT_TIMEOUTS_TOTAL, "kind" => kind).absolute(0);
    }
    for direction in ["client_to_server", "server_to_client"] {
        metrics::counter!(BYTES_TOTAL, "direction" => direction).absolute(0);
    }
    for result in ["forwarded", "unknown"] {
        metrics::counter!(CANCEL_REQUESTS_TOTAL, "result" => result).absolute(0);
    }
    // The SQLSTATE classes handoff's own errors fall in (connection, authorization,
    // resources, operator intervention); the server's appear as they happen.
    for class in ["08", "28", "53", "57"] {
        metrics::counter!(ERRORS_TOTAL, "source" => "proxy", "class" => class).absolute(0);
    }
}

/// Creates the read rotation's series of each of a shard's configured hosts at zero
/// (lag 0 and out of the rotation until the first check, a moment later).
pub fn zero_replica_series(shard: &str, hosts: &[crate::config::HostPort]) {
    for host in hosts {
        replica_in_rotation(shard, host, false);
        replica_lag(shard, host, Some(0), Some(Duration::ZERO));
        let labels = [("shard", shard.to_string()), ("host", host.to_string())];
        metrics::counter!(REPLICA_TRANSACTIONS, &labels).absolute(0);
    }
}

/// Creates a shard's counters at zero, so that dashboards and alerts (`increase()`,
/// `rate()`) see them from startup rather than from their first event. The buffer's
/// series are created by the buffer itself.
pub fn zero_shard_series(shard: &str, coordinated: bool, manager: Option<&'static str>) {
    let s = || shard.to_string();
    metrics::counter!(LAMEDUCK_CANCELLED, "shard" => s()).absolute(0);
    for outcome in ["completed", "refused", "rolled_back", "failed"] {
        metrics::counter!(SWITCHOVERS, "shard" => s(), "outcome" => outcome).absolute(0);
    }
    for signal in [
        "connect_failed",
        "connection_lost",
        "server_fatal",
        "read_only",
        "cannot_connect_now",
    ] {
        metrics::counter!(FAILURE_SIGNALS, "shard" => s(), "signal" => signal).absolute(0);
    }
    for reason in [
        "connect_failed",
        "read_only",
        "cannot_connect_now",
        "stale_statement",
    ] {
        metrics::counter!(RETRIES, "shard" => s(), "reason" => reason).absolute(0);
    }
    metrics::counter!(FAILOVERS, "shard" => s(), "result" => "established").absolute(0);
    let probes = [
        "primary",
        "read_only",
        "in_recovery",
        "fenced",
        "unreachable",
        "refused",
    ];
    for result in probes {
        metrics::counter!(HEALTH_CHECKS, "shard" => s(), "result" => result).absolute(0);
        metrics::counter!(DISCOVERY_PROBES, "shard" => s(), "result" => result).absolute(0);
    }
    for event in ["revoke", "establish", "abort"] {
        for result in ["applied", "ignored", "stale"] {
            metrics::counter!(SHARD_EVENTS, "shard" => s(), "event" => event, "result" => result)
                .absolute(0);
        }
    }
    for source in ["switchover", "watchdog"] {
        for result in ["ok", "error"] {
            metrics::counter!(FENCES, "shard" => s(), "source" => source, "result" => result)
                .absolute(0);
        }
    }
    metrics::gauge!(WATCHED_HOSTS, "shard" => s()).set(0.0);
    for result in ["held", "already_held", "refused", "not_primary"] {
        metrics::counter!(HOLDS, "shard" => s(), "result" => result).absolute(0);
    }
    if coordinated {
        metrics::counter!(COORD_ACK_MISSING, "shard" => s()).absolute(0);
        metrics::counter!(COORD_PUBLISHED, "shard" => s()).absolute(0);
        for what in ["hold", "primary", "rollback"] {
            metrics::counter!(COORD_FOLLOWED, "shard" => s(), "what" => what).absolute(0);
        }
        for result in ["rolled_back", "rolled_forward", "failed"] {
            metrics::counter!(COORD_RECOVERIES, "shard" => s(), "result" => result).absolute(0);
        }
    }
    if manager == Some("patroni") {
        for request in ["cluster", "switchover"] {
            metrics::counter!(PATRONI_REQUESTS, "shard" => s(), "request" => request, "result" => "ok")
                .absolute(0);
        }
    }
    if let Some(manager) = manager {
        for request in ["view", "switchover"] {
            metrics::counter!(MANAGER_REQUESTS, "shard" => s(), "manager" => manager, "request" => request, "result" => "ok")
                .absolute(0);
        }
        metrics::counter!(MANAGER_HOLDS, "shard" => s(), "manager" => manager).absolute(0);
    }
}

/// Counts an ErrorResponse sent to a client.
pub fn count_error(source: &'static str, code: &str) {
    let class = handoff_protocol::sqlstate::class(code).to_string();
    metrics::counter!(ERRORS_TOTAL, "source" => source, "class" => class).increment(1);
}

/// Prepared-statement cache counters, looked up once per proxy (they are bumped on the
/// hot path of every Bind).
#[derive(Debug)]
pub struct PreparedCounters {
    pub hit: metrics::Counter,
    pub miss: metrics::Counter,
    pub eviction: metrics::Counter,
}

impl PreparedCounters {
    pub fn new() -> Self {
        Self {
            hit: metrics::counter!(PREPARED_TOTAL, "result" => "hit"),
            miss: metrics::counter!(PREPARED_TOTAL, "result" => "miss"),
            eviction: metrics::counter!(PREPARED_TOTAL, "result" => "eviction"),
        }
    }
}

impl Default for PreparedCounters {
    fn default() -> Self {
        Self::new()
    }
}

/// The relay's own series, looked up once per proxy and shared by every session (a
/// handle looked up per session was four allocations per client, kept for as long as it
/// stays connected).
#[derive(Debug)]
pub struct RelayMeters {
    pub query: Arc<Counted>,
    pub transaction: Arc<Counted>,
    pub up_total: metrics::Counter,
    pub down_total: metrics::Counter,
    /// `handoff_clients_parked`, moved at every park and wake-up of a quiet client.
    pub parked: metrics::Gauge,
}

impl RelayMeters {
    pub fn new() -> Self {
        Self {
            query: Counted::series(QUERY_DURATION, &[]),
            transaction: Counted::series(TRANSACTION_DURATION, &[]),
            up_total: metrics::counter!(BYTES_TOTAL, "direction" => "client_to_server"),
            down_total: metrics::counter!(BYTES_TOTAL, "direction" => "server_to_client"),
            parked: metrics::gauge!(CLIENTS_PARKED),
        }
    }
}

impl Default for RelayMeters {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps a gauge up while alive.
pub(crate) struct GaugeGuard(&'static str);

impl GaugeGuard {
    pub fn new(name: &'static str) -> Self {
        metrics::gauge!(name).increment(1.0);
        Self(name)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

/// `handoff_client_connections` one higher while alive: a [`GaugeGuard`] for that one
/// gauge that holds nothing (zero-sized: every client's task keeps one).
pub(crate) struct ClientConnected(());

impl ClientConnected {
    pub fn new() -> Self {
        metrics::gauge!(CLIENT_CONNECTIONS).increment(1.0);
        Self(())
    }
}

impl Drop for ClientConnected {
    fn drop(&mut self) {
        metrics::gauge!(CLIENT_CONNECTIONS).decrement(1.0);
    }
}

/// Keeps a shared gauge handle up while alive: [`GaugeGuard`] without the lookup by
/// name, for paths that run per transaction.
pub(crate) struct HeldUp<'a>(&'a metrics::Gauge);

impl<'a> HeldUp<'a> {
    pub fn new(gauge: &'a metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for HeldUp<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_samples_are_folded_in_without_a_scrape() {
        let handle = install();
        let start = upkeeps();
        let h = metrics::histogram!(TAKEOVER_SECONDS);
        for _ in 0..1000 {
            h.record(0.002);
        }
        // At most ten upkeep periods, in 50 ms naps.
        let mut naps = 10 * UPKEEP_EVERY.as_millis() / 50;
        while upkeeps() < start + 2 {
            assert!(naps > 0, "the upkeep thread did not run");
            naps -= 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        // Folded in, not lost: the samples are in the buckets.
        let text = handle.render();
        let count = text
            .lines()
            .find(|l| l.starts_with("handoff_takeover_duration_seconds_count"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .expect("the histogram is rendered");
        assert!(count >= 1000, "{count}");
        let le_2_5ms = text
            .lines()
            .find(|l| l.starts_with("handoff_takeover_duration_seconds_bucket{le=\"0.0025\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .expect("the 2.5 ms bucket is rendered");
        assert!(le_2_5ms >= 1000, "{le_2_5ms}");
    }
}
