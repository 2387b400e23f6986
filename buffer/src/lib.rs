//! The per-shard failover buffer (docs/buffer.md): while a shard's primary changes,
//! requests that start a new transaction wait here, bounded by count per shard and by
//! bytes across shards, and are released in FIFO order to the new primary.
//!
//! # Contract
//!
//! - **Sessions** call [`Buffer::wait`] with the shard and the request's size before
//!   starting a transaction. While the shard is idle this is one atomic load: no lock, no
//!   allocation. Otherwise the request is held and the call resolves with exactly one
//!   outcome:
//!   - `Ok(Admission::Passed)`: go ahead (idle shard, buffering disabled, dry run,
//!     shutdown);
//!   - `Ok(Admission::Released(release))`: go ahead to the serving primary; keep
//!     `release` until the request is done (it counts against the drain concurrency);
//!   - `Err(BufferError)`: see [`BufferError::sqlstate`] for what the proxy reports.
//!
//!   Dropping the future (the client went away) removes the request at once.
//! - **The shard state machine** calls [`Buffer::start`] (revocation) and
//!   [`Buffer::stop`] (establishment, abort) with the shard's epoch, from within a tokio
//!   runtime (a start arms the cycle's time limit). A start for an epoch at or below the
//!   last completed cycle's is ignored; a stop for another epoch than the current
//!   cycle's is ignored. A start while the last cycle is still draining holds what is
//!   left of its queue again (back-to-back switchovers). [`Buffer::shutdown`] ends
//!   everything.
//! - No lock is held across an `.await`, and no caller code runs under the buffer's
//!   locks: outcomes are delivered through channels.

#![forbid(unsafe_code)]

mod config;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;
use tokio::time::Instant;

pub use config::{BufferConfig, ConfigError};

/// The buffer's metrics: their names, and the table they are registered and documented
/// from.
pub mod metric {
    pub const STARTS: &str = "handoff_buffer_starts_total";
    pub const STARTS_SKIPPED: &str = "handoff_buffer_starts_skipped_total";
    pub const STOPS: &str = "handoff_buffer_stops_total";
    pub const BUFFERED: &str = "handoff_buffer_requests_buffered_total";
    pub const BUFFERED_DRY_RUN: &str = "handoff_buffer_requests_buffered_dry_run_total";
    pub const DRAINED: &str = "handoff_buffer_requests_drained_total";
    pub const EVICTED: &str = "handoff_buffer_requests_evicted_total";
    pub const SKIPPED: &str = "handoff_buffer_requests_skipped_total";
    pub const DEPTH: &str = "handoff_buffer_depth";
    pub const BYTES: &str = "handoff_buffer_bytes";
    pub const WAIT: &str = "handoff_buffer_wait_seconds";
    pub const FAILOVER_DURATION: &str = "handoff_buffer_failover_duration_seconds";

    /// What kind of series a metric is.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Kind {
        Counter,
        Gauge,
        Histogram,
    }

    impl Kind {
        /// The name Prometheus's exposition format uses (`# TYPE`).
        pub fn as_str(self) -> &'static str {
            match self {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            }
        }
    }

    /// One metric as it is registered and documented: name, kind, label names, help.
    #[derive(Debug, Clone, Copy)]
    pub struct Def {
        pub name: &'static str,
        pub kind: Kind,
        pub labels: &'static [&'static str],
        /// One line (Markdown: `code` in backquotes; the backquotes are left out of
        /// the exposition's `# HELP`).
        pub help: &'static str,
    }

    impl Def {
        /// Registers the metric's description (`# HELP`) and unit with the recorder.
        pub fn describe(&self) {
            use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
            let help = self.help.replace('`', "");
            let unit = if self.name.ends_with("_seconds") {
                Some(Unit::Seconds)
            } else if self.name.ends_with("_bytes") || self.name.ends_with("_bytes_total") {
                Some(Unit::Bytes)
            } else {
                None
            };
            match (self.kind, unit) {
                (Kind::Counter, Some(u)) => describe_counter!(self.name, u, help),
                (Kind::Counter, None) => describe_counter!(self.name, help),
                (Kind::Gauge, Some(u)) => describe_gauge!(self.name, u, help),
                (Kind::Gauge, None) => describe_gauge!(self.name, help),
                (Kind::Histogram, Some(u)) => describe_histogram!(self.name, u, help),
                (Kind::Histogram, None) => describe_histogram!(self.name, help),
            }
        }
    }

    use Kind::{Counter, Gauge, Histogram};

    /// Every series of the buffer.
    pub const METRICS: &[Def] = &[
        Def {
            name: STARTS,
            kind: Counter,
            labels: &["shard"],
            help: "Buffering cycles started",
        },
        Def {
            name: STARTS_SKIPPED,
            kind: Counter,
            labels: &["shard", "reason"],
            help: "Buffering cycles not started, by `reason` (`last_failover_too_recent`)",
        },
        Def {
            name: STOPS,
            kind: Counter,
            labels: &["shard", "reason"],
            help: "Buffering cycles ended, by `reason` (`new_primary`, `aborted`, `max_duration_exceeded`, `shutdown`)",
        },
        Def {
            name: BUFFERED,
            kind: Counter,
            labels: &["shard"],
            help: "Requests held by the buffer",
        },
        Def {
            name: BUFFERED_DRY_RUN,
            kind: Counter,
            labels: &["shard"],
            help: "Requests the buffer would have held (dry run)",
        },
        Def {
            name: DRAINED,
            kind: Counter,
            labels: &["shard"],
            help: "Held requests released to a primary",
        },
        Def {
            name: EVICTED,
            kind: Counter,
            labels: &["shard", "reason"],
            help: "Held requests that got an error instead, by `reason` (`window_exceeded`, `buffer_full`, `context_done`, `max_duration`, `shutdown`)",
        },
        Def {
            name: SKIPPED,
            kind: Counter,
            labels: &["shard", "reason"],
            help: "Requests that were not held while buffering, by `reason` (`disabled`, `buffer_full`, `shutdown`)",
        },
        Def {
            name: DEPTH,
            kind: Gauge,
            labels: &["shard"],
            help: "Requests held now",
        },
        Def {
            name: BYTES,
            kind: Gauge,
            labels: &[],
            help: "Bytes of requests held now, across all shards",
        },
        Def {
            name: WAIT,
            kind: Histogram,
            labels: &["shard"],
            help: "How long each held request waited",
        },
        Def {
            name: FAILOVER_DURATION,
            kind: Histogram,
            labels: &["shard"],
            help: "How long each buffering cycle lasted",
        },
    ];
}

/// The states of one shard's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Idle,
    Buffering,
    Draining,
}

const IDLE: u8 = 0;
const BUSY: u8 = 1;

/// Why a buffering cycle ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A new primary is established: release to it.
    NewPrimary,
    /// The switchover was rolled back: release to the old primary.
    Aborted,
    /// The cycle lasted `HANDOFF_BUFFER_MAX_FAILOVER_DURATION` with no primary.
    MaxDurationExceeded,
    /// The proxy is shutting down.
    Shutdown,
}

impl StopReason {
    fn label(self) -> &'static str {
        match self {
            StopReason::NewPrimary => "new_primary",
            StopReason::Aborted => "aborted",
            StopReason::MaxDurationExceeded => "max_duration_exceeded",
            StopReason::Shutdown => "shutdown",
        }
    }
}

/// What a start did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    Started,
    /// Already buffering: the cycle continues (under the newer epoch, if it is newer).
    AlreadyBuffering,
    /// The epoch is at or below the last completed cycle's.
    StaleEpoch,
    /// `HANDOFF_BUFFER_MIN_TIME_BETWEEN_FAILOVERS` has not passed since the last cycle.
    LastFailoverTooRecent,
    /// The buffer is shutting down.
    ShuttingDown,
    /// No such shard.
    UnknownShard,
}

/// Why a held request was not released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    #[error("the request waited longer than HANDOFF_BUFFER_WINDOW")]
    WindowExceeded,
    #[error("the shard's buffer was full and this was its oldest request (HANDOFF_BUFFER_SIZE)")]
    Evicted,
    #[error("the buffers hold HANDOFF_BUFFER_MAX_BYTES already")]
    BufferFull,
    #[error("no primary within HANDOFF_BUFFER_MAX_FAILOVER_DURATION")]
    FailoverTimeout,
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

impl BufferError {
    /// The SQLSTATE the proxy sends for it (docs/buffer.md, "What a held request gets").
    pub fn sqlstate(self) -> &'static str {
        match self {
            BufferError::Evicted | BufferError::BufferFull => "53300",
            BufferError::WindowExceeded | BufferError::FailoverTimeout => "57P03",
            BufferError::ShuttingDown => "57P01",
        }
    }

    fn label(self) -> &'static str {
        match self {
            BufferError::WindowExceeded => "window_exceeded",
            BufferError::Evicted => "buffer_full",
            BufferError::BufferFull => "buffer_full",
            BufferError::FailoverTimeout => "max_duration",
            BufferError::ShuttingDown => "shutdown",
        }
    }
}

/// A request's admission.
#[derive(Debug)]
pub enum Admission {
    /// Not buffered: proceed.
    Passed,
    /// Was held and is now released: proceed, and drop this when the request is done.
    Released(Release),
}

/// A released request, counted against the drain concurrency until dropped.
#[derive(Debug)]
pub struct Release {
    shard: Arc<Shard>,
    inner: Arc<Inner>,
    /// False for a release that never reached its waiter (nothing to give back).
    active: bool,
}

impl Drop for Release {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        let mut g = self.shard.lock();
        g.outstanding = g.outstanding.saturating_sub(1);
        if g.state == State::Draining {
            self.inner.drain(&self.shard, &mut g);
        }
    }
}

/// One request held in a shard's queue, waiting for the cycle to end.
#[derive(Debug)]
struct Waiter {
    /// Its place in the queue (from `ShardInner::next_id`), to find it again when its
    /// caller gives up.
    id: u64,
    /// The request's size, counted against `HANDOFF_BUFFER_MAX_BYTES` while held.
    bytes: usize,
    /// When it was queued: its wait is measured from here, and the window too.
    enqueued: Instant,
    /// Where the outcome goes: a release (pass or retry on the new primary) or why not.
    tx: oneshot::Sender<Result<Release, BufferError>>,
}

/// A shard's buffer state, behind its lock.
#[derive(Debug)]
struct ShardInner {
    /// Idle, buffering or draining.
    state: State,
    /// The current (or last) cycle's epoch.
    epoch: u64,
    /// The highest epoch whose cycle has ended.
    completed: u64,
    /// When the current state began (a cycle's length is measured from here).
    since: Instant,
    /// When the last cycle ended: a new one within
    /// `HANDOFF_BUFFER_MIN_TIME_BETWEEN_FAILOVERS` of it is refused.
    last_end: Option<Instant>,
    /// The held requests, oldest first.
    queue: VecDeque<Waiter>,
    /// Bytes held in this shard's queue.
    bytes: usize,
    /// Released requests still running while draining: at most
    /// `HANDOFF_BUFFER_DRAIN_CONCURRENCY`.
    outstanding: usize,
    /// The id the next waiter gets.
    next_id: u64,
    /// Why the current (or last) cycle started.
    reason: String,
}

/// One shard's buffer.
#[derive(Debug)]
struct Shard {
    /// The shard's name (metrics' label).
    name: String,
    /// Whether this shard buffers at all (`HANDOFF_BUFFER_ENABLED`, `HANDOFF_BUFFER_SHARDS`):
    /// a disabled one passes requests through during a failover, to fail as they would.
    enabled: bool,
    /// `IDLE` while the shard passes requests through: the hot-path check.
    gate: AtomicU8,
    /// Everything else, taken only off the hot path.
    inner: Mutex<ShardInner>,
}

impl Shard {
    /// The shard's state; a panic elsewhere while it was held leaves it consistent
    /// (no await and no half-made update under the lock), so poison is ignored.
    fn lock(&self) -> MutexGuard<'_, ShardInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, name: &'static str) {
        metrics::counter!(name, "shard" => self.name.clone()).increment(1);
    }

    fn count_reason(&self, name: &'static str, reason: &'static str) {
        metrics::counter!(name, "shard" => self.name.clone(), "reason" => reason).increment(1);
    }

    fn depth(&self, g: &ShardInner) {
        metrics::gauge!(metric::DEPTH, "shard" => self.name.clone()).set(g.queue.len() as f64);
    }
}

#[derive(Debug)]
struct Inner {
    cfg: BufferConfig,
    shards: HashMap<String, Arc<Shard>>,
    bytes: AtomicUsize,
    shutting_down: AtomicBool,
}

/// The buffer for every shard. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Buffer {
    inner: Arc<Inner>,
}

impl Buffer {
    /// A buffer for these shards. Fails if the configuration is invalid for them.
    pub fn new(cfg: BufferConfig, shards: &[&str]) -> Result<Self, ConfigError> {
        cfg.validate(shards)?;
        let now = Instant::now();
        let map = shards
            .iter()
            .map(|name| {
                let enabled = cfg.enabled
                    && cfg
                        .shards
                        .as_ref()
                        .is_none_or(|list| list.iter().any(|s| s == name));
                let shard = Arc::new(Shard {
                    name: name.to_string(),
                    enabled,
                    gate: AtomicU8::new(IDLE),
                    inner: Mutex::new(ShardInner {
                        state: State::Idle,
                        epoch: 0,
                        completed: 0,
                        since: now,
                        last_end: None,
                        queue: VecDeque::new(),
                        bytes: 0,
                        outstanding: 0,
                        next_id: 0,
                        reason: String::new(),
                    }),
                });
                zero_series(name);
                (name.to_string(), shard)
            })
            .collect();
        metrics::gauge!(metric::BYTES).set(0.0);
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                shards: map,
                bytes: AtomicUsize::new(0),
                shutting_down: AtomicBool::new(false),
            }),
        })
    }

    /// The shard's state.
    pub fn state(&self, shard: &str) -> Option<State> {
        self.inner.shards.get(shard).map(|s| s.lock().state)
    }

    /// Why the shard's current (or last) cycle started.
    pub fn reason(&self, shard: &str) -> Option<String> {
        self.inner
            .shards
            .get(shard)
            .map(|s| s.lock().reason.clone())
    }

    /// Requests held for the shard now.
    pub fn depth(&self, shard: &str) -> usize {
        self.inner
            .shards
            .get(shard)
            .map_or(0, |s| s.lock().queue.len())
    }

    /// Request bytes held across all shards now.
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Acquire)
    }

    /// True when a request on `shard` would pass [`Buffer::wait`] at once (the shard is
    /// not holding): one atomic load, so callers can keep the waiting path out of their
    /// own state.
    pub fn passes(&self, shard: &str) -> bool {
        self.inner
            .shards
            .get(shard)
            .is_none_or(|s| s.gate.load(Ordering::Acquire) == IDLE)
    }

    /// Waits for permission to start a request of `bytes` on `shard` (see the crate's
    /// contract).
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future removes the request and frees its slot and bytes.
    pub async fn wait(&self, shard: &str, bytes: usize) -> Result<Admission, BufferError> {
        let Some(s) = self.inner.shards.get(shard) else {
            return Ok(Admission::Passed);
        };
        if s.gate.load(Ordering::Acquire) == IDLE {
            return Ok(Admission::Passed);
        }
        self.hold(Arc::clone(s), bytes).await
    }

    async fn hold(&self, s: Arc<Shard>, bytes: usize) -> Result<Admission, BufferError> {
        let cfg = &self.inner.cfg;
        let (id, enqueued, rx) = {
            let mut g = s.lock();
            if self.inner.shutting_down.load(Ordering::Acquire) {
                s.count_reason(metric::SKIPPED, "shutdown");
                return Ok(Admission::Passed);
            }
            if g.state == State::Idle {
                return Ok(Admission::Passed);
            }
            if !s.enabled {
                s.count_reason(metric::SKIPPED, "disabled");
                return Ok(Admission::Passed);
            }
            if cfg.dry_run {
                s.count(metric::BUFFERED_DRY_RUN);
                return Ok(Admission::Passed);
            }
            // Bytes first: a request that cannot fit even if this shard's queue were
            // emptied is refused without evicting anyone.
            let others = self.inner.bytes.load(Ordering::Acquire) - g.bytes;
            if bytes > cfg.max_bytes.saturating_sub(others) {
                s.count_reason(metric::SKIPPED, "buffer_full");
                return Err(BufferError::BufferFull);
            }
            while g.queue.len() >= cfg.size
                || self.inner.bytes.load(Ordering::Acquire) + bytes > cfg.max_bytes
            {
                let Some(oldest) = g.queue.pop_front() else {
                    break;
                };
                self.evict(&s, &mut g, oldest, BufferError::Evicted);
            }
            let id = g.next_id;
            g.next_id += 1;
            let (tx, rx) = oneshot::channel();
            let enqueued = Instant::now();
            g.queue.push_back(Waiter {
                id,
                bytes,
                enqueued,
                tx,
            });
            g.bytes += bytes;
            self.inner.bytes.fetch_add(bytes, Ordering::AcqRel);
            metrics::gauge!(metric::BYTES).set(self.inner.bytes.load(Ordering::Acquire) as f64);
            s.count(metric::BUFFERED);
            if g.state == State::Draining {
                self.inner.drain(&s, &mut g);
            }
            s.depth(&g);
            (id, enqueued, rx)
        };
        let mut guard = CancelGuard {
            buffer: self,
            shard: &s,
            id,
            armed: true,
        };
        let mut rx = rx;
        let outcome = tokio::select! {
            r = &mut rx => r.unwrap_or(Err(BufferError::ShuttingDown)),
            _ = tokio::time::sleep_until(enqueued + cfg.window) => {
                let mut g = s.lock();
                match remove(&mut g, id) {
                    Some(w) => {
                        self.evict(&s, &mut g, w, BufferError::WindowExceeded);
                        s.depth(&g);
                        Err(BufferError::WindowExceeded)
                    }
                    // Released (or failed) at the same moment: take that outcome.
                    None => rx.try_recv().unwrap_or(Err(BufferError::ShuttingDown)),
                }
            }
        };
        guard.armed = false;
        outcome.map(Admission::Released)
    }

    /// Removes a waiter's bytes and tells it `err`, counting the eviction.
    fn evict(&self, s: &Shard, g: &mut ShardInner, w: Waiter, err: BufferError) {
        g.bytes -= w.bytes;
        self.inner.bytes.fetch_sub(w.bytes, Ordering::AcqRel);
        metrics::gauge!(metric::BYTES).set(self.inner.bytes.load(Ordering::Acquire) as f64);
        s.count_reason(metric::EVICTED, err.label());
        let _ = w.tx.send(Err(err));
    }

    /// Revocation: start buffering `shard` for `epoch`.
    pub fn start(&self, shard: &str, epoch: u64, reason: &str) -> StartOutcome {
        let Some(s) = self.inner.shards.get(shard) else {
            return StartOutcome::UnknownShard;
        };
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return StartOutcome::ShuttingDown;
        }
        let mut g = s.lock();
        if epoch <= g.completed {
            return StartOutcome::StaleEpoch;
        }
        match g.state {
            State::Buffering if epoch <= g.epoch => return StartOutcome::AlreadyBuffering,
            State::Buffering => {
                // A newer revocation during the cycle: it continues under the new epoch
                // (only a stop for that epoch ends it), with its own time limit.
                g.epoch = epoch;
                g.reason = reason.to_string();
                drop(g);
                self.arm_timer(shard, epoch);
                return StartOutcome::AlreadyBuffering;
            }
            // Back-to-back switchovers: what is still queued from the last cycle is held
            // again, for the new primary.
            State::Draining => {}
            State::Idle => {
                let min = self.inner.cfg.min_time_between_failovers;
                if !min.is_zero() && g.last_end.is_some_and(|t| t.elapsed() < min) {
                    s.count_reason(metric::STARTS_SKIPPED, "last_failover_too_recent");
                    return StartOutcome::LastFailoverTooRecent;
                }
            }
        }
        g.state = State::Buffering;
        g.epoch = epoch;
        g.since = Instant::now();
        s.gate.store(BUSY, Ordering::Release);
        g.reason = reason.to_string();
        s.count(metric::STARTS);
        drop(g);
        self.arm_timer(shard, epoch);
        StartOutcome::Started
    }

    /// Ends the cycle of `epoch` after `HANDOFF_BUFFER_MAX_FAILOVER_DURATION` if it is
    /// still running then. Needs a tokio runtime.
    fn arm_timer(&self, shard: &str, epoch: u64) {
        let me = self.clone();
        let name = shard.to_string();
        let max = self.inner.cfg.max_failover_duration;
        tokio::spawn(async move {
            tokio::time::sleep(max).await;
            me.stop(&name, epoch, StopReason::MaxDurationExceeded);
        });
    }

    /// Establishment or abort (or the end of the cycle's time): stop buffering `shard`
    /// for `epoch`. Returns false when ignored (not buffering, or another epoch).
    pub fn stop(&self, shard: &str, epoch: u64, reason: StopReason) -> bool {
        let Some(s) = self.inner.shards.get(shard) else {
            return false;
        };
        let mut g = s.lock();
        if g.state != State::Buffering || g.epoch != epoch {
            return false;
        }
        s.count_reason(metric::STOPS, reason.label());
        metrics::histogram!(metric::FAILOVER_DURATION, "shard" => s.name.clone())
            .record(g.since.elapsed());
        g.completed = epoch;
        g.last_end = Some(Instant::now());
        match reason {
            StopReason::NewPrimary | StopReason::Aborted => {
                g.state = State::Draining;
                self.inner.drain(s, &mut g);
            }
            StopReason::MaxDurationExceeded => {
                self.fail_all(s, &mut g, BufferError::FailoverTimeout)
            }
            StopReason::Shutdown => self.fail_all(s, &mut g, BufferError::ShuttingDown),
        }
        s.depth(&g);
        true
    }

    fn fail_all(&self, s: &Shard, g: &mut ShardInner, err: BufferError) {
        while let Some(w) = g.queue.pop_front() {
            self.evict(s, g, w, err);
        }
        g.state = State::Idle;
        s.gate.store(IDLE, Ordering::Release);
    }

    /// Shutdown: every held request gets `ShuttingDown`; later requests pass through,
    /// counted as skipped.
    pub fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        for s in self.inner.shards.values() {
            let mut g = s.lock();
            if g.state == State::Buffering {
                s.count_reason(metric::STOPS, StopReason::Shutdown.label());
            }
            self.fail_all(s, &mut g, BufferError::ShuttingDown);
            g.state = State::Idle;
            // Keep the slow path so later requests are counted.
            s.gate.store(BUSY, Ordering::Release);
            s.depth(&g);
        }
    }
}

impl Inner {
    /// Releases queued requests while the drain concurrency allows; the shard becomes
    /// idle when its queue is empty.
    fn drain(self: &Arc<Self>, s: &Arc<Shard>, g: &mut ShardInner) {
        while g.outstanding < self.cfg.drain_concurrency {
            let Some(w) = g.queue.pop_front() else { break };
            g.bytes -= w.bytes;
            self.bytes.fetch_sub(w.bytes, Ordering::AcqRel);
            g.outstanding += 1;
            let release = Release {
                shard: Arc::clone(s),
                inner: Arc::clone(self),
                active: true,
            };
            metrics::histogram!(metric::WAIT, "shard" => s.name.clone())
                .record(w.enqueued.elapsed());
            match w.tx.send(Ok(release)) {
                Ok(()) => s.count(metric::DRAINED),
                Err(Ok(mut release)) => {
                    // The waiter went away just now: not outstanding after all. (Its
                    // drop must not take the lock we hold.)
                    release.active = false;
                    g.outstanding -= 1;
                    s.count_reason(metric::EVICTED, "context_done");
                }
                Err(Err(_)) => g.outstanding -= 1,
            }
        }
        metrics::gauge!(metric::BYTES).set(self.bytes.load(Ordering::Acquire) as f64);
        if g.queue.is_empty() && g.state == State::Draining {
            g.state = State::Idle;
            s.gate.store(IDLE, Ordering::Release);
        }
        s.depth(g);
    }
}

fn remove(g: &mut ShardInner, id: u64) -> Option<Waiter> {
    let pos = g.queue.iter().position(|w| w.id == id)?;
    g.queue.remove(pos)
}

/// Removes a waiter whose `wait` future is dropped before an outcome.
struct CancelGuard<'a> {
    buffer: &'a Buffer,
    shard: &'a Arc<Shard>,
    id: u64,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut g = self.shard.lock();
        if let Some(w) = remove(&mut g, self.id) {
            g.bytes -= w.bytes;
            self.buffer.inner.bytes.fetch_sub(w.bytes, Ordering::AcqRel);
            self.shard.count_reason(metric::EVICTED, "context_done");
            if g.state == State::Draining {
                self.buffer.inner.drain(self.shard, &mut g);
            }
            self.shard.depth(&g);
        }
    }
}

/// Describes the buffer's series for the Prometheus exposition (`# HELP`), from
/// [`metric::METRICS`]; called once by the proxy when it installs its recorder.
pub fn describe_metrics() {
    for m in metric::METRICS {
        m.describe();
    }
}

/// Creates every per-shard series at zero so dashboards see them from startup.
fn zero_series(shard: &str) {
    let s = shard.to_string();
    for name in [
        metric::STARTS,
        metric::BUFFERED,
        metric::DRAINED,
        metric::BUFFERED_DRY_RUN,
    ] {
        metrics::counter!(name, "shard" => s.clone()).absolute(0);
    }
    for reason in [
        "new_primary",
        "aborted",
        "max_duration_exceeded",
        "shutdown",
    ] {
        metrics::counter!(metric::STOPS, "shard" => s.clone(), "reason" => reason).absolute(0);
    }
    for reason in [
        "window_exceeded",
        "buffer_full",
        "context_done",
        "max_duration",
        "shutdown",
    ] {
        metrics::counter!(metric::EVICTED, "shard" => s.clone(), "reason" => reason).absolute(0);
    }
    for reason in ["buffer_full", "disabled", "shutdown"] {
        metrics::counter!(metric::SKIPPED, "shard" => s.clone(), "reason" => reason).absolute(0);
    }
    metrics::counter!(metric::STARTS_SKIPPED, "shard" => s.clone(), "reason" => "last_failover_too_recent")
        .absolute(0);
    metrics::gauge!(metric::DEPTH, "shard" => s).set(0.0);
}

#[cfg(test)]
mod tests;
