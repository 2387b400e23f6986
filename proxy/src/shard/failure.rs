//! What the failure detector knows of a shard between probes, and the words sessions
//! report with: kept apart from the detector's tasks (`health`) so the state machine can
//! hold it without depending on them.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};

use crate::sync::Locked;
use handoff_protocol::sqlstate;
use tokio::sync::Notify;
use tokio::time::Instant;

/// What a session saw that may mean the primary is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Connecting to the primary failed (refused, reset, timed out, 57P0x at login).
    ConnectFailed,
    /// A server connection closed without a FATAL.
    ConnectionLost,
    /// A FATAL (`57P01`, `57P02`, `57P03`, or any other) on a pooled connection.
    ServerFatal,
    /// `25006`: the primary took a write as read-only.
    ReadOnly,
    /// `57P03` answered to a statement.
    CannotConnectNow,
}

impl Report {
    pub fn as_str(self) -> &'static str {
        match self {
            Report::ConnectFailed => "connect_failed",
            Report::ConnectionLost => "connection_lost",
            Report::ServerFatal => "server_fatal",
            Report::ReadOnly => "read_only",
            Report::CannotConnectNow => "cannot_connect_now",
        }
    }
}

/// Why a request was sent again to the next primary (it provably did not run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// Connecting to the failed primary failed: nothing was sent.
    ConnectFailed,
    /// The first statement got `25006` from a primary being replaced.
    ReadOnly,
    /// The first statement got `57P03` from a primary being replaced.
    CannotConnectNow,
}

impl RetryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::ConnectFailed => "connect_failed",
            RetryReason::ReadOnly => "read_only",
            RetryReason::CannotConnectNow => "cannot_connect_now",
        }
    }

    /// The refusal a first statement's SQLSTATE is, if it is retriable.
    pub fn of_refusal(code: &str) -> Option<Self> {
        match code {
            sqlstate::READ_ONLY_SQL_TRANSACTION => Some(RetryReason::ReadOnly),
            sqlstate::CANNOT_CONNECT_NOW => Some(RetryReason::CannotConnectNow),
            _ => None,
        }
    }

    /// What a session reports when it sees this.
    pub fn report(self) -> Report {
        match self {
            RetryReason::ConnectFailed => Report::ConnectFailed,
            RetryReason::ReadOnly => Report::ReadOnly,
            RetryReason::CannotConnectNow => Report::CannotConnectNow,
        }
    }

    /// Counts a request sent again to the next primary.
    pub fn count(self, shard: &str) {
        metrics::counter!(crate::metrics::RETRIES, "shard" => shard.to_string(), "reason" => self.as_str())
            .increment(1);
    }
}

/// The timeline in a WAL file name (its first 8 hex digits); 0 when unknown.
pub(crate) fn timeline_of(walfile: Option<&str>) -> u32 {
    walfile
        .and_then(|w| w.get(..8))
        .and_then(|t| u32::from_str_radix(t, 16).ok())
        .unwrap_or(0)
}

/// The last probe of a shard's serving primary.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Checked {
    pub(crate) gen: u64,
    pub(crate) started: Instant,
    pub(crate) ok: bool,
}

/// A primary that this proxy's discovery established after a failure: the proxies'
/// coordination publishes it so the others need not find it themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub primary: crate::config::HostPort,
    pub epoch: u64,
    pub timeline: u32,
}

/// A shard's failure detector and discovery state.
#[derive(Debug, Default)]
pub struct Health {
    /// One probe of the serving primary at a time; the last result.
    pub(crate) last: tokio::sync::Mutex<Option<Checked>>,
    /// Wakes the monitor (a report, or a revocation that needs discovery).
    pub(crate) wake: Notify,
    /// The buffer cycle whose revocation discovery must resolve (0: none).
    pub(crate) discover_cycle: AtomicU64,
    /// The highest timeline a writable host of this shard was seen on.
    pub(crate) max_timeline: AtomicU32,
    /// The last health check was refused (warned once).
    pub(crate) refused: AtomicBool,
    /// The last primary discovery established here.
    pub discovered: tokio::sync::watch::Sender<Option<Discovered>>,
    /// A hold asked for from outside (`POST /v1/shards/{s}/hold`): its cycle may end
    /// only with another primary until `HANDOFF_HOLD_TIMEOUT` has passed.
    pub(crate) hold: std::sync::Mutex<Option<Hold>>,
    /// A switchover waiting for the HA manager's hold hook (Patroni's `before_stop` with
    /// `HANDOFF_PATRONI_HOOK`) to hold the shard: the hold hands it the request to answer.
    pub(crate) hook: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<HookCall>>>,
}

/// The hook's hold reaching a switchover that waits for it: the switchover answers the
/// hold request through this once the shard is held and lameduck is done.
pub(crate) type HookCall = tokio::sync::oneshot::Sender<crate::api::ShardChange>;

/// An outside hold of a shard (an HA manager about to stop its primary).
#[derive(Debug, Clone)]
pub(crate) struct Hold {
    /// The buffer cycle the hold started.
    pub(crate) cycle: u64,
    /// The primary it revoked.
    pub(crate) old: crate::config::HostPort,
    pub(crate) at: Instant,
}

impl Health {
    /// True when `addr` may not end `cycle` yet: it is the primary a hold of this cycle
    /// revoked, and the hold is younger than `timeout`.
    pub(crate) fn held_back(
        &self,
        cycle: u64,
        addr: &crate::config::HostPort,
        timeout: std::time::Duration,
    ) -> bool {
        let hold = self.hold.locked();
        hold.as_ref()
            .is_some_and(|h| h.cycle == cycle && &h.old == addr && h.at.elapsed() < timeout)
    }

    pub(crate) fn saw_timeline(&self, t: u32) {
        self.max_timeline.fetch_max(t, SeqCst);
    }
}
